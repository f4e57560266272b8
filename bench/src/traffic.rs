//! Real traffic in a namespace cluster: three paths from pods on k8s-worker-1 to the
//! destination, measured in turn within each run so ratios compare like with like.
//!
//! - direct: the pod's node masquerades it (no egress gateway; the ceiling);
//! - ours: the agent tunnels it to the gateway k8s-worker-2, which SNATs it;
//! - kernel: fwmark + policy routing into a VXLAN to k8s-worker-2, nftables SNAT there.

use std::{
    fs,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use egress_tests::{
    Background, Cluster, ClusterConfig, Pod, Signal,
    peer::DESTINATION_IP,
    process::{netns_command, run_with_timeout},
    wait_until,
};
use serde_json::{Value, json};

use crate::{Binaries, Params, kernel_way};

const POD_NODE: &str = "k8s-worker-1";
const GATEWAY: &str = "k8s-worker-2";
const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const POD_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 9000;
/// A port of its own for NAT pressure: the traffic runs leave NAT entries towards 9000.
const PRESSURE_PORT: u16 = 9001;
const PRESSURE_SERVERS: usize = 4;
const OURS_LABEL: (&str, &str) = ("app", "bench-ours");
const GATEWAY_LABEL: (&str, &str) = ("egress-node", "true");

pub(crate) const PATHS: [&str; 3] = ["direct", "ours", "kernel"];

pub(crate) struct ClusterResults {
    pub traffic: Value,
    pub nat_pressure: Value,
    pub manifest_latency: Value,
}

pub(crate) fn run(params: &Params, bins: &Binaries) -> Result<ClusterResults> {
    let mut cluster = Cluster::new(ClusterConfig {
        nodes: vec![POD_NODE.into(), GATEWAY.into()],
        agent_bin: bins.agent.clone(),
        peer_bin: bins.peer.clone(),
        start_peer: true,
        ..ClusterConfig::default()
    })?;
    let _servers = start_servers(&cluster, bins)?;

    let direct = cluster.add_pod(
        POD_NODE,
        "default",
        "bench-direct",
        &[("app", "bench-direct")],
    )?;
    let ours = cluster.add_pod(POD_NODE, "default", "bench-ours", &[OURS_LABEL])?;
    let kernel = cluster.add_pod(
        POD_NODE,
        "default",
        "bench-kernel",
        &[("app", "bench-kernel")],
    )?;
    let mut pressure_pods = Vec::new();
    for i in 0..params.nat_pods {
        pressure_pods.push(cluster.add_pod(
            POD_NODE,
            "default",
            &format!("bench-nat-{i}"),
            &[OURS_LABEL],
        )?);
    }
    cluster.label_node(GATEWAY, GATEWAY_LABEL.0, GATEWAY_LABEL.1)?;
    cluster.apply_policy("bench-ours", &policy_yaml())?;
    cluster.start_all_agents()?;
    for pod in std::iter::once(&ours).chain(&pressure_pods) {
        cluster.wait_for_pod_gateway(pod, GATEWAY_IP, Duration::from_secs(30))?;
    }
    kernel_way::build(
        &cluster,
        &kernel,
        cluster.node(POD_NODE)?,
        cluster.node(GATEWAY)?,
        "198.51.100.0/24",
    )?;
    // Each path really leaves the way it claims.
    for (pod, expected) in [
        (&direct, POD_NODE_IP),
        (&ours, GATEWAY_IP),
        (&kernel, GATEWAY_IP),
    ] {
        let seen = cluster.source_ip_seen_by_destination(pod)?;
        if seen != expected {
            bail!(
                "pod {} reached the destination as {seen}, expected {expected}",
                pod.name
            );
        }
    }
    let paths = [("direct", &direct), ("ours", &ours), ("kernel", &kernel)];
    if let Some(seconds) = std::env::var_os("EGRESS_BENCH_PAUSE") {
        // For looking around the cluster by hand (`ip netns list`).
        eprintln!(
            "paused for {} s (EGRESS_BENCH_PAUSE)",
            seconds.to_string_lossy()
        );
        thread::sleep(Duration::from_secs(
            seconds.to_string_lossy().parse().unwrap_or(300),
        ));
    }

    let traffic = measure_traffic(bins, params, &paths)?;
    eprintln!(
        "-- NAT pressure: {} connections from {} pods",
        params.nat_connections, params.nat_pods
    );
    if let Some(range) = params.nat_port_range {
        // A small port space, so a few hundred connections exhaust it (the traffic runs
        // above keep the default range: it would throttle their short connections).
        cluster.kill_agent(GATEWAY, Signal::Term)?;
        cluster.start_agent_with_args(GATEWAY, &["--nat-port-range", range])?;
        // The old agent's pinned entries are still there: wait for the new one to run its
        // first reconcile (which writes the new range) instead.
        let synced = wait_until(Duration::from_secs(30), || {
            cluster
                .agent_log(GATEWAY)
                .matches("datapath in sync")
                .count()
                >= 2
        });
        if !synced {
            bail!(
                "the restarted gateway agent did not sync:\n{}",
                cluster.agent_log(GATEWAY)
            );
        }
    }
    let nat_pressure = nat_pressure(&cluster, bins, params, &pressure_pods)?;
    eprintln!(
        "-- manifest change to datapath, {} changes",
        params.latency_changes
    );
    let manifest_latency = manifest_latency(&cluster, bins, params, &ours)?;
    Ok(ClusterResults {
        traffic,
        nat_pressure,
        manifest_latency,
    })
}

fn policy_yaml() -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata:\n  name: bench-ours\n\
         spec:\n  selectors:\n  - podSelector:\n      matchLabels:\n        {}: {}\n  \
         destinationCIDRs:\n  - 198.51.100.0/24\n  egressGateway:\n    nodeSelector:\n      \
         matchLabels:\n        {}: \"{}\"\n",
        OURS_LABEL.0, OURS_LABEL.1, GATEWAY_LABEL.0, GATEWAY_LABEL.1
    )
}

/// iperf3 and two echo servers at the destination; dropped (killed) at the end.
fn start_servers(cluster: &Cluster, bins: &Binaries) -> Result<Vec<Background>> {
    let dst = cluster.destination_netns();
    let work = cluster.work_dir();
    let mut servers = Vec::new();
    let iperf = Background::spawn(
        netns_command(
            dst,
            &[
                "iperf3",
                "-s",
                "--forceflush",
                "-p",
                &IPERF_PORT.to_string(),
            ],
        ),
        &work.join("iperf3-server"),
    )?;
    servers.push(iperf);
    // The pressure port gets several servers (SO_REUSEPORT): each process may hold only
    // as many connections as its descriptor limit allows.
    let ports =
        std::iter::once(ECHO_PORT).chain(std::iter::repeat_n(PRESSURE_PORT, PRESSURE_SERVERS));
    for (i, port) in ports.enumerate() {
        let load = bins.load.to_string_lossy();
        let listen = format!("0.0.0.0:{port}");
        let server = Background::spawn(
            netns_command(dst, &[&*load, "serve", "--listen", &listen]),
            &work.join(format!("echo-{port}-{i}")),
        )?;
        servers.push(server);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(servers[0].stdout().contains("listening")
        && servers[1..].iter().all(|s| s.stdout().contains("ready")))
    {
        if Instant::now() > deadline {
            bail!(
                "benchmark servers did not start: {}",
                servers
                    .iter()
                    .map(Background::stderr)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(servers)
}

/// Runs a command in a pod and parses the JSON it prints (the last JSON line).
fn pod_json(pod: &Pod, args: &[&str], timeout: Duration) -> Result<Value> {
    let output = run_with_timeout(netns_command(&pod.netns, args), timeout)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{} in pod {} failed: {} {}",
            args.join(" "),
            pod.name,
            String::from_utf8_lossy(&output.stderr).trim(),
            stdout.trim()
        );
    }
    serde_json::from_str(stdout.trim())
        .or_else(|_| {
            stdout
                .lines()
                .rev()
                .find_map(|line| serde_json::from_str(line).ok())
                .ok_or_else(|| anyhow!("no JSON in the output"))
        })
        .with_context(|| format!("parsing the output of {}", args.join(" ")))
}

/// The metrics, in report order: (id, unit, higher is better).
pub(crate) const METRICS: [(&str, &str, bool); 6] = [
    ("tcp_1_stream_gbps", "Gbit/s", true),
    ("tcp_4_streams_gbps", "Gbit/s", true),
    ("udp_64b_pps", "packets/s", true),
    ("rr_p50_us", "µs", false),
    ("rr_p99_us", "µs", false),
    ("tcp_connections_per_s", "connections/s", true),
];

fn measure_traffic(bins: &Binaries, params: &Params, paths: &[(&str, &Pod)]) -> Result<Value> {
    let dest = DESTINATION_IP.to_string();
    let secs = params.iperf_seconds.to_string();
    let timeout = Duration::from_secs(u64::from(params.iperf_seconds) + 30);
    let load = bins.load.to_string_lossy().into_owned();
    let echo = format!("{DESTINATION_IP}:{ECHO_PORT}");
    let load_ms = params.load_ms.to_string();
    let port = IPERF_PORT.to_string();
    // runs[run][path] = { metric: value }
    let mut runs: Vec<Value> = Vec::new();
    for run in 0..params.runs {
        eprintln!("-- traffic run {}/{}", run + 1, params.runs);
        let mut by_path = serde_json::Map::new();
        for (name, pod) in paths {
            let iperf = |extra: &[&str]| -> Result<Value> {
                let mut args = vec!["iperf3", "-c", &dest, "-p", &port, "-t", &secs, "-J"];
                args.extend_from_slice(extra);
                pod_json(pod, &args, timeout)
            };
            let tcp1 = iperf(&["-P", "1"])?;
            let tcp4 = iperf(&["-P", "4"])?;
            let udp = iperf(&["-u", "-b", "0", "-l", "64"])?;
            let rr = pod_json(
                pod,
                &[&load, "rr", &echo, "--duration-ms", &load_ms],
                timeout,
            )?;
            let crr = pod_json(
                pod,
                &[&load, "crr", &echo, "--duration-ms", &load_ms],
                timeout,
            )?;
            let gbps = |v: &Value| {
                v["end"]["sum_received"]["bits_per_second"]
                    .as_f64()
                    .map(|b| b / 1e9)
            };
            let sum = &udp["end"]["sum"];
            let udp_pps = match (
                sum["packets"].as_f64(),
                sum["lost_packets"].as_f64(),
                sum["seconds"].as_f64(),
            ) {
                (Some(packets), Some(lost), Some(seconds)) if seconds > 0.0 => {
                    Some((packets - lost) / seconds)
                }
                _ => None,
            };
            let values = json!({
                "tcp_1_stream_gbps": gbps(&tcp1),
                "tcp_4_streams_gbps": gbps(&tcp4),
                "udp_64b_pps": udp_pps,
                "udp_64b_sent_pps": sum["packets"].as_f64().zip(sum["seconds"].as_f64()).map(|(p, s)| p / s),
                "rr_p50_us": rr["p50_us"],
                "rr_p99_us": rr["p99_us"],
                "tcp_connections_per_s": crr["per_second"],
                "tcp_connections_failed": crr["failed"],
            });
            eprintln!("   {name}: {values}");
            by_path.insert((*name).to_owned(), values);
        }
        runs.push(Value::Object(by_path));
    }
    Ok(json!({
        "iperf_seconds": params.iperf_seconds,
        "load_ms": params.load_ms,
        "pod_node": POD_NODE,
        "gateway": GATEWAY,
        "runs": runs,
    }))
}

fn nat_pressure(
    cluster: &Cluster,
    bins: &Binaries,
    params: &Params,
    pods: &[Pod],
) -> Result<Value> {
    let before = cluster.counters(GATEWAY)?;
    let go = cluster.work_dir().join("nat-pressure-verify");
    let _ = fs::remove_file(&go);
    let load = bins.load.to_string_lossy().into_owned();
    let server = format!("{DESTINATION_IP}:{PRESSURE_PORT}");
    let per_pod = params.nat_connections / params.nat_pods.max(1);
    let started = Instant::now();
    let mut clients = Vec::new();
    for pod in pods {
        let args = [
            load.as_str(),
            "hold",
            &server,
            "--connections",
            &per_pod.to_string(),
            "--connect-timeout-ms",
            &params.nat_connect_timeout_ms.to_string(),
            "--verify-when",
            &go.to_string_lossy(),
        ];
        clients.push(cluster.spawn_in_pod(pod, &format!("nat-pressure-{}", pod.name), &args)?);
    }
    let deadline = Instant::now() + Duration::from_mins(10);
    while !clients.iter().all(|c| c.stdout().contains("\"attempted\"")) {
        if Instant::now() > deadline || clients.iter_mut().any(|c| !c.is_running()) {
            bail!(
                "NAT pressure clients stopped early: {}",
                clients
                    .iter()
                    .map(Background::stderr)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    let attempt_seconds = started.elapsed().as_secs_f64();
    // While every connection is still held: what the gateway counted and holds.
    let after = cluster.counters(GATEWAY)?;
    let nat_entries = cluster
        .nat_list(GATEWAY)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len));
    fs::write(&go, "")?;
    let mut per_client = Vec::new();
    for client in clients {
        let finished = client.wait(Duration::from_mins(2))?;
        let last = finished
            .stdout
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str::<Value>(line).ok())
            .ok_or_else(|| anyhow!("no result from a NAT pressure client: {}", finished.stderr))?;
        per_client.push(last);
    }
    let total = |key: &str| {
        per_client
            .iter()
            .filter_map(|v| v[key].as_u64())
            .sum::<u64>()
    };
    let delta = |reason: &str| {
        after.get(reason).map_or(0, |c| c.packets) - before.get(reason).map_or(0, |c| c.packets)
    };
    let range = params.nat_port_range.unwrap_or("1024-32767");
    let (min, max) = range.split_once('-').context("NAT range")?;
    let port_space = max.parse::<u64>()? - min.parse::<u64>()? + 1;
    Ok(json!({
        "pods": params.nat_pods,
        "attempted": total("attempted"),
        "established": total("established"),
        "failed": total("failed"),
        "still_working_after": total("still_working"),
        "nat_port_range": range,
        "port_space": port_space,
        "snat_new_flows": delta("snat_new_flow"),
        "nat_port_retries": delta("nat_port_retry"),
        "drop_nat_exhausted": delta("drop_nat_exhausted"),
        "nat_entries_listed": nat_entries,
        "attempt_seconds": attempt_seconds,
        "per_client": per_client,
    }))
}

fn manifest_latency(
    cluster: &Cluster,
    bins: &Binaries,
    params: &Params,
    pod: &Pod,
) -> Result<Value> {
    let node = cluster.node(POD_NODE)?;
    let mut command = std::process::Command::new(&bins.bench);
    command
        .args(["measure", "manifest-latency", "--bpffs"])
        .arg(&node.bpffs)
        .arg("--manifests")
        .arg(cluster.manifests_dir())
        .args(["--pod-ip", &pod.ip.to_string()])
        .args(["--pod-label", &format!("{}={}", OURS_LABEL.0, OURS_LABEL.1)])
        .args([
            "--gateway-label",
            &format!("{}={}", GATEWAY_LABEL.0, GATEWAY_LABEL.1),
        ])
        .args(["--changes", &params.latency_changes.to_string()]);
    let output = run_with_timeout(command, Duration::from_mins(20))?;
    if !output.status.success() {
        bail!(
            "manifest-latency failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}
