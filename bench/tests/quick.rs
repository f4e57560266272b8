//! `cargo xtask bench --quick` must keep working: runs `egress-bench --quick` (every section,
//! tiny counts; the failover section's 2 trials per fault type take about 50 s of it) and
//! checks the report has every section and that the figures are the ones the benchmarks
//! claim to measure. Timings themselves are never asserted.
#![allow(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

use std::{path::PathBuf, process::Command};

use egress_tests::skip_unless_root;
use serde_json::Value;

#[test]
fn quick_benchmark_writes_every_section() {
    skip_unless_root!();
    let out = std::env::temp_dir().join(format!("egress-bench-quick-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_egress-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(&out)
        .env("EGRESS_LOAD_BIN", env!("CARGO_BIN_EXE_egress-load"))
        .env(
            "EGRESS_PEER_BIN",
            egress_tests::binaries::require("egress-peer").expect("egress-peer"),
        )
        .status()
        .expect("running egress-bench");
    assert!(status.success(), "egress-bench --quick failed ({status})");

    let json = std::fs::read_to_string(out.join("latest.json")).expect("latest.json");
    let doc: Value = serde_json::from_str(&json).expect("latest.json is JSON");
    for section in [
        "host",
        "datapath",
        "control_plane",
        "traffic",
        "nat_pressure",
        "manifest_latency",
        "failover",
        "probe_cost",
        "targets",
    ] {
        assert!(!doc[section].is_null(), "section {section} missing: {json}");
    }
    assert!(doc["host"]["cores"].as_u64().unwrap_or(0) > 0);

    // Every verdict path and both floors were measured.
    let ids: Vec<&str> = doc["datapath"]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    for id in [
        "floor/empty",
        "floor/parse_only",
        "from_pod/no_match",
        "from_pod/excluded",
        "from_pod/no_gateway_drop",
        "from_pod/tunnel_redirect",
        "from_tunnel/snat_new_flow",
        "from_tunnel/snat_existing_flow",
        "from_egress/reverse_snat",
        "from_tunnel/probe_answer",
    ] {
        assert!(ids.contains(&id), "datapath case {id} missing: {ids:?}");
    }
    assert!(
        !doc["control_plane"]["results"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Three paths, each with every metric, in the one run.
    let run = &doc["traffic"]["runs"][0];
    for path in ["direct", "ours", "kernel"] {
        for metric in [
            "tcp_1_stream_gbps",
            "tcp_4_streams_gbps",
            "rr_p99_us",
            "tcp_connections_per_s",
        ] {
            assert!(
                run[path][metric].as_f64().is_some(),
                "{path} {metric} missing: {run}"
            );
        }
    }

    // The port space (100 ports in the quick run) ran out: the rest failed, counted, and
    // the connections that got through still work.
    let nat = &doc["nat_pressure"];
    let established = nat["established"].as_u64().unwrap();
    assert!(
        established > 0 && established <= nat["port_space"].as_u64().unwrap(),
        "{nat}"
    );
    assert!(nat["failed"].as_u64().unwrap() > 0, "{nat}");
    assert!(nat["drop_nat_exhausted"].as_u64().unwrap() > 0, "{nat}");
    assert_eq!(nat["still_working_after"], nat["established"], "{nat}");

    assert_eq!(doc["manifest_latency"]["timed_out"], 0);

    // Every fault type ran its trials (2 in the quick run), each stream went through the
    // first candidate, and the ones that fail over went on through the next.
    let faults = doc["failover"]["faults"].as_array().unwrap();
    let ids: Vec<&str> = faults.iter().filter_map(|f| f["id"].as_str()).collect();
    assert_eq!(
        ids,
        [
            "links_down",
            "egress_interface_down",
            "egress_ip_removed",
            "node_deleted",
            "agent_killed"
        ]
    );
    for fault in faults {
        let trials = fault["trials"].as_array().unwrap();
        assert_eq!(trials.len(), 2, "{fault}");
        for trial in trials {
            let sources = trial["sources"].as_array().unwrap();
            assert!(sources.contains(&"192.0.2.12".into()), "{trial}");
            if fault["failover_expected"] == true {
                assert!(sources.contains(&"192.0.2.13".into()), "{trial}");
            }
        }
        assert!(fault["gap_ms"]["median"].as_f64().is_some(), "{fault}");
    }
    let probe_load = &doc["failover"]["probe_load"];
    assert!(
        !probe_load["runs"].as_array().unwrap().is_empty(),
        "{probe_load}"
    );
    assert!(doc["probe_cost"]["bpf_ns_per_probe"].as_f64().is_some());
    for file in ["latest.md", "latest.svg"] {
        let path: PathBuf = out.join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            text.len() > 500,
            "{} is missing or nearly empty",
            path.display()
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
