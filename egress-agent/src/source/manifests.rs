//! The manifests folder source: reads every `*.yaml` / `*.yml` file below a folder, as
//! `kubectl get -o yaml` prints them, and publishes a new [`Snapshot`] whenever one changes.
//!
//! Symlinks are followed; entries whose name starts with `.` are skipped, which also skips the
//! `..data` indirection of `ConfigMap` volumes while still reading the files they link. Files
//! over [`MAX_FILE_SIZE`] are refused from their size (never read whole), and so are symlink
//! loops, dangling links, unreadable files and non-regular files named `*.yaml` (a FIFO must
//! not block the agent); the rest still loads.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use egress_control::parse::{
    LoadResult, Loader, MAX_FILE_SIZE, ManifestError, ManifestErrorKind, ObjectRef,
};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::{Refusal, Snapshot};
use crate::chain::Chain;

/// Safety net behind inotify: how often the manifests folder is compared anyway (inotify
/// misses changes behind symlinks that point out of the folder, or when its queue overflows).
const MANIFEST_POLL: Duration = Duration::from_millis(500);
/// Editors write a file in several steps; wait this long after an event before reading.
const SETTLE: Duration = Duration::from_millis(5);

/// Watches a manifests folder: a new snapshot whenever a file changes (path, size, mtime),
/// noticed through inotify within milliseconds.
pub fn watch(dir: PathBuf) -> watch::Receiver<Arc<Snapshot>> {
    // The fingerprint before the first load: a change made while loading (or before the
    // watcher below starts) then differs from it and is picked up by the first poll. Taken
    // after the load, such a change would go unseen until the next one.
    let mut last = fingerprint(&dir);
    let first = load(&dir);
    let (sender, receiver) = watch::channel(Arc::new(first));
    let (wake, mut woken) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |_event| {
        // A full channel already holds a wake-up: nothing is lost.
        let _ = wake.try_send(());
    })
    .and_then(|mut watcher| {
        watcher.watch(&dir, RecursiveMode::Recursive)?;
        Ok(watcher)
    });
    let watcher = match watcher {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            warn!(error = %Chain(&error), dir = %dir.display(), "no inotify watch; polling the folder instead");
            None
        }
    };
    tokio::spawn(async move {
        // Dropping the watcher would stop the events.
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = woken.recv() => tokio::time::sleep(SETTLE).await,
                () = tokio::time::sleep(MANIFEST_POLL) => {}
            }
            let current = fingerprint(&dir);
            if current == last {
                continue;
            }
            last = current;
            if sender.send(Arc::new(load(&dir))).is_err() {
                return;
            }
        }
    });
    receiver
}

fn load(dir: &Path) -> Snapshot {
    let loaded = load_dir(dir);
    let refusal = |error: &ManifestError| Refusal {
        policy: (error.object.kind.as_deref() == Some("CiliumEgressGatewayPolicy"))
            .then(|| error.object.name.clone())
            .flatten(),
        message: error.to_string(),
    };
    Snapshot {
        refused: loaded.errors.iter().map(refusal).collect(),
        warnings: loaded.warnings.iter().map(refusal).collect(),
        inventory: loaded.inventory,
        policy_generations: BTreeMap::new(),
        published: Some(Instant::now()),
    }
}

/// Loads every manifest under `dir`. Results are deterministic: files are read in path order.
pub fn load_dir(dir: &Path) -> LoadResult {
    let mut loader = Loader::default();
    let (files, walk_errors) = walk(dir);
    for error in walk_errors {
        loader.refuse_file(&error.file, error.error);
    }
    for file in files {
        match read_limited(&file.path) {
            Ok(text) => loader.load_text(&file.path, &text),
            Err(error) => loader.refuse_file(&file.path, error),
        }
    }
    // In path order, walk and read errors mixed.
    loader.finish()
}

/// A cheap summary of the folder (paths, link targets, sizes, mtimes) to poll for changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(Vec<FileStamp>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    target: PathBuf,
    size: u64,
    modified: Option<SystemTime>,
}

pub fn fingerprint(dir: &Path) -> Fingerprint {
    let (files, errors) = walk(dir);
    let mut stamps: Vec<FileStamp> = files
        .into_iter()
        .map(|f| FileStamp {
            size: f.metadata.len(),
            modified: f.metadata.modified().ok(),
            path: f.path,
            target: f.canonical,
        })
        .collect();
    // A file that becomes (un)readable must count as a change too.
    stamps.extend(errors.into_iter().map(|e| FileStamp {
        path: e.file,
        target: PathBuf::new(),
        size: u64::MAX,
        modified: None,
    }));
    Fingerprint(stamps)
}

struct FoundFile {
    path: PathBuf,
    canonical: PathBuf,
    metadata: fs::Metadata,
}

fn is_manifest(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

/// Lists manifest files under `dir`, following symlinks; a directory (or file) reached
/// twice through links is visited once, which also breaks symlink loops.
fn walk(dir: &Path) -> (Vec<FoundFile>, Vec<ManifestError>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    let mut seen_dirs = BTreeSet::new();
    let mut seen_files = BTreeSet::new();
    let io_error = |path: &Path, e| ManifestError {
        file: path.to_owned(),
        object: ObjectRef::default(),
        error: ManifestErrorKind::Io(e),
    };
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        match fs::canonicalize(&dir) {
            Ok(c) => {
                if !seen_dirs.insert(c) {
                    tracing::debug!(dir = %dir.display(), "directory already visited (symlink loop?)");
                    continue;
                }
            }
            Err(e) => {
                errors.push(io_error(&dir, e));
                continue;
            }
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(io_error(&dir, e));
                continue;
            }
        };
        let mut paths: Vec<PathBuf> = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) if !entry.file_name().to_string_lossy().starts_with('.') => {
                    paths.push(entry.path());
                }
                Ok(_) => {}
                Err(e) => errors.push(io_error(&dir, e)),
            }
        }
        // Sorted, so which of two links to one file is kept does not depend on the disk.
        paths.sort();
        for path in paths {
            // fs::metadata follows symlinks; a dangling link is reported only if it looks
            // like a manifest.
            let metadata = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    if is_manifest(&path) {
                        errors.push(io_error(&path, e));
                    }
                    continue;
                }
            };
            if metadata.is_dir() {
                stack.push(path);
            } else if !metadata.is_file() && is_manifest(&path) {
                // Opening a FIFO would block until a writer comes; a device may never end.
                errors.push(ManifestError {
                    file: path,
                    object: ObjectRef::default(),
                    error: ManifestErrorKind::NotRegular(file_type_name(&metadata)),
                });
            } else if metadata.is_file() && is_manifest(&path) {
                let canonical = fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                if seen_files.insert(canonical.clone()) {
                    files.push(FoundFile {
                        path,
                        canonical,
                        metadata,
                    });
                } else {
                    tracing::debug!(file = %path.display(), "file already read through another path");
                }
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    errors.sort_by(|a, b| a.file.cmp(&b.file));
    (files, errors)
}

fn file_type_name(metadata: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let t = metadata.file_type();
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a file or folder"
    }
}

fn read_limited(path: &Path) -> Result<String, ManifestErrorKind> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Non-blocking, so a file replaced by a FIFO after the walk cannot hang the agent.
    let file = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(ManifestErrorKind::NotRegular(file_type_name(&metadata)));
    }
    // Refused from its size alone: a huge file is never read.
    let size = metadata.len();
    if size > MAX_FILE_SIZE {
        return Err(ManifestErrorKind::TooLarge(size));
    }
    // The file may grow between the check and the read.
    let mut text = String::new();
    file.take(MAX_FILE_SIZE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(ManifestErrorKind::TooLarge(text.len() as u64));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    /// The project's example policies: valid ones at the top, refused ones in `invalid/`.
    const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

    /// A scratch directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "egress-manifests-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn messages(r: &LoadResult) -> Vec<String> {
        r.errors.iter().map(ToString::to_string).collect()
    }

    /// The manifests directly in `examples/` (not those of `invalid/`).
    fn valid_examples() -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(EXAMPLES)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.is_file() && is_manifest(path))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn invalid_policies_do_not_stop_valid_ones() {
        let t = TempDir::new();
        let invalid = fs::read_dir(Path::new(EXAMPLES).join("invalid"))
            .unwrap()
            .map(|entry| entry.unwrap().path());
        for file in valid_examples().into_iter().chain(invalid) {
            let name = file.file_name().unwrap().to_string_lossy();
            t.write(
                &format!("example-{name}"),
                &fs::read_to_string(&file).unwrap(),
            );
        }
        // A valid policy after a broken document in the same file still loads.
        t.write(
            "mixed.yml",
            "kind: CiliumEgressGatewayPolicy\nmetadata: {name: [\n---\napiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {name: after-broken}\nspec: {selectors: [{podSelector: {}}], destinationCIDRs: [10.0.0.0/8], egressGateway: {nodeSelector: {}}}\n",
        );
        let r = load_dir(&t.0);
        assert_eq!(r.inventory.policies.len(), 9, "{:#?}", messages(&r));
        assert!(r.inventory.policies.contains_key("after-broken"));
        assert_eq!(r.errors.len(), 10, "{:#?}", messages(&r));
        let mixed = r
            .errors
            .iter()
            .find(|e| e.file.ends_with("mixed.yml"))
            .unwrap();
        assert!(
            mixed
                .to_string()
                .contains(": CiliumEgressGatewayPolicy in document 1: invalid YAML: "),
            "{mixed}"
        );
    }

    #[test]
    fn yaml_error_lines_are_file_relative() {
        let t = TempDir::new();
        let f = t.write(
            "a.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\n# comment\nkind: Pod\nmetadata:\n  name: p\n  labels: {a: [}\n",
        );
        let r = load_dir(&t.0);
        assert!(r.inventory.namespaces.contains_key("ok"));
        let msgs = messages(&r);
        assert_eq!(msgs.len(), 1);
        assert!(
            msgs[0].starts_with(&format!("{}: Pod \"p\": invalid YAML: ", f.display())),
            "{}",
            msgs[0]
        );
        assert!(msgs[0].contains("at line 9 column"), "{}", msgs[0]);
        assert!(matches!(
            r.errors[0].error,
            ManifestErrorKind::Yaml { line: Some(9), .. }
        ));
    }

    #[test]
    fn lists_kinds_and_api_versions() {
        let t = TempDir::new();
        t.write(
            "sub/dir/list.yaml",
            r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: n1, labels: {egress: "true"}}
  status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: p1, namespace: ns1, labels: {app: a}}
  spec: {nodeName: n1, containers: [{name: c, image: i}]}
  status: {phase: Running, podIP: 10.1.0.1}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: ignored}
- apiVersion: cilium.io/v1
  kind: CiliumEgressGatewayPolicy
  metadata: {name: old}
metadata: {resourceVersion: ""}
"#,
        );
        t.write(
            "typed.yml",
            "apiVersion: v1\nkind: NamespaceList\nitems:\n- metadata: {name: ns1, labels: {team: t}}\n",
        );
        t.write("ignored.txt", "kind: Node\nmetadata: {name: nope}\n");
        t.write(
            ".hidden/x.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: hidden}\n",
        );
        let r = load_dir(&t.0);
        let inv = &r.inventory;
        assert_eq!(inv.nodes.keys().collect::<Vec<_>>(), ["n1"]);
        assert_eq!(
            inv.nodes["n1"].internal_ip,
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(
            inv.pods[&("ns1".into(), "p1".into())].ips,
            [Ipv4Addr::new(10, 1, 0, 1)]
        );
        assert_eq!(inv.namespaces["ns1"].labels["team"], "t");
        let msgs = messages(&r);
        assert_eq!(msgs.len(), 1, "{msgs:#?}");
        assert!(
            msgs[0].ends_with(
                r#"list.yaml: CiliumEgressGatewayPolicy "old": unsupported apiVersion "cilium.io/v1" for CiliumEgressGatewayPolicy (expected "cilium.io/v2")"#
            ),
            "{}",
            msgs[0]
        );
    }

    #[test]
    fn duplicates_keep_the_first_and_name_both_files() {
        let t = TempDir::new();
        let node = |ip: &str| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
            )
        };
        let a = t.write("a.yaml", &node("10.0.0.1"));
        let b = t.write("b.yaml", &node("10.0.0.2"));
        // Same name, other kind or other namespace: no conflict.
        t.write(
            "c.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: n1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: y}\n",
        );
        let r = load_dir(&t.0);
        assert_eq!(
            r.inventory.nodes["n1"].internal_ip,
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(r.inventory.pods.len(), 2);
        assert_eq!(
            messages(&r),
            [format!(
                "{}: Node \"n1\": duplicate name: already defined in {}; this one is ignored",
                b.display(),
                a.display()
            )]
        );
    }

    #[test]
    fn size_limit_symlink_loops_and_unreadable_paths() {
        let t = TempDir::new();
        t.write(
            "ok.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n",
        );
        let big = t.write("big.yaml", "");
        fs::File::options()
            .write(true)
            .open(&big)
            .unwrap()
            .set_len(MAX_FILE_SIZE + 1)
            .unwrap();
        std::os::unix::fs::symlink(&t.0, t.0.join("loop")).unwrap();
        std::os::unix::fs::symlink(t.0.join("ok.yaml"), t.0.join("alias.yaml")).unwrap();
        std::os::unix::fs::symlink(t.0.join("missing"), t.0.join("dangling.yaml")).unwrap();
        let r = load_dir(&t.0);
        assert_eq!(r.inventory.nodes.len(), 1);
        let msgs = messages(&r);
        assert_eq!(msgs.len(), 2, "{msgs:#?}");
        assert!(
            msgs.iter()
                .any(|m| m.contains("big.yaml") && m.contains("larger than"))
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("dangling.yaml") && m.contains("cannot read"))
        );

        let missing = load_dir(&t.0.join("nope"));
        assert_eq!(missing.errors.len(), 1);
    }

    /// A valid policy named `name` steering everything to `cidr`.
    fn policy_yaml(name: &str, cidr: &str) -> String {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata: {{name: {name}}}\nspec: {{selectors: [{{podSelector: {{}}}}], destinationCIDRs: ['{cidr}'], egressGateway: {{nodeSelector: {{}}}}}}\n"
        )
    }

    fn policy_names(r: &LoadResult) -> Vec<&str> {
        r.inventory.policies.keys().map(String::as_str).collect()
    }

    /// `load_dir` on another thread, failing instead of hanging if it blocks (e.g. on a FIFO).
    fn load_dir_or_hang(dir: &Path) -> LoadResult {
        let dir = dir.to_owned();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send((load_dir(&dir), fingerprint(&dir)));
        });
        receiver
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("loading the folder blocked")
            .0
    }

    #[test]
    fn wrong_api_versions_and_kinds_are_refused_and_the_rest_loads() {
        let t = TempDir::new();
        let f = t.write(
            "mixed.yaml",
            &[
                policy_yaml("old-version", "10.0.0.0/8")
                    .replace("cilium.io/v2", "cilium.io/v2alpha1"),
                policy_yaml("typo", "10.0.0.0/8").replace(
                    "kind: CiliumEgressGatewayPolicy",
                    "kind: CiliumEgresGatewayPolicy",
                ),
                policy_yaml("lowercase", "10.0.0.0/8").replace(
                    "kind: CiliumEgressGatewayPolicy",
                    "kind: ciliumegressgatewaypolicy",
                ),
                "apiVersion: v2\nkind: Pod\nmetadata: {name: p, namespace: ns}\n".into(),
                "metadata: {name: no-kind}\nspec: {destinationCIDRs: [10.0.0.0/8]}\n".into(),
                "just some text\n".into(),
                // Other kinds are ignored: a whole cluster dump can be dropped in.
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n".into(),
                "apiVersion: batch/v1\nkind: Job\nmetadata: {name: j}\n".into(),
                policy_yaml("good", "192.0.2.0/24"),
            ]
            .join("---\n"),
        );
        let r = load_dir(&t.0);
        assert_eq!(policy_names(&r), ["good"]);
        assert!(r.inventory.pods.is_empty());
        let file = f.display();
        assert_eq!(
            messages(&r),
            [
                format!(
                    r#"{file}: CiliumEgressGatewayPolicy "old-version": unsupported apiVersion "cilium.io/v2alpha1" for CiliumEgressGatewayPolicy (expected "cilium.io/v2")"#
                ),
                format!(
                    r#"{file}: CiliumEgresGatewayPolicy "typo": unknown kind "CiliumEgresGatewayPolicy": did you mean CiliumEgressGatewayPolicy?"#
                ),
                format!(
                    r#"{file}: ciliumegressgatewaypolicy "lowercase": unknown kind "ciliumegressgatewaypolicy": did you mean CiliumEgressGatewayPolicy?"#
                ),
                format!(r#"{file}: Pod "p": unsupported apiVersion "v2" for Pod (expected "v1")"#),
                format!(r#"{file}: "no-kind" in document 5: not a Kubernetes object: no kind"#),
                format!(
                    "{file}: document 6: not a Kubernetes object: expected a mapping with apiVersion, kind and metadata"
                ),
            ]
        );
    }

    #[test]
    fn duplicate_policy_names_keep_the_first_and_the_others_load() {
        let t = TempDir::new();
        let a = t.write("a.yaml", &policy_yaml("dup", "10.0.0.0/8"));
        let b = t.write(
            "b.yaml",
            &(policy_yaml("dup", "192.0.2.0/24")
                + "---\n"
                + &policy_yaml("other", "198.51.100.0/24")),
        );
        let r = load_dir(&t.0);
        assert_eq!(policy_names(&r), ["dup", "other"]);
        assert_eq!(
            r.inventory.policies["dup"].destination_cidrs,
            ["10.0.0.0/8".parse::<ipnet::Ipv4Net>().unwrap()]
        );
        assert_eq!(
            messages(&r),
            [format!(
                r#"{}: CiliumEgressGatewayPolicy "dup": duplicate name: already defined in {}; this one is ignored"#,
                b.display(),
                a.display()
            )]
        );
    }

    /// Dual-stack policies load with their IPv6 CIDRs kept aside (not programmed); an IPv6
    /// egress IP is refused.
    #[test]
    fn ipv6_cidrs_load_aside_and_an_ipv6_egress_ip_is_refused() {
        let t = TempDir::new();
        t.write("v6-dest.yaml", &policy_yaml("v6-dest", "2001:db8::/32"));
        t.write(
            "v6-excluded.yaml",
            &policy_yaml("v6-excluded", "0.0.0.0/0").replace(
                "egressGateway:",
                "excludedCIDRs: ['fd00::/8'], egressGateway:",
            ),
        );
        t.write(
            "v6-egress-ip.yaml",
            &policy_yaml("v6-egress-ip", "0.0.0.0/0").replace(
                "{nodeSelector: {}}",
                "{nodeSelector: {}, egressIP: '2001:db8::1'}",
            ),
        );
        t.write("v4.yaml", &policy_yaml("v4", "192.0.2.0/24"));
        // IPv6 addresses of nodes and pods are skipped silently: dual-stack clusters are fine.
        t.write(
            "objects.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: n6}\nstatus: {addresses: [{type: InternalIP, address: 'fd00::1'}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p6, namespace: ns}\nspec: {nodeName: n6, containers: []}\nstatus: {podIP: 'fd00::5'}\n",
        );
        let r = load_dir(&t.0);
        assert_eq!(policy_names(&r), ["v4", "v6-dest", "v6-excluded"]);
        let policies = &r.inventory.policies;
        assert!(policies["v6-dest"].destination_cidrs.is_empty());
        assert_eq!(
            policies["v6-dest"].ipv6_cidrs,
            ["2001:db8::/32".parse().unwrap()]
        );
        assert_eq!(
            policies["v6-excluded"].destination_cidrs,
            ["0.0.0.0/0".parse().unwrap()]
        );
        assert_eq!(
            policies["v6-excluded"].ipv6_cidrs,
            ["fd00::/8".parse().unwrap()]
        );
        assert_eq!(r.inventory.nodes["n6"].internal_ip, None);
        assert!(r.inventory.pods[&("ns".into(), "p6".into())].ips.is_empty());
        let msgs = messages(&r);
        assert_eq!(msgs.len(), 1, "{msgs:#?}");
        let wanted =
            r#"CiliumEgressGatewayPolicy "v6-egress-ip": spec.egressGateway.egressIP: invalid "#;
        assert!(msgs[0].contains(wanted), "{}", msgs[0]);
        assert!(
            msgs[0].ends_with(": IPv6 is not supported yet"),
            "{}",
            msgs[0]
        );
    }

    #[test]
    fn ten_megabyte_file_is_refused_and_the_others_load() {
        let t = TempDir::new();
        t.write("a-ok.yaml", &policy_yaml("before", "192.0.2.0/24"));
        // Real content (a valid policy padded with comments), not a sparse file.
        let mut big = policy_yaml("huge", "10.0.0.0/8");
        let line = "# padding padding padding padding padding padding padding padding\n";
        while big.len() < 10 << 20 {
            big.push_str(line);
        }
        let big_path = t.write("big.yaml", &big);
        t.write("z-ok.yaml", &policy_yaml("after", "198.51.100.0/24"));
        let r = load_dir(&t.0);
        assert_eq!(policy_names(&r), ["after", "before"]);
        assert_eq!(
            messages(&r),
            [format!(
                "{}: file is {} bytes, larger than the {MAX_FILE_SIZE} bytes allowed; not read",
                big_path.display(),
                big.len()
            )]
        );
        assert!(
            matches!(r.errors[0].error, ManifestErrorKind::TooLarge(n) if n == big.len() as u64)
        );
    }

    #[test]
    fn fifos_devices_loops_and_unreadable_files_are_skipped_with_errors() {
        use std::os::unix::fs::symlink;

        let t = TempDir::new();
        t.write("good.yaml", &policy_yaml("good", "192.0.2.0/24"));
        // A folder named like a manifest is just a folder: its files load.
        t.write(
            "dir.yaml/inside.yaml",
            &policy_yaml("inside", "198.51.100.0/24"),
        );
        let fifo = t.0.join("fifo.yaml");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Never ends: must not be read at all.
        symlink("/dev/zero", t.0.join("zero.yaml")).unwrap();
        // A regular file that fails to read even for root (EIO at offset 0).
        symlink("/proc/self/mem", t.0.join("mem.yaml")).unwrap();
        symlink(t.0.join("loop-b.yaml"), t.0.join("loop-a.yaml")).unwrap();
        symlink(t.0.join("loop-a.yaml"), t.0.join("loop-b.yaml")).unwrap();
        symlink(&t.0, t.0.join("dir.yaml/parent")).unwrap();

        let r = load_dir_or_hang(&t.0);
        assert_eq!(policy_names(&r), ["good", "inside"]);
        let msgs = messages(&r);
        let expect = [
            ("fifo.yaml", "not a regular file (a FIFO); skipped"),
            (
                "loop-a.yaml",
                "cannot read: Too many levels of symbolic links",
            ),
            (
                "loop-b.yaml",
                "cannot read: Too many levels of symbolic links",
            ),
            ("mem.yaml", "cannot read: Input/output error"),
            ("zero.yaml", "not a regular file (a device); skipped"),
        ];
        assert_eq!(msgs.len(), expect.len(), "{msgs:#?}");
        for (msg, (file, text)) in msgs.iter().zip(expect) {
            let wanted = format!("{}: {text}", t.0.join(file).display());
            assert!(
                msg.starts_with(&wanted),
                "{msg}\ndoes not start with\n{wanted}"
            );
        }
    }

    #[test]
    fn fingerprint_changes_with_files() {
        let t = TempDir::new();
        let f = t.write("a.yaml", "a: 1\n");
        let fp = fingerprint(&t.0);
        assert_eq!(fp, fingerprint(&t.0));
        fs::write(&f, "a: 12\n").unwrap();
        let fp2 = fingerprint(&t.0);
        assert_ne!(fp, fp2);
        t.write("sub/b.yml", "");
        assert_ne!(fp2, fingerprint(&t.0));
        let fp3 = fingerprint(&t.0);
        t.write("notes.txt", "ignored");
        assert_eq!(fp3, fingerprint(&t.0));
    }
}
