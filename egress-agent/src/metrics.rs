//! Prometheus metrics (text format 0.0.4) on `/metrics`, plus `/healthz` and `/readyz`.
//!
//! Values come from two places: the agent's latest [`Report`] (policies, wanted map entries,
//! reconciles, flow and NAT map entries as the garbage collection counted them), and the
//! pinned maps, read at scrape time (packet counters, map capacities) so they are current
//! even between reconciles. The two histograms are fed by a
//! task that follows the reports. Rendering ([`render`]) is pure, so it is unit-tested.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use bytes::Bytes;
use egress_common::{
    counters::{Counter, reason},
    map_names,
};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{
        counter::{ConstCounter, Counter as MetricCounter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use thiserror::Error;
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, info, warn};

use crate::{
    chain::Chain,
    datapath::{PinLayout, pinned},
    health::HealthMetrics,
    report::Report,
};

/// Every metric name starts with this, followed by `_`.
const PREFIX: &str = "egress_gateway";
/// A client that has not sent its request headers by then is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Maps whose capacity and pressure are exported, next to their entry counts.
const SIZED_MAPS: [&str; 9] = [
    map_names::POLICIES,
    map_names::NODES,
    map_names::LOCAL_PODS,
    map_names::CLUSTER_CIDRS,
    map_names::EGRESS_IPS,
    map_names::NAT_FORWARD,
    map_names::NAT_REVERSE,
    map_names::STEERED_FLOWS,
    map_names::INBOUND_FLOWS,
];

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("cannot listen on {address}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds `address` (so a port clash fails start-up), then serves in a spawned task.
pub async fn serve(
    address: SocketAddr,
    reports: watch::Receiver<Arc<Report>>,
    pins: PinLayout,
    health: HealthMetrics,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| MetricsError::Bind { address, source })?;
    let histograms = Histograms::with_health(health);
    tokio::spawn(follow_reports(reports.clone(), histograms.clone()));
    let server = Arc::new(Server {
        reports,
        pins,
        histograms,
    });
    tokio::spawn(accept(listener, server));
    info!(%address, "serving /metrics, /healthz and /readyz");
    Ok(())
}

/// Histograms outlive scrapes; cloning shares the same buckets.
#[derive(Clone)]
pub struct Histograms {
    reconcile_duration: Histogram,
    event_to_programmed: Histogram,
    /// Fed by the gateway prober.
    health: HealthMetrics,
}

impl Default for Histograms {
    fn default() -> Self {
        Self::with_health(HealthMetrics::default())
    }
}

impl Histograms {
    fn with_health(health: HealthMetrics) -> Self {
        Self {
            // 100 µs .. 6.5 s
            reconcile_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            // 1 ms .. 65 s
            event_to_programmed: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            health,
        }
    }
}

impl Histograms {
    fn observe(&self, report: &Report) {
        self.reconcile_duration
            .observe(report.last_reconcile.as_secs_f64());
        if let Some(latency) = report.last_event_to_programmed {
            self.event_to_programmed.observe(latency.as_secs_f64());
        }
    }
}

/// Observes every reconcile the agent reports. The reconcile loop yields between reconciles,
/// so reports are rarely coalesced; if they are, the histogram misses a sample while
/// `reconciles_total` (taken from the report) stays exact.
async fn follow_reports(mut reports: watch::Receiver<Arc<Report>>, histograms: Histograms) {
    let mut seen = reports.borrow().reconciles;
    while reports.changed().await.is_ok() {
        let report = Arc::clone(&reports.borrow_and_update());
        if report.reconciles != seen {
            seen = report.reconciles;
            histograms.observe(&report);
        }
    }
}

/// What the pinned maps held at scrape time; `None` where a map could not be read.
#[derive(Clone, Debug, Default)]
pub struct DatapathSample {
    /// Summed over CPUs, indexed by [`reason`].
    pub counters: Option<Vec<Counter>>,
    pub capacities: BTreeMap<&'static str, u32>,
}

impl DatapathSample {
    /// Reads the maps; failures are logged and leave the metric out of this scrape.
    fn read(pins: &PinLayout) -> Self {
        let counters = pinned::counters(pins)
            .inspect_err(
                |error| warn!(error = %Chain(&error), "metrics: cannot read the packet counters"),
            )
            .ok();
        let capacities = SIZED_MAPS
            .iter()
            .filter_map(|name| match pinned::capacity(pins, name) {
                Ok(capacity) => Some((*name, capacity)),
                Err(error) => {
                    warn!(error = %Chain(&error), "metrics: cannot read a map's capacity");
                    None
                }
            })
            .collect();
        Self {
            counters,
            capacities,
        }
    }
}

type Labels = Vec<(&'static str, String)>;

fn gauge_family<'a>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: impl IntoIterator<Item = (&'a str, i64)>,
) {
    let family = Family::<Labels, Gauge>::default();
    for (key, value) in values {
        family
            .get_or_create(&vec![(label, key.to_owned())])
            .set(value);
    }
    registry.register(name, help, family);
}

fn gauge(value: usize) -> ConstGauge {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

/// The `/metrics` body: Prometheus text format, every name prefixed `egress_gateway_`.
pub fn render(report: &Report, datapath: &DatapathSample, histograms: &Histograms) -> String {
    let mut registry = Registry::with_prefix(PREFIX);

    let rejected_policies = report.refused.iter().filter(|r| r.policy.is_some()).count();
    let unserved = report
        .policies
        .values()
        .filter(|summary| summary.problem.is_some())
        .count();
    registry.register(
        "policies_loaded",
        "CiliumEgressGatewayPolicies accepted and in the datapath",
        gauge(report.policies.len()),
    );
    registry.register(
        "policies_rejected",
        "CiliumEgressGatewayPolicies refused as invalid (see the agent log or the policy status)",
        gauge(rejected_policies),
    );
    registry.register(
        "policies_with_problem",
        "Loaded policies this node cannot fully serve (no gateway node, interface missing, ...)",
        gauge(unserved),
    );
    registry.register(
        "map_write_failures",
        "Map entries the last sync could not write, a node-local map being full (raise its size \
         flag); the other entries and maps are written",
        gauge(report.map_write_failures),
    );
    registry.register(
        "policy_ipv6_cidrs_not_programmed",
        "IPv6 destination and excluded CIDRs of loaded policies, not programmed (IPv6 is not \
         supported yet; the policies' IPv4 parts are)",
        gauge(
            report
                .policies
                .values()
                .map(|summary| summary.ipv6_not_programmed.len())
                .sum(),
        ),
    );
    registry.register(
        "objects_rejected",
        "Objects of any kind refused as invalid",
        gauge(report.refused.len()),
    );
    registry.register(
        "policy_entries_dropped",
        "Policy entries wanted but left out because the policy map is full (their pods are not \
         steered: raise --policy-map-size)",
        gauge(report.policy_entries_dropped),
    );

    // Node-local maps as last programmed; flow and NAT maps as the last garbage collection
    // (every few seconds) counted them: walking a 512k-entry map per scrape would be costly.
    let entries: BTreeMap<&str, usize> = report
        .map_entries
        .iter()
        .chain(&report.flow_entries)
        .map(|(map, count)| (*map, *count))
        .collect();
    if let Some(nat) = report.flow_entries.get(map_names::NAT_FORWARD) {
        registry.register(
            "nat_entries",
            "Translated flows on this gateway (entries of NAT_FORWARD)",
            gauge(*nat),
        );
    }
    gauge_family(
        &mut registry,
        "map_entries",
        "Entries per BPF map (node-local maps as last programmed; flow and NAT maps as the \
         last garbage collection left them)",
        "map",
        entries
            .iter()
            .map(|(map, count)| (*map, i64::try_from(*count).unwrap_or(i64::MAX))),
    );
    gauge_family(
        &mut registry,
        "map_capacity",
        "Capacity (max_entries) per BPF map",
        "map",
        datapath
            .capacities
            .iter()
            .map(|(map, capacity)| (*map, i64::from(*capacity))),
    );
    let pressure = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for (map, capacity) in &datapath.capacities {
        if let Some(count) = entries.get(map) {
            #[expect(
                clippy::cast_precision_loss,
                reason = "a ratio: map sizes are far below 2^52"
            )]
            let ratio = *count as f64 / f64::from((*capacity).max(1));
            pressure
                .get_or_create(&vec![("map", (*map).to_owned())])
                .set(ratio);
        }
    }
    registry.register(
        "map_pressure",
        "Fill of each BPF map, entries / capacity (as Cilium's cilium_bpf_map_pressure): at 1 a \
         flow or NAT map refuses new flows (drop_flow_table_full)",
        pressure,
    );

    if let Some(counters) = &datapath.counters {
        let packets = Family::<Labels, MetricCounter>::default();
        let bytes = Family::<Labels, MetricCounter>::default();
        for (index, counter) in counters.iter().enumerate() {
            let slot = index as u32;
            if !reason::is_packet_verdict(slot) {
                continue;
            }
            let labels = vec![("reason", reason::NAMES[index].to_owned())];
            packets.get_or_create(&labels).inc_by(counter.packets);
            bytes.get_or_create(&labels).inc_by(counter.bytes);
        }
        registry.register(
            "packets",
            "Packets seen by the datapath, by verdict or drop reason",
            packets,
        );
        registry.register(
            "bytes",
            "Bytes seen by the datapath, by verdict or drop reason",
            bytes,
        );
        let slot = |index: u32| counters.get(index as usize).map_or(0, |c| c.packets);
        registry.register(
            "nat_port_allocation_retries",
            "NAT ports found taken during allocation, each followed by another try",
            ConstCounter::new(slot(reason::NAT_PORT_RETRY)),
        );
        registry.register(
            "flows_failed_over",
            "Steered flows this node moved to another gateway because theirs was down or no \
             longer a candidate",
            ConstCounter::new(slot(reason::FLOW_FAILED_OVER)),
        );
        registry.register(
            "nat_port_allocation_failures",
            "New flows dropped because no free NAT port was found (drop_nat_exhausted)",
            ConstCounter::new(slot(reason::DROP_NAT_EXHAUSTED)),
        );
    }

    registry.register(
        "reconciles",
        "Reconciles that programmed the datapath",
        ConstCounter::new(report.reconciles),
    );
    registry.register(
        "reconcile_duration_seconds",
        "Time a reconcile took, from the inventory to the datapath being in sync",
        histograms.reconcile_duration.clone(),
    );
    registry.register(
        "event_to_programmed_seconds",
        "Time from a change (watch event or manifest change) to the datapath being programmed",
        histograms.event_to_programmed.clone(),
    );
    let health = &histograms.health;
    registry.register(
        "gateway_healthy",
        "1 while the gateway node answers this node's probes and can serve, 0 while its flows \
         go to the next candidate",
        health.healthy.clone(),
    );
    registry.register(
        "gateway_failovers",
        "Gateways this node's prober found down, by cause (unanswered probes, or the gateway \
         said it cannot serve)",
        health.failovers.clone(),
    );
    registry.register(
        "probe_rtt_seconds",
        "Round trips of the gateway health probes, through the tunnel",
        health.rtt.clone(),
    );
    registry.register(
        "probe_fallbacks",
        "Times this node's prober turned to a gateway's TC program alone, its XDP responder's \
         answers lost twice in a row (a driver dropping what XDP sends shows here)",
        health.fallbacks.clone(),
    );

    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

struct Server {
    reports: watch::Receiver<Arc<Report>>,
    pins: PinLayout,
    histograms: Histograms,
}

async fn accept(listener: TcpListener, server: Arc<Server>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %Chain(&error), "metrics: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let server = Arc::clone(&server);
                async move { Ok::<_, Infallible>(server.respond(request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                debug!(error = %Chain(&error), "metrics: connection ended with an error");
            }
        });
    }
}

impl Server {
    async fn respond(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
        }
        match request.uri().path() {
            "/metrics" => {
                let report = Arc::clone(&self.reports.borrow());
                let pins = self.pins.clone();
                // Map reads are syscalls (one per NAT entry): keep them off the runtime.
                let datapath = tokio::task::spawn_blocking(move || DatapathSample::read(&pins))
                    .await
                    .unwrap_or_default();
                let body = render(&report, &datapath, &self.histograms);
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
                );
                response
            }
            // Answered by the same runtime as the reconcile loop: a wedged agent stops answering.
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => readiness(&self.reports.borrow()),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz or /readyz\n",
            ),
        }
    }
}

/// Ready once a reconcile has programmed the datapath from a full view of the cluster.
fn readiness(report: &Report) -> Response<Full<Bytes>> {
    if report.synced {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the datapath has not been programmed from a full sync yet\n",
        )
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use egress_control::desired::{PolicyProblem, PolicySummary};

    use super::*;
    use crate::source::Refusal;

    fn report() -> Report {
        Report {
            node_name: "k8s-worker-2".into(),
            synced: true,
            policies: BTreeMap::from([
                (
                    "served".to_owned(),
                    PolicySummary {
                        gateway_nodes: vec!["k8s-worker-2".into()],
                        egress_ip: Some(Ipv4Addr::new(10, 0, 0, 12)),
                        matched_pods: 3,
                        problem: None,
                        ipv6_not_programmed: vec!["::/0".parse().unwrap()],
                        ..PolicySummary::default()
                    },
                ),
                (
                    "no-gateway".to_owned(),
                    PolicySummary {
                        problem: Some(PolicyProblem::NoGatewayNode),
                        ..PolicySummary::default()
                    },
                ),
            ]),
            refused: vec![
                Refusal {
                    policy: Some("bad-cidr".into()),
                    message: "policy bad-cidr: invalid CIDR".into(),
                },
                Refusal {
                    policy: None,
                    message: "pod x: no IP".into(),
                },
            ],
            map_entries: BTreeMap::from([(map_names::POLICIES, 6), (map_names::NODES, 3)]),
            flow_entries: BTreeMap::from([(map_names::NAT_FORWARD, 4)]),
            reconciles: 7,
            last_reconcile: Duration::from_millis(2),
            last_event_to_programmed: Some(Duration::from_millis(30)),
            ..Report::default()
        }
    }

    fn datapath() -> DatapathSample {
        let mut counters = vec![Counter::default(); reason::COUNT as usize];
        counters[reason::REDIRECT_TO_GATEWAY as usize] = Counter {
            packets: 12,
            bytes: 1500,
        };
        counters[reason::DROP_NAT_EXHAUSTED as usize] = Counter {
            packets: 2,
            bytes: 120,
        };
        counters[reason::NAT_PORT_RETRY as usize] = Counter {
            packets: 5,
            bytes: 0,
        };
        DatapathSample {
            counters: Some(counters),
            capacities: BTreeMap::from([
                (map_names::POLICIES, 16384),
                (map_names::NAT_FORWARD, 65536),
            ]),
        }
    }

    /// The value of the sample line `name{labels}` (labels as rendered), if present.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok())?
            })
    }

    #[test]
    fn renders_report_and_datapath_values() {
        let histograms = Histograms::default();
        let report = report();
        histograms.observe(&report);
        let text = render(&report, &datapath(), &histograms);
        let expect = |series: &str, expected: f64| {
            assert_eq!(value(&text, series), Some(expected), "{series} in\n{text}");
        };
        expect("egress_gateway_policies_loaded", 2.0);
        expect("egress_gateway_policies_rejected", 1.0);
        expect("egress_gateway_policies_with_problem", 1.0);
        expect("egress_gateway_policy_ipv6_cidrs_not_programmed", 1.0);
        expect("egress_gateway_policy_entries_dropped", 0.0);
        expect("egress_gateway_objects_rejected", 2.0);
        expect("egress_gateway_map_entries{map=\"EGRESS_POLICIES\"}", 6.0);
        expect("egress_gateway_map_entries{map=\"NODES\"}", 3.0);
        expect("egress_gateway_map_entries{map=\"NAT_FORWARD\"}", 4.0);
        expect("egress_gateway_map_capacity{map=\"NAT_FORWARD\"}", 65536.0);
        expect("egress_gateway_nat_entries", 4.0);
        expect(
            "egress_gateway_map_pressure{map=\"NAT_FORWARD\"}",
            4.0 / 65536.0,
        );
        expect(
            "egress_gateway_map_pressure{map=\"EGRESS_POLICIES\"}",
            6.0 / 16384.0,
        );
        expect(
            "egress_gateway_packets_total{reason=\"redirect_to_gateway\"}",
            12.0,
        );
        expect(
            "egress_gateway_bytes_total{reason=\"redirect_to_gateway\"}",
            1500.0,
        );
        expect(
            "egress_gateway_packets_total{reason=\"pass_no_match\"}",
            0.0,
        );
        expect("egress_gateway_nat_port_allocation_retries_total", 5.0);
        expect("egress_gateway_nat_port_allocation_failures_total", 2.0);
        expect("egress_gateway_reconciles_total", 7.0);
        expect("egress_gateway_reconcile_duration_seconds_count", 1.0);
        expect(
            "egress_gateway_reconcile_duration_seconds_bucket{le=\"0.0032\"}",
            1.0,
        );
        expect(
            "egress_gateway_reconcile_duration_seconds_bucket{le=\"0.0016\"}",
            0.0,
        );
        expect("egress_gateway_event_to_programmed_seconds_sum", 0.03);
    }

    #[test]
    fn retries_are_not_a_packet_verdict() {
        let text = render(&report(), &datapath(), &Histograms::default());
        assert!(!text.contains("reason=\"nat_port_retry\""), "{text}");
        assert!(!text.contains("reason=\"flow_failed_over\""), "{text}");
        let verdicts = text
            .lines()
            .filter(|line| line.starts_with("egress_gateway_packets_total{"))
            .count();
        assert_eq!(verdicts, reason::COUNT as usize - 2, "{text}");
        assert!(
            text.contains("egress_gateway_flows_failed_over_total 0"),
            "{text}"
        );
    }

    #[test]
    fn every_metric_has_help_and_type() {
        let text = render(&report(), &datapath(), &Histograms::default());
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let name = line
                .split(['{', ' '])
                .next()
                .unwrap()
                .trim_end_matches("_bucket")
                .trim_end_matches("_count")
                .trim_end_matches("_sum");
            assert!(name.starts_with("egress_gateway_"), "{line}");
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "no TYPE for {name}:\n{text}"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}:\n{text}"
            );
        }
    }

    #[test]
    fn unreadable_maps_leave_their_metrics_out() {
        let text = render(
            &report(),
            &DatapathSample::default(),
            &Histograms::default(),
        );
        assert!(!text.contains("egress_gateway_packets_total"), "{text}");
        assert!(!text.contains("egress_gateway_map_capacity{"), "{text}");
        assert!(!text.contains("egress_gateway_map_pressure{"), "{text}");
        assert_eq!(value(&text, "egress_gateway_reconciles_total"), Some(7.0));
    }

    #[test]
    fn readiness_follows_the_first_sync() {
        let mut report = Report::default();
        assert_eq!(readiness(&report).status(), StatusCode::SERVICE_UNAVAILABLE);
        report.synced = true;
        assert_eq!(readiness(&report).status(), StatusCode::OK);
    }
}
