//! Project tasks, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! Every task that builds runs `setup` first; `setup` is idempotent and fast when everything is
//! already installed. Each command is printed (prefixed with `$`) before it runs.

use std::{
    env,
    ffi::OsString,
    fmt::Write as _,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};

/// bpf-linker release installed into `<workspace>/.tools`.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// cargo-fuzz release installed into `<workspace>/.tools` (runs the fuzz targets of `fuzz/`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages the tests (and the demo) use; g++ builds libFuzzer for the fuzz targets.
const DEBIAN_PACKAGES: &[&str] = &[
    "bpftool",
    "iperf3",
    "nftables",
    "iptables",
    "tcpdump",
    "curl",
    "iproute2",
    "iputils-ping",
    "g++",
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
    /// Install what building and testing need (idempotent): rust-src for nightly, bpf-linker
    /// and cargo-fuzz in <workspace>/.tools, Debian packages used by the tests.
    Setup {
        /// Install bpf-linker into this folder instead of <workspace>/.tools (for testing the
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
        /// Only the unit tests of egress-agent and egress-common (no test clusters).
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
    /// Build the agent and the egress-demo binary, then run the demo.
    Demo {
        #[command(flatten)]
        profile: Profile,
        /// Arguments for egress-demo.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build in release mode and run the benchmarks (BPF cost, traffic through three paths,
    /// NAT pressure, control plane); writes bench/results/latest.{md,json,svg}.
    Bench {
        /// A smoke run with tiny counts, written to bench/results/quick/ instead.
        #[arg(long)]
        quick: bool,
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
            setup(&ws, tools_dir.as_deref().unwrap_or(&ws.tools))?;
        }
        Task::Build(profile) => {
            setup(&ws, &ws.tools)?;
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
            setup(&ws, &ws.tools)?;
            let agent = build_agent(&ws, profile)?;
            test(&ws, profile, quick, &agent, args)?;
        }
        Task::Run { profile, args } => {
            setup(&ws, &ws.tools)?;
            let agent = build_agent(&ws, profile)?;
            return exit_code_of(Command::new(agent).args(args));
        }
        Task::Demo { profile, args } => {
            let source = ws.root.join("tests/src/bin/egress-demo.rs");
            ensure!(
                source.exists() || ws.root.join("tests/src/bin/egress-demo/main.rs").exists(),
                "the egress-demo binary of package egress-tests does not exist yet (expected {})",
                source.display()
            );
            ensure_root("the demo loads BPF programs and creates network namespaces")?;
            setup(&ws, &ws.tools)?;
            let mut cmd = ws.cargo("build");
            cmd.args(["--package", "egress-agent", "--package", "egress-tests"])
                .args(["--bin", "egress-agent", "--bin", "egress-demo"]);
            profile.add_to(&mut cmd);
            run(&mut cmd)?;
            let demo = ws.target_dir().join(profile.dir()).join("egress-demo");
            let agent = ws.agent_bin(profile);
            return exit_code_of(
                Command::new(demo)
                    .env("EGRESS_AGENT_BIN", &agent)
                    .env("PATH", ws.path_with_tools()?)
                    .args(args),
            );
        }
        Task::Bench { quick } => {
            ensure_root("the benchmarks load BPF programs and create network namespaces")?;
            setup(&ws, &ws.tools)?;
            let release = Profile { release: true };
            let mut cmd = ws.cargo("build");
            cmd.args(["--package", "egress-agent", "--package", "egress-tests"])
                .args(["--bin", "egress-agent", "--bin", "egress-bench"])
                .args(["--bin", "egress-load", "--bin", "egress-peer"]);
            release.add_to(&mut cmd);
            run(&mut cmd)?;
            let out = if quick {
                ws.root.join("bench/results/quick")
            } else {
                ws.root.join("bench/results")
            };
            let mut bench = Command::new(ws.target_dir().join("release/egress-bench"));
            bench
                .env("EGRESS_AGENT_BIN", ws.agent_bin(release))
                .arg("--out")
                .arg(&out);
            if quick {
                bench.arg("--quick");
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

    fn agent_bin(&self, profile: Profile) -> PathBuf {
        self.target_dir().join(profile.dir()).join("egress-agent")
    }

    /// PATH with `<workspace>/.tools/bin` first, so the eBPF build finds bpf-linker.
    fn path_with_tools(&self) -> Result<OsString> {
        let path = env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(self.tools.join("bin")).chain(env::split_paths(&path));
        env::join_paths(dirs).context("joining PATH")
    }

    /// `cargo <subcommand>` in the workspace root with `.tools/bin` on PATH.
    fn cargo(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new("cargo");
        cmd.arg(subcommand).current_dir(&self.root);
        match self.path_with_tools() {
            Ok(path) => {
                cmd.env("PATH", path);
            }
            Err(err) => eprintln!("xtask: warning: {err:#}"),
        }
        cmd
    }
}

fn build_agent(ws: &Workspace, profile: Profile) -> Result<PathBuf> {
    let mut cmd = ws.cargo("build");
    cmd.args(["--package", "egress-agent", "--bin", "egress-agent"]);
    profile.add_to(&mut cmd);
    run(&mut cmd)?;
    let agent = ws.agent_bin(profile);
    ensure!(agent.exists(), "{} was not built", agent.display());
    Ok(agent)
}

fn test(
    ws: &Workspace,
    profile: Profile,
    quick: bool,
    agent: &Path,
    args: Vec<OsString>,
) -> Result<()> {
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
        // Unit tests only: not the CLI and fuzz tests in egress-agent/tests.
        cmd.args(["--package", "egress-agent", "--package", "egress-common"])
            .args(["--lib", "--bins"]);
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
    cmd.env("EGRESS_AGENT_BIN", agent);
    run(&mut cmd)
}

// ---------------------------------------------------------------------------------------------
// setup

fn setup(ws: &Workspace, tools: &Path) -> Result<()> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src()?;
    ensure_bpf_linker(ws, tools, &sysroot)?;
    ensure_cargo_fuzz(ws, tools)?;
    ensure_debian_packages()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

/// The nightly toolchain's sysroot, with a clear error if rustup or nightly are missing.
fn nightly_sysroot() -> Result<PathBuf> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs)")?;
    ensure!(
        toolchains.lines().any(|line| line.starts_with("nightly")),
        "no nightly toolchain: the eBPF program builds with nightly; install it with \
         `rustup toolchain install nightly --profile minimal`"
    );
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    let has_src = installed
        .lines()
        .any(|line| line == "rust-src" || line.starts_with("rust-src-"));
    if has_src {
        eprintln!("xtask: rust-src (nightly) already installed");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The nightly toolchain's LLVM shared library: its file name and LLVM major version.
fn nightly_libllvm(sysroot: &Path) -> Result<(String, u32)> {
    let lib = sysroot.join("lib");
    let mut found = Vec::new();
    for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        // e.g. libLLVM.so.22.1-rust-1.97.0-nightly
        if let Some(rest) = name.strip_prefix("libLLVM.so.") {
            let major: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(major) = major.parse() {
                found.push((name, major));
            }
        }
    }
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no libLLVM.so.<version> in {}", lib.display()),
        many => bail!(
            "several LLVM libraries in {}: {:?}",
            lib.display(),
            many.iter().map(|(name, _)| name).collect::<Vec<_>>()
        ),
    }
}

/// Installs bpf-linker into `<tools>/bin`, built against the nightly toolchain's LLVM:
/// `<tools>/llvm/lib` holds symlinks to that library, both as `libLLVM.so` (for the build) and
/// under its own name (so the installed binary, whose RUNPATH is that folder, runs anywhere).
fn ensure_bpf_linker(ws: &Workspace, tools: &Path, sysroot: &Path) -> Result<()> {
    let (lib_name, major) = nightly_libllvm(sysroot)?;
    let lib_path = sysroot.join("lib").join(&lib_name);
    let tools = if tools.is_absolute() {
        tools.to_path_buf()
    } else {
        env::current_dir()?.join(tools)
    };
    let llvm_prefix = tools.join("llvm");
    let llvm_lib = llvm_prefix.join("lib");
    fs::create_dir_all(&llvm_lib).with_context(|| format!("creating {}", llvm_lib.display()))?;
    ensure_symlink(&lib_path, &llvm_lib.join("libLLVM.so"))?;
    ensure_symlink(&lib_path, &llvm_lib.join(&lib_name))?;
    // Links to the libraries of earlier nightlies only hide a stale bpf-linker.
    for entry in fs::read_dir(&llvm_lib)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("libLLVM.so.") && name != *lib_name {
            fs::remove_file(entry.path())?;
        }
    }

    let bin = tools.join("bin/bpf-linker");
    let stamp_path = tools.join("bpf-linker.stamp");
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION} llvm-{major} {lib_name}\n");
    // The binary runs only if it finds the library it was linked with, by name, in the folder
    // it was built for; the stamp also records the bpf-linker version and features.
    let current = fs::read_to_string(&stamp_path).ok();
    let runs = bin.exists() && bpf_linker_runs(&bin);
    if runs && current.is_none() {
        // Installed by hand with the same recipe: adopt it.
        fs::write(&stamp_path, &stamp)
            .with_context(|| format!("writing {}", stamp_path.display()))?;
    }
    if runs && current.as_ref().is_none_or(|current| *current == stamp) {
        eprintln!(
            "xtask: bpf-linker {BPF_LINKER_VERSION} (llvm-{major}, {lib_name}) already installed in {}",
            tools.display()
        );
        return Ok(());
    }

    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} against {} (a few minutes of CPU)",
        lib_path.display()
    );
    let _ = fs::remove_file(&stamp_path);
    let mut cmd = Command::new("cargo");
    cmd.env("LLVM_PREFIX", &llvm_prefix)
        .arg("install")
        .arg("--root")
        .arg(&tools)
        .args([
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .current_dir(&ws.root);
    run(&mut cmd)?;
    ensure!(
        bpf_linker_runs(&bin),
        "{} was installed but does not run",
        bin.display()
    );
    fs::write(&stamp_path, stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    Ok(())
}

/// Installs cargo-fuzz into `<tools>/bin` unless that version is already there.
fn ensure_cargo_fuzz(ws: &Workspace, tools: &Path) -> Result<()> {
    let bin = tools.join("bin/cargo-fuzz");
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
    let wanted = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    if installed.is_some_and(|version| version.trim() == wanted) {
        eprintln!("xtask: {wanted} already installed in {}", tools.display());
        return Ok(());
    }
    eprintln!("xtask: installing {wanted} (a few minutes of CPU)");
    let mut cmd = Command::new("cargo");
    cmd.arg("install")
        .arg("--root")
        .arg(tools)
        .args([
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
            "--force",
        ])
        .current_dir(&ws.root);
    run(&mut cmd)
}

/// Checks the binary starts (finds its LLVM library) without the toolchain's library path.
fn bpf_linker_runs(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn ensure_symlink(target: &Path, link: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(());
    }
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?;
    }
    eprintln!("$ ln -s {} {}", target.display(), link.display());
    symlink(target, link).with_context(|| format!("linking {}", link.display()))
}

fn ensure_debian_packages() -> Result<()> {
    // Unknown packages make dpkg-query fail, yet it still prints the known ones.
    let mut query = Command::new("dpkg-query");
    query
        .args(["-W", "-f=${Package} ${db:Status-Status}\\n"])
        .args(DEBIAN_PACKAGES);
    print_command(&query);
    let out = query
        .stderr(Stdio::null())
        .output()
        .context("dpkg-query not found: setup supports Debian-based systems only")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            !listed
                .lines()
                .any(|line| line == format!("{pkg} installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: Debian packages already installed");
        return Ok(());
    }
    ensure_root(&format!("installing Debian packages {}", missing.join(" ")))?;
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))
}

fn ensure_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions; declared here to avoid a libc dependency.
    unsafe extern "C" {
        safe fn geteuid() -> u32;
    }
    ensure!(geteuid() == 0, "must run as root: {why}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// commands

fn print_command(cmd: &Command) {
    let mut line = String::from("$");
    if let Some(dir) = cmd.get_current_dir() {
        let _ = write!(line, " (cd {})", dir.display());
    }
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            let value = value.to_string_lossy();
            // PATH is long: show only what we put in front.
            let shown = match key.to_str() {
                Some("PATH") => value
                    .split(':')
                    .next()
                    .map_or(value.to_string(), |first| format!("{first}:$PATH")),
                _ => value.into_owned(),
            };
            let _ = write!(line, " {}={shown}", key.to_string_lossy());
        }
    }
    let _ = write!(line, " {}", cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(char::is_whitespace) || arg.contains('$') {
            let _ = write!(line, " '{arg}'");
        } else {
            let _ = write!(line, " {arg}");
        }
    }
    eprintln!("{line}");
}

/// Runs a command, failing if it does not exit successfully.
fn run(cmd: &mut Command) -> Result<()> {
    print_command(cmd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd.status().with_context(|| format!("running {program}"))?;
    ensure!(status.success(), "{program} failed ({status})");
    Ok(())
}

/// Runs a command and returns its exit code as ours.
fn exit_code_of(cmd: &mut Command) -> Result<ExitCode> {
    print_command(cmd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd.status().with_context(|| format!("running {program}"))?;
    Ok(match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => {
            eprintln!("xtask: {program} was killed ({status})");
            ExitCode::FAILURE
        }
    })
}

/// Runs a command and returns its standard output.
fn output(cmd: &mut Command) -> Result<String> {
    print_command(cmd);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(out.status.success(), "{program} failed ({})", out.status);
    String::from_utf8(out.stdout).with_context(|| format!("{program} printed non-UTF-8"))
}
