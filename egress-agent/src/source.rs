//! Where the cluster state comes from. Every source (the manifests folder today, the
//! Kubernetes API next) publishes complete snapshots on a watch channel; the reconcile loop
//! only ever sees the latest one, so bursts of changes collapse into one reconcile.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};
use tracing::warn;

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
    /// `metadata.generation` of every policy object, valid or not, when the source knows it
    /// (the Kubernetes API does): the policy status says which spec it describes.
    pub policy_generations: BTreeMap<String, i64>,
    /// When the source published it, to measure event-to-datapath latency.
    pub published: Option<Instant>,
}

/// Safety net behind inotify: how often the manifests folder is compared anyway (inotify
/// misses changes behind symlinks that point out of the folder, or when its queue overflows).
const MANIFEST_POLL: Duration = Duration::from_millis(500);
/// Editors write a file in several steps; wait this long after an event before reading.
const SETTLE: Duration = Duration::from_millis(5);

/// Watches a manifests folder: a new snapshot whenever a file changes (path, size, mtime),
/// noticed through inotify within milliseconds.
pub fn manifests(dir: PathBuf) -> watch::Receiver<Arc<Snapshot>> {
    let first = load(&dir);
    let (sender, receiver) = watch::channel(Arc::new(first));
    let (wake, mut woken) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |_event| {
        // A full channel already holds a wake-up: nothing is lost.
        let _ = wake.try_send(());
    })
    .and_then(|mut watcher| {
        watcher.watch(&dir, RecursiveMode::Recursive)?;
        Ok(watcher)
    });
    let watcher = match watcher {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            warn!(%error, dir = %dir.display(), "no inotify watch; polling the folder instead");
            None
        }
    };
    tokio::spawn(async move {
        // Dropping the watcher would stop the events.
        let _watcher = watcher;
        let mut fingerprint = manifests::fingerprint(&dir);
        loop {
            tokio::select! {
                _ = woken.recv() => tokio::time::sleep(SETTLE).await,
                _ = tokio::time::sleep(MANIFEST_POLL) => {}
            }
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
        policy_generations: BTreeMap::new(),
        published: Some(Instant::now()),
    }
}
