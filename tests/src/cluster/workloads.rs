//! What runs on the cluster as Kubernetes sees it: pods (a namespace and a veth each),
//! labels, namespaces, policies and node manifests, and commands run inside pods.

use std::{fs, net::Ipv4Addr, path::Path, process::Output};

use anyhow::{Context, Result, anyhow, bail};

use super::{Cluster, Node, Pod, delete_netns, lock};
use crate::{
    manifests::{Labels, NodeObject, PodObject, labels},
    peer,
    process::{
        Background, DEFAULT_COMMAND_TIMEOUT, ip_in, netns_command, run_with_timeout, sysctl_in,
    },
};

impl Cluster {
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

    pub(super) fn ensure_namespace(&mut self, namespace: &str) -> Result<()> {
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

    pub(super) fn write_node_manifest(&self, node: &Node) -> Result<()> {
        self.manifests.write_node(&NodeObject {
            name: &node.name,
            labels: &node.labels,
            internal_ip: node.ip,
            pod_cidr: self.publish_pod_cidrs.then_some(node.pod_cidr.as_str()),
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
}
