//! The agent fed by the Kubernetes API (`run --kubernetes`), end to end.
//!
//! There is no real API server here: each test runs the harness's [`ApiServer`] inside the
//! cluster's underlay namespace (10.0.0.1:6443), serving the cluster's manifests folder through
//! the real list and watch protocol, and breaks it the ways real API servers break. Needs root
//! and a built agent, like tests/cluster.rs.
#![allow(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

use std::{
    net::{IpAddr, Ipv4Addr},
    thread,
    time::Duration,
};

use egress_tests::{
    AgentSource, ApiServer, Cluster, ClusterConfig, LeakDetector, PEER_HTTP_PORT, Pod, Signal,
    WatchBreak, apiserver::Kind, example_policy, skip_unless_root, wait_for_value, wait_until,
};
use serde_json::{Value, json};

const WORKER_1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const WORKER_2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const WORKER_3: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 13);
/// How long an agent may take to program a change.
const PROGRAMMED: Duration = Duration::from_secs(30);
/// how-to.yaml's name.
const POLICY: &str = "egress-sample";

/// A cluster, its API server, and a kubeconfig for the agents.
struct Setup {
    cluster: Cluster,
    api: ApiServer,
    source: AgentSource,
}

impl Setup {
    /// The how-to's state: k8s-worker-2 labelled egress-node=true, how-to.yaml applied.
    fn new() -> Setup {
        let mut setup = Setup::bare();
        setup
            .cluster
            .label_node("k8s-worker-2", "egress-node", "true")
            .unwrap();
        setup
            .cluster
            .apply_policy_file(example_policy("how-to.yaml"))
            .unwrap();
        setup.sync();
        setup
    }

    /// Nodes and namespaces, no policy, no label.
    fn bare() -> Setup {
        let cluster = Cluster::new(ClusterConfig::with_peer_bin(env!(
            "CARGO_BIN_EXE_egress-peer"
        )))
        .expect("building the test cluster");
        let api =
            ApiServer::start_in_netns(cluster.underlay_netns()).expect("starting the API server");
        let kubeconfig = api
            .write_kubeconfig(&cluster.work_dir().join("kubeconfig"))
            .unwrap();
        let setup = Setup {
            cluster,
            api,
            source: AgentSource::Kubernetes { kubeconfig },
        };
        setup.sync();
        setup
    }

    /// kubectl against the API server, as a user runs it (see [`kubectl_installed`]); its
    /// output. Panics with its output when it fails.
    fn kubectl(&self, args: &[&str]) -> String {
        let AgentSource::Kubernetes { kubeconfig } = &self.source else {
            unreachable!("the agents read the API server")
        };
        let kubeconfig = kubeconfig.to_string_lossy().into_owned();
        let cache = self.cluster.work_dir().join("kubectl-cache");
        let cache = cache.to_string_lossy().into_owned();
        let mut command = vec![
            "kubectl",
            "--kubeconfig",
            &kubeconfig,
            "--cache-dir",
            &cache,
        ];
        command.extend_from_slice(args);
        let output = self
            .cluster
            .exec(self.cluster.underlay_netns(), &command)
            .unwrap_or_else(|error| panic!("kubectl {args:?}: {error:#}"));
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Publishes the cluster's current objects through the API server (with watch events).
    fn sync(&self) {
        self.api
            .sync_from_dir(self.cluster.manifests_dir())
            .expect("syncing the API server");
    }

    fn start_agents(&self) {
        for node in ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"] {
            self.cluster.start_agent_with(node, &self.source).unwrap();
        }
    }

    fn add_my_app(&mut self, node: &str, name: &str) -> Pod {
        let pod = self
            .cluster
            .add_pod(node, "default", name, &[("app", "my-app")])
            .unwrap();
        self.sync();
        pod
    }

    /// Pod list requests so far (one per agent unless something relisted).
    fn pod_lists(&self) -> usize {
        self.api
            .requests()
            .iter()
            .filter(|request| request.is_list_of(Kind::Pod))
            .count()
    }

    fn wait_for_steered(&self, pod: &Pod) {
        self.cluster
            .wait_for_pod_gateway(pod, WORKER_2, PROGRAMMED)
            .unwrap();
        assert_eq!(
            self.cluster.source_ip_seen_by_destination(pod).unwrap(),
            WORKER_2,
            "the destination sees the gateway's IP"
        );
    }

    /// Waits until no node lists an entry for `pod`.
    fn wait_for_gone_everywhere(&self, pod: &Pod) {
        for node in ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"] {
            let gone = wait_until(PROGRAMMED, || {
                self.cluster
                    .egress_list(node)
                    .is_ok_and(|entries| entries.iter().all(|e| e.source() != Some(pod.ip)))
            });
            assert!(
                gone,
                "{node} still lists {}: {:?}\n{}",
                pod.ip,
                self.cluster.egress_list(node),
                self.cluster.agent_log(node)
            );
        }
    }

    fn lists_pod(&self, node: &str, pod: &Pod) -> bool {
        self.cluster
            .egress_list(node)
            .unwrap()
            .iter()
            .any(|entry| entry.source() == Some(pod.ip))
    }
}

#[test]
fn pod_added_through_the_watch_gets_the_gateway_egress_ip() {
    skip_unless_root!();
    let mut setup = Setup::new();
    setup.start_agents();
    // The agents listed an empty set of pods; this one arrives as an ADDED watch event.
    wait_for_lists(&setup, 3);
    let pod = setup.add_my_app("k8s-worker-1", "my-app");
    setup.wait_for_steered(&pod);
    assert_eq!(
        setup.pod_lists(),
        3,
        "the pod came through the watch, not a relist"
    );
    for node in ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"] {
        assert!(
            setup.cluster.agent_running(node).unwrap(),
            "{node}'s agent runs"
        );
    }
}

#[test]
fn watch_cut_mid_event_is_resumed() {
    skip_unless_root!();
    let mut setup = Setup::new();
    let first = setup.add_my_app("k8s-worker-1", "first");
    setup.start_agents();
    setup.wait_for_steered(&first);
    let watches_before = pod_watches(&setup);

    setup.api.break_watches(WatchBreak::Cut);
    let second = setup.add_my_app("k8s-worker-3", "second");
    setup.wait_for_steered(&second);
    setup.wait_for_steered(&first);

    let resumed: Vec<_> = setup.api.requests()[..]
        .iter()
        .filter(|request| request.is_watch_of(Kind::Pod))
        .skip(watches_before)
        .map(|request| request.query.get("resourceVersion").cloned())
        .collect();
    assert!(
        resumed.len() >= 3
            && resumed
                .iter()
                .all(|version| version.as_deref().is_some_and(|v| v != "0")),
        "every agent watched again from where it was: {resumed:?}"
    );
    assert_eq!(
        setup.pod_lists(),
        3,
        "a cut watch resumes without listing again"
    );
}

#[test]
fn relist_after_410_removes_entries_whose_delete_was_lost() {
    skip_unless_root!();
    let mut setup = Setup::new();
    let doomed = setup.add_my_app("k8s-worker-1", "doomed");
    let kept = setup.add_my_app("k8s-worker-3", "kept");
    setup.start_agents();
    setup.wait_for_steered(&doomed);
    setup.wait_for_steered(&kept);

    // The pod goes, but its DELETED event is lost: the agents cannot know yet.
    setup.cluster.delete_pod(&doomed).unwrap();
    setup
        .api
        .sync_from_dir_losing_deletes(setup.cluster.manifests_dir())
        .unwrap();
    assert!(
        setup.lists_pod("k8s-worker-1", &doomed),
        "no event, no change yet"
    );

    // 410 on the open watches: the agents list again and sweep the stale entries.
    let lists = setup.pod_lists();
    setup.api.break_watches(WatchBreak::Gone);
    setup.wait_for_gone_everywhere(&doomed);
    assert!(
        setup.pod_lists() > lists,
        "the 410 made the agents list again"
    );
    setup.wait_for_steered(&kept);

    // Same through a resumed watch: the history is compacted, so resuming gets 410 too.
    let doomed_again = setup.add_my_app("k8s-worker-2", "doomed-again");
    setup
        .cluster
        .wait_for_pod_programmed(&doomed_again, PROGRAMMED)
        .unwrap();
    setup.cluster.delete_pod(&doomed_again).unwrap();
    setup
        .api
        .sync_from_dir_losing_deletes(setup.cluster.manifests_dir())
        .unwrap();
    setup.api.forget_history();
    setup.api.break_watches(WatchBreak::Cut);
    setup.wait_for_gone_everywhere(&doomed_again);
    setup.wait_for_steered(&kept);
}

#[test]
fn policy_status_is_written_once_by_the_gateway() {
    skip_unless_root!();
    let mut setup = Setup::new();
    let pod = setup.add_my_app("k8s-worker-1", "my-app");
    let invalid = "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata:\n  name: \
                   invalid\nspec:\n  selectors:\n  - podSelector: {}\n  egressGateway:\n    \
                   nodeSelector: {}\n";
    setup.cluster.apply_policy("orphan", ORPHAN).unwrap();
    setup.cluster.apply_policy("invalid", invalid).unwrap();
    setup.sync();
    setup.start_agents();
    setup.wait_for_steered(&pod);

    let served = wait_for_status(&setup, POLICY, |status| status["matchedPods"] == json!(1));
    assert_eq!(served["gatewayNodes"], json!(["k8s-worker-2"]), "{served}");
    assert_eq!(served["egressIP"], json!(WORKER_2.to_string()), "{served}");
    assert_eq!(served["observedGeneration"], json!(1), "{served}");
    assert_ready(&served, "True", "Programmed");

    let orphan = wait_for_status(&setup, "orphan", |status| !status["conditions"].is_null());
    assert_ready(&orphan, "False", "NoGatewayNode");
    assert_eq!(orphan["gatewayNodes"], json!([]), "{orphan}");
    let invalid = wait_for_status(&setup, "invalid", |status| !status["conditions"].is_null());
    assert_ready(&invalid, "False", "InvalidSpec");
    let message = invalid["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("spec.destinationCIDRs"), "{message}");

    // Every agent has reconciled the policies (each node programs every matched pod);
    // give a wrongly elected writer time to show up, then check there was only one.
    for node in ["k8s-worker-1", "k8s-worker-3"] {
        setup
            .cluster
            .wait_for_egress_entry(node, PROGRAMMED, "the pod's entry", |entry| {
                entry.source() == Some(pod.ip)
            })
            .unwrap();
    }
    thread::sleep(Duration::from_secs(2));
    let writes = setup.api.status_writes();
    let from = |policy: &str| -> Vec<IpAddr> {
        writes
            .iter()
            .filter(|write| write.name == policy)
            .map(|write| write.from)
            .collect()
    };
    assert_eq!(
        from(POLICY),
        [IpAddr::V4(WORKER_2)],
        "one write, from the gateway: {writes:#?}"
    );
    // No gateway, or invalid: the Lease holder writes, once.
    let holder = lease_holder(&setup).expect("the status writer's Lease is held");
    let holder_ip = IpAddr::V4(setup.cluster.node(&holder).unwrap().ip);
    assert_eq!(
        from("orphan"),
        [holder_ip],
        "no gateway: the Lease holder writes"
    );
    assert_eq!(
        from("invalid"),
        [holder_ip],
        "invalid: the Lease holder writes"
    );
    assert!(
        writes.iter().all(|write| write
            .content_type
            .starts_with("application/apply-patch+yaml")
            && write.field_manager.as_deref() == Some("egress-gateway-agent")
            && write.code == 200),
        "server-side apply with the agents' field manager: {writes:#?}"
    );
    // Each policy's first status is a transition, recorded once as an Event on it.
    let events = policy_events(&setup);
    for (policy, type_, reason) in [
        (POLICY, "Normal", "Programmed"),
        ("orphan", "Warning", "NoGatewayNode"),
        ("invalid", "Warning", "InvalidSpec"),
    ] {
        let of_policy: Vec<&Value> = events
            .iter()
            .filter(|event| event["regarding"]["name"] == json!(policy))
            .collect();
        assert_eq!(of_policy.len(), 1, "{policy}: {events:#?}");
        assert_eq!(of_policy[0]["type"], json!(type_), "{policy}: {events:#?}");
        assert_eq!(
            of_policy[0]["reason"],
            json!(reason),
            "{policy}: {events:#?}"
        );
        assert_eq!(
            of_policy[0]["regarding"]["kind"],
            json!("CiliumEgressGatewayPolicy")
        );
    }

    // A change in what the policy serves updates the status.
    setup.cluster.delete_pod(&pod).unwrap();
    setup.sync();
    let emptied = wait_for_status(&setup, POLICY, |status| status["matchedPods"] == json!(0));
    assert_ready(&emptied, "True", "Programmed");
    assert_eq!(
        emptied["conditions"][0]["lastTransitionTime"],
        served["conditions"][0]["lastTransitionTime"],
        "still Ready: no transition"
    );
}

/// A policy without a gateway selecting every pod (so a new pod changes its status).
const ORPHAN: &str = "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata:\n  name: \
                      orphan\nspec:\n  selectors:\n  - podSelector: {}\n  destinationCIDRs: \
                      [203.0.113.0/24]\n  egressGateway:\n    nodeSelector:\n      matchLabels: \
                      {pool: none}\n";

/// A policy whose gateway spec has two candidates, k8s-worker-2 and k8s-worker-3 (both
/// labelled egress-node=true), leaving through eth0.
const TWO_CANDIDATES: &str = "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\n\
                              metadata:\n  name: failover\nspec:\n  selectors:\n  - \
                              podSelector:\n      matchLabels: {app: my-app}\n  \
                              destinationCIDRs: [198.51.100.0/24]\n  egressGateway:\n    \
                              nodeSelector:\n      matchLabels: {egress-node: 'true'}\n    \
                              interface: eth0\n";

/// The status names the active gateway through a failover: the first candidate while it is
/// up; when its links go down (it cannot even reach the API server), the next candidate,
/// whose probes find it down, writes itself as the active node; when it is back, it writes
/// itself again.
#[test]
fn the_status_names_the_active_gateway_through_a_failover() {
    skip_unless_root!();
    let mut setup = Setup::bare();
    for node in ["k8s-worker-2", "k8s-worker-3"] {
        setup
            .cluster
            .label_node(node, "egress-node", "true")
            .unwrap();
    }
    setup
        .cluster
        .apply_policy("failover", TWO_CANDIDATES)
        .unwrap();
    let pod = setup.add_my_app("k8s-worker-1", "my-app");
    setup.start_agents();
    setup.wait_for_steered(&pod);
    setup.cluster.start_capture().unwrap();
    let both = json!([["k8s-worker-2", "k8s-worker-3"]]);
    let first = wait_for_status(&setup, "failover", |status| {
        status["healthyCandidateNodes"] == both
    });
    assert_eq!(first["gatewayNodes"], json!(["k8s-worker-2"]), "{first}");
    assert_eq!(first["candidateNodes"], both, "{first}");

    setup
        .cluster
        .set_link("k8s-worker-2", "eth0", false)
        .unwrap();
    let moved = wait_for_status(&setup, "failover", |status| {
        status["gatewayNodes"] == json!(["k8s-worker-3"])
    });
    assert_eq!(
        moved["healthyCandidateNodes"],
        json!([["k8s-worker-3"]]),
        "{moved}"
    );
    assert_eq!(moved["egressIP"], json!(WORKER_3.to_string()), "{moved}");
    assert_ready(&moved, "True", "Programmed");
    assert_eq!(
        setup.cluster.source_ip_seen_by_destination(&pod).unwrap(),
        WORKER_3,
        "new requests leave through the next candidate"
    );

    setup
        .cluster
        .set_link("k8s-worker-2", "eth0", true)
        .unwrap();
    let back = wait_for_status(&setup, "failover", |status| {
        status["healthyCandidateNodes"] == both
    });
    assert_eq!(back["gatewayNodes"], json!(["k8s-worker-2"]), "{back}");
    let packets = setup.cluster.stop_capture().unwrap();
    let matched = LeakDetector::new()
        .matched_port(PEER_HTTP_PORT, [WORKER_2, WORKER_3])
        .forbidden_sources([pod.ip, WORKER_1])
        .check(&packets)
        .unwrap();
    assert!(matched > 0, "the pod's requests were captured");
}

/// The agent holding the status writer's Lease dies (kill -9): once the Lease expires, a live
/// agent takes it over and writes the status of the policy without a gateway.
#[test]
fn a_live_agent_takes_over_the_status_when_the_lease_holder_dies() {
    skip_unless_root!();
    let mut setup = Setup::new();
    setup.cluster.apply_policy("orphan", ORPHAN).unwrap();
    setup.sync();
    setup.start_agents();
    let first = wait_for_status(&setup, "orphan", |status| {
        !status["conditions"].is_null() && status["matchedPods"] == json!(0)
    });
    assert_ready(&first, "False", "NoGatewayNode");
    let holder = lease_holder(&setup).expect("the status writer's Lease is held");
    setup.cluster.kill_agent(&holder, Signal::Kill).unwrap();
    let writes_before = setup.api.status_writes().len();

    // A change the orphan's status must show: a new pod it selects, on a live node.
    let live_node = ["k8s-worker-1", "k8s-worker-3"]
        .into_iter()
        .find(|node| *node != holder)
        .unwrap();
    setup.add_my_app(live_node, "my-app");
    let updated = wait_for_status(&setup, "orphan", |status| status["matchedPods"] == json!(1));
    assert_ready(&updated, "False", "NoGatewayNode");
    let new_holder = lease_holder(&setup).expect("the Lease is held again");
    assert_ne!(new_holder, holder, "the dead agent cannot hold the Lease");
    let lease = setup
        .api
        .object(Kind::Lease, "kube-system", "egress-gateway-status-writer")
        .unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], json!(1), "{lease}");
    let new_ip = IpAddr::V4(setup.cluster.node(&new_holder).unwrap().ip);
    let orphan_writes: Vec<IpAddr> = setup.api.status_writes()[writes_before..]
        .iter()
        .filter(|write| write.name == "orphan")
        .map(|write| write.from)
        .collect();
    assert!(
        !orphan_writes.is_empty() && orphan_writes.iter().all(|from| *from == new_ip),
        "after the take-over only {new_holder} writes: {orphan_writes:?}"
    );
}

/// A user's session with kubectl: label the gateway node, apply the how-to's policy with
/// server-side apply, read it with `kubectl get cegp`; unlabel the node and see the policy's
/// status and Events say why traffic stops; delete the policy.
#[test]
fn kubectl_labels_applies_reads_and_deletes_policies() {
    skip_unless_root!();
    if !kubectl_installed() {
        return;
    }
    let mut setup = Setup::bare();
    let pod = setup.add_my_app("k8s-worker-1", "my-app");
    setup.start_agents();
    setup.cluster.start_capture().unwrap();
    setup.kubectl(&["label", "node", "k8s-worker-2", "egress-node=true"]);
    let how_to = example_policy("how-to.yaml");
    let applied = setup.kubectl(&["apply", "--server-side", "-f", &how_to.to_string_lossy()]);
    assert!(applied.contains("serverside-applied"), "{applied}");
    setup.wait_for_steered(&pod);

    let table = wait_for_value(PROGRAMMED, || {
        let table = setup.kubectl(&["get", "cegp"]);
        table.contains("Programmed").then_some(table)
    })
    .expect("kubectl get cegp shows the policy programmed");
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "NAME", "READY", "REASON", "GATEWAY", "EGRESS", "IP", "PODS", "AGE"
        ],
        "{table}"
    );
    assert_eq!(
        lines[1][..6],
        [
            "egress-sample",
            "True",
            "Programmed",
            "[\"k8s-worker-2\"]",
            "10.0.0.12",
            "1"
        ],
        "{table}"
    );

    // No gateway node any more: traffic stops (never leaves with the node's own IP) and the
    // status and a Warning Event say why.
    setup.kubectl(&["label", "node", "k8s-worker-2", "egress-node-"]);
    let reason = |setup: &Setup| {
        setup.kubectl(&[
            "get",
            "cegp",
            "egress-sample",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}",
        ])
    };
    assert!(
        wait_until(PROGRAMMED, || reason(&setup) == "NoGatewayNode"),
        "{}",
        setup.kubectl(&["get", "cegp", "egress-sample", "-o", "yaml"])
    );
    assert!(
        wait_until(PROGRAMMED, || setup
            .cluster
            .source_ip_seen_by_destination(&pod)
            .is_err()),
        "the pod still reaches the destination without a gateway"
    );
    let events: Value = serde_json::from_str(&setup.kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        "default",
        "-o",
        "json",
    ]))
    .unwrap();
    let seen: Vec<(String, String)> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["regarding"]["name"] == json!(POLICY))
        .map(|event| {
            let field = |name: &str| event[name].as_str().unwrap_or_default().to_string();
            (field("type"), field("reason"))
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("Normal".to_string(), "Programmed".to_string()),
            ("Warning".to_string(), "NoGatewayNode".to_string()),
        ],
        "{events:#}"
    );

    setup.kubectl(&["delete", "cegp", "egress-sample"]);
    setup.wait_for_gone_everywhere(&pod);
    let packets = setup.cluster.stop_capture().unwrap();
    let matched = LeakDetector::new()
        .matched_port(PEER_HTTP_PORT, [WORKER_2])
        .forbidden_sources([pod.ip, WORKER_1])
        .check(&packets)
        .unwrap();
    assert!(matched > 0, "the pod's requests were captured");
}

/// Status writes, the agents' own or anyone else's, rebuild nothing: no agent reprograms its
/// datapath for a status-only change. A wrong status is put right by the writer.
#[test]
fn status_writes_rebuild_nothing_and_a_wrong_status_is_put_right() {
    skip_unless_root!();
    if !kubectl_installed() {
        return;
    }
    let mut setup = Setup::new();
    let pod = setup.add_my_app("k8s-worker-1", "my-app");
    setup.start_agents();
    setup.wait_for_steered(&pod);
    wait_for_status(&setup, POLICY, |status| status["matchedPods"] == json!(1));
    // Let the agents see the status written; then count what they program from now on.
    thread::sleep(Duration::from_secs(3));
    let nodes = ["k8s-worker-1", "k8s-worker-2", "k8s-worker-3"];
    let programmed = |setup: &Setup| -> Vec<Option<f64>> {
        nodes
            .iter()
            .map(|node| {
                setup
                    .cluster
                    .agent_metric(node, "egress_gateway_event_to_programmed_seconds_count")
            })
            .collect()
    };
    let before = programmed(&setup);
    assert!(before.iter().all(Option::is_some), "{before:?}");
    let writes_before = setup.api.status_writes().len();
    for wrong in [7, 8, 9] {
        setup.kubectl(&[
            "patch",
            "cegp",
            POLICY,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!("{{\"status\":{{\"matchedPods\":{wrong}}}}}"),
        ]);
        wait_for_status(&setup, POLICY, |status| status["matchedPods"] == json!(1));
    }
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        programmed(&setup),
        before,
        "status-only changes reprogrammed an agent"
    );
    let corrections: Vec<IpAddr> = setup.api.status_writes()[writes_before..]
        .iter()
        .filter(|write| write.field_manager.as_deref() == Some("egress-gateway-agent"))
        .map(|write| write.from)
        .collect();
    assert_eq!(
        corrections,
        [IpAddr::V4(WORKER_2); 3],
        "the gateway put each wrong status right, once"
    );
}

/// Waits until every agent listed each kind once.
fn wait_for_lists(setup: &Setup, agents: usize) {
    let listed = wait_until(PROGRAMMED, || {
        let requests = setup.api.requests();
        [Kind::Node, Kind::Namespace, Kind::Pod, Kind::Policy]
            .iter()
            .all(|kind| requests.iter().filter(|r| r.is_list_of(*kind)).count() >= agents)
    });
    assert!(listed, "agents did not list: {:?}", setup.api.requests());
}

fn pod_watches(setup: &Setup) -> usize {
    setup
        .api
        .requests()
        .iter()
        .filter(|request| request.is_watch_of(Kind::Pod))
        .count()
}

/// The policy's stored status once `ready` holds for it.
fn wait_for_status(setup: &Setup, policy: &str, ready: impl Fn(&Value) -> bool) -> Value {
    wait_for_value(PROGRAMMED, || {
        let object = setup.api.object(Kind::Policy, "", policy)?;
        let status = object.get("status")?.clone();
        ready(&status).then_some(status)
    })
    .unwrap_or_else(|| {
        panic!(
            "no status for {policy}: {:?}\npatches: {:#?}\n{}",
            setup.api.object(Kind::Policy, "", policy),
            setup.api.status_writes(),
            setup.cluster.agent_log("k8s-worker-1"),
        )
    })
}

fn assert_ready(status: &Value, ready: &str, reason: &str) {
    let condition = &status["conditions"][0];
    assert_eq!(condition["type"], json!("Ready"), "{status}");
    assert_eq!(condition["status"], json!(ready), "{status}");
    assert_eq!(condition["reason"], json!(reason), "{status}");
    assert!(condition["lastTransitionTime"].is_string(), "{status}");
    assert_eq!(
        condition["observedGeneration"], status["observedGeneration"],
        "{status}"
    );
}

/// Whether kubectl is on PATH; tests that drive it skip with a message otherwise.
fn kubectl_installed() -> bool {
    let found = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        eprintln!("skipped: kubectl is not installed (these tests use it as a user would)");
    }
    found
}

/// The node holding the status writer's Lease.
fn lease_holder(setup: &Setup) -> Option<String> {
    let lease = setup
        .api
        .object(Kind::Lease, "kube-system", "egress-gateway-status-writer")?;
    lease["spec"]["holderIdentity"].as_str().map(str::to_string)
}

/// The Events on policies (events.k8s.io, in the default namespace).
fn policy_events(setup: &Setup) -> Vec<Value> {
    setup
        .api
        .objects(Kind::Event)
        .into_iter()
        .filter(|event| event["regarding"]["kind"] == json!("CiliumEgressGatewayPolicy"))
        .collect()
}
