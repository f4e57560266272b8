//! Packet-in, verdict-and-packet-out tests of the TC and XDP programs through `BPF_PROG_TEST_RUN`,
//! covering at least the scenarios of Cilium's own egress gateway BPF tests, a file per
//! program. They need root (`CAP_BPF`) like the agent itself, and the object with the test
//! programs (feature `test-programs`).
#![allow(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

mod cilium_scenarios;
mod failover;
mod floating;
mod fragments;
mod from_egress;
mod from_pod;
mod from_tunnel;
mod full_maps;
mod probe_responder;
mod support;
mod tcp_lifecycle;
