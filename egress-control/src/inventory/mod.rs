//! The cluster state one agent sees: nodes, namespaces, pods and egress policies.
//!
//! Built from k8s-openapi types so the manifests source and a watch (reflector) source share
//! it; `upsert_*` / `remove_*` apply watch events.

pub mod policy;
pub mod selector;

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1 as k8s;

pub use self::{
    policy::{EgressSource, Policy, PolicySelector},
    selector::Selector,
};

/// Pseudo-label Cilium gives every pod: its namespace.
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Pseudo-label Cilium gives every pod: its service account.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// Cilium's pseudo-labels of a pod's namespace labels: this prefix, then the label's key.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Pseudo-label Cilium gives every pod: its cluster's name (Cluster Mesh).
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";
/// The cluster name Cilium uses unless configured (`cluster-name`).
pub const DEFAULT_CLUSTER_NAME: &str = "default";
/// What Cilium's pseudo-labels start with; they are not among a pod's own labels.
const CILIUM_PSEUDO_LABEL_PREFIX: &str = "io.cilium.k8s.";
/// Label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Node label that drains a gateway (value `"true"`) without cordoning the node: it takes
/// no new flows, its established ones stay until they end or it really fails.
pub const DRAINING_LABEL: &str = "egress-gateway.io/draining";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// First IPv4 `InternalIP` of `status.addresses`: the tunnel underlay address.
    pub internal_ip: Option<Ipv4Addr>,
    /// IPv4 `spec.podCIDRs` (or `spec.podCIDR`): in-cluster destinations, never steered.
    pub pod_cidrs: Vec<Ipv4Net>,
    /// `spec.unschedulable` (`kubectl cordon`, `kubectl drain`): see [`Node::is_draining`].
    pub unschedulable: bool,
}

impl Node {
    /// A draining gateway takes no new flows; its established flows stay on it. Cordoning
    /// the node (`spec.unschedulable`) drains it, as does [`DRAINING_LABEL`] `"true"`, which
    /// drains only the gateway role.
    pub fn is_draining(&self) -> bool {
        self.unschedulable || self.labels.get(DRAINING_LABEL).is_some_and(|v| v == "true")
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node_name: Option<String>,
    /// IPv4 addresses that count: none for finished or host-network pods.
    pub ips: Vec<Ipv4Addr>,
    /// `spec.serviceAccountName` (`default` when unset, as the API server fills it in).
    pub service_account: String,
}

impl From<&k8s::Node> for Node {
    fn from(node: &k8s::Node) -> Self {
        let internal_ip = node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
        let spec = node.spec.as_ref();
        let pod_cidrs = spec
            .and_then(|spec| spec.pod_cidrs.clone())
            .or_else(|| {
                spec.and_then(|spec| spec.pod_cidr.clone())
                    .map(|cidr| vec![cidr])
            })
            .unwrap_or_default()
            .iter()
            .filter_map(|cidr| cidr.parse::<Ipv4Net>().ok())
            .map(|net| net.trunc())
            .collect();
        Node {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            internal_ip,
            pod_cidrs,
            unschedulable: spec.and_then(|spec| spec.unschedulable).unwrap_or(false),
        }
    }
}

impl From<&k8s::Namespace> for Namespace {
    fn from(ns: &k8s::Namespace) -> Self {
        Namespace {
            name: ns.metadata.name.clone().unwrap_or_default(),
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        }
    }
}

impl From<&k8s::Pod> for Pod {
    fn from(pod: &k8s::Pod) -> Self {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        // A finished pod's IP may already belong to another pod; a host-network pod's IP is
        // its node's, which must never be steered.
        let finished = status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let mut ips = Vec::new();
        if !finished && !host_network {
            let listed = status
                .and_then(|s| s.pod_ips.as_ref())
                .filter(|l| !l.is_empty());
            let raw: Vec<&str> = match listed {
                Some(list) => list.iter().map(|p| p.ip.as_str()).collect(),
                None => status
                    .and_then(|s| s.pod_ip.as_deref())
                    .into_iter()
                    .collect(),
            };
            for ip in raw {
                if let Ok(IpAddr::V4(ip)) = ip.parse::<IpAddr>()
                    && !ips.contains(&ip)
                {
                    ips.push(ip);
                }
            }
        }
        Pod {
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            node_name: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            ips,
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "default".into()),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub nodes: BTreeMap<String, Node>,
    pub namespaces: BTreeMap<String, Namespace>,
    /// Keyed by (namespace, name).
    pub pods: BTreeMap<(String, String), Pod>,
    pub policies: BTreeMap<String, Policy>,
    /// IPv4 CIDRs of the cluster's `ServiceCIDR` objects (networking.k8s.io/v1), by object
    /// name: ClusterIPs, never steered.
    pub service_cidrs: BTreeMap<String, Vec<Ipv4Net>>,
}

/// The IPv4 CIDRs of a `ServiceCIDR` (its IPv6 ones and unparsable entries are skipped: the
/// API server validated them).
pub fn service_cidr_ranges(object: &k8s_openapi::api::networking::v1::ServiceCIDR) -> Vec<Ipv4Net> {
    object
        .spec
        .iter()
        .flat_map(|spec| spec.cidrs.iter().flatten())
        .filter_map(|cidr| cidr.parse::<Ipv4Net>().ok())
        .map(|net| net.trunc())
        .collect()
}

// For incremental sources; both current sources rebuild from scratch (the Kubernetes one
// from its reflector stores, so lost delete events cannot leave stale entries).
impl Inventory {
    pub fn remove_node(&mut self, name: &str) -> Option<Node> {
        self.nodes.remove(name)
    }

    pub fn remove_namespace(&mut self, name: &str) -> Option<Namespace> {
        self.namespaces.remove(name)
    }

    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Option<Pod> {
        self.pods.remove(&(namespace.to_owned(), name.to_owned()))
    }

    pub fn remove_policy(&mut self, name: &str) -> Option<Policy> {
        self.policies.remove(name)
    }
}

impl Inventory {
    pub fn upsert_node(&mut self, node: Node) -> Option<Node> {
        self.nodes.insert(node.name.clone(), node)
    }

    pub fn upsert_namespace(&mut self, mut ns: Namespace) -> Option<Namespace> {
        // The API server always sets this label; hand-written manifests may lack it.
        ns.labels
            .entry(NAMESPACE_NAME_LABEL.into())
            .or_insert_with(|| ns.name.clone());
        self.namespaces.insert(ns.name.clone(), ns)
    }

    pub fn upsert_pod(&mut self, pod: Pod) -> Option<Pod> {
        self.pods
            .insert((pod.namespace.clone(), pod.name.clone()), pod)
    }

    pub fn upsert_policy(&mut self, policy: Policy) -> Option<Policy> {
        self.policies.insert(policy.name.clone(), policy)
    }

    /// Labels of a namespace; one missing from the inventory still has its name label.
    pub fn namespace_labels(&self, name: &str) -> Cow<'_, BTreeMap<String, String>> {
        match self.namespaces.get(name) {
            Some(ns) => Cow::Borrowed(&ns.labels),
            None => Cow::Owned(BTreeMap::from([(
                NAMESPACE_NAME_LABEL.to_owned(),
                name.to_owned(),
            )])),
        }
    }

    /// Whether `pod` is selected by `policy` (Cilium's semantics: ANY selector entry).
    pub fn pod_matches(&self, policy: &Policy, pod: &Pod) -> bool {
        let Some(node_name) = &pod.node_name else {
            return false;
        };
        if pod.ips.is_empty() {
            return false;
        }
        policy
            .selectors
            .iter()
            .any(|sel| self.selector_matches(sel, pod, node_name))
    }

    fn selector_matches(&self, sel: &PolicySelector, pod: &Pod, node_name: &str) -> bool {
        let namespace_labels = self.namespace_labels(&pod.namespace);
        let pod_ok = sel
            .pod_selector
            .matches_with(|key| pod_label(pod, &namespace_labels, key));
        pod_ok
            && sel
                .namespace_selector
                .as_ref()
                .is_none_or(|s| s.matches(&namespace_labels))
            && sel.node_selector.as_ref().is_none_or(|s| {
                self.nodes
                    .get(node_name)
                    .is_some_and(|n| s.matches(&n.labels))
            })
    }

    /// Pods selected by `policy`, in (namespace, name) order. For many policies, build a
    /// [`PodIndex`] once instead.
    pub fn matching_pods<'a>(&'a self, policy: &'a Policy) -> Vec<&'a Pod> {
        PodIndex::new(self).matching_pods(policy)
    }

    /// The gateway node of a selector: the first of its [`Inventory::gateway_candidates`].
    pub fn gateway_node(&self, selector: &Selector) -> Option<&Node> {
        self.gateway_candidates(selector).next()
    }

    /// The nodes that can be a selector's gateway, by name: those it matches that have an
    /// `InternalIP` (a node without one cannot terminate the tunnel).
    pub fn gateway_candidates<'a>(&'a self, selector: &Selector) -> impl Iterator<Item = &'a Node> {
        self.nodes
            .values()
            .filter(|n| n.internal_ip.is_some() && selector.matches(&n.labels))
    }
}

/// A pod's label as a Cilium podSelector sees it: its own labels and Cilium's pseudo-labels
/// (namespace, service account, the namespace's labels, cluster name).
fn pod_label<'a>(
    pod: &'a Pod,
    namespace_labels: &'a BTreeMap<String, String>,
    key: &str,
) -> Option<&'a str> {
    match key {
        POD_NAMESPACE_LABEL => Some(pod.namespace.as_str()),
        SERVICE_ACCOUNT_LABEL => Some(pod.service_account.as_str()),
        CLUSTER_LABEL => Some(DEFAULT_CLUSTER_NAME),
        _ => match key.strip_prefix(NAMESPACE_LABELS_PREFIX) {
            Some(namespace_key) => namespace_labels.get(namespace_key).map(String::as_str),
            None => pod.labels.get(key).map(String::as_str),
        },
    }
}

/// Pods indexed by label (the namespace pseudo-label included), so a policy evaluates only
/// the pods that carry the rarest of its required labels instead of every pod: with 100,000
/// pods and 100 policies that is the difference between seconds and milliseconds.
pub struct PodIndex<'a> {
    inventory: &'a Inventory,
    /// Pods that can match at all (scheduled, with an IPv4), in (namespace, name) order.
    schedulable: Vec<&'a Pod>,
    by_label: HashMap<(&'a str, &'a str), Vec<&'a Pod>>,
}

impl<'a> PodIndex<'a> {
    pub fn new(inventory: &'a Inventory) -> Self {
        let schedulable: Vec<&Pod> = inventory
            .pods
            .values()
            .filter(|pod| pod.node_name.is_some() && !pod.ips.is_empty())
            .collect();
        let mut by_label: HashMap<(&str, &str), Vec<&Pod>> = HashMap::new();
        for &pod in &schedulable {
            let namespace = (POD_NAMESPACE_LABEL, pod.namespace.as_str());
            let labels = pod.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            for label in std::iter::once(namespace).chain(labels) {
                by_label.entry(label).or_default().push(pod);
            }
        }
        Self {
            inventory,
            schedulable,
            by_label,
        }
    }

    /// Pods selected by `policy`, in (namespace, name) order, each once.
    pub fn matching_pods(&self, policy: &'a Policy) -> Vec<&'a Pod> {
        let mut matched: Vec<&Pod> = Vec::new();
        for selector in &policy.selectors {
            let candidates = self.candidates(&selector.pod_selector);
            matched.extend(candidates.iter().copied().filter(|pod| {
                let node = pod.node_name.as_deref().unwrap_or_default();
                self.inventory.selector_matches(selector, pod, node)
            }));
        }
        if policy.selectors.len() > 1 {
            matched.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            matched.dedup_by(|a, b| std::ptr::eq(*a, *b));
        }
        matched
    }

    /// The pods carrying the rarest label the selector requires (all pods when it requires
    /// none), in (namespace, name) order.
    fn candidates(&self, selector: &'a Selector) -> &[&'a Pod] {
        // Cilium's other pseudo-labels are not indexed: they narrow nothing down here.
        selector
            .match_labels
            .iter()
            .filter(|(key, _)| !key.starts_with(CILIUM_PSEUDO_LABEL_PREFIX))
            .map(|(key, value)| {
                self.by_label
                    .get(&(key.as_str(), value.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|pods| pods.len())
            .unwrap_or(&self.schedulable)
    }
}

// Public, not `cfg(test)`: the binary's tests use it too, and they build the library
// without `cfg(test)`.
#[doc(hidden)]
pub mod test_support {
    //! Small builders shared by the tests of the control-plane modules and of the binary.

    use super::{BTreeMap, Ipv4Addr, Node, Pod, Policy, policy};

    pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn node(name: &str, ip: Option<[u8; 4]>, l: &[(&str, &str)]) -> Node {
        Node {
            name: name.into(),
            labels: labels(l),
            internal_ip: ip.map(Ipv4Addr::from),
            pod_cidrs: Vec::new(),
            unschedulable: false,
        }
    }

    pub fn pod(ns: &str, name: &str, node: &str, ip: [u8; 4], l: &[(&str, &str)]) -> Pod {
        Pod {
            service_account: "default".into(),
            namespace: ns.into(),
            name: name.into(),
            labels: labels(l),
            node_name: Some(node.into()),
            ips: vec![Ipv4Addr::from(ip)],
        }
    }

    /// Parses and validates one policy from YAML.
    pub fn policy(yaml: &str) -> Policy {
        policy::validate(&serde_yaml::from_str(yaml).unwrap()).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::{test_support::*, *};

    /// The index must select exactly what evaluating every pod selects.
    #[test]
    fn pod_index_matches_brute_force() {
        let mut inv = Inventory::default();
        inv.upsert_node(node("n1", Some([10, 0, 0, 1]), &[("pool", "a")]));
        inv.upsert_node(node("n2", Some([10, 0, 0, 2]), &[("pool", "b")]));
        let apps = ["web", "db", "batch"];
        for i in 0..60u8 {
            let app = apps[i as usize % 3];
            let tier = if i % 2 == 0 { "front" } else { "back" };
            let namespace = if i % 5 == 0 { "payments" } else { "default" };
            let node_name = if i % 4 == 0 { "n1" } else { "n2" };
            inv.upsert_pod(pod(
                namespace,
                &format!("p{i}"),
                node_name,
                [10, 244, 0, i],
                &[("app", app), ("tier", tier)],
            ));
        }
        let selectors = [
            "[{podSelector: {matchLabels: {app: web}}}]",
            "[{podSelector: {matchLabels: {app: web, tier: back}}}]",
            "[{podSelector: {matchLabels: {app: nothing}}}]",
            "[{podSelector: {matchLabels: {io.kubernetes.pod.namespace: payments}}}]",
            "[{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [db]}]}}]",
            "[{podSelector: {matchLabels: {app: db}}, nodeSelector: {matchLabels: {pool: a}}}]",
            "[{podSelector: {matchLabels: {app: web}}}, {podSelector: {matchLabels: {tier: front}}}]",
            "[{podSelector: {}}]",
        ];
        for selectors in selectors {
            let policy = policy(&format!(
                "metadata: {{name: p}}\nspec: {{selectors: {selectors}, destinationCIDRs: \
                 [198.51.100.0/24], egressGateway: {{nodeSelector: {{matchLabels: {{pool: a}}}}}}}}"
            ));
            let brute: Vec<&Pod> = inv
                .pods
                .values()
                .filter(|p| inv.pod_matches(&policy, p))
                .collect();
            let indexed = PodIndex::new(&inv).matching_pods(&policy);
            let names = |pods: &[&Pod]| pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
            assert_eq!(names(&indexed), names(&brute), "{selectors}");
        }
    }

    #[test]
    fn node_from_k8s_takes_first_ipv4_internal_ip() {
        let n: k8s::Node = serde_yaml::from_str(
            r#"
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {a: b}}
status:
  addresses:
  - {type: Hostname, address: n1}
  - {type: ExternalIP, address: 203.0.113.1}
  - {type: InternalIP, address: "fd00::1"}
  - {type: InternalIP, address: 10.0.0.1}
  - {type: InternalIP, address: 10.0.0.2}
"#,
        )
        .unwrap();
        let n = Node::from(&n);
        assert_eq!(n.name, "n1");
        assert_eq!(n.labels, labels(&[("a", "b")]));
        assert_eq!(n.internal_ip, Some(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn node_draining_from_spec_unschedulable_or_the_label() {
        let parse = |yaml: &str| Node::from(&serde_yaml::from_str::<k8s::Node>(yaml).unwrap());
        let cordoned = parse("metadata: {name: n1}\nspec: {unschedulable: true}\n");
        assert!(cordoned.unschedulable && cordoned.is_draining());
        let plain = parse("metadata: {name: n1}\nspec: {podCIDR: 10.244.1.0/24}\n");
        assert!(!plain.unschedulable && !plain.is_draining());
        assert!(!parse("metadata: {name: n1}\n").is_draining());
        let labelled = |value: &str| {
            let yaml = format!("metadata: {{name: n1, labels: {{{DRAINING_LABEL}: '{value}'}}}}\n");
            parse(&yaml).is_draining()
        };
        assert!(labelled("true"));
        assert!(!labelled("false"));
        assert!(!labelled(""));
    }

    #[test]
    fn pod_from_k8s_ips() {
        let parse = |status: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: ns}}\nspec: {{nodeName: n1, containers: []}}\nstatus: {status}\n"
            );
            Pod::from(&serde_yaml::from_str::<k8s::Pod>(&yaml).unwrap())
        };
        let p =
            parse("{phase: Running, podIP: 10.1.0.5, podIPs: [{ip: 'fd00::5'}, {ip: 10.1.0.5}]}");
        assert_eq!(p.ips, vec![Ipv4Addr::new(10, 1, 0, 5)]);
        assert_eq!(p.node_name.as_deref(), Some("n1"));
        assert_eq!(p.namespace, "ns");
        assert_eq!(
            parse("{podIP: 10.1.0.6}").ips,
            vec![Ipv4Addr::new(10, 1, 0, 6)]
        );
        assert!(parse("{phase: Succeeded, podIP: 10.1.0.7}").ips.is_empty());
        assert!(parse("{phase: Failed, podIP: 10.1.0.7}").ips.is_empty());
        assert!(parse("{phase: Pending}").ips.is_empty());

        let host: k8s::Pod = serde_yaml::from_str(
            "metadata: {name: h}\nspec: {hostNetwork: true, nodeName: n1, containers: []}\nstatus: {podIP: 10.0.0.1}\n",
        )
        .unwrap();
        let host = Pod::from(&host);
        assert!(host.ips.is_empty());
        assert_eq!(host.namespace, "default");
    }

    fn inventory() -> Inventory {
        let mut inv = Inventory::default();
        inv.upsert_node(node("n1", Some([10, 0, 0, 1]), &[("pool", "monitoring")]));
        inv.upsert_node(node("n2", Some([10, 0, 0, 2]), &[]));
        inv.upsert_namespace(Namespace {
            name: "payments".into(),
            labels: labels(&[("team", "pay")]),
        });
        inv
    }

    #[test]
    fn namespace_pseudo_label() {
        let inv = inventory();
        let p = policy(
            "metadata: {name: p}\nspec:\n  selectors: [{podSelector: {matchLabels: {io.kubernetes.pod.namespace: payments}}}]\n  destinationCIDRs: [0.0.0.0/0]\n  egressGateway: {nodeSelector: {}}\n",
        );
        // The pseudo-label comes from the namespace, not from the pod's own labels.
        let fake = pod(
            "other",
            "x",
            "n1",
            [10, 1, 0, 1],
            &[(POD_NAMESPACE_LABEL, "payments")],
        );
        assert!(inv.pod_matches(&p, &pod("payments", "a", "n1", [10, 1, 0, 2], &[])));
        assert!(!inv.pod_matches(&p, &fake));
    }

    /// Cilium's pseudo-labels in a podSelector: the pod's service account, its namespace's
    /// labels, the cluster name; with or without the `k8s:` source prefix.
    #[test]
    fn cilium_pseudo_labels_select_by_service_account_namespace_labels_and_cluster() {
        let mut inv = Inventory::default();
        inv.upsert_node(node("n1", Some([10, 0, 0, 1]), &[]));
        inv.namespaces.insert(
            "payments".into(),
            Namespace {
                name: "payments".into(),
                labels: labels(&[("team", "money")]),
            },
        );
        let mut reporter = pod("payments", "reporter", "n1", [10, 244, 0, 1], &[]);
        reporter.service_account = "reporting".into();
        inv.upsert_pod(reporter);
        inv.upsert_pod(pod("payments", "other", "n1", [10, 244, 0, 2], &[]));
        inv.upsert_pod(pod("default", "elsewhere", "n1", [10, 244, 0, 3], &[]));
        let selected = |selector: &str| {
            let yaml = format!(
                "metadata: {{name: p}}\nspec:\n  selectors: [{{podSelector: {{matchLabels: {{{selector}}}}}}}]\n  destinationCIDRs: [0.0.0.0/0]\n  egressGateway: {{nodeSelector: {{}}}}\n"
            );
            let policy = policy::validate(&serde_yaml::from_str(&yaml).unwrap()).unwrap();
            inv.matching_pods(&policy)
                .iter()
                .map(|pod| pod.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            selected("io.cilium.k8s.policy.serviceaccount: reporting"),
            ["reporter"]
        );
        assert_eq!(
            selected("k8s:io.cilium.k8s.policy.serviceaccount: reporting"),
            ["reporter"]
        );
        assert_eq!(
            selected("io.cilium.k8s.namespace.labels.team: money"),
            ["other", "reporter"]
        );
        assert_eq!(selected("io.cilium.k8s.policy.cluster: default").len(), 3);
        assert_eq!(
            selected("k8s:io.kubernetes.pod.namespace: default"),
            ["elsewhere"]
        );
    }

    #[test]
    fn namespace_selector_uses_namespace_labels_and_implicit_name_label() {
        let inv = inventory();
        let by_label = policy(
            "metadata: {name: p}\nspec:\n  selectors: [{namespaceSelector: {matchLabels: {team: pay}}}]\n  destinationCIDRs: [0.0.0.0/0]\n  egressGateway: {nodeSelector: {}}\n",
        );
        assert!(inv.pod_matches(&by_label, &pod("payments", "a", "n1", [10, 1, 0, 2], &[])));
        assert!(!inv.pod_matches(&by_label, &pod("build", "a", "n1", [10, 1, 0, 2], &[])));

        let by_name = policy(
            "metadata: {name: p}\nspec:\n  selectors: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: build}}}]\n  destinationCIDRs: [0.0.0.0/0]\n  egressGateway: {nodeSelector: {}}\n",
        );
        // "build" is not in the inventory, "payments" lacks the label in its manifest.
        assert!(inv.pod_matches(&by_name, &pod("build", "a", "n1", [10, 1, 0, 2], &[])));
        assert!(!inv.pod_matches(&by_name, &pod("payments", "a", "n1", [10, 1, 0, 2], &[])));
        assert_eq!(
            inv.namespace_labels("payments")
                .get(NAMESPACE_NAME_LABEL)
                .map(String::as_str),
            Some("payments")
        );
    }

    #[test]
    fn node_selector_applies_per_selector_entry() {
        let inv = inventory();
        let p = policy(
            "metadata: {name: p}\nspec:\n  selectors:\n  - {podSelector: {matchLabels: {app: scraper}}, nodeSelector: {matchLabels: {pool: monitoring}}}\n  - {podSelector: {matchLabels: {app: web}}}\n  destinationCIDRs: [0.0.0.0/0]\n  egressGateway: {nodeSelector: {}}\n",
        );
        let m = |node: &str, app: &str| {
            inv.pod_matches(&p, &pod("ns", "a", node, [10, 1, 0, 2], &[("app", app)]))
        };
        assert!(m("n1", "scraper"));
        assert!(!m("n2", "scraper"));
        assert!(!m("unknown-node", "scraper"));
        assert!(m("n2", "web"));
        assert!(m("unknown-node", "web"));
    }

    #[test]
    fn pods_without_ip_or_node_do_not_match() {
        let inv = inventory();
        let p = policy(
            "metadata: {name: p}\nspec:\n  selectors: [{podSelector: {}}]\n  destinationCIDRs: [0.0.0.0/0]\n  egressGateway: {nodeSelector: {}}\n",
        );
        let mut no_ip = pod("ns", "a", "n1", [10, 1, 0, 2], &[]);
        no_ip.ips.clear();
        let mut no_node = pod("ns", "b", "n1", [10, 1, 0, 3], &[]);
        no_node.node_name = None;
        assert!(!inv.pod_matches(&p, &no_ip));
        assert!(!inv.pod_matches(&p, &no_node));
    }

    #[test]
    fn upserts_and_removals_apply_watch_events() {
        let mut inv = inventory();
        let p = policy(
            "metadata: {name: p}\nspec:\n  selectors: [{podSelector: {}}]\n  destinationCIDRs: [0.0.0.0/0]\n  egressGateway: {nodeSelector: {}}\n",
        );
        assert!(inv.upsert_policy(p.clone()).is_none());
        assert_eq!(inv.upsert_policy(p.clone()), Some(p));
        inv.upsert_pod(pod("ns", "a", "n1", [10, 1, 0, 1], &[]));
        let moved = pod("ns", "a", "n2", [10, 1, 0, 2], &[]);
        assert!(inv.upsert_pod(moved.clone()).is_some());
        assert_eq!(inv.pods.len(), 1);
        assert_eq!(inv.remove_pod("ns", "a"), Some(moved));
        assert!(inv.remove_policy("p").is_some());
        assert!(inv.remove_namespace("payments").is_some());
        assert!(inv.remove_node("n1").is_some());
        assert!(inv.pods.is_empty() && inv.policies.is_empty() && inv.namespaces.is_empty());
        assert_eq!(inv.nodes.len(), 1);
    }

    #[test]
    fn gateway_node_is_first_by_name_with_an_ip() {
        let mut inv = Inventory::default();
        inv.upsert_node(node("c", Some([10, 0, 0, 3]), &[("gw", "y")]));
        inv.upsert_node(node("a", None, &[("gw", "y")]));
        inv.upsert_node(node("b", Some([10, 0, 0, 2]), &[("gw", "y")]));
        let sel = Selector {
            match_labels: labels(&[("gw", "y")]),
            ..Default::default()
        };
        assert_eq!(inv.gateway_node(&sel).unwrap().name, "b");
        inv.remove_node("b");
        assert_eq!(inv.gateway_node(&sel).unwrap().name, "c");
        inv.remove_node("c");
        assert!(inv.gateway_node(&sel).is_none());
    }
}
