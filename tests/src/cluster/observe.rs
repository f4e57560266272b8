//! What a test looks at: the destination's peer and its log, packet captures, the agents'
//! maps and counters, waiting for them to be programmed, and logs when a test fails.

use std::{
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use super::{Cluster, Pod, lock, wait_for_value, wait_until};
use crate::{
    agent::{Counters, EgressEntry},
    capture::{Capture, CapturedPacket},
    peer::{self, PeerRecord},
    process::{Background, netns_command},
};

impl Cluster {
    // ----- destination -----

    pub(super) fn peer_log_path(&self) -> PathBuf {
        self.work_dir.join("peer.log")
    }

    pub(super) fn start_peer(&self) -> Result<()> {
        let log = self.peer_log_path();
        let mut args = vec![
            self.peer_bin.to_string_lossy().into_owned(),
            "serve".into(),
            "--http".into(),
            format!("0.0.0.0:{}", peer::PEER_HTTP_PORT),
            "--udp".into(),
            format!("0.0.0.0:{}", peer::PEER_UDP_PORT),
            "--log".into(),
            log.to_string_lossy().into_owned(),
        ];
        for port in &self.extra_peer_ports {
            args.extend([
                "--http".into(),
                format!("0.0.0.0:{port}"),
                "--udp".into(),
                format!("0.0.0.0:{port}"),
            ]);
        }
        let mut process = Background::spawn(
            netns_command(&self.destination, &args),
            &self.work_dir.join("peer"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !process.stdout().contains("ready") {
            if !process.is_running() || Instant::now() > deadline {
                bail!(
                    "egress-peer did not start ({}): {}",
                    self.peer_bin.display(),
                    process.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        lock(&self.resources).peer = Some(process);
        Ok(())
    }

    /// Every connection and datagram the destination's peer received so far.
    pub fn peer_log(&self) -> Vec<PeerRecord> {
        peer::parse_log(&fs::read_to_string(self.peer_log_path()).unwrap_or_default())
    }

    /// Starts tcpdump on the destination's eth0.
    pub fn start_capture(&mut self) -> Result<()> {
        let name = format!("capture-{}", self.next_capture);
        self.next_capture += 1;
        let capture = Capture::start(&self.destination, "eth0", &self.work_dir, &name)?;
        let previous = lock(&self.resources).capture.replace(capture);
        if previous.is_some() {
            bail!("a capture was already running (it has been discarded)");
        }
        Ok(())
    }

    /// Stops the capture and returns every IPv4 packet the destination saw.
    pub fn stop_capture(&mut self) -> Result<Vec<CapturedPacket>> {
        let capture = lock(&self.resources)
            .capture
            .take()
            .ok_or_else(|| anyhow!("no capture running"))?;
        capture.stop()
    }

    /// `egress-agent bpf egress list -o json` on a node.
    /// `curl` of the agent's metrics endpoint in the node's namespace: (HTTP status, body).
    pub fn agent_http_get(&self, node: &str, path: &str) -> Option<(u16, String)> {
        let netns = self.node(node).ok()?.netns.clone();
        let url = format!("http://127.0.0.1:9969{path}");
        let args = [
            "curl",
            "-s",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            &url,
        ];
        let output = self.exec(&netns, &args).ok()?;
        if !output.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n')?;
        Some((status.trim().parse().ok()?, body.to_owned()))
    }

    /// The value of one series of the agent's /metrics (see [`metric_value`]).
    pub fn agent_metric(&self, node: &str, series: &str) -> Option<f64> {
        let (status, body) = self.agent_http_get(node, "/metrics")?;
        (status == 200).then(|| metric_value(&body, series))?
    }

    pub fn egress_list(&self, node: &str) -> Result<Vec<EgressEntry>> {
        let json = self.agent_cli(node, &["bpf", "egress", "list", "-o", "json"])?;
        serde_json::from_str(&json).with_context(|| format!("parsing egress list {json:?}"))
    }

    /// `egress-agent bpf counters -o json` on a node.
    pub fn counters(&self, node: &str) -> Result<Counters> {
        let json = self.agent_cli(node, &["bpf", "counters", "-o", "json"])?;
        serde_json::from_str(&json).with_context(|| format!("parsing counters {json:?}"))
    }

    /// Packets counted under `reason` on a node (0 if the reason is absent).
    pub fn counter_packets(&self, node: &str, reason: &str) -> Result<u64> {
        Ok(self
            .counters(node)?
            .get(reason)
            .map_or(0, |counter| counter.packets))
    }

    /// `egress-agent bpf nat list -o json` on a node.
    pub fn nat_list(&self, node: &str) -> Result<serde_json::Value> {
        let json = self.agent_cli(node, &["bpf", "nat", "list", "-o", "json"])?;
        serde_json::from_str(&json).with_context(|| format!("parsing nat list {json:?}"))
    }

    /// Polls a node's egress list until an entry satisfies `matches`; fails early if the agent died.
    pub fn wait_for_egress_entry(
        &self,
        node: &str,
        timeout: Duration,
        what: &str,
        matches: impl Fn(&EgressEntry) -> bool,
    ) -> Result<EgressEntry> {
        let mut last = String::from("(never listed)");
        let found = wait_for_value(timeout, || {
            if !self.agent_running(node).unwrap_or(false) {
                return Some(Err(anyhow!("the agent on {node} is not running")));
            }
            match self.egress_list(node) {
                Ok(entries) => {
                    let found = entries.iter().find(|entry| matches(entry)).cloned();
                    last = format!("{entries:#?}");
                    found.map(Ok)
                }
                Err(error) => {
                    last = format!("{error:#}");
                    None
                }
            }
        });
        match found {
            Some(Ok(entry)) => Ok(entry),
            Some(Err(error)) => bail!(
                "{error:#} (waiting for {what})\n{}",
                self.agent_log_tail(node)
            ),
            None => bail!(
                "timed out after {timeout:?} waiting on {node} for {what}; last egress list: {last}\n{}",
                self.agent_log_tail(node)
            ),
        }
    }

    /// Waits until the pod's node programmed an entry for the pod (the agent is ready for it).
    pub fn wait_for_pod_programmed(&self, pod: &Pod, timeout: Duration) -> Result<EgressEntry> {
        self.wait_for_egress_entry(
            &pod.node,
            timeout,
            &format!("an entry for {}", pod.ip),
            |entry| entry.source() == Some(pod.ip),
        )
    }

    /// Waits until the pod's traffic is steered to `gateway`: the pod's node points at it and the
    /// gateway node (if its agent runs) knows the pod with a real egress IP.
    pub fn wait_for_pod_gateway(
        &self,
        pod: &Pod,
        gateway: Ipv4Addr,
        timeout: Duration,
    ) -> Result<()> {
        let what = format!("{} steered to gateway {gateway}", pod.ip);
        self.wait_for_egress_entry(&pod.node, timeout, &what, |entry| {
            entry.source() == Some(pod.ip) && entry.gateway() == Some(gateway)
        })?;
        let gateway_node = self
            .node_by_ip(gateway)
            .ok_or_else(|| anyhow!("no node has IP {gateway}"))?;
        if self.agent_running(&gateway_node.name)? {
            let what = format!("{} with an egress IP on the gateway", pod.ip);
            self.wait_for_egress_entry(&gateway_node.name, timeout, &what, |entry| {
                entry.source() == Some(pod.ip)
                    && entry
                        .egress()
                        .is_some_and(|egress| !egress.is_unspecified())
            })?;
            // Agents start together: the pod's node may have judged the gateway down before
            // its datapath answered probes. Usable once the prober says so (no verdict yet
            // means usable too).
            let series = format!(
                "egress_gateway_gateway_healthy{{node=\"{}\"}}",
                gateway_node.name
            );
            let usable = wait_until(timeout, || {
                gateway_node.ip == pod_node_ip(self, pod)
                    || self.agent_metric(&pod.node, &series) != Some(0.0)
            });
            if !usable {
                bail!(
                    "{}'s prober still finds {} down",
                    pod.node,
                    gateway_node.name
                );
            }
        }
        Ok(())
    }

    /// Waits until no node with a running agent has an entry for the pod (e.g. after deleting
    /// the policy or the pod); agents reconcile independently, so every node is checked.
    pub fn wait_for_pod_unprogrammed(&self, pod: &Pod, timeout: Duration) -> Result<()> {
        for node in &self.nodes {
            if !self.agent_running(&node.name)? {
                continue;
            }
            let gone = wait_until(timeout, || {
                self.egress_list(&node.name)
                    .is_ok_and(|entries| entries.iter().all(|entry| entry.source() != Some(pod.ip)))
            });
            if !gone {
                bail!(
                    "entries for {} still on {} after {timeout:?}\n{}",
                    pod.ip,
                    node.name,
                    self.agent_log_tail(&node.name)
                );
            }
        }
        Ok(())
    }

    pub(super) fn agent_log_tail(&self, node: &str) -> String {
        let log = self.agent_log(node);
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        format!(
            "--- last lines of the agent log of {node} ---\n{}",
            tail.join("\n")
        )
    }

    /// Prints agent and peer logs to stderr (done automatically when a test panics).
    pub fn dump_logs(&self) {
        eprintln!(
            "=== cluster {} (work dir {}) ===",
            self.id,
            self.work_dir.display()
        );
        for node in &self.nodes {
            if self.agent_log_path(node).exists() {
                eprintln!("{}", self.agent_log_tail(&node.name));
            }
            if self.agent_running(&node.name).unwrap_or(false) {
                let counters: Vec<String> = match self.counters(&node.name) {
                    Ok(counters) => counters
                        .iter()
                        .filter(|(_, counter)| counter.packets > 0)
                        .map(|(reason, counter)| format!("{reason}={}", counter.packets))
                        .collect(),
                    Err(error) => vec![format!("{error:#}")],
                };
                eprintln!(
                    "--- counters of {} (packets): {}",
                    node.name,
                    counters.join(" ")
                );
            }
        }
        let records = self.peer_log();
        let shown = &records[records.len().saturating_sub(20)..];
        eprintln!(
            "--- destination peer saw {} connections/datagrams; last: {shown:?}",
            records.len()
        );
    }
}

/// The value of the series `series` in a Prometheus scrape, its labels as rendered
/// (`a_total{reason="x"}`).
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
}

/// The underlay address of the node a pod runs on (unspecified when unknown).
fn pod_node_ip(cluster: &Cluster, pod: &Pod) -> Ipv4Addr {
    cluster
        .node(&pod.node)
        .map_or(Ipv4Addr::UNSPECIFIED, |node| node.ip)
}
