//! Faults on a namespace cluster: agents killed with SIGKILL during policy churn, and network
//! faults on the gateway (egress interface down, egress IP removed or moved, gateway node
//! gone from the inventory). Matched traffic must be dropped while no valid gateway exists
//! (fail closed, counted, logged once per change) and flow again once one does; the leak
//! detector must count zero packets with a wrong source throughout.
//!
//! Root only (otherwise SKIPPED); needs the agent (`cargo build -p egress-agent`).
#![allow(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

use std::{net::Ipv4Addr, time::Duration};

use egress_tests::{
    Cluster, ClusterConfig, FlowKind, LeakDetector, Pod, Signal,
    expected::{EgressSource, SimplePolicy, wait_for_maps_to_match},
    skip_unless_root, wait_until,
};

const WORKER_2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const EGRESS_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
const DESTINATIONS: &str = "198.51.100.0/24";
const PROGRAMMED: Duration = Duration::from_secs(30);
/// The destination port of the test pod's traffic (HTTP and UDP echo).
const APP_PORT: u16 = 9001;
/// The destination port of the churn pod's traffic.
const CHURN_PORT: u16 = 9101;

/// Three nodes with eth1 on 192.0.2.0/24; worker-2 (label egress-node=true) also holds
/// 192.0.2.200, the egress IP of policy `app`, which selects app=my-app.
fn secondary_ip_cluster() -> (Cluster, SimplePolicy) {
    let mut cluster = Cluster::new(ClusterConfig {
        extra_peer_ports: vec![APP_PORT, CHURN_PORT],
        ..ClusterConfig::with_peer_bin(env!("CARGO_BIN_EXE_egress-peer"))
    })
    .expect("building the test cluster");
    for node in ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"] {
        cluster.add_secondary_interface(node).unwrap();
    }
    cluster
        .add_address("k8s-worker-2", "eth1", &format!("{EGRESS_IP}/24"))
        .unwrap();
    cluster
        .label_node("k8s-worker-2", "egress-node", "true")
        .unwrap();
    let policy = SimplePolicy::new(
        "app",
        &[("app", "my-app")],
        &[DESTINATIONS],
        &[("egress-node", "true")],
        EgressSource::Ip(EGRESS_IP),
    );
    policy.apply(&cluster).unwrap();
    (cluster, policy)
}

fn add_app_pod(cluster: &mut Cluster) -> Pod {
    cluster
        .add_pod("k8s-worker-1", "default", "my-app", &[("app", "my-app")])
        .unwrap()
}

fn app_url(path: &str) -> String {
    format!("http://198.51.100.10:{APP_PORT}{path}")
}

/// The source the destination reports for one request, or None if the request failed.
fn source_seen(cluster: &Cluster, pod: &Pod) -> Option<Ipv4Addr> {
    cluster.curl_from_pod(pod, &app_url("/")).ok()?.parse().ok()
}

/// Waits until requests from the pod get through again, with `expected` as the source.
fn wait_until_served(cluster: &Cluster, pod: &Pod, expected: Ipv4Addr) {
    let mut last = None;
    let served = wait_until(Duration::from_mins(1), || {
        last = source_seen(cluster, pod);
        last == Some(expected)
    });
    assert!(
        served,
        "requests from {} must leave as {expected} again; last answer: {last:?}",
        pod.name
    );
}

/// Makes `node`'s agent reconcile several times while the fault lasts (a matched pod comes
/// and goes, each seen in its maps), so a problem logged per reconcile instead of per change
/// would show up more than once.
fn provoke_reconciles(cluster: &mut Cluster, node: &str) {
    for round in 0..2 {
        let probe = cluster
            .add_pod(
                "k8s-worker-3",
                "default",
                &format!("reconcile-probe-{round}"),
                &[("app", "my-app")],
            )
            .unwrap();
        cluster
            .wait_for_egress_entry(node, PROGRAMMED, "the probe pod's entry", |entry| {
                entry.source() == Some(probe.ip)
            })
            .unwrap();
        cluster.delete_pod(&probe).unwrap();
        assert!(
            wait_until(PROGRAMMED, || cluster.egress_list(node).is_ok_and(
                |entries| entries.iter().all(|e| e.source() != Some(probe.ip))
            )),
            "the probe pod's entry must go from {node}"
        );
    }
}

/// The node of the pods these tests run.
const POD_NODE: &str = "k8s-worker-1";

/// What a fault must show on one node: `reason` counts its drops, `problem` is logged once.
struct ExpectedFault {
    node: &'static str,
    reason: &'static str,
    problem: &'static str,
    drops_before: u64,
    /// `drop_no_gateway` on the pod's node: once its probes hear that the gateway cannot
    /// serve, the pod's node drops the packets itself and the gateway sees none.
    pod_node_drops_before: u64,
    logged_before: usize,
}

impl ExpectedFault {
    /// Call before causing the fault.
    fn new(
        cluster: &Cluster,
        node: &'static str,
        reason: &'static str,
        problem: &'static str,
    ) -> Self {
        ExpectedFault {
            node,
            reason,
            problem,
            drops_before: cluster.counter_packets(node, reason).unwrap(),
            pod_node_drops_before: cluster
                .counter_packets(POD_NODE, "drop_no_gateway")
                .unwrap(),
            logged_before: cluster.agent_log_lines(node, &[problem]).len(),
        }
    }

    /// Once the agent noticed: requests and datagrams fail, the drops are counted, and the
    /// problem is logged exactly once however often the agent reconciles or packets come.
    fn assert_fails_closed(&self, cluster: &mut Cluster, pod: &Pod) {
        let node = self.node;
        assert!(
            wait_until(PROGRAMMED, || cluster
                .agent_log_lines(node, &[self.problem])
                .len()
                > self.logged_before),
            "the agent on {node} must log the problem ({:?})",
            self.problem
        );
        assert_traffic_fails(cluster, pod);
        assert!(
            wait_until(Duration::from_secs(10), || cluster
                .counter_packets(node, self.reason)
                .unwrap()
                > self.drops_before
                || cluster
                    .counter_packets(POD_NODE, "drop_no_gateway")
                    .unwrap()
                    > self.pod_node_drops_before),
            "{} on {node} (or drop_no_gateway on {POD_NODE}) must count the dropped packets: \
             {:?}",
            self.reason,
            cluster.counters(node)
        );
        provoke_reconciles(cluster, node);
        // More traffic: a per-packet log would show now.
        let _ = cluster.curl_from_pod(pod, &app_url("/"));
        let lines = cluster.agent_log_lines(node, &[self.problem]);
        assert_eq!(
            lines.len(),
            self.logged_before + 1,
            "the problem is logged once per change, not per packet or reconcile: {lines:#?}"
        );
    }
}

/// Neither a request nor datagrams get an answer.
fn assert_traffic_fails(cluster: &Cluster, pod: &Pod) {
    let result = cluster.curl_from_pod(pod, &app_url("/"));
    assert!(
        result.is_err(),
        "fail closed: the request got through: {result:?}"
    );
    let udp = cluster
        .peer_client(
            pod,
            &[
                "udp",
                &format!("198.51.100.10:{APP_PORT}"),
                "--count",
                "3",
                "--timeout-ms",
                "500",
            ],
        )
        .unwrap();
    assert!(
        !udp.status.success() && udp.stdout.is_empty(),
        "fail closed: UDP got answers: {}",
        String::from_utf8_lossy(&udp.stdout)
    );
}

// ----- agent faults -----

/// NAT entries of a pod on a node: (pod ip:port, destination, egress ip:port).
fn nat_of(cluster: &Cluster, node: &str, pod: &Pod) -> Vec<(String, String, String)> {
    let prefix = format!("{}:", pod.ip);
    let mut entries: Vec<_> = cluster
        .nat_list(node)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|entry| {
            entry["pod"]
                .as_str()
                .is_some_and(|p| p.starts_with(&prefix))
        })
        .map(|entry| {
            (
                entry["pod"].as_str().unwrap_or_default().to_string(),
                entry["destination"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                entry["egress"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    entries.sort();
    entries
}

#[test]
fn agents_killed_during_policy_churn_keep_transfers_and_nat_state() {
    skip_unless_root!();
    const BODY_BYTES: u64 = 12_000_000;
    let (mut cluster, app) = secondary_ip_cluster();
    let pod = add_app_pod(&mut cluster);
    let churn_pod = cluster
        .add_pod("k8s-worker-3", "default", "churn", &[("role", "churn")])
        .unwrap();
    cluster
        .label_node("k8s-worker-3", "egress-moving", "true")
        .unwrap();
    let mut churn = SimplePolicy::new(
        "churn",
        &[("role", "churn")],
        &[DESTINATIONS],
        &[("egress-moving", "true")],
        EgressSource::Interface("eth1".into()),
    );
    cluster.start_all_agents().unwrap();
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();
    cluster.start_capture().unwrap();

    // A slow download (about 12 s at 1 MB/s), a long TCP connection and a UDP stream.
    let mut transfer = cluster
        .spawn_in_pod(
            &pod,
            "transfer",
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download} %{http_code}",
                "--max-time",
                "180",
                "--limit-rate",
                "1M",
                &app_url(&format!("/bytes/{BODY_BYTES}")),
            ],
        )
        .unwrap();
    let mut tcp = cluster
        .start_long_flow(&pod, FlowKind::Tcp, APP_PORT)
        .unwrap();
    tcp.wait_connected(Duration::from_secs(30)).unwrap();
    let udp = cluster
        .start_long_flow(&pod, FlowKind::Udp, APP_PORT)
        .unwrap();
    // Three flows: the download, the held connection, the UDP stream.
    assert!(
        wait_until(Duration::from_secs(30), || nat_of(
            &cluster,
            "k8s-worker-2",
            &pod
        )
        .len()
            == 3),
        "NAT entries of the three flows: {:?}",
        nat_of(&cluster, "k8s-worker-2", &pod)
    );
    let nat_before = nat_of(&cluster, "k8s-worker-2", &pod);

    // Kill both agents on the path, change policies while they are down, restart them into
    // more churn, kill the gateway's again mid-churn.
    cluster.kill_agent("k8s-worker-1", Signal::Kill).unwrap();
    cluster.kill_agent("k8s-worker-2", Signal::Kill).unwrap();
    churn.apply(&cluster).unwrap();
    cluster
        .label_node("k8s-worker-1", "egress-moving", "true")
        .unwrap();
    cluster
        .unlabel_node("k8s-worker-3", "egress-moving")
        .unwrap();
    assert!(
        transfer.is_running(),
        "the transfer runs on while the agents are down"
    );
    cluster.start_agent("k8s-worker-1").unwrap();
    cluster.start_agent("k8s-worker-2").unwrap();
    churn.destinations = vec!["198.51.100.10/32".into()];
    churn.apply(&cluster).unwrap();
    cluster.kill_agent("k8s-worker-2", Signal::Kill).unwrap();
    cluster
        .label_node("k8s-worker-2", "egress-moving", "true")
        .unwrap();
    cluster
        .unlabel_node("k8s-worker-1", "egress-moving")
        .unwrap();
    cluster.start_agent("k8s-worker-2").unwrap();
    let policies = [app.clone(), churn.clone()];
    wait_for_maps_to_match(&cluster, &policies, PROGRAMMED).unwrap();

    assert_eq!(
        nat_of(&cluster, "k8s-worker-2", &pod),
        nat_before,
        "the gateway's NAT entries survived the restarts unchanged"
    );
    // The churn pod's traffic follows the churned policy: out of worker-2's eth1.
    let churn_source = cluster
        .peer_client(
            &churn_pod,
            &[
                "tcp-burst",
                &format!("198.51.100.10:{CHURN_PORT}"),
                "--connections",
                "2",
            ],
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&churn_source.stdout),
        "192.0.2.12\n192.0.2.12\n",
        "{}",
        String::from_utf8_lossy(&churn_source.stderr)
    );

    let finished = transfer.wait(Duration::from_mins(3)).unwrap();
    assert!(
        finished.status.success(),
        "curl failed ({}): {}",
        finished.status,
        finished.stderr
    );
    assert_eq!(finished.stdout.trim(), format!("{BODY_BYTES} 200"));
    for flow in [tcp, udp] {
        let kind = flow.kind;
        flow.stop()
            .unwrap()
            .check_unbroken(&EGRESS_IP.to_string(), Duration::from_secs(10))
            .unwrap_or_else(|error| panic!("{kind:?} flow: {error:#}"));
    }
    let packets = cluster.stop_capture().unwrap();
    LeakDetector::new()
        .matched_port(APP_PORT, [EGRESS_IP])
        .matched_port(CHURN_PORT, [Ipv4Addr::new(192, 0, 2, 12)])
        .forbidden_sources([pod.ip, churn_pod.ip])
        .check(&packets)
        .unwrap();
}

// ----- network faults -----

/// Gateway with 192.0.2.200 on eth1, pod on worker-1 served through it; capture running.
fn served_through_secondary_ip() -> (Cluster, Pod) {
    let (mut cluster, _) = secondary_ip_cluster();
    cluster.add_secondary_link("k8s-worker-2", "eth2").unwrap();
    let pod = add_app_pod(&mut cluster);
    cluster.start_all_agents().unwrap();
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();
    wait_until_served(&cluster, &pod, EGRESS_IP);
    cluster.start_capture().unwrap();
    (cluster, pod)
}

fn assert_no_leaks(cluster: &mut Cluster, pod: &Pod) {
    let packets = cluster.stop_capture().unwrap();
    LeakDetector::new()
        .matched_port(APP_PORT, [EGRESS_IP])
        .forbidden_sources([pod.ip])
        .check(&packets)
        .unwrap();
}

#[test]
fn egress_interface_down_drops_traffic_without_leaking_and_recovers() {
    skip_unless_root!();
    let (mut cluster, pod) = served_through_secondary_ip();

    cluster.set_link("k8s-worker-2", "eth1", false).unwrap();
    assert!(
        wait_until(PROGRAMMED, || source_seen(&cluster, &pod).is_none()),
        "requests must fail while the egress interface is down"
    );
    assert_traffic_fails(&cluster, &pod);
    cluster.set_link("k8s-worker-2", "eth1", true).unwrap();
    wait_until_served(&cluster, &pod, EGRESS_IP);
    assert_no_leaks(&mut cluster, &pod);
}

#[test]
fn egress_interface_down_is_counted_and_logged_once() {
    skip_unless_root!();
    let (mut cluster, pod) = served_through_secondary_ip();
    let fault = ExpectedFault::new(
        &cluster,
        "k8s-worker-2",
        "drop_no_egress_ip",
        "its matched traffic is dropped",
    );
    cluster.set_link("k8s-worker-2", "eth1", false).unwrap();
    fault.assert_fails_closed(&mut cluster, &pod);
    cluster.set_link("k8s-worker-2", "eth1", true).unwrap();
    wait_until_served(&cluster, &pod, EGRESS_IP);
    assert_no_leaks(&mut cluster, &pod);
}

#[test]
fn egress_ip_removed_moved_and_restored_fails_closed_while_missing() {
    skip_unless_root!();
    let (mut cluster, pod) = served_through_secondary_ip();
    let cidr = format!("{EGRESS_IP}/24");

    let fault = ExpectedFault::new(
        &cluster,
        "k8s-worker-2",
        "drop_no_egress_ip",
        "egress IP 192.0.2.200 is not an address of node k8s-worker-2; its matched traffic is \
         dropped",
    );
    cluster
        .remove_address("k8s-worker-2", "eth1", &cidr)
        .unwrap();
    fault.assert_fails_closed(&mut cluster, &pod);

    // The address shows up on another interface: followed through netlink.
    cluster.add_address("k8s-worker-2", "eth2", &cidr).unwrap();
    let _ = cluster.exec(
        cluster.underlay_netns(),
        &["ip", "neigh", "flush", "to", &EGRESS_IP.to_string()],
    );
    wait_until_served(&cluster, &pod, EGRESS_IP);
    assert_eq!(
        cluster
            .agent_log_lines("k8s-worker-2", &["served again", "policy=\"app\""])
            .len(),
        1,
        "recovery is logged once"
    );

    // And back where it was.
    cluster
        .move_address("k8s-worker-2", &cidr, "eth2", "eth1")
        .unwrap();
    wait_until_served(&cluster, &pod, EGRESS_IP);
    assert_no_leaks(&mut cluster, &pod);
}

#[test]
fn gateway_node_leaving_the_inventory_fails_closed_and_recovers() {
    skip_unless_root!();
    let (mut cluster, pod) = served_through_secondary_ip();

    let fault = ExpectedFault::new(
        &cluster,
        "k8s-worker-1",
        "drop_no_gateway",
        "no gateway node: no node with an InternalIP matches the gateway nodeSelector; its \
         matched traffic is dropped",
    );
    cluster.delete_node_manifest("k8s-worker-2").unwrap();
    fault.assert_fails_closed(&mut cluster, &pod);

    cluster.restore_node_manifest("k8s-worker-2").unwrap();
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();
    wait_until_served(&cluster, &pod, EGRESS_IP);
    assert_no_leaks(&mut cluster, &pod);
}
