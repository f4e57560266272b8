//! From the results document to the report: per-path summaries and pair-by-pair ratios,
//! the targets of the benchmark issue, `latest.md` and the chart `latest.svg`.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::{Value, json};

use crate::{
    measure::stats::Summary,
    traffic::{METRICS, PATHS},
};

/// Median, min and max of values (NaN-free) as JSON, as [`Summary`] has them; `None` when
/// empty.
pub fn summary(values: &[f64]) -> Option<Value> {
    Summary::of(values.to_vec()).and_then(|summary| serde_json::to_value(summary).ok())
}

fn median(value: &Value) -> Option<f64> {
    value["median"].as_f64()
}

/// Adds `traffic.summary` (per path and metric) and `traffic.ratios` (computed within each
/// run, then summarised) and `targets` to the document.
pub fn analyse(doc: &mut Value) {
    let runs = doc["traffic"]["runs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut per_path = serde_json::Map::new();
    for path in PATHS {
        let mut metrics = serde_json::Map::new();
        for (metric, _, _) in METRICS {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|run| run[path][metric].as_f64())
                .collect();
            metrics.insert(metric.into(), summary(&values).unwrap_or(Value::Null));
        }
        per_path.insert(path.into(), Value::Object(metrics));
    }
    let mut ratios = serde_json::Map::new();
    for (name, a, b) in [
        ("ours/kernel", "ours", "kernel"),
        ("ours/direct", "ours", "direct"),
        ("kernel/direct", "kernel", "direct"),
    ] {
        let mut metrics = serde_json::Map::new();
        for (metric, _, _) in METRICS {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|run| Some(run[a][metric].as_f64()? / run[b][metric].as_f64()?))
                .filter(|ratio| ratio.is_finite())
                .collect();
            metrics.insert(metric.into(), summary(&values).unwrap_or(Value::Null));
        }
        ratios.insert(name.into(), Value::Object(metrics));
    }
    if !doc["traffic"].is_null() {
        doc["traffic"]["summary"] = Value::Object(per_path);
        doc["traffic"]["ratios"] = Value::Object(ratios);
    }
    if !doc["datapath"].is_null() || !doc["failover"].is_null() {
        doc["probe_cost"] = probe_cost(doc);
    }
    doc["targets"] = targets(doc);
}

/// The probing node of the failover section's probe rates.
const POD_NODE_NAME: &str = "k8s-worker-1";

/// Probing nodes the issue sizes the probe load for, and the default probe interval.
const PROBING_NODES: f64 = 5000.0;
const PROBE_INTERVAL_MS: f64 = 50.0;

/// Probes per second a gateway answers for [`PROBING_NODES`] at [`PROBE_INTERVAL_MS`].
fn probes_per_s() -> f64 {
    PROBING_NODES * 1000.0 / PROBE_INTERVAL_MS
}

/// The probe cost on a gateway: ns per probe answered (the BPF program alone, from the
/// datapath section; the kernel path around it, from the failover section's floods), and
/// the share of one core it takes at [`probes_per_s`].
fn probe_cost(doc: &Value) -> Value {
    let cases = doc["datapath"]["cases"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // The first fill level (the smallest maps), where both cases were measured.
    let first = cases
        .first()
        .map(|c| (c["policy_entries"].clone(), c["nat_entries"].clone()));
    let at = |id: &str| {
        cases
            .iter()
            .find(|c| {
                c["id"] == id
                    && Some((c["policy_entries"].clone(), c["nat_entries"].clone())) == first
            })
            .and_then(|c| median(&c["ns_per_packet"]))
    };
    // The default responder: XDP on the underlay. The TC program's figures beside it.
    let bpf = at("probe_responder/probe_answer");
    let pass = at("probe_responder/pass");
    let tc_bpf = at("from_tunnel/probe_answer");
    let empty = at("floor/empty_one_run_per_packet");
    let tc_bpf_net = tc_bpf.zip(empty).map(|(ns, empty)| (ns - empty).max(0.0));
    let in_kernel = median(&doc["failover"]["probe_load"]["xdp_program_ns_per_probe"]);
    let tc_in_kernel = median(&doc["failover"]["probe_load"]["tc_program_ns_per_probe"]);
    let kernel = median(&doc["failover"]["probe_load"]["answer_ns_per_probe"]);
    let tc_kernel = median(&doc["failover"]["probe_load"]["answer_tc_ns_per_probe"]);
    let receive = median(&doc["failover"]["probe_load"]["receive_ns_per_probe"]);
    let share = |ns: Option<f64>| ns.map(|ns| ns * probes_per_s() / 1e9);
    // Demand mode: what a quiet probing node sends (the higher of idle and answered), for
    // as many nodes; measured in the failover section.
    let rates = &doc["failover"]["probe_rates"];
    let quiet_per_node = rates["idle_per_s"]
        .as_f64()
        .zip(rates["answered_per_s"].as_f64())
        .map(|(idle, answered)| idle.max(answered));
    let quiet_probes_per_s = quiet_per_node.map(|rate| rate * PROBING_NODES);
    let quiet_share =
        |ns: Option<f64>| ns.zip(quiet_probes_per_s).map(|(ns, rate)| ns * rate / 1e9);
    json!({
        "quiet_probes_per_node_per_s": quiet_per_node,
        "quiet_probes_per_s": quiet_probes_per_s,
        "quiet_in_kernel_core_share": quiet_share(in_kernel),
        "quiet_tc_in_kernel_core_share": quiet_share(tc_in_kernel),
        "probing_nodes": PROBING_NODES,
        "probe_interval_ms": PROBE_INTERVAL_MS,
        "probes_per_s": probes_per_s(),
        "bpf_ns_per_probe": bpf,
        "in_kernel_ns_per_probe": in_kernel,
        "tc_in_kernel_ns_per_probe": tc_in_kernel,
        "in_kernel_core_share": share(in_kernel),
        "tc_in_kernel_core_share": share(tc_in_kernel),
        "xdp_pass_ns_per_frame": pass,
        "tc_bpf_ns_per_probe": tc_bpf,
        "bpf_empty_one_run_ns": empty,
        "tc_bpf_net_ns_per_probe": tc_bpf_net,
        "kernel_ns_per_probe": kernel,
        "tc_kernel_ns_per_probe": tc_kernel,
        "kernel_receive_ns_per_probe": receive,
        "bpf_core_share": share(bpf),
        "tc_bpf_core_share": share(tc_bpf),
        "tc_bpf_net_core_share": share(tc_bpf_net),
        "kernel_core_share": share(kernel),
        "tc_kernel_core_share": share(tc_kernel),
        "kernel_receive_core_share": share(receive),
    })
}

fn target(
    name: &str,
    goal: &str,
    measured: Option<f64>,
    shown: String,
    met: impl Fn(f64) -> bool,
) -> Value {
    json!({"target": name, "goal": goal, "measured": measured, "shown": shown,
           "met": measured.map(met)})
}

fn targets(doc: &Value) -> Value {
    let mut list = Vec::new();
    if !doc["traffic"].is_null() {
        traffic_targets(doc, &mut list);
    }
    if !doc["datapath"].is_null() {
        bpf_targets(doc, &mut list);
    }
    if !doc["control_plane"].is_null() {
        control_plane_targets(doc, &mut list);
    }
    if !doc["manifest_latency"].is_null() {
        let p99 = doc["manifest_latency"]["p99_ms"].as_f64();
        list.push(target(
            "manifest change to datapath, p99",
            "< 100 ms",
            p99,
            fmt(p99, " ms"),
            |v| v < 100.0,
        ));
    }
    if !doc["failover"].is_null() {
        failover_targets(doc, &mut list);
    }
    if !doc["probe_cost"].is_null() {
        probe_targets(doc, &mut list);
    }
    Value::Array(list)
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.2}{unit}"))
}

fn traffic_targets(doc: &Value, list: &mut Vec<Value>) {
    let ratio = |pair: &str, metric: &str| median(&doc["traffic"]["ratios"][pair][metric]);
    for (metric, label, goal) in [
        (
            "udp_64b_pps",
            "UDP 64-byte packets/s, ours / kernel way",
            1.3,
        ),
        (
            "tcp_connections_per_s",
            "new TCP connections/s, ours / kernel way",
            1.3,
        ),
        (
            "tcp_1_stream_gbps",
            "TCP throughput 1 stream, ours / kernel way",
            1.0,
        ),
        (
            "tcp_4_streams_gbps",
            "TCP throughput 4 streams, ours / kernel way",
            1.0,
        ),
    ] {
        let m = ratio("ours/kernel", metric);
        list.push(target(
            label,
            &format!(">= {goal}x"),
            m,
            fmt(m, "x"),
            move |v| v >= goal,
        ));
    }
    let m = ratio("ours/kernel", "rr_p99_us");
    list.push(target(
        "request-response p99 latency, ours / kernel way",
        "<= 0.9x",
        m,
        fmt(m, "x"),
        |v| v <= 0.9,
    ));
    for metric in ["tcp_1_stream_gbps", "tcp_4_streams_gbps"] {
        let m = ratio("ours/direct", metric);
        list.push(target(
            &format!("{metric}, ours / direct"),
            ">= 0.8x",
            m,
            fmt(m, "x"),
            |v| v >= 0.8,
        ));
    }
}

fn bpf_targets(doc: &Value, list: &mut Vec<Value>) {
    // BPF: the costliest matched repeat path over the parse-only floor, at each fill level;
    // and how much the fill level moves each matched path.
    let cases = doc["datapath"]["cases"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let level = |c: &Value| {
        (
            c["policy_entries"].as_u64().unwrap_or(0),
            c["nat_entries"].as_u64().unwrap_or(0),
        )
    };
    let mut levels: Vec<(u64, u64)> = cases.iter().map(level).collect();
    levels.dedup();
    let mut worst_ratio: Option<f64> = None;
    for lv in &levels {
        let at = |id: &str| {
            cases
                .iter()
                .find(|c| level(c) == *lv && c["id"] == id)
                .and_then(|c| median(&c["ns_per_packet"]))
        };
        let Some(floor) = at("floor/parse_only") else {
            continue;
        };
        for case in cases
            .iter()
            .filter(|c| level(c) == *lv && c["matched"] == true && c["method"] == "repeat")
        {
            if let Some(ns) = median(&case["ns_per_packet"]) {
                worst_ratio = Some(worst_ratio.map_or(ns / floor, |w: f64| w.max(ns / floor)));
            }
        }
    }
    list.push(target(
        "costliest matched BPF path / parse-only floor",
        "<= 4x",
        worst_ratio,
        fmt(worst_ratio, "x"),
        |v| v <= 4.0,
    ));
    if let (Some(&small), Some(&large)) = (levels.first(), levels.last())
        && small != large
    {
        // The path whose cost moves most between the smallest and the largest maps.
        let mut spread: Option<(f64, String)> = None;
        for case in cases
            .iter()
            .filter(|c| level(c) == small && c["matched"] == true)
        {
            let other = cases
                .iter()
                .find(|c| level(c) == large && c["id"] == case["id"]);
            if let (Some(a), Some(b)) = (
                median(&case["ns_per_packet"]),
                other.and_then(|c| median(&c["ns_per_packet"])),
            ) && spread.as_ref().is_none_or(|(s, _)| b / a > *s)
            {
                spread = Some((b / a, case["id"].as_str().unwrap_or("").to_owned()));
            }
        }
        let measured = spread.as_ref().map(|(s, _)| *s);
        let shown = spread.map_or("n/a".into(), |(s, id)| format!("{s:.2}x ({id})"));
        list.push(target(
            &format!(
                "matched BPF paths, policy {} / NAT {} entries over policy {} / NAT {} (worst path)",
                large.0, large.1, small.0, small.1
            ),
            "barely changes (<= 1.10x)",
            measured,
            shown,
            |v| v <= 1.10,
        ));
    }
}

fn control_plane_targets(doc: &Value, list: &mut Vec<Value>) {
    let results = doc["control_plane"]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let combo = results
        .iter()
        .find(|r| r["pods"] == 100_000 && r["policies"] == 100);
    let full = combo.and_then(|c| median(&c["full_reconcile_ms"]));
    list.push(target(
        "full reconcile, 100,000 pods x 100 policies",
        "< 1000 ms",
        full,
        fmt(full, " ms"),
        |v| v < 1000.0,
    ));
    // One pod change at the largest scale measured (the agent recomputes from scratch).
    let largest = results
        .iter()
        .max_by_key(|r| r["pods"].as_u64().unwrap_or(0) * r["policies"].as_u64().unwrap_or(0));
    let pod_change = largest.and_then(|c| median(&c["pod_added_ms"]));
    let scale = largest.map_or(String::new(), |c| {
        format!(" ({} pods x {} policies)", c["pods"], c["policies"])
    });
    list.push(target(
        &format!("one pod added{scale}"),
        "< 5 ms",
        pod_change,
        fmt(pod_change, " ms"),
        |v| v < 5.0,
    ));
}

/// Per fault type: the median and the worst failover gap; the agent killed: no loss; no
/// packet with a wrong source in any trial.
fn failover_targets(doc: &Value, list: &mut Vec<Value>) {
    let faults = doc["failover"]["faults"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ms = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.0} ms"));
    for fault in &faults {
        let label = fault["label"].as_str().unwrap_or("?");
        let trials = fault["trials"].as_array().map_or(0, Vec::len);
        if fault["failover_expected"] == true {
            let m = median(&fault["gap_ms"]);
            list.push(target(
                &format!("failover gap median, {label}"),
                "< 300 ms",
                m,
                format!("{} ({trials} trials)", ms(m)),
                |v| v < 300.0,
            ));
            let worst = fault["gap_ms"]["max"].as_f64();
            list.push(target(
                &format!("failover gap worst, {label}"),
                "< 1000 ms",
                worst,
                format!("{} ({trials} trials)", ms(worst)),
                |v| v < 1000.0,
            ));
        } else {
            let worst_lost = fault["lost_datagrams"]["max"].as_f64();
            list.push(target(
                &format!("datagrams lost, {label} (worst trial)"),
                "0",
                worst_lost,
                format!(
                    "{} (longest pause {})",
                    worst_lost.map_or("n/a".into(), |v| format!("{v:.0}")),
                    ms(fault["gap_ms"]["max"].as_f64())
                ),
                |v| v == 0.0,
            ));
        }
    }
    let leaked: Option<f64> = faults
        .iter()
        .map(|fault| fault["leaked_packets"].as_f64())
        .sum();
    let matched: f64 = faults
        .iter()
        .filter_map(|fault| fault["matched_packets"].as_f64())
        .sum();
    list.push(target(
        "packets of the pod's flows with a wrong source, all failover trials",
        "0",
        leaked,
        format!(
            "{} of {matched:.0}",
            leaked.map_or("n/a".into(), |v| format!("{v:.0}"))
        ),
        |v| v == 0.0,
    ));
}

fn probe_targets(doc: &Value, list: &mut Vec<Value>) {
    let cost = &doc["probe_cost"];
    let pct = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{:.2}%", v * 100.0));
    let bpf = cost["bpf_core_share"].as_f64();
    if bpf.is_some() {
        list.push(target(
            "probe cost on a gateway, 5,000 nodes probing every 50 ms (traffic without replies): the XDP responder",
            "< 1% of one core",
            bpf,
            format!(
                "{} ({} ns per probe; the TC program: {})",
                pct(bpf),
                cost["bpf_ns_per_probe"]
                    .as_f64()
                    .map_or("n/a".into(), fmt_num),
                pct(cost["tc_bpf_core_share"].as_f64())
            ),
            |v| v < 0.01,
        ));
    }
    let kernel = cost["kernel_core_share"].as_f64();
    let in_kernel = cost["in_kernel_core_share"].as_f64();
    let quiet_rate = cost["quiet_probes_per_s"].as_f64();
    if quiet_rate.is_some() {
        for (responder, field, ns_field) in [
            (
                "the TC program (the default)",
                "quiet_tc_in_kernel_core_share",
                "tc_in_kernel_ns_per_probe",
            ),
            (
                "the XDP responder",
                "quiet_in_kernel_core_share",
                "in_kernel_ns_per_probe",
            ),
        ] {
            let share = cost[field].as_f64();
            list.push(target(
                &format!(
                    "probe cost on a gateway, 5,000 quiet probing nodes (idle, or their \
                     traffic answered; demand mode): {responder} under a probe flood (bpf_stats)"
                ),
                "< 1% of one core",
                share,
                format!(
                    "{} ({} probes/s: {:.2} per node; {} ns per probe)",
                    pct(share),
                    thousands(&cost["quiet_probes_per_s"]),
                    cost["quiet_probes_per_node_per_s"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    cost[ns_field].as_f64().map_or("n/a".into(), fmt_num)
                ),
                |v| v < 0.01,
            ));
        }
    }
    if !doc["failover"].is_null() {
        list.push(target(
            "probe cost on a gateway, 5,000 nodes probing every 50 ms (traffic without replies): \
             the XDP responder under a probe flood (bpf_stats)",
            "< 1% of one core",
            in_kernel,
            format!(
                "{} ({} ns per probe; through the TC program: {})",
                pct(in_kernel),
                cost["in_kernel_ns_per_probe"]
                    .as_f64()
                    .map_or("n/a".into(), fmt_num),
                pct(cost["tc_in_kernel_core_share"].as_f64())
            ),
            |v| v < 0.01,
        ));
        list.push(target(
            "probe cost on a gateway, 5,000 nodes probing every 50 ms (traffic without replies): \
             XDP and the kernel path (upper bound)",
            "< 1% of one core",
            kernel,
            format!(
                "{} ({} ns per probe; through the TC program: {})",
                pct(kernel),
                cost["kernel_ns_per_probe"]
                    .as_f64()
                    .map_or("n/a".into(), fmt_num),
                pct(cost["tc_kernel_core_share"].as_f64())
            ),
            |v| v < 0.01,
        ));
    }
}

/// A whole number with thousands separators: 100,000.
fn thousands(value: &Value) -> String {
    let Some(v) = value.as_f64() else {
        return "n/a".into();
    };
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `median [min–max]`.
fn cell(value: &Value) -> String {
    match (
        value["median"].as_f64(),
        value["min"].as_f64(),
        value["max"].as_f64(),
    ) {
        (Some(m), Some(lo), Some(hi)) => {
            format!("{} [{}–{}]", fmt_num(m), fmt_num(lo), fmt_num(hi))
        }
        _ => "n/a".into(),
    }
}

pub fn markdown(doc: &Value) -> String {
    let mut md = String::new();
    let host = &doc["host"];
    let _ = writeln!(
        md,
        "# Benchmark results ({} run)\n",
        doc["mode"].as_str().unwrap_or("?")
    );
    let only = doc["sections"].as_array().map(|sections| {
        sections
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(",")
    });
    let _ = writeln!(
        md,
        "Machine: Linux {}, {}, {} cores. Each figure is the median of {} runs, with [min–max]; \
         ratios are computed within each run, then summarised. Produced by {} in {:.0} s.\n",
        host["kernel"].as_str().unwrap_or("?"),
        host["cpu"].as_str().unwrap_or("?"),
        host["cores"],
        doc["runs"],
        only.map_or("`cargo xtask bench`".into(), |only| format!(
            "`egress-bench --only {only}` (only these sections)"
        )),
        doc["elapsed_seconds"].as_f64().unwrap_or(0.0),
    );
    if !doc["traffic"].is_null() {
        let _ = writeln!(md, "![paths compared](latest.svg)\n");
    }

    let _ = writeln!(
        md,
        "## Targets\n\n| Target | Goal | Measured | Met |\n|---|---|---|---|"
    );
    for t in doc["targets"].as_array().into_iter().flatten() {
        let met = match t["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {met} |",
            t["target"].as_str().unwrap_or(""),
            t["goal"].as_str().unwrap_or(""),
            t["shown"].as_str().unwrap_or("")
        );
    }

    if !doc["traffic"].is_null() {
        md.push_str(&traffic_md(doc));
    }
    if !doc["datapath"].is_null() {
        md.push_str(&datapath_md(doc));
    }
    if !doc["nat_pressure"].is_null() {
        md.push_str(&nat_pressure_md(doc));
    }
    if !doc["control_plane"].is_null() {
        md.push_str(&control_plane_md(doc));
    }
    if !doc["manifest_latency"].is_null() {
        md.push_str(&manifest_latency_md(doc));
    }
    if !doc["failover"].is_null() {
        md.push_str(&failover_md(doc));
    }
    if !doc["probe_cost"].is_null() {
        md.push_str(&probe_cost_md(doc));
    }
    md
}

fn traffic_md(doc: &Value) -> String {
    let mut md = String::new();
    let traffic = &doc["traffic"];
    let _ = writeln!(
        md,
        "\n## Real traffic: pod on {} to the destination (namespace cluster)\n\n\
         direct = the node's own masquerade (no gateway); ours = tunnel to gateway {} and SNAT \
         there by the agent's datapath; kernel = fwmark + policy routing into a VXLAN, nftables \
         SNAT with conntrack on the gateway. iperf3 for {} s per TCP/UDP figure, `egress-load` \
         for {} ms per latency and connection-rate figure.\n\n\
         | Metric | direct | ours | kernel | ours / kernel | ours / direct |\n|---|---|---|---|---|---|",
        traffic["pod_node"].as_str().unwrap_or("?"),
        traffic["gateway"].as_str().unwrap_or("?"),
        traffic["iperf_seconds"],
        traffic["load_ms"],
    );
    for (metric, unit, _) in METRICS {
        let _ = writeln!(
            md,
            "| {metric} ({unit}) | {} | {} | {} | {} | {} |",
            cell(&traffic["summary"]["direct"][metric]),
            cell(&traffic["summary"]["ours"][metric]),
            cell(&traffic["summary"]["kernel"][metric]),
            cell(&traffic["ratios"]["ours/kernel"][metric]),
            cell(&traffic["ratios"]["ours/direct"][metric]),
        );
    }

    md
}

fn datapath_md(doc: &Value) -> String {
    let mut md = String::new();
    let dp = &doc["datapath"];
    let cases = dp["cases"].as_array().cloned().unwrap_or_default();
    let mut levels: Vec<(Value, Value)> = cases
        .iter()
        .map(|c| (c["policy_entries"].clone(), c["nat_entries"].clone()))
        .collect();
    levels.dedup();
    let _ = writeln!(
        md,
        "\n## BPF per-packet cost (BPF_PROG_TEST_RUN, ns per packet)\n\n\
         `repeat` cases: {} repetitions on one skb per run (SNAT cases use mirror entries so every \
         repetition rewrites). `one_run_per_packet`: {} distinct new flows per run, one \
         BPF_PROG_TEST_RUN each, next to the empty program measured the same way. Columns: \
         policy map entries / NAT map entries.\n",
        dp["reps"], dp["new_flows"]
    );
    let mut header = String::from("| Path | Method |");
    let mut rule = String::from("|---|---|");
    for (p, n) in &levels {
        let _ = write!(header, " {p} / {n} |");
        rule.push_str("---|");
    }
    let _ = writeln!(md, "{header} x parse-only (first level) |\n{rule}---|");
    let mut ids: Vec<Value> = cases.iter().map(|c| c["id"].clone()).collect();
    ids.dedup();
    let mut seen = Vec::new();
    for id in ids {
        if seen.contains(&id) {
            continue;
        }
        seen.push(id.clone());
        let first = cases
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or_default();
        let mut row = format!(
            "| `{}` — {} | {} |",
            id.as_str().unwrap_or(""),
            first["description"].as_str().unwrap_or(""),
            first["method"].as_str().unwrap_or("")
        );
        for (p, n) in &levels {
            let case = cases
                .iter()
                .find(|c| c["id"] == id && c["policy_entries"] == *p && c["nat_entries"] == *n);
            let _ = write!(
                row,
                " {} |",
                case.map_or("n/a".into(), |c| cell(&c["ns_per_packet"]))
            );
        }
        let floor = cases
            .iter()
            .find(|c| c["id"] == "floor/parse_only")
            .and_then(|c| median(&c["ns_per_packet"]));
        let ratio = match (median(&first["ns_per_packet"]), floor) {
            (Some(ns), Some(floor)) if first["method"] == "repeat" => format!("{:.2}x", ns / floor),
            _ => "—".into(),
        };
        let _ = writeln!(md, "{row} {ratio} |");
    }

    md
}

fn nat_pressure_md(doc: &Value) -> String {
    let mut md = String::new();
    let nat = &doc["nat_pressure"];
    let _ = writeln!(
        md,
        "\n## NAT under pressure\n\n\
         {} concurrent TCP connections from {} pods (through the gateway) to one destination \
         IP and port; NAT port range {} ({} ports).\n\n\
         | Attempted | Established | Failed | Still working after | SNAT new flows | NAT port retries | drop_nat_exhausted (packets) |\n\
         |---|---|---|---|---|---|---|\n| {} | {} | {} | {} | {} | {} | {} |",
        nat["attempted"],
        nat["pods"],
        nat["nat_port_range"].as_str().unwrap_or("?"),
        nat["port_space"],
        nat["attempted"],
        nat["established"],
        nat["failed"],
        nat["still_working_after"],
        nat["snat_new_flows"],
        nat["nat_port_retries"],
        nat["drop_nat_exhausted"],
    );

    md
}

fn control_plane_md(doc: &Value) -> String {
    let mut md = String::new();
    let cp = &doc["control_plane"];
    let _ = writeln!(
        md,
        "\n## Control plane (synthetic inventories)\n\n\
         One reconcile = desired state from the inventory + policy map synced by diff (the \
         agent's loop). 100 nodes; each pod matches one policy, one destination CIDR each. \
         Milliseconds.\n\n\
         | Pods | Policies | Entries | Full reconcile (empty maps) | Of which desired state | Resync (no change) | One pod added | One label changed | Peak RSS (MiB) |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for r in cp["results"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            r["pods"],
            r["policies"],
            r["policy_entries"],
            cell(&r["full_reconcile_ms"]),
            cell(&r["desired_state_ms"]),
            cell(&r["resync_ms"]),
            cell(&r["pod_added_ms"]),
            cell(&r["label_changed_ms"]),
            r["peak_rss_mib"].as_f64().unwrap_or(0.0),
        );
    }
    for s in cp["skipped"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "\nSkipped: {} pods x {} policies: {}.",
            s["pods"],
            s["policies"],
            s["reason"].as_str().unwrap_or("")
        );
    }

    md
}

fn manifest_latency_md(doc: &Value) -> String {
    let mut md = String::new();
    let lat = &doc["manifest_latency"];
    let _ = writeln!(
        md,
        "\n## Manifest change to datapath\n\n\
         A policy manifest rewritten {} times in the folder a running agent watches; each time, \
         the delay until the new entry is in the agent's pinned policy map (polled every ms): \
         p50 {} ms, p99 {} ms, max {} ms; {} timed out.",
        lat["changes"],
        lat["p50_ms"].as_f64().map_or("n/a".into(), fmt_num),
        lat["p99_ms"].as_f64().map_or("n/a".into(), fmt_num),
        lat["max_ms"].as_f64().map_or("n/a".into(), fmt_num),
        lat["timed_out"],
    );
    md
}

fn failover_md(doc: &Value) -> String {
    let mut md = String::new();
    let f = &doc["failover"];
    let gateways: Vec<&str> = f["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let ips: Vec<&str> = f["egress_ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let _ = writeln!(
        md,
        "\n## Gateway failover (namespace cluster)\n\n\
         Candidates {} (active, first by name) and {}, leaving through their eth1 ({} and {}); \
         the pod on {} streams UDP to the destination, a datagram every {} ms (`egress-peer \
         udp-stream`). Each trial: {} ms of stream, the fault on the active gateway, HTTP \
         requests polled until one leaves through the next candidate, {} ms more, stop; then \
         the fault is undone and new requests must leave through the first candidate again. \
         Gap = the stream's longest pause between two echoes at the pod (the targets use it); at \
         the destination = the longest pause between two of its datagrams arriving there (the \
         capture's timestamps: the way there alone); lost = datagrams sent \
         but never echoed, each standing for 1 s / the rate of the last column (the {} ms sleep \
         between sends makes it a little under 1,000/s). Probes every {} ms, down after {} unanswered. The \
         agent killed: SIGKILL, {} ms of stream, then a new agent (no failover expected). The \
         destination is captured during every trial (the leak detector).\n\n\
         | Fault | Trials | Median gap (ms) | Worst gap (ms) | At the destination: median, worst (ms) | \
         Median lost datagrams | Worst lost | New flows moved (median ms) | Wrong-source packets | \
         Datagrams/s |\n\
         |---|---|---|---|---|---|---|---|---|---|",
        gateways.first().unwrap_or(&"?"),
        gateways.get(1).unwrap_or(&"?"),
        ips.first().unwrap_or(&"?"),
        ips.get(1).unwrap_or(&"?"),
        f["pod_node"].as_str().unwrap_or("?"),
        f["stream_interval_ms"],
        f["before_fault_ms"],
        f["after_move_ms"],
        f["stream_interval_ms"],
        f["probe_interval_ms"],
        f["probe_multiplier"],
        f["after_agent_kill_ms"],
    );
    let num = |v: &Value| v.as_f64().map_or("n/a".into(), |v| format!("{v:.0}"));
    let faults = f["faults"].as_array().cloned().unwrap_or_default();
    for fault in &faults {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {}, {} | {} | {} | {} | {} of {} | {} |",
            fault["label"].as_str().unwrap_or("?"),
            fault["trials"].as_array().map_or(0, Vec::len),
            num(&fault["gap_ms"]["median"]),
            num(&fault["gap_ms"]["max"]),
            num(&fault["destination_gap_ms"]["median"]),
            num(&fault["destination_gap_ms"]["max"]),
            num(&fault["lost_datagrams"]["median"]),
            num(&fault["lost_datagrams"]["max"]),
            if fault["failover_expected"] == true {
                num(&fault["new_flows_moved_ms"]["median"])
            } else {
                "—".into()
            },
            fault["leaked_packets"],
            fault["matched_packets"],
            num(&fault["datagrams_per_s"]["median"]),
        );
    }
    let _ = writeln!(
        md,
        "\nGap of every trial, in order (ms); lost datagrams in brackets:\n"
    );
    for fault in &faults {
        let trials: Vec<String> = fault["trials"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| format!("{} [{}]", t["gap_ms"], t["lost"]))
            .collect();
        let mut causes: Vec<String> = fault["failovers_counted"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, count)| count.as_u64().unwrap_or(0) > 0)
            .map(|(cause, count)| format!("{cause} {count}"))
            .collect();
        if causes.is_empty() {
            causes.push("none".into());
        }
        let redone = fault["redone_trials"].as_u64().unwrap_or(0);
        let _ = writeln!(
            md,
            "- {}: {}; failovers counted by the pod node's prober: {}{}",
            fault["label"].as_str().unwrap_or("?"),
            trials.join(", "),
            causes.join(", "),
            if redone > 0 {
                format!(
                    "; {redone} trial(s) run again (the stream's source port was still \
                     pinned to the other candidate)"
                )
            } else {
                String::new()
            }
        );
    }
    md
}

fn probe_cost_md(doc: &Value) -> String {
    let mut md = String::new();
    let cost = &doc["probe_cost"];
    let load = &doc["failover"]["probe_load"];
    let ns = |v: &Value| v.as_f64().map_or("n/a".into(), fmt_num);
    let pct = |v: &Value| {
        v.as_f64().map_or("not measured".into(), |v| {
            format!("{:.2}% of one core", v * 100.0)
        })
    };
    let _ = writeln!(
        md,
        "\n## Probe cost on a gateway\n\n\
         {} probing nodes at the default interval ({} ms) send a gateway {} probes/s; each \
         answered probe costs what is measured here, times that rate.\n\n\
         | Measured | ns per probe | At {} probes/s |\n|---|---|---|\n\
         | the XDP responder answering a probe (the default; BPF_PROG_TEST_RUN, one run per probe) | {} | {} |\n\
         | the XDP responder passing a frame it parsed to the end (what other underlay traffic pays at most) | {} | — |\n\
         | the XDP responder under a probe flood, in-kernel run time per probe (bpf_stats) | {} | {} |\n\
         | the TC way under the flood: XDP passing the probe, then `from_tunnel` answering it (bpf_stats) | {} | {} |\n\
         | the `from_tunnel` TC program answering a probe (`--probe-responder tc`) | {} | {} |\n\
         | the same, less the empty TC program run the same way | {} | {} |\n\
         | XDP and the kernel path: a probe flood to the tunnel port against one to a closed port (upper bound) | {} | {} |\n\
         | the same through the TC program (the flood's probes ask for it) | {} | {} |\n",
        thousands(&cost["probing_nodes"]),
        thousands(&cost["probe_interval_ms"]),
        thousands(&cost["probes_per_s"]),
        thousands(&cost["probes_per_s"]),
        ns(&cost["bpf_ns_per_probe"]),
        pct(&cost["bpf_core_share"]),
        ns(&cost["xdp_pass_ns_per_frame"]),
        ns(&cost["in_kernel_ns_per_probe"]),
        pct(&cost["in_kernel_core_share"]),
        ns(&cost["tc_in_kernel_ns_per_probe"]),
        pct(&cost["tc_in_kernel_core_share"]),
        ns(&cost["tc_bpf_ns_per_probe"]),
        pct(&cost["tc_bpf_core_share"]),
        ns(&cost["tc_bpf_net_ns_per_probe"]),
        pct(&cost["tc_bpf_net_core_share"]),
        ns(&cost["kernel_ns_per_probe"]),
        pct(&cost["kernel_core_share"]),
        ns(&cost["tc_kernel_ns_per_probe"]),
        pct(&cost["tc_kernel_core_share"]),
    );
    let rates = &doc["failover"]["probe_rates"];
    if !rates.is_null() {
        let _ = writeln!(
            md,
            "Demand mode (BFD's): a probing node probes a gateway every \
             `--probe-quiet-interval-ms` ({} ms) while no traffic goes to it, or while the \
             replies to its traffic show it alive, and every interval only while its traffic \
             goes unanswered. Measured in the failover cluster (probe replies {} received \
             over {} s, per gateway): {:.2} probes/s idle, {:.2} with the UDP stream through \
             the gateway answered (every interval: {}). For {} quiet nodes that is {} \
             probes/s: {} with the TC program (the default), {} with the XDP responder \
             (in-kernel run time per probe under the flood, below).\n",
            rates["quiet_interval_ms"],
            POD_NODE_NAME,
            rates["seconds"],
            rates["idle_per_s"].as_f64().unwrap_or(f64::NAN),
            rates["answered_per_s"].as_f64().unwrap_or(f64::NAN),
            rates["every_interval_per_s"],
            thousands(&cost["probing_nodes"]),
            thousands(&cost["quiet_probes_per_s"]),
            pct(&cost["quiet_tc_in_kernel_core_share"]),
            pct(&cost["quiet_in_kernel_core_share"]),
        );
    }
    if load.is_null() {
        let _ = writeln!(
            md,
            "The BPF figure counts the program only, not the kernel's VXLAN decapsulation and \
             encapsulation around it (the failover section measures that; it was not run)."
        );
    } else {
        let _ = writeln!(
            md,
            "The kernel path: `egress-bench measure probe-flood` in {}'s namespace sends one \
             probe frame (VXLAN, as the prober sends it) to {}'s tunnel port at {}/s for {} s \
             (answered by the XDP responder); then the same frame asking for the TC program \
             (passed by XDP, answered after decapsulation); then spoilt probes (the magic \
             changed: decapsulated, parsed by the program, dropped), then the same frames to a \
             closed UDP port of {}. Between namespaces of \
             one kernel each datagram's whole way runs in softirq context on the sender's CPU \
             and is charged to the sender (no IRQ time accounting in this kernel), so the \
             sender's CPU time per datagram, less the closed-port flood's, is the cost of \
             answering (for TC: VXLAN decapsulation, the program, encapsulation of the answer), \
             and also the answer's way back and its decapsulation and program run on {} (an \
             upper bound); the spoilt probes' is the gateway's receive side alone, but the closed \
             port's own handling (a socket lookup that fails, a rate-limited ICMP error) is \
             comparable, so that difference is small and noisy, not a bound. Median of {} sets \
             [min–max]: answered {} ns [{}–{}], receive side {} ns [{}–{}]; the whole machine's busy CPU (`/proc/stat`, noisy on a shared machine) \
             gave {} ns for the answered probe. Sets where the machine was saturated are not \
             counted ({} of {} counted).",
            load["sender"].as_str().unwrap_or("?"),
            load["gateway"].as_str().unwrap_or("?"),
            thousands(&load["rate_per_s"]),
            load["seconds"],
            load["gateway"].as_str().unwrap_or("?"),
            load["sender"].as_str().unwrap_or("?"),
            load["answer_ns_per_probe"]["runs"]
                .as_array()
                .map_or(0, Vec::len),
            ns(&load["answer_ns_per_probe"]["median"]),
            ns(&load["answer_ns_per_probe"]["min"]),
            ns(&load["answer_ns_per_probe"]["max"]),
            ns(&load["receive_ns_per_probe"]["median"]),
            ns(&load["receive_ns_per_probe"]["min"]),
            ns(&load["receive_ns_per_probe"]["max"]),
            ns(&load["machine_answer_ns_per_probe"]["median"]),
            load["runs"].as_array().map_or(0, |runs| runs
                .iter()
                .filter(|r| r["counts"] == true)
                .count()),
            load["runs"].as_array().map_or(0, Vec::len),
        );
    }
    md
}

/// Left: each traffic metric of ours and the kernel way relative to direct (latency as
/// direct / path, so higher is better everywhere). Right: BPF ns per packet.
pub fn chart(doc: &Value, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(640);

    let labels = [
        "TCP 1 stream",
        "TCP 4 streams",
        "UDP 64 B pps",
        "RR p50 (inv.)",
        "RR p99 (inv.)",
        "TCP conn/s",
    ];
    let summary = &doc["traffic"]["summary"];
    let relative = |p: &str, metric: &str, higher_better: bool| -> f64 {
        let (Some(v), Some(d)) = (
            median(&summary[p][metric]),
            median(&summary["direct"][metric]),
        ) else {
            return 0.0;
        };
        let r = if higher_better { v / d } else { d / v };
        if r.is_finite() { r * 100.0 } else { 0.0 }
    };
    let mut top: f64 = 110.0;
    for (metric, _, hb) in METRICS {
        for p in PATHS {
            top = top.max(relative(p, metric, hb) * 1.1);
        }
    }
    let mut chart = ChartBuilder::on(&left)
        .caption(
            "Traffic: % of direct (higher is better)",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..METRICS.len() as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(METRICS.len() * 2 + 1)
        .x_label_formatter(&|x| {
            #[expect(clippy::cast_sign_loss, reason = "chart positions are not negative")]
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                labels.get(i).copied().unwrap_or("").to_owned()
            } else {
                String::new()
            }
        })
        .y_desc("% of direct")
        .draw()?;
    let colours = [
        RGBColor(150, 150, 150),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
    ];
    for (k, p) in PATHS.iter().enumerate() {
        let colour = colours[k];
        chart
            .draw_series(METRICS.iter().enumerate().map(|(i, (metric, _, hb))| {
                let x0 = i as f64 + 0.1 + k as f64 * 0.27;
                Rectangle::new(
                    [(x0, 0.0), (x0 + 0.25, relative(p, metric, *hb))],
                    colour.filled(),
                )
            }))?
            .label(*p)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;

    // BPF cost at the first fill level.
    let cases = doc["datapath"]["cases"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let first = cases
        .first()
        .map(|c| (c["policy_entries"].clone(), c["nat_entries"].clone()));
    let shown: Vec<(String, f64)> = cases
        .iter()
        .filter(|c| Some((c["policy_entries"].clone(), c["nat_entries"].clone())) == first)
        .filter_map(|c| Some((c["id"].as_str()?.to_owned(), median(&c["ns_per_packet"])?)))
        .collect();
    let max_ns = shown.iter().map(|(_, ns)| *ns).fold(10.0, f64::max) * 1.15;
    let n = shown.len().max(1);
    let mut chart = ChartBuilder::on(&right)
        .caption("BPF cost, ns per packet", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(230)
        .build_cartesian_2d(0f64..max_ns, 0f64..n as f64)?;
    let names: Vec<String> = shown.iter().map(|(id, _)| id.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            #[expect(clippy::cast_sign_loss, reason = "chart positions are not negative")]
            let i = y.floor() as usize;
            if (y - i as f64 - 0.5).abs() < 0.01 && i < names.len() {
                names[names.len() - 1 - i].clone()
            } else {
                String::new()
            }
        })
        .x_desc("ns")
        .draw()?;
    chart.draw_series(shown.iter().enumerate().map(|(i, (id, ns))| {
        let y = (n - 1 - i) as f64;
        let colour = if id.starts_with("floor") {
            colours[0]
        } else {
            colours[1]
        };
        Rectangle::new([(0.0, y + 0.15), (*ns, y + 0.85)], colour.filled())
    }))?;
    root.present().context("writing the chart")?;
    Ok(())
}

/// Writes `latest.json`, `latest.md` and `latest.svg` into `dir`.
pub fn write(doc: &mut Value, dir: &Path) -> Result<()> {
    analyse(doc);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(
        dir.join("latest.json"),
        serde_json::to_string_pretty(doc)? + "\n",
    )?;
    fs::write(dir.join("latest.md"), markdown(doc))?;
    if !doc["traffic"].is_null() {
        chart(doc, &dir.join("latest.svg"))?;
    }
    Ok(())
}
