//! Expiry of NAT and flow-tracking entries. The maps never evict (a full one refuses new
//! flows), so entries of finished flows must go: closed TCP connections after a short grace
//! period, half-closed ones and idle flows after their timeouts. A port whose remote may
//! still hold TIME_WAIT stays held a while. Each pass also counts what stays, for the maps'
//! pressure gauges.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use aya::maps::{HashMap, MapData, MapError};
use egress_common::{
    counters::reason,
    flow::{
        FLOW_REMOTE_CLOSED_FIRST, FLOW_RESET, FlowKey, InboundFlow, PROTO_TCP, SteeredFlow,
        TcpState,
    },
    map_names,
    nat::{NAT_TIME_WAIT, NatForward, NatReverse, TIME_WAIT_SECS},
};

use super::{Datapath, DatapathError, pinned, sync::ignore_missing};

/// `bpf_map_update_elem` flag: only overwrite an entry that exists.
const BPF_EXIST: u64 = 2;

/// How long entries may stay idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connections closed by both FINs or an RST (late retransmissions still find their
    /// entry).
    pub tcp_closing: Duration,
    /// TCP connections one side half-closed, while the other may go on sending (conntrack's
    /// FIN_WAIT is 2 minutes too).
    pub tcp_half_closed: Duration,
    /// Established TCP connections without traffic.
    pub tcp_idle: Duration,
    /// UDP and ICMP flows without traffic.
    pub other_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_closing: Duration::from_secs(10),
            tcp_half_closed: Duration::from_mins(2),
            tcp_idle: Duration::from_hours(6),
            other_idle: Duration::from_mins(1),
        }
    }
}

impl Timeouts {
    fn limit(&self, protocol: u8, flags: u32) -> Duration {
        if protocol != PROTO_TCP {
            return self.other_idle;
        }
        match TcpState::of(flags) {
            TcpState::Open => self.tcp_idle,
            TcpState::HalfClosed => self.tcp_half_closed,
            TcpState::Closed => self.tcp_closing,
        }
    }

    fn expired(&self, protocol: u8, flags: u32, last_seen_ns: u64, now_ns: u64) -> bool {
        now_ns.saturating_sub(last_seen_ns) > self.limit(protocol, flags).as_nanos() as u64
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub nat_expired: usize,
    pub flows_expired: usize,
    /// Entries left in each flow and NAT map after the pass.
    pub entries: BTreeMap<&'static str, usize>,
}

/// What one pass does to the NAT maps, planned from their contents.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct NatPlan {
    pub(super) remove_forward: Vec<FlowKey>,
    pub(super) remove_reverse: Vec<FlowKey>,
    /// Reverse entries of ended flows kept as TIME_WAIT holds of their port.
    pub(super) hold_reverse: Vec<FlowKey>,
    /// Entries each map keeps.
    pub(super) forward_left: usize,
    pub(super) reverse_left: usize,
}

/// What bounds the TIME_WAIT holds of one pass: a hold is a courtesy to the remote, a new
/// flow is what the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct HoldLimit {
    /// Flows were refused for want of a port, or of room in a map, since the last pass:
    /// every hold goes.
    pub refused: bool,
    /// `NAT_REVERSE`'s capacity: holds give way, oldest first, so that a quarter of it stays
    /// free for the flows that start before the next pass.
    pub reverse_capacity: usize,
}

impl HoldLimit {
    /// Entries the reverse map may keep after a pass before holds give way.
    fn reverse_keep(&self) -> usize {
        self.reverse_capacity - self.reverse_capacity / 4
    }
}

/// Plans a pass over the NAT maps. A pair is as fresh as its newer half (replies refresh
/// only the reverse entry, and a flow where the remote does all the sending must live on)
/// and expires by its TCP state. A connection the remote closed first keeps its reverse
/// entry for `TIME_WAIT_SECS` as a hold on the port, within `limit`. A reverse entry
/// without its forward twin goes once idle for the closing timeout.
pub(super) fn plan_nat(
    forward: &[(FlowKey, NatForward)],
    reverse: &BTreeMap<FlowKey, NatReverse>,
    timeouts: &Timeouts,
    now_ns: u64,
    limit: HoldLimit,
) -> NatPlan {
    let reclaim_holds = limit.refused;
    let mut plan = NatPlan::default();
    // Reverse keys already decided: live twins, and the halves of expired pairs.
    let mut decided = BTreeSet::new();
    for (flow, nat) in forward {
        let reply = flow.translated_reply(nat.nat_ip, nat.nat_port);
        // The entry at the reply key is the twin only if it names the flow's pod: once a
        // half was lost, the key may serve another flow.
        let twin = reverse
            .get(&reply)
            .filter(|entry| entry.pod_ip == flow.src_ip && entry.pod_port == flow.src_port);
        let last_seen = twin.map_or(nat.last_seen_ns, |entry| {
            entry.last_seen_ns.max(nat.last_seen_ns)
        });
        if !timeouts.expired(flow.protocol, nat.flags, last_seen, now_ns) {
            decided.insert(reply);
            continue;
        }
        plan.remove_forward.push(*flow);
        if twin.is_some() && decided.insert(reply) {
            let remote_holds_time_wait = flow.protocol == PROTO_TCP
                && nat.flags & FLOW_REMOTE_CLOSED_FIRST != 0
                && nat.flags & FLOW_RESET == 0;
            if remote_holds_time_wait && !reclaim_holds {
                plan.hold_reverse.push(reply);
            } else {
                plan.remove_reverse.push(reply);
            }
        }
    }
    let time_wait = Duration::from_secs(TIME_WAIT_SECS).as_nanos() as u64;
    let orphan_idle = timeouts.tcp_closing.as_nanos() as u64;
    for (reply, entry) in reverse {
        if decided.contains(reply) {
            continue;
        }
        let idle = now_ns.saturating_sub(entry.last_seen_ns);
        let gone = if entry.flags & NAT_TIME_WAIT == 0 {
            idle > orphan_idle
        } else {
            reclaim_holds || idle > time_wait
        };
        if gone {
            plan.remove_reverse.push(*reply);
        }
    }
    make_room(&mut plan, reverse, limit);
    plan.forward_left = forward.len() - plan.remove_forward.len();
    plan.reverse_left = reverse.len() - plan.remove_reverse.len();
    plan
}

/// Gives up holds, oldest first (the ones this pass starts are the newest), until the
/// reverse map keeps no more than `limit` allows: a map run full by holds refuses a flow
/// before the next pass could free them.
fn make_room(plan: &mut NatPlan, reverse: &BTreeMap<FlowKey, NatReverse>, limit: HoldLimit) {
    let left = reverse.len() - plan.remove_reverse.len();
    let mut excess = left.saturating_sub(limit.reverse_keep());
    if excess == 0 {
        return;
    }
    let removed: BTreeSet<FlowKey> = plan.remove_reverse.iter().copied().collect();
    let mut old_holds: Vec<(u64, FlowKey)> = reverse
        .iter()
        .filter(|(reply, entry)| entry.flags & NAT_TIME_WAIT != 0 && !removed.contains(reply))
        .map(|(reply, entry)| (entry.last_seen_ns, *reply))
        .collect();
    old_holds.sort_unstable();
    for (_, reply) in old_holds.into_iter().take(excess) {
        plan.remove_reverse.push(reply);
        excess -= 1;
    }
    let given_up = excess.min(plan.hold_reverse.len());
    plan.remove_reverse
        .extend(plan.hold_reverse.drain(..given_up));
}

/// Nanoseconds on the clock `bpf_ktime_get_ns` uses.
pub fn monotonic_now_ns() -> u64 {
    // SAFETY: timespec is plain data, filled by the call.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    now.tv_sec.cast_unsigned() * 1_000_000_000 + now.tv_nsec.cast_unsigned()
}

impl Datapath {
    /// Removes expired entries: NAT pairs together (see [`plan_nat`]), then steered and
    /// inbound flows.
    pub fn collect_garbage(
        &mut self,
        timeouts: &Timeouts,
        now_ns: u64,
    ) -> Result<GcStats, DatapathError> {
        let mut stats = GcStats::default();
        let map_err =
            |name: &'static str| move |source: MapError| DatapathError::Map { name, source };

        // Flows refused for want of a port or of room since the last pass: the ports held
        // for TIME_WAIT are given up first.
        let counters = pinned::counters(&self.pins)?;
        let refused = [reason::DROP_NAT_EXHAUSTED, reason::DROP_FLOW_TABLE_FULL]
            .iter()
            .filter_map(|reason| counters.get(*reason as usize))
            .map(|counter| counter.packets)
            .sum::<u64>();
        let limit = HoldLimit {
            refused: refused > self.refused_flows_seen,
            reverse_capacity: pinned::capacity(&self.pins, map_names::NAT_REVERSE)? as usize,
        };
        self.refused_flows_seen = refused;

        let reverse: HashMap<&mut MapData, FlowKey, NatReverse> =
            self.map_mut(map_names::NAT_REVERSE)?;
        let reverse_entries: BTreeMap<FlowKey, NatReverse> =
            reverse.iter().filter_map(Result::ok).collect();
        let forward: HashMap<&mut MapData, FlowKey, NatForward> =
            self.map_mut(map_names::NAT_FORWARD)?;
        let forward_entries: Vec<(FlowKey, NatForward)> =
            forward.iter().filter_map(Result::ok).collect();
        let plan = plan_nat(&forward_entries, &reverse_entries, timeouts, now_ns, limit);

        // Holds first: once the forward half is gone, the datapath may rebuild around the
        // reverse one (and clears the hold when it does).
        let mut reverse: HashMap<&mut MapData, FlowKey, NatReverse> =
            self.map_mut(map_names::NAT_REVERSE)?;
        for reply in &plan.hold_reverse {
            if let Some(entry) = reverse_entries.get(reply) {
                let held = NatReverse {
                    flags: NAT_TIME_WAIT,
                    last_seen_ns: now_ns,
                    ..*entry
                };
                // Gone meanwhile: nothing to hold.
                let _ = reverse.insert(reply, held, BPF_EXIST);
            }
        }
        for reply in &plan.remove_reverse {
            let was_held = reverse_entries
                .get(reply)
                .is_some_and(|entry| entry.flags & NAT_TIME_WAIT != 0);
            // A held port the datapath gave to a new connection meanwhile (it clears the
            // flag when it adopts the entry) is that connection's now.
            if was_held
                && reverse
                    .get(reply, 0)
                    .is_ok_and(|entry| entry.flags & NAT_TIME_WAIT == 0)
            {
                continue;
            }
            ignore_missing(reverse.remove(reply)).map_err(map_err(map_names::NAT_REVERSE))?;
        }
        let mut forward: HashMap<&mut MapData, FlowKey, NatForward> =
            self.map_mut(map_names::NAT_FORWARD)?;
        for flow in &plan.remove_forward {
            ignore_missing(forward.remove(flow)).map_err(map_err(map_names::NAT_FORWARD))?;
        }
        stats.nat_expired = plan.remove_forward.len();
        stats
            .entries
            .insert(map_names::NAT_FORWARD, plan.forward_left);
        stats
            .entries
            .insert(map_names::NAT_REVERSE, plan.reverse_left);

        let (expired, left) = self
            .expire_flows::<SteeredFlow>(map_names::STEERED_FLOWS, |flow, entry| {
                timeouts.expired(flow.protocol, entry.flags, entry.last_seen_ns, now_ns)
            })?;
        stats.flows_expired = expired;
        stats.entries.insert(map_names::STEERED_FLOWS, left);
        let (expired, left) = self
            .expire_flows::<InboundFlow>(map_names::INBOUND_FLOWS, |flow, entry| {
                timeouts.expired(flow.protocol, 0, entry.last_seen_ns, now_ns)
            })?;
        stats.flows_expired += expired;
        stats.entries.insert(map_names::INBOUND_FLOWS, left);
        Ok(stats)
    }

    /// Removes the entries of a flow-tracking map that `expired` selects; returns how many
    /// went and how many stay.
    fn expire_flows<V: aya::Pod>(
        &mut self,
        name: &'static str,
        expired: impl Fn(&FlowKey, &V) -> bool,
    ) -> Result<(usize, usize), DatapathError> {
        let mut map: HashMap<&mut MapData, FlowKey, V> = self.map_mut(name)?;
        let mut total = 0;
        let keys: Vec<FlowKey> = map
            .iter()
            .filter_map(Result::ok)
            .inspect(|_| total += 1)
            .filter(|(flow, entry)| expired(flow, entry))
            .map(|(flow, _)| flow)
            .collect();
        for flow in &keys {
            ignore_missing(map.remove(flow))
                .map_err(|source| DatapathError::Map { name, source })?;
        }
        Ok((keys.len(), total - keys.len()))
    }
}

#[cfg(test)]
mod tests {
    use egress_common::flow::{
        FLOW_FIN_FROM_POD, FLOW_FIN_FROM_REMOTE, PROTO_UDP, close_event, with_close_event,
    };

    use super::*;

    const S: u64 = 1_000_000_000;
    const NOW: u64 = 100_000 * S;
    const FIN: u8 = 0x01;
    const RST: u8 = 0x04;

    #[test]
    fn expiry_depends_on_protocol_and_tcp_state() {
        let t = Timeouts::default();
        let closed = FLOW_FIN_FROM_POD | FLOW_FIN_FROM_REMOTE;
        assert!(!t.expired(PROTO_TCP, 0, NOW - 3600 * S, NOW));
        assert!(t.expired(PROTO_TCP, 0, NOW - 7 * 3600 * S, NOW));
        assert!(t.expired(PROTO_TCP, closed, NOW - 11 * S, NOW));
        assert!(t.expired(PROTO_TCP, FLOW_RESET, NOW - 11 * S, NOW));
        assert!(!t.expired(PROTO_TCP, closed, NOW - 5 * S, NOW));
        // Half-closed: the other side may still be sending.
        assert!(!t.expired(PROTO_TCP, FLOW_FIN_FROM_POD, NOW - 60 * S, NOW));
        assert!(t.expired(PROTO_TCP, FLOW_FIN_FROM_REMOTE, NOW - 121 * S, NOW));
        assert!(t.expired(PROTO_UDP, 0, NOW - 61 * S, NOW));
        assert!(!t.expired(PROTO_UDP, 0, NOW - 30 * S, NOW));
        // Entries stamped after `now` (clock read earlier) are not expired.
        assert!(!t.expired(PROTO_UDP, 0, NOW + S, NOW));
    }

    fn pair(
        pod_port: u16,
        nat_port: u16,
        flags: u32,
        idle_secs: u64,
    ) -> (FlowKey, NatForward, NatReverse) {
        let flow = FlowKey {
            src_ip: [10, 0, 1, 5],
            dst_ip: [198, 51, 100, 10],
            src_port: pod_port.to_be_bytes(),
            dst_port: 443u16.to_be_bytes(),
            protocol: PROTO_TCP,
            _pad: [0; 3],
        };
        let last_seen_ns = NOW - idle_secs * S;
        let forward = NatForward {
            nat_ip: [192, 0, 2, 100],
            nat_port: nat_port.to_be_bytes(),
            pod_node_ip: [192, 0, 2, 1],
            flags,
            last_seen_ns,
            ..NatForward::default()
        };
        let reverse = NatReverse {
            pod_ip: flow.src_ip,
            pod_port: flow.src_port,
            pod_node_ip: forward.pod_node_ip,
            last_seen_ns,
            ..NatReverse::default()
        };
        (flow, forward, reverse)
    }

    fn plan(pairs: &[(FlowKey, NatForward, NatReverse)], reclaim_holds: bool) -> NatPlan {
        let forward: Vec<_> = pairs.iter().map(|(flow, nat, _)| (*flow, *nat)).collect();
        let reverse: BTreeMap<_, _> = pairs
            .iter()
            .map(|(flow, nat, reverse)| (flow.translated_reply(nat.nat_ip, nat.nat_port), *reverse))
            .collect();
        plan_nat(
            &forward,
            &reverse,
            &Timeouts::default(),
            NOW,
            limit(reclaim_holds),
        )
    }

    /// A limit that only refusals reach.
    fn limit(refused: bool) -> HoldLimit {
        HoldLimit {
            refused,
            reverse_capacity: 1 << 20,
        }
    }

    fn closed(first: bool, second: bool) -> u32 {
        // `first` and `second`: whether the pod sent the first and the second FIN.
        let one = with_close_event(0, close_event(FIN, first));
        with_close_event(one, close_event(FIN, second))
    }

    #[test]
    fn a_port_the_remote_holds_in_time_wait_stays_held_then_goes() {
        let remote_first = pair(40000, 5000, closed(false, true), 11);
        let plan = plan(&[remote_first], false);
        assert_eq!(plan.remove_forward, vec![remote_first.0]);
        assert_eq!(
            plan.hold_reverse,
            vec![
                remote_first
                    .0
                    .translated_reply(remote_first.1.nat_ip, remote_first.1.nat_port)
            ]
        );
        assert!(plan.remove_reverse.is_empty());
        assert_eq!((plan.forward_left, plan.reverse_left), (0, 1));

        // The hold itself goes after TIME_WAIT_SECS, or at once when ports ran out.
        let reply = remote_first
            .0
            .translated_reply(remote_first.1.nat_ip, remote_first.1.nat_port);
        let held = |idle_secs: u64| {
            BTreeMap::from([(
                reply,
                NatReverse {
                    flags: NAT_TIME_WAIT,
                    last_seen_ns: NOW - idle_secs * S,
                    ..remote_first.2
                },
            )])
        };
        let t = Timeouts::default();
        assert!(
            plan_nat(&[], &held(30), &t, NOW, limit(false))
                .remove_reverse
                .is_empty()
        );
        assert_eq!(
            plan_nat(&[], &held(61), &t, NOW, limit(false)).remove_reverse,
            vec![reply]
        );
        assert_eq!(
            plan_nat(&[], &held(30), &t, NOW, limit(true)).remove_reverse,
            vec![reply]
        );
    }

    #[test]
    fn ports_of_resets_and_of_pods_that_closed_first_are_freed_at_once() {
        let pod_first = pair(40000, 5000, closed(true, false), 11);
        let reset = pair(
            40001,
            5001,
            with_close_event(0, close_event(RST, false)),
            11,
        );
        let short = pair(40002, 5002, closed(false, true), 11);
        let plan_free = plan(&[pod_first, reset], false);
        assert!(plan_free.hold_reverse.is_empty());
        assert_eq!(plan_free.remove_reverse.len(), 2);
        // A remote's TIME_WAIT yields when no other port is free.
        let plan_short = plan(&[short], true);
        assert!(plan_short.hold_reverse.is_empty());
        assert_eq!(plan_short.remove_reverse.len(), 1);
    }

    #[test]
    fn holds_give_way_oldest_first_before_the_reverse_map_runs_full() {
        // Of a capacity of eight, a quarter stays free: six entries may stay.
        let limit = HoldLimit {
            refused: false,
            reverse_capacity: 8,
        };
        let held = |port: u16, idle_secs: u64| {
            let (flow, nat, reverse) = pair(40000 + port, 5000 + port, 0, 0);
            (
                flow.translated_reply(nat.nat_ip, nat.nat_port),
                NatReverse {
                    flags: NAT_TIME_WAIT,
                    last_seen_ns: NOW - idle_secs * S,
                    ..reverse
                },
            )
        };
        let mut reverse: BTreeMap<_, _> = (0..5)
            .map(|port| held(port, 10 + u64::from(port)))
            .collect();
        // A live pair and a connection the remote just closed (a new hold).
        let live = pair(41000, 6000, 0, 1);
        let closing = pair(41001, 6001, closed(false, true), 11);
        for (flow, nat, entry) in [live, closing] {
            reverse.insert(flow.translated_reply(nat.nat_ip, nat.nat_port), entry);
        }
        let forward = [(live.0, live.1), (closing.0, closing.1)];
        let plan = plan_nat(&forward, &reverse, &Timeouts::default(), NOW, limit);
        // Seven entries, six may stay: the oldest hold (port 4, idle 14 s) goes.
        assert_eq!(plan.remove_reverse, vec![held(4, 14).0]);
        assert_eq!(plan.hold_reverse.len(), 1);
        assert_eq!(plan.reverse_left, 6);

        // With room for one, every hold goes, the new one last; the live pair stays.
        let tight = HoldLimit {
            reverse_capacity: 1,
            ..limit
        };
        let plan = plan_nat(&forward, &reverse, &Timeouts::default(), NOW, tight);
        assert_eq!(plan.reverse_left, 1);
        assert!(plan.hold_reverse.is_empty());
        assert_eq!(plan.remove_reverse.len(), 6);
        assert!(plan.remove_forward.contains(&closing.0));
        assert!(!plan.remove_forward.contains(&live.0));
    }

    #[test]
    fn live_and_half_closed_pairs_stay_whole() {
        let live = pair(40000, 5000, 0, 3600);
        let half = pair(40001, 5001, with_close_event(0, close_event(FIN, true)), 60);
        let plan = plan(&[live, half], false);
        assert_eq!(
            plan,
            NatPlan {
                forward_left: 2,
                reverse_left: 2,
                ..NatPlan::default()
            }
        );
    }
}
