//! The objects, their versions and the event history, and what each kind of write does to
//! them. Pure: no sockets, so the semantics are unit-tested.
//!
//! As the real API server: every change bumps the resourceVersion and is one watch event; a
//! write that changes nothing is no change (no version, no event); `generation` counts spec
//! changes; writes to an object leave a status subresource alone, and writes to the
//! subresource change only the status; a stale `resourceVersion` in an update or a patch is a
//! 409 Conflict.
//!
//! Server-side apply, simplified: a field manager owns the top-level fields of what it applied
//! (`spec`, each label and annotation, each top-level `status` field), recorded in
//! `metadata.managedFields`. Applying sets the fields it names and removes the fields it owned
//! before and no longer names; fields of other managers stay. Conflicts between managers are
//! not detected (every applier here forces).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::{Key, Kind};
use crate::manifests::rfc3339_now;

/// A watch event.
pub(super) struct Event {
    pub(super) resource_version: u64,
    pub(super) kind: Kind,
    pub(super) namespace: String,
    pub(super) type_: &'static str,
    pub(super) object: Value,
}

/// An error answer: its HTTP code, `reason` and message, as a `Status` object.
#[derive(Debug, PartialEq)]
pub(super) struct ApiError {
    pub(super) code: u16,
    pub(super) reason: &'static str,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    fn not_found(key: &Key) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} {:?} not found", key.0.resource().plural, key.2),
        )
    }

    pub(super) fn to_status(&self) -> Value {
        status_object(self.code, self.reason, &self.message)
    }
}

pub(super) fn status_object(code: u16, reason: &str, message: &str) -> Value {
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

/// Which part of an object a write addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Part {
    Object,
    Status,
}

/// How a PATCH body is read (its Content-Type).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum PatchType {
    /// `application/merge-patch+json`, and `application/strategic-merge-patch+json` read the
    /// same way (no list merge keys here: lists are replaced).
    Merge,
    /// `application/apply-patch+yaml`, with the field manager from the query.
    Apply { field_manager: String },
}

#[derive(Default)]
pub(super) struct Store {
    resource_version: u64,
    /// Watches from a version older than this get 410: their events are gone.
    oldest_watchable: u64,
    objects: BTreeMap<Key, Value>,
    events: Vec<Event>,
    /// Each fixture manifest as last synced, to apply only the ones that changed.
    fixtures: BTreeMap<Key, Value>,
}

type Result<T> = std::result::Result<T, ApiError>;

impl Store {
    pub(super) fn new(first_version: u64) -> Store {
        Store {
            resource_version: first_version,
            oldest_watchable: first_version,
            ..Store::default()
        }
    }

    pub(super) fn resource_version(&self) -> u64 {
        self.resource_version
    }

    pub(super) fn oldest_watchable(&self) -> u64 {
        self.oldest_watchable
    }

    pub(super) fn forget_history(&mut self) {
        self.events.clear();
        self.oldest_watchable = self.resource_version;
    }

    pub(super) fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key)
    }

    pub(super) fn objects_of(&self, kind: Kind, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(key, _)| key.0 == kind && namespace.is_none_or(|ns| key.1 == ns))
            .map(|(_, object)| object.clone())
            .collect()
    }

    /// The events of `kind` (in `namespace`, if given) after `version`.
    pub(super) fn events_after(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        version: u64,
    ) -> impl Iterator<Item = &Event> {
        self.events.iter().filter(move |event| {
            event.kind == kind
                && event.resource_version > version
                && namespace.is_none_or(|ns| event.namespace == ns)
        })
    }

    pub(super) fn list(&self, kind: Kind, namespace: Option<&str>) -> Value {
        json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.kind()),
            "metadata": { "resourceVersion": self.resource_version.to_string() },
            "items": self.objects_of(kind, namespace),
        })
    }

    /// Applies the fixture manifests that changed since the last sync; removes the objects
    /// whose manifest is gone (with a DELETED event when `announce_deletes`).
    pub(super) fn sync_fixtures(
        &mut self,
        manifests: BTreeMap<Key, Value>,
        announce_deletes: bool,
    ) {
        let gone: Vec<Key> = self
            .fixtures
            .keys()
            .filter(|key| !manifests.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            self.fixtures.remove(&key);
            if self.objects.contains_key(&key) {
                self.delete_object(&key, announce_deletes);
            }
        }
        for (key, manifest) in manifests {
            if self.fixtures.get(&key) == Some(&manifest) && self.objects.contains_key(&key) {
                continue;
            }
            self.fixtures.insert(key.clone(), manifest.clone());
            let mut object = manifest;
            // Fixture pods and nodes carry their status (IPs) in the manifest, as the
            // kubelet would write it; a policy's status is the agents' to write.
            if key.0 == Kind::Policy
                && let Some(status) = self.objects.get(&key).and_then(|old| old.get("status"))
            {
                object["status"] = status.clone();
            }
            self.store(&key, object);
        }
    }

    /// POST to a collection.
    pub(super) fn create(&mut self, key: &Key, body: Value) -> Result<Value> {
        if self.objects.contains_key(key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} {:?} already exists", key.0.resource().plural, key.2),
            ));
        }
        let mut object = body;
        if key.0.resource().status_subresource && key.0 == Kind::Policy {
            // A new policy has no status until its writer says so.
            if let Some(object) = object.as_object_mut() {
                object.remove("status");
            }
        }
        Ok(self.store(key, object))
    }

    /// PUT of an object or its status.
    pub(super) fn replace(&mut self, key: &Key, part: Part, body: Value) -> Result<Value> {
        let old = self
            .objects
            .get(key)
            .ok_or_else(|| ApiError::not_found(key))?;
        check_version(old, &body)?;
        let object = with_part(key.0, old, part, |target| match part {
            Part::Object => *target = body.clone(),
            Part::Status => target["status"] = body.get("status").cloned().unwrap_or(Value::Null),
        });
        Ok(self.store(key, object))
    }

    /// PATCH of an object or its status. An apply of a missing object creates it.
    pub(super) fn patch(
        &mut self,
        key: &Key,
        part: Part,
        patch: &PatchType,
        body: Value,
    ) -> Result<Value> {
        let Some(old) = self.objects.get(key) else {
            return match (patch, part) {
                (PatchType::Apply { field_manager }, Part::Object) => {
                    let mut object = json!({});
                    apply(&mut object, &body, field_manager, None);
                    copy_identity(&mut object, &body);
                    self.create(key, object)
                }
                _ => Err(ApiError::not_found(key)),
            };
        };
        check_version(old, &body)?;
        let object = with_part(key.0, old, part, |target| match (patch, part) {
            (PatchType::Merge, Part::Object) => merge_patch(target, &body),
            (PatchType::Merge, Part::Status) => {
                if let Some(status) = body.get("status") {
                    merge_patch(&mut target["status"], status);
                }
            }
            (PatchType::Apply { field_manager }, Part::Object) => {
                apply(target, &body, field_manager, None);
            }
            (PatchType::Apply { field_manager }, Part::Status) => {
                apply(target, &body, field_manager, Some("status"));
            }
        });
        Ok(self.store(key, object))
    }

    pub(super) fn delete(&mut self, key: &Key) -> Result<Value> {
        if !self.objects.contains_key(key) {
            return Err(ApiError::not_found(key));
        }
        Ok(self.delete_object(key, true))
    }

    fn delete_object(&mut self, key: &Key, announce: bool) -> Value {
        let mut object = self.objects.remove(key).unwrap_or(Value::Null);
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        if announce {
            self.record(key, "DELETED", object.clone());
        }
        object
    }

    /// Stores `object` under `key` with the fields the server owns, and records the event;
    /// an object equal to the stored one but for those fields is no change.
    fn store(&mut self, key: &Key, mut object: Value) -> Value {
        let old = self.objects.get(key);
        if let Some(old) = old
            && comparable(old) == comparable(&object)
        {
            return old.clone();
        }
        let generation = match old {
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
        self.resource_version += 1;
        let version = self.resource_version;
        if !object.is_object() {
            object = json!({});
        }
        object["apiVersion"] = json!(key.0.api_version());
        object["kind"] = json!(key.0.kind());
        let metadata = &mut object["metadata"];
        if !metadata.is_object() {
            *metadata = json!({});
        }
        metadata["name"] = json!(key.2);
        if key.0.resource().namespaced {
            metadata["namespace"] = json!(key.1);
        }
        metadata["resourceVersion"] = json!(version.to_string());
        metadata["generation"] = json!(generation);
        if let Some(old) = old {
            metadata["uid"] = old["metadata"]["uid"].clone();
            metadata["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
        } else {
            metadata["uid"] = json!(format!("00000000-0000-4000-8000-{version:012}"));
            if metadata["creationTimestamp"]
                .as_str()
                .is_none_or(str::is_empty)
            {
                metadata["creationTimestamp"] = json!(rfc3339_now());
            }
        }
        let type_ = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.objects.insert(key.clone(), object.clone());
        self.record(key, type_, object.clone());
        object
    }

    fn record(&mut self, key: &Key, type_: &'static str, object: Value) {
        self.events.push(Event {
            resource_version: self.resource_version,
            kind: key.0,
            namespace: key.1.clone(),
            type_,
            object,
        });
    }
}

/// A copy of `old` changed by `write`, where a status subresource keeps writes to the object
/// and to the status apart.
fn with_part(kind: Kind, old: &Value, part: Part, write: impl FnOnce(&mut Value)) -> Value {
    let mut object = old.clone();
    write(&mut object);
    if kind.resource().status_subresource {
        match part {
            Part::Object => object["status"] = old.get("status").cloned().unwrap_or(Value::Null),
            Part::Status => {
                let status = object.get("status").cloned();
                let managed_fields = object["metadata"].get("managedFields").cloned();
                object = old.clone();
                object["status"] = status.unwrap_or(Value::Null);
                if let Some(managed_fields) = managed_fields {
                    object["metadata"]["managedFields"] = managed_fields;
                }
            }
        }
    }
    if let Some(fields) = object.as_object_mut() {
        fields.retain(|_, value| !value.is_null());
    }
    object
}

/// A write that names a `resourceVersion` must name the current one.
fn check_version(old: &Value, body: &Value) -> Result<()> {
    let Some(wanted) = body["metadata"]["resourceVersion"].as_str() else {
        return Ok(());
    };
    let current = old["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    if wanted.is_empty() || wanted == current {
        Ok(())
    } else {
        Err(ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {:?}: the object has been modified; please \
                 apply your changes to the latest version and try again",
                old["metadata"]["name"]
            ),
        ))
    }
}

fn copy_identity(object: &mut Value, body: &Value) {
    for field in ["apiVersion", "kind"] {
        if let Some(value) = body.get(field) {
            object[field] = value.clone();
        }
    }
}

/// The object without the fields the server sets, to tell whether a write changes anything.
fn comparable(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["resourceVersion", "generation", "uid", "creationTimestamp"] {
            metadata.remove(field);
        }
    }
    object
}

/// RFC 7386 JSON merge patch.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
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

/// The sections of an object a field manager owns fields of: (path to a map, whether each
/// of its keys is owned separately). `status` for the status subresource; labels,
/// annotations and the top-level fields otherwise.
fn sections(subresource: Option<&str>) -> &'static [&'static [&'static str]] {
    match subresource {
        Some(_) => &[&["status"]],
        None => &[&["metadata", "labels"], &["metadata", "annotations"], &[]],
    }
}

/// Top-level fields that are not a manager's to own.
const NOT_OWNED: &[&str] = &["apiVersion", "kind", "metadata", "status"];

fn section<'a>(object: &'a Value, path: &[&str]) -> Option<&'a Map<String, Value>> {
    path.iter()
        .try_fold(object, |value, field| value.get(field))
        .and_then(Value::as_object)
}

fn section_mut<'a>(object: &'a mut Value, path: &[&str]) -> &'a mut Map<String, Value> {
    let mut value = object;
    for field in path {
        if !value.is_object() {
            *value = json!({});
        }
        value = value
            .as_object_mut()
            .expect("just made an object")
            .entry((*field).to_string())
            .or_insert(json!({}));
    }
    if !value.is_object() {
        *value = json!({});
    }
    value.as_object_mut().expect("just made an object")
}

/// The fields `applied` names, per section (keys of the section's map).
fn owned_fields(applied: &Value, subresource: Option<&str>) -> Vec<BTreeSet<String>> {
    sections(subresource)
        .iter()
        .map(|path| {
            section(applied, path)
                .map(|fields| {
                    fields
                        .keys()
                        .filter(|key| !path.is_empty() || !NOT_OWNED.contains(&key.as_str()))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// `fieldsV1` of a managedFields entry: `{"f:metadata": {"f:labels": {"f:app": {}}}, ...}`.
fn fields_v1(subresource: Option<&str>, owned: &[BTreeSet<String>]) -> Value {
    let mut fields = json!({});
    for (path, keys) in sections(subresource).iter().zip(owned) {
        if keys.is_empty() {
            continue;
        }
        let mut target = &mut fields;
        for field in *path {
            target = target
                .as_object_mut()
                .expect("built of objects")
                .entry(format!("f:{field}"))
                .or_insert(json!({}));
        }
        for key in keys {
            target[format!("f:{key}")] = json!({});
        }
    }
    fields
}

/// The fields a `fieldsV1` says are owned, per section: the inverse of [`fields_v1`].
fn owned_in(fields: &Value, subresource: Option<&str>) -> Vec<BTreeSet<String>> {
    sections(subresource)
        .iter()
        .map(|path| {
            let section = path
                .iter()
                .try_fold(fields, |value, field| value.get(format!("f:{field}")));
            section
                .and_then(Value::as_object)
                .map(|keys| {
                    keys.keys()
                        .filter_map(|key| key.strip_prefix("f:"))
                        .filter(|key| !path.is_empty() || !NOT_OWNED.contains(key))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// Server-side apply of `applied` by `manager` to `target` (see the module's comment).
fn apply(target: &mut Value, applied: &Value, manager: &str, subresource: Option<&str>) {
    let entries: Vec<Value> = target["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let is_mine = |entry: &Value| {
        entry["manager"] == json!(manager)
            && entry["operation"] == json!("Apply")
            && entry["subresource"].as_str() == subresource
    };
    let before = entries.iter().find(|entry| is_mine(entry)).map_or_else(
        || vec![BTreeSet::new(); sections(subresource).len()],
        |entry| owned_in(&entry["fieldsV1"], subresource),
    );
    let now_owned = owned_fields(applied, subresource);
    for ((path, before), now) in sections(subresource).iter().zip(&before).zip(&now_owned) {
        let fields = section_mut(target, path);
        for dropped in before.difference(now) {
            fields.remove(dropped);
        }
        if let Some(applied) = section(applied, path) {
            for key in now {
                fields.insert(key.clone(), applied[key].clone());
            }
        }
    }
    // Empty label and annotation maps are left out, as the API server does.
    if let Some(metadata) = target["metadata"].as_object_mut() {
        metadata.retain(|field, value| {
            !matches!(field.as_str(), "labels" | "annotations")
                || value.as_object().is_some_and(|map| !map.is_empty())
        });
    }
    let mut entries: Vec<Value> = entries.into_iter().filter(|e| !is_mine(e)).collect();
    let mut entry = json!({
        "manager": manager,
        "operation": "Apply",
        "apiVersion": applied.get("apiVersion").cloned().unwrap_or(Value::Null),
        "time": rfc3339_now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields_v1(subresource, &now_owned),
    });
    if let Some(subresource) = subresource {
        entry["subresource"] = json!(subresource);
    }
    entries.push(entry);
    target["metadata"]["managedFields"] = Value::Array(entries);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_key() -> Key {
        (Kind::Policy, String::new(), "p".to_string())
    }

    fn policy(cidr: &str) -> Value {
        json!({"kind": "CiliumEgressGatewayPolicy", "metadata": {"name": "p"}, "spec": {"destinationCIDRs": [cidr]}})
    }

    fn apply_status(manager: &str, status: Value) -> (PatchType, Value) {
        (
            PatchType::Apply {
                field_manager: manager.into(),
            },
            json!({"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy", "metadata": {"name": "p"}, "status": status}),
        )
    }

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
    fn fixtures_bump_versions_and_generation_only_on_change() {
        let mut store = Store::new(100);
        let key = policy_key();
        let sync = |store: &mut Store, cidr: Option<&str>, announce| {
            let manifests = cidr
                .map(|cidr| BTreeMap::from([(key.clone(), policy(cidr))]))
                .unwrap_or_default();
            store.sync_fixtures(manifests, announce);
        };
        sync(&mut store, Some("10.0.0.0/8"), true);
        sync(&mut store, Some("10.0.0.0/8"), true);
        assert_eq!(store.events.len(), 1, "an unchanged manifest is a no-op");
        sync(&mut store, Some("10.1.0.0/16"), true);
        assert_eq!(store.objects[&key]["metadata"]["generation"], json!(2));
        assert_eq!(store.events[1].type_, "MODIFIED");
        sync(&mut store, None, false);
        assert_eq!(store.events.len(), 2, "a lost delete leaves no event");
        assert!(
            store.list(Kind::Policy, None)["items"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }

    /// `kubectl label` on a fixture node survives later syncs of unchanged manifests.
    #[test]
    fn client_changes_survive_syncs_of_unchanged_manifests() {
        let mut store = Store::new(1);
        let key = (Kind::Node, String::new(), "w1".to_string());
        let node = json!({"kind": "Node", "metadata": {"name": "w1"}, "status": {"addresses": []}});
        store.sync_fixtures(BTreeMap::from([(key.clone(), node.clone())]), true);
        let patch =
            json!({"metadata": {"labels": {"egress": "true"}}, "status": {"addresses": null}});
        let labelled = store
            .patch(&key, Part::Object, &PatchType::Merge, patch)
            .unwrap();
        assert_eq!(labelled["metadata"]["labels"]["egress"], json!("true"));
        assert_eq!(
            labelled["status"],
            json!({"addresses": []}),
            "a write to the object leaves its status alone"
        );
        store.sync_fixtures(BTreeMap::from([(key.clone(), node)]), true);
        assert_eq!(
            store.objects[&key]["metadata"]["labels"]["egress"],
            json!("true")
        );
        store.sync_fixtures(BTreeMap::new(), true);
        assert!(store.get(&key).is_none(), "its manifest is gone");
    }

    #[test]
    fn stale_resource_versions_conflict() {
        let mut store = Store::new(1);
        let key = (Kind::Lease, "kube-system".into(), "l".into());
        let lease = |holder: &str, version: &str| json!({"metadata": {"name": "l", "resourceVersion": version}, "spec": {"holderIdentity": holder}});
        let created = store.create(&key, lease("a", "")).unwrap();
        let version = created["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(store.create(&key, lease("b", "")).unwrap_err().code, 409);
        store
            .replace(&key, Part::Object, lease("b", &version))
            .unwrap();
        let stale = store
            .replace(&key, Part::Object, lease("c", &version))
            .unwrap_err();
        assert_eq!((stale.code, stale.reason), (409, "Conflict"));
        assert_eq!(store.objects[&key]["spec"]["holderIdentity"], json!("b"));
        let missing = (Kind::Lease, "kube-system".into(), "other".into());
        assert_eq!(
            store
                .replace(&missing, Part::Object, lease("a", ""))
                .unwrap_err()
                .code,
            404
        );
    }

    #[test]
    fn status_writes_change_only_the_status_and_not_the_generation() {
        let mut store = Store::new(1);
        let key = policy_key();
        store.create(&key, policy("10.0.0.0/8")).unwrap();
        let mut body = policy("192.0.2.0/24");
        body["status"] = json!({"matchedPods": 3});
        let written = store
            .patch(&key, Part::Status, &PatchType::Merge, body)
            .unwrap();
        assert_eq!(written["spec"], policy("10.0.0.0/8")["spec"]);
        assert_eq!(written["status"], json!({"matchedPods": 3}));
        assert_eq!(written["metadata"]["generation"], json!(1));
        let version = store.resource_version();
        store
            .patch(
                &key,
                Part::Status,
                &PatchType::Merge,
                json!({"status": {"matchedPods": 3}}),
            )
            .unwrap();
        assert_eq!(store.resource_version(), version, "no change, no version");
    }

    /// Applying a status without a field it applied before removes that field; another
    /// manager's fields stay.
    #[test]
    fn apply_removes_what_the_manager_no_longer_names() {
        let mut store = Store::new(1);
        let key = policy_key();
        store.create(&key, policy("10.0.0.0/8")).unwrap();
        let (patch, body) =
            apply_status("agent", json!({"egressIP": "10.0.0.12", "matchedPods": 1}));
        store.patch(&key, Part::Status, &patch, body).unwrap();
        store
            .patch(
                &key,
                Part::Status,
                &PatchType::Merge,
                json!({"status": {"note": "user"}}),
            )
            .unwrap();
        let (patch, body) = apply_status("agent", json!({"matchedPods": 2}));
        let written = store.patch(&key, Part::Status, &patch, body).unwrap();
        assert_eq!(written["status"], json!({"matchedPods": 2, "note": "user"}));
        let entries = written["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(entries[0]["manager"], json!("agent"));
        assert_eq!(entries[0]["subresource"], json!("status"));
        assert_eq!(
            entries[0]["fieldsV1"],
            json!({"f:status": {"f:matchedPods": {}}})
        );
        let missing = (Kind::Policy, String::new(), "gone".to_string());
        let (patch, body) = apply_status("agent", json!({}));
        assert_eq!(
            store
                .patch(&missing, Part::Status, &patch, body)
                .unwrap_err()
                .code,
            404
        );
    }

    /// `kubectl apply --server-side`: creates, then replaces the spec it owns.
    #[test]
    fn apply_creates_and_updates_objects() {
        let mut store = Store::new(1);
        let key = policy_key();
        let patch = PatchType::Apply {
            field_manager: "kubectl".into(),
        };
        let mut body = policy("10.0.0.0/8");
        body["metadata"]["labels"] = json!({"team": "a"});
        let created = store.patch(&key, Part::Object, &patch, body).unwrap();
        assert_eq!(created["metadata"]["generation"], json!(1));
        assert_eq!(created["metadata"]["labels"], json!({"team": "a"}));
        let updated = store
            .patch(&key, Part::Object, &patch, policy("192.0.2.0/24"))
            .unwrap();
        assert_eq!(updated["spec"]["destinationCIDRs"], json!(["192.0.2.0/24"]));
        assert_eq!(updated["metadata"]["generation"], json!(2));
        assert!(updated["metadata"].get("labels").is_none(), "{updated}");
    }
}
