//! Label selectors: parsing never panics, and a selector that parses matches exactly as
//! Kubernetes defines it (checked against a direct reading of the spec below).

#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use egress_control::inventory::Selector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use libfuzzer_sys::fuzz_target;

/// Mostly keys and values from a small pool, so selectors parse and match often; any
/// string otherwise, to exercise validation.
#[derive(Arbitrary, Debug)]
enum Text {
    Pool(u8),
    Any(String),
}

const POOL: [&str; 8] = [
    "app",
    "web",
    "db",
    "example.com/tier",
    "",
    "a.b",
    "-x",
    "UPPER_9",
];

impl Text {
    fn get(&self) -> String {
        match self {
            Text::Pool(i) => POOL[usize::from(*i) % POOL.len()].to_owned(),
            Text::Any(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Expression {
    key: Text,
    /// In, NotIn, Exists, DoesNotExist, or anything.
    operator: Text,
    operator_index: u8,
    values: Option<Vec<Text>>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    match_labels: Option<Vec<(Text, Text)>>,
    match_expressions: Option<Vec<Expression>>,
    labels: Vec<(Text, Text)>,
}

const OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];

fuzz_target!(|input: Input| {
    let raw = LabelSelector {
        match_labels: input
            .match_labels
            .as_ref()
            .map(|pairs| pairs.iter().map(|(k, v)| (k.get(), v.get())).collect()),
        match_expressions: input.match_expressions.as_ref().map(|list| {
            list.iter()
                .map(|e| LabelSelectorRequirement {
                    key: e.key.get(),
                    operator: match e.operator {
                        Text::Pool(_) => OPERATORS[usize::from(e.operator_index) % 4].to_owned(),
                        Text::Any(ref s) => s.clone(),
                    },
                    values: e.values.as_ref().map(|v| v.iter().map(Text::get).collect()),
                })
                .collect()
        }),
    };
    let labels: BTreeMap<String, String> = input
        .labels
        .iter()
        .map(|(k, v)| (k.get(), v.get()))
        .collect();
    match Selector::parse(&raw) {
        Err(errors) => {
            assert!(!errors.is_empty());
            for (path, error) in &errors {
                assert!(!path.is_empty());
                assert!(!error.to_string().is_empty());
            }
        }
        Ok(selector) => {
            assert_eq!(
                selector.matches(&labels),
                reference_matches(&raw, &labels),
                "{raw:?} on {labels:?}"
            );
            assert_eq!(
                selector.matches(&labels),
                selector.matches_with(|key| labels.get(key).map(String::as_str))
            );
        }
    }
});

/// Kubernetes' semantics, straight from the API reference: every matchLabels pair present,
/// and every requirement true (NotIn and DoesNotExist also hold when the key is absent).
fn reference_matches(raw: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs_hold = raw
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let requirements_hold = raw.match_expressions.iter().flatten().all(|req| {
        let values: BTreeSet<&String> = req.values.iter().flatten().collect();
        let value = labels.get(&req.key);
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("parse accepted operator {other:?}"),
        }
    });
    pairs_hold && requirements_hold
}
