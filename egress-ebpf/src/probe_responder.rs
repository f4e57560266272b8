//! The XDP probe responder on a gateway candidate's underlay interface: a health probe is
//! turned around where it arrives, before the kernel allocates an skb, decapsulates VXLAN and
//! runs `from_tunnel`, so 100,000 probes a second (5,000 probing nodes at 50 ms) cost a
//! fraction of what they cost through the tunnel device.
//!
//! It answers only a well-formed probe of a known node, to this node, on the agent's tunnel
//! port, that asks for any responder, and only while the TC program has answered a probe
//! within the last second (`TC_ANSWER_FRESH_NS`): XDP runs before the tunnel device, the
//! host's filters and `from_tunnel`, so a probe it answers alone would not show they work.
//! Everything else passes untouched (and the TC program judges it as before). The reply is the request with its outer and inner addresses
//! swapped, the VNI of the way back, and this gateway's own health flags: the same reply the
//! TC program sends, so the prober cannot tell them apart but by `Probe::path`.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    macros::xdp,
    programs::XdpContext,
};
use egress_common::{
    Ipv4,
    config::{DatapathConfig, VNI_TO_GATEWAY, VNI_TO_POD_NODE},
    counters::reason,
    flow::PROTO_UDP,
    gateway::{
        PROBE_MAGIC, PROBE_PORT, PROBE_REPLY, PROBE_REQUEST, PROBE_VIA_ANY, PROBE_VIA_XDP,
        TC_ANSWER_FRESH_NS,
    },
};

use crate::maps::{GATEWAY_HEALTH, NODES, TC_ANSWERED_AT, config, count};

// Offsets in the frame: outer Ethernet, IPv4 (no options), UDP, VXLAN, inner Ethernet,
// IPv4 (no options), UDP, the probe.
const OUTER_ETH_TYPE: usize = 12;
const OUTER_IP: usize = 14;
const OUTER_UDP: usize = OUTER_IP + 20;
const VXLAN: usize = OUTER_UDP + 8;
const INNER_ETH_TYPE: usize = VXLAN + 8 + 12;
const INNER_IP: usize = VXLAN + 8 + 14;
const INNER_UDP: usize = INNER_IP + 20;
const PROBE: usize = INNER_UDP + 8;
/// The whole request: everything read or written lies before it.
const FRAME_LEN: usize = PROBE + 32;

// Offsets inside an IPv4 header, a UDP header and the probe.
const IP_VERSION_IHL: usize = 0;
const IP_FRAGMENT: usize = 6;
const IP_TTL: usize = 8;
const IP_PROTOCOL: usize = 9;
const IP_CHECKSUM: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
const UDP_SRC_PORT: usize = 0;
const UDP_DST_PORT: usize = 2;
const UDP_CHECKSUM: usize = 6;
const PROBE_KIND: usize = 4;
const PROBE_PATH: usize = 5;
const PROBE_FLAGS: usize = 8;

const ETH_P_IP: [u8; 2] = 0x0800_u16.to_be_bytes();
/// IPv4 without options.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// More-fragments flag and fragment offset.
const IP_FRAGMENT_BITS: u16 = 0x3fff;
/// VXLAN flags: the VNI is valid.
const VXLAN_VNI_VALID: u8 = 0x08;
const REPLY_TTL: u8 = 64;

#[xdp]
pub(crate) fn probe_responder(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    // The check the verifier sees: every offset below lies in the frame.
    if start + FRAME_LEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let Some(config) = config() else {
        return xdp_action::XDP_PASS;
    };
    let frame = start as *mut u8;
    // SAFETY: the frame holds FRAME_LEN bytes.
    unsafe {
        if !is_probe_request(frame, config) || !tc_answered_lately() {
            return xdp_action::XDP_PASS;
        }
        turn_around(frame, config);
    }
    count(reason::PROBE_ANSWERED_XDP, FRAME_LEN as u32);
    // Out of the interface it came in on. A redirect (the driver's ndo_xdp_xmit) rather than
    // XDP_TX: the same for a NIC, and on a veth underlay (kind, the test clusters) XDP_TX
    // frames wait for the peer's next packet unless the peer runs XDP itself, while a
    // redirect is flushed at once. The helper returns XDP_REDIRECT.
    let ifindex = u32::try_from(ctx.ingress_ifindex()).unwrap_or(0);
    // SAFETY: helper with plain arguments.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    u32::try_from(action).unwrap_or(xdp_action::XDP_ABORTED)
}

/// Reads `N` bytes at `offset`.
///
/// SAFETY: `offset + N <= FRAME_LEN`, and the frame is at least `FRAME_LEN` long.
#[inline(always)]
unsafe fn read<const N: usize>(frame: *const u8, offset: usize) -> [u8; N] {
    // SAFETY: as the caller promised; unaligned, as packet bytes are.
    unsafe { core::ptr::read_unaligned(frame.add(offset).cast::<[u8; N]>()) }
}

#[inline(always)]
unsafe fn write<const N: usize>(frame: *mut u8, offset: usize, bytes: [u8; N]) {
    // SAFETY: as for `read`.
    unsafe { core::ptr::write_unaligned(frame.add(offset).cast::<[u8; N]>(), bytes) }
}

#[inline(always)]
unsafe fn swap<const N: usize>(frame: *mut u8, a: usize, b: usize) {
    // SAFETY: as for `read`.
    unsafe {
        let first: [u8; N] = read(frame, a);
        write(frame, a, read::<N>(frame, b));
        write(frame, b, first);
    }
}

/// An IPv4 UDP header without options and not a fragment.
#[inline(always)]
unsafe fn is_plain_udp(frame: *const u8, ip: usize) -> bool {
    // SAFETY: as for `read`.
    unsafe {
        read::<1>(frame, ip + IP_VERSION_IHL)[0] == IPV4_NO_OPTIONS
            && u16::from_be_bytes(read(frame, ip + IP_FRAGMENT)) & IP_FRAGMENT_BITS == 0
            && read::<1>(frame, ip + IP_PROTOCOL)[0] == PROTO_UDP
    }
}

/// A probe request of a known node, to this node on the tunnel port, inside VXLAN with the
/// VNI towards a gateway, for any responder.
#[inline(always)]
unsafe fn is_probe_request(frame: *const u8, config: &DatapathConfig) -> bool {
    // SAFETY: as for `read`.
    unsafe {
        let outer_src: Ipv4 = read(frame, OUTER_IP + IP_SRC);
        let vni = u32::from_be_bytes(read(frame, VXLAN + 4)) >> 8;
        let probe_port = PROBE_PORT.to_be_bytes();
        let is_request = read::<2>(frame, OUTER_ETH_TYPE) == ETH_P_IP
            && is_plain_udp(frame, OUTER_IP)
            && read::<4>(frame, OUTER_IP + IP_DST) == config.node_ip
            && read::<2>(frame, OUTER_UDP + UDP_DST_PORT) == config.tunnel_port.to_be_bytes()
            && read::<1>(frame, VXLAN)[0] & VXLAN_VNI_VALID != 0
            && vni == VNI_TO_GATEWAY
            && read::<2>(frame, INNER_ETH_TYPE) == ETH_P_IP
            && is_plain_udp(frame, INNER_IP)
            && read::<2>(frame, INNER_UDP + UDP_SRC_PORT) == probe_port
            && read::<2>(frame, INNER_UDP + UDP_DST_PORT) == probe_port
            && read::<4>(frame, INNER_IP + IP_SRC) == outer_src
            && read::<4>(frame, INNER_IP + IP_DST) == config.node_ip
            && read::<4>(frame, PROBE) == PROBE_MAGIC
            && read::<1>(frame, PROBE + PROBE_KIND)[0] == PROBE_REQUEST
            && read::<1>(frame, PROBE + PROBE_PATH)[0] == PROBE_VIA_ANY;
        // SAFETY: plain lookup. Last: the costliest check, and only probes get there.
        is_request && NODES.get(&outer_src).is_some()
    }
}

/// Whether the TC program answered a probe within `TC_ANSWER_FRESH_NS`: only then does an
/// answer from here say the gateway's whole tunnel path works.
#[inline(always)]
fn tc_answered_lately() -> bool {
    let answered_at = TC_ANSWERED_AT.get(0).copied().unwrap_or(0);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    now.saturating_sub(answered_at) < TC_ANSWER_FRESH_NS
}

/// Makes the request its reply, in place.
#[inline(always)]
unsafe fn turn_around(frame: *mut u8, config: &DatapathConfig) {
    // SAFETY: plain lookup.
    let flags = unsafe { GATEWAY_HEALTH.get(&config.node_ip) }.map_or(0, |health| health.flags);
    // SAFETY: as for `read`.
    unsafe {
        swap::<6>(frame, 0, 6);
        // Swapping the addresses keeps both IPv4 checksums; the TTL starts afresh.
        swap::<4>(frame, OUTER_IP + IP_SRC, OUTER_IP + IP_DST);
        let old_ttl_word = u16::from_be_bytes(read(frame, OUTER_IP + IP_TTL));
        let new_ttl_word = (u16::from(REPLY_TTL) << 8) | (old_ttl_word & 0xff);
        let checksum = u16::from_be_bytes(read(frame, OUTER_IP + IP_CHECKSUM));
        write(
            frame,
            OUTER_IP + IP_CHECKSUM,
            updated_checksum(checksum, old_ttl_word, new_ttl_word).to_be_bytes(),
        );
        write(frame, OUTER_IP + IP_TTL, [REPLY_TTL]);
        // No outer UDP checksum (IPv4 allows it; the kernel's VXLAN sends none either). The
        // ports stay: the reply goes to the prober's tunnel port, from its entropy port.
        write(frame, OUTER_UDP + UDP_CHECKSUM, [0, 0]);
        write(frame, VXLAN + 4, (VNI_TO_POD_NODE << 8).to_be_bytes());
        swap::<4>(frame, INNER_IP + IP_SRC, INNER_IP + IP_DST);
        write(frame, PROBE + PROBE_KIND, [PROBE_REPLY, PROBE_VIA_XDP]);
        write(frame, PROBE + PROBE_FLAGS, flags.to_ne_bytes());
    }
}

/// RFC 1624's incremental update of a ones'-complement checksum for one changed 16-bit word.
#[inline(always)]
fn updated_checksum(checksum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
