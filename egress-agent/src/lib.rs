//! The node agent of the eBPF egress gateway.
//!
//! Data flows top-down: [`cli`] parses the flags into one validated [`config::AgentConfig`];
//! [`run`] starts the agent; [`source`] publishes snapshots of the cluster (a manifests folder
//! or the Kubernetes API); [`reconcile`] turns each into the [`datapath`]'s maps and
//! attachments through the pure control plane (`egress-control`) and publishes a
//! [`report`], which [`metrics`] and [`status`] read. [`inspect`] prints the pinned state
//! (`bpf egress list`, ...) and checks manifests.

pub mod chain;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod floating;
pub mod health;
pub mod inspect;
pub mod metrics;
pub mod netlink;
pub mod privileges;
pub mod reconcile;
pub mod report;
pub mod run;
pub mod say_once;
pub mod source;
pub mod status;
