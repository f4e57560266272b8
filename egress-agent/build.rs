//! Builds the eBPF object the `egress-agent` binary embeds (`$OUT_DIR/egress-ebpf`) and, with
//! the `test-programs` feature, a second one that adds the programs only `BPF_PROG_TEST_RUN`
//! uses (`$OUT_DIR/test-programs/egress-ebpf`), for the datapath tests and the benchmarks.

#![allow(
    unused_crate_dependencies,
    reason = "egress-ebpf is a build dependency only so that cargo rebuilds on its changes"
)]

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let workspace = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .parent()
        .ok_or_else(|| anyhow!("egress-agent has no parent folder"))?
        .to_path_buf();
    put_tools_on_path(&workspace)?;
    println!("cargo:rerun-if-env-changed=EGRESS_NIGHTLY");
    let nightly = env::var("EGRESS_NIGHTLY")
        .ok()
        .filter(|name| !name.is_empty());
    let toolchain = || match &nightly {
        Some(name) if name != "nightly" => Toolchain::Custom(name),
        _ => Toolchain::Nightly,
    };
    let ebpf_root = workspace.join("egress-ebpf");
    let ebpf_root = ebpf_root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_root.display()))?;

    build(ebpf_root, &[], toolchain())?;
    if env::var_os("CARGO_FEATURE_TEST_PROGRAMS").is_some() {
        // aya-build writes to $OUT_DIR: point it at a subfolder for the second object.
        let out_dir = PathBuf::from(env::var("OUT_DIR")?);
        let test_dir = out_dir.join("test-programs");
        std::fs::create_dir_all(&test_dir)?;
        // SAFETY: the build script runs no other threads.
        unsafe { env::set_var("OUT_DIR", &test_dir) };
        let built = build(ebpf_root, &["test-programs"], toolchain());
        // SAFETY: as above.
        unsafe { env::set_var("OUT_DIR", &out_dir) };
        built?;
    }
    Ok(())
}

/// Builds the eBPF object with the nightly toolchain (`$EGRESS_NIGHTLY`, else `nightly`) and
/// bpf-linker.
fn build(root_dir: &str, features: &[&str], toolchain: Toolchain<'_>) -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [Package {
            name: "egress-ebpf",
            root_dir,
            features,
            ..Default::default()
        }],
        toolchain,
    )
    .context("building the eBPF object (run `cargo xtask setup` if bpf-linker is missing)")
}

/// `cargo xtask setup` installs bpf-linker into the project's `.tools/bin`; that folder goes
/// first on PATH so a plain `cargo build` finds it too.
fn put_tools_on_path(workspace: &std::path::Path) -> anyhow::Result<()> {
    let tools_bin = workspace.join(".tools/bin");
    println!("cargo:rerun-if-changed={}", tools_bin.display());
    if tools_bin.is_dir() {
        let path = env::var_os("PATH").unwrap_or_default();
        let joined = env::join_paths(std::iter::once(tools_bin).chain(env::split_paths(&path)))?;
        // SAFETY: the build script runs no other threads.
        unsafe { env::set_var("PATH", joined) };
    }
    Ok(())
}
