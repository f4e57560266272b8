//! Per-CPU packet counters, one slot per verdict or drop reason.

/// Declares every counter slot once: its index, its stable name (CLI, metrics) and, in its
/// doc comment, its meaning. `COUNT` and `NAMES` follow from the list, and a compile-time check
/// makes sure the slots are `0..COUNT`, each used once.
macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $reason:ident = $slot:literal => $name:literal,)*) => {
        $($(#[doc = $doc])* pub const $reason: u32 = $slot;)*

        /// Number of slots in use; the map is sized `MAX` to leave room.
        pub const COUNT: u32 = [$($slot),*].len() as u32;

        /// Stable names, used by the CLI and metrics, indexed by reason.
        pub const NAMES: [&str; COUNT as usize] = {
            let mut names = [""; COUNT as usize];
            $(names[$slot] = $name;)*
            names
        };

        const _: () = {
            // A slot out of range fails above; a repeated one leaves another slot empty.
            let mut slot = 0;
            while slot < NAMES.len() {
                assert!(!NAMES[slot].is_empty(), "a counter slot is used twice");
                slot += 1;
            }
            assert!(COUNT <= MAX, "more counter slots than the COUNTERS map holds");
        };
    };
}

/// Indexes into the `COUNTERS` per-CPU array.
pub mod reason {
    reasons! {
        /// Pod traffic that matched no policy: untouched.
        PASS_NO_MATCH = 0 => "pass_no_match",
        /// Pod traffic to an excluded CIDR: untouched.
        PASS_EXCLUDED = 1 => "pass_excluded",
        /// Matched traffic of a connection opened before the policy applied, or a reply of an
        /// inbound connection: keeps its old path.
        PASS_EXISTING_FLOW = 2 => "pass_existing_flow",
        /// Matched traffic sent through the tunnel to a remote gateway.
        REDIRECT_TO_GATEWAY = 3 => "redirect_to_gateway",
        /// A new flow was SNATed on this gateway.
        SNAT_NEW_FLOW = 4 => "snat_new_flow",
        /// A packet of a known flow was SNATed on this gateway.
        SNAT_EXISTING_FLOW = 5 => "snat_existing_flow",
        /// A reply was reverse-translated on this gateway.
        REVERSE_SNAT = 6 => "reverse_snat",
        /// A reply arrived through the tunnel and was delivered to a local pod.
        REPLY_TO_POD = 7 => "reply_to_pod",
        /// Matched traffic whose policy has no gateway node: dropped, fail closed.
        DROP_NO_GATEWAY = 8 => "drop_no_gateway",
        /// The gateway has no egress IP for the policy: dropped, fail closed.
        DROP_NO_EGRESS_IP = 9 => "drop_no_egress_ip",
        /// A tunnel packet from an address that is not a known node.
        DROP_UNKNOWN_NODE = 10 => "drop_unknown_node",
        /// A tunnel packet that no policy naming this gateway allows (or whose inner source is
        /// not a pod of the sending node): the gateway is not an open relay.
        DROP_NOT_ALLOWED = 11 => "drop_not_allowed",
        /// No free NAT port after the bounded retries.
        DROP_NAT_EXHAUSTED = 12 => "drop_nat_exhausted",
        /// Matched traffic the gateway cannot translate: protocols other than TCP, UDP and
        /// ICMP echo, malformed headers.
        DROP_UNSUPPORTED = 13 => "drop_unsupported",
        /// A tunnel reply for a pod or flow this node does not know.
        DROP_UNKNOWN_REPLY = 14 => "drop_unknown_reply",
        /// A helper failed (tunnel metadata, checksum, redirect).
        DROP_ERROR = 15 => "drop_error",
        /// Not a packet verdict: a NAT port the gateway tried was taken and it tried another one.
        /// `packets` counts retries, `bytes` stays 0.
        NAT_PORT_RETRY = 16 => "nat_port_retry",
        /// Matched traffic to a node or pod of the cluster: egress gateways only apply to traffic
        /// leaving the cluster (as in Cilium), so even `0.0.0.0/0` never steers pod-to-pod traffic.
        PASS_IN_CLUSTER = 17 => "pass_in_cluster",
        /// Matched traffic the gateway would forward with its TTL run out: handed to the
        /// kernel, which answers with ICMP time exceeded as the router it is (traceroute).
        PASS_TTL_EXCEEDED = 18 => "pass_ttl_exceeded",
        /// A new flow found its flow-tracking or NAT map full: dropped, so that no flow ever
        /// leaves with another source, and established flows keep their entries.
        DROP_FLOW_TABLE_FULL = 19 => "drop_flow_table_full",
        /// A later fragment of matched or translated traffic whose first fragment was not
        /// seen (lost, or arrived later): its flow is unknown, so it is dropped.
        DROP_FRAGMENT_UNKNOWN = 20 => "drop_fragment_unknown",
        /// A gateway answered a health probe (in its datapath).
        PROBE_ANSWERED = 21 => "probe_answered",
        /// A probing node received a probe reply from a gateway.
        PROBE_REPLY_RECEIVED = 22 => "probe_reply_received",
        /// Not a packet verdict: a steered flow moved to another gateway because its own was
        /// down or left its group (counted once per move; the packet counts as a redirect).
        FLOW_FAILED_OVER = 23 => "flow_failed_over",
        /// A flow of a floating egress IP from a node that holds no block of its ports (more
        /// nodes than blocks): dropped.
        DROP_NO_PORT_BLOCK = 24 => "drop_no_port_block",
        /// A gateway forwarded a packet the pod's node translated to a floating egress IP.
        FORWARD_TRANSLATED = 25 => "forward_translated",
        /// A gateway sent a reply to a floating egress IP on to the node owning its port's
        /// block.
        REPLY_TO_BLOCK_OWNER = 26 => "reply_to_block_owner",
        /// A gateway answered a health probe in XDP, on its underlay interface, before
        /// decapsulation (the cheap way; `probe_answered` counts the TC program's answers).
        PROBE_ANSWERED_XDP = 27 => "probe_answered_xdp",
    }

    /// Capacity of the `COUNTERS` map.
    pub const MAX: u32 = 32;

    /// True for slots that count packets by verdict (every slot but events: port retries
    /// and flows moving to another gateway, whose packets count under their verdict too).
    pub const fn is_packet_verdict(reason: u32) -> bool {
        reason < COUNT && reason != NAT_PORT_RETRY && reason != FLOW_FAILED_OVER
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

assert_size!(Counter = 16);
