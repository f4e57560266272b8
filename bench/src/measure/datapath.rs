//! Per-packet cost of every verdict path through `BPF_PROG_TEST_RUN`, next to two floors
//! (an empty TC program and a parse-only one), with the policy and NAT maps filled to
//! several levels.
//!
//! `BPF_PROG_TEST_RUN` runs the program `repeat` times on the same skb, so a path that
//! rewrites the packet would see its own output on the next run. The SNAT and reverse-SNAT
//! cases therefore install mirror entries: the translated packet translates back to the
//! original one, so every repetition takes the same path with the full rewrite. A new flow
//! cannot repeat at all: that case runs once per distinct flow and is shown next to the
//! empty program measured the same way (the per-call overhead is then part of both). The
//! gateway decrements the TTL of what it forwards, so that case repeats in batches shorter
//! than the TTL.

use std::net::Ipv4Addr;

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use egress_agent::{
    datapath::testing::{
        OBJECT,
        packets::{
            ACK, L4, SYN, TC_ACT_NEXT, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_PASS, XDP_REDIRECT,
            on_underlay, packet,
            scenario::{
                DEST, EGRESS_IFINDEX, EGRESS_IP, GATEWAY, OTHER_DEST, POD, POD_IFINDEX, POD_NODE,
                TUNNEL_IFINDEX, TUNNEL_PORT,
            },
        },
    },
    health::probe_frame,
};
use egress_common::{
    config::{DatapathConfig, VNI_TO_GATEWAY, VNI_TO_POD_NODE},
    counters::{Counter, reason},
    flow::{FlowKey, PROTO_TCP},
    gateway::{PROBE_VIA_ANY, PROBE_VIA_TC},
    map_names,
    nat::{NatForward, NatReverse},
    nodes::{EgressIp, LocalPod, NodeInfo},
    policy::{GATEWAY_EXCLUDED, GATEWAY_NONE, PolicyKey, PolicyValue},
    program_names,
};
use serde::Serialize;

use super::{BenchError, ensure_root, stats::Summary};

/// A pod whose policy has no gateway node.
const POD_NO_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const EXCLUDED_DEST: Ipv4Addr = Ipv4Addr::new(198, 51, 200, 10);
/// Both inside the NAT port range (1024-32767): the mirror entry translates back to the
/// pod's port, and the gateway does not reuse a translation whose port lies outside its range.
const POD_PORT: u16 = 30000;
const NAT_PORT: u16 = 20000;
/// NAT maps big enough for the largest fill level plus the new flows of every run.
const NAT_MAP_SIZE: u32 = 262_144;

#[derive(Debug, clap::Args)]
pub(super) struct DatapathArgs {
    /// Repetitions per measurement (`BPF_PROG_TEST_RUN` `repeat`).
    #[arg(long, default_value_t = 1_000_000)]
    reps: u32,
    /// Measurements per case; the report shows their median, min and max.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Distinct new flows per run of the new-flow SNAT case (one program run each).
    #[arg(long, default_value_t = 10_000)]
    new_flows: u32,
    /// Policy map fill levels (entries).
    #[arg(long, value_delimiter = ',', default_values_t = [10u32, 10_000])]
    policy_entries: Vec<u32>,
    /// NAT map fill levels (entries in each of the forward and reverse maps).
    #[arg(long, value_delimiter = ',', default_values_t = [100u32, 100_000])]
    nat_entries: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub(super) struct DatapathReport {
    pub reps: u32,
    pub runs: usize,
    pub new_flows: u32,
    pub cases: Vec<CaseResult>,
}

#[derive(Debug, Serialize)]
pub(super) struct CaseResult {
    /// Stable identifier, e.g. `from_pod/no_match`.
    pub id: &'static str,
    pub program: &'static str,
    pub description: &'static str,
    /// `repeat` (one skb, `reps` runs) or `one_run_per_packet` (new flows).
    pub method: &'static str,
    /// Matched traffic the datapath acts on (as opposed to floors and untouched traffic).
    pub matched: bool,
    pub policy_entries: u32,
    pub nat_entries: u32,
    pub ns_per_packet: Summary,
}

pub(super) fn run(args: &DatapathArgs) -> anyhow::Result<DatapathReport> {
    ensure_root()?;
    anyhow::ensure!(
        args.reps > 0 && args.runs > 0,
        "--reps and --runs must be positive"
    );
    let mut cases = Vec::new();
    for &policy_entries in &args.policy_entries {
        for &nat_entries in &args.nat_entries {
            eprintln!("datapath: policy map {policy_entries} entries, NAT maps {nat_entries}");
            cases.extend(measure_level(args, policy_entries, nat_entries)?);
        }
    }
    Ok(DatapathReport {
        reps: args.reps,
        runs: args.runs,
        new_flows: args.new_flows,
        cases,
    })
}

/// One case measured with `repeat`: a program, a packet and the path it must take.
struct Case {
    id: &'static str,
    description: &'static str,
    program: &'static str,
    matched: bool,
    node: Role,
    frame: Vec<u8>,
    cb: [u32; 2],
    verdict: u32,
    /// Counter that must rise once per run (`None` for the floors, which count nothing).
    reason: Option<u32>,
    /// The gateway forwards the packet and decrements its TTL: each run on the same skb
    /// costs one, so the repetitions go in batches (see [`TTL_BATCH`]).
    forwards: bool,
}

/// Repetitions on one skb for a forwarded packet: fewer than its TTL (64) allows.
const TTL_BATCH: u32 = 60;

#[derive(Clone, Copy)]
enum Role {
    PodNode,
    Gateway,
}

fn measure_level(
    args: &DatapathArgs,
    policy_entries: u32,
    nat_entries: u32,
) -> anyhow::Result<Vec<CaseResult>> {
    let mut pod_node = BenchNode::new(POD_NODE)?;
    pod_node.setup_pod_node(policy_entries)?;
    let mut gateway = BenchNode::new(GATEWAY)?;
    gateway.setup_gateway(policy_entries, nat_entries)?;

    let tcp = |src, sport, dst, dport, flags| packet(src, sport, dst, dport, L4::Tcp { flags });
    let from_pod_node = [u32::from_ne_bytes(POD_NODE.octets()), VNI_TO_GATEWAY];
    let from_gateway = [u32::from_ne_bytes(GATEWAY.octets()), VNI_TO_POD_NODE];
    let steered = tcp(POD, 40000, DEST, 443, ACK);
    // The pod's node must know the flow before the reply-to-pod and redirect paths.
    let opened = pod_node.run(
        program_names::FROM_POD,
        &tcp(POD, 40000, DEST, 443, SYN),
        [0; 2],
        1,
    )?;
    anyhow::ensure!(opened.0 == TC_ACT_REDIRECT, "warm-up SYN not redirected");

    let cases = vec![
        Case {
            id: "floor/empty",
            description: "empty TC program",
            program: program_names::BENCH_EMPTY,
            matched: false,
            node: Role::PodNode,
            frame: steered.clone(),
            cb: [0; 2],
            verdict: TC_ACT_NEXT,
            reason: None,
            forwards: false,
        },
        Case {
            id: "floor/parse_only",
            description: "parses Ethernet/IPv4/TCP, then passes",
            program: program_names::BENCH_PARSE_ONLY,
            matched: false,
            node: Role::PodNode,
            frame: steered.clone(),
            cb: [0; 2],
            verdict: TC_ACT_NEXT,
            reason: None,
            forwards: false,
        },
        Case {
            id: "from_pod/no_match",
            description: "pod traffic no policy matches: untouched",
            program: program_names::FROM_POD,
            matched: false,
            node: Role::PodNode,
            frame: tcp(POD, 40000, OTHER_DEST, 443, SYN),
            cb: [0; 2],
            verdict: TC_ACT_NEXT,
            reason: Some(reason::PASS_NO_MATCH),
            forwards: false,
        },
        Case {
            id: "from_pod/excluded",
            description: "destination in an excluded CIDR: untouched",
            program: program_names::FROM_POD,
            matched: false,
            node: Role::PodNode,
            frame: tcp(POD, 40000, EXCLUDED_DEST, 443, SYN),
            cb: [0; 2],
            verdict: TC_ACT_NEXT,
            reason: Some(reason::PASS_EXCLUDED),
            forwards: false,
        },
        Case {
            id: "from_pod/no_gateway_drop",
            description: "matched, policy without gateway node: dropped",
            program: program_names::FROM_POD,
            matched: true,
            node: Role::PodNode,
            frame: tcp(POD_NO_GATEWAY, 40000, DEST, 443, SYN),
            cb: [0; 2],
            verdict: TC_ACT_SHOT,
            reason: Some(reason::DROP_NO_GATEWAY),
            forwards: false,
        },
        Case {
            id: "from_pod/tunnel_redirect",
            description: "matched, steered flow: into the tunnel to the gateway",
            program: program_names::FROM_POD,
            matched: true,
            node: Role::PodNode,
            frame: steered.clone(),
            cb: [0; 2],
            verdict: TC_ACT_REDIRECT,
            reason: Some(reason::REDIRECT_TO_GATEWAY),
            forwards: false,
        },
        Case {
            id: "from_tunnel/reply_to_pod",
            description: "pod's node: reply from the gateway delivered to the pod",
            program: program_names::TEST_FROM_TUNNEL,
            matched: true,
            node: Role::PodNode,
            frame: tcp(DEST, 443, POD, 40000, ACK),
            cb: from_gateway,
            verdict: TC_ACT_REDIRECT,
            reason: Some(reason::REPLY_TO_POD),
            forwards: false,
        },
        Case {
            id: "from_tunnel/snat_existing_flow",
            description: "gateway: SNAT of an established flow",
            program: program_names::TEST_FROM_TUNNEL,
            matched: true,
            node: Role::Gateway,
            frame: tcp(POD, POD_PORT, DEST, 443, ACK),
            cb: from_pod_node,
            verdict: TC_ACT_REDIRECT,
            reason: Some(reason::SNAT_EXISTING_FLOW),
            forwards: true,
        },
        Case {
            id: "from_egress/reverse_snat",
            description: "gateway: reply reverse-SNATed and tunnelled back",
            program: program_names::FROM_EGRESS,
            matched: true,
            node: Role::Gateway,
            frame: tcp(DEST, 443, EGRESS_IP, NAT_PORT, ACK),
            cb: [0; 2],
            verdict: TC_ACT_REDIRECT,
            reason: Some(reason::REVERSE_SNAT),
            forwards: false,
        },
    ];

    let mut results = Vec::new();
    for case in &cases {
        let node = match case.node {
            Role::PodNode => &pod_node,
            Role::Gateway => &gateway,
        };
        let mut runs = Vec::new();
        for _ in 0..args.runs {
            let before = case.reason.map(|r| node.counter(r)).transpose()?;
            let all_before = node.all_counters()?;
            let (verdict, ns) = if case.forwards {
                node.run_in_batches(case.program, &case.frame, case.cb, args.reps)?
            } else {
                node.run(case.program, &case.frame, case.cb, args.reps)?
            };
            check_verdict(case.id, case.verdict, verdict)?;
            if let (Some(reason), Some(before)) = (case.reason, before) {
                let checked = check_path(
                    case.id,
                    reason,
                    u64::from(args.reps),
                    node.counter(reason)? - before,
                );
                if let Err(error) = checked {
                    // Name the paths that ran instead.
                    let rose: Vec<String> = node
                        .all_counters()?
                        .iter()
                        .zip(&all_before)
                        .enumerate()
                        .filter(|(_, (after, before))| after > before)
                        .map(|(i, (after, before))| {
                            format!("{} +{}", reason::NAMES[i], after - before)
                        })
                        .collect();
                    anyhow::bail!("{error} (counters that rose: {})", rose.join(", "));
                }
            }
            runs.push(ns);
        }
        results.push(CaseResult {
            id: case.id,
            program: case.program,
            description: case.description,
            method: "repeat",
            matched: case.matched,
            policy_entries,
            nat_entries,
            ns_per_packet: Summary::of(runs).expect("runs > 0"),
        });
    }

    // New flows: one run per distinct flow, next to the empty program measured alike.
    let mut new_flow_runs = Vec::new();
    let mut single_empty_runs = Vec::new();
    let mut probe_runs = Vec::new();
    let mut xdp_probe_runs = Vec::new();
    let mut xdp_pass_runs = Vec::new();
    for _ in 0..args.runs {
        new_flow_runs.push(gateway.snat_new_flows(args.new_flows)?);
        probe_runs.push(gateway.answer_probes(args.new_flows, from_pod_node)?);
        xdp_probe_runs.push(gateway.answer_probes_in_xdp(args.new_flows, PROBE_VIA_ANY)?);
        // What every other packet of the underlay pays: a probe asking for the TC program
        // is parsed to its last byte and passed (ordinary traffic stops sooner).
        xdp_pass_runs.push(gateway.answer_probes_in_xdp(args.new_flows, PROBE_VIA_TC)?);
        let mut total = 0.0;
        for _ in 0..args.new_flows {
            total += gateway
                .run(program_names::BENCH_EMPTY, &steered, [0; 2], 1)?
                .1;
        }
        single_empty_runs.push(total / f64::from(args.new_flows.max(1)));
    }
    for (id, program, description, matched, runs) in [
        (
            "floor/empty_one_run_per_packet",
            program_names::BENCH_EMPTY,
            "empty TC program, one BPF_PROG_TEST_RUN per packet",
            false,
            single_empty_runs,
        ),
        (
            "from_tunnel/snat_new_flow",
            program_names::TEST_FROM_TUNNEL,
            "gateway: SNAT of a new flow (port allocation, both NAT entries)",
            true,
            new_flow_runs,
        ),
        (
            "from_tunnel/probe_answer",
            program_names::TEST_FROM_TUNNEL,
            "gateway: a health probe answered (turned around into the tunnel)",
            false,
            probe_runs,
        ),
        (
            "probe_responder/probe_answer",
            program_names::PROBE_RESPONDER,
            "gateway: a health probe answered in XDP on the underlay (before decapsulation)",
            false,
            xdp_probe_runs,
        ),
        (
            "probe_responder/pass",
            program_names::PROBE_RESPONDER,
            "gateway: a frame the XDP responder parses fully and passes (the worst case of \
             ordinary underlay traffic)",
            false,
            xdp_pass_runs,
        ),
    ] {
        results.push(CaseResult {
            id,
            program,
            description,
            method: "one_run_per_packet",
            matched,
            policy_entries,
            nat_entries,
            ns_per_packet: Summary::of(runs).expect("runs > 0"),
        });
    }
    Ok(results)
}

fn check_verdict(case: &str, expected: u32, got: u32) -> Result<(), BenchError> {
    if expected != got {
        return Err(BenchError::WrongVerdict {
            case: case.into(),
            expected,
            got,
        });
    }
    Ok(())
}

fn check_path(case: &str, reason: u32, expected: u64, got: u64) -> Result<(), BenchError> {
    if expected != got {
        return Err(BenchError::WrongPath {
            case: case.into(),
            reason: reason::NAMES[reason as usize],
            expected,
            got,
        });
    }
    Ok(())
}

fn flow(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> FlowKey {
    FlowKey {
        src_ip: src.octets(),
        dst_ip: dst.octets(),
        src_port: sport.to_be_bytes(),
        dst_port: dport.to_be_bytes(),
        protocol: PROTO_TCP,
        _pad: [0; 3],
    }
}

fn policy_value(egress_ip: Ipv4Addr, gateway: [u8; 4]) -> PolicyValue {
    PolicyValue {
        egress_ip: egress_ip.octets(),
        gateway_ip: gateway,
        pod_node_ip: POD_NODE.octets(),
        gateway_group: 0,
    }
}

/// One node's datapath with fresh, unpinned maps (nothing attached anywhere).
struct BenchNode {
    ebpf: Ebpf,
}

impl BenchNode {
    fn new(node_ip: Ipv4Addr) -> anyhow::Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::NAT_FORWARD, NAT_MAP_SIZE)
            .map_max_entries(map_names::NAT_REVERSE, NAT_MAP_SIZE)
            .load(OBJECT)?;
        for name in [
            program_names::FROM_POD,
            program_names::FROM_EGRESS,
            program_names::TEST_FROM_TUNNEL,
            program_names::BENCH_EMPTY,
            program_names::BENCH_PARSE_ONLY,
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow::anyhow!("program {name} missing from the object"))?
                .try_into()?;
            program.load()?;
        }
        let responder: &mut Xdp = ebpf
            .program_mut(program_names::PROBE_RESPONDER)
            .ok_or_else(|| anyhow::anyhow!("the probe responder is missing from the object"))?
            .try_into()?;
        responder.load()?;
        let mut node = Self { ebpf };
        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(node.map_mut(map_names::CONFIG)?)?;
        config.set(
            0,
            DatapathConfig {
                node_ip: node_ip.octets(),
                tunnel_ifindex: TUNNEL_IFINDEX,
                nat_port_min: 1024,
                nat_port_max: 32767,
                // As the agent sets it for a 1450-byte tunnel.
                tunnel_mss: 1410,
                tunnel_port: TUNNEL_PORT,
            },
            0,
        )?;
        for ip in [POD_NODE, GATEWAY] {
            node.hash::<[u8; 4], NodeInfo>(map_names::NODES)?.insert(
                ip.octets(),
                NodeInfo::default(),
                0,
            )?;
        }
        Ok(node)
    }

    fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow::anyhow!("map {name} missing from the object"))
    }

    fn hash<K: Pod, V: Pod>(&mut self, name: &str) -> anyhow::Result<HashMap<&mut MapData, K, V>> {
        Ok(HashMap::try_from(self.map_mut(name)?)?)
    }

    fn policy(&mut self, pod: Ipv4Addr, dest: &str, value: PolicyValue) -> anyhow::Result<()> {
        let net: ipnet::Ipv4Net = dest.parse()?;
        let mut trie: LpmTrie<&mut MapData, PolicyKey, PolicyValue> =
            LpmTrie::try_from(self.map_mut(map_names::POLICIES)?)?;
        let key = PolicyKey {
            source_ip: pod.octets(),
            dest_ip: net.network().octets(),
        };
        trie.insert(&Key::new(32 + u32::from(net.prefix_len()), key), value, 0)?;
        Ok(())
    }

    /// Entries of other pods, up to `total` entries in the trie (`fixed` are already in).
    fn fill_policies(&mut self, total: u32, fixed: u32) -> anyhow::Result<()> {
        for i in 0..total.saturating_sub(fixed) {
            let pod = Ipv4Addr::new(10, 200, (i >> 8) as u8, i as u8);
            let value = policy_value(Ipv4Addr::UNSPECIFIED, GATEWAY.octets());
            self.policy(pod, "198.51.100.0/24", value)?;
        }
        Ok(())
    }

    fn setup_pod_node(&mut self, policy_entries: u32) -> anyhow::Result<()> {
        let to_gateway = policy_value(Ipv4Addr::UNSPECIFIED, GATEWAY.octets());
        self.policy(POD, "198.51.100.0/24", to_gateway)?;
        self.policy(POD, "198.51.0.0/16", to_gateway)?;
        let excluded = policy_value(Ipv4Addr::UNSPECIFIED, GATEWAY_EXCLUDED);
        self.policy(POD, "198.51.200.0/24", excluded)?;
        let no_gateway = policy_value(Ipv4Addr::UNSPECIFIED, GATEWAY_NONE);
        self.policy(POD_NO_GATEWAY, "198.51.100.0/24", no_gateway)?;
        self.fill_policies(policy_entries, 4)?;
        self.hash::<[u8; 4], LocalPod>(map_names::LOCAL_PODS)?
            .insert(
                POD.octets(),
                LocalPod {
                    ifindex: POD_IFINDEX,
                    _pad: 0,
                },
                0,
            )?;
        Ok(())
    }

    /// The gateway with mirror entries: POD:30000 translates to `EGRESS_IP:20000` and back,
    /// so repeated runs on one skb keep rewriting (see the module comment).
    fn setup_gateway(&mut self, policy_entries: u32, nat_entries: u32) -> anyhow::Result<()> {
        self.policy(
            POD,
            "198.51.100.0/24",
            policy_value(EGRESS_IP, GATEWAY.octets()),
        )?;
        self.policy(
            EGRESS_IP,
            "198.51.100.0/24",
            policy_value(POD, GATEWAY.octets()),
        )?;
        self.fill_policies(policy_entries, 2)?;
        for ip in [EGRESS_IP, POD] {
            self.hash::<[u8; 4], EgressIp>(map_names::EGRESS_IPS)?
                .insert(
                    ip.octets(),
                    EgressIp {
                        ifindex: EGRESS_IFINDEX,
                        _pad: 0,
                    },
                    0,
                )?;
        }
        let forward = |nat_ip: Ipv4Addr, nat_port: u16| NatForward {
            nat_ip: nat_ip.octets(),
            nat_port: nat_port.to_be_bytes(),
            _pad: [0; 2],
            pod_node_ip: POD_NODE.octets(),
            flags: 0,
            last_seen_ns: 0,
        };
        let reverse = |pod_ip: Ipv4Addr, pod_port: u16| NatReverse {
            pod_ip: pod_ip.octets(),
            pod_port: pod_port.to_be_bytes(),
            _pad: [0; 2],
            pod_node_ip: POD_NODE.octets(),
            flags: 0,
            last_seen_ns: 0,
        };
        let mut forwards = self.hash::<FlowKey, NatForward>(map_names::NAT_FORWARD)?;
        forwards.insert(
            flow(POD, POD_PORT, DEST, 443),
            forward(EGRESS_IP, NAT_PORT),
            0,
        )?;
        forwards.insert(
            flow(EGRESS_IP, NAT_PORT, DEST, 443),
            forward(POD, POD_PORT),
            0,
        )?;
        let mut reverses = self.hash::<FlowKey, NatReverse>(map_names::NAT_REVERSE)?;
        reverses.insert(
            flow(DEST, 443, EGRESS_IP, NAT_PORT),
            reverse(POD, POD_PORT),
            0,
        )?;
        reverses.insert(
            flow(DEST, 443, POD, POD_PORT),
            reverse(EGRESS_IP, NAT_PORT),
            0,
        )?;
        // Other flows' translations, towards destinations of their own.
        for i in 0..nat_entries.saturating_sub(2) {
            let pod = Ipv4Addr::new(10, 201, (i >> 8) as u8, i as u8);
            let remote = Ipv4Addr::new(203, 0, 113, 1 + (i / 30_000) as u8);
            let port = 1024 + (i % 30_000) as u16;
            self.hash::<FlowKey, NatForward>(map_names::NAT_FORWARD)?
                .insert(flow(pod, 40000, remote, 80), forward(EGRESS_IP, port), 0)?;
            self.hash::<FlowKey, NatReverse>(map_names::NAT_REVERSE)?
                .insert(flow(remote, 80, EGRESS_IP, port), reverse(pod, 40000), 0)?;
        }
        Ok(())
    }

    /// Runs `program` `reps` times on one skb: (verdict, nanoseconds per run).
    fn run(
        &self,
        program: &str,
        frame: &[u8],
        cb: [u32; 2],
        reps: u32,
    ) -> anyhow::Result<(u32, f64)> {
        let program: &SchedClassifier = self
            .ebpf
            .program(program)
            .ok_or_else(|| anyhow::anyhow!("program {program} missing"))?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        // struct __sk_buff up to the end of cb[5]: cb starts at byte 48.
        let mut ctx = [0u8; 68];
        ctx[48..52].copy_from_slice(&cb[0].to_ne_bytes());
        ctx[52..56].copy_from_slice(&cb[1].to_ne_bytes());
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: reps,
            ..TestRunOptions::default()
        })?;
        Ok((result.return_value, result.duration.as_nanos() as f64))
    }

    /// [`BenchNode::run`] in batches of at most [`TTL_BATCH`] repetitions, each on a fresh skb;
    /// returns the last verdict and the mean nanoseconds per repetition.
    fn run_in_batches(
        &self,
        program: &str,
        frame: &[u8],
        cb: [u32; 2],
        reps: u32,
    ) -> anyhow::Result<(u32, f64)> {
        let (mut left, mut total, mut verdict) = (reps, 0.0, 0);
        while left > 0 {
            let batch = left.min(TTL_BATCH);
            let (batch_verdict, ns) = self.run(program, frame, cb, batch)?;
            verdict = batch_verdict;
            total += ns * f64::from(batch);
            left -= batch;
        }
        Ok((verdict, total / f64::from(reps.max(1))))
    }

    /// SNATs `count` new flows, one run each; returns the mean nanoseconds per flow and
    /// removes the flows' NAT entries again so the fill level stays as set.
    fn snat_new_flows(&mut self, count: u32) -> anyhow::Result<f64> {
        let flows: Vec<(FlowKey, Vec<u8>)> = (0..count)
            .map(|i| {
                let sport = 33_000 + (i % 28_000) as u16;
                let dport = 1000 + (i / 28_000) as u16;
                let frame = packet(POD, sport, DEST, dport, L4::Tcp { flags: SYN });
                (flow(POD, sport, DEST, dport), frame)
            })
            .collect();
        let before = self.counter(reason::SNAT_NEW_FLOW)?;
        let cb = [u32::from_ne_bytes(POD_NODE.octets()), VNI_TO_GATEWAY];
        let mut total = 0.0;
        for (_, frame) in &flows {
            let (verdict, ns) = self.run(program_names::TEST_FROM_TUNNEL, frame, cb, 1)?;
            check_verdict("from_tunnel/snat_new_flow", TC_ACT_REDIRECT, verdict)?;
            total += ns;
        }
        let created = self.counter(reason::SNAT_NEW_FLOW)? - before;
        check_path(
            "from_tunnel/snat_new_flow",
            reason::SNAT_NEW_FLOW,
            u64::from(count),
            created,
        )?;
        for (key, _) in &flows {
            let mut forwards = self.hash::<FlowKey, NatForward>(map_names::NAT_FORWARD)?;
            let translation = forwards.get(key, 0)?;
            forwards.remove(key)?;
            let reply = FlowKey {
                src_ip: key.dst_ip,
                dst_ip: translation.nat_ip,
                src_port: key.dst_port,
                dst_port: translation.nat_port,
                protocol: key.protocol,
                _pad: [0; 3],
            };
            self.hash::<FlowKey, NatReverse>(map_names::NAT_REVERSE)?
                .remove(&reply)?;
        }
        Ok(total / f64::from(count.max(1)))
    }

    /// ns per health probe answered: one run per probe (answering rewrites the packet into
    /// the reply, so it cannot be repeated on one skb).
    fn answer_probes(&mut self, count: u32, cb: [u32; 2]) -> anyhow::Result<f64> {
        let before = self.counter(reason::PROBE_ANSWERED)?;
        let mut total = 0.0;
        for seq in 0..count {
            let frame =
                probe_frame(POD_NODE, GATEWAY, u64::from(seq) + 1, 0, PROBE_VIA_ANY)[8..].to_vec();
            let (verdict, ns) = self.run(program_names::TEST_FROM_TUNNEL, &frame, cb, 1)?;
            check_verdict("from_tunnel/probe_answer", TC_ACT_REDIRECT, verdict)?;
            total += ns;
        }
        let answered = self.counter(reason::PROBE_ANSWERED)? - before;
        check_path(
            "from_tunnel/probe_answer",
            reason::PROBE_ANSWERED,
            u64::from(count),
            answered,
        )?;
        Ok(total / f64::from(count.max(1)))
    }

    /// ns per probe through the XDP responder, one run per probe (answering rewrites it):
    /// answered with `PROBE_VIA_ANY`, passed with `PROBE_VIA_TC`.
    fn answer_probes_in_xdp(&mut self, count: u32, path: u8) -> anyhow::Result<f64> {
        let (case, expected) = if path == PROBE_VIA_ANY {
            ("probe_responder/probe_answer", XDP_REDIRECT)
        } else {
            ("probe_responder/pass", XDP_PASS)
        };
        // As if the TC program had just answered, for as long as the runs take.
        Array::<&mut MapData, u64>::try_from(
            self.ebpf
                .map_mut(map_names::TC_ANSWERED_AT)
                .ok_or_else(|| anyhow::anyhow!("TC_ANSWERED_AT missing"))?,
        )?
        .set(0, u64::MAX, 0)?;
        let program: &Xdp = self
            .ebpf
            .program(program_names::PROBE_RESPONDER)
            .ok_or_else(|| anyhow::anyhow!("the probe responder is missing"))?
            .try_into()?;
        let before = self.counter(reason::PROBE_ANSWERED_XDP)?;
        let mut total = 0.0;
        for seq in 0..count {
            let frame = on_underlay(
                POD_NODE,
                GATEWAY,
                TUNNEL_PORT,
                &probe_frame(POD_NODE, GATEWAY, u64::from(seq) + 1, 0, path),
            );
            let mut out = vec![0u8; frame.len() + 256];
            let result = program.test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })?;
            check_verdict(case, expected, result.return_value)?;
            total += result.duration.as_nanos() as f64;
        }
        let answered = self.counter(reason::PROBE_ANSWERED_XDP)? - before;
        let wanted = if expected == XDP_REDIRECT {
            u64::from(count)
        } else {
            0
        };
        check_path(case, reason::PROBE_ANSWERED_XDP, wanted, answered)?;
        Ok(total / f64::from(count.max(1)))
    }

    /// Packets counted under every reason, summed over CPUs, in reason order.
    fn all_counters(&self) -> anyhow::Result<Vec<u64>> {
        (0..reason::NAMES.len() as u32)
            .map(|reason| self.counter(reason))
            .collect()
    }

    /// Packets counted under `reason`, summed over CPUs.
    fn counter(&self, reason: u32) -> anyhow::Result<u64> {
        let map = self
            .ebpf
            .map(map_names::COUNTERS)
            .ok_or_else(|| anyhow::anyhow!("map COUNTERS missing"))?;
        let array: PerCpuArray<&MapData, Counter> = PerCpuArray::try_from(map)?;
        Ok(array.get(&reason, 0)?.iter().map(|c| c.packets).sum())
    }
}
