//! Flow tuples, used as keys of the NAT and flow-tracking maps.

use crate::{Ipv4, Port};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// TCP lifecycle flags of flow and NAT entries, set by the datapath as a conntrack would:
/// a connection is closed once both sides sent a FIN, or either sent an RST; one FIN alone
/// is a half-close, and the other side may go on sending.
pub const FLOW_FIN_FROM_POD: u32 = 1 << 0;
pub const FLOW_FIN_FROM_REMOTE: u32 = 1 << 1;
pub const FLOW_RESET: u32 = 1 << 2;
/// The remote sent its FIN before the pod: the remote holds TIME_WAIT for the translated
/// port, so the gateway keeps that port from new flows to it for a while.
pub const FLOW_REMOTE_CLOSED_FIRST: u32 = 1 << 3;

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// What a TCP segment says about its connection's end, as lifecycle flags: `from_pod` tells
/// which side sent it. 0 for segments without FIN or RST.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "the BPF programs call it on the packet path, where every call is inlined"
)]
#[must_use]
pub const fn close_event(tcp_flags: u8, from_pod: bool) -> u32 {
    if tcp_flags & TCP_RST != 0 {
        FLOW_RESET
    } else if tcp_flags & TCP_FIN == 0 {
        0
    } else if from_pod {
        FLOW_FIN_FROM_POD
    } else {
        FLOW_FIN_FROM_REMOTE
    }
}

/// `flags` after a close event: also notes when the remote closed first.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "the BPF programs call it on the packet path, where every call is inlined"
)]
#[must_use]
pub const fn with_close_event(flags: u32, event: u32) -> u32 {
    let mut next = flags | event;
    if event & FLOW_FIN_FROM_REMOTE != 0 && flags & (FLOW_FIN_FROM_POD | FLOW_RESET) == 0 {
        next |= FLOW_REMOTE_CLOSED_FIRST;
    }
    next
}

/// Where a TCP connection is in its lifecycle, by its flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    Open,
    /// One side sent a FIN; the other may go on sending.
    HalfClosed,
    /// Both sides sent a FIN, or one sent an RST.
    Closed,
}

impl TcpState {
    #[must_use]
    pub const fn of(flags: u32) -> Self {
        let both_fins = FLOW_FIN_FROM_POD | FLOW_FIN_FROM_REMOTE;
        if flags & FLOW_RESET != 0 || flags & both_fins == both_fins {
            Self::Closed
        } else if flags & both_fins != 0 {
            Self::HalfClosed
        } else {
            Self::Open
        }
    }
}

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

    /// The key a reply to this flow (as the pod sent it) arrives with at the gateway once
    /// the flow is translated to (`nat_ip`, `nat_port`): `NAT_REVERSE`'s key.
    #[inline(always)]
    #[expect(
        clippy::inline_always,
        reason = "the BPF programs call it on the packet path, where every call is inlined"
    )]
    #[must_use]
    pub fn translated_reply(&self, nat_ip: Ipv4, nat_port: Port) -> Self {
        Self {
            src_ip: self.dst_ip,
            dst_ip: nat_ip,
            src_port: self.dst_port,
            dst_port: nat_port,
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
    /// TCP lifecycle flags (`FLOW_FIN_FROM_POD` and the others), so the agent expires a
    /// closed connection quickly.
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

/// A fragmented datagram (`FRAGMENTS`): later fragments carry no layer-4 header, so they
/// are matched to their first fragment by the fields the receiver reassembles them by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragmentKey {
    pub src_ip: Ipv4,
    pub dst_ip: Ipv4,
    /// The IPv4 identification field, as in the packet.
    pub id: [u8; 2],
    pub protocol: u8,
    pub _pad: u8,
}

/// What the first fragment of a datagram said, so its later fragments follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentPorts {
    pub src_port: Port,
    pub dst_port: Port,
    /// For ICMP, the first fragment's type (echo request or reply).
    pub icmp_type: u8,
    pub _pad: [u8; 3],
}

assert_size!(
    FlowKey = 16,
    SteeredFlow = 16,
    InboundFlow = 8,
    FragmentKey = 12,
    FragmentPorts = 8
);

#[cfg(test)]
mod tests {
    use super::*;

    const FIN: u8 = 0x01;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;

    #[test]
    fn a_connection_closes_when_both_sides_sent_a_fin_or_one_an_rst() {
        let pod_fin = close_event(FIN | ACK, true);
        let remote_fin = close_event(FIN | ACK, false);
        assert_eq!(close_event(ACK, true), 0);
        assert_eq!(TcpState::of(0), TcpState::Open);
        assert_eq!(
            TcpState::of(with_close_event(0, pod_fin)),
            TcpState::HalfClosed
        );
        assert_eq!(
            TcpState::of(with_close_event(with_close_event(0, pod_fin), remote_fin)),
            TcpState::Closed
        );
        assert_eq!(
            TcpState::of(with_close_event(0, close_event(RST, false))),
            TcpState::Closed
        );
        assert_eq!(
            TcpState::of(with_close_event(0, close_event(RST | ACK, true))),
            TcpState::Closed
        );
    }

    #[test]
    fn only_a_remote_that_sent_the_first_fin_holds_time_wait() {
        let pod_fin = close_event(FIN | ACK, true);
        let remote_fin = close_event(FIN | ACK, false);
        let remote_first = with_close_event(with_close_event(0, remote_fin), pod_fin);
        assert_ne!(remote_first & FLOW_REMOTE_CLOSED_FIRST, 0);
        let pod_first = with_close_event(with_close_event(0, pod_fin), remote_fin);
        assert_eq!(pod_first & FLOW_REMOTE_CLOSED_FIRST, 0);
        let reset = with_close_event(close_event(RST, false), remote_fin);
        assert_eq!(reset & FLOW_REMOTE_CLOSED_FIRST, 0);
    }
}
