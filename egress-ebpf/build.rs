use std::{env, path::PathBuf};

/// Rebuild the eBPF object when bpf-linker changes: it is not a cargo dependency, so cargo
/// would otherwise keep a stale object after `cargo xtask setup` installs a new linker. The
/// linker is looked up where setup installs it, then on PATH; a missing one is reported by
/// aya-build when it links, with the hint to run setup.
fn main() {
    println!("cargo:rerun-if-env-changed=PATH");
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let project_tools = manifest_dir.join("../.tools/bin/bpf-linker");
    let linker = if project_tools.exists() {
        Some(project_tools)
    } else {
        which::which("bpf-linker").ok()
    };
    if let Some(linker) = linker {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
