//! Flow tuples, used as keys of the NAT and flow-tracking maps.

use crate::{Ipv4, Port};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Flag of flow and NAT entries: the TCP connection saw a FIN or RST.
pub const FLOW_CLOSING: u32 = 1;

/// How stale a `last_seen_ns` may get before the datapath writes it again: traffic in
/// either direction keeps a flow alive, but a write per packet would cost every packet a
/// cache line. Idle timeouts must be well above it (the agent refuses under 2 s).
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Whether a `last_seen_ns` is old enough to be written again at `now_ns`.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "the BPF programs call it on the packet path, where every call is inlined"
)]
#[must_use]
pub const fn last_seen_is_stale(last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.wrapping_sub(last_seen_ns) >= LAST_SEEN_GRANULARITY_NS
}

/// A flow as seen in one packet: for ICMP echo, the identifier stands in for the port on
/// the requester's side and the other port is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src_ip: Ipv4,
    pub dst_ip: Ipv4,
    pub src_port: Port,
    pub dst_port: Port,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The same flow as seen from the other end.
    #[inline(always)]
    #[expect(
        clippy::inline_always,
        reason = "the BPF programs call it on the packet path, where every call is inlined"
    )]
    #[must_use]
    pub fn reversed(&self) -> Self {
        Self {
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol: self.protocol,
            _pad: [0; 3],
        }
    }
}

/// A pod's outbound flow that the pod's node steers through the tunnel (`STEERED_FLOWS`,
/// keyed by the flow as the pod sends it). Only flows the pod opened while a policy matched
/// are here, so connections that predate the policy, and replies of inbound connections,
/// keep their old path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeredFlow {
    /// The gateway the flow was first sent to; kept for gateway-change handling.
    pub gateway_ip: Ipv4,
    /// `FLOW_CLOSING` once a FIN or RST was seen, so the agent expires it quickly.
    pub flags: u32,
    pub last_seen_ns: u64,
}

/// A flow that came in to a local pod (`INBOUND_FLOWS`, keyed by the flow as the pod sends
/// its replies): the pod's replies keep their old path even when a policy matches them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundFlow {
    pub last_seen_ns: u64,
}

assert_size!(FlowKey = 16, SteeredFlow = 16, InboundFlow = 8);
