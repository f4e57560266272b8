//! Packet-in, verdict-and-packet-out tests of the TC programs through BPF_PROG_TEST_RUN,
//! covering at least the scenarios of Cilium's own egress gateway BPF tests. They need
//! root (CAP_BPF) like the agent itself.

use std::net::Ipv4Addr;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use egress_common::{
    config::{Config, VNI_TO_GATEWAY, VNI_TO_POD_NODE},
    counters::{Counter, reason},
    flow::{FlowKey, PROTO_ICMP, SteeredFlow},
    map_names,
    nat::{NatForward, NatReverse},
    nodes::{EgressIp, LocalPod, NodeInfo},
    policy::{GATEWAY_EXCLUDED, GATEWAY_NONE, PolicyKey, PolicyValue},
    program_names,
};

use super::{
    OBJECT,
    packets::{
        ACK, FIN, L4, SYN, TC_ACT_NEXT, TC_ACT_REDIRECT, TC_ACT_SHOT, checksum, packet, pseudo_sum,
        scenario::*, seen,
    },
};

const NAT_MIN: u16 = 1024;
const NAT_MAX: u16 = 32767;
const TUNNEL_MSS: u16 = 1410;

fn root() -> bool {
    // SAFETY: no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: BPF_PROG_TEST_RUN needs root");
    }
    root
}

/// One node's datapath with fresh, unpinned maps.
struct Node {
    ebpf: Ebpf,
}

impl Node {
    fn new(node_ip: Ipv4Addr) -> Self {
        let mut ebpf = EbpfLoader::new().load(OBJECT).expect("load object");
        for name in [
            program_names::FROM_POD,
            program_names::TO_POD,
            program_names::FROM_TUNNEL,
            program_names::FROM_EGRESS,
            program_names::TEST_FROM_TUNNEL,
        ] {
            let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            program
                .load()
                .unwrap_or_else(|e| panic!("load {name}: {e:?}"));
        }
        let mut node = Self { ebpf };
        let mut config: Array<&mut MapData, Config> =
            Array::try_from(node.ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
        config
            .set(
                0,
                Config {
                    node_ip: node_ip.octets(),
                    tunnel_ifindex: TUNNEL_IFINDEX,
                    nat_port_min: NAT_MIN,
                    nat_port_max: NAT_MAX,
                    tunnel_mss: TUNNEL_MSS,
                    reserved: 0,
                },
                0,
            )
            .unwrap();
        for ip in [POD_NODE, GATEWAY] {
            node.hash::<[u8; 4], NodeInfo>(map_names::NODES)
                .insert(ip.octets(), NodeInfo::default(), 0)
                .unwrap();
        }
        node
    }

    fn hash<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).unwrap()).unwrap()
    }

    fn policy(&mut self, pod: Ipv4Addr, dest: &str, value: PolicyValue) {
        let net: ipnet::Ipv4Net = dest.parse().unwrap();
        let mut trie: LpmTrie<&mut MapData, PolicyKey, PolicyValue> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::POLICIES).unwrap()).unwrap();
        let key = PolicyKey {
            source_ip: pod.octets(),
            dest_ip: net.network().octets(),
        };
        trie.insert(&Key::new(32 + net.prefix_len() as u32, key), value, 0)
            .unwrap();
    }

    fn egress_ip(&mut self, ip: Ipv4Addr, ifindex: u32) {
        self.hash::<[u8; 4], EgressIp>(map_names::EGRESS_IPS)
            .insert(ip.octets(), EgressIp { ifindex, _pad: 0 }, 0)
            .unwrap();
    }

    fn local_pod(&mut self, ip: Ipv4Addr, ifindex: u32) {
        self.hash::<[u8; 4], LocalPod>(map_names::LOCAL_PODS)
            .insert(ip.octets(), LocalPod { ifindex, _pad: 0 }, 0)
            .unwrap();
    }

    fn run(&self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run_with_cb(program, packet, [0; 2])
    }

    /// Runs `program`; `cb` feeds `test_from_tunnel` its outer source and VNI.
    fn run_with_cb(&self, program: &str, packet: &[u8], cb: [u32; 2]) -> (u32, Vec<u8>) {
        let program: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; packet.len() + 256];
        // struct __sk_buff up to the end of cb[5]: cb starts at byte 48.
        let mut ctx = [0u8; 68];
        ctx[48..52].copy_from_slice(&cb[0].to_ne_bytes());
        ctx[52..56].copy_from_slice(&cb[1].to_ne_bytes());
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .expect("test run");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn counter(&self, index: u32) -> u64 {
        let array: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.ebpf.map(map_names::COUNTERS).unwrap()).unwrap();
        array
            .get(&index, 0)
            .unwrap()
            .iter()
            .map(|counter| counter.packets)
            .sum()
    }

    fn nat_forward(&self) -> Vec<(FlowKey, NatForward)> {
        let map: HashMap<&MapData, FlowKey, NatForward> =
            HashMap::try_from(self.ebpf.map(map_names::NAT_FORWARD).unwrap()).unwrap();
        map.iter().map(Result::unwrap).collect()
    }

    fn nat_reverse(&self) -> Vec<(FlowKey, NatReverse)> {
        let map: HashMap<&MapData, FlowKey, NatReverse> =
            HashMap::try_from(self.ebpf.map(map_names::NAT_REVERSE).unwrap()).unwrap();
        map.iter().map(Result::unwrap).collect()
    }

    fn steered(&self) -> Vec<FlowKey> {
        let map: HashMap<&MapData, FlowKey, SteeredFlow> =
            HashMap::try_from(self.ebpf.map(map_names::STEERED_FLOWS).unwrap()).unwrap();
        map.keys().map(Result::unwrap).collect()
    }
}

fn to_gateway(egress_ip: Ipv4Addr) -> PolicyValue {
    PolicyValue {
        egress_ip: egress_ip.octets(),
        gateway_ip: GATEWAY.octets(),
        pod_node_ip: POD_NODE.octets(),
        reserved: 0,
    }
}

fn with_gateway(gateway: [u8; 4]) -> PolicyValue {
    PolicyValue {
        egress_ip: [0; 4],
        gateway_ip: gateway,
        pod_node_ip: POD_NODE.octets(),
        reserved: 0,
    }
}

// ---- packet checking ----

/// Both checksums of a frame verify (a correct checksum sums to zero).
fn assert_checksums(frame: &[u8]) {
    let (ip_sum, l4_sum) = checksum_sums(frame);
    assert_eq!(ip_sum, 0, "IPv4 header checksum");
    assert_eq!(l4_sum, 0, "layer-4 checksum");
}

/// The IPv4 and layer-4 checksum sums of a frame: both zero when valid.
fn checksum_sums(frame: &[u8]) -> (u16, u16) {
    let ip = &frame[14..34];
    let proto = ip[9];
    let total = (u16::from_be_bytes([ip[2], ip[3]]) as usize).clamp(20, frame.len() - 14);
    let l4 = &frame[34..14 + total];
    let initial = if proto == PROTO_ICMP {
        0
    } else {
        let mut src = [0; 4];
        let mut dst = [0; 4];
        src.copy_from_slice(&ip[12..16]);
        dst.copy_from_slice(&ip[16..20]);
        pseudo_sum(src, dst, proto, l4.len())
    };
    (checksum(ip, 0), checksum(l4, initial))
}

// ---- pod's node: policy lookup and steering ----

#[test]
fn no_match_is_untouched() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let input = packet(POD, 40000, OTHER_DEST, 443, L4::Tcp { flags: SYN });
    let (verdict, output) = node.run(program_names::FROM_POD, &input);
    assert_eq!(verdict, TC_ACT_NEXT);
    assert_eq!(output, input);
    assert_eq!(node.counter(reason::PASS_NO_MATCH), 1);
}

#[test]
fn excluded_cidr_is_untouched() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.0.0/16", with_gateway(GATEWAY.octets()));
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY_EXCLUDED));
    let input = packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN });
    let (verdict, output) = node.run(program_names::FROM_POD, &input);
    assert_eq!(verdict, TC_ACT_NEXT);
    assert_eq!(output, input);
    assert_eq!(node.counter(reason::PASS_EXCLUDED), 1);
    assert!(node.steered().is_empty());
}

#[test]
fn new_connection_is_redirected_to_the_remote_gateway() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let input = packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN });
    let (verdict, output) = node.run(program_names::FROM_POD, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // The pod's node does not translate: the gateway does.
    assert_eq!(output, input);
    assert_eq!(node.counter(reason::REDIRECT_TO_GATEWAY), 1);
    assert_eq!(node.steered().len(), 1);
    // Later packets of the steered connection follow it.
    let next = packet(POD, 40000, DEST, 443, L4::Tcp { flags: ACK });
    assert_eq!(node.run(program_names::FROM_POD, &next).0, TC_ACT_REDIRECT);
}

#[test]
fn connection_opened_before_the_policy_keeps_its_path() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    // An ACK of a connection the node never steered (or a SYN-ACK of an inbound one).
    for flags in [ACK, SYN | ACK] {
        let input = packet(POD, 40000, DEST, 443, L4::Tcp { flags });
        let (verdict, output) = node.run(program_names::FROM_POD, &input);
        assert_eq!(verdict, TC_ACT_NEXT);
        assert_eq!(output, input);
    }
    assert_eq!(node.counter(reason::PASS_EXISTING_FLOW), 2);
}

#[test]
fn replies_of_inbound_udp_keep_their_path() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let inbound = packet(DEST, 5353, POD, 53, L4::Udp);
    assert_eq!(node.run(program_names::TO_POD, &inbound).0, TC_ACT_NEXT);
    let reply = packet(POD, 53, DEST, 5353, L4::Udp);
    assert_eq!(node.run(program_names::FROM_POD, &reply).0, TC_ACT_NEXT);
    assert_eq!(node.counter(reason::PASS_EXISTING_FLOW), 1);
    // A new UDP flow from the pod is steered.
    let outbound = packet(POD, 53000, DEST, 53, L4::Udp);
    assert_eq!(
        node.run(program_names::FROM_POD, &outbound).0,
        TC_ACT_REDIRECT
    );
}

#[test]
fn no_gateway_drops() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY_NONE));
    for l4 in [
        L4::Tcp { flags: SYN },
        L4::Udp,
        L4::IcmpEcho { reply: false },
    ] {
        let input = packet(POD, 40000, DEST, 443, l4);
        assert_eq!(node.run(program_names::FROM_POD, &input).0, TC_ACT_SHOT);
    }
    assert_eq!(node.counter(reason::DROP_NO_GATEWAY), 3);
}

#[test]
fn matched_fragments_are_dropped_not_leaked() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let mut input = packet(POD, 40000, DEST, 443, L4::Udp);
    input[14 + 6] = 0x20; // more fragments
    assert_eq!(node.run(program_names::FROM_POD, &input).0, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_UNSUPPORTED), 1);
}

// ---- gateway: SNAT ----

fn gateway_node() -> Node {
    let mut node = Node::new(GATEWAY);
    node.policy(POD, "198.51.100.0/24", to_gateway(EGRESS_IP));
    node.egress_ip(EGRESS_IP, EGRESS_IFINDEX);
    node
}

fn from_pod_node(node: &Node, frame: &[u8]) -> (u32, Vec<u8>) {
    node.run_with_cb(
        program_names::TEST_FROM_TUNNEL,
        frame,
        [u32::from_ne_bytes(POD_NODE.octets()), VNI_TO_GATEWAY],
    )
}

#[test]
fn snat_of_a_new_flow_keeps_a_free_port_in_range() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let input = packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN });
    let (verdict, output) = from_pod_node(&node, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = seen(&output);
    assert_eq!(out.src, EGRESS_IP);
    assert_eq!(out.sport, 20000, "a free port inside the NAT range is kept");
    assert_eq!((out.dst, out.dport), (DEST, 443));
    assert_checksums(&output);
    assert_eq!(node.counter(reason::SNAT_NEW_FLOW), 1);
    assert_eq!(node.nat_forward().len(), 1);
    assert_eq!(node.nat_reverse().len(), 1);
}

#[test]
fn snat_of_an_existing_flow_reuses_its_translation() {
    if !root() {
        return;
    }
    let node = gateway_node();
    // Ephemeral pod port outside the NAT range: a port from the range is allocated.
    let syn = packet(POD, 45000, DEST, 443, L4::Tcp { flags: SYN });
    let first = seen(&from_pod_node(&node, &syn).1);
    assert!((NAT_MIN..=NAT_MAX).contains(&first.sport));
    let ack = packet(POD, 45000, DEST, 443, L4::Tcp { flags: ACK });
    let (verdict, output) = from_pod_node(&node, &ack);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&output).sport, first.sport);
    assert_checksums(&output);
    assert_eq!(node.counter(reason::SNAT_EXISTING_FLOW), 1);
    assert_eq!(node.nat_forward().len(), 1);
}

#[test]
fn source_port_collision_picks_another_port() {
    if !root() {
        return;
    }
    let node = gateway_node();
    // Two pods use the same source port towards the same destination.
    let other_pod = Ipv4Addr::new(10, 244, 1, 11);
    let mut node = node;
    node.policy(other_pod, "198.51.100.0/24", to_gateway(EGRESS_IP));
    let a = seen(
        &from_pod_node(
            &node,
            &packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN }),
        )
        .1,
    );
    let (verdict, output) = from_pod_node(
        &node,
        &packet(other_pod, 20000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let b = seen(&output);
    assert_eq!(a.sport, 20000);
    assert_ne!(b.sport, 20000, "the taken port is not reused");
    assert!((NAT_MIN..=NAT_MAX).contains(&b.sport));
    assert_checksums(&output);
    assert_eq!(node.nat_reverse().len(), 2);
}

#[test]
fn udp_and_icmp_echo_are_translated() {
    if !root() {
        return;
    }
    let node = gateway_node();
    for l4 in [L4::Udp, L4::IcmpEcho { reply: false }] {
        let (verdict, output) = from_pod_node(&node, &packet(POD, 50000, DEST, 53, l4));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(seen(&output).src, EGRESS_IP);
        assert_checksums(&output);
    }
}

#[test]
fn udp_without_checksum_keeps_it_zero() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let mut input = packet(POD, 50000, DEST, 53, L4::Udp);
    input[34 + 6] = 0;
    input[34 + 7] = 0;
    let (_, output) = from_pod_node(&node, &input);
    assert_eq!(&output[40..42], &[0, 0]);
}

#[test]
fn pod_on_the_gateway_is_translated_without_tunnel() {
    if !root() {
        return;
    }
    let mut node = Node::new(GATEWAY);
    let value = PolicyValue {
        pod_node_ip: GATEWAY.octets(),
        ..to_gateway(EGRESS_IP)
    };
    node.policy(POD, "198.51.100.0/24", value);
    node.egress_ip(EGRESS_IP, EGRESS_IFINDEX);
    let (verdict, output) = node.run(
        program_names::FROM_POD,
        &packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&output).src, EGRESS_IP);
    assert_eq!(node.counter(reason::SNAT_NEW_FLOW), 1);
    assert_eq!(node.counter(reason::REDIRECT_TO_GATEWAY), 0);
}

#[test]
fn no_egress_ip_drops() {
    if !root() {
        return;
    }
    let mut node = Node::new(GATEWAY);
    // This node is the gateway but could not determine the egress IP.
    node.policy(POD, "198.51.100.0/24", to_gateway(Ipv4Addr::UNSPECIFIED));
    let (verdict, _) = from_pod_node(
        &node,
        &packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_NO_EGRESS_IP), 1);
    assert!(node.nat_forward().is_empty());
}

#[test]
fn gateway_is_not_an_open_relay() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let syn = |src, dst| packet(src, 20000, dst, 443, L4::Tcp { flags: SYN });
    // From an address that is not a node.
    let stranger = u32::from_ne_bytes([10, 0, 0, 99]);
    let (verdict, _) = node.run_with_cb(
        program_names::TEST_FROM_TUNNEL,
        &syn(POD, DEST),
        [stranger, VNI_TO_GATEWAY],
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_UNKNOWN_NODE), 1);
    // To a destination no policy covers.
    assert_eq!(from_pod_node(&node, &syn(POD, OTHER_DEST)).0, TC_ACT_SHOT);
    // A spoofed inner source: a pod that lives on another node.
    let gateway_as_sender = u32::from_ne_bytes(GATEWAY.octets());
    let (verdict, _) = node.run_with_cb(
        program_names::TEST_FROM_TUNNEL,
        &syn(POD, DEST),
        [gateway_as_sender, VNI_TO_GATEWAY],
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_NOT_ALLOWED), 2);
    assert!(node.nat_forward().is_empty());
}

#[test]
fn policy_naming_another_gateway_is_refused() {
    if !root() {
        return;
    }
    let mut node = Node::new(GATEWAY);
    node.policy(
        POD,
        "198.51.100.0/24",
        PolicyValue {
            gateway_ip: [10, 0, 0, 13],
            ..to_gateway(EGRESS_IP)
        },
    );
    node.egress_ip(EGRESS_IP, EGRESS_IFINDEX);
    let (verdict, _) = from_pod_node(
        &node,
        &packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_NOT_ALLOWED), 1);
}

// ---- replies ----

#[test]
fn reply_is_reverse_translated_and_sent_back_to_the_pods_node() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let request = seen(
        &from_pod_node(
            &node,
            &packet(POD, 45000, DEST, 443, L4::Tcp { flags: SYN }),
        )
        .1,
    );
    let reply = packet(
        DEST,
        443,
        EGRESS_IP,
        request.sport,
        L4::Tcp { flags: SYN | ACK },
    );
    let (verdict, output) = node.run(program_names::FROM_EGRESS, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = seen(&output);
    assert_eq!((out.src, out.sport), (DEST, 443));
    assert_eq!((out.dst, out.dport), (POD, 45000));
    assert_checksums(&output);
    assert_eq!(node.counter(reason::REVERSE_SNAT), 1);
}

#[test]
fn icmp_echo_reply_is_reverse_translated() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let request = seen(
        &from_pod_node(
            &node,
            &packet(POD, 777, DEST, 0, L4::IcmpEcho { reply: false }),
        )
        .1,
    );
    let reply = packet(
        DEST,
        0,
        EGRESS_IP,
        request.sport,
        L4::IcmpEcho { reply: true },
    );
    let (verdict, output) = node.run(program_names::FROM_EGRESS, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = seen(&output);
    assert_eq!((out.dst, out.dport), (POD, 777));
    assert_checksums(&output);
}

#[test]
fn gateway_nodes_own_traffic_is_untouched() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let input = packet(DEST, 443, EGRESS_IP, 40000, L4::Tcp { flags: ACK });
    let (verdict, output) = node.run(program_names::FROM_EGRESS, &input);
    assert_eq!(verdict, TC_ACT_NEXT);
    assert_eq!(output, input);
}

#[test]
fn reply_through_the_tunnel_reaches_only_a_steered_local_pod() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    node.local_pod(POD, POD_IFINDEX);
    let from_gateway = [u32::from_ne_bytes(GATEWAY.octets()), VNI_TO_POD_NODE];
    let reply = packet(DEST, 443, POD, 40000, L4::Tcp { flags: SYN | ACK });
    // Before the pod opened the connection, the reply is refused.
    assert_eq!(
        node.run_with_cb(program_names::TEST_FROM_TUNNEL, &reply, from_gateway)
            .0,
        TC_ACT_SHOT
    );
    assert_eq!(node.counter(reason::DROP_UNKNOWN_REPLY), 1);
    node.run(
        program_names::FROM_POD,
        &packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    let (verdict, output) = node.run_with_cb(program_names::TEST_FROM_TUNNEL, &reply, from_gateway);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(output, reply);
    assert_eq!(node.counter(reason::REPLY_TO_POD), 1);
}

#[test]
fn truncated_packets_never_crash_or_translate() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let full = packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN });
    // BPF_PROG_TEST_RUN refuses IPv4 frames shorter than an IPv4 header; every cut after
    // that, into the header options, ports, flags or payload, is tried.
    for len in 34..full.len() {
        let (verdict, _) = from_pod_node(&node, &full[..len]);
        assert_ne!(
            verdict, TC_ACT_REDIRECT,
            "truncated at {len} bytes was translated"
        );
    }
    assert!(node.nat_forward().is_empty());
}

/// The MSS option's value in a frame built with `L4::TcpMss`.
fn mss_of(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34 + 24], frame[34 + 25]])
}

// ---- MTU: MSS clamping, ICMP errors ----

#[test]
fn mss_of_syns_entering_the_tunnel_is_clamped() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let syn = packet(
        POD,
        40000,
        DEST,
        443,
        L4::TcpMss {
            flags: SYN,
            mss: 1460,
        },
    );
    let (verdict, output) = node.run(program_names::FROM_POD, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(mss_of(&output), TUNNEL_MSS);
    assert_checksums(&output);
    // A smaller MSS is left alone.
    let small = packet(
        POD,
        40001,
        DEST,
        443,
        L4::TcpMss {
            flags: SYN,
            mss: 1200,
        },
    );
    assert_eq!(mss_of(&node.run(program_names::FROM_POD, &small).1), 1200);
}

#[test]
fn mss_of_syn_acks_leaving_the_tunnel_is_clamped() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    node.local_pod(POD, POD_IFINDEX);
    node.run(
        program_names::FROM_POD,
        &packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    let syn_ack = packet(
        DEST,
        443,
        POD,
        40000,
        L4::TcpMss {
            flags: SYN | ACK,
            mss: 1460,
        },
    );
    let (verdict, output) = node.run_with_cb(
        program_names::TEST_FROM_TUNNEL,
        &syn_ack,
        [u32::from_ne_bytes(GATEWAY.octets()), VNI_TO_POD_NODE],
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(mss_of(&output), TUNNEL_MSS);
    assert_checksums(&output);
}

/// An ICMP error from `from` to `to`, quoting `quoted` (a whole frame) as routers do.
fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, icmp_type: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[14..]);
    let sum = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = PROTO_ICMP;
    ip[12..16].copy_from_slice(&from.octets());
    ip[16..20].copy_from_slice(&to.octets());
    let sum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&icmp);
    frame
}

#[test]
fn icmp_error_about_a_translated_flow_reaches_the_pod_translated() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let (_, sent) = from_pod_node(&node, &packet(POD, 45000, DEST, 53, L4::Udp));
    let nat_port = seen(&sent).sport;
    // The destination answers "port unreachable", quoting the packet it received.
    let error = icmp_error(DEST, EGRESS_IP, 3, 3, &sent);
    let (verdict, output) = node.run(program_names::FROM_EGRESS, &error);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&output).dst, POD);
    assert_checksums(&output);
    let quoted = &output[14 + 20 + 8..];
    assert_eq!(checksum(&quoted[..20], 0), 0, "quoted IPv4 header checksum");
    assert_eq!(
        Ipv4Addr::new(quoted[12], quoted[13], quoted[14], quoted[15]),
        POD
    );
    assert_eq!(u16::from_be_bytes([quoted[20], quoted[21]]), 45000);
    assert_ne!(nat_port, 0);
    assert_eq!(node.counter(reason::REVERSE_SNAT), 1);
    // An error quoting a flow the gateway never translated is not the datapath's.
    let stray = icmp_error(
        DEST,
        EGRESS_IP,
        3,
        3,
        &packet(EGRESS_IP, 999, DEST, 53, L4::Udp),
    );
    assert_eq!(node.run(program_names::FROM_EGRESS, &stray).0, TC_ACT_NEXT);
}

#[test]
fn icmp_errors_a_pod_sends_keep_their_path() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let inbound = packet(DEST, 5353, POD, 9, L4::Udp);
    let error = icmp_error(POD, DEST, 3, 3, &inbound);
    assert_eq!(node.run(program_names::FROM_POD, &error).0, TC_ACT_NEXT);
    assert_eq!(node.counter(reason::PASS_EXISTING_FLOW), 1);
}

#[test]
fn closing_connections_are_marked_for_quick_expiry() {
    if !root() {
        return;
    }
    let node = gateway_node();
    from_pod_node(
        &node,
        &packet(POD, 45000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    assert_eq!(
        node.nat_forward()[0].1.flags & egress_common::flow::FLOW_CLOSING,
        0
    );
    from_pod_node(
        &node,
        &packet(POD, 45000, DEST, 443, L4::Tcp { flags: FIN | ACK }),
    );
    assert_ne!(
        node.nat_forward()[0].1.flags & egress_common::flow::FLOW_CLOSING,
        0
    );
}

// ---- property: random packets ----

/// xorshift64*: reproducible randomness without a dependency.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Thousands of random and randomly corrupted packets through the gateway's tunnel
/// program: whatever it translates left a pod allowed by a policy and now carries the
/// egress IP; checksums stay valid when they were, and a corrupted packet is never
/// laundered into a valid one (the receiver still drops it); nothing else is relayed.
#[test]
fn random_packets_never_break_the_gateway_invariants() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let mut random = Random(0x5eed_cafe_f00d_0001);
    let addresses = [
        POD,
        DEST,
        OTHER_DEST,
        EGRESS_IP,
        GATEWAY,
        Ipv4Addr::new(10, 244, 1, 99),
    ];
    let senders = [POD_NODE, GATEWAY, Ipv4Addr::new(10, 0, 0, 99)];
    for round in 0..3000 {
        let src = addresses[random.below(addresses.len() as u64) as usize];
        let dst = addresses[random.below(addresses.len() as u64) as usize];
        let l4 = match random.below(4) {
            0 => L4::Tcp {
                flags: random.below(64) as u8,
            },
            1 => L4::Udp,
            2 => L4::IcmpEcho {
                reply: random.below(2) == 0,
            },
            _ => L4::TcpMss {
                flags: SYN,
                mss: random.below(9000) as u16,
            },
        };
        let mut frame = packet(
            src,
            random.below(65536) as u16,
            dst,
            random.below(65536) as u16,
            l4,
        );
        // Corrupt a few bytes anywhere past the Ethernet header, now and then.
        if random.below(2) == 0 {
            for _ in 0..1 + random.below(4) {
                let at = 14 + random.below((frame.len() - 14) as u64) as usize;
                frame[at] = random.next() as u8;
            }
        }
        if random.below(4) == 0 {
            frame.truncate(34 + random.below((frame.len() - 33) as u64) as usize);
        }
        let sender = senders[random.below(senders.len() as u64) as usize];
        let vni = if random.below(8) == 0 {
            7
        } else {
            VNI_TO_GATEWAY
        };
        let program: &SchedClassifier = node
            .ebpf
            .program(program_names::TEST_FROM_TUNNEL)
            .unwrap()
            .try_into()
            .unwrap();
        let mut ctx = [0u8; 68];
        ctx[48..52].copy_from_slice(&u32::from_ne_bytes(sender.octets()).to_ne_bytes());
        ctx[52..56].copy_from_slice(&vni.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let Ok(result) = program.test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        }) else {
            continue; // the kernel refused the frame itself (e.g. a cut IPv4 header)
        };
        if result.return_value != TC_ACT_REDIRECT {
            continue;
        }
        out.truncate(result.data_size_out as usize);
        let input = seen(&frame);
        let output = seen(&out);
        assert_eq!(
            sender, POD_NODE,
            "round {round}: relayed for a non-pod node"
        );
        assert_eq!(vni, VNI_TO_GATEWAY, "round {round}: relayed on another VNI");
        assert_eq!(
            input.src, POD,
            "round {round}: relayed a source no policy selects"
        );
        assert_eq!(
            input.dst, DEST,
            "round {round}: relayed to a destination no policy covers"
        );
        assert_eq!(
            output.src, EGRESS_IP,
            "round {round}: left with the wrong source"
        );
        let (ip_in, l4_in) = checksum_sums(&frame);
        let (ip_out, l4_out) = checksum_sums(&out);
        assert_eq!(
            ip_in == 0,
            ip_out == 0,
            "round {round}: IPv4 checksum validity changed"
        );
        assert_eq!(
            l4_in == 0,
            l4_out == 0,
            "round {round}: layer-4 checksum validity changed"
        );
    }
}

#[test]
fn in_cluster_destinations_are_never_steered() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "0.0.0.0/0", with_gateway(GATEWAY.octets()));
    let mut cidrs: LpmTrie<&mut MapData, [u8; 4], egress_common::nodes::ClusterCidr> =
        LpmTrie::try_from(node.ebpf.map_mut(map_names::CLUSTER_CIDRS).unwrap()).unwrap();
    cidrs
        .insert(
            &Key::new(16, [10, 244, 0, 0]),
            egress_common::nodes::ClusterCidr::default(),
            0,
        )
        .unwrap();
    let other_pod = Ipv4Addr::new(10, 244, 2, 7);
    for dst in [other_pod, GATEWAY] {
        let input = packet(POD, 40000, dst, 8080, L4::Tcp { flags: SYN });
        let (verdict, output) = node.run(program_names::FROM_POD, &input);
        assert_eq!(verdict, TC_ACT_NEXT, "{dst} is in the cluster");
        assert_eq!(output, input);
    }
    assert_eq!(node.counter(reason::PASS_IN_CLUSTER), 2);
    let outside = packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN });
    assert_eq!(
        node.run(program_names::FROM_POD, &outside).0,
        TC_ACT_REDIRECT
    );
}

#[test]
fn ports_the_node_itself_listens_on_are_never_allocated() {
    if !root() {
        return;
    }
    // A listener of the node on the egress IP (loopback here: BPF_PROG_TEST_RUN looks sockets
    // up in the test's own network namespace), on a port inside the NAT range.
    let egress = Ipv4Addr::LOCALHOST;
    let listener = (20000..30000)
        .find_map(|port| std::net::TcpListener::bind((egress, port)).ok())
        .expect("a free port in the NAT range");
    let taken = listener.local_addr().unwrap().port();
    let mut node = Node::new(GATEWAY);
    node.policy(POD, "198.51.100.0/24", to_gateway(egress));
    node.egress_ip(egress, EGRESS_IFINDEX);
    // The pod's own port would be kept if free; the node's listener holds it.
    let (verdict, output) = from_pod_node(
        &node,
        &packet(POD, taken, DEST, 443, L4::Tcp { flags: SYN }),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let translated = seen(&output);
    assert_eq!(translated.src, egress);
    assert_ne!(
        translated.sport, taken,
        "the node's listening port was handed to a flow"
    );
    assert!(node.counter(reason::NAT_PORT_RETRY) >= 1);
    // Without the listener, the same flow keeps the pod's port.
    drop(listener);
    let (_, output) = from_pod_node(
        &node,
        &packet(POD, taken, DEST, 444, L4::Tcp { flags: SYN }),
    );
    assert_eq!(seen(&output).sport, taken);
}
