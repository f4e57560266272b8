//! Measurements run by `cargo xtask bench`. Placeholder until the benchmarks land.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("benchmarks are not implemented yet")
}
