//! Parses manifest text, as `kubectl get -o yaml` prints it, into an [`Inventory`]: Nodes,
//! Namespaces, Pods, ServiceCIDRs and CiliumEgressGatewayPolicies.
//!
//! Pure: it reads only the text it is handed; the agent's manifests source walks the folder
//! and feeds each file to a [`Loader`]. Errors are collected, never fatal: one bad object does
//! not stop the others from loading. Bad input is refused with an error naming the file and
//! object: documents without a kind, kinds that look like a typo of one we read, wrong
//! apiVersions, duplicate names and invalid policies. Other kinds (Deployments, Services, ...)
//! are ignored, so a whole `kubectl get -o yaml` dump can be dropped in.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1 as k8s;
use serde_yaml::Value;

use crate::inventory::{
    self, Inventory, Namespace, Node, Pod,
    policy::{self, PolicyError, RawPolicy},
};

/// Larger files are refused (by the reader, from their size): manifests that big are a
/// mistake, and reading them would stall the agent.
pub const MAX_FILE_SIZE: u64 = 4 << 20;

#[derive(Debug, Default)]
pub struct LoadResult {
    pub inventory: Inventory,
    pub errors: Vec<ManifestError>,
    /// Loaded, but worth a look: unknown (misspelt?) policy fields.
    pub warnings: Vec<ManifestError>,
}

impl LoadResult {
    /// Objects refused, each counted once however many of its fields are wrong.
    pub fn refused_objects(&self) -> usize {
        let mut objects: Vec<(&Path, &ObjectRef)> = self
            .errors
            .iter()
            .map(|error| (error.file.as_path(), &error.object))
            .collect();
        objects.dedup();
        objects.len()
    }
}

/// One problem in one file, with the object it concerns when known.
#[derive(Debug)]
pub struct ManifestError {
    pub file: PathBuf,
    /// `Kind "name"` when known, else `document N`.
    pub object: ObjectRef,
    pub error: ManifestErrorKind,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectRef {
    pub kind: Option<String>,
    /// `name`, or `namespace/name` for pods.
    pub name: Option<String>,
    /// 1-based document number in the file; 0 for problems with the file itself.
    pub document: usize,
    /// Index in the `items` of a `kind: List`.
    pub item: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestErrorKind {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("file is {0} bytes, larger than the {MAX_FILE_SIZE} bytes allowed; not read")]
    TooLarge(u64),
    #[error("not a regular file ({0}); skipped")]
    NotRegular(&'static str),
    /// `message` names the (file-relative) line when the parser knows it.
    #[error("invalid YAML: {message}")]
    Yaml {
        line: Option<usize>,
        message: String,
    },
    #[error("cannot decode: {0}")]
    Decode(String),
    #[error("not a Kubernetes object: {0}")]
    NotAnObject(&'static str),
    #[error("unknown kind {found:?}: did you mean {expected}?")]
    MisspelledKind {
        found: String,
        expected: &'static str,
    },
    #[error("unsupported apiVersion {found:?} for {kind} (expected {expected:?})")]
    ApiVersion {
        kind: String,
        found: String,
        expected: &'static str,
    },
    #[error("metadata.name is required")]
    MissingName,
    #[error("duplicate name: already defined in {}; this one is ignored", .0.display())]
    Duplicate(PathBuf),
    #[error("{field}: {error}")]
    Policy { field: String, error: PolicyError },
    #[error("{0}: unknown field, ignored (misspelt?)")]
    UnknownField(String),
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kind, &self.name) {
            (Some(kind), Some(name)) => return write!(f, "{kind} {name:?}"),
            (Some(kind), None) => write!(f, "{kind} in document {}", self.document)?,
            (None, Some(name)) => write!(f, "{name:?} in document {}", self.document)?,
            (None, None) => write!(f, "document {}", self.document)?,
        }
        match self.item {
            Some(i) => write!(f, " items[{i}]"),
            None => Ok(()),
        }
    }
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Document 0: the problem is the file itself (unreadable, too large, ...).
        if self.object == ObjectRef::default() {
            return write!(f, "{}: {}", self.file.display(), self.error);
        }
        write!(
            f,
            "{}: {}: {}",
            self.file.display(),
            self.object,
            self.error
        )
    }
}

impl std::error::Error for ManifestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Loads the manifests of one file's text, as if read from `file` (which is only used in
/// error messages).
pub fn load_text(file: &Path, text: &str) -> LoadResult {
    let mut loader = Loader::default();
    loader.load_text(file, text);
    loader.finish()
}

/// Loads files one after the other into one inventory: the first definition of a name wins,
/// and a later one is refused naming both files.
#[derive(Default)]
pub struct Loader {
    inventory: Inventory,
    errors: Vec<ManifestError>,
    warnings: Vec<ManifestError>,
    /// (kind, name) -> file that defined it first.
    seen: BTreeMap<(&'static str, String), PathBuf>,
}

/// Kinds we read, with the apiVersion each must have.
const KNOWN_KINDS: [(&str, &str); 5] = [
    ("Node", "v1"),
    ("Namespace", "v1"),
    ("Pod", "v1"),
    ("ServiceCIDR", "networking.k8s.io/v1"),
    (policy::KIND, policy::API_VERSION),
];

impl Loader {
    /// Loads every document of one file's text; `path` names the file in errors.
    pub fn load_text(&mut self, path: &Path, text: &str) {
        for (i, (first_line, doc)) in split_documents(text).into_iter().enumerate() {
            let document = i + 1;
            match serde_yaml::from_str::<Value>(doc) {
                Ok(Value::Null) => {}
                Ok(value) => self.load_value(path, document, None, value),
                Err(e) => {
                    let line = e.location().map(|l| first_line + l.line() - 1);
                    self.errors.push(ManifestError {
                        file: path.to_owned(),
                        object: ObjectRef {
                            kind: scan_field(doc, "kind"),
                            name: scan_field(doc, "name"),
                            document,
                            item: None,
                        },
                        error: ManifestErrorKind::Yaml {
                            line,
                            message: yaml_message(&e, first_line),
                        },
                    });
                }
            }
        }
    }

    /// Records a problem with a file as a whole (unreadable, too large, not a file).
    pub fn refuse_file(&mut self, path: &Path, error: ManifestErrorKind) {
        self.errors.push(ManifestError {
            file: path.to_owned(),
            object: ObjectRef::default(),
            error,
        });
    }

    /// The inventory and the errors, in file order (a stable sort keeps each file's documents
    /// in order).
    pub fn finish(mut self) -> LoadResult {
        self.errors.sort_by(|a, b| a.file.cmp(&b.file));
        self.warnings.sort_by(|a, b| a.file.cmp(&b.file));
        LoadResult {
            inventory: self.inventory,
            errors: self.errors,
            warnings: self.warnings,
        }
    }

    fn load_value(&mut self, path: &Path, document: usize, item: Option<usize>, mut value: Value) {
        let kind = value.get("kind").and_then(Value::as_str).map(str::to_owned);
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut object = ObjectRef {
            kind: kind.clone(),
            name: name.clone(),
            document,
            item,
        };
        let Some(kind) = kind else {
            let problem = if value.is_mapping() {
                "no kind"
            } else {
                "expected a mapping with apiVersion, kind and metadata"
            };
            return self.errors.push(ManifestError {
                file: path.to_owned(),
                object,
                error: ManifestErrorKind::NotAnObject(problem),
            });
        };

        // `kubectl get -o yaml` of several objects prints a `List`; API lists are `<Kind>List`
        // and their items carry no kind.
        if item.is_none()
            && let Some(items) = value.get_mut("items").and_then(Value::as_sequence_mut)
        {
            let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
            if kind == "List" || item_kind.is_some_and(|k| KNOWN_KINDS.iter().any(|(n, _)| *n == k))
            {
                for (i, mut v) in std::mem::take(items).into_iter().enumerate() {
                    if let (Some(k), Some(map)) = (item_kind, v.as_mapping_mut()) {
                        map.entry("kind".into()).or_insert_with(|| k.into());
                        map.entry("apiVersion".into())
                            .or_insert_with(|| api_version.clone().into());
                    }
                    self.load_value(path, document, Some(i), v);
                }
                return;
            }
        }

        let Some(&(kind, expected)) = KNOWN_KINDS.iter().find(|(k, _)| *k == kind) else {
            if let Some(expected) = misspelled_kind(&kind) {
                return self.errors.push(ManifestError {
                    file: path.to_owned(),
                    object,
                    error: ManifestErrorKind::MisspelledKind {
                        found: kind,
                        expected,
                    },
                });
            }
            // Another kind (Deployment, Service, ...): ignored, so a cluster dump loads.
            return;
        };
        let fail = |object: ObjectRef, error| ManifestError {
            file: path.to_owned(),
            object,
            error,
        };
        if api_version != expected {
            return self.errors.push(fail(
                object,
                ManifestErrorKind::ApiVersion {
                    kind: kind.to_owned(),
                    found: api_version,
                    expected,
                },
            ));
        }
        if name.as_deref().is_none_or(str::is_empty) {
            return self
                .errors
                .push(fail(object, ManifestErrorKind::MissingName));
        }
        let decode = |e: serde_yaml::Error| ManifestErrorKind::Decode(e.to_string());
        // Decode first so the duplicate key of a pod includes its namespace.
        let decoded = match kind {
            "Node" => {
                serde_yaml::from_value::<k8s::Node>(value).map(|n| Decoded::Node(Node::from(&n)))
            }
            "Namespace" => serde_yaml::from_value::<k8s::Namespace>(value)
                .map(|n| Decoded::Namespace(Namespace::from(&n))),
            "Pod" => serde_yaml::from_value::<k8s::Pod>(value).map(|p| Decoded::Pod(Pod::from(&p))),
            "ServiceCIDR" => {
                serde_yaml::from_value::<k8s_openapi::api::networking::v1::ServiceCIDR>(value)
                    .map(|s| Decoded::ServiceCidr(inventory::service_cidr_ranges(&s)))
            }
            _ => match policy::decode(value) {
                Ok(policy) => Ok(Decoded::Policy(Box::new(policy))),
                Err(error) => {
                    let error = ManifestErrorKind::Decode(error.to_string());
                    return self.errors.push(fail(object, error));
                }
            },
        };
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => return self.errors.push(fail(object, decode(e))),
        };
        let key = match &decoded {
            Decoded::Pod(p) => format!("{}/{}", p.namespace, p.name),
            _ => name.clone().unwrap_or_default(),
        };
        object.name = Some(key.clone());
        // The first definition wins, even if it turns out invalid: which one the user meant
        // is unknown, so neither silently replaces the other.
        if let Some(first) = self.seen.get(&(kind, key.clone())) {
            let error = ManifestErrorKind::Duplicate(first.clone());
            return self.errors.push(fail(object, error));
        }
        self.seen.insert((kind, key), path.to_owned());

        match decoded {
            Decoded::Node(n) => {
                self.inventory.upsert_node(n);
            }
            Decoded::Namespace(n) => {
                self.inventory.upsert_namespace(n);
            }
            Decoded::Pod(p) => {
                self.inventory.upsert_pod(p);
            }
            Decoded::ServiceCidr(ranges) => {
                self.inventory
                    .service_cidrs
                    .insert(name.clone().unwrap_or_default(), ranges);
            }
            Decoded::Policy(decoded) => {
                self.warnings
                    .extend(decoded.unknown_fields.iter().map(|field| {
                        fail(
                            object.clone(),
                            ManifestErrorKind::UnknownField(field.clone()),
                        )
                    }));
                self.load_policy(&decoded.raw, &object, path);
            }
        }
    }

    fn load_policy(&mut self, raw: &RawPolicy, object: &ObjectRef, path: &Path) {
        let fail = |object: ObjectRef, error| ManifestError {
            file: path.to_owned(),
            object,
            error,
        };
        match policy::validate(raw) {
            Ok(p) => {
                self.inventory.upsert_policy(p);
            }
            Err(errors) => {
                self.errors.extend(errors.into_iter().map(|e| {
                    let error = ManifestErrorKind::Policy {
                        field: e.field,
                        error: e.error,
                    };
                    fail(object.clone(), error)
                }));
            }
        }
    }
}

enum Decoded {
    Node(Node),
    Namespace(Namespace),
    Pod(Pod),
    ServiceCidr(Vec<ipnet::Ipv4Net>),
    Policy(Box<policy::Decoded>),
}

/// The known kind `kind` is probably a typo of: same letters in another case, or one or two
/// edits away (one for short kinds, so `Job` is not taken for `Pod`).
fn misspelled_kind(kind: &str) -> Option<&'static str> {
    KNOWN_KINDS.iter().map(|(k, _)| *k).find(|known| {
        let allowed = if known.len() >= 8 { 2 } else { 1 };
        known.eq_ignore_ascii_case(kind)
            || edit_distance(&known.to_ascii_lowercase(), &kind.to_ascii_lowercase()) <= allowed
    })
}

/// Levenshtein distance, stopping early for strings of very different lengths.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > 2 {
        return a.len().abs_diff(b.len());
    }
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// Splits a multi-document stream at `---` lines, returning each document with the 1-based
/// line it starts on, so a broken document does not hide the others and errors keep
/// file-relative line numbers.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_marker && offset > start {
            docs.push((start_line, &text[start..offset]));
            start = offset;
            start_line = i + 1;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

/// `serde_yaml`'s message with its line numbers, which count from the start of the document,
/// shifted to count from the start of the file.
fn yaml_message(e: &serde_yaml::Error, first_line: usize) -> String {
    let text = e.to_string();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(pos) = rest.find("line ") {
        let (head, tail) = rest.split_at(pos + "line ".len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + first_line - 1).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// Best-effort recovery of `kind:` or `name:` from a document that does not parse.
fn scan_field(doc: &str, field: &str) -> Option<String> {
    let pattern = format!("{field}:");
    doc.lines().find_map(|line| {
        let pos = line.find(&pattern)?;
        // Only a whole key: at line start (after indentation) or after `{` / `,`.
        let before = line[..pos].trim_end();
        if !(before.is_empty() || before.ends_with('{') || before.ends_with(',')) {
            return None;
        }
        let rest = line[pos + pattern.len()..].trim_start();
        let value: String = rest
            .chars()
            .take_while(|c| !matches!(c, ',' | '}' | '#') && !c.is_whitespace())
            .collect();
        let value = value.trim_matches(['"', '\'']);
        let plausible = !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        plausible.then(|| value.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// The project's example policies: valid ones at the top, refused ones in `invalid/`.
    const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

    fn load_examples(folder: &Path) -> LoadResult {
        let mut files: Vec<PathBuf> = fs::read_dir(folder)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
            .collect();
        files.sort();
        let mut loader = Loader::default();
        for file in files {
            loader.load_text(&file, &fs::read_to_string(&file).unwrap());
        }
        loader.finish()
    }

    #[test]
    fn every_valid_example_loads() {
        let r = load_examples(Path::new(EXAMPLES));
        let messages: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
        assert!(r.errors.is_empty(), "{messages:#?}");
        let names: Vec<&str> = r.inventory.policies.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "all-destinations-dual-stack",
                "ci-runners-to-registry",
                "crawlers",
                "egress-sample",
                "my-app-floating-ip",
                "payments-to-bank",
                "reports-to-partner",
                "scrapers-to-saas",
            ]
        );
        // egressGateways wins over egressGateway.
        assert_eq!(r.inventory.policies["crawlers"].gateways.len(), 2);
    }

    #[test]
    fn every_invalid_example_is_refused_with_file_policy_and_field() {
        let dir = Path::new(EXAMPLES).join("invalid");
        let r = load_examples(&dir);
        assert!(
            r.inventory.policies.is_empty(),
            "{:?}",
            r.inventory.policies.keys()
        );
        let msgs: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
        let expect = [
            (
                "bad-cidr.yaml",
                r#"CiliumEgressGatewayPolicy "bad-cidr": spec.destinationCIDRs[0]: invalid CIDR "198.51.100.0/33": "#,
            ),
            (
                "bad-cidr.yaml",
                r#"CiliumEgressGatewayPolicy "bad-cidr": spec.destinationCIDRs[1]: invalid CIDR "partner-network""#,
            ),
            (
                "bad-operator.yaml",
                r#"CiliumEgressGatewayPolicy "bad-operator": spec.selectors[0].podSelector.matchExpressions[0].operator: unknown operator "Equals""#,
            ),
            (
                "floating-with-egress-gateways.yaml",
                r#"CiliumEgressGatewayPolicy "floating-with-egress-gateways": metadata.annotations[egress-gateway.io/floating-egress-ip]: a floating egress IP needs exactly one gateway"#,
            ),
            (
                "gateways-without-egress-gateway.yaml",
                r#"CiliumEgressGatewayPolicy "gateways-without-egress-gateway": spec.egressGateway: is required even with spec.egressGateways"#,
            ),
            (
                "interface-and-egress-ip.yaml",
                r#"CiliumEgressGatewayPolicy "interface-and-egress-ip": spec.egressGateway: interface and egressIP are mutually exclusive"#,
            ),
            (
                "missing-gateway.yaml",
                r#"CiliumEgressGatewayPolicy "missing-gateway": spec.egressGateway: is required"#,
            ),
            (
                "node-selector-only.yaml",
                r#"CiliumEgressGatewayPolicy "node-selector-only": spec.selectors[0]: needs a podSelector or a namespaceSelector"#,
            ),
            (
                "not-yaml.yaml",
                r#"CiliumEgressGatewayPolicy "broken": invalid YAML: did not find expected ',' or '}' at line 5 "#,
            ),
        ];
        assert_eq!(msgs.len(), expect.len(), "{msgs:#?}");
        for (msg, (file, text)) in msgs.iter().zip(expect) {
            let prefix = format!("{}: {text}", dir.join(file).display());
            assert!(
                msg.starts_with(&prefix),
                "{msg}\ndoes not start with\n{prefix}"
            );
        }
    }

    /// The floating annotation is read from the manifest's metadata; a wrong one is refused
    /// as any invalid field is, naming the file, the policy and the annotation.
    #[test]
    fn the_floating_annotation_loads_from_manifests_and_is_refused_by_name() {
        let manifest = |name: &str, value: &str| {
            format!(
                "apiVersion: cilium.io/v2\nkind: CiliumEgressGatewayPolicy\nmetadata:\n  name: {name}\n  annotations:\n    egress-gateway.io/floating-egress-ip: {value}\nspec:\n  selectors: [{{podSelector: {{}}}}]\n  destinationCIDRs: [0.0.0.0/0]\n  egressGateway: {{nodeSelector: {{}}, egressIP: 192.0.2.50}}\n"
            )
        };
        let text = [manifest("floats", "'true'"), manifest("typo", "'yes'")].join("---\n");
        let r = load_text(Path::new("float.yaml"), &text);
        assert_eq!(
            r.inventory.policies["floats"].floating_egress(),
            Some((std::net::Ipv4Addr::new(192, 0, 2, 50), None))
        );
        let msgs: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            msgs,
            [
                r#"float.yaml: CiliumEgressGatewayPolicy "typo": metadata.annotations[egress-gateway.io/floating-egress-ip]: must be "true" or "false", got "yes""#
            ]
        );
    }

    /// A `ServiceCIDR` (networking.k8s.io/v1, as `kubectl get servicecidr -o yaml` prints the
    /// cluster's `kubernetes` one): its IPv4 ranges are in-cluster destinations.
    #[test]
    fn service_cidrs_are_in_cluster_destinations() {
        let r = load_text(
            Path::new("services.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [10.96.0.0/12, 'fd00:10:96::/112']}\n",
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(
            r.inventory.service_cidrs["kubernetes"],
            ["10.96.0.0/12".parse::<ipnet::Ipv4Net>().unwrap()]
        );
        let state = crate::desired::desired_state(
            &r.inventory,
            "n1",
            &crate::desired::LocalNetwork::default(),
        );
        assert!(
            state
                .cluster_cidrs
                .contains(&"10.96.0.0/12".parse().unwrap())
        );
    }

    /// A cordoned node (as `kubectl get node -o yaml` prints it after `kubectl cordon`) and a
    /// labelled one load as draining; the manifests source needs nothing else.
    #[test]
    fn cordoned_and_labelled_nodes_are_draining() {
        let r = load_text(
            Path::new("nodes.yaml"),
            "apiVersion: v1\nkind: Node\nmetadata: {name: cordoned}\nspec: {unschedulable: true, taints: [{key: node.kubernetes.io/unschedulable, effect: NoSchedule}]}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: labelled, labels: {egress-gateway.io/draining: 'true'}}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: serving}\nspec: {unschedulable: false}\n",
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let draining = |name: &str| r.inventory.nodes[name].is_draining();
        assert!(draining("cordoned"));
        assert!(r.inventory.nodes["cordoned"].unschedulable);
        assert!(draining("labelled"));
        assert!(!draining("serving"));
    }

    #[test]
    fn a_file_refused_as_a_whole_is_named_without_an_object() {
        let mut loader = Loader::default();
        loader.refuse_file(Path::new("big.yaml"), ManifestErrorKind::TooLarge(5 << 20));
        loader.load_text(
            Path::new("a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n",
        );
        let r = loader.finish();
        assert!(r.inventory.namespaces.contains_key("ok"));
        assert_eq!(
            r.errors[0].to_string(),
            format!(
                "big.yaml: file is {} bytes, larger than the {MAX_FILE_SIZE} bytes allowed; not read",
                5 << 20
            )
        );
    }

    #[test]
    fn scan_field_recovers_names() {
        assert_eq!(
            scan_field("metadata: {name: broken\n", "name").as_deref(),
            Some("broken")
        );
        assert_eq!(
            scan_field("metadata:\n  name: \"x\"\n", "name").as_deref(),
            Some("x")
        );
        assert_eq!(scan_field("metadata:\n  nodename: x\n", "name"), None);
    }
}
