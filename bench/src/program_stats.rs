//! In-kernel run time of an agent's attached programs under real traffic, from the kernel's
//! BPF statistics (`kernel.bpf_stats_enabled`, on only while a [`StatsOn`] lives): what a
//! program costs per packet without `BPF_PROG_TEST_RUN`'s per-run overhead.

use std::{collections::BTreeMap, fs, path::Path, process::Command};

use anyhow::{Context, Result};
use serde_json::Value;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Keeps the kernel's BPF statistics on; puts the setting back as it was when dropped.
pub(crate) struct StatsOn {
    before: String,
}

impl StatsOn {
    pub(crate) fn new() -> Result<StatsOn> {
        let before = fs::read_to_string(STATS_SYSCTL).context("reading bpf_stats_enabled")?;
        fs::write(STATS_SYSCTL, "1").context("turning on bpf_stats_enabled")?;
        Ok(StatsOn { before })
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = fs::write(STATS_SYSCTL, self.before.trim());
    }
}

/// (run time in ns, runs) of the program behind each link an agent pinned in `links_dir`,
/// by program name (`probe_responder`, `from_tunnel`, ...), summed over its links.
pub(crate) fn by_program(links_dir: &Path) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut totals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let entries =
        fs::read_dir(links_dir).with_context(|| format!("reading {}", links_dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let link = bpftool(&["link", "show", "pinned", &path.to_string_lossy()])?;
        let Some(id) = link["prog_id"].as_u64() else {
            continue;
        };
        let program = bpftool(&["prog", "show", "id", &id.to_string()])?;
        let name = program["name"].as_str().unwrap_or("?").to_owned();
        let total = totals.entry(name).or_default();
        total.0 += program["run_time_ns"].as_u64().unwrap_or(0);
        total.1 += program["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok(totals)
}

/// ns per run of `program` between two [`by_program`] readings (`None` without runs).
pub(crate) fn ns_per_run(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    program: &str,
) -> Option<f64> {
    let (time_0, runs_0) = before.get(program).copied().unwrap_or_default();
    let (time_1, runs_1) = after.get(program).copied()?;
    let runs = runs_1.checked_sub(runs_0).filter(|runs| *runs > 0)?;
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds and run counts")]
    Some(time_1.saturating_sub(time_0) as f64 / runs as f64)
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let output = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    anyhow::ensure!(
        output.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).with_context(|| format!("parsing bpftool {args:?}"))
}
