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
    doc["traffic"]["summary"] = Value::Object(per_path);
    doc["traffic"]["ratios"] = Value::Object(ratios);
    doc["targets"] = targets(doc);
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
    let ratio = |pair: &str, metric: &str| median(&doc["traffic"]["ratios"][pair][metric]);
    let fmt = |v: Option<f64>, unit: &str| v.map_or("n/a".into(), |v| format!("{v:.2}{unit}"));
    let mut list = Vec::new();
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
    let p99 = doc["manifest_latency"]["p99_ms"].as_f64();
    list.push(target(
        "manifest change to datapath, p99",
        "< 100 ms",
        p99,
        fmt(p99, " ms"),
        |v| v < 100.0,
    ));
    Value::Array(list)
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
    let _ = writeln!(
        md,
        "Machine: Linux {}, {}, {} cores. Each figure is the median of {} runs, with [min–max]; \
         ratios are computed within each run, then summarised. Produced by `cargo xtask bench` in {:.0} s.\n",
        host["kernel"].as_str().unwrap_or("?"),
        host["cpu"].as_str().unwrap_or("?"),
        host["cores"],
        doc["runs"],
        doc["elapsed_seconds"].as_f64().unwrap_or(0.0),
    );
    let _ = writeln!(md, "![paths compared](latest.svg)\n");

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
    chart(doc, &dir.join("latest.svg"))?;
    Ok(())
}
