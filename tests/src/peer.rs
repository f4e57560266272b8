//! The destination's `egress-peer` server as the harness sees it: addresses and its log.

use std::net::{Ipv4Addr, SocketAddrV4};

/// The external destination's address (inside the policies' destinationCIDRs).
pub const DESTINATION_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// HTTP port of the peer: any request answers with the client's source IP.
pub const PEER_HTTP_PORT: u16 = 8080;
/// UDP port of the peer: every datagram is answered with its source `ip:port`.
pub const PEER_UDP_PORT: u16 = 8081;

/// `http://198.51.100.10:8080<path>`.
pub fn peer_url(path: &str) -> String {
    format!("http://{DESTINATION_IP}:{PEER_HTTP_PORT}{path}")
}

pub fn peer_http_addr() -> SocketAddrV4 {
    SocketAddrV4::new(DESTINATION_IP, PEER_HTTP_PORT)
}

pub fn peer_udp_addr() -> SocketAddrV4 {
    SocketAddrV4::new(DESTINATION_IP, PEER_UDP_PORT)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerProtocol {
    Tcp,
    Udp,
}

/// One connection or datagram the peer received, as written to its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRecord {
    pub protocol: PeerProtocol,
    pub source: SocketAddrV4,
}

/// Formats a log line: `tcp 10.0.0.12:40000`.
pub fn format_record(protocol: PeerProtocol, source: SocketAddrV4) -> String {
    let protocol = match protocol {
        PeerProtocol::Tcp => "tcp",
        PeerProtocol::Udp => "udp",
    };
    format!("{protocol} {source}\n")
}

/// Parses the peer log; lines it does not understand are skipped.
pub fn parse_log(text: &str) -> Vec<PeerRecord> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let protocol = match words.next()? {
                "tcp" => PeerProtocol::Tcp,
                "udp" => PeerProtocol::Udp,
                _ => return None,
            };
            let source = words.next()?.parse().ok()?;
            Some(PeerRecord { protocol, source })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_round_trip() {
        let source = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 12), 40000);
        let text = format_record(PeerProtocol::Tcp, source)
            + "garbage\n"
            + &format_record(PeerProtocol::Udp, source);
        assert_eq!(
            parse_log(&text),
            vec![
                PeerRecord {
                    protocol: PeerProtocol::Tcp,
                    source
                },
                PeerRecord {
                    protocol: PeerProtocol::Udp,
                    source
                }
            ]
        );
    }
}
