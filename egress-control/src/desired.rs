//! What the maps of this node should hold, computed from the inventory (pure, no I/O).
//!
//! Every node programs entries for all matched pods cluster-wide, as Cilium does, so a pod
//! that moves is steered without waiting for its new node's agent to learn about it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use egress_common::{
    Ipv4,
    policy::{GATEWAY_EXCLUDED, GATEWAY_NONE, PolicyKey, PolicyValue},
};
use ipnet::Ipv4Net;

use crate::inventory::{EgressSource, Inventory, Pod, PodIndex};

/// This node's interfaces, as the agent reads them from netlink.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalNetwork {
    pub interfaces: Vec<LocalInterface>,
    pub default_route_ifindex: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalInterface {
    pub name: String,
    pub ifindex: u32,
    pub ipv4: Vec<Ipv4Addr>,
    /// Up with carrier; traffic redirected to a down interface would vanish uncounted.
    pub up: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// (pod IP, destination CIDR) -> value of the policy LPM trie.
    pub policy_entries: BTreeMap<(Ipv4Addr, Ipv4Net), PolicyValue>,
    /// `InternalIPs` of all nodes.
    pub nodes: BTreeSet<Ipv4Addr>,
    /// Pod CIDRs of all nodes: in-cluster destinations, never steered.
    pub cluster_cidrs: BTreeSet<Ipv4Net>,
    /// Egress IPs this node serves as a gateway -> ifindex of the interface holding them.
    pub egress_ips: BTreeMap<Ipv4Addr, u32>,
    /// IPs of the pods scheduled on this node.
    pub local_pods: BTreeSet<Ipv4Addr>,
    pub policies: BTreeMap<String, PolicySummary>,
    /// Pod IP -> index, in name order, of the first policy that gives it entries: the
    /// priority of its entries when they do not all fit (see [`DesiredState::fit_policy_map`]).
    pub pod_priority: BTreeMap<Ipv4Addr, usize>,
    /// Pairs of policies that select the same pods and destinations with different values,
    /// in (winner, loser) order; the caller decides how to report them.
    pub conflicts: Vec<PolicyConflict>,
}

/// Two policies program the same (pod, destination) entries differently; `winner`'s
/// entries are kept (the first by name, or an exclusion).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyConflict {
    pub winner: String,
    pub loser: String,
    /// How many entries the two disagree on.
    pub entries: usize,
}

/// What [`DesiredState::fit_policy_map`] left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyMapFit {
    /// Entries the inventory implies.
    pub wanted: usize,
    /// Entries left out because the map is full.
    pub dropped: usize,
    /// Pods whose entries were left out (their traffic is not steered).
    pub dropped_pods: usize,
}

impl DesiredState {
    /// Keeps only as many policy entries as a map of `capacity` holds, choosing a
    /// deterministic subset that never half-programs a pod. Pods left out are not steered
    /// at all (their traffic leaves with the node's IP), hence the error log, the
    /// `policy_entries_dropped` report and `egress-agent check` exiting 3.
    ///
    /// - the unit is a pod IP with *all* its entries, destinations and exclusions together,
    ///   so an exclusion is never dropped while the destination it carves out of stays (that
    ///   would send excluded traffic to the gateway);
    /// - pods are taken in order of (first policy selecting them, by name; pod IP), as long
    ///   as they fit in the room left; a pod that does not fit is left out whole, and
    ///   smaller pods after it may still fit (first fit).
    ///
    /// Kept entries are exactly the entries of the full state, so programming the subset
    /// never changes an entry that is already right; and a pod added late in the order
    /// never evicts an earlier one.
    pub fn fit_policy_map(&mut self, capacity: usize) -> PolicyMapFit {
        let wanted = self.policy_entries.len();
        if wanted <= capacity {
            return PolicyMapFit {
                wanted,
                ..Default::default()
            };
        }
        let mut per_pod: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        for (pod, _) in self.policy_entries.keys() {
            *per_pod.entry(*pod).or_default() += 1;
        }
        let mut order: Vec<(usize, Ipv4Addr)> = per_pod
            .keys()
            .map(|pod| {
                (
                    self.pod_priority.get(pod).copied().unwrap_or(usize::MAX),
                    *pod,
                )
            })
            .collect();
        order.sort_unstable();
        let mut used = 0;
        let mut kept = BTreeSet::new();
        for (_, pod) in order {
            let entries = per_pod[&pod];
            if used + entries > capacity {
                continue;
            }
            used += entries;
            kept.insert(pod);
        }
        self.policy_entries.retain(|(pod, _), _| kept.contains(pod));
        PolicyMapFit {
            wanted,
            dropped: wanted - used,
            dropped_pods: per_pod.len() - kept.len(),
        }
    }
}

/// Per-policy status, for logs, metrics and (later) the policy's status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySummary {
    /// Gateway node of each gateway spec that has one, in spec order.
    pub gateway_nodes: Vec<String>,
    /// Known only on the gateway itself.
    pub egress_ip: Option<Ipv4Addr>,
    pub matched_pods: usize,
    /// The first problem found, if any.
    pub problem: Option<PolicyProblem>,
    /// The policy's IPv6 CIDRs: loaded, not programmed (the datapath is IPv4 only so far).
    pub ipv6_not_programmed: Vec<ipnet::Ipv6Net>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyProblem {
    #[error("no gateway node: no node with an InternalIP matches the gateway nodeSelector")]
    NoGatewayNode,
    #[error("no gateway node for egressGateways[{0}]; its pods use the other gateways")]
    GatewaySpecWithoutNode(usize),
    #[error("interface {0} not found on the gateway")]
    InterfaceNotFound(String),
    #[error("interface {0} is down")]
    InterfaceDown(String),
    #[error("interface {0} has no IPv4 address")]
    InterfaceHasNoIpv4(String),
    #[error("egress IP {ip} is not an address of node {node}")]
    EgressIpNotLocal { ip: Ipv4Addr, node: String },
    #[error("the gateway has no default route")]
    NoDefaultRoute,
    #[error("interface {0} of the default route not found")]
    DefaultRouteInterfaceNotFound(u32),
    #[error("some entries are overridden by policy {0}")]
    OverriddenBy(String),
}

/// The trie key of an entry: the pod is an exact /32, then the destination's mask bits.
pub fn policy_map_key(pod: Ipv4Addr, dest: Ipv4Net) -> (u32, PolicyKey) {
    (
        32 + u32::from(dest.prefix_len()),
        PolicyKey {
            source_ip: pod.octets(),
            dest_ip: dest.network().octets(),
        },
    )
}

/// A gateway spec resolved against the inventory and, on the gateway, the local interfaces.
struct Gateway {
    node_ip: Ipv4,
    /// `Some` only on the gateway itself.
    egress: Option<Result<(Ipv4Addr, u32), PolicyProblem>>,
}

/// Computes this node's desired map contents.
pub fn desired_state(inv: &Inventory, node_name: &str, local: &LocalNetwork) -> DesiredState {
    let mut state = DesiredState {
        nodes: inv.nodes.values().filter_map(|n| n.internal_ip).collect(),
        // In-cluster destinations: nodes' pod CIDRs, and every pod IP, since many CNIs'
        // IPAM (Calico, AWS VPC CNI) leaves podCIDR empty or hands out addresses outside it.
        cluster_cidrs: inv
            .nodes
            .values()
            .flat_map(|n| n.pod_cidrs.iter().copied())
            .chain(
                inv.pods
                    .values()
                    .flat_map(|pod| pod.ips.iter().map(|ip| Ipv4Net::from(*ip))),
            )
            .chain(inv.service_cidrs.values().flatten().copied())
            .collect(),
        local_pods: inv
            .pods
            .values()
            .filter(|p| p.node_name.as_deref() == Some(node_name))
            .flat_map(|p| p.ips.iter().copied())
            .collect(),
        ..Default::default()
    };
    let pods = PodIndex::new(inv);
    let mut owners: BTreeMap<(Ipv4Addr, Ipv4Net), Owner<'_>> = BTreeMap::new();
    let mut conflicts: BTreeMap<(&str, &str), usize> = BTreeMap::new();

    // Policies in name order: on conflicts the first name wins (exclusions aside).
    for (policy_index, policy) in inv.policies.values().enumerate() {
        let mut summary = PolicySummary {
            ipv6_not_programmed: policy.ipv6_cidrs.clone(),
            ..PolicySummary::default()
        };
        let mut problems = Vec::new();

        let mut gateways = Vec::new();
        for (i, spec) in policy.gateways.iter().enumerate() {
            let Some(node) = inv.gateway_node(&spec.node_selector) else {
                if policy.gateways.len() > 1 {
                    problems.push(PolicyProblem::GatewaySpecWithoutNode(i));
                }
                continue;
            };
            let egress =
                (node.name == node_name).then(|| resolve_egress(&spec.egress, local, node_name));
            if let Some(result) = &egress {
                match result {
                    Ok((ip, ifindex)) => {
                        state.egress_ips.entry(*ip).or_insert(*ifindex);
                        summary.egress_ip.get_or_insert(*ip);
                    }
                    Err(problem) => problems.push(problem.clone()),
                }
            }
            summary.gateway_nodes.push(node.name.clone());
            gateways.push(Gateway {
                node_ip: node.internal_ip.unwrap_or(Ipv4Addr::UNSPECIFIED).octets(),
                egress,
            });
        }
        if gateways.is_empty() {
            problems.insert(0, PolicyProblem::NoGatewayNode);
        }

        for pod in pods.matching_pods(policy) {
            summary.matched_pods += 1;
            let value = match pick_gateway(&gateways, pod) {
                None => PolicyValue {
                    gateway_ip: GATEWAY_NONE,
                    ..Default::default()
                },
                Some(gw) => PolicyValue {
                    egress_ip: match &gw.egress {
                        Some(Ok((ip, _))) => ip.octets(),
                        // Not the gateway, or no egress IP: the datapath drops there.
                        _ => Ipv4Addr::UNSPECIFIED.octets(),
                    },
                    gateway_ip: gw.node_ip,
                    ..Default::default()
                },
            };
            // Unknown node: 0.0.0.0, so the gateway refuses the tunnel traffic (fail closed).
            let pod_node_ip = pod
                .node_name
                .as_ref()
                .and_then(|n| inv.nodes.get(n))
                .and_then(|n| n.internal_ip)
                .unwrap_or(Ipv4Addr::UNSPECIFIED)
                .octets();
            let excluded = PolicyValue {
                egress_ip: Ipv4Addr::UNSPECIFIED.octets(),
                gateway_ip: GATEWAY_EXCLUDED,
                pod_node_ip,
                reserved: 0,
            };
            let value = PolicyValue {
                pod_node_ip,
                ..value
            };
            for &ip in &pod.ips {
                state.pod_priority.entry(ip).or_insert(policy_index);
                let entries = policy
                    .destination_cidrs
                    .iter()
                    .map(|&c| (c, value, false))
                    .chain(policy.excluded_cidrs.iter().map(|&c| (c, excluded, true)));
                for (cidr, value, is_excluded) in entries {
                    let new = Owner {
                        policy: &policy.name,
                        value,
                        excluded: is_excluded,
                    };
                    merge(&mut owners, &mut conflicts, (ip, cidr), new);
                }
            }
        }
        summary.problem = problems.into_iter().next();
        state.policies.insert(policy.name.clone(), summary);
    }

    for (&(winner, loser), &entries) in &conflicts {
        state.conflicts.push(PolicyConflict {
            winner: winner.to_owned(),
            loser: loser.to_owned(),
            entries,
        });
        if let Some(s) = state.policies.get_mut(loser) {
            s.problem
                .get_or_insert(PolicyProblem::OverriddenBy(winner.to_owned()));
        }
    }
    state.policy_entries = owners.into_iter().map(|(k, o)| (k, o.value)).collect();
    state
}

struct Owner<'a> {
    policy: &'a str,
    value: PolicyValue,
    excluded: bool,
}

/// Inserts an entry; an exclusion beats a destination, otherwise the first policy wins.
fn merge<'a>(
    owners: &mut BTreeMap<(Ipv4Addr, Ipv4Net), Owner<'a>>,
    conflicts: &mut BTreeMap<(&'a str, &'a str), usize>,
    key: (Ipv4Addr, Ipv4Net),
    new: Owner<'a>,
) {
    let Some(current) = owners.get_mut(&key) else {
        owners.insert(key, new);
        return;
    };
    let replace = new.excluded && !current.excluded;
    if current.policy != new.policy && current.value != new.value {
        let pair = if replace {
            (new.policy, current.policy)
        } else {
            (current.policy, new.policy)
        };
        *conflicts.entry(pair).or_default() += 1;
    }
    if replace {
        *current = new;
    }
}

/// Spreads pods over the gateways with a stable hash of "namespace/name", so every node
/// computes the same choice without talking to the others.
fn pick_gateway<'g>(gateways: &'g [Gateway], pod: &Pod) -> Option<&'g Gateway> {
    match gateways.len() {
        0 => None,
        1 => gateways.first(),
        n => {
            let hash = fnv1a(&[pod.namespace.as_bytes(), b"/", pod.name.as_bytes()]);
            gateways.get((hash % n as u64) as usize)
        }
    }
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The egress IP and its interface on this node, the gateway.
fn resolve_egress(
    source: &EgressSource,
    local: &LocalNetwork,
    node_name: &str,
) -> Result<(Ipv4Addr, u32), PolicyProblem> {
    fn usable(iface: &LocalInterface) -> Result<&LocalInterface, PolicyProblem> {
        if iface.up {
            Ok(iface)
        } else {
            Err(PolicyProblem::InterfaceDown(iface.name.clone()))
        }
    }
    let first_ip = |iface: &LocalInterface| {
        let iface = usable(iface)?;
        iface
            .ipv4
            .first()
            .map(|ip| (*ip, iface.ifindex))
            .ok_or_else(|| PolicyProblem::InterfaceHasNoIpv4(iface.name.clone()))
    };
    match source {
        EgressSource::Interface(name) => local
            .interfaces
            .iter()
            .find(|i| &i.name == name)
            .ok_or_else(|| PolicyProblem::InterfaceNotFound(name.clone()))
            .and_then(first_ip),
        EgressSource::Ip(ip) => local
            .interfaces
            .iter()
            .find(|i| i.ipv4.contains(ip))
            .ok_or_else(|| PolicyProblem::EgressIpNotLocal {
                ip: *ip,
                node: node_name.to_owned(),
            })
            .and_then(usable)
            .map(|i| (*ip, i.ifindex)),
        EgressSource::DefaultRoute => {
            let ifindex = local
                .default_route_ifindex
                .ok_or(PolicyProblem::NoDefaultRoute)?;
            local
                .interfaces
                .iter()
                .find(|i| i.ifindex == ifindex)
                .ok_or(PolicyProblem::DefaultRouteInterfaceNotFound(ifindex))
                .and_then(first_ip)
        }
    }
}

/// Diffs of desired against current contents, so only changes reach the kernel.
pub mod diff {
    use std::collections::BTreeMap;

    /// Changes that turn `current` into `desired`.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Diff<K, V> {
        pub upserts: Vec<(K, V)>,
        pub deletes: Vec<K>,
    }

    impl<K, V> Diff<K, V> {
        pub fn is_empty(&self) -> bool {
            self.upserts.is_empty() && self.deletes.is_empty()
        }
    }

    /// Entries to write (new or changed) and keys to delete, both in key order.
    pub fn diff_maps<K: Ord + Clone, V: PartialEq + Clone>(
        current: &BTreeMap<K, V>,
        desired: &BTreeMap<K, V>,
    ) -> Diff<K, V> {
        Diff {
            upserts: desired
                .iter()
                .filter(|(k, v)| current.get(k) != Some(v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            deletes: current
                .keys()
                .filter(|k| !desired.contains_key(k))
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{diff::*, *};
    use crate::inventory::{Node, test_support::*};

    const GW: &str = "gw-a";

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn local(ifaces: &[(&str, u32, &[&str])], default_route: Option<u32>) -> LocalNetwork {
        LocalNetwork {
            interfaces: ifaces
                .iter()
                .map(|(name, ifindex, ips)| LocalInterface {
                    name: name.to_string(),
                    ifindex: *ifindex,
                    ipv4: ips.iter().map(|s| ip(s)).collect(),
                    up: true,
                })
                .collect(),
            default_route_ifindex: default_route,
        }
    }

    fn gw_network() -> LocalNetwork {
        local(
            &[
                ("eth0", 2, &["10.0.0.10"]),
                ("eth1", 3, &["192.0.2.200", "192.0.2.201"]),
                ("eth2", 4, &[]),
            ],
            Some(2),
        )
    }

    /// Nodes gw-a (gateway, 10.0.0.10), gw-b (gateway, 10.0.0.11), w1 and w2 (workers).
    fn inventory(policies: &[&str]) -> Inventory {
        let mut inv = Inventory::default();
        inv.upsert_node(node(
            GW,
            Some([10, 0, 0, 10]),
            &[("egress", "true"), ("kubernetes.io/hostname", "gw-a")],
        ));
        inv.upsert_node(node(
            "gw-b",
            Some([10, 0, 0, 11]),
            &[("egress", "true"), ("kubernetes.io/hostname", "gw-b")],
        ));
        inv.upsert_node(node("w1", Some([10, 0, 0, 1]), &[("pool", "monitoring")]));
        inv.upsert_node(node("w2", Some([10, 0, 0, 2]), &[]));
        inv.upsert_pod(pod(
            "default",
            "web",
            "w1",
            [10, 1, 1, 1],
            &[("app", "web")],
        ));
        inv.upsert_pod(pod("default", "db", "w2", [10, 1, 2, 1], &[("app", "db")]));
        for p in policies {
            inv.upsert_policy(policy(p));
        }
        inv
    }

    fn simple(name: &str, app: &str, dest: &str, gateway: &str) -> String {
        format!(
            "metadata: {{name: {name}}}\nspec:\n  selectors: [{{podSelector: {{matchLabels: {{app: {app}}}}}}}]\n  destinationCIDRs: [{dest}]\n  egressGateway: {gateway}\n"
        )
    }

    fn value(egress: &str, gateway: [u8; 4], pod_node: [u8; 4]) -> PolicyValue {
        PolicyValue {
            egress_ip: ip(egress).octets(),
            gateway_ip: gateway,
            pod_node_ip: pod_node,
            reserved: 0,
        }
    }

    /// Every pod IP is in-cluster, whatever the node's podCIDR says (Calico and AWS VPC CNI
    /// leave it empty), so even a 0.0.0.0/0 policy never steers pod-to-pod traffic.
    #[test]
    fn every_pod_ip_counts_as_in_cluster() {
        let mut inv = Inventory::default();
        inv.upsert_node(node("n1", Some([10, 0, 0, 1]), &[]));
        inv.upsert_pod(pod("default", "a", "n1", [10, 9, 8, 7], &[]));
        let state = desired_state(&inv, "n1", &LocalNetwork::default());
        assert!(
            state
                .cluster_cidrs
                .contains(&"10.9.8.7/32".parse().unwrap())
        );
    }

    #[test]
    fn map_key_layout() {
        let (len, key) = policy_map_key(ip("10.1.1.1"), net("192.0.2.0/24"));
        assert_eq!(len, 56);
        assert_eq!(key.source_ip, [10, 1, 1, 1]);
        assert_eq!(key.dest_ip, [192, 0, 2, 0]);
        assert_eq!(policy_map_key(ip("10.1.1.1"), net("0.0.0.0/0")).0, 32);
    }

    #[test]
    fn nodes_and_local_pods() {
        let inv = inventory(&[]);
        let s = desired_state(&inv, "w1", &LocalNetwork::default());
        assert_eq!(s.nodes.len(), 4);
        assert_eq!(s.local_pods, BTreeSet::from([ip("10.1.1.1")]));
        assert!(s.policy_entries.is_empty());
    }

    #[test]
    fn egress_ip_resolution_on_gateway_and_zero_elsewhere() {
        let cases = [
            (
                "{nodeSelector: {matchLabels: {egress: 'true'}}, interface: eth1}",
                "192.0.2.200",
                3,
            ),
            (
                "{nodeSelector: {matchLabels: {egress: 'true'}}, egressIP: 192.0.2.201}",
                "192.0.2.201",
                3,
            ),
            (
                "{nodeSelector: {matchLabels: {egress: 'true'}}}",
                "10.0.0.10",
                2,
            ),
        ];
        for (gateway, egress, ifindex) in cases {
            let inv = inventory(&[&simple("p", "web", "203.0.113.0/24", gateway)]);
            let key = (ip("10.1.1.1"), net("203.0.113.0/24"));

            let on_gw = desired_state(&inv, GW, &gw_network());
            assert_eq!(
                on_gw.policy_entries[&key],
                value(egress, [10, 0, 0, 10], [10, 0, 0, 1]),
                "{gateway}"
            );
            assert_eq!(on_gw.egress_ips, BTreeMap::from([(ip(egress), ifindex)]));
            let summary = &on_gw.policies["p"];
            assert_eq!(summary.egress_ip, Some(ip(egress)));
            assert_eq!(summary.gateway_nodes, [GW]);
            assert_eq!(summary.matched_pods, 1);
            assert_eq!(summary.problem, None);

            // Same interfaces on a worker: it is not the gateway, so no egress IP.
            let on_worker = desired_state(&inv, "w1", &gw_network());
            assert_eq!(
                on_worker.policy_entries[&key],
                value("0.0.0.0", [10, 0, 0, 10], [10, 0, 0, 1])
            );
            assert!(on_worker.egress_ips.is_empty());
            assert_eq!(on_worker.policies["p"].egress_ip, None);
        }
    }

    #[test]
    fn egress_ip_problems_on_the_gateway() {
        let cases = [
            (
                "{nodeSelector: {matchLabels: {egress: 'true'}}, interface: eth9}",
                PolicyProblem::InterfaceNotFound("eth9".into()),
            ),
            (
                "{nodeSelector: {matchLabels: {egress: 'true'}}, interface: eth2}",
                PolicyProblem::InterfaceHasNoIpv4("eth2".into()),
            ),
            (
                "{nodeSelector: {matchLabels: {egress: 'true'}}, egressIP: 192.0.2.99}",
                PolicyProblem::EgressIpNotLocal {
                    ip: ip("192.0.2.99"),
                    node: GW.into(),
                },
            ),
        ];
        for (gateway, problem) in cases {
            let inv = inventory(&[&simple("p", "web", "203.0.113.0/24", gateway)]);
            let s = desired_state(&inv, GW, &gw_network());
            let v = s.policy_entries[&(ip("10.1.1.1"), net("203.0.113.0/24"))];
            assert_eq!(v, value("0.0.0.0", [10, 0, 0, 10], [10, 0, 0, 1]));
            assert!(s.egress_ips.is_empty());
            assert_eq!(s.policies["p"].problem, Some(problem));
        }
        let inv = inventory(&[&simple(
            "p",
            "web",
            "203.0.113.0/24",
            "{nodeSelector: {matchLabels: {egress: 'true'}}}",
        )]);
        let no_route = LocalNetwork {
            default_route_ifindex: None,
            ..gw_network()
        };
        assert_eq!(
            desired_state(&inv, GW, &no_route).policies["p"].problem,
            Some(PolicyProblem::NoDefaultRoute)
        );
    }

    #[test]
    fn no_gateway_node_drops() {
        let inv = inventory(&[&simple(
            "p",
            "web",
            "203.0.113.0/24",
            "{nodeSelector: {matchLabels: {egress: nowhere}}}",
        )]);
        let s = desired_state(&inv, "w1", &LocalNetwork::default());
        assert_eq!(
            s.policy_entries[&(ip("10.1.1.1"), net("203.0.113.0/24"))],
            value("0.0.0.0", GATEWAY_NONE, [10, 0, 0, 1])
        );
        assert_eq!(s.policies["p"].problem, Some(PolicyProblem::NoGatewayNode));
        assert!(s.policies["p"].gateway_nodes.is_empty());
    }

    #[test]
    fn gateway_is_first_matching_node_by_name() {
        let inv = inventory(&[&simple(
            "p",
            "web",
            "203.0.113.0/24",
            "{nodeSelector: {matchLabels: {egress: 'true'}}}",
        )]);
        let s = desired_state(&inv, "w1", &LocalNetwork::default());
        assert_eq!(s.policies["p"].gateway_nodes, ["gw-a"]);
        let mut inv = inv;
        inv.remove_node("gw-a");
        let s = desired_state(&inv, "w1", &LocalNetwork::default());
        assert_eq!(s.policies["p"].gateway_nodes, ["gw-b"]);
    }

    #[test]
    fn excluded_cidrs_and_every_pod_cluster_wide() {
        let p = "metadata: {name: p}\nspec:\n  selectors: [{podSelector: {}}]\n  destinationCIDRs: [0.0.0.0/0, 203.0.113.0/24]\n  excludedCIDRs: [10.0.0.0/8]\n  egressGateway: {nodeSelector: {matchLabels: {egress: 'true'}}}\n";
        let inv = inventory(&[p]);
        let s = desired_state(&inv, "w2", &LocalNetwork::default());
        assert_eq!(s.policy_entries.len(), 6);
        for (pod_ip, node_ip) in [("10.1.1.1", [10, 0, 0, 1]), ("10.1.2.1", [10, 0, 0, 2])] {
            assert_eq!(
                s.policy_entries[&(ip(pod_ip), net("10.0.0.0/8"))],
                value("0.0.0.0", GATEWAY_EXCLUDED, node_ip)
            );
            assert_eq!(
                s.policy_entries[&(ip(pod_ip), net("0.0.0.0/0"))],
                value("0.0.0.0", [10, 0, 0, 10], node_ip)
            );
        }
        assert_eq!(s.policies["p"].matched_pods, 2);
    }

    #[test]
    fn conflicts_first_name_wins_but_exclusions_always_win() {
        let a = simple(
            "a-first",
            "web",
            "203.0.113.0/24",
            "{nodeSelector: {matchLabels: {kubernetes.io/hostname: gw-a}}}",
        );
        let b = simple(
            "b-second",
            "web",
            "203.0.113.0/24",
            "{nodeSelector: {matchLabels: {kubernetes.io/hostname: gw-b}}}",
        );
        let c = "metadata: {name: c-third}\nspec:\n  selectors: [{podSelector: {matchLabels: {app: web}}}]\n  destinationCIDRs: [198.51.100.0/24]\n  excludedCIDRs: [203.0.113.0/24]\n  egressGateway: {nodeSelector: {}}\n";
        let key = (ip("10.1.1.1"), net("203.0.113.0/24"));

        let s = desired_state(&inventory(&[&b, &a]), "w1", &LocalNetwork::default());
        assert_eq!(s.policy_entries[&key].gateway_ip, [10, 0, 0, 10]);
        assert_eq!(
            s.policies["b-second"].problem,
            Some(PolicyProblem::OverriddenBy("a-first".into()))
        );
        assert_eq!(s.policies["a-first"].problem, None);
        // Returned, not logged: the agent says each conflict once per change.
        assert_eq!(
            s.conflicts,
            [PolicyConflict {
                winner: "a-first".into(),
                loser: "b-second".into(),
                entries: 1
            }]
        );

        let s = desired_state(&inventory(&[&a, &b, c]), "w1", &LocalNetwork::default());
        assert_eq!(s.policy_entries[&key].gateway_ip, GATEWAY_EXCLUDED);
        assert_eq!(
            s.policies["a-first"].problem,
            Some(PolicyProblem::OverriddenBy("c-third".into()))
        );
        // Deterministic: the same inputs give the same state.
        assert_eq!(
            s,
            desired_state(&inventory(&[c, &b, &a]), "w1", &LocalNetwork::default())
        );
    }

    #[test]
    fn exclusion_wins_within_one_policy() {
        let p = "metadata: {name: p}\nspec:\n  selectors: [{podSelector: {matchLabels: {app: web}}}]\n  destinationCIDRs: [203.0.113.0/24]\n  excludedCIDRs: [203.0.113.0/24]\n  egressGateway: {nodeSelector: {}}\n";
        let s = desired_state(&inventory(&[p]), "w1", &LocalNetwork::default());
        assert_eq!(s.policy_entries.len(), 1);
        assert_eq!(
            s.policy_entries.values().next().unwrap().gateway_ip,
            GATEWAY_EXCLUDED
        );
        assert_eq!(s.policies["p"].problem, None);
    }

    #[test]
    fn egress_gateways_spread_is_deterministic_and_uses_all() {
        let p = "metadata: {name: fleet}\nspec:\n  selectors: [{podSelector: {matchLabels: {app: crawler}}}]\n  destinationCIDRs: [0.0.0.0/0]\n  egressGateway: {nodeSelector: {matchLabels: {kubernetes.io/hostname: gw-a}}, interface: eth1}\n  egressGateways:\n  - {nodeSelector: {matchLabels: {kubernetes.io/hostname: gw-a}}, interface: eth1}\n  - {nodeSelector: {matchLabels: {kubernetes.io/hostname: gone}}}\n  - {nodeSelector: {matchLabels: {kubernetes.io/hostname: gw-b}}, interface: eth1}\n";
        let mut inv = inventory(&[p]);
        for i in 0..32u8 {
            inv.upsert_pod(pod(
                "crawl",
                &format!("c-{i}"),
                "w1",
                [10, 1, 3, i],
                &[("app", "crawler")],
            ));
        }
        let on_w1 = desired_state(&inv, "w1", &LocalNetwork::default());
        let on_a = desired_state(&inv, GW, &gw_network());
        let on_b = desired_state(&inv, "gw-b", &gw_network());
        let gateways = |s: &DesiredState| -> Vec<Ipv4> {
            s.policy_entries.values().map(|v| v.gateway_ip).collect()
        };
        assert_eq!(gateways(&on_w1), gateways(&on_a));
        assert_eq!(gateways(&on_w1), gateways(&on_b));
        let used: BTreeSet<Ipv4> = gateways(&on_w1).into_iter().collect();
        assert_eq!(used, BTreeSet::from([[10, 0, 0, 10], [10, 0, 0, 11]]));
        assert_eq!(on_w1.policies["fleet"].gateway_nodes, ["gw-a", "gw-b"]);
        assert_eq!(
            on_w1.policies["fleet"].problem,
            Some(PolicyProblem::GatewaySpecWithoutNode(1))
        );
        // Each gateway sets its egress IP only on the entries it serves.
        for (s, own) in [(&on_a, [10, 0, 0, 10]), (&on_b, [10, 0, 0, 11])] {
            for v in s.policy_entries.values() {
                let expect = if v.gateway_ip == own {
                    ip("192.0.2.200")
                } else {
                    Ipv4Addr::UNSPECIFIED
                };
                assert_eq!(Ipv4Addr::from(v.egress_ip), expect);
            }
            assert_eq!(s.egress_ips, BTreeMap::from([(ip("192.0.2.200"), 3)]));
        }
    }

    #[test]
    fn pod_on_unknown_node_gets_zero_node_ip() {
        let mut inv = inventory(&[&simple(
            "p",
            "web",
            "203.0.113.0/24",
            "{nodeSelector: {matchLabels: {egress: 'true'}}}",
        )]);
        inv.upsert_node(Node {
            name: "w1".into(),
            ..Node::default()
        });
        let s = desired_state(&inv, "w2", &LocalNetwork::default());
        assert_eq!(
            s.policy_entries.values().next().unwrap().pod_node_ip,
            [0, 0, 0, 0]
        );
    }

    /// db (10.1.2.1) has 4 entries and sorts first by policy name; web (10.1.1.1) has 1.
    fn capacity_inventory(first: &str, second: &str) -> Inventory {
        let a = format!(
            "metadata: {{name: {first}}}\nspec:\n  selectors: [{{podSelector: {{matchLabels: {{app: db}}}}}}]\n  destinationCIDRs: [0.0.0.0/0, 203.0.113.0/24]\n  excludedCIDRs: [10.0.0.0/8]\n  egressGateway: {{nodeSelector: {{matchLabels: {{egress: 'true'}}}}}}\n"
        );
        let b = format!(
            "metadata: {{name: {second}}}\nspec:\n  selectors: [{{podSelector: {{}}}}]\n  destinationCIDRs: [198.51.100.0/24]\n  egressGateway: {{nodeSelector: {{matchLabels: {{egress: 'true'}}}}}}\n"
        );
        inventory(&[&a, &b])
    }

    fn entries_of(s: &DesiredState, pod: &str) -> BTreeMap<(Ipv4Addr, Ipv4Net), PolicyValue> {
        s.policy_entries
            .iter()
            .filter(|((p, _), _)| *p == ip(pod))
            .map(|(k, v)| (*k, *v))
            .collect()
    }

    fn pods_of(s: &DesiredState) -> BTreeSet<Ipv4Addr> {
        s.policy_entries.keys().map(|(pod, _)| *pod).collect()
    }

    #[test]
    fn fit_policy_map_keeps_everything_that_fits() {
        let full = desired_state(
            &capacity_inventory("a", "b"),
            "w1",
            &LocalNetwork::default(),
        );
        assert_eq!(full.policy_entries.len(), 5);
        for capacity in [5, 6, 1 << 20] {
            let mut s = full.clone();
            let fit = s.fit_policy_map(capacity);
            assert_eq!(
                fit,
                PolicyMapFit {
                    wanted: 5,
                    dropped: 0,
                    dropped_pods: 0
                }
            );
            assert_eq!(s, full);
        }
    }

    #[test]
    fn fit_policy_map_keeps_whole_pods_in_policy_name_order() {
        let full = desired_state(
            &capacity_inventory("a", "b"),
            "w1",
            &LocalNetwork::default(),
        );
        let db = entries_of(&full, "10.1.2.1");
        assert_eq!((db.len(), entries_of(&full, "10.1.1.1").len()), (4, 1));
        // (capacity, pods kept): db first (policy "a"), then web; a pod that does not fit
        // is left out whole, and web, smaller, may still fit.
        let cases: [(usize, &[&str]); 5] = [
            (4, &["10.1.2.1"]),
            (3, &["10.1.1.1"]),
            (2, &["10.1.1.1"]),
            (1, &["10.1.1.1"]),
            (0, &[]),
        ];
        for (capacity, kept) in cases {
            let mut s = full.clone();
            let fit = s.fit_policy_map(capacity);
            assert!(s.policy_entries.len() <= capacity);
            assert_eq!(fit.wanted, 5);
            assert_eq!(
                fit.dropped,
                5 - s.policy_entries.len(),
                "capacity {capacity}"
            );
            assert_eq!(fit.dropped_pods, 2 - kept.len(), "capacity {capacity}");
            let mut expect = BTreeMap::new();
            for pod in kept {
                // Every entry of a kept pod, with the very same value, exclusion included.
                expect.extend(entries_of(&full, pod));
            }
            assert_eq!(s.policy_entries, expect, "capacity {capacity}");
            // Nothing but the policy entries changes.
            assert_eq!(
                DesiredState {
                    policy_entries: full.policy_entries.clone(),
                    ..s
                },
                full
            );
        }
        // db's exclusion never stays without its destinations, nor goes without them.
        let exclusion = (ip("10.1.2.1"), net("10.0.0.0/8"));
        assert_eq!(full.policy_entries[&exclusion].gateway_ip, GATEWAY_EXCLUDED);
        for capacity in 0..=5 {
            let mut s = full.clone();
            s.fit_policy_map(capacity);
            let kept = entries_of(&s, "10.1.2.1");
            assert!(
                kept.is_empty() || kept == db,
                "capacity {capacity}: {kept:?}"
            );
        }
    }

    #[test]
    fn fit_policy_map_priority_follows_policy_names_and_is_stable() {
        // Same policies, names swapped: web's policy now sorts first.
        let mut s = desired_state(
            &capacity_inventory("z", "b"),
            "w1",
            &LocalNetwork::default(),
        );
        assert_eq!(s.pod_priority[&ip("10.1.1.1")], 0);
        s.fit_policy_map(4);
        assert_eq!(pods_of(&s), BTreeSet::from([ip("10.1.1.1")]));
        // A pod that sorts last never evicts earlier ones.
        let mut inv = capacity_inventory("a", "b");
        let mut before = desired_state(&inv, "w1", &LocalNetwork::default());
        before.fit_policy_map(4);
        inv.upsert_pod(pod("default", "late", "w2", [10, 1, 9, 9], &[]));
        let mut after = desired_state(&inv, "w1", &LocalNetwork::default());
        let fit = after.fit_policy_map(4);
        assert_eq!(after.policy_entries, before.policy_entries);
        assert_eq!((fit.wanted, fit.dropped, fit.dropped_pods), (6, 2, 2));
    }

    #[test]
    fn diffs() {
        let current = BTreeMap::from([(1, "a"), (2, "b"), (3, "c")]);
        let desired = BTreeMap::from([(2, "b"), (3, "x"), (4, "d")]);
        let d = diff_maps(&current, &desired);
        assert_eq!(d.upserts, [(3, "x"), (4, "d")]);
        assert_eq!(d.deletes, [1]);
        assert!(diff_maps(&desired, &desired).is_empty());
    }
}
