//! egress-agent: the node agent of the eBPF egress gateway.

mod agent;
mod bench;
mod datapath;
mod inspect;
mod kubernetes;
mod metrics;
mod netlink;
mod privileges;
mod source;

// The pure control plane lives in the library (see lib.rs); importing it here keeps the
// `crate::desired` / `crate::inventory` / `crate::manifests` paths of the binary's modules.
use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use egress_agent::{desired, inventory, manifests};
use egress_common::policy::DEFAULT_POLICY_MAP_SIZE;
use tracing_subscriber::EnvFilter;

use crate::{agent::RunArgs, datapath::DEFAULT_BPFFS, inspect::Output};

#[derive(Debug, Parser)]
#[command(
    name = "egress-agent",
    version,
    about = "eBPF egress gateway agent: sends selected pods' traffic out through a gateway \
             node with a fixed egress IP, as CiliumEgressGatewayPolicy objects describe"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent on this node.
    Run(RunArgs),
    /// Validate manifests without touching the kernel. Exits 1 when any object is refused,
    /// 3 when the policy entries they imply exceed --policy-map-size (even if some are
    /// refused too).
    Check {
        /// Folder of manifests (`kubectl get -o yaml` output), read recursively.
        #[arg(long)]
        manifests: PathBuf,
        /// Capacity of the policy map to check against (as given to `run`).
        #[arg(long, default_value_t = DEFAULT_POLICY_MAP_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
        policy_map_size: u32,
    },
    /// Remove everything the agent installed: TCX links, pinned maps, the tunnel device.
    Cleanup {
        #[command(flatten)]
        pins: PinArgs,
        /// Name of the agent's VXLAN device.
        #[arg(long, default_value = agent::DEFAULT_TUNNEL_DEVICE)]
        tunnel_device: String,
    },
    /// Measurements for `cargo xtask bench` (datapath cost, control-plane scale).
    #[command(hide = true)]
    Bench(bench::BenchArgs),
    /// Inspect the datapath's maps.
    Bpf {
        #[command(subcommand)]
        command: BpfCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BpfCommand {
    /// The egress policy map.
    Egress {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// The gateway's NAT entries.
    Nat {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Packet counters per verdict and drop reason.
    Counters {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
enum ListCommand {
    /// List the entries.
    List {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// Folder on bpffs holding this agent's pinned maps and links (mounted if needed).
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => agent::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Check {
            manifests,
            policy_map_size,
        } => inspect::check(&manifests, policy_map_size),
        Command::Cleanup {
            pins,
            tunnel_device,
        } => agent::cleanup(&pins.bpffs, &tunnel_device),
        Command::Bpf { command } => match command {
            BpfCommand::Egress {
                command: ListCommand::List { pins, output },
            } => inspect::egress_list(&pins.bpffs, output),
            BpfCommand::Nat {
                command: ListCommand::List { pins, output },
            } => inspect::nat_list(&pins.bpffs, output),
            BpfCommand::Counters { pins, output } => inspect::counters(&pins.bpffs, output),
        },
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping a cause the message before it already quotes (many
/// errors print their source themselves, and anyhow's `{:#}` would repeat it).
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !last.contains(&cause) {
            text = format!("{text}: {cause}");
        }
        last = cause;
    }
    text
}
