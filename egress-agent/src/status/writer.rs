//! The task that writes the policies' status: server-side apply of the status subresource
//! with one field manager for every agent (so a hand-off between writers is one owner, not a
//! conflict), and an Event on the policy at each Ready transition.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Client, ResourceExt as _,
    api::{DynamicObject, Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    LastWrite, PolicyStatus, READY, lease::Election, needs_write, now, status, statuses_to_write,
    truncate,
};
use crate::{
    chain::Chain, health::HealthView, report::Report, source::kubernetes::policy_resource,
};

/// The field manager of every agent's status writes.
pub const FIELD_MANAGER: &str = "egress-gateway-agent";
/// The `action` of the Events (what the agent did when the condition changed).
const EVENT_ACTION: &str = "WriteStatus";
/// events.k8s.io's limit on `note`.
const MAX_NOTE_BYTES: usize = 1024;

/// Writes the status of the policies this node is the writer of, after every reconcile and
/// whenever the election or this node's view of the gateways' health changes.
pub fn spawn_status_writer(
    client: Client,
    policies: Store<DynamicObject>,
    mut reports: watch::Receiver<Arc<Report>>,
    mut election: watch::Receiver<Election>,
    mut health: watch::Receiver<HealthView>,
) {
    let resource = policy_resource();
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    tokio::spawn(async move {
        let node_name = reports.borrow().node_name.clone();
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(node_name),
            },
        );
        // What this agent last wrote, and when: the store lags behind a write.
        let mut written: BTreeMap<String, LastWrite> = BTreeMap::new();
        let mut prober_alive = true;
        loop {
            tokio::select! {
                changed = reports.changed() => if changed.is_err() { return },
                changed = election.changed() => if changed.is_err() { return },
                // A prober that could not start leaves the view as it was.
                changed = health.changed(), if prober_alive => if changed.is_err() {
                    prober_alive = false;
                    continue;
                },
            }
            let report = Arc::clone(&reports.borrow_and_update());
            let elected = *election.borrow_and_update();
            let health = health.borrow_and_update().clone();
            if !report.synced {
                continue;
            }
            written.retain(|name, _| report.snapshot.policy_generations.contains_key(name));
            for (name, input) in statuses_to_write(&report, elected, &health) {
                let live = policies.get(&ObjectRef::new_with(name, resource.clone()));
                let current = live
                    .as_ref()
                    .and_then(|object| object.data.get("status").cloned())
                    .and_then(|status| serde_json::from_value::<PolicyStatus>(status).ok());
                let last = written.get(name);
                let previous = current.as_ref().or(last.map(|last| &last.status));
                let desired = status(&input, previous, now());
                if !needs_write(&desired, current.as_ref(), last, Instant::now()) {
                    continue;
                }
                if write(&api, name, &desired).await {
                    if let Some(live) = &live
                        && let Some(event) = transition(current.as_ref(), &desired)
                    {
                        publish(&recorder, live, event).await;
                    }
                    written.insert(
                        name.to_owned(),
                        LastWrite {
                            status: desired,
                            at: Instant::now(),
                        },
                    );
                }
            }
        }
    });
}

/// Applies `desired` as the status of policy `name`; whether it was written.
async fn write(api: &Api<DynamicObject>, name: &str, desired: &PolicyStatus) -> bool {
    let resource = policy_resource();
    let apply = json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": { "name": name },
        "status": desired,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch_status(name, &params, &Patch::Apply(&apply)).await {
        Ok(object) => {
            let condition = &desired.conditions[0];
            info!(
                policy = object.name_any(),
                ready = condition.status,
                reason = condition.reason,
                "policy status written"
            );
            let stale = stale_fields(desired, object.data.get("status"));
            if !stale.is_empty() {
                // Written by another manager (an older agent merge-patched): an apply
                // cannot remove what it does not own, a merge patch can.
                let clear: serde_json::Map<String, Value> = stale
                    .into_iter()
                    .map(|field| (field, Value::Null))
                    .collect();
                let patch = Patch::Merge(json!({ "status": clear }));
                if let Err(error) = api
                    .patch_status(name, &PatchParams::default(), &patch)
                    .await
                {
                    warn!(policy = name, error = %Chain(&error), "cannot clear stale status fields");
                }
            }
            true
        }
        Err(kube::Error::Api(response)) if response.code == 404 => {
            // Deleted meanwhile, or a CRD without the status subresource (Cilium's own):
            // nothing to write to, and not worth a warning.
            debug!(
                policy = name,
                "no status to write: the policy is gone or its CRD has no status subresource \
                 (apply deploy/crd.yaml)"
            );
            false
        }
        Err(error) => {
            warn!(policy = name, error = %Chain(&error), "cannot write the policy status");
            false
        }
    }
}

/// Top-level status fields the object has and `desired` leaves out.
fn stale_fields(desired: &PolicyStatus, written: Option<&Value>) -> Vec<String> {
    let desired = serde_json::to_value(desired).unwrap_or_default();
    written
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|fields| fields.keys())
        .filter(|field| desired.get(field.as_str()).is_none())
        .cloned()
        .collect()
}

/// The Event for a change of the Ready condition (status or reason) from `current` to
/// `desired`, if it changed; the first status of a policy is a transition too.
fn transition(current: Option<&PolicyStatus>, desired: &PolicyStatus) -> Option<Event> {
    let ready = |status: &PolicyStatus| {
        status
            .conditions
            .iter()
            .find(|condition| condition.type_ == READY)
            .map(|condition| (condition.status.clone(), condition.reason.clone()))
    };
    let (to_status, to_reason) = ready(desired)?;
    if current.and_then(ready) == Some((to_status.clone(), to_reason.clone())) {
        return None;
    }
    let message = desired
        .conditions
        .iter()
        .find(|condition| condition.type_ == READY)
        .map(|condition| condition.message.clone())
        .unwrap_or_default();
    Some(Event {
        type_: if to_status == "True" {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: to_reason,
        note: Some(truncate(message, MAX_NOTE_BYTES)),
        action: EVENT_ACTION.into(),
        secondary: None,
    })
}

async fn publish(recorder: &Recorder, policy: &DynamicObject, event: Event) {
    let resource = policy_resource();
    let reference = ObjectReference {
        api_version: Some(resource.api_version),
        kind: Some(resource.kind),
        name: Some(policy.name_any()),
        uid: policy.uid(),
        resource_version: policy.resource_version(),
        ..ObjectReference::default()
    };
    if let Err(error) = recorder.publish(&event, &reference).await {
        warn!(policy = policy.name_any(), reason = event.reason, error = %Chain(&error), "cannot record the policy event");
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    use super::*;

    fn ready(status: &str, reason: &str) -> PolicyStatus {
        PolicyStatus {
            conditions: vec![Condition {
                type_: READY.into(),
                status: status.into(),
                reason: reason.into(),
                message: format!("{reason} message"),
                last_transition_time: Time(now()),
                observed_generation: None,
            }],
            ..PolicyStatus::default()
        }
    }

    #[test]
    fn events_mark_ready_transitions_only() {
        let programmed = ready("True", "Programmed");
        let first = transition(None, &programmed).expect("the first status is a transition");
        assert_eq!(
            (first.type_, first.reason.as_str()),
            (EventType::Normal, "Programmed")
        );
        assert_eq!(first.note.as_deref(), Some("Programmed message"));
        let more_pods = PolicyStatus {
            matched_pods: 7,
            ..programmed.clone()
        };
        assert!(
            transition(Some(&programmed), &more_pods).is_none(),
            "pod churn is not a transition"
        );
        let down = ready("False", "InterfaceDown");
        let event = transition(Some(&programmed), &down).unwrap();
        assert_eq!(
            (event.type_, event.reason.as_str()),
            (EventType::Warning, "InterfaceDown")
        );
        let other_reason = ready("False", "NoEgressIP");
        assert!(transition(Some(&down), &other_reason).is_some());
    }

    #[test]
    fn fields_another_manager_wrote_are_found() {
        let desired = ready("True", "Programmed");
        let written = json!({
            "conditions": [],
            "matchedPods": 0,
            "gatewayNodes": [],
            "egressIP": "10.0.0.12",
        });
        assert_eq!(stale_fields(&desired, Some(&written)), ["egressIP"]);
        assert!(stale_fields(&desired, None).is_empty());
    }
}
