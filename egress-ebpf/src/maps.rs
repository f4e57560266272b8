//! The datapath's maps. Sizes here are those of the test programs; the agent sizes the
//! flow and NAT maps from its flags at load time.
//!
//! The flow and NAT maps are plain hash maps, not LRU: an LRU map evicts an established
//! flow's entry to make room for a new one, and a steered flow without its entry would leave
//! with the node's IP. A full map refuses new flows instead (`drop_flow_table_full`); the
//! agent's garbage collector frees the entries of flows that ended.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use egress_common::{
    Ipv4,
    config::DatapathConfig,
    counters::{Counter, reason},
    flow::{FlowKey, FragmentKey, FragmentPorts, InboundFlow, SteeredFlow},
    gateway::{
        GATEWAY_GROUP_MAP_SIZE, GatewayGroup, GatewayHealth, GatewayTraffic,
        OWN_PORT_BLOCK_MAP_SIZE, PORT_BLOCK_OWNER_MAP_SIZE, PortBlock, PortBlockKey,
        PortBlockOwner, ProbeReply,
    },
    nat::{NatForward, NatReverse},
    nodes::{ClusterCidr, EgressIp, LocalPod, NodeInfo},
    policy::{PolicyKey, PolicyValue},
};

/// (source pod /32, destination CIDR) -> (egress IP, gateway IP); Cilium's layout.
#[btf_map]
pub(crate) static EGRESS_POLICIES: LpmTrie<PolicyKey, PolicyValue, 16384> = LpmTrie::new();

/// Gateway: flow as the pod sent it -> translated source.
#[btf_map]
pub(crate) static NAT_FORWARD: HashMap<FlowKey, NatForward, 65536> = HashMap::new();

/// Gateway: reply flow as it arrives -> pod and its node.
#[btf_map]
pub(crate) static NAT_REVERSE: HashMap<FlowKey, NatReverse, 65536> = HashMap::new();

/// Pod's node: flows this node steers through the tunnel.
#[btf_map]
pub(crate) static STEERED_FLOWS: HashMap<FlowKey, SteeredFlow, 65536> = HashMap::new();

/// Pod's node: UDP flows that came in to a local pod; the pod's replies are not steered.
/// LRU on purpose: losing an entry only sends a pod's reply through the gateway (with the
/// egress IP), and a flood of inbound datagrams must not lock out new ones.
#[btf_map]
pub(crate) static INBOUND_FLOWS: LruHashMap<FlowKey, InboundFlow, 65536> = LruHashMap::new();

/// Fragmented datagrams in flight -> their ports (Cilium's `cilium_ipv4_frag_datagrams`,
/// same default size). LRU: a datagram's fragments follow each other closely, and one whose
/// entry went has its later fragments dropped, never misrouted.
#[btf_map]
pub(crate) static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts, 8192> = LruHashMap::new();

/// Underlay addresses of every node of the cluster.
#[btf_map]
pub(crate) static NODES: HashMap<Ipv4, NodeInfo, 4096> = HashMap::new();

/// Pods on this node -> their host-side interface.
#[btf_map]
pub(crate) static LOCAL_PODS: HashMap<Ipv4, LocalPod, 4096> = HashMap::new();

/// Pod CIDRs of the cluster: destinations that are never steered.
#[btf_map]
pub(crate) static CLUSTER_CIDRS: LpmTrie<Ipv4, ClusterCidr, 1024> = LpmTrie::new();

/// Egress IPs this node serves as a gateway -> interface they leave through.
#[btf_map]
pub(crate) static EGRESS_IPS: HashMap<Ipv4, EgressIp, 1024> = HashMap::new();

/// Gateway groups: a policy entry's candidate gateways, in order of preference.
#[btf_map]
pub(crate) static GATEWAY_GROUPS: HashMap<u32, GatewayGroup, { GATEWAY_GROUP_MAP_SIZE as usize }> =
    HashMap::new();

/// Gateways' health as this node's prober judged it; on a gateway, its own entry says
/// whether it can serve (and its probe replies say so).
#[btf_map]
pub(crate) static GATEWAY_HEALTH: HashMap<Ipv4, GatewayHealth, 4096> = HashMap::new();

/// The last probe reply from each gateway, for the prober.
#[btf_map]
pub(crate) static PROBE_REPLIES: HashMap<Ipv4, ProbeReply, 4096> = HashMap::new();

/// When this node last sent to, and heard from, each gateway its prober probes (entries made
/// by the prober only: the datapath never inserts here).
#[btf_map]
pub(crate) static GATEWAY_TRAFFIC: HashMap<Ipv4, GatewayTraffic, 4096> = HashMap::new();

/// This node's block of each floating egress IP's ports, when its pods use that IP.
#[btf_map]
pub(crate) static OWN_PORT_BLOCKS: HashMap<Ipv4, PortBlock, { OWN_PORT_BLOCK_MAP_SIZE as usize }> =
    HashMap::new();

/// Every block of the floating egress IPs this node may hold, with its node: where replies go.
#[btf_map]
pub(crate) static PORT_BLOCK_OWNERS: HashMap<
    PortBlockKey,
    PortBlockOwner,
    { PORT_BLOCK_OWNER_MAP_SIZE as usize },
> = HashMap::new();

/// When the TC program last answered a probe (monotonic ns; `TC_ANSWER_FRESH_NS`).
#[btf_map]
pub(crate) static TC_ANSWERED_AT: Array<u64, 1> = Array::new();

#[btf_map]
pub(crate) static CONFIG: Array<DatapathConfig, 1> = Array::new();

#[btf_map]
pub(crate) static COUNTERS: PerCpuArray<Counter, { reason::MAX as usize }> = PerCpuArray::new();

#[inline(always)]
pub(crate) fn config() -> Option<&'static DatapathConfig> {
    CONFIG.get(0)
}

#[inline(always)]
pub(crate) fn count(reason: u32, bytes: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(bytes);
        }
    }
}
