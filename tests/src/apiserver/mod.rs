//! A small Kubernetes API server for the tests, over plain HTTP/1.1, good enough for the
//! agent's kube-rs client and for kubectl.
//!
//! - Objects: Nodes, Namespaces, Pods, `CiliumEgressGatewayPolicies`, Leases, Events
//!   (events.k8s.io), with get, list, watch, create, update (optimistic concurrency: a stale
//!   `resourceVersion` is a 409), patch (JSON merge, strategic merge as JSON merge, and
//!   server-side apply with field managers) and delete, and the status subresource of
//!   policies, nodes and pods ([`store`]).
//! - Watches: ADDED / MODIFIED / DELETED events after a version, BOOKMARKs, and 410 Gone when
//!   the version is older than the retained history, as the real API server does.
//! - What kubectl needs: discovery (`/api`, `/apis`, short names such as `cegp`) and
//!   server-side printing (`kubectl get cegp` shows the CRD's printer columns, evaluated from
//!   deploy/crd.yaml) ([`discovery`]).
//!
//! Tests feed it with [`ApiServer::sync_from_dir`] (the cluster's manifests folder is the
//! fixture), drive it with real clients, and break it on purpose: [`ApiServer::break_watches`]
//! cuts every open watch mid-event or ends it with 410, [`ApiServer::forget_history`] drops the
//! event history. The listener is bound inside a test namespace, never in the root namespace.

mod discovery;
mod http;
mod store;

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

use self::store::Store;

/// Where the API server listens: the router's underlay address, reachable from every node.
pub const API_SERVER_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 6443);

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Node,
    Namespace,
    Pod,
    Policy,
    Lease,
    Event,
}

/// How a kind is served: its group, version and names, as discovery tells clients.
struct Resource {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    short_names: &'static [&'static str],
    namespaced: bool,
    /// Whether `status` is a subresource: writes to the object leave it alone.
    status_subresource: bool,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Node,
        Kind::Namespace,
        Kind::Pod,
        Kind::Policy,
        Kind::Lease,
        Kind::Event,
    ];

    fn resource(self) -> Resource {
        let core = |kind, plural, singular, short_names, namespaced| Resource {
            group: "",
            version: "v1",
            kind,
            plural,
            singular,
            short_names,
            namespaced,
            status_subresource: true,
        };
        match self {
            Kind::Node => core("Node", "nodes", "node", &["no"], false),
            Kind::Namespace => Resource {
                status_subresource: false,
                ..core("Namespace", "namespaces", "namespace", &["ns"], false)
            },
            Kind::Pod => core("Pod", "pods", "pod", &["po"], true),
            Kind::Policy => Resource {
                group: "cilium.io",
                version: "v2",
                kind: "CiliumEgressGatewayPolicy",
                plural: "ciliumegressgatewaypolicies",
                singular: "ciliumegressgatewaypolicy",
                short_names: &["cegp"],
                namespaced: false,
                status_subresource: true,
            },
            Kind::Lease => Resource {
                group: "coordination.k8s.io",
                version: "v1",
                kind: "Lease",
                plural: "leases",
                singular: "lease",
                short_names: &[],
                namespaced: true,
                status_subresource: false,
            },
            Kind::Event => Resource {
                group: "events.k8s.io",
                version: "v1",
                kind: "Event",
                plural: "events",
                singular: "event",
                short_names: &["ev"],
                namespaced: true,
                status_subresource: false,
            },
        }
    }

    fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|candidate| candidate.resource().kind == kind)
    }

    fn kind(self) -> &'static str {
        self.resource().kind
    }

    fn api_version(self) -> String {
        let resource = self.resource();
        if resource.group.is_empty() {
            resource.version.to_string()
        } else {
            format!("{}/{}", resource.group, resource.version)
        }
    }

    /// `/api/v1` or `/apis/<group>/<version>`.
    fn prefix(self) -> String {
        let resource = self.resource();
        if resource.group.is_empty() {
            format!("/api/{}", resource.version)
        } else {
            format!("/apis/{}/{}", resource.group, resource.version)
        }
    }

    /// The all-namespaces collection path.
    pub fn path(self) -> String {
        format!("{}/{}", self.prefix(), self.resource().plural)
    }
}

/// (kind, namespace, name); the namespace is empty for cluster-scoped kinds.
type Key = (Kind, String, String);

/// How [`ApiServer::break_watches`] ends the open watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchBreak {
    /// The connection drops in the middle of an event.
    Cut,
    /// An ERROR event with code 410 (Gone), then the stream ends: the client must list again.
    Gone,
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub from: IpAddr,
}

impl Request {
    pub fn is_watch(&self) -> bool {
        matches!(
            self.query.get("watch").map(String::as_str),
            Some("true" | "1")
        )
    }

    /// A list (not watch) of `kind` across namespaces.
    pub fn is_list_of(&self, kind: Kind) -> bool {
        self.method == "GET" && self.path == kind.path() && !self.is_watch()
    }

    pub fn is_watch_of(&self, kind: Kind) -> bool {
        self.method == "GET" && self.path == kind.path() && self.is_watch()
    }
}

/// A write (create, update, patch, delete) as received, whether it succeeded or not.
#[derive(Clone, Debug)]
pub struct Write {
    pub method: String,
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// `Some("status")` for the status subresource.
    pub subresource: Option<String>,
    pub from: IpAddr,
    pub content_type: String,
    pub field_manager: Option<String>,
    pub body: Value,
    /// The HTTP status code of the answer.
    pub code: u16,
}

impl Write {
    pub fn is_status_write_of(&self, policy: &str) -> bool {
        self.kind == Kind::Policy
            && self.name == policy
            && self.subresource.as_deref() == Some("status")
    }
}

/// Everything behind the lock.
#[derive(Default)]
struct State {
    store: Store,
    /// Bumped by `break_watches`; open watches compare it with the value they started with.
    breaks: u64,
    break_mode: Option<WatchBreak>,
    requests: Vec<Request>,
    writes: Vec<Write>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub struct ApiServer {
    address: SocketAddr,
    shared: Arc<Shared>,
    listener: TcpListener,
    stopped: Arc<AtomicBool>,
}

impl ApiServer {
    /// Listens on [`API_SERVER_ADDRESS`] inside the network namespace `netns` (as created by
    /// `ip netns add`): the socket is made by a thread that joined that namespace.
    pub fn start_in_netns(netns: &str) -> Result<ApiServer> {
        let path = PathBuf::from("/run/netns").join(netns);
        let listener = thread::spawn(move || -> Result<TcpListener> {
            let namespace =
                fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: setns on a namespace file descriptor only changes this (short-lived)
            // thread's network namespace.
            if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!(
                    "setns {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            TcpListener::bind(API_SERVER_ADDRESS)
                .with_context(|| format!("binding {API_SERVER_ADDRESS} in {}", path.display()))
        })
        .join()
        .map_err(|_| anyhow!("the binding thread panicked"))??;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                store: Store::new(100),
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let stopped = Arc::new(AtomicBool::new(false));
        let accepting = listener.try_clone()?;
        let (accept_shared, accept_stopped) = (shared.clone(), stopped.clone());
        thread::spawn(move || {
            for connection in accepting.incoming() {
                if accept_stopped.load(Ordering::Acquire) {
                    return;
                }
                let Ok(connection) = connection else { continue };
                let shared = accept_shared.clone();
                thread::spawn(move || http::serve_connection(&shared, connection));
            }
        });
        Ok(ApiServer {
            address: API_SERVER_ADDRESS,
            shared,
            listener,
            stopped,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<PathBuf> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: \
             http://{}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    \
             cluster: test\n    user: test\ncurrent-context: test\n",
            self.address
        );
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path.to_path_buf())
    }

    /// Publishes the manifests in `dir` (one file per object, as the test cluster writes
    /// them), as `kubectl apply` of the files that changed since the last sync would: new and
    /// changed manifests get ADDED / MODIFIED events, objects whose manifest is gone DELETED
    /// events. Objects that clients created, and client changes to objects whose manifest did
    /// not change (a `kubectl label`), are left alone.
    pub fn sync_from_dir(&self, dir: &Path) -> Result<()> {
        self.sync(dir, true)
    }

    /// Like [`sync_from_dir`](Self::sync_from_dir), but objects gone from `dir` vanish without
    /// a DELETED event, as when a watch misses one; only a relist reveals it.
    pub fn sync_from_dir_losing_deletes(&self, dir: &Path) -> Result<()> {
        self.sync(dir, false)
    }

    fn sync(&self, dir: &Path, announce_deletes: bool) -> Result<()> {
        let objects = read_manifests(dir)?;
        self.shared
            .lock()
            .store
            .sync_fixtures(objects, announce_deletes);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Ends every open watch as `how` says; later watches work normally.
    pub fn break_watches(&self, how: WatchBreak) {
        let mut state = self.shared.lock();
        state.breaks += 1;
        state.break_mode = Some(how);
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Drops the event history (as etcd compaction does): a watch resuming from any version
    /// older than the current one gets 410 Gone.
    pub fn forget_history(&self) {
        self.shared.lock().store.forget_history();
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Every write received so far, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.lock().writes.clone()
    }

    /// Every write of a policy's status so far, in order.
    pub fn status_writes(&self) -> Vec<Write> {
        self.writes()
            .into_iter()
            .filter(|write| write.kind == Kind::Policy && write.subresource.is_some())
            .collect()
    }

    /// The stored object, e.g. a policy with the status the agents wrote.
    pub fn object(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let key = (kind, namespace.to_string(), name.to_string());
        self.shared.lock().store.get(&key).cloned()
    }

    /// Every stored object of `kind`, in every namespace.
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        self.shared.lock().store.objects_of(kind, None)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        // Wakes the accepting thread (accept fails on a shut-down listener).
        // SAFETY: shutdown on a socket this struct owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// Reads every object of a served kind from the YAML files of `dir`.
fn read_manifests(dir: &Path) -> Result<BTreeMap<Key, Value>> {
    let mut objects = BTreeMap::new();
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    paths.sort();
    for path in paths {
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object = Value::deserialize(document)
                .with_context(|| format!("parsing {}", path.display()))?;
            let Some(kind) = object["kind"].as_str().and_then(Kind::from_kind) else {
                continue;
            };
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let namespace = if kind.resource().namespaced {
                object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string()
            } else {
                String::new()
            };
            objects.insert((kind, namespace, name), object);
        }
    }
    Ok(objects)
}
