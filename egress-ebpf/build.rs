use which::which;

/// Rebuild the eBPF object when bpf-linker changes: it is not a cargo dependency, so cargo
/// would otherwise keep a stale object after `cargo xtask setup` installs a new linker.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
