//! The leak detector: which packets of policy-matched flows reached the destination with a
//! source other than the expected egress IP.
//!
//! The destination cannot see which pod sent a translated packet, so matched flows are
//! recognised by where they go: each test gives a pod's traffic its own destination port
//! (the peer serves extra ports, see `ClusterConfig::extra_peer_ports`) and declares which
//! sources are allowed for that port. Pod IPs are never allowed anywhere: a pod address at
//! the destination means a packet skipped both the gateway and the node's masquerade.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use anyhow::{Result, bail};

use crate::{
    capture::{CapturedPacket, IpProtocol},
    peer::DESTINATION_IP,
};

/// Counts packets of matched flows whose source is not an expected egress IP.
#[derive(Clone, Debug, Default)]
pub struct LeakDetector {
    /// Destination port of matched flows (TCP and UDP) -> sources allowed for it.
    allowed: BTreeMap<u16, BTreeSet<Ipv4Addr>>,
    /// Sources that must never reach the destination at all (pod IPs).
    forbidden: BTreeSet<Ipv4Addr>,
}

/// What the detector found in one capture.
#[derive(Clone, Debug, Default)]
pub struct LeakReport {
    /// Packets to the destination that belong to matched flows.
    pub matched: usize,
    /// Of those (plus any packet from a forbidden source), the ones with a wrong source.
    pub leaks: Vec<CapturedPacket>,
}

impl LeakDetector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Traffic to `port` on the destination is matched and may only come from `egress_ips`.
    #[must_use]
    pub fn matched_port(
        mut self,
        port: u16,
        egress_ips: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Self {
        self.allowed.entry(port).or_default().extend(egress_ips);
        self
    }

    /// Packets from these sources (e.g. pod IPs) are leaks whatever their port.
    #[must_use]
    pub fn forbidden_sources(mut self, sources: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        self.forbidden.extend(sources);
        self
    }

    /// Classifies every packet the destination received. A later fragment has no ports: it
    /// counts for the port of its datagram's first fragment (same protocol and IP id,
    /// whatever its source, so a fragment that left with another source is caught too).
    pub fn inspect(&self, packets: &[CapturedPacket]) -> LeakReport {
        let mut report = LeakReport::default();
        let to_destination = || packets.iter().filter(|packet| packet.dst == DESTINATION_IP);
        let first_fragment_ports: BTreeMap<(IpProtocol, u16), u16> = to_destination()
            .filter(|packet| !packet.later_fragment)
            .filter_map(|packet| Some(((packet.protocol, packet.ip_id), packet.dst_port?)))
            .collect();
        for packet in to_destination() {
            if self.forbidden.contains(&packet.src) {
                report.leaks.push(*packet);
                continue;
            }
            let port = if packet.later_fragment {
                first_fragment_ports
                    .get(&(packet.protocol, packet.ip_id))
                    .copied()
            } else {
                packet.dst_port
            };
            let allowed = match (packet.protocol, port) {
                (IpProtocol::Tcp | IpProtocol::Udp, Some(port)) => self.allowed.get(&port),
                _ => None,
            };
            if let Some(allowed) = allowed {
                report.matched += 1;
                if !allowed.contains(&packet.src) {
                    report.leaks.push(*packet);
                }
            }
        }
        report
    }

    /// Fails with the offending packets unless no packet leaked; returns the matched count.
    pub fn check(&self, packets: &[CapturedPacket]) -> Result<usize> {
        let report = self.inspect(packets);
        if !report.leaks.is_empty() {
            let mut by_source: BTreeMap<String, usize> = BTreeMap::new();
            for packet in &report.leaks {
                let key = format!(
                    "{:?} {} -> port {:?}",
                    packet.protocol, packet.src, packet.dst_port
                );
                *by_source.entry(key).or_default() += 1;
            }
            let mut message = format!(
                "{} of {} packets of matched flows reached the destination with a wrong source \
                 (allowed: {:?}, forbidden: {:?}):\n",
                report.leaks.len(),
                report.matched,
                self.allowed,
                self.forbidden
            );
            for (what, count) in by_source {
                let _ = writeln!(message, "  {count} x {what}");
            }
            bail!(message);
        }
        Ok(report.matched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(src: [u8; 4], protocol: IpProtocol, dst_port: Option<u16>) -> CapturedPacket {
        CapturedPacket {
            src: src.into(),
            dst: DESTINATION_IP,
            protocol,
            src_port: dst_port.map(|_| 40000),
            dst_port,
            ip_id: 7,
            later_fragment: false,
        }
    }

    #[test]
    fn counts_wrong_sources_of_matched_ports_only() {
        let egress = Ipv4Addr::new(192, 0, 2, 200);
        let detector = LeakDetector::new()
            .matched_port(9001, [egress])
            .forbidden_sources([Ipv4Addr::new(10, 244, 1, 10)]);
        let packets = [
            packet([192, 0, 2, 200], IpProtocol::Tcp, Some(9001)),
            packet([192, 0, 2, 200], IpProtocol::Udp, Some(9001)),
            // The pod's node IP on a matched port: a leak.
            packet([10, 0, 0, 11], IpProtocol::Tcp, Some(9001)),
            // Unmatched port: anything goes.
            packet([10, 0, 0, 11], IpProtocol::Tcp, Some(8080)),
            // A pod IP anywhere: a leak.
            packet([10, 244, 1, 10], IpProtocol::Icmp, None),
            // Leaving the destination: not counted.
            CapturedPacket {
                src: DESTINATION_IP,
                dst: Ipv4Addr::new(10, 0, 0, 11),
                protocol: IpProtocol::Tcp,
                src_port: Some(9001),
                dst_port: Some(40000),
                ip_id: 0,
                later_fragment: false,
            },
        ];
        let report = detector.inspect(&packets);
        assert_eq!(report.matched, 3);
        assert_eq!(report.leaks.len(), 2, "{:?}", report.leaks);
        assert!(
            detector
                .check(&packets)
                .unwrap_err()
                .to_string()
                .contains("2 of 3")
        );
        assert_eq!(detector.check(&packets[..2]).unwrap(), 2);
    }

    #[test]
    fn later_fragments_count_for_their_first_fragments_port() {
        let egress = Ipv4Addr::new(192, 0, 2, 200);
        let detector = LeakDetector::new().matched_port(9001, [egress]);
        let first = packet([192, 0, 2, 200], IpProtocol::Udp, Some(9001));
        let later = |src: [u8; 4]| CapturedPacket {
            src: src.into(),
            src_port: None,
            dst_port: None,
            later_fragment: true,
            ..first
        };
        let report = detector.inspect(&[first, later([192, 0, 2, 200]), later([10, 0, 0, 11])]);
        assert_eq!(report.matched, 3);
        assert_eq!(report.leaks, vec![later([10, 0, 0, 11])]);
    }
}
