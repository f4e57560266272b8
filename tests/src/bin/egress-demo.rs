//! The newcomer demo (`cargo xtask demo`): the how-to, end to end, on a namespace cluster.
//!
//! Builds k8s-worker-1..3 and an external destination, starts the agents, shows the source IP the
//! destination sees before and after applying the how-to's policy, prints the agents' egress
//! tables, and tears everything down (also on Ctrl-C or an error).

use std::{
    io::Write,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use egress_tests::{
    Cluster, ClusterConfig, is_root, peer_url, shared_policy, teardown_all_clusters,
};

#[derive(Parser)]
#[command(about = "Egress gateway demo on a throw-away namespace cluster (needs root)")]
struct Args {
    /// Policy to apply (default: the how-to's seed-example.yaml from shared/policies).
    #[arg(long)]
    policy: Option<PathBuf>,
}

const GATEWAY: &str = "k8s-worker-2";
const CLIENT_NODE: &str = "k8s-worker-1";

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
    let config = ClusterConfig::default();
    if !config.agent_bin.is_file() {
        bail!(
            "agent binary {} not found: run `cargo build -p egress-agent` first",
            config.agent_bin.display()
        );
    }
    let policy = args
        .policy
        .unwrap_or_else(|| shared_policy("seed-example.yaml"));

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
    let pod = cluster.add_pod(CLIENT_NODE, "default", "my-app", &[("app", "my-app")])?;
    println!(
        "  pod default/my-app (app=my-app) on {CLIENT_NODE}, IP {}",
        pod.ip
    );

    heading("Starting egress-agent on every node");
    cluster.start_all_agents()?;
    println!("  logs: {}/agent-<node>.log", cluster.work_dir().display());

    heading("Before the policy: which source IP does the destination see?");
    let url = peer_url("/");
    println!("$ kubectl exec my-app -- curl -s {url}");
    let before = cluster.curl_from_pod(&pod, &url)?;
    println!("{before}");
    println!(
        "  -> {CLIENT_NODE}'s own IP: the pod's address changes whenever it moves to another node."
    );

    heading("Choosing the gateway node and applying the how-to's policy");
    println!("$ kubectl label nodes {GATEWAY} egress-node=true");
    cluster.label_node(GATEWAY, "egress-node", "true")?;
    println!("$ kubectl apply -f {}", policy.display());
    let policy_text = std::fs::read_to_string(&policy)
        .with_context(|| format!("reading {}", policy.display()))?;
    for line in policy_text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
    {
        println!("    {line}");
    }
    cluster.apply_policy_file(&policy)?;
    let gateway_ip = cluster.node(GATEWAY)?.ip;
    print!("  waiting until the agents have programmed the policy ... ");
    std::io::stdout().flush()?;
    let started = Instant::now();
    cluster.wait_for_pod_gateway(&pod, gateway_ip, Duration::from_secs(30))?;
    println!("done in {:.1} s", started.elapsed().as_secs_f64());

    heading("After the policy");
    println!("$ kubectl exec my-app -- curl -s {url}");
    let after = cluster.curl_from_pod(&pod, &url)?;
    println!("{after}");
    println!(
        "  -> {GATEWAY}'s IP on eth0: my-app now leaves the cluster through the gateway, wherever it runs."
    );

    for node in [CLIENT_NODE, GATEWAY] {
        heading(&format!("egress-agent bpf egress list   (on {node})"));
        print!("{}", cluster.agent_cli(node, &["bpf", "egress", "list"])?);
    }
    println!(
        "\n  The Egress IP is 0.0.0.0 everywhere except on the gateway, as with `cilium-dbg bpf egress list`."
    );

    heading("Tearing the cluster down");
    drop(cluster);
    println!("  done.");
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
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("pthread_sigmask failed");
        }
        set
    };
    std::thread::spawn(move || {
        let mut signal: libc::c_int = 0;
        // SAFETY: sigwait on a valid set and a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            eprintln!("\ninterrupted: tearing the cluster down ...");
            teardown_all_clusters();
            std::process::exit(130);
        }
    });
    Ok(())
}
