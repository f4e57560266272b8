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
    gateway::{GatewayGroup, PortBlock, PortBlockKey, PortBlockOwner},
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
    /// Entries that could not be written (a map full, ...): see [`SyncReport::errors`].
    pub failed: usize,
}

impl SyncStats {
    fn add(&mut self, other: SyncStats) {
        self.written += other.written;
        self.deleted += other.deleted;
        self.failed += other.failed;
    }
}

/// What a sync did, and what it could not do. One map's failure never stops the others, and
/// one entry's failure never stops the rest of its map: a full `CLUSTER_CIDRS` must not leave
/// the policy map unwritten.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub stats: SyncStats,
    /// The first failure of each map that had one.
    pub errors: Vec<DatapathError>,
}

impl SyncReport {
    /// The stats, or the first failure (for callers that need every entry written).
    pub fn into_result(self) -> Result<SyncStats> {
        match self.errors.into_iter().next() {
            Some(error) => Err(error),
            None => Ok(self.stats),
        }
    }

    fn add(&mut self, synced: MapSync) {
        self.stats.add(synced.stats);
        self.errors.extend(synced.error);
    }
}

/// One map's sync: the stats, with the first error if an entry could not be written.
struct MapSync {
    stats: SyncStats,
    error: Option<DatapathError>,
}

impl MapSync {
    fn failed(error: DatapathError) -> Self {
        Self {
            stats: SyncStats::default(),
            error: Some(error),
        }
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
    /// Gateway group id -> candidates in order of preference.
    pub gateway_groups: BTreeMap<u32, Vec<Ipv4Addr>>,
    /// Gateway group id -> `GatewayGroup::flags` (only non-zero ones).
    pub group_flags: BTreeMap<u32, u32>,
    /// Floating egress IP -> this node's block of its ports (first, count).
    pub own_port_blocks: BTreeMap<Ipv4Addr, (u16, u16)>,
    /// (floating egress IP, block index) -> the node owning the block.
    pub port_block_owners: BTreeMap<(Ipv4Addr, u16), Ipv4Addr>,
}

/// A group as the datapath holds it: the first `MAX_CANDIDATES` candidates.
pub(super) fn gateway_group(candidates: &[Ipv4Addr]) -> GatewayGroup {
    let mut group = GatewayGroup::default();
    for (slot, ip) in group.candidates.iter_mut().zip(candidates) {
        *slot = ip.octets();
    }
    group.count = u32::try_from(candidates.len().min(group.candidates.len())).unwrap_or(0);
    group
}

impl Datapath {
    /// Makes the maps hold exactly `desired`, writing only entries that differ and deleting
    /// the ones not wanted (mark and sweep against what the kernel really holds).
    pub fn sync_maps(&mut self, desired: &MapContents) -> SyncReport {
        let mut report = SyncReport::default();
        // Groups are named by their content: new ones go in before the policy entries that
        // name them, old ones out after the last entry naming them is gone.
        let groups: BTreeMap<u32, GatewayGroup> = desired
            .gateway_groups
            .iter()
            .map(|(id, candidates)| {
                let flags = desired.group_flags.get(id).copied().unwrap_or(0);
                (
                    *id,
                    GatewayGroup {
                        flags,
                        ..gateway_group(candidates)
                    },
                )
            })
            .collect();
        let mut groups_and_old = self
            .current::<u32, GatewayGroup>(map_names::GATEWAY_GROUPS)
            .unwrap_or_default();
        groups_and_old.extend(groups.iter().map(|(id, group)| (*id, *group)));
        report.add(self.sync_hash(map_names::GATEWAY_GROUPS, &groups_and_old));
        // Blocks before the entries that make this node translate with them.
        let own_blocks = desired
            .own_port_blocks
            .iter()
            .map(|(ip, (first, count))| {
                let block = PortBlock {
                    first: *first,
                    count: *count,
                    _pad: 0,
                };
                (ip.octets(), block)
            })
            .collect();
        report.add(self.sync_hash(map_names::OWN_PORT_BLOCKS, &own_blocks));
        let owners = desired
            .port_block_owners
            .iter()
            .map(|((ip, block), owner)| {
                let key = PortBlockKey {
                    egress_ip: ip.octets(),
                    block: *block,
                    _pad: 0,
                };
                let owner = PortBlockOwner {
                    node_ip: owner.octets(),
                    _pad: 0,
                };
                (key, owner)
            })
            .collect();
        report.add(self.sync_hash(map_names::PORT_BLOCK_OWNERS, &owners));
        report.add(self.sync_lpm(map_names::POLICIES, &desired.policies));
        report.add(self.sync_hash(map_names::GATEWAY_GROUPS, &groups));
        let cluster_cidrs = desired
            .cluster_cidrs
            .iter()
            .map(|net| {
                let key = (u32::from(net.prefix_len()), net.network().octets());
                (key, ClusterCidr::default())
            })
            .collect();
        report.add(self.sync_lpm(map_names::CLUSTER_CIDRS, &cluster_cidrs));
        let nodes = desired
            .nodes
            .iter()
            .map(|ip| (ip.octets(), NodeInfo::default()))
            .collect();
        report.add(self.sync_hash(map_names::NODES, &nodes));
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
        report.add(self.sync_hash(map_names::LOCAL_PODS, &local_pods));
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
        report.add(self.sync_hash(map_names::EGRESS_IPS, &egress_ips));
        report
    }

    /// What a hash map holds now; `None` when it cannot be read (the sync reports that).
    fn current<K: Pod + Ord, V: Pod>(&mut self, name: &'static str) -> Option<BTreeMap<K, V>> {
        let map: HashMap<&mut MapData, K, V> = self.map_mut(name).ok()?;
        map.iter().collect::<Result<_, _>>().ok()
    }

    fn sync_hash<K: Pod + Ord, V: Pod + PartialEq>(
        &mut self,
        name: &'static str,
        desired: &BTreeMap<K, V>,
    ) -> MapSync {
        let map_err = |source| DatapathError::Map { name, source };
        let mut map: HashMap<&mut MapData, K, V> = match self.map_mut(name) {
            Ok(map) => map,
            Err(error) => return MapSync::failed(error),
        };
        let current: BTreeMap<K, V> = match map.iter().collect::<Result<_, _>>() {
            Ok(current) => current,
            Err(error) => return MapSync::failed(map_err(error)),
        };
        let diff = diff_maps(&current, desired);
        let mut writes = Writes::new(&diff);
        for key in &diff.deletes {
            writes.note(ignore_missing(map.remove(key)).map_err(map_err), true);
        }
        for (key, value) in &diff.upserts {
            writes.note(map.insert(key, value, 0).map_err(map_err), false);
        }
        writes.finish()
    }

    fn sync_lpm<K: Pod + Ord, V: Pod + PartialEq>(
        &mut self,
        name: &'static str,
        desired: &BTreeMap<(u32, K), V>,
    ) -> MapSync {
        let map_err = |source| DatapathError::Map { name, source };
        let mut map: LpmTrie<&mut MapData, K, V> = match self.map_mut(name) {
            Ok(map) => map,
            Err(error) => return MapSync::failed(error),
        };
        let current: Result<BTreeMap<(u32, K), V>, _> = map
            .iter()
            .map(|entry| entry.map(|(key, value)| ((key.prefix_len(), key.data()), value)))
            .collect();
        let current = match current {
            Ok(current) => current,
            Err(error) => return MapSync::failed(map_err(error)),
        };
        let diff = diff_maps(&current, desired);
        let mut writes = Writes::new(&diff);
        for (prefix, data) in &diff.deletes {
            let removed = ignore_missing(map.remove(&Key::new(*prefix, *data)));
            writes.note(removed.map_err(map_err), true);
        }
        for ((prefix, data), value) in &diff.upserts {
            let inserted = map.insert(&Key::new(*prefix, *data), value, 0);
            writes.note(inserted.map_err(map_err), false);
        }
        writes.finish()
    }
}

/// Counts a map's writes, keeping going past failures and keeping the first.
struct Writes {
    stats: SyncStats,
    first_error: Option<DatapathError>,
}

impl Writes {
    fn new<K, V>(diff: &Diff<K, V>) -> Self {
        Self {
            stats: SyncStats {
                written: diff.upserts.len(),
                deleted: diff.deletes.len(),
                failed: 0,
            },
            first_error: None,
        }
    }

    fn note(&mut self, result: Result<()>, delete: bool) {
        if let Err(error) = result {
            if delete {
                self.stats.deleted -= 1;
            } else {
                self.stats.written -= 1;
            }
            self.stats.failed += 1;
            self.first_error.get_or_insert(error);
        }
    }

    fn finish(self) -> MapSync {
        MapSync {
            stats: self.stats,
            error: self.first_error,
        }
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
