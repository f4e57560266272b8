//! Several gateway candidates for one policy: when the active gateway fails (its links go
//! down, its egress interface goes down or loses its address, it leaves the inventory), the
//! pod's traffic continues through the next candidate; an agent killed on the gateway is no
//! failover; a gateway coming back moves no established flow. The leak detector runs on all
//! of it. Failover gaps are printed here and measured by `cargo xtask bench`, never asserted.
//!
//! Root only (otherwise SKIPPED); needs the agent (`cargo build -p egress-agent`).
#![allow(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

use std::{net::Ipv4Addr, thread, time::Duration};

use egress_tests::{
    Cluster, ClusterConfig, FlowKind, LeakDetector, LongFlow, PeerProtocol, Pod, Signal,
    expected::{EgressSource, SimplePolicy},
    skip_unless_root, wait_until,
};

/// The first candidate by name, and the next one; each leaves through its eth1.
const GATEWAY_A: &str = "k8s-worker-2";
const GATEWAY_B: &str = "k8s-worker-3";
const EGRESS_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 12);
const EGRESS_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 13);
const POD_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
/// Requests (HTTP) and the long UDP flow get a destination port each.
const APP_PORT: u16 = 9001;
const FLOW_PORT: u16 = 9002;
const TCP_FLOW_PORT: u16 = 9003;
/// The floating egress IP: held by the first candidate up, on its eth1.
const FLOATING_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const PROGRAMMED: Duration = Duration::from_secs(30);

/// The cluster, both gateways with eth1 (their egress interface), `candidates` labelled
/// egress-node=true; the agents run with `agent_args` too.
fn cluster_with_gateways(candidates: &[&str], agent_args: &[&str]) -> Cluster {
    // These failovers run with the XDP probe responder (the three-gateway one and the other
    // suites with the TC program, the default).
    let mut cluster = Cluster::new(ClusterConfig {
        extra_peer_ports: vec![APP_PORT, FLOW_PORT, TCP_FLOW_PORT],
        agent_args: ["--probe-responder", "xdp"]
            .iter()
            .chain(agent_args)
            .map(ToString::to_string)
            .collect(),
        ..ClusterConfig::with_peer_bin(env!("CARGO_BIN_EXE_egress-peer"))
    })
    .expect("building the test cluster");
    for node in [GATEWAY_A, GATEWAY_B] {
        cluster.add_secondary_interface(node).unwrap();
    }
    for node in candidates {
        cluster.label_node(node, "egress-node", "true").unwrap();
    }
    cluster
}

/// Both gateways labelled egress-node=true, policy `app` (app=my-app, `interface: eth1`),
/// my-app on worker-1 served through A; capture running.
fn two_candidates() -> (Cluster, Pod) {
    served_by(&[GATEWAY_A, GATEWAY_B], EGRESS_A, &[])
}

/// `candidates` labelled egress-node=true, policy `app` (app=my-app, `interface: eth1`),
/// my-app on worker-1 served with `egress_ip`; capture running.
fn served_by(candidates: &[&str], egress_ip: Ipv4Addr, agent_args: &[&str]) -> (Cluster, Pod) {
    let mut cluster = cluster_with_gateways(candidates, agent_args);
    SimplePolicy::new(
        "app",
        &[("app", "my-app")],
        &["198.51.100.0/24"],
        &[("egress-node", "true")],
        EgressSource::Interface("eth1".into()),
    )
    .apply(&cluster)
    .unwrap();
    let pod = cluster
        .add_pod("k8s-worker-1", "default", "my-app", &[("app", "my-app")])
        .unwrap();
    cluster.start_all_agents().unwrap();
    wait_until_served(&cluster, &pod, egress_ip);
    cluster.start_capture().unwrap();
    (cluster, pod)
}

/// The source the destination reports for one request, or None if it failed.
fn source_seen(cluster: &Cluster, pod: &Pod) -> Option<Ipv4Addr> {
    let url = format!("http://198.51.100.10:{APP_PORT}/");
    cluster.curl_from_pod(pod, &url).ok()?.parse().ok()
}

fn wait_until_served(cluster: &Cluster, pod: &Pod, expected: Ipv4Addr) {
    let mut last = None;
    let served = wait_until(PROGRAMMED, || {
        last = source_seen(cluster, pod);
        last == Some(expected)
    });
    if !served {
        cluster.dump_logs();
    }
    assert!(
        served,
        "new requests must leave as {expected}; last answer: {last:?}"
    );
}

/// What worker-1's prober says of `gateway` (1 up, 0 down).
fn healthy(cluster: &Cluster, gateway: &str) -> Option<f64> {
    let series = format!("egress_gateway_gateway_healthy{{node=\"{gateway}\"}}");
    cluster.agent_metric("k8s-worker-1", &series)
}

/// Gateways worker-1's prober found down for `cause`.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a counter's value"
)]
fn failovers(cluster: &Cluster, cause: &str) -> u64 {
    let series = format!("egress_gateway_gateway_failovers_total{{cause=\"{cause}\"}}");
    cluster
        .agent_metric("k8s-worker-1", &series)
        .map_or(0, |count| count as u64)
}

fn assert_no_leaks(cluster: &mut Cluster, pod: &Pod) {
    let packets = cluster.stop_capture().unwrap();
    let matched = LeakDetector::new()
        .matched_port(APP_PORT, [EGRESS_A, EGRESS_B])
        .matched_port(FLOW_PORT, [EGRESS_A, EGRESS_B])
        .forbidden_sources([pod.ip, POD_NODE_IP])
        .check(&packets)
        .unwrap();
    assert!(matched > 0, "the pod's traffic was captured");
}

/// Failovers worker-1's prober counted, for every cause that is one.
fn all_failovers(cluster: &Cluster) -> u64 {
    failovers(cluster, "unanswered") + failovers(cluster, "not_serving")
}

/// No failover: `flow` went on through A without a pause over a second, worker-1 still
/// finds A up, and no failover was counted since `failovers_before`.
fn assert_nothing_moved(cluster: &Cluster, flow: LongFlow, failovers_before: u64) {
    let summary = flow.stop().unwrap();
    summary
        .check_unbroken(&EGRESS_A.to_string(), Duration::from_secs(1))
        .unwrap();
    assert_eq!(healthy(cluster, GATEWAY_A), Some(1.0));
    assert_eq!(all_failovers(cluster), failovers_before, "no failover");
}

/// An nftables rule on `node` dropping what arrives at the tunnel port (from `source`
/// only, when given): after the XDP responder, before the tunnel device.
fn drop_tunnel_traffic(cluster: &Cluster, node: &str, source: Option<&str>) {
    let netns = cluster.node(node).unwrap().netns.clone();
    // The agents' default tunnel port.
    let port = "8475";
    let mut rule = vec!["nft", "add", "rule", "ip", "egt_drop", "input"];
    if let Some(source) = source {
        rule.extend(["ip", "saddr", source]);
    }
    rule.extend(["udp", "dport", port, "drop"]);
    for command in [
        vec!["nft", "add", "table", "ip", "egt_drop"],
        vec![
            "nft",
            "add",
            "chain",
            "ip",
            "egt_drop",
            "input",
            "{ type filter hook input priority -300; }",
        ],
        rule,
    ] {
        let added = cluster.exec(&netns, &command).unwrap();
        assert!(
            added.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&added.stderr)
        );
    }
}

/// Whether worker-1 still probes gateway A after the fault (not when A left the inventory).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Probed {
    Down,
    NoLonger,
}

/// Runs `fault` on gateway A while a UDP flow (a datagram every 20 ms) goes through it;
/// new requests must then leave through B, and the flow must go on through B. The flow's
/// longest pause, the failover gap seen at the destination, is printed.
fn fails_over(
    cluster: &mut Cluster,
    pod: &Pod,
    what: &str,
    probed: Probed,
    fault: impl FnOnce(&mut Cluster),
) {
    let flow = cluster
        .start_long_flow(pod, FlowKind::Udp, FLOW_PORT)
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    fault(cluster);
    wait_until_served(cluster, pod, EGRESS_B);
    thread::sleep(Duration::from_secs(1));
    let summary = flow.stop().unwrap();
    eprintln!(
        "{what}: the UDP flow's longest pause was {} ms ({} of {} datagrams answered)",
        summary.max_gap_ms, summary.received, summary.sent
    );
    let allowed = [EGRESS_A.to_string(), EGRESS_B.to_string()];
    assert!(
        summary
            .sources
            .iter()
            .all(|source| allowed.contains(source)),
        "{what}: the destination saw {:?}",
        summary.sources
    );
    assert!(
        summary.sources.contains(&EGRESS_B.to_string()),
        "{what}: the flow did not go on through the next candidate: {summary:?}"
    );
    let expected = match probed {
        Probed::Down => Some(0.0),
        Probed::NoLonger => None,
    };
    assert_eq!(
        healthy(cluster, GATEWAY_A),
        expected,
        "{what}: what worker-1's prober says of {GATEWAY_A}"
    );
}

#[test]
fn links_down_on_the_active_gateway_move_its_traffic_to_the_next_candidate() {
    skip_unless_root!();
    let (mut cluster, pod) = two_candidates();
    assert_eq!(healthy(&cluster, GATEWAY_A), Some(1.0));
    fails_over(&mut cluster, &pod, "links down", Probed::Down, |cluster| {
        cluster.set_link(GATEWAY_A, "eth0", false).unwrap();
        cluster.set_link(GATEWAY_A, "eth1", false).unwrap();
    });
    assert!(failovers(&cluster, "unanswered") >= 1);

    // A comes back: new flows return to it (first by name).
    cluster.set_link(GATEWAY_A, "eth0", true).unwrap();
    cluster.set_link(GATEWAY_A, "eth1", true).unwrap();
    assert!(wait_until(PROGRAMMED, || healthy(&cluster, GATEWAY_A) == Some(1.0)));
    wait_until_served(&cluster, &pod, EGRESS_A);
    assert_no_leaks(&mut cluster, &pod);
}

#[test]
fn an_egress_interface_down_or_without_its_address_moves_traffic_to_the_next_candidate() {
    skip_unless_root!();
    let (mut cluster, pod) = two_candidates();
    fails_over(
        &mut cluster,
        &pod,
        "egress interface down",
        Probed::Down,
        |cluster| {
            cluster.set_link(GATEWAY_A, "eth1", false).unwrap();
        },
    );
    assert!(failovers(&cluster, "not_serving") >= 1);
    cluster.set_link(GATEWAY_A, "eth1", true).unwrap();
    wait_until_served(&cluster, &pod, EGRESS_A);

    let cidr = format!("{EGRESS_A}/24");
    fails_over(
        &mut cluster,
        &pod,
        "egress IP removed",
        Probed::Down,
        |cluster| {
            cluster.remove_address(GATEWAY_A, "eth1", &cidr).unwrap();
        },
    );
    // Back, as a network manager restores it: the address, eth1's table-100 route (gone
    // with eth1's only address) and the router's stale neighbour entry.
    cluster.add_address(GATEWAY_A, "eth1", &cidr).unwrap();
    cluster.set_link(GATEWAY_A, "eth1", true).unwrap();
    let _ = cluster.exec(
        cluster.underlay_netns(),
        &["ip", "neigh", "flush", "to", &EGRESS_A.to_string()],
    );
    wait_until_served(&cluster, &pod, EGRESS_A);
    assert_no_leaks(&mut cluster, &pod);
}

#[test]
fn a_gateway_leaving_the_inventory_moves_traffic_to_the_next_candidate() {
    skip_unless_root!();
    let (mut cluster, pod) = two_candidates();
    fails_over(
        &mut cluster,
        &pod,
        "node deleted",
        Probed::NoLonger,
        |cluster| {
            cluster.delete_node_manifest(GATEWAY_A).unwrap();
        },
    );
    cluster.restore_node_manifest(GATEWAY_A).unwrap();
    wait_until_served(&cluster, &pod, EGRESS_A);
    assert_no_leaks(&mut cluster, &pod);
}

/// The agent on the active gateway is killed: its datapath answers the probes and
/// translates on, so nothing moves and nothing is lost.
#[test]
fn killing_the_active_gateways_agent_is_no_failover() {
    skip_unless_root!();
    let (mut cluster, pod) = two_candidates();
    let flow = cluster
        .start_long_flow(&pod, FlowKind::Udp, FLOW_PORT)
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    let failovers_before = all_failovers(&cluster);
    cluster.kill_agent(GATEWAY_A, Signal::Kill).unwrap();
    thread::sleep(Duration::from_secs(3));
    assert_eq!(source_seen(&cluster, &pod), Some(EGRESS_A));
    assert_nothing_moved(&cluster, flow, failovers_before);
    assert_no_leaks(&mut cluster, &pod);
}

/// Demand mode: while no traffic goes to the gateways, and while the pod's traffic gets
/// replies, worker-1 probes each of A and B about once a second (`--probe-quiet-interval-ms`),
/// not every 50 ms. (When A stops answering the traffic, it is probed every interval again:
/// the failovers above start from this quiet state.)
#[test]
fn a_quiet_gateway_is_probed_about_once_a_second() {
    skip_unless_root!();
    let (mut cluster, pod) = two_candidates();
    let replies = |cluster: &Cluster| {
        cluster
            .counter_packets("k8s-worker-1", "probe_reply_received")
            .unwrap()
    };
    // Every 50 ms, two gateways would answer 120 probes in 3 s; once a second, about 6.
    let in_three_seconds = |cluster: &Cluster| {
        let before = replies(cluster);
        thread::sleep(Duration::from_secs(3));
        replies(cluster) - before
    };
    thread::sleep(Duration::from_secs(1));
    let failovers_before = all_failovers(&cluster);
    let idle = in_three_seconds(&cluster);
    let flow = cluster
        .start_long_flow(&pod, FlowKind::Udp, FLOW_PORT)
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let busy = in_three_seconds(&cluster);
    eprintln!("probe replies to worker-1 in 3 s: {idle} idle, {busy} with the UDP flow answered");
    assert!(
        idle < 30 && busy < 30,
        "probe replies to worker-1 in 3 s: {idle} idle, {busy} with the UDP flow answered"
    );
    assert_nothing_moved(&cluster, flow, failovers_before);
    assert_no_leaks(&mut cluster, &pod);
}

/// Gateways answer the probes in XDP, on their underlay interface. When the way back of
/// those answers breaks (the frames XDP sends are dropped, as by a driver without XDP
/// transmit), the probing node asks the gateway's TC program instead: no failover, nothing
/// lost. (Probes every interval, quiet or not, to count them.)
#[test]
fn probes_are_answered_in_xdp_and_lost_xdp_answers_fail_nothing_over() {
    skip_unless_root!();
    let (mut cluster, pod) = served_by(
        &[GATEWAY_A, GATEWAY_B],
        EGRESS_A,
        &["--probe-quiet-interval-ms", "50"],
    );
    let answered = |cluster: &Cluster| {
        [
            cluster
                .counter_packets(GATEWAY_A, "probe_answered_xdp")
                .unwrap(),
            cluster
                .counter_packets(GATEWAY_A, "probe_answered")
                .unwrap(),
        ]
    };
    // A second's answers, once the start-up's are over.
    let mut last = [0, 0];
    let in_xdp = wait_until(Duration::from_secs(10), || {
        let before = answered(&cluster);
        thread::sleep(Duration::from_secs(1));
        let after = answered(&cluster);
        last = [after[0] - before[0], after[1] - before[1]];
        last[0] >= 10 && last[1] < last[0]
    });
    assert!(
        in_xdp,
        "{GATEWAY_A} answers in XDP: {} XDP and {} TC answers in a second",
        last[0], last[1]
    );

    let flow = cluster
        .start_long_flow(&pod, FlowKind::Udp, FLOW_PORT)
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    let failovers_before = all_failovers(&cluster);
    cluster.set_xdp_tx_delivered(GATEWAY_A, false).unwrap();
    let before = answered(&cluster);
    thread::sleep(Duration::from_secs(3));
    let after = answered(&cluster);
    assert!(
        after[1] - before[1] >= 10,
        "the TC program answers instead: {before:?} -> {after:?}"
    );
    assert_eq!(source_seen(&cluster, &pod), Some(EGRESS_A));
    let fallbacks = cluster.agent_metric("k8s-worker-1", "egress_gateway_probe_fallbacks_total");
    assert!(
        fallbacks.is_some_and(|count| count >= 1.0),
        "worker-1 counted the fallback: {fallbacks:?}"
    );
    assert_nothing_moved(&cluster, flow, failovers_before);
    cluster.set_xdp_tx_delivered(GATEWAY_A, true).unwrap();
    assert_no_leaks(&mut cluster, &pod);
}

/// The tunnel path behind A's XDP responder breaks (a host firewall drops the tunnel
/// port): the pods' traffic through A is lost while XDP could still answer the probes, so
/// XDP stops answering once A's TC program has not answered for a second, the probes fail,
/// and the traffic moves to B.
#[test]
fn a_broken_tunnel_path_behind_the_xdp_responder_fails_over() {
    skip_unless_root!();
    let (mut cluster, pod) = two_candidates();
    fails_over(
        &mut cluster,
        &pod,
        "tunnel port dropped",
        Probed::Down,
        |cluster| drop_tunnel_traffic(cluster, GATEWAY_A, None),
    );
    assert!(failovers(&cluster, "unanswered") >= 1);
    assert_no_leaks(&mut cluster, &pod);
}

/// After a failover, the gateway coming back takes new flows only: the flow that moved stays
/// on the candidate it moved to.
#[test]
fn a_gateway_coming_back_moves_no_established_flow() {
    skip_unless_root!();
    let (mut cluster, pod) = two_candidates();
    let flow = cluster
        .start_long_flow(&pod, FlowKind::Udp, FLOW_PORT)
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    cluster.set_link(GATEWAY_A, "eth0", false).unwrap();
    wait_until_served(&cluster, &pod, EGRESS_B);
    cluster.set_link(GATEWAY_A, "eth0", true).unwrap();
    assert!(wait_until(PROGRAMMED, || healthy(&cluster, GATEWAY_A) == Some(1.0)));
    wait_until_served(&cluster, &pod, EGRESS_A);
    let since = cluster.peer_log().len();
    thread::sleep(Duration::from_secs(2));
    let summary = flow.stop().unwrap();
    let udp_sources: Vec<Ipv4Addr> = cluster.peer_log()[since..]
        .iter()
        .filter(|record| record.protocol == PeerProtocol::Udp)
        .map(|record| *record.source.ip())
        .collect();
    assert!(!udp_sources.is_empty(), "the flow went on: {summary:?}");
    assert!(
        udp_sources.iter().all(|source| *source == EGRESS_B),
        "the established flow moved back: {udp_sources:?}"
    );
    assert_no_leaks(&mut cluster, &pod);
}

/// Policy `app` with a floating egress IP (the annotation), candidates A and B, my-app on
/// worker-1 served through A holding the address; capture running.
fn floating_candidates() -> (Cluster, Pod) {
    let mut cluster = cluster_with_gateways(&[GATEWAY_A, GATEWAY_B], &[]);
    let policy = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata:\n  name: app\n  \
         annotations:\n    egress-gateway.io/floating-egress-ip: \"true\"\nspec:\n  selectors:\n  \
         - podSelector:\n      matchLabels: {{app: my-app}}\n  destinationCIDRs: \
         [198.51.100.0/24]\n  egressGateway:\n    nodeSelector:\n      matchLabels: \
         {{egress-node: \"true\"}}\n    interface: eth1\n    egressIP: {FLOATING_IP}\n"
    );
    cluster.apply_policy("app", &policy).unwrap();
    let pod = cluster
        .add_pod("k8s-worker-1", "default", "my-app", &[("app", "my-app")])
        .unwrap();
    cluster.start_all_agents().unwrap();
    wait_until_served(&cluster, &pod, FLOATING_IP);
    cluster.start_capture().unwrap();
    (cluster, pod)
}

/// A 60 s download, a TCP connection exchanging a line every 100 ms and a UDP flow, all
/// through gateway A holding the floating egress IP; A's node loses its links at 20 s. The
/// next candidate takes the address; every connection goes on and finishes, and the
/// destination sees nothing but the floating egress IP.
#[test]
fn a_floating_egress_ip_keeps_connections_through_a_failover() {
    skip_unless_root!();
    // 600 KiB paced by the server, 1 KiB every 100 ms: 60 s.
    const CHUNKS: u64 = 600;
    let (mut cluster, pod) = floating_candidates();
    let url = egress_tests::peer_url(&format!("/drip/{CHUNKS}"));
    let mut download = cluster
        .spawn_in_pod(
            &pod,
            "download",
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download} %{http_code}",
                "--max-time",
                "120",
                &url,
            ],
        )
        .unwrap();
    let mut tcp = cluster
        .start_long_flow(&pod, FlowKind::Tcp, TCP_FLOW_PORT)
        .unwrap();
    tcp.wait_connected(PROGRAMMED).unwrap();
    let udp = cluster
        .start_long_flow(&pod, FlowKind::Udp, FLOW_PORT)
        .unwrap();
    thread::sleep(Duration::from_secs(20));
    cluster.set_link(GATEWAY_A, "eth0", false).unwrap();
    cluster.set_link(GATEWAY_A, "eth1", false).unwrap();
    wait_until_served(&cluster, &pod, FLOATING_IP);
    assert_eq!(healthy(&cluster, GATEWAY_A), Some(0.0));
    assert!(
        download.is_running(),
        "the download must outlive the failover"
    );

    let finished = download.wait(Duration::from_secs(90)).unwrap();
    assert!(
        finished.status.success(),
        "curl failed: {}",
        finished.stderr
    );
    assert_eq!(
        finished.stdout.trim(),
        format!("{} 200", CHUNKS * 1024),
        "the download is complete"
    );
    let floating = FLOATING_IP.to_string();
    let tcp = tcp.stop().unwrap();
    eprintln!(
        "floating failover: the TCP connection's longest pause was {} ms",
        tcp.max_gap_ms
    );
    tcp.check_unbroken(&floating, Duration::from_secs(5))
        .unwrap();
    let udp = udp.stop().unwrap();
    eprintln!(
        "floating failover: the UDP flow's longest pause was {} ms ({} of {} answered)",
        udp.max_gap_ms, udp.received, udp.sent
    );
    assert_eq!(
        udp.sources.iter().collect::<Vec<_>>(),
        [&floating],
        "one source for the whole UDP flow"
    );
    let packets = cluster.stop_capture().unwrap();
    let matched = LeakDetector::new()
        .matched_port(egress_tests::PEER_HTTP_PORT, [FLOATING_IP])
        .matched_port(APP_PORT, [FLOATING_IP])
        .matched_port(FLOW_PORT, [FLOATING_IP])
        .matched_port(TCP_FLOW_PORT, [FLOATING_IP])
        .forbidden_sources([pod.ip, POD_NODE_IP, EGRESS_A, EGRESS_B])
        .check(&packets)
        .unwrap();
    assert!(matched > 0);
}

/// `egressGateways[]` with three gateways (worker-2, -3, -4, one entry each): twelve pods on
/// worker-1 are spread over them by rendezvous hashing. Worker-3 loses its links: only the
/// pods that left through it move (to the others), every other pod keeps its gateway.
#[test]
fn with_three_egress_gateways_only_the_failed_ones_pods_move() {
    skip_unless_root!();
    let gateways = ["k8s-worker-2", "k8s-worker-3", "k8s-worker-4"];
    let mut cluster = Cluster::new(ClusterConfig {
        nodes: [
            "k8s-worker-1",
            "k8s-worker-2",
            "k8s-worker-3",
            "k8s-worker-4",
        ]
        .map(String::from)
        .to_vec(),
        extra_peer_ports: vec![APP_PORT],
        ..ClusterConfig::with_peer_bin(env!("CARGO_BIN_EXE_egress-peer"))
    })
    .expect("building the test cluster");
    let mut entries = String::new();
    for gateway in gateways {
        cluster.add_secondary_interface(gateway).unwrap();
        entries.push_str(&format!(
            "  - nodeSelector:\n      matchLabels: {{kubernetes.io/hostname: {gateway}}}\n    \
             interface: eth1\n"
        ));
    }
    let policy = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata:\n  name: fleet\n\
         spec:\n  selectors:\n  - podSelector:\n      matchLabels: {{app: fleet}}\n  \
         destinationCIDRs: [198.51.100.0/24]\n  egressGateway:\n    nodeSelector:\n      \
         matchLabels: {{kubernetes.io/hostname: k8s-worker-2}}\n    interface: eth1\n  \
         egressGateways:\n{entries}"
    );
    cluster.apply_policy("fleet", &policy).unwrap();
    let pods: Vec<Pod> = (0..12)
        .map(|i| {
            cluster
                .add_pod(
                    "k8s-worker-1",
                    "default",
                    &format!("fleet-{i}"),
                    &[("app", "fleet")],
                )
                .unwrap()
        })
        .collect();
    cluster.start_all_agents().unwrap();
    let egress_of =
        |gateway: &str| -> Ipv4Addr { cluster.node(gateway).unwrap().secondary_ip.unwrap() };
    let allowed: Vec<Ipv4Addr> = gateways.iter().map(|gateway| egress_of(gateway)).collect();
    let served = |cluster: &Cluster| -> Option<Vec<Ipv4Addr>> {
        pods.iter()
            .map(|pod| source_seen(cluster, pod).filter(|ip| allowed.contains(ip)))
            .collect()
    };
    let before = egress_tests::wait_for_value(PROGRAMMED, || served(&cluster))
        .expect("every pod is served through one of the gateways");
    let failed = egress_of("k8s-worker-3");
    let on_failed = before.iter().filter(|ip| **ip == failed).count();
    assert!(
        on_failed > 0 && on_failed < pods.len(),
        "the pods spread over the gateways: {before:?}"
    );
    cluster.start_capture().unwrap();

    cluster.set_link("k8s-worker-3", "eth0", false).unwrap();
    cluster.set_link("k8s-worker-3", "eth1", false).unwrap();
    let after = egress_tests::wait_for_value(PROGRAMMED, || {
        served(&cluster).filter(|now| !now.contains(&failed))
    })
    .expect("every pod is served again, none through the failed gateway");
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(was, now)| was != now)
        .count();
    for (pod, (was, now)) in pods.iter().zip(before.iter().zip(&after)) {
        if *was != failed {
            assert_eq!(was, now, "{} moved though its gateway is fine", pod.name);
        }
    }
    eprintln!(
        "three gateways: {on_failed} of {} pods were on the failed one; {moved} moved",
        pods.len()
    );
    assert_eq!(moved, on_failed, "only the failed gateway's pods moved");
    let packets = cluster.stop_capture().unwrap();
    let pod_ips: Vec<Ipv4Addr> = pods.iter().map(|pod| pod.ip).collect();
    LeakDetector::new()
        .matched_port(egress_tests::PEER_HTTP_PORT, allowed.clone())
        .matched_port(APP_PORT, allowed)
        .forbidden_sources(pod_ips.into_iter().chain([POD_NODE_IP]))
        .check(&packets)
        .unwrap();
}

/// A candidate joining ahead of the active gateway (first by name) takes new flows only: a
/// flow established through the other keeps its gateway.
#[test]
fn a_gateway_joining_moves_no_established_flow() {
    skip_unless_root!();
    // Only B is a candidate at first.
    let (mut cluster, pod) = served_by(&[GATEWAY_B], EGRESS_B, &[]);
    let flow = cluster
        .start_long_flow(&pod, FlowKind::Udp, FLOW_PORT)
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    // A joins, first by name: new requests take it.
    cluster
        .label_node(GATEWAY_A, "egress-node", "true")
        .unwrap();
    wait_until_served(&cluster, &pod, EGRESS_A);
    let since = cluster.peer_log().len();
    thread::sleep(Duration::from_secs(2));
    let summary = flow.stop().unwrap();
    let udp_sources: Vec<Ipv4Addr> = cluster.peer_log()[since..]
        .iter()
        .filter(|record| record.protocol == PeerProtocol::Udp)
        .map(|record| *record.source.ip())
        .collect();
    assert!(!udp_sources.is_empty(), "the flow went on: {summary:?}");
    assert!(
        udp_sources.iter().all(|source| *source == EGRESS_B),
        "the established flow moved to the new gateway: {udp_sources:?}"
    );
    summary
        .check_unbroken(&EGRESS_B.to_string(), Duration::from_secs(1))
        .unwrap();
    assert_no_leaks(&mut cluster, &pod);
}

/// The active gateway is drained (the documented label): new flows take the next candidate,
/// the established flow stays on the drained gateway, unbroken.
#[test]
fn a_draining_gateway_takes_no_new_flows_and_keeps_its_established_ones() {
    skip_unless_root!();
    let (mut cluster, pod) = two_candidates();
    let flow = cluster
        .start_long_flow(&pod, FlowKind::Udp, FLOW_PORT)
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    cluster
        .label_node(GATEWAY_A, "egress-gateway.io/draining", "true")
        .unwrap();
    wait_until_served(&cluster, &pod, EGRESS_B);
    thread::sleep(Duration::from_secs(2));
    let summary = flow.stop().unwrap();
    summary
        .check_unbroken(&EGRESS_A.to_string(), Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        healthy(&cluster, GATEWAY_A),
        Some(1.0),
        "draining is not down"
    );
    assert_no_leaks(&mut cluster, &pod);
}

/// Split brain: B stops hearing A's probe replies (a partition between the two only) while
/// A still serves, so both hold the floating egress IP. Connections through either keep
/// working and nothing leaves with another source.
#[test]
fn two_holders_of_a_floating_egress_ip_break_nothing() {
    skip_unless_root!();
    let (mut cluster, pod) = floating_candidates();
    let tcp_flow = cluster
        .start_long_flow(&pod, FlowKind::Tcp, TCP_FLOW_PORT)
        .unwrap();
    let udp = cluster
        .start_long_flow(&pod, FlowKind::Udp, FLOW_PORT)
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    // B drops what A sends it through the tunnel: A's answers to B's probes never arrive,
    // and A stays up for worker-1.
    let a_ip = cluster.node(GATEWAY_A).unwrap().ip.to_string();
    drop_tunnel_traffic(&cluster, GATEWAY_B, Some(&a_ip));
    let both_hold = wait_until(PROGRAMMED, || {
        [GATEWAY_A, GATEWAY_B]
            .iter()
            .all(|node| holds_floating_ip(&cluster, node))
    });
    assert!(both_hold, "B took the floating IP while A kept it");
    thread::sleep(Duration::from_secs(3));
    assert_eq!(source_seen(&cluster, &pod), Some(FLOATING_IP));
    let floating = FLOATING_IP.to_string();
    let tcp_summary = tcp_flow.stop().unwrap();
    tcp_summary
        .check_unbroken(&floating, Duration::from_secs(5))
        .unwrap();
    let udp_summary = udp.stop().unwrap();
    assert_eq!(
        udp_summary.sources.iter().collect::<Vec<_>>(),
        [&floating],
        "{udp_summary:?}"
    );
    let packets = cluster.stop_capture().unwrap();
    LeakDetector::new()
        .matched_port(APP_PORT, [FLOATING_IP])
        .matched_port(FLOW_PORT, [FLOATING_IP])
        .matched_port(TCP_FLOW_PORT, [FLOATING_IP])
        .forbidden_sources([pod.ip, POD_NODE_IP, EGRESS_A, EGRESS_B])
        .check(&packets)
        .unwrap();
}

/// Whether `node` holds the floating egress IP on its eth1.
fn holds_floating_ip(cluster: &Cluster, node: &str) -> bool {
    let netns = cluster.node(node).unwrap().netns.clone();
    cluster
        .exec(&netns, &["ip", "-4", "addr", "show", "dev", "eth1"])
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("192.0.2.100/"))
}

/// The holder's agent is down (kill -9) while the policy is deleted: no policy names the
/// address any more, yet the restarted agent removes it, since it marks the addresses it
/// adds (`IFA_PROTO`).
#[test]
fn a_floating_ip_left_while_no_agent_ran_is_removed_by_the_next_one() {
    skip_unless_root!();
    let (cluster, _pod) = floating_candidates();
    assert!(holds_floating_ip(&cluster, GATEWAY_A));
    cluster.kill_agent(GATEWAY_A, Signal::Kill).unwrap();
    cluster.delete_policy("app").unwrap();
    thread::sleep(Duration::from_secs(1));
    assert!(
        holds_floating_ip(&cluster, GATEWAY_A),
        "no agent ran to remove it"
    );
    cluster.restart_agent(GATEWAY_A).unwrap();
    assert!(
        wait_until(PROGRAMMED, || !holds_floating_ip(&cluster, GATEWAY_A)),
        "{GATEWAY_A}'s new agent removed the address of the deleted policy"
    );
    assert!(!holds_floating_ip(&cluster, GATEWAY_B));
}

/// After a failover, the agents restart (kill -9, then started again) on the new holder and
/// on the pod's node: the verdicts they find stand, so the new holder keeps the floating
/// egress IP and the flow goes on through it.
#[test]
fn agents_restarted_after_a_failover_keep_its_outcome() {
    skip_unless_root!();
    let (mut cluster, pod) = floating_candidates();
    cluster.set_link(GATEWAY_A, "eth0", false).unwrap();
    cluster.set_link(GATEWAY_A, "eth1", false).unwrap();
    wait_until_served(&cluster, &pod, FLOATING_IP);
    let udp = cluster
        .start_long_flow(&pod, FlowKind::Udp, FLOW_PORT)
        .unwrap();
    thread::sleep(Duration::from_secs(1));
    let holds = |cluster: &Cluster, node: &str| {
        let netns = cluster.node(node).unwrap().netns.clone();
        cluster
            .exec(&netns, &["ip", "-4", "addr", "show", "dev", "eth1"])
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("192.0.2.100/"))
    };
    assert!(holds(&cluster, GATEWAY_B));
    for node in [GATEWAY_B, "k8s-worker-1"] {
        cluster.kill_agent(node, Signal::Kill).unwrap();
        cluster.restart_agent(node).unwrap();
    }
    for _ in 0..20 {
        assert!(
            holds(&cluster, GATEWAY_B),
            "B let the floating IP go across its restart"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        healthy(&cluster, GATEWAY_A),
        Some(0.0),
        "the restarted prober kept A down"
    );
    thread::sleep(Duration::from_secs(1));
    let summary = udp.stop().unwrap();
    summary
        .check_unbroken(&FLOATING_IP.to_string(), Duration::from_secs(1))
        .unwrap();
    let packets = cluster.stop_capture().unwrap();
    LeakDetector::new()
        .matched_port(FLOW_PORT, [FLOATING_IP])
        .forbidden_sources([pod.ip, POD_NODE_IP, EGRESS_A, EGRESS_B])
        .check(&packets)
        .unwrap();
}
