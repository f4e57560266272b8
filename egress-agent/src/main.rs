//! egress-agent: the node agent of the eBPF egress gateway (see the library's docs).
#![allow(
    unused_crate_dependencies,
    reason = "a binary links every dependency of its package; the library uses most of them"
)]

fn main() -> std::process::ExitCode {
    egress_agent::cli::main()
}
