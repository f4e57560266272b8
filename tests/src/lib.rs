//! Test harness for the egress gateway: a small Kubernetes-like cluster in network namespaces.
//!
//! A [`Cluster`] has an underlay router, worker nodes with a plain routed CNI (pods reach the
//! outside through their node's masquerade), an external destination running `egress-peer`, and a
//! manifests folder the agents read instead of an API server (or that the test [`ApiServer`]
//! serves to agents run with `--kubernetes`). Everything lives in namespaces the
//! harness creates and is removed when the `Cluster` is dropped, also when a test panics.

#![allow(
    unused_crate_dependencies,
    reason = "clap, tokio and k8s-openapi serve the binaries and integration tests of the package"
)]

pub mod agent;
pub mod apiserver;
pub mod binaries;
pub mod capture;
pub mod cluster;
pub mod expected;
pub mod leaks;
pub mod manifests;
pub mod peer;
pub mod process;
pub mod traffic;

use std::path::PathBuf;

pub use agent::{Counter, Counters, EgressEntry, GATEWAY_EXCLUDED, GATEWAY_NOT_FOUND};
pub use apiserver::{ApiServer, WatchBreak};
pub use capture::{CapturedPacket, IpProtocol};
pub use cluster::{
    AgentSource, BPFFS_ROOT, Cluster, ClusterConfig, Node, Pod, TeardownHandle, is_root,
    metric_value, teardown_all_clusters, wait_for_value, wait_until,
};
pub use leaks::{LeakDetector, LeakReport};
pub use peer::{DESTINATION_IP, PEER_HTTP_PORT, PEER_UDP_PORT, PeerProtocol, PeerRecord, peer_url};
pub use process::{Background, Finished, Signal};
pub use traffic::{FlowKind, FlowSummary, LongFlow};

/// `<repo>/examples/<name>`: the example policies shipped with the project.
pub fn example_policy(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    path.canonicalize().unwrap_or(path)
}

/// Returns early from a test (passing it) with a message when not running as root.
#[macro_export]
macro_rules! skip_unless_root {
    () => {
        if !$crate::is_root() {
            eprintln!(
                "SKIPPED: {} needs root (network namespaces, bpffs)",
                module_path!()
            );
            return;
        }
    };
}
