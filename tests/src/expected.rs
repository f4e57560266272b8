//! What `bpf egress list` should show on each node, computed from the test's own view of the
//! cluster (pods, node labels, interfaces) and a simple policy shape: one podSelector with
//! matchLabels, destination CIDRs, one gateway with a node selector and an egress source.
//! Independent of the agent's code, so a test can compare the two after every change.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail};

use crate::{
    agent::GATEWAY_NOT_FOUND,
    cluster::{Cluster, wait_for_value},
    process::ip_in,
};

/// Where a policy's gateway takes its egress IP from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EgressSource {
    /// `interface: <name>`: the interface's first IPv4 address.
    Interface(String),
    /// `egressIP: <ip>`: must be an address of the gateway.
    Ip(Ipv4Addr),
    /// Neither: the first address of the default route's interface (eth0).
    DefaultRoute,
}

/// A `CiliumEgressGatewayPolicy` of the shape the reliability tests use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimplePolicy {
    pub name: String,
    /// matchLabels of the single podSelector (all namespaces).
    pub pod_labels: Vec<(String, String)>,
    pub destinations: Vec<String>,
    /// matchLabels of the gateway's nodeSelector.
    pub gateway_labels: Vec<(String, String)>,
    pub egress: EgressSource,
}

/// One row of the expected egress list: (source, destination CIDR, egress IP, gateway IP).
pub type ExpectedEntry = (Ipv4Addr, String, Ipv4Addr, Ipv4Addr);

fn pairs(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

impl SimplePolicy {
    pub fn new(
        name: &str,
        pod_labels: &[(&str, &str)],
        destinations: &[&str],
        gateway_labels: &[(&str, &str)],
        egress: EgressSource,
    ) -> Self {
        SimplePolicy {
            name: name.to_string(),
            pod_labels: pairs(pod_labels),
            destinations: destinations
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
            gateway_labels: pairs(gateway_labels),
            egress,
        }
    }

    /// The manifest, as `kubectl apply -f` would take it.
    pub fn yaml(&self) -> String {
        let mut yaml = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata:\n  name: {}\n\
             spec:\n  selectors:\n  - podSelector:\n      matchLabels:\n",
            self.name
        );
        for (key, value) in &self.pod_labels {
            yaml.push_str(&format!("        {key}: \"{value}\"\n"));
        }
        yaml.push_str("  destinationCIDRs:\n");
        for cidr in &self.destinations {
            yaml.push_str(&format!("  - {cidr}\n"));
        }
        yaml.push_str("  egressGateway:\n    nodeSelector:\n      matchLabels:\n");
        for (key, value) in &self.gateway_labels {
            yaml.push_str(&format!("        {key}: \"{value}\"\n"));
        }
        match &self.egress {
            EgressSource::Interface(name) => yaml.push_str(&format!("    interface: {name}\n")),
            EgressSource::Ip(ip) => yaml.push_str(&format!("    egressIP: {ip}\n")),
            EgressSource::DefaultRoute => {}
        }
        yaml
    }

    /// Applies (or re-applies, after an edit) the policy.
    pub fn apply(&self, cluster: &Cluster) -> Result<()> {
        cluster.apply_policy(&self.name, &self.yaml())
    }
}

fn matches(
    labels: &std::collections::BTreeMap<String, String>,
    wanted: &[(String, String)],
) -> bool {
    wanted
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// IPv4 addresses of one interface of a node, in the kernel's order (first = primary).
fn interface_addresses(netns: &str, interface: &str) -> Vec<Ipv4Addr> {
    let Ok(output) = ip_in(netns, &["-4", "-o", "addr", "show", "dev", interface]) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|word| *word == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

fn all_addresses(netns: &str) -> Vec<Ipv4Addr> {
    let Ok(output) = ip_in(netns, &["-4", "-o", "addr", "show"]) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|word| *word == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// The egress list `node` should show for `policies` (policies in name order; on the same
/// pod and destination the first name wins, as in Cilium).
pub fn expected_egress_list(
    cluster: &Cluster,
    policies: &[SimplePolicy],
    node: &str,
) -> Result<BTreeSet<ExpectedEntry>> {
    let this_node = cluster.node(node)?.name.clone();
    let mut sorted: Vec<&SimplePolicy> = policies.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut taken = BTreeSet::new();
    let mut entries = BTreeSet::new();
    for policy in sorted {
        // The gateway: the first registered node by name whose labels match.
        let mut candidates: Vec<_> = cluster
            .nodes
            .iter()
            .filter(|n| {
                cluster.node_registered(&n.name) && matches(&n.labels, &policy.gateway_labels)
            })
            .collect();
        candidates.sort_by(|a, b| a.name.cmp(&b.name));
        let gateway = candidates.first();
        let (gateway_ip, egress_ip) = match gateway {
            None => (GATEWAY_NOT_FOUND, Ipv4Addr::UNSPECIFIED),
            Some(gateway) => {
                let egress = if gateway.name == this_node {
                    let resolved = match &policy.egress {
                        EgressSource::Interface(name) => {
                            interface_addresses(&gateway.netns, name).first().copied()
                        }
                        EgressSource::Ip(ip) => {
                            all_addresses(&gateway.netns).contains(ip).then_some(*ip)
                        }
                        EgressSource::DefaultRoute => Some(gateway.ip),
                    };
                    resolved.unwrap_or(Ipv4Addr::UNSPECIFIED)
                } else {
                    Ipv4Addr::UNSPECIFIED
                };
                (gateway.ip, egress)
            }
        };
        for pod in &cluster.pods {
            if !matches(&pod.labels, &policy.pod_labels) {
                continue;
            }
            for cidr in &policy.destinations {
                if taken.insert((pod.ip, cidr.clone())) {
                    entries.insert((pod.ip, cidr.clone(), egress_ip, gateway_ip));
                }
            }
        }
    }
    Ok(entries)
}

/// The egress list a node shows, in the same shape.
pub fn actual_egress_list(cluster: &Cluster, node: &str) -> Result<BTreeSet<ExpectedEntry>> {
    cluster
        .egress_list(node)?
        .into_iter()
        .map(|entry| {
            Ok((
                entry.source().context("source IP")?,
                entry.dest_cidr.clone(),
                entry.egress().context("egress IP")?,
                entry.gateway().context("gateway IP")?,
            ))
        })
        .collect()
}

/// Waits until every node with a running agent shows exactly the expected egress list;
/// fails with the difference otherwise.
pub fn wait_for_maps_to_match(
    cluster: &Cluster,
    policies: &[SimplePolicy],
    timeout: Duration,
) -> Result<()> {
    for node in &cluster.nodes {
        if !cluster.agent_running(&node.name)? {
            continue;
        }
        let mut last = (BTreeSet::new(), BTreeSet::new());
        let matched = wait_for_value(timeout, || {
            let expected = expected_egress_list(cluster, policies, &node.name).ok()?;
            let actual = actual_egress_list(cluster, &node.name).ok()?;
            if expected == actual {
                Some(())
            } else {
                last = (expected, actual);
                None
            }
        });
        if matched.is_none() {
            let (expected, actual) = last;
            let missing: Vec<_> = expected.difference(&actual).collect();
            let unexpected: Vec<_> = actual.difference(&expected).collect();
            bail!(
                "the maps of {} do not match the inventory after {timeout:?}:\n  missing \
                 (source, destination, egress, gateway): {missing:?}\n  unexpected: \
                 {unexpected:?}",
                node.name
            );
        }
    }
    Ok(())
}
