//! What the agent last did, published by the reconcile on a watch channel and read by the
//! metrics endpoint, readiness and the policy status writer. A leaf: it imports nothing of
//! the modules that read it.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use egress_control::desired::PolicySummary;

use crate::source::{Refusal, Snapshot};

/// What the agent last did: read by metrics, readiness and the policy status writer.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub node_name: String,
    /// A reconcile has programmed the datapath at least once.
    pub synced: bool,
    pub policies: BTreeMap<String, PolicySummary>,
    pub refused: Vec<Refusal>,
    /// Entries wanted per map, by map name.
    pub map_entries: BTreeMap<&'static str, usize>,
    /// Entries of the flow and NAT maps, as the last garbage collection left them.
    pub flow_entries: BTreeMap<&'static str, usize>,
    pub reconciles: u64,
    pub last_reconcile: Duration,
    /// Time from the source publishing a snapshot to the maps being written; set only by the
    /// reconcile that first programmed that snapshot (periodic re-syncs leave it `None`).
    pub last_event_to_programmed: Option<Duration>,
    /// The snapshot this report describes.
    pub snapshot: Arc<Snapshot>,
    /// Policy entries left out because the policy map is full (0 when everything fits).
    pub policy_entries_dropped: usize,
    /// Map entries the last sync could not write (a node-local map full).
    pub map_write_failures: usize,
}
