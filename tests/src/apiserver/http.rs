//! HTTP/1.1: reading requests, routing them to the store, answering, and streaming watches.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write as _},
    net::{IpAddr, Ipv4Addr, Shutdown, TcpStream},
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Key, Kind, Request, Shared, WatchBreak, Write, discovery,
    store::{ApiError, Part, PatchType, status_object},
};

/// How often an idle watch gets a BOOKMARK (real servers: about a minute).
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

struct HttpRequest {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    fn is_watch(&self) -> bool {
        matches!(
            self.query.get("watch").map(String::as_str),
            Some("true" | "1")
        )
    }

    /// kubectl's `get` asks for a Table (server-side printing).
    fn wants_table(&self) -> bool {
        self.header("accept").contains("as=Table")
    }
}

/// What a resource path names.
struct Route {
    kind: Kind,
    /// `None`: every namespace (or a cluster-scoped kind).
    namespace: Option<String>,
    name: Option<String>,
    part: Part,
}

impl Route {
    fn key(&self, name: &str) -> Key {
        let namespace = if self.kind.resource().namespaced {
            self.namespace.clone().unwrap_or_else(|| "default".into())
        } else {
            String::new()
        };
        (self.kind, namespace, name.to_string())
    }
}

fn route(path: &str) -> Option<Route> {
    // Namespaced kinds first: `/api/v1/namespaces/x/pods` is not the namespace x.
    let kinds = Kind::ALL
        .into_iter()
        .filter(|kind| kind.resource().namespaced)
        .chain(
            Kind::ALL
                .into_iter()
                .filter(|kind| !kind.resource().namespaced),
        );
    for kind in kinds {
        let prefix = kind.prefix();
        let Some(rest) = path
            .strip_prefix(prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
        else {
            continue;
        };
        let resource = kind.resource();
        let parts: Vec<&str> = rest.split('/').collect();
        let (namespace, object) = match parts.as_slice() {
            ["namespaces", namespace, plural, object @ ..]
                if resource.namespaced && *plural == resource.plural =>
            {
                (Some((*namespace).to_string()), object)
            }
            [plural] if *plural == resource.plural => (None, &[][..]),
            [plural, object @ ..] if *plural == resource.plural && !resource.namespaced => {
                (None, object)
            }
            _ => continue,
        };
        let (name, part) = match object {
            [] => (None, Part::Object),
            [name] => (Some((*name).to_string()), Part::Object),
            [name, "status"] if resource.status_subresource => {
                (Some((*name).to_string()), Part::Status)
            }
            _ => continue,
        };
        return Some(Route {
            kind,
            namespace,
            name,
            part,
        });
    }
    None
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
            (key.to_string(), percent_decode(value))
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

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn serve_connection(shared: &Shared, stream: TcpStream) {
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
        let written = match route(&request.path) {
            Some(route)
                if request.method == "GET" && route.name.is_none() && request.is_watch() =>
            {
                // A watch owns its connection until it ends.
                serve_watch(shared, &mut stream, &route, &request.query);
                return;
            }
            Some(route) => {
                let (code, body) = match serve_resource(shared, &route, &request, from) {
                    Ok((code, body)) => (code, body),
                    Err(error) => (error.code, error.to_status()),
                };
                respond(&mut stream, code, &body)
            }
            None => match discovery::document(&request.path) {
                Some(document) if request.method == "GET" => respond(&mut stream, 200, &document),
                _ => respond(
                    &mut stream,
                    404,
                    &status_object(404, "NotFound", &format!("{} not served", request.path)),
                ),
            },
        };
        if written.is_err() {
            return;
        }
    }
}

/// Reads and writes of objects: (HTTP code, body).
fn serve_resource(
    shared: &Shared,
    route: &Route,
    request: &HttpRequest,
    from: IpAddr,
) -> Result<(u16, Value), ApiError> {
    let method = request.method.as_str();
    if method == "GET" {
        let state = shared.lock();
        let objects = match &route.name {
            None => state
                .store
                .objects_of(route.kind, route.namespace.as_deref()),
            Some(name) => {
                let key = route.key(name);
                let object = state.store.get(&key).cloned().ok_or_else(|| {
                    ApiError::new(
                        404,
                        "NotFound",
                        format!("{} {name:?} not found", route.kind.resource().plural),
                    )
                })?;
                if !request.wants_table() {
                    return Ok((200, object));
                }
                vec![object]
            }
        };
        let version = state.store.resource_version();
        drop(state);
        return Ok((
            200,
            if request.wants_table() {
                discovery::table(route.kind, &objects, version)?
            } else {
                shared
                    .lock()
                    .store
                    .list(route.kind, route.namespace.as_deref())
            },
        ));
    }

    let body: Value = if request.body.is_empty() {
        json!({})
    } else {
        // YAML is a superset of JSON: apply patches may be either.
        serde_yaml::Deserializer::from_slice(&request.body)
            .next()
            .and_then(|document| Value::deserialize(document).ok())
            .ok_or_else(|| ApiError::new(400, "BadRequest", "the body is neither JSON nor YAML"))?
    };
    let name = route
        .name
        .clone()
        .or_else(|| body["metadata"]["name"].as_str().map(str::to_string))
        .ok_or_else(|| ApiError::new(422, "Invalid", "metadata.name: Required value"))?;
    let key = route.key(&name);
    let content_type = request.header("content-type").to_string();
    let field_manager = request.query.get("fieldManager").cloned();
    let mut state = shared.lock();
    let result = match (method, &route.name) {
        ("POST", None) => state
            .store
            .create(&key, body.clone())
            .map(|object| (201, object)),
        ("PUT", Some(_)) => state
            .store
            .replace(&key, route.part, body.clone())
            .map(|object| (200, object)),
        ("PATCH", Some(_)) => {
            patch_type(&content_type, field_manager.as_deref()).and_then(|patch| {
                state
                    .store
                    .patch(&key, route.part, &patch, body.clone())
                    .map(|object| (200, object))
            })
        }
        ("DELETE", Some(_)) => state.store.delete(&key).map(|object| (200, object)),
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not allowed on {}", request.path),
        )),
    };
    state.writes.push(Write {
        method: method.to_string(),
        kind: route.kind,
        namespace: key.1.clone(),
        name,
        subresource: (route.part == Part::Status).then(|| "status".to_string()),
        from,
        content_type,
        field_manager,
        body,
        code: result
            .as_ref()
            .map_or_else(|error| error.code, |(code, _)| *code),
    });
    drop(state);
    shared.changed.notify_all();
    result
}

fn patch_type(content_type: &str, field_manager: Option<&str>) -> Result<PatchType, ApiError> {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    match media {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            Ok(PatchType::Merge)
        }
        "application/apply-patch+yaml" | "application/apply-patch+json" => {
            let field_manager = field_manager
                .filter(|manager| !manager.is_empty())
                .ok_or_else(|| {
                    ApiError::new(
                        400,
                        "BadRequest",
                        "PATCH requests with an apply patch must name a fieldManager",
                    )
                })?;
            Ok(PatchType::Apply {
                field_manager: field_manager.to_string(),
            })
        }
        _ => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format: {content_type}"),
        )),
    }
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        _ => "Internal Server Error",
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
    route: &Route,
    query: &BTreeMap<String, String>,
) {
    let header = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if stream.write_all(header.as_bytes()).is_err() {
        return;
    }
    let kind = route.kind;
    let namespace = route.namespace.as_deref();
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
        .unwrap_or(state.store.resource_version());
    let breaks = state.breaks;
    if sent < state.store.oldest_watchable() {
        let gone = status_object(
            410,
            "Expired",
            &format!(
                "too old resource version: {sent} ({})",
                state.store.oldest_watchable()
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
            .store
            .events_after(kind, namespace, sent)
            .map(|event| watch_event(event.type_, &event.object))
            .collect();
        let newest = state.store.resource_version();
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
    fn routes_name_kind_namespace_object_and_subresource() {
        let route_of =
            |path: &str| route(path).map(|r| (r.kind, r.namespace, r.name, r.part == Part::Status));
        assert_eq!(
            route_of("/api/v1/namespaces/default/pods"),
            Some((Kind::Pod, Some("default".into()), None, false))
        );
        assert_eq!(
            route_of("/api/v1/namespaces/default"),
            Some((Kind::Namespace, None, Some("default".into()), false))
        );
        assert_eq!(
            route_of("/api/v1/pods"),
            Some((Kind::Pod, None, None, false))
        );
        assert_eq!(route_of("/api/v1/pods/x"), None, "pods are namespaced");
        assert_eq!(
            route_of("/apis/cilium.io/v2/ciliumegressgatewaypolicies/p/status"),
            Some((Kind::Policy, None, Some("p".into()), true))
        );
        assert_eq!(
            route_of("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/l"),
            Some((
                Kind::Lease,
                Some("kube-system".into()),
                Some("l".into()),
                false
            ))
        );
        assert_eq!(
            route_of("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/l/status"),
            None,
            "leases have no status subresource"
        );
        assert_eq!(route_of("/apis/cilium.io/v2"), None, "discovery");
    }

    #[test]
    fn queries_are_percent_decoded() {
        assert_eq!(percent_decode("a%3Db+c%2Cd"), "a=b c,d");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
