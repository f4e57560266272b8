//! Types shared by the eBPF datapath (`egress-ebpf`) and the agent (`egress-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and only fixed-size integer
//! fields, so both sides agree on the layout and `bpftool map dump` shows typed fields through
//! BTF. Addresses and ports are kept in network byte order, exactly as they appear in packets
//! (`[u8; 4]` for IPv4 addresses, `[u8; 2]` for ports), so the datapath copies them without
//! conversion.
#![no_std]

/// Fails the build when a map type's size changes: the datapath, the agent and the maps a
/// running agent pinned all depend on it (a change needs a new pin layout version).
macro_rules! assert_size {
    ($($type:ty = $bytes:literal),* $(,)?) => {
        $(const _: () = assert!(
            core::mem::size_of::<$type>() == $bytes,
            concat!("the size of ", stringify!($type), " changed")
        );)*
    };
}

pub mod config;
pub mod counters;
pub mod flow;
pub mod gateway;
pub mod nat;
pub mod nodes;
pub mod policy;

#[cfg(feature = "user")]
mod user;

/// An IPv4 address in network byte order.
pub type Ipv4 = [u8; 4];
/// A TCP/UDP port (or ICMP echo identifier) in network byte order.
pub type Port = [u8; 2];

/// Declares each map name once; `ALL` lists them in declaration order.
macro_rules! map_names {
    ($($(#[doc = $doc:literal])* $map:ident = $name:literal,)*) => {
        $($(#[doc = $doc])* pub const $map: &str = $name;)*

        /// Every map the agent pins, in a stable order.
        pub const ALL: &[&str] = &[$($map),*];
    };
}

/// Names of the maps in the eBPF object, used by the agent to find and pin them.
pub mod map_names {
    map_names! {
        /// The policy LPM trie: (pod IP, destination CIDR) -> (egress IP, gateway IP).
        POLICIES = "EGRESS_POLICIES",
        /// The gateway's translations, by the pod's flow.
        NAT_FORWARD = "NAT_FORWARD",
        /// The gateway's translations, by the reply's flow.
        NAT_REVERSE = "NAT_REVERSE",
        /// Flows the pod's node sent through the tunnel.
        STEERED_FLOWS = "STEERED_FLOWS",
        /// Flows that came in to a local pod (their replies keep their path).
        INBOUND_FLOWS = "INBOUND_FLOWS",
        /// The cluster's nodes, by InternalIP.
        NODES = "NODES",
        /// This node's pods, by IP, with their host interface.
        LOCAL_PODS = "LOCAL_PODS",
        /// The egress IPs this node serves as a gateway, with their interface.
        EGRESS_IPS = "EGRESS_IPS",
        /// The one `DatapathConfig` entry.
        CONFIG = "CONFIG",
        /// Per-CPU packet counters, one slot per `counters::reason`.
        COUNTERS = "COUNTERS",
        /// In-cluster destinations (pod CIDRs, `--cluster-cidr`), never steered.
        CLUSTER_CIDRS = "CLUSTER_CIDRS",
        /// Ports of fragmented datagrams, by (source, destination, protocol, IP id), from
        /// their first fragment.
        FRAGMENTS = "FRAGMENTS",
        /// Gateway groups: the candidates of a policy entry, in order of preference.
        GATEWAY_GROUPS = "GATEWAY_GROUPS",
        /// Gateways' health as this node's prober judged it (and, on a gateway, its own).
        GATEWAY_HEALTH = "GATEWAY_HEALTH",
        /// The last probe reply from each gateway, written by the datapath.
        PROBE_REPLIES = "PROBE_REPLIES",
        /// When this node last sent traffic to each probed gateway and last had a reply
        /// from it: the prober makes the entries, the datapath refreshes them.
        GATEWAY_TRAFFIC = "GATEWAY_TRAFFIC",
        /// This node's port block of each floating egress IP it translates for.
        OWN_PORT_BLOCKS = "OWN_PORT_BLOCKS",
        /// Every port block of the floating egress IPs this node is a candidate of, with the
        /// node that owns it.
        PORT_BLOCK_OWNERS = "PORT_BLOCK_OWNERS",
        /// When the TC program last answered a probe: the XDP responder answers only while
        /// that is recent.
        TC_ANSWERED_AT = "TC_ANSWERED_AT",
    }

    /// Test objects only (feature `test-programs`), never pinned: where the last redirect
    /// sent its packet, as `[ifindex, tunnel remote (network order), VNI, 0]` (the tunnel
    /// fields 0 for a redirect out of an interface).
    pub const TEST_LAST_REDIRECT: &str = "TEST_LAST_REDIRECT";
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
    /// XDP on the underlay interface of a gateway candidate: answers health probes before
    /// decapsulation, passes every other packet.
    pub const PROBE_RESPONDER: &str = "probe_responder";
    /// Test-only twin of `FROM_TUNNEL` that reads the outer source from `skb->cb[0]`, because
    /// `BPF_PROG_TEST_RUN` cannot attach tunnel metadata. The agent never attaches it.
    pub const TEST_FROM_TUNNEL: &str = "test_from_tunnel";
    /// Bench-only floor: an empty TC program (`cargo xtask bench`); never attached.
    pub const BENCH_EMPTY: &str = "bench_empty";
    /// Bench-only floor: parses Ethernet/IPv4/L4 and passes; never attached.
    pub const BENCH_PARSE_ONLY: &str = "bench_parse_only";
}
