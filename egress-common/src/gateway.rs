//! Gateway groups (the candidates a pod's traffic may leave through, in order of
//! preference), their health as the prober judged it, and the health probes.
//!
//! A policy entry names its group (`PolicyValue::gateway_group`); a new flow takes the first
//! candidate that is neither down nor draining and keeps it (`SteeredFlow::gateway_ip`) while
//! that gateway is up, so a failover is one `GATEWAY_HEALTH` write, not a rewrite of every
//! policy entry.

use crate::Ipv4;

/// Most candidates a group holds; the control plane keeps the first ones.
pub const MAX_CANDIDATES: usize = 8;

/// Capacity of `GATEWAY_GROUPS`: distinct candidate lists, a few per policy.
pub const GATEWAY_GROUP_MAP_SIZE: u32 = 1024;

/// Value of `GATEWAY_GROUPS`, keyed by a group id (`u32`, never 0: 0 means no group).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayGroup {
    /// Underlay addresses, in order of preference; only the first `count` are used.
    pub candidates: [Ipv4; MAX_CANDIDATES],
    pub count: u32,
    /// `GROUP_POD_NODE_TRANSLATES`, or 0.
    pub flags: u32,
}

/// `GatewayGroup::flags`: the group's egress IP floats between its candidates, and the pod's
/// node translates (with its own block of the egress IP's ports, `OWN_PORT_BLOCKS`); the
/// gateway only forwards, and maps a reply's port to its block's node
/// (`PORT_BLOCK_OWNERS`). A connection survives a failover: its translation lives on the
/// pod's node, and any candidate holding the egress IP serves it.
pub const GROUP_POD_NODE_TRANSLATES: u32 = 1 << 0;

/// Ports per block of a floating egress IP's NAT range.
pub const PORT_BLOCK_SIZE: u16 = 64;

/// Capacity of `OWN_PORT_BLOCKS`: floating egress IPs this node's pods use.
pub const OWN_PORT_BLOCK_MAP_SIZE: u32 = 1024;
/// Capacity of `PORT_BLOCK_OWNERS`: blocks of the floating egress IPs this node is a
/// candidate of (496 per IP with the default NAT range).
pub const PORT_BLOCK_OWNER_MAP_SIZE: u32 = 16384;

/// Value of `OWN_PORT_BLOCKS`, keyed by a floating egress IP: the ports this node translates
/// its pods' flows to (host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortBlock {
    pub first: u16,
    pub count: u16,
    pub _pad: u32,
}

/// Key of `PORT_BLOCK_OWNERS`: a floating egress IP and a block index (the port's offset
/// from the NAT range's first port, divided by `PORT_BLOCK_SIZE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortBlockKey {
    pub egress_ip: Ipv4,
    pub block: u16,
    pub _pad: u16,
}

/// Value of `PORT_BLOCK_OWNERS`: the node whose pods' flows use the block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortBlockOwner {
    pub node_ip: Ipv4,
    pub _pad: u32,
}

/// `GatewayHealth::flags`: the gateway did not answer its last probes, or answered that it
/// cannot serve (its egress interface is down or lacks the egress IP). On a gateway, its own
/// entry says whether it can serve, and its probe replies say so.
pub const GATEWAY_DOWN: u32 = 1 << 0;
/// `GatewayHealth::flags`: the node is being drained: no new flows, established ones stay.
pub const GATEWAY_DRAINING: u32 = 1 << 1;

/// Value of `GATEWAY_HEALTH`, keyed by a gateway's underlay address; written by the agent's
/// prober only. No entry: healthy (not judged yet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayHealth {
    pub flags: u32,
    pub _pad: u32,
}

/// UDP port of the probes, inside the tunnel (BFD's single-hop port, as RFC 8971 runs BFD
/// inside VXLAN): between node addresses, VNI `VNI_TO_GATEWAY` there and
/// `VNI_TO_POD_NODE` back.
pub const PROBE_PORT: u16 = 3784;
/// First bytes of a probe's payload.
pub const PROBE_MAGIC: [u8; 4] = *b"EGWP";
pub const PROBE_REQUEST: u8 = 1;
pub const PROBE_REPLY: u8 = 2;

/// `Probe::path` of a request: any responder may answer (XDP on the gateway's underlay
/// interface, or else its TC program).
pub const PROBE_VIA_ANY: u8 = 0;
/// `Probe::path`: in a request, only the TC program may answer (the prober lost an answer
/// and does not trust the XDP responder's way back for a while); in a reply, the TC program
/// answered.
pub const PROBE_VIA_TC: u8 = 1;
/// `Probe::path` of a reply: the XDP responder answered.
pub const PROBE_VIA_XDP: u8 = 2;

/// How long after the TC program last answered a probe the XDP responder may answer
/// (monotonic ns). XDP answers before the tunnel device, the host's filters and
/// `from_tunnel`; once the TC program has answered nothing for this long, XDP passes every
/// probe to it, so a broken tunnel path behind XDP fails the probes within a second. While
/// XDP answers, the first probe after each such second reaches the TC program.
pub const TC_ANSWER_FRESH_NS: u64 = 1_000_000_000;

/// A probe's UDP payload. The gateway's datapath answers it (never its agent, so a busy or
/// restarting agent is not a dead gateway): it turns the request around with its own
/// `GATEWAY_HEALTH` flags and echoes `seq` and `sent_ns`, which only the prober reads (in
/// its own byte order and clock).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    pub magic: [u8; 4],
    pub kind: u8,
    /// `PROBE_VIA_*`: who may answer (request), who answered (reply).
    pub path: u8,
    pub _pad: [u8; 2],
    /// In a reply: the gateway's own `GatewayHealth::flags`.
    pub flags: u32,
    pub _pad2: u32,
    pub seq: u64,
    /// The prober's monotonic clock when it sent the probe.
    pub sent_ns: u64,
}

/// Value of `PROBE_REPLIES`, keyed by a gateway's underlay address: the last probe reply
/// this node's datapath received from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeReply {
    pub seq: u64,
    pub sent_ns: u64,
    /// This node's monotonic clock when the reply arrived.
    pub received_ns: u64,
    /// The gateway's own `GatewayHealth::flags`.
    pub gateway_flags: u32,
    /// `PROBE_VIA_*`: who answered.
    pub path: u8,
    pub _pad: [u8; 3],
}

/// Value of `GATEWAY_TRAFFIC`, keyed by a gateway's underlay address: when this node last
/// sent its pods' traffic into the tunnel to the gateway, and last received a reply from it
/// (monotonic ns, 0: never). The prober makes the entry; the datapath only refreshes it, at
/// most every `TRAFFIC_STAMP_GRANULARITY_NS`. Replies that keep coming show the gateway
/// alive, so the prober may probe it less often (BFD's demand mode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatewayTraffic {
    pub sent_ns: u64,
    pub received_ns: u64,
}

/// How stale a `GatewayTraffic` stamp may get before the datapath writes it again: fine
/// against any probe interval, and no cache line written per packet.
pub const TRAFFIC_STAMP_GRANULARITY_NS: u64 = 1_000_000;

assert_size!(
    GatewayGroup = 40,
    GatewayTraffic = 16,
    GatewayHealth = 8,
    Probe = 32,
    ProbeReply = 32
);
