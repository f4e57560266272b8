//! Validated Kubernetes label selectors (matchLabels + matchExpressions).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Why a label selector was refused. Paths are relative to the selector.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("invalid label key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("invalid label value {value:?}: {reason}")]
    InvalidValue { value: String, reason: &'static str },
    #[error("unknown operator {0:?} (expected In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator(String),
    #[error("operator {0} needs at least one value")]
    ValuesRequired(Operator),
    #[error("operator {0} takes no values")]
    ValuesForbidden(Operator),
    #[error(
        "label source {label_source:?} of key {key:?} never matches a pod's labels here (only k8s: and \
         any: do, as every label comes from Kubernetes)"
    )]
    UnsupportedSource { key: String, label_source: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: BTreeSet<String>,
}

impl Requirement {
    fn matches(&self, value: Option<&str>) -> bool {
        match (self.operator, value) {
            (Operator::In, Some(v)) => self.values.contains(v),
            (Operator::In, None) => false,
            // As in Kubernetes: NotIn also matches objects without the key.
            (Operator::NotIn, Some(v)) => !self.values.contains(v),
            (Operator::NotIn, None) => true,
            (Operator::Exists, v) => v.is_some(),
            (Operator::DoesNotExist, v) => v.is_none(),
        }
    }
}

/// A validated label selector. The default (empty) selector matches everything; where a
/// selector is optional, callers treat a missing one as matching everything too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// Validates a Kubernetes `LabelSelector`. Errors carry a path relative to the selector
    /// (e.g. `matchExpressions[0].operator`).
    pub fn parse(raw: &LabelSelector) -> Result<Self, Vec<(String, SelectorError)>> {
        let mut errors = Vec::new();
        let mut selector = Selector::default();
        for (key, value) in raw.match_labels.iter().flatten() {
            let before = errors.len();
            let key = without_source(key, "matchLabels", &mut errors);
            check_key(key, "matchLabels", &mut errors);
            check_value(value, &format!("matchLabels[{key:?}]"), &mut errors);
            if errors.len() == before {
                selector.match_labels.insert(key.to_owned(), value.clone());
            }
        }
        for (i, expr) in raw.match_expressions.iter().flatten().enumerate() {
            let path = format!("matchExpressions[{i}]");
            let before = errors.len();
            let key = without_source(&expr.key, &format!("{path}.key"), &mut errors);
            check_key(key, &format!("{path}.key"), &mut errors);
            let operator = match expr.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    errors.push((
                        format!("{path}.operator"),
                        SelectorError::UnknownOperator(other.to_owned()),
                    ));
                    continue;
                }
            };
            let values = expr.values.as_deref().unwrap_or_default();
            let needs_values = matches!(operator, Operator::In | Operator::NotIn);
            if needs_values && values.is_empty() {
                errors.push((
                    format!("{path}.values"),
                    SelectorError::ValuesRequired(operator),
                ));
            } else if !needs_values && !values.is_empty() {
                errors.push((
                    format!("{path}.values"),
                    SelectorError::ValuesForbidden(operator),
                ));
            }
            for (j, value) in values.iter().enumerate() {
                check_value(value, &format!("{path}.values[{j}]"), &mut errors);
            }
            if errors.len() == before {
                selector.match_expressions.push(Requirement {
                    key: key.to_owned(),
                    operator,
                    values: values.iter().cloned().collect(),
                });
            }
        }
        if errors.is_empty() {
            Ok(selector)
        } else {
            Err(errors)
        }
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches_with(|key| labels.get(key).map(String::as_str))
    }

    /// Matches against labels given by a lookup, so callers can add pseudo-labels without
    /// copying the label map.
    pub fn matches_with<'a>(&self, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| label(k) == Some(v.as_str()))
            && self
                .match_expressions
                .iter()
                .all(|req| req.matches(label(&req.key)))
    }
}

/// A key without Cilium's label source prefix: `k8s:app` and `any:app` select the
/// Kubernetes label `app` (Kubernetes keys never hold a `:`). Other sources (`reserved:`,
/// `cidr:`, ...) are refused: no pod label comes from them.
fn without_source<'a>(
    key: &'a str,
    path: &str,
    errors: &mut Vec<(String, SelectorError)>,
) -> &'a str {
    match key.split_once(':') {
        None => key,
        Some(("k8s" | "any", rest)) => rest,
        Some((source, _)) => {
            errors.push((
                path.to_owned(),
                SelectorError::UnsupportedSource {
                    key: key.to_owned(),
                    label_source: source.to_owned(),
                },
            ));
            key
        }
    }
}

/// Kubernetes' `IsQualifiedName`: optional DNS-subdomain prefix, `/`, then a name.
fn check_key(key: &str, path: &str, errors: &mut Vec<(String, SelectorError)>) {
    let invalid = |reason| {
        (
            path.to_owned(),
            SelectorError::InvalidKey {
                key: key.to_owned(),
                reason,
            },
        )
    };
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return errors.push(invalid("prefix before '/' must not be empty"));
        }
        if prefix.len() > 253 || !is_dns_subdomain(prefix) {
            return errors.push(invalid(
                "prefix must be a lowercase DNS subdomain of at most 253 characters",
            ));
        }
    }
    if name.is_empty() {
        return errors.push(invalid("name part must not be empty"));
    }
    if let Some(reason) = name_problem(name) {
        errors.push(invalid(reason));
    }
}

/// Kubernetes' `IsValidLabelValue`: empty, or a name of at most 63 characters.
fn check_value(value: &str, path: &str, errors: &mut Vec<(String, SelectorError)>) {
    if value.is_empty() {
        return;
    }
    if let Some(reason) = name_problem(value) {
        errors.push((
            path.to_owned(),
            SelectorError::InvalidValue {
                value: value.to_owned(),
                reason,
            },
        ));
    }
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`, at most 63 characters.
fn name_problem(name: &str) -> Option<&'static str> {
    if name.len() > 63 {
        return Some("must be at most 63 characters");
    }
    let bytes = name.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    if !edge_ok(bytes.first()) || !edge_ok(bytes.last()) {
        return Some("must start and end with a letter or digit");
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Some("may contain only letters, digits, '-', '_' and '.'");
    }
    None
}

fn is_dns_subdomain(s: &str) -> bool {
    s.split('.').all(|label| {
        let b = label.as_bytes();
        let edge = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        edge(b.first())
            && edge(b.last())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| {
                values
                    .iter()
                    .map(std::string::ToString::to_string)
                    .collect()
            }),
        }
    }

    fn selector(exprs: Vec<LabelSelectorRequirement>) -> Selector {
        Selector::parse(&LabelSelector {
            match_expressions: Some(exprs),
            match_labels: None,
        })
        .unwrap()
    }

    #[test]
    fn empty_selector_matches_everything() {
        let any = labels(&[("a", "b")]);
        assert!(Selector::default().matches(&any));
        let empty = Selector::parse(&LabelSelector::default()).unwrap();
        assert!(empty.matches(&any));
        assert!(empty.matches(&BTreeMap::new()));
    }

    #[test]
    fn match_labels_need_all_pairs() {
        let s = Selector::parse(&LabelSelector {
            match_labels: Some(labels(&[("app", "web"), ("tier", "front")])),
            match_expressions: None,
        })
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn operators() {
        let in_ = selector(vec![expr("tier", "In", &["a", "b"])]);
        assert!(in_.matches(&labels(&[("tier", "a")])));
        assert!(!in_.matches(&labels(&[("tier", "c")])));
        assert!(!in_.matches(&labels(&[])));

        let not_in = selector(vec![expr("tier", "NotIn", &["a"])]);
        assert!(!not_in.matches(&labels(&[("tier", "a")])));
        assert!(not_in.matches(&labels(&[("tier", "b")])));
        assert!(not_in.matches(&labels(&[])));

        let exists = selector(vec![expr("canary", "Exists", &[])]);
        assert!(exists.matches(&labels(&[("canary", "")])));
        assert!(!exists.matches(&labels(&[])));

        let absent = selector(vec![expr("canary", "DoesNotExist", &[])]);
        assert!(!absent.matches(&labels(&[("canary", "yes")])));
        assert!(absent.matches(&labels(&[])));
    }

    #[test]
    fn refuses_bad_operators_and_values() {
        let err = |e| {
            Selector::parse(&LabelSelector {
                match_expressions: Some(vec![e]),
                match_labels: None,
            })
            .unwrap_err()
        };
        let e = err(expr("app", "Equals", &["x"]));
        assert_eq!(e[0].0, "matchExpressions[0].operator");
        assert!(e[0].1.to_string().contains("Equals"), "{}", e[0].1);
        assert_eq!(
            err(expr("app", "In", &[])),
            vec![(
                "matchExpressions[0].values".to_string(),
                SelectorError::ValuesRequired(Operator::In)
            )]
        );
        assert_eq!(
            err(expr("app", "Exists", &["x"]))[0].1,
            SelectorError::ValuesForbidden(Operator::Exists)
        );
        assert_eq!(
            err(expr("app", "NotIn", &["-bad"]))[0].0,
            "matchExpressions[0].values[0]"
        );
    }

    #[test]
    fn label_syntax() {
        let check = |k: &str, v: &str| {
            Selector::parse(&LabelSelector {
                match_labels: Some(labels(&[(k, v)])),
                match_expressions: None,
            })
            .is_ok()
        };
        assert!(check("app", "web"));
        assert!(check("app.kubernetes.io/name", "payments"));
        assert!(check("io.kubernetes.pod.namespace", "payments"));
        assert!(check("a", ""));
        assert!(check("k", &"v".repeat(63)));
        assert!(!check("k", &"v".repeat(64)));
        assert!(!check("k", "has space"));
        assert!(!check("k", "-leading"));
        assert!(!check("Upper.Case/name", "v"));
        assert!(!check("/name", "v"));
        assert!(!check("a/b/c", "v"));
        assert!(!check("", "v"));
    }

    #[test]
    fn cilium_label_sources_k8s_and_any_are_the_plain_key() {
        let parsed = |key: &str| {
            Selector::parse(&LabelSelector {
                match_labels: Some(labels(&[(key, "web")])),
                match_expressions: Some(vec![expr(key, "In", &["web"])]),
            })
        };
        for key in ["k8s:app", "any:app", "app"] {
            let s = parsed(key).unwrap();
            assert_eq!(s.match_labels, labels(&[("app", "web")]), "{key}");
            assert_eq!(s.match_expressions[0].key, "app");
            assert!(s.matches(&labels(&[("app", "web")])));
        }
        let namespace = parsed("k8s:io.kubernetes.pod.namespace").unwrap();
        assert!(
            namespace
                .match_labels
                .contains_key("io.kubernetes.pod.namespace")
        );
        let errors = parsed("reserved:host").unwrap_err();
        assert_eq!(errors[0].0, "matchLabels");
        assert!(
            errors[0].1.to_string().contains("\"reserved\""),
            "{}",
            errors[0].1
        );
    }
}
