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

use std::{
    collections::BTreeMap,
    fs::{self, OpenOptions},
    net::Ipv4Addr,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{
    agent::{Counters, EgressEntry},
    binaries,
    capture::{Capture, CapturedPacket},
    manifests::{Labels, Manifests, NodeObject, PodObject, labels},
    peer::{self, PeerRecord},
    process::{
        Background, DEFAULT_COMMAND_TIMEOUT, Signal, ip, ip_in, netns_command, run_checked,
        run_with_timeout, stop_child, sysctl_in,
    },
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

/// What teardown must undo; shared with `TeardownHandle` so a signal handler can clean up.
struct Resources {
    agents: BTreeMap<String, Child>,
    /// The source each node's agent was last started with, for restarts.
    agent_sources: BTreeMap<String, AgentSource>,
    /// Nodes whose agent ever ran: (netns, bpffs folder) to run `cleanup` against.
    agent_state: BTreeMap<String, (String, PathBuf)>,
    peer: Option<Background>,
    capture: Option<Capture>,
    /// In creation order; deleted in reverse.
    namespaces: Vec<String>,
    work_dir: PathBuf,
    agent_bin: PathBuf,
    torn_down: bool,
}

/// Tears a cluster down from elsewhere (e.g. a Ctrl-C handler); idempotent.
#[derive(Clone)]
pub struct TeardownHandle(Arc<Mutex<Resources>>);

impl TeardownHandle {
    pub fn teardown(&self) {
        lock(&self.0).teardown();
    }
}

/// Every live cluster of this process, for `teardown_all_clusters`.
static LIVE_CLUSTERS: Mutex<Vec<Weak<Mutex<Resources>>>> = Mutex::new(Vec::new());

/// Tears down every cluster of this process (for signal handlers).
pub fn teardown_all_clusters() {
    let live: Vec<_> = LIVE_CLUSTERS
        .lock()
        .map(|list| list.clone())
        .unwrap_or_default();
    for resources in live.iter().filter_map(Weak::upgrade) {
        TeardownHandle(resources).teardown();
    }
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
    /// Nodes whose manifest `delete_node_manifest` removed.
    unregistered: std::collections::BTreeSet<String>,
    resources: Arc<Mutex<Resources>>,
}

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

    fn create_netns(&self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        lock(&self.resources).namespaces.push(name.to_string());
        ip_in(name, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build_underlay(&mut self) -> Result<()> {
        let ul = self.underlay.clone();
        self.create_netns(&ul)?;
        sysctl_in(
            &ul,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        ip_in(&ul, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(
            &ul,
            &["addr", "add", &format!("{ROUTER_IP}/24"), "dev", "br0"],
        )?;
        ip_in(&ul, &["link", "set", "br0", "up"])?;
        Ok(())
    }

    fn build_node(&mut self, index: usize) -> Result<()> {
        let node = self.nodes[index].clone();
        let ns = &node.netns;
        self.create_netns(ns)?;
        // rp_filter off: the egress datapath legitimately sees asymmetric paths.
        sysctl_in(
            ns,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        let router_port = format!("{}n{}", self.if_prefix, node.number);
        ip_in(
            ns,
            &[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                &router_port,
                "netns",
                &self.underlay,
            ],
        )?;
        ip_in(
            ns,
            &["addr", "add", &format!("{}/24", node.ip), "dev", "eth0"],
        )?;
        ip_in(ns, &["link", "set", "eth0", "up"])?;
        ip_in(
            &self.underlay,
            &["link", "set", &router_port, "master", "br0", "up"],
        )?;
        ip_in(
            ns,
            &["route", "add", "default", "via", &ROUTER_IP.to_string()],
        )?;
        // What a plain CNI does: pods leaving the pod network are masqueraded to the node IP.
        let ruleset = "table ip cni-nat {\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 oifname \"eth0\" masquerade\n\
             \t}\n\
             }\n";
        let ruleset_path = self.work_dir.join(format!("nft-{}.conf", node.name));
        fs::write(&ruleset_path, ruleset)?;
        run_checked(netns_command(
            ns,
            &["nft", "-f", &ruleset_path.to_string_lossy()],
        ))?;
        Ok(())
    }

    /// Flat routed pod network: each node and the router route every other pod CIDR to its node.
    fn build_pod_routes(&self) -> Result<()> {
        for target in &self.nodes {
            let via = target.ip.to_string();
            ip_in(
                &self.underlay,
                &["route", "add", &target.pod_cidr, "via", &via],
            )?;
            for node in self.nodes.iter().filter(|node| node.name != target.name) {
                ip_in(
                    &node.netns,
                    &["route", "add", &target.pod_cidr, "via", &via],
                )?;
            }
        }
        Ok(())
    }

    fn build_destination(&self) -> Result<()> {
        let dst = &self.destination;
        self.create_netns(dst)?;
        let router_port = format!("{}dst", self.if_prefix);
        ip_in(
            &self.underlay,
            &[
                "link",
                "add",
                &router_port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                dst,
            ],
        )?;
        ip_in(
            &self.underlay,
            &["addr", "add", "198.51.100.1/24", "dev", &router_port],
        )?;
        ip_in(&self.underlay, &["link", "set", &router_port, "up"])?;
        ip_in(
            dst,
            &[
                "addr",
                "add",
                &format!("{}/24", peer::DESTINATION_IP),
                "dev",
                "eth0",
            ],
        )?;
        ip_in(dst, &["link", "set", "eth0", "up"])?;
        ip_in(dst, &["route", "add", "default", "via", "198.51.100.1"])?;
        Ok(())
    }

    /// Gives a node eth1 on the second network 192.0.2.0/24 (address 192.0.2.1N, N the node's
    /// number; the router is 192.0.2.1), via the router.
    pub fn add_secondary_interface(&mut self, node: &str) -> Result<Ipv4Addr> {
        let index = self.node_index(node)?;
        if let Some(existing) = self.nodes[index].secondary_ip {
            return Ok(existing);
        }
        let address = Ipv4Addr::new(192, 0, 2, 10 + self.nodes[index].number);
        self.add_secondary_link(&self.nodes[index].name.clone(), "eth1")?;
        let node = &self.nodes[index];
        ip_in(
            &node.netns,
            &["addr", "add", &format!("{address}/24"), "dev", "eth1"],
        )?;
        // Source routing, as operators set up for a second NIC: traffic from eth1's subnet
        // (including egress IPs added there) leaves through eth1's own router.
        ip_in(
            &node.netns,
            &["rule", "add", "from", "192.0.2.0/24", "table", "100"],
        )?;
        self.nodes[index].secondary_ip = Some(address);
        Ok(address)
    }

    /// Adds another interface (`eth1`, `eth2`, ...) on the second network 192.0.2.0/24, without
    /// an address, with a route through the router in table 100 (used for sources of that
    /// network). Addresses are added with `add_address` or moved with `move_address`.
    pub fn add_secondary_link(&mut self, node: &str, interface: &str) -> Result<()> {
        let index = self.node_index(node)?;
        if !self.secondary_bridge {
            ip_in(&self.underlay, &["link", "add", "br1", "type", "bridge"])?;
            ip_in(
                &self.underlay,
                &[
                    "addr",
                    "add",
                    &format!("{SECONDARY_ROUTER_IP}/24"),
                    "dev",
                    "br1",
                ],
            )?;
            ip_in(&self.underlay, &["link", "set", "br1", "up"])?;
            self.secondary_bridge = true;
        }
        let node = &self.nodes[index];
        let suffix = interface.trim_start_matches("eth");
        let router_port = format!("{}s{}{suffix}", self.if_prefix, node.number);
        ip_in(
            &node.netns,
            &[
                "link",
                "add",
                interface,
                "type",
                "veth",
                "peer",
                "name",
                &router_port,
                "netns",
                &self.underlay,
            ],
        )?;
        // Several interfaces on one network: each answers ARP only for its own addresses
        // (as multi-homed hosts are configured), or the router may send an egress IP's
        // traffic to an interface that no longer holds it.
        sysctl_in(
            &node.netns,
            &[&format!("net.ipv4.conf.{interface}.arp_ignore=1")],
        )?;
        ip_in(&node.netns, &["link", "set", interface, "up"])?;
        ip_in(
            &self.underlay,
            &["link", "set", &router_port, "master", "br1", "up"],
        )?;
        Self::add_secondary_route(&node.netns, interface)?;
        Ok(())
    }

    /// `default via 192.0.2.1 dev <interface> table 100` (what a network manager restores
    /// when the link comes back up); eth1's has the lowest metric, so it is preferred unless
    /// a lookup asks for another interface.
    fn add_secondary_route(netns: &str, interface: &str) -> Result<()> {
        let metric = format!(
            "{}",
            100 + interface
                .trim_start_matches("eth")
                .parse::<u32>()
                .unwrap_or(50)
        );
        ip_in(
            netns,
            &[
                "route",
                "replace",
                "default",
                "via",
                &SECONDARY_ROUTER_IP.to_string(),
                "dev",
                interface,
                "table",
                "100",
                "metric",
                &metric,
                "onlink",
            ],
        )?;
        Ok(())
    }

    /// `ip link set <interface> up|down` on a node. Bringing a second-network interface back
    /// up restores its table-100 route, which the kernel removed when it went down.
    pub fn set_link(&self, node: &str, interface: &str, up: bool) -> Result<()> {
        let node = self.node(node)?;
        let state = if up { "up" } else { "down" };
        ip_in(&node.netns, &["link", "set", interface, state])?;
        if up && interface != "eth0" && self.secondary_bridge {
            Self::add_secondary_route(&node.netns, interface)?;
        }
        Ok(())
    }

    /// Moves an address from one interface of a node to another and makes the router forget
    /// where it was (what the gratuitous ARP of a real move does).
    pub fn move_address(&self, node: &str, cidr: &str, from: &str, to: &str) -> Result<()> {
        self.remove_address(node, from, cidr)?;
        self.add_address(node, to, cidr)?;
        let address = cidr.split('/').next().unwrap_or(cidr);
        let _ = ip_in(&self.underlay, &["neigh", "flush", "to", address]);
        Ok(())
    }

    /// Adds an address (`192.0.2.200/24`) to an interface of a node, e.g. for a policy's egressIP.
    pub fn add_address(&self, node: &str, interface: &str, cidr: &str) -> Result<()> {
        let node = self.node(node)?;
        ip_in(&node.netns, &["addr", "add", cidr, "dev", interface])?;
        Ok(())
    }

    pub fn remove_address(&self, node: &str, interface: &str, cidr: &str) -> Result<()> {
        let node = self.node(node)?;
        ip_in(&node.netns, &["addr", "del", cidr, "dev", interface])?;
        Ok(())
    }

    // ----- pods -----

    /// Creates a running pod on `node` and publishes its manifest.
    pub fn add_pod(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
        pod_labels: &[(&str, &str)],
    ) -> Result<Pod> {
        self.add_pod_with_ip(node, namespace, name, pod_labels, None)
    }

    /// `add_pod` with a chosen address from the node's pod CIDR (e.g. the address of a deleted
    /// pod, as the IPAM hands out again); `None` picks the next free one.
    pub fn add_pod_with_ip(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
        pod_labels: &[(&str, &str)],
        ip: Option<Ipv4Addr>,
    ) -> Result<Pod> {
        let index = self.node_index(node)?;
        if self
            .pods
            .iter()
            .any(|pod| pod.namespace == namespace && pod.name == name)
        {
            bail!("pod {namespace}/{name} already exists");
        }
        let number = self.nodes[index].number;
        let host = if let Some(ip) = ip {
            let [a, b, c, host] = ip.octets();
            if [a, b, c] != [10, 244, number] || host == 0 || host == 255 {
                bail!("{ip} is not in the pod CIDR of {node}");
            }
            if self.pods.iter().any(|pod| pod.ip == ip) {
                bail!("{ip} is in use by another pod");
            }
            host
        } else {
            let node = &mut self.nodes[index];
            let host = node.next_pod_host;
            if host == 255 {
                bail!("node {} has no pod addresses left", node.name);
            }
            node.next_pod_host += 1;
            host
        };
        let node = self.nodes[index].clone();
        let pod_number = self.next_pod;
        self.next_pod += 1;
        let pod = Pod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            node: node.name.clone(),
            netns: format!("{}-p{pod_number}", self.id),
            ip: Ipv4Addr::new(10, 244, node.number, host),
            labels: labels(pod_labels),
            host_veth: format!("{}p{pod_number}", self.if_prefix),
        };

        self.create_netns(&pod.netns)?;
        let veth = &pod.host_veth;
        ip_in(
            &node.netns,
            &[
                "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.netns,
            ],
        )?;
        // The node answers ARP for the pod's fake gateway 169.254.1.1 (as Calico does).
        sysctl_in(
            &node.netns,
            &[
                &format!("net.ipv4.conf.{veth}.proxy_arp=1"),
                &format!("net.ipv4.neigh.{veth}.proxy_delay=0"),
            ],
        )?;
        ip_in(&node.netns, &["link", "set", veth, "up"])?;
        ip_in(
            &node.netns,
            &["route", "add", &format!("{}/32", pod.ip), "dev", veth],
        )?;
        ip_in(
            &pod.netns,
            &["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"],
        )?;
        ip_in(&pod.netns, &["link", "set", "eth0", "up"])?;
        ip_in(
            &pod.netns,
            &[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        )?;
        ip_in(
            &pod.netns,
            &[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ],
        )?;

        self.ensure_namespace(namespace)?;
        self.manifests.write_pod(&PodObject {
            namespace,
            name,
            labels: &pod.labels,
            node_name: &node.name,
            host_ip: node.ip,
            pod_ip: pod.ip,
        })?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Deletes a pod: its manifest first (so agents forget it), then its namespace.
    pub fn delete_pod(&mut self, pod: &Pod) -> Result<()> {
        self.manifests.delete_pod(&pod.namespace, &pod.name)?;
        self.pods.retain(|existing| existing.netns != pod.netns);
        // The veth first: deleting it is synchronous (its /32 route goes with it), while a
        // deleted namespace releases its interfaces later, so a new pod reusing the IP could
        // find the old route still there.
        let node_netns = self.node(&pod.node)?.netns.clone();
        if let Err(error) = ip_in(&node_netns, &["link", "del", &pod.host_veth]) {
            eprintln!("deleting {} of pod {}: {error:#}", pod.host_veth, pod.name);
        }
        delete_netns(&pod.netns);
        lock(&self.resources)
            .namespaces
            .retain(|name| name != &pod.netns);
        Ok(())
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|pod| pod.namespace == namespace && pod.name == name)
            .ok_or_else(|| anyhow!("no pod {namespace}/{name}"))
    }

    // ----- Kubernetes objects -----

    fn ensure_namespace(&mut self, namespace: &str) -> Result<()> {
        if !self.namespace_labels.contains_key(namespace) {
            self.namespace_labels
                .insert(namespace.to_string(), Labels::new());
            self.manifests.write_namespace(namespace, &Labels::new())?;
        }
        Ok(())
    }

    /// `kubectl label namespace <namespace> key=value --overwrite`.
    pub fn label_namespace(&mut self, namespace: &str, key: &str, value: &str) -> Result<()> {
        self.ensure_namespace(namespace)?;
        let namespace_labels = self
            .namespace_labels
            .get_mut(namespace)
            .expect("just ensured");
        namespace_labels.insert(key.to_string(), value.to_string());
        let namespace_labels = namespace_labels.clone();
        self.manifests.write_namespace(namespace, &namespace_labels)
    }

    /// `kubectl label nodes <node> key=value --overwrite`.
    pub fn label_node(&mut self, node: &str, key: &str, value: &str) -> Result<()> {
        let index = self.node_index(node)?;
        self.nodes[index]
            .labels
            .insert(key.to_string(), value.to_string());
        if self.unregistered.contains(&self.nodes[index].name) {
            return Ok(());
        }
        self.write_node_manifest(&self.nodes[index])
    }

    /// `kubectl label nodes <node> key-`.
    pub fn unlabel_node(&mut self, node: &str, key: &str) -> Result<()> {
        let index = self.node_index(node)?;
        self.nodes[index].labels.remove(key);
        if self.unregistered.contains(&self.nodes[index].name) {
            return Ok(());
        }
        self.write_node_manifest(&self.nodes[index])
    }

    fn write_node_manifest(&self, node: &Node) -> Result<()> {
        self.manifests.write_node(&NodeObject {
            name: &node.name,
            labels: &node.labels,
            internal_ip: node.ip,
            pod_cidr: &node.pod_cidr,
        })
    }

    /// `kubectl apply -f` of a policy given as YAML text; `name` identifies it for `delete_policy`.
    pub fn apply_policy(&self, name: &str, yaml: &str) -> Result<()> {
        self.manifests.write_policy(name, yaml)
    }

    /// `kubectl apply -f <file>`; returns the name to pass to `delete_policy` (the file stem).
    pub fn apply_policy_file(&self, path: impl AsRef<Path>) -> Result<String> {
        let path = path.as_ref();
        let yaml =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .ok_or_else(|| anyhow!("bad policy file name {}", path.display()))?
            .to_string();
        self.apply_policy(&name, &yaml)?;
        Ok(name)
    }

    pub fn delete_policy(&self, name: &str) -> Result<()> {
        self.manifests.delete_policy(name)
    }

    /// `kubectl delete node <node>`: the node leaves the inventory (its namespace and agent
    /// keep running, as a node that lost its registration would).
    pub fn delete_node_manifest(&mut self, node: &str) -> Result<()> {
        let name = self.node(node)?.name.clone();
        self.manifests.delete_node(&name)?;
        self.unregistered.insert(name);
        Ok(())
    }

    /// Publishes the node's manifest again after `delete_node_manifest`.
    pub fn restore_node_manifest(&mut self, node: &str) -> Result<()> {
        let name = self.node(node)?.name.clone();
        self.unregistered.remove(&name);
        self.write_node_manifest(self.node(node)?)
    }

    /// False while the node's manifest is deleted.
    pub fn node_registered(&self, node: &str) -> bool {
        self.node(node)
            .is_ok_and(|node| !self.unregistered.contains(&node.name))
    }

    // ----- running things -----

    /// Runs a command inside any namespace of this cluster (not checked; see `Output::status`).
    pub fn exec<S: AsRef<std::ffi::OsStr>>(&self, netns: &str, args: &[S]) -> Result<Output> {
        run_with_timeout(netns_command(netns, args), DEFAULT_COMMAND_TIMEOUT)
    }

    pub fn exec_in_pod<S: AsRef<std::ffi::OsStr>>(&self, pod: &Pod, args: &[S]) -> Result<Output> {
        self.exec(&pod.netns, args)
    }

    /// Starts a command in a pod in the background; `name` names its output files.
    pub fn spawn_in_pod<S: AsRef<std::ffi::OsStr>>(
        &self,
        pod: &Pod,
        name: &str,
        args: &[S],
    ) -> Result<Background> {
        Background::spawn(netns_command(&pod.netns, args), &self.work_dir.join(name))
    }

    /// `kubectl exec <pod> -- curl -s --max-time 3 <url>`: the body, or an error if curl failed.
    pub fn curl_from_pod(&self, pod: &Pod, url: &str) -> Result<String> {
        let output = self.exec_in_pod(pod, &["curl", "-s", "--max-time", "3", url])?;
        if !output.status.success() {
            bail!(
                "curl {url} from pod {} failed ({})",
                pod.name,
                output.status
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// The source IP the destination saw for one HTTP request from `pod`.
    pub fn source_ip_seen_by_destination(&self, pod: &Pod) -> Result<Ipv4Addr> {
        let body = self.curl_from_pod(pod, &peer::peer_url("/"))?;
        body.parse()
            .with_context(|| format!("destination answered {body:?}, not an IP"))
    }

    /// Runs the `egress-peer` client inside a pod, e.g. `["udp", "198.51.100.10:8081", "--count", "3"]`.
    pub fn peer_client(&self, pod: &Pod, args: &[&str]) -> Result<Output> {
        let mut full = vec![self.peer_bin.to_string_lossy().into_owned()];
        full.extend(args.iter().map(std::string::ToString::to_string));
        self.exec_in_pod(pod, &full)
    }

    // ----- destination -----

    fn peer_log_path(&self) -> PathBuf {
        self.work_dir.join("peer.log")
    }

    fn start_peer(&self) -> Result<()> {
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

    // ----- agents -----

    fn agent_log_path(&self, node: &Node) -> PathBuf {
        self.work_dir.join(format!("agent-{}.log", node.name))
    }

    /// Starts the egress agent inside a node's namespace, reading the manifests folder.
    pub fn start_agent(&self, node: &str) -> Result<()> {
        self.start_agent_with_args(node, &[])
    }

    /// Starts the agent with extra `run` arguments (e.g. `--nat-port-range 1024-1123`).
    pub fn start_agent_with_args(&self, node: &str, extra: &[&str]) -> Result<()> {
        self.spawn_agent(node, &AgentSource::Manifests, extra)
    }

    /// Starts the egress agent inside a node's namespace, reading `source`.
    pub fn start_agent_with(&self, node: &str, source: &AgentSource) -> Result<()> {
        self.spawn_agent(node, source, &[])
    }

    fn spawn_agent(&self, node: &str, source: &AgentSource, extra: &[&str]) -> Result<()> {
        let node = self.node(node)?;
        if !self.agent_bin.is_file() {
            bail!(
                "agent binary {} not found: run `cargo build -p egress-agent` or set EGRESS_AGENT_BIN",
                self.agent_bin.display()
            );
        }
        ensure_bpffs_mounted()?;
        fs::create_dir_all(&node.bpffs)
            .with_context(|| format!("creating {}", node.bpffs.display()))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log_path(node))?;
        let mut command = netns_command(&node.netns, &[self.agent_bin.as_os_str()]);
        command
            .arg("run")
            .arg("--node-name")
            .arg(&node.name)
            .args(match source {
                AgentSource::Manifests => {
                    vec![
                        "--manifests".into(),
                        self.manifests.dir().as_os_str().to_owned(),
                    ]
                }
                AgentSource::Kubernetes { kubeconfig } => vec![
                    "--kubernetes".into(),
                    "--kubeconfig".into(),
                    kubeconfig.as_os_str().to_owned(),
                ],
            })
            .arg("--bpffs")
            .arg(&node.bpffs)
            .args(&self.agent_args)
            .args(&node.agent_args)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        // The log goes to a file: no colour codes.
        command.env("NO_COLOR", "1");
        let mut resources = lock(&self.resources);
        if resources.agents.contains_key(&node.name) {
            bail!("an agent is already running on {}", node.name);
        }
        let child = command.spawn().context("spawning the agent")?;
        resources.agents.insert(node.name.clone(), child);
        resources
            .agent_sources
            .insert(node.name.clone(), source.clone());
        resources
            .agent_state
            .insert(node.name.clone(), (node.netns.clone(), node.bpffs.clone()));
        Ok(())
    }

    /// Sets extra `egress-agent run` flags of a node's agent, used from its next start on.
    pub fn set_agent_args(&mut self, node: &str, args: &[&str]) -> Result<()> {
        let index = self.node_index(node)?;
        self.nodes[index].agent_args = args.iter().map(std::string::ToString::to_string).collect();
        Ok(())
    }

    /// Runs `egress-agent run` on a node in the foreground with a given manifests folder and
    /// a scratch bpffs folder, for start-up failures: returns how it exited (killed after
    /// `timeout` if it did not).
    pub fn run_agent_once(
        &self,
        node: &str,
        manifests: &Path,
        timeout: Duration,
    ) -> Result<Output> {
        let node = self.node(node)?;
        ensure_bpffs_mounted()?;
        let bpffs = Path::new(BPFFS_ROOT).join(format!("{}-{}-once", self.id, node.name));
        lock(&self.resources).agent_state.insert(
            format!("{}-once", node.name),
            (node.netns.clone(), bpffs.clone()),
        );
        let mut command = netns_command(&node.netns, &[self.agent_bin.as_os_str()]);
        command
            .arg("run")
            .arg("--node-name")
            .arg(&node.name)
            .arg("--manifests")
            .arg(manifests)
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--tunnel-device")
            .arg("egwonce")
            .arg("--metrics-address")
            .arg("127.0.0.1:0")
            .env("NO_COLOR", "1");
        run_with_timeout(command, timeout)
    }

    /// The pid of a node's running agent (`ip netns exec` execs it, so it is the child's).
    pub fn agent_pid(&self, node: &str) -> Result<u32> {
        let node = self.node(node)?;
        let mut resources = lock(&self.resources);
        match resources.agents.get_mut(&node.name) {
            Some(child) => match child.try_wait() {
                Ok(None) => Ok(child.id()),
                _ => bail!("the agent on {} has exited", node.name),
            },
            None => bail!("no agent running on {}", node.name),
        }
    }

    /// Lines of the node's agent log (across restarts) that contain every one of `needles`.
    pub fn agent_log_lines(&self, node: &str, needles: &[&str]) -> Vec<String> {
        self.agent_log(node)
            .lines()
            .filter(|line| needles.iter().all(|needle| line.contains(needle)))
            .map(str::to_string)
            .collect()
    }

    pub fn start_all_agents(&self) -> Result<()> {
        for node in &self.nodes {
            self.start_agent(&node.name)?;
        }
        Ok(())
    }

    /// Sends `signal` to a node's agent and waits (up to 10 s, then SIGKILL) for it to exit.
    pub fn kill_agent(&self, node: &str, signal: Signal) -> Result<()> {
        let node = self.node(node)?;
        let mut child = lock(&self.resources)
            .agents
            .remove(&node.name)
            .ok_or_else(|| anyhow!("no agent running on {}", node.name))?;
        stop_child(&mut child, signal, Duration::from_secs(10));
        Ok(())
    }

    /// Stops the agent gracefully (SIGTERM) if running, then starts it again with the same
    /// source.
    pub fn restart_agent(&self, node: &str) -> Result<()> {
        if self.agent_running(node)? {
            self.kill_agent(node, Signal::Term)?;
        }
        let name = &self.node(node)?.name;
        let source = lock(&self.resources)
            .agent_sources
            .get(name)
            .cloned()
            .unwrap_or(AgentSource::Manifests);
        self.start_agent_with(node, &source)
    }

    /// True if the node's agent was started and has not exited.
    pub fn agent_running(&self, node: &str) -> Result<bool> {
        let node = self.node(node)?;
        let mut resources = lock(&self.resources);
        Ok(match resources.agents.get_mut(&node.name) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        })
    }

    /// Everything the node's agent logged (across restarts).
    pub fn agent_log(&self, node: &str) -> String {
        match self.node(node) {
            Ok(node) => fs::read_to_string(self.agent_log_path(node)).unwrap_or_default(),
            Err(error) => error.to_string(),
        }
    }

    /// Runs `egress-agent <args> --bpffs <node's folder>` in the node's namespace; fails unless it succeeds.
    pub fn agent_cli(&self, node: &str, args: &[&str]) -> Result<String> {
        let node = self.node(node)?;
        let mut command = netns_command(&node.netns, &[self.agent_bin.as_os_str()]);
        command.args(args).arg("--bpffs").arg(&node.bpffs);
        let output = run_checked(command)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `egress-agent bpf egress list -o json` on a node.
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

    fn agent_log_tail(&self, node: &str) -> String {
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

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            self.dump_logs();
        }
        lock(&self.resources).teardown();
    }
}

impl Resources {
    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        // Processes first: a namespace is only freed once nothing runs in it.
        for child in self.agents.values_mut() {
            crate::process::signal_child(child, Signal::Term);
        }
        for child in self.agents.values_mut() {
            stop_child(child, Signal::Term, Duration::from_secs(5));
        }
        self.agents.clear();
        self.capture = None;
        self.peer = None;
        // Then whatever the agents left pinned or attached.
        if self.agent_bin.is_file() {
            for (netns, bpffs) in self.agent_state.values() {
                let mut command = netns_command(netns, &[self.agent_bin.as_os_str()]);
                command.arg("cleanup").arg("--bpffs").arg(bpffs);
                match run_with_timeout(command, Duration::from_secs(20)) {
                    Ok(output) if !output.status.success() => {
                        eprintln!(
                            "agent cleanup in {netns} failed: {}",
                            String::from_utf8_lossy(&output.stderr)
                        );
                    }
                    Err(error) => eprintln!("agent cleanup in {netns} failed: {error:#}"),
                    Ok(_) => {}
                }
            }
        }
        for namespace in self.namespaces.iter().rev() {
            delete_netns(namespace);
        }
        self.namespaces.clear();
        for (_, bpffs) in self.agent_state.values() {
            let _ = fs::remove_dir_all(bpffs);
        }
        if std::env::var_os("EGRESS_TESTS_KEEP_WORKDIR").is_none() {
            let _ = fs::remove_dir_all(&self.work_dir);
        }
    }
}

/// Kills whatever still runs in a namespace of ours, then deletes it.
fn delete_netns(name: &str) {
    if let Ok(output) = run_with_timeout(
        {
            let mut command = Command::new("ip");
            command.args(["netns", "pids", name]);
            command
        },
        Duration::from_secs(10),
    ) {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<libc::pid_t>() {
                // SAFETY: plain kill(2) of a process inside a namespace this harness created.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    if let Err(error) = ip(&["netns", "del", name]) {
        eprintln!("deleting netns {name}: {error:#}");
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

/// Removes namespaces, bpffs folders and work dirs left by harness processes that died without
/// tearing down (e.g. `SIGKILLed`). Only names `egt<pid>-...` whose pid no longer exists.
pub fn remove_stale_clusters() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dead_owner = |name: &str| -> bool {
            let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
                return false;
            };
            let Some((pid, _)) = rest.split_once('-') else {
                return false;
            };
            pid.parse::<u32>()
                .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        };
        if let Ok(entries) = fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if dead_owner(&name) {
                    delete_netns(&name);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(BPFFS_ROOT) {
            for entry in entries.flatten() {
                if dead_owner(&entry.file_name().to_string_lossy()) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.strip_prefix("egress-tests-").is_some_and(dead_owner) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
    });
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
