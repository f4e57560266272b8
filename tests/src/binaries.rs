//! The workspace programs the harness starts, and where it finds them.

use std::{
    env,
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};

/// Every binary the harness starts, by name: the one list, shared with `cargo xtask`, which
/// builds them all before running the demo, the tests or the benchmarks.
pub const SPAWNED: &[&str] = include!("spawned-binaries.in");

/// The environment variable that names binary `name`'s path: `egress-peer` -> `EGRESS_PEER_BIN`.
/// `cargo xtask` sets it for every entry of [`SPAWNED`].
pub fn env_var(name: &str) -> String {
    format!("{}_BIN", name.replace('-', "_").to_ascii_uppercase())
}

/// Where binary `name` is: its [`env_var`] if set, else `$CARGO_TARGET_DIR/debug`, the folders
/// of the running executable (tests run from `<target>/debug/deps`), then
/// `<workspace>/target/debug`. The path may not exist; [`require`] checks.
///
/// # Panics
/// If `name` is not in [`SPAWNED`]: a binary the tasks would not build.
pub fn locate(name: &str) -> PathBuf {
    assert!(
        SPAWNED.contains(&name),
        "{name} is not in tests/src/spawned-binaries.in, so `cargo xtask` does not build it"
    );
    if let Some(path) = env::var_os(env_var(name)) {
        return PathBuf::from(path);
    }
    let mut candidates = Vec::new();
    if let Some(target) = env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(target).join("debug").join(name));
    }
    if let Ok(exe) = env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(name));
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(workspace.join("target").join("debug").join(name));
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .unwrap_or_else(|| candidates.last().cloned().unwrap())
}

/// [`locate`], failing with what to run when the binary is not there.
pub fn require(name: &str) -> Result<PathBuf> {
    let path = locate(name);
    ensure_built(name, &path)?;
    Ok(path)
}

/// Fails with what to run when binary `name` is not at `path`.
pub fn ensure_built(name: &str, path: &Path) -> Result<()> {
    if !path.is_file() {
        bail!(
            "{name} not found at {}: `cargo xtask demo`, `test` and `bench` build it, or set {}",
            path.display(),
            env_var(name)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_var_names_follow_the_binary() {
        assert_eq!(env_var("egress-peer"), "EGRESS_PEER_BIN");
        assert_eq!(env_var("egress-agent"), "EGRESS_AGENT_BIN");
    }

    #[test]
    fn every_spawned_binary_is_a_bin_target_of_the_workspace() {
        // egress-agent's binary is its package's src/main.rs; the others are [[bin]]s of this
        // package (xtask builds them with `--package egress-tests`).
        let manifest =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
        for name in SPAWNED.iter().filter(|name| **name != "egress-agent") {
            assert!(
                manifest.contains(&format!("name = \"{name}\"")),
                "{name} is no [[bin]] of tests/Cargo.toml"
            );
        }
    }

    #[test]
    #[should_panic(expected = "is not in tests/src/spawned-binaries.in")]
    fn an_unlisted_binary_is_refused() {
        locate("egress-something-new");
    }
}
