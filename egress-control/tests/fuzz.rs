//! Runs each fuzz target of `fuzz/` for a bounded time (20 s each) and fails on any crash,
//! panic, timeout or leak libFuzzer reports. Needs the nightly toolchain and cargo-fuzz
//! (`cargo xtask setup` installs it into `.tools/bin`); skipped, saying so, without them.
#![allow(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Seconds of fuzzing per target; the targets run one after the other.
const SECONDS_PER_TARGET: u32 = 20;

/// Target name, seed corpus folder and dictionary (both under `fuzz/`).
const TARGETS: [(&str, Option<&str>, Option<&str>); 2] = [
    ("manifest", Some("seeds/manifest"), Some("manifest.dict")),
    ("selector", None, None),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `cargo +nightly ...` in `fuzz/`, with `.tools/bin` first on PATH and none of the outer
/// cargo's settings (toolchain, target folder, flags) leaking in.
fn cargo_nightly(fuzz_dir: &Path) -> Command {
    let path = env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(workspace().join(".tools/bin")).chain(env::split_paths(&path));
    let mut cmd = Command::new("cargo");
    // The nightly xtask builds with (`EGRESS_NIGHTLY`), as for the eBPF programs.
    let nightly = env::var("EGRESS_NIGHTLY").unwrap_or_else(|_| "nightly".to_owned());
    cmd.arg(format!("+{nightly}"))
        .current_dir(fuzz_dir)
        .env("PATH", env::join_paths(dirs).unwrap());
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

#[test]
fn fuzz_targets_find_nothing_in_bounded_time() {
    let fuzz_dir = workspace().join("fuzz");
    let probe = cargo_nightly(&fuzz_dir)
        .args(["fuzz", "--version"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED: cargo-fuzz or the nightly toolchain is missing; run `cargo xtask setup` \
             (installs cargo-fuzz into .tools/bin) and `rustup toolchain install nightly`"
        );
        return;
    }
    for (target, seeds, dict) in TARGETS {
        // A fresh corpus each run: the result depends only on the code and the seeds.
        let corpus = env::temp_dir().join(format!("egress-fuzz-{target}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&corpus);
        std::fs::create_dir_all(&corpus).unwrap();
        let mut cmd = cargo_nightly(&fuzz_dir);
        cmd.args(["fuzz", "run", target]).arg(&corpus);
        if let Some(seeds) = seeds {
            cmd.arg(fuzz_dir.join(seeds));
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={SECONDS_PER_TARGET}"))
            // An input taking seconds is a bug too (libFuzzer's default is 20 minutes).
            .arg("-timeout=10");
        if let Some(dict) = dict {
            cmd.arg(format!("-dict={}", fuzz_dir.join(dict).display()));
        }
        let output = cmd.output().unwrap();
        let _ = std::fs::remove_dir_all(&corpus);
        let log = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        assert!(
            output.status.success(),
            "fuzz target {target} failed ({}); the reproducer is under fuzz/artifacts/{target}/:\n{}",
            output.status,
            tail.join("\n")
        );
        let runs = log
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("?");
        eprintln!("fuzz target {target}: no crash; {runs}");
    }
}
