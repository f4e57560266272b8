//! Fragmented datagrams: every fragment takes its first fragment's path, in both directions,
//! on both nodes; the gateway translates the first fragment's ports and every fragment's
//! address, so the reassembled datagram checks. Matched fragments used to be dropped, and
//! fragmented replies reached the gateway's own stack.

use crate::support::*;

/// The layer-4 bytes the first fragment carries: the UDP header and 8 bytes of payload.
const FIRST: usize = 16;

fn request() -> (Vec<u8>, Vec<u8>) {
    fragments(&packet(POD, 50000, DEST, 53, L4::Udp), FIRST)
}

/// Seen fields of a later fragment: only the addresses are in it.
fn addresses(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    let ip = &frame[14..34];
    (
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
    )
}

#[test]
fn the_pod_node_steers_every_fragment_of_a_matched_datagram() {
    if !root() {
        return;
    }
    let node = pod_node();
    let (first, later) = request();
    assert_eq!(node.run(program_names::FROM_POD, &first).0, TC_ACT_REDIRECT);
    assert_eq!(node.run(program_names::FROM_POD, &later).0, TC_ACT_REDIRECT);
    assert_eq!(node.counter(reason::REDIRECT_TO_GATEWAY), 2);
    // A later fragment whose first fragment never came: its flow is unknown.
    let (_, stray) = fragments(&packet(POD, 50001, DEST, 53, L4::Udp), FIRST);
    let mut stray = stray;
    stray[14 + 4..14 + 6].copy_from_slice(&(FRAGMENT_ID + 1).to_be_bytes());
    assert_eq!(node.run(program_names::FROM_POD, &stray).0, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_FRAGMENT_UNKNOWN), 1);
    assert_eq!(
        node.counter(reason::PASS_EXISTING_FLOW),
        0,
        "nothing leaked"
    );
}

#[test]
fn the_gateway_translates_every_fragment_and_the_datagram_still_checks() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let (first, later) = request();
    let (verdict, first_out) = from_pod_node(&node, &first);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, later_out) = from_pod_node(&node, &later);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&first_out).src, EGRESS_IP);
    assert_eq!(addresses(&later_out), (EGRESS_IP, DEST));
    assert_eq!(
        &later_out[34..],
        &later[34..],
        "a later fragment's payload is untouched"
    );
    let datagram = reassemble(&first_out, &later_out);
    assert_checksums(&datagram);
    assert_eq!(seen(&datagram).sport, seen(&first_out).sport);
    assert_eq!(
        node.nat_forward().len(),
        1,
        "one translation for the datagram"
    );

    // A later fragment cannot start a translation of its own.
    let (_, stray) = fragments(&packet(POD, 50001, DEST, 53, L4::Udp), FIRST);
    let mut stray = stray;
    stray[14 + 4..14 + 6].copy_from_slice(&(FRAGMENT_ID + 1).to_be_bytes());
    assert_eq!(from_pod_node(&node, &stray).0, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_FRAGMENT_UNKNOWN), 1);
}

#[test]
fn fragmented_replies_reach_the_pod_reverse_translated() {
    if !root() {
        return;
    }
    let gateway = gateway_node();
    let (_, out) = from_pod_node(&gateway, &packet(POD, 50000, DEST, 53, L4::Udp));
    let nat_port = seen(&out).sport;
    let (first, later) = fragments(&packet(DEST, 53, EGRESS_IP, nat_port, L4::Udp), FIRST);
    let (verdict, first_back) = gateway.run(program_names::FROM_EGRESS, &first);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, later_back) = gateway.run(program_names::FROM_EGRESS, &later);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "the fragment went to the gateway's stack"
    );
    assert_eq!(addresses(&later_back), (DEST, POD));
    let datagram = reassemble(&first_back, &later_back);
    assert_checksums(&datagram);
    assert_eq!(seen(&datagram).dport, 50000);
    assert_eq!(gateway.counter(reason::REVERSE_SNAT), 2);

    // On the pod's node, both fragments go to the pod.
    let pod_node = pod_node();
    pod_node.run(
        program_names::FROM_POD,
        &packet(POD, 50000, DEST, 53, L4::Udp),
    );
    assert_eq!(from_gateway_node(&pod_node, &first_back).0, TC_ACT_REDIRECT);
    assert_eq!(from_gateway_node(&pod_node, &later_back).0, TC_ACT_REDIRECT);
    assert_eq!(pod_node.counter(reason::REPLY_TO_POD), 2);
}

/// A big ping from outside: the pod's fragmented echo reply keeps the inbound path, every
/// fragment of it (a later fragment used to look like a new flow).
#[test]
fn a_pods_fragmented_echo_reply_keeps_its_path() {
    if !root() {
        return;
    }
    let node = pod_node();
    let reply = packet(POD, 0, DEST, 7, L4::IcmpEcho { reply: true });
    let (first, later) = fragments(&reply, FIRST);
    assert_eq!(node.run(program_names::FROM_POD, &first).0, TC_ACT_NEXT);
    assert_eq!(node.run(program_names::FROM_POD, &later).0, TC_ACT_NEXT);
    assert!(node.steered().is_empty());
    assert_eq!(node.counter(reason::PASS_EXISTING_FLOW), 2);
}
