//! What kubectl asks before it touches an object: discovery (which groups, versions and
//! resources exist, with their short names), and Tables for `kubectl get` (server-side
//! printing, with the CRD's printer columns for policies).

use std::{
    collections::BTreeMap,
    sync::OnceLock,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use super::{API_SERVER_ADDRESS, Kind, store::ApiError};

/// The CRD the tests serve policies with: the one users apply.
const CRD: &str = include_str!("../../../deploy/crd.yaml");

/// The discovery document at `path`, if it is one.
pub(super) fn document(path: &str) -> Option<Value> {
    let path = path.trim_end_matches('/');
    match path {
        "/version" => Some(json!({
            "major": "1",
            "minor": "32",
            "gitVersion": "v1.32.0-egress-tests",
            "platform": "linux/amd64",
        })),
        "/api" => Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                { "clientCIDR": "0.0.0.0/0", "serverAddress": API_SERVER_ADDRESS.to_string() },
            ],
        })),
        "/apis" => Some(group_list()),
        "/openapi/v3" => Some(openapi_index()),
        _ => match path.strip_prefix("/openapi/v3/") {
            Some(group_version) => openapi_group_version(&format!("/{group_version}")),
            None => resource_list(path),
        },
    }
}

/// `/openapi/v3`: where each group version's document is.
fn openapi_index() -> Value {
    let mut paths = serde_json::Map::new();
    for kind in Kind::ALL {
        let prefix = kind.prefix();
        let relative = prefix.trim_start_matches('/').to_string();
        paths.insert(
            relative,
            json!({ "serverRelativeURL": format!("/openapi/v3{prefix}?hash=egress-tests") }),
        );
    }
    json!({ "paths": paths })
}

/// A group version's OpenAPI v3 document, as far as kubectl reads it before a write: every
/// kind's PATCH takes `fieldValidation`, so kubectl leaves validation to the server (which
/// here accepts what it gets) instead of downloading schemas.
fn openapi_group_version(prefix: &str) -> Option<Value> {
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|kind| kind.prefix() == prefix)
        .collect();
    if kinds.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for kind in kinds {
        let resource = kind.resource();
        let gvk = json!([{ "group": resource.group, "version": resource.version, "kind": resource.kind }]);
        let parameter =
            json!({ "name": "fieldValidation", "in": "query", "schema": { "type": "string" } });
        let operation = json!({
            "parameters": [parameter],
            "x-kubernetes-group-version-kind": gvk[0],
            "responses": { "200": { "description": "OK" } },
        });
        let object_path = if resource.namespaced {
            format!(
                "{prefix}/namespaces/{{namespace}}/{}/{{name}}",
                resource.plural
            )
        } else {
            format!("{prefix}/{}/{{name}}", resource.plural)
        };
        paths.insert(
            object_path,
            json!({ "patch": operation, "put": operation, "get": operation }),
        );
        schemas.insert(
            format!("{}.{}", resource.group, resource.kind),
            json!({ "type": "object", "x-kubernetes-group-version-kind": gvk }),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": { "title": "Kubernetes", "version": "v1.32.0" },
        "paths": paths,
        "components": { "schemas": schemas },
    }))
}

fn group_list() -> Value {
    let mut groups: BTreeMap<&str, &str> = BTreeMap::new();
    for kind in Kind::ALL {
        let resource = kind.resource();
        if !resource.group.is_empty() {
            groups.insert(resource.group, resource.version);
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(group, version)| {
            let version =
                json!({ "groupVersion": format!("{group}/{version}"), "version": version });
            json!({ "name": group, "versions": [version.clone()], "preferredVersion": version })
        })
        .collect();
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
}

/// `/api/v1` or `/apis/<group>/<version>`: the resources served there.
fn resource_list(path: &str) -> Option<Value> {
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|kind| kind.prefix() == path)
        .collect();
    let first = kinds.first()?;
    let mut resources = Vec::new();
    for kind in &kinds {
        let resource = kind.resource();
        resources.push(json!({
            "name": resource.plural,
            "singularName": resource.singular,
            "namespaced": resource.namespaced,
            "kind": resource.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": resource.short_names,
        }));
        if resource.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", resource.plural),
                "singularName": "",
                "namespaced": resource.namespaced,
                "kind": resource.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": first.api_version(),
        "resources": resources,
    }))
}

/// A printer column: its header, type and JSONPath.
struct Column {
    name: String,
    type_: String,
    json_path: String,
}

/// The policy CRD's `additionalPrinterColumns` (v2).
fn policy_columns() -> &'static [Column] {
    static COLUMNS: OnceLock<Vec<Column>> = OnceLock::new();
    COLUMNS.get_or_init(|| {
        let crd: Value = serde_yaml::from_str(CRD).expect("deploy/crd.yaml parses");
        let versions = crd["spec"]["versions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let v2 = versions
            .iter()
            .find(|version| version["name"] == json!("v2"))
            .expect("deploy/crd.yaml serves v2");
        v2["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|column| Column {
                name: column["name"].as_str().unwrap_or_default().to_string(),
                type_: column["type"].as_str().unwrap_or("string").to_string(),
                json_path: column["jsonPath"].as_str().unwrap_or_default().to_string(),
            })
            .collect()
    })
}

/// A `meta.k8s.io/v1` Table of `objects`, as `kubectl get` prints it.
pub(super) fn table(kind: Kind, objects: &[Value], version: u64) -> Result<Value, ApiError> {
    let age = Column {
        name: "Age".into(),
        type_: "date".into(),
        json_path: ".metadata.creationTimestamp".into(),
    };
    let columns: Vec<&Column> = match kind {
        Kind::Policy => policy_columns().iter().collect(),
        _ => vec![&age],
    };
    let mut definitions = vec![json!({
        "name": "Name", "type": "string", "format": "name", "description": "", "priority": 0,
    })];
    definitions.extend(columns.iter().map(|column| {
        json!({
            "name": column.name, "type": column.type_, "format": "", "description": "",
            "priority": 0,
        })
    }));
    let mut rows = Vec::new();
    for object in objects {
        let mut cells = vec![object["metadata"]["name"].clone()];
        for column in &columns {
            let found = json_path(object, &column.json_path)
                .map_err(|message| ApiError::new(500, "InternalError", message))?;
            cells.push(cell(column, found.first().copied()));
        }
        rows.push(json!({
            "cells": cells,
            "object": {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": object["metadata"],
            },
        }));
    }
    Ok(json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": { "resourceVersion": version.to_string() },
        "columnDefinitions": definitions,
        "rows": rows,
    }))
}

/// A cell as the API server renders a CRD column: a date as an age, a number as itself,
/// anything else as its text (lists and maps as JSON); nothing found is empty (`<none>`).
fn cell(column: &Column, value: Option<&Value>) -> Value {
    match (column.type_.as_str(), value) {
        (_, None | Some(Value::Null)) => Value::Null,
        ("date", Some(Value::String(time))) => {
            parse_rfc3339(time).map_or(Value::Null, |then| json!(age(then)))
        }
        ("integer" | "number", Some(number @ Value::Number(_))) => number.clone(),
        (_, Some(Value::String(text))) => json!(text),
        (_, Some(other)) => json!(other.to_string()),
    }
}

/// The values `path` selects in `object`: the JSONPath forms printer columns use here,
/// `.a.b`, `.a[0]` and `.a[?(@.k=="v")].b`; any other form is an error naming it.
fn json_path<'a>(object: &'a Value, path: &str) -> Result<Vec<&'a Value>, String> {
    let mut current = vec![object];
    let rest = path
        .strip_prefix('.')
        .ok_or_else(|| format!("JSONPath {path:?} must start with '.'"))?;
    for segment in split_segments(rest) {
        let (field, index) = match segment.split_once('[') {
            Some((field, index)) => (field, index.strip_suffix(']')),
            None => (segment, None),
        };
        current = current
            .into_iter()
            .filter_map(|value| value.get(field))
            .collect();
        let Some(index) = index else { continue };
        if let Ok(position) = index.parse::<usize>() {
            current = current
                .into_iter()
                .filter_map(|value| value.get(position))
                .collect();
        } else if let Some(filter) = index
            .strip_prefix("?(@.")
            .and_then(|filter| filter.strip_suffix(')'))
        {
            let (key, wanted) = filter
                .split_once("==")
                .ok_or_else(|| format!("JSONPath filter {filter:?} in {path:?} is not k==v"))?;
            let wanted = wanted.trim().trim_matches(|c| c == '"' || c == '\'');
            current = current
                .into_iter()
                .filter_map(Value::as_array)
                .flatten()
                .filter(|item| item.get(key.trim()).and_then(Value::as_str) == Some(wanted))
                .collect();
        } else {
            return Err(format!("JSONPath {path:?}: unsupported index [{index}]"));
        }
    }
    Ok(current)
}

/// `a.b[?(@.c=="d.e")].f` → `a`, `b[?(@.c=="d.e")]`, `f`: dots inside brackets stay.
fn split_segments(path: &str) -> Vec<&str> {
    let mut segments = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in path.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => {
                segments.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    segments.push(&path[start..]);
    segments
}

/// Seconds since the epoch of `2024-05-01T12:00:00Z`.
fn parse_rfc3339(time: &str) -> Option<i64> {
    let field = |range: std::ops::Range<usize>| time.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (field(0..4)?, field(5..7)?, field(8..10)?);
    let (hour, minute, second) = (field(11..13)?, field(14..16)?, field(17..19)?);
    // Days-from-civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

/// kubectl's age: `45s`, `3m20s`, `25m`, `2h5m`, `30h`, `3d`.
fn age(then: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs().cast_signed());
    let seconds = (now - then).max(0);
    let (minutes, hours) = (seconds / 60, seconds / 3600);
    match () {
        () if seconds < 120 => format!("{seconds}s"),
        () if minutes < 10 => format!("{minutes}m{}s", seconds % 60),
        () if minutes < 180 => format!("{minutes}m"),
        () if hours < 8 => format!("{hours}h{}m", minutes % 60),
        () if hours < 48 => format!("{hours}h"),
        () => format!("{}d", hours / 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_columns_of_the_crd_read_the_status() {
        let policy = json!({
            "metadata": { "name": "p", "creationTimestamp": "2020-01-01T00:00:00Z" },
            "status": {
                "gatewayNodes": ["w2"],
                "egressIP": "10.0.0.12",
                "matchedPods": 3,
                "conditions": [
                    { "type": "Other", "status": "False", "reason": "X" },
                    { "type": "Ready", "status": "True", "reason": "Programmed" },
                ],
            },
        });
        let table = table(Kind::Policy, &[policy], 7).unwrap();
        let headers: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|column| column["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            headers,
            [
                "Name",
                "Ready",
                "Reason",
                "Gateway",
                "Egress IP",
                "Pods",
                "Age"
            ]
        );
        let cells = &table["rows"][0]["cells"];
        assert_eq!(
            cells.as_array().unwrap()[..6],
            [
                json!("p"),
                json!("True"),
                json!("Programmed"),
                json!("[\"w2\"]"),
                json!("10.0.0.12"),
                json!(3)
            ]
        );
        assert!(cells[6].as_str().unwrap().ends_with('d'), "{cells}");

        let fresh = json!({ "metadata": { "name": "q" } });
        let table = super::table(Kind::Policy, &[fresh], 7).unwrap();
        assert_eq!(table["rows"][0]["cells"][1], Value::Null, "no status yet");
    }

    #[test]
    fn json_paths_outside_the_supported_forms_are_errors() {
        let object = json!({ "a": [1] });
        assert!(json_path(&object, ".a[*]").unwrap_err().contains("[*]"));
        assert!(json_path(&object, "a").is_err());
        assert_eq!(json_path(&object, ".a[0]").unwrap(), [&json!(1)]);
    }

    #[test]
    fn timestamps_and_ages() {
        assert_eq!(parse_rfc3339("1970-01-02T00:00:10Z"), Some(86_410));
        assert_eq!(parse_rfc3339("2024-03-01T00:00:00Z"), Some(1_709_251_200));
        assert_eq!(parse_rfc3339("soon"), None);
    }

    #[test]
    fn discovery_names_every_served_resource() {
        let cilium = document("/apis/cilium.io/v2").unwrap();
        assert_eq!(cilium["resources"][0]["shortNames"], json!(["cegp"]));
        assert_eq!(
            cilium["resources"][1]["name"],
            json!("ciliumegressgatewaypolicies/status")
        );
        let groups = document("/apis").unwrap();
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|group| group["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["cilium.io", "coordination.k8s.io", "events.k8s.io"]);
        assert!(document("/apis/apps/v1").is_none());
    }
}
