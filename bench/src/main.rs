//! `egress-bench`: runs every benchmark of `cargo xtask bench` and writes the report
//! (`latest.json`, `latest.md`, `latest.svg`) into `--out`. `egress-bench measure ...` runs one
//! measurement of the agent's pieces; the benchmark run starts those itself.
#![allow(
    unused_crate_dependencies,
    reason = "a binary links every dependency of its package; the library uses most of them"
)]

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use egress_bench::{Binaries, Params, Section, measure, report, run_sections};
use egress_tests::{is_root, teardown_all_clusters};

#[derive(Parser)]
#[command(
    about = "Benchmarks of the egress gateway: BPF cost, traffic, NAT pressure, control plane",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    measure: Option<Command>,
    /// A smoke run: every section with tiny counts (tens of seconds).
    #[arg(long)]
    quick: bool,
    /// Folder for latest.json, latest.md and latest.svg.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only redo latest.md and latest.svg from the latest.json already in --out.
    #[arg(long)]
    render_only: bool,
    /// Run only these sections (comma-separated), e.g. `--only failover`; the report then
    /// has only their parts. Use another --out than the full run's.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Trials per fault type in the failover section (default: 20, 2 with --quick).
    #[arg(long)]
    failover_trials: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// One measurement of the agent's pieces, printed as JSON (the benchmark run starts these).
    #[command(hide = true)]
    Measure(measure::MeasureArgs),
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let result = match cli.measure.take() {
        Some(Command::Measure(args)) => measure::run(args),
        None => benchmark(&cli),
    };
    teardown_all_clusters();
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("egress-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn benchmark(cli: &Cli) -> anyhow::Result<ExitCode> {
    let out = cli.out.as_ref().context("--out FOLDER is required")?;
    if cli.render_only {
        let json = std::fs::read_to_string(out.join("latest.json"))?;
        report::write(&mut serde_json::from_str(&json)?, out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !is_root() {
        bail!("must run as root (BPF programs, network namespaces)");
    }
    let mut params = if cli.quick {
        Params::quick()
    } else {
        Params::full()
    };
    if let Some(trials) = cli.failover_trials {
        params.failover_trials = trials.max(1);
    }
    let sections = if cli.only.is_empty() {
        &Section::ALL[..]
    } else {
        &cli.only[..]
    };
    let mut doc = run_sections(&params, &Binaries::locate()?, sections)?;
    report::write(&mut doc, out)?;
    eprintln!(
        "egress-bench: report in {}",
        out.join("latest.md").display()
    );
    Ok(ExitCode::SUCCESS)
}
