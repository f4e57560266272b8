//! Floating egress IPs: connections that survive a gateway failover.
//!
//! A policy annotated [`FLOATING_EGRESS_IP_ANNOTATION`] `"true"` has one gateway spec whose
//! `egressIP` is on no node: it floats between the spec's candidates, and the one holding it
//! (a candidate whose own probes find every candidate before it, by name, down) adds it to
//! its interface and announces it. Translation moves off the gateway:
//!
//! - **The pod's node translates**, with ports from its own block of the egress IP's NAT
//!   range ([`PORT_BLOCK_SIZE`] ports; `OWN_PORT_BLOCKS`). The translation lives where the
//!   flow starts, so it outlives any gateway: when the holder fails, the next candidate
//!   takes the address, and the same (egress IP, port) keeps reaching the same pod.
//! - **Any candidate only forwards**: it sends out what a pod's node translated, and maps a
//!   reply's destination port to the node owning that port's block (`PORT_BLOCK_OWNERS`).
//!   It keeps no per-flow state, so there is nothing to replicate between candidates but
//!   the block table, which every node computes from the inventory alone.
//!
//! This is the "stateless gateway" design of the failover issue; the other one, replicating
//! every translation from the active gateway to its standbys, needs an acknowledged stream
//! per new flow and still loses the flows of its last unacknowledged moment.
//!
//! What the control plane hands the datapath, per node:
//! - on every node: pod entries of floating policies carry the egress IP (the pod's node
//!   translates), and the group flag [`GROUP_POD_NODE_TRANSLATES`];
//! - on a node running such pods: its block of each egress IP ([`DesiredState::own_port_blocks`]);
//! - on each candidate: the whole block table ([`DesiredState::port_block_owners`]), policy
//!   entries keyed by the egress IP (the destinations a translated packet may be forwarded
//!   to: never an open relay), and [`FloatingIp`]: where to add the address, and which
//!   candidates come before it.
//!
//! Blocks are assigned by [`assign_port_blocks`]: deterministic from the set of nodes that
//! need one, and moving few other nodes when one joins or leaves (a moved node's established
//! flows break: their replies reach the block's new owner).
//!
//! [`DesiredState::own_port_blocks`]: crate::desired::DesiredState::own_port_blocks
//! [`DesiredState::port_block_owners`]: crate::desired::DesiredState::port_block_owners

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

pub use egress_common::gateway::PORT_BLOCK_SIZE;
use egress_common::{
    config::{DEFAULT_NAT_PORT_MAX, DEFAULT_NAT_PORT_MIN},
    gateway::GROUP_POD_NODE_TRANSLATES,
    policy::{GATEWAY_EXCLUDED, GATEWAY_NONE, PolicyValue},
};
use ipnet::Ipv4Net;

pub use crate::inventory::policy::FLOATING_EGRESS_IP_ANNOTATION;
use crate::{
    desired::{DesiredState, LocalInterface, LocalNetwork, PolicyProblem},
    gateways::{Candidate, GroupInterner, fnv1a, mix64, spec_candidates},
    inventory::{EgressSource, Inventory, Pod, PodIndex, Policy},
};

/// The NAT source ports, inclusive (the agent's `--nat-port-range`). Floating egress IPs
/// split it into blocks; every node must be given the same range, or their block tables
/// disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatPorts {
    pub min: u16,
    pub max: u16,
}

impl Default for NatPorts {
    /// The agent's default, 1024-32767: 496 blocks.
    fn default() -> Self {
        Self {
            min: DEFAULT_NAT_PORT_MIN,
            max: DEFAULT_NAT_PORT_MAX,
        }
    }
}

impl NatPorts {
    /// Whole blocks of [`PORT_BLOCK_SIZE`] ports in the range (a last partial block is not
    /// used: every block has the same size, so a port's block is `(port - min) / size`).
    pub fn blocks(self) -> u16 {
        if self.max < self.min {
            return 0;
        }
        let ports = u32::from(self.max) - u32::from(self.min) + 1;
        (ports / u32::from(PORT_BLOCK_SIZE)) as u16
    }

    /// Block `block`'s (first port, count); `block` must be below [`NatPorts::blocks`].
    pub fn block_ports(self, block: u16) -> (u16, u16) {
        debug_assert!(block < self.blocks());
        (self.min + block * PORT_BLOCK_SIZE, PORT_BLOCK_SIZE)
    }
}

/// A floating egress IP this node is a candidate of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FloatingIp {
    /// The interface the address goes on when this node holds it: the spec's `interface`,
    /// or the default route's.
    pub ifindex: u32,
    pub interface: String,
    /// Underlay addresses of the candidates ahead of this node (by name): this node holds
    /// the address when its own probes find every one of them down. They are among
    /// [`DesiredState::probe_targets`](crate::desired::DesiredState::probe_targets).
    pub candidates_before: Vec<Ipv4Addr>,
}

/// A node's starting block: splitmix64's finalizer over FNV-1a of its name (FNV-1a alone
/// spreads names that differ in their last characters poorly), the same on every node and
/// in every release.
pub fn block_hash(node_name: &str) -> u64 {
    mix64(fnv1a(&[node_name.as_bytes()]))
}

/// Who holds which block of one egress IP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortBlockTable {
    /// Node name -> block index.
    pub blocks: BTreeMap<String, u16>,
    /// Nodes left without a block (there were more nodes than blocks), by name.
    pub without: Vec<String>,
}

/// Gives each of `nodes` (names; order and duplicates do not matter) one of `blocks`
/// blocks: in order of name, each takes the first free block from `block_hash % blocks`
/// on (linear probing, wrapping). With more nodes than blocks, the last ones by name get
/// none.
///
/// The table depends on the set of names alone, so every node computes the same one. When
/// a node X joins, the nodes before it by name keep their blocks, X takes a block b, and a
/// node after X moves only if its block was b, to the next free block on, which may move
/// one more the same way: the moved nodes are all after X by name, all in the run of
/// consecutive taken blocks at b, and each moves forward within it; X leaving undoes
/// exactly that. At 200 nodes in 496 blocks, a join or leave moves no other node about
/// three times in four, 0.4 nodes on average, 6 at worst in 2,000 random trials (the tests
/// measure it); a node that sorts after all others never moves anyone.
pub fn assign_port_blocks<'n>(
    nodes: impl IntoIterator<Item = &'n str>,
    blocks: u16,
) -> PortBlockTable {
    let names: BTreeSet<&str> = nodes.into_iter().collect();
    let mut taken = vec![false; usize::from(blocks)];
    let mut table = PortBlockTable::default();
    for name in names {
        if table.blocks.len() == usize::from(blocks) {
            table.without.push(name.to_owned());
            continue;
        }
        let mut block = (block_hash(name) % u64::from(blocks)) as usize;
        while taken[block] {
            block = (block + 1) % usize::from(blocks);
        }
        taken[block] = true;
        table.blocks.insert(name.to_owned(), block as u16);
    }
    table
}

/// The interface a floating egress IP goes on: `interface`, or the default route's; it
/// must exist and be up, and needs no address.
pub(crate) fn holding_interface<'l>(
    interface: Option<&str>,
    local: &'l LocalNetwork,
) -> Result<&'l LocalInterface, PolicyProblem> {
    let found = if let Some(name) = interface {
        local
            .interfaces
            .iter()
            .find(|i| i.name == name)
            .ok_or_else(|| PolicyProblem::InterfaceNotFound(name.to_owned()))?
    } else {
        local.default_route_interface()?
    };
    if found.up {
        Ok(found)
    } else {
        Err(PolicyProblem::InterfaceDown(found.name.clone()))
    }
}

/// One floating egress IP: the spec it floats with, and its block table.
struct Float<'a> {
    /// The first policy by name that floats it with candidates: its spec is the IP's.
    policy: &'a str,
    candidates: Vec<Candidate<'a>>,
    interface: Option<&'a str>,
    table: PortBlockTable,
    /// InternalIP of each node of the table.
    node_ips: BTreeMap<&'a str, Ipv4Addr>,
}

/// What a floating policy is.
enum PolicyFloat {
    /// Programmed, floating this IP.
    Floats(Ipv4Addr),
    /// No candidate: dropped like any policy without a gateway node.
    NoCandidates,
    /// Its IP already floats with another spec, or it is a plain policy naming a floating
    /// IP: not programmed (its pods' traffic is dropped), with this problem.
    Refused(PolicyProblem),
}

/// The floating egress IPs of the inventory, computed once per [`desired_state`] before the
/// policies are evaluated (the block table needs every floating policy's pods).
///
/// [`desired_state`]: crate::desired::desired_state
pub(crate) struct Plan<'a> {
    nat_ports: NatPorts,
    floats: BTreeMap<Ipv4Addr, Float<'a>>,
    /// Floating policies by name.
    policies: BTreeMap<&'a str, PolicyFloat>,
    /// Names of the nodes running each floating policy's pods.
    pod_nodes: BTreeMap<&'a str, BTreeSet<&'a str>>,
}

impl<'a> Plan<'a> {
    /// Finds each floating IP's spec and the nodes that need one of its blocks: those
    /// running a pod that a policy floating it selects (and that have an InternalIP, the
    /// address a block's owner is reached at).
    pub(crate) fn new(inv: &'a Inventory, pods: &PodIndex<'a>, nat_ports: NatPorts) -> Self {
        let mut plan = Plan {
            nat_ports,
            floats: BTreeMap::new(),
            policies: BTreeMap::new(),
            pod_nodes: BTreeMap::new(),
        };
        let mut needing: BTreeMap<Ipv4Addr, BTreeMap<&'a str, Ipv4Addr>> = BTreeMap::new();
        for policy in inv.policies.values() {
            let Some((ip, interface)) = policy.floating_egress() else {
                continue;
            };
            let name = policy.name.as_str();
            let candidates = spec_candidates(inv, &policy.gateways[0].node_selector);
            if candidates.is_empty() {
                plan.policies.insert(name, PolicyFloat::NoCandidates);
                continue;
            }
            if let Some(float) = plan.floats.get(&ip) {
                let same = float.interface == interface
                    && float
                        .candidates
                        .iter()
                        .map(|c| c.ip)
                        .eq(candidates.iter().map(|c| c.ip));
                if !same {
                    let problem = PolicyProblem::FloatingEgressIpTaken {
                        egress_ip: ip,
                        policy: float.policy.to_owned(),
                    };
                    plan.policies.insert(name, PolicyFloat::Refused(problem));
                    continue;
                }
            } else {
                let float = Float {
                    policy: name,
                    candidates,
                    interface,
                    table: PortBlockTable::default(),
                    node_ips: BTreeMap::new(),
                };
                plan.floats.insert(ip, float);
            }
            plan.policies.insert(name, PolicyFloat::Floats(ip));
            let nodes = plan.pod_nodes.entry(name).or_default();
            for pod in pods.matching_pods(policy) {
                let Some(node) = pod.node_name.as_deref().and_then(|n| inv.nodes.get(n)) else {
                    continue;
                };
                nodes.insert(node.name.as_str());
                if let Some(node_ip) = node.internal_ip {
                    needing
                        .entry(ip)
                        .or_default()
                        .insert(node.name.as_str(), node_ip);
                }
            }
        }
        // A plain policy naming a floating IP would translate to the ports the pods' nodes
        // use: refused.
        for policy in inv.policies.values() {
            if policy.floating_egress().is_some() {
                continue;
            }
            let floating = policy.gateways.iter().find_map(|spec| match spec.egress {
                EgressSource::Ip(ip) => plan.floats.get(&ip).map(|float| (ip, float.policy)),
                _ => None,
            });
            if let Some((egress_ip, owner)) = floating {
                let problem = PolicyProblem::EgressIpFloats {
                    egress_ip,
                    policy: owner.to_owned(),
                };
                plan.policies
                    .insert(policy.name.as_str(), PolicyFloat::Refused(problem));
            }
        }
        let blocks = nat_ports.blocks();
        for (ip, float) in &mut plan.floats {
            let node_ips = needing.remove(ip).unwrap_or_default();
            float.table = assign_port_blocks(node_ips.keys().copied(), blocks);
            float.node_ips = node_ips;
        }
        plan
    }

    /// The problem that refuses a floating policy, if any; its pods are not steered
    /// ([`Plan::pod_value`] drops their traffic) and its gateways serve nothing.
    pub(crate) fn refusal(&self, policy: &Policy) -> Option<&PolicyProblem> {
        match self.policies.get(policy.name.as_str()) {
            Some(PolicyFloat::Refused(problem)) => Some(problem),
            _ => None,
        }
    }

    /// The group flags of a policy's groups.
    pub(crate) fn group_flags(&self, policy: &Policy) -> u32 {
        match self.policies.get(policy.name.as_str()) {
            Some(PolicyFloat::Floats(_)) => GROUP_POD_NODE_TRANSLATES,
            _ => 0,
        }
    }

    /// A pod's value for its destinations, from the steering's `value`: a floating policy's
    /// pods translate on their own node, so every node's entry carries the egress IP; a pod
    /// whose node has no block (blocks exhausted, or the node unknown or without an
    /// InternalIP) cannot translate, and its traffic is dropped (`GATEWAY_NONE`), never sent
    /// with the node's own address.
    pub(crate) fn pod_value(&self, policy: &Policy, pod: &Pod, value: PolicyValue) -> PolicyValue {
        let drop = PolicyValue {
            gateway_ip: GATEWAY_NONE,
            pod_node_ip: value.pod_node_ip,
            ..PolicyValue::default()
        };
        match self.policies.get(policy.name.as_str()) {
            None | Some(PolicyFloat::NoCandidates) => value,
            Some(PolicyFloat::Refused(_)) => drop,
            Some(PolicyFloat::Floats(ip)) => {
                let node = pod.node_name.as_deref().unwrap_or_default();
                if self.floats[ip].table.blocks.contains_key(node) {
                    PolicyValue {
                        egress_ip: ip.octets(),
                        ..value
                    }
                } else {
                    drop
                }
            }
        }
    }

    /// `PortBlocksExhausted` when some of the policy's pods run on nodes left without a
    /// block.
    pub(crate) fn exhaustion(&self, policy: &Policy) -> Option<PolicyProblem> {
        let Some(PolicyFloat::Floats(ip)) = self.policies.get(policy.name.as_str()) else {
            return None;
        };
        let table = &self.floats[ip].table;
        let nodes = self.pod_nodes.get(policy.name.as_str())?;
        table
            .without
            .iter()
            .any(|node| nodes.contains(node.as_str()))
            .then(|| PolicyProblem::PortBlocksExhausted {
                egress_ip: *ip,
                nodes_without: table.without.len(),
                blocks: self.nat_ports.blocks(),
            })
    }

    /// On a candidate of the policy's floating IP, the entries keyed by the egress IP: what
    /// the candidate may forward once a pod's node translated it (the policy's
    /// destinations), and what it may not (its exclusions). `(key, value, excluded)`, as
    /// pod entries are merged; empty elsewhere.
    pub(crate) fn gateway_entries(
        &self,
        policy: &Policy,
        node_name: &str,
        groups: &mut GroupInterner,
    ) -> Vec<((Ipv4Addr, Ipv4Net), PolicyValue, bool)> {
        let Some(PolicyFloat::Floats(ip)) = self.policies.get(policy.name.as_str()) else {
            return Vec::new();
        };
        let float = &self.floats[ip];
        if !float.candidates.iter().any(|c| c.node.name == node_name) {
            return Vec::new();
        }
        let forward = PolicyValue {
            egress_ip: ip.octets(),
            gateway_ip: float.candidates[0].ip.octets(),
            pod_node_ip: Ipv4Addr::UNSPECIFIED.octets(),
            gateway_group: groups.intern(&float.candidates, GROUP_POD_NODE_TRANSLATES),
        };
        let excluded = PolicyValue {
            gateway_ip: GATEWAY_EXCLUDED,
            ..PolicyValue::default()
        };
        let destinations = policy
            .destination_cidrs
            .iter()
            .map(|&cidr| ((*ip, cidr), forward, false));
        let exclusions = policy
            .excluded_cidrs
            .iter()
            .map(|&cidr| ((*ip, cidr), excluded, true));
        destinations.chain(exclusions).collect()
    }

    /// Fills this node's blocks, and on candidates the block tables and the floating IPs
    /// it may hold (where their interface resolves; the policy reports it otherwise).
    pub(crate) fn finish(&self, state: &mut DesiredState, node_name: &str, local: &LocalNetwork) {
        for (ip, float) in &self.floats {
            if let Some(&block) = float.table.blocks.get(node_name) {
                state
                    .own_port_blocks
                    .insert(*ip, self.nat_ports.block_ports(block));
            }
            let Some(position) = float
                .candidates
                .iter()
                .position(|c| c.node.name == node_name)
            else {
                continue;
            };
            for (node, &block) in &float.table.blocks {
                let owner = float.node_ips[node.as_str()];
                state.port_block_owners.insert((*ip, block), owner);
            }
            if let Ok(interface) = holding_interface(float.interface, local) {
                let floating = FloatingIp {
                    ifindex: interface.ifindex,
                    interface: interface.name.clone(),
                    candidates_before: float.candidates[..position].iter().map(|c| c.ip).collect(),
                };
                state.floating_ips.insert(*ip, floating);
            }
        }
    }
}

#[cfg(test)]
mod tests;
