//! `CiliumEgressGatewayPolicy` (cilium.io/v2): raw serde types and validation.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;

use super::selector::{Selector, SelectorError};

pub const API_VERSION: &str = "cilium.io/v2";
pub const KIND: &str = "CiliumEgressGatewayPolicy";
/// Cilium's limit on `spec.egressGateways`.
pub const MAX_GATEWAYS: usize = 64;
/// Policy annotation (`"true"` or `"false"`): the gateway spec's `egressIP` floats between
/// its candidates instead of being an address of each (see [`crate::floating`]). An
/// annotation, not a spec field, so the spec stays Cilium's.
pub const FLOATING_EGRESS_IP_ANNOTATION: &str = "egress-gateway.io/floating-egress-ip";

// Raw types: as the API server stores them. Unknown fields (status, newer spec fields) are
// tolerated so policies users already have load unchanged.

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<RawSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawSpec {
    pub selectors: Option<Vec<RawSelector>>,
    #[serde(rename = "destinationCIDRs")]
    pub destination_cidrs: Option<Vec<String>>,
    #[serde(rename = "excludedCIDRs")]
    pub excluded_cidrs: Option<Vec<String>>,
    pub egress_gateway: Option<RawGateway>,
    pub egress_gateways: Option<Vec<RawGateway>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawSelector {
    pub pod_selector: Option<LabelSelector>,
    pub namespace_selector: Option<LabelSelector>,
    pub node_selector: Option<LabelSelector>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawGateway {
    pub node_selector: Option<LabelSelector>,
    pub interface: Option<String>,
    #[serde(rename = "egressIP")]
    pub egress_ip: Option<String>,
}

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub selectors: Vec<PolicySelector>,
    /// Normalised (host bits cleared), deduplicated, sorted.
    pub destination_cidrs: Vec<Ipv4Net>,
    pub excluded_cidrs: Vec<Ipv4Net>,
    /// IPv6 destination and excluded CIDRs (normalised): loaded but not programmed until the
    /// datapath does IPv6, and reported as such (a dual-stack policy's IPv4 part works).
    pub ipv6_cidrs: Vec<Ipv6Net>,
    /// At least one entry; exactly one, [`EgressSource::Floating`], when the policy floats
    /// its egress IP ([`FLOATING_EGRESS_IP_ANNOTATION`]).
    pub gateways: Vec<GatewaySpec>,
}

impl Policy {
    /// The floating egress IP and the interface its holder adds it to (`None`: the default
    /// route's), when the policy floats one.
    pub fn floating_egress(&self) -> Option<(Ipv4Addr, Option<&str>)> {
        match self.gateways.as_slice() {
            [
                GatewaySpec {
                    egress: EgressSource::Floating { ip, interface },
                    ..
                },
            ] => Some((*ip, interface.as_deref())),
            _ => None,
        }
    }
}

/// One `spec.selectors[]` entry; the three parts are `ANDed`. `None` means "any".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySelector {
    pub pod_selector: Selector,
    pub namespace_selector: Option<Selector>,
    pub node_selector: Option<Selector>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewaySpec {
    pub node_selector: Selector,
    pub egress: EgressSource,
}

/// Where the gateway takes its egress IP from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EgressSource {
    /// Neither `interface` nor `egressIP`: the interface of the default route.
    DefaultRoute,
    Interface(String),
    Ip(Ipv4Addr),
    /// `egressIP` of a policy annotated [`FLOATING_EGRESS_IP_ANNOTATION`]: no candidate needs
    /// the address; the one holding it adds it to `interface` (`None`: the default route's
    /// interface). Unlike a plain `egressIP`, `interface` may be given with it: the address
    /// is on no interface yet, so the spec says where it goes.
    Floating {
        ip: Ipv4Addr,
        interface: Option<String>,
    },
}

/// What is wrong with one field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("is required")]
    Required,
    #[error("is required (or a non-empty spec.egressGateways)")]
    GatewayRequired,
    #[error(
        "is required even with spec.egressGateways: Cilium's API server refuses a policy \
         without it (spec.egressGateway: Required value)"
    )]
    GatewayRequiredWithList,
    #[error(
        "needs a podSelector or a namespaceSelector: Cilium refuses an entry with only a \
         nodeSelector (here it would select every pod on those nodes)"
    )]
    NodeSelectorOnly,
    #[error("must not be empty")]
    Empty,
    #[error("invalid CIDR {cidr:?}: {reason}")]
    InvalidCidr { cidr: String, reason: String },
    #[error("invalid IP address {ip:?}: {reason}")]
    InvalidIp { ip: String, reason: String },
    #[error("interface and egressIP are mutually exclusive")]
    InterfaceAndEgressIp,
    #[error("at most {MAX_GATEWAYS} gateways are supported, got {0}")]
    TooManyGateways(usize),
    #[error("must be \"true\" or \"false\", got {0:?}")]
    FloatingValue(String),
    #[error(
        "a floating egress IP needs exactly one gateway, spec.egressGateway without \
         spec.egressGateways[]: one address cannot float between several entries' candidates"
    )]
    FloatingNeedsOneGateway,
    #[error(
        "a floating egress IP needs spec.egressGateway.egressIP: the address that moves \
         between the candidates"
    )]
    FloatingNeedsEgressIp,
    #[error(transparent)]
    Selector(#[from] SelectorError),
}

/// A refused field of a named policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy:?}: {field}: {error}")]
pub struct FieldError {
    pub policy: String,
    /// Path like `spec.destinationCIDRs[0]`.
    pub field: String,
    pub error: PolicyError,
}

/// A policy object decoded, with the fields it has that no Cilium release defines here.
#[derive(Debug)]
pub struct Decoded {
    pub raw: RawPolicy,
    /// Paths of unknown fields under `spec` (`spec.egressGateway.egressIp`): a misspelt
    /// field is warned about by name, as kubectl's field validation does, and otherwise
    /// ignored, so policies of newer Cilium releases still load.
    pub unknown_fields: Vec<String>,
}

/// Why a policy object could not be decoded: the field path and what was wrong there.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DecodeError {
    /// Like `spec.egressGateway.nodeSelector.matchLabels.x`; `.` for the object itself.
    pub path: String,
    pub message: String,
}

/// Decodes a policy object from any serde format (YAML from a file, JSON from the API
/// server), naming the field of a decode error and collecting unknown spec fields.
pub fn decode<'de, D: serde::Deserializer<'de>>(object: D) -> Result<Decoded, DecodeError> {
    let mut unknown_fields = Vec::new();
    let mut note_unknown = |path: serde_ignored::Path<'_>| {
        let path = field_path(&path);
        // apiVersion, kind and status are not part of RawPolicy; only spec is validated.
        if path.starts_with("spec.") {
            unknown_fields.push(path);
        }
    };
    let ignored = serde_ignored::Deserializer::new(object, &mut note_unknown);
    let raw = serde_path_to_error::deserialize(ignored).map_err(|error| DecodeError {
        path: error.path().to_string(),
        message: error.inner().to_string(),
    })?;
    Ok(Decoded {
        raw,
        unknown_fields,
    })
}

/// A field's path as the errors write it: `spec.selectors[0].podSelector`.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// Validates a raw policy, collecting every problem rather than stopping at the first.
pub fn validate(raw: &RawPolicy) -> Result<Policy, Vec<FieldError>> {
    let name = raw.metadata.name.clone().unwrap_or_default();
    let mut errors = Errors {
        policy: &name,
        list: Vec::new(),
    };
    if name.is_empty() {
        errors.push("metadata.name", PolicyError::Required);
    }
    let floating = floating_annotation(&raw.metadata, &mut errors);
    let Some(spec) = &raw.spec else {
        errors.push("spec", PolicyError::Required);
        return Err(errors.list);
    };

    let mut selectors = Vec::new();
    match spec.selectors.as_deref() {
        None => errors.push("spec.selectors", PolicyError::Required),
        Some([]) => errors.push("spec.selectors", PolicyError::Empty),
        Some(list) => {
            for (i, s) in list.iter().enumerate() {
                let path = format!("spec.selectors[{i}]");
                if s.pod_selector.is_none() && s.namespace_selector.is_none() {
                    errors.push(path, PolicyError::NodeSelectorOnly);
                    continue;
                }
                let pod = selector(
                    s.pod_selector.as_ref(),
                    &format!("{path}.podSelector"),
                    &mut errors,
                );
                let ns = selector(
                    s.namespace_selector.as_ref(),
                    &format!("{path}.namespaceSelector"),
                    &mut errors,
                );
                let node = selector(
                    s.node_selector.as_ref(),
                    &format!("{path}.nodeSelector"),
                    &mut errors,
                );
                if let (Some(pod), Some(namespace_selector), Some(node_selector)) = (pod, ns, node)
                {
                    selectors.push(PolicySelector {
                        pod_selector: pod.unwrap_or_default(),
                        namespace_selector,
                        node_selector,
                    });
                }
            }
        }
    }

    let mut ipv6_cidrs = BTreeSet::new();
    let destination_cidrs = match spec.destination_cidrs.as_deref() {
        None => {
            errors.push("spec.destinationCIDRs", PolicyError::Required);
            Vec::new()
        }
        Some([]) => {
            errors.push("spec.destinationCIDRs", PolicyError::Empty);
            Vec::new()
        }
        Some(list) => cidrs(list, "spec.destinationCIDRs", &mut ipv6_cidrs, &mut errors),
    };
    let excluded_cidrs = cidrs(
        spec.excluded_cidrs.as_deref().unwrap_or_default(),
        "spec.excludedCIDRs",
        &mut ipv6_cidrs,
        &mut errors,
    );

    // As in Cilium, a non-empty egressGateways replaces egressGateway, which its API server
    // requires all the same.
    let mut gateways = Vec::new();
    match (&spec.egress_gateways, &spec.egress_gateway) {
        (Some(list), single) if !list.is_empty() => {
            if single.is_none() {
                errors.push("spec.egressGateway", PolicyError::GatewayRequiredWithList);
            }
            if list.len() > MAX_GATEWAYS {
                errors.push(
                    "spec.egressGateways",
                    PolicyError::TooManyGateways(list.len()),
                );
            }
            if floating {
                errors.push(floating_field(), PolicyError::FloatingNeedsOneGateway);
            }
            for (i, g) in list.iter().enumerate() {
                gateways.extend(gateway(
                    g,
                    &format!("spec.egressGateways[{i}]"),
                    false,
                    &mut errors,
                ));
            }
        }
        (_, Some(g)) => gateways.extend(gateway(g, "spec.egressGateway", floating, &mut errors)),
        (_, None) => errors.push("spec.egressGateway", PolicyError::GatewayRequired),
    }

    if !errors.list.is_empty() {
        return Err(errors.list);
    }
    Ok(Policy {
        name,
        selectors,
        destination_cidrs,
        excluded_cidrs,
        ipv6_cidrs: ipv6_cidrs.into_iter().collect(),
        gateways,
    })
}

struct Errors<'a> {
    policy: &'a str,
    list: Vec<FieldError>,
}

impl Errors<'_> {
    fn push(&mut self, field: impl Into<String>, error: PolicyError) {
        self.list.push(FieldError {
            policy: self.policy.to_owned(),
            field: field.into(),
            error,
        });
    }
}

/// The annotation's field path, as Kubernetes writes a map key's.
fn floating_field() -> String {
    format!("metadata.annotations[{FLOATING_EGRESS_IP_ANNOTATION}]")
}

/// Whether the policy floats its egress IP: [`FLOATING_EGRESS_IP_ANNOTATION`] is `"true"`.
/// Any value but `"true"` and `"false"` is refused rather than read as either: a typo
/// (`"yes"`, `"True"`) must not silently give the user the other design.
fn floating_annotation(metadata: &ObjectMeta, errors: &mut Errors) -> bool {
    let value = metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(FLOATING_EGRESS_IP_ANNOTATION));
    match value.map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            errors.push(
                floating_field(),
                PolicyError::FloatingValue(other.to_owned()),
            );
            false
        }
    }
}

/// `None` when invalid; `Some(None)` when absent.
#[expect(
    clippy::option_option,
    reason = "absent and invalid are both not a selector, and the caller treats them apart"
)]
fn selector(
    raw: Option<&LabelSelector>,
    path: &str,
    errors: &mut Errors,
) -> Option<Option<Selector>> {
    let Some(raw) = raw else { return Some(None) };
    match Selector::parse(raw) {
        Ok(s) => Some(Some(s)),
        Err(list) => {
            for (sub, e) in list {
                errors.push(format!("{path}.{sub}"), e.into());
            }
            None
        }
    }
}

/// The IPv4 CIDRs of `list`; IPv6 ones go to `ipv6`.
fn cidrs(
    list: &[String],
    path: &str,
    ipv6: &mut BTreeSet<Ipv6Net>,
    errors: &mut Errors,
) -> Vec<Ipv4Net> {
    let mut out = BTreeSet::new();
    for (i, s) in list.iter().enumerate() {
        match parse_cidr(s) {
            Ok(Cidr::V4(net)) => {
                out.insert(net);
            }
            Ok(Cidr::V6(net)) => {
                ipv6.insert(net);
            }
            Err(reason) => errors.push(
                format!("{path}[{i}]"),
                PolicyError::InvalidCidr {
                    cidr: s.clone(),
                    reason,
                },
            ),
        }
    }
    out.into_iter().collect()
}

enum Cidr {
    V4(Ipv4Net),
    V6(Ipv6Net),
}

/// Parses a CIDR. Host bits are cleared, as Go's `net.ParseCIDR` does for Cilium.
fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let Some((addr, len)) = s.trim().split_once('/') else {
        return Err(match s.trim().parse::<IpAddr>() {
            Ok(_) => "missing prefix length (expected e.g. 192.0.2.0/24)".into(),
            Err(_) => "not a CIDR (expected e.g. 192.0.2.0/24)".into(),
        });
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("prefix length {len:?} is not a number"))?;
    match addr {
        IpAddr::V4(addr) => Ipv4Net::new(addr, len)
            .map(|net| Cidr::V4(net.trunc()))
            .map_err(|_| format!("prefix length {len} is longer than 32")),
        IpAddr::V6(addr) => Ipv6Net::new(addr, len)
            .map(|net| Cidr::V6(net.trunc()))
            .map_err(|_| format!("prefix length {len} is longer than 128")),
    }
}

/// One gateway spec; `floating`: the policy floats its egress IP, which it must name.
fn gateway(
    raw: &RawGateway,
    path: &str,
    floating: bool,
    errors: &mut Errors,
) -> Option<GatewaySpec> {
    let before = errors.list.len();
    let node_selector = match &raw.node_selector {
        None => {
            errors.push(format!("{path}.nodeSelector"), PolicyError::Required);
            None
        }
        Some(s) => selector(Some(s), &format!("{path}.nodeSelector"), errors).flatten(),
    };
    // Empty strings are Go's zero values: treat them as absent, as Cilium does.
    let interface = raw.interface.as_deref().filter(|s| !s.is_empty());
    let egress_ip = raw.egress_ip.as_deref().filter(|s| !s.is_empty());
    let egress = match (interface, egress_ip) {
        (_, None) if floating => {
            errors.push(floating_field(), PolicyError::FloatingNeedsEgressIp);
            None
        }
        (Some(_), Some(_)) if !floating => {
            errors.push(path, PolicyError::InterfaceAndEgressIp);
            None
        }
        (Some(name), None) => Some(EgressSource::Interface(name.to_owned())),
        (interface, Some(ip)) => match ip.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) if floating => Some(EgressSource::Floating {
                ip,
                interface: interface.map(str::to_owned),
            }),
            Ok(IpAddr::V4(ip)) => Some(EgressSource::Ip(ip)),
            Ok(IpAddr::V6(_)) => {
                errors.push(
                    format!("{path}.egressIP"),
                    PolicyError::InvalidIp {
                        ip: ip.to_owned(),
                        reason: "IPv6 is not supported yet".into(),
                    },
                );
                None
            }
            Err(e) => {
                errors.push(
                    format!("{path}.egressIP"),
                    PolicyError::InvalidIp {
                        ip: ip.to_owned(),
                        reason: e.to_string(),
                    },
                );
                None
            }
        },
        (None, None) => Some(EgressSource::DefaultRoute),
    };
    match (node_selector, egress) {
        (Some(node_selector), Some(egress)) if errors.list.len() == before => Some(GatewaySpec {
            node_selector,
            egress,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Policy, Vec<FieldError>> {
        validate(&serde_yaml::from_str::<RawPolicy>(yaml).unwrap())
    }

    const BASE: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumEgressGatewayPolicy
metadata: {name: p}
spec:
  selectors: [{podSelector: {matchLabels: {app: a}}}]
  destinationCIDRs: ["10.1.2.3/16"]
"#;

    fn with(extra: &str) -> String {
        format!("{BASE}{extra}")
    }

    fn fields(r: Result<Policy, Vec<FieldError>>) -> Vec<String> {
        r.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn minimal_policy_with_default_route_and_normalised_cidr() {
        let p = parse(&with(
            "  egressGateway: {nodeSelector: {matchLabels: {gw: 'true'}}}\nstatus: {whatever: 1}\n",
        ))
        .unwrap();
        assert_eq!(p.name, "p");
        assert_eq!(p.destination_cidrs, vec!["10.1.0.0/16".parse().unwrap()]);
        assert_eq!(p.gateways.len(), 1);
        assert_eq!(p.gateways[0].egress, EgressSource::DefaultRoute);
        assert!(p.selectors[0].namespace_selector.is_none());
    }

    #[test]
    fn egress_sources() {
        let p = parse(&with(
            "  egressGateway: {nodeSelector: {}, interface: eth1, egressIP: ''}\n",
        ))
        .unwrap();
        assert_eq!(p.gateways[0].egress, EgressSource::Interface("eth1".into()));
        let p = parse(&with(
            "  egressGateway: {nodeSelector: {}, egressIP: 192.0.2.1}\n",
        ))
        .unwrap();
        assert_eq!(
            p.gateways[0].egress,
            EgressSource::Ip(Ipv4Addr::new(192, 0, 2, 1))
        );
        assert_eq!(
            fields(parse(&with(
                "  egressGateway: {nodeSelector: {}, egressIP: '2001:db8::1'}\n"
            ))),
            ["spec.egressGateway.egressIP"]
        );
        assert_eq!(
            fields(parse(&with(
                "  egressGateway: {nodeSelector: {}, egressIP: 1.2.3.4, interface: eth0}\n"
            ))),
            ["spec.egressGateway"]
        );
        assert_eq!(
            fields(parse(&with("  egressGateway: {interface: eth0}\n"))),
            ["spec.egressGateway.nodeSelector"]
        );
    }

    #[test]
    fn cidr_errors() {
        let yaml = BASE.replace(
            r#"["10.1.2.3/16"]"#,
            r#"["198.51.100.0/33", "x", "2001:db8::/129", "10.0.0.1", "10.0.0.0/8"]"#,
        ) + "  egressGateway: {nodeSelector: {}}\n  excludedCIDRs: ['10.0.0.0/abc']\n";
        let errs = parse(&yaml).unwrap_err();
        let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown[0],
            r#"policy "p": spec.destinationCIDRs[0]: invalid CIDR "198.51.100.0/33": prefix length 33 is longer than 32"#
        );
        assert!(shown[1].starts_with(r#"policy "p": spec.destinationCIDRs[1]: invalid CIDR "x""#));
        assert!(
            shown[2].ends_with("prefix length 129 is longer than 128"),
            "{}",
            shown[2]
        );
        assert!(shown[3].contains("missing prefix length"));
        assert!(shown[4].starts_with(r#"policy "p": spec.excludedCIDRs[0]"#));
        assert_eq!(errs.len(), 5);
    }

    /// The most common shape of published policies, Cilium's documentation included: the
    /// IPv4 part is programmed, the IPv6 part kept aside (not programmed yet).
    #[test]
    fn dual_stack_policies_load_with_their_ipv6_part_aside() {
        let yaml = BASE.replace(r#"["10.1.2.3/16"]"#, r#"["0.0.0.0/0", "::/0"]"#)
            + "  egressGateway: {nodeSelector: {}}\n  excludedCIDRs: ['10.0.0.0/8', 'fd00::/8']\n";
        let p = parse(&yaml).unwrap();
        assert_eq!(p.destination_cidrs, vec!["0.0.0.0/0".parse().unwrap()]);
        assert_eq!(p.excluded_cidrs, vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(
            p.ipv6_cidrs,
            vec!["::/0".parse().unwrap(), "fd00::/8".parse().unwrap()]
        );
    }

    #[test]
    fn a_selector_with_only_a_node_selector_is_refused_as_cilium_does() {
        let yaml = BASE.replace(
            "selectors: [{podSelector: {matchLabels: {app: a}}}]",
            "selectors: [{nodeSelector: {matchLabels: {pool: batch}}}, {namespaceSelector: {}, nodeSelector: {}}]",
        ) + "  egressGateway: {nodeSelector: {}}\n";
        let errors = parse(&yaml).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "spec.selectors[0]");
        assert_eq!(errors[0].error, PolicyError::NodeSelectorOnly);
        assert!(
            errors[0]
                .to_string()
                .contains("podSelector or a namespaceSelector")
        );
    }

    #[test]
    fn egress_gateways_without_egress_gateway_is_refused_as_cilium_s_api_server_does() {
        let errors = parse(&with(
            "  egressGateways:\n  - {nodeSelector: {matchLabels: {n: a}}}\n",
        ))
        .unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, "spec.egressGateway");
        assert!(
            errors[0].to_string().contains("Required value"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn unknown_spec_fields_are_named_and_decode_errors_carry_the_field_path() {
        let yaml = with(
            "  egressGateway: {nodeSelector: {}, egressIp: 192.0.2.1}\n  excludedCIDR: [10.0.0.0/8]\nstatus: {anything: 1}\n",
        );
        let value: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        let decoded = decode(value).unwrap();
        assert_eq!(
            decoded.unknown_fields,
            ["spec.egressGateway.egressIp", "spec.excludedCIDR"]
        );
        assert!(
            validate(&decoded.raw).is_ok(),
            "unknown fields do not refuse a policy"
        );

        let bad = with("  egressGateway: {nodeSelector: {matchLabels: {x: true}}}\n");
        let error = decode(serde_yaml::from_str::<serde_yaml::Value>(&bad).unwrap()).unwrap_err();
        assert_eq!(error.path, "spec.egressGateway.nodeSelector.matchLabels.x");
        assert!(error.message.contains("expected a string"), "{error}");
        let json = serde_json::json!({"metadata": {"name": "p"}, "spec": {"selectors": "all"}});
        let error = decode(json).unwrap_err();
        assert_eq!(error.path, "spec.selectors");
    }

    #[test]
    fn required_fields() {
        assert_eq!(fields(parse(BASE)), ["spec.egressGateway"]);
        let empty = "metadata: {name: p}\nspec: {selectors: [], destinationCIDRs: [], egressGateways: []}\n";
        assert_eq!(
            fields(parse(empty)),
            [
                "spec.selectors",
                "spec.destinationCIDRs",
                "spec.egressGateway"
            ]
        );
        assert_eq!(fields(parse("metadata: {}\n")), ["metadata.name", "spec"]);
    }

    #[test]
    fn gateways_list_replaces_single_gateway_and_is_bounded() {
        let p = parse(&with(
            "  egressGateway: {nodeSelector: {}, interface: ignored}\n  egressGateways:\n  - {nodeSelector: {matchLabels: {n: a}}}\n  - {nodeSelector: {matchLabels: {n: b}}, interface: eth1}\n",
        ))
        .unwrap();
        assert_eq!(p.gateways.len(), 2);
        assert_eq!(p.gateways[1].egress, EgressSource::Interface("eth1".into()));

        let many = "  - {nodeSelector: {}}\n".repeat(65);
        let errs = parse(&with(&format!(
            "  egressGateway: {{nodeSelector: {{}}}}\n  egressGateways:\n{many}"
        )))
        .unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].error, PolicyError::TooManyGateways(65));
    }

    fn floating(annotation: &str, gateways: &str) -> Result<Policy, Vec<FieldError>> {
        let yaml = BASE.replace(
            "metadata: {name: p}",
            &format!(
                "metadata: {{name: p, annotations: {{egress-gateway.io/floating-egress-ip: {annotation}}}}}"
            ),
        );
        parse(&format!("{yaml}{gateways}"))
    }

    #[test]
    fn a_floating_egress_ip_is_the_one_spec_s_egress_ip_with_an_optional_interface() {
        let egress_ip = Ipv4Addr::new(192, 0, 2, 50);
        let p = floating(
            "'true'",
            "  egressGateway: {nodeSelector: {}, egressIP: 192.0.2.50}\n",
        )
        .unwrap();
        assert_eq!(
            p.gateways[0].egress,
            EgressSource::Floating {
                ip: egress_ip,
                interface: None
            }
        );
        assert_eq!(p.floating_egress(), Some((egress_ip, None)));
        // With the annotation the interface says where the address goes, so both may be given.
        let p = floating(
            "'true'",
            "  egressGateway: {nodeSelector: {}, egressIP: 192.0.2.50, interface: eth1}\n",
        )
        .unwrap();
        assert_eq!(p.floating_egress(), Some((egress_ip, Some("eth1"))));
        // "false", or no annotation: Cilium's semantics, both together still refused.
        let p = floating(
            "'false'",
            "  egressGateway: {nodeSelector: {}, egressIP: 192.0.2.50}\n",
        )
        .unwrap();
        assert_eq!(p.gateways[0].egress, EgressSource::Ip(egress_ip));
        assert_eq!(p.floating_egress(), None);
        assert_eq!(
            fields(floating(
                "'false'",
                "  egressGateway: {nodeSelector: {}, egressIP: 192.0.2.50, interface: eth1}\n"
            )),
            ["spec.egressGateway"]
        );
    }

    #[test]
    fn floating_refusals_name_the_annotation_and_the_reason() {
        let field = "metadata.annotations[egress-gateway.io/floating-egress-ip]";
        let one = "  egressGateway: {nodeSelector: {}, egressIP: 192.0.2.50}\n";
        let cases: [(&str, String, PolicyError); 5] = [
            (
                "'yes'",
                one.into(),
                PolicyError::FloatingValue("yes".into()),
            ),
            (
                "'True'",
                one.into(),
                PolicyError::FloatingValue("True".into()),
            ),
            (
                "'true'",
                format!(
                    "{one}  egressGateways:\n  - {{nodeSelector: {{}}, egressIP: 192.0.2.50}}\n"
                ),
                PolicyError::FloatingNeedsOneGateway,
            ),
            (
                "'true'",
                "  egressGateway: {nodeSelector: {}, interface: eth1}\n".into(),
                PolicyError::FloatingNeedsEgressIp,
            ),
            (
                "'true'",
                "  egressGateway: {nodeSelector: {}}\n".into(),
                PolicyError::FloatingNeedsEgressIp,
            ),
        ];
        for (annotation, gateways, error) in cases {
            let errors = floating(annotation, &gateways).unwrap_err();
            assert_eq!(errors.len(), 1, "{annotation} {gateways}: {errors:?}");
            assert_eq!(errors[0].field, field);
            assert_eq!(errors[0].error, error);
            let shown = errors[0].to_string();
            assert!(
                shown.starts_with(&format!("policy \"p\": {field}: ")),
                "{shown}"
            );
        }
        let shown = floating("'yes'", one).unwrap_err()[0].to_string();
        assert!(
            shown.ends_with(r#"must be "true" or "false", got "yes""#),
            "{shown}"
        );
        let shown =
            floating("'true'", "  egressGateway: {nodeSelector: {}}\n").unwrap_err()[0].to_string();
        assert!(
            shown.contains("needs spec.egressGateway.egressIP"),
            "{shown}"
        );
    }

    #[test]
    fn selector_errors_carry_full_paths() {
        let yaml = BASE.replace(
            "podSelector: {matchLabels: {app: a}}",
            "podSelector: {matchExpressions: [{key: app, operator: Equals, values: [x]}]}, nodeSelector: {matchLabels: {'bad key': x}}",
        ) + "  egressGateway: {nodeSelector: {matchExpressions: [{key: k, operator: In}]}}\n";
        assert_eq!(
            fields(parse(&yaml)),
            [
                "spec.selectors[0].podSelector.matchExpressions[0].operator",
                "spec.selectors[0].nodeSelector.matchLabels",
                "spec.egressGateway.nodeSelector.matchExpressions[0].values",
            ]
        );
    }
}
