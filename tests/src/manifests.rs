//! The manifests folder the agents watch instead of a Kubernetes API server.
//!
//! One YAML file per object, shaped like `kubectl get -o yaml` prints it. Files are written to a
//! staging folder and renamed into place, so an agent never reads half a file.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};

pub type Labels = BTreeMap<String, String>;

/// Builds a label map from `[("app", "my-app")]`.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

/// What the manifests need to know about a node.
pub struct NodeObject<'a> {
    pub name: &'a str,
    pub labels: &'a Labels,
    pub internal_ip: Ipv4Addr,
    /// `None`: no `spec.podCIDR(s)`, as CNIs with their own IPAM leave it.
    pub pod_cidr: Option<&'a str>,
}

/// What the manifests need to know about a pod.
pub struct PodObject<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a Labels,
    pub node_name: &'a str,
    pub host_ip: Ipv4Addr,
    pub pod_ip: Ipv4Addr,
}

pub struct Manifests {
    dir: PathBuf,
    staging: PathBuf,
    resource_version: AtomicU64,
    creation_timestamp: String,
}

impl Manifests {
    /// Creates `<root>/manifests` (watched by the agents) and `<root>/staging`, both 0700.
    pub fn create(root: &Path) -> Result<Manifests> {
        let dir = root.join("manifests");
        let staging = root.join("staging");
        for path in [&dir, &staging] {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(Manifests {
            dir,
            staging,
            resource_version: AtomicU64::new(1000),
            creation_timestamp: rfc3339_now(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn write_node(&self, node: &NodeObject) -> Result<()> {
        let object = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": self.metadata(None, node.name, node.labels),
            "spec": match node.pod_cidr {
                Some(cidr) => json!({ "podCIDR": cidr, "podCIDRs": [cidr] }),
                None => json!({}),
            },
            "status": {
                "addresses": [
                    { "address": node.internal_ip.to_string(), "type": "InternalIP" },
                    { "address": node.name, "type": "Hostname" },
                ],
                "conditions": [{
                    "lastHeartbeatTime": self.creation_timestamp,
                    "lastTransitionTime": self.creation_timestamp,
                    "message": "kubelet is posting ready status",
                    "reason": "KubeletReady",
                    "status": "True",
                    "type": "Ready",
                }],
            },
        });
        self.write(&format!("node-{}.yaml", node.name), &object)
    }

    pub fn delete_node(&self, name: &str) -> Result<()> {
        self.remove(&format!("node-{name}.yaml"))
    }

    pub fn write_namespace(&self, name: &str, labels: &Labels) -> Result<()> {
        let mut labels = labels.clone();
        labels.insert("kubernetes.io/metadata.name".into(), name.into());
        let object = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": self.metadata(None, name, &labels),
            "spec": { "finalizers": ["kubernetes"] },
            "status": { "phase": "Active" },
        });
        self.write(&format!("namespace-{name}.yaml"), &object)
    }

    pub fn write_pod(&self, pod: &PodObject) -> Result<()> {
        let object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": self.metadata(Some(pod.namespace), pod.name, pod.labels),
            "spec": {
                "containers": [{
                    "command": ["sleep", "3600"],
                    "image": "curlimages/curl",
                    "imagePullPolicy": "Always",
                    "name": pod.name,
                }],
                "nodeName": pod.node_name,
                "restartPolicy": "Always",
                "schedulerName": "default-scheduler",
            },
            "status": {
                "hostIP": pod.host_ip.to_string(),
                "hostIPs": [{ "ip": pod.host_ip.to_string() }],
                "phase": "Running",
                "podIP": pod.pod_ip.to_string(),
                "podIPs": [{ "ip": pod.pod_ip.to_string() }],
                "startTime": self.creation_timestamp,
            },
        });
        self.write(&pod_file(pod.namespace, pod.name), &object)
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<()> {
        self.remove(&pod_file(namespace, name))
    }

    /// Writes a policy file verbatim (any number of YAML documents) as `policy-<name>.yaml`.
    pub fn write_policy(&self, name: &str, yaml: &str) -> Result<()> {
        self.write_raw(&policy_file(name), yaml)
    }

    pub fn delete_policy(&self, name: &str) -> Result<()> {
        self.remove(&policy_file(name))
    }

    fn metadata(&self, namespace: Option<&str>, name: &str, labels: &Labels) -> Value {
        let mut metadata = json!({
            "creationTimestamp": self.creation_timestamp,
            "labels": labels,
            "name": name,
            "resourceVersion": self.resource_version.fetch_add(1, Ordering::Relaxed).to_string(),
            "uid": pseudo_uid(namespace.unwrap_or(""), name),
        });
        if let Some(namespace) = namespace {
            metadata["namespace"] = json!(namespace);
        }
        metadata
    }

    fn write(&self, file_name: &str, object: &Value) -> Result<()> {
        let yaml = serde_yaml::to_string(object)?;
        self.write_raw(file_name, &yaml)
    }

    fn write_raw(&self, file_name: &str, content: &str) -> Result<()> {
        let staged = self.staging.join(file_name);
        fs::write(&staged, content).with_context(|| format!("writing {}", staged.display()))?;
        let target = self.dir.join(file_name);
        fs::rename(&staged, &target).with_context(|| format!("renaming to {}", target.display()))
    }

    fn remove(&self, file_name: &str) -> Result<()> {
        let path = self.dir.join(file_name);
        fs::remove_file(&path).map_err(|error| anyhow!("removing {}: {error}", path.display()))
    }
}

fn pod_file(namespace: &str, name: &str) -> String {
    format!("pod-{namespace}-{name}.yaml")
}

fn policy_file(name: &str) -> String {
    format!("policy-{name}.yaml")
}

/// A stable UUID-shaped string, so objects look like the API server's without a uuid crate.
fn pseudo_uid(namespace: &str, name: &str) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    (namespace, name, std::process::id()).hash(&mut hasher);
    let a = hasher.finish();
    name.hash(&mut hasher);
    let b = hasher.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// Current UTC time as `2024-05-01T12:00:00Z`, the format of `creationTimestamp`.
pub(crate) fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days.cast_signed() + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_has_kubernetes_shape() {
        let stamp = rfc3339_now();
        assert_eq!(stamp.len(), 20, "{stamp}");
        assert!(
            stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{stamp}"
        );
    }

    #[test]
    fn pod_manifest_looks_like_kubectl_output() {
        let root =
            std::env::temp_dir().join(format!("egress-manifests-test-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let manifests = Manifests::create(&root).unwrap();
        let pod_labels = labels(&[("app", "my-app")]);
        manifests
            .write_pod(&PodObject {
                namespace: "default",
                name: "my-app",
                labels: &pod_labels,
                node_name: "k8s-worker-1",
                host_ip: Ipv4Addr::new(10, 0, 0, 11),
                pod_ip: Ipv4Addr::new(10, 244, 1, 10),
            })
            .unwrap();
        let text = fs::read_to_string(manifests.dir().join("pod-default-my-app.yaml")).unwrap();
        let parsed: Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(parsed["kind"], "Pod");
        assert_eq!(parsed["metadata"]["namespace"], "default");
        assert_eq!(parsed["metadata"]["labels"]["app"], "my-app");
        assert_eq!(parsed["spec"]["nodeName"], "k8s-worker-1");
        assert_eq!(parsed["status"]["podIP"], "10.244.1.10");
        assert_eq!(parsed["status"]["podIPs"][0]["ip"], "10.244.1.10");
        assert_eq!(parsed["status"]["phase"], "Running");
        fs::remove_dir_all(&root).unwrap();
    }
}
