//! A small Kubernetes-like cluster built from network namespaces.
//!
//! ```text
//!   pod ns (eth0 10.244.N.x/32) ── veth ── node ns "<id>-wN" (eth0 10.0.0.1N, pod CIDR 10.244.N.0/24)
//!                                               │ eth0 (veth)           │ eth1 (optional, 192.0.2.1N)
//!   underlay/router ns "<id>-ul": br0 10.0.0.1/24, br1 192.0.2.1/24, 198.51.100.1/24 ── dst ns
//!   destination ns "<id>-dst": eth0 198.51.100.10/24, runs egress-peer
//! ```
//! Routing is flat (a plain routed CNI): every node and the router know every pod CIDR, and each
//! node masquerades its pods' traffic leaving through eth0. Nothing touches the root namespace.
//!
//! [`Cluster`]'s methods are split by concern: `topology` (namespaces, links, addresses),
//! `workloads` (pods, labels, policies, commands in pods), `agents` (their lifecycle and CLI),
//! `observe` (the destination, captures, maps, waits, logs) and `teardown`.

mod agents;
mod observe;
mod teardown;
mod topology;
mod workloads;

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{
    binaries,
    manifests::{Labels, Manifests, labels},
    process::run_checked,
};

/// Where the harness mounts its own bpffs (`ip netns exec` hides the host's /sys/fs/bpf).
pub const BPFFS_ROOT: &str = "/run/egress-tests/bpffs";
/// The router's address on the node underlay; every node's default gateway.
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The router's address on the optional second node network (eth1).
pub const SECONDARY_ROUTER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Prefix of every namespace, folder and bpffs directory the harness creates.
const NAME_PREFIX: &str = "egt";

/// How to build a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Kubernetes node names, in order; node N (1-based) gets 10.0.0.(10+N) and 10.244.N.0/24.
    pub nodes: Vec<String>,
    pub agent_bin: PathBuf,
    pub peer_bin: PathBuf,
    /// Start the `egress-peer` server in the destination namespace.
    pub start_peer: bool,
    /// Ports the peer serves besides 8080 (HTTP) and 8081 (UDP), each for both HTTP and UDP
    /// echo: tests give each pod its own port so the leak detector can tell flows apart.
    pub extra_peer_ports: Vec<u16>,
    /// Extra `egress-agent run` flags for every agent (e.g. `--udp-idle-timeout 3`).
    pub agent_args: Vec<String>,
    /// Whether Node objects carry `spec.podCIDR(s)`; CNIs with their own IPAM (Calico, AWS
    /// VPC CNI) leave them empty. Pods are routed the same either way.
    pub publish_pod_cidrs: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nodes: ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"]
                .map(String::from)
                .to_vec(),
            agent_bin: binaries::locate("egress-agent"),
            peer_bin: binaries::locate("egress-peer"),
            start_peer: true,
            extra_peer_ports: Vec::new(),
            agent_args: Vec::new(),
            publish_pod_cidrs: true,
        }
    }
}

impl ClusterConfig {
    /// The default three-node cluster with an explicit peer binary
    /// (integration tests pass `env!("CARGO_BIN_EXE_egress-peer")`).
    pub fn with_peer_bin(peer_bin: impl Into<PathBuf>) -> Self {
        ClusterConfig {
            peer_bin: peer_bin.into(),
            ..ClusterConfig::default()
        }
    }
}

/// Where an agent reads the cluster state from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentSource {
    /// The cluster's manifests folder (`--manifests`).
    Manifests,
    /// A Kubernetes API server (`--kubernetes --kubeconfig FILE`), e.g. the test
    /// [`ApiServer`](crate::apiserver::ApiServer).
    Kubernetes { kubeconfig: PathBuf },
}

/// A node: a network namespace playing a Kubernetes worker.
#[derive(Debug, Clone)]
pub struct Node {
    /// Kubernetes node name, e.g. `k8s-worker-1`.
    pub name: String,
    pub netns: String,
    /// 1-based position in the cluster; picks the addresses.
    pub number: u8,
    /// `InternalIP`, on eth0.
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    pub labels: Labels,
    /// This node's agent's bpffs folder.
    pub bpffs: PathBuf,
    /// Address on eth1, once `add_secondary_interface` created it.
    pub secondary_ip: Option<Ipv4Addr>,
    /// Extra `egress-agent run` flags of this node's agent (after the cluster-wide ones).
    pub agent_args: Vec<String>,
    next_pod_host: u8,
}

/// A pod: a network namespace attached to its node, routed CNI style.
#[derive(Debug, Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// Kubernetes node name.
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub labels: Labels,
    /// The pod's veth as seen in the node namespace.
    pub host_veth: String,
}

pub struct Cluster {
    /// Unique per cluster: `egt<pid>-<counter>`; prefixes namespaces and bpffs folders.
    pub id: String,
    /// Short form of the id for interface names (15 characters at most).
    if_prefix: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    namespace_labels: BTreeMap<String, Labels>,
    manifests: Manifests,
    work_dir: PathBuf,
    underlay: String,
    destination: String,
    secondary_bridge: bool,
    next_pod: u32,
    next_capture: u32,
    agent_bin: PathBuf,
    peer_bin: PathBuf,
    extra_peer_ports: Vec<u16>,
    agent_args: Vec<String>,
    publish_pod_cidrs: bool,
    /// Nodes whose manifest `delete_node_manifest` removed.
    unregistered: std::collections::BTreeSet<String>,
    resources: Arc<Mutex<Resources>>,
}

use self::teardown::{LIVE_CLUSTERS, Resources, delete_netns};
pub use self::{
    observe::metric_value,
    teardown::{TeardownHandle, remove_stale_clusters, teardown_all_clusters},
};

fn lock(resources: &Mutex<Resources>) -> MutexGuard<'_, Resources> {
    resources
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// True when running as root; the cluster needs it.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Cluster {
    /// The default three-node cluster (`k8s-worker-1..3`), destination and peer.
    pub fn start() -> Result<Cluster> {
        Cluster::new(ClusterConfig::default())
    }

    pub fn new(config: ClusterConfig) -> Result<Cluster> {
        if !is_root() {
            bail!("the test cluster needs root (network namespaces, bpffs)");
        }
        if config.nodes.is_empty() || config.nodes.len() > 200 {
            bail!("a cluster needs 1..=200 nodes");
        }
        // Fail before building anything when a program the cluster starts was not built.
        if config.start_peer {
            binaries::ensure_built("egress-peer", &config.peer_bin)?;
        }
        remove_stale_clusters();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{NAME_PREFIX}{pid}-{counter}");
        let if_prefix = format!("e{}{}", base36(pid), base36(counter));

        let work_dir = std::env::temp_dir().join(format!("egress-tests-{id}"));
        let _ = fs::remove_dir_all(&work_dir);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
        let manifests = Manifests::create(&work_dir)?;

        let resources = Arc::new(Mutex::new(Resources {
            agents: BTreeMap::new(),
            agent_sources: BTreeMap::new(),
            agent_state: BTreeMap::new(),
            peer: None,
            capture: None,
            namespaces: Vec::new(),
            work_dir: work_dir.clone(),
            agent_bin: config.agent_bin.clone(),
            torn_down: false,
        }));
        if let Ok(mut live) = LIVE_CLUSTERS.lock() {
            live.retain(|weak| weak.strong_count() > 0);
            live.push(Arc::downgrade(&resources));
        }

        let nodes = config
            .nodes
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let number = (index + 1) as u8;
                Node {
                    name: name.clone(),
                    netns: format!("{id}-w{number}"),
                    number,
                    ip: Ipv4Addr::new(10, 0, 0, 10 + number),
                    pod_cidr: format!("10.244.{number}.0/24"),
                    labels: labels(&[
                        ("beta.kubernetes.io/arch", "amd64"),
                        ("beta.kubernetes.io/os", "linux"),
                        ("kubernetes.io/arch", "amd64"),
                        ("kubernetes.io/hostname", name),
                        ("kubernetes.io/os", "linux"),
                    ]),
                    bpffs: Path::new(BPFFS_ROOT).join(format!("{id}-{name}")),
                    secondary_ip: None,
                    agent_args: Vec::new(),
                    next_pod_host: 10,
                }
            })
            .collect();

        // From here on, an error drops `cluster`, which tears down whatever was built.
        let mut cluster = Cluster {
            underlay: format!("{id}-ul"),
            destination: format!("{id}-dst"),
            id,
            if_prefix,
            nodes,
            pods: Vec::new(),
            namespace_labels: BTreeMap::new(),
            manifests,
            work_dir,
            secondary_bridge: false,
            next_pod: 0,
            next_capture: 0,
            agent_bin: config.agent_bin,
            peer_bin: config.peer_bin,
            extra_peer_ports: config.extra_peer_ports,
            agent_args: config.agent_args,
            publish_pod_cidrs: config.publish_pod_cidrs,
            unregistered: std::collections::BTreeSet::default(),
            resources,
        };
        cluster.build_underlay()?;
        for index in 0..cluster.nodes.len() {
            cluster.build_node(index)?;
        }
        cluster.build_pod_routes()?;
        cluster.build_destination()?;
        for node in &cluster.nodes {
            cluster.write_node_manifest(node)?;
        }
        cluster.ensure_namespace("default")?;
        if config.start_peer {
            cluster.start_peer()?;
        }
        Ok(cluster)
    }

    pub fn teardown_handle(&self) -> TeardownHandle {
        TeardownHandle(self.resources.clone())
    }

    /// Folder with logs, captures and the manifests (0700, removed at teardown).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The `egress-peer` binary, to run its clients in pods.
    pub fn peer_bin(&self) -> &Path {
        &self.peer_bin
    }

    pub fn manifests_dir(&self) -> &Path {
        self.manifests.dir()
    }

    pub fn underlay_netns(&self) -> &str {
        &self.underlay
    }

    pub fn destination_netns(&self) -> &str {
        &self.destination
    }

    /// Finds a node by Kubernetes name (`k8s-worker-1`) or short name (`worker-1`).
    pub fn node(&self, name: &str) -> Result<&Node> {
        let index = self.node_index(name)?;
        Ok(&self.nodes[index])
    }

    fn node_index(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|node| node.name == name || node.name == format!("k8s-{name}"))
            .ok_or_else(|| anyhow!("no node named {name}"))
    }

    /// The node whose eth0 or eth1 has `ip`.
    pub fn node_by_ip(&self, ip: Ipv4Addr) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|node| node.ip == ip || node.secondary_ip == Some(ip))
    }
}

/// Mounts the harness's bpffs once (kept mounted; every agent gets a folder below it).
pub fn ensure_bpffs_mounted() -> Result<()> {
    static MOUNT_LOCK: Mutex<()> = Mutex::new(());
    let _guard = MOUNT_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mounts = fs::read_to_string("/proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS_ROOT) && fields.get(2) == Some(&"bpf")
    });
    if !mounted {
        fs::create_dir_all(BPFFS_ROOT)?;
        let mut command = Command::new("mount");
        command.args(["-t", "bpf", "bpf", BPFFS_ROOT]);
        run_checked(command).context("mounting the test bpffs")?;
    }
    Ok(())
}

/// Polls `condition` every 100 ms until it holds or `timeout` passes; true if it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    wait_for_value(timeout, || condition().then_some(())).is_some()
}

/// Polls `probe` every 100 ms until it returns a value or `timeout` passes.
pub fn wait_for_value<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn base36(mut value: u32) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(value % 36) as usize]);
        value /= 36;
        if value == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_prefix_leaves_room_for_suffixes() {
        // Largest pid Linux allows (2^22) and a two-digit counter: "e" + 5 + 2 characters.
        let prefix = format!("e{}{}", base36(4_194_304), base36(1295));
        assert!(prefix.len() + "p999".len() <= 15, "{prefix}");
        assert_eq!(base36(0), "0");
        assert_eq!(base36(36), "10");
    }
}
