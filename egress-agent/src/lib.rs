//! The pure control plane of egress-agent: manifests in, validated inventory, desired map
//! contents out. No kernel, no I/O besides reading the manifests folder.
//!
//! A library so the fuzz targets (`fuzz/`, outside the workspace) can reach the parsers;
//! the `egress-agent` binary (`main.rs`) uses it like any other crate.

pub mod desired;
pub mod inventory;
pub mod manifests;
