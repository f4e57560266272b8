//! What a node knows about the cluster and itself: nodes, local pods and egress IPs.

/// Value of `NODES`, keyed by a node's underlay IPv4 address. Only known nodes may send
/// tunnel traffic to a gateway.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Reserved for gateway health (failover); zero today.
    pub flags: u32,
    pub _pad: u32,
}

/// Value of `LOCAL_PODS`, keyed by a pod IPv4 address on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalPod {
    /// Host-side interface of the pod (found by a route lookup of the pod IP).
    pub ifindex: u32,
    pub _pad: u32,
}

/// Value of `CLUSTER_CIDRS`, an LPM trie keyed by (prefix length, IPv4): the pod CIDRs of
/// the cluster, whose addresses are never steered to a gateway.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterCidr {
    /// Reserved; zero today.
    pub flags: u32,
}

/// Value of `EGRESS_IPS`, keyed by an egress IPv4 address this node serves as a gateway.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressIp {
    /// Interface translated traffic leaves through.
    pub ifindex: u32,
    pub _pad: u32,
}

assert_size!(NodeInfo = 8, LocalPod = 8, ClusterCidr = 4, EgressIp = 8);
