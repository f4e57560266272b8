//! Gateway SNAT: find or create a flow's translation, keeping forward and reverse entries
//! consistent even when two CPUs see the flow's first packets at once.

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_NOEXIST, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release},
    programs::TcContext,
};
use egress_common::{
    Ipv4, Port,
    config::{DatapathConfig, NAT_PORT_RETRIES},
    counters::reason,
    flow::{FlowKey, PROTO_TCP, PROTO_UDP, last_seen_is_stale, with_close_event},
    nat::{NatForward, NatReverse},
};

use crate::{
    drop,
    maps::{NAT_FORWARD, NAT_REVERSE, count},
    packet::{End, Packet, rewrite},
};

pub(crate) enum Translation {
    Existing(NatForward),
    New(NatForward),
    Exhausted,
    /// A NAT map is full: the flow is refused, established ones keep their entries.
    TableFull,
    Error,
}

/// `bpf_map_update_elem` with `BPF_NOEXIST` on a key that exists.
const EEXIST: i32 = -17;

/// The ports a translation may use, inclusive, host byte order: the gateway's NAT range,
/// or on a pod's node its block of a floating egress IP.
#[derive(Clone, Copy)]
pub(crate) struct PortRange {
    pub(crate) min: u32,
    pub(crate) max: u32,
    /// Whether an existing translation outside the range must be made again: a block of a
    /// floating egress IP that moved (the gateways accept only the new one). A gateway's
    /// own range keeps its flows when `--nat-port-range` changes.
    pub(crate) binding: bool,
}

impl PortRange {
    #[inline(always)]
    pub(crate) fn of(config: &DatapathConfig) -> Self {
        PortRange {
            min: u32::from(config.nat_port_min),
            max: u32::from(config.nat_port_max),
            binding: false,
        }
    }
}

/// Translates the packet's source: finds or makes its flow's translation (see
/// [`translate`]) and rewrites the packet to it. `Ok(true)` for a new flow; `Err` is the
/// drop verdict, counted.
#[inline(always)]
pub(crate) fn translate_source(
    ctx: &mut TcContext,
    packet: &Packet,
    egress_ip: Ipv4,
    pod_node_ip: Ipv4,
    ports: PortRange,
    now: u64,
) -> Result<bool, i32> {
    let (translation, new_flow) = match translate(ctx, packet, egress_ip, pod_node_ip, ports, now) {
        Translation::Existing(t) => (t, false),
        Translation::New(t) => (t, true),
        Translation::Exhausted => return Err(drop(reason::DROP_NAT_EXHAUSTED, packet)),
        Translation::TableFull => return Err(drop(reason::DROP_FLOW_TABLE_FULL, packet)),
        Translation::Error => return Err(drop(reason::DROP_ERROR, packet)),
    };
    rewrite(
        ctx,
        packet,
        End::Source,
        translation.nat_ip,
        translation.nat_port,
    )
    .map_err(|_| drop(reason::DROP_ERROR, packet))?;
    Ok(new_flow)
}

/// Returns the translation of `flow` (as the pod sent it) to `egress_ip`, allocating a port
/// of `ports` when the flow is new: the pod's own port when it lies in the range and is free
/// for (egress IP, destination, destination port, protocol), otherwise random ports in the
/// range, at most `NAT_PORT_RETRIES` tries. The reverse entry is claimed first with
/// BPF_NOEXIST, so a port is never handed to two flows.
#[inline(always)]
pub(crate) fn translate(
    ctx: &TcContext,
    packet: &Packet,
    egress_ip: Ipv4,
    pod_node_ip: Ipv4,
    ports: PortRange,
    now: u64,
) -> Translation {
    let flow = &packet.flow;
    let event = packet.close_event(true);
    if let Some(forward) = NAT_FORWARD.get_ptr_mut(flow) {
        // SAFETY: the entry stays valid for this program run; last_seen and flags are
        // advisory (the agent's garbage collector reads them).
        let existing = unsafe {
            if last_seen_is_stale((*forward).last_seen_ns, now) {
                (*forward).last_seen_ns = now;
            }
            // A SYN on a closed tuple opens a new connection over the same translation.
            let flags = if packet.is_tcp_open() {
                0
            } else {
                with_close_event((*forward).flags, event)
            };
            // Written only when it changes: most packets carry no SYN, FIN or RST.
            if (*forward).flags != flags {
                (*forward).flags = flags;
            }
            *forward
        };
        let reverse_key = flow.translated_reply(existing.nat_ip, existing.nat_port);
        // The reply half, if it still belongs to this flow.
        // SAFETY: as above; the fields read are plain data.
        let reverse = NAT_REVERSE
            .get_ptr_mut(&reverse_key)
            .filter(|reverse| unsafe {
                (**reverse).pod_ip == flow.src_ip && (**reverse).pod_port == flow.src_port
            });
        let port = u32::from(u16::from_be_bytes(existing.nat_port));
        let in_range = !ports.binding || (port >= ports.min && port <= ports.max);
        match reverse {
            Some(reverse) if existing.nat_ip == egress_ip && in_range => {
                if existing.pod_node_ip != pod_node_ip {
                    // The pod's IP now lives on another node (a new pod got it): replies go
                    // to the node that sent this packet, in both halves.
                    // SAFETY: as above.
                    unsafe {
                        (*reverse).pod_node_ip = pod_node_ip;
                        (*forward).pod_node_ip = pod_node_ip;
                    }
                }
                return Translation::Existing(NatForward {
                    pod_node_ip,
                    ..existing
                });
            }
            // The policy's egress IP changed, or this node's port block of it moved: the old
            // translation must not be used again.
            Some(_) => {
                let _ = NAT_REVERSE.remove(&reverse_key);
            }
            // The reply half is gone (evicted, or its port serves another flow now): no
            // reply could come back through this translation, so make a new one.
            None => {}
        }
        let _ = NAT_FORWARD.remove(flow);
    }
    let (min, max) = (ports.min, ports.max);
    if min == 0 || max < min {
        return Translation::Error;
    }
    let span = max - min + 1;
    let reverse = NatReverse {
        pod_ip: flow.src_ip,
        pod_port: flow.src_port,
        _pad: [0; 2],
        pod_node_ip,
        flags: 0,
        last_seen_ns: now,
    };
    let own_port = u32::from(u16::from_be_bytes(flow.src_port));
    let mut claimed: Option<(Port, bool)> = None;
    for attempt in 0..NAT_PORT_RETRIES {
        let port = if attempt == 0 && own_port >= min && own_port <= max {
            own_port
        } else {
            // SAFETY: helper without arguments. checked_rem: no panic path for the verifier.
            let Some(offset) = unsafe { bpf_get_prandom_u32() }.checked_rem(span) else {
                return Translation::Error;
            };
            min + offset
        };
        let port = (port as u16).to_be_bytes();
        if let Some(outcome) = claim(ctx, flow, egress_ip, port, &reverse, pod_node_ip, now) {
            match outcome {
                Claim::Claimed { adopted } => {
                    claimed = Some((port, adopted));
                    break;
                }
                Claim::TableFull => return Translation::TableFull,
            }
        }
        if attempt + 1 < NAT_PORT_RETRIES {
            count(reason::NAT_PORT_RETRY, 0);
        }
    }
    let Some((nat_port, adopted)) = claimed else {
        return Translation::Exhausted;
    };
    let forward = NatForward {
        nat_ip: egress_ip,
        nat_port,
        _pad: [0; 2],
        pod_node_ip,
        flags: with_close_event(0, event),
        last_seen_ns: now,
    };
    match NAT_FORWARD.insert(flow, &forward, u64::from(BPF_NOEXIST)) {
        Ok(()) => return Translation::New(forward),
        // Another CPU created the flow first: its translation is used below.
        Err(EEXIST) => {}
        Err(_) => {
            if !adopted {
                let _ = NAT_REVERSE.remove(&flow.translated_reply(egress_ip, nat_port));
            }
            return Translation::TableFull;
        }
    }
    // Give our port back (unless it was the surviving half, which the winner may use) and
    // use the winner's translation.
    if !adopted {
        let _ = NAT_REVERSE.remove(&flow.translated_reply(egress_ip, nat_port));
    }
    // SAFETY: plain lookup.
    match unsafe { NAT_FORWARD.get(flow) } {
        Some(winner) => Translation::Existing(*winner),
        None => Translation::Error,
    }
}

enum Claim {
    /// The port is this flow's now; `adopted` when its reverse entry was already there.
    Claimed { adopted: bool },
    /// NAT_REVERSE is out of room (E2BIG): trying other ports cannot help.
    TableFull,
}

/// Tries to claim `port` for `flow`; `None` when it serves another flow or a socket of the
/// node.
#[inline(always)]
fn claim(
    ctx: &TcContext,
    flow: &FlowKey,
    egress_ip: Ipv4,
    port: Port,
    reverse: &NatReverse,
    pod_node_ip: Ipv4,
    now: u64,
) -> Option<Claim> {
    if port_taken_by_host(ctx, flow, egress_ip, port) {
        return None;
    }
    let key = flow.translated_reply(egress_ip, port);
    match NAT_REVERSE.insert(&key, reverse, u64::from(BPF_NOEXIST)) {
        Ok(()) => Some(Claim::Claimed { adopted: false }),
        Err(EEXIST) => {
            // The reply key is this flow's own (it names this pod and port): the forward
            // half was lost, or the flow ended and the pod reconnects over the same tuple
            // (its port held for TIME_WAIT). Rebuild around it, so the flow keeps its port
            // and the remote sees the tuple it knows.
            // SAFETY: valid for this run; the fields read and written are plain data.
            let entry = NAT_REVERSE.get_ptr_mut(&key).filter(|entry| unsafe {
                (**entry).pod_ip == flow.src_ip && (**entry).pod_port == flow.src_port
            })?;
            // SAFETY: as above.
            unsafe {
                (*entry).pod_node_ip = pod_node_ip;
                (*entry).flags = 0;
                (*entry).last_seen_ns = now;
            }
            Some(Claim::Claimed { adopted: true })
        }
        Err(_) => Some(Claim::TableFull),
    }
}

/// `BPF_F_CURRENT_NETNS` (-1) as the socket lookups' u64 netns argument.
#[expect(
    clippy::cast_sign_loss,
    reason = "sign-extended on purpose: the helper wants u64::MAX"
)]
const CURRENT_NETNS: u64 = BPF_F_CURRENT_NETNS as u64;

/// Whether a socket of the node itself would receive the replies of `flow` translated to
/// (`egress_ip`, `port`): a listener on that port, or one of the node's own connections to the
/// same remote. Such ports are skipped, so translated flows never steal the node's traffic.
#[inline(always)]
fn port_taken_by_host(ctx: &TcContext, flow: &FlowKey, egress_ip: Ipv4, port: Port) -> bool {
    if flow.protocol != PROTO_TCP && flow.protocol != PROTO_UDP {
        return false;
    }
    // SAFETY: plain data, every field set below.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // The lookup sees the reply as it would arrive: from the remote to the egress IP.
    tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
        saddr: u32::from_ne_bytes(flow.dst_ip),
        daddr: u32::from_ne_bytes(egress_ip),
        sport: u16::from_ne_bytes(flow.dst_port),
        dport: u16::from_ne_bytes(port),
    };
    let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    let skb = ctx.skb.skb.cast::<c_void>();
    // SAFETY: tuple and size describe an IPv4 tuple; a found socket is released at once.
    unsafe {
        let socket = if flow.protocol == PROTO_TCP {
            bpf_sk_lookup_tcp(skb, &raw mut tuple, size, CURRENT_NETNS, 0)
        } else {
            bpf_sk_lookup_udp(skb, &raw mut tuple, size, CURRENT_NETNS, 0)
        };
        if socket.is_null() {
            return false;
        }
        bpf_sk_release(socket.cast::<c_void>());
    }
    true
}
