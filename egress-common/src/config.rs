//! Per-node settings the agent writes once at start-up into the one-entry `CONFIG` array.

use crate::Ipv4;

/// VXLAN network identifier for packets a pod's node sends to a gateway.
pub const VNI_TO_GATEWAY: u32 = 0xE6_0001;
/// VXLAN network identifier for replies a gateway sends back to the pod's node.
/// A separate VNI keeps the two directions apart without guessing from addresses.
pub const VNI_TO_POD_NODE: u32 = 0xE6_0002;

/// Default UDP port of the agent's VXLAN device. Not 4789 (IANA VXLAN, used by Calico,
/// Antrea, kube-router) nor 8472 (Linux default, used by Flannel and Cilium), so the agent
/// runs beside those CNIs' own tunnels.
pub const DEFAULT_TUNNEL_PORT: u16 = 8475;

/// Default NAT port range on a gateway. It must not overlap the node's own ephemeral range
/// (`net.ipv4.ip_local_port_range`, 32768-60999 by default), so the node's own connections
/// from the egress IP never collide with translated ones.
pub const DEFAULT_NAT_PORT_MIN: u16 = 1024;
pub const DEFAULT_NAT_PORT_MAX: u16 = 32767;

/// How many ports the datapath tries before it gives up on a new flow (counted as
/// `DROP_NAT_EXHAUSTED`).
pub const NAT_PORT_RETRIES: u32 = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// This node's address on the underlay (its Kubernetes `InternalIP`).
    pub node_ip: Ipv4,
    /// Interface index of the agent's VXLAN device in external (`collect_md`) mode.
    pub tunnel_ifindex: u32,
    /// NAT source port range, inclusive, host byte order.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// TCP MSS that fits the tunnel (tunnel MTU - 40): SYNs entering the tunnel and SYN-ACKs
    /// leaving it are clamped to it, so large transfers need no fragmentation. 0 = no clamp.
    pub tunnel_mss: u16,
    /// UDP port of the agent's VXLAN device (host byte order): the probe responder on the
    /// underlay answers only probes sent to it.
    pub tunnel_port: u16,
}

assert_size!(DatapathConfig = 16);
