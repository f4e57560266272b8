//! Writing map contents by diff: only changed entries are written, stale ones deleted.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::{
    Pod,
    maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};
use egress_common::{
    map_names,
    nodes::{ClusterCidr, EgressIp, LocalPod, NodeInfo},
    policy::{PolicyKey, PolicyValue},
};
use egress_control::desired::diff::{Diff, diff_maps};
use ipnet::Ipv4Net;
use tracing::warn;

use super::{Datapath, DatapathError, Result};

/// What a map sync changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub written: usize,
    pub deleted: usize,
}

impl SyncStats {
    fn of<K, V>(diff: &Diff<K, V>) -> Self {
        Self {
            written: diff.upserts.len(),
            deleted: diff.deletes.len(),
        }
    }

    fn add(&mut self, other: SyncStats) {
        self.written += other.written;
        self.deleted += other.deleted;
    }
}

/// The full contents the agent wants in the node-local maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub policies: BTreeMap<(u32, PolicyKey), PolicyValue>,
    pub nodes: BTreeSet<Ipv4Addr>,
    pub cluster_cidrs: BTreeSet<Ipv4Net>,
    pub local_pods: BTreeMap<Ipv4Addr, u32>,
    pub egress_ips: BTreeMap<Ipv4Addr, u32>,
}

impl Datapath {
    /// Makes the maps hold exactly `desired`, writing only entries that differ and deleting
    /// the ones not wanted (mark and sweep against what the kernel really holds).
    pub fn sync_maps(&mut self, desired: &MapContents) -> Result<SyncStats> {
        let mut stats = SyncStats::default();
        stats.add(self.sync_lpm(map_names::POLICIES, &desired.policies)?);
        let cluster_cidrs = desired
            .cluster_cidrs
            .iter()
            .map(|net| {
                let key = (u32::from(net.prefix_len()), net.network().octets());
                (key, ClusterCidr::default())
            })
            .collect();
        stats.add(self.sync_lpm(map_names::CLUSTER_CIDRS, &cluster_cidrs)?);
        let nodes = desired
            .nodes
            .iter()
            .map(|ip| (ip.octets(), NodeInfo::default()))
            .collect();
        stats.add(self.sync_hash(map_names::NODES, &nodes)?);
        let local_pods = desired
            .local_pods
            .iter()
            .map(|(ip, ifindex)| {
                (
                    ip.octets(),
                    LocalPod {
                        ifindex: *ifindex,
                        _pad: 0,
                    },
                )
            })
            .collect();
        stats.add(self.sync_hash(map_names::LOCAL_PODS, &local_pods)?);
        let egress_ips = desired
            .egress_ips
            .iter()
            .map(|(ip, ifindex)| {
                (
                    ip.octets(),
                    EgressIp {
                        ifindex: *ifindex,
                        _pad: 0,
                    },
                )
            })
            .collect();
        stats.add(self.sync_hash(map_names::EGRESS_IPS, &egress_ips)?);
        Ok(stats)
    }

    fn sync_hash<K: Pod + Ord, V: Pod + PartialEq>(
        &mut self,
        name: &'static str,
        desired: &BTreeMap<K, V>,
    ) -> Result<SyncStats> {
        let map_err = |source| DatapathError::Map { name, source };
        let mut map: HashMap<&mut MapData, K, V> = self.map_mut(name)?;
        let current: BTreeMap<K, V> = map.iter().collect::<Result<_, _>>().map_err(map_err)?;
        let diff = diff_maps(&current, desired);
        for key in &diff.deletes {
            ignore_missing(map.remove(key)).map_err(map_err)?;
        }
        for (key, value) in &diff.upserts {
            map.insert(key, value, 0).map_err(map_err)?;
        }
        Ok(SyncStats::of(&diff))
    }

    fn sync_lpm<K: Pod + Ord, V: Pod + PartialEq>(
        &mut self,
        name: &'static str,
        desired: &BTreeMap<(u32, K), V>,
    ) -> Result<SyncStats> {
        let map_err = |source| DatapathError::Map { name, source };
        let mut map: LpmTrie<&mut MapData, K, V> = self.map_mut(name)?;
        let current: BTreeMap<(u32, K), V> = map
            .iter()
            .map(|entry| entry.map(|(key, value)| ((key.prefix_len(), key.data()), value)))
            .collect::<Result<_, _>>()
            .map_err(map_err)?;
        let diff = diff_maps(&current, desired);
        for (prefix, data) in &diff.deletes {
            ignore_missing(map.remove(&Key::new(*prefix, *data))).map_err(map_err)?;
        }
        for ((prefix, data), value) in &diff.upserts {
            map.insert(&Key::new(*prefix, *data), value, 0)
                .map_err(map_err)?;
        }
        Ok(SyncStats::of(&diff))
    }
}

/// Another CPU's LRU eviction, or a concurrent delete, may have removed the entry first.
pub(super) fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        // aya reports a delete of a missing key as the syscall's ENOENT.
        Err(MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Warns once about a map nearing its capacity. Cheap enough to call after every sync.
pub fn check_capacity(name: &str, used: usize, capacity: u32) {
    if used > capacity as usize {
        warn!(
            map = name,
            used, capacity, "more entries wanted than the map holds"
        );
    }
}
