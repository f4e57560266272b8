//! Types shared by the eBPF datapath (`egress-ebpf`) and the agent (`egress-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and only fixed-size integer
//! fields, so both sides agree on the layout and `bpftool map dump` shows typed fields through
//! BTF. Addresses and ports are kept in network byte order, exactly as they appear in packets
//! (`[u8; 4]` for IPv4 addresses, `[u8; 2]` for ports), so the datapath copies them without
//! conversion.
#![no_std]

pub mod config;
pub mod counters;
pub mod flow;
pub mod nat;
pub mod nodes;
pub mod policy;

#[cfg(feature = "user")]
mod user;

/// An IPv4 address in network byte order.
pub type Ipv4 = [u8; 4];
/// A TCP/UDP port (or ICMP echo identifier) in network byte order.
pub type Port = [u8; 2];

/// Names of the maps in the eBPF object, used by the agent to find and pin them.
pub mod map_names {
    pub const POLICIES: &str = "EGRESS_POLICIES";
    pub const NAT_FORWARD: &str = "NAT_FORWARD";
    pub const NAT_REVERSE: &str = "NAT_REVERSE";
    pub const STEERED_FLOWS: &str = "STEERED_FLOWS";
    pub const INBOUND_FLOWS: &str = "INBOUND_FLOWS";
    pub const NODES: &str = "NODES";
    pub const LOCAL_PODS: &str = "LOCAL_PODS";
    pub const EGRESS_IPS: &str = "EGRESS_IPS";
    pub const CONFIG: &str = "CONFIG";
    pub const COUNTERS: &str = "COUNTERS";
    pub const CLUSTER_CIDRS: &str = "CLUSTER_CIDRS";

    /// Every map the agent pins, in a stable order.
    pub const ALL: [&str; 11] = [
        POLICIES,
        NAT_FORWARD,
        NAT_REVERSE,
        STEERED_FLOWS,
        INBOUND_FLOWS,
        NODES,
        LOCAL_PODS,
        EGRESS_IPS,
        CONFIG,
        COUNTERS,
        CLUSTER_CIDRS,
    ];
}

/// Names of the TC programs in the eBPF object.
pub mod program_names {
    /// Ingress of a local pod's host-side interface: packets the pod sends.
    pub const FROM_POD: &str = "from_pod";
    /// Egress of a local pod's host-side interface: packets delivered to the pod.
    pub const TO_POD: &str = "to_pod";
    /// Ingress of the agent's VXLAN device: requests on a gateway, replies on a pod's node.
    pub const FROM_TUNNEL: &str = "from_tunnel";
    /// Ingress of an interface holding an egress IP: replies to `SNATed` flows.
    pub const FROM_EGRESS: &str = "from_egress";
    /// Test-only twin of `FROM_TUNNEL` that reads the outer source from `skb->cb[0]`, because
    /// `BPF_PROG_TEST_RUN` cannot attach tunnel metadata. The agent never attaches it.
    pub const TEST_FROM_TUNNEL: &str = "test_from_tunnel";
    /// Bench-only floor: an empty TC program (`cargo xtask bench`); never attached.
    pub const BENCH_EMPTY: &str = "bench_empty";
    /// Bench-only floor: parses Ethernet/IPv4/L4 and passes; never attached.
    pub const BENCH_PARSE_ONLY: &str = "bench_parse_only";
}
