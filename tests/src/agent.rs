//! The egress agent as the harness sees it: where its binary is and what its CLI prints.

use std::{
    collections::BTreeMap,
    env,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Gateway value of a policy entry whose policy matched but found no gateway node.
pub const GATEWAY_NOT_FOUND: Ipv4Addr = Ipv4Addr::new(0, 0, 0, 0);
/// Gateway value of an excluded-CIDR entry.
pub const GATEWAY_EXCLUDED: Ipv4Addr = Ipv4Addr::new(0, 0, 0, 1);

/// One row of `egress-agent bpf egress list -o json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EgressEntry {
    #[serde(rename = "sourceIP")]
    pub source_ip: String,
    #[serde(rename = "destCIDR")]
    pub dest_cidr: String,
    #[serde(rename = "egressIP")]
    pub egress_ip: String,
    #[serde(rename = "gatewayIP")]
    pub gateway_ip: String,
}

impl EgressEntry {
    pub fn source(&self) -> Option<Ipv4Addr> {
        self.source_ip.parse().ok()
    }

    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.gateway_ip.parse().ok()
    }

    pub fn egress(&self) -> Option<Ipv4Addr> {
        self.egress_ip.parse().ok()
    }
}

/// One reason of `egress-agent bpf counters -o json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

pub type Counters = BTreeMap<String, Counter>;

/// The agent binary: `$EGRESS_AGENT_BIN`, else `egress-agent` in the cargo target folder.
pub fn agent_binary() -> PathBuf {
    locate_binary("EGRESS_AGENT_BIN", "egress-agent")
}

/// The peer binary: `$EGRESS_PEER_BIN`, else `egress-peer` in the cargo target folder.
/// Integration tests pass `env!("CARGO_BIN_EXE_egress-peer")` instead.
pub fn peer_binary() -> PathBuf {
    locate_binary("EGRESS_PEER_BIN", "egress-peer")
}

/// Finds a workspace binary: explicit env var, `$CARGO_TARGET_DIR/debug`, next to the running
/// executable (tests live in `<target>/debug/deps`), then `<workspace>/target/debug`.
fn locate_binary(env_var: &str, name: &str) -> PathBuf {
    if let Some(path) = env::var_os(env_var) {
        return PathBuf::from(path);
    }
    let mut candidates = Vec::new();
    if let Some(target) = env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(target).join("debug").join(name));
    }
    if let Ok(exe) = env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(name));
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(workspace.join("target").join("debug").join(name));
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .unwrap_or_else(|| candidates.last().cloned().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_egress_list_json() {
        let json = r#"[{"sourceIP":"10.244.1.10","destCIDR":"198.51.100.0/24",
            "egressIP":"0.0.0.0","gatewayIP":"10.0.0.12"}]"#;
        let entries: Vec<EgressEntry> = serde_json::from_str(json).unwrap();
        assert_eq!(entries[0].source(), Some(Ipv4Addr::new(10, 244, 1, 10)));
        assert_eq!(entries[0].gateway(), Some(Ipv4Addr::new(10, 0, 0, 12)));
    }

    #[test]
    fn parses_counters_json() {
        let json = r#"{"drop_no_gateway":{"packets":3,"bytes":180},"reverse_snat":{"packets":0,"bytes":0}}"#;
        let counters: Counters = serde_json::from_str(json).unwrap();
        assert_eq!(counters["drop_no_gateway"].packets, 3);
    }
}
