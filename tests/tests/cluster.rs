//! End-to-end scenarios on a namespace cluster: what a user would check after applying a policy.
//!
//! Each test builds its own cluster (k8s-worker-1..3, destination 198.51.100.10 running
//! egress-peer) and tears it down on drop. They need root; as another user they pass with a
//! SKIPPED message. All but the baseline need the agent: `cargo build -p egress-agent` first (or
//! set `EGRESS_AGENT_BIN`).
#![allow(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

use std::{net::Ipv4Addr, time::Duration};

use egress_tests::{
    Cluster, ClusterConfig, GATEWAY_EXCLUDED, GATEWAY_NOT_FOUND, IpProtocol, PeerProtocol, Pod,
    Signal, example_policy, peer_url, skip_unless_root, wait_for_value, wait_until,
};

const WORKER_1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const WORKER_2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const DESTINATION: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const WORKER_3: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 13);
const SECONDARY_EGRESS_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
/// How long an agent may take to program a change (Cilium reconciles within about a second).
const PROGRAMMED: Duration = Duration::from_secs(30);
const UDP_PEER: &str = "198.51.100.10:8081";
const HTTP_PEER: &str = "198.51.100.10:8080";

fn new_cluster() -> Cluster {
    Cluster::new(ClusterConfig::with_peer_bin(env!(
        "CARGO_BIN_EXE_egress-peer"
    )))
    .expect("building the test cluster")
}

/// The how-to's test pod: `my-app` (app=my-app) in namespace default.
fn add_my_app(cluster: &mut Cluster, node: &str) -> Pod {
    cluster
        .add_pod(node, "default", "my-app", &[("app", "my-app")])
        .expect("adding pod my-app")
}

/// A policy steering pods labelled app=my-app to 198.51.100.0/24; `gateway` is the YAML body of
/// `egressGateway` and `excluded` the excludedCIDRs.
fn policy(name: &str, excluded: &[&str], gateway: &str) -> String {
    let mut yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata:\n  name: {name}\nspec:\n  \
         selectors:\n  - podSelector:\n      matchLabels:\n        app: my-app\n  destinationCIDRs:\n  - \
         198.51.100.0/24\n"
    );
    if !excluded.is_empty() {
        yaml.push_str("  excludedCIDRs:\n");
        for cidr in excluded {
            yaml.push_str(&format!("  - {cidr}\n"));
        }
    }
    yaml.push_str("  egressGateway:\n");
    for line in gateway.lines() {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml
}

/// A `0.0.0.0/0` policy for my-app through k8s-worker-2, agents on every node, and
/// `client` programmed.
fn serve_everything_through_worker_2(cluster: &mut Cluster, client: &Pod) {
    cluster
        .label_node("k8s-worker-2", "egress-node", "true")
        .unwrap();
    let everything = policy(
        "everything",
        &[],
        "nodeSelector:\n  matchLabels:\n    egress-node: \"true\"",
    )
    .replace("198.51.100.0/24", "0.0.0.0/0");
    cluster.apply_policy("everything", &everything).unwrap();
    cluster.start_all_agents().unwrap();
    cluster
        .wait_for_pod_gateway(client, WORKER_2, PROGRAMMED)
        .unwrap();
}

/// The how-to, steps 1-2: label k8s-worker-2 `egress-node=true`, apply how-to.yaml.
fn apply_howto_policy(cluster: &mut Cluster) -> String {
    cluster
        .label_node("k8s-worker-2", "egress-node", "true")
        .unwrap();
    cluster
        .apply_policy_file(example_policy("how-to.yaml"))
        .expect("applying how-to.yaml")
}

/// The how-to's cluster, running: my-app on k8s-worker-1, the how-to policy applied, agents
/// on every node, and the pod's traffic programmed through gateway k8s-worker-2.
fn howto_cluster() -> (Cluster, Pod) {
    let mut cluster = new_cluster();
    let pod = add_my_app(&mut cluster, "k8s-worker-1");
    apply_howto_policy(&mut cluster);
    cluster.start_all_agents().unwrap();
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();
    (cluster, pod)
}

/// Gives k8s-worker-2 eth1 with 192.0.2.200 and makes it the gateway of a policy using that egressIP.
fn apply_secondary_egress_ip_policy(cluster: &mut Cluster) {
    cluster.add_secondary_interface("k8s-worker-2").unwrap();
    cluster
        .add_address("k8s-worker-2", "eth1", &format!("{SECONDARY_EGRESS_IP}/24"))
        .unwrap();
    cluster
        .label_node("k8s-worker-2", "egress-node", "true")
        .unwrap();
    let gateway = format!(
        "nodeSelector:\n  matchLabels:\n    egress-node: \"true\"\negressIP: {SECONDARY_EGRESS_IP}"
    );
    cluster
        .apply_policy(
            "secondary-egress-ip",
            &policy("secondary-egress-ip", &[], &gateway),
        )
        .unwrap();
}

fn source_ip(cluster: &Cluster, pod: &Pod) -> Ipv4Addr {
    cluster
        .source_ip_seen_by_destination(pod)
        .expect("curl from the pod to the destination")
}

// ----- (a) harness baseline: no agents -----

#[test]
fn baseline_without_agents_pod_leaves_with_its_node_ip() {
    skip_unless_root!();
    let mut cluster = new_cluster();
    let pod = add_my_app(&mut cluster, "k8s-worker-1");

    assert_eq!(
        source_ip(&cluster, &pod),
        WORKER_1,
        "the plain CNI masquerades to the node IP"
    );
    let seen = cluster.peer_log();
    assert!(
        seen.iter()
            .any(|record| record.protocol == PeerProtocol::Tcp && *record.source.ip() == WORKER_1),
        "the peer log records the connection: {seen:?}"
    );
}

#[test]
fn baseline_without_agents_capture_udp_and_burst_see_node_ips() {
    skip_unless_root!();
    let mut cluster = new_cluster();
    let on_worker_3 = cluster
        .add_pod("k8s-worker-3", "team-a", "client", &[("app", "client")])
        .unwrap();
    cluster.start_capture().unwrap();

    let udp = cluster
        .peer_client(&on_worker_3, &["udp", UDP_PEER, "--count", "3"])
        .unwrap();
    assert!(
        udp.status.success(),
        "udp client: {}",
        String::from_utf8_lossy(&udp.stderr)
    );
    let replies = String::from_utf8_lossy(&udp.stdout).into_owned();
    assert_eq!(replies.lines().count(), 3, "{replies}");
    assert!(
        replies.lines().all(|line| line.starts_with("10.0.0.13:")),
        "{replies}"
    );

    let burst = cluster
        .peer_client(
            &on_worker_3,
            &["tcp-burst", HTTP_PEER, "--connections", "20"],
        )
        .unwrap();
    assert!(
        burst.status.success(),
        "tcp-burst: {}",
        String::from_utf8_lossy(&burst.stderr)
    );
    let sources = String::from_utf8_lossy(&burst.stdout).into_owned();
    assert_eq!(
        sources.lines().filter(|line| *line == "10.0.0.13").count(),
        20,
        "{sources}"
    );

    let packets = cluster.stop_capture().unwrap();
    assert!(
        packets
            .iter()
            .any(|p| p.src == WORKER_3 && p.protocol == IpProtocol::Udp),
        "{packets:?}"
    );
    assert!(
        packets
            .iter()
            .any(|p| p.src == WORKER_3 && p.protocol == IpProtocol::Tcp),
        "{packets:?}"
    );
    assert!(
        packets.iter().all(|p| p.src != on_worker_3.ip),
        "pod IPs never reach the destination"
    );
}

// ----- (b)-(j) with agents -----

#[test]
fn howto_policy_moves_the_source_ip_to_the_gateway_and_back() {
    skip_unless_root!();
    let mut cluster = new_cluster();
    let pod = add_my_app(&mut cluster, "k8s-worker-1");
    cluster.start_all_agents().unwrap();
    assert_eq!(source_ip(&cluster, &pod), WORKER_1, "before the policy");

    let policy_name = apply_howto_policy(&mut cluster);
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();
    assert_eq!(
        source_ip(&cluster, &pod),
        WORKER_2,
        "with the how-to policy"
    );

    // The troubleshooting view from the how-to: both CIDRs, gateway 10.0.0.12, egress IP 0.0.0.0
    // everywhere except on the gateway.
    let on_worker_1 = cluster.egress_list("k8s-worker-1").unwrap();
    for cidr in ["198.51.0.0/16", "198.51.100.0/24"] {
        let entry = on_worker_1
            .iter()
            .find(|entry| entry.source() == Some(pod.ip) && entry.dest_cidr == cidr)
            .unwrap_or_else(|| panic!("no entry for {cidr} on worker-1: {on_worker_1:?}"));
        assert_eq!(entry.gateway(), Some(WORKER_2), "{entry:?}");
        assert_eq!(entry.egress(), Some(Ipv4Addr::UNSPECIFIED), "{entry:?}");
    }
    let on_worker_2 = cluster.egress_list("k8s-worker-2").unwrap();
    assert!(
        on_worker_2
            .iter()
            .any(|entry| entry.source() == Some(pod.ip) && entry.egress() == Some(WORKER_2)),
        "the gateway shows the egress IP: {on_worker_2:?}"
    );

    cluster.delete_policy(&policy_name).unwrap();
    cluster.wait_for_pod_unprogrammed(&pod, PROGRAMMED).unwrap();
    assert_eq!(
        source_ip(&cluster, &pod),
        WORKER_1,
        "after deleting the policy"
    );
}

#[test]
fn pod_on_the_gateway_node_leaves_with_the_egress_ip() {
    skip_unless_root!();
    let mut cluster = new_cluster();
    let pod = add_my_app(&mut cluster, "k8s-worker-2");
    apply_howto_policy(&mut cluster);
    cluster.start_all_agents().unwrap();
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();

    assert_eq!(source_ip(&cluster, &pod), WORKER_2);
}

#[test]
fn excluded_destination_leaves_through_the_pods_own_node() {
    skip_unless_root!();
    let mut cluster = new_cluster();
    let pod = add_my_app(&mut cluster, "k8s-worker-1");
    cluster
        .label_node("k8s-worker-2", "egress-node", "true")
        .unwrap();
    let gateway = "nodeSelector:\n  matchLabels:\n    egress-node: \"true\"\ninterface: eth0";
    cluster
        .apply_policy(
            "exclude-peer",
            &policy("exclude-peer", &["198.51.100.10/32"], gateway),
        )
        .unwrap();
    cluster.start_all_agents().unwrap();
    cluster
        .wait_for_egress_entry("k8s-worker-1", PROGRAMMED, "the excluded /32", |entry| {
            entry.source() == Some(pod.ip)
                && entry.dest_cidr == "198.51.100.10/32"
                && entry.gateway() == Some(GATEWAY_EXCLUDED)
        })
        .unwrap();
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();

    assert_eq!(
        source_ip(&cluster, &pod),
        WORKER_1,
        "excluded traffic is left alone"
    );
}

#[test]
fn policy_without_gateway_node_drops_traffic_and_counts_it() {
    skip_unless_root!();
    let mut cluster = new_cluster();
    let pod = add_my_app(&mut cluster, "k8s-worker-1");
    let gateway =
        "nodeSelector:\n  matchLabels:\n    egress-node: \"no-such-node\"\ninterface: eth0";
    cluster
        .apply_policy("no-gateway", &policy("no-gateway", &[], gateway))
        .unwrap();
    cluster.start_all_agents().unwrap();
    cluster
        .wait_for_egress_entry(
            "k8s-worker-1",
            PROGRAMMED,
            "a gateway-less entry",
            |entry| entry.source() == Some(pod.ip) && entry.gateway() == Some(GATEWAY_NOT_FOUND),
        )
        .unwrap();

    let result = cluster.curl_from_pod(&pod, &peer_url("/"));
    assert!(
        result.is_err(),
        "fail closed: the request must not get through, got {result:?}"
    );
    let drops = cluster
        .counter_packets("k8s-worker-1", "drop_no_gateway")
        .unwrap();
    assert!(
        drops > 0,
        "drop_no_gateway counted: {:?}",
        cluster.counters("k8s-worker-1")
    );
    let seen = cluster.peer_log();
    assert!(seen.is_empty(), "nothing reached the destination: {seen:?}");
}

#[test]
fn deleting_a_pod_removes_its_entries() {
    skip_unless_root!();
    let (mut cluster, pod) = howto_cluster();

    cluster.delete_pod(&pod).unwrap();
    cluster.wait_for_pod_unprogrammed(&pod, PROGRAMMED).unwrap();
    let on_gateway = cluster.egress_list("k8s-worker-2").unwrap();
    assert!(
        on_gateway
            .iter()
            .all(|entry| entry.source() != Some(pod.ip)),
        "the gateway forgot the pod too: {on_gateway:?}"
    );
}

#[test]
fn relabelling_the_gateway_moves_new_connections() {
    skip_unless_root!();
    let mut cluster = new_cluster();
    let pod = add_my_app(&mut cluster, "k8s-worker-1");
    cluster
        .label_node("k8s-worker-2", "egress-node", "true")
        .unwrap();
    // No interface and no egressIP: the gateway's default-route interface (eth0) gives the IP.
    let gateway = "nodeSelector:\n  matchLabels:\n    egress-node: \"true\"";
    cluster
        .apply_policy("movable", &policy("movable", &[], gateway))
        .unwrap();
    cluster.start_all_agents().unwrap();
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();
    assert_eq!(source_ip(&cluster, &pod), WORKER_2);

    cluster.unlabel_node("k8s-worker-2", "egress-node").unwrap();
    cluster
        .label_node("k8s-worker-3", "egress-node", "true")
        .unwrap();
    cluster
        .wait_for_pod_gateway(&pod, WORKER_3, PROGRAMMED)
        .unwrap();
    assert_eq!(source_ip(&cluster, &pod), WORKER_3);
}

#[test]
fn egress_ip_on_a_second_interface_is_used() {
    skip_unless_root!();
    let mut cluster = new_cluster();
    let pod = add_my_app(&mut cluster, "k8s-worker-1");
    apply_secondary_egress_ip_policy(&mut cluster);
    cluster.start_all_agents().unwrap();
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();
    cluster
        .wait_for_egress_entry(
            "k8s-worker-2",
            PROGRAMMED,
            "egress IP 192.0.2.200",
            |entry| entry.source() == Some(pod.ip) && entry.egress() == Some(SECONDARY_EGRESS_IP),
        )
        .unwrap();

    assert_eq!(source_ip(&cluster, &pod), SECONDARY_EGRESS_IP);
}

#[test]
fn udp_through_the_policy_leaves_with_the_egress_ip() {
    skip_unless_root!();
    let (cluster, pod) = howto_cluster();

    // 4 s per reply: longer than an ARP retry, so a late first reply is not mistaken for a lost one.
    let output = cluster
        .peer_client(
            &pod,
            &["udp", UDP_PEER, "--count", "5", "--timeout-ms", "4000"],
        )
        .unwrap();
    let replies = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "udp: {replies} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(replies.lines().count(), 5, "{replies}");
    assert!(
        replies.lines().all(|line| line.starts_with("10.0.0.12:")),
        "peer saw: {replies}"
    );
    let udp_sources: Vec<_> = cluster
        .peer_log()
        .into_iter()
        .filter(|record| record.protocol == PeerProtocol::Udp)
        .collect();
    assert!(
        udp_sources
            .iter()
            .all(|record| *record.source.ip() == WORKER_2),
        "{udp_sources:?}"
    );
}

#[test]
fn many_parallel_connections_all_leave_with_the_egress_ip() {
    skip_unless_root!();
    const CONNECTIONS_PER_POD: usize = 30;
    let mut cluster = new_cluster();
    let pods: Vec<Pod> = ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"]
        .iter()
        .enumerate()
        .map(|(index, node)| {
            cluster
                .add_pod(
                    node,
                    "default",
                    &format!("my-app-{index}"),
                    &[("app", "my-app")],
                )
                .unwrap()
        })
        .collect();
    apply_secondary_egress_ip_policy(&mut cluster);
    cluster.start_all_agents().unwrap();
    for pod in &pods {
        cluster
            .wait_for_pod_gateway(pod, WORKER_2, PROGRAMMED)
            .unwrap();
    }

    cluster.start_capture().unwrap();
    let connections = CONNECTIONS_PER_POD.to_string();
    let peer_bin = env!("CARGO_BIN_EXE_egress-peer");
    let bursts: Vec<_> = pods
        .iter()
        .map(|pod| {
            let args = [
                peer_bin,
                "tcp-burst",
                HTTP_PEER,
                "--connections",
                &connections,
            ];
            cluster
                .spawn_in_pod(pod, &format!("burst-{}", pod.name), &args)
                .unwrap()
        })
        .collect();
    for (pod, burst) in pods.iter().zip(bursts) {
        let finished = burst.wait(Duration::from_mins(1)).unwrap();
        assert!(
            finished.status.success(),
            "burst from {}: {}",
            pod.name,
            finished.stderr
        );
        let sources: Vec<&str> = finished.stdout.lines().collect();
        assert_eq!(
            sources.len(),
            CONNECTIONS_PER_POD,
            "{}: {sources:?}",
            pod.name
        );
        assert!(
            sources.iter().all(|source| *source == "192.0.2.200"),
            "{}: {sources:?}",
            pod.name
        );
    }
    let packets = cluster.stop_capture().unwrap();

    let mut forbidden: Vec<Ipv4Addr> = cluster.nodes.iter().map(|node| node.ip).collect();
    forbidden.extend(pods.iter().map(|pod| pod.ip));
    let leaked: Vec<_> = packets
        .iter()
        .filter(|packet| forbidden.contains(&packet.src))
        .collect();
    assert!(
        leaked.is_empty(),
        "packets with a node or pod source reached the destination: {leaked:?}"
    );
    assert!(
        packets
            .iter()
            .any(|packet| packet.src == SECONDARY_EGRESS_IP),
        "capture saw the egress IP"
    );
    let tcp_seen: Vec<_> = cluster
        .peer_log()
        .into_iter()
        .filter(|r| r.protocol == PeerProtocol::Tcp)
        .collect();
    assert_eq!(tcp_seen.len(), 3 * CONNECTIONS_PER_POD, "{tcp_seen:?}");
    assert!(
        tcp_seen
            .iter()
            .all(|record| *record.source.ip() == SECONDARY_EGRESS_IP),
        "{tcp_seen:?}"
    );
}

#[test]
fn transfer_survives_agent_restarts_on_pod_node_and_gateway() {
    skip_unless_root!();
    // ~12 s at 1 MB/s: long enough to kill and restart both agents mid-transfer.
    const BODY_BYTES: u64 = 12_000_000;
    let (cluster, pod) = howto_cluster();

    let url = peer_url(&format!("/bytes/{BODY_BYTES}"));
    let curl = [
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download} %{http_code}",
        "--max-time",
        "90",
    ];
    let mut transfer = cluster
        .spawn_in_pod(
            &pod,
            "transfer",
            &[&curl[..], &["--limit-rate", "1M", &url]].concat(),
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !cluster.peer_log().is_empty()),
        "the transfer did not reach the destination"
    );

    cluster.kill_agent("k8s-worker-1", Signal::Kill).unwrap();
    cluster.kill_agent("k8s-worker-2", Signal::Kill).unwrap();
    assert!(
        transfer.is_running(),
        "the transfer must still be running while the agents are down"
    );
    cluster.start_agent("k8s-worker-1").unwrap();
    cluster.start_agent("k8s-worker-2").unwrap();
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();

    let finished = transfer.wait(Duration::from_secs(90)).unwrap();
    assert!(
        finished.status.success(),
        "curl failed ({}): {}",
        finished.status,
        finished.stderr
    );
    assert_eq!(finished.stdout.trim(), format!("{BODY_BYTES} 200"));
    let seen = cluster.peer_log();
    assert_eq!(
        seen.len(),
        1,
        "one connection, never re-established: {seen:?}"
    );
    assert_eq!(
        *seen[0].source.ip(),
        WORKER_2,
        "the transfer was seen with the egress IP"
    );
}

#[test]
fn connection_opened_before_the_policy_keeps_its_path() {
    skip_unless_root!();
    // 150 KiB paced by the server over 15 s: the policy is applied while it runs.
    const CHUNKS: u64 = 150;
    let mut cluster = new_cluster();
    let pod = add_my_app(&mut cluster, "k8s-worker-1");
    cluster.start_all_agents().unwrap();
    let url = peer_url(&format!("/drip/{CHUNKS}"));
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
                "60",
                &url,
            ],
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !cluster.peer_log().is_empty()),
        "the transfer did not reach the destination"
    );

    apply_howto_policy(&mut cluster);
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();
    assert!(
        transfer.is_running(),
        "the transfer must outlive the policy change"
    );
    // New connections take the gateway...
    assert_eq!(source_ip(&cluster, &pod), WORKER_2);
    // ...while the one opened before the policy finishes on its old path, unbroken.
    let finished = transfer.wait(Duration::from_mins(1)).unwrap();
    assert!(
        finished.status.success(),
        "curl failed: {}",
        finished.stderr
    );
    assert_eq!(finished.stdout.trim(), format!("{} 200", CHUNKS * 1024));
    assert_eq!(*cluster.peer_log()[0].source.ip(), WORKER_1);
    assert!(
        cluster
            .counter_packets("k8s-worker-1", "pass_existing_flow")
            .unwrap()
            > 0
    );
}

#[test]
fn all_destinations_policy_leaves_pod_to_pod_and_node_traffic_alone() {
    skip_unless_root!();
    let mut cluster = new_cluster();
    let client = add_my_app(&mut cluster, "k8s-worker-1");
    let server = cluster
        .add_pod("k8s-worker-3", "default", "web", &[("app", "web")])
        .unwrap();
    let peer_bin = env!("CARGO_BIN_EXE_egress-peer");
    let log = cluster.work_dir().join("web-peer.log");
    let _web = cluster
        .spawn_in_pod(
            &server,
            "web",
            &[peer_bin, "serve", "--log", log.to_str().unwrap()],
        )
        .unwrap();
    serve_everything_through_worker_2(&mut cluster, &client);

    // Leaving the cluster: through the gateway.
    assert_eq!(source_ip(&cluster, &client), WORKER_2);
    // Another pod sees the client's own pod IP, as without any policy.
    let seen = wait_for_value(Duration::from_secs(10), || {
        cluster
            .curl_from_pod(&client, &format!("http://{}:8080/", server.ip))
            .ok()
    })
    .expect("pod-to-pod HTTP through a 0.0.0.0/0 policy");
    assert_eq!(seen.trim(), client.ip.to_string());
    assert!(
        cluster
            .counter_packets("k8s-worker-1", "pass_in_cluster")
            .unwrap()
            > 0
    );
}

/// A ClusterIP, as kube-proxy gives a Service one: traffic to it is DNATed on the pod's node.
const DNS_CLUSTER_IP: &str = "10.96.0.10";

/// A 0.0.0.0/0 policy in a cluster whose CNI leaves `podCIDR` empty (Calico, AWS VPC CNI),
/// with kube-proxy-style DNAT of a DNS ClusterIP on every node: the selected pod's queries to
/// the ClusterIP and its traffic to a pod on another node stay in the cluster (TC runs before
/// kube-proxy's DNAT, so both used to be sent to the gateway: the ClusterIP query timed out
/// and the other pod saw the egress IP), and traffic to the outside still leaves with the
/// egress IP.
///
/// The Service CIDR comes from the `--service-cidr` flag here, from the cluster's
/// `ServiceCIDR` object in the next test.
#[test]
fn service_cluster_ips_and_pods_outside_every_pod_cidr_are_never_steered() {
    skip_unless_root!();
    cluster_ips_and_pod_traffic_stay_in_the_cluster(&["--service-cidr", "10.96.0.0/12"], false);
}

#[test]
fn service_cidr_objects_keep_cluster_ips_in_the_cluster() {
    skip_unless_root!();
    cluster_ips_and_pod_traffic_stay_in_the_cluster(&[], true);
}

fn cluster_ips_and_pod_traffic_stay_in_the_cluster(agent_args: &[&str], service_cidr_object: bool) {
    let mut cluster = Cluster::new(ClusterConfig {
        publish_pod_cidrs: false,
        agent_args: agent_args.iter().map(ToString::to_string).collect(),
        ..ClusterConfig::with_peer_bin(env!("CARGO_BIN_EXE_egress-peer"))
    })
    .expect("building the test cluster");
    if service_cidr_object {
        // As `kubectl get servicecidr kubernetes -o yaml` prints it on a 1.33 cluster.
        std::fs::write(
            cluster.manifests_dir().join("servicecidr-kubernetes.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [10.96.0.0/12]}\n",
        )
        .unwrap();
    }
    let client = add_my_app(&mut cluster, "k8s-worker-1");
    let dns = cluster
        .add_pod(
            "k8s-worker-3",
            "kube-system",
            "coredns",
            &[("k8s-app", "kube-dns")],
        )
        .unwrap();
    let peer_bin = env!("CARGO_BIN_EXE_egress-peer");
    let log = cluster.work_dir().join("dns-peer.log");
    let _dns_server = cluster
        .spawn_in_pod(
            &dns,
            "dns",
            &[
                peer_bin,
                "serve",
                "--udp",
                "0.0.0.0:53",
                "--log",
                log.to_str().unwrap(),
            ],
        )
        .unwrap();
    // kube-proxy's DNAT of the ClusterIP to its endpoint, on every node.
    for node in cluster.nodes.clone() {
        let ruleset = format!(
            "table ip kube-proxy {{\n\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat;\n\t\tip daddr {DNS_CLUSTER_IP} udp dport 53 dnat to {}:53\n\t}}\n}}\n",
            dns.ip
        );
        let path = cluster
            .work_dir()
            .join(format!("kube-proxy-{}.nft", node.name));
        std::fs::write(&path, ruleset).unwrap();
        egress_tests::process::run_checked(egress_tests::process::netns_command(
            &node.netns,
            &["nft", "-f", path.to_str().unwrap()],
        ))
        .unwrap();
    }
    serve_everything_through_worker_2(&mut cluster, &client);
    cluster.start_capture().unwrap();

    // The UDP echo answers with the source it saw: the client pod itself, both ways.
    let query = |server: &str| {
        let output = cluster
            .peer_client(
                &client,
                &["udp", server, "--count", "1", "--timeout-ms", "3000"],
            )
            .unwrap();
        assert!(
            output.status.success(),
            "UDP to {server}: {}; counters {:?}",
            String::from_utf8_lossy(&output.stderr),
            cluster.counters("k8s-worker-1")
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    let through_cluster_ip = query(&format!("{DNS_CLUSTER_IP}:53"));
    assert!(
        through_cluster_ip.starts_with(&format!("{}:", client.ip)),
        "the DNS pod saw {through_cluster_ip}"
    );
    let to_the_pod = query(&format!("{}:53", dns.ip));
    assert!(
        to_the_pod.starts_with(&format!("{}:", client.ip)),
        "the pod on another node saw {to_the_pod}, not the client's pod IP"
    );
    // Leaving the cluster: still through the gateway.
    assert_eq!(source_ip(&cluster, &client), WORKER_2);
    let packets = cluster.stop_capture().unwrap();
    let matched = egress_tests::LeakDetector::new()
        .matched_port(8080, [WORKER_2])
        .forbidden_sources([client.ip])
        .check(&packets)
        .unwrap();
    assert!(matched > 0);
}

#[test]
fn icmp_echo_and_full_size_packets_go_through_the_tunnel() {
    skip_unless_root!();
    let (mut cluster, pod) = howto_cluster();
    cluster.start_capture().unwrap();
    // 1472 + 28 = 1500 bytes with DF: more than the tunnel's 1450-byte MTU. The tunnel
    // fragments its outer packet instead (the inner one stays whole), so non-TCP traffic
    // of full size still arrives; TCP avoids this through MSS clamping.
    for size in ["56", "1472"] {
        let ping = cluster
            .exec_in_pod(
                &pod,
                &[
                    "ping",
                    "-n",
                    "-c",
                    "2",
                    "-W",
                    "3",
                    "-M",
                    "do",
                    "-s",
                    size,
                    "198.51.100.10",
                ],
            )
            .unwrap();
        assert!(
            ping.status.success(),
            "ping -s {size}: {}{}",
            String::from_utf8_lossy(&ping.stdout),
            String::from_utf8_lossy(&ping.stderr)
        );
    }
    let icmp_sources: Vec<Ipv4Addr> = cluster
        .stop_capture()
        .unwrap()
        .into_iter()
        .filter(|packet| packet.protocol == IpProtocol::Icmp && packet.dst == DESTINATION)
        .map(|packet| packet.src)
        .collect();
    assert_eq!(icmp_sources.len(), 4, "{icmp_sources:?}");
    assert!(
        icmp_sources.iter().all(|source| *source == WORKER_2),
        "{icmp_sources:?}"
    );
}

/// A host outside the cluster pings my-app while its policy covers that host: the echo
/// replies answer an inbound flow, so they keep their path and arrive from the pod's own IP
/// (they used to be steered to the gateway as a new flow and arrive broken, from the egress IP).
#[test]
fn external_ping_to_a_pod_inside_a_policy_destination_gets_its_replies() {
    skip_unless_root!();
    let (mut cluster, pod) = howto_cluster();
    cluster.start_capture().unwrap();
    let pod_ip = pod.ip.to_string();
    let ping = cluster
        .exec(
            cluster.destination_netns(),
            &["ping", "-n", "-c", "3", "-W", "2", &pod_ip],
        )
        .unwrap();
    let captured = cluster.stop_capture().unwrap();
    assert!(
        ping.status.success(),
        "ping {pod_ip} from the destination: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    let reply_sources: Vec<Ipv4Addr> = captured
        .iter()
        .filter(|packet| packet.protocol == IpProtocol::Icmp && packet.dst == DESTINATION)
        .map(|packet| packet.src)
        .collect();
    assert_eq!(reply_sources.len(), 3, "{reply_sources:?}");
    assert!(
        reply_sources.iter().all(|source| *source == pod.ip),
        "echo replies must come from the pod itself: {reply_sources:?}"
    );
    assert!(
        cluster
            .counter_packets("k8s-worker-1", "pass_existing_flow")
            .unwrap()
            >= 3
    );
    assert_eq!(
        cluster
            .counter_packets("k8s-worker-2", "snat_new_flow")
            .unwrap(),
        0,
        "the gateway must not translate echo replies"
    );
}

/// The gateway is a router hop: it decrements the TTL, so traceroute from my-app shows the
/// gateway first, then the router, then the destination (it used to skip the gateway).
#[test]
fn traceroute_from_a_pod_shows_the_gateway_as_a_hop() {
    skip_unless_root!();
    let (mut cluster, pod) = howto_cluster();
    cluster.start_capture().unwrap();
    let trace = cluster
        .exec_in_pod(
            &pod,
            &[
                "traceroute",
                "-n",
                "-q",
                "1",
                "-w",
                "2",
                "-m",
                "5",
                "198.51.100.10",
            ],
        )
        .unwrap();
    let captured = cluster.stop_capture().unwrap();
    let output = String::from_utf8_lossy(&trace.stdout);
    assert!(
        trace.status.success(),
        "traceroute: {output}{}",
        String::from_utf8_lossy(&trace.stderr)
    );
    let hops: Vec<&str> = output
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        hops.first(),
        Some(&"10.0.0.12"),
        "the gateway must be the first hop: {output}"
    );
    assert_eq!(hops.last(), Some(&"198.51.100.10"), "{output}");
    // The probes that reached the destination left with the egress IP.
    let sources: Vec<Ipv4Addr> = captured
        .iter()
        .filter(|packet| packet.protocol == IpProtocol::Udp && packet.dst == DESTINATION)
        .map(|packet| packet.src)
        .collect();
    assert!(!sources.is_empty());
    assert!(
        sources.iter().all(|source| *source == WORKER_2),
        "{sources:?}"
    );
    assert!(
        cluster
            .counter_packets("k8s-worker-2", "pass_ttl_exceeded")
            .unwrap()
            >= 1
    );
}
