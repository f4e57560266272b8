//! Running commands: inside network namespaces, with timeouts, and in the background.

use std::{
    ffi::OsStr,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Default limit for one command, so a hung tool fails the test instead of hanging it.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_mins(1);

/// Signals the harness sends to the processes it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
    Int,
}

impl Signal {
    pub fn raw(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Int => libc::SIGINT,
        }
    }
}

/// Sends `signal` to a child that has not been reaped yet (so its pid cannot be reused).
pub fn signal_child(child: &mut Child, signal: Signal) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: plain kill(2) on the pid of our own unreaped child.
        unsafe { libc::kill(child.id().cast_signed(), signal.raw()) };
    }
}

/// Signals a child, waits up to `grace` for it to exit, then kills it.
pub fn stop_child(child: &mut Child, signal: Signal, grace: Duration) {
    signal_child(child, signal);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `ip netns exec <ns> <args...>` as a `Command` (ip execs the program, so the pid is the program's).
pub fn netns_command<S: AsRef<OsStr>>(netns: &str, args: &[S]) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns]);
    command.args(args);
    command
}

/// Runs a command to completion, killing it after `timeout`.
pub fn run_with_timeout(mut command: Command, timeout: Duration) -> Result<Output> {
    let description = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {description}"))?;
    let pid = child.id();
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    if let Ok(output) = receiver.recv_timeout(timeout) {
        output.with_context(|| format!("waiting for {description}"))
    } else {
        // The waiter thread still owns the child, so the pid cannot have been reused yet.
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid.cast_signed(), libc::SIGKILL) };
        bail!("{description} did not finish within {timeout:?}")
    }
}

/// Runs a command and fails with its stderr unless it exits successfully.
pub fn run_checked(command: Command) -> Result<Output> {
    let description = format!("{command:?}");
    let output = run_with_timeout(command, DEFAULT_COMMAND_TIMEOUT)?;
    if !output.status.success() {
        bail!(
            "{description} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(output)
}

/// Runs `ip <args>` in the current (root) namespace; callers pass `-n <ns>` to stay out of it.
pub fn ip(args: &[&str]) -> Result<Output> {
    let mut command = Command::new("ip");
    command.args(args);
    run_checked(command)
}

/// Runs `ip -n <ns> <args>`: configure a namespace without entering it.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<Output> {
    let mut command = Command::new("ip");
    command.args(["-n", netns]).args(args);
    run_checked(command)
}

/// Sets sysctls inside a namespace (`/proc/sys/net` is per namespace).
pub fn sysctl_in(netns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    run_checked(netns_command(netns, &args))?;
    Ok(())
}

/// A process started in the background whose output goes to files; killed when dropped.
pub struct Background {
    child: Child,
    description: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

/// How a background process ended and what it printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Background {
    /// Spawns `command`, sending its output to `<log_stem>.out` / `<log_stem>.err`.
    pub fn spawn(mut command: Command, log_stem: &Path) -> Result<Background> {
        let description = format!("{command:?}");
        let stdout_path = log_stem.with_extension("out");
        let stderr_path = log_stem.with_extension("err");
        let child = command
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path)?)
            .stderr(File::create(&stderr_path)?)
            .spawn()
            .with_context(|| format!("spawning {description}"))?;
        Ok(Background {
            child,
            description,
            stdout_path,
            stderr_path,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn signal(&mut self, signal: Signal) {
        signal_child(&mut self.child, signal);
    }

    /// Waits for the process to exit by itself, failing (and killing it) after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Result<Finished> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Finished {
                    status,
                    stdout: self.stdout(),
                    stderr: self.stderr(),
                });
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still running after {timeout:?}; stdout: {} stderr: {}",
                    self.description,
                    self.stdout().trim(),
                    self.stderr().trim()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        stop_child(&mut self.child, Signal::Kill, Duration::from_secs(2));
    }
}
