//! `egress-agent run` and `cleanup`: start-up (what is installed on the node, in which order),
//! then the event loop that reconciles on every change and expires NAT entries.

use std::{
    path::Path,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};
use tracing::{debug, error, info, warn};

use crate::{
    chain::Chain,
    config::{AgentConfig, SourceConfig},
    datapath::{Datapath, PinLayout, monotonic_now_ns},
    health::{self, HealthMetrics, HealthView, Targets},
    metrics,
    netlink::{self, Netlink},
    privileges,
    reconcile::Reconciler,
    report::Report,
    source::{self, Snapshot, kubernetes},
    status::{lease, writer},
};

/// How often the node's interfaces are looked at.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Even with no visible change, re-sync this often (mark and sweep of the maps).
const RESYNC_INTERVAL: Duration = Duration::from_secs(10);

pub fn run(config: &AgentConfig) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run_async(config))
}

/// The source of cluster state, connected.
enum Connected {
    Manifests(std::path::PathBuf),
    /// The client, and the namespace of the status writer's Lease.
    Kubernetes(kube::Client, String),
}

/// What start-up leaves running for the event loop.
struct Started {
    netlink: Netlink,
    datapath: Datapath,
    tunnel_ifindex: u32,
    tunnel_mtu: u32,
    report: watch::Sender<Arc<Report>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    terminate: Signal,
    /// Whom the gateway prober probes, set by each reconcile.
    probe_targets: Arc<Mutex<Targets>>,
}

async fn run_async(config: &AgentConfig) -> anyhow::Result<ExitCode> {
    config.validate()?;
    let Some(mut started) = start(config).await? else {
        return Ok(ExitCode::SUCCESS);
    };
    let mut reconciler = Reconciler::new(
        config,
        started.tunnel_ifindex,
        started.tunnel_mtu,
        started.report.clone(),
        Arc::clone(&started.snapshots.borrow_and_update()),
        Arc::clone(&started.probe_targets),
    );
    match privileges::drop_capabilities() {
        Ok(kept) => info!(?kept, "dropped every other capability"),
        Err(error) => warn!(error = %Chain(&error), "running with all capabilities"),
    }
    event_loop(config, &mut started, &mut reconciler).await?;
    info!("stopping; pinned state stays, so traffic keeps flowing until the next agent");
    Ok(ExitCode::SUCCESS)
}

/// Connects to the source, loads the datapath, creates the tunnel, serves metrics; returns
/// `None` when stopped by a signal before the first full view of the cluster.
async fn start(config: &AgentConfig) -> anyhow::Result<Option<Started>> {
    // A bad kubeconfig is reported before anything is installed on the node.
    let source = match &config.source {
        SourceConfig::Manifests(dir) => Connected::Manifests(dir.clone()),
        SourceConfig::Kubernetes {
            kubeconfig,
            lease_namespace,
        } => Connected::Kubernetes(
            kubernetes::client(kubeconfig.as_deref()).await?,
            lease_namespace.clone(),
        ),
    };
    let netlink = Netlink::connect()?;
    let datapath = Datapath::load(PinLayout::new(&config.bpffs), config.map_sizes)
        .context("loading the datapath")?;
    let network = netlink.snapshot().await?;
    let underlay_mtu = network
        .default_route_ifindex()
        .and_then(|index| network.link(index))
        .map_or(1500, |link| link.mtu);
    let tunnel_mtu = underlay_mtu.saturating_sub(netlink::TUNNEL_OVERHEAD);
    let tunnel_ifindex = netlink
        .ensure_tunnel(&config.tunnel_device, config.tunnel_port, tunnel_mtu)
        .await
        .context("creating the tunnel device")?;
    info!(
        node = config.node_name,
        tunnel = config.tunnel_device,
        port = config.tunnel_port,
        bpffs = %config.bpffs.display(),
        "agent started"
    );

    let (report, reports) = watch::channel(Arc::new(Report {
        node_name: config.node_name.clone(),
        ..Report::default()
    }));
    let (health_view, health_views) = watch::channel(HealthView::default());
    let mut snapshots = match source {
        Connected::Manifests(dir) => source::manifests::watch(dir),
        Connected::Kubernetes(client, lease_namespace) => {
            let source = kubernetes::source(client.clone());
            let election =
                lease::spawn_election(client.clone(), lease_namespace, config.node_name.clone());
            writer::spawn_status_writer(
                client,
                source.policies,
                reports.clone(),
                election,
                health_views,
            );
            source.snapshots
        }
    };
    let health_metrics = HealthMetrics::default();
    metrics::serve(
        config.metrics_address,
        reports,
        datapath.pins().clone(),
        health_metrics.clone(),
    )
    .await
    .with_context(|| format!("serving metrics on {}", config.metrics_address))?;
    let probe_targets = Arc::new(Mutex::new(Targets::default()));
    health::spawn_prober(
        datapath.pins().clone(),
        config.tunnel_port,
        config.probes,
        Arc::clone(&probe_targets),
        health_metrics,
        health_view,
    );
    let mut terminate = signal(SignalKind::terminate())?;
    if matches!(config.source, SourceConfig::Kubernetes { .. }) {
        // Programming from a partial list would delete the entries of pods not listed yet.
        info!("waiting for the initial list from the Kubernetes API");
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    bail!("the Kubernetes source stopped");
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(None),
            _ = terminate.recv() => return Ok(None),
        }
    }
    Ok(Some(Started {
        netlink,
        datapath,
        tunnel_ifindex,
        tunnel_mtu,
        report,
        snapshots,
        terminate,
        probe_targets,
    }))
}

/// Reconciles on every new snapshot, every change of the node's interfaces and every
/// [`RESYNC_INTERVAL`]; expires NAT entries; returns on SIGINT or SIGTERM.
async fn event_loop(
    config: &AgentConfig,
    started: &mut Started,
    reconciler: &mut Reconciler<'_>,
) -> anyhow::Result<()> {
    let gc_interval = config.gc_interval();
    // The first pass runs at once: it also counts the entries a restart kept.
    let mut last_gc: Option<Instant> = None;
    let mut inventory_changed = true;
    let mut last_sync = Instant::now();
    loop {
        match started.netlink.snapshot().await {
            Ok(network) => {
                if inventory_changed
                    || reconciler.network_changed(&network)
                    || last_sync.elapsed() >= RESYNC_INTERVAL
                {
                    reconciler.reconcile(&mut started.datapath, network);
                    inventory_changed = false;
                    last_sync = Instant::now();
                }
            }
            Err(error) => error!(error = %Chain(&error), "cannot read the node's interfaces"),
        }
        if last_gc.is_none_or(|at| at.elapsed() >= gc_interval) {
            last_gc = Some(Instant::now());
            match started
                .datapath
                .collect_garbage(&config.timeouts, monotonic_now_ns())
            {
                Ok(stats) => {
                    if stats.nat_expired + stats.flows_expired > 0 {
                        debug!(
                            nat = stats.nat_expired,
                            flows = stats.flows_expired,
                            "expired entries"
                        );
                    }
                    started.report.send_modify(|report| {
                        Arc::make_mut(report).flow_entries = stats.entries;
                    });
                }
                Err(error) => error!(error = %Chain(&error), "expiring NAT entries failed"),
            }
        }
        tokio::select! {
            changed = started.snapshots.changed() => {
                if changed.is_err() {
                    bail!("the inventory source stopped");
                }
                reconciler.set_snapshot(Arc::clone(&started.snapshots.borrow_and_update()));
                inventory_changed = true;
            }
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = started.terminate.recv() => return Ok(()),
        }
    }
}

/// `egress-agent cleanup`: removes the pins (maps and TCX links) and the tunnel device.
pub fn cleanup(bpffs: &Path, tunnel_device: &str) -> anyhow::Result<ExitCode> {
    PinLayout::new(bpffs)
        .remove_all()
        .with_context(|| format!("removing pins under {}", bpffs.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let netlink = Netlink::connect()?;
        let network = netlink.snapshot().await?;
        if let Some(link) = network.links.iter().find(|link| link.name == tunnel_device)
            && link.kind.as_deref() == Some("vxlan")
        {
            netlink.delete_link(link.index).await?;
        }
        anyhow::Ok(())
    })?;
    println!(
        "removed pins under {} and tunnel device {tunnel_device}",
        bpffs.display()
    );
    Ok(ExitCode::SUCCESS)
}
