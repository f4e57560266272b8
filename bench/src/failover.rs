//! Failover of the active gateway, measured over repeated trials per fault type, and the
//! kernel's cost of answering health probes on a gateway.
//!
//! The cluster is the one of the failover tests (`tests/tests/failover.rs`): gateway
//! candidates k8s-worker-2 (A, first by name) and k8s-worker-3 (B), each leaving through its
//! eth1 (192.0.2.12 and 192.0.2.13), policy `app` (`interface: eth1`), the pod my-app on
//! k8s-worker-1. Each trial: a UDP stream from the pod at a datagram every millisecond
//! (`egress-peer udp-stream --interval-ms 1`, through A), a second of it, the fault on A,
//! polling with HTTP requests until one leaves through B, a second more, stop. The failover
//! gap is the stream's longest pause between echoes at the pod (`max_gap_ms`); lost
//! datagrams are `sent - received`; the capture's timestamps give the longest pause between
//! the stream's datagrams arriving at the destination, the way there alone. Then the fault
//! is undone and the next trial waits until new requests leave through A again. The
//! destination is captured during every trial and the leak detector counts packets of the
//! pod's flows with any other source than A or B.
//!
//! The probe load: probe frames sent from B (which has no selected pods; it probes only A,
//! the candidate before it, once a second while quiet)
//! to A's tunnel port at a fixed rate, answered by A's XDP responder (and, side by side, the
//! same frames asking for A's TC program), against the same frames sent at the same rate to
//! a closed UDP port of A; the difference in the sender's CPU time per datagram (which holds
//! the softirq work each send sets off, see `measure::probe_flood`) is what answering one
//! probe costs in the kernel: for XDP the responder and the redirect back; for TC VXLAN
//! decapsulation, the `from_tunnel` program and encapsulation of the answer; for both also
//! the answer's trip back and its decapsulation on B (so an upper bound). Spoilt probes (A's
//! program parses and drops them) against the closed port give the receive side alone, for
//! scale. The whole machine's busy CPU (`/proc/stat`) is recorded beside it, but on a
//! shared machine it is noise.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use egress_common::{config::DEFAULT_TUNNEL_PORT, program_names};
use egress_tests::{
    AgentSource, Background, Cluster, ClusterConfig, FlowSummary, LeakDetector, Pod, Signal,
    expected::{EgressSource, SimplePolicy},
    peer::DESTINATION_IP,
    process::{netns_command, run_with_timeout},
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{Binaries, Params, program_stats, report::summary};

const POD_NODE: &str = "k8s-worker-1";
/// The first candidate by name, and the next one; each leaves through its eth1.
const GATEWAY_A: &str = "k8s-worker-2";
const GATEWAY_B: &str = "k8s-worker-3";
const GATEWAY_A_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const GATEWAY_B_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 13);
const EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);
const EGRESS_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 13);
const EGRESS_A_CIDR: &str = "192.0.2.12/24";
const POD_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
/// HTTP requests (which gateway new flows take) and the UDP stream get a port each.
const APP_PORT: u16 = 9001;
const STREAM_PORT: u16 = 9002;
/// One datagram per millisecond: lost datagrams x 1 ms is the loss in time.
pub(crate) const STREAM_INTERVAL_MS: u64 = 1;
/// Streaming before the fault, and after new flows moved.
const BEFORE_FAULT: Duration = Duration::from_secs(1);
const AFTER_MOVE: Duration = Duration::from_secs(1);
/// How long the stream runs after the agent was killed (no failover expected).
const AFTER_AGENT_KILL: Duration = Duration::from_secs(3);
/// For new flows to move, and for the cluster to come back after a fault.
const SETTLE: Duration = Duration::from_secs(30);
/// A trial whose stream did not start through A (its source port was still pinned to B by
/// an earlier trial's flow) is run again, at most this many times per fault type.
const MAX_REDONE: usize = 5;

/// The ways the active gateway fails, as the issue lists them, and the agent killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    LinksDown,
    EgressInterfaceDown,
    EgressIpRemoved,
    NodeDeleted,
    AgentKilled,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::LinksDown,
        Fault::EgressInterfaceDown,
        Fault::EgressIpRemoved,
        Fault::NodeDeleted,
        Fault::AgentKilled,
    ];

    fn id(self) -> &'static str {
        match self {
            Fault::LinksDown => "links_down",
            Fault::EgressInterfaceDown => "egress_interface_down",
            Fault::EgressIpRemoved => "egress_ip_removed",
            Fault::NodeDeleted => "node_deleted",
            Fault::AgentKilled => "agent_killed",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Fault::LinksDown => "links down (eth0 and eth1 of the active gateway)",
            Fault::EgressInterfaceDown => "egress interface down (eth1)",
            Fault::EgressIpRemoved => "egress IP removed (192.0.2.12 from eth1)",
            Fault::NodeDeleted => "node deleted from the inventory",
            Fault::AgentKilled => "agent killed (SIGKILL) on the active gateway: no failover",
        }
    }

    /// Whether the pod's traffic must move to B.
    fn moves(self) -> bool {
        self != Fault::AgentKilled
    }
}

/// One trial of one fault type.
#[derive(Debug, Serialize)]
struct Trial {
    /// The stream's longest pause between two echoes at the pod.
    gap_ms: u64,
    /// The longest pause between two of the stream's datagrams arriving at the destination
    /// (the capture's timestamps): the gap on the way there alone.
    destination_gap_ms: Option<f64>,
    sent: u64,
    received: u64,
    lost: u64,
    send_errors: u64,
    /// Datagrams sent per second (a sleep of 1 ms between sends gives a little less than
    /// 1,000).
    datagrams_per_s: f64,
    /// Egress IPs the destination saw for the stream.
    sources: Vec<String>,
    /// From the fault to the first HTTP request answered through B (requests are polled one
    /// after another, each a new curl: a coarse upper bound of when new flows moved).
    new_flows_moved_ms: Option<f64>,
    /// From undoing the fault to the first request through A again.
    back_on_a_ms: f64,
    /// Packets of the pod's flows at the destination, and those with a wrong source.
    matched_packets: usize,
    leaked_packets: usize,
}

pub(crate) fn run(params: &Params, bins: &Binaries) -> Result<Value> {
    let started = Instant::now();
    let (mut cluster, pod) = two_candidates(bins)?;
    let mut faults = Vec::new();
    for fault in Fault::ALL {
        eprintln!(
            "-- failover: {} ({} trials)",
            fault.label(),
            params.failover_trials
        );
        let before = failovers(&cluster);
        let mut trials = Vec::new();
        let mut redone = Vec::new();
        while trials.len() < params.failover_trials {
            let trial = trial(&mut cluster, &pod, fault)
                .with_context(|| format!("{}: trial {}", fault.label(), trials.len() + 1))?;
            if !trial.sources.contains(&EGRESS_A.to_string()) {
                // A source port an earlier trial's flow (pinned to B) still held: this
                // stream never went through A, so it measured nothing.
                if redone.len() == MAX_REDONE {
                    bail!(
                        "{}: {} streams did not start through {GATEWAY_A}: {trial:?}",
                        fault.label(),
                        redone.len() + 1
                    );
                }
                redone.push(trial);
                continue;
            }
            if fault.moves() && !trial.sources.contains(&EGRESS_B.to_string()) {
                bail!(
                    "{}: the stream did not go on through {GATEWAY_B}: {trial:?}",
                    fault.label()
                );
            }
            eprintln!(
                "   gap {} ms ({} at the destination), lost {} of {}, new flows moved after {}",
                trial.gap_ms,
                trial
                    .destination_gap_ms
                    .map_or("-".into(), |ms| format!("{ms:.0} ms")),
                trial.lost,
                trial.sent,
                trial
                    .new_flows_moved_ms
                    .map_or("-".into(), |ms| format!("{ms:.0} ms"))
            );
            trials.push(trial);
        }
        let after = failovers(&cluster);
        faults.push(fault_json(fault, &trials, &redone, &before, &after));
    }
    eprintln!("-- probes a probing node sends, idle and with its traffic answered");
    let probe_rates = probe_rates(&cluster, &pod)?;
    eprintln!("-- probe load on a gateway: probe floods from {GATEWAY_B} to {GATEWAY_A}");
    let probe_load = probe_load(&cluster, params, bins)?;
    drop(pod);
    drop(cluster);
    Ok(json!({
        "pod_node": POD_NODE,
        "gateways": [GATEWAY_A, GATEWAY_B],
        "egress_ips": [EGRESS_A.to_string(), EGRESS_B.to_string()],
        "trials_per_fault": params.failover_trials,
        "stream_interval_ms": STREAM_INTERVAL_MS,
        "before_fault_ms": BEFORE_FAULT.as_millis() as u64,
        "after_move_ms": AFTER_MOVE.as_millis() as u64,
        "after_agent_kill_ms": AFTER_AGENT_KILL.as_millis() as u64,
        "probe_interval_ms": 50,
        "probe_multiplier": 3,
        "faults": faults,
        "probe_rates": probe_rates,
        "probe_load": probe_load,
        "elapsed_seconds": started.elapsed().as_secs_f64(),
    }))
}

fn fault_json(
    fault: Fault,
    trials: &[Trial],
    redone: &[Trial],
    before: &[(&str, u64)],
    after: &[(&str, u64)],
) -> Value {
    let of = |f: fn(&Trial) -> f64| summary(&trials.iter().map(f).collect::<Vec<_>>());
    let moved: Vec<f64> = trials.iter().filter_map(|t| t.new_flows_moved_ms).collect();
    let causes: serde_json::Map<String, Value> = before
        .iter()
        .zip(after)
        .map(|((cause, b), (_, a))| ((*cause).to_owned(), json!(a.saturating_sub(*b))))
        .collect();
    json!({
        "id": fault.id(),
        "label": fault.label(),
        "failover_expected": fault.moves(),
        "gap_ms": of(|t| t.gap_ms as f64),
        "destination_gap_ms": summary(
            &trials.iter().filter_map(|t| t.destination_gap_ms).collect::<Vec<_>>()
        ),
        "lost_datagrams": of(|t| t.lost as f64),
        "datagrams_per_s": of(|t| t.datagrams_per_s),
        "new_flows_moved_ms": summary(&moved),
        "back_on_a_ms": of(|t| t.back_on_a_ms),
        // The leak detector counts every trial, also those run again.
        "leaked_packets": trials.iter().chain(redone).map(|t| t.leaked_packets).sum::<usize>(),
        "matched_packets": trials.iter().chain(redone).map(|t| t.matched_packets).sum::<usize>(),
        "redone_trials": redone.len(),
        "redone": redone,
        "failovers_counted": causes,
        "trials": trials,
    })
}

/// Both gateways labelled egress-node=true with an eth1, policy `app` (app=my-app,
/// `interface: eth1`), my-app on worker-1 served through A.
fn two_candidates(bins: &Binaries) -> Result<(Cluster, Pod)> {
    let mut cluster = Cluster::new(ClusterConfig {
        agent_bin: bins.agent.clone(),
        peer_bin: bins.peer.clone(),
        extra_peer_ports: vec![APP_PORT, STREAM_PORT],
        // The floods compare the XDP responder with the TC program.
        agent_args: vec!["--probe-responder".into(), "xdp".into()],
        ..ClusterConfig::default()
    })?;
    for node in [GATEWAY_A, GATEWAY_B] {
        cluster.add_secondary_interface(node)?;
        cluster.label_node(node, "egress-node", "true")?;
    }
    SimplePolicy::new(
        "app",
        &[("app", "my-app")],
        &["198.51.100.0/24"],
        &[("egress-node", "true")],
        EgressSource::Interface("eth1".into()),
    )
    .apply(&cluster)?;
    let pod = cluster.add_pod(POD_NODE, "default", "my-app", &[("app", "my-app")])?;
    cluster.start_all_agents()?;
    wait_served(&cluster, &pod, EGRESS_A)?;
    Ok((cluster, pod))
}

fn trial(cluster: &mut Cluster, pod: &Pod, fault: Fault) -> Result<Trial> {
    cluster.start_capture()?;
    let stream = Stream::start(cluster, pod)?;
    thread::sleep(BEFORE_FAULT);
    let faulted = Instant::now();
    apply(cluster, fault)?;
    let new_flows_moved_ms = if fault.moves() {
        wait_served(cluster, pod, EGRESS_B)?;
        let moved = faulted.elapsed();
        thread::sleep(AFTER_MOVE);
        Some(moved.as_secs_f64() * 1000.0)
    } else {
        thread::sleep(AFTER_AGENT_KILL);
        let seen = source_seen(cluster, pod);
        if seen != Some(EGRESS_A) {
            bail!("with the agent on {GATEWAY_A} killed, a new request left as {seen:?}");
        }
        None
    };
    let (flow, seconds) = stream.stop()?;
    let packets = cluster.stop_capture()?;
    let destination_gap_ms = latest_pcap(cluster)
        .and_then(|pcap| fs::read(pcap).ok())
        .and_then(|bytes| destination_gap_ms(&bytes));
    let leaks = LeakDetector::new()
        .matched_port(APP_PORT, [EGRESS_A, EGRESS_B])
        .matched_port(STREAM_PORT, [EGRESS_A, EGRESS_B])
        .forbidden_sources([pod.ip, POD_NODE_IP])
        .inspect(&packets);
    let restoring = Instant::now();
    restore(cluster, fault)?;
    wait_served(cluster, pod, EGRESS_A)?;
    let back_on_a_ms = restoring.elapsed().as_secs_f64() * 1000.0;
    Ok(Trial {
        gap_ms: flow.max_gap_ms,
        destination_gap_ms,
        sent: flow.sent,
        received: flow.received,
        lost: flow.sent.saturating_sub(flow.received),
        send_errors: flow.send_errors,
        datagrams_per_s: flow.sent as f64 / seconds.max(f64::EPSILON),
        sources: flow.sources.into_iter().collect(),
        new_flows_moved_ms,
        back_on_a_ms,
        matched_packets: leaks.matched,
        leaked_packets: leaks.leaks.len(),
    })
}

/// The capture the cluster wrote last (`capture-N.pcap` in its work folder).
fn latest_pcap(cluster: &Cluster) -> Option<PathBuf> {
    fs::read_dir(cluster.work_dir())
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("capture-") && name.ends_with(".pcap")
        })
        .max_by_key(|entry| entry.metadata().and_then(|m| m.modified()).ok())
        .map(|entry| entry.path())
}

/// The longest interval between two datagrams of the stream (UDP to the destination's
/// stream port) in a pcap of Ethernet frames, in ms; `None` for fewer than two.
fn destination_gap_ms(pcap: &[u8]) -> Option<f64> {
    let header: [u8; 4] = pcap.get(0..4)?.try_into().ok()?;
    let (little_endian, nanos) = match u32::from_le_bytes(header) {
        0xa1b2_c3d4 => (true, false),
        0xa1b2_3c4d => (true, true),
        0xd4c3_b2a1 => (false, false),
        0x4d3c_b2a1 => (false, true),
        _ => return None,
    };
    let read_u32 = |at: usize| -> Option<u32> {
        let raw: [u8; 4] = pcap.get(at..at + 4)?.try_into().ok()?;
        Some(if little_endian {
            u32::from_le_bytes(raw)
        } else {
            u32::from_be_bytes(raw)
        })
    };
    let (mut offset, mut last, mut gap) = (24, None::<f64>, None::<f64>);
    while let (Some(seconds), Some(fraction), Some(length)) =
        (read_u32(offset), read_u32(offset + 4), read_u32(offset + 8))
    {
        let start = offset + 16;
        let Some(frame) = pcap.get(start..start + length as usize) else {
            break;
        };
        offset = start + length as usize;
        let at = f64::from(seconds) * 1e3 + f64::from(fraction) / if nanos { 1e6 } else { 1e3 };
        // Ethernet, IPv4 (no VLAN on the destination's veth), UDP to the stream's port.
        let Some(ip) = frame.get(14..) else { continue };
        let ihl = usize::from(ip.first().map_or(0, |b| b & 0x0f)) * 4;
        let is_stream = frame.get(12..14) == Some(&[0x08, 0x00][..])
            && ip.get(9) == Some(&17)
            && ip.get(16..20) == Some(&DESTINATION_IP.octets()[..])
            && ip.get(ihl + 2..ihl + 4) == Some(&STREAM_PORT.to_be_bytes()[..]);
        if !is_stream {
            continue;
        }
        if let Some(last) = last {
            gap = Some(gap.map_or(at - last, |gap: f64| gap.max(at - last)));
        }
        last = Some(at);
    }
    gap
}

fn apply(cluster: &mut Cluster, fault: Fault) -> Result<()> {
    match fault {
        Fault::LinksDown => {
            cluster.set_link(GATEWAY_A, "eth0", false)?;
            cluster.set_link(GATEWAY_A, "eth1", false)
        }
        Fault::EgressInterfaceDown => cluster.set_link(GATEWAY_A, "eth1", false),
        Fault::EgressIpRemoved => cluster.remove_address(GATEWAY_A, "eth1", EGRESS_A_CIDR),
        Fault::NodeDeleted => cluster.delete_node_manifest(GATEWAY_A),
        Fault::AgentKilled => cluster.kill_agent(GATEWAY_A, Signal::Kill),
    }
}

/// Undoes `fault` as an operator or a network manager would; the caller then waits until
/// new flows take A again.
fn restore(cluster: &mut Cluster, fault: Fault) -> Result<()> {
    match fault {
        Fault::LinksDown => {
            cluster.set_link(GATEWAY_A, "eth0", true)?;
            cluster.set_link(GATEWAY_A, "eth1", true)
        }
        Fault::EgressInterfaceDown => cluster.set_link(GATEWAY_A, "eth1", true),
        Fault::EgressIpRemoved => {
            // The address, eth1's table-100 route (gone with eth1's only address) and the
            // router's stale neighbour entry, as the cluster test restores them.
            cluster.add_address(GATEWAY_A, "eth1", EGRESS_A_CIDR)?;
            cluster.set_link(GATEWAY_A, "eth1", true)?;
            let _ = cluster.exec(
                cluster.underlay_netns(),
                &["ip", "neigh", "flush", "to", &EGRESS_A.to_string()],
            );
            Ok(())
        }
        Fault::NodeDeleted => cluster.restore_node_manifest(GATEWAY_A),
        Fault::AgentKilled => {
            // Started again, and in sync before the next trial kills it.
            let synced = |cluster: &Cluster| {
                cluster
                    .agent_log(GATEWAY_A)
                    .matches("datapath in sync")
                    .count()
            };
            let before = synced(cluster);
            cluster.start_agent_with(GATEWAY_A, &AgentSource::Manifests)?;
            if !egress_tests::wait_until(SETTLE, || synced(cluster) > before) {
                bail!("the restarted agent on {GATEWAY_A} did not sync");
            }
            Ok(())
        }
    }
}

/// The source the destination reports for one new HTTP request, or None if it failed.
fn source_seen(cluster: &Cluster, pod: &Pod) -> Option<Ipv4Addr> {
    let url = format!("http://{DESTINATION_IP}:{APP_PORT}/");
    let output = cluster
        .exec_in_pod(pod, &["curl", "-s", "--max-time", "0.5", &url])
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// Polls new requests until one leaves as `expected`.
fn wait_served(cluster: &Cluster, pod: &Pod, expected: Ipv4Addr) -> Result<()> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < SETTLE {
        last = source_seen(cluster, pod);
        if last == Some(expected) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(5));
    }
    cluster.dump_logs();
    bail!("new requests did not leave as {expected} within {SETTLE:?}; last answer: {last:?}")
}

/// Failovers worker-1's prober counted, by cause.
fn failovers(cluster: &Cluster) -> Vec<(&'static str, u64)> {
    ["unanswered", "not_serving"]
        .into_iter()
        .map(|cause| {
            let series = format!("egress_gateway_gateway_failovers_total{{cause=\"{cause}\"}}");
            #[expect(clippy::cast_sign_loss, reason = "a counter's value, never negative")]
            let count = cluster
                .agent_metric(POD_NODE, &series)
                .map_or(0, |count| count as u64);
            (cause, count)
        })
        .collect()
}

/// `egress-peer udp-stream` from the pod, a datagram every [`STREAM_INTERVAL_MS`].
struct Stream {
    process: Background,
    stop_file: PathBuf,
    started: Instant,
}

impl Stream {
    fn start(cluster: &Cluster, pod: &Pod) -> Result<Stream> {
        let name = format!(
            "failover-stream-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let stop_file = cluster.work_dir().join(format!("{name}.stop"));
        let server = SocketAddrV4::new(DESTINATION_IP, STREAM_PORT).to_string();
        let peer = cluster.peer_bin().to_string_lossy().into_owned();
        let stop = stop_file.to_string_lossy().into_owned();
        let interval = STREAM_INTERVAL_MS.to_string();
        let process = cluster.spawn_in_pod(
            pod,
            &name,
            &[
                &*peer,
                "udp-stream",
                &server,
                "--until-file",
                &stop,
                "--interval-ms",
                &interval,
            ],
        )?;
        Ok(Stream {
            process,
            stop_file,
            started: Instant::now(),
        })
    }

    /// Stops the stream; its summary and how many seconds it was sending.
    fn stop(self) -> Result<(FlowSummary, f64)> {
        let seconds = self.started.elapsed().as_secs_f64();
        fs::write(&self.stop_file, b"stop").context("writing the stop file")?;
        let finished = self
            .process
            .wait(Duration::from_mins(1))
            .context("stopping the UDP stream")?;
        if !finished.status.success() {
            bail!(
                "the UDP stream failed ({}): {}",
                finished.status,
                finished.stderr
            );
        }
        let line = finished
            .stdout
            .lines()
            .rev()
            .find(|line| line.starts_with('{'))
            .with_context(|| format!("the UDP stream printed no summary: {}", finished.stdout))?;
        let summary = serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))?;
        Ok((summary, seconds))
    }
}

/// How many probes the pod's node sends each gateway per second (demand mode): while no
/// traffic goes to them, and while the UDP stream through A gets its echoes. Counted as the
/// probe replies worker-1's datapath receives, over its two gateways (A carries the stream,
/// B is idle: both quiet).
fn probe_rates(cluster: &Cluster, pod: &Pod) -> Result<Value> {
    const SECONDS: u64 = 10;
    let per_gateway_per_s = || -> Result<f64> {
        let before = cluster.counter_packets(POD_NODE, "probe_reply_received")?;
        thread::sleep(Duration::from_secs(SECONDS));
        let after = cluster.counter_packets(POD_NODE, "probe_reply_received")?;
        Ok(after.saturating_sub(before) as f64 / 2.0 / SECONDS as f64)
    };
    // The last trial's failover and return are over.
    thread::sleep(Duration::from_secs(2));
    let idle = per_gateway_per_s()?;
    let stream = Stream::start(cluster, pod)?;
    thread::sleep(Duration::from_secs(1));
    let answered = per_gateway_per_s()?;
    let (summary, _) = stream.stop()?;
    if summary.received == 0 {
        bail!("the UDP stream got no echoes while probes were counted: {summary:?}");
    }
    eprintln!("   {idle:.1} probes/s per gateway idle, {answered:.1} with the stream answered");
    Ok(json!({
        "seconds": SECONDS,
        "idle_per_s": idle,
        "answered_per_s": answered,
        "every_interval_per_s": 1000.0 / 50.0,
        "quiet_interval_ms": 1000,
    }))
}

/// Probe floods from B to A's tunnel port, each against a flood of spoilt probes (A's
/// program parses and drops them) and one of the same frames to a closed port of A, after
/// a quiet interval (the machine's background load); per datagram, the sender's CPU time.
/// A set counts only when no flood found the machine saturated (softirqs would then move to
/// ksoftirqd, out of the sender's time).
fn probe_load(cluster: &Cluster, params: &Params, bins: &Binaries) -> Result<Value> {
    /// Busy share of all CPUs at which a flood does not count.
    const SATURATED: f64 = 0.9;
    let closed_port = DEFAULT_TUNNEL_PORT + 1;
    let links = cluster.node(GATEWAY_A)?.bpffs.join("v2/links");
    let _stats = program_stats::StatsOn::new()?;
    let mut pairs = Vec::new();
    let mut valid = 0;
    let attempts = params.probe_flood_runs * 3;
    for _ in 0..attempts {
        if valid == params.probe_flood_runs {
            break;
        }
        let mut pair = serde_json::Map::new();
        let rate = params.probe_flood_rate;
        for (kind, port, probe, rate) in [
            ("quiet", closed_port, Flood::Probes, 0),
            ("probes", DEFAULT_TUNNEL_PORT, Flood::Probes, rate),
            ("probes_tc", DEFAULT_TUNNEL_PORT, Flood::TcOnly, rate),
            ("dropped", DEFAULT_TUNNEL_PORT, Flood::BadMagic, rate),
            ("closed_port", closed_port, Flood::Probes, rate),
        ] {
            let counters = |cluster: &Cluster| -> Result<[u64; 3]> {
                Ok([
                    cluster.counter_packets(GATEWAY_A, "probe_answered_xdp")?,
                    cluster.counter_packets(GATEWAY_A, "probe_answered")?,
                    cluster.counter_packets(GATEWAY_A, "drop_not_allowed")?,
                ])
            };
            let before = counters(cluster)?;
            let runs_before = program_stats::by_program(&links)?;
            let mut flood = flood(cluster, params, bins, port, probe, rate)?;
            let runs_after = program_stats::by_program(&links)?;
            let after = counters(cluster)?;
            // What A's programs took per run meanwhile (bpf_stats), beside the CPU times.
            for program in [program_names::PROBE_RESPONDER, program_names::FROM_TUNNEL] {
                flood[format!("{program}_ns_per_run")] = json!(program_stats::ns_per_run(
                    &runs_before,
                    &runs_after,
                    program
                ));
            }
            flood["answered_xdp"] = json!(after[0].saturating_sub(before[0]));
            flood["answered_tc"] = json!(after[1].saturating_sub(before[1]));
            flood["dropped"] = json!(after[2].saturating_sub(before[2]));
            let capacity = flood["cpus"].as_f64().unwrap_or(1.0)
                * flood["seconds"].as_f64().unwrap_or(1.0)
                * 1e9;
            flood["busy_share"] = json!(flood["busy_ns"].as_f64().unwrap_or(0.0) / capacity);
            pair.insert(kind.into(), flood);
        }
        let shares = ["quiet", "probes", "probes_tc", "dropped", "closed_port"]
            .map(|kind| pair[kind]["busy_share"].as_f64().unwrap_or(1.0));
        let counts = shares[1..].iter().all(|share| *share < SATURATED);
        let per = |kind: &str, field: &str| {
            let flood = &pair[kind];
            flood[field].as_f64().unwrap_or(f64::NAN) / flood["sent"].as_f64().unwrap_or(f64::NAN)
        };
        let sender_ns = per("probes", "self_cpu_ns");
        let closed_ns = per("closed_port", "self_cpu_ns");
        let program_ns = |kind: &str, program: &str| {
            pair[kind][format!("{program}_ns_per_run")]
                .as_f64()
                .unwrap_or(f64::NAN)
        };
        let derived = [
            (
                "xdp_program_ns_per_probe",
                program_ns("probes", program_names::PROBE_RESPONDER),
            ),
            // The TC way: the XDP responder passes the probe, then from_tunnel answers it.
            (
                "tc_program_ns_per_probe",
                program_ns("probes_tc", program_names::PROBE_RESPONDER)
                    + program_ns("probes_tc", program_names::FROM_TUNNEL),
            ),
            ("sender_ns_per_probe", sender_ns),
            ("answer_ns_per_probe", sender_ns - closed_ns),
            (
                "answer_tc_ns_per_probe",
                per("probes_tc", "self_cpu_ns") - closed_ns,
            ),
            (
                "receive_ns_per_probe",
                per("dropped", "self_cpu_ns") - closed_ns,
            ),
            (
                "machine_answer_ns_per_probe",
                per("probes", "busy_ns") - per("closed_port", "busy_ns"),
            ),
        ];
        for (field, ns) in derived {
            pair.insert(field.into(), json!(ns));
        }
        pair.insert("counts".into(), json!(counts));
        // The TC path drops some of a 50,000/s flood (the veth's ring before the VXLAN
        // decapsulation fills); its cost is per probe sent, like the others.
        for (kind, field, percent) in [
            ("probes", "answered_xdp", 95),
            ("probes_tc", "answered_tc", 80),
        ] {
            let probes = &pair[kind];
            let sent = probes["sent"].as_u64().unwrap_or(0);
            if probes[field].as_u64().unwrap_or(0) < sent * percent / 100 {
                bail!("{GATEWAY_A} answered too few of the flood's probes ({field}): {probes}");
            }
        }
        let dropped = &pair["dropped"];
        let sent = dropped["sent"].as_u64().unwrap_or(0);
        if dropped["dropped"].as_u64().unwrap_or(0) < sent * 95 / 100 {
            bail!("{GATEWAY_A}'s program dropped too few of the spoilt probes: {dropped}");
        }
        if counts {
            valid += 1;
        } else {
            eprintln!(
                "   probe floods not counted: the machine was busy {:.0}% (quiet), {:.0}% \
                 (probes, XDP), {:.0}% (probes, TC), {:.0}% (spoilt probes), {:.0}% (closed \
                 port)",
                shares[0] * 100.0,
                shares[1] * 100.0,
                shares[2] * 100.0,
                shares[3] * 100.0,
                shares[4] * 100.0
            );
        }
        pairs.push(Value::Object(pair));
    }
    let counted = |field: &str| -> Vec<f64> {
        pairs
            .iter()
            .filter(|pair| pair["counts"] == true)
            .filter_map(|pair| pair[field].as_f64())
            .filter(|ns| ns.is_finite())
            .collect()
    };
    Ok(json!({
        "sender": GATEWAY_B,
        "gateway": GATEWAY_A,
        "rate_per_s": params.probe_flood_rate,
        "seconds": params.probe_flood_seconds,
        "saturated_at": SATURATED,
        "xdp_program_ns_per_probe": summary(&counted("xdp_program_ns_per_probe")),
        "tc_program_ns_per_probe": summary(&counted("tc_program_ns_per_probe")),
        "answer_ns_per_probe": summary(&counted("answer_ns_per_probe")),
        "answer_tc_ns_per_probe": summary(&counted("answer_tc_ns_per_probe")),
        "receive_ns_per_probe": summary(&counted("receive_ns_per_probe")),
        "sender_ns_per_probe": summary(&counted("sender_ns_per_probe")),
        "machine_answer_ns_per_probe": summary(&counted("machine_answer_ns_per_probe")),
        "runs": pairs,
    }))
}

/// What a flood sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flood {
    /// Probes for any responder (A's XDP responder answers).
    Probes,
    /// Probes asking for A's TC program (its XDP responder passes them).
    TcOnly,
    /// Probes with a spoilt magic: parsed and dropped by A's TC program.
    BadMagic,
}

/// `egress-bench measure probe-flood` in B's namespace: `rate` probe frames per second to
/// A's `port` (0: none, a quiet interval).
fn flood(
    cluster: &Cluster,
    params: &Params,
    bins: &Binaries,
    port: u16,
    probe: Flood,
    rate: u32,
) -> Result<Value> {
    let sender = &cluster.node(GATEWAY_B)?.netns;
    let mut command = netns_command(
        sender,
        &[
            bins.bench.to_string_lossy().as_ref(),
            "measure",
            "probe-flood",
            "--from",
            &GATEWAY_B_IP.to_string(),
            "--to",
            &GATEWAY_A_IP.to_string(),
            "--port",
            &port.to_string(),
            "--rate",
            &rate.to_string(),
            "--seconds",
            &params.probe_flood_seconds.to_string(),
        ],
    );
    match probe {
        Flood::Probes => {}
        Flood::TcOnly => {
            command.arg("--tc-only");
        }
        Flood::BadMagic => {
            command.arg("--bad-magic");
        }
    }
    command.env_remove("RUST_LOG");
    let output = run_with_timeout(command, Duration::from_mins(2))?;
    if !output.status.success() {
        bail!(
            "egress-bench measure probe-flood failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("parsing the probe flood")
}
