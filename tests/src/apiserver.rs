//! A small Kubernetes API server for the tests: the real list and watch protocol for Nodes,
//! Namespaces, Pods and `CiliumEgressGatewayPolicies`, served from fixtures over plain HTTP/1.1.
//!
//! - `GET <collection>`: a JSON list whose `metadata.resourceVersion` is the current version;
//! - `GET <collection>?watch=true&resourceVersion=N`: a chunked stream of ADDED / MODIFIED /
//!   DELETED events after N, BOOKMARK events when `allowWatchBookmarks=true`, and an ERROR
//!   event with code 410 when N is older than the retained history (as the real API server
//!   does), which makes clients list again;
//! - `PATCH /apis/cilium.io/v2/ciliumegressgatewaypolicies/NAME/status`: a JSON merge patch of
//!   the status, recorded with the address it came from.
//!
//! Tests drive it with [`ApiServer::sync_from_dir`] (the cluster's manifests folder is the
//! fixture), and break it on purpose: [`ApiServer::break_watches`] cuts every open watch
//! mid-event or ends it with 410, [`ApiServer::forget_history`] drops the event history.
//! The listener is bound inside a test namespace, never in the root namespace.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::{Value, json};

/// Where the API server listens: the router's underlay address, reachable from every node.
pub const API_SERVER_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 6443);
/// How often an idle watch gets a BOOKMARK (real servers: about a minute).
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
const POLICY_PATH: &str = "/apis/cilium.io/v2/ciliumegressgatewaypolicies";

/// The kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Node,
    Namespace,
    Pod,
    Policy,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Node, Kind::Namespace, Kind::Pod, Kind::Policy];

    fn from_kind(kind: &str) -> Option<Kind> {
        Some(match kind {
            "Node" => Kind::Node,
            "Namespace" => Kind::Namespace,
            "Pod" => Kind::Pod,
            "CiliumEgressGatewayPolicy" => Kind::Policy,
            _ => return None,
        })
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Policy => "CiliumEgressGatewayPolicy",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Policy => "cilium.io/v2",
            _ => "v1",
        }
    }

    /// The all-namespaces collection path.
    fn path(self) -> &'static str {
        match self {
            Kind::Node => "/api/v1/nodes",
            Kind::Namespace => "/api/v1/namespaces",
            Kind::Pod => "/api/v1/pods",
            Kind::Policy => POLICY_PATH,
        }
    }

    fn from_path(path: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.path() == path)
    }
}

/// (kind, namespace, name).
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

    /// A list (not watch) of `kind`.
    pub fn is_list_of(&self, kind: Kind) -> bool {
        self.method == "GET" && self.path == kind.path() && !self.is_watch()
    }

    pub fn is_watch_of(&self, kind: Kind) -> bool {
        self.method == "GET" && self.path == kind.path() && self.is_watch()
    }
}

/// A status patch as received.
#[derive(Clone, Debug)]
pub struct StatusPatch {
    pub policy: String,
    pub from: IpAddr,
    pub content_type: String,
    pub body: Value,
}

struct Event {
    resource_version: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// Watches from a version older than this get 410: their events are gone.
    oldest_watchable: u64,
    objects: BTreeMap<Key, Value>,
    events: Vec<Event>,
    /// Bumped by `break_watches`; open watches compare it with the value they started with.
    breaks: u64,
    break_mode: Option<WatchBreak>,
    requests: Vec<Request>,
    patches: Vec<StatusPatch>,
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
                resource_version: 100,
                oldest_watchable: 100,
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
                thread::spawn(move || serve_connection(&shared, connection));
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

    /// Makes the served objects those of the manifests in `dir` (one file per object, as the
    /// test cluster writes them): new and changed objects get ADDED / MODIFIED events, objects
    /// gone from `dir` DELETED events.
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
        let mut state = self.shared.lock();
        let gone: Vec<Key> = state
            .objects
            .keys()
            .filter(|key| !objects.contains_key(*key))
            .cloned()
            .collect();
        for (key, object) in objects {
            state.apply(key, object);
        }
        for key in gone {
            state.delete(&key, announce_deletes);
        }
        drop(state);
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
        let mut state = self.shared.lock();
        state.events.clear();
        state.oldest_watchable = state.resource_version;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Every status patch received so far, in order.
    pub fn status_patches(&self) -> Vec<StatusPatch> {
        self.shared.lock().patches.clone()
    }

    /// The stored object, e.g. a policy with the status the agents wrote.
    pub fn object(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let key = (kind, namespace.to_string(), name.to_string());
        self.shared.lock().objects.get(&key).cloned()
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

impl State {
    fn next_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    fn record(&mut self, kind: Kind, type_: &'static str, object: Value) {
        let resource_version = self.resource_version;
        self.events.push(Event {
            resource_version,
            kind,
            type_,
            object,
        });
    }

    /// Creates or updates an object as `kubectl apply` would; unchanged objects are left alone.
    fn apply(&mut self, key: Key, mut object: Value) {
        let existing = self.objects.get(&key).cloned();
        let generation = match &existing {
            Some(old) if comparable(key.0, old) == comparable(key.0, &object) => return,
            Some(old) => {
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                if old.get("spec") == object.get("spec") {
                    generation
                } else {
                    generation + 1
                }
            }
            None => 1,
        };
        let version = self.next_version();
        let metadata = &mut object["metadata"];
        metadata["resourceVersion"] = json!(version.to_string());
        metadata["generation"] = json!(generation);
        metadata["uid"] = match &existing {
            Some(old) => old["metadata"]["uid"].clone(),
            None => json!(format!("00000000-0000-4000-8000-{version:012}")),
        };
        // The status belongs to the status subresource: apply keeps it.
        if let Some(status) = existing.as_ref().and_then(|old| old.get("status"))
            && key.0 == Kind::Policy
        {
            object["status"] = status.clone();
        }
        let type_ = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key.clone(), object.clone());
        self.record(key.0, type_, object);
    }

    fn delete(&mut self, key: &Key, announce: bool) {
        let Some(mut object) = self.objects.remove(key) else {
            return;
        };
        let version = self.next_version();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        if announce {
            self.record(key.0, "DELETED", object);
        }
    }

    fn list(&self, kind: Kind) -> Value {
        let items: Vec<&Value> = self
            .objects
            .iter()
            .filter(|(key, _)| key.0 == kind)
            .map(|(_, object)| object)
            .collect();
        json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.kind()),
            "metadata": { "resourceVersion": self.resource_version.to_string() },
            "items": items,
        })
    }
}

/// An object without the fields the server sets, to tell whether an apply changes anything.
/// A policy's status belongs to its subresource (fixture pods carry theirs in the manifest).
fn comparable(kind: Kind, object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["resourceVersion", "generation", "uid"] {
            metadata.remove(field);
        }
    }
    if let Some(object) = object.as_object_mut()
        && kind == Kind::Policy
    {
        object.remove("status");
    }
    object
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
            let namespace = match kind {
                Kind::Pod => object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string(),
                _ => String::new(),
            };
            objects.insert((kind, namespace, name), object);
        }
    }
    Ok(objects)
}

// ----- HTTP -----

struct HttpRequest {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<HttpRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key.to_string(), value.to_string())
        })
        .collect();
    Some(HttpRequest {
        method,
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

fn serve_connection(shared: &Shared, stream: TcpStream) {
    let from = stream
        .peer_addr()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |addr| addr.ip());
    let Ok(reading) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reading);
    let mut stream = stream;
    while let Some(request) = read_request(&mut reader) {
        shared.lock().requests.push(Request {
            method: request.method.clone(),
            path: request.path.clone(),
            query: request.query.clone(),
            from,
        });
        let kind = Kind::from_path(&request.path);
        let written = match (request.method.as_str(), kind) {
            ("GET", Some(kind))
                if matches!(
                    request.query.get("watch").map(String::as_str),
                    Some("true" | "1")
                ) =>
            {
                // A watch owns its connection until it ends.
                serve_watch(shared, &mut stream, kind, &request.query);
                return;
            }
            ("GET", Some(kind)) => {
                let list = shared.lock().list(kind);
                respond(&mut stream, 200, &list)
            }
            ("PATCH", None) => patch_status(shared, &mut stream, &request, from),
            _ => respond(
                &mut stream,
                404,
                &status_object(404, "NotFound", &format!("{} not served", request.path)),
            ),
        };
        if written.is_err() {
            return;
        }
    }
}

fn patch_status(
    shared: &Shared,
    stream: &mut TcpStream,
    request: &HttpRequest,
    from: IpAddr,
) -> std::io::Result<()> {
    let name = request
        .path
        .strip_prefix(POLICY_PATH)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.strip_suffix("/status"))
        .filter(|name| !name.is_empty() && !name.contains('/'));
    let Some(name) = name else {
        return respond(
            stream,
            404,
            &status_object(404, "NotFound", "no such subresource"),
        );
    };
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        return respond(
            stream,
            400,
            &status_object(400, "BadRequest", "body is not JSON"),
        );
    };
    let mut state = shared.lock();
    state.patches.push(StatusPatch {
        policy: name.to_string(),
        from,
        content_type: request
            .headers
            .get("content-type")
            .cloned()
            .unwrap_or_default(),
        body: body.clone(),
    });
    let key = (Kind::Policy, String::new(), name.to_string());
    let Some(mut object) = state.objects.get(&key).cloned() else {
        drop(state);
        return respond(
            stream,
            404,
            &status_object(
                404,
                "NotFound",
                &format!("ciliumegressgatewaypolicies {name:?} not found"),
            ),
        );
    };
    // The status subresource ignores everything but the status.
    if let Some(status) = body.get("status") {
        merge_patch(&mut object["status"], status);
    }
    let version = state.next_version();
    object["metadata"]["resourceVersion"] = json!(version.to_string());
    state.objects.insert(key, object.clone());
    state.record(Kind::Policy, "MODIFIED", object.clone());
    drop(state);
    shared.changed.notify_all();
    respond(stream, 200, &object)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().expect("just made an object");
    for (key, value) in fields {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    write!(stream, "{:x}\r\n", data.len())?;
    stream.write_all(data)?;
    stream.write_all(b"\r\n")?;
    stream.flush()
}

fn watch_event(type_: &str, object: &Value) -> Vec<u8> {
    let mut line = json!({ "type": type_, "object": object })
        .to_string()
        .into_bytes();
    line.push(b'\n');
    line
}

fn serve_watch(
    shared: &Shared,
    stream: &mut TcpStream,
    kind: Kind,
    query: &BTreeMap<String, String>,
) {
    let header = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if stream.write_all(header.as_bytes()).is_err() {
        return;
    }
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let deadline = query
        .get("timeoutSeconds")
        .and_then(|seconds| seconds.parse().ok())
        .map(|seconds| Instant::now() + Duration::from_secs(seconds));
    let mut state = shared.lock();
    let mut sent: u64 = query
        .get("resourceVersion")
        .and_then(|version| version.parse().ok())
        .unwrap_or(state.resource_version);
    let breaks = state.breaks;
    if sent < state.oldest_watchable {
        let gone = status_object(
            410,
            "Expired",
            &format!(
                "too old resource version: {sent} ({})",
                state.oldest_watchable
            ),
        );
        drop(state);
        let _ = write_chunk(stream, &watch_event("ERROR", &gone));
        let _ = stream.write_all(b"0\r\n\r\n");
        return;
    }
    let mut last_write = Instant::now();
    loop {
        if state.shutdown {
            return;
        }
        if state.breaks != breaks {
            let mode = state.break_mode;
            drop(state);
            if let Some(WatchBreak::Gone) = mode {
                let gone = status_object(410, "Expired", "too old resource version");
                let _ = write_chunk(stream, &watch_event("ERROR", &gone));
                let _ = stream.write_all(b"0\r\n\r\n");
            } else {
                // Half an event, then the connection drops.
                let event = watch_event("BOOKMARK", &json!({"metadata": {}}));
                let _ = write!(stream, "{:x}\r\n", event.len());
                let _ = stream.write_all(&event[..event.len() / 2]);
                let _ = stream.flush();
            }
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        let pending: Vec<Vec<u8>> = state
            .events
            .iter()
            .filter(|event| event.kind == kind && event.resource_version > sent)
            .map(|event| watch_event(event.type_, &event.object))
            .collect();
        let newest = state.resource_version;
        if !pending.is_empty() {
            drop(state);
            for event in pending {
                if write_chunk(stream, &event).is_err() {
                    return;
                }
            }
            sent = newest;
            last_write = Instant::now();
            state = shared.lock();
            continue;
        }
        // Every event of this kind up to `newest` has been sent.
        sent = newest;
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            drop(state);
            let _ = stream.write_all(b"0\r\n\r\n");
            return;
        }
        if bookmarks && last_write.elapsed() >= BOOKMARK_INTERVAL {
            let bookmark = json!({
                "kind": kind.kind(),
                "apiVersion": kind.api_version(),
                "metadata": { "resourceVersion": newest.to_string() },
            });
            drop(state);
            if write_chunk(stream, &watch_event("BOOKMARK", &bookmark)).is_err() {
                return;
            }
            last_write = Instant::now();
            state = shared.lock();
            continue;
        }
        state = shared
            .changed
            .wait_timeout(state, Duration::from_millis(200))
            .map_or_else(|poisoned| poisoned.into_inner().0, |(guard, _)| guard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut target = json!({"a": 1, "b": {"c": 2, "d": 3}, "list": [1, 2]});
        merge_patch(
            &mut target,
            &json!({"a": null, "b": {"c": 5}, "list": [3], "e": "x"}),
        );
        assert_eq!(
            target,
            json!({"b": {"c": 5, "d": 3}, "list": [3], "e": "x"})
        );
    }

    #[test]
    fn apply_bumps_versions_and_generation_only_on_change() {
        let mut state = State::default();
        let key = (Kind::Policy, String::new(), "p".to_string());
        let policy = |cidr: &str| json!({"kind": "CiliumEgressGatewayPolicy", "metadata": {"name": "p"}, "spec": {"destinationCIDRs": [cidr]}});
        state.apply(key.clone(), policy("10.0.0.0/8"));
        state.apply(key.clone(), policy("10.0.0.0/8"));
        assert_eq!(state.events.len(), 1, "an unchanged apply is a no-op");
        state.apply(key.clone(), policy("10.1.0.0/16"));
        assert_eq!(state.objects[&key]["metadata"]["generation"], json!(2));
        assert_eq!(state.events[1].type_, "MODIFIED");
        state.delete(&key, false);
        assert_eq!(state.events.len(), 2, "a lost delete leaves no event");
        assert!(
            state.list(Kind::Policy)["items"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }
}
