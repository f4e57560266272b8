//! Long-lived flows from pods (the `egress-peer` clients `tcp-hold` and `udp-stream`) that run
//! while a test changes things, and report at the end whether they ever broke.

use std::{collections::BTreeSet, fs, net::SocketAddrV4, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::{
    cluster::{Cluster, Pod},
    peer::DESTINATION_IP,
    process::Background,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowKind {
    /// One TCP connection exchanging a line every 100 ms.
    Tcp,
    /// One UDP socket sending a datagram every 20 ms.
    Udp,
}

/// A flow running in the background.
pub struct LongFlow {
    pub kind: FlowKind,
    pub pod: String,
    pub port: u16,
    process: Background,
    stop_file: PathBuf,
}

/// What a long flow reported when it stopped (fields of the other kind stay at their default).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct FlowSummary {
    // tcp-hold
    pub connected: u64,
    pub connect_failed: u64,
    pub connect_errors: Vec<String>,
    pub still_working: u64,
    pub broken: Vec<String>,
    pub exchanges: u64,
    // udp-stream
    pub sent: u64,
    pub send_errors: u64,
    pub received: u64,
    pub receive_errors: Vec<String>,
    // both
    pub max_gap_ms: u64,
    /// Source IPs the destination reported seeing.
    pub sources: BTreeSet<String>,
}

impl Cluster {
    /// Starts a long flow from `pod` to the destination's `port` (HTTP `/hold` or UDP echo).
    pub fn start_long_flow(&self, pod: &Pod, kind: FlowKind, port: u16) -> Result<LongFlow> {
        let name = format!(
            "flow-{}-{}-{port}-{}",
            pod.name,
            if kind == FlowKind::Tcp { "tcp" } else { "udp" },
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let stop_file = self.work_dir().join(format!("{name}.stop"));
        let server = SocketAddrV4::new(DESTINATION_IP, port).to_string();
        let stop = stop_file.to_string_lossy().into_owned();
        let peer = self.peer_bin().to_string_lossy().into_owned();
        let args: Vec<&str> = match kind {
            FlowKind::Tcp => vec![&peer, "tcp-hold", &server, "--until-file", &stop],
            FlowKind::Udp => vec![&peer, "udp-stream", &server, "--until-file", &stop],
        };
        let process = self.spawn_in_pod(pod, &name, &args)?;
        Ok(LongFlow {
            kind,
            pod: pod.name.clone(),
            port,
            process,
            stop_file,
        })
    }
}

impl LongFlow {
    /// For TCP: waits until the connection is up (fails if it could not connect).
    pub fn wait_connected(&mut self, timeout: Duration) -> Result<()> {
        if self.kind != FlowKind::Tcp {
            return Ok(());
        }
        let connected = crate::cluster::wait_until(timeout, || {
            self.process.stdout().contains("connected ") || !self.process.is_running()
        });
        let stdout = self.process.stdout();
        if !connected || !stdout.contains("connected 1 failed 0") {
            bail!(
                "tcp flow from {} to port {} did not connect: {stdout} {}",
                self.pod,
                self.port,
                self.process.stderr()
            );
        }
        Ok(())
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Stops the flow and returns its summary.
    pub fn stop(self) -> Result<FlowSummary> {
        fs::write(&self.stop_file, b"stop").context("writing the stop file")?;
        let what = format!(
            "{:?} flow from {} to port {}",
            self.kind, self.pod, self.port
        );
        let finished = self
            .process
            .wait(Duration::from_mins(1))
            .with_context(|| format!("stopping the {what}"))?;
        if !finished.status.success() {
            bail!("{what} failed ({}): {}", finished.status, finished.stderr);
        }
        let json = finished
            .stdout
            .lines()
            .rev()
            .find(|line| line.starts_with('{'))
            .with_context(|| format!("{what} printed no summary: {}", finished.stdout))?;
        serde_json::from_str(json).with_context(|| format!("{what}: parsing {json:?}"))
    }
}

impl FlowSummary {
    /// The flow never broke: every exchange (TCP) or datagram (UDP) was answered, the
    /// longest pause between answers stayed under `max_gap`, and the destination only ever
    /// saw `expected_source`.
    pub fn check_unbroken(&self, expected_source: &str, max_gap: Duration) -> Result<()> {
        let problems: Vec<String> = [
            (!self.broken.is_empty()).then(|| format!("broken: {:?}", self.broken)),
            (self.connect_failed > 0).then(|| format!("connect failed: {:?}", self.connect_errors)),
            (self.received < self.sent).then(|| {
                format!(
                    "{} of {} datagrams unanswered",
                    self.sent - self.received,
                    self.sent
                )
            }),
            (self.exchanges + self.received == 0).then(|| "no exchange at all".to_string()),
            (self.max_gap_ms > max_gap.as_millis() as u64)
                .then(|| format!("a {} ms pause without answers", self.max_gap_ms)),
            (self.sources.iter().any(|source| source != expected_source))
                .then(|| format!("seen with sources {:?}", self.sources)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !problems.is_empty() {
            bail!(
                "flow expected unbroken from {expected_source}: {}; {self:?}",
                problems.join("; ")
            );
        }
        Ok(())
    }
}
