#![no_std]
#![allow(
    unused_crate_dependencies,
    reason = "empty: the programs, which use the dependencies, are the binary target"
)]
// The programs live in the binary target; this empty library lets egress-agent name the
// crate as a build dependency (so cargo rebuilds the agent when the datapath changes).
