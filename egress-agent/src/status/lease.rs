//! Who writes the status of policies without a gateway node: the one live agent holding a
//! Lease (coordination.k8s.io/v1), as client-go's leader election decides it.
//!
//! Every agent tries every [`RETRY`]: it creates the Lease when there is none, renews it while
//! it holds it, and takes it over when its record has not changed for the lease duration (by
//! this agent's own clock, so clock skew between nodes does not matter). Updates carry the
//! `resourceVersion` read, so of two agents taking over at once one gets a conflict. An agent
//! that cannot renew for [`RENEW_DEADLINE`] stops writing before anyone else can take over.
//! The holder's identity is its node name: a restarted agent renews its own Lease at once.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt as _},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::chain::Chain;

/// The Lease's name, in the agents' namespace (`--lease-namespace`).
pub const LEASE_NAME: &str = "egress-gateway-status-writer";
/// How long a holder that stopped renewing keeps the Lease (client-go's default).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long the holder keeps writing without a successful renewal; shorter than
/// [`LEASE_DURATION`], so it has stopped before another agent takes over.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often each agent tries to acquire or renew.
pub const RETRY: Duration = Duration::from_secs(2);

// A holder that lost contact stops writing before another agent may take over.
const _: () = assert!(RENEW_DEADLINE.as_secs() + RETRY.as_secs() < LEASE_DURATION.as_secs());

/// What this agent knows about the election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Election {
    /// Not decided yet (the first attempt has not answered).
    Pending,
    /// This agent holds the Lease.
    Held,
    /// Another agent holds it.
    NotHeld,
    /// The API refuses Leases (not served, or RBAC without `leases`): the agent on the
    /// smallest node name writes, as before Leases.
    Unavailable,
}

/// The part of a Lease the election reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub renew_time: Option<Timestamp>,
    pub duration: Duration,
}

impl Record {
    pub fn of(lease: &Lease) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|holder| !holder.is_empty()),
            renew_time: spec.renew_time.map(|time| time.0),
            duration: spec
                .lease_duration_seconds
                .and_then(|seconds| u64::try_from(seconds).ok())
                .map_or(LEASE_DURATION, Duration::from_secs),
        }
    }
}

/// A record as first seen, and when (by this agent's clock).
#[derive(Clone, Debug)]
pub struct Observed {
    pub record: Record,
    pub since: Instant,
}

/// What to do with the Lease now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Create,
    Renew,
    TakeOver,
    Follow { holder: String },
}

/// The next step for `me`, given the Lease read now and what was observed before (updated).
pub fn next_step(
    current: Option<&Record>,
    observed: &mut Option<Observed>,
    me: &str,
    now: Instant,
) -> Step {
    let Some(current) = current else {
        *observed = None;
        return Step::Create;
    };
    let Some(holder) = current.holder.as_deref() else {
        return Step::TakeOver;
    };
    if holder == me {
        return Step::Renew;
    }
    let unchanged_since = match observed {
        Some(seen) if seen.record == *current => seen.since,
        _ => {
            *observed = Some(Observed {
                record: current.clone(),
                since: now,
            });
            now
        }
    };
    if now.duration_since(unchanged_since) >= current.duration {
        Step::TakeOver
    } else {
        Step::Follow {
            holder: holder.to_string(),
        }
    }
}

/// Runs the election for `me` in `namespace`; the receiver says what this agent may do.
pub fn spawn_election(client: Client, namespace: String, me: String) -> watch::Receiver<Election> {
    let (election, elected) = watch::channel(Election::Pending);
    let api = Api::<Lease>::namespaced(client, &namespace);
    tokio::spawn(async move {
        let mut observed = None;
        let mut renewed_at: Option<Instant> = None;
        let mut unavailable_said = false;
        loop {
            let outcome = attempt(&api, &mut observed, &me).await;
            let now = Instant::now();
            let state = match outcome {
                Ok(Some(_)) => {
                    renewed_at = Some(now);
                    Election::Held
                }
                Ok(None) => {
                    renewed_at = None;
                    Election::NotHeld
                }
                Err(kube::Error::Api(status)) if matches!(status.code, 403 | 404) => {
                    if !unavailable_said {
                        warn!(
                            namespace,
                            lease = LEASE_NAME,
                            error = status.message,
                            "cannot use the status writer's Lease (grant get, create and update \
                             on leases, see deploy/rbac.yaml): the agent on the smallest node \
                             name writes the status of policies without a gateway"
                        );
                        unavailable_said = true;
                    }
                    renewed_at = None;
                    Election::Unavailable
                }
                Err(error) => {
                    // A conflict (another agent was faster) or the API is unreachable: keep
                    // writing only until the renew deadline.
                    let held = renewed_at.is_some_and(|at| now.duration_since(at) < RENEW_DEADLINE);
                    if !matches!(&error, kube::Error::Api(status) if status.code == 409) {
                        warn!(lease = LEASE_NAME, error = %Chain(&error), "cannot renew or acquire the status writer's Lease");
                    }
                    if held {
                        Election::Held
                    } else {
                        Election::NotHeld
                    }
                }
            };
            let before = *election.borrow();
            if before != state {
                match state {
                    Election::Held => info!(
                        lease = LEASE_NAME,
                        "this agent writes the status of policies without a gateway"
                    ),
                    Election::NotHeld if before == Election::Held => {
                        info!(
                            lease = LEASE_NAME,
                            "another agent writes the status of policies without a gateway"
                        );
                    }
                    _ => {}
                }
                election.send_replace(state);
            }
            if election.is_closed() {
                return;
            }
            tokio::time::sleep(RETRY).await;
        }
    });
    elected
}

/// One round: `Some(lease)` when this agent holds it afterwards.
async fn attempt(
    api: &Api<Lease>,
    observed: &mut Option<Observed>,
    me: &str,
) -> kube::Result<Option<Lease>> {
    let current = api.get_opt(LEASE_NAME).await?;
    let record = current.as_ref().map(Record::of);
    let now = MicroTime(Timestamp::now());
    match next_step(record.as_ref(), observed, me, Instant::now()) {
        Step::Follow { .. } => Ok(None),
        Step::Create => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.into()),
                    lease_duration_seconds: Some(duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await.map(Some)
        }
        step @ (Step::Renew | Step::TakeOver) => {
            let mut lease = current.expect("a Lease to renew or take over was read");
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if step == Step::TakeOver {
                spec.holder_identity = Some(me.into());
                spec.acquire_time = Some(now.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                info!(lease = LEASE_NAME, previous = ?record.and_then(|r| r.holder), "taking over the status writer's Lease");
            }
            spec.renew_time = Some(now);
            spec.lease_duration_seconds = Some(duration_seconds());
            // The resourceVersion read makes a concurrent take-over a conflict.
            let name = lease.name_any();
            api.replace(&name, &PostParams::default(), &lease)
                .await
                .map(Some)
        }
    }
}

fn duration_seconds() -> i32 {
    i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, renewed: i64) -> Record {
        Record {
            holder: Some(holder.into()),
            renew_time: Some(Timestamp::from_second(renewed).unwrap()),
            duration: LEASE_DURATION,
        }
    }

    #[test]
    fn no_lease_is_created_an_own_lease_renewed() {
        let now = Instant::now();
        let mut observed = None;
        assert_eq!(next_step(None, &mut observed, "w1", now), Step::Create);
        let mine = held_by("w1", 100);
        assert_eq!(
            next_step(Some(&mine), &mut observed, "w1", now),
            Step::Renew
        );
        let released = Record {
            holder: None,
            ..mine
        };
        assert_eq!(
            next_step(Some(&released), &mut observed, "w2", now),
            Step::TakeOver
        );
    }

    /// Another holder's Lease is taken over only after its record stayed the same for the
    /// lease duration, by this agent's clock; each renewal starts the wait again.
    #[test]
    fn a_lease_is_taken_over_only_when_its_holder_stopped_renewing() {
        let start = Instant::now();
        let mut observed = None;
        let follow = Step::Follow {
            holder: "w1".into(),
        };
        let first = held_by("w1", 100);
        assert_eq!(next_step(Some(&first), &mut observed, "w2", start), follow);
        let just_short = Duration::from_secs(LEASE_DURATION.as_secs() - 1);
        let almost = start + just_short;
        assert_eq!(next_step(Some(&first), &mut observed, "w2", almost), follow);
        // Renewed just in time: the wait starts over.
        let renewed = held_by("w1", 112);
        assert_eq!(
            next_step(Some(&renewed), &mut observed, "w2", almost),
            follow
        );
        let later = almost + just_short;
        assert_eq!(
            next_step(Some(&renewed), &mut observed, "w2", later),
            follow
        );
        let expired = almost + LEASE_DURATION;
        assert_eq!(
            next_step(Some(&renewed), &mut observed, "w2", expired),
            Step::TakeOver
        );
    }

    #[test]
    fn the_holders_duration_counts() {
        let start = Instant::now();
        let mut observed = None;
        let long = Record {
            duration: Duration::from_mins(1),
            ..held_by("w1", 100)
        };
        next_step(Some(&long), &mut observed, "w2", start);
        let after_default = start + LEASE_DURATION * 2;
        assert!(matches!(
            next_step(Some(&long), &mut observed, "w2", after_default),
            Step::Follow { .. }
        ));
    }
}
