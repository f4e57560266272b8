//! The kernel side: loads the eBPF object, pins and adopts its maps and TCX links, and
//! writes map contents by diff.

mod gc;
mod pins;
#[cfg(feature = "test-programs")]
pub mod testing;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    hash::Hash,
    net::Ipv4Addr,
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use egress_common::{
    config::DatapathConfig,
    counters::{Counter, reason},
    map_names,
    nodes::{ClusterCidr, EgressIp, LocalPod, NodeInfo},
    policy::{PolicyKey, PolicyValue},
    program_names,
};
use egress_control::desired::diff::{Diff, diff_maps};
pub use gc::{Timeouts, monotonic_now_ns};
use ipnet::Ipv4Net;
pub use pins::{DEFAULT_BPFFS, PinError, PinLayout};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::chain::Chain;

/// The compiled datapath, built by build.rs: the programs the agent attaches, nothing else.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-ebpf"));

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("cannot load the eBPF object")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("eBPF program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("map {name}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("cannot attach {hook} to {ifname} (ifindex {ifindex})")]
    Attach {
        hook: Hook,
        ifname: String,
        ifindex: u32,
        source: ProgramError,
    },
    #[error("pinned link {path}: {message}")]
    Link { path: PathBuf, message: String },
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// Ingress of a local pod's host-side interface.
    FromPod,
    /// Egress of a local pod's host-side interface.
    ToPod,
    /// Ingress of the agent's VXLAN device.
    FromTunnel,
    /// Ingress of an interface holding an egress IP.
    FromEgress,
}

impl Hook {
    const ALL: [Hook; 4] = [
        Hook::FromPod,
        Hook::ToPod,
        Hook::FromTunnel,
        Hook::FromEgress,
    ];

    pub fn program(self) -> &'static str {
        match self {
            Hook::FromPod => program_names::FROM_POD,
            Hook::ToPod => program_names::TO_POD,
            Hook::FromTunnel => program_names::FROM_TUNNEL,
            Hook::FromEgress => program_names::FROM_EGRESS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::ToPod => TcAttachType::Egress,
            _ => TcAttachType::Ingress,
        }
    }

    fn from_program(name: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|hook| hook.program() == name)
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.program())
    }
}

/// One program on one interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attachment {
    pub ifname: String,
    pub ifindex: u32,
    pub hook: Hook,
}

impl Attachment {
    /// `<ifindex>-<hook>-<ifname>`: bpffs refuses names with a '.', which interface names
    /// may hold (VLANs), so dots become ':', a character interface names cannot have.
    fn pin_name(&self) -> String {
        format!(
            "{}-{}-{}",
            self.ifindex,
            self.hook.program(),
            self.ifname.replace('.', ":")
        )
    }

    fn from_pin_name(name: &str) -> Option<Self> {
        let mut parts = name.splitn(3, '-');
        let ifindex = parts.next()?.parse().ok()?;
        let hook = Hook::from_program(parts.next()?)?;
        let ifname = parts.next()?.replace(':', ".");
        Some(Self {
            ifname,
            ifindex,
            hook,
        })
    }
}

/// Map capacities, settable at load time.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub policies: u32,
    pub nat: u32,
}

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

pub struct Datapath {
    ebpf: Ebpf,
    pins: PinLayout,
    /// Pinned links whose program this process has already replaced with its own.
    refreshed: BTreeSet<Attachment>,
}

impl Datapath {
    /// Loads the object, reusing maps pinned by an earlier agent (so NAT and flow state
    /// survive a restart), and loads the programs into the kernel.
    pub fn load(pins: PinLayout, sizes: MapSizes) -> Result<Self> {
        pins.prepare()?;
        let paths: Vec<(&'static str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, pins.map(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(map_names::POLICIES, sizes.policies)
            .map_max_entries(map_names::NAT_FORWARD, sizes.nat)
            .map_max_entries(map_names::NAT_REVERSE, sizes.nat);
        let mut ebpf = loader.load(OBJECT)?;
        for hook in Hook::ALL {
            program_mut(&mut ebpf, hook.program())?
                .load()
                .map_err(|source| DatapathError::Program {
                    name: hook.program(),
                    source,
                })?;
        }
        Ok(Self {
            ebpf,
            pins,
            refreshed: BTreeSet::new(),
        })
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    /// Detaches and unpins what agents of other map-layout versions left.
    pub fn retire_other_versions(&self) {
        match self.pins.remove_other_versions() {
            Ok(removed) if !removed.is_empty() => {
                info!(?removed, "removed the pins of other map-layout versions");
            }
            Ok(_) => {}
            Err(error) => {
                warn!(error = %Chain(&error), "cannot remove the pins of other map-layout versions");
            }
        }
    }

    pub fn write_config(&mut self, config: DatapathConfig) -> Result<()> {
        let mut array: Array<&mut MapData, DatapathConfig> = self.map_mut(map_names::CONFIG)?;
        array
            .set(0, config, 0)
            .map_err(|source| DatapathError::Map {
                name: map_names::CONFIG,
                source,
            })
    }

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

    /// Attaches exactly the wanted programs: new attachments are made and pinned, pinned
    /// ones from an earlier agent get this agent's program (atomically, through the link),
    /// and attachments no longer wanted are removed. Errors for one interface do not stop
    /// the others.
    pub fn sync_attachments(&mut self, desired: &BTreeSet<Attachment>) -> Vec<DatapathError> {
        let mut errors = Vec::new();
        let pinned = match self.pinned_attachments() {
            Ok(pinned) => pinned,
            Err(error) => return vec![error],
        };
        for (attachment, path) in &pinned {
            if !desired.contains(attachment) {
                debug!(ifname = attachment.ifname, hook = %attachment.hook, "detaching");
                if let Err(source) = fs::remove_file(path) {
                    errors.push(DatapathError::Link {
                        path: path.clone(),
                        message: source.to_string(),
                    });
                }
                self.refreshed.remove(attachment);
            }
        }
        for attachment in desired {
            if self.refreshed.contains(attachment) {
                continue;
            }
            let result = match pinned.get(attachment) {
                Some(path) => self.replace_program(attachment, path),
                None => self.attach(attachment),
            };
            match result {
                Ok(()) => {
                    self.refreshed.insert(attachment.clone());
                }
                Err(error) => errors.push(error),
            }
        }
        errors
    }

    fn pinned_attachments(&self) -> Result<BTreeMap<Attachment, PathBuf>> {
        let dir = self.pins.links_dir();
        let entries = fs::read_dir(&dir).map_err(|source| PinError::ReadDir {
            path: dir.clone(),
            source,
        })?;
        Ok(entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                Attachment::from_pin_name(name.to_str()?).map(|a| (a, entry.path()))
            })
            .collect())
    }

    fn attach(&mut self, attachment: &Attachment) -> Result<()> {
        let path = self.pins.links_dir().join(attachment.pin_name());
        let program = program_mut(&mut self.ebpf, attachment.hook.program())?;
        let attach_err = |source| DatapathError::Attach {
            hook: attachment.hook,
            ifname: attachment.ifname.clone(),
            ifindex: attachment.ifindex,
            source,
        };
        let link_id = program
            .attach_with_options(
                &attachment.ifname,
                attachment.hook.attach_type(),
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_err)?;
        let link = program.take_link(link_id).map_err(attach_err)?;
        let link = FdLink::try_from(link).map_err(|error| link_error(&path, error))?;
        link.pin(&path).map_err(|error| link_error(&path, error))?;
        info!(ifname = attachment.ifname, hook = %attachment.hook, "attached");
        Ok(())
    }

    fn replace_program(&mut self, attachment: &Attachment, path: &PathBuf) -> Result<()> {
        let link = PinnedLink::from_pin(path).map_err(|error| link_error(path, error))?;
        let link = SchedClassifierLink::try_from(FdLink::from(link))
            .map_err(|error| link_error(path, error))?;
        let program = program_mut(&mut self.ebpf, attachment.hook.program())?;
        let link_id = program
            .attach_to_link(link)
            .map_err(|source| DatapathError::Attach {
                hook: attachment.hook,
                ifname: attachment.ifname.clone(),
                ifindex: attachment.ifindex,
                source,
            })?;
        // The pin keeps the link alive; our descriptor can go.
        drop(program.take_link(link_id));
        debug!(ifname = attachment.ifname, hook = %attachment.hook, "adopted pinned link");
        Ok(())
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(DatapathError::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        })?;
        T::try_from(map).map_err(|source| DatapathError::Map { name, source })
    }
}

fn link_error(path: &std::path::Path, error: impl std::error::Error) -> DatapathError {
    // Keep the OS error: aya's Display stops at the syscall name.
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    DatapathError::Link {
        path: path.into(),
        message,
    }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Another CPU's LRU eviction, or a concurrent delete, may have removed the entry first.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
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

/// Read-only views of pinned maps, for the CLI (`egress-agent bpf ...`).
pub mod pinned {
    use super::{
        Counter, DatapathError, HashMap, LpmTrie, MapData, PerCpuArray, PinLayout, Pod, PolicyKey,
        PolicyValue, Result, map_names, reason,
    };

    fn open(pins: &PinLayout, name: &'static str) -> Result<aya::maps::Map> {
        let data = MapData::from_pin(pins.map(name))
            .map_err(|source| DatapathError::Map { name, source })?;
        aya::maps::Map::from_map_data(data).map_err(|source| DatapathError::Map { name, source })
    }

    /// The pinned policy trie itself, for lookups (the benchmarks poll it).
    pub fn policy_trie(pins: &PinLayout) -> Result<LpmTrie<MapData, PolicyKey, PolicyValue>> {
        let name = map_names::POLICIES;
        LpmTrie::try_from(open(pins, name)?).map_err(|source| DatapathError::Map { name, source })
    }

    pub fn policies(pins: &PinLayout) -> Result<Vec<(u32, PolicyKey, PolicyValue)>> {
        let name = map_names::POLICIES;
        let map = open(pins, name)?;
        let trie: LpmTrie<MapData, PolicyKey, PolicyValue> =
            LpmTrie::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        trie.iter()
            .map(|entry| entry.map(|(key, value)| (key.prefix_len(), key.data(), value)))
            .collect::<Result<_, _>>()
            .map_err(|source| DatapathError::Map { name, source })
    }

    pub fn hash<K: Pod + Ord, V: Pod>(pins: &PinLayout, name: &'static str) -> Result<Vec<(K, V)>> {
        let map = open(pins, name)?;
        let hash: HashMap<MapData, K, V> =
            HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        let mut entries: Vec<(K, V)> = hash
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| DatapathError::Map { name, source })?;
        entries.sort_by_key(|a| a.0);
        Ok(entries)
    }

    /// Number of entries of a pinned hash map, walking its keys only (no value copies).
    pub fn hash_len<K: Pod, V: Pod>(pins: &PinLayout, name: &'static str) -> Result<usize> {
        let map = open(pins, name)?;
        let hash: HashMap<MapData, K, V> =
            HashMap::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        let mut count = 0;
        for key in hash.keys() {
            key.map_err(|source| DatapathError::Map { name, source })?;
            count += 1;
        }
        Ok(count)
    }

    /// A pinned map's capacity (`max_entries`), as the kernel holds it.
    pub fn capacity(pins: &PinLayout, name: &'static str) -> Result<u32> {
        aya::maps::MapInfo::from_pin(pins.map(name))
            .map(|info| info.max_entries())
            .map_err(|source| DatapathError::Map { name, source })
    }

    /// Counters summed over CPUs, indexed by reason.
    pub fn counters(pins: &PinLayout) -> Result<Vec<Counter>> {
        let name = map_names::COUNTERS;
        let map = open(pins, name)?;
        let array: PerCpuArray<MapData, Counter> =
            PerCpuArray::try_from(map).map_err(|source| DatapathError::Map { name, source })?;
        (0..reason::COUNT)
            .map(|index| {
                let per_cpu = array
                    .get(&index, 0)
                    .map_err(|source| DatapathError::Map { name, source })?;
                Ok(per_cpu.iter().fold(Counter::default(), |sum, c| Counter {
                    packets: sum.packets + c.packets,
                    bytes: sum.bytes + c.bytes,
                }))
            })
            .collect()
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

#[cfg(test)]
mod pin_name_tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_without_dots() {
        let attachment = Attachment {
            ifname: "eth0.100".into(),
            ifindex: 7,
            hook: Hook::FromEgress,
        };
        let name = attachment.pin_name();
        assert!(!name.contains('.'), "bpffs refuses {name}");
        assert_eq!(Attachment::from_pin_name(&name), Some(attachment));
        assert_eq!(Attachment::from_pin_name("junk"), None);
    }
}
