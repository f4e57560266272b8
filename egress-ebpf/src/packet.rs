//! Header parsing and rewriting through the skb helpers (bpf_skb_load_bytes and friends),
//! which work whether or not the headers sit in the linear part of the skb.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use egress_common::{
    Ipv4, Port,
    flow::{FlowKey, FragmentKey, FragmentPorts, PROTO_ICMP, PROTO_TCP, PROTO_UDP, close_event},
};

use crate::maps::FRAGMENTS;

pub(crate) const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_ID_OFF: usize = ETH_HLEN + 4;
const IP_FRAG_OFF: usize = ETH_HLEN + 6;
const IP_MORE_FRAGMENTS: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
const IP_TTL_OFF: usize = ETH_HLEN + 8;
const IP_CHECK_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
/// `icmp_type` of a packet whose ICMP type is unknown (not ICMP, or a later fragment).
const ICMP_TYPE_UNKNOWN: u8 = u8::MAX;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const TCP_OPTION_END: u8 = 0;
const TCP_OPTION_NOP: u8 = 1;
const TCP_OPTION_MSS: u8 = 2;
/// TCP options span at most 40 bytes; MSS is nearly always first, so a few steps suffice.
const TCP_OPTION_STEPS: usize = 8;

/// An IPv4 packet's flow and where its layer-4 fields are.
pub(crate) struct Packet {
    pub(crate) flow: FlowKey,
    /// Offset of the layer-4 header from the start of the frame.
    pub(crate) l4_off: usize,
    /// The flow can be translated: TCP, UDP or ICMP echo with complete headers, or a later
    /// fragment of such a datagram whose first fragment was seen.
    pub(crate) translatable: bool,
    /// A fragment other than the first: it has no layer-4 header, its ports (and ICMP type)
    /// come from its datagram's first fragment, and only its IPv4 header may be rewritten.
    pub(crate) later_fragment: bool,
    pub(crate) tcp_flags: u8,
    /// `ICMP_TYPE_UNKNOWN` unless known.
    pub(crate) icmp_type: u8,
    pub(crate) ttl: u8,
    pub(crate) len: u32,
}

impl Packet {
    /// A TCP SYN without ACK: the first packet of a connection this side opens.
    #[inline(always)]
    pub(crate) fn is_tcp_open(&self) -> bool {
        self.flow.protocol == PROTO_TCP
            && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    #[inline(always)]
    pub(crate) fn is_tcp(&self) -> bool {
        self.flow.protocol == PROTO_TCP
    }

    #[inline(always)]
    pub(crate) fn is_tcp_syn(&self) -> bool {
        self.is_tcp() && self.tcp_flags & TCP_FLAG_SYN != 0
    }

    /// What this segment says about its connection's end (`flow::close_event`): 0 for
    /// anything but a TCP FIN or RST. `from_pod` tells which side sent it.
    #[inline(always)]
    pub(crate) fn close_event(&self, from_pod: bool) -> u32 {
        if self.is_tcp() {
            close_event(self.tcp_flags, from_pod)
        } else {
            0
        }
    }

    /// An ICMP echo reply: the answer to a ping that came in, never the start of a flow.
    #[inline(always)]
    pub(crate) fn is_icmp_echo_reply(&self) -> bool {
        self.flow.protocol == PROTO_ICMP && self.icmp_type == ICMP_ECHO_REPLY
    }

    /// An ICMP error (destination unreachable, time exceeded, parameter problem), which
    /// quotes the packet it is about.
    #[inline(always)]
    pub(crate) fn is_icmp_error(&self) -> bool {
        self.flow.protocol == PROTO_ICMP
            && !self.later_fragment
            && matches!(
                self.icmp_type,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
            )
    }
}

/// Parses an Ethernet + IPv4 frame. `None` for anything else (ARP, IPv6, truncated IPv4
/// header): such packets are none of the datapath's business.
///
/// Fragments: the first fragment of a datagram is parsed as any packet, and its ports are
/// remembered (`FRAGMENTS`); a later fragment gets them from there, so every fragment of a
/// datagram takes the same path, in both directions and on every node (as Cilium does).
#[inline(always)]
pub(crate) fn parse(ctx: &TcContext) -> Option<Packet> {
    let ether_type: [u8; 2] = ctx.load(12).ok()?;
    if u16::from_be_bytes(ether_type) != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let ihl = (vihl & 0x0f) as usize * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let tot_len: [u8; 2] = ctx.load(ETH_HLEN + 2).ok()?;
    let tot_len = u16::from_be_bytes(tot_len) as usize;
    let frags: [u8; 2] = ctx.load(IP_FRAG_OFF).ok()?;
    let frags = u16::from_be_bytes(frags);
    let more_fragments = frags & IP_MORE_FRAGMENTS != 0;
    let later_fragment = frags & IP_OFFSET_MASK != 0;
    // TTL and protocol are neighbours: one load.
    let [ttl, protocol]: [u8; 2] = ctx.load(IP_TTL_OFF).ok()?;
    let src_ip: Ipv4 = ctx.load(IP_SRC_OFF).ok()?;
    let dst_ip: Ipv4 = ctx.load(IP_DST_OFF).ok()?;
    let l4_off = ETH_HLEN + ihl;
    let mut packet = Packet {
        flow: FlowKey {
            src_ip,
            dst_ip,
            src_port: [0; 2],
            dst_port: [0; 2],
            protocol,
            _pad: [0; 3],
        },
        l4_off,
        translatable: false,
        later_fragment,
        tcp_flags: 0,
        icmp_type: ICMP_TYPE_UNKNOWN,
        ttl,
        len: ctx.len(),
    };
    // A header claiming more bytes than the frame holds is never translated: its ports
    // cannot be trusted.
    if tot_len < ihl || ETH_HLEN + tot_len > packet.len as usize {
        return Some(packet);
    }
    if more_fragments || later_fragment {
        let id: [u8; 2] = ctx.load(IP_ID_OFF).ok()?;
        let key = FragmentKey {
            src_ip,
            dst_ip,
            id,
            protocol,
            _pad: 0,
        };
        if later_fragment {
            // SAFETY: plain lookup.
            if let Some(first) = unsafe { FRAGMENTS.get(&key) } {
                packet.flow.src_port = first.src_port;
                packet.flow.dst_port = first.dst_port;
                packet.icmp_type = first.icmp_type;
                packet.translatable = true;
            }
            return Some(packet);
        }
        parse_l4(ctx, &mut packet, tot_len - ihl);
        if packet.translatable {
            let first = FragmentPorts {
                src_port: packet.flow.src_port,
                dst_port: packet.flow.dst_port,
                icmp_type: packet.icmp_type,
                _pad: [0; 3],
            };
            let _ = FRAGMENTS.insert(&key, &first, 0);
        }
        return Some(packet);
    }
    parse_l4(ctx, &mut packet, tot_len - ihl);
    Some(packet)
}

/// Fills in the ports (or echo identifier), TCP flags and ICMP type from the layer-4 header
/// of `l4_len` bytes; marks the packet translatable when they are complete.
#[inline(always)]
fn parse_l4(ctx: &TcContext, packet: &mut Packet, l4_len: usize) {
    let l4_off = packet.l4_off;
    match packet.flow.protocol {
        protocol @ (PROTO_TCP | PROTO_UDP) => {
            if l4_len < if protocol == PROTO_TCP { 20 } else { 8 } {
                return;
            }
            let Ok(ports) = ctx.load::<[u8; 4]>(l4_off) else {
                return;
            };
            packet.flow.src_port = [ports[0], ports[1]];
            packet.flow.dst_port = [ports[2], ports[3]];
            if protocol == PROTO_TCP {
                let Ok(tcp_flags) = ctx.load::<u8>(l4_off + 13) else {
                    return;
                };
                packet.tcp_flags = tcp_flags;
            }
            packet.translatable = true;
        }
        PROTO_ICMP => {
            if l4_len < 8 {
                return;
            }
            let Ok(head) = ctx.load::<[u8; 8]>(l4_off) else {
                return;
            };
            packet.icmp_type = head[0];
            let id = [head[4], head[5]];
            // The echo identifier stands in for the requester's port.
            match head[0] {
                ICMP_ECHO_REQUEST => {
                    packet.flow.src_port = id;
                    packet.translatable = true;
                }
                ICMP_ECHO_REPLY => {
                    packet.flow.dst_port = id;
                    packet.translatable = true;
                }
                _ => {}
            }
        }
        _ => {}
    }
}

/// Decrements the TTL as a router does when it forwards, fixing the header checksum. The
/// caller makes sure the TTL is above 1.
#[inline(always)]
pub(crate) fn decrement_ttl(ctx: &mut TcContext, packet: &Packet) -> Result<(), i64> {
    let ttl = packet.ttl - 1;
    let old = u64::from(u16::from_ne_bytes([packet.ttl, packet.flow.protocol]));
    let new = u64::from(u16::from_ne_bytes([ttl, packet.flow.protocol]));
    ctx.l3_csum_replace(IP_CHECK_OFF, old, new, 2)?;
    ctx.store(IP_TTL_OFF, &ttl, 0)
}

/// Which end of the flow a rewrite touches.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Source,
    Destination,
}

/// Rewrites one end's address and port (or ICMP echo identifier) with checksums fixed; of a
/// later fragment, only the address.
#[inline(always)]
pub(crate) fn rewrite(
    ctx: &mut TcContext,
    packet: &Packet,
    end: End,
    new_ip: Ipv4,
    new_port: Port,
) -> Result<(), i64> {
    let (ip_off, old_ip, old_port) = match end {
        End::Source => (IP_SRC_OFF, packet.flow.src_ip, packet.flow.src_port),
        End::Destination => (IP_DST_OFF, packet.flow.dst_ip, packet.flow.dst_port),
    };
    let l4 = packet.l4_off;
    let (port_off, check_off, flags) = match packet.flow.protocol {
        PROTO_TCP => (
            if end == End::Source { l4 } else { l4 + 2 },
            l4 + 16,
            u64::from(BPF_F_PSEUDO_HDR),
        ),
        // A zero UDP checksum means "none" and must stay zero.
        PROTO_UDP => (
            if end == End::Source { l4 } else { l4 + 2 },
            l4 + 6,
            u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0),
        ),
        // ICMP has no pseudo-header; only the identifier is in its checksum.
        _ => (l4 + 4, l4 + 2, 0),
    };
    let old_ip_word = u64::from(u32::from_ne_bytes(old_ip));
    let new_ip_word = u64::from(u32::from_ne_bytes(new_ip));
    // A later fragment has no layer-4 header: its datagram's checksum and ports were fixed
    // in the first fragment.
    let l4_header = !packet.later_fragment;
    if old_ip != new_ip {
        if packet.flow.protocol != PROTO_ICMP && l4_header {
            ctx.l4_csum_replace(check_off, old_ip_word, new_ip_word, flags | 4)?;
        }
        ctx.l3_csum_replace(IP_CHECK_OFF, old_ip_word, new_ip_word, 4)?;
        ctx.store(ip_off, &new_ip, 0)?;
    }
    if old_port != new_port && l4_header {
        let old_port_word = u64::from(u16::from_ne_bytes(old_port));
        let new_port_word = u64::from(u16::from_ne_bytes(new_port));
        ctx.l4_csum_replace(
            check_off,
            old_port_word,
            new_port_word,
            (flags & !u64::from(BPF_F_PSEUDO_HDR)) | 2,
        )?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

/// Lowers the MSS option of a TCP SYN to `mss` when it is larger.
#[inline(always)]
pub(crate) fn clamp_mss(ctx: &mut TcContext, packet: &Packet, mss: u16) -> Result<(), i64> {
    if mss == 0 || !packet.is_tcp_syn() {
        return Ok(());
    }
    let l4 = packet.l4_off;
    let data_offset: u8 = ctx.load(l4 + 12)?;
    let options_end = l4 + (data_offset >> 4) as usize * 4;
    let mut off = l4 + 20;
    for _ in 0..TCP_OPTION_STEPS {
        if off + 4 > options_end {
            return Ok(());
        }
        let kind: u8 = ctx.load(off)?;
        match kind {
            TCP_OPTION_END => return Ok(()),
            TCP_OPTION_NOP => off += 1,
            _ => {
                let len: u8 = ctx.load(off + 1)?;
                if kind == TCP_OPTION_MSS && len == 4 {
                    let current: [u8; 2] = ctx.load(off + 2)?;
                    if u16::from_be_bytes(current) <= mss {
                        return Ok(());
                    }
                    let clamped = mss.to_be_bytes();
                    ctx.l4_csum_replace(
                        l4 + 16,
                        u64::from(u16::from_ne_bytes(current)),
                        u64::from(u16::from_ne_bytes(clamped)),
                        2,
                    )?;
                    return ctx.store(off + 2, &clamped, 0);
                }
                if len < 2 {
                    return Ok(());
                }
                off += len as usize;
            }
        }
    }
    Ok(())
}

/// The packet an ICMP error quotes: its flow (as the quoted packet was sent) and offsets.
pub(crate) struct QuotedPacket {
    pub(crate) flow: FlowKey,
    pub(crate) ip_off: usize,
    /// Where the quoted packet's source port (or echo identifier) is.
    pub(crate) src_port_off: usize,
}

/// Parses the IPv4 + TCP/UDP or ICMP echo request packet quoted by an ICMP error.
#[inline(always)]
pub(crate) fn quoted_packet(ctx: &TcContext, packet: &Packet) -> Option<QuotedPacket> {
    if !packet.is_icmp_error() {
        return None;
    }
    let ip_off = packet.l4_off + 8;
    let vihl: u8 = ctx.load(ip_off).ok()?;
    let ihl = (vihl & 0x0f) as usize * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let protocol: u8 = ctx.load(ip_off + 9).ok()?;
    let src_ip: Ipv4 = ctx.load(ip_off + 12).ok()?;
    let dst_ip: Ipv4 = ctx.load(ip_off + 16).ok()?;
    let l4_off = ip_off + ihl;
    let head: [u8; 6] = ctx.load(l4_off).ok()?;
    // The flow as `parse` keys it: for an echo request, the identifier is the source port.
    let (src_port, dst_port, src_port_off) = match protocol {
        PROTO_TCP | PROTO_UDP => ([head[0], head[1]], [head[2], head[3]], l4_off),
        PROTO_ICMP if head[0] == ICMP_ECHO_REQUEST => ([head[4], head[5]], [0; 2], l4_off + 4),
        _ => return None,
    };
    Some(QuotedPacket {
        flow: FlowKey {
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            protocol,
            _pad: [0; 3],
        },
        ip_off,
        src_port_off,
    })
}

/// Reverse-translates an ICMP error about a SNATed flow: the outer destination and the
/// quoted packet's source become the pod's. The quoted IPv4 header keeps summing to zero, so
/// only the port change touches the ICMP checksum. The quoted layer-4 checksum is left as
/// is: receivers of ICMP errors do not verify it.
#[inline(always)]
pub(crate) fn rewrite_icmp_error(
    ctx: &mut TcContext,
    packet: &Packet,
    quoted: &QuotedPacket,
    pod_ip: Ipv4,
    pod_port: Port,
) -> Result<(), i64> {
    let old_outer = u64::from(u32::from_ne_bytes(packet.flow.dst_ip));
    let old_quoted = u64::from(u32::from_ne_bytes(quoted.flow.src_ip));
    let new_ip = u64::from(u32::from_ne_bytes(pod_ip));
    ctx.l3_csum_replace(IP_CHECK_OFF, old_outer, new_ip, 4)?;
    ctx.store(IP_DST_OFF, &pod_ip, 0)?;
    ctx.l3_csum_replace(quoted.ip_off + 10, old_quoted, new_ip, 4)?;
    ctx.store(quoted.ip_off + 12, &pod_ip, 0)?;
    if quoted.flow.src_port != pod_port {
        ctx.l4_csum_replace(
            packet.l4_off + 2,
            u64::from(u16::from_ne_bytes(quoted.flow.src_port)),
            u64::from(u16::from_ne_bytes(pod_port)),
            2,
        )?;
        ctx.store(quoted.src_port_off, &pod_port, 0)?;
    }
    Ok(())
}
