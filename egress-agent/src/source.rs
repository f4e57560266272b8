//! Where the cluster state comes from. Every source (the manifests folder today, the
//! Kubernetes API next) publishes complete snapshots on a watch channel; the reconcile loop
//! only ever sees the latest one, so bursts of changes collapse into one reconcile.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::{inventory::Inventory, manifests};

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
    /// When the source published it, to measure event-to-datapath latency.
    pub published: Option<Instant>,
}

/// How often the manifests folder is checked for changes.
const MANIFEST_POLL: Duration = Duration::from_millis(100);

/// Watches a manifests folder: a new snapshot whenever a file changes (path, size, mtime).
pub fn manifests(dir: PathBuf) -> watch::Receiver<Arc<Snapshot>> {
    let first = load(&dir);
    let (sender, receiver) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut fingerprint = manifests::fingerprint(&dir);
        loop {
            tokio::time::sleep(MANIFEST_POLL).await;
            let current = manifests::fingerprint(&dir);
            if current == fingerprint {
                continue;
            }
            fingerprint = current;
            if sender.send(Arc::new(load(&dir))).is_err() {
                return;
            }
        }
    });
    receiver
}

fn load(dir: &std::path::Path) -> Snapshot {
    let loaded = manifests::load_dir(dir);
    let refused = loaded
        .errors
        .iter()
        .map(|error| Refusal {
            policy: (error.object.kind.as_deref() == Some("CiliumEgressGatewayPolicy"))
                .then(|| error.object.name.clone())
                .flatten(),
            message: error.to_string(),
        })
        .collect();
    Snapshot {
        inventory: loaded.inventory,
        refused,
        published: Some(Instant::now()),
    }
}
