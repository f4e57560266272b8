//! Expiry of NAT and flow-tracking entries. The maps never evict (a full one refuses new
//! flows), so entries of finished flows must go: closed TCP connections after a short grace
//! period, idle flows after a timeout. Each pass also counts what stays, for the maps'
//! pressure gauges.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use aya::maps::{HashMap, MapData, MapError};
use egress_common::{
    flow::{FLOW_CLOSING, FlowKey, InboundFlow, PROTO_TCP, SteeredFlow},
    map_names,
    nat::{NatForward, NatReverse},
};

use super::{Datapath, DatapathError, sync::ignore_missing};

/// How long entries may stay idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connections that saw a FIN or RST (late retransmissions still find their entry).
    pub tcp_closing: Duration,
    /// Established TCP connections without traffic.
    pub tcp_idle: Duration,
    /// UDP and ICMP flows without traffic.
    pub other_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_closing: Duration::from_secs(10),
            tcp_idle: Duration::from_hours(6),
            other_idle: Duration::from_mins(1),
        }
    }
}

impl Timeouts {
    fn expired(&self, protocol: u8, flags: u32, last_seen_ns: u64, now_ns: u64) -> bool {
        let limit = if protocol != PROTO_TCP {
            self.other_idle
        } else if flags & FLOW_CLOSING != 0 {
            self.tcp_closing
        } else {
            self.tcp_idle
        };
        now_ns.saturating_sub(last_seen_ns) > limit.as_nanos() as u64
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub nat_expired: usize,
    pub flows_expired: usize,
    /// Entries left in each flow and NAT map after the pass.
    pub entries: BTreeMap<&'static str, usize>,
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
    /// Removes expired entries: NAT pairs together (an orphaned reverse entry whose forward
    /// twin is gone goes too), then steered and inbound flows.
    pub fn collect_garbage(
        &mut self,
        timeouts: &Timeouts,
        now_ns: u64,
    ) -> Result<GcStats, DatapathError> {
        let mut stats = GcStats::default();
        let map_err =
            |name: &'static str| move |source: MapError| DatapathError::Map { name, source };

        // A pair is as fresh as its newer half: replies refresh only the reverse entry, and a
        // flow where the remote does all the sending (a feed, a download) must live on.
        let reverse: HashMap<&mut MapData, FlowKey, NatReverse> =
            self.map_mut(map_names::NAT_REVERSE)?;
        let reverse_entries: BTreeMap<FlowKey, NatReverse> =
            reverse.iter().filter_map(Result::ok).collect();
        // The reverse entry at a flow's reply key is its twin only if it names the flow's
        // pod: once a half was lost, the key may serve another flow.
        let twin = |flow: &FlowKey, reply: &FlowKey| {
            reverse_entries
                .get(reply)
                .filter(|entry| entry.pod_ip == flow.src_ip && entry.pod_port == flow.src_port)
        };
        let forward: HashMap<&mut MapData, FlowKey, NatForward> =
            self.map_mut(map_names::NAT_FORWARD)?;
        let entries: Vec<(FlowKey, NatForward)> = forward.iter().filter_map(Result::ok).collect();
        let mut expired_forward = Vec::new();
        let mut live_replies = BTreeSet::new();
        for (flow, nat) in &entries {
            let reply = FlowKey {
                src_ip: flow.dst_ip,
                dst_ip: nat.nat_ip,
                src_port: flow.dst_port,
                dst_port: nat.nat_port,
                protocol: flow.protocol,
                _pad: [0; 3],
            };
            let twin = twin(flow, &reply);
            let last_seen = twin.map_or(nat.last_seen_ns, |entry| {
                entry.last_seen_ns.max(nat.last_seen_ns)
            });
            if timeouts.expired(flow.protocol, nat.flags, last_seen, now_ns) {
                expired_forward.push((*flow, twin.map(|_| reply)));
            } else {
                live_replies.insert(reply);
            }
        }
        let mut forward: HashMap<&mut MapData, FlowKey, NatForward> =
            self.map_mut(map_names::NAT_FORWARD)?;
        for (flow, _) in &expired_forward {
            ignore_missing(forward.remove(flow)).map_err(map_err(map_names::NAT_FORWARD))?;
        }
        let mut reverse: HashMap<&mut MapData, FlowKey, NatReverse> =
            self.map_mut(map_names::NAT_REVERSE)?;
        // Every reverse entry without a live forward twin: the expired pairs' and those whose
        // forward entry was lost (once idle for the closing grace period). One set,
        // so no key is deleted twice.
        let expired_replies: BTreeSet<FlowKey> = expired_forward
            .iter()
            .filter_map(|(_, reply)| *reply)
            .filter(|reply| !live_replies.contains(reply))
            .collect();
        let doomed: Vec<FlowKey> = reverse
            .iter()
            .filter_map(Result::ok)
            .filter(|(reply, entry)| {
                expired_replies.contains(reply)
                    || (!live_replies.contains(reply)
                        && now_ns.saturating_sub(entry.last_seen_ns)
                            > timeouts.tcp_closing.as_nanos() as u64)
            })
            .map(|(reply, _)| reply)
            .collect();
        for reply in &doomed {
            ignore_missing(reverse.remove(reply)).map_err(map_err(map_names::NAT_REVERSE))?;
        }
        stats.nat_expired = expired_forward.len();
        stats.entries.insert(
            map_names::NAT_FORWARD,
            entries.len() - expired_forward.len(),
        );
        stats.entries.insert(
            map_names::NAT_REVERSE,
            reverse_entries.len().saturating_sub(doomed.len()),
        );

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
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn expiry_depends_on_protocol_and_closing() {
        let t = Timeouts::default();
        let now = 100_000 * S;
        assert!(!t.expired(PROTO_TCP, 0, now - 3600 * S, now));
        assert!(t.expired(PROTO_TCP, 0, now - 7 * 3600 * S, now));
        assert!(t.expired(PROTO_TCP, FLOW_CLOSING, now - 11 * S, now));
        assert!(!t.expired(PROTO_TCP, FLOW_CLOSING, now - 5 * S, now));
        assert!(t.expired(17, 0, now - 61 * S, now));
        assert!(!t.expired(17, 0, now - 30 * S, now));
        // Entries stamped after `now` (clock read earlier) are not expired.
        assert!(!t.expired(17, 0, now + S, now));
    }
}
