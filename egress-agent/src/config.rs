//! The agent's configuration, validated once at the edge: `cli` parses the flags into an
//! [`AgentConfig`], and nothing below it reads a flag.

use std::{fmt, fs, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use ipnet::Ipv4Net;
use thiserror::Error;

use crate::{
    datapath::{MapSizes, Timeouts},
    health::ProbeSettings,
    privileges,
};

/// Where the cluster state comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    /// A folder of manifests, watched for changes.
    Manifests(PathBuf),
    /// The Kubernetes API, with the pod's service account or a kubeconfig file.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        /// Namespace of the status writer's Lease (the agents' own).
        lease_namespace: String,
    },
}

/// Everything `egress-agent run` needs, checked for consistency.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's Kubernetes name (as in the Node object).
    pub node_name: String,
    pub source: SourceConfig,
    pub metrics_address: SocketAddr,
    /// Folder on bpffs for this agent's pins.
    pub bpffs: PathBuf,
    pub tunnel_device: String,
    pub tunnel_port: u16,
    /// Source ports the gateway translates to.
    pub nat_ports: PortRange,
    /// In-cluster destinations besides the nodes' pod CIDRs, never steered.
    pub cluster_cidrs: Vec<Ipv4Net>,
    pub map_sizes: MapSizes,
    pub timeouts: Timeouts,
    /// Gateway health probes.
    pub probes: ProbeSettings,
    /// What answers the probes on a gateway candidate.
    pub probe_responder: ProbeResponder,
}

/// What answers health probes on a gateway candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeResponder {
    /// The `from_tunnel` TC program, after the kernel's VXLAN decapsulation.
    Tc,
    /// XDP in driver mode on the underlay interface, before decapsulation (where the driver
    /// or another XDP program refuses it, the TC program answers).
    Xdp,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--manifests {}: not a folder", .0.display())]
    NotAFolder(PathBuf),
    #[error("--manifests {}", .0.display())]
    ManifestsFolder(PathBuf, #[source] privileges::PrivilegeError),
    #[error(
        "--nat-port-range {nat} overlaps this node's ephemeral ports {ephemeral} \
         (net.ipv4.ip_local_port_range): translated flows could collide with the node's own \
         connections; pick a range outside it"
    )]
    NatPortsOverlapEphemeral {
        nat: PortRange,
        ephemeral: PortRange,
    },
    #[error(
        "{flag} {seconds}: must be at least {MIN_IDLE_TIMEOUT_SECS} s, since the datapath \
         notes a flow's activity about once a second"
    )]
    TimeoutTooShort { flag: &'static str, seconds: u64 },
}

/// The shortest idle timeout: a few times the datapath's `last_seen` granularity (1 s).
pub const MIN_IDLE_TIMEOUT_SECS: u64 = 2;

impl AgentConfig {
    /// Checks what flags alone cannot: the manifests folder exists and is root's alone, and
    /// the NAT ports stay clear of the node's own ephemeral ports.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let SourceConfig::Manifests(dir) = &self.source {
            if !dir.is_dir() {
                return Err(ConfigError::NotAFolder(dir.clone()));
            }
            privileges::check_private_dir(dir)
                .map_err(|error| ConfigError::ManifestsFolder(dir.clone(), error))?;
        }
        for (flag, timeout) in [
            ("--udp-idle-timeout", self.timeouts.other_idle),
            ("--tcp-idle-timeout", self.timeouts.tcp_idle),
            ("--tcp-closing-timeout", self.timeouts.tcp_closing),
            ("--tcp-half-closed-timeout", self.timeouts.tcp_half_closed),
        ] {
            if timeout.as_secs() < MIN_IDLE_TIMEOUT_SECS {
                return Err(ConfigError::TimeoutTooShort {
                    flag,
                    seconds: timeout.as_secs(),
                });
            }
        }
        if let Some(ephemeral) = ephemeral_port_range()
            && self.nat_ports.overlaps(ephemeral)
        {
            return Err(ConfigError::NatPortsOverlapEphemeral {
                nat: self.nat_ports,
                ephemeral,
            });
        }
        Ok(())
    }

    /// How often the NAT garbage collector runs: often enough that a freed port is reusable
    /// soon after its timeout.
    pub fn gc_interval(&self) -> Duration {
        let shortest = self.timeouts.other_idle.min(self.timeouts.tcp_closing);
        (shortest / 2).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }
}

/// An inclusive range of ports, written `MIN-MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (min, max) = s
            .split_once('-')
            .ok_or_else(|| format!("expected MIN-MAX, got {s:?}"))?;
        let parse = |part: &str| {
            part.trim()
                .parse::<u16>()
                .map_err(|e| format!("invalid port {part:?}: {e}"))
        };
        let range = PortRange {
            min: parse(min)?,
            max: parse(max)?,
        };
        if range.min == 0 || range.min > range.max {
            return Err(format!(
                "{s:?} is not a range of ports 1-65535 with MIN <= MAX"
            ));
        }
        Ok(range)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl PortRange {
    fn overlaps(self, other: PortRange) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

fn ephemeral_port_range() -> Option<PortRange> {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    Some(PortRange {
        min: parts.next()?.ok()?,
        max: parts.next()?.ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_parses_and_rejects() {
        assert_eq!(
            "1024-32767".parse(),
            Ok(PortRange {
                min: 1024,
                max: 32767
            })
        );
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("20-10".parse::<PortRange>().is_err());
        assert!("abc".parse::<PortRange>().is_err());
        assert!(
            "1024-70000"
                .parse::<PortRange>()
                .unwrap_err()
                .contains("70000")
        );
    }

    #[test]
    fn overlap() {
        let nat = PortRange {
            min: 1024,
            max: 32767,
        };
        assert!(!nat.overlaps(PortRange {
            min: 32768,
            max: 60999
        }));
        assert!(nat.overlaps(PortRange {
            min: 30000,
            max: 60999
        }));
    }
}
