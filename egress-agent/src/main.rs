//! egress-agent: the node agent of the eBPF egress gateway (see the library's docs).

fn main() -> std::process::ExitCode {
    egress_agent::cli::main()
}
