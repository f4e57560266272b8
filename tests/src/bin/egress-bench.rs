//! Runs every benchmark of `cargo xtask bench` and writes the report
//! (`latest.json`, `latest.md`, `latest.svg`) into `--out`.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use egress_tests::{
    bench::{self, Binaries, Params},
    teardown_all_clusters,
};

#[derive(Parser)]
#[command(
    about = "Benchmarks of the egress gateway: BPF cost, traffic, NAT pressure, control plane"
)]
struct Cli {
    /// A smoke run: every section with tiny counts (tens of seconds).
    #[arg(long)]
    quick: bool,
    /// Folder for latest.json, latest.md and latest.svg.
    #[arg(long)]
    out: PathBuf,
    /// Only redo latest.md and latest.svg from the latest.json already in --out.
    #[arg(long)]
    render_only: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.render_only {
        let rendered = std::fs::read_to_string(cli.out.join("latest.json"))
            .map_err(anyhow::Error::from)
            .and_then(|json| Ok(serde_json::from_str(&json)?))
            .and_then(|mut doc| bench::report::write(&mut doc, &cli.out));
        return match rendered {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("egress-bench: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    if !egress_tests::is_root() {
        eprintln!("egress-bench: must run as root (BPF programs, network namespaces)");
        return ExitCode::FAILURE;
    }
    let params = if cli.quick {
        Params::quick()
    } else {
        Params::full()
    };
    let result = Binaries::locate().and_then(|bins| {
        let mut doc = bench::run_all(&params, &bins)?;
        bench::report::write(&mut doc, &cli.out)
    });
    teardown_all_clusters();
    match result {
        Ok(()) => {
            eprintln!(
                "egress-bench: report in {}",
                cli.out.join("latest.md").display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("egress-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
