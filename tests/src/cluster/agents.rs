//! The agents on the nodes: starting, stopping, killing and restarting them, their logs,
//! and their CLI.

use std::{
    fs::{self, OpenOptions},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};

use super::{AgentSource, BPFFS_ROOT, Cluster, Node, ensure_bpffs_mounted, lock};
use crate::process::{Signal, netns_command, run_checked, run_with_timeout, stop_child};

impl Cluster {
    // ----- agents -----

    pub(super) fn agent_log_path(&self, node: &Node) -> PathBuf {
        self.work_dir.join(format!("agent-{}.log", node.name))
    }

    /// Starts the egress agent inside a node's namespace, reading the manifests folder.
    pub fn start_agent(&self, node: &str) -> Result<()> {
        self.start_agent_with_args(node, &[])
    }

    /// Starts the agent with extra `run` arguments (e.g. `--nat-port-range 1024-1123`).
    pub fn start_agent_with_args(&self, node: &str, extra: &[&str]) -> Result<()> {
        self.spawn_agent(node, &AgentSource::Manifests, extra)
    }

    /// Starts the egress agent inside a node's namespace, reading `source`.
    pub fn start_agent_with(&self, node: &str, source: &AgentSource) -> Result<()> {
        self.spawn_agent(node, source, &[])
    }

    pub(super) fn spawn_agent(
        &self,
        node: &str,
        source: &AgentSource,
        extra: &[&str],
    ) -> Result<()> {
        let node = self.node(node)?;
        if !self.agent_bin.is_file() {
            bail!(
                "agent binary {} not found: run `cargo build -p egress-agent` or set EGRESS_AGENT_BIN",
                self.agent_bin.display()
            );
        }
        ensure_bpffs_mounted()?;
        fs::create_dir_all(&node.bpffs)
            .with_context(|| format!("creating {}", node.bpffs.display()))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log_path(node))?;
        let mut command = netns_command(&node.netns, &[self.agent_bin.as_os_str()]);
        command
            .arg("run")
            .arg("--node-name")
            .arg(&node.name)
            .args(match source {
                AgentSource::Manifests => {
                    vec![
                        "--manifests".into(),
                        self.manifests.dir().as_os_str().to_owned(),
                    ]
                }
                AgentSource::Kubernetes { kubeconfig } => vec![
                    "--kubernetes".into(),
                    "--kubeconfig".into(),
                    kubeconfig.as_os_str().to_owned(),
                ],
            })
            .arg("--bpffs")
            .arg(&node.bpffs)
            .args(&self.agent_args)
            .args(&node.agent_args)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        // The log goes to a file: no colour codes.
        command.env("NO_COLOR", "1");
        let mut resources = lock(&self.resources);
        if resources.agents.contains_key(&node.name) {
            bail!("an agent is already running on {}", node.name);
        }
        let child = command.spawn().context("spawning the agent")?;
        resources.agents.insert(node.name.clone(), child);
        resources
            .agent_sources
            .insert(node.name.clone(), source.clone());
        resources
            .agent_state
            .insert(node.name.clone(), (node.netns.clone(), node.bpffs.clone()));
        Ok(())
    }

    /// Sets extra `egress-agent run` flags of a node's agent, used from its next start on.
    pub fn set_agent_args(&mut self, node: &str, args: &[&str]) -> Result<()> {
        let index = self.node_index(node)?;
        self.nodes[index].agent_args = args.iter().map(std::string::ToString::to_string).collect();
        Ok(())
    }

    /// Runs `egress-agent run` on a node in the foreground with a given manifests folder and
    /// a scratch bpffs folder, for start-up failures: returns how it exited (killed after
    /// `timeout` if it did not).
    pub fn run_agent_once(
        &self,
        node: &str,
        manifests: &Path,
        timeout: Duration,
    ) -> Result<Output> {
        let node = self.node(node)?;
        ensure_bpffs_mounted()?;
        let bpffs = Path::new(BPFFS_ROOT).join(format!("{}-{}-once", self.id, node.name));
        lock(&self.resources).agent_state.insert(
            format!("{}-once", node.name),
            (node.netns.clone(), bpffs.clone()),
        );
        let mut command = netns_command(&node.netns, &[self.agent_bin.as_os_str()]);
        command
            .arg("run")
            .arg("--node-name")
            .arg(&node.name)
            .arg("--manifests")
            .arg(manifests)
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--tunnel-device")
            .arg("egwonce")
            .arg("--metrics-address")
            .arg("127.0.0.1:0")
            .env("NO_COLOR", "1");
        run_with_timeout(command, timeout)
    }

    /// The pid of a node's running agent (`ip netns exec` execs it, so it is the child's).
    pub fn agent_pid(&self, node: &str) -> Result<u32> {
        let node = self.node(node)?;
        let mut resources = lock(&self.resources);
        match resources.agents.get_mut(&node.name) {
            Some(child) => match child.try_wait() {
                Ok(None) => Ok(child.id()),
                _ => bail!("the agent on {} has exited", node.name),
            },
            None => bail!("no agent running on {}", node.name),
        }
    }

    /// Lines of the node's agent log (across restarts) that contain every one of `needles`.
    pub fn agent_log_lines(&self, node: &str, needles: &[&str]) -> Vec<String> {
        self.agent_log(node)
            .lines()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .map(str::to_string)
            .collect()
    }

    pub fn start_all_agents(&self) -> Result<()> {
        for node in &self.nodes {
            self.start_agent(&node.name)?;
        }
        Ok(())
    }

    /// Sends `signal` to a node's agent and waits (up to 10 s, then SIGKILL) for it to exit.
    pub fn kill_agent(&self, node: &str, signal: Signal) -> Result<()> {
        let node = self.node(node)?;
        let mut child = lock(&self.resources)
            .agents
            .remove(&node.name)
            .ok_or_else(|| anyhow!("no agent running on {}", node.name))?;
        stop_child(&mut child, signal, Duration::from_secs(10));
        Ok(())
    }

    /// Stops the agent gracefully (SIGTERM) if running, then starts it again with the same
    /// source.
    pub fn restart_agent(&self, node: &str) -> Result<()> {
        if self.agent_running(node)? {
            self.kill_agent(node, Signal::Term)?;
        }
        let name = &self.node(node)?.name;
        let source = lock(&self.resources)
            .agent_sources
            .get(name)
            .cloned()
            .unwrap_or(AgentSource::Manifests);
        self.start_agent_with(node, &source)
    }

    /// True if the node's agent was started and has not exited.
    pub fn agent_running(&self, node: &str) -> Result<bool> {
        let node = self.node(node)?;
        let mut resources = lock(&self.resources);
        Ok(match resources.agents.get_mut(&node.name) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        })
    }

    /// Everything the node's agent logged (across restarts).
    pub fn agent_log(&self, node: &str) -> String {
        match self.node(node) {
            Ok(node) => fs::read_to_string(self.agent_log_path(node)).unwrap_or_default(),
            Err(error) => error.to_string(),
        }
    }

    /// Runs `egress-agent <args> --bpffs <node's folder>` in the node's namespace; fails unless it succeeds.
    pub fn agent_cli(&self, node: &str, args: &[&str]) -> Result<String> {
        let node = self.node(node)?;
        let mut command = netns_command(&node.netns, &[self.agent_bin.as_os_str()]);
        command.args(args).arg("--bpffs").arg(&node.bpffs);
        let output = run_checked(command)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}
