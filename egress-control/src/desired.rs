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

pub use crate::floating::{FloatingIp, NatPorts};
use crate::{
    floating,
    gateways::{Candidate, GroupInterner, entry_order, group_of, pod_hash, spec_candidates},
    inventory::{EgressSource, Inventory, Node, Pod, PodIndex, Policy},
};

/// This node's interfaces, as the agent reads them from netlink.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalNetwork {
    pub interfaces: Vec<LocalInterface>,
    pub default_route_ifindex: Option<u32>,
}

impl LocalNetwork {
    /// The interface of the default route (where an egress without `interface` leaves).
    pub(crate) fn default_route_interface(&self) -> Result<&LocalInterface, PolicyProblem> {
        let ifindex = self
            .default_route_ifindex
            .ok_or(PolicyProblem::NoDefaultRoute)?;
        self.interfaces
            .iter()
            .find(|i| i.ifindex == ifindex)
            .ok_or(PolicyProblem::DefaultRouteInterfaceNotFound(ifindex))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalInterface {
    pub name: String,
    pub ifindex: u32,
    pub ipv4: Vec<Ipv4Addr>,
    /// Up with carrier; traffic redirected to a down interface would vanish uncounted.
    pub up: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredState {
    /// (pod IP, destination CIDR) -> value of the policy LPM trie. On a candidate of a
    /// floating egress IP, also (egress IP, destination CIDR): what it may forward once a
    /// pod's node translated it (see [`crate::floating`]).
    pub policy_entries: BTreeMap<(Ipv4Addr, Ipv4Net), PolicyValue>,
    /// `InternalIPs` of all nodes.
    pub nodes: BTreeSet<Ipv4Addr>,
    /// Pod CIDRs of all nodes: in-cluster destinations, never steered.
    pub cluster_cidrs: BTreeSet<Ipv4Net>,
    /// Egress IPs this node serves as a gateway candidate -> ifindex of the interface
    /// holding them (for a floating egress IP, the interface it goes on when this node
    /// holds it).
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
    /// Gateway groups by id (`PolicyValue::gateway_group`): candidates' underlay addresses,
    /// in order of preference. Only groups some policy entry references.
    pub gateway_groups: BTreeMap<u32, Vec<Ipv4Addr>>,
    /// `GatewayGroup::flags` of the groups of `gateway_groups` that have any
    /// (`GROUP_POD_NODE_TRANSLATES`: a floating egress IP's).
    pub group_flags: BTreeMap<u32, u32>,
    /// Gateways this node probes, by underlay address: the candidates of every group an
    /// entry of a local pod references, and on a candidate the other candidates of each of
    /// its groups (the first one up writes the policy's status, naming the ones up; on a
    /// floating IP's candidate, it holds the IP when those before it are down); this node
    /// excepted. Empty on a node without selected pods that is nobody's candidate.
    pub probe_targets: BTreeMap<Ipv4Addr, ProbeTarget>,
    /// Floating egress IP -> this node's block of its NAT ports, (first port, count): the
    /// ports this node translates its pods' flows to. Only on nodes running pods of a
    /// floating policy, and that got a block.
    pub own_port_blocks: BTreeMap<Ipv4Addr, (u16, u16)>,
    /// (floating egress IP, block index) -> InternalIP of the node owning the block, where
    /// a reply to one of its ports goes. The whole table of every floating IP this node is
    /// a candidate of: any candidate may be holding the IP when a reply comes.
    pub port_block_owners: BTreeMap<(Ipv4Addr, u16), Ipv4Addr>,
    /// Floating egress IPs this node is a candidate of, and may hold (their interface is
    /// up): where the address goes, and which candidates come first. An address this node
    /// holds that is not here (any more) is to be given up.
    pub floating_ips: BTreeMap<Ipv4Addr, FloatingIp>,
    /// This node is being drained ([`Node::is_draining`]): as a gateway it takes no new flows.
    pub self_draining: bool,
    /// This node can translate what its groups may send it: every egress IP it serves a
    /// pod with resolved. True on a node that is no pod's candidate.
    pub self_serving: bool,
    /// This node's underlay address (its InternalIP), when it has one.
    pub node_ip: Option<Ipv4Addr>,
}

impl Default for DesiredState {
    /// Nothing to program; a node that is nobody's candidate counts as serving.
    fn default() -> Self {
        Self {
            policy_entries: BTreeMap::new(),
            nodes: BTreeSet::new(),
            cluster_cidrs: BTreeSet::new(),
            egress_ips: BTreeMap::new(),
            local_pods: BTreeSet::new(),
            policies: BTreeMap::new(),
            pod_priority: BTreeMap::new(),
            conflicts: Vec::new(),
            gateway_groups: BTreeMap::new(),
            group_flags: BTreeMap::new(),
            probe_targets: BTreeMap::new(),
            own_port_blocks: BTreeMap::new(),
            port_block_owners: BTreeMap::new(),
            floating_ips: BTreeMap::new(),
            self_draining: false,
            self_serving: true,
            node_ip: None,
        }
    }
}

/// A gateway this node probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The gateway's node name.
    pub node: String,
    /// The node is being drained ([`Node::is_draining`]): healthy, but takes no new flows.
    pub draining: bool,
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
    /// never evicts an earlier one. Groups and probe targets only kept pods need stay.
    ///
    /// A candidate's entries keyed by a floating egress IP are one such unit (with the
    /// policy's priority, counted as a pod in `dropped_pods`). Left out, the candidate
    /// cannot forward for that IP: it gives up the IP (out of `floating_ips`) and reports
    /// itself as not serving, so the next candidate takes the address.
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
        let floating_before = self.floating_ips.len();
        self.floating_ips
            .retain(|ip, _| kept.contains(ip) || !per_pod.contains_key(ip));
        if self.floating_ips.len() < floating_before {
            self.self_serving = false;
        }
        self.drop_unreferenced_groups();
        let probed = self.probed_gateways();
        self.probe_targets.retain(|ip, _| probed.contains(ip));
        PolicyMapFit {
            wanted,
            dropped: wanted - used,
            dropped_pods: per_pod.len() - kept.len(),
        }
    }
}

impl DesiredState {
    /// Forgets the groups no policy entry references.
    fn drop_unreferenced_groups(&mut self) {
        let referenced: BTreeSet<u32> = self
            .policy_entries
            .values()
            .map(|v| v.gateway_group)
            .collect();
        self.gateway_groups.retain(|id, _| referenced.contains(id));
        self.group_flags.retain(|id, _| referenced.contains(id));
    }

    /// The candidates of the groups that entries of local pods reference, the other
    /// candidates of the groups this node is a candidate of, and the candidates before this
    /// node of the floating IPs it may hold.
    fn probed_gateways(&self) -> BTreeSet<Ipv4Addr> {
        let local_groups: BTreeSet<u32> = self
            .policy_entries
            .iter()
            .filter(|((pod, _), v)| v.gateway_group != 0 && self.local_pods.contains(pod))
            .map(|(_, v)| v.gateway_group)
            .collect();
        let holders_before = self
            .floating_ips
            .values()
            .flat_map(|floating| &floating.candidates_before);
        let fellow_candidates = self
            .gateway_groups
            .values()
            .filter(|candidates| self.node_ip.is_some_and(|own| candidates.contains(&own)))
            .flatten();
        local_groups
            .iter()
            .filter_map(|id| self.gateway_groups.get(id))
            .flatten()
            .chain(holders_before)
            .chain(fellow_candidates)
            .copied()
            .collect()
    }
}

/// Per-policy status, for logs, metrics and (later) the policy's status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySummary {
    /// Gateway node of each gateway spec that has one (its first candidate), in spec order.
    pub gateway_nodes: Vec<String>,
    /// Candidate node names of each gateway spec, in spec order (empty: none matches), each
    /// by name and at most [`crate::gateways::MAX_CANDIDATES`].
    pub candidate_nodes: Vec<Vec<String>>,
    /// Known only on the gateway's candidates: this node's first resolved egress IP.
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
    #[error(
        "egress IP {egress_ip} already floats between the candidates of policy {policy}: a \
         floating egress IP has one set of candidates, so give this policy the same \
         nodeSelector and interface, or another egress IP; its pods' traffic is dropped"
    )]
    FloatingEgressIpTaken { egress_ip: Ipv4Addr, policy: String },
    #[error(
        "egress IP {egress_ip} floats between the candidates of policy {policy}: a policy \
         without the floating-egress-ip annotation cannot use it, since both would translate \
         to its ports; annotate this policy too, with the same nodeSelector and interface, or \
         pick another egress IP; its pods' traffic is dropped"
    )]
    EgressIpFloats { egress_ip: Ipv4Addr, policy: String },
    #[error(
        "floating egress IP {egress_ip}: {nodes_without} nodes running its pods got no block \
         of its ports (--nat-port-range holds {blocks} blocks of 64), so their pods' traffic \
         is dropped; spread the pods over more floating egress IPs (more policies), or widen \
         --nat-port-range on every node"
    )]
    PortBlocksExhausted {
        egress_ip: Ipv4Addr,
        nodes_without: usize,
        blocks: u16,
    },
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

/// A gateway spec resolved against the inventory and, on its candidates, the local
/// interfaces.
struct Gateway<'a> {
    /// By name; empty: no node matches, the spec is skipped.
    candidates: Vec<Candidate<'a>>,
    /// `Some` only on the spec's candidates: this node's egress IP and its interface.
    egress: Option<Result<(Ipv4Addr, u32), PolicyProblem>>,
}

impl Gateway<'_> {
    fn has_candidate(&self, node_name: &str) -> bool {
        self.candidates.iter().any(|c| c.node.name == node_name)
    }
}

/// What this node is for a pod's traffic.
#[derive(Clone, Copy)]
enum Role {
    /// Not among the pod's candidates: it only steers (egress IP 0.0.0.0, as in Cilium).
    NotCandidate,
    /// A candidate that translates to this egress IP when the traffic reaches it.
    Serves(Ipv4Addr),
    /// A candidate whose egress IP did not resolve: the datapath drops what reaches it, and
    /// the node reports itself as not serving so its probers fail over.
    CannotServe,
}

/// Where a pod's traffic goes, as seen from this node.
#[derive(Clone, Copy)]
struct Steering {
    /// Provisional id (see [`GroupInterner`]) of the pod's group.
    group: u32,
    /// The group's first candidate: the gateway while all are healthy.
    gateway_ip: Ipv4,
    role: Role,
}

/// A policy's gateway specs, and the steering of each pod order seen so far: pods with the
/// same order of specs share everything but their addresses.
struct PolicyGateways<'a> {
    gateways: Vec<Gateway<'a>>,
    /// Indexes of the specs that have candidates.
    usable: Vec<usize>,
    /// `GatewayGroup::flags` of the policy's groups.
    group_flags: u32,
    by_order: BTreeMap<Vec<usize>, Steering>,
}

impl<'a> PolicyGateways<'a> {
    /// Finds every spec's candidates and, where this node is one, its egress IP.
    fn resolve(
        inv: &'a Inventory,
        policy: &Policy,
        node_name: &str,
        local: &LocalNetwork,
        group_flags: u32,
    ) -> Self {
        let gateways: Vec<Gateway<'a>> = policy
            .gateways
            .iter()
            .map(|spec| {
                let candidates = spec_candidates(inv, &spec.node_selector);
                let is_candidate = candidates.iter().any(|c| c.node.name == node_name);
                Gateway {
                    candidates,
                    egress: is_candidate.then(|| resolve_egress(&spec.egress, local, node_name)),
                }
            })
            .collect();
        let usable = (0..gateways.len())
            .filter(|&i| !gateways[i].candidates.is_empty())
            .collect();
        Self {
            gateways,
            usable,
            group_flags,
            by_order: BTreeMap::new(),
        }
    }

    /// Forgets this node's egress IPs: the policy is not programmed, its gateways serve
    /// nothing (its pods' traffic is dropped).
    fn forget_egress(&mut self) {
        for gateway in &mut self.gateways {
            gateway.egress = None;
        }
    }

    /// Records the specs' nodes in the summary, this node's egress IPs in the state, and
    /// the problems, in spec order.
    fn record(
        &self,
        state: &mut DesiredState,
        summary: &mut PolicySummary,
        problems: &mut Vec<PolicyProblem>,
    ) {
        if self.usable.is_empty() {
            problems.push(PolicyProblem::NoGatewayNode);
        }
        for (i, gateway) in self.gateways.iter().enumerate() {
            let names: Vec<String> = gateway
                .candidates
                .iter()
                .map(|c| c.node.name.clone())
                .collect();
            if names.is_empty() && self.gateways.len() > 1 {
                problems.push(PolicyProblem::GatewaySpecWithoutNode(i));
            }
            summary.gateway_nodes.extend(names.first().cloned());
            summary.candidate_nodes.push(names);
            match &gateway.egress {
                Some(Ok((ip, ifindex))) => {
                    state.egress_ips.entry(*ip).or_insert(*ifindex);
                    summary.egress_ip.get_or_insert(*ip);
                }
                Some(Err(problem)) => problems.push(problem.clone()),
                None => {}
            }
        }
    }

    /// The pod's steering; `None` when no spec has a candidate.
    fn steer(
        &mut self,
        pod: &Pod,
        node_name: &str,
        groups: &mut GroupInterner,
    ) -> Option<Steering> {
        if self.usable.is_empty() {
            return None;
        }
        let order = entry_order(pod_hash(pod), self.usable.iter().copied());
        if let Some(steering) = self.by_order.get(&order) {
            return Some(*steering);
        }
        let in_order = || order.iter().map(|&i| &self.gateways[i]);
        let group = group_of(in_order().map(|g| g.candidates.as_slice()));
        // The spec this node serves the pod for: the first, in the pod's order, that has it
        // as a candidate (where it entered the group).
        let role = match in_order().find(|g| g.has_candidate(node_name)) {
            Some(g) if group.iter().any(|c| c.node.name == node_name) => match &g.egress {
                Some(Ok((ip, _))) => Role::Serves(*ip),
                _ => Role::CannotServe,
            },
            _ => Role::NotCandidate,
        };
        let steering = Steering {
            group: groups.intern(&group, self.group_flags),
            gateway_ip: group[0].ip.octets(),
            role,
        };
        self.by_order.insert(order, steering);
        Some(steering)
    }
}

/// The policy value of a pod's destinations (its `pod_node_ip` aside).
fn destination_value(steering: Option<Steering>) -> PolicyValue {
    let Some(steering) = steering else {
        return PolicyValue {
            gateway_ip: GATEWAY_NONE,
            ..Default::default()
        };
    };
    let egress_ip = match steering.role {
        Role::Serves(ip) => ip,
        // Not a candidate, or no egress IP: the datapath drops what reaches this node.
        Role::NotCandidate | Role::CannotServe => Ipv4Addr::UNSPECIFIED,
    };
    PolicyValue {
        egress_ip: egress_ip.octets(),
        gateway_ip: steering.gateway_ip,
        gateway_group: steering.group,
        ..Default::default()
    }
}

/// Computes this node's desired map contents, with the default NAT port range (see
/// [`desired_state_with_nat_ports`]).
pub fn desired_state(inv: &Inventory, node_name: &str, local: &LocalNetwork) -> DesiredState {
    desired_state_with_nat_ports(inv, node_name, local, NatPorts::default())
}

/// Computes this node's desired map contents; `nat_ports` (`--nat-port-range`, the same on
/// every node) is split into the port blocks of floating egress IPs.
pub fn desired_state_with_nat_ports(
    inv: &Inventory,
    node_name: &str,
    local: &LocalNetwork,
    nat_ports: NatPorts,
) -> DesiredState {
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
        self_draining: inv.nodes.get(node_name).is_some_and(Node::is_draining),
        node_ip: inv.nodes.get(node_name).and_then(|node| node.internal_ip),
        ..Default::default()
    };
    let pods = PodIndex::new(inv);
    let floating = floating::Plan::new(inv, &pods, nat_ports);
    let mut owners: BTreeMap<(Ipv4Addr, Ipv4Net), Owner<'_>> = BTreeMap::new();
    let mut conflicts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut groups = GroupInterner::default();

    // Policies in name order: on conflicts the first name wins (exclusions aside).
    for (policy_index, policy) in inv.policies.values().enumerate() {
        let mut summary = PolicySummary {
            ipv6_not_programmed: policy.ipv6_cidrs.clone(),
            ..PolicySummary::default()
        };
        let mut problems = Vec::new();
        let group_flags = floating.group_flags(policy);
        let mut gateways = PolicyGateways::resolve(inv, policy, node_name, local, group_flags);
        let refusal = floating.refusal(policy);
        if let Some(problem) = refusal {
            problems.push(problem.clone());
            gateways.forget_egress();
        }
        gateways.record(&mut state, &mut summary, &mut problems);
        problems.extend(floating.exhaustion(policy));

        for pod in pods.matching_pods(policy) {
            summary.matched_pods += 1;
            let steering = match refusal {
                Some(_) => None,
                None => gateways.steer(pod, node_name, &mut groups),
            };
            let cannot_serve = matches!(steering.map(|s| s.role), Some(Role::CannotServe));
            if cannot_serve {
                state.self_serving = false;
            }
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
                gateway_group: 0,
            };
            let value = PolicyValue {
                pod_node_ip,
                ..destination_value(steering)
            };
            let value = floating.pod_value(policy, pod, value);
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
        for (key, value, excluded) in floating.gateway_entries(policy, node_name, &mut groups) {
            state.pod_priority.entry(key.0).or_insert(policy_index);
            let new = Owner {
                policy: &policy.name,
                value,
                excluded,
            };
            merge(&mut owners, &mut conflicts, key, new);
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
    floating.finish(&mut state, node_name, local);
    finish_groups(&mut state, groups, inv, node_name);
    state
}

/// Gives the entries their final group ids, keeps the groups they reference, and lists the
/// probe targets.
fn finish_groups(
    state: &mut DesiredState,
    groups: GroupInterner,
    inv: &Inventory,
    node_name: &str,
) {
    let groups = groups.finish();
    for value in state.policy_entries.values_mut() {
        if value.gateway_group != 0 {
            value.gateway_group = groups.final_ids[value.gateway_group as usize - 1];
        }
    }
    state.gateway_groups = groups.candidates;
    state.group_flags = groups.flags;
    state.drop_unreferenced_groups();
    let mut by_ip: BTreeMap<Ipv4Addr, &Node> = BTreeMap::new();
    for node in inv.nodes.values() {
        if let Some(ip) = node.internal_ip {
            by_ip.entry(ip).or_insert(node);
        }
    }
    state.probe_targets = state
        .probed_gateways()
        .into_iter()
        .filter_map(|ip| by_ip.get(&ip).map(|node| (ip, *node)))
        .filter(|(_, node)| node.name != node_name)
        .map(|(ip, node)| {
            let target = ProbeTarget {
                node: node.name.clone(),
                draining: node.is_draining(),
            };
            (ip, target)
        })
        .collect();
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

/// The egress IP and its interface on this node, a candidate gateway.
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
        EgressSource::Floating { ip, interface } => {
            floating::holding_interface(interface.as_deref(), local).map(|i| (*ip, i.ifindex))
        }
        EgressSource::DefaultRoute => local.default_route_interface().and_then(first_ip),
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
    use crate::inventory::{DRAINING_LABEL, Node, test_support::*};

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

    /// An entry without a group: excluded, or no gateway.
    fn value(egress: &str, gateway: [u8; 4], pod_node: [u8; 4]) -> PolicyValue {
        PolicyValue {
            egress_ip: ip(egress).octets(),
            gateway_ip: gateway,
            pod_node_ip: pod_node,
            gateway_group: 0,
        }
    }

    /// gw-a then gw-b: the group of the `egress: 'true'` selector.
    const BOTH: [[u8; 4]; 2] = [[10, 0, 0, 10], [10, 0, 0, 11]];

    fn group_id(group: &[[u8; 4]]) -> u32 {
        let list: Vec<Ipv4Addr> = group.iter().map(|&o| Ipv4Addr::from(o)).collect();
        crate::gateways::assign_group_ids([(list.as_slice(), 0)])[&(list, 0)]
    }

    /// A steered entry: through `group`'s first candidate, with `group`'s id.
    fn steered(egress: &str, group: &[[u8; 4]], pod_node: [u8; 4]) -> PolicyValue {
        PolicyValue {
            gateway_group: group_id(group),
            ..value(egress, group[0], pod_node)
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
                steered(egress, &BOTH, [10, 0, 0, 1]),
                "{gateway}"
            );
            assert_eq!(on_gw.egress_ips, BTreeMap::from([(ip(egress), ifindex)]));
            let summary = &on_gw.policies["p"];
            assert_eq!(summary.egress_ip, Some(ip(egress)));
            assert_eq!(summary.gateway_nodes, [GW]);
            assert_eq!(summary.candidate_nodes, [[GW, "gw-b"]]);
            assert_eq!(summary.matched_pods, 1);
            assert_eq!(summary.problem, None);

            // Same interfaces on a worker: it is not the gateway, so no egress IP.
            let on_worker = desired_state(&inv, "w1", &gw_network());
            assert_eq!(
                on_worker.policy_entries[&key],
                steered("0.0.0.0", &BOTH, [10, 0, 0, 1])
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
            assert_eq!(v, steered("0.0.0.0", &BOTH, [10, 0, 0, 1]));
            assert!(s.egress_ips.is_empty());
            assert_eq!(s.policies["p"].problem, Some(problem));
            // Its probers must fail over: it cannot translate.
            assert!(!s.self_serving);
            assert!(desired_state(&inv, "w1", &gw_network()).self_serving);
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
                steered("0.0.0.0", &BOTH, node_ip)
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
        let p = "metadata: {name: p}\nspec:\n  selectors: [{podSelector: {matchLabels: {app: web}}}]\n  destinationCIDRs: [203.0.113.0/24]\n  excludedCIDRs: [203.0.113.0/24]\n  egressGateway: {nodeSelector: {matchLabels: {egress: 'true'}}}\n";
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
        let steering = |s: &DesiredState| -> Vec<(Ipv4, u32)> {
            s.policy_entries
                .values()
                .map(|v| (v.gateway_ip, v.gateway_group))
                .collect()
        };
        // Every node computes the same gateways and groups.
        assert_eq!(steering(&on_w1), steering(&on_a));
        assert_eq!(steering(&on_w1), steering(&on_b));
        // A pod ranks the entries with candidates (the missing one is skipped): gw-a then
        // gw-b, or gw-b then gw-a; both orders occur.
        let (a, b) = ([10, 0, 0, 10], [10, 0, 0, 11]);
        let groups = BTreeMap::from([
            (group_id(&[a, b]), vec![ip("10.0.0.10"), ip("10.0.0.11")]),
            (group_id(&[b, a]), vec![ip("10.0.0.11"), ip("10.0.0.10")]),
        ]);
        assert_eq!(on_w1.gateway_groups, groups);
        for v in on_w1.policy_entries.values() {
            assert_eq!(v.gateway_ip, groups[&v.gateway_group][0].octets());
        }
        let used: BTreeSet<Ipv4> = on_w1
            .policy_entries
            .values()
            .map(|v| v.gateway_ip)
            .collect();
        assert_eq!(used, BTreeSet::from([a, b]));
        let summary = &on_w1.policies["fleet"];
        assert_eq!(summary.gateway_nodes, ["gw-a", "gw-b"]);
        assert_eq!(
            summary.candidate_nodes,
            [vec!["gw-a"], vec![], vec!["gw-b"]]
        );
        assert_eq!(
            summary.problem,
            Some(PolicyProblem::GatewaySpecWithoutNode(1))
        );
        // Each gateway is a candidate of every pod (first or as the fallback), so it sets
        // its egress IP on every entry; the worker on none.
        for s in [&on_a, &on_b] {
            for v in s.policy_entries.values() {
                assert_eq!(Ipv4Addr::from(v.egress_ip), ip("192.0.2.200"));
            }
            assert_eq!(s.egress_ips, BTreeMap::from([(ip("192.0.2.200"), 3)]));
        }
        assert!(on_w1.policy_entries.values().all(|v| v.egress_ip == [0; 4]));
    }

    #[test]
    fn candidates_are_every_matching_node_with_an_ip_by_name() {
        let mut inv = inventory(&[&simple(
            "p",
            "web",
            "203.0.113.0/24",
            "{nodeSelector: {matchLabels: {egress: 'true'}}}",
        )]);
        inv.upsert_node(node("gw-c", Some([10, 0, 0, 12]), &[("egress", "true")]));
        inv.upsert_node(node("gw-0", None, &[("egress", "true")]));
        let s = desired_state(&inv, "w1", &LocalNetwork::default());
        let summary = &s.policies["p"];
        assert_eq!(summary.candidate_nodes, [["gw-a", "gw-b", "gw-c"]]);
        // As in Cilium, the first by name is the gateway while all are healthy.
        assert_eq!(summary.gateway_nodes, ["gw-a"]);
        let all = [[10, 0, 0, 10], [10, 0, 0, 11], [10, 0, 0, 12]];
        assert_eq!(
            s.policy_entries[&(ip("10.1.1.1"), net("203.0.113.0/24"))],
            steered("0.0.0.0", &all, [10, 0, 0, 1])
        );
        assert_eq!(
            s.gateway_groups,
            BTreeMap::from([(group_id(&all), all.map(Ipv4Addr::from).to_vec())])
        );
    }

    #[test]
    fn a_candidate_that_is_not_first_translates_for_the_group() {
        let gateway = |interface: &str| {
            let spec = format!(
                "{{nodeSelector: {{matchLabels: {{egress: 'true'}}}}, interface: {interface}}}"
            );
            inventory(&[&simple("p", "web", "203.0.113.0/24", &spec)])
        };
        let key = (ip("10.1.1.1"), net("203.0.113.0/24"));
        let on_b = desired_state(&gateway("eth1"), "gw-b", &gw_network());
        // gw-a stays the gateway; gw-b translates what fails over to it.
        assert_eq!(
            on_b.policy_entries[&key],
            steered("192.0.2.200", &BOTH, [10, 0, 0, 1])
        );
        assert_eq!(on_b.egress_ips, BTreeMap::from([(ip("192.0.2.200"), 3)]));
        let summary = &on_b.policies["p"];
        assert_eq!(
            (summary.egress_ip, &summary.problem),
            (Some(ip("192.0.2.200")), &None)
        );
        assert!(on_b.self_serving);

        let broken = desired_state(&gateway("eth9"), "gw-b", &gw_network());
        assert_eq!(
            broken.policy_entries[&key],
            steered("0.0.0.0", &BOTH, [10, 0, 0, 1])
        );
        assert!(broken.egress_ips.is_empty());
        assert_eq!(
            broken.policies["p"].problem,
            Some(PolicyProblem::InterfaceNotFound("eth9".into()))
        );
        assert!(!broken.self_serving);
    }

    /// A small deterministic generator (splitmix64) for the randomized tests.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % n as u64) as usize
        }
    }

    /// Random pods and 2-5 `egressGateways` entries of 1-3 nodes each; every entry's nodes
    /// then leave the inventory in turn. Exactly the pods whose first entry it was change
    /// gateway, each to the first candidate of its old group still there (what the
    /// datapath's failover by health picks), and every other pod keeps its gateway.
    #[test]
    fn an_entry_leaving_the_inventory_moves_only_its_pods() {
        let mut rng = Rng(2024);
        let mut total_moved = 0;
        for seed in 0..40 {
            let entries = 2 + rng.below(4);
            let mut inv = Inventory::default();
            inv.upsert_node(node("w1", Some([10, 0, 1, 1]), &[]));
            let mut spec = String::new();
            for entry in 0..entries {
                for n in 0..=rng.below(3) {
                    let name = format!("e{entry}-{n}");
                    let octets = [10, 0, 2 + entry as u8, n as u8];
                    inv.upsert_node(node(&name, Some(octets), &[("entry", &entry.to_string())]));
                }
                spec += &format!("  - {{nodeSelector: {{matchLabels: {{entry: '{entry}'}}}}}}\n");
            }
            inv.upsert_policy(policy(&format!(
                "metadata: {{name: p}}\nspec:\n  selectors: [{{podSelector: {{}}}}]\n  destinationCIDRs: [0.0.0.0/0]\n  egressGateway: {{nodeSelector: {{matchLabels: {{entry: '0'}}}}}}\n  egressGateways:\n{spec}"
            )));
            for i in 0..40u8 {
                let name = format!("p{seed}-{i}-{}", rng.below(1 << 20));
                inv.upsert_pod(pod("default", &name, "w1", [10, 1, seed, i], &[]));
            }
            let before = desired_state(&inv, "w1", &LocalNetwork::default());
            for removed in 0..entries {
                let mut inv = inv.clone();
                inv.nodes
                    .retain(|name, _| !name.starts_with(&format!("e{removed}-")));
                let gone = |gateway: Ipv4| gateway[2] == 2 + removed as u8;
                let after = desired_state(&inv, "w1", &LocalNetwork::default());
                assert_eq!(
                    after.policies["p"].problem,
                    Some(PolicyProblem::GatewaySpecWithoutNode(removed))
                );
                let mut moved = 0;
                for (key, old) in &before.policy_entries {
                    let new = after.policy_entries[key];
                    assert_eq!(new.gateway_ip != old.gateway_ip, gone(old.gateway_ip));
                    let next = before.gateway_groups[&old.gateway_group]
                        .iter()
                        .map(Ipv4Addr::octets)
                        .find(|candidate| !gone(*candidate));
                    assert_eq!(Some(new.gateway_ip), next, "seed {seed}, {key:?}");
                    moved += usize::from(gone(old.gateway_ip));
                }
                assert!(
                    moved < 40,
                    "seed {seed}: every pod ranked entry {removed} first"
                );
                total_moved += moved;
            }
        }
        assert!(total_moved > 1000, "{total_moved}");
    }

    #[test]
    fn group_ids_are_the_same_on_every_node_and_across_reconciles() {
        let p = simple(
            "p",
            "web",
            "203.0.113.0/24",
            "{nodeSelector: {matchLabels: {egress: 'true'}}}",
        );
        let inv = inventory(&[&p]);
        let key = (ip("10.1.1.1"), net("203.0.113.0/24"));
        let id = group_id(&BOTH);
        assert_ne!(id, 0);
        for node in ["w1", "w2", GW, "gw-b", "not-in-the-inventory"] {
            let s = desired_state(&inv, node, &gw_network());
            assert_eq!(s.policy_entries[&key].gateway_group, id, "{node}");
            assert_eq!(s.gateway_groups.keys().collect::<Vec<_>>(), [&id]);
        }
        // Another policy and its group come along: the first group keeps its id.
        let q = simple(
            "q",
            "db",
            "198.51.100.0/24",
            "{nodeSelector: {matchLabels: {kubernetes.io/hostname: gw-b}}}",
        );
        let s = desired_state(&inventory(&[&p, &q]), "w1", &LocalNetwork::default());
        assert_eq!(s.policy_entries[&key].gateway_group, id);
        assert_eq!(
            s.policy_entries[&(ip("10.1.2.1"), net("198.51.100.0/24"))].gateway_group,
            group_id(&[[10, 0, 0, 11]])
        );
        assert_eq!(s.gateway_groups.len(), 2);
    }

    #[test]
    fn draining_nodes_stay_candidates_and_are_flagged() {
        let mut inv = inventory(&[&simple(
            "p",
            "web",
            "203.0.113.0/24",
            "{nodeSelector: {matchLabels: {egress: 'true'}}}",
        )]);
        let mut gw_b = inv.nodes["gw-b"].clone();
        gw_b.labels.insert(DRAINING_LABEL.into(), "true".into());
        inv.upsert_node(gw_b);
        let mut w1 = inv.nodes["w1"].clone();
        w1.unschedulable = true;
        inv.upsert_node(w1);

        let s = desired_state(&inv, "w1", &LocalNetwork::default());
        assert!(s.self_draining);
        assert_eq!(s.policies["p"].candidate_nodes, [[GW, "gw-b"]]);
        assert_eq!(
            s.policy_entries[&(ip("10.1.1.1"), net("203.0.113.0/24"))],
            steered("0.0.0.0", &BOTH, [10, 0, 0, 1])
        );
        let flags: Vec<(&str, bool)> = s
            .probe_targets
            .values()
            .map(|t| (t.node.as_str(), t.draining))
            .collect();
        assert_eq!(flags, [(GW, false), ("gw-b", true)]);
        assert!(desired_state(&inv, "gw-b", &gw_network()).self_draining);
        assert!(!desired_state(&inv, GW, &gw_network()).self_draining);
    }

    #[test]
    fn probe_targets_are_the_groups_of_local_pods_never_this_node() {
        let web = simple(
            "web",
            "web",
            "203.0.113.0/24",
            "{nodeSelector: {matchLabels: {egress: 'true'}}}",
        );
        let db = simple(
            "db",
            "db",
            "203.0.113.0/24",
            "{nodeSelector: {matchLabels: {kubernetes.io/hostname: w1}}}",
        );
        let mut inv = inventory(&[&web, &db]);
        inv.nodes.get_mut("w1").unwrap().labels = labels(&[("kubernetes.io/hostname", "w1")]);
        inv.upsert_pod(pod(
            "default",
            "web-2",
            GW,
            [10, 1, 10, 1],
            &[("app", "web")],
        ));
        let probed = |node: &str| -> BTreeMap<Ipv4Addr, String> {
            desired_state(&inv, node, &gw_network())
                .probe_targets
                .into_iter()
                .map(|(ip, t)| (ip, t.node))
                .collect()
        };
        let target = |name: &str| (inv.nodes[name].internal_ip.unwrap(), name.to_owned());
        // w1 runs web: it probes web's group, not db's (db runs on w2; w1 is db's gateway).
        assert_eq!(probed("w1"), BTreeMap::from([target(GW), target("gw-b")]));
        assert_eq!(probed("w2"), BTreeMap::from([target("w1")]));
        // gw-a runs web-2: it probes the rest of web's group, never itself.
        assert_eq!(probed(GW), BTreeMap::from([target("gw-b")]));
        // No selected pods, but web's second candidate: it probes the other one (it writes
        // web's status while that one is down).
        assert_eq!(probed("gw-b"), BTreeMap::from([target(GW)]));
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
            // Both policies use one group, and web (10.1.1.1) runs here on w1: the group
            // and the probe targets stay while a pod needs them.
            let group = BTreeMap::from([(group_id(&BOTH), BOTH.map(Ipv4Addr::from).to_vec())]);
            let expect_groups = if kept.is_empty() {
                BTreeMap::new()
            } else {
                group
            };
            assert_eq!(s.gateway_groups, expect_groups, "capacity {capacity}");
            let probed: Vec<Ipv4Addr> = s.probe_targets.keys().copied().collect();
            let expect_probed = if kept.contains(&"10.1.1.1") {
                BOTH.map(Ipv4Addr::from).to_vec()
            } else {
                Vec::new()
            };
            assert_eq!(probed, expect_probed, "capacity {capacity}");
            // Nothing else changes.
            assert_eq!(
                DesiredState {
                    policy_entries: full.policy_entries.clone(),
                    gateway_groups: full.gateway_groups.clone(),
                    probe_targets: full.probe_targets.clone(),
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
