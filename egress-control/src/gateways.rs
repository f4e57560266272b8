//! Which gateways a pod's traffic may leave through, in which order: candidates, the
//! rendezvous spreading of pods over `egressGateways[]`, and gateway groups.
//!
//! Failover happens in the datapath (a new flow takes the first healthy candidate of its
//! group), so the control plane's part is to hand every node the same ordered candidate list
//! for each pod, computed from the inventory alone: no node talks to another to agree on it.
//!
//! - A gateway spec's candidates are the nodes its nodeSelector matches that have an
//!   InternalIP, by name ([`spec_candidates`]): while all are healthy the first is used, as
//!   Cilium uses the first matching node by name.
//! - With several specs (`egressGateways[]`), each pod orders them by rendezvous
//!   (highest-random-weight) hashing ([`entry_order`]): a spec's score for a pod depends on
//!   that pod and that spec only, so a spec that loses every candidate, or every matching
//!   node, moves only the pods that ranked it first; with `hash % n`, changing `n` would
//!   move almost every pod.
//! - A pod's group is the candidates of its first spec, then those of the next ones
//!   ([`group_of`]): a spec with no healthy candidate hands its pods to the next spec in
//!   each pod's own order, which spreads them over the others instead of piling them onto one.
//! - Group ids are derived from the group's content ([`assign_group_ids`]): its candidates and
//!   its flags (`GROUP_POD_NODE_TRANSLATES` for a floating egress IP's, see
//!   [`crate::floating`]), so they are the same on every node and across reconciles, a
//!   failover or a reconcile never renumbers the `GATEWAY_GROUPS` map, and a floating group
//!   never shares an id with a plain group of the same candidates.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

pub use egress_common::gateway::MAX_CANDIDATES;

use crate::inventory::{Inventory, Node, Pod, Selector};

/// A node that can serve a gateway spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub node: &'a Node,
    /// The node's InternalIP: where the tunnel ends.
    pub ip: Ipv4Addr,
}

/// The candidates of a gateway spec: the nodes `selector` matches that have an InternalIP
/// (a node without one cannot terminate the tunnel), by name, at most [`MAX_CANDIDATES`]:
/// a group holds no more, and a spec's later nodes could never be reached (a spec's k-th
/// candidate is at least k-th in any group).
pub fn spec_candidates<'a>(inv: &'a Inventory, selector: &Selector) -> Vec<Candidate<'a>> {
    inv.gateway_candidates(selector)
        .filter_map(|node| node.internal_ip.map(|ip| Candidate { node, ip }))
        .take(MAX_CANDIDATES)
        .collect()
}

/// A pod's stable identity for spreading: FNV-1a (64-bit) of "namespace/name", the same on
/// every node and across restarts (std's hasher is randomly seeded per process).
pub fn pod_hash(pod: &Pod) -> u64 {
    fnv1a(&[pod.namespace.as_bytes(), b"/", pod.name.as_bytes()])
}

/// The rendezvous score of spec `entry` (its index in the policy) for a pod: splitmix64's
/// output for the pod's hash advanced `entry + 1` steps. FNV-1a alone mixes poorly (names
/// that differ in their last byte differ only in some bits), and splitmix64's finalizer
/// flips about half of the output bits for any input change, so scores of one pod's specs
/// look independent and every spec is first for about 1/n of the pods.
pub fn hrw_score(pod_hash: u64, entry: usize) -> u64 {
    mix64(pod_hash.wrapping_add((entry as u64 + 1).wrapping_mul(GOLDEN_GAMMA)))
}

/// The order in which a pod uses `entries` (spec indexes): highest score first, ties (never
/// seen with 64-bit scores, but possible) by index.
pub fn entry_order(pod_hash: u64, entries: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut order: Vec<usize> = entries.into_iter().collect();
    if order.len() > 1 {
        order.sort_by_cached_key(|&entry| (Reverse(hrw_score(pod_hash, entry)), entry));
    }
    order
}

/// A pod's group: the candidates of each spec in the pod's order, each node once (where it
/// first appears), at most [`MAX_CANDIDATES`].
pub fn group_of<'a, 'b>(
    specs_in_order: impl IntoIterator<Item = &'b [Candidate<'a>]>,
) -> Vec<Candidate<'a>>
where
    'a: 'b,
{
    let mut group: Vec<Candidate<'a>> = Vec::with_capacity(MAX_CANDIDATES);
    for candidate in specs_in_order.into_iter().flatten() {
        if group.len() == MAX_CANDIDATES {
            break;
        }
        if !group.iter().any(|c| c.ip == candidate.ip) {
            group.push(*candidate);
        }
    }
    group
}

/// A group's content: its candidates in order of preference, and its
/// `GatewayGroup::flags`.
pub type GroupKey = (Vec<Ipv4Addr>, u32);

/// The id a group's content hashes to (before collisions are resolved; may be 0, which
/// [`assign_group_ids`] never hands out): FNV-1a over the candidates' octets in order, the
/// flags mixed in (a multiple of the golden gamma, so flags 0 leave the hash as it was
/// before groups had flags: nodes of both versions agree during a rolling update),
/// finalized as [`hrw_score`] is and folded to 32 bits.
pub fn group_id_hash(candidates: &[Ipv4Addr], flags: u32) -> u32 {
    let octets: Vec<u8> = candidates.iter().flat_map(Ipv4Addr::octets).collect();
    let hash = mix64(fnv1a(&[&octets]) ^ u64::from(flags).wrapping_mul(GOLDEN_GAMMA));
    (hash ^ (hash >> 32)) as u32
}

/// Ids of `groups` (candidates, flags), never 0 (0 means "no group"): each takes its
/// [`group_id_hash`], or, when that is 0 or already taken by another group, the next free
/// id (linear probing, wrapping), groups taken in sorted order. Every node sees the same
/// groups (all pods are programmed cluster-wide), so every node gives a group the same id;
/// an id changes only if a new group collides with it and sorts before it (odds about
/// groups² / 2³³). Two groups differing only in their flags get different ids.
pub fn assign_group_ids<'l>(
    groups: impl IntoIterator<Item = (&'l [Ipv4Addr], u32)>,
) -> BTreeMap<GroupKey, u32> {
    assign_ids_with(groups, group_id_hash)
}

fn assign_ids_with<'l>(
    groups: impl IntoIterator<Item = (&'l [Ipv4Addr], u32)>,
    hash: impl Fn(&[Ipv4Addr], u32) -> u32,
) -> BTreeMap<GroupKey, u32> {
    let sorted: BTreeSet<(&[Ipv4Addr], u32)> = groups.into_iter().collect();
    let mut taken = BTreeSet::new();
    sorted
        .into_iter()
        .map(|(list, flags)| {
            let mut id = hash(list, flags);
            while id == 0 || !taken.insert(id) {
                id = id.wrapping_add(1);
            }
            ((list.to_vec(), flags), id)
        })
        .collect()
}

/// Numbers groups while policies are evaluated, before all of them are known (ids depend on
/// the whole set, see [`assign_group_ids`]): a provisional id is 1 + the group's index in
/// order of first use, so equal values still mean equal entries when policies are merged,
/// and [`GroupInterner::finish`] maps provisional ids to final ones.
#[derive(Default)]
pub(crate) struct GroupInterner {
    ids: BTreeMap<GroupKey, u32>,
    keys: Vec<GroupKey>,
}

/// What [`GroupInterner::finish`] gives.
pub(crate) struct Groups {
    /// Final id of each provisional id (index: provisional id - 1).
    pub(crate) final_ids: Vec<u32>,
    /// Candidates by final id.
    pub(crate) candidates: BTreeMap<u32, Vec<Ipv4Addr>>,
    /// Flags by final id, only the non-zero ones.
    pub(crate) flags: BTreeMap<u32, u32>,
}

impl GroupInterner {
    /// The provisional id of `group` with `flags` (never 0).
    pub(crate) fn intern(&mut self, group: &[Candidate<'_>], flags: u32) -> u32 {
        let key: GroupKey = (group.iter().map(|c| c.ip).collect(), flags);
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        self.keys.push(key.clone());
        let id = self.keys.len() as u32;
        self.ids.insert(key, id);
        id
    }

    /// The final ids, and the groups by final id.
    pub(crate) fn finish(self) -> Groups {
        let ids = assign_group_ids(
            self.keys
                .iter()
                .map(|(list, flags)| (list.as_slice(), *flags)),
        );
        let final_ids = self.keys.iter().map(|key| ids[key]).collect();
        let mut groups = Groups {
            final_ids,
            candidates: BTreeMap::new(),
            flags: BTreeMap::new(),
        };
        for ((list, flags), id) in ids {
            groups.candidates.insert(id, list);
            if flags != 0 {
                groups.flags.insert(id, flags);
            }
        }
        groups
    }
}

/// splitmix64's increment: 2⁶⁴ / φ, odd.
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// FNV-1a (64-bit) over the concatenation of `parts`.
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// splitmix64's finalizer (Steele, Lea and Flood, 2014).
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use egress_common::gateway::GROUP_POD_NODE_TRANSLATES;

    use super::*;
    use crate::inventory::test_support::{labels, node, pod};

    /// A small deterministic generator (splitmix64) for the randomized tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            mix64(self.0)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn hash_of(namespace: &str, name: &str) -> u64 {
        pod_hash(&pod(namespace, name, "n1", [10, 1, 0, 1], &[]))
    }

    #[test]
    fn candidates_are_matching_nodes_with_an_ip_by_name_at_most_eight() {
        let mut inv = Inventory::default();
        for i in (0..12u8).rev() {
            inv.upsert_node(node(
                &format!("gw-{i:02}"),
                Some([10, 0, 0, i]),
                &[("gw", "y")],
            ));
        }
        inv.upsert_node(node("gw-000", None, &[("gw", "y")]));
        inv.upsert_node(node("aaa", Some([10, 0, 1, 1]), &[("gw", "n")]));
        let selector = Selector {
            match_labels: labels(&[("gw", "y")]),
            ..Default::default()
        };
        let names: Vec<&str> = spec_candidates(&inv, &selector)
            .iter()
            .map(|c| c.node.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "gw-00", "gw-01", "gw-02", "gw-03", "gw-04", "gw-05", "gw-06", "gw-07"
            ]
        );
        assert_eq!(inv.gateway_node(&selector).unwrap().name, "gw-00");
    }

    #[test]
    fn hrw_spreads_pods_evenly_over_three_entries() {
        let mut first = [0usize; 3];
        for i in 0..1000 {
            first[entry_order(hash_of("crawl", &format!("crawler-{i}")), 0..3)[0]] += 1;
        }
        for count in first {
            assert!((250..=420).contains(&count), "{first:?}");
        }
    }

    #[test]
    fn entry_order_is_a_permutation_and_deterministic() {
        let h = hash_of("default", "web");
        let order = entry_order(h, [4, 0, 2]);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 2, 4]);
        assert_eq!(entry_order(h, [2, 4, 0]), order);
        assert_eq!(entry_order(h, [3]), [3]);
        assert!(entry_order(h, []).is_empty());
    }

    /// Rendezvous hashing's promise, over many random pods and entry counts: dropping one
    /// entry moves exactly the pods that ranked it first, and leaves every pod's order of
    /// the other entries as it was (so the datapath, failing over by health along the old
    /// order, picks what a recomputed state would).
    #[test]
    fn removing_an_entry_moves_only_the_pods_that_had_it_first() {
        let mut rng = Rng(12);
        for seed in 0..300 {
            let entries = 2 + rng.below(4);
            let removed = rng.below(entries);
            let mut moved = 0;
            for p in 0..50 {
                let name = format!("pod-{seed}-{p}-{}", rng.next());
                let h = hash_of("ns", &name);
                let before = entry_order(h, 0..entries);
                let after = entry_order(h, (0..entries).filter(|&e| e != removed));
                let kept: Vec<usize> = before.iter().copied().filter(|&e| e != removed).collect();
                assert_eq!(after, kept, "seed {seed} pod {name}");
                assert_eq!(after[0] != before[0], before[0] == removed);
                moved += usize::from(before[0] == removed);
            }
            assert!(
                moved < 50,
                "seed {seed}: every pod ranked entry {removed} first"
            );
        }
    }

    fn candidates(nodes: &[Node]) -> Vec<Candidate<'_>> {
        nodes
            .iter()
            .map(|node| Candidate {
                node,
                ip: node.internal_ip.unwrap(),
            })
            .collect()
    }

    #[test]
    fn group_concatenates_in_order_without_duplicates_up_to_eight() {
        let nodes: Vec<Node> = (0..12u8)
            .map(|i| node(&format!("n{i}"), Some([10, 0, 0, i]), &[]))
            .collect();
        let all = candidates(&nodes);
        let ips = |group: &[Candidate<'_>]| -> Vec<u8> {
            group.iter().map(|c| c.ip.octets()[3]).collect()
        };
        let group = group_of([&all[3..5], &all[0..4], &all[6..7]]);
        assert_eq!(ips(&group), [3, 4, 0, 1, 2, 6]);
        let group = group_of([&all[0..6], &all[4..12]]);
        assert_eq!(ips(&group), [0, 1, 2, 3, 4, 5, 6, 7]);
        assert!(group_of([&all[0..0]]).is_empty());
    }

    #[test]
    fn group_ids_come_from_the_content_alone() {
        let list = |octets: &[u8]| -> Vec<Ipv4Addr> {
            octets.iter().map(|&o| Ipv4Addr::new(10, 0, 0, o)).collect()
        };
        let (ab, ba, c) = (list(&[1, 2]), list(&[2, 1]), list(&[3]));
        let plain = |l: &Vec<Ipv4Addr>| (l.clone(), 0);
        let alone = assign_group_ids([(ab.as_slice(), 0)]);
        let among = assign_group_ids([&c, &ba, &ab, &c].map(|l| (l.as_slice(), 0)));
        assert_eq!(alone[&plain(&ab)], group_id_hash(&ab, 0));
        assert_eq!(among[&plain(&ab)], alone[&plain(&ab)]);
        assert_eq!(among.len(), 3);
        // The order of the candidates is part of the content.
        assert_ne!(among[&plain(&ab)], among[&plain(&ba)]);
        assert!(among.values().all(|&id| id != 0));
        // So are the flags: a floating group never shares a plain group's id, and adding it
        // leaves the plain group's id alone.
        let floating = (ab.clone(), GROUP_POD_NODE_TRANSLATES);
        let both = assign_group_ids([(ab.as_slice(), 0), (ab.as_slice(), floating.1)]);
        assert_eq!(both.len(), 2);
        assert_eq!(both[&plain(&ab)], alone[&plain(&ab)]);
        assert_ne!(both[&floating], both[&plain(&ab)]);
        assert_eq!(both[&floating], group_id_hash(&ab, floating.1));
    }

    /// Pinned values (computed independently): hashes must not change between releases,
    /// since nodes of two versions meet during a rolling update and must agree.
    #[test]
    fn hashes_are_pinned() {
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        let h = hash_of("default", "web");
        assert_eq!(h, 0x9d2b_a508_24d6_34bb);
        let scores: Vec<u64> = (0..3).map(|entry| hrw_score(h, entry)).collect();
        assert_eq!(
            scores,
            [
                0x5fb7_4f92_68a0_3ccf,
                0x7f80_1e56_3ebd_6ceb,
                0x4d54_9b1f_da73_7b31
            ]
        );
        assert_eq!(entry_order(h, 0..3), [1, 0, 2]);
        let group = [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)];
        // Flags 0: the id groups had before they had flags.
        assert_eq!(group_id_hash(&group, 0), 0xcfe2_11c5);
        assert_eq!(
            group_id_hash(&group, GROUP_POD_NODE_TRANSLATES),
            0x3648_519f
        );
    }

    #[test]
    fn group_id_collisions_probe_linearly_in_sorted_order_and_skip_zero() {
        let lists: Vec<Vec<Ipv4Addr>> = (1..=3u8)
            .rev()
            .map(|o| vec![Ipv4Addr::new(10, 0, 0, o)])
            .collect();
        let slices = || lists.iter().map(|l| (l.as_slice(), 0));
        let ids = assign_ids_with(slices(), |_, _| 7);
        let by_list: Vec<u32> = ids.values().copied().collect();
        assert_eq!(by_list, [7, 8, 9]);
        let ids = assign_ids_with(slices(), |_, _| u32::MAX);
        assert_eq!(ids.values().copied().collect::<Vec<_>>(), [u32::MAX, 1, 2]);
        let ids = assign_ids_with(slices(), |_, _| 0);
        assert_eq!(ids.values().copied().collect::<Vec<_>>(), [1, 2, 3]);
        // Same candidates, flags apart: the plain group sorts first and keeps the hash.
        let one = lists[2].as_slice();
        let ids = assign_ids_with([(one, GROUP_POD_NODE_TRANSLATES), (one, 0)], |_, _| 7);
        assert_eq!(ids[&(one.to_vec(), 0)], 7);
        assert_eq!(ids[&(one.to_vec(), GROUP_POD_NODE_TRANSLATES)], 8);
    }

    #[test]
    fn interner_maps_provisional_ids_to_final_ones() {
        let nodes: Vec<Node> = (1..=2u8)
            .map(|i| node(&format!("n{i}"), Some([10, 0, 0, i]), &[]))
            .collect();
        let all = candidates(&nodes);
        let mut interner = GroupInterner::default();
        let first = interner.intern(&all, 0);
        let second = interner.intern(&all[1..], 0);
        let floating = interner.intern(&all, GROUP_POD_NODE_TRANSLATES);
        assert_eq!(interner.intern(&all, 0), first);
        assert_eq!((first, second, floating), (1, 2, 3));
        let Groups {
            final_ids,
            candidates,
            flags,
        } = interner.finish();
        let ab = vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)];
        assert_eq!(candidates[&final_ids[0]], ab);
        assert_eq!(
            final_ids[0],
            assign_group_ids([(ab.as_slice(), 0)])[&(ab.clone(), 0)]
        );
        assert_eq!(candidates[&final_ids[1]], [Ipv4Addr::new(10, 0, 0, 2)]);
        assert_eq!(candidates[&final_ids[2]], ab);
        assert_ne!(final_ids[2], final_ids[0]);
        // Only the non-zero flags are listed.
        assert_eq!(
            flags,
            BTreeMap::from([(final_ids[2], GROUP_POD_NODE_TRANSLATES)])
        );
    }
}
