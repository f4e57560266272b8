//! Several gateways per entry: new flows take the first usable candidate, established flows
//! keep theirs until it fails, a candidate that is not first translates the flows that
//! failed over to it; health probes are answered by the gateway's datapath and noted by the
//! probing node's.

use egress_agent::health::probe_frame;
use egress_common::gateway::{
    GATEWAY_DOWN, GATEWAY_DRAINING, GatewayTraffic, PROBE_REPLY, PROBE_VIA_ANY, PROBE_VIA_TC,
    ProbeReply,
};

use crate::support::*;

const GATEWAY_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 13);
const GATEWAY_C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 14);
const GROUP: u32 = 7;

fn grouped(group: u32, first: Ipv4Addr) -> PolicyValue {
    PolicyValue {
        gateway_group: group,
        ..with_gateway(first.octets())
    }
}

/// The pod's node with the pod's entry naming `GROUP` = `candidates`.
fn pod_node_with(candidates: &[Ipv4Addr]) -> Node {
    let mut node = pod_node();
    set_group(&mut node, GROUP, candidates, 0);
    node.policy(POD, "198.51.100.0/24", grouped(GROUP, candidates[0]));
    node
}

fn syn(port: u16) -> Vec<u8> {
    packet(POD, port, DEST, 443, L4::Tcp { flags: SYN })
}

fn ack(port: u16) -> Vec<u8> {
    packet(POD, port, DEST, 443, L4::Tcp { flags: ACK })
}

/// Where the pod's node sent a packet: the gateway's address, or `None` when it was not
/// sent into the tunnel.
fn tunnelled_to(node: &Node, frame: &[u8]) -> Option<Ipv4Addr> {
    let (verdict, _) = node.run(program_names::FROM_POD, frame);
    match node.sent_to() {
        Some(SentTo::Tunnel { remote, vni }) if verdict == TC_ACT_REDIRECT => {
            assert_eq!(vni, VNI_TO_GATEWAY);
            Some(remote)
        }
        _ => None,
    }
}

#[test]
fn new_flows_take_the_first_candidate_neither_down_nor_draining() {
    if !root() {
        return;
    }
    let mut node = pod_node_with(&[GATEWAY, GATEWAY_B, GATEWAY_C]);
    assert_eq!(
        tunnelled_to(&node, &syn(40000)),
        Some(GATEWAY),
        "all up: the first"
    );
    set_health(&mut node, GATEWAY, GATEWAY_DOWN);
    assert_eq!(tunnelled_to(&node, &syn(40001)), Some(GATEWAY_B));
    set_health(&mut node, GATEWAY_B, GATEWAY_DRAINING);
    assert_eq!(
        tunnelled_to(&node, &syn(40002)),
        Some(GATEWAY_C),
        "B drains"
    );
    set_health(&mut node, GATEWAY_C, GATEWAY_DOWN);
    // Every candidate down or draining: dropped and counted, never sent with the node's IP.
    let (verdict, _) = node.run(program_names::FROM_POD, &syn(40003));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.sent_to(), None);
    assert_eq!(node.counter(reason::DROP_NO_GATEWAY), 1);
    assert_eq!(
        node.counter(reason::PASS_EXISTING_FLOW),
        0,
        "nothing leaked"
    );
}

/// Only failure moves a flow: a gateway joining ahead of it, or its own gateway draining or
/// coming back, leaves it where it is; its gateway going down moves it once.
#[test]
fn an_established_flow_keeps_its_gateway_until_that_one_fails() {
    if !root() {
        return;
    }
    let mut node = pod_node_with(&[GATEWAY, GATEWAY_B]);
    assert_eq!(tunnelled_to(&node, &syn(40000)), Some(GATEWAY));
    // C joins ahead of both (a relabel): new flows take it, the established one stays.
    set_group(&mut node, GROUP + 1, &[GATEWAY_C, GATEWAY, GATEWAY_B], 0);
    node.policy(POD, "198.51.100.0/24", grouped(GROUP + 1, GATEWAY_C));
    assert_eq!(tunnelled_to(&node, &ack(40000)), Some(GATEWAY));
    assert_eq!(tunnelled_to(&node, &syn(40001)), Some(GATEWAY_C));
    // Its gateway drains: still there.
    set_health(&mut node, GATEWAY, GATEWAY_DRAINING);
    assert_eq!(tunnelled_to(&node, &ack(40000)), Some(GATEWAY));
    assert_eq!(node.counter(reason::FLOW_FAILED_OVER), 0);
    // Its gateway goes down: it moves to the first usable candidate, once.
    set_health(&mut node, GATEWAY, GATEWAY_DOWN);
    assert_eq!(tunnelled_to(&node, &ack(40000)), Some(GATEWAY_C));
    assert_eq!(tunnelled_to(&node, &ack(40000)), Some(GATEWAY_C));
    assert_eq!(node.counter(reason::FLOW_FAILED_OVER), 1);
    let pinned = node
        .steered_entries()
        .into_iter()
        .find(|(flow, _)| flow.src_port == 40000_u16.to_be_bytes())
        .unwrap()
        .1;
    assert_eq!(pinned.gateway_ip, GATEWAY_C.octets());
    // It comes back: the flow stays on C.
    set_health(&mut node, GATEWAY, 0);
    assert_eq!(tunnelled_to(&node, &ack(40000)), Some(GATEWAY_C));
    assert_eq!(node.counter(reason::FLOW_FAILED_OVER), 1);
}

/// A policy edit that drops a flow's gateway from the candidates moves the flow: that
/// gateway no longer accepts it.
#[test]
fn a_flow_whose_gateway_left_the_candidates_moves() {
    if !root() {
        return;
    }
    let mut node = pod_node_with(&[GATEWAY, GATEWAY_B]);
    assert_eq!(tunnelled_to(&node, &syn(40000)), Some(GATEWAY));
    set_group(&mut node, GROUP + 1, &[GATEWAY_B], 0);
    node.policy(POD, "198.51.100.0/24", grouped(GROUP + 1, GATEWAY_B));
    assert_eq!(tunnelled_to(&node, &ack(40000)), Some(GATEWAY_B));
    assert_eq!(node.counter(reason::FLOW_FAILED_OVER), 1);
}

/// The gateway B, second candidate of the pod's group: it translates the pod's traffic
/// (a flow that failed over to it); C, no candidate, refuses it as before.
#[test]
fn a_candidate_that_is_not_first_translates_failed_over_flows() {
    if !root() {
        return;
    }
    let request = packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN });
    let node_for = |own: Ipv4Addr, candidates: &[Ipv4Addr]| {
        let mut node = Node::new(own);
        set_group(&mut node, GROUP, candidates, 0);
        node.policy(
            POD,
            "198.51.100.0/24",
            PolicyValue {
                egress_ip: EGRESS_IP.octets(),
                ..grouped(GROUP, GATEWAY)
            },
        );
        node.egress_ip(EGRESS_IP, EGRESS_IFINDEX);
        node
    };
    let second = node_for(GATEWAY_B, &[GATEWAY, GATEWAY_B]);
    let (verdict, output) = from_pod_node(&second, &request);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(second.sent_to(), Some(SentTo::Interface(EGRESS_IFINDEX)));
    assert_eq!(seen(&output).src, EGRESS_IP);
    assert_eq!(second.counter(reason::SNAT_NEW_FLOW), 1);

    let outsider = node_for(GATEWAY_C, &[GATEWAY, GATEWAY_B]);
    let (verdict, _) = from_pod_node(&outsider, &request);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(
        outsider.counter(reason::DROP_NOT_ALLOWED),
        1,
        "no open relay"
    );
}

/// A probe as it leaves the tunnel device: the frame without its VXLAN header.
fn probe(from: Ipv4Addr, to: Ipv4Addr, seq: u64, sent_ns: u64) -> Vec<u8> {
    probe_frame(from, to, seq, sent_ns, PROBE_VIA_ANY)[8..].to_vec()
}

#[test]
fn a_gateway_answers_probes_in_its_datapath_with_its_own_health() {
    if !root() {
        return;
    }
    let mut gateway = gateway_node();
    let request = probe(POD_NODE, GATEWAY, 5, 1234);
    let (verdict, reply) = from_pod_node(&gateway, &request);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        gateway.sent_to(),
        Some(SentTo::Tunnel {
            remote: POD_NODE,
            vni: VNI_TO_POD_NODE
        })
    );
    assert_eq!(seen(&reply).src, GATEWAY);
    assert_eq!(seen(&reply).dst, POD_NODE);
    assert_eq!(checksum(&reply[14..34], 0), 0, "IPv4 checksum");
    let payload = &reply[42..];
    assert_eq!(payload[4..6], [PROBE_REPLY, PROBE_VIA_TC]);
    assert_eq!(u32::from_ne_bytes(payload[8..12].try_into().unwrap()), 0);
    assert_eq!(u64::from_ne_bytes(payload[16..24].try_into().unwrap()), 5);
    assert_eq!(
        u64::from_ne_bytes(payload[24..32].try_into().unwrap()),
        1234
    );
    assert_eq!(gateway.counter(reason::PROBE_ANSWERED), 1);
    // A gateway that cannot serve says so.
    set_health(&mut gateway, GATEWAY, GATEWAY_DOWN);
    let (_, reply) = from_pod_node(&gateway, &request);
    assert_eq!(
        u32::from_ne_bytes(reply[50..54].try_into().unwrap()),
        GATEWAY_DOWN
    );
    // A probe whose inner source is not the node that sent it is no probe of that node.
    let spoofed = probe(DEST, GATEWAY, 5, 1234);
    assert_eq!(from_pod_node(&gateway, &spoofed).0, TC_ACT_SHOT);
    assert_eq!(gateway.counter(reason::DROP_NOT_ALLOWED), 1);
}

#[test]
fn the_probing_node_notes_replies_for_its_prober() {
    if !root() {
        return;
    }
    let gateway = gateway_node();
    let (_, reply) = from_pod_node(&gateway, &probe(POD_NODE, GATEWAY, 9, 4321));
    let mut node = pod_node();
    let (verdict, _) = from_gateway_node(&node, &reply);
    assert_eq!(verdict, TC_ACT_SHOT, "consumed");
    assert_eq!(node.counter(reason::PROBE_REPLY_RECEIVED), 1);
    let noted = node
        .hash::<[u8; 4], ProbeReply>(map_names::PROBE_REPLIES)
        .get(&GATEWAY.octets(), 0)
        .unwrap();
    assert_eq!(
        (noted.seq, noted.sent_ns, noted.gateway_flags),
        (9, 4321, 0)
    );
    assert!(noted.received_ns > 0);
    assert_eq!(node.counter(reason::DROP_UNKNOWN_REPLY), 0);
}

fn traffic_of(node: &mut Node, gateway: Ipv4Addr) -> Option<GatewayTraffic> {
    node.hash::<[u8; 4], GatewayTraffic>(map_names::GATEWAY_TRAFFIC)
        .get(&gateway.octets(), 0)
        .ok()
}

/// Demand mode's evidence: the pod's node stamps when it sent pods' traffic to a gateway and
/// when a reply from it reached a pod, in the entries its prober made (never making one).
#[test]
fn the_pod_node_stamps_traffic_to_and_replies_from_a_probed_gateway() {
    if !root() {
        return;
    }
    let mut node = pod_node();
    node.run(program_names::FROM_POD, &syn(40000));
    assert_eq!(
        traffic_of(&mut node, GATEWAY),
        None,
        "not probed: no entry made"
    );

    node.hash::<[u8; 4], GatewayTraffic>(map_names::GATEWAY_TRAFFIC)
        .insert(GATEWAY.octets(), GatewayTraffic::default(), 0)
        .unwrap();
    assert_eq!(tunnelled_to(&node, &ack(40000)), Some(GATEWAY));
    let sent = traffic_of(&mut node, GATEWAY).unwrap();
    assert!(sent.sent_ns > 0, "{sent:?}");
    assert_eq!(sent.received_ns, 0, "nothing came back yet");

    // A reply the node refuses (no such flow) is no sign of life.
    let stray = packet(DEST, 443, POD, 40999, L4::Tcp { flags: ACK });
    assert_eq!(from_gateway_node(&node, &stray).0, TC_ACT_SHOT);
    assert_eq!(traffic_of(&mut node, GATEWAY).unwrap().received_ns, 0);

    let reply = packet(DEST, 443, POD, 40000, L4::Tcp { flags: ACK });
    assert_eq!(from_gateway_node(&node, &reply).0, TC_ACT_REDIRECT);
    let answered = traffic_of(&mut node, GATEWAY).unwrap();
    assert!(answered.received_ns >= sent.sent_ns, "{answered:?}");
    assert_eq!(
        answered.sent_ns, sent.sent_ns,
        "within the stamp granularity"
    );
}
