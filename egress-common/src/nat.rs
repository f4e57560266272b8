//! Gateway SNAT state: a forward entry per flow and its reverse twin, created together.

use crate::{Ipv4, Port};

/// Value of `NAT_FORWARD`, keyed by the flow as the pod sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatForward {
    /// Source address after translation: the policy's egress IP.
    pub nat_ip: Ipv4,
    /// Source port (or ICMP identifier) after translation.
    pub nat_port: Port,
    pub _pad: [u8; 2],
    /// Underlay address of the node that holds the pod.
    pub pod_node_ip: Ipv4,
    /// TCP lifecycle flags (`flow::FLOW_FIN_FROM_POD` and the others), set by both
    /// directions.
    pub flags: u32,
    pub last_seen_ns: u64,
}

/// Value of `NAT_REVERSE`, keyed by a reply's flow as it arrives at the gateway
/// (source = remote, destination = egress IP and NAT port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReverse {
    pub pod_ip: Ipv4,
    pub pod_port: Port,
    pub _pad: [u8; 2],
    /// Where replies go: the tunnel peer, or this node for a pod on the gateway itself.
    pub pod_node_ip: Ipv4,
    /// `NAT_TIME_WAIT` once the flow ended and only its port is held (see there).
    pub flags: u32,
    pub last_seen_ns: u64,
}

/// Flag of a reverse entry kept after its flow ended (the forward half is gone): the remote
/// closed first and holds TIME_WAIT for the port, so the port is not handed to a new flow to
/// it yet. Replies hitting it are dropped. The agent removes it after `TIME_WAIT_SECS`, or
/// earlier once flows are refused (no port free, or a map full).
pub const NAT_TIME_WAIT: u32 = 1;

/// How long a remote may hold TIME_WAIT (Linux: 60 s, TCP_TIMEWAIT_LEN).
pub const TIME_WAIT_SECS: u64 = 60;

assert_size!(NatForward = 24, NatReverse = 24);
