//! Reliability on a namespace cluster: policy and pod churn with live traffic, NAT expiry and
//! port exhaustion, MTU and ICMP errors, privileges. Every traffic test runs the leak detector
//! (packets of matched flows at the destination with a source other than the egress IP): the
//! pass condition is zero.
//!
//! Root only (otherwise SKIPPED); needs the agent (`cargo build -p egress-agent`).
//! `EGRESS_SOAK_SECS=600 cargo test -p egress-tests --test reliability -- --ignored churn_soak_long`
//! runs the long soak.
#![allow(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    time::{Duration, Instant},
};

use egress_tests::{
    Cluster, ClusterConfig, FlowKind, LeakDetector, LongFlow, Pod,
    expected::{EgressSource, SimplePolicy, wait_for_maps_to_match},
    peer_url, skip_unless_root, wait_for_value, wait_until,
};

const WORKER_2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const STABLE_EGRESS_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
const DESTINATIONS: &str = "198.51.100.0/24";
/// How long agents may take to program a change on this (loaded, shared) machine.
const PROGRAMMED: Duration = Duration::from_secs(30);

fn cluster_with(extra_peer_ports: &[u16], agent_args: &[&str]) -> Cluster {
    Cluster::new(ClusterConfig {
        extra_peer_ports: extra_peer_ports.to_vec(),
        agent_args: agent_args
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
        ..ClusterConfig::with_peer_bin(env!("CARGO_BIN_EXE_egress-peer"))
    })
    .expect("building the test cluster")
}

/// my-app on k8s-worker-1 under the how-to-style policy, agents on every node, and its
/// traffic programmed through gateway k8s-worker-2.
fn serve_my_app(cluster: &mut Cluster) -> Pod {
    let pod = cluster
        .add_pod("k8s-worker-1", "default", "my-app", &[("app", "my-app")])
        .unwrap();
    howto_gateway(cluster);
    cluster.start_all_agents().unwrap();
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();
    pod
}

/// One UDP datagram from `pod` to the destination, answered (a NAT entry is created).
fn send_one_udp_datagram(cluster: &Cluster, pod: &Pod) {
    let udp = cluster
        .peer_client(
            pod,
            &[
                "udp",
                "198.51.100.10:8081",
                "--count",
                "1",
                "--timeout-ms",
                "4000",
            ],
        )
        .unwrap();
    assert!(
        udp.status.success(),
        "{}",
        String::from_utf8_lossy(&udp.stderr)
    );
}

/// The how-to's gateway: k8s-worker-2 labelled egress-node=true, egress IP from eth0.
fn howto_gateway(cluster: &mut Cluster) -> SimplePolicy {
    cluster
        .label_node("k8s-worker-2", "egress-node", "true")
        .unwrap();
    let policy = SimplePolicy::new(
        "my-app",
        &[("app", "my-app")],
        &[DESTINATIONS],
        &[("egress-node", "true")],
        EgressSource::DefaultRoute,
    );
    policy.apply(cluster).unwrap();
    policy
}

/// The leak detector for `pod`'s traffic to `port`, which may only arrive from the how-to's
/// gateway: fails on any other source; returns how many matched packets it saw.
fn leak_check(packets: &[egress_tests::CapturedPacket], port: u16, pod: &Pod) -> usize {
    LeakDetector::new()
        .matched_port(port, [WORKER_2])
        .forbidden_sources([pod.ip])
        .check(packets)
        .unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

// ----- churn soak -----

/// Where a churn pod's traffic goes: its own destination port, so the leak detector can tell
/// its packets apart after translation.
const STABLE_PORTS: [u16; 3] = [9001, 9002, 9003];
const CHURN_PORTS: [u16; 3] = [9101, 9102, 9103];

#[expect(
    clippy::struct_field_names,
    reason = "the churn policy is named for its role, beside the stable one"
)]
struct Churn {
    cluster: Cluster,
    stable: SimplePolicy,
    churn: SimplePolicy,
    churn_applied: bool,
    /// Churn pods by slot (node number 1..3), each with its own destination port.
    slots: BTreeMap<u8, Pod>,
    generation: u32,
    steps: u32,
    matched_packets: usize,
}

impl Churn {
    fn policies(&self) -> Vec<SimplePolicy> {
        let mut policies = vec![self.stable.clone()];
        if self.churn_applied {
            policies.push(self.churn.clone());
        }
        policies
    }

    /// The source the destination must see for a churn pod now.
    fn expected_source(&self, pod: &Pod) -> Ipv4Addr {
        let matched = self.churn_applied
            && self
                .churn
                .pod_labels
                .iter()
                .all(|(key, value)| pod.labels.get(key) == Some(value));
        let gateway = self.cluster.nodes.iter().find(|node| {
            node.labels
                .get("egress-moving")
                .is_some_and(|v| v == "true")
        });
        match (matched, gateway) {
            (true, Some(gateway)) => gateway.secondary_ip.expect("every node has eth1"),
            _ => self.cluster.node(&pod.node).unwrap().ip,
        }
    }

    fn add_churn_pod(&mut self, slot: u8, role: &str, ip: Option<Ipv4Addr>) {
        self.generation += 1;
        let name = format!("churn-{slot}-{}", self.generation);
        let pod = self
            .cluster
            .add_pod_with_ip(
                &format!("k8s-worker-{slot}"),
                "churn",
                &name,
                &[("role", role)],
                ip,
            )
            .unwrap();
        self.slots.insert(slot, pod);
    }

    fn delete_churn_pod(&mut self, slot: u8) -> Ipv4Addr {
        let pod = self.slots.remove(&slot).expect("a pod in the slot");
        self.cluster.delete_pod(&pod).unwrap();
        pod.ip
    }

    fn move_gateway(&mut self, to: &str) {
        for node in ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"] {
            if node != to {
                self.cluster.unlabel_node(node, "egress-moving").unwrap();
            }
        }
        self.cluster
            .label_node(to, "egress-moving", "true")
            .unwrap();
    }

    /// After a change: the maps equal what the inventory implies on every node, then short
    /// TCP and UDP flows from every churn pod leave with the expected source, and no packet
    /// of any flow leaked meanwhile.
    fn settle_and_probe(&mut self, what: &str) {
        self.steps += 1;
        wait_for_maps_to_match(&self.cluster, &self.policies(), PROGRAMMED)
            .unwrap_or_else(|error| panic!("step {} ({what}): {error:#}", self.steps));
        let mut detector =
            LeakDetector::new().forbidden_sources(self.cluster.pods.iter().map(|pod| pod.ip));
        for port in STABLE_PORTS {
            detector = detector.matched_port(port, [STABLE_EGRESS_IP]);
        }
        for (slot, pod) in &self.slots {
            let expected = self.expected_source(pod);
            let port = CHURN_PORTS[usize::from(*slot) - 1];
            detector = detector.matched_port(port, [expected]);
            let server = format!("198.51.100.10:{port}");
            let burst = self
                .cluster
                .peer_client(pod, &["tcp-burst", &server, "--connections", "3"])
                .unwrap();
            let sources = stdout(&burst);
            assert!(
                burst.status.success() && sources.lines().all(|s| s == expected.to_string()),
                "step {} ({what}): tcp from {} ({}) must leave as {expected}: {sources} {}",
                self.steps,
                pod.name,
                pod.ip,
                String::from_utf8_lossy(&burst.stderr)
            );
            let udp = self
                .cluster
                .peer_client(
                    pod,
                    &["udp", &server, "--count", "2", "--timeout-ms", "4000"],
                )
                .unwrap();
            let replies = stdout(&udp);
            assert!(
                udp.status.success()
                    && replies
                        .lines()
                        .all(|line| line.starts_with(&format!("{expected}:"))),
                "step {} ({what}): udp from {} must leave as {expected}: {replies} {}",
                self.steps,
                pod.name,
                String::from_utf8_lossy(&udp.stderr)
            );
        }
        // The capture covered the change and the probes: check it, start the next one.
        let packets = self.cluster.stop_capture().unwrap();
        self.matched_packets += detector
            .check(&packets)
            .unwrap_or_else(|error| panic!("step {} ({what}): {error:#}", self.steps));
        self.cluster.start_capture().unwrap();
    }

    /// One pass of changes; ends in the state it started from (churn policy absent, moving
    /// gateway on worker-3, churn pods in slots 1 and 3).
    fn pass(&mut self) {
        self.churn_applied = true;
        self.churn.apply(&self.cluster).unwrap();
        self.settle_and_probe("add the churn policy");

        self.churn.destinations = vec!["198.51.100.10/32".into()];
        self.churn.apply(&self.cluster).unwrap();
        self.settle_and_probe("edit its destinations");

        self.move_gateway("k8s-worker-1");
        self.settle_and_probe("move the gateway label to worker-1");

        // The IPAM hands the deleted pod's address to a pod with other labels.
        let reused = self.delete_churn_pod(1);
        self.add_churn_pod(1, "other", Some(reused));
        self.settle_and_probe("reuse a deleted pod's IP for an unmatched pod");

        self.add_churn_pod(2, "churn", None);
        self.settle_and_probe("add a matched pod on worker-2");

        self.move_gateway("k8s-worker-2");
        self.settle_and_probe("move the gateway label to worker-2");

        self.churn_applied = false;
        self.cluster.delete_policy(&self.churn.name).unwrap();
        self.settle_and_probe("delete the churn policy");

        let reused = self.delete_churn_pod(1);
        self.add_churn_pod(1, "churn", Some(reused));
        self.churn.destinations = vec![DESTINATIONS.into()];
        self.churn_applied = true;
        self.churn.apply(&self.cluster).unwrap();
        self.settle_and_probe("reuse the IP for a matched pod, re-add the policy");

        self.move_gateway("k8s-worker-3");
        self.settle_and_probe("move the gateway label back to worker-3");

        self.churn_applied = false;
        self.cluster.delete_policy(&self.churn.name).unwrap();
        self.delete_churn_pod(2);
        self.settle_and_probe("delete the policy and the worker-2 pod");
    }
}

/// Mixed long-lived TCP and UDP flows from pods of a stable policy while another policy is
/// added, edited and removed, pods come and go (one reusing a deleted pod's IP with other
/// labels) and its gateway label moves between all three nodes. After every step the maps of
/// every node equal the inventory, short flows of churn pods leave with the right source, and
/// no packet of any flow leaked; the stable flows never break.
fn churn_soak(duration: Duration, agent_args: &[&str]) {
    let ports: Vec<u16> = STABLE_PORTS.iter().chain(&CHURN_PORTS).copied().collect();
    let mut cluster = cluster_with(&ports, agent_args);
    for node in ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"] {
        cluster.add_secondary_interface(node).unwrap();
    }
    cluster
        .add_address("k8s-worker-2", "eth1", &format!("{STABLE_EGRESS_IP}/24"))
        .unwrap();
    cluster
        .label_node("k8s-worker-2", "egress-stable", "true")
        .unwrap();
    cluster
        .label_node("k8s-worker-3", "egress-moving", "true")
        .unwrap();
    let stable_pods: Vec<Pod> = (1..=3)
        .map(|n| {
            cluster
                .add_pod(
                    &format!("k8s-worker-{n}"),
                    "default",
                    &format!("stable-{n}"),
                    &[("role", "stable")],
                )
                .unwrap()
        })
        .collect();
    let stable = SimplePolicy::new(
        "stable",
        &[("role", "stable")],
        &[DESTINATIONS],
        &[("egress-stable", "true")],
        EgressSource::Ip(STABLE_EGRESS_IP),
    );
    stable.apply(&cluster).unwrap();
    let churn = SimplePolicy::new(
        "churn",
        &[("role", "churn")],
        &[DESTINATIONS],
        &[("egress-moving", "true")],
        EgressSource::Interface("eth1".into()),
    );
    let mut soak = Churn {
        cluster,
        stable,
        churn,
        churn_applied: false,
        slots: BTreeMap::new(),
        generation: 0,
        steps: 0,
        matched_packets: 0,
    };
    soak.add_churn_pod(1, "churn", None);
    soak.add_churn_pod(3, "churn", None);
    soak.cluster.start_all_agents().unwrap();
    wait_for_maps_to_match(&soak.cluster, &soak.policies(), PROGRAMMED).unwrap();
    for pod in &stable_pods {
        soak.cluster
            .wait_for_pod_gateway(pod, WORKER_2, PROGRAMMED)
            .unwrap();
    }

    soak.cluster.start_capture().unwrap();
    // TCP from the pods on worker-1 and worker-3 (through the tunnel), UDP from all three
    // (worker-2's pod is on its gateway).
    let mut flows: Vec<LongFlow> = Vec::new();
    for (index, pod) in stable_pods.iter().enumerate() {
        let port = STABLE_PORTS[index];
        if pod.node != "k8s-worker-2" {
            let mut tcp = soak
                .cluster
                .start_long_flow(pod, FlowKind::Tcp, port)
                .unwrap();
            tcp.wait_connected(Duration::from_secs(30)).unwrap();
            flows.push(tcp);
        }
        flows.push(
            soak.cluster
                .start_long_flow(pod, FlowKind::Udp, port)
                .unwrap(),
        );
    }

    let started = Instant::now();
    let mut passes = 0;
    while passes == 0 || started.elapsed() < duration {
        soak.pass();
        passes += 1;
    }
    let refused: Vec<u64> = ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"]
        .iter()
        .map(|node| {
            soak.cluster
                .counter_packets(node, "drop_flow_table_full")
                .unwrap()
        })
        .collect();
    eprintln!(
        "churn soak: {passes} passes, {} steps in {:?}, {} matched packets checked, \
         flows refused by full maps per node {refused:?}",
        soak.steps,
        started.elapsed(),
        soak.matched_packets
    );

    for flow in flows {
        let (pod, kind) = (flow.pod.clone(), flow.kind);
        let summary = flow.stop().unwrap();
        summary
            .check_unbroken(&STABLE_EGRESS_IP.to_string(), Duration::from_secs(5))
            .unwrap_or_else(|error| panic!("{kind:?} flow of {pod}: {error:#}"));
    }
    let packets = soak.cluster.stop_capture().unwrap();
    let mut detector = LeakDetector::new();
    for port in STABLE_PORTS {
        detector = detector.matched_port(port, [STABLE_EGRESS_IP]);
    }
    detector.check(&packets).unwrap();
}

#[test]
fn churn_soak_quick() {
    skip_unless_root!();
    churn_soak(Duration::from_secs(30), &[]);
}

/// The churn with flow and NAT maps small enough to run near full: the garbage collection
/// keeps up (closed connections, then ports held for TIME_WAIT, go first), so the churn's
/// flows get in, and the stable flows keep their entries throughout.
#[test]
fn churn_soak_quick_with_small_maps() {
    skip_unless_root!();
    churn_soak(
        Duration::from_secs(30),
        &[
            "--flow-map-size",
            SMALL_MAPS,
            "--nat-map-size",
            SMALL_MAPS,
            "--tcp-closing-timeout",
            "2",
            "--udp-idle-timeout",
            "5",
        ],
    );
}

/// Entries of each flow and NAT map in `churn_soak_quick_with_small_maps`.
const SMALL_MAPS: &str = "128";

#[test]
#[ignore = "long soak: EGRESS_SOAK_SECS=600 cargo test -p egress-tests --test reliability -- --ignored churn_soak_long"]
fn churn_soak_long() {
    skip_unless_root!();
    let seconds = std::env::var("EGRESS_SOAK_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(300);
    churn_soak(Duration::from_secs(seconds), &[]);
}

// ----- capacity and expiry -----

/// NAT entries of a pod on the gateway, by protocol.
fn nat_entries(cluster: &Cluster, pod: &Pod, protocol: &str) -> Vec<serde_json::Value> {
    let prefix = format!("{}:", pod.ip);
    cluster
        .nat_list("k8s-worker-2")
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|entry| {
            entry["protocol"] == protocol
                && entry["pod"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&prefix))
        })
        .collect()
}

#[test]
fn nat_entries_expire_idle_udp_and_closed_tcp_but_not_open_tcp() {
    skip_unless_root!();
    let mut cluster = cluster_with(
        &[],
        &["--udp-idle-timeout", "3", "--tcp-closing-timeout", "2"],
    );
    let pod = serve_my_app(&mut cluster);

    let mut tcp = cluster.start_long_flow(&pod, FlowKind::Tcp, 8080).unwrap();
    tcp.wait_connected(Duration::from_secs(30)).unwrap();
    send_one_udp_datagram(&cluster, &pod);
    assert_eq!(
        nat_entries(&cluster, &pod, "UDP").len(),
        1,
        "the UDP flow has its entry"
    );
    let open = nat_entries(&cluster, &pod, "TCP");
    assert_eq!(open.len(), 1, "the open connection has its entry: {open:?}");

    assert!(
        wait_until(Duration::from_mins(1), || nat_entries(
            &cluster, &pod, "UDP"
        )
        .is_empty()),
        "the idle UDP entry did not expire: {:?}",
        cluster.nat_list("k8s-worker-2")
    );
    assert_eq!(
        nat_entries(&cluster, &pod, "TCP")
            .iter()
            .map(|entry| (entry["pod"].clone(), entry["egress"].clone()))
            .collect::<Vec<_>>(),
        open.iter()
            .map(|entry| (entry["pod"].clone(), entry["egress"].clone()))
            .collect::<Vec<_>>(),
        "an open connection keeps its entry past the UDP timeout"
    );

    let summary = tcp.stop().unwrap();
    summary
        .check_unbroken(&WORKER_2.to_string(), Duration::from_secs(10))
        .unwrap();
    assert!(
        wait_until(Duration::from_mins(1), || nat_entries(
            &cluster, &pod, "TCP"
        )
        .is_empty()),
        "the closed connection's entry did not expire: {:?}",
        cluster.nat_list("k8s-worker-2")
    );
}

#[test]
fn nat_garbage_collector_runs_without_errors() {
    skip_unless_root!();
    let mut cluster = cluster_with(
        &[],
        &["--udp-idle-timeout", "2", "--tcp-closing-timeout", "2"],
    );
    let pod = serve_my_app(&mut cluster);
    send_one_udp_datagram(&cluster, &pod);
    assert!(
        wait_until(Duration::from_mins(1), || nat_entries(
            &cluster, &pod, "UDP"
        )
        .is_empty()),
        "the idle UDP entry did not expire"
    );
    // A few more collector runs (one per second with these timeouts) after the expiry: a
    // bounded wait is the point here, the property is that no run fails.
    let failed = wait_until(Duration::from_secs(5), || {
        !cluster
            .agent_log_lines("k8s-worker-2", &["expiring NAT entries failed"])
            .is_empty()
    });
    assert!(
        !failed,
        "the garbage collector failed: {:#?}",
        cluster.agent_log_lines("k8s-worker-2", &["expiring NAT entries failed"])
    );
}

#[test]
fn nat_port_exhaustion_fails_cleanly_and_recovers() {
    skip_unless_root!();
    // 10 ports, well below the namespace's ephemeral range (32768-60999).
    const PORTS: u64 = 10;
    const CONNECTIONS: u64 = 12;
    let mut cluster = cluster_with(&[], &[]);
    cluster
        .set_agent_args(
            "k8s-worker-2",
            &[
                "--nat-port-range",
                "2000-2009",
                "--tcp-closing-timeout",
                "2",
            ],
        )
        .unwrap();
    let pod = serve_my_app(&mut cluster);
    cluster.start_capture().unwrap();

    let stop_file = cluster.work_dir().join("exhaustion.stop");
    let peer = cluster.peer_bin().to_string_lossy().into_owned();
    let connections = CONNECTIONS.to_string();
    let mut hold = cluster
        .spawn_in_pod(
            &pod,
            "exhaustion",
            &[
                peer.as_str(),
                "tcp-hold",
                "198.51.100.10:8080",
                "--connections",
                &connections,
                "--timeout-ms",
                "4000",
                "--interval-ms",
                "500",
                "--until-file",
                &stop_file.to_string_lossy(),
            ],
        )
        .unwrap();
    let connected = wait_for_value(Duration::from_mins(2), || {
        let out = std::fs::read_to_string(cluster.work_dir().join("exhaustion.out")).ok()?;
        out.lines()
            .find(|line| line.starts_with("connected "))
            .map(str::to_string)
    })
    .unwrap_or_else(|| {
        panic!(
            "the connections were never all tried: {}",
            hold.is_running()
        )
    });
    assert_eq!(
        connected,
        format!("connected {PORTS} failed {}", CONNECTIONS - PORTS),
        "as many connections as NAT ports get through, the excess fails"
    );
    let exhausted = cluster
        .counter_packets("k8s-worker-2", "drop_nat_exhausted")
        .unwrap();
    assert!(
        exhausted > 0,
        "drop_nat_exhausted counted: {:?}",
        cluster.counters("k8s-worker-2")
    );
    assert!(
        cluster
            .nat_list("k8s-worker-2")
            .unwrap()
            .as_array()
            .is_some_and(|entries| entries.len() as u64 == PORTS),
        "one entry per port: {:?}",
        cluster.nat_list("k8s-worker-2")
    );

    std::fs::write(&stop_file, "stop").unwrap();
    let finished = hold.wait(Duration::from_mins(1)).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(finished.stdout.lines().last().expect("a summary line")).unwrap();
    assert_eq!(
        summary["still_working"], PORTS,
        "the established connections kept working through the exhaustion: {summary}"
    );
    assert_eq!(summary["broken"], serde_json::json!([]), "{summary}");

    // Closed connections give their ports back after the closing timeout.
    assert!(
        wait_until(Duration::from_mins(1), || cluster
            .nat_list("k8s-worker-2")
            .unwrap()
            .as_array()
            .is_some_and(std::vec::Vec::is_empty)),
        "the closed connections' entries did not expire: {:?}",
        cluster.nat_list("k8s-worker-2")
    );
    let burst = cluster
        .peer_client(
            &pod,
            &["tcp-burst", "198.51.100.10:8080", "--connections", "5"],
        )
        .unwrap();
    assert!(
        burst.status.success(),
        "new connections succeed again: {}",
        String::from_utf8_lossy(&burst.stderr)
    );
    assert!(stdout(&burst).lines().all(|source| source == "10.0.0.12"));

    let packets = cluster.stop_capture().unwrap();
    let matched = leak_check(&packets, 8080, &pod);
    assert!(matched > 0, "the capture saw the connections");
}

/// A server that resets every connection: three times the NAT port range in connections to
/// one remote, none refused for want of a port. The remote's RST closes the flow on both
/// nodes, so its port is free again after the closing timeout (it used to stay held for the
/// 6 h idle timeout: a resetting server exhausted a gateway's ports for its address).
#[test]
fn a_server_that_resets_every_connection_never_exhausts_the_ports() {
    skip_unless_root!();
    const PORTS: u32 = 64;
    let mut cluster = cluster_with(&[], &[]);
    cluster
        .set_agent_args(
            "k8s-worker-2",
            &[
                "--nat-port-range",
                "2000-2063",
                "--tcp-closing-timeout",
                "2",
            ],
        )
        .unwrap();
    let pod = serve_my_app(&mut cluster);
    cluster.start_capture().unwrap();
    let connections = (3 * PORTS).to_string();
    let resets = cluster
        .peer_client(
            &pod,
            &[
                "tcp-resets",
                "198.51.100.10:8080",
                "--connections",
                &connections,
                "--interval-ms",
                "100",
            ],
        )
        .unwrap();
    let packets = cluster.stop_capture().unwrap();
    assert!(
        resets.status.success(),
        "tcp-resets: {}",
        String::from_utf8_lossy(&resets.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&resets.stdout).unwrap();
    assert_eq!(
        summary["connected"],
        3 * PORTS,
        "connections were refused: {summary}, counters {:?}",
        cluster.counters("k8s-worker-2")
    );
    assert_eq!(
        cluster
            .counter_packets("k8s-worker-2", "drop_nat_exhausted")
            .unwrap(),
        0
    );
    let matched = leak_check(&packets, 8080, &pod);
    assert!(matched > 0, "the capture saw the connections");
}

// ----- full maps -----

/// More concurrent flows than the flow and NAT maps hold: maps of 1,024 entries (set by
/// flags) and three pods opening 1,024 UDP flows each, two of them on one node. The excess
/// is refused and counted (`drop_flow_table_full`), the flows that got in keep working, and
/// no packet of any flow reaches the destination with another source (an LRU map used to
/// evict established flows, whose next packets then left with the node's IP).
#[test]
fn more_flows_than_the_maps_hold_are_refused_never_leaked() {
    skip_unless_root!();
    const CAPACITY: u64 = 1024;
    let mut cluster = cluster_with(&[], &["--flow-map-size", "1024", "--nat-map-size", "1024"]);
    let pods: Vec<Pod> = [
        ("k8s-worker-1", "my-app-a"),
        ("k8s-worker-1", "my-app-b"),
        ("k8s-worker-3", "my-app-c"),
    ]
    .into_iter()
    .map(|(node, name)| {
        cluster
            .add_pod(node, "default", name, &[("app", "my-app")])
            .unwrap()
    })
    .collect();
    howto_gateway(&mut cluster);
    cluster.start_all_agents().unwrap();
    for pod in &pods {
        cluster
            .wait_for_pod_gateway(pod, WORKER_2, PROGRAMMED)
            .unwrap();
    }
    cluster.start_capture().unwrap();
    let peer = cluster.peer_bin().to_string_lossy().into_owned();
    let flows = CAPACITY.to_string();
    let clients: Vec<_> = pods
        .iter()
        .map(|pod| {
            cluster
                .spawn_in_pod(
                    pod,
                    &format!("flows-{}", pod.name),
                    &[
                        peer.as_str(),
                        "udp-flows",
                        "198.51.100.10:8081",
                        "--flows",
                        &flows,
                    ],
                )
                .unwrap()
        })
        .collect();
    let mut answered = 0;
    for client in clients {
        let finished = client.wait(Duration::from_mins(2)).unwrap();
        assert!(finished.status.success(), "udp-flows: {}", finished.stderr);
        let summary: serde_json::Value = serde_json::from_str(finished.stdout.trim()).unwrap();
        assert_eq!(
            summary["answered_again"], summary["answered"],
            "flows that got in lost their path: {summary}"
        );
        answered += summary["answered"].as_u64().unwrap();
    }
    let packets = cluster.stop_capture().unwrap();
    let refused: u64 = ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"]
        .iter()
        .map(|node| {
            cluster
                .counter_packets(node, "drop_flow_table_full")
                .unwrap()
        })
        .sum();
    // The flows the gateway let in: at most its NAT map's capacity, most of it used.
    let admitted = cluster
        .counter_packets("k8s-worker-2", "snat_new_flow")
        .unwrap();
    assert!(
        (CAPACITY * 3 / 4..=CAPACITY).contains(&admitted),
        "{admitted} flows translated through a 1,024-entry NAT map"
    );
    // Every other flow was refused and counted (each of its datagrams, resent until the
    // client gave up).
    assert!(
        refused >= 3 * CAPACITY - admitted,
        "{refused} datagrams refused, {admitted} flows admitted of {}",
        3 * CAPACITY
    );
    assert!(
        (admitted - admitted / 20..=admitted).contains(&answered),
        "{answered} flows answered of {admitted} admitted"
    );
    let matched = LeakDetector::new()
        .matched_port(8081, [WORKER_2])
        .forbidden_sources(pods.iter().map(|pod| pod.ip))
        .check(&packets)
        .unwrap();
    assert!(matched as u64 >= 2 * answered, "the capture saw the flows");
}

// ----- MTU and ICMP errors -----

fn link_mtu(cluster: &Cluster, netns: &str, interface: &str) -> u32 {
    let output = cluster
        .exec(netns, &["cat", &format!("/sys/class/net/{interface}/mtu")])
        .unwrap();
    stdout(&output).trim().parse().unwrap()
}

/// An 8 KB UDP request and an 8 KB reply (DNS over EDNS, syslog, QUIC-sized datagrams)
/// cross the gateway, each fragmented by the 1500-byte path: every fragment takes its
/// datagram's path and leaves with the egress IP (matched fragments used to be dropped, and
/// fragmented replies went to the gateway's own stack).
#[test]
fn an_8_kb_udp_request_and_reply_cross_the_gateway_fragmented() {
    skip_unless_root!();
    let mut cluster = cluster_with(&[], &[]);
    let pod = serve_my_app(&mut cluster);
    assert_eq!(link_mtu(&cluster, &pod.netns, "eth0"), 1500, "pod MTU");
    cluster.start_capture().unwrap();
    let big = cluster
        .peer_client(&pod, &["udp-big", "198.51.100.10:8081", "--size", "8192"])
        .unwrap();
    let packets = cluster.stop_capture().unwrap();
    assert!(
        big.status.success(),
        "udp-big: {}; counters on the gateway {:?}, on the pod's node {:?}",
        String::from_utf8_lossy(&big.stderr),
        cluster.counters("k8s-worker-2"),
        cluster.counters("k8s-worker-1")
    );
    let summary: serde_json::Value = serde_json::from_slice(&big.stdout).unwrap();
    assert_eq!(summary["received"], 8192, "{summary}");
    assert!(
        summary["source"]
            .as_str()
            .is_some_and(|source| source.starts_with("10.0.0.12:")),
        "the request left with the egress IP: {summary}"
    );
    let fragments = packets
        .iter()
        .filter(|packet| packet.later_fragment && packet.dst == egress_tests::peer::DESTINATION_IP)
        .count();
    assert!(
        fragments >= 5,
        "the request arrived fragmented: {fragments} later fragments"
    );
    let matched = leak_check(&packets, 8081, &pod);
    assert!(matched > fragments, "every fragment counted: {matched}");
}

#[test]
fn hundred_megabytes_cross_the_tunnel_with_1500_byte_pods() {
    skip_unless_root!();
    const BODY_BYTES: u64 = 100_000_000;
    let mut cluster = cluster_with(&[], &[]);
    let pod = serve_my_app(&mut cluster);
    let node = cluster.node("k8s-worker-1").unwrap().netns.clone();
    assert_eq!(link_mtu(&cluster, &pod.netns, "eth0"), 1500, "pod MTU");
    assert_eq!(link_mtu(&cluster, &node, "eth0"), 1500, "underlay MTU");

    cluster.start_capture().unwrap();
    let output = cluster
        .exec_in_pod(
            &pod,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download} %{http_code}",
                "--max-time",
                "600",
                &peer_url(&format!("/bytes/{BODY_BYTES}")),
            ],
        )
        .unwrap();
    assert!(
        output.status.success(),
        "curl failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout(&output).trim(), format!("{BODY_BYTES} 200"));
    let seen = cluster.peer_log();
    assert_eq!(seen.len(), 1, "one connection: {seen:?}");
    assert_eq!(*seen[0].source.ip(), WORKER_2, "seen with the egress IP");
    let packets = cluster.stop_capture().unwrap();
    let matched = leak_check(&packets, 8080, &pod);
    // Pod to destination is mostly ACKs, and GRO coalesces them: hundreds, not thousands.
    assert!(
        matched > 100,
        "the capture saw the transfer's packets: {matched}"
    );
}

#[test]
fn icmp_port_unreachable_reaches_the_pod_reverse_translated() {
    skip_unless_root!();
    const CLOSED_PORT: u16 = 9999;
    let mut cluster = cluster_with(&[], &[]);
    let pod = serve_my_app(&mut cluster);

    cluster.start_capture().unwrap();
    let server = format!("198.51.100.10:{CLOSED_PORT}");
    let probe = cluster
        .peer_client(&pod, &["udp-probe", &server, "--timeout-ms", "5000"])
        .unwrap();
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    assert_eq!(
        stdout(&probe).trim(),
        "refused",
        "the destination's port unreachable reaches the pod's connected socket"
    );
    let packets = cluster.stop_capture().unwrap();
    let matched = LeakDetector::new()
        .matched_port(CLOSED_PORT, [WORKER_2])
        .forbidden_sources([pod.ip])
        .check(&packets)
        .unwrap();
    assert_eq!(matched, 1, "the probe reached the destination translated");
    assert!(
        packets
            .iter()
            .any(|packet| packet.protocol == egress_tests::IpProtocol::Icmp
                && packet.dst == WORKER_2),
        "the destination answered with ICMP to the egress IP"
    );
}

// ----- privileges -----

/// Every folder and file under `root`, with its mode and owner.
fn walk(root: &Path, out: &mut Vec<(std::path::PathBuf, u32, u32, bool)>) {
    let metadata = fs::symlink_metadata(root).unwrap();
    out.push((
        root.to_path_buf(),
        metadata.permissions().mode() & 0o7777,
        metadata.uid(),
        metadata.is_dir(),
    ));
    if metadata.is_dir() {
        for entry in fs::read_dir(root).unwrap() {
            walk(&entry.unwrap().path(), out);
        }
    }
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_BPF: u32 = 39;

fn capability_set(status: &str, name: &str) -> u64 {
    let line = status
        .lines()
        .find(|line| line.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in {status}"));
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

#[test]
fn pins_are_root_only_and_the_agent_keeps_only_bpf_net_admin_and_net_raw() {
    skip_unless_root!();
    let mut cluster = cluster_with(&[], &[]);
    serve_my_app(&mut cluster);

    let wanted = (1u64 << CAP_BPF) | (1u64 << CAP_NET_ADMIN) | (1u64 << CAP_NET_RAW);
    for node in cluster.nodes.clone() {
        let mut entries = Vec::new();
        walk(&node.bpffs, &mut entries);
        let maps = entries
            .iter()
            .filter(|(path, _, _, is_dir)| {
                !is_dir && path.parent().is_some_and(|p| p.ends_with("v2/maps"))
            })
            .count();
        assert!(
            maps >= 5,
            "{}: pinned maps under v2/maps: {entries:?}",
            node.name
        );
        for (path, mode, uid, is_dir) in &entries {
            assert_eq!(*uid, 0, "{} is owned by root", path.display());
            let expected = if *is_dir { 0o700 } else { 0o600 };
            assert_eq!(
                *mode,
                expected,
                "{} has mode {mode:04o}, expected {expected:04o}",
                path.display()
            );
        }

        assert!(
            wait_until(PROGRAMMED, || !cluster
                .agent_log_lines(&node.name, &["dropped every other capability"])
                .is_empty()),
            "{}: the agent says which capabilities it keeps",
            node.name
        );
        let line = cluster.agent_log_lines(&node.name, &["dropped every other capability"]);
        assert!(
            line[0].contains("CAP_BPF")
                && line[0].contains("CAP_NET_ADMIN")
                && line[0].contains("CAP_NET_RAW"),
            "{line:?}"
        );
        let pid = cluster.agent_pid(&node.name).unwrap();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        for set in ["CapEff:", "CapPrm:"] {
            assert_eq!(
                capability_set(&status, set),
                wanted,
                "{}: {set} of the running agent (pid {pid}) must be CAP_BPF|CAP_NET_ADMIN|CAP_NET_RAW",
                node.name
            );
        }
    }
    // The agent still works with what it kept: a new pod gets programmed and steered.
    let later = cluster
        .add_pod("k8s-worker-3", "default", "my-app-2", &[("app", "my-app")])
        .unwrap();
    cluster
        .wait_for_pod_gateway(&later, WORKER_2, PROGRAMMED)
        .unwrap();
    assert_eq!(
        cluster.source_ip_seen_by_destination(&later).unwrap(),
        WORKER_2
    );
}

#[test]
fn agent_refuses_a_manifests_folder_open_to_others() {
    skip_unless_root!();
    let cluster = Cluster::new(ClusterConfig {
        start_peer: false,
        ..ClusterConfig::with_peer_bin(env!("CARGO_BIN_EXE_egress-peer"))
    })
    .unwrap();
    let open = cluster.work_dir().join("open-manifests");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
    for entry in fs::read_dir(cluster.manifests_dir()).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), open.join(entry.file_name())).unwrap();
    }

    let output = cluster
        .run_agent_once("k8s-worker-1", &open, Duration::from_mins(1))
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "the agent must refuse to start: {stderr}"
    );
    assert!(
        stderr.contains("open to other users") && stderr.contains(&open.display().to_string()),
        "the error names the folder and the problem: {stderr}"
    );
    assert!(stderr.contains("0755"), "and the mode: {stderr}");
}

/// A flow where the remote does the sending: my-app asks once, then only receives, a datagram
/// every 100 ms for 6 s, three times the 2 s UDP idle timeout. Replies keep the flow alive on
/// both nodes, so every datagram arrives (the feed used to stop once the idle timeout expired
/// the gateway's NAT entry and the pod node's flow).
#[test]
fn a_receive_mostly_udp_flow_outlives_the_idle_timeout() {
    skip_unless_root!();
    let mut cluster = cluster_with(
        &[],
        &["--udp-idle-timeout", "2", "--tcp-closing-timeout", "2"],
    );
    let pod = serve_my_app(&mut cluster);
    cluster.start_capture().unwrap();
    let feed = cluster
        .peer_client(
            &pod,
            &[
                "udp-feed",
                "198.51.100.10:8081",
                "--count",
                "60",
                "--interval-ms",
                "100",
            ],
        )
        .unwrap();
    let packets = cluster.stop_capture().unwrap();
    assert!(
        feed.status.success(),
        "udp-feed: {}",
        String::from_utf8_lossy(&feed.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&feed.stdout).unwrap();
    assert_eq!(summary["received"], 60, "the feed stopped: {summary}");
    assert!(
        summary["max_gap_ms"].as_u64().unwrap() < 1000,
        "the feed paused: {summary}"
    );
    let matched = leak_check(&packets, 8081, &pod);
    assert_eq!(matched, 1, "the one request left with the egress IP");
}
