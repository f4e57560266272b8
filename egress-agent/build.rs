//! Builds the eBPF object the `egress-agent` binary embeds. Only with the `agent` feature:
//! the fuzz targets use the library alone and need neither bpf-linker nor the BPF build.

#[cfg(not(feature = "agent"))]
fn main() {}

#[cfg(feature = "agent")]
fn main() -> anyhow::Result<()> {
    ebpf::build()
}

#[cfg(feature = "agent")]
mod ebpf {
    use std::{env, path::PathBuf};

    use anyhow::{Context as _, anyhow};
    use aya_build::{Package, Toolchain};

    /// Builds the eBPF object with the nightly toolchain (`$EGRESS_NIGHTLY`, else `nightly`)
    /// and bpf-linker. `cargo xtask setup` installs bpf-linker into the project's `.tools/bin`;
    /// that folder goes first on PATH so a plain `cargo build` finds it too.
    pub fn build() -> anyhow::Result<()> {
        let workspace = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
            .parent()
            .ok_or_else(|| anyhow!("egress-agent has no parent folder"))?
            .to_path_buf();
        let tools_bin = workspace.join(".tools/bin");
        println!("cargo:rerun-if-changed={}", tools_bin.display());
        println!("cargo:rerun-if-env-changed=EGRESS_NIGHTLY");
        let nightly = env::var("EGRESS_NIGHTLY")
            .ok()
            .filter(|name| !name.is_empty());
        let toolchain = match &nightly {
            Some(name) if name != "nightly" => Toolchain::Custom(name),
            _ => Toolchain::Nightly,
        };
        if tools_bin.is_dir() {
            let path = env::var_os("PATH").unwrap_or_default();
            let joined =
                env::join_paths(std::iter::once(tools_bin).chain(env::split_paths(&path)))?;
            // SAFETY: the build script runs no other threads.
            unsafe { env::set_var("PATH", joined) };
        }
        let ebpf_root = workspace.join("egress-ebpf");
        let ebpf_root = ebpf_root
            .to_str()
            .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_root.display()))?;
        aya_build::build_ebpf(
            [Package {
                name: "egress-ebpf",
                root_dir: ebpf_root,
                ..Default::default()
            }],
            toolchain,
        )
        .context("building the eBPF object (run `cargo xtask setup` if bpf-linker is missing)")
    }
}
