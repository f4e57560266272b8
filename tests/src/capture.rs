//! Packet capture at the destination: tcpdump writes a pcap, we summarise its IPv4 packets.

use std::{
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::process::{Background, Signal, netns_command};

/// One IPv4 packet seen on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapturedPacket {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: IpProtocol,
    /// TCP/UDP ports; `None` for other protocols and non-first fragments.
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// IPv4 identification, which ties a datagram's fragments together.
    pub ip_id: u16,
    /// A fragment other than the first (no ports of its own).
    pub later_fragment: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IpProtocol {
    Icmp,
    Tcp,
    Udp,
    Other(u8),
}

impl From<u8> for IpProtocol {
    fn from(value: u8) -> Self {
        match value {
            1 => IpProtocol::Icmp,
            6 => IpProtocol::Tcp,
            17 => IpProtocol::Udp,
            other => IpProtocol::Other(other),
        }
    }
}

impl fmt::Display for CapturedPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let port = |port: Option<u16>| port.map(|port| format!(":{port}")).unwrap_or_default();
        write!(
            f,
            "{:?} {}{} > {}{}",
            self.protocol,
            self.src,
            port(self.src_port),
            self.dst,
            port(self.dst_port)
        )
    }
}

/// A running tcpdump.
pub struct Capture {
    process: Background,
    pcap: PathBuf,
}

impl Capture {
    /// Starts tcpdump on `interface` in `netns` and waits until it is capturing.
    pub fn start(netns: &str, interface: &str, work_dir: &Path, name: &str) -> Result<Capture> {
        let pcap = work_dir.join(format!("{name}.pcap"));
        let pcap_arg = pcap.to_string_lossy().into_owned();
        // -Z root: Debian's tcpdump otherwise drops to a user that cannot write our 0700 folder.
        // --immediate-mode: without it packets wait in the kernel ring for up to a second and are
        // lost when tcpdump is stopped right after the traffic.
        let args = [
            "tcpdump",
            "-i",
            interface,
            "-nn",
            "--immediate-mode",
            "-U",
            "-s",
            "128",
            // A large buffer: the leak detector must not miss packets of a busy transfer.
            "-B",
            "16384",
            "-Z",
            "root",
            "-w",
            &pcap_arg,
            "ip",
        ];
        let mut process = Background::spawn(netns_command(netns, &args), &work_dir.join(name))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !process.stderr().contains("listening on") {
            if !process.is_running() || Instant::now() > deadline {
                bail!("tcpdump did not start: {}", process.stderr());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Capture { process, pcap })
    }

    /// Stops tcpdump (letting it flush) and returns every IPv4 packet it saw.
    pub fn stop(mut self) -> Result<Vec<CapturedPacket>> {
        // Let the last packets in flight land before stopping.
        thread::sleep(Duration::from_millis(200));
        self.process.signal(Signal::Int);
        let pcap = self.pcap.clone();
        self.process.wait(Duration::from_secs(10))?;
        let bytes = std::fs::read(&pcap).with_context(|| format!("reading {}", pcap.display()))?;
        parse_pcap(&bytes)
    }
}

const LINKTYPE_ETHERNET: u32 = 1;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_VLAN: u16 = 0x8100;

/// Parses a classic pcap file of Ethernet frames into IPv4 packet summaries.
pub fn parse_pcap(bytes: &[u8]) -> Result<Vec<CapturedPacket>> {
    if bytes.len() < 24 {
        bail!("pcap file too short ({} bytes)", bytes.len());
    }
    let magic = u32::from_le_bytes(bytes[0..4].try_into()?);
    let little_endian = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => bail!("not a pcap file (magic {magic:#x})"),
    };
    let read_u32 = |at: usize| -> u32 {
        let raw: [u8; 4] = bytes[at..at + 4].try_into().unwrap();
        if little_endian {
            u32::from_le_bytes(raw)
        } else {
            u32::from_be_bytes(raw)
        }
    };
    let link_type = read_u32(20);
    if link_type != LINKTYPE_ETHERNET {
        bail!("unsupported pcap link type {link_type}");
    }
    let mut packets = Vec::new();
    let mut offset = 24;
    while offset + 16 <= bytes.len() {
        let captured_len = read_u32(offset + 8) as usize;
        let start = offset + 16;
        let end = start + captured_len;
        if end > bytes.len() {
            break; // truncated last record: tcpdump was stopped mid-write
        }
        if let Some(packet) = parse_ethernet(&bytes[start..end]) {
            packets.push(packet);
        }
        offset = end;
    }
    Ok(packets)
}

fn parse_ethernet(frame: &[u8]) -> Option<CapturedPacket> {
    let mut ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let mut header = 14;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = u16::from_be_bytes(frame.get(16..18)?.try_into().ok()?);
        header = 18;
    }
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = frame.get(header..header + 20)?;
    let address = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let protocol = IpProtocol::from(ip[9]);
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    let ports = match protocol {
        IpProtocol::Tcp | IpProtocol::Udp if fragment_offset == 0 => frame
            .get(header + header_len..header + header_len + 4)
            .map(|l4| {
                (
                    u16::from_be_bytes([l4[0], l4[1]]),
                    u16::from_be_bytes([l4[2], l4[3]]),
                )
            }),
        _ => None,
    };
    Some(CapturedPacket {
        src: address(12),
        dst: address(16),
        protocol,
        src_port: ports.map(|(src, _)| src),
        dst_port: ports.map(|(_, dst)| dst),
        ip_id: u16::from_be_bytes([ip[4], ip[5]]),
        later_fragment: fragment_offset != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(src: [u8; 4], dst: [u8; 4], protocol: u8) -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 24, 0, 0, 0, 0, 64, protocol, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        frame.extend_from_slice(&ip);
        // Ports 40000 -> 8080.
        frame.extend_from_slice(&[0x9c, 0x40, 0x1f, 0x90]);
        frame
    }

    #[test]
    fn parses_ipv4_packets_and_skips_others() {
        let mut file = Vec::new();
        file.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        file.extend_from_slice(&2u16.to_le_bytes());
        file.extend_from_slice(&4u16.to_le_bytes());
        for word in [0u32, 0, 65535, LINKTYPE_ETHERNET] {
            file.extend_from_slice(&word.to_le_bytes());
        }
        let mut arp = vec![0u8; 12];
        arp.extend_from_slice(&0x0806u16.to_be_bytes());
        arp.extend_from_slice(&[0u8; 28]);
        for record in [
            frame([10, 0, 0, 12], [198, 51, 100, 10], 6),
            arp,
            frame([192, 0, 2, 200], [198, 51, 100, 10], 17),
        ] {
            for word in [0u32, 0, record.len() as u32, record.len() as u32] {
                file.extend_from_slice(&word.to_le_bytes());
            }
            file.extend_from_slice(&record);
        }
        let packets = parse_pcap(&file).unwrap();
        assert_eq!(
            packets,
            vec![
                CapturedPacket {
                    src: Ipv4Addr::new(10, 0, 0, 12),
                    dst: Ipv4Addr::new(198, 51, 100, 10),
                    protocol: IpProtocol::Tcp,
                    src_port: Some(40000),
                    dst_port: Some(8080),
                    ip_id: 0,
                    later_fragment: false,
                },
                CapturedPacket {
                    src: Ipv4Addr::new(192, 0, 2, 200),
                    dst: Ipv4Addr::new(198, 51, 100, 10),
                    protocol: IpProtocol::Udp,
                    src_port: Some(40000),
                    dst_port: Some(8080),
                    ip_id: 0,
                    later_fragment: false,
                },
            ]
        );
    }
}
