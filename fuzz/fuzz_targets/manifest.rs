//! Bytes -> one manifest file -> inventory -> desired state: never a panic, and what loads
//! is valid.

#![no_main]

use std::path::Path;

use egress_control::{
    desired::{LocalNetwork, desired_state},
    parse,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The loader reads files as UTF-8 and refuses others before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let loaded = parse::load_text(Path::new("fuzz.yaml"), text);
    for error in &loaded.errors {
        assert!(!error.to_string().is_empty());
    }
    let inventory = &loaded.inventory;
    for (name, policy) in &inventory.policies {
        assert_eq!(name, &policy.name);
        assert!(!name.is_empty());
        assert!(!policy.selectors.is_empty(), "{name}: no selectors");
        assert!(!policy.gateways.is_empty(), "{name}: no gateways");
        assert!(
            !policy.destination_cidrs.is_empty(),
            "{name}: no destinations"
        );
        for cidrs in [&policy.destination_cidrs, &policy.excluded_cidrs] {
            assert!(
                cidrs.windows(2).all(|w| w[0] < w[1]),
                "{name}: {cidrs:?} not sorted"
            );
            assert!(
                cidrs.iter().all(|c| c.trunc() == *c),
                "{name}: host bits in {cidrs:?}"
            );
        }
    }
    // Whatever loaded computes a desired state on any node, and fits any map size.
    let nodes = inventory.nodes.keys().map(String::as_str).take(2);
    for node in nodes.chain(["not-in-the-inventory"]) {
        let mut state = desired_state(inventory, node, &LocalNetwork::default());
        let wanted = state.policy_entries.len();
        for capacity in [0, 1, 3] {
            let mut fitted = state.clone();
            let fit = fitted.fit_policy_map(capacity);
            assert_eq!(fit.wanted, wanted);
            assert!(fitted.policy_entries.len() <= capacity);
            assert_eq!(fitted.policy_entries.len(), wanted - fit.dropped);
            for (key, value) in &fitted.policy_entries {
                assert_eq!(state.policy_entries.get(key), Some(value));
            }
        }
        state.fit_policy_map(usize::MAX);
    }
});
