//! Where the cluster state comes from. Every source (a manifests folder, the Kubernetes API)
//! publishes complete snapshots on a watch channel; the reconcile loop only ever sees the
//! latest one, so bursts of changes collapse into one reconcile.

pub mod kubernetes;
pub mod manifests;

use std::{collections::BTreeMap, time::Instant};

use egress_control::inventory::Inventory;

/// An object the source refused, with the reason users should read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Name of the policy concerned, when the refused object is a policy and its name is known.
    pub policy: Option<String>,
    pub message: String,
}

/// One complete view of the cluster.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub inventory: Inventory,
    pub refused: Vec<Refusal>,
    /// Loaded, but worth a look: unknown (misspelt?) policy fields.
    pub warnings: Vec<Refusal>,
    /// `metadata.generation` of every policy object, valid or not, when the source knows it
    /// (the Kubernetes API does): the policy status says which spec it describes.
    pub policy_generations: BTreeMap<String, i64>,
    /// When the source published it, to measure event-to-datapath latency.
    pub published: Option<Instant>,
}
