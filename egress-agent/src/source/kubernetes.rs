//! The Kubernetes API source (kube-rs reflectors) and the policy status writer.
//!
//! Four reflectors (`CiliumEgressGatewayPolicies`, Pods, Nodes, Namespaces) keep local stores.
//! Every change, and every (re)list, rebuilds the whole [`Inventory`] from those stores and
//! publishes it as a complete [`Snapshot`]: the reconcile loop syncs the maps by mark and
//! sweep against it, so a delete event lost before a relist cannot leave stale entries.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use egress_control::inventory::{Inventory, Namespace, Node, Pod, policy, service_cidr_ranges};
use futures_util::StreamExt as _;
use k8s_openapi::api::{core::v1 as k8s, networking::v1::ServiceCIDR};
use kube::{
    Api, Client, Config, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::{Refusal, Snapshot};
use crate::chain::Chain;

/// Plural resource name of `CiliumEgressGatewayPolicy` in the API paths.
pub const POLICY_PLURAL: &str = "ciliumegressgatewaypolicies";
/// Events arriving this close together become one snapshot: a burst (a rollout, a relist)
/// costs one reconcile, while a lone event waits at most this long.
const DEBOUNCE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("no in-cluster configuration (outside a cluster, pass --kubeconfig FILE)")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("creating the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client from `kubeconfig`, or from the pod's service account when `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubernetesError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_error = |source| KubernetesError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?
        }
        None => Config::incluster().map_err(KubernetesError::InCluster)?,
    };
    Client::try_from(config).map_err(KubernetesError::Client)
}

/// `CiliumEgressGatewayPolicy` as a dynamic resource: the spec is decoded by
/// [`policy::validate`]'s own types, never by a second definition.
pub fn policy_resource() -> ApiResource {
    let (group, version) = policy::API_VERSION
        .split_once('/')
        .expect("API_VERSION is group/version");
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, policy::KIND),
        POLICY_PLURAL,
    )
}

/// What the Kubernetes source gives the agent.
pub struct Source {
    /// Complete snapshots; the first one arrives after the initial list of all four kinds.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// The policies as last seen, status included (the status writer compares against it).
    pub policies: Store<DynamicObject>,
}

/// The four reflector stores.
#[derive(Clone)]
struct Stores {
    policies: Store<DynamicObject>,
    pods: Store<k8s::Pod>,
    nodes: Store<k8s::Node>,
    namespaces: Store<k8s::Namespace>,
    /// Empty where the API does not serve ServiceCIDRs (before 1.31, or switched off).
    service_cidrs: Store<ServiceCIDR>,
}

/// Starts the reflectors and the snapshot publisher.
pub fn source(client: Client) -> Source {
    let changed = Arc::new(Notify::new());
    let policy_resource = policy_resource();
    let policy_writer = Writer::new(policy_resource.clone());
    let policies = policy_writer.as_reader();
    let mut listed = Vec::new();
    let mut start = |name: &'static str, listed_flag: Arc<AtomicBool>| {
        listed.push(listed_flag.clone());
        Reflector {
            name,
            listed: listed_flag,
            changed: changed.clone(),
            spec_changes_only: name == POLICY_PLURAL,
            optional: false,
        }
    };
    start(POLICY_PLURAL, Arc::default()).spawn(
        Api::<DynamicObject>::all_with(client.clone(), &policy_resource),
        policy_writer,
    );
    let stores = Stores {
        policies: policies.clone(),
        pods: start("pods", Arc::default()).spawn_typed(Api::all(client.clone())),
        nodes: start("nodes", Arc::default()).spawn_typed(Api::all(client.clone())),
        namespaces: start("namespaces", Arc::default()).spawn_typed(Api::all(client.clone())),
        // Not waited for: where the API lacks it, --service-cidr is all there is.
        service_cidrs: Reflector {
            name: "servicecidrs",
            listed: Arc::default(),
            changed: changed.clone(),
            spec_changes_only: false,
            optional: true,
        }
        .spawn_typed(Api::all(client)),
    };

    let (sender, snapshots) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(async move {
        let mut announced = false;
        loop {
            changed.notified().await;
            tokio::time::sleep(DEBOUNCE).await;
            // Readiness means a first full sync: nothing is published before every kind listed.
            if !listed.iter().all(|flag| flag.load(Ordering::Acquire)) {
                continue;
            }
            let snapshot = build_snapshot(&stores);
            if !announced {
                info!(
                    nodes = snapshot.inventory.nodes.len(),
                    namespaces = snapshot.inventory.namespaces.len(),
                    pods = snapshot.inventory.pods.len(),
                    policies = snapshot.policy_generations.len(),
                    "initial list from the Kubernetes API complete"
                );
                announced = true;
            }
            if sender.send(Arc::new(snapshot)).is_err() {
                return;
            }
        }
    });
    Source {
        snapshots,
        policies,
    }
}

/// One watched kind: runs its reflector, flags its first complete list, signals changes.
struct Reflector {
    name: &'static str,
    listed: Arc<AtomicBool>,
    changed: Arc<Notify>,
    /// Signal only changes of `metadata.generation` (and deletions): for policies, whose
    /// status the agents themselves write, a status-only update changes nothing to program,
    /// and every write would otherwise make every agent rebuild.
    spec_changes_only: bool,
    /// A kind the API may not serve (ServiceCIDR): a 404 ends the watch with one message
    /// instead of retrying forever.
    optional: bool,
}

/// Whether an updated object is news to the inventory: always, unless only spec changes
/// count and its generation is the one last seen for it.
fn is_news(spec_changes_only: bool, last: Option<&Version>, now: &Version) -> bool {
    !spec_changes_only || now.generation.is_none() || last != Some(now)
}

/// What tells a spec change of an object from a status write: its generation, and the
/// annotations the agent reads (which do not bump the generation).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Version {
    generation: Option<i64>,
    annotations: std::collections::BTreeMap<String, String>,
}

impl Version {
    fn of(meta: &kube::api::ObjectMeta) -> Version {
        Version {
            generation: meta.generation,
            annotations: meta.annotations.clone().unwrap_or_default(),
        }
    }
}

/// Annotations the agent reads (the floating egress IP's): the others are dropped.
const OWN_ANNOTATIONS: &str = "egress-gateway.io/";

impl Reflector {
    fn spawn_typed<K>(self, api: Api<K>) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    {
        let writer = Writer::default();
        let store = writer.as_reader();
        self.spawn(api, writer);
        store
    }

    fn spawn<K>(self, api: Api<K>, writer: Writer<K>)
    where
        K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
        K::DynamicType: Clone + Eq + std::hash::Hash,
    {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            // Only names, labels and the fields the inventory reads matter; managed fields
            // and other annotations (last-applied-configuration) would only cost memory.
            .modify(|object| {
                object.managed_fields_mut().clear();
                object
                    .annotations_mut()
                    .retain(|key, _| key.starts_with(OWN_ANNOTATIONS));
            });
        let mut stream = reflector::reflector(writer, stream).boxed();
        tokio::spawn(async move {
            // Version last seen per object name (for `spec_changes_only`).
            let mut versions: std::collections::HashMap<String, Version> =
                std::collections::HashMap::new();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        debug!(resource = self.name, "list complete");
                        self.listed.store(true, Ordering::Release);
                        self.changed.notify_one();
                    }
                    Ok(watcher::Event::Apply(object)) => {
                        let version = Version::of(object.meta());
                        let news = is_news(
                            self.spec_changes_only,
                            versions.get(&object.name_any()),
                            &version,
                        );
                        versions.insert(object.name_any(), version);
                        if news {
                            self.changed.notify_one();
                        }
                    }
                    Ok(watcher::Event::Delete(object)) => {
                        versions.remove(&object.name_any());
                        self.changed.notify_one();
                    }
                    Ok(watcher::Event::InitApply(object)) => {
                        versions.insert(object.name_any(), Version::of(object.meta()));
                    }
                    // The store swaps in a relist's objects at InitDone, all at once.
                    Ok(watcher::Event::Init) => {}
                    Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                        if self.optional && status.code == 404 =>
                    {
                        info!(
                            resource = self.name,
                            "not served by this API server; Service CIDRs come from \
                             --service-cidr only"
                        );
                        return;
                    }
                    Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                        info!(
                            resource = self.name,
                            "resource version expired; listing again"
                        );
                    }
                    Err(error) => {
                        warn!(resource = self.name, error = %Chain(&error), "watch failed; retrying");
                    }
                }
            }
        });
    }
}

/// The inventory as the stores hold it now, with refusals for invalid policies.
fn build_snapshot(stores: &Stores) -> Snapshot {
    let mut inventory = Inventory::default();
    for node in stores.nodes.state() {
        inventory.upsert_node(Node::from(node.as_ref()));
    }
    for namespace in stores.namespaces.state() {
        inventory.upsert_namespace(Namespace::from(namespace.as_ref()));
    }
    for pod in stores.pods.state() {
        inventory.upsert_pod(Pod::from(pod.as_ref()));
    }
    for service_cidr in stores.service_cidrs.state() {
        inventory.service_cidrs.insert(
            service_cidr.name_any(),
            service_cidr_ranges(service_cidr.as_ref()),
        );
    }
    let mut refused = Vec::new();
    let mut warnings = Vec::new();
    let mut policy_generations = BTreeMap::new();
    for object in stores.policies.state() {
        let name = object.name_any();
        policy_generations.insert(name.clone(), object.metadata.generation.unwrap_or(0));
        match decode_policy(&object) {
            Ok(decoded) => {
                warnings.extend(decoded.unknown_fields.iter().map(|field| Refusal {
                    policy: Some(name.clone()),
                    message: format!(
                        "policy {name:?}: {field}: unknown field, ignored (misspelt?)"
                    ),
                }));
                match policy::validate(&decoded.raw) {
                    Ok(valid) => {
                        inventory.upsert_policy(valid);
                    }
                    Err(errors) => refused.extend(errors.into_iter().map(|error| Refusal {
                        policy: Some(name.clone()),
                        message: error.to_string(),
                    })),
                }
            }
            Err(error) => refused.push(Refusal {
                policy: Some(name.clone()),
                message: format!("policy {name:?}: cannot decode: {error}"),
            }),
        }
    }
    // Store order is arbitrary; refusals are compared between snapshots.
    refused.sort_by(|a, b| (&a.policy, &a.message).cmp(&(&b.policy, &b.message)));
    warnings.sort_by(|a, b| (&a.policy, &a.message).cmp(&(&b.policy, &b.message)));
    Snapshot {
        inventory,
        refused,
        warnings,
        policy_generations,
        published: Some(Instant::now()),
    }
}

fn decode_policy(object: &DynamicObject) -> Result<policy::Decoded, policy::DecodeError> {
    let value = serde_json::to_value(object).map_err(|error| policy::DecodeError {
        path: ".".into(),
        message: error.to_string(),
    })?;
    policy::decode(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(json: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json).unwrap()
    }

    /// A store holding `objects`, as a reflector leaves it after a list.
    fn store<K>(dyntype: K::DynamicType, objects: Vec<K>) -> Store<K>
    where
        K: Resource + Clone + Debug + Send + Sync + 'static,
        K::DynamicType: Clone + Eq + std::hash::Hash,
    {
        let mut writer = Writer::new(dyntype);
        writer.apply_watcher_event(&watcher::Event::Init);
        for object in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(object));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        writer.as_reader()
    }

    #[test]
    fn status_only_updates_of_policies_are_no_news() {
        let version = |generation: Option<i64>, floating: Option<&str>| Version {
            generation,
            annotations: floating
                .map(|value| {
                    std::collections::BTreeMap::from([(
                        "egress-gateway.io/floating-egress-ip".to_string(),
                        value.to_string(),
                    )])
                })
                .unwrap_or_default(),
        };
        let three = version(Some(3), None);
        assert!(
            !is_news(true, Some(&three), &three),
            "status write: same generation"
        );
        assert!(
            is_news(true, Some(&three), &version(Some(4), None)),
            "spec edit"
        );
        assert!(is_news(true, None, &version(Some(1), None)), "new object");
        assert!(
            is_news(true, Some(&three), &version(None, None)),
            "no generation: cannot tell"
        );
        assert!(
            is_news(true, Some(&three), &version(Some(3), Some("true"))),
            "the floating annotation added: no new generation, but news"
        );
        assert!(
            is_news(false, Some(&three), &three),
            "pods: every update counts"
        );
    }

    #[test]
    fn snapshot_holds_every_store_and_refuses_invalid_policies_by_name() {
        let node: k8s::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "w1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.11"}]},
        }))
        .unwrap();
        let pod: k8s::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "a"}},
            "spec": {"nodeName": "w1", "containers": []},
            "status": {"podIP": "10.244.1.10"},
        }))
        .unwrap();
        let namespace: k8s::Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "ns"}})).unwrap();
        let valid = dynamic(serde_json::json!({
            "metadata": {"name": "valid", "generation": 2},
            "spec": {
                "selectors": [{"podSelector": {}}],
                "destinationCIDRs": ["198.51.100.0/24"],
                "egressGateway": {"nodeSelector": {}},
            },
        }));
        let invalid = dynamic(serde_json::json!({
            "metadata": {"name": "invalid", "generation": 5},
            "spec": {"selectors": [{"podSelector": {}}], "egressGateway": {"nodeSelector": {}}},
        }));
        let stores = Stores {
            policies: store(policy_resource(), vec![valid, invalid]),
            pods: store((), vec![pod]),
            nodes: store((), vec![node]),
            namespaces: store((), vec![namespace]),
            service_cidrs: store(
                (),
                vec![
                    serde_json::from_value(serde_json::json!({
                        "metadata": {"name": "kubernetes"},
                        "spec": {"cidrs": ["10.96.0.0/12", "fd00:10:96::/112"]},
                    }))
                    .unwrap(),
                ],
            ),
        };
        let snapshot = build_snapshot(&stores);
        assert_eq!(
            snapshot.inventory.service_cidrs["kubernetes"],
            ["10.96.0.0/12".parse::<ipnet::Ipv4Net>().unwrap()]
        );
        let inventory = &snapshot.inventory;
        assert_eq!(
            inventory.nodes["w1"].internal_ip,
            Some("10.0.0.11".parse().unwrap())
        );
        assert_eq!(inventory.pods.len(), 1);
        assert!(inventory.namespaces.contains_key("ns"));
        assert_eq!(inventory.policies.keys().collect::<Vec<_>>(), ["valid"]);
        assert_eq!(
            snapshot.policy_generations,
            BTreeMap::from([("invalid".into(), 5), ("valid".into(), 2)])
        );
        assert_eq!(snapshot.refused.len(), 1, "{:?}", snapshot.refused);
        assert_eq!(snapshot.refused[0].policy.as_deref(), Some("invalid"));
        assert!(
            snapshot.refused[0]
                .message
                .contains("spec.destinationCIDRs"),
            "{:?}",
            snapshot.refused
        );
    }

    #[test]
    fn policy_resource_paths() {
        let resource = policy_resource();
        assert_eq!(resource.api_version, "cilium.io/v2");
        assert_eq!(resource.plural, POLICY_PLURAL);
    }

    #[test]
    fn dynamic_policies_decode_through_the_shared_validation() {
        let object = dynamic(serde_json::json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumEgressGatewayPolicy",
            "metadata": {"name": "p", "generation": 3},
            "spec": {
                "selectors": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                "destinationCIDRs": ["198.51.100.0/24"],
                "egressGateway": {"nodeSelector": {}, "egressIP": "10.0.0.11"},
            },
            "status": {"matchedPods": 1},
        }));
        let decoded = decode_policy(&object).unwrap();
        assert!(
            decoded.unknown_fields.is_empty(),
            "status is not a spec field"
        );
        let valid = policy::validate(&decoded.raw).unwrap();
        assert_eq!(valid.name, "p");

        // A misspelt field is named (the API server keeps unknown fields of Cilium's CRD,
        // which preserves them), and the policy still loads.
        let misspelt = dynamic(serde_json::json!({
            "metadata": {"name": "typo"},
            "spec": {
                "selectors": [{"podSelector": {}}],
                "destinationCIDRs": ["198.51.100.0/24"],
                "egressGateway": {"nodeSelector": {}, "egressIp": "10.0.0.11"},
            },
        }));
        assert_eq!(
            decode_policy(&misspelt).unwrap().unknown_fields,
            ["spec.egressGateway.egressIp"]
        );

        let bad = dynamic(serde_json::json!({
            "metadata": {"name": "bad"},
            "spec": {"selectors": "not a list"},
        }));
        let error = decode_policy(&bad).unwrap_err();
        assert_eq!(error.path, "spec.selectors", "{error}");
    }
}
