//! Loading the eBPF object: maps adopted from the pins of an earlier agent (so NAT and flow
//! state survive a restart), programs loaded, the datapath config written.

use std::{collections::BTreeSet, path::PathBuf};

use aya::{
    EbpfLoader,
    maps::{Array, MapData},
};
use egress_common::{config::DatapathConfig, map_names};
use tracing::{info, warn};

use super::{Datapath, DatapathError, Hook, PinLayout, Result, program_mut, xdp_mut};
use crate::chain::Chain;

/// The compiled datapath, built by build.rs: the programs the agent attaches, nothing else.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-ebpf"));

/// Map capacities, settable at load time.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub policies: u32,
    /// Each of NAT_FORWARD and NAT_REVERSE: flows translated on this gateway.
    pub nat: u32,
    /// Each of STEERED_FLOWS and INBOUND_FLOWS: flows of this node's selected pods.
    pub flows: u32,
    /// NODES, and GATEWAY_HEALTH, PROBE_REPLIES and GATEWAY_TRAFFIC (keyed by node too):
    /// every node of the cluster.
    pub nodes: u32,
    /// CLUSTER_CIDRS: nodes' pod CIDRs, every pod IP, `--cluster-cidr` and `--service-cidr`.
    pub cluster: u32,
    /// LOCAL_PODS: pods on this node.
    pub local_pods: u32,
    /// EGRESS_IPS: egress IPs this node serves.
    pub egress_ips: u32,
}

impl MapSizes {
    /// The maps these sizes apply to, with the size of each.
    pub fn by_map(self) -> [(&'static str, u32); 12] {
        [
            (map_names::POLICIES, self.policies),
            (map_names::NAT_FORWARD, self.nat),
            (map_names::NAT_REVERSE, self.nat),
            (map_names::STEERED_FLOWS, self.flows),
            (map_names::INBOUND_FLOWS, self.flows),
            (map_names::NODES, self.nodes),
            (map_names::GATEWAY_HEALTH, self.nodes),
            (map_names::PROBE_REPLIES, self.nodes),
            (map_names::GATEWAY_TRAFFIC, self.nodes),
            (map_names::CLUSTER_CIDRS, self.cluster),
            (map_names::LOCAL_PODS, self.local_pods),
            (map_names::EGRESS_IPS, self.egress_ips),
        ]
    }
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
        for (name, size) in sizes.by_map() {
            loader.map_max_entries(name, size);
            // A pinned map keeps the capacity it was made with (and its entries).
            if let Ok(info) = aya::maps::MapInfo::from_pin(pins.map(name))
                && info.max_entries() != size
            {
                warn!(
                    map = name,
                    pinned = info.max_entries(),
                    wanted = size,
                    "a pinned map keeps its earlier capacity; the new size applies after \
                     `egress-agent cleanup` (which drops its entries) and a restart"
                );
            }
        }
        let mut ebpf = loader.load(OBJECT)?;
        for hook in Hook::ALL {
            let result = if hook.is_xdp() {
                xdp_mut(&mut ebpf, hook.program())?.load()
            } else {
                program_mut(&mut ebpf, hook.program())?.load()
            };
            result.map_err(|source| DatapathError::Program {
                name: hook.program(),
                source,
            })?;
        }
        Ok(Self {
            ebpf,
            pins,
            refreshed: BTreeSet::new(),
            xdp_refused: BTreeSet::new(),
            refused_flows_seen: 0,
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
}

#[cfg(test)]
mod tests {
    use egress_common::program_names;

    use super::*;

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|window| window == needle.as_bytes())
    }

    #[test]
    fn the_shipped_object_has_the_agents_programs_and_no_test_programs() {
        for program in Hook::ALL.map(Hook::program) {
            assert!(contains(OBJECT, program), "{program} missing");
        }
        for test_only in [
            program_names::TEST_FROM_TUNNEL,
            program_names::BENCH_EMPTY,
            program_names::BENCH_PARSE_ONLY,
        ] {
            assert!(!contains(OBJECT, test_only), "{test_only} is in the object");
        }
    }
}
