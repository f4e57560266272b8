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
    /// `flow::FLOW_CLOSING` once a FIN or RST was seen.
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
    pub _pad2: u32,
    pub last_seen_ns: u64,
}

assert_size!(NatForward = 24, NatReverse = 24);
