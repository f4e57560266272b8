//! Control-plane scale on synthetic inventories: what one reconcile of the agent costs
//! (desired state from the inventory, then the kernel maps synced by diff), and the peak
//! memory of doing it, for pods x policies combinations.
//!
//! The synthetic cluster: 100 nodes, 10 namespaces; pod i is labelled `app=app-(i mod P)`,
//! so each of the P policies selects N/P pods and every pod gets one entry (one destination
//! CIDR per policy). Policies alternate between two gateway nodes, so relabelling a pod
//! really changes its entry. The measuring node is the first gateway.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use egress_agent::datapath::{Datapath, MapContents, MapSizes, PinLayout};
use egress_control::{
    desired::{self, DesiredState, LocalInterface, LocalNetwork},
    inventory::{Inventory, Namespace, Node, Pod, policy},
};
use serde::{Deserialize, Serialize};

use super::stats::{Summary, peak_rss_bytes};

const NODES: u32 = 100;
const NAMESPACES: u32 = 10;
const LOCAL_NODE: &str = "node-000";

#[derive(Debug, clap::Args)]
pub(super) struct ControlPlaneArgs {
    /// Empty folder on a bpffs for the maps the measurement writes (removed afterwards).
    #[arg(long)]
    bpffs: PathBuf,
    /// Pod counts.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000u32, 10_000, 100_000])]
    pods: Vec<u32>,
    /// Policy counts.
    #[arg(long, value_delimiter = ',', default_values_t = [10u32, 100, 1_000])]
    policies: Vec<u32>,
    /// Runs per figure.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Skip combinations with more than this many pod-policy selector evaluations per
    /// reconcile (pods x policies): on a small machine they take minutes.
    #[arg(long, default_value_t = 10_000_000)]
    max_evaluations: u64,
}

#[derive(Debug, clap::Args)]
pub(super) struct OneArgs {
    #[arg(long)]
    bpffs: PathBuf,
    #[arg(long)]
    pods: u32,
    #[arg(long)]
    policies: u32,
    #[arg(long)]
    runs: usize,
}

#[derive(Debug, Serialize)]
pub(super) struct ControlPlaneReport {
    pub runs: usize,
    pub results: Vec<ComboResult>,
    /// Combinations not measured, with the reason.
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Serialize)]
pub(super) struct Skipped {
    pub pods: u32,
    pub policies: u32,
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ComboResult {
    pub pods: u32,
    pub policies: u32,
    pub policy_entries: usize,
    /// Desired state + first sync into empty maps (the agent's start).
    pub full_reconcile_ms: SummaryJson,
    /// Desired state + sync when nothing changed (the periodic resync).
    pub resync_ms: SummaryJson,
    /// One pod added, then reconciled (one entry written).
    pub pod_added_ms: SummaryJson,
    /// One pod's label changed so another policy (gateway) selects it.
    pub label_changed_ms: SummaryJson,
    /// Of the above, the desired-state computation alone (median of the full reconciles).
    pub desired_state_ms: SummaryJson,
    /// Peak resident memory of the measuring process (`VmHWM`).
    pub peak_rss_mib: f64,
}

/// `Summary` as it crosses the process boundary.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SummaryJson {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

impl From<Summary> for SummaryJson {
    fn from(s: Summary) -> Self {
        SummaryJson {
            median: s.median,
            min: s.min,
            max: s.max,
            runs: s.runs,
        }
    }
}

pub(super) fn run(args: &ControlPlaneArgs) -> anyhow::Result<ControlPlaneReport> {
    super::ensure_root()?;
    let exe = std::env::current_exe().context("locating egress-bench")?;
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for &pods in &args.pods {
        for &policies in &args.policies {
            let evaluations = u64::from(pods) * u64::from(policies);
            if evaluations > args.max_evaluations {
                skipped.push(Skipped {
                    pods,
                    policies,
                    reason: format!(
                        "{evaluations} selector evaluations per reconcile, over the limit of \
                         {} for this run (too slow on this machine for {} runs)",
                        args.max_evaluations, args.runs
                    ),
                });
                continue;
            }
            eprintln!("control plane: {pods} pods x {policies} policies");
            let output = Command::new(&exe)
                .args(["measure", "control-plane-one", "--bpffs"])
                .arg(args.bpffs.join(format!("{pods}x{policies}")))
                .args([
                    "--pods",
                    &pods.to_string(),
                    "--policies",
                    &policies.to_string(),
                ])
                .args(["--runs", &args.runs.to_string()])
                .output()
                .context("running control-plane-one")?;
            anyhow::ensure!(
                output.status.success(),
                "{pods} pods x {policies} policies failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            results.push(serde_json::from_slice(&output.stdout)?);
        }
    }
    // Each combination removed its own folder; this removes the now empty parent.
    let _ = std::fs::remove_dir(&args.bpffs);
    Ok(ControlPlaneReport {
        runs: args.runs,
        results,
        skipped,
    })
}

pub(super) fn run_one(args: &OneArgs) -> anyhow::Result<ComboResult> {
    super::ensure_root()?;
    anyhow::ensure!(
        args.runs > 0 && args.policies > 0,
        "--runs and --policies must be positive"
    );
    let mut inventory = synthetic_inventory(args.pods, args.policies)?;
    let local = local_network();
    let pins = PinLayout::new(&args.bpffs);
    let result = measure(args, &mut inventory, &local, &pins);
    let removed = pins.remove_all();
    let result = result?;
    removed.context("removing the benchmark's pinned maps")?;
    Ok(result)
}

fn measure(
    args: &OneArgs,
    inventory: &mut Inventory,
    local: &LocalNetwork,
    pins: &PinLayout,
) -> anyhow::Result<ComboResult> {
    let mut datapath = Datapath::load(
        pins.clone(),
        MapSizes {
            policies: (args.pods + 1024).max(16_384),
            nat: 1024,
            flows: 1024,
            nodes: 16_384,
            cluster: (args.pods + 16_384).max(65_536),
            local_pods: 4096,
            egress_ips: 1024,
        },
    )?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut full = Vec::new();
    let mut desired_only = Vec::new();
    let mut resync = Vec::new();
    let mut entries = 0;
    for _ in 0..args.runs {
        datapath.sync_maps(&MapContents::default()).into_result()?;
        let started = Instant::now();
        let wanted = desired::desired_state(inventory, LOCAL_NODE, local);
        desired_only.push(ms(started.elapsed()));
        let contents = map_contents(&wanted);
        datapath.sync_maps(&contents).into_result()?;
        full.push(ms(started.elapsed()));
        entries = contents.policies.len();

        let started = Instant::now();
        let stats = datapath
            .sync_maps(&map_contents(&desired::desired_state(
                inventory, LOCAL_NODE, local,
            )))
            .into_result()?;
        resync.push(ms(started.elapsed()));
        anyhow::ensure!(
            stats.written + stats.deleted == 0,
            "resync changed {stats:?}"
        );
    }

    let mut pod_added = Vec::new();
    let mut label_changed = Vec::new();
    for run in 0..args.runs as u32 {
        let pod = synthetic_pod(args.pods + run, args.policies);
        inventory.upsert_pod(pod);
        let started = Instant::now();
        let stats = datapath
            .sync_maps(&map_contents(&desired::desired_state(
                inventory, LOCAL_NODE, local,
            )))
            .into_result()?;
        pod_added.push(ms(started.elapsed()));
        anyhow::ensure!(stats.written == 1, "adding a pod wrote {stats:?}");

        // Pod `run` moves to the next policy, whose gateway is the other node.
        let key = (namespace_of(run), format!("pod-{run}"));
        let pod = inventory
            .pods
            .get_mut(&key)
            .context("synthetic pod missing")?;
        let next = (run + 1) % args.policies;
        pod.labels.insert("app".into(), format!("app-{next}"));
        let started = Instant::now();
        let stats = datapath
            .sync_maps(&map_contents(&desired::desired_state(
                inventory, LOCAL_NODE, local,
            )))
            .into_result()?;
        label_changed.push(ms(started.elapsed()));
        if args.policies > 1 {
            anyhow::ensure!(stats.written >= 1, "changing a label wrote {stats:?}");
        }
    }

    let summary = |runs: Vec<f64>| SummaryJson::from(Summary::of(runs).expect("runs > 0"));
    Ok(ComboResult {
        pods: args.pods,
        policies: args.policies,
        policy_entries: entries,
        full_reconcile_ms: summary(full),
        resync_ms: summary(resync),
        pod_added_ms: summary(pod_added),
        label_changed_ms: summary(label_changed),
        desired_state_ms: summary(desired_only),
        peak_rss_mib: peak_rss_bytes().unwrap_or(0) as f64 / (1024.0 * 1024.0),
    })
}

/// The policy-map part of the agent's plan, plus nodes and egress IPs (no interfaces here,
/// so no local pods to attach to).
fn map_contents(state: &DesiredState) -> MapContents {
    MapContents {
        policies: state
            .policy_entries
            .iter()
            .map(|((pod, dest), value)| (desired::policy_map_key(*pod, *dest), *value))
            .collect(),
        nodes: state.nodes.clone(),
        egress_ips: state.egress_ips.clone(),
        ..MapContents::default()
    }
}

fn node_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, (i >> 8) as u8, 10 + i as u8)
}

fn namespace_of(i: u32) -> String {
    format!("ns-{}", i % NAMESPACES)
}

fn synthetic_pod(i: u32, policies: u32) -> Pod {
    Pod {
        namespace: namespace_of(i),
        name: format!("pod-{i}"),
        labels: BTreeMap::from([
            ("app".to_owned(), format!("app-{}", i % policies)),
            ("tier".to_owned(), "web".to_owned()),
        ]),
        node_name: Some(format!("node-{:03}", i % NODES)),
        ips: vec![Ipv4Addr::from(0x0a80_0000 + i)],
        service_account: "default".to_owned(),
    }
}

fn synthetic_inventory(pods: u32, policies: u32) -> anyhow::Result<Inventory> {
    let mut inventory = Inventory::default();
    for i in 0..NODES {
        let mut labels = BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())]);
        if i < 2 {
            labels.insert("egress-gateway".into(), format!("g{i}"));
        }
        inventory.upsert_node(Node {
            name: format!("node-{i:03}"),
            labels,
            internal_ip: Some(node_ip(i)),
            pod_cidrs: vec![ipnet::Ipv4Net::new(
                Ipv4Addr::new(10, 192 + (i >> 8) as u8, i as u8, 0),
                24,
            )?],
            unschedulable: false,
        });
    }
    for i in 0..NAMESPACES {
        inventory.upsert_namespace(Namespace {
            name: format!("ns-{i}"),
            labels: BTreeMap::new(),
        });
    }
    for i in 0..pods {
        inventory.upsert_pod(synthetic_pod(i, policies));
    }
    for j in 0..policies {
        let yaml = format!(
            "metadata: {{name: policy-{j:04}}}\n\
             spec:\n  \
               selectors:\n  - podSelector: {{matchLabels: {{app: app-{j}}}}}\n  \
               destinationCIDRs: [\"100.{}.{}.0/24\"]\n  \
               egressGateway:\n    nodeSelector: {{matchLabels: {{egress-gateway: g{}}}}}\n",
            64 + j / 256,
            j % 256,
            j % 2
        );
        let raw: policy::RawPolicy = serde_yaml::from_str(&yaml)?;
        let valid = policy::validate(&raw)
            .map_err(|errors| anyhow::anyhow!("synthetic policy {j} refused: {errors:?}"))?;
        inventory.upsert_policy(valid);
    }
    Ok(inventory)
}

/// The gateway node's interfaces: eth0 with its `InternalIP`, holding the default route.
fn local_network() -> LocalNetwork {
    LocalNetwork {
        interfaces: vec![LocalInterface {
            name: "eth0".into(),
            ifindex: 2,
            ipv4: vec![node_ip(0)],
            up: true,
        }],
        default_route_ifindex: Some(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pod_gets_one_entry_and_both_gateways_are_used() {
        let inventory = synthetic_inventory(200, 10).unwrap();
        let state = desired::desired_state(&inventory, LOCAL_NODE, &local_network());
        assert_eq!(state.policy_entries.len(), 200);
        let gateways: std::collections::BTreeSet<_> = state
            .policy_entries
            .values()
            .map(|v| v.gateway_ip)
            .collect();
        assert_eq!(gateways.len(), 2, "{gateways:?}");
        assert_eq!(state.egress_ips.len(), 1, "the local node is a gateway");
    }
}
