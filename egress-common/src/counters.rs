//! Per-CPU packet counters, one slot per verdict or drop reason.

/// Indexes into the `COUNTERS` per-CPU array.
pub mod reason {
    /// Pod traffic that matched no policy: untouched.
    pub const PASS_NO_MATCH: u32 = 0;
    /// Pod traffic to an excluded CIDR: untouched.
    pub const PASS_EXCLUDED: u32 = 1;
    /// Matched traffic of a connection opened before the policy applied, or a reply of an
    /// inbound connection: keeps its old path.
    pub const PASS_EXISTING_FLOW: u32 = 2;
    /// Matched traffic sent through the tunnel to a remote gateway.
    pub const REDIRECT_TO_GATEWAY: u32 = 3;
    /// A new flow was `SNATed` on this gateway.
    pub const SNAT_NEW_FLOW: u32 = 4;
    /// A packet of a known flow was `SNATed` on this gateway.
    pub const SNAT_EXISTING_FLOW: u32 = 5;
    /// A reply was reverse-translated on this gateway.
    pub const REVERSE_SNAT: u32 = 6;
    /// A reply arrived through the tunnel and was delivered to a local pod.
    pub const REPLY_TO_POD: u32 = 7;
    /// Matched traffic whose policy has no gateway node: dropped, fail closed.
    pub const DROP_NO_GATEWAY: u32 = 8;
    /// The gateway has no egress IP for the policy: dropped, fail closed.
    pub const DROP_NO_EGRESS_IP: u32 = 9;
    /// A tunnel packet from an address that is not a known node.
    pub const DROP_UNKNOWN_NODE: u32 = 10;
    /// A tunnel packet that no policy naming this gateway allows (or whose inner source is
    /// not a pod of the sending node): the gateway is not an open relay.
    pub const DROP_NOT_ALLOWED: u32 = 11;
    /// No free NAT port after the bounded retries.
    pub const DROP_NAT_EXHAUSTED: u32 = 12;
    /// Matched traffic the gateway cannot translate: fragments, protocols other than TCP,
    /// UDP and ICMP echo, malformed headers.
    pub const DROP_UNSUPPORTED: u32 = 13;
    /// A tunnel reply for a pod or flow this node does not know.
    pub const DROP_UNKNOWN_REPLY: u32 = 14;
    /// A helper failed (tunnel metadata, checksum, redirect).
    pub const DROP_ERROR: u32 = 15;
    /// Not a packet verdict: a NAT port the gateway tried was taken and it tried another one.
    /// `packets` counts retries, `bytes` stays 0.
    pub const NAT_PORT_RETRY: u32 = 16;
    /// Matched traffic to a node or pod of the cluster: egress gateways only apply to traffic
    /// leaving the cluster (as in Cilium), so even `0.0.0.0/0` never steers pod-to-pod traffic.
    pub const PASS_IN_CLUSTER: u32 = 17;

    /// Number of slots in use; the map is sized `MAX` to leave room.
    pub const COUNT: u32 = 18;
    /// Capacity of the `COUNTERS` map.
    pub const MAX: u32 = 32;

    /// Stable names, used by the CLI and metrics, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_no_match",
        "pass_excluded",
        "pass_existing_flow",
        "redirect_to_gateway",
        "snat_new_flow",
        "snat_existing_flow",
        "reverse_snat",
        "reply_to_pod",
        "drop_no_gateway",
        "drop_no_egress_ip",
        "drop_unknown_node",
        "drop_not_allowed",
        "drop_nat_exhausted",
        "drop_unsupported",
        "drop_unknown_reply",
        "drop_error",
        "nat_port_retry",
        "pass_in_cluster",
    ];

    /// True for slots that count packets by verdict (every slot but retry events).
    pub const fn is_packet_verdict(reason: u32) -> bool {
        reason < COUNT && reason != NAT_PORT_RETRY
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
