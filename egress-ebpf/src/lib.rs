#![no_std]
// The programs live in the binary target; this empty library lets egress-agent name the
// crate as a build dependency (so cargo rebuilds the agent when the datapath changes).
