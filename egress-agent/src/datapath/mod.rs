//! The kernel side of the agent: [`load`] the eBPF object (adopting pinned maps), [`attach`]
//! its programs with pinned TCX links, [`sync`] map contents by diff, expire flows ([`gc`]),
//! and read pinned state back ([`pinned`]); [`pins`] is the layout on bpffs.

mod attach;
mod gc;
mod load;
pub mod pinned;
mod pins;
mod sync;
#[cfg(feature = "test-programs")]
pub mod testing;

use std::{collections::BTreeSet, path::PathBuf};

pub use attach::{Attachment, Hook};
use aya::{
    Ebpf, Pod,
    maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray},
    programs::{Program, ProgramError, SchedClassifier, Xdp},
};
use egress_common::{
    counters::{Counter, reason},
    map_names,
    policy::{PolicyKey, PolicyValue},
};
pub use gc::{Timeouts, monotonic_now_ns};
pub use load::{MapSizes, OBJECT};
pub use pins::{DEFAULT_BPFFS, PinError, PinLayout};
pub use sync::{MapContents, SyncReport, SyncStats, check_capacity};
use thiserror::Error;

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

pub struct Datapath {
    ebpf: Ebpf,
    pins: PinLayout,
    /// Pinned links whose program this process has already replaced with its own.
    refreshed: BTreeSet<Attachment>,
    /// XDP attachments the kernel refused (said once; the TC program answers instead).
    xdp_refused: BTreeSet<Attachment>,
    /// `drop_nat_exhausted` + `drop_flow_table_full` as the last garbage collection saw
    /// them: when they grew, flows were refused, and ports held for a remote's TIME_WAIT are
    /// given up.
    refused_flows_seen: u64,
}

impl Datapath {
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

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    typed_program(ebpf, name)
}

fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    typed_program(ebpf, name)
}

fn typed_program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}
