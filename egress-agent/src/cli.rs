//! The command line: `egress-agent run|check|cleanup|bpf ...`, parsed with clap and handed to
//! the module that does the work.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use egress_common::{
    config::{DEFAULT_NAT_PORT_MAX, DEFAULT_NAT_PORT_MIN, DEFAULT_TUNNEL_PORT},
    policy::DEFAULT_POLICY_MAP_SIZE,
};
use tracing_subscriber::EnvFilter;

use crate::{
    config::{AgentConfig, PortRange, ProbeResponder, SourceConfig},
    datapath::{DEFAULT_BPFFS, MapSizes, Timeouts},
    health::ProbeSettings,
    inspect::{self, Output},
    run,
};

/// Name of the VXLAN device the agent creates.
pub const DEFAULT_TUNNEL_DEVICE: &str = "egw0";
/// Cilium's NAT map default (`bpf-nat-global-max`): concurrent flows of a busy gateway.
pub const DEFAULT_NAT_MAP_SIZE: u32 = 524_288;
/// Concurrent flows of one node's selected pods (Cilium's non-TCP conntrack default).
pub const DEFAULT_FLOW_MAP_SIZE: u32 = 262_144;
/// Nodes of the cluster: room for 5,000 and more.
pub const DEFAULT_NODE_MAP_SIZE: u32 = 16_384;
/// In-cluster addresses: a pod CIDR per node and an entry per pod IP (Cilium's ipcache holds
/// 512,000).
pub const DEFAULT_CLUSTER_MAP_SIZE: u32 = 524_288;
/// Pods on one node (kubelet's default is 110).
pub const DEFAULT_LOCAL_POD_MAP_SIZE: u32 = 4_096;
/// Egress IPs one gateway serves.
pub const DEFAULT_EGRESS_IP_MAP_SIZE: u32 = 1_024;

#[derive(Debug, Parser)]
#[command(
    name = "egress-agent",
    version,
    about = "eBPF egress gateway agent: sends selected pods' traffic out through a gateway \
             node with a fixed egress IP, as CiliumEgressGatewayPolicy objects describe"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent on this node.
    Run(Box<RunArgs>),
    /// Validate manifests without touching the kernel. Exits 1 when any object is refused,
    /// 3 when the policy entries they imply exceed --policy-map-size (even if some are
    /// refused too).
    Check {
        /// Folder of manifests (`kubectl get -o yaml` output), read recursively.
        #[arg(long)]
        manifests: PathBuf,
        /// Capacity of the policy map to check against (as given to `run`).
        #[arg(long, default_value_t = DEFAULT_POLICY_MAP_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
        policy_map_size: u32,
    },
    /// Remove everything the agent installed: TCX links, pinned maps, the tunnel device.
    Cleanup {
        #[command(flatten)]
        pins: PinArgs,
        /// Name of the agent's VXLAN device.
        #[arg(long, default_value = DEFAULT_TUNNEL_DEVICE)]
        tunnel_device: String,
    },
    /// Inspect the datapath's maps.
    Bpf {
        #[command(subcommand)]
        command: BpfCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BpfCommand {
    /// The egress policy map.
    Egress {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// The gateway's NAT entries.
    Nat {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Packet counters per verdict and drop reason.
    Counters {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum ListCommand {
    /// List the entries.
    List {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// This node's Kubernetes name (as in the Node object).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Folder of manifests (`kubectl get -o yaml` output: Nodes, Namespaces, Pods,
    /// `CiliumEgressGatewayPolicies`), read recursively and watched for changes.
    #[arg(
        long,
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    manifests: Option<PathBuf>,
    /// Watch the Kubernetes API instead of a manifests folder (in-cluster config, or
    /// --kubeconfig).
    #[arg(long)]
    kubernetes: bool,
    /// Kubeconfig file for --kubernetes outside a cluster.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the Lease that elects the agent writing the status of policies without
    /// a gateway node (the DaemonSet passes its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    lease_namespace: String,
    /// Address of the Prometheus metrics, /healthz and /readyz endpoint.
    #[arg(long, default_value = "127.0.0.1:9969")]
    metrics_address: std::net::SocketAddr,
    #[command(flatten)]
    pins: PinArgs,
    /// Name of the VXLAN device the agent creates (external mode).
    #[arg(long, default_value = DEFAULT_TUNNEL_DEVICE)]
    tunnel_device: String,
    /// UDP port of the tunnel; every node must use the same.
    #[arg(long, default_value_t = DEFAULT_TUNNEL_PORT)]
    tunnel_port: u16,
    /// Source ports the gateway translates to, MIN-MAX; must not overlap the node's
    /// ephemeral range (`net.ipv4.ip_local_port_range`).
    #[arg(long, default_value_t = PortRange { min: DEFAULT_NAT_PORT_MIN, max: DEFAULT_NAT_PORT_MAX })]
    nat_port_range: PortRange,
    /// Pod CIDR of the cluster, never steered to a gateway (repeatable). Nodes'
    /// `spec.podCIDRs` and every pod IP are used too; add this when the CNI does not fill
    /// podCIDRs in.
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    cluster_cidrs: Vec<ipnet::Ipv4Net>,
    /// Service CIDR of the cluster (kube-apiserver's --service-cluster-ip-range), never
    /// steered (repeatable): TC runs before kube-proxy's DNAT, so a ClusterIP (DNS first of
    /// all) must be recognised as in-cluster.
    #[arg(long = "service-cidr", value_name = "CIDR")]
    service_cidrs: Vec<ipnet::Ipv4Net>,
    /// Capacity of the policy map (entries = pods x CIDRs). When more are wanted, whole pods
    /// are left out in a fixed order (see README, Reliability) and an error is logged.
    #[arg(long, default_value_t = DEFAULT_POLICY_MAP_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    policy_map_size: u32,
    /// Seconds a UDP or ICMP flow may stay idle before its NAT entry and port are freed.
    #[arg(long, default_value_t = 60)]
    udp_idle_timeout: u64,
    /// Seconds an established TCP connection may stay idle before its NAT entry is freed.
    #[arg(long, default_value_t = 6 * 3600)]
    tcp_idle_timeout: u64,
    /// Seconds a TCP connection closed by both sides' FINs, or an RST from either, keeps
    /// its NAT entry.
    #[arg(long, default_value_t = 10)]
    tcp_closing_timeout: u64,
    /// Seconds a TCP connection one side half-closed (sent a FIN) may stay idle: the other
    /// side may still be sending.
    #[arg(long, default_value_t = 120)]
    tcp_half_closed_timeout: u64,
    /// Capacity of each NAT map (one entry per flow translated on this gateway; Cilium's
    /// default). When full, new flows are dropped (`drop_flow_table_full`), never evicted.
    #[arg(long, default_value_t = DEFAULT_NAT_MAP_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    nat_map_size: u32,
    /// Capacity of each flow-tracking map (one entry per flow of this node's selected pods).
    /// When full, new matched flows are dropped (`drop_flow_table_full`), never evicted.
    #[arg(long, default_value_t = DEFAULT_FLOW_MAP_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    flow_map_size: u32,
    /// Capacity of the node map (every node of the cluster, by InternalIP).
    #[arg(long, default_value_t = DEFAULT_NODE_MAP_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    node_map_size: u32,
    /// Capacity of the in-cluster map: nodes' pod CIDRs, every pod IP, --cluster-cidr and
    /// --service-cidr (destinations never steered).
    #[arg(long, default_value_t = DEFAULT_CLUSTER_MAP_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    cluster_map_size: u32,
    /// Capacity of the map of this node's pods.
    #[arg(long, default_value_t = DEFAULT_LOCAL_POD_MAP_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    local_pod_map_size: u32,
    /// Capacity of the map of egress IPs this node serves.
    #[arg(long, default_value_t = DEFAULT_EGRESS_IP_MAP_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    egress_ip_map_size: u32,
    /// Milliseconds between two health probes to each candidate gateway of this node's pods
    /// (BFD-style, answered by the gateway's datapath).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    probe_interval_ms: u64,
    /// Unanswered probes in a row after which a gateway is down and its flows move to the
    /// next candidate: detection takes about interval x multiplier.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    probe_multiplier: u32,
    /// Milliseconds between two probes to a gateway that is quiet: the replies to this
    /// node's pods' traffic show it alive, or no traffic goes to it (BFD's demand mode).
    /// Traffic that stops getting replies counts as a lost probe and brings back a probe
    /// every --probe-interval-ms at once. At most --probe-interval-ms: probe every interval.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    probe_quiet_interval_ms: u64,
    /// What answers health probes on a gateway candidate: `tc`, the tunnel's TC program, or
    /// `xdp`, also an XDP program on the underlay interface, before decapsulation (driver
    /// mode; cheaper per probe, for many probing nodes; it takes the interface's XDP hook,
    /// and attaching XDP briefly resets some NICs).
    #[arg(long, value_enum, default_value_t = ProbeResponder::Tc)]
    probe_responder: ProbeResponder,
}

impl RunArgs {
    /// The configuration these flags describe (validated further by [`AgentConfig::validate`]).
    fn into_config(self) -> AgentConfig {
        AgentConfig {
            node_name: self.node_name,
            source: match self.manifests {
                Some(dir) => SourceConfig::Manifests(dir),
                None => SourceConfig::Kubernetes {
                    kubeconfig: self.kubeconfig,
                    lease_namespace: self.lease_namespace,
                },
            },
            metrics_address: self.metrics_address,
            bpffs: self.pins.bpffs,
            tunnel_device: self.tunnel_device,
            tunnel_port: self.tunnel_port,
            nat_ports: self.nat_port_range,
            cluster_cidrs: self
                .cluster_cidrs
                .into_iter()
                .chain(self.service_cidrs)
                .collect(),
            map_sizes: MapSizes {
                policies: self.policy_map_size,
                nat: self.nat_map_size,
                flows: self.flow_map_size,
                nodes: self.node_map_size,
                cluster: self.cluster_map_size,
                local_pods: self.local_pod_map_size,
                egress_ips: self.egress_ip_map_size,
            },
            probes: ProbeSettings {
                interval: Duration::from_millis(self.probe_interval_ms),
                multiplier: self.probe_multiplier,
                quiet_interval: Duration::from_millis(self.probe_quiet_interval_ms),
            },
            probe_responder: self.probe_responder,
            timeouts: Timeouts {
                tcp_closing: Duration::from_secs(self.tcp_closing_timeout),
                tcp_half_closed: Duration::from_secs(self.tcp_half_closed_timeout),
                tcp_idle: Duration::from_secs(self.tcp_idle_timeout),
                other_idle: Duration::from_secs(self.udp_idle_timeout),
            },
        }
    }
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// Folder on bpffs holding this agent's pinned maps and links (mounted if needed).
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// Parses the command line, runs the command and turns its result into the exit code.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(&args.into_config()),
        Command::Check {
            manifests,
            policy_map_size,
        } => inspect::check(&manifests, policy_map_size),
        Command::Cleanup {
            pins,
            tunnel_device,
        } => run::cleanup(&pins.bpffs, &tunnel_device),
        Command::Bpf { command } => match command {
            BpfCommand::Egress {
                command: ListCommand::List { pins, output },
            } => inspect::egress_list(&pins.bpffs, output),
            BpfCommand::Nat {
                command: ListCommand::List { pins, output },
            } => inspect::nat_list(&pins.bpffs, output),
            BpfCommand::Counters { pins, output } => inspect::counters(&pins.bpffs, output),
        },
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            // Every error keeps its cause in `source()`: `{:#}` prints the chain, each once.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
