//! Building Ethernet/IPv4 frames for `BPF_PROG_TEST_RUN`, shared by the datapath tests and
//! the benchmarks (which measure the same programs with the same packets).

use std::net::Ipv4Addr;

use egress_common::flow::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

/// TC verdicts as `BPF_PROG_TEST_RUN` returns them.
pub const TC_ACT_NEXT: u32 = u32::MAX; // TC_ACT_UNSPEC (-1): TCX "next", packet untouched
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

/// The addresses and interfaces of the scenario the tests and the benchmark share: a pod on
/// `POD_NODE` whose policy sends its traffic to `DEST` through `GATEWAY`.
pub mod scenario {
    use std::net::Ipv4Addr;

    pub const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
    pub const POD_NODE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
    pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
    pub const EGRESS_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
    pub const DEST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    /// A destination no policy covers.
    pub const OTHER_DEST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
    pub const TUNNEL_IFINDEX: u32 = 41;
    /// The tunnel's UDP port (the agent's default).
    pub const TUNNEL_PORT: u16 = egress_common::config::DEFAULT_TUNNEL_PORT;
    pub const EGRESS_IFINDEX: u32 = 42;
    pub const POD_IFINDEX: u32 = 43;
}

#[derive(Clone, Copy)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    /// TCP with an MSS option.
    TcpMss {
        flags: u8,
        mss: u16,
    },
    Udp,
    IcmpEcho {
        reply: bool,
    },
}

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for pair in [src, dst] {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        sum += u32::from(u16::from_be_bytes([pair[2], pair[3]]));
    }
    sum + u32::from(proto) + len as u32
}

pub fn packet(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, l4: L4) -> Vec<u8> {
    let payload = b"egress gateway test payload";
    let (proto, mut l4_bytes) = match l4 {
        L4::Tcp { flags } | L4::TcpMss { flags, .. } => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..8].copy_from_slice(&1000u32.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = flags;
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            if let L4::TcpMss { mss, .. } = l4 {
                // NOP, NOP, then MSS: the option need not come first.
                h[12] = 7 << 4;
                h.extend_from_slice(&[1, 1, 2, 4]);
                h.extend_from_slice(&mss.to_be_bytes());
                h.extend_from_slice(&[1, 1, 1, 1, 1, 0]);
            }
            (PROTO_TCP, h)
        }
        L4::Udp => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            (PROTO_UDP, h)
        }
        L4::IcmpEcho { reply } => {
            let mut h = vec![0u8; 8];
            h[0] = if reply { 0 } else { 8 };
            // The identifier travels in the "port" of the requester's side.
            let id = if reply { dport } else { sport };
            h[4..6].copy_from_slice(&id.to_be_bytes());
            h[6..8].copy_from_slice(&1u16.to_be_bytes());
            (PROTO_ICMP, h)
        }
    };
    l4_bytes.extend_from_slice(payload);
    let check_off = match proto {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => 2,
    };
    let initial = if proto == PROTO_ICMP {
        0
    } else {
        pseudo_sum(src.octets(), dst.octets(), proto, l4_bytes.len())
    };
    let sum = checksum(&l4_bytes, initial);
    l4_bytes[check_off..check_off + 2].copy_from_slice(&sum.to_be_bytes());

    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_bytes.len()) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());

    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00];
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4_bytes);
    frame
}

/// `frame` with another IPv4 TTL, its header checksum fixed.
pub fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    frame[14 + 8] = ttl;
    frame[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let sum = checksum(&frame[14..14 + 20], 0);
    frame[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// The IPv4 TTL of a frame.
pub fn ttl_of(frame: &[u8]) -> u8 {
    frame[14 + 8]
}

/// Addresses and ports of a frame built by `packet` (or rewritten by a program).
pub struct Seen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

pub fn seen(frame: &[u8]) -> Seen {
    let ip = &frame[14..];
    let l4 = &ip[(ip[0] & 0x0f) as usize * 4..];
    let (sport, dport) = match ip[9] {
        PROTO_ICMP if l4[0] == 8 => (u16::from_be_bytes([l4[4], l4[5]]), 0),
        PROTO_ICMP => (0, u16::from_be_bytes([l4[4], l4[5]])),
        _ => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
    };
    Seen {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        sport,
        dport,
    }
}

/// IPv4 identification of the fragments [`fragments`] makes.
pub const FRAGMENT_ID: u16 = 0x4242;

/// Splits a frame built by [`packet`] into two IPv4 fragments, as a sender with a small
/// MTU would: the first carries `first_len` bytes of the layer-4 datagram (a multiple of 8,
/// header included), the second the rest.
pub fn fragments(frame: &[u8], first_len: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(first_len % 8, 0, "fragment offsets count 8-byte units");
    let l4 = &frame[34..];
    let fragment = |part: &[u8], offset: usize, more: bool| {
        let mut ip = frame[14..34].to_vec();
        ip[2..4].copy_from_slice(&((20 + part.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&FRAGMENT_ID.to_be_bytes());
        let flags = if more { 0x2000 } else { 0 } | (offset / 8) as u16;
        ip[6..8].copy_from_slice(&flags.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut out = frame[..14].to_vec();
        out.extend_from_slice(&ip);
        out.extend_from_slice(part);
        out
    };
    (
        fragment(&l4[..first_len], 0, true),
        fragment(&l4[first_len..], first_len, false),
    )
}

/// The datagram two fragments make, as the receiver reassembles it (headers of the first).
pub fn reassemble(first: &[u8], later: &[u8]) -> Vec<u8> {
    let mut frame = first.to_vec();
    frame.extend_from_slice(&later[34..]);
    let total = (frame.len() - 14) as u16;
    frame[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
    frame[14 + 6..14 + 8].copy_from_slice(&[0, 0]);
    frame[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let sum = checksum(&frame[14..34], 0);
    frame[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// Where a frame on the underlay comes from (MAC, IPv4, UDP port) and goes to.
pub const UNDERLAY_MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const UNDERLAY_MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
/// The entropy source port a VXLAN sender picks.
pub const VXLAN_SOURCE_PORT: u16 = 50_123;

/// `vxlan` (a VXLAN header and what it carries) as it arrives on the underlay interface:
/// Ethernet, IPv4 (TTL 61: a few routers on the way) and UDP from `src` to `dst`'s `port`,
/// without a UDP checksum, as the kernel's VXLAN sends it.
pub fn on_underlay(src: Ipv4Addr, dst: Ipv4Addr, port: u16, vxlan: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(42 + vxlan.len());
    frame.extend_from_slice(&UNDERLAY_MAC_B);
    frame.extend_from_slice(&UNDERLAY_MAC_A);
    frame.extend_from_slice(&0x0800_u16.to_be_bytes());
    let total = (20 + 8 + vxlan.len()) as u16;
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0x12, 0x34, 0x40, 0, 61, 17, 0, 0]);
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    let ip_checksum = checksum(&frame[14..34], 0);
    frame[24..26].copy_from_slice(&ip_checksum.to_be_bytes());
    frame.extend_from_slice(&VXLAN_SOURCE_PORT.to_be_bytes());
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&((8 + vxlan.len()) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(vxlan);
    frame
}
