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
use egress_bench::{Binaries, Params, measure, report, run_all};
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
}

#[derive(Subcommand)]
enum Command {
    /// One measurement of the agent's pieces, printed as JSON (the benchmark run starts these).
    #[command(hide = true)]
    Measure(measure::MeasureArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.measure {
        Some(Command::Measure(args)) => measure::run(args),
        None => benchmark(cli.out, cli.quick, cli.render_only),
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

fn benchmark(out: Option<PathBuf>, quick: bool, render_only: bool) -> anyhow::Result<ExitCode> {
    let out = out.context("--out FOLDER is required")?;
    if render_only {
        let json = std::fs::read_to_string(out.join("latest.json"))?;
        report::write(&mut serde_json::from_str(&json)?, &out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !is_root() {
        bail!("must run as root (BPF programs, network namespaces)");
    }
    let params = if quick {
        Params::quick()
    } else {
        Params::full()
    };
    let mut doc = run_all(&params, &Binaries::locate()?)?;
    report::write(&mut doc, &out)?;
    eprintln!(
        "egress-bench: report in {}",
        out.join("latest.md").display()
    );
    Ok(ExitCode::SUCCESS)
}
