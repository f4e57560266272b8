//! One reconcile: the latest snapshot of the cluster and the node's interfaces in, the
//! datapath's map contents and TCX attachments out, by diff, and a [`Report`] of what was done.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Instant,
};

use egress_common::{
    config::DatapathConfig,
    gateway::{GATEWAY_GROUP_MAP_SIZE, OWN_PORT_BLOCK_MAP_SIZE, PORT_BLOCK_OWNER_MAP_SIZE},
    map_names,
};
use egress_control::{
    desired::{self, DesiredState, LocalInterface, LocalNetwork, PolicyConflict, PolicyMapFit},
    floating::NatPorts,
};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    chain::Chain,
    config::{AgentConfig, ProbeResponder},
    datapath::{Attachment, Datapath, Hook, MapContents, check_capacity},
    floating::FloatingTarget,
    health::{Target, Targets},
    netlink,
    report::Report,
    say_once::SayOnce,
    source::{Refusal, Snapshot},
};

/// Turns snapshots into datapath state; keeps what it last wrote and last said.
pub struct Reconciler<'a> {
    config: &'a AgentConfig,
    tunnel_ifindex: u32,
    tunnel_mss: u16,
    report: watch::Sender<Arc<Report>>,
    snapshot: Arc<Snapshot>,
    /// The node's interfaces at the last reconcile.
    last_network: Option<netlink::Snapshot>,
    /// The datapath config as last written.
    written_config: Option<DatapathConfig>,
    /// `published` of the last snapshot programmed, to time each snapshot only once.
    last_programmed: Option<Instant>,
    /// Whom the gateway prober probes, as the last reconcile found.
    probe_targets: Arc<Mutex<Targets>>,
    said: Said,
}

/// What was last logged about each kind of problem: each is said once per change.
#[derive(Default)]
struct Said {
    refusals: SayOnce<Vec<Refusal>>,
    warnings: SayOnce<Vec<Refusal>>,
    node_missing: SayOnce<bool>,
    /// Local pods without a host interface yet.
    unwired_pods: SayOnce<BTreeSet<Ipv4Addr>>,
    /// Each policy's problem.
    policy_problems: SayOnce<BTreeMap<String, Option<String>>>,
    /// Each dual-stack policy's IPv6 CIDRs, not programmed.
    ipv6_not_programmed: SayOnce<BTreeMap<String, Vec<ipnet::Ipv6Net>>>,
    /// Pairs of conflicting policies, (winner, loser): a changed entry count is no news.
    conflicts: SayOnce<Vec<(String, String)>>,
    policy_map_fit: SayOnce<PolicyMapFit>,
    /// Map writes that failed in the last sync, one line per map.
    map_failures: SayOnce<Vec<String>>,
    summary: SayOnce<String>,
    /// `--probe-responder xdp` on a candidate where no interface holds the node's address.
    xdp_without_underlay: SayOnce<bool>,
}

impl<'a> Reconciler<'a> {
    pub fn new(
        config: &'a AgentConfig,
        tunnel_ifindex: u32,
        tunnel_mtu: u32,
        report: watch::Sender<Arc<Report>>,
        snapshot: Arc<Snapshot>,
        probe_targets: Arc<Mutex<Targets>>,
    ) -> Self {
        let mut reconciler = Reconciler {
            config,
            tunnel_ifindex,
            // IPv4 and TCP headers without options: 40 bytes.
            tunnel_mss: u16::try_from(tunnel_mtu.saturating_sub(40)).unwrap_or(u16::MAX),
            report,
            snapshot: Arc::clone(&snapshot),
            last_network: None,
            written_config: None,
            last_programmed: None,
            probe_targets,
            said: Said::default(),
        };
        reconciler.set_snapshot(snapshot);
        reconciler
    }

    /// Takes a new snapshot for the next reconcile; logs its refused objects once per change.
    pub fn set_snapshot(&mut self, snapshot: Arc<Snapshot>) {
        if self
            .said
            .refusals
            .update(snapshot.refused.clone())
            .is_some()
        {
            for refusal in &snapshot.refused {
                error!("{}", refusal.message);
            }
        }
        if self
            .said
            .warnings
            .update(snapshot.warnings.clone())
            .is_some()
        {
            for warning in &snapshot.warnings {
                warn!("{}", warning.message);
            }
        }
        self.snapshot = snapshot;
    }

    /// Whether the node's interfaces differ from those of the last reconcile.
    pub fn network_changed(&self, network: &netlink::Snapshot) -> bool {
        self.last_network.as_ref() != Some(network)
    }

    pub fn reconcile(&mut self, datapath: &mut Datapath, network: netlink::Snapshot) {
        self.program(datapath, &network);
        self.last_network = Some(network);
    }

    fn program(&mut self, datapath: &mut Datapath, network: &netlink::Snapshot) {
        let started = Instant::now();
        let config = self.config;
        let inventory = &self.snapshot.inventory;
        let node_ip = inventory
            .nodes
            .get(&config.node_name)
            .and_then(|node| node.internal_ip);
        let Some(node_ip) = node_ip else {
            if self.said.node_missing.update(true).is_some() {
                warn!(
                    node = config.node_name,
                    "this node is not in the inventory (or has no InternalIP): the datapath \
                     keeps its last programming until it is"
                );
            }
            // Its floating egress IPs are let go: the other nodes no longer accept its tunnel.
            self.probe_targets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .floating
                .clear();
            return;
        };
        if self.said.node_missing.update(false).is_some() {
            info!(
                node = config.node_name,
                "this node is back in the inventory"
            );
        }
        let datapath_config = DatapathConfig {
            node_ip: node_ip.octets(),
            tunnel_ifindex: self.tunnel_ifindex,
            nat_port_min: config.nat_ports.min,
            nat_port_max: config.nat_ports.max,
            tunnel_mss: self.tunnel_mss,
            tunnel_port: config.tunnel_port,
        };
        if self.written_config != Some(datapath_config) {
            if let Err(error) = datapath.write_config(datapath_config) {
                error!(error = %Chain(&error), "cannot write the datapath config");
                return;
            }
            self.written_config = Some(datapath_config);
        }
        let local = local_network(network);
        let nat_ports = NatPorts {
            min: config.nat_ports.min,
            max: config.nat_ports.max,
        };
        let mut desired =
            desired::desired_state_with_nat_ports(inventory, &config.node_name, &local, nat_ports);
        self.say_policy_problems(&desired);
        let fit = desired.fit_policy_map(config.map_sizes.policies as usize);
        self.say_policy_map_fit(fit);
        let (contents, attachments) = self.plan(&desired, network, node_ip);
        let xdp_without_underlay = config.probe_responder == ProbeResponder::Xdp
            && is_candidate(&desired, node_ip)
            && !attachments
                .iter()
                .any(|attachment| attachment.hook == Hook::ProbeResponder);
        if self
            .said
            .xdp_without_underlay
            .update(xdp_without_underlay)
            .is_some()
            && xdp_without_underlay
        {
            warn!(
                %node_ip,
                "--probe-responder xdp: no interface holds this node's address, so the TC \
                 program answers the probes"
            );
        }
        let unwired: BTreeSet<Ipv4Addr> = desired
            .local_pods
            .iter()
            .filter(|ip| !contents.local_pods.contains_key(ip))
            .copied()
            .collect();
        if let Some(before) = self.said.unwired_pods.update(unwired.clone()) {
            for pod_ip in unwired.difference(&before) {
                warn!(%pod_ip, "no host interface routes to this local pod yet");
            }
        }
        let sizes = config.map_sizes;
        for (map, used, capacity) in [
            (map_names::POLICIES, contents.policies.len(), sizes.policies),
            (map_names::NODES, contents.nodes.len(), sizes.nodes),
            (
                map_names::CLUSTER_CIDRS,
                contents.cluster_cidrs.len(),
                sizes.cluster,
            ),
            (
                map_names::LOCAL_PODS,
                contents.local_pods.len(),
                sizes.local_pods,
            ),
            (
                map_names::EGRESS_IPS,
                contents.egress_ips.len(),
                sizes.egress_ips,
            ),
            (
                map_names::GATEWAY_GROUPS,
                contents.gateway_groups.len(),
                GATEWAY_GROUP_MAP_SIZE,
            ),
            (
                map_names::OWN_PORT_BLOCKS,
                contents.own_port_blocks.len(),
                OWN_PORT_BLOCK_MAP_SIZE,
            ),
            (
                map_names::PORT_BLOCK_OWNERS,
                contents.port_block_owners.len(),
                PORT_BLOCK_OWNER_MAP_SIZE,
            ),
        ] {
            check_capacity(map, used, capacity);
        }
        // Programs first, entries second: once `bpf egress list` shows a pod's entry, its
        // traffic is already steered (a pod may start sending the moment it sees that).
        let attach_errors = datapath.sync_attachments(&attachments);
        for error in &attach_errors {
            warn!(error = %Chain(&error), "attachment failed");
        }
        // Every map is synced even when another fails; what failed is said once per change.
        let synced = datapath.sync_maps(&contents);
        // After the maps: a floating egress IP is taken only once this node's blocks and
        // forwarding entries are in (and after the fit, which may leave them out).
        self.tell_prober(node_ip, &desired);
        let stats = synced.stats;
        let failures: Vec<String> = synced
            .errors
            .iter()
            .map(|error| Chain(error).to_string())
            .collect();
        if self.said.map_failures.update(failures).is_some() {
            for failure in self.said.map_failures.last() {
                error!(
                    error = failure,
                    failed = stats.failed,
                    "some map entries could not be written (their traffic is not steered, or \
                     not recognised as in-cluster): raise the map's size flag"
                );
            }
        }
        if !self.report.borrow().synced && attach_errors.is_empty() {
            datapath.retire_other_versions();
        }
        let map_entries = BTreeMap::from([
            (map_names::POLICIES, contents.policies.len()),
            (map_names::NODES, contents.nodes.len()),
            (map_names::LOCAL_PODS, contents.local_pods.len()),
            (map_names::CLUSTER_CIDRS, contents.cluster_cidrs.len()),
            (map_names::EGRESS_IPS, contents.egress_ips.len()),
        ]);
        let published = self.snapshot.published;
        let newly_programmed = published.filter(|_| published != self.last_programmed);
        self.last_programmed = published;
        self.report.send_modify(|report| {
            let report = Arc::make_mut(report);
            report.synced = true;
            report.policies = desired.policies.clone();
            report.refused.clone_from(&self.snapshot.refused);
            report.map_entries = map_entries;
            report.reconciles += 1;
            report.last_reconcile = started.elapsed();
            report.last_event_to_programmed = newly_programmed.map(|at| at.elapsed());
            report.snapshot = Arc::clone(&self.snapshot);
            report.policy_entries_dropped = fit.dropped;
            report.map_write_failures = stats.failed;
        });
        let summary = format!(
            "{} policies, {} policy entries, {} local pods, {} egress IPs",
            self.snapshot.inventory.policies.len(),
            contents.policies.len(),
            contents.local_pods.len(),
            contents.egress_ips.len()
        );
        if self.said.summary.update(summary).is_some() || stats.written + stats.deleted > 0 {
            info!(
                written = stats.written,
                deleted = stats.deleted,
                took_us = started.elapsed().as_micros(),
                "datapath in sync: {}",
                self.said.summary.last()
            );
        }
    }

    /// Logs when a policy starts or stops failing (matched traffic is dropped meanwhile), and
    /// each new conflict between policies.
    fn say_policy_problems(&mut self, desired: &DesiredState) {
        let ipv6: BTreeMap<String, Vec<ipnet::Ipv6Net>> = desired
            .policies
            .iter()
            .filter(|(_, summary)| !summary.ipv6_not_programmed.is_empty())
            .map(|(name, summary)| (name.clone(), summary.ipv6_not_programmed.clone()))
            .collect();
        if let Some(before) = self.said.ipv6_not_programmed.update(ipv6) {
            for (name, cidrs) in self.said.ipv6_not_programmed.last() {
                if before.get(name) != Some(cidrs) {
                    warn!(
                        policy = name,
                        ?cidrs,
                        "IPv6 CIDRs are loaded but not programmed (IPv6 is not supported yet); \
                         the policy's IPv4 part is"
                    );
                }
            }
        }
        let problems: BTreeMap<String, Option<String>> = desired
            .policies
            .iter()
            .map(|(name, summary)| {
                (
                    name.clone(),
                    summary.problem.as_ref().map(ToString::to_string),
                )
            })
            .collect();
        if let Some(before) = self.said.policy_problems.update(problems) {
            for (name, problem) in self.said.policy_problems.last() {
                let previous = before.get(name);
                if previous == Some(problem) {
                    continue;
                }
                match problem {
                    Some(problem) => {
                        warn!(policy = name, "{problem}; its matched traffic is dropped");
                    }
                    None if previous.is_some_and(Option::is_some) => {
                        info!(policy = name, "served again");
                    }
                    None => {}
                }
            }
        }
        let pairs = desired
            .conflicts
            .iter()
            .map(|conflict| (conflict.winner.clone(), conflict.loser.clone()))
            .collect();
        if let Some(before) = self.said.conflicts.update(pairs) {
            let new = |conflict: &&PolicyConflict| {
                !before
                    .iter()
                    .any(|(winner, loser)| *winner == conflict.winner && *loser == conflict.loser)
            };
            for conflict in desired.conflicts.iter().filter(new) {
                warn!(
                    winner = conflict.winner,
                    loser = conflict.loser,
                    entries = conflict.entries,
                    "policies select the same pods and destinations; policy {} wins",
                    conflict.winner
                );
            }
        }
    }

    /// Logs a full policy map once per change, not on every reconcile.
    fn say_policy_map_fit(&mut self, fit: PolicyMapFit) {
        let Some(before) = self.said.policy_map_fit.update(fit) else {
            return;
        };
        if fit.dropped > 0 {
            error!(
                wanted = fit.wanted,
                capacity = self.config.map_sizes.policies,
                dropped = fit.dropped,
                dropped_pods = fit.dropped_pods,
                "the policy map is full: {} policy entries of {} pods are not programmed and \
                 their traffic is not steered; raise --policy-map-size",
                fit.dropped,
                fit.dropped_pods
            );
        } else if before.dropped > 0 {
            info!(
                entries = fit.wanted,
                "all policy entries fit in the policy map again"
            );
        }
    }

    /// Hands the prober the gateways this node's pods may use, and this node's own state.
    fn tell_prober(&self, node_ip: Ipv4Addr, desired: &DesiredState) {
        let targets = Targets {
            node_ip: Some(node_ip),
            gateways: desired
                .probe_targets
                .iter()
                .map(|(ip, target)| {
                    let target = Target {
                        node: target.node.clone(),
                        draining: target.draining,
                    };
                    (*ip, target)
                })
                .collect(),
            self_serving: desired.self_serving,
            self_draining: desired.self_draining,
            floating: desired
                .floating_ips
                .iter()
                .map(|(ip, floating)| {
                    let target = FloatingTarget {
                        ifindex: floating.ifindex,
                        interface: floating.interface.clone(),
                        candidates_before: floating.candidates_before.clone(),
                    };
                    (*ip, target)
                })
                .collect(),
        };
        *self
            .probe_targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = targets;
    }

    /// Turns the desired state into map contents and attachments for this node.
    fn plan(
        &self,
        desired: &DesiredState,
        network: &netlink::Snapshot,
        node_ip: Ipv4Addr,
    ) -> (MapContents, BTreeSet<Attachment>) {
        let mut contents = MapContents {
            policies: desired
                .policy_entries
                .iter()
                .map(|((pod, dest), value)| (desired::policy_map_key(*pod, *dest), *value))
                .collect(),
            nodes: desired.nodes.clone(),
            cluster_cidrs: desired
                .cluster_cidrs
                .iter()
                .chain(&self.config.cluster_cidrs)
                .copied()
                .collect(),
            egress_ips: desired.egress_ips.clone(),
            gateway_groups: desired.gateway_groups.clone(),
            group_flags: desired.group_flags.clone(),
            own_port_blocks: desired.own_port_blocks.clone(),
            port_block_owners: desired.port_block_owners.clone(),
            ..MapContents::default()
        };
        let mut attachments = BTreeSet::new();
        let mut attach = |ifindex: u32, hook: Hook| {
            if let Some(link) = network.link(ifindex) {
                attachments.insert(Attachment {
                    ifname: link.name.clone(),
                    ifindex,
                    hook,
                });
            }
        };
        attach(self.tunnel_ifindex, Hook::FromTunnel);
        for pod_ip in &desired.local_pods {
            match network.route_lookup(*pod_ip) {
                Some(ifindex) if !is_underlay(network, ifindex) => {
                    contents.local_pods.insert(*pod_ip, ifindex);
                    attach(ifindex, Hook::FromPod);
                    attach(ifindex, Hook::ToPod);
                }
                // Logged by the caller once per change: the CNI may still be wiring the pod.
                _ => {}
            }
        }
        for ifindex in desired.egress_ips.values() {
            attach(*ifindex, Hook::FromEgress);
        }
        // A gateway candidate is probed: its underlay interface (the one holding the node's
        // address, where the probes arrive) answers them in XDP.
        if is_candidate(desired, node_ip) && self.config.probe_responder == ProbeResponder::Xdp {
            let underlay = network
                .links
                .iter()
                .find(|link| link.ipv4.contains(&node_ip));
            if let Some(underlay) = underlay {
                attach(underlay.index, Hook::ProbeResponder);
            }
        }
        (contents, attachments)
    }
}

/// Whether this node is a gateway candidate of some group (other nodes probe it).
fn is_candidate(desired: &DesiredState, node_ip: Ipv4Addr) -> bool {
    desired
        .gateway_groups
        .values()
        .any(|candidates| candidates.contains(&node_ip))
}

/// A route to a pod through the default-route interface means the pod is not really here
/// (a stale manifest): never attach pod programs to the node's uplink.
fn is_underlay(network: &netlink::Snapshot, ifindex: u32) -> bool {
    network.default_route_ifindex() == Some(ifindex)
}

fn local_network(network: &netlink::Snapshot) -> LocalNetwork {
    LocalNetwork {
        interfaces: network
            .links
            .iter()
            .map(|link| LocalInterface {
                name: link.name.clone(),
                ifindex: link.index,
                ipv4: link.ipv4.clone(),
                up: link.up,
            })
            .collect(),
        default_route_ifindex: network.default_route_ifindex(),
    }
}
