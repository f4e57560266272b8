//! End-to-end delay from a manifest change to the datapath programmed: against a running
//! agent, rewrite one policy's destination and poll the agent's pinned policy map until the
//! new entry is there. This is what a user waits for, including the source's change
//! detection, the reconcile and the map write.

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::lpm_trie::Key;
use egress_agent::datapath::{PinLayout, pinned};
use egress_common::policy::{POLICY_LOOKUP_PREFIX, PolicyKey};
use serde::Serialize;

use super::stats::{Summary, quantile};

/// How often the pinned map is looked at.
const POLL: Duration = Duration::from_millis(1);
/// Pause between changes, so they do not fall in step with the source's own polling.
const PAUSE: Duration = Duration::from_millis(37);

#[derive(Debug, clap::Args)]
pub(super) struct LatencyArgs {
    /// The running agent's bpffs folder.
    #[arg(long)]
    bpffs: PathBuf,
    /// The manifests folder the agent watches.
    #[arg(long)]
    manifests: PathBuf,
    /// IP of a pod the policy selects (through --pod-label).
    #[arg(long)]
    pod_ip: Ipv4Addr,
    /// Label KEY=VALUE selecting that pod.
    #[arg(long)]
    pod_label: String,
    /// Label KEY=VALUE of the gateway node.
    #[arg(long)]
    gateway_label: String,
    #[arg(long, default_value_t = 100)]
    changes: u32,
    /// Give up on one change after this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct LatencyReport {
    pub changes: u32,
    pub timed_out: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub ms: Summary,
}

pub(super) fn run(args: &LatencyArgs) -> anyhow::Result<LatencyReport> {
    super::ensure_root()?;
    let split = |label: &str| {
        label
            .split_once('=')
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .with_context(|| format!("expected KEY=VALUE, got {label:?}"))
    };
    let (pod_key, pod_value) = split(&args.pod_label)?;
    let (gw_key, gw_value) = split(&args.gateway_label)?;
    let pins = PinLayout::new(&args.bpffs);
    let trie = pinned::policy_trie(&pins)
        .with_context(|| format!("opening the policy map under {}", args.bpffs.display()))?;
    let target = args.manifests.join("bench-latency-policy.yaml");
    let staged = args.manifests.join("bench-latency-policy.yaml.tmp");
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut samples = Vec::new();
    let mut timed_out = 0;
    for change in 0..args.changes {
        // A destination no earlier change used: 203.0.113.1 .. .250, then 198.18.x.y.
        let dest = if change < 250 {
            Ipv4Addr::new(203, 0, 113, 1 + change as u8)
        } else {
            Ipv4Addr::new(198, 18, (change >> 8) as u8, change as u8)
        };
        let yaml = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\n\
             metadata: {{name: bench-latency}}\n\
             spec:\n  selectors:\n  - podSelector: {{matchLabels: {{{pod_key}: \"{pod_value}\"}}}}\n  \
             destinationCIDRs: [\"{dest}/32\"]\n  \
             egressGateway:\n    nodeSelector: {{matchLabels: {{{gw_key}: \"{gw_value}\"}}}}\n"
        );
        fs::write(&staged, yaml).with_context(|| format!("writing {}", staged.display()))?;
        let key = Key::new(
            POLICY_LOOKUP_PREFIX,
            PolicyKey {
                source_ip: args.pod_ip.octets(),
                dest_ip: dest.octets(),
            },
        );
        fs::rename(&staged, &target).with_context(|| format!("writing {}", target.display()))?;
        let written = Instant::now();
        loop {
            // The exact /32 entry: a lookup with the full prefix returns the longest match,
            // which is this one as soon as it exists.
            if trie.get(&key, 0).is_ok() {
                samples.push(written.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if written.elapsed() > timeout {
                timed_out += 1;
                break;
            }
            thread::sleep(POLL);
        }
        thread::sleep(PAUSE);
    }
    let _ = fs::remove_file(&target);
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let ms = Summary::of(samples).context("no change reached the datapath")?;
    Ok(LatencyReport {
        changes: args.changes,
        timed_out,
        p50_ms: quantile(&sorted, 0.5),
        p99_ms: quantile(&sorted, 0.99),
        max_ms: ms.max,
        ms,
    })
}
