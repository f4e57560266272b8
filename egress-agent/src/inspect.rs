//! Read-only commands: `check` and `bpf ...`, printing what users know from
//! `cilium-dbg bpf egress list`.

use std::{net::Ipv4Addr, path::Path, process::ExitCode};

use anyhow::Context as _;
use egress_common::{
    counters::reason,
    flow::{FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TcpState},
    map_names,
    nat::NatForward,
    policy::{GATEWAY_EXCLUDED, GATEWAY_NONE},
};
use egress_control::desired::{self, LocalNetwork};
use serde::Serialize;

use crate::{
    datapath::{PinLayout, pinned},
    source::manifests,
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Exit code of `check` when the manifests imply more policy entries than the map holds.
pub const EXIT_OVER_CAPACITY: u8 = 3;

pub fn check(dir: &Path, policy_map_size: u32) -> anyhow::Result<ExitCode> {
    let loaded = manifests::load_dir(dir);
    for error in &loaded.errors {
        eprintln!("{error}");
    }
    for warning in &loaded.warnings {
        eprintln!("warning: {warning}");
    }
    let inventory = &loaded.inventory;
    println!(
        "{} policies, {} nodes, {} namespaces, {} pods loaded; {} objects refused ({} errors), \
         {} warnings",
        inventory.policies.len(),
        inventory.nodes.len(),
        inventory.namespaces.len(),
        inventory.pods.len(),
        loaded.refused_objects(),
        loaded.errors.len(),
        loaded.warnings.len()
    );
    // Policy entries are the same on every node (only egress IPs differ on gateways), so
    // any node name counts them.
    let mut desired = desired::desired_state(inventory, "", &LocalNetwork::default());
    let fit = desired.fit_policy_map(policy_map_size as usize);
    println!(
        "{} policy entries for a policy map of {policy_map_size}",
        fit.wanted
    );
    if fit.dropped > 0 {
        eprintln!(
            "error: {} policy entries do not fit in a policy map of {policy_map_size} \
             (--policy-map-size): {} entries of {} pods would not be programmed and their \
             traffic not steered",
            fit.wanted, fit.dropped, fit.dropped_pods
        );
        return Ok(ExitCode::from(EXIT_OVER_CAPACITY));
    }
    Ok(if loaded.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Serialize)]
struct EgressEntry {
    #[serde(rename = "sourceIP")]
    source_ip: String,
    #[serde(rename = "destCIDR")]
    dest_cidr: String,
    #[serde(rename = "egressIP")]
    egress_ip: String,
    #[serde(rename = "gatewayIP")]
    gateway_ip: String,
}

pub fn egress_list(bpffs: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let pins = PinLayout::new(bpffs);
    let entries = pinned::policies(&pins)
        .with_context(|| format!("reading the policy map under {}", bpffs.display()))?;
    let entries: Vec<EgressEntry> = entries
        .into_iter()
        .map(|(prefix, key, value)| EgressEntry {
            source_ip: Ipv4Addr::from(key.source_ip).to_string(),
            dest_cidr: format!(
                "{}/{}",
                Ipv4Addr::from(key.dest_ip),
                prefix.saturating_sub(32)
            ),
            egress_ip: Ipv4Addr::from(value.egress_ip).to_string(),
            gateway_ip: Ipv4Addr::from(value.gateway_ip).to_string(),
        })
        .collect();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
        Output::Table => {
            let rows = entries.iter().map(|entry| {
                let gateway = match entry.gateway_ip.parse::<Ipv4Addr>().map(|ip| ip.octets()) {
                    Ok(GATEWAY_NONE) => "Not Found".to_owned(),
                    Ok(GATEWAY_EXCLUDED) => "Excluded CIDR".to_owned(),
                    _ => entry.gateway_ip.clone(),
                };
                vec![
                    entry.source_ip.clone(),
                    entry.dest_cidr.clone(),
                    entry.egress_ip.clone(),
                    gateway,
                ]
            });
            print_table(
                &["Source IP", "Destination CIDR", "Egress IP", "Gateway IP"],
                rows,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NatEntry {
    protocol: &'static str,
    pod: String,
    destination: String,
    egress: String,
    pod_node: String,
    state: &'static str,
    last_seen_ns: u64,
}

/// A TCP connection's state as the datapath tracked it; other flows are just "active".
fn flow_state(protocol: u8, flags: u32) -> &'static str {
    if protocol != PROTO_TCP {
        return "active";
    }
    match TcpState::of(flags) {
        TcpState::Open => "established",
        TcpState::HalfClosed => "half-closed",
        TcpState::Closed => "closed",
    }
}

pub fn nat_list(bpffs: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let pins = PinLayout::new(bpffs);
    let entries: Vec<(FlowKey, NatForward)> = pinned::hash(&pins, map_names::NAT_FORWARD)
        .with_context(|| format!("reading the NAT map under {}", bpffs.display()))?;
    let entries: Vec<NatEntry> = entries
        .into_iter()
        .map(|(flow, nat)| NatEntry {
            protocol: protocol_name(flow.protocol),
            pod: endpoint(flow.src_ip, flow.src_port),
            destination: endpoint(flow.dst_ip, flow.dst_port),
            egress: endpoint(nat.nat_ip, nat.nat_port),
            pod_node: Ipv4Addr::from(nat.pod_node_ip).to_string(),
            state: flow_state(flow.protocol, nat.flags),
            last_seen_ns: nat.last_seen_ns,
        })
        .collect();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
        Output::Table => print_table(
            &[
                "Protocol",
                "Pod",
                "Destination",
                "Egress",
                "Pod node",
                "State",
            ],
            entries.iter().map(|entry| {
                vec![
                    entry.protocol.to_owned(),
                    entry.pod.clone(),
                    entry.destination.clone(),
                    entry.egress.clone(),
                    entry.pod_node.clone(),
                    entry.state.to_owned(),
                ]
            }),
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct CounterEntry {
    packets: u64,
    bytes: u64,
}

pub fn counters(bpffs: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let pins = PinLayout::new(bpffs);
    let counters = pinned::counters(&pins)
        .with_context(|| format!("reading counters under {}", bpffs.display()))?;
    let named = reason::NAMES.iter().zip(counters.iter());
    match output {
        Output::Json => {
            let map: std::collections::BTreeMap<&str, CounterEntry> = named
                .map(|(name, counter)| {
                    (
                        *name,
                        CounterEntry {
                            packets: counter.packets,
                            bytes: counter.bytes,
                        },
                    )
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&map)?);
        }
        Output::Table => print_table(
            &["Reason", "Packets", "Bytes"],
            named.map(|(name, counter)| {
                vec![
                    (*name).to_owned(),
                    counter.packets.to_string(),
                    counter.bytes.to_string(),
                ]
            }),
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_ICMP => "ICMP",
        _ => "other",
    }
}

fn endpoint(ip: [u8; 4], port: [u8; 2]) -> String {
    format!("{}:{}", Ipv4Addr::from(ip), u16::from_be_bytes(port))
}

/// Tab-separated like cilium-dbg, padded so columns line up in a terminal.
fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let widths: Vec<usize> = header
        .iter()
        .enumerate()
        .map(|(i, title)| {
            rows.iter()
                .map(|row| row[i].len())
                .chain(std::iter::once(title.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", padded.join("\t").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row);
    }
}
