//! `egress-agent run`: the reconcile loop. Manifests and the node's interfaces in, map
//! contents and TCX attachments out, by diff, whenever something changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitCode,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use egress_common::{
    config::{Config, DEFAULT_NAT_PORT_MAX, DEFAULT_NAT_PORT_MIN, DEFAULT_TUNNEL_PORT},
    map_names,
    policy::DEFAULT_POLICY_MAP_SIZE,
};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{
        Attachment, Datapath, Hook, MapContents, MapSizes, PinLayout, Timeouts, check_capacity,
        monotonic_now_ns,
    },
    desired::{self, DesiredState, LocalInterface, LocalNetwork, PolicyMapFit, PolicySummary},
    kubernetes, metrics,
    netlink::{self, Netlink},
    privileges,
    source::{self, Refusal, Snapshot},
};

pub const DEFAULT_TUNNEL_DEVICE: &str = "egw0";
/// How often the node's interfaces are looked at.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Even with no visible change, re-sync this often (mark and sweep of the maps).
const RESYNC_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct RunArgs {
    /// This node's Kubernetes name (as in the Node object).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Folder of manifests (`kubectl get -o yaml` output: Nodes, Namespaces, Pods,
    /// CiliumEgressGatewayPolicies), read recursively and watched for changes.
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
    /// Address of the Prometheus metrics, /healthz and /readyz endpoint.
    #[arg(long, default_value = "127.0.0.1:9964")]
    metrics_address: std::net::SocketAddr,
    #[command(flatten)]
    pins: crate::PinArgs,
    /// Name of the VXLAN device the agent creates (external mode).
    #[arg(long, default_value = DEFAULT_TUNNEL_DEVICE)]
    tunnel_device: String,
    /// UDP port of the tunnel; every node must use the same.
    #[arg(long, default_value_t = DEFAULT_TUNNEL_PORT)]
    tunnel_port: u16,
    /// Source ports the gateway translates to, MIN-MAX; must not overlap the node's
    /// ephemeral range (net.ipv4.ip_local_port_range).
    #[arg(long, default_value_t = PortRange { min: DEFAULT_NAT_PORT_MIN, max: DEFAULT_NAT_PORT_MAX })]
    nat_port_range: PortRange,
    /// Pod CIDR of the cluster, never steered to a gateway (repeatable). Nodes'
    /// `spec.podCIDRs` are used too; add this when the CNI does not fill them in.
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    cluster_cidrs: Vec<ipnet::Ipv4Net>,
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
    /// Seconds a TCP connection that saw a FIN or RST keeps its NAT entry.
    #[arg(long, default_value_t = 10)]
    tcp_closing_timeout: u64,
    /// Capacity of each NAT map (one entry per translated flow).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..))]
    nat_map_size: u32,
}

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

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl PortRange {
    fn overlaps(&self, other: &PortRange) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> anyhow::Result<ExitCode> {
    if let Some(dir) = &args.manifests {
        if !dir.is_dir() {
            bail!("--manifests {}: not a folder", dir.display());
        }
        privileges::check_private_dir(dir)?;
    }
    if let Some(ephemeral) = ephemeral_port_range()
        && args.nat_port_range.overlaps(&ephemeral)
    {
        bail!(
            "--nat-port-range {} overlaps this node's ephemeral ports {} \
             (net.ipv4.ip_local_port_range): translated flows could collide with the node's \
             own connections; pick a range outside it",
            args.nat_port_range,
            ephemeral
        );
    }
    // A bad kubeconfig is reported before anything is installed on the node.
    let inventory_source = match &args.manifests {
        Some(dir) => InventorySource::Manifests(dir.clone()),
        None => InventorySource::Kubernetes(kubernetes::client(args.kubeconfig.as_deref()).await?),
    };
    let netlink = Netlink::connect()?;
    let pins = PinLayout::new(&args.pins.bpffs);
    let mut datapath = Datapath::load(
        pins,
        MapSizes {
            policies: args.policy_map_size,
            nat: args.nat_map_size,
        },
    )
    .context("loading the datapath")?;
    let snapshot = netlink.snapshot().await?;
    let underlay_mtu = snapshot
        .default_route_ifindex()
        .and_then(|index| snapshot.link(index))
        .map_or(1500, |link| link.mtu);
    let tunnel_mtu = underlay_mtu.saturating_sub(netlink::TUNNEL_OVERHEAD);
    let tunnel_ifindex = netlink
        .ensure_tunnel(&args.tunnel_device, args.tunnel_port, tunnel_mtu)
        .await
        .context("creating the tunnel device")?;
    info!(
        node = args.node_name,
        tunnel = args.tunnel_device,
        port = args.tunnel_port,
        bpffs = %args.pins.bpffs.display(),
        "agent started"
    );

    let (report_sender, reports) = watch::channel(Arc::new(Report {
        node_name: args.node_name.clone(),
        ..Report::default()
    }));
    let mut snapshots = match inventory_source {
        InventorySource::Manifests(dir) => source::manifests(dir),
        InventorySource::Kubernetes(client) => {
            let source = kubernetes::source(client.clone());
            kubernetes::spawn_status_writer(client, source.policies, reports.clone());
            source.snapshots
        }
    };
    metrics::serve(
        args.metrics_address,
        reports.clone(),
        datapath.pins().clone(),
    )
    .await
    .with_context(|| format!("serving metrics on {}", args.metrics_address))?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    if args.kubernetes {
        // Programming from a partial list would delete the entries of pods not listed yet.
        info!("waiting for the initial list from the Kubernetes API");
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    bail!("the Kubernetes source stopped");
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            _ = terminate.recv() => return Ok(ExitCode::SUCCESS),
        }
    }
    let mut reconciler = Reconciler {
        args: &args,
        datapath: &mut datapath,
        tunnel_ifindex,
        // IPv4 and TCP headers without options: 40 bytes.
        tunnel_mss: tunnel_mtu.saturating_sub(40).min(u16::MAX as u32) as u16,
        report: report_sender,
        snapshot: Arc::clone(&snapshots.borrow_and_update()),
        last_refusals: Vec::new(),
        last_config: None,
        last_network: None,
        last_summary: String::new(),
        last_problems: BTreeMap::new(),
        last_unwired: BTreeSet::new(),
        node_missing: false,
        last_programmed: None,
        last_fit: PolicyMapFit::default(),
    };
    reconciler.log_refusals();
    match privileges::drop_capabilities() {
        Ok(kept) => info!(?kept, "dropped every other capability"),
        Err(error) => warn!(%error, "running with all capabilities"),
    }
    let timeouts = Timeouts {
        tcp_closing: Duration::from_secs(args.tcp_closing_timeout),
        tcp_idle: Duration::from_secs(args.tcp_idle_timeout),
        other_idle: Duration::from_secs(args.udp_idle_timeout),
    };
    // Often enough that a freed port is reusable soon after its timeout.
    let gc_interval =
        Duration::from_secs((args.udp_idle_timeout.min(args.tcp_closing_timeout) / 2).clamp(1, 10));
    let mut last_gc = Instant::now();
    let mut inventory_changed = true;
    let mut last_sync = Instant::now();
    loop {
        match netlink.snapshot().await {
            Ok(network) => {
                let network_changed = reconciler.last_network.as_ref() != Some(&network);
                if inventory_changed || network_changed || last_sync.elapsed() >= RESYNC_INTERVAL {
                    reconciler.reconcile(&network);
                    reconciler.last_network = Some(network);
                    inventory_changed = false;
                    last_sync = Instant::now();
                }
            }
            Err(error) => error!(%error, "cannot read the node's interfaces"),
        }
        if last_gc.elapsed() >= gc_interval {
            last_gc = Instant::now();
            match reconciler
                .datapath
                .collect_garbage(&timeouts, monotonic_now_ns())
            {
                Ok(stats) if stats.nat_expired + stats.flows_expired > 0 => {
                    debug!(
                        nat = stats.nat_expired,
                        flows = stats.flows_expired,
                        "expired entries"
                    );
                }
                Ok(_) => {}
                Err(error) => error!(%error, "expiring NAT entries failed"),
            }
        }
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    bail!("the inventory source stopped");
                }
                reconciler.snapshot = Arc::clone(&snapshots.borrow_and_update());
                reconciler.log_refusals();
                inventory_changed = true;
            }
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    info!("stopping; pinned state stays, so traffic keeps flowing until the next agent");
    Ok(ExitCode::SUCCESS)
}

/// Where the cluster state comes from.
enum InventorySource {
    Manifests(PathBuf),
    Kubernetes(kube::Client),
}

/// What the agent last did: read by metrics, readiness and the policy status writer.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub node_name: String,
    /// A reconcile has programmed the datapath at least once.
    pub synced: bool,
    pub policies: BTreeMap<String, PolicySummary>,
    pub refused: Vec<Refusal>,
    /// Entries wanted per map, by map name.
    pub map_entries: BTreeMap<&'static str, usize>,
    pub reconciles: u64,
    pub last_reconcile: Duration,
    /// Time from the source publishing a snapshot to the maps being written; set only by the
    /// reconcile that first programmed that snapshot (periodic re-syncs leave it `None`).
    pub last_event_to_programmed: Option<Duration>,
    /// The snapshot this report describes.
    pub snapshot: Arc<Snapshot>,
    /// Policy entries left out because the policy map is full (0 when everything fits).
    pub policy_entries_dropped: usize,
}

struct Reconciler<'a> {
    args: &'a RunArgs,
    datapath: &'a mut Datapath,
    tunnel_ifindex: u32,
    tunnel_mss: u16,
    report: watch::Sender<Arc<Report>>,
    snapshot: Arc<Snapshot>,
    last_refusals: Vec<Refusal>,
    last_config: Option<Config>,
    last_network: Option<netlink::Snapshot>,
    last_summary: String,
    /// This node was missing from the inventory at the last reconcile (logged once).
    node_missing: bool,
    /// Local pods without a host interface yet, as last logged.
    last_unwired: BTreeSet<Ipv4Addr>,
    /// Each policy's problem as last logged, so changes are logged once, not per reconcile.
    last_problems: BTreeMap<String, Option<String>>,
    /// `published` of the last snapshot programmed, to time each snapshot only once.
    last_programmed: Option<Instant>,
    last_fit: PolicyMapFit,
}

impl Reconciler<'_> {
    /// Logs refused objects once per change, not on every reload.
    fn log_refusals(&mut self) {
        if self.snapshot.refused != self.last_refusals {
            for refusal in &self.snapshot.refused {
                error!("{}", refusal.message);
            }
            self.last_refusals = self.snapshot.refused.clone();
        }
    }

    fn reconcile(&mut self, network: &netlink::Snapshot) {
        let started = Instant::now();
        let args = self.args;
        let inventory = &self.snapshot.inventory;
        let node_ip = inventory
            .nodes
            .get(&args.node_name)
            .and_then(|node| node.internal_ip);
        let Some(node_ip) = node_ip else {
            if !self.node_missing {
                warn!(
                    node = args.node_name,
                    "this node is not in the inventory (or has no InternalIP): the datapath \
                     keeps its last programming until it is"
                );
                self.node_missing = true;
            }
            return;
        };
        if std::mem::take(&mut self.node_missing) {
            info!(node = args.node_name, "this node is back in the inventory");
        }
        let config = Config {
            node_ip: node_ip.octets(),
            tunnel_ifindex: self.tunnel_ifindex,
            nat_port_min: args.nat_port_range.min,
            nat_port_max: args.nat_port_range.max,
            tunnel_mss: self.tunnel_mss,
            reserved: 0,
        };
        if self.last_config != Some(config) {
            if let Err(error) = self.datapath.write_config(config) {
                error!(%error, "cannot write the datapath config");
                return;
            }
            self.last_config = Some(config);
        }
        let local = local_network(network);
        let mut desired = desired::desired_state(inventory, &args.node_name, &local);
        self.log_problem_changes(&desired);
        let fit = desired.fit_policy_map(args.policy_map_size as usize);
        self.log_policy_map_fit(fit);
        let (contents, attachments) = self.plan(&desired, network);
        let unwired: BTreeSet<Ipv4Addr> = desired
            .local_pods
            .iter()
            .filter(|ip| !contents.local_pods.contains_key(ip))
            .copied()
            .collect();
        if unwired != self.last_unwired {
            for pod_ip in unwired.difference(&self.last_unwired) {
                warn!(%pod_ip, "no host interface routes to this local pod yet");
            }
            self.last_unwired = unwired;
        }
        check_capacity("policies", contents.policies.len(), args.policy_map_size);
        // Programs first, entries second: once `bpf egress list` shows a pod's entry, its
        // traffic is already steered (a pod may start sending the moment it sees that).
        let attach_errors = self.datapath.sync_attachments(&attachments);
        for error in &attach_errors {
            warn!(%error, "attachment failed");
        }
        let stats = match self.datapath.sync_maps(&contents) {
            Ok(stats) => stats,
            Err(error) => {
                error!(%error, "cannot program the maps");
                return;
            }
        };
        if !self.report.borrow().synced && attach_errors.is_empty() {
            self.datapath.retire_other_versions();
        }
        let map_entries = BTreeMap::from([
            (map_names::POLICIES, contents.policies.len()),
            (map_names::NODES, contents.nodes.len()),
            (map_names::LOCAL_PODS, contents.local_pods.len()),
            (map_names::EGRESS_IPS, contents.egress_ips.len()),
        ]);
        let published = self.snapshot.published;
        let newly_programmed = published.filter(|_| published != self.last_programmed);
        self.last_programmed = published;
        self.report.send_modify(|report| {
            let report = Arc::make_mut(report);
            report.synced = true;
            report.policies = desired.policies.clone();
            report.refused = self.snapshot.refused.clone();
            report.map_entries = map_entries;
            report.reconciles += 1;
            report.last_reconcile = started.elapsed();
            report.last_event_to_programmed = newly_programmed.map(|at| at.elapsed());
            report.snapshot = Arc::clone(&self.snapshot);
            report.policy_entries_dropped = fit.dropped;
        });
        let summary = format!(
            "{} policies, {} policy entries, {} local pods, {} egress IPs",
            self.snapshot.inventory.policies.len(),
            contents.policies.len(),
            contents.local_pods.len(),
            contents.egress_ips.len()
        );
        if stats.written + stats.deleted > 0 || summary != self.last_summary {
            info!(
                written = stats.written,
                deleted = stats.deleted,
                took_us = started.elapsed().as_micros() as u64,
                "datapath in sync: {summary}"
            );
            self.last_summary = summary;
        }
    }

    /// Logs when a policy starts or stops failing (matched traffic is dropped meanwhile).
    fn log_problem_changes(&mut self, desired: &DesiredState) {
        let problems: BTreeMap<String, Option<String>> = desired
            .policies
            .iter()
            .map(|(name, summary)| {
                (
                    name.clone(),
                    summary.problem.as_ref().map(ToString::to_string),
                )
            })
            .collect();
        for (name, problem) in &problems {
            if self.last_problems.get(name) == Some(problem) {
                continue;
            }
            match problem {
                Some(problem) => warn!(policy = name, "{problem}; its matched traffic is dropped"),
                None if self.last_problems.get(name).is_some_and(Option::is_some) => {
                    info!(policy = name, "served again")
                }
                None => {}
            }
        }
        self.last_problems = problems;
    }

    /// Logs a full policy map once per change, not on every reconcile.
    fn log_policy_map_fit(&mut self, fit: PolicyMapFit) {
        if fit == self.last_fit {
            return;
        }
        if fit.dropped > 0 {
            error!(
                wanted = fit.wanted,
                capacity = self.args.policy_map_size,
                dropped = fit.dropped,
                dropped_pods = fit.dropped_pods,
                "the policy map is full: {} policy entries of {} pods are not programmed and \
                 their traffic is not steered; raise --policy-map-size",
                fit.dropped,
                fit.dropped_pods
            );
        } else if self.last_fit.dropped > 0 {
            info!(
                entries = fit.wanted,
                "all policy entries fit in the policy map again"
            );
        }
        self.last_fit = fit;
    }

    /// Turns the desired state into map contents and attachments for this node.
    fn plan(
        &self,
        desired: &DesiredState,
        snapshot: &netlink::Snapshot,
    ) -> (MapContents, BTreeSet<Attachment>) {
        let mut contents = MapContents {
            policies: desired
                .policy_entries
                .iter()
                .map(|((pod, dest), value)| (desired::policy_map_key(*pod, *dest), *value))
                .collect(),
            nodes: desired.nodes.clone(),
            cluster_cidrs: desired
                .cluster_cidrs
                .iter()
                .chain(&self.args.cluster_cidrs)
                .copied()
                .collect(),
            egress_ips: desired.egress_ips.clone(),
            ..MapContents::default()
        };
        let mut attachments = BTreeSet::new();
        let mut attach = |ifindex: u32, hook: Hook| {
            if let Some(link) = snapshot.link(ifindex) {
                attachments.insert(Attachment {
                    ifname: link.name.clone(),
                    ifindex,
                    hook,
                });
            }
        };
        attach(self.tunnel_ifindex, Hook::FromTunnel);
        for pod_ip in &desired.local_pods {
            match snapshot.route_lookup(*pod_ip) {
                Some(ifindex) if !is_underlay(snapshot, ifindex) => {
                    contents.local_pods.insert(*pod_ip, ifindex);
                    attach(ifindex, Hook::FromPod);
                    attach(ifindex, Hook::ToPod);
                }
                // Logged by the caller once per change: the CNI may still be wiring the pod.
                _ => {}
            }
        }
        for ifindex in desired.egress_ips.values() {
            attach(*ifindex, Hook::FromEgress);
        }
        (contents, attachments)
    }
}

/// A route to a pod through the default-route interface means the pod is not really here
/// (a stale manifest): never attach pod programs to the node's uplink.
fn is_underlay(snapshot: &netlink::Snapshot, ifindex: u32) -> bool {
    snapshot.default_route_ifindex() == Some(ifindex)
}

fn local_network(snapshot: &netlink::Snapshot) -> LocalNetwork {
    LocalNetwork {
        interfaces: snapshot
            .links
            .iter()
            .map(|link| LocalInterface {
                name: link.name.clone(),
                ifindex: link.index,
                ipv4: link.ipv4.clone(),
                up: link.up,
            })
            .collect(),
        default_route_ifindex: snapshot.default_route_ifindex(),
    }
}

fn ephemeral_port_range() -> Option<PortRange> {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>());
    Some(PortRange {
        min: parts.next()?.ok()?,
        max: parts.next()?.ok()?,
    })
}

pub fn cleanup(bpffs: &Path, tunnel_device: &str) -> anyhow::Result<ExitCode> {
    PinLayout::new(bpffs)
        .remove_all()
        .with_context(|| format!("removing pins under {}", bpffs.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let netlink = Netlink::connect()?;
        let snapshot = netlink.snapshot().await?;
        if let Some(link) = snapshot
            .links
            .iter()
            .find(|link| link.name == tunnel_device)
        {
            if link.kind.as_deref() == Some("vxlan") {
                netlink.delete_link(link.index).await?;
            }
        }
        anyhow::Ok(())
    })?;
    println!(
        "removed pins under {} and tunnel device {tunnel_device}",
        bpffs.display()
    );
    Ok(ExitCode::SUCCESS)
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
        assert!(!nat.overlaps(&PortRange {
            min: 32768,
            max: 60999
        }));
        assert!(nat.overlaps(&PortRange {
            min: 30000,
            max: 60999
        }));
    }
}
