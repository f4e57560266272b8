//! TCP connections end as a conntrack sees them end, on both nodes: closed by both sides'
//! FINs or by an RST from either side, half-closed by one FIN; a new SYN on a closed tuple
//! opens a new connection; a port the remote holds in TIME_WAIT is not handed to another
//! flow to it.

use crate::support::*;

fn tcp(flags: u8) -> Vec<u8> {
    packet(POD, 45000, DEST, 443, L4::Tcp { flags })
}

/// The remote's segment as it reaches the gateway, addressed to the translated port.
fn remote(nat_port: u16, flags: u8) -> Vec<u8> {
    packet(DEST, 443, EGRESS_IP, nat_port, L4::Tcp { flags })
}

/// The remote's segment as the gateway delivers it to the pod's node.
fn remote_to_pod(flags: u8) -> Vec<u8> {
    packet(DEST, 443, POD, 45000, L4::Tcp { flags })
}

fn gateway_flags(node: &Node) -> u32 {
    node.nat_forward()[0].1.flags
}

fn pod_node_flags(node: &Node) -> u32 {
    node.steered_entries()[0].1.flags
}

/// A server that resets the connection: both nodes see it closed (the port used to stay
/// held for the 6 h idle timeout, and a resetting server exhausted the ports in hours).
#[test]
fn a_remote_reset_closes_the_connection_on_both_nodes() {
    if !root() {
        return;
    }
    let gateway = gateway_node();
    let (_, out) = from_pod_node(&gateway, &tcp(SYN));
    let nat_port = seen(&out).sport;
    let (verdict, _) = gateway.run(program_names::FROM_EGRESS, &remote(nat_port, RST | ACK));
    assert_eq!(verdict, TC_ACT_REDIRECT, "the RST still reaches the pod");
    assert_eq!(TcpState::of(gateway_flags(&gateway)), TcpState::Closed);
    assert_ne!(gateway_flags(&gateway) & FLOW_RESET, 0);

    let pod_node = pod_node();
    pod_node.run(program_names::FROM_POD, &tcp(SYN));
    let (verdict, _) = from_gateway_node(&pod_node, &remote_to_pod(RST | ACK));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(TcpState::of(pod_node_flags(&pod_node)), TcpState::Closed);
}

/// One FIN is a half-close: the other side may go on sending, so the connection is not
/// closed (it used to get the 10 s closing timeout) until the other FIN.
#[test]
fn one_fin_half_closes_and_the_second_closes() {
    if !root() {
        return;
    }
    let gateway = gateway_node();
    let pod_node = pod_node();
    let (_, out) = from_pod_node(&gateway, &tcp(SYN));
    let nat_port = seen(&out).sport;
    pod_node.run(program_names::FROM_POD, &tcp(SYN));

    from_pod_node(&gateway, &tcp(FIN | ACK));
    pod_node.run(program_names::FROM_POD, &tcp(FIN | ACK));
    assert_eq!(TcpState::of(gateway_flags(&gateway)), TcpState::HalfClosed);
    assert_eq!(
        TcpState::of(pod_node_flags(&pod_node)),
        TcpState::HalfClosed
    );
    // The remote keeps sending data, then closes its side.
    gateway.run(program_names::FROM_EGRESS, &remote(nat_port, ACK));
    assert_eq!(TcpState::of(gateway_flags(&gateway)), TcpState::HalfClosed);
    gateway.run(program_names::FROM_EGRESS, &remote(nat_port, FIN | ACK));
    from_gateway_node(&pod_node, &remote_to_pod(FIN | ACK));
    assert_eq!(TcpState::of(gateway_flags(&gateway)), TcpState::Closed);
    assert_eq!(TcpState::of(pod_node_flags(&pod_node)), TcpState::Closed);
    // The pod closed first: the remote holds no TIME_WAIT for the port.
    assert_eq!(gateway_flags(&gateway) & FLOW_REMOTE_CLOSED_FIRST, 0);
}

#[test]
fn a_remote_that_closes_first_is_noted() {
    if !root() {
        return;
    }
    let gateway = gateway_node();
    let (_, out) = from_pod_node(&gateway, &tcp(SYN));
    let nat_port = seen(&out).sport;
    gateway.run(program_names::FROM_EGRESS, &remote(nat_port, FIN | ACK));
    from_pod_node(&gateway, &tcp(FIN | ACK));
    let flags = gateway_flags(&gateway);
    assert_eq!(TcpState::of(flags), TcpState::Closed);
    assert_ne!(flags & FLOW_REMOTE_CLOSED_FIRST, 0);
    assert_eq!(
        flags & (FLOW_FIN_FROM_POD | FLOW_FIN_FROM_REMOTE),
        FLOW_FIN_FROM_POD | FLOW_FIN_FROM_REMOTE
    );
}

/// A new SYN on a closed tuple is a new connection: it must not inherit the old one's
/// closing state (and its 10 s expiry).
#[test]
fn a_new_syn_on_a_closed_tuple_opens_a_new_connection() {
    if !root() {
        return;
    }
    let gateway = gateway_node();
    let pod_node = pod_node();
    for node_run in [
        &|frame: &[u8]| from_pod_node(&gateway, frame) as (u32, Vec<u8>),
        &|frame: &[u8]| pod_node.run(program_names::FROM_POD, frame),
    ] as [&dyn Fn(&[u8]) -> (u32, Vec<u8>); 2]
    {
        node_run(&tcp(SYN));
        node_run(&tcp(RST | ACK));
        node_run(&tcp(SYN));
    }
    assert_eq!(gateway_flags(&gateway), 0);
    assert_eq!(pod_node_flags(&pod_node), 0);
}

/// A port held for the remote's TIME_WAIT (the garbage collector marks the reverse entry of
/// a connection the remote closed first) goes to no new flow to that remote; late segments
/// of the old connection are dropped; the same pod reconnecting over the same tuple gets it
/// back, as the remote expects.
#[test]
fn a_port_held_for_time_wait_serves_only_its_own_tuple() {
    if !root() {
        return;
    }
    let mut gateway = gateway_node();
    // A pod port inside the NAT range is kept as the translated port.
    let old = packet(POD, 5000, DEST, 443, L4::Tcp { flags: SYN });
    from_pod_node(&gateway, &old);
    let (flow, _) = gateway.nat_forward()[0];
    let (reply, entry) = gateway.nat_reverse()[0];
    gateway
        .hash::<FlowKey, NatForward>(map_names::NAT_FORWARD)
        .remove(&flow)
        .unwrap();
    gateway
        .hash::<FlowKey, NatReverse>(map_names::NAT_REVERSE)
        .insert(
            reply,
            NatReverse {
                flags: NAT_TIME_WAIT,
                ..entry
            },
            0,
        )
        .unwrap();

    let (verdict, _) = gateway.run(program_names::FROM_EGRESS, &remote(5000, FIN | ACK));
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a late segment of the ended connection"
    );

    let other_pod = std::net::Ipv4Addr::new(10, 244, 1, 11);
    gateway.policy(other_pod, "198.51.100.0/24", to_gateway(EGRESS_IP));
    let other = packet(other_pod, 5000, DEST, 443, L4::Tcp { flags: SYN });
    let (verdict, out) = from_pod_node(&gateway, &other);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_ne!(seen(&out).sport, 5000, "the held port went to another flow");

    let (verdict, out) = from_pod_node(&gateway, &old);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&out).sport, 5000);
    let held = gateway
        .nat_reverse()
        .into_iter()
        .find(|(key, _)| *key == reply)
        .unwrap();
    assert_eq!(held.1.flags, 0, "the hold is lifted");
    let (verdict, back) = gateway.run(program_names::FROM_EGRESS, &remote(5000, SYN | ACK));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&back).dst, POD);
}
