//! `egress-bench measure ...`: the measurements of the agent's pieces, each run in its own
//! process (peak memory is per process). Each prints one JSON document on stdout; the
//! benchmark run (`crate::run_all`) collects them with the traffic measurements.
//!
//! - `datapath`: per-packet cost of every verdict path through `BPF_PROG_TEST_RUN`.
//! - `control-plane`: reconcile time and peak memory on synthetic inventories.
//! - `manifest-latency`: manifest written to policy entry in the kernel, against a running
//!   agent.
//! - `probe-flood`: health probes sent to a gateway at a fixed rate, with the machine's busy
//!   CPU meanwhile (the failover section runs it inside a node's namespace).

mod control_plane;
mod datapath;
mod manifest_latency;
mod probe_flood;
pub mod stats;

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct MeasureArgs {
    #[command(subcommand)]
    command: Measure,
}

#[derive(Debug, Subcommand)]
enum Measure {
    /// Nanoseconds per packet of each program and verdict path (needs root).
    Datapath(datapath::DatapathArgs),
    /// Reconcile time and peak memory for pods x policies (needs root: writes real maps).
    ControlPlane(control_plane::ControlPlaneArgs),
    /// One pods x policies combination, measured in its own process (for its peak memory).
    #[command(hide = true)]
    ControlPlaneOne(control_plane::OneArgs),
    /// Delay from a manifest change to the policy entry in a running agent's pinned map.
    ManifestLatency(manifest_latency::LatencyArgs),
    /// Health probes to a gateway at a fixed rate; busy CPU of the machine meanwhile.
    #[command(hide = true)]
    ProbeFlood(probe_flood::FloodArgs),
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("BPF_PROG_TEST_RUN needs root (CAP_BPF and CAP_NET_ADMIN)")]
    NotRoot,
    #[error("{case}: expected verdict {expected}, the program returned {got}")]
    WrongVerdict {
        case: String,
        expected: u32,
        got: u32,
    },
    #[error("{case}: counter {reason} rose by {got}, expected {expected}: another path ran")]
    WrongPath {
        case: String,
        reason: &'static str,
        expected: u64,
        got: u64,
    },
}

pub fn run(args: MeasureArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Measure::Datapath(args) => print_json(&datapath::run(&args)?),
        Measure::ControlPlane(args) => print_json(&control_plane::run(&args)?),
        Measure::ControlPlaneOne(args) => print_json(&control_plane::run_one(&args)?),
        Measure::ManifestLatency(args) => print_json(&manifest_latency::run(&args)?),
        Measure::ProbeFlood(args) => print_json(&probe_flood::run(&args)?),
    }
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(ExitCode::SUCCESS)
}

fn ensure_root() -> Result<(), BenchError> {
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BenchError::NotRoot);
    }
    Ok(())
}
