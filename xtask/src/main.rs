//! Project tasks, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! Every task that builds runs `setup` first; `setup` is idempotent and fast when everything is
//! already installed. Every task builds each binary it starts: the demo, the tests and the
//! benchmarks start the binaries listed in `tests/src/spawned-binaries.in`, which this file
//! includes. Each command is printed (prefixed with `$`) before it runs.

mod command;
mod setup;

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, ensure};
use clap::{Args, Parser, Subcommand};

use crate::{
    command::{exit_code_of, run},
    setup::{NIGHTLY_ENV, Needs, nightly_toolchain, setup},
};

/// Every workspace binary the test harness starts (clusters, demo, benchmarks).
const SPAWNED: &[&str] = include!("../../tests/src/spawned-binaries.in");

/// The package of each binary the tasks build.
const BINARY_PACKAGES: &[(&str, &str)] = &[
    ("egress-agent", "egress-agent"),
    ("egress-peer", "egress-tests"),
    ("egress-demo", "egress-tests"),
    ("egress-bench", "egress-bench"),
    ("egress-load", "egress-bench"),
];

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Project tasks of the eBPF egress gateway"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent): rust-src for nightly, bpf-linker,
    /// cargo-fuzz and helm in <workspace>/.tools, Debian packages used by the tests.
    Setup {
        /// Install the tools into this folder instead of <workspace>/.tools (for testing the
        /// installation; builds only look in <workspace>/.tools).
        #[arg(long, hide = true)]
        tools_dir: Option<PathBuf>,
    },
    /// Run setup, then build egress-agent (with the eBPF object) and the egress-tests binaries.
    Build(Profile),
    /// Run setup, build the agent and run the workspace tests as root.
    Test {
        #[command(flatten)]
        profile: Profile,
        /// Only the unit tests of egress-agent, egress-control and egress-common (no test
        /// clusters, no BPF programs).
        #[arg(long)]
        quick: bool,
        /// Extra arguments for `cargo test` (a further `--` separates test-binary arguments).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build the agent and run it on this host: `cargo xtask run -- ARGS`.
    Run {
        #[command(flatten)]
        profile: Profile,
        /// Arguments for egress-agent.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build the agent, the demo and what it starts, then run the demo.
    Demo {
        #[command(flatten)]
        profile: Profile,
        /// Arguments for egress-demo.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Clippy on the host crates and on the BPF crate, and rustfmt, with warnings as errors
    /// (the lint levels are the workspace's `[workspace.lints]`).
    Lint,
    /// Build in release mode and run the benchmarks (BPF cost, traffic through three paths,
    /// NAT pressure, control plane); writes bench/results/latest.{md,json,svg}.
    Bench {
        /// A smoke run with tiny counts, written to bench/results/quick/ instead.
        #[arg(long)]
        quick: bool,
        /// Sections to run instead of all (egress-bench's --only), e.g. `datapath,failover`;
        /// written to bench/results/<SUBFOLDER> (see --out).
        #[arg(long, requires = "out")]
        only: Option<String>,
        /// With --only: the folder under bench/results/ for this partial run.
        #[arg(long)]
        out: Option<String>,
        /// Trials per fault type in the failover section (default 20).
        #[arg(long)]
        failover_trials: Option<usize>,
    },
}

#[derive(Args, Clone, Copy)]
struct Profile {
    /// Build with the release profile.
    #[arg(long)]
    release: bool,
}

impl Profile {
    fn dir(self) -> &'static str {
        if self.release { "release" } else { "debug" }
    }

    fn add_to(self, cmd: &mut Command) {
        if self.release {
            cmd.arg("--release");
        }
    }
}

/// The binaries a task builds before it runs: everything the harness starts, and the task's
/// own programs (`egress-demo`; `egress-bench` and the `egress-load` it starts).
fn binaries_for(own: &[&'static str]) -> Vec<&'static str> {
    SPAWNED.iter().chain(own).copied().collect()
}

/// The package that has binary `name`.
fn package_of(name: &str) -> Result<&'static str> {
    BINARY_PACKAGES
        .iter()
        .find(|(binary, _)| *binary == name)
        .map(|(_, package)| *package)
        .with_context(|| format!("xtask does not know the package of binary {name}"))
}

fn main() -> ExitCode {
    match run_task(Cli::parse().task) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<ExitCode> {
    let ws = Workspace::locate()?;
    match task {
        Task::Setup { tools_dir } => {
            setup(
                &ws.root,
                tools_dir.as_deref().unwrap_or(&ws.tools),
                Needs::Everything,
            )?;
        }
        Task::Build(profile) => {
            setup(&ws.root, &ws.tools, Needs::Build)?;
            let mut cmd = ws.cargo("build");
            cmd.args(["--package", "egress-agent", "--package", "egress-tests"]);
            profile.add_to(&mut cmd);
            run(&mut cmd)?;
        }
        Task::Test {
            profile,
            quick,
            args,
        } => {
            ensure_root("the tests load BPF programs and create network namespaces")?;
            setup(&ws.root, &ws.tools, Needs::Everything)?;
            let built = ws.build(profile, &binaries_for(&[]))?;
            let mut cmd = test_command(&ws, profile, quick, args);
            built.add_env(&mut cmd);
            run(&mut cmd)?;
        }
        Task::Run { profile, args } => {
            setup(&ws.root, &ws.tools, Needs::Build)?;
            let built = ws.build(profile, &["egress-agent"])?;
            return exit_code_of(Command::new(built.path("egress-agent")).args(args));
        }
        Task::Demo { profile, args } => {
            ensure_root("the demo loads BPF programs and creates network namespaces")?;
            setup(&ws.root, &ws.tools, Needs::Clusters)?;
            let built = ws.build(profile, &binaries_for(&["egress-demo"]))?;
            let mut demo = Command::new(built.path("egress-demo"));
            built.add_env(&mut demo);
            return exit_code_of(demo.args(args));
        }
        Task::Lint => {
            setup(&ws.root, &ws.tools, Needs::Build)?;
            lint(&ws)?;
        }
        Task::Bench {
            quick,
            only,
            out,
            failover_trials,
        } => {
            ensure_root("the benchmarks load BPF programs and create network namespaces")?;
            setup(&ws.root, &ws.tools, Needs::Clusters)?;
            let built = ws.build(
                Profile { release: true },
                &binaries_for(&["egress-bench", "egress-load"]),
            )?;
            let out = match (&out, quick) {
                (Some(folder), _) => ws.root.join("bench/results").join(folder),
                (None, true) => ws.root.join("bench/results/quick"),
                (None, false) => ws.root.join("bench/results"),
            };
            let mut bench = Command::new(built.path("egress-bench"));
            built.add_env(&mut bench);
            bench.arg("--out").arg(&out);
            if quick {
                bench.arg("--quick");
            }
            if let Some(only) = only {
                bench.arg("--only").arg(only);
            }
            if let Some(trials) = failover_trials {
                bench.arg("--failover-trials").arg(trials.to_string());
            }
            return exit_code_of(&mut bench);
        }
    }
    Ok(ExitCode::SUCCESS)
}

struct Workspace {
    root: PathBuf,
    tools: PathBuf,
}

/// Binaries a task built, by name, in the target folder of its profile.
struct Built {
    dir: PathBuf,
    names: Vec<&'static str>,
}

impl Built {
    fn path(&self, name: &str) -> PathBuf {
        debug_assert!(self.names.contains(&name), "{name} was not built");
        self.dir.join(name)
    }

    /// Tells the harness where each binary is (`egress-peer` -> `$EGRESS_PEER_BIN`), so it
    /// starts exactly what was built for this profile.
    fn add_env(&self, cmd: &mut Command) {
        for name in &self.names {
            let var = format!("{}_BIN", name.replace('-', "_").to_ascii_uppercase());
            cmd.env(var, self.path(name));
        }
    }
}

impl Workspace {
    fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent folder")?
            .to_path_buf();
        let tools = root.join(".tools");
        Ok(Self { root, tools })
    }

    /// The workspace's target folder (`CARGO_TARGET_DIR` if set, like cargo itself).
    fn target_dir(&self) -> PathBuf {
        match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => self.root.join(dir),
            _ => self.root.join("target"),
        }
    }

    /// PATH with `<workspace>/.tools/bin` first, so the eBPF build finds bpf-linker.
    fn path_with_tools(&self) -> Result<OsString> {
        let path = env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(self.tools.join("bin")).chain(env::split_paths(&path));
        env::join_paths(dirs).context("joining PATH")
    }

    /// `cargo <subcommand>` in the workspace root with `.tools/bin` on PATH and the nightly
    /// toolchain for the eBPF build named.
    fn cargo(&self, subcommand: &str) -> Command {
        self.cargo_args(&[subcommand])
    }

    /// [`Workspace::cargo`] with another toolchain: `cargo +<toolchain> <subcommand>`.
    fn cargo_on(&self, toolchain: &str, subcommand: &str) -> Command {
        self.cargo_args(&[&format!("+{toolchain}"), subcommand])
    }

    fn cargo_args(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("cargo");
        cmd.args(args)
            .current_dir(&self.root)
            .env(NIGHTLY_ENV, nightly_toolchain());
        match self.path_with_tools() {
            Ok(path) => {
                cmd.env("PATH", path);
            }
            Err(err) => eprintln!("xtask: warning: {err:#}"),
        }
        cmd
    }

    /// Builds the named binaries and checks each is there.
    fn build(&self, profile: Profile, names: &[&'static str]) -> Result<Built> {
        let mut cmd = self.cargo("build");
        let mut packages = Vec::new();
        for name in names {
            let package = package_of(name)?;
            if !packages.contains(&package) {
                packages.push(package);
                cmd.args(["--package", package]);
            }
        }
        for name in names {
            cmd.args(["--bin", name]);
        }
        profile.add_to(&mut cmd);
        run(&mut cmd)?;
        let built = Built {
            dir: self.target_dir().join(profile.dir()),
            names: names.to_vec(),
        };
        for name in names {
            let path = built.path(name);
            ensure!(path.is_file(), "{} was not built", path.display());
        }
        Ok(built)
    }
}

/// `cargo test` for the workspace (or what `args` select), with `args` passed on.
fn test_command(ws: &Workspace, profile: Profile, quick: bool, args: Vec<OsString>) -> Command {
    // User arguments: cargo's before a `--`, the test binaries' after it.
    let split = args.iter().position(|arg| arg == "--");
    let (cargo_args, test_args) = match split {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (&args[..], &[][..]),
    };
    let selects_packages = cargo_args.iter().any(|arg| {
        let arg = arg.to_string_lossy();
        arg.starts_with("-p") || arg.starts_with("--package")
    });
    let mut cmd = ws.cargo("test");
    if selects_packages {
        // `--workspace` would override the user's `--package`.
    } else if quick {
        // Unit tests only: not the CLI, datapath and fuzz tests under <crate>/tests.
        cmd.args(["--package", "egress-agent", "--package", "egress-common"])
            .args(["--package", "egress-control", "--lib", "--bins"]);
    } else {
        // egress-ebpf builds only for the BPF target (through egress-agent's build script).
        cmd.args(["--workspace", "--exclude", "egress-ebpf"]);
    }
    profile.add_to(&mut cmd);
    cmd.args(cargo_args).arg("--").args(test_args);
    let threads_given = test_args
        .iter()
        .any(|arg| arg.to_string_lossy().starts_with("--test-threads"));
    if !threads_given {
        // Integration tests each build their own test cluster: keep a few in flight at most.
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        cmd.arg(format!("--test-threads={}", cpus.clamp(2, 4)));
    }
    cmd
}

/// `cargo xtask lint`: every crate through clippy with warnings as errors, then rustfmt.
fn lint(ws: &Workspace) -> Result<()> {
    let toolchain = nightly_toolchain();
    // rustfmt.toml uses options only nightly's rustfmt knows, and clippy for the BPF target
    // needs nightly's build-std.
    setup::ensure_components(&toolchain, &["clippy", "rustfmt"])?;
    let mut host = ws.cargo("clippy");
    host.args(["--workspace", "--exclude", "egress-ebpf"])
        .args(["--all-targets", "--all-features", "--", "-D", "warnings"]);
    run(&mut host)?;
    let mut bpf = ws.cargo_on(&toolchain, "clippy");
    bpf.args(["--package", "egress-ebpf", "--all-features", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"]);
    run(&mut bpf)?;
    let mut fmt = Command::new("cargo");
    fmt.arg(format!("+{toolchain}"))
        .args(["fmt", "--all", "--", "--check"])
        .current_dir(&ws.root);
    run(&mut fmt)
}

fn ensure_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions; declared here to avoid a libc dependency.
    unsafe extern "C" {
        safe fn geteuid() -> u32;
    }
    ensure!(geteuid() == 0, "must run as root: {why}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_test_and_bench_build_every_binary_the_harness_starts() {
        for own in [&[][..], &["egress-demo"], &["egress-bench", "egress-load"]] {
            let built = binaries_for(own);
            for name in SPAWNED.iter().chain(own) {
                assert!(built.contains(name), "{own:?}: {name} is not built");
                assert!(package_of(name).is_ok(), "{name} has no package");
            }
        }
        // The demo's first failure on a fresh clone: egress-peer was not built.
        assert!(SPAWNED.contains(&"egress-peer"));
    }

    #[test]
    fn the_env_of_a_build_names_every_binary() {
        let built = Built {
            dir: PathBuf::from("/t/debug"),
            names: binaries_for(&["egress-demo"]),
        };
        let mut cmd = Command::new("true");
        built.add_env(&mut cmd);
        let envs: Vec<(String, String)> = cmd
            .get_envs()
            .map(|(key, value)| {
                let value = value.unwrap().to_string_lossy().into_owned();
                (key.to_string_lossy().into_owned(), value)
            })
            .collect();
        assert!(envs.contains(&("EGRESS_PEER_BIN".into(), "/t/debug/egress-peer".into())));
        assert!(envs.contains(&("EGRESS_AGENT_BIN".into(), "/t/debug/egress-agent".into())));
    }
}
