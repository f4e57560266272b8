//! Floating egress IPs: the pod's node translates, with its own block of the egress IP's
//! ports, and the gateway only forwards. Any candidate holding the egress IP then serves
//! every flow (replies are sent to the node owning their port's block), so a connection
//! survives a failover: its translation lives on the pod's node.

use aya_ebpf::programs::TcContext;
use egress_common::{
    Ipv4,
    config::{DatapathConfig, VNI_TO_GATEWAY, VNI_TO_POD_NODE},
    counters::reason,
    flow::last_seen_is_stale,
    gateway::{PORT_BLOCK_SIZE, PortBlockKey},
    nat::{NAT_TIME_WAIT, NatReverse},
    policy::PolicyValue,
};

use crate::{
    drop, hand_expiring_to_kernel,
    maps::{EGRESS_IPS, NAT_FORWARD, NAT_REVERSE, OWN_PORT_BLOCKS, PORT_BLOCK_OWNERS},
    nat::{self, PortRange},
    packet::{End, Packet, clamp_mss, decrement_ttl, rewrite},
    redirect_neigh, tunnel_to,
};

/// Whether `egress_ip` floats and this node translates its pods' flows to it.
#[inline(always)]
pub(crate) fn translates_here(egress_ip: Ipv4) -> bool {
    // SAFETY: plain lookup.
    unsafe { OWN_PORT_BLOCKS.get(&egress_ip) }.is_some()
}

/// The block a translated port belongs to.
#[inline(always)]
fn block_key(egress_ip: Ipv4, port: [u8; 2], config: &DatapathConfig) -> Option<PortBlockKey> {
    let offset = u16::from_be_bytes(port).checked_sub(config.nat_port_min)?;
    Some(PortBlockKey {
        egress_ip,
        block: offset / PORT_BLOCK_SIZE,
        _pad: 0,
    })
}

/// The node owning the block of a translated (egress IP, port).
#[inline(always)]
fn block_owner(egress_ip: Ipv4, port: [u8; 2], config: &DatapathConfig) -> Option<Ipv4> {
    let key = block_key(egress_ip, port, config)?;
    // SAFETY: plain lookup.
    unsafe { PORT_BLOCK_OWNERS.get(&key) }.map(|owner| owner.node_ip)
}

/// Pod's node: translates a pod's packet to the floating egress IP with this node's block,
/// then sends it to `gateway` through the tunnel (or out of the egress interface when this
/// node is the gateway).
#[inline(always)]
pub(crate) fn translate_and_send(
    ctx: &mut TcContext,
    packet: &Packet,
    policy: &PolicyValue,
    gateway: Ipv4,
    config: &DatapathConfig,
    now: u64,
) -> i32 {
    // SAFETY: plain lookup.
    let Some(block) = (unsafe { OWN_PORT_BLOCKS.get(&policy.egress_ip) }) else {
        return drop(reason::DROP_NO_PORT_BLOCK, packet);
    };
    let ports = PortRange {
        min: u32::from(block.first),
        max: u32::from(block.first) + u32::from(block.count).saturating_sub(1),
        binding: true,
    };
    // SAFETY: plain lookup.
    if packet.later_fragment && unsafe { NAT_FORWARD.get(&packet.flow) }.is_none() {
        return drop(reason::DROP_FRAGMENT_UNKNOWN, packet);
    }
    let new_flow =
        match nat::translate_source(ctx, packet, policy.egress_ip, config.node_ip, ports, now) {
            Ok(new_flow) => new_flow,
            Err(verdict) => return verdict,
        };
    // Replies may come through the tunnel whichever node holds the egress IP: clamp even
    // when this node sends the flow out itself.
    if clamp_mss(ctx, packet, config.tunnel_mss).is_err() {
        return drop(reason::DROP_ERROR, packet);
    }
    if gateway == config.node_ip {
        let verdict = if new_flow {
            reason::SNAT_NEW_FLOW
        } else {
            reason::SNAT_EXISTING_FLOW
        };
        return forward_out(ctx, packet, policy.egress_ip, verdict);
    }
    tunnel_to(
        ctx,
        packet,
        gateway,
        VNI_TO_GATEWAY,
        config,
        reason::REDIRECT_TO_GATEWAY,
    )
}

/// Gateway: a packet a pod's node translated to a floating egress IP (`policy` is the
/// gateway-side entry of that egress IP and the destination). Forwarded only when the source
/// port lies in the block of the node that sent it: no node can speak for another.
#[inline(always)]
pub(crate) fn forward(
    ctx: &mut TcContext,
    packet: &Packet,
    policy: &PolicyValue,
    remote: Ipv4,
    config: &DatapathConfig,
) -> i32 {
    if !packet.translatable {
        return drop(crate::untranslatable(packet), packet);
    }
    if block_owner(packet.flow.src_ip, packet.flow.src_port, config) != Some(remote) {
        return drop(reason::DROP_NOT_ALLOWED, packet);
    }
    forward_out(ctx, packet, policy.egress_ip, reason::FORWARD_TRANSLATED)
}

/// Out of the egress IP's interface, as a router: the TTL is decremented, and a packet whose
/// TTL runs out goes to the kernel, which answers with ICMP time exceeded.
#[inline(always)]
fn forward_out(ctx: &mut TcContext, packet: &Packet, egress_ip: Ipv4, verdict: u32) -> i32 {
    // SAFETY: plain lookup.
    let Some(egress) = (unsafe { EGRESS_IPS.get(&egress_ip) }) else {
        return drop(reason::DROP_NO_EGRESS_IP, packet);
    };
    let ifindex = egress.ifindex;
    if packet.ttl <= 1 {
        return hand_expiring_to_kernel(ctx, packet);
    }
    if decrement_ttl(ctx, packet).is_err() {
        return drop(reason::DROP_ERROR, packet);
    }
    redirect_neigh(packet, ifindex, verdict)
}

/// Gateway: a reply to a floating egress IP that no translation of this node knows: to the
/// node owning its port's block, untouched (that node reverse-translates). `None` when the
/// port belongs to no block.
#[inline(always)]
pub(crate) fn reply_to_owner(
    ctx: &TcContext,
    packet: &Packet,
    config: &DatapathConfig,
) -> Option<i32> {
    let owner = block_owner(packet.flow.dst_ip, packet.flow.dst_port, config)?;
    if owner == config.node_ip {
        // This node's own block, and no translation for it: a stale or forged reply.
        return Some(drop(reason::DROP_UNKNOWN_REPLY, packet));
    }
    Some(tunnel_to(
        ctx,
        packet,
        owner,
        VNI_TO_POD_NODE,
        config,
        reason::REPLY_TO_BLOCK_OWNER,
    ))
}

/// Pod's node: a reply through the tunnel to a floating egress IP this node translates for:
/// reverse-translated to the pod. `None` when it is not addressed to such an IP; `Err` when
/// no translation knows it (dropped, counted).
#[inline(always)]
pub(crate) fn reverse_translate(
    ctx: &mut TcContext,
    packet: &Packet,
    now: u64,
) -> Option<Result<NatReverse, i32>> {
    if !translates_here(packet.flow.dst_ip) {
        return None;
    }
    let Some(reverse) = NAT_REVERSE.get_ptr_mut(&packet.flow) else {
        return Some(Err(drop(reason::DROP_UNKNOWN_REPLY, packet)));
    };
    // SAFETY: valid for this run; last_seen is advisory (the garbage collector ages a NAT
    // pair by the newer of its halves: replies keep a flow alive, as on a gateway).
    let reverse = unsafe {
        if last_seen_is_stale((*reverse).last_seen_ns, now) {
            (*reverse).last_seen_ns = now;
        }
        *reverse
    };
    if reverse.flags & NAT_TIME_WAIT != 0 {
        // The flow ended; only its port is held. Late segments go nowhere.
        return Some(Err(drop(reason::DROP_UNKNOWN_REPLY, packet)));
    }
    if rewrite(
        ctx,
        packet,
        End::Destination,
        reverse.pod_ip,
        reverse.pod_port,
    )
    .is_err()
    {
        return Some(Err(drop(reason::DROP_ERROR, packet)));
    }
    Some(Ok(reverse))
}
