//! Tearing a cluster down, also when a test panics or the process is killed: what each
//! cluster created, a handle signal handlers can use, and the sweep of stale clusters.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{Arc, Mutex, Weak},
    thread,
    time::Duration,
};

use super::{AgentSource, BPFFS_ROOT, Cluster, NAME_PREFIX, lock};
use crate::{
    capture::Capture,
    process::{Background, Signal, ip, netns_command, run_with_timeout, stop_child},
};

/// What teardown must undo; shared with `TeardownHandle` so a signal handler can clean up.
pub(super) struct Resources {
    pub(super) agents: BTreeMap<String, Child>,
    /// The source each node's agent was last started with, for restarts.
    pub(super) agent_sources: BTreeMap<String, AgentSource>,
    /// Nodes whose agent ever ran: (netns, bpffs folder) to run `cleanup` against.
    pub(super) agent_state: BTreeMap<String, (String, PathBuf)>,
    pub(super) peer: Option<Background>,
    pub(super) capture: Option<Capture>,
    /// In creation order; deleted in reverse.
    pub(super) namespaces: Vec<String>,
    pub(super) work_dir: PathBuf,
    pub(super) agent_bin: PathBuf,
    pub(super) torn_down: bool,
}

/// Tears a cluster down from elsewhere (e.g. a Ctrl-C handler); idempotent.
#[derive(Clone)]
pub struct TeardownHandle(pub(super) Arc<Mutex<Resources>>);

impl TeardownHandle {
    pub fn teardown(&self) {
        lock(&self.0).teardown();
    }
}

/// Every live cluster of this process, for `teardown_all_clusters`.
pub(super) static LIVE_CLUSTERS: Mutex<Vec<Weak<Mutex<Resources>>>> = Mutex::new(Vec::new());

/// Tears down every cluster of this process (for signal handlers).
pub fn teardown_all_clusters() {
    let live: Vec<_> = LIVE_CLUSTERS
        .lock()
        .map(|list| list.clone())
        .unwrap_or_default();
    for resources in live.iter().filter_map(Weak::upgrade) {
        TeardownHandle(resources).teardown();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            self.dump_logs();
        }
        lock(&self.resources).teardown();
    }
}

impl Resources {
    pub(super) fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        // Processes first: a namespace is only freed once nothing runs in it.
        for child in self.agents.values_mut() {
            crate::process::signal_child(child, Signal::Term);
        }
        for child in self.agents.values_mut() {
            stop_child(child, Signal::Term, Duration::from_secs(5));
        }
        self.agents.clear();
        self.capture = None;
        self.peer = None;
        // Then whatever the agents left pinned or attached.
        if self.agent_bin.is_file() {
            for (netns, bpffs) in self.agent_state.values() {
                let mut command = netns_command(netns, &[self.agent_bin.as_os_str()]);
                command.arg("cleanup").arg("--bpffs").arg(bpffs);
                match run_with_timeout(command, Duration::from_secs(20)) {
                    Ok(output) if !output.status.success() => {
                        eprintln!(
                            "agent cleanup in {netns} failed: {}",
                            String::from_utf8_lossy(&output.stderr)
                        );
                    }
                    Err(error) => eprintln!("agent cleanup in {netns} failed: {error:#}"),
                    Ok(_) => {}
                }
            }
        }
        for namespace in self.namespaces.iter().rev() {
            delete_netns(namespace);
        }
        self.namespaces.clear();
        for (_, bpffs) in self.agent_state.values() {
            let _ = fs::remove_dir_all(bpffs);
        }
        if std::env::var_os("EGRESS_TESTS_KEEP_WORKDIR").is_none() {
            let _ = fs::remove_dir_all(&self.work_dir);
        }
    }
}

/// Kills whatever still runs in a namespace of ours, then deletes it.
pub(super) fn delete_netns(name: &str) {
    if let Ok(output) = run_with_timeout(
        {
            let mut command = Command::new("ip");
            command.args(["netns", "pids", name]);
            command
        },
        Duration::from_secs(10),
    ) {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<libc::pid_t>() {
                // SAFETY: plain kill(2) of a process inside a namespace this harness created.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    if let Err(error) = ip(&["netns", "del", name]) {
        eprintln!("deleting netns {name}: {error:#}");
    }
}

/// Removes namespaces, bpffs folders and work dirs left by harness processes that died without
/// tearing down (e.g. `SIGKILLed`). Only names `egt<pid>-...` whose pid no longer exists.
pub fn remove_stale_clusters() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dead_owner = |name: &str| -> bool {
            let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
                return false;
            };
            let Some((pid, _)) = rest.split_once('-') else {
                return false;
            };
            pid.parse::<u32>()
                .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        };
        if let Ok(entries) = fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if dead_owner(&name) {
                    delete_netns(&name);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(BPFFS_ROOT) {
            for entry in entries.flatten() {
                if dead_owner(&entry.file_name().to_string_lossy()) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.strip_prefix("egress-tests-").is_some_and(dead_owner) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
    });
}
