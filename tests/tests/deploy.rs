//! The manifests under `deploy/`: every object parses into its k8s-openapi type with no field
//! left over, and the pieces fit together — the pod mounts what the agent opens, the RBAC
//! covers exactly what the agent watches and patches, the CRD accepts the example
//! policies. No cluster needed.
#![allow(
    unused_crate_dependencies,
    reason = "an integration test links every dependency of its package and uses a few"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// What the agent reads and writes through the API server (keep in sync with
/// egress-agent/src/source/kubernetes.rs and status/): (namespace, or `None` for
/// cluster-wide, API group, resource, verbs). The Lease lives in the agents' own namespace;
/// Events of cluster-scoped policies in `default`.
const AGENT_API_ACCESS: &[(Option<&str>, &str, &str, &[&str])] = &[
    (None, "", "pods", &["list", "watch"]),
    (None, "", "nodes", &["list", "watch"]),
    (None, "", "namespaces", &["list", "watch"]),
    (
        None,
        "networking.k8s.io",
        "servicecidrs",
        &["list", "watch"],
    ),
    (
        None,
        "cilium.io",
        "ciliumegressgatewaypolicies",
        &["list", "watch"],
    ),
    (
        None,
        "cilium.io",
        "ciliumegressgatewaypolicies/status",
        &["patch"],
    ),
    (
        Some("kube-system"),
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
    ),
    (
        Some("default"),
        "events.k8s.io",
        "events",
        &["create", "patch"],
    ),
];

/// The agent container's capabilities: programs and maps, the verifier, links and the tunnel.
const AGENT_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"];

/// The agent's metrics port, where the probes look.
const METRICS_PORT: i32 = 9969;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of every manifest in deploy/ (the kustomization aside), by file.
fn documents() -> BTreeMap<String, Vec<Value>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(deploy_dir()).expect("reading deploy/") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if Path::new(&name).extension().is_none_or(|ext| ext != "yaml")
            || name == "kustomization.yaml"
        {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        files.insert(name.clone(), yaml_documents(&text, &name));
    }
    files
}

/// The non-empty documents of a multi-document YAML text, as JSON.
fn yaml_documents(text: &str, file: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            let yaml: serde_yaml::Value =
                serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
            serde_json::to_value(yaml).unwrap()
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

/// Parses `doc` as `T` and checks nothing was dropped: a misspelt field fails here instead of
/// being ignored by the API server.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let name = format!("{} {}", kind(doc), doc["metadata"]["name"]);
    let object: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
    let round_trip = serde_json::to_value(&object).unwrap();
    let mut dropped = Vec::new();
    differences(doc, &round_trip, "", &mut dropped);
    assert!(
        dropped.is_empty(),
        "{name}: not part of the API (the server would drop or refuse them): {dropped:?}"
    );
    object
}

/// Paths where `written` and `parsed` differ; numbers compare by value (0 == 0.0).
fn differences(written: &Value, parsed: &Value, path: &str, out: &mut Vec<String>) {
    match (written, parsed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let path = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => differences(value, other, &path, out),
                    None => out.push(path),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        _ => out.push(path.to_owned()),
    }
}

struct Manifests {
    crds: Vec<CustomResourceDefinition>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
}

fn manifests() -> Manifests {
    let mut manifests = Manifests {
        crds: Vec::new(),
        service_accounts: Vec::new(),
        cluster_roles: Vec::new(),
        bindings: Vec::new(),
        roles: Vec::new(),
        role_bindings: Vec::new(),
        daemon_sets: Vec::new(),
        services: Vec::new(),
    };
    for (file, docs) in documents() {
        for doc in &docs {
            match kind(doc) {
                "CustomResourceDefinition" => manifests.crds.push(typed(doc)),
                "ServiceAccount" => manifests.service_accounts.push(typed(doc)),
                "ClusterRole" => manifests.cluster_roles.push(typed(doc)),
                "ClusterRoleBinding" => manifests.bindings.push(typed(doc)),
                "Role" => manifests.roles.push(typed(doc)),
                "RoleBinding" => manifests.role_bindings.push(typed(doc)),
                "DaemonSet" => manifests.daemon_sets.push(typed(doc)),
                "Service" => manifests.services.push(typed(doc)),
                other => panic!("{file}: unexpected kind {other:?}"),
            }
        }
    }
    manifests
}

fn daemon_set(manifests: &Manifests) -> &DaemonSet {
    match manifests.daemon_sets.as_slice() {
        [one] => one,
        other => panic!("expected one DaemonSet, found {}", other.len()),
    }
}

fn agent_container(daemon_set: &DaemonSet) -> &Container {
    let pod = daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let containers: Vec<&Container> = pod
        .containers
        .iter()
        .filter(|c| {
            c.args
                .as_ref()
                .is_some_and(|args| args.first().is_some_and(|a| a == "run"))
        })
        .collect();
    match containers.as_slice() {
        [one] => one,
        other => panic!(
            "expected one container running the agent, found {}",
            other.len()
        ),
    }
}

/// The value following `flag` in the container's args (`--flag value` form).
fn flag<'a>(container: &'a Container, flag: &str) -> Option<&'a str> {
    let args = container.args.as_deref().unwrap_or_default();
    args.iter()
        .position(|arg| arg == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The agent's `--bpffs` default, read from its source so a change there fails this test.
fn agent_default_bpffs() -> String {
    let source = include_str!("../../egress-agent/src/datapath/pins.rs");
    let marker = "pub const DEFAULT_BPFFS: &str = \"";
    let start = source.find(marker).expect("DEFAULT_BPFFS in pins.rs") + marker.len();
    source[start..].split('"').next().unwrap().to_owned()
}

#[test]
fn kustomization_lists_every_manifest() {
    let text = fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    let kustomization: Value = serde_yaml::from_str(&text).unwrap();
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = documents().into_keys().collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources vs files in deploy/"
    );

    // The image the kustomization retags is the one the pod runs.
    let image = kustomization["images"][0]["name"]
        .as_str()
        .expect("images[0].name");
    let manifests = manifests();
    let agent = agent_container(daemon_set(&manifests));
    let agent_image = agent.image.as_deref().unwrap();
    assert_eq!(agent_image.split(':').next(), Some(image), "{agent_image}");
}

#[test]
fn pod_mounts_the_hosts_bpffs_where_the_agent_pins() {
    let manifests = manifests();
    let ds = daemon_set(&manifests);
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let agent = agent_container(ds);

    let default = agent_default_bpffs();
    let bpffs = flag(agent, "--bpffs").unwrap_or(&default);
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(bpffs).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("no volume mount holds the agent's --bpffs {bpffs}"));
    assert_eq!(mount.mount_path, "/sys/fs/bpf");
    assert_eq!(mount.read_only, None, "the agent pins maps and links there");
    assert_eq!(
        mount.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "the agent sees the bpffs the init container mounts"
    );
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the bpffs volume");
    let host_path = volume.host_path.as_ref().expect("a hostPath volume");
    assert_eq!(
        host_path.path, "/sys/fs/bpf",
        "pins must live on the host to outlive the pod"
    );

    // Whoever mounts a bpffs for the host shares the volume with Bidirectional propagation,
    // which the API server allows only in privileged containers.
    let init = pod.init_containers.iter().flatten().collect::<Vec<_>>();
    for container in init.iter().copied().chain(pod.containers.iter()) {
        for mount in container.volume_mounts.iter().flatten() {
            if mount.mount_propagation.as_deref() == Some("Bidirectional") {
                let privileged = container
                    .security_context
                    .as_ref()
                    .and_then(|s| s.privileged)
                    .unwrap_or(false);
                assert!(
                    privileged,
                    "{}: Bidirectional needs privileged",
                    container.name
                );
                assert!(
                    init.iter().any(|c| c.name == container.name),
                    "only a run-to-completion init container may be privileged"
                );
            }
        }
    }
    let mounts_bpffs = init.iter().any(|c| {
        c.volume_mounts.iter().flatten().any(|m| {
            m.name == mount.name && m.mount_propagation.as_deref() == Some("Bidirectional")
        }) && c
            .command
            .iter()
            .flatten()
            .any(|arg| arg.contains("mount -t bpf"))
    });
    assert!(
        mounts_bpffs,
        "an init container makes sure the host has a bpffs"
    );
}

#[test]
fn agent_runs_on_every_node_in_the_host_network() {
    let manifests = manifests();
    let ds = daemon_set(&manifests);
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let agent = agent_container(ds);

    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "one toleration matching every taint"
    );

    let args = agent.args.as_deref().unwrap();
    assert!(args.iter().any(|a| a == "--kubernetes"), "{args:?}");
    let address = flag(agent, "--metrics-address").expect("--metrics-address");
    assert_eq!(
        address,
        format!("$(NODE_IP):{METRICS_PORT}"),
        "probes and scrapers reach the agent on the node's IP, not on every address"
    );
    let node_ip = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_IP")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(node_ip, Some("status.hostIP"));
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref());
    assert_eq!(field.map(|f| f.field_path.as_str()), Some("spec.nodeName"));

    let probe_path = |probe: Option<&k8s_openapi::api::core::v1::Probe>| {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("an httpGet probe");
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(METRICS_PORT)
        );
        assert_eq!(
            get.host, None,
            "the pod IP, which is the node IP on the host network"
        );
        get.path.clone().unwrap_or_default()
    };
    assert_eq!(probe_path(agent.readiness_probe.as_ref()), "/readyz");
    assert_eq!(probe_path(agent.liveness_probe.as_ref()), "/healthz");
    let requests = agent.resources.as_ref().and_then(|r| r.requests.as_ref());
    assert!(
        requests.is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory")),
        "resource requests"
    );
}

/// What makes the DaemonSet run on common distributions and roll out sanely: Linux nodes
/// only, AppArmor unconfined (containerd's default profile denies writes under /sys/fs/, so
/// pinning fails on Ubuntu and Debian), a percentage of nodes at a time.
#[test]
fn daemon_set_runs_on_common_distributions() {
    let manifests = manifests();
    let ds = daemon_set(&manifests);
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|s| s.get("kubernetes.io/os"))
            .map(String::as_str),
        Some("linux")
    );
    let apparmor = pod
        .security_context
        .as_ref()
        .and_then(|s| s.app_armor_profile.as_ref());
    assert_eq!(apparmor.map(|p| p.type_.as_str()), Some("Unconfined"));
    let max_unavailable = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.clone());
    assert!(
        matches!(
            max_unavailable,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(ref p)) if p.ends_with('%')
        ),
        "{max_unavailable:?}"
    );
    assert_ne!(METRICS_PORT, 9964, "cilium-envoy's metrics port");
}

/// The headless Service selects the agents' pods on their metrics port, and the optional
/// ServiceMonitor selects the Service.
#[test]
fn metrics_service_and_service_monitor_find_the_agents() {
    let manifests = manifests();
    let ds = daemon_set(&manifests);
    let pod_labels = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let service = &manifests.services[0];
    let spec = service.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert!(
        spec.selector
            .iter()
            .flatten()
            .all(|(k, v)| pod_labels.get(k) == Some(v)),
        "{:?} selects the agents",
        spec.selector
    );
    let port = &spec.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.port),
        (Some("metrics"), METRICS_PORT)
    );
    let agent = agent_container(ds);
    assert!(
        agent
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("metrics") && p.container_port == METRICS_PORT),
        "the pod names the port the Service targets"
    );

    let text = fs::read_to_string(deploy_dir().join("monitoring/servicemonitor.yaml")).unwrap();
    let monitor = &yaml_documents(&text, "servicemonitor.yaml")[0];
    assert_eq!(monitor["kind"], "ServiceMonitor");
    let service_labels = service.metadata.labels.clone().unwrap();
    let wanted = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    assert!(
        wanted
            .iter()
            .all(|(k, v)| service_labels.get(k).map(String::as_str) == v.as_str())
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
}

#[test]
fn agent_has_exactly_the_capabilities_it_needs() {
    let manifests = manifests();
    let agent = agent_container(daemon_set(&manifests));
    let security = agent.security_context.as_ref().expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let wanted: BTreeSet<&str> = AGENT_CAPABILITIES.iter().copied().collect();
    assert_eq!(added, wanted);
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
}

#[test]
fn service_account_is_bound_to_a_role_covering_exactly_the_agents_access() {
    let manifests = manifests();
    let ds = daemon_set(&manifests);
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let namespace = ds
        .metadata
        .namespace
        .as_deref()
        .expect("DaemonSet namespace");
    let account = pod
        .service_account_name
        .as_deref()
        .expect("serviceAccountName");
    assert!(
        manifests.service_accounts.iter().any(|sa| {
            sa.metadata.name.as_deref() == Some(account)
                && sa.metadata.namespace.as_deref() == Some(namespace)
        }),
        "ServiceAccount {namespace}/{account} is in deploy/"
    );

    let is_agent = |subjects: Option<&Vec<Subject>>| {
        subjects.into_iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_deref() == Some(namespace)
        })
    };
    let mut granted = BTreeSet::new();
    let mut grant = |scope: Option<&str>, rules: Option<&Vec<PolicyRule>>| {
        for rule in rules.into_iter().flatten() {
            assert!(rule.non_resource_urls.is_none() && rule.resource_names.is_none());
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        granted.insert((
                            scope.map(str::to_string),
                            group.clone(),
                            resource.clone(),
                            verb.clone(),
                        ));
                    }
                }
            }
        }
    };
    for binding in manifests
        .bindings
        .iter()
        .filter(|b| is_agent(b.subjects.as_ref()))
    {
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        let name = binding.role_ref.name.as_str();
        let role = manifests
            .cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("ClusterRole {name} is in deploy/"));
        grant(None, role.rules.as_ref());
    }
    for binding in manifests
        .role_bindings
        .iter()
        .filter(|b| is_agent(b.subjects.as_ref()))
    {
        assert_eq!(binding.role_ref.kind, "Role", "namespaced grants only");
        let scope = binding.metadata.namespace.as_deref();
        let name = binding.role_ref.name.as_str();
        let role = manifests
            .roles
            .iter()
            .find(|r| {
                r.metadata.name.as_deref() == Some(name) && r.metadata.namespace.as_deref() == scope
            })
            .unwrap_or_else(|| panic!("Role {scope:?}/{name} is in deploy/"));
        grant(scope, role.rules.as_ref());
    }
    let needed: BTreeSet<(Option<String>, String, String, String)> = AGENT_API_ACCESS
        .iter()
        .flat_map(|(scope, group, resource, verbs)| {
            verbs.iter().map(|verb| {
                (
                    scope.map(str::to_string),
                    group.to_string(),
                    resource.to_string(),
                    verb.to_string(),
                )
            })
        })
        .collect();
    assert_eq!(
        granted, needed,
        "the agent's roles grant what it uses and nothing more (no wildcards), where it uses it"
    );
    // The Lease's namespace is the agents' own, passed down as POD_NAMESPACE.
    let env = agent_container(ds).env.clone().unwrap_or_default();
    let pod_namespace = env
        .iter()
        .find(|var| var.name == "POD_NAMESPACE")
        .and_then(|var| var.value_from.as_ref())
        .and_then(|from| from.field_ref.as_ref())
        .map(|field| field.field_path.as_str());
    assert_eq!(pod_namespace, Some("metadata.namespace"));
}

// ----- the CRD -----

fn crd() -> CustomResourceDefinition {
    let manifests = manifests();

    manifests
        .crds
        .into_iter()
        .find(|crd| crd.metadata.name.as_deref() == Some("ciliumegressgatewaypolicies.cilium.io"))
        .expect("the CiliumEgressGatewayPolicy CRD")
}

fn crd_schema() -> JSONSchemaProps {
    let crd = crd();
    let version = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == "v2")
        .expect("version v2");
    version
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .clone()
        .unwrap()
}

/// A structural check of `value` against `schema`: the subset of `OpenAPI` v3 the CRD uses.
/// Unknown fields are errors unless the schema preserves them (as `kubectl apply` with
/// strict field validation reports them). Any keyword this checker does not implement
/// fails loudly rather than being skipped.
fn validate(schema: &JSONSchemaProps, value: &Value, path: &str, errors: &mut Vec<String>) {
    for (unsupported, used) in [
        ("pattern", schema.pattern.is_some()),
        ("oneOf", schema.one_of.is_some()),
        ("anyOf", schema.any_of.is_some()),
        ("allOf", schema.all_of.is_some()),
        (
            "x-kubernetes-validations",
            schema.x_kubernetes_validations.is_some(),
        ),
        (
            "x-kubernetes-int-or-string",
            schema.x_kubernetes_int_or_string.is_some(),
        ),
    ] {
        assert!(
            !used,
            "{path}: the test's checker does not implement {unsupported}"
        );
    }
    let type_ok = match schema.type_.as_deref() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        None => true,
        Some(other) => panic!("{path}: unknown type {other}"),
    };
    if !type_ok {
        errors.push(format!("{path}: expected {:?}, got {value}", schema.type_));
        return;
    }
    if let Some(allowed) = &schema.enum_
        && !allowed.iter().any(|a| a.0 == *value)
    {
        errors.push(format!("{path}: {value} is not one of the allowed values"));
    }
    if let Some(minimum) = schema.minimum
        && value.as_f64().is_some_and(|v| v < minimum)
    {
        errors.push(format!("{path}: below {minimum}"));
    }
    match value {
        Value::String(s) => {
            let length = i64::try_from(s.chars().count()).unwrap();
            if schema.max_length.is_some_and(|max| length > max)
                || schema.min_length.is_some_and(|min| length < min)
            {
                errors.push(format!("{path}: length {length} out of bounds"));
            }
        }
        Value::Array(items) => {
            let count = i64::try_from(items.len()).unwrap();
            if schema.max_items.is_some_and(|max| count > max)
                || schema.min_items.is_some_and(|min| count < min)
            {
                errors.push(format!("{path}: {count} items out of bounds"));
            }
            match &schema.items {
                Some(JSONSchemaPropsOrArray::Schema(item)) => {
                    for (i, value) in items.iter().enumerate() {
                        validate(item, value, &format!("{path}[{i}]"), errors);
                    }
                }
                Some(JSONSchemaPropsOrArray::Schemas(_)) => panic!("{path}: tuple items"),
                None => assert!(
                    schema.x_kubernetes_preserve_unknown_fields == Some(true),
                    "{path}: an array without items is not structural"
                ),
            }
        }
        Value::Object(fields) => {
            for required in schema.required.iter().flatten() {
                if !fields.contains_key(required) {
                    errors.push(format!("{path}.{required}: required"));
                }
            }
            let properties = schema.properties.clone().unwrap_or_default();
            for (name, value) in fields {
                let field_path = format!("{path}.{name}");
                if let Some(property) = properties.get(name) {
                    validate(property, value, &field_path, errors);
                } else if let Some(JSONSchemaPropsOrBool::Schema(additional)) =
                    &schema.additional_properties
                {
                    validate(additional, value, &field_path, errors);
                } else if schema.x_kubernetes_preserve_unknown_fields != Some(true)
                    && !matches!(
                        schema.additional_properties,
                        Some(JSONSchemaPropsOrBool::Bool(true))
                    )
                    && !(schema.properties.is_none() && path.ends_with(".metadata"))
                {
                    errors.push(format!("{field_path}: unknown field"));
                }
            }
        }
        _ => {}
    }
}

fn validation_errors(object: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    validate(&crd_schema(), object, "", &mut errors);
    errors
}

/// Every document of the valid example policies (the files directly in `examples/`).
fn valid_example_policies() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut policies = Vec::new();
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "yaml") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        let file = path.display().to_string();
        for doc in yaml_documents(&text, &file) {
            policies.push((file.clone(), doc));
        }
    }
    assert!(!policies.is_empty(), "no policies in {}", dir.display());
    policies
}

#[test]
fn crd_is_cluster_scoped_cilium_v2_with_a_status_subresource() {
    let crd = crd();
    assert_eq!(crd.spec.group, "cilium.io");
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.kind, "CiliumEgressGatewayPolicy");
    assert_eq!(crd.spec.names.plural, "ciliumegressgatewaypolicies");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["cegp".to_owned()][..])
    );
    let version = &crd.spec.versions[0];
    assert!(version.served && version.storage);
    assert!(
        version
            .subresources
            .as_ref()
            .is_some_and(|s| s.status.is_some()),
        "status subresource"
    );
}

/// `kubectl get cegp` shows whether each policy is served, why not, and where it egresses.
#[test]
fn crd_printer_columns_show_readiness_reason_gateway_and_egress_ip() {
    let crd = crd();
    let version = &crd.spec.versions[0];
    let columns: Vec<(&str, &str)> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|column| (column.name.as_str(), column.json_path.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("Ready", r#".status.conditions[?(@.type=="Ready")].status"#),
            ("Reason", r#".status.conditions[?(@.type=="Ready")].reason"#),
            ("Gateway", ".status.gatewayNodes"),
            ("Egress IP", ".status.egressIP"),
            ("Pods", ".status.matchedPods"),
            ("Age", ".metadata.creationTimestamp"),
        ]
    );
}

#[test]
fn crd_accepts_every_valid_example_policy() {
    for (file, policy) in valid_example_policies() {
        let errors = validation_errors(&policy);
        assert!(
            errors.is_empty(),
            "{file} ({}): {errors:#?}",
            policy["metadata"]["name"]
        );
    }
}

#[test]
fn crd_accepts_fields_of_newer_cilium_releases() {
    let policy = serde_json::json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumEgressGatewayPolicy",
        "metadata": {"name": "future"},
        "spec": {
            "selectors": [{"podSelector": {}, "someFutureSelector": {"a": 1}}],
            "destinationCIDRs": ["0.0.0.0/0", "2001:db8::/32"],
            "egressGateway": {"nodeSelector": {}, "egressIPv6": "2001:db8::1"},
            "someFutureField": true
        }
    });
    assert_eq!(validation_errors(&policy), Vec::<String>::new());
}

#[test]
fn crd_rejects_malformed_policies() {
    let base = serde_json::json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumEgressGatewayPolicy",
        "metadata": {"name": "p"},
        "spec": {
            "selectors": [{"podSelector": {"matchLabels": {"app": "a"}}}],
            "destinationCIDRs": ["0.0.0.0/0"],
            "egressGateway": {"nodeSelector": {"matchLabels": {"gw": "true"}}}
        }
    });
    assert_eq!(
        validation_errors(&base),
        Vec::<String>::new(),
        "the base policy is valid"
    );

    let with = |pointer: &str, value: Value| {
        let mut policy = base.clone();
        *policy.pointer_mut(pointer).unwrap() = value;
        validation_errors(&policy)
    };
    let without = |field: &str| {
        let mut policy = base.clone();
        policy["spec"].as_object_mut().unwrap().remove(field);
        validation_errors(&policy)
    };
    assert_eq!(without("selectors"), [".spec.selectors: required"]);
    assert_eq!(
        without("destinationCIDRs"),
        [".spec.destinationCIDRs: required"]
    );
    assert!(!with("/spec/destinationCIDRs", serde_json::json!("0.0.0.0/0")).is_empty());
    assert!(
        !with(
            "/spec/selectors/0/podSelector",
            serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Sometimes"}]})
        )
        .is_empty()
    );
    assert_eq!(
        with(
            "/spec/egressGateway",
            serde_json::json!({"interface": "eth1"})
        ),
        Vec::<String>::new(),
        "nodeSelector is optional, as in Cilium's CRD (the agent refuses it, naming the field)"
    );
    let gateways: Vec<Value> = (0..65)
        .map(|i| serde_json::json!({"nodeSelector": {"matchLabels": {"n": i.to_string()}}}))
        .collect();
    let mut many = base.clone();
    many["spec"]["egressGateways"] = Value::Array(gateways);
    assert!(
        !validation_errors(&many).is_empty(),
        "at most 64 egressGateways"
    );
    many["spec"]["egressGateways"]
        .as_array_mut()
        .unwrap()
        .truncate(64);
    assert_eq!(validation_errors(&many), Vec::<String>::new());
}

#[test]
fn crd_status_schema_holds_what_the_agent_reports() {
    let mut policy = valid_example_policies().remove(0).1;
    policy["metadata"]["generation"] = serde_json::json!(3);
    policy["status"] = serde_json::json!({
        "observedGeneration": 3,
        "gatewayNodes": ["k8s-worker-2"],
        "candidateNodes": [["k8s-worker-2", "k8s-worker-3"]],
        "egressIP": "10.0.0.12",
        "matchedPods": 2,
        "conditions": [{
            "type": "Ready",
            "status": "False",
            "reason": "NoGatewayNode",
            "message": "no node with an InternalIP matches the gateway nodeSelector",
            "lastTransitionTime": "2025-01-01T00:00:00Z",
            "observedGeneration": 3
        }]
    });
    assert_eq!(validation_errors(&policy), Vec::<String>::new());
    policy["status"]["conditions"][0]["status"] = serde_json::json!("Maybe");
    assert!(
        !validation_errors(&policy).is_empty(),
        "condition status is True, False or Unknown"
    );
}

/// The image builds with the nightly README names as tested, which is the one xtask's setup
/// recommends when the installed nightly does not fit bpf-linker.
#[test]
fn containerfile_readme_and_setup_name_the_same_nightly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let containerfile = fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    let nightly = containerfile
        .lines()
        .find_map(|line| line.strip_prefix("ARG NIGHTLY="))
        .expect("deploy/Containerfile has an `ARG NIGHTLY=` line")
        .trim();
    assert!(nightly.starts_with("nightly-"), "{nightly}");
    let readme = fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("Tested with **{nightly}**")),
        "README does not say it was tested with {nightly}"
    );
    let setup = fs::read_to_string(root.join("xtask/src/setup.rs")).unwrap();
    assert!(
        setup.contains(&format!("TESTED_NIGHTLY: &str = \"{nightly}\"")),
        "xtask/src/setup.rs does not recommend {nightly}"
    );
}
