//! The policy LPM trie, with the contract of Cilium's egress policy map.

use crate::Ipv4;

/// Gateway value meaning "a policy matched but no gateway node exists": drop.
pub const GATEWAY_NONE: Ipv4 = [0, 0, 0, 0];
/// Gateway value meaning "excluded CIDR": leave the packet alone.
pub const GATEWAY_EXCLUDED: Ipv4 = [0, 0, 0, 1];

/// Default capacity of `EGRESS_POLICIES` (Cilium's default).
pub const DEFAULT_POLICY_MAP_SIZE: u32 = 16384;

/// Key data of `EGRESS_POLICIES`; the trie key is `(prefix_len, PolicyKey)` with
/// `prefix_len = 32 + destination mask bits` (the source is always an exact /32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub source_ip: Ipv4,
    pub dest_ip: Ipv4,
}

/// Prefix length of a full-length lookup key.
pub const POLICY_LOOKUP_PREFIX: u32 = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// SNAT address; 0.0.0.0 on every node but the gateway (as in Cilium).
    pub egress_ip: Ipv4,
    /// Gateway's underlay address, or `GATEWAY_NONE` / `GATEWAY_EXCLUDED`.
    pub gateway_ip: Ipv4,
    /// Underlay address of the node that holds the source pod: the gateway accepts tunnel
    /// traffic for this entry only from that node (no spoofed inner sources).
    pub pod_node_ip: Ipv4,
    /// The entry's `GATEWAY_GROUPS` id: its candidate gateways, of which new flows take the
    /// first healthy one. 0: no group, `gateway_ip` only.
    pub gateway_group: u32,
}

assert_size!(PolicyKey = 8, PolicyValue = 16);
