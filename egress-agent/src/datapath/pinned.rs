//! Read-only views of pinned maps, for the CLI (`egress-agent bpf ...`) and the metrics.

use super::{
    Counter, DatapathError, HashMap, LpmTrie, MapData, PerCpuArray, PinLayout, Pod, PolicyKey,
    PolicyValue, Result, map_names, reason,
};

fn open(pins: &PinLayout, name: &'static str) -> Result<aya::maps::Map> {
    let data =
        MapData::from_pin(pins.map(name)).map_err(|source| DatapathError::Map { name, source })?;
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

/// A pinned hash map to read and write (the prober's health and reply maps).
pub fn hash_map<K: Pod, V: Pod>(
    pins: &PinLayout,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>> {
    HashMap::try_from(open(pins, name)?).map_err(|source| DatapathError::Map { name, source })
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
