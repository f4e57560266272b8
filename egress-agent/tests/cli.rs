//! Bad command lines and `egress-agent check`, run through the real binary: clear errors,
//! documented exit codes, nothing touched.
#![allow(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
};

const AGENT: &str = env!("CARGO_BIN_EXE_egress-agent");

/// A scratch folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "egress-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn agent(args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .env_remove("NODE_NAME")
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn bad_run_flags_exit_2_naming_the_flag() {
    let dir = TempDir::new();
    let manifests = dir.0.to_str().unwrap();
    let base = ["run", "--node-name", "n1", "--manifests", manifests];
    let cases: [(&[&str], &[&str]); 8] = [
        (
            &["--nat-port-range", "0-10"],
            &["--nat-port-range", "\"0-10\"", "1-65535"],
        ),
        (
            &["--nat-port-range", "20-10"],
            &["--nat-port-range", "MIN <= MAX"],
        ),
        (
            &["--nat-port-range", "1024-70000"],
            &["--nat-port-range", "70000"],
        ),
        (&["--frobnicate"], &["unexpected argument '--frobnicate'"]),
        (
            &["--policy-map-size", "0"],
            &["--policy-map-size", "0 is not in 1.."],
        ),
        (
            &["--nat-map-size=0"],
            &["--nat-map-size", "0 is not in 1.."],
        ),
        (
            &["--tunnel-port", "port"],
            &["--tunnel-port", "invalid digit"],
        ),
        (&["--metrics-address", "nowhere"], &["--metrics-address"]),
    ];
    for (extra, expected) in cases {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let output = agent(&args);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}:\n{err}");
        for text in expected {
            assert!(err.contains(text), "{args:?}: {text:?} not in\n{err}");
        }
    }

    let output = agent(&["run", "--manifests", manifests]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--node-name <NODE_NAME>"),
        "{}",
        stderr(&output)
    );

    let output = agent(&["run", "--node-name", "n1"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--manifests <MANIFESTS>"),
        "{}",
        stderr(&output)
    );

    // Not a flag error but checked before the agent touches anything.
    let missing = dir.0.join("nope");
    let output = agent(&[
        "run",
        "--node-name",
        "n1",
        "--manifests",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("nope: not a folder"),
        "{}",
        stderr(&output)
    );

    // Idle timeouts under the datapath's activity granularity (1 s) would expire live flows:
    // refused before anything is touched, too. The folder must pass its check first: root's.
    // SAFETY: no arguments.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o700)).unwrap();
        let output = agent(&[
            "run",
            "--node-name",
            "n1",
            "--manifests",
            dir.0.to_str().unwrap(),
            "--udp-idle-timeout",
            "1",
        ]);
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        assert!(
            stderr(&output).contains("--udp-idle-timeout 1: must be at least 2 s"),
            "{}",
            stderr(&output)
        );
    }
}

/// A node, `pods` pods on it and one policy with `cidrs` destinations: pods x cidrs entries.
fn write_cluster(dir: &Path, pods: usize, cidrs: usize) {
    let mut text = String::from(
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {egress: 'true'}}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.1}]}\n",
    );
    for i in 0..pods {
        text += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: ns, labels: {{app: a}}}}\nspec: {{nodeName: n1, containers: []}}\nstatus: {{phase: Running, podIP: 10.1.0.{}}}\n",
            i + 1
        );
    }
    let destinations: Vec<String> = (0..cidrs)
        .map(|i| format!("198.51.100.{}/32", i + 1))
        .collect();
    text += &format!(
        "---\napiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {{name: p}}\nspec: {{selectors: [{{podSelector: {{matchLabels: {{app: a}}}}}}], destinationCIDRs: [{}], egressGateway: {{nodeSelector: {{matchLabels: {{egress: 'true'}}}}}}}}\n",
        destinations.join(", ")
    );
    fs::write(dir.join("cluster.yaml"), text).unwrap();
}

#[test]
fn check_exit_codes_for_refused_objects_and_capacity() {
    let dir = TempDir::new();
    let folder = dir.0.to_str().unwrap();
    write_cluster(&dir.0, 3, 2);

    let output = agent(&["check", "--manifests", folder, "--policy-map-size", "6"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("6 policy entries for a policy map of 6"),
        "{}",
        stdout(&output)
    );

    let output = agent(&["check", "--manifests", folder, "--policy-map-size", "5"]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("6 policy entries do not fit in a policy map of 5 (--policy-map-size): 2 entries of 1 pods would not be programmed"),
        "{err}"
    );

    // Refused objects alongside: exit 1, the valid ones still counted, a policy with two
    // bad fields counted once; a misspelt field warned about.
    fs::write(
        dir.0.join("bad.yaml"),
        "apiVersion: v1\nkind: Nod\nmetadata: {name: x}\n---\napiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {name: two-errors}\nspec: {selectors: [{podSelector: {}}], destinationCIDRs: [x, y], egressGateway: {nodeSelector: {}, egressIp: 192.0.2.1}}\n",
    )
    .unwrap();
    let output = agent(&["check", "--manifests", folder]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("bad.yaml: Nod \"x\": unknown kind \"Nod\": did you mean Node?"),
        "{}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains(
            "warning: ", 
        ) && stderr(&output).contains(
            "CiliumEgressGatewayPolicy \"two-errors\": spec.egressGateway.egressIp: unknown field, ignored (misspelt?)"
        ),
        "{}",
        stderr(&output)
    );
    assert!(
        stdout(&output).contains(
            "1 policies, 1 nodes, 0 namespaces, 3 pods loaded; 2 objects refused (3 errors), 1 warnings"
        ),
        "{}",
        stdout(&output)
    );

    // Over capacity wins over refused objects: the distinct code tells which to fix first.
    let output = agent(&["check", "--manifests", folder, "--policy-map-size", "1"]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));

    let output = agent(&["check", "--manifests", folder, "--policy-map-size", "0"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}
