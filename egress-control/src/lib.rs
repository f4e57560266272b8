//! The egress gateway's pure control plane: what the maps of a node should hold.
//!
//! Data flows top-down through three modules:
//! - [`parse`]: manifest text (`kubectl get -o yaml`) -> objects, with errors naming the file,
//!   the object and the field;
//! - [`inventory`]: the cluster's Nodes, Namespaces, Pods and validated policies, and the
//!   label selectors that tie them together;
//! - [`desired`]: for one node, the contents of every BPF map, and the diff against what is
//!   programmed; [`gateways`] orders each pod's candidate gateways for it, and [`floating`]
//!   leases floating egress IPs' port blocks to the nodes that translate with them.
//!
//! No kernel, no async, no I/O: the agent (`egress-agent`) reads the files and the API server
//! and hands the bytes and objects in; the fuzz targets (`fuzz/`) drive it the same way.

pub mod desired;
pub mod floating;
pub mod gateways;
pub mod inventory;
pub mod parse;
