//! The egress agent as the harness sees it: what its CLI prints.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Deserialize;

/// Gateway value of a policy entry whose policy matched but found no gateway node.
pub const GATEWAY_NOT_FOUND: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
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
