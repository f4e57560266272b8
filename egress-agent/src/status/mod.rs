//! The `status` of `CiliumEgressGatewayPolicies`: what it says (pure, here), who writes it
//! ([`lease`]) and how ([`writer`]).
//!
//! One writer per policy, so agents never fight: the agent on the policy's (first) gateway
//! node, or, when the policy has no gateway node or is invalid, the one live agent holding
//! the status writer's Lease. The writer applies the status subresource (server-side apply,
//! one field manager), only when the content differs from what the live object says (not
//! from its own last write: another writer or a user may have changed it since), at most once
//! per [`STORE_LAG`] per policy, and records each Ready transition as an Event.

pub mod lease;
pub mod writer;

use std::collections::BTreeMap;

use egress_control::{
    desired::{PolicyProblem, PolicySummary},
    inventory::Node,
};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use serde::{Deserialize, Serialize};

use self::lease::Election;
use crate::{health::HealthView, report::Report, source::Refusal};

pub const READY: &str = "Ready";

/// What the status subresource holds (the CRD's status schema).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PolicyStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Each gateway spec's active node: its first candidate neither down nor unable to
    /// serve, as the writer's prober finds them (the first candidate while all are healthy,
    /// as in Cilium).
    pub gateway_nodes: Vec<String>,
    /// Each gateway spec's candidates, in order of preference (failover).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub candidate_nodes: Vec<Vec<String>>,
    /// Each gateway spec's candidates that are up, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub healthy_candidate_nodes: Vec<Vec<String>>,
    /// Left out when unknown: the apply then removes the value it wrote before.
    #[serde(rename = "egressIP", skip_serializing_if = "Option::is_none")]
    pub egress_ip: Option<String>,
    pub matched_pods: u64,
    pub conditions: Vec<Condition>,
}

/// `reason` of the Ready condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Programmed,
    NoGatewayNode,
    InterfaceNotFound,
    InterfaceDown,
    NoEgressIp,
    InvalidSpec,
    /// A floating egress IP another policy uses with other candidates, or a plain policy
    /// naming a floating egress IP.
    FloatingEgressIpTaken,
    /// Some nodes running the policy's pods got no block of the floating egress IP's ports.
    PortBlocksExhausted,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Programmed => "Programmed",
            Reason::NoGatewayNode => "NoGatewayNode",
            Reason::InterfaceNotFound => "InterfaceNotFound",
            Reason::InterfaceDown => "InterfaceDown",
            Reason::NoEgressIp => "NoEgressIP",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::FloatingEgressIpTaken => "FloatingEgressIPTaken",
            Reason::PortBlocksExhausted => "PortBlocksExhausted",
        }
    }
}

/// The one mapping from what the reconcile found to the Ready condition: (ready, reason).
/// Problems that leave the policy served (another gateway takes over, some entries lost to
/// an older policy) keep it Ready; the message still says what is wrong.
pub fn readiness(problem: Option<&PolicyProblem>) -> (bool, Reason) {
    match problem {
        None | Some(PolicyProblem::GatewaySpecWithoutNode(_) | PolicyProblem::OverriddenBy(_)) => {
            (true, Reason::Programmed)
        }
        Some(PolicyProblem::NoGatewayNode) => (false, Reason::NoGatewayNode),
        Some(
            PolicyProblem::InterfaceNotFound(_) | PolicyProblem::DefaultRouteInterfaceNotFound(_),
        ) => (false, Reason::InterfaceNotFound),
        Some(PolicyProblem::InterfaceDown(_)) => (false, Reason::InterfaceDown),
        Some(
            PolicyProblem::InterfaceHasNoIpv4(_)
            | PolicyProblem::EgressIpNotLocal { .. }
            | PolicyProblem::NoDefaultRoute,
        ) => (false, Reason::NoEgressIp),
        Some(
            PolicyProblem::FloatingEgressIpTaken { .. } | PolicyProblem::EgressIpFloats { .. },
        ) => (false, Reason::FloatingEgressIpTaken),
        // Partly served: the pods of the nodes without a block are not.
        Some(PolicyProblem::PortBlocksExhausted { .. }) => (false, Reason::PortBlocksExhausted),
    }
}

/// Each gateway spec's candidates that are up as `node_name`'s prober finds them (itself up
/// while it can serve).
fn healthy_candidates(
    summary: &PolicySummary,
    node_name: &str,
    health: &HealthView,
) -> Vec<Vec<String>> {
    let up = |candidate: &&String| {
        if *candidate == node_name {
            health.self_serving
        } else {
            !health.down.contains(*candidate)
        }
    };
    summary
        .candidate_nodes
        .iter()
        .map(|candidates| candidates.iter().filter(up).cloned().collect())
        .collect()
}

/// Each gateway spec's active node: its first healthy candidate that is not draining (new
/// flows take it), else its first healthy one (specs with none have none).
fn active_nodes(summary: &PolicySummary, node_name: &str, health: &HealthView) -> Vec<String> {
    if summary.candidate_nodes.is_empty() {
        return summary.gateway_nodes.clone();
    }
    let draining = |candidate: &String| {
        if candidate == node_name {
            health.self_draining
        } else {
            health.draining.contains(candidate)
        }
    };
    healthy_candidates(summary, node_name, health)
        .into_iter()
        .filter_map(|healthy| {
            let taking_flows = healthy.iter().find(|candidate| !draining(candidate));
            taking_flows.or(healthy.first()).cloned()
        })
        .collect()
}

/// Whether the agent on `node_name` writes a policy's status: the first active node as this
/// node's prober finds them, so a failed first candidate hands the writing to the next one;
/// the first candidate when none is up in this node's view; the Lease holder when no spec
/// has a node. `summary` is `None` for an invalid policy.
pub fn is_writer(
    summary: Option<&PolicySummary>,
    node_name: &str,
    nodes: &BTreeMap<String, Node>,
    election: Election,
    health: &HealthView,
) -> bool {
    // No candidate up as this node sees them (it may not probe them): the first one writes,
    // as without health.
    let active = summary.and_then(|summary| {
        active_nodes(summary, node_name, health)
            .into_iter()
            .next()
            .or_else(|| summary.gateway_nodes.first().cloned())
    });
    match active {
        Some(gateway) => gateway == node_name,
        None => match election {
            Election::Held => true,
            Election::Unavailable => nodes.keys().next().is_some_and(|first| first == node_name),
            Election::Pending | Election::NotHeld => false,
        },
    }
}

/// What one policy's status should say, as seen by its writer `node_name`.
pub struct StatusInput<'a> {
    pub node_name: &'a str,
    /// The writer's view of the candidates' health.
    pub health: &'a HealthView,
    pub generation: Option<i64>,
    /// `None` when the policy is invalid.
    pub summary: Option<&'a PolicySummary>,
    /// Why the policy was refused (empty when valid).
    pub refusals: Vec<&'a Refusal>,
}

/// The status to write. `previous` keeps `lastTransitionTime` while the Ready status holds.
pub fn status(
    input: &StatusInput,
    previous: Option<&PolicyStatus>,
    now: Timestamp,
) -> PolicyStatus {
    let (ready, reason, message) = match input.summary {
        None => (
            false,
            Reason::InvalidSpec,
            input
                .refusals
                .iter()
                .map(|refusal| refusal.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        Some(summary) => {
            let (ready, reason) = readiness(summary.problem.as_ref());
            let active = active_nodes(summary, input.node_name, input.health);
            let message = match (&summary.problem, active.first()) {
                (Some(problem), _) => problem.to_string(),
                (None, Some(gateway)) => format!(
                    "{} pods egress through gateway node {gateway}",
                    summary.matched_pods
                ),
                (None, None) => String::from("programmed"),
            };
            let message = if summary.ipv6_not_programmed.is_empty() {
                message
            } else {
                let cidrs: Vec<String> = summary
                    .ipv6_not_programmed
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                format!(
                    "{message}; IPv6 CIDRs {} not programmed (IPv6 is not supported yet)",
                    cidrs.join(", ")
                )
            };
            (ready, reason, message)
        }
    };
    let message = truncate(message, MAX_MESSAGE_BYTES);
    let status = if ready { "True" } else { "False" };
    let last_transition_time = previous
        .and_then(|previous| previous.conditions.iter().find(|c| c.type_ == READY))
        .filter(|condition| condition.status == status)
        .map_or(Time(now), |condition| {
            condition.last_transition_time.clone()
        });
    let summary = input.summary;
    let gateway_nodes = summary
        .map(|s| active_nodes(s, input.node_name, input.health))
        .unwrap_or_default();
    let is_gateway = gateway_nodes
        .first()
        .is_some_and(|gateway| gateway == input.node_name);
    PolicyStatus {
        observed_generation: input.generation,
        gateway_nodes,
        candidate_nodes: summary
            .map(|s| s.candidate_nodes.clone())
            .unwrap_or_default(),
        healthy_candidate_nodes: summary
            .filter(|s| s.candidate_nodes.iter().any(|c| c.len() > 1))
            .map(|s| healthy_candidates(s, input.node_name, input.health))
            .unwrap_or_default(),
        egress_ip: summary
            .filter(|_| is_gateway)
            .and_then(|s| s.egress_ip)
            .map(|ip| ip.to_string()),
        matched_pods: summary.map_or(0, |s| s.matched_pods as u64),
        conditions: vec![Condition {
            type_: READY.into(),
            status: status.into(),
            reason: reason.as_str().into(),
            message,
            last_transition_time,
            observed_generation: input.generation,
        }],
    }
}

/// The agent's own last write of a policy's status, and when.
#[derive(Clone, Debug)]
pub struct LastWrite {
    pub status: PolicyStatus,
    pub at: std::time::Instant,
}

/// How long the policy store may lag behind this agent's own patch: within it, a store
/// still showing the old status is not a reason to write again. Also the shortest interval
/// between two writes of one policy's status.
pub const STORE_LAG: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `desired` must be written. The live object (`current`, as the policy store holds
/// it) decides: another writer (after a hand-off) or a user may have changed it since this
/// agent's last write, and the object must never keep `Ready=True` while traffic is dropped.
/// Only right after this agent's own write, while the store may still lag, does the last
/// write count instead; and one policy is written at most once per [`STORE_LAG`].
pub fn needs_write(
    desired: &PolicyStatus,
    current: Option<&PolicyStatus>,
    last: Option<&LastWrite>,
    now: std::time::Instant,
) -> bool {
    if current == Some(desired) {
        return false;
    }
    last.is_none_or(|last| now.duration_since(last.at) >= STORE_LAG)
}

/// The statuses this node writes for `report`: one per policy object it is the writer of.
pub fn statuses_to_write<'a>(
    report: &'a Report,
    election: Election,
    health: &'a HealthView,
) -> Vec<(&'a str, StatusInput<'a>)> {
    let snapshot = &report.snapshot;
    snapshot
        .policy_generations
        .iter()
        .filter_map(|(name, generation)| {
            let summary = report.policies.get(name);
            let refusals: Vec<&Refusal> = report
                .refused
                .iter()
                .filter(|refusal| refusal.policy.as_deref() == Some(name))
                .collect();
            // A policy neither summarized nor refused has not been reconciled yet.
            if summary.is_none() && refusals.is_empty() {
                return None;
            }
            is_writer(
                summary,
                &report.node_name,
                &snapshot.inventory.nodes,
                election,
                health,
            )
            .then(|| {
                (
                    name.as_str(),
                    StatusInput {
                        node_name: &report.node_name,
                        health,
                        generation: Some(*generation),
                        summary,
                        refusals,
                    },
                )
            })
        })
        .collect()
}

/// metav1.Condition's limit on `message`.
const MAX_MESSAGE_BYTES: usize = 32768;

pub(crate) fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// Now, to the second: the precision of Kubernetes timestamps.
pub(crate) fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

    use egress_control::inventory::test_support::node;

    use super::*;
    use crate::source::Snapshot;

    fn nodes(names: &[&str]) -> BTreeMap<String, Node> {
        names
            .iter()
            .map(|name| (name.to_string(), node(name, Some([10, 0, 0, 1]), &[])))
            .collect()
    }

    fn summary(gateways: &[&str], problem: Option<PolicyProblem>) -> PolicySummary {
        PolicySummary {
            gateway_nodes: gateways
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
            egress_ip: Some(Ipv4Addr::new(10, 0, 0, 12)),
            matched_pods: 2,
            problem,
            ipv6_not_programmed: Vec::new(),
            ..PolicySummary::default()
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    /// The gateway writes its policies; the Lease holder the others; without Leases (not
    /// served, not allowed) the smallest node name.
    #[test]
    fn writer_is_the_first_gateway_else_the_lease_holder() {
        let nodes = nodes(&["w3", "w1", "w2"]);
        let served = summary(&["w2", "w3"], None);
        let no_gateway = summary(&[], Some(PolicyProblem::NoGatewayNode));
        for election in [Election::Held, Election::NotHeld, Election::Pending] {
            assert!(is_writer(
                Some(&served),
                "w2",
                &nodes,
                election,
                &HealthView::default()
            ));
            assert!(!is_writer(
                Some(&served),
                "w3",
                &nodes,
                election,
                &HealthView::default()
            ));
        }
        for summary in [Some(&no_gateway), None] {
            assert!(is_writer(
                summary,
                "w3",
                &nodes,
                Election::Held,
                &HealthView::default()
            ));
            assert!(!is_writer(
                summary,
                "w1",
                &nodes,
                Election::NotHeld,
                &HealthView::default()
            ));
            assert!(!is_writer(
                summary,
                "w1",
                &nodes,
                Election::Pending,
                &HealthView::default()
            ));
            assert!(is_writer(
                summary,
                "w1",
                &nodes,
                Election::Unavailable,
                &HealthView::default()
            ));
            assert!(!is_writer(
                summary,
                "w3",
                &nodes,
                Election::Unavailable,
                &HealthView::default()
            ));
        }
        assert!(!is_writer(
            None,
            "w1",
            &BTreeMap::new(),
            Election::Unavailable,
            &HealthView::default()
        ));
    }

    #[test]
    fn exactly_one_node_writes_each_policy() {
        let snapshot = Snapshot {
            inventory: egress_control::inventory::Inventory {
                nodes: nodes(&["w1", "w2", "w3"]),
                ..Default::default()
            },
            policy_generations: BTreeMap::from([
                ("served".into(), 1),
                ("orphan".into(), 2),
                ("invalid".into(), 3),
                ("not-yet-reconciled".into(), 1),
            ]),
            ..Default::default()
        };
        let report = |node: &str| Report {
            node_name: node.into(),
            synced: true,
            policies: BTreeMap::from([
                ("served".into(), summary(&["w2"], None)),
                (
                    "orphan".into(),
                    summary(&[], Some(PolicyProblem::NoGatewayNode)),
                ),
            ]),
            refused: vec![Refusal {
                policy: Some("invalid".into()),
                message: "policy \"invalid\": spec.selectors: is required".into(),
            }],
            snapshot: Arc::new(snapshot.clone()),
            ..Default::default()
        };
        let names = |node: &str, election| -> Vec<String> {
            statuses_to_write(&report(node), election, &HealthView::default())
                .into_iter()
                .map(|(name, _)| name.to_owned())
                .collect()
        };
        // w3 holds the Lease.
        assert_eq!(names("w3", Election::Held), ["invalid", "orphan"]);
        assert_eq!(names("w2", Election::NotHeld), ["served"]);
        assert!(names("w1", Election::NotHeld).is_empty());
    }

    /// The first candidate failed (as the next one's prober finds it, or it cannot serve by
    /// its own account): the next one writes the status, naming itself the active node.
    #[test]
    fn a_failed_first_candidate_hands_the_status_to_the_next() {
        let served = PolicySummary {
            candidate_nodes: vec![vec!["w2".into(), "w4".into()]],
            ..summary(&["w2"], None)
        };
        let nodes = nodes(&["w1", "w2", "w4"]);
        let w2_down = HealthView {
            down: BTreeSet::from(["w2".to_owned()]),
            ..HealthView::default()
        };
        let not_serving = HealthView {
            self_serving: false,
            ..HealthView::default()
        };
        let healthy = HealthView::default();
        assert!(!is_writer(
            Some(&served),
            "w4",
            &nodes,
            Election::NotHeld,
            &healthy
        ));
        assert!(is_writer(
            Some(&served),
            "w4",
            &nodes,
            Election::NotHeld,
            &w2_down
        ));
        assert!(!is_writer(
            Some(&served),
            "w2",
            &nodes,
            Election::NotHeld,
            &not_serving
        ));
        // A node that finds every candidate down (it only sees them from outside) leaves
        // the writing to the first one.
        let all_down = HealthView {
            down: BTreeSet::from(["w2".to_owned(), "w4".to_owned()]),
            ..HealthView::default()
        };
        // A draining first candidate is up but takes no new flows: the next one is active.
        let w2_draining = HealthView {
            draining: BTreeSet::from(["w2".to_owned()]),
            ..HealthView::default()
        };
        assert!(is_writer(
            Some(&served),
            "w4",
            &nodes,
            Election::NotHeld,
            &w2_draining
        ));
        assert!(!is_writer(
            Some(&served),
            "w1",
            &nodes,
            Election::Held,
            &all_down
        ));
        let input = StatusInput {
            node_name: "w4",
            health: &w2_down,
            generation: Some(1),
            summary: Some(&served),
            refusals: vec![],
        };
        let written = status(&input, None, at(100));
        assert_eq!(written.gateway_nodes, ["w4"]);
        assert_eq!(written.healthy_candidate_nodes, [["w4"]]);
        assert_eq!(written.egress_ip.as_deref(), Some("10.0.0.12"));
        assert_eq!(
            written.conditions[0].message,
            "2 pods egress through gateway node w4"
        );
    }

    #[test]
    fn status_of_a_served_policy() {
        let served = PolicySummary {
            candidate_nodes: vec![vec!["w2".into(), "w4".into()], vec!["w3".into()]],
            ..summary(&["w2", "w3"], None)
        };
        let input = StatusInput {
            node_name: "w2",
            health: &HealthView::default(),
            generation: Some(4),
            summary: Some(&served),
            refusals: vec![],
        };
        let written = status(&input, None, at(100));
        let json = serde_json::to_value(&written).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "observedGeneration": 4,
                "gatewayNodes": ["w2", "w3"],
                "candidateNodes": [["w2", "w4"], ["w3"]],
                "healthyCandidateNodes": [["w2", "w4"], ["w3"]],
                "egressIP": "10.0.0.12",
                "matchedPods": 2,
                "conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "reason": "Programmed",
                    "message": "2 pods egress through gateway node w2",
                    "lastTransitionTime": "1970-01-01T00:01:40Z",
                    "observedGeneration": 4,
                }],
            })
        );
        // Unchanged readiness keeps the transition time, so nothing needs writing.
        assert_eq!(status(&input, Some(&written), at(200)), written);
        // The status read back from the API server compares equal to what was written.
        let read_back: PolicyStatus = serde_json::from_value(json).unwrap();
        assert_eq!(read_back, written);
    }

    #[test]
    fn status_of_broken_policies() {
        let no_gateway = summary(&[], Some(PolicyProblem::NoGatewayNode));
        let input = StatusInput {
            node_name: "w1",
            health: &HealthView::default(),
            generation: Some(1),
            summary: Some(&no_gateway),
            refusals: vec![],
        };
        let first = status(&input, None, at(100));
        let condition = &first.conditions[0];
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "NoGatewayNode")
        );
        assert!(condition.message.contains("no gateway node"));
        assert_eq!(
            first.egress_ip, None,
            "only the gateway knows its egress IP"
        );
        assert!(
            serde_json::to_value(&first)
                .unwrap()
                .get("egressIP")
                .is_none(),
            "left out, so the apply removes a stale egress IP"
        );

        // Becoming ready is a transition.
        let served = summary(&["w1"], None);
        let ready = status(
            &StatusInput {
                summary: Some(&served),
                ..input
            },
            Some(&first),
            at(200),
        );
        assert_eq!(ready.conditions[0].last_transition_time, Time(at(200)));

        let refusal = Refusal {
            policy: Some("bad".into()),
            message: "policy \"bad\": spec.destinationCIDRs: is required".into(),
        };
        let invalid = status(
            &StatusInput {
                node_name: "w1",
                health: &HealthView::default(),
                generation: Some(7),
                summary: None,
                refusals: vec![&refusal],
            },
            None,
            at(100),
        );
        let condition = &invalid.conditions[0];
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(condition.message.contains("spec.destinationCIDRs"));
        assert_eq!((invalid.matched_pods, invalid.gateway_nodes.len()), (0, 0));
        assert_eq!(invalid.observed_generation, Some(7));
    }

    /// A dual-stack policy is Ready for its IPv4 part, and says its IPv6 part is not
    /// programmed.
    #[test]
    fn status_of_a_dual_stack_policy_names_the_ipv6_part_not_programmed() {
        let dual = PolicySummary {
            ipv6_not_programmed: vec!["::/0".parse().unwrap(), "fd00::/8".parse().unwrap()],
            ..summary(&["w2"], None)
        };
        let input = StatusInput {
            node_name: "w2",
            health: &HealthView::default(),
            generation: Some(1),
            summary: Some(&dual),
            refusals: vec![],
        };
        let condition = &status(&input, None, at(100)).conditions[0];
        assert_eq!(condition.status, "True");
        assert_eq!(
            condition.message,
            "2 pods egress through gateway node w2; IPv6 CIDRs ::/0, fd00::/8 not programmed \
             (IPv6 is not supported yet)"
        );
    }

    /// A writer hand-off (A writes Ready, B writes NoGatewayNode, A is the writer again and
    /// wants Ready): A compares with the live object, not with its own last write, so the
    /// object does not keep what B wrote. Right after A's own write, a lagging store is no
    /// reason to write again.
    #[test]
    fn writes_follow_the_live_object_not_the_last_own_write() {
        let served = summary(&["w2"], None);
        let healthy = HealthView::default();
        let input = |summary| StatusInput {
            node_name: "w2",
            health: &healthy,
            generation: Some(1),
            summary: Some(summary),
            refusals: vec![],
        };
        let ready = status(&input(&served), None, at(100));
        let broken = summary(&[], Some(PolicyProblem::NoGatewayNode));
        let no_gateway = status(&input(&broken), None, at(200));
        let start = std::time::Instant::now();
        let long_ago = LastWrite {
            status: ready.clone(),
            at: start,
        };
        let later = start + STORE_LAG * 5;
        assert!(
            needs_write(&ready, Some(&no_gateway), Some(&long_ago), later),
            "the object says NoGatewayNode: write Ready again"
        );
        assert!(!needs_write(&ready, Some(&ready), Some(&long_ago), later));
        assert!(needs_write(&ready, None, None, later), "no status yet");
        // Just written: the store may not show it yet.
        let just_now = LastWrite {
            status: ready.clone(),
            at: later,
        };
        assert!(!needs_write(
            &ready,
            Some(&no_gateway),
            Some(&just_now),
            later
        ));
        assert!(needs_write(
            &ready,
            Some(&no_gateway),
            Some(&just_now),
            later + STORE_LAG
        ));
    }

    #[test]
    fn long_messages_fit_the_condition() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = truncate(long, MAX_MESSAGE_BYTES);
        assert!(cut.len() <= MAX_MESSAGE_BYTES && cut.ends_with("..."));
        assert_eq!(truncate("short".into(), MAX_MESSAGE_BYTES), "short");
    }

    #[test]
    fn reasons() {
        let reason = |problem: PolicyProblem| readiness(Some(&problem));
        assert_eq!(readiness(None), (true, Reason::Programmed));
        assert_eq!(
            reason(PolicyProblem::NoGatewayNode),
            (false, Reason::NoGatewayNode)
        );
        assert_eq!(
            reason(PolicyProblem::InterfaceNotFound("eth9".into())),
            (false, Reason::InterfaceNotFound)
        );
        assert_eq!(
            reason(PolicyProblem::NoDefaultRoute),
            (false, Reason::NoEgressIp)
        );
        assert_eq!(Reason::NoEgressIp.as_str(), "NoEgressIP");
        assert_eq!(
            reason(PolicyProblem::OverriddenBy("a".into())),
            (true, Reason::Programmed)
        );
    }
}
