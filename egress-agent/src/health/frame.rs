//! The probe frame the prober sends.

use std::net::Ipv4Addr;

use egress_common::{
    config::VNI_TO_GATEWAY,
    gateway::{PROBE_MAGIC, PROBE_PORT, PROBE_REQUEST},
};

/// VXLAN header + Ethernet + IPv4 + UDP + probe: what the prober sends to the gateway's
/// VXLAN port, so the probe arrives as the pods' traffic does, decapsulated by the
/// gateway's tunnel device and seen by its `from_tunnel` program.
pub fn probe_frame(from: Ipv4Addr, to: Ipv4Addr, seq: u64, sent_ns: u64, path: u8) -> Vec<u8> {
    const PAYLOAD: usize = 32;
    let mut frame = Vec::with_capacity(8 + 14 + 20 + 8 + PAYLOAD);
    // VXLAN: flags (VNI valid), reserved, VNI (24 bits), reserved.
    frame.extend_from_slice(&[0x08, 0, 0, 0]);
    frame.extend_from_slice(&(VNI_TO_GATEWAY << 8).to_be_bytes());
    // Ethernet: the tunnel device does not look at the addresses.
    frame.extend_from_slice(&[0; 12]);
    frame.extend_from_slice(&0x0800_u16.to_be_bytes());
    let ip_start = frame.len();
    let total = u16::try_from(20 + 8 + PAYLOAD).unwrap_or(u16::MAX);
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    frame.extend_from_slice(&from.octets());
    frame.extend_from_slice(&to.octets());
    let checksum = ipv4_checksum(&frame[ip_start..]);
    frame[ip_start + 10..ip_start + 12].copy_from_slice(&checksum.to_be_bytes());
    // UDP, no checksum (IPv4 allows it): the gateway rewrites the payload.
    frame.extend_from_slice(&PROBE_PORT.to_be_bytes());
    frame.extend_from_slice(&PROBE_PORT.to_be_bytes());
    frame.extend_from_slice(&u16::try_from(8 + PAYLOAD).unwrap_or(0).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    // The probe, in this host's byte order (only this host reads seq and sent_ns back).
    frame.extend_from_slice(&PROBE_MAGIC);
    frame.extend_from_slice(&[PROBE_REQUEST, path, 0, 0]);
    frame.extend_from_slice(&[0; 8]);
    frame.extend_from_slice(&seq.to_ne_bytes());
    frame.extend_from_slice(&sent_ns.to_ne_bytes());
    frame
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use egress_common::gateway::PROBE_VIA_TC;

    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);

    #[test]
    fn probes_are_vxlan_frames_with_a_valid_inner_header() {
        let from = Ipv4Addr::new(10, 0, 0, 11);
        let frame = probe_frame(from, GW, 7, 123, PROBE_VIA_TC);
        assert_eq!(frame.len(), 8 + 14 + 20 + 8 + 32);
        assert_eq!(&frame[..8], &[0x08, 0, 0, 0, 0xE6, 0x00, 0x01, 0]);
        let ip = &frame[22..42];
        assert_eq!(ipv4_checksum(ip), 0, "a valid header sums to 0xffff");
        assert_eq!(&ip[12..16], &from.octets());
        assert_eq!(&ip[16..20], &GW.octets());
        let payload = &frame[50..];
        assert_eq!(&payload[..4], b"EGWP");
        assert_eq!(payload[4..6], [PROBE_REQUEST, PROBE_VIA_TC]);
        assert_eq!(u64::from_ne_bytes(payload[16..24].try_into().unwrap()), 7);
    }
}
