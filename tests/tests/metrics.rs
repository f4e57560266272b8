//! The agent's metrics endpoint, scraped as Prometheus would from inside a node's namespace
//! (the default address, 127.0.0.1:9969, is each node namespace's own loopback).
//!
//! Needs root (as another user it passes with a SKIPPED message) and a built agent.
#![allow(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

use std::{net::Ipv4Addr, time::Duration};

use egress_tests::{
    Cluster, ClusterConfig, example_policy, metric_value, skip_unless_root, wait_for_value,
};

const WORKER_2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const PROGRAMMED: Duration = Duration::from_secs(30);

fn get(cluster: &Cluster, node: &str, path: &str) -> Option<(u16, String)> {
    cluster.agent_http_get(node, path)
}

fn sample(metrics: &str, series: &str) -> Option<f64> {
    metric_value(metrics, series)
}

/// Waits until the node's /metrics has `series` above zero; returns the whole scrape.
fn wait_for_positive(cluster: &Cluster, node: &str, series: &str) -> String {
    let mut last = String::new();
    wait_for_value(Duration::from_secs(10), || {
        let (status, body) = get(cluster, node, "/metrics")?;
        last.clone_from(&body);
        (status == 200 && sample(&body, series).is_some_and(|value| value > 0.0)).then_some(body)
    })
    .unwrap_or_else(|| {
        cluster.dump_logs();
        panic!("{series} on {node} never went above 0; last scrape:\n{last}")
    })
}

/// The how-to on a fresh cluster: my-app on k8s-worker-1 through gateway k8s-worker-2,
/// with agents on `agents`, programmed.
fn howto_cluster(agents: &[&str]) -> (Cluster, egress_tests::Pod) {
    let mut cluster = Cluster::new(ClusterConfig::with_peer_bin(env!(
        "CARGO_BIN_EXE_egress-peer"
    )))
    .expect("building the test cluster");
    let pod = cluster
        .add_pod("k8s-worker-1", "default", "my-app", &[("app", "my-app")])
        .unwrap();
    cluster
        .label_node("k8s-worker-2", "egress-node", "true")
        .unwrap();
    cluster
        .apply_policy_file(example_policy("how-to.yaml"))
        .unwrap();
    for node in agents {
        cluster.start_agent(node).unwrap();
    }
    cluster
        .wait_for_pod_gateway(&pod, WORKER_2, PROGRAMMED)
        .unwrap();
    (cluster, pod)
}

#[test]
fn metrics_count_redirected_and_translated_traffic() {
    skip_unless_root!();
    let (cluster, pod) = howto_cluster(&["k8s-worker-1", "k8s-worker-2"]);

    // Programmed means synced: both agents are ready and alive.
    for node in ["k8s-worker-1", "k8s-worker-2"] {
        let readyz = get(&cluster, node, "/readyz");
        assert_eq!(
            readyz.map(|(status, _)| status),
            Some(200),
            "readyz on {node}"
        );
        let healthz = get(&cluster, node, "/healthz");
        assert_eq!(
            healthz.map(|(status, _)| status),
            Some(200),
            "healthz on {node}"
        );
    }

    assert_eq!(
        cluster.source_ip_seen_by_destination(&pod).unwrap(),
        WORKER_2,
        "the pod leaves through the gateway"
    );

    let worker_1 = wait_for_positive(
        &cluster,
        "k8s-worker-1",
        "egress_gateway_packets_total{reason=\"redirect_to_gateway\"}",
    );
    assert_eq!(
        sample(&worker_1, "egress_gateway_policies_loaded"),
        Some(1.0),
        "{worker_1}"
    );
    assert_eq!(
        sample(&worker_1, "egress_gateway_policies_rejected"),
        Some(0.0),
        "{worker_1}"
    );
    assert!(
        sample(
            &worker_1,
            "egress_gateway_bytes_total{reason=\"redirect_to_gateway\"}"
        )
        .is_some_and(|bytes| bytes > 0.0),
        "{worker_1}"
    );
    // The pod's two CIDRs.
    assert_eq!(
        sample(
            &worker_1,
            "egress_gateway_map_entries{map=\"EGRESS_POLICIES\"}"
        ),
        Some(2.0),
        "{worker_1}"
    );
    assert!(
        sample(
            &worker_1,
            "egress_gateway_map_capacity{map=\"EGRESS_POLICIES\"}"
        )
        .is_some_and(|capacity| capacity >= 2.0),
        "{worker_1}"
    );
    assert!(
        sample(&worker_1, "egress_gateway_reconciles_total").is_some_and(|count| count >= 1.0),
        "{worker_1}"
    );
    assert!(
        sample(&worker_1, "egress_gateway_reconcile_duration_seconds_count")
            .is_some_and(|count| count >= 1.0),
        "{worker_1}"
    );

    // The gateway translated the flow and still holds its NAT entry, as the next garbage
    // collection (every few seconds) counts it, with the map's fill next to it.
    wait_for_positive(
        &cluster,
        "k8s-worker-2",
        "egress_gateway_packets_total{reason=\"snat_new_flow\"}",
    );
    let worker_2 = wait_for_positive(&cluster, "k8s-worker-2", "egress_gateway_nat_entries");
    let capacity = sample(
        &worker_2,
        "egress_gateway_map_capacity{map=\"NAT_FORWARD\"}",
    )
    .expect("NAT_FORWARD's capacity");
    let pressure = sample(
        &worker_2,
        "egress_gateway_map_pressure{map=\"NAT_FORWARD\"}",
    )
    .expect("NAT_FORWARD's pressure");
    let entries = sample(&worker_2, "egress_gateway_nat_entries").unwrap();
    assert!(
        (pressure - entries / capacity).abs() < 1e-9,
        "pressure {pressure} = {entries} / {capacity}"
    );
    assert_eq!(
        sample(
            &worker_2,
            "egress_gateway_nat_port_allocation_failures_total"
        ),
        Some(0.0),
        "{worker_2}"
    );
}

/// Nodes a big cluster has, on top of the three real ones.
const SYNTHETIC_NODES: u32 = 5_000;

/// A `kind: List` of `SYNTHETIC_NODES` Node objects, each with its InternalIP and podCIDR.
fn synthetic_nodes() -> String {
    let items: Vec<serde_json::Value> = (0..SYNTHETIC_NODES)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i + 1);
            let [_, _, high, low] = i.to_be_bytes();
            let cidr = format!("10.{}.{low}.0/24", 128 + u32::from(high));
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": format!("synthetic-{i:04}")},
                "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]},
            })
        })
        .collect();
    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// 5,000 more nodes (with as many pod CIDRs) fit every node-local map with the default
/// sizes, nothing fails to be written, and a pod created afterwards is programmed and leaves
/// with the egress IP. The node map held 4,096 and the pod CIDR map 1,024 entries, and the
/// first full map stopped the sync of the others: new pods were never wired.
#[test]
fn five_thousand_nodes_fit_and_new_pods_are_still_programmed() {
    skip_unless_root!();
    let (mut cluster, _my_app) = howto_cluster(&["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"]);

    // Written next to the folder, then moved in: the agents never read half a file.
    let staged = cluster.work_dir().join("synthetic-nodes.yaml");
    std::fs::write(&staged, synthetic_nodes()).unwrap();
    std::fs::rename(
        &staged,
        cluster.manifests_dir().join("synthetic-nodes.yaml"),
    )
    .unwrap();
    let nodes = f64::from(SYNTHETIC_NODES + 3);
    for node in ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"] {
        let metrics = wait_for_value(PROGRAMMED, || {
            let (_, body) = get(&cluster, node, "/metrics")?;
            (sample(&body, "egress_gateway_map_entries{map=\"NODES\"}") == Some(nodes))
                .then_some(body)
        })
        .unwrap_or_else(|| panic!("{node} never programmed the {SYNTHETIC_NODES} nodes"));
        assert_eq!(
            sample(&metrics, "egress_gateway_map_write_failures"),
            Some(0.0),
            "{node}"
        );
        assert!(
            sample(
                &metrics,
                "egress_gateway_map_entries{map=\"CLUSTER_CIDRS\"}"
            )
            .is_some_and(|entries| entries >= nodes),
            "{node}: {metrics}"
        );
    }

    let late = cluster
        .add_pod("k8s-worker-3", "default", "my-app-2", &[("app", "my-app")])
        .unwrap();
    cluster
        .wait_for_pod_gateway(&late, WORKER_2, PROGRAMMED)
        .unwrap();
    assert_eq!(
        cluster.source_ip_seen_by_destination(&late).unwrap(),
        WORKER_2,
        "a pod created after the nodes leaves through the gateway"
    );
}
