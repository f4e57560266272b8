//! The test bench of the datapath tests: one node's programs with fresh, unpinned maps, the
//! scenario's policy values and packet checks. The tests import everything with
//! `use crate::support::*`.

pub(crate) use std::net::Ipv4Addr;

pub(crate) use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
pub(crate) use egress_agent::datapath::testing::{
    OBJECT,
    packets::{
        ACK, FIN, FRAGMENT_ID, L4, RST, SYN, TC_ACT_NEXT, TC_ACT_REDIRECT, TC_ACT_SHOT,
        UNDERLAY_MAC_A, UNDERLAY_MAC_B, VXLAN_SOURCE_PORT, XDP_PASS, XDP_REDIRECT, checksum,
        fragments, on_underlay, packet, pseudo_sum, reassemble, scenario::*, seen, ttl_of,
        with_ttl,
    },
};
pub(crate) use egress_common::{
    config::{DatapathConfig, VNI_TO_GATEWAY, VNI_TO_POD_NODE},
    counters::{Counter, reason},
    flow::{
        FLOW_FIN_FROM_POD, FLOW_FIN_FROM_REMOTE, FLOW_REMOTE_CLOSED_FIRST, FLOW_RESET, FlowKey,
        InboundFlow, PROTO_ICMP, SteeredFlow, TcpState,
    },
    map_names,
    nat::{NAT_TIME_WAIT, NatForward, NatReverse},
    nodes::{EgressIp, LocalPod, NodeInfo},
    policy::{GATEWAY_EXCLUDED, GATEWAY_NONE, PolicyKey, PolicyValue},
    program_names,
};

pub(crate) const NAT_MIN: u16 = 1024;

pub(crate) const NAT_MAX: u16 = 32767;

pub(crate) const TUNNEL_MSS: u16 = 1410;

pub(crate) fn root() -> bool {
    // SAFETY: no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: BPF_PROG_TEST_RUN needs root");
    }
    root
}

/// One node's datapath with fresh, unpinned maps.
pub(crate) struct Node {
    pub(crate) ebpf: Ebpf,
}

impl Node {
    pub(crate) fn new(node_ip: Ipv4Addr) -> Self {
        Self::with_loader(node_ip, &mut EbpfLoader::new())
    }

    /// A node whose flow and NAT maps hold `entries` each, as `--flow-map-size` and
    /// `--nat-map-size` make them.
    pub(crate) fn with_flow_capacity(node_ip: Ipv4Addr, entries: u32) -> Self {
        let mut loader = EbpfLoader::new();
        for name in [
            map_names::NAT_FORWARD,
            map_names::NAT_REVERSE,
            map_names::STEERED_FLOWS,
            map_names::INBOUND_FLOWS,
        ] {
            loader.map_max_entries(name, entries);
        }
        Self::with_loader(node_ip, &mut loader)
    }

    fn with_loader(node_ip: Ipv4Addr, loader: &mut EbpfLoader<'_>) -> Self {
        let mut ebpf = loader.load(OBJECT).expect("load object");
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
        let responder: &mut Xdp = ebpf
            .program_mut(program_names::PROBE_RESPONDER)
            .unwrap()
            .try_into()
            .unwrap();
        responder.load().expect("load probe_responder");
        let mut node = Self { ebpf };
        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(node.ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
        config
            .set(
                0,
                DatapathConfig {
                    node_ip: node_ip.octets(),
                    tunnel_ifindex: TUNNEL_IFINDEX,
                    nat_port_min: NAT_MIN,
                    nat_port_max: NAT_MAX,
                    tunnel_mss: TUNNEL_MSS,
                    tunnel_port: TUNNEL_PORT,
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

    pub(crate) fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).unwrap()).unwrap()
    }

    pub(crate) fn policy(&mut self, pod: Ipv4Addr, dest: &str, value: PolicyValue) {
        let net: ipnet::Ipv4Net = dest.parse().unwrap();
        let mut trie: LpmTrie<&mut MapData, PolicyKey, PolicyValue> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::POLICIES).unwrap()).unwrap();
        let key = PolicyKey {
            source_ip: pod.octets(),
            dest_ip: net.network().octets(),
        };
        trie.insert(&Key::new(32 + u32::from(net.prefix_len()), key), value, 0)
            .unwrap();
    }

    pub(crate) fn egress_ip(&mut self, ip: Ipv4Addr, ifindex: u32) {
        self.hash::<[u8; 4], EgressIp>(map_names::EGRESS_IPS)
            .insert(ip.octets(), EgressIp { ifindex, _pad: 0 }, 0)
            .unwrap();
    }

    pub(crate) fn local_pod(&mut self, ip: Ipv4Addr, ifindex: u32) {
        self.hash::<[u8; 4], LocalPod>(map_names::LOCAL_PODS)
            .insert(ip.octets(), LocalPod { ifindex, _pad: 0 }, 0)
            .unwrap();
    }

    pub(crate) fn run(&self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run_with_cb(program, packet, [0; 2])
    }

    /// Runs `program`; `cb` feeds `test_from_tunnel` its outer source and VNI.
    pub(crate) fn run_with_cb(&self, program: &str, packet: &[u8], cb: [u32; 2]) -> (u32, Vec<u8>) {
        self.last_redirect().set(0, [0; 4], 0).unwrap();
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

    /// Runs the XDP probe responder on a frame as it arrives on the underlay.
    pub(crate) fn run_xdp(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &Xdp = self
            .ebpf
            .program(program_names::PROBE_RESPONDER)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("test run");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// `TEST_LAST_REDIRECT` through a descriptor of its own, so a shared `Node` can reset it
    /// before every run.
    fn last_redirect(&self) -> Array<MapData, [u32; 4]> {
        let aya::maps::Map::Array(data) = self.ebpf.map(map_names::TEST_LAST_REDIRECT).unwrap()
        else {
            panic!("TEST_LAST_REDIRECT is not an array");
        };
        let id = data.info().unwrap().id();
        Array::try_from(aya::maps::Map::Array(MapData::from_id(id).unwrap())).unwrap()
    }

    /// Where the last run's redirect sent its packet; `None` when it redirected nothing.
    pub(crate) fn sent_to(&self) -> Option<SentTo> {
        let [ifindex, remote, vni, _] = self.last_redirect().get(&0, 0).unwrap();
        match (ifindex, remote) {
            (0, _) => None,
            (TUNNEL_IFINDEX, remote) => Some(SentTo::Tunnel {
                remote: Ipv4Addr::from(remote.to_ne_bytes()),
                vni,
            }),
            (ifindex, _) => Some(SentTo::Interface(ifindex)),
        }
    }

    pub(crate) fn counter(&self, index: u32) -> u64 {
        let array: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.ebpf.map(map_names::COUNTERS).unwrap()).unwrap();
        array
            .get(&index, 0)
            .unwrap()
            .iter()
            .map(|counter| counter.packets)
            .sum()
    }

    pub(crate) fn nat_forward(&self) -> Vec<(FlowKey, NatForward)> {
        let map: HashMap<&MapData, FlowKey, NatForward> =
            HashMap::try_from(self.ebpf.map(map_names::NAT_FORWARD).unwrap()).unwrap();
        map.iter().map(Result::unwrap).collect()
    }

    pub(crate) fn nat_reverse(&self) -> Vec<(FlowKey, NatReverse)> {
        let map: HashMap<&MapData, FlowKey, NatReverse> =
            HashMap::try_from(self.ebpf.map(map_names::NAT_REVERSE).unwrap()).unwrap();
        map.iter().map(Result::unwrap).collect()
    }

    pub(crate) fn steered_entries(&self) -> Vec<(FlowKey, SteeredFlow)> {
        let map: HashMap<&MapData, FlowKey, SteeredFlow> =
            HashMap::try_from(self.ebpf.map(map_names::STEERED_FLOWS).unwrap()).unwrap();
        map.iter().map(Result::unwrap).collect()
    }

    pub(crate) fn steered(&self) -> Vec<FlowKey> {
        let map: HashMap<&MapData, FlowKey, SteeredFlow> =
            HashMap::try_from(self.ebpf.map(map_names::STEERED_FLOWS).unwrap()).unwrap();
        map.keys().map(Result::unwrap).collect()
    }
}

/// Where a redirected packet went.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SentTo {
    /// Out of an interface (`bpf_redirect_neigh`): an egress interface or a pod's.
    Interface(u32),
    /// Into the tunnel device, to `remote` with `vni`.
    Tunnel { remote: Ipv4Addr, vni: u32 },
}

pub(crate) fn to_gateway(egress_ip: Ipv4Addr) -> PolicyValue {
    PolicyValue {
        egress_ip: egress_ip.octets(),
        gateway_ip: GATEWAY.octets(),
        pod_node_ip: POD_NODE.octets(),
        gateway_group: 0,
    }
}

pub(crate) fn with_gateway(gateway: [u8; 4]) -> PolicyValue {
    PolicyValue {
        egress_ip: [0; 4],
        gateway_ip: gateway,
        pod_node_ip: POD_NODE.octets(),
        gateway_group: 0,
    }
}

// ---- packet checking ----

/// Both checksums of a frame verify (a correct checksum sums to zero).
pub(crate) fn assert_checksums(frame: &[u8]) {
    let (ip_sum, l4_sum) = checksum_sums(frame);
    assert_eq!(ip_sum, 0, "IPv4 header checksum");
    assert_eq!(l4_sum, 0, "layer-4 checksum");
}

/// The IPv4 and layer-4 checksum sums of a frame: both zero when valid.
pub(crate) fn checksum_sums(frame: &[u8]) -> (u16, u16) {
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

pub(crate) fn gateway_node() -> Node {
    let mut node = Node::new(GATEWAY);
    node.policy(POD, "198.51.100.0/24", to_gateway(EGRESS_IP));
    node.egress_ip(EGRESS_IP, EGRESS_IFINDEX);
    node
}

/// The pod's node: the pod's policy through `GATEWAY`, and the pod behind `POD_IFINDEX`.
pub(crate) fn pod_node() -> Node {
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    node.local_pod(POD, POD_IFINDEX);
    node
}

/// Runs `test_from_tunnel` on the pod's node with `frame` as a reply from the gateway.
pub(crate) fn from_gateway_node(node: &Node, frame: &[u8]) -> (u32, Vec<u8>) {
    node.run_with_cb(
        program_names::TEST_FROM_TUNNEL,
        frame,
        [u32::from_ne_bytes(GATEWAY.octets()), VNI_TO_POD_NODE],
    )
}

pub(crate) fn from_pod_node(node: &Node, frame: &[u8]) -> (u32, Vec<u8>) {
    node.run_with_cb(
        program_names::TEST_FROM_TUNNEL,
        frame,
        [u32::from_ne_bytes(POD_NODE.octets()), VNI_TO_GATEWAY],
    )
}

/// The MSS option's value in a frame built with `L4::TcpMss`.
pub(crate) fn mss_of(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34 + 24], frame[34 + 25]])
}

// ---- MTU: MSS clamping, ICMP errors ----

/// An ICMP error from `from` to `to`, quoting `quoted` (a whole frame) as routers do.
pub(crate) fn icmp_error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    quoted: &[u8],
) -> Vec<u8> {
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

/// The source address, and the 16-bit field `port_offset` bytes into the layer-4 header (a
/// port, an echo identifier), of the packet an ICMP error frame quotes; its quoted IPv4 header
/// must still check.
pub(crate) fn quoted_source(frame: &[u8], port_offset: usize) -> (Ipv4Addr, u16) {
    let quoted = &frame[14 + 20 + 8..];
    assert_eq!(checksum(&quoted[..20], 0), 0, "quoted IPv4 header checksum");
    let port = &quoted[20 + port_offset..22 + port_offset];
    (
        Ipv4Addr::new(quoted[12], quoted[13], quoted[14], quoted[15]),
        u16::from_be_bytes([port[0], port[1]]),
    )
}

/// xorshift64*: reproducible randomness without a dependency.
pub(crate) struct Random(pub(crate) u64);

impl Random {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---- gateway groups and health ----

/// Writes group `id` with `candidates` (in order) and `flags` into the node's GATEWAY_GROUPS.
pub(crate) fn set_group(node: &mut Node, id: u32, candidates: &[Ipv4Addr], flags: u32) {
    let mut group = egress_common::gateway::GatewayGroup {
        flags,
        ..Default::default()
    };
    for (slot, ip) in group.candidates.iter_mut().zip(candidates) {
        *slot = ip.octets();
    }
    group.count = candidates.len().min(egress_common::gateway::MAX_CANDIDATES) as u32;
    node.hash::<u32, egress_common::gateway::GatewayGroup>(map_names::GATEWAY_GROUPS)
        .insert(id, group, 0)
        .unwrap();
}

/// Writes a gateway's health flags into the node's GATEWAY_HEALTH, as its prober would.
pub(crate) fn set_health(node: &mut Node, ip: Ipv4Addr, flags: u32) {
    node.hash::<[u8; 4], egress_common::gateway::GatewayHealth>(map_names::GATEWAY_HEALTH)
        .insert(
            ip.octets(),
            egress_common::gateway::GatewayHealth { flags, _pad: 0 },
            0,
        )
        .unwrap();
}
