//! Which gateway a flow leaves through, and the health probes that decide it.
//!
//! A policy entry names its gateway group: the candidates in order of preference. A new flow
//! takes the first candidate that is neither down nor draining; an established flow keeps
//! its gateway (`SteeredFlow::gateway_ip`) while that one is up and still a candidate, so a
//! gateway joining or coming back moves no established flow. Only failure moves a flow.
//! The health is what this node's prober judged (`GATEWAY_HEALTH`); the probes themselves are
//! answered here, in the gateway's datapath, so a busy or restarting agent is no dead gateway.

use aya_ebpf::programs::TcContext;
use egress_common::{
    Ipv4,
    config::{DatapathConfig, VNI_TO_POD_NODE},
    counters::reason,
    flow::PROTO_UDP,
    gateway::{
        GATEWAY_DOWN, GATEWAY_DRAINING, GROUP_POD_NODE_TRANSLATES, GatewayGroup, MAX_CANDIDATES,
        PROBE_MAGIC, PROBE_PORT, PROBE_REPLY, PROBE_REQUEST, PROBE_VIA_TC, Probe, ProbeReply,
        TRAFFIC_STAMP_GRANULARITY_NS,
    },
    policy::{GATEWAY_NONE, PolicyValue},
};

use crate::{
    DROP,
    maps::{GATEWAY_GROUPS, GATEWAY_HEALTH, GATEWAY_TRAFFIC, PROBE_REPLIES, TC_ANSWERED_AT, count},
    packet::{ETH_HLEN, Packet},
    tunnel_to,
};

/// UDP header length: the probe payload follows it.
const UDP_HLEN: usize = 8;
/// Offsets of the IPv4 source and destination in the frame.
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;

/// Whether `gateway` may carry a flow: not down, and for a new flow not draining. A gateway
/// without a health entry has not been judged: it may.
#[inline(always)]
fn usable(gateway: Ipv4, new_flow: bool) -> bool {
    // SAFETY: plain lookup.
    let flags = unsafe { GATEWAY_HEALTH.get(&gateway) }.map_or(0, |health| health.flags);
    flags & GATEWAY_DOWN == 0 && (!new_flow || flags & GATEWAY_DRAINING == 0)
}

/// The entry's group, looked up once per packet and handed to the checks below.
#[inline(always)]
pub(crate) fn group_of(policy: &PolicyValue) -> Option<&'static GatewayGroup> {
    if policy.gateway_group == 0 {
        return None;
    }
    // SAFETY: plain lookup.
    unsafe { GATEWAY_GROUPS.get(&policy.gateway_group) }
}

#[inline(always)]
fn in_group(group: &GatewayGroup, gateway: Ipv4) -> bool {
    let mut i = 0;
    while i < MAX_CANDIDATES {
        if i as u32 >= group.count {
            return false;
        }
        if group.candidates[i] == gateway {
            return true;
        }
        i += 1;
    }
    false
}

/// The gateway for a packet of a flow that started on `pinned` (`None`: a new flow); `None`
/// when no candidate is usable (the packet is dropped, never sent with the node's own IP).
/// An entry without a group (or whose group is missing) has only its `gateway_ip`.
#[inline(always)]
pub(crate) fn choose(
    policy: &PolicyValue,
    group: Option<&GatewayGroup>,
    pinned: Option<Ipv4>,
) -> Option<Ipv4> {
    let Some(group) = group else {
        return (policy.gateway_ip != GATEWAY_NONE).then_some(policy.gateway_ip);
    };
    if let Some(pinned) = pinned
        && in_group(group, pinned)
        && usable(pinned, false)
    {
        return Some(pinned);
    }
    let mut i = 0;
    while i < MAX_CANDIDATES {
        if i as u32 >= group.count {
            return None;
        }
        let candidate = group.candidates[i];
        if usable(candidate, true) {
            return Some(candidate);
        }
        i += 1;
    }
    None
}

/// Which stamp of `GatewayTraffic` to refresh.
#[derive(Clone, Copy)]
pub(crate) enum Stamp {
    /// This node sent pods' traffic to the gateway.
    Sent,
    /// A reply from the gateway reached a pod: it is alive.
    Received,
}

/// Notes, for the prober, traffic to or from `gateway` (only where the prober made an entry:
/// a gateway it does not probe costs a lookup, no insert).
#[inline(always)]
pub(crate) fn note_traffic(gateway: Ipv4, stamp: Stamp, now: u64) {
    if let Some(traffic) = GATEWAY_TRAFFIC.get_ptr_mut(&gateway) {
        // SAFETY: valid for this run; a racing writer stores a time just as recent.
        unsafe {
            let field = match stamp {
                Stamp::Sent => &raw mut (*traffic).sent_ns,
                Stamp::Received => &raw mut (*traffic).received_ns,
            };
            if now.wrapping_sub(*field) >= TRAFFIC_STAMP_GRANULARITY_NS {
                *field = now;
            }
        }
    }
}

/// Whether the entry's pod node translates (a floating egress IP): its group says so.
#[inline(always)]
pub(crate) fn pod_node_translates(group: Option<&GatewayGroup>) -> bool {
    group.is_some_and(|group| group.flags & GROUP_POD_NODE_TRANSLATES != 0)
}

/// Whether this node may translate the entry's traffic: it is the entry's gateway, or one
/// of its group's candidates (a flow failed over to it).
#[inline(always)]
pub(crate) fn serves(policy: &PolicyValue, group: Option<&GatewayGroup>, node_ip: Ipv4) -> bool {
    policy.gateway_ip == node_ip || group.is_some_and(|group| in_group(group, node_ip))
}

#[inline(always)]
fn is_probe_port(port: [u8; 2]) -> bool {
    port == PROBE_PORT.to_be_bytes()
}

/// A probe for this node: UDP between node addresses on the probe port.
#[inline(always)]
pub(crate) fn is_probe(packet: &Packet, config: &DatapathConfig) -> bool {
    packet.flow.protocol == PROTO_UDP
        && !packet.later_fragment
        && packet.flow.dst_ip == config.node_ip
        && is_probe_port(packet.flow.src_port)
        && is_probe_port(packet.flow.dst_port)
}

/// Answers a probe request from the node `remote` through the tunnel, with this gateway's
/// own health flags.
#[inline(always)]
pub(crate) fn answer(
    ctx: &mut TcContext,
    packet: &Packet,
    remote: Ipv4,
    config: &DatapathConfig,
    now: u64,
) -> i32 {
    let payload = packet.l4_off + UDP_HLEN;
    let Ok(probe) = ctx.load::<Probe>(payload) else {
        count(reason::DROP_UNSUPPORTED, packet.len);
        return DROP;
    };
    if probe.magic != PROBE_MAGIC || probe.kind != PROBE_REQUEST || packet.flow.src_ip != remote {
        count(reason::DROP_NOT_ALLOWED, packet.len);
        return DROP;
    }
    // SAFETY: plain lookup.
    let flags = unsafe { GATEWAY_HEALTH.get(&config.node_ip) }.map_or(0, |health| health.flags);
    // Swapping the addresses keeps the IPv4 checksum; the UDP checksum is 0 (none).
    let answered = ctx.store(IP_SRC, &config.node_ip, 0).is_ok()
        && ctx.store(IP_DST, &remote, 0).is_ok()
        && ctx
            .store(payload + 4, &[PROBE_REPLY, PROBE_VIA_TC], 0)
            .is_ok()
        && ctx.store(payload + 8, &flags, 0).is_ok();
    if !answered {
        count(reason::DROP_ERROR, packet.len);
        return DROP;
    }
    // The tunnel path works: the XDP responder may answer for the next second.
    if let Some(answered_at) = TC_ANSWERED_AT.get_ptr_mut(0) {
        // SAFETY: the one slot; a racing writer stores a time just as recent.
        unsafe { *answered_at = now };
    }
    tunnel_to(
        ctx,
        packet,
        remote,
        VNI_TO_POD_NODE,
        config,
        reason::PROBE_ANSWERED,
    )
}

/// Notes a probe reply from the gateway `remote` for the prober, and consumes it.
#[inline(always)]
pub(crate) fn note_reply(ctx: &TcContext, packet: &Packet, remote: Ipv4, now: u64) -> i32 {
    let Ok(probe) = ctx.load::<Probe>(packet.l4_off + UDP_HLEN) else {
        count(reason::DROP_UNSUPPORTED, packet.len);
        return DROP;
    };
    if probe.magic != PROBE_MAGIC || probe.kind != PROBE_REPLY || packet.flow.src_ip != remote {
        count(reason::DROP_NOT_ALLOWED, packet.len);
        return DROP;
    }
    let reply = ProbeReply {
        seq: probe.seq,
        sent_ns: probe.sent_ns,
        received_ns: now,
        gateway_flags: probe.flags,
        path: probe.path,
        _pad: [0; 3],
    };
    if PROBE_REPLIES.insert(&remote, &reply, 0).is_err() {
        count(reason::DROP_ERROR, packet.len);
        return DROP;
    }
    count(reason::PROBE_REPLY_RECEIVED, packet.len);
    DROP
}
