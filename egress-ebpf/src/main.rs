//! TC programs of the egress gateway datapath.
//!
//! - `from_pod` (ingress of a local pod's host-side interface): policy lookup; matched new
//!   flows go through the VXLAN tunnel to the gateway, or are SNATed here when this node is
//!   the gateway.
//! - `to_pod` (egress of the same interface): remembers UDP flows that came in to the pod,
//!   so the pod's replies keep their old path.
//! - `from_tunnel` (ingress of the agent's VXLAN device): on a gateway, checks and SNATs
//!   requests; on a pod's node, delivers replies to the pod.
//! - `from_egress` (ingress of an interface holding an egress IP): reverse-SNAT of replies,
//!   which go back through the tunnel to the pod's node.
//! - `probe_responder` (XDP on a gateway candidate's underlay interface): answers health
//!   probes before decapsulation; every other packet passes.
//!
//! Every packet the datapath does not own gets `TC_ACT_UNSPEC` (TCX "next"), so programs of
//! other tools on the same hooks (a CNI's) still run.
#![no_std]
#![no_main]
#![allow(
    unused_crate_dependencies,
    reason = "the library target of this package is empty; the programs are this binary"
)]
// The BPF packet path: every helper is inlined so each program stays one function for the
// verifier, and map keys go by reference (a copy costs some of the 512-byte BPF stack).
#![expect(clippy::inline_always, reason = "see above")]
#![expect(clippy::needless_borrows_for_generic_args, reason = "see above")]

mod floating;
mod gateway;
mod maps;
mod nat;
mod packet;
mod probe_responder;
// Programs for BPF_PROG_TEST_RUN only: not in the object the agent ships.
#[cfg(feature = "test-programs")]
mod test_programs;

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_tunnel_key},
    helpers::{
        bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_type,
        bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key,
    },
    macros::classifier,
    programs::TcContext,
};
use egress_common::{
    Ipv4,
    config::{DatapathConfig, VNI_TO_GATEWAY, VNI_TO_POD_NODE},
    counters::reason,
    flow::{FlowKey, InboundFlow, PROTO_UDP, SteeredFlow, last_seen_is_stale, with_close_event},
    nat::{NAT_TIME_WAIT, NatReverse},
    policy::{GATEWAY_EXCLUDED, GATEWAY_NONE, POLICY_LOOKUP_PREFIX, PolicyKey, PolicyValue},
};

use crate::{
    maps::{
        CLUSTER_CIDRS, EGRESS_IPS, EGRESS_POLICIES, INBOUND_FLOWS, LOCAL_PODS, NAT_FORWARD,
        NAT_REVERSE, NODES, STEERED_FLOWS, config, count,
    },
    nat::PortRange,
    packet::{
        End, Packet, clamp_mss, decrement_ttl, parse, quoted_packet, rewrite, rewrite_icmp_error,
    },
};

pub(crate) const PASS: i32 = TC_ACT_UNSPEC;
pub(crate) const DROP: i32 = TC_ACT_SHOT;
const TUNNEL_TTL: u8 = 64;
/// `skb->pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;

#[inline(always)]
pub(crate) fn drop(reason: u32, packet: &Packet) -> i32 {
    count(reason, packet.len);
    DROP
}

/// Why a matched packet that cannot be translated is dropped.
#[inline(always)]
pub(crate) fn untranslatable(packet: &Packet) -> u32 {
    if packet.later_fragment {
        reason::DROP_FRAGMENT_UNKNOWN
    } else {
        reason::DROP_UNSUPPORTED
    }
}

#[inline(always)]
fn policy_for(source_ip: Ipv4, dest_ip: Ipv4) -> Option<&'static PolicyValue> {
    let key = aya_ebpf::btf_maps::lpm_trie::Key::new(
        POLICY_LOOKUP_PREFIX,
        PolicyKey { source_ip, dest_ip },
    );
    EGRESS_POLICIES.get(&key)
}

/// A node or pod address: traffic that does not leave the cluster.
#[inline(always)]
fn in_cluster(ip: Ipv4) -> bool {
    // SAFETY: plain lookup.
    unsafe { NODES.get(&ip) }.is_some()
        || CLUSTER_CIDRS
            .get(&aya_ebpf::btf_maps::lpm_trie::Key::new(32, ip))
            .is_some()
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[classifier]
pub(crate) fn from_pod(mut ctx: TcContext) -> i32 {
    let Some(packet) = parse(&ctx) else {
        return PASS;
    };
    let Some(config) = config() else {
        return PASS;
    };
    let Some(policy) = policy_for(packet.flow.src_ip, packet.flow.dst_ip) else {
        count(reason::PASS_NO_MATCH, packet.len);
        return PASS;
    };
    let policy = *policy;
    if policy.gateway_ip == GATEWAY_EXCLUDED {
        count(reason::PASS_EXCLUDED, packet.len);
        return PASS;
    }
    if in_cluster(packet.flow.dst_ip) {
        count(reason::PASS_IN_CLUSTER, packet.len);
        return PASS;
    }
    // Matched: from here on the packet either takes the gateway path or is dropped, unless
    // it belongs to a connection that predates the policy or came in to the pod.
    if policy.pod_node_ip != config.node_ip {
        // Not a pod of this node: a source spoofed as another node's pod, or as a floating
        // egress IP (whose gateway-side entries this node holds as a candidate).
        return drop(reason::DROP_NOT_ALLOWED, &packet);
    }
    if packet.is_icmp_error() || packet.is_icmp_echo_reply() {
        // The pod answers a ping, or reports a problem with traffic, that reached it: an
        // inbound flow's path.
        count(reason::PASS_EXISTING_FLOW, packet.len);
        return PASS;
    }
    if !packet.translatable {
        return drop(untranslatable(&packet), &packet);
    }
    let group = gateway::group_of(&policy);
    let now = now();
    let gateway;
    if let Some(steered) = STEERED_FLOWS.get_ptr_mut(&packet.flow) {
        // SAFETY: valid for this run; last_seen and flags are advisory, and the gateway
        // is rewritten only when the flow must move.
        unsafe {
            let Some(chosen) = gateway::choose(&policy, group, Some((*steered).gateway_ip)) else {
                return drop(reason::DROP_NO_GATEWAY, &packet);
            };
            if chosen != (*steered).gateway_ip {
                // Its gateway is down or no longer a candidate: only failure moves a flow.
                (*steered).gateway_ip = chosen;
                count(reason::FLOW_FAILED_OVER, 0);
            }
            gateway = chosen;
            if last_seen_is_stale((*steered).last_seen_ns, now) {
                (*steered).last_seen_ns = now;
            }
            // A SYN on a closed tuple opens a new connection.
            let flags = if packet.is_tcp_open() {
                0
            } else {
                with_close_event((*steered).flags, packet.close_event(true))
            };
            if (*steered).flags != flags {
                (*steered).flags = flags;
            }
        }
    } else {
        // A flow that came in to the pod, which the pod may now do all the sending of (a
        // server streaming to a client that asked once): its packets keep it alive too.
        let inbound = match INBOUND_FLOWS.get_ptr_mut(&packet.flow) {
            Some(inbound) => {
                // SAFETY: valid for this run; last_seen is advisory.
                unsafe {
                    if last_seen_is_stale((*inbound).last_seen_ns, now) {
                        (*inbound).last_seen_ns = now;
                    }
                }
                true
            }
            None => false,
        };
        let opens_connection = if packet.is_tcp() {
            packet.is_tcp_open()
        } else {
            !inbound
        };
        if !opens_connection {
            count(reason::PASS_EXISTING_FLOW, packet.len);
            return PASS;
        }
        let Some(chosen) = gateway::choose(&policy, group, None) else {
            return drop(reason::DROP_NO_GATEWAY, &packet);
        };
        gateway = chosen;
        let steered = SteeredFlow {
            gateway_ip: gateway,
            flags: 0,
            last_seen_ns: now,
        };
        // A full map refuses the new flow (E2BIG) rather than losing an established one.
        if STEERED_FLOWS.insert(&packet.flow, &steered, 0).is_err() {
            return drop(reason::DROP_FLOW_TABLE_FULL, &packet);
        }
    }
    if gateway != config.node_ip {
        gateway::note_traffic(gateway, gateway::Stamp::Sent, now);
    }
    if gateway::pod_node_translates(group) {
        // A floating egress IP: this node translates, the gateway forwards.
        return floating::translate_and_send(&mut ctx, &packet, &policy, gateway, config, now);
    }
    if gateway == config.node_ip {
        // The pod runs on its gateway: translate here, no tunnel.
        return snat_and_send(&mut ctx, &packet, &policy, config.node_ip, config, now);
    }
    // The tunnel costs 50 bytes: make the connection's segments fit it.
    if clamp_mss(&mut ctx, &packet, config.tunnel_mss).is_err() {
        return drop(reason::DROP_ERROR, &packet);
    }
    tunnel_to(
        &ctx,
        &packet,
        gateway,
        VNI_TO_GATEWAY,
        config,
        reason::REDIRECT_TO_GATEWAY,
    )
}

#[classifier]
pub(crate) fn to_pod(ctx: TcContext) -> i32 {
    let Some(packet) = parse(&ctx) else {
        return PASS;
    };
    // TCP needs no record: the pod's replies are never bare SYNs. ICMP echo replies are
    // never steered either. UDP has no handshake, so remember the flow.
    if packet.flow.protocol != PROTO_UDP || !packet.translatable {
        return PASS;
    }
    let reply = packet.flow.reversed();
    // SAFETY: plain lookup.
    if unsafe { STEERED_FLOWS.get(&reply) }.is_some() {
        return PASS;
    }
    let now = now();
    // A known inbound flow is only refreshed, about once a second: rewriting the entry on
    // every packet churned the LRU map.
    if let Some(inbound) = INBOUND_FLOWS.get_ptr_mut(&reply) {
        // SAFETY: valid for this run; last_seen is advisory.
        unsafe {
            if last_seen_is_stale((*inbound).last_seen_ns, now) {
                (*inbound).last_seen_ns = now;
            }
        }
        return PASS;
    }
    match policy_for(reply.src_ip, reply.dst_ip) {
        Some(policy) if policy.gateway_ip != GATEWAY_EXCLUDED => {
            let _ = INBOUND_FLOWS.insert(&reply, &InboundFlow { last_seen_ns: now }, 0);
        }
        _ => {}
    }
    PASS
}

#[classifier]
pub(crate) fn from_tunnel(mut ctx: TcContext) -> i32 {
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: key is a valid bpf_tunnel_key of the size passed.
    let ret = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &raw mut key,
            size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if ret != 0 {
        count(reason::DROP_ERROR, ctx.len());
        return DROP;
    }
    // SAFETY: the helper filled the IPv4 member (remote_ipv4 is in host byte order).
    let remote = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes();
    from_tunnel_peer(&mut ctx, remote, key.tunnel_id)
}

#[inline(always)]
pub(crate) fn from_tunnel_peer(ctx: &mut TcContext, remote: Ipv4, vni: u32) -> i32 {
    let Some(packet) = parse(ctx) else {
        count(reason::DROP_UNSUPPORTED, ctx.len());
        return DROP;
    };
    let Some(config) = config() else {
        return drop(reason::DROP_ERROR, &packet);
    };
    // SAFETY: plain lookup.
    if unsafe { NODES.get(&remote) }.is_none() {
        return drop(reason::DROP_UNKNOWN_NODE, &packet);
    }
    if gateway::is_probe(&packet, config) {
        return match vni {
            VNI_TO_GATEWAY => gateway::answer(ctx, &packet, remote, config, now()),
            VNI_TO_POD_NODE => gateway::note_reply(ctx, &packet, remote, now()),
            _ => drop(reason::DROP_NOT_ALLOWED, &packet),
        };
    }
    match vni {
        VNI_TO_GATEWAY => gateway_request(ctx, &packet, remote, config),
        VNI_TO_POD_NODE => deliver_reply(ctx, &packet, remote, config),
        _ => drop(reason::DROP_NOT_ALLOWED, &packet),
    }
}

/// A pod's request arriving at its gateway: translate only what a policy naming this node
/// allows, for a pod of the node that sent it; or forward what a pod's node translated to a
/// floating egress IP, from its own port block. Anything else is dropped: no open relay.
#[inline(always)]
fn gateway_request(
    ctx: &mut TcContext,
    packet: &Packet,
    remote: Ipv4,
    config: &DatapathConfig,
) -> i32 {
    let Some(policy) = policy_for(packet.flow.src_ip, packet.flow.dst_ip) else {
        return drop(reason::DROP_NOT_ALLOWED, packet);
    };
    let policy = *policy;
    let group = gateway::group_of(&policy);
    if !gateway::serves(&policy, group, config.node_ip) {
        return drop(reason::DROP_NOT_ALLOWED, packet);
    }
    if policy.pod_node_ip == [0; 4] && policy.egress_ip == packet.flow.src_ip {
        // Translated by the pod's node to a floating egress IP: forwarded, not translated.
        return floating::forward(ctx, packet, &policy, remote, config);
    }
    if policy.pod_node_ip != remote || gateway::pod_node_translates(group) {
        // Not that node's pod; or a floating egress IP's flow its node did not translate
        // (an old agent there, a group missing): no gateway translates those, since its
        // ports would not lie in that node's block.
        return drop(reason::DROP_NOT_ALLOWED, packet);
    }
    // A pod's echo reply answers an inbound ping and never opens a flow: from_pod keeps it
    // on its path, so one arriving here came from elsewhere.
    if !packet.translatable {
        return drop(untranslatable(packet), packet);
    }
    if packet.is_icmp_echo_reply() {
        return drop(reason::DROP_UNSUPPORTED, packet);
    }
    snat_and_send(ctx, packet, &policy, remote, config, now())
}

/// A reply coming back from the gateway `remote`: only to a local pod, only for a flow this
/// node steered (for an ICMP error, the flow of the packet it quotes).
#[inline(always)]
fn deliver_reply(
    ctx: &mut TcContext,
    packet: &Packet,
    remote: Ipv4,
    config: &DatapathConfig,
) -> i32 {
    if packet.later_fragment && !packet.translatable {
        return drop(reason::DROP_FRAGMENT_UNKNOWN, packet);
    }
    // A reply to a floating egress IP: this node translated the flow, so it turns it back.
    let (pod_ip, translated) = match floating::reverse_translate(ctx, packet, now()) {
        Some(Ok(reverse)) => {
            let event = packet.close_event(false);
            if event != 0 {
                record_remote_close(packet, &reverse, event);
            }
            let flow = FlowKey {
                src_ip: reverse.pod_ip,
                dst_ip: packet.flow.src_ip,
                src_port: reverse.pod_port,
                dst_port: packet.flow.src_port,
                protocol: packet.flow.protocol,
                _pad: [0; 3],
            };
            (reverse.pod_ip, Some(flow))
        }
        Some(Err(verdict)) => return verdict,
        None => (packet.flow.dst_ip, None),
    };
    // SAFETY: plain lookups.
    let Some(pod) = (unsafe { LOCAL_PODS.get(&pod_ip) }) else {
        return drop(reason::DROP_UNKNOWN_REPLY, packet);
    };
    let ifindex = pod.ifindex;
    let steered_flow = match (translated, quoted_packet(ctx, packet)) {
        (Some(flow), _) => flow,
        (None, Some(quoted)) if quoted.flow.src_ip == packet.flow.dst_ip => quoted.flow,
        (None, Some(_)) => return drop(reason::DROP_UNKNOWN_REPLY, packet),
        (None, None) => packet.flow.reversed(),
    };
    let Some(steered) = STEERED_FLOWS.get_ptr_mut(&steered_flow) else {
        return drop(reason::DROP_UNKNOWN_REPLY, packet);
    };
    // Replies keep the flow alive too (a feed, a download): the remote may do all the
    // sending. Its FIN or RST is the connection's end as much as the pod's.
    let now = now();
    // SAFETY: valid for this run; last_seen and flags are advisory.
    unsafe {
        if last_seen_is_stale((*steered).last_seen_ns, now) {
            (*steered).last_seen_ns = now;
        }
        let flags = with_close_event((*steered).flags, packet.close_event(false));
        if (*steered).flags != flags {
            (*steered).flags = flags;
        }
    }
    if clamp_mss(ctx, packet, config.tunnel_mss).is_err() {
        return drop(reason::DROP_ERROR, packet);
    }
    gateway::note_traffic(remote, gateway::Stamp::Received, now);
    send_to_pod(packet, ifindex, reason::REPLY_TO_POD)
}

#[inline(always)]
fn snat_and_send(
    ctx: &mut TcContext,
    packet: &Packet,
    policy: &PolicyValue,
    pod_node_ip: Ipv4,
    config: &DatapathConfig,
    now: u64,
) -> i32 {
    if policy.egress_ip == GATEWAY_NONE {
        return drop(reason::DROP_NO_EGRESS_IP, packet);
    }
    // SAFETY: plain lookup.
    let Some(egress) = (unsafe { EGRESS_IPS.get(&policy.egress_ip) }) else {
        return drop(reason::DROP_NO_EGRESS_IP, packet);
    };
    let ifindex = egress.ifindex;
    // The gateway forwards as a router: a packet whose TTL runs out here goes to the kernel,
    // which answers the pod with ICMP time exceeded (so traceroute shows the gateway).
    if packet.ttl <= 1 {
        return hand_expiring_to_kernel(ctx, packet);
    }
    // A later fragment follows its first fragment's translation; it cannot start one (its
    // datagram's port went out in the first fragment).
    // SAFETY: plain lookup.
    if packet.later_fragment && unsafe { NAT_FORWARD.get(&packet.flow) }.is_none() {
        return drop(reason::DROP_FRAGMENT_UNKNOWN, packet);
    }
    let verdict = match nat::translate_source(
        ctx,
        packet,
        policy.egress_ip,
        pod_node_ip,
        PortRange::of(config),
        now,
    ) {
        Ok(true) => reason::SNAT_NEW_FLOW,
        Ok(false) => reason::SNAT_EXISTING_FLOW,
        Err(verdict) => return verdict,
    };
    if decrement_ttl(ctx, packet).is_err() {
        return drop(reason::DROP_ERROR, packet);
    }
    redirect_neigh(packet, ifindex, verdict)
}

#[classifier]
pub(crate) fn from_egress(mut ctx: TcContext) -> i32 {
    let Some(packet) = parse(&ctx) else {
        return PASS;
    };
    // SAFETY: plain lookups.
    if unsafe { EGRESS_IPS.get(&packet.flow.dst_ip) }.is_none() {
        return PASS;
    }
    let Some(config) = config() else {
        return PASS;
    };
    if let Some(reverse) = NAT_REVERSE.get_ptr_mut(&packet.flow) {
        // SAFETY: valid for this run; last_seen is advisory (the garbage collector ages a
        // NAT pair by the newer of its two halves).
        let reverse = unsafe {
            let now = now();
            if last_seen_is_stale((*reverse).last_seen_ns, now) {
                (*reverse).last_seen_ns = now;
            }
            *reverse
        };
        if reverse.flags & NAT_TIME_WAIT != 0 {
            // The flow ended; only its port is held. Late segments go nowhere.
            return drop(reason::DROP_UNKNOWN_REPLY, &packet);
        }
        let event = packet.close_event(false);
        if event != 0 {
            record_remote_close(&packet, &reverse, event);
        }
        if rewrite(
            &mut ctx,
            &packet,
            End::Destination,
            reverse.pod_ip,
            reverse.pod_port,
        )
        .is_err()
        {
            return drop(reason::DROP_ERROR, &packet);
        }
        return send_back(&ctx, &packet, &reverse, config);
    }
    // An ICMP error about a translated flow (port unreachable, fragmentation needed) goes to
    // the pod too, so it learns of the problem.
    if let Some(quoted) = quoted_packet(&ctx, &packet)
        && quoted.flow.src_ip == packet.flow.dst_ip
    {
        // The quoted packet left as (egress IP -> remote); its reply key is its reverse.
        // SAFETY: plain lookup.
        if let Some(reverse) = unsafe { NAT_REVERSE.get(&quoted.flow.reversed()) } {
            let reverse = *reverse;
            if rewrite_icmp_error(&mut ctx, &packet, &quoted, reverse.pod_ip, reverse.pod_port)
                .is_err()
            {
                return drop(reason::DROP_ERROR, &packet);
            }
            return send_back(&ctx, &packet, &reverse, config);
        }
    }
    // A floating egress IP's reply for a flow another node translated: to that node.
    if let Some(verdict) = floating::reply_to_owner(&ctx, &packet, config) {
        return verdict;
    }
    // The node's own traffic to its egress IP.
    PASS
}

/// Notes the remote's FIN or RST on the flow's forward entry, where the pod's are noted:
/// the garbage collector reads the connection's state from there.
#[inline(always)]
fn record_remote_close(packet: &Packet, reverse: &NatReverse, event: u32) {
    let flow = FlowKey {
        src_ip: reverse.pod_ip,
        dst_ip: packet.flow.src_ip,
        src_port: reverse.pod_port,
        dst_port: packet.flow.src_port,
        protocol: packet.flow.protocol,
        _pad: [0; 3],
    };
    if let Some(forward) = NAT_FORWARD.get_ptr_mut(&flow) {
        // SAFETY: valid for this run; flags are advisory.
        unsafe { (*forward).flags = with_close_event((*forward).flags, event) };
    }
}

/// Sends a reverse-translated packet to the pod: directly when it runs here, else through
/// the tunnel to its node.
#[inline(always)]
fn send_back(
    ctx: &TcContext,
    packet: &Packet,
    reverse: &NatReverse,
    config: &DatapathConfig,
) -> i32 {
    if reverse.pod_node_ip == config.node_ip {
        // SAFETY: plain lookup.
        let Some(pod) = (unsafe { LOCAL_PODS.get(&reverse.pod_ip) }) else {
            return drop(reason::DROP_UNKNOWN_REPLY, packet);
        };
        return send_to_pod(packet, pod.ifindex, reason::REVERSE_SNAT);
    }
    tunnel_to(
        ctx,
        packet,
        reverse.pod_node_ip,
        VNI_TO_POD_NODE,
        config,
        reason::REVERSE_SNAT,
    )
}

/// A packet this node would forward with its TTL run out: to the kernel, which answers with
/// ICMP time exceeded as the router it is.
#[inline(always)]
pub(crate) fn hand_expiring_to_kernel(ctx: &mut TcContext, packet: &Packet) -> i32 {
    // A frame from the tunnel carries the pod node's MAC: mark it for this host, or the
    // kernel would drop it as another host's before forwarding (and answering) it.
    // SAFETY: helper on this program's skb.
    unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
    count(reason::PASS_TTL_EXCEEDED, packet.len);
    PASS
}

/// Encapsulates through the agent's VXLAN device (external mode) towards `remote`.
#[inline(always)]
pub(crate) fn tunnel_to(
    ctx: &TcContext,
    packet: &Packet,
    remote: Ipv4,
    vni: u32,
    config: &DatapathConfig,
    verdict: u32,
) -> i32 {
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(remote);
    key.tunnel_ttl = TUNNEL_TTL;
    // SAFETY: key is a valid bpf_tunnel_key of the size passed.
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &raw mut key,
            size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if ret != 0 {
        return drop(reason::DROP_ERROR, packet);
    }
    count(verdict, packet.len);
    #[cfg(feature = "test-programs")]
    test_programs::note_redirect(config.tunnel_ifindex, remote, vni);
    // SAFETY: helper with plain arguments.
    unsafe { bpf_redirect(config.tunnel_ifindex, 0) as i32 }
}

#[inline(always)]
fn send_to_pod(packet: &Packet, ifindex: u32, verdict: u32) -> i32 {
    redirect_neigh(packet, ifindex, verdict)
}

/// Sends out of `ifindex`; the kernel resolves the next hop and fills the Ethernet header.
#[inline(always)]
pub(crate) fn redirect_neigh(packet: &Packet, ifindex: u32, verdict: u32) -> i32 {
    // SAFETY: no neighbour parameters: the helper does the FIB lookup itself.
    let ret = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    if ret != TC_ACT_REDIRECT {
        return drop(reason::DROP_ERROR, packet);
    }
    count(verdict, packet.len);
    #[cfg(feature = "test-programs")]
    test_programs::note_redirect(ifindex, [0; 4], 0);
    ret
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
