//! The newcomer demo (`cargo xtask demo`): the how-to's story, end to end, on a namespace cluster.
//!
//! Builds k8s-worker-1..3 and an external destination, starts the agents, and shows the source
//! IP the destination sees: before the policy (the pod's node IP), with the policy (the
//! gateway's egress IP), and after the pod was rescheduled to another node (still the egress
//! IP); then with two gateway candidates and a floating egress IP, the active gateway fails
//! while a download runs: the destination keeps seeing the same address and the download
//! completes. Prints the agents' egress tables and a summary, and tears everything down (also
//! on Ctrl-C or an error). Exits non-zero if the destination saw anything else.
#![allow(
    unused_crate_dependencies,
    reason = "a binary links every dependency of its package; the library uses most of them"
)]

use std::{
    io::Write,
    net::Ipv4Addr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use egress_tests::{
    Cluster, ClusterConfig, Pod, binaries, example_policy, is_root, peer_url, teardown_all_clusters,
};

#[derive(Parser)]
#[command(about = "Egress gateway demo on a throw-away namespace cluster (needs root)")]
struct Args {
    /// Policy to apply (default: the how-to's policy, examples/how-to.yaml).
    #[arg(long)]
    policy: Option<PathBuf>,
}

const GATEWAY: &str = "k8s-worker-2";
const FIRST_NODE: &str = "k8s-worker-1";
const SECOND_NODE: &str = "k8s-worker-3";
const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(30);
/// The floating egress IP of examples/floating-egress-ip.yaml, on the gateways' eth1.
const FLOATING_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// The download that runs through the failover: 100 KiB, 1 KiB every 100 ms (10 s).
const DOWNLOAD_CHUNKS: u64 = 100;

/// One line of the summary: where the pod ran and what the destination saw.
struct Step {
    what: &'static str,
    node: String,
    pod_ip: Ipv4Addr,
    seen: Ipv4Addr,
    expected: Ipv4Addr,
    meaning: String,
}

impl Step {
    /// `kubectl exec <pod> -- curl` once, and what the destination should have seen.
    fn observe(
        cluster: &Cluster,
        what: &'static str,
        pod: &Pod,
        expected: Ipv4Addr,
        meaning: String,
    ) -> Result<Step> {
        Ok(Step {
            what,
            node: pod.node.clone(),
            pod_ip: pod.ip,
            seen: curl_source_ip(cluster, pod)?,
            expected,
            meaning,
        })
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(error) = tear_down_on_signals() {
        eprintln!("warning: Ctrl-C will not clean up: {error:#}");
    }
    let result = run(args);
    // Clusters are torn down when dropped inside `run`; this catches anything left.
    teardown_all_clusters();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("\ndemo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    if !is_root() {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    let started = Instant::now();
    let config = ClusterConfig::default();
    binaries::ensure_built("egress-agent", &config.agent_bin)?;
    let policy = args.policy.unwrap_or_else(|| example_policy("how-to.yaml"));
    let policy_text = std::fs::read_to_string(&policy)
        .with_context(|| format!("reading {}", policy.display()))?;

    heading("Building a test cluster in network namespaces");
    let mut cluster = Cluster::new(config).context("building the cluster")?;
    for node in &cluster.nodes {
        println!(
            "  {:<14} InternalIP {:<11} pods {}",
            node.name, node.ip, node.pod_cidr
        );
    }
    println!(
        "  {:<14} 198.51.100.10 (answers every request with the caller's source IP)",
        "destination"
    );
    let pod = cluster.add_pod(FIRST_NODE, "default", "my-app", &[("app", "my-app")])?;
    println!("$ kubectl get pod my-app -o wide");
    print_pod(&pod);

    heading("Starting egress-agent on every node");
    cluster.start_all_agents()?;
    println!("  logs: {}/agent-<node>.log", cluster.work_dir().display());

    let mut steps = Vec::new();
    heading("1. Before the policy: which source IP does the destination see?");
    let first_node_ip = cluster.node(FIRST_NODE)?.ip;
    steps.push(Step::observe(
        &cluster,
        "before the policy",
        &pod,
        first_node_ip,
        format!("{FIRST_NODE}'s node IP"),
    )?);
    println!("  -> {FIRST_NODE}'s own IP: it changes whenever the pod moves to another node.");

    heading("2. Choosing the gateway node and applying the how-to's policy");
    println!("$ kubectl label nodes {GATEWAY} egress-node=true");
    cluster.label_node(GATEWAY, "egress-node", "true")?;
    println!("$ kubectl apply -f {}", policy.display());
    for line in policy_text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
    {
        println!("    {line}");
    }
    let applied = cluster.apply_policy_file(&policy)?;
    let gateway_ip = cluster.node(GATEWAY)?.ip;
    wait_programmed(&cluster, &pod, gateway_ip)?;
    let egress_ip = egress_ip_on_gateway(&cluster, &pod)?;
    steps.push(Step::observe(
        &cluster,
        "with the policy",
        &pod,
        egress_ip,
        format!("egress IP of {GATEWAY}"),
    )?);
    println!("  -> {GATEWAY}'s egress IP: my-app now leaves the cluster through the gateway.");
    for node in [FIRST_NODE, GATEWAY] {
        heading(&format!("egress-agent bpf egress list   (on {node})"));
        print!("{}", cluster.agent_cli(node, &["bpf", "egress", "list"])?);
    }
    println!(
        "\n  The Egress IP is 0.0.0.0 everywhere except on the gateway, as with `cilium-dbg bpf egress list`."
    );

    heading(&format!(
        "3. The pod is rescheduled: deleted on {FIRST_NODE}, recreated on {SECOND_NODE}"
    ));
    println!("$ kubectl delete pod my-app");
    cluster.delete_pod(&pod)?;
    println!(
        "$ kubectl apply -f my-app.yaml   # nodeSelector: kubernetes.io/hostname: {SECOND_NODE}"
    );
    let moved = cluster.add_pod(SECOND_NODE, "default", "my-app", &[("app", "my-app")])?;
    println!("$ kubectl get pod my-app -o wide");
    print_pod(&moved);
    wait_programmed(&cluster, &moved, gateway_ip)?;
    steps.push(Step::observe(
        &cluster,
        "after the move",
        &moved,
        egress_ip,
        format!("egress IP of {GATEWAY}"),
    )?);
    println!(
        "  -> a new node and a new pod IP, and still {GATEWAY}'s egress IP: the allow-list keeps working."
    );
    heading(&format!(
        "egress-agent bpf egress list   (on {SECOND_NODE})"
    ));
    print!(
        "{}",
        cluster.agent_cli(SECOND_NODE, &["bpf", "egress", "list"])?
    );

    let failover = floating_failover(&mut cluster, &moved, (&policy, &applied), &mut steps)?;

    heading("Tearing the cluster down");
    drop(cluster);
    println!("  done.");

    summarize(&steps, started.elapsed(), &failover)
}

/// Step 4: a second candidate, a floating egress IP, and the active gateway failing while a
/// download runs. Returns the line the summary ends with about it.
/// `applied` is the first policy (its file, and the name `delete_policy` knows it by): it
/// makes way for the floating one.
fn floating_failover(
    cluster: &mut Cluster,
    pod: &Pod,
    applied: (&std::path::Path, &str),
    steps: &mut Vec<Step>,
) -> Result<String> {
    heading("4. Two gateways, a floating egress IP, and the active gateway fails");
    for node in [GATEWAY, SECOND_NODE] {
        cluster.add_secondary_interface(node)?;
    }
    println!("  (both gateways get eth1 on 192.0.2.0/24, where the floating IP lives)");
    println!("$ kubectl label nodes {SECOND_NODE} egress-node=true");
    cluster.label_node(SECOND_NODE, "egress-node", "true")?;
    println!("$ kubectl delete -f {}", applied.0.display());
    cluster.delete_policy(applied.1)?;
    let floating = example_policy("floating-egress-ip.yaml");
    println!("$ kubectl apply -f {}", floating.display());
    let text = std::fs::read_to_string(&floating)
        .with_context(|| format!("reading {}", floating.display()))?;
    for line in text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
    {
        println!("    {line}");
    }
    cluster.apply_policy_file(&floating)?;
    wait_for_source(cluster, pod, FLOATING_IP)?;
    steps.push(Step::observe(
        cluster,
        "floating egress IP",
        pod,
        FLOATING_IP,
        format!("the floating IP, on {GATEWAY}"),
    )?);
    let url = peer_url(&format!("/drip/{DOWNLOAD_CHUNKS}"));
    println!(
        "$ kubectl exec {} -- curl -s -o /dev/null {url} &   # 10 s",
        pod.name
    );
    let download = cluster.spawn_in_pod(
        pod,
        "demo-download",
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{http_code}",
            "--max-time",
            "60",
            &url,
        ],
    )?;
    std::thread::sleep(Duration::from_secs(3));
    println!(
        "$ ip link set eth0 down; ip link set eth1 down   # on {GATEWAY}: the gateway is gone"
    );
    cluster.set_link(GATEWAY, "eth0", false)?;
    cluster.set_link(GATEWAY, "eth1", false)?;
    let failed_at = Instant::now();
    wait_for_source(cluster, pod, FLOATING_IP)?;
    let served_after = failed_at.elapsed();
    steps.push(Step::observe(
        cluster,
        "gateway failed",
        pod,
        FLOATING_IP,
        format!("the floating IP, now on {SECOND_NODE}"),
    )?);
    let finished = download
        .wait(Duration::from_mins(1))
        .context("waiting for the download")?;
    let expected = format!("{} 200", DOWNLOAD_CHUNKS * 1024);
    if !finished.status.success() || finished.stdout.trim() != expected {
        bail!(
            "the download through the failover did not complete: {} {}",
            finished.stdout.trim(),
            finished.stderr
        );
    }
    println!(
        "  -> a new request was served through {SECOND_NODE}, with the same IP, {:.1} s after \
         {GATEWAY} went away (the first one may wait for a TCP retransmit); the download \
         completed ({} bytes) on its one connection.",
        served_after.as_secs_f64(),
        DOWNLOAD_CHUNKS * 1024
    );
    Ok(format!(
        "Through the gateway failure the destination kept seeing {FLOATING_IP}, and the download \
         went on."
    ))
}

/// Waits until a request from `pod` leaves with `source`.
fn wait_for_source(cluster: &Cluster, pod: &Pod, source: Ipv4Addr) -> Result<()> {
    let deadline = Instant::now() + PROGRAMMED_TIMEOUT;
    loop {
        let url = peer_url("/");
        if cluster
            .curl_from_pod(pod, &url)
            .is_ok_and(|body| body.trim() == source.to_string())
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("requests from {} never left with {source}", pod.name);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `kubectl exec my-app -- curl`: the source IP the destination answered with.
fn curl_source_ip(cluster: &Cluster, pod: &Pod) -> Result<Ipv4Addr> {
    let url = peer_url("/");
    println!("$ kubectl exec {} -- curl -s {url}", pod.name);
    let body = cluster.curl_from_pod(pod, &url)?;
    println!("{body}");
    body.parse()
        .with_context(|| format!("the destination answered {body:?}, not an IP"))
}

fn wait_programmed(cluster: &Cluster, pod: &Pod, gateway_ip: Ipv4Addr) -> Result<()> {
    print!(
        "  waiting until the agents have programmed the policy for {} ... ",
        pod.ip
    );
    std::io::stdout().flush()?;
    let started = Instant::now();
    cluster.wait_for_pod_gateway(pod, gateway_ip, PROGRAMMED_TIMEOUT)?;
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The egress IP the gateway's agent programmed for the pod (the Egress IP column there).
fn egress_ip_on_gateway(cluster: &Cluster, pod: &Pod) -> Result<Ipv4Addr> {
    cluster
        .egress_list(GATEWAY)?
        .iter()
        .find(|entry| entry.source() == Some(pod.ip))
        .and_then(egress_tests::EgressEntry::egress)
        .with_context(|| format!("{GATEWAY} has no egress entry for {}", pod.ip))
}

fn print_pod(pod: &Pod) {
    println!("  {:<8} {:<8} {:<12} NODE", "NAME", "STATUS", "IP");
    println!(
        "  {:<8} {:<8} {:<12} {}",
        pod.name, "Running", pod.ip, pod.node
    );
}

/// The one-screen summary; fails if the destination saw a source other than expected.
fn summarize(steps: &[Step], took: Duration, failover: &str) -> Result<()> {
    heading("Summary: the source IP the destination saw");
    println!(
        "  {:<20} {:<14} {:<12} destination saw",
        "step", "pod on", "pod IP"
    );
    for step in steps {
        let verdict = if step.seen == step.expected {
            step.meaning.clone()
        } else {
            format!("WRONG: expected {} ({})", step.expected, step.meaning)
        };
        println!(
            "  {:<20} {:<14} {:<12} {:<15} {verdict}",
            step.what,
            step.node,
            step.pod_ip.to_string(),
            step.seen.to_string()
        );
    }
    println!("  ({:.0} s)", took.as_secs_f64());
    if let Some(wrong) = steps.iter().find(|step| step.seen != step.expected) {
        bail!(
            "{}: the destination saw {}, expected {} ({})",
            wrong.what,
            wrong.seen,
            wrong.expected,
            wrong.meaning
        );
    }
    // The how-to's story ends the demo: the egress IP of its gateway, wherever the pod ran.
    let egress = steps
        .iter()
        .find(|step| step.what == "after the move")
        .map_or(Ipv4Addr::UNSPECIFIED, |step| step.seen);
    println!("\n{failover}");
    println!("The destination saw the egress IP {egress} wherever my-app ran.");
    Ok(())
}

fn heading(title: &str) {
    println!("\n== {title}");
}

/// Blocks SIGINT/SIGTERM for the process and waits for them on a thread that tears the clusters
/// down before exiting. Must run before any other thread starts (threads inherit the mask; the
/// processes we spawn do not: std resets the mask in children).
fn tear_down_on_signals() -> Result<()> {
    // SAFETY: sigset manipulation on a local set, then pthread_sigmask on the calling thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) != 0 {
            bail!("pthread_sigmask failed");
        }
        set
    };
    std::thread::spawn(move || {
        let mut signal: libc::c_int = 0;
        // SAFETY: sigwait on a valid set and a valid out pointer.
        if unsafe { libc::sigwait(&raw const set, &raw mut signal) } == 0 {
            eprintln!("\ninterrupted: tearing the cluster down ...");
            teardown_all_clusters();
            std::process::exit(130);
        }
    });
    Ok(())
}
