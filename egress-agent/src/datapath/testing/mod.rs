//! Test support for the TC programs (feature `test-programs`): the datapath tests
//! (`tests/datapath`) and the benchmarks run the programs through `BPF_PROG_TEST_RUN` with the
//! frames built here.

pub mod packets;

/// The datapath object with the programs only `BPF_PROG_TEST_RUN` runs (`test_from_tunnel`,
/// `bench_empty`, `bench_parse_only`) besides the agent's own.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/test-programs/egress-ebpf"));
