//! The benchmarks of `cargo xtask bench`, run by the `egress-bench` binary: measurements of
//! the agent's pieces ([`measure`]: BPF cost, control plane, manifest latency; each in its own
//! process), real traffic through three paths of one namespace cluster, NAT under pressure,
//! the failover gap of the active gateway and the probe load on a gateway; then the report (`latest.json`, `latest.md`, `latest.svg`). See `bench/README.md`.

#![allow(
    unused_crate_dependencies,
    reason = "tokio serves the egress-load binary of the package"
)]

mod failover;
mod kernel_way;
pub mod measure;
mod program_stats;
pub mod report;
mod traffic;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use egress_tests::{
    binaries,
    cluster::{BPFFS_ROOT, ensure_bpffs_mounted},
    process::run_with_timeout,
};
use serde_json::{Value, json};

/// How much of everything to do.
#[derive(Clone, Debug)]
pub struct Params {
    pub quick: bool,
    /// Runs per figure (the report shows median, min and max).
    pub runs: usize,
    pub bpf_reps: u32,
    pub bpf_new_flows: u32,
    pub bpf_policy_entries: &'static str,
    pub bpf_nat_entries: &'static str,
    pub cp_pods: &'static str,
    pub cp_policies: &'static str,
    pub cp_max_evaluations: u64,
    /// Seconds per iperf3 measurement.
    pub iperf_seconds: u32,
    /// Milliseconds per request-response and connection-rate measurement.
    pub load_ms: u64,
    pub nat_pods: u32,
    pub nat_connections: u32,
    /// `--nat-port-range` of the gateway agent; `None` keeps the default 1024-32767.
    pub nat_port_range: Option<&'static str>,
    pub nat_connect_timeout_ms: u64,
    pub latency_changes: u32,
    /// Trials per fault type of the failover section.
    pub failover_trials: usize,
    /// Pairs of probe floods (answered, closed port) and their rate and length.
    pub probe_flood_runs: usize,
    pub probe_flood_rate: u32,
    pub probe_flood_seconds: f64,
}

impl Params {
    pub fn full() -> Self {
        Params {
            quick: false,
            runs: 5,
            bpf_reps: 1_000_000,
            bpf_new_flows: 10_000,
            bpf_policy_entries: "10,10000",
            bpf_nat_entries: "100,100000",
            cp_pods: "1000,10000,100000",
            cp_policies: "10,100,1000",
            cp_max_evaluations: 10_000_000,
            iperf_seconds: 3,
            load_ms: 2000,
            nat_pods: 4,
            nat_connections: 40_000,
            nat_port_range: None,
            nat_connect_timeout_ms: 3000,
            latency_changes: 100,
            failover_trials: 20,
            probe_flood_runs: 5,
            probe_flood_rate: 50_000,
            probe_flood_seconds: 4.0,
        }
    }

    /// A smoke run: every section, tiny counts. The NAT range shrinks to 100 ports so a few
    /// hundred connections still exhaust it.
    pub fn quick() -> Self {
        Params {
            quick: true,
            runs: 1,
            bpf_reps: 1000,
            bpf_new_flows: 100,
            bpf_policy_entries: "10",
            bpf_nat_entries: "100",
            cp_pods: "1000",
            cp_policies: "10",
            cp_max_evaluations: 10_000_000,
            iperf_seconds: 1,
            load_ms: 500,
            nat_pods: 2,
            nat_connections: 300,
            nat_port_range: Some("1024-1123"),
            nat_connect_timeout_ms: 1000,
            latency_changes: 5,
            failover_trials: 2,
            probe_flood_runs: 1,
            probe_flood_rate: 10_000,
            probe_flood_seconds: 1.0,
        }
    }
}

/// Binaries the benchmarks run.
pub struct Binaries {
    pub agent: PathBuf,
    /// `egress-bench` itself: its `measure` subcommands run each measurement in its own
    /// process.
    pub bench: PathBuf,
    pub load: PathBuf,
    pub peer: PathBuf,
}

impl Binaries {
    /// The harness's binaries (see [`egress_tests::binaries`]), this one, and `egress-load`
    /// beside it (`$EGRESS_LOAD_BIN` overrides).
    pub fn locate() -> Result<Self> {
        let bench = std::env::current_exe().context("locating egress-bench")?;
        let load = std::env::var_os("EGRESS_LOAD_BIN")
            .map_or_else(|| bench.with_file_name("egress-load"), PathBuf::from);
        binaries::ensure_built("egress-load", &load)?;
        Ok(Binaries {
            agent: binaries::require("egress-agent")?,
            bench,
            load,
            peer: binaries::require("egress-peer")?,
        })
    }
}

/// The sections of a run, in the order they run; `--only` picks some.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// BPF per-packet cost (BPF_PROG_TEST_RUN), including the health probe's answer.
    Datapath,
    /// Reconcile time and memory on synthetic inventories.
    ControlPlane,
    /// Traffic through three paths, NAT under pressure, manifest latency (one cluster).
    Cluster,
    /// Failover gap per fault type, and the probe load on a gateway (another cluster).
    Failover,
}

impl Section {
    pub const ALL: [Section; 4] = [
        Section::Datapath,
        Section::ControlPlane,
        Section::Cluster,
        Section::Failover,
    ];
}

/// Runs every section and returns the full results document.
pub fn run_all(params: &Params, bins: &Binaries) -> Result<Value> {
    run_sections(params, bins, &Section::ALL)
}

/// Runs `sections` and returns the results document; a section not run has no key in it
/// (and no part of the report).
pub fn run_sections(params: &Params, bins: &Binaries, sections: &[Section]) -> Result<Value> {
    let started = Instant::now();
    let mut doc = json!({
        "host": host_info(),
        "mode": if params.quick { "quick" } else { "full" },
        "runs": params.runs,
    });
    if sections.len() < Section::ALL.len() {
        doc["sections"] = json!(
            sections
                .iter()
                .filter_map(clap::ValueEnum::to_possible_value)
                .map(|value| value.get_name().to_owned())
                .collect::<Vec<_>>()
        );
    }
    if sections.contains(&Section::Datapath) {
        eprintln!("== BPF per-packet cost");
        doc["datapath"] = measure_json(
            &bins.bench,
            &[
                "measure",
                "datapath",
                "--reps",
                &params.bpf_reps.to_string(),
                "--runs",
                &params.runs.to_string(),
                "--new-flows",
                &params.bpf_new_flows.to_string(),
                "--policy-entries",
                params.bpf_policy_entries,
                "--nat-entries",
                params.bpf_nat_entries,
            ],
        )?;
    }
    if sections.contains(&Section::ControlPlane) {
        eprintln!("== control plane");
        ensure_bpffs_mounted()?;
        let bpffs = Path::new(BPFFS_ROOT).join(format!("egt{}-bench", std::process::id()));
        doc["control_plane"] = measure_json(
            &bins.bench,
            &[
                "measure",
                "control-plane",
                "--bpffs",
                &bpffs.to_string_lossy(),
                "--pods",
                params.cp_pods,
                "--policies",
                params.cp_policies,
                "--runs",
                &params.runs.to_string(),
                "--max-evaluations",
                &params.cp_max_evaluations.to_string(),
            ],
        )?;
    }
    if sections.contains(&Section::Cluster) {
        eprintln!("== traffic, NAT pressure and manifest latency in a namespace cluster");
        let cluster = traffic::run(params, bins)?;
        doc["traffic"] = cluster.traffic;
        doc["nat_pressure"] = cluster.nat_pressure;
        doc["manifest_latency"] = cluster.manifest_latency;
    }
    if sections.contains(&Section::Failover) {
        eprintln!("== failover of the active gateway, probe load, in a namespace cluster");
        doc["failover"] = failover::run(params, bins)?;
    }
    doc["elapsed_seconds"] = json!(started.elapsed().as_secs_f64());
    Ok(doc)
}

/// Runs `egress-bench <args>` (a `measure` subcommand) and parses the JSON it prints.
fn measure_json(bench: &Path, args: &[&str]) -> Result<Value> {
    let mut command = Command::new(bench);
    command.args(args);
    let output = run_with_timeout(command, std::time::Duration::from_hours(1))?;
    if !output.status.success() {
        bail!(
            "egress-bench {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("parsing the output of egress-bench {}", args.join(" ")))
}

/// Kernel, CPU model and core count: the report names the machine.
pub fn host_info() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    json!({ "kernel": kernel, "cpu": cpu, "cores": cores })
}
