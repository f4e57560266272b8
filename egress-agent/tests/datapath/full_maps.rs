//! Flow and NAT maps that are full: new flows are refused and counted, established flows keep
//! their entries and their path, and no packet of a matched flow leaves with another source.

use crate::support::*;

const CAPACITY: u32 = 4;

fn syn(port: u16) -> Vec<u8> {
    packet(POD, port, DEST, 443, L4::Tcp { flags: SYN })
}

fn ack(port: u16) -> Vec<u8> {
    packet(POD, port, DEST, 443, L4::Tcp { flags: ACK })
}

/// On the pod's node, flows beyond the map's capacity are dropped. An LRU map would have
/// evicted the established ones, whose next packets would then leave with the node's IP.
#[test]
fn a_full_flow_map_refuses_new_flows_and_keeps_established_ones() {
    if !root() {
        return;
    }
    let mut node = Node::with_flow_capacity(POD_NODE, CAPACITY);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let established: Vec<u16> = (0..CAPACITY as u16).map(|i| 40000 + i).collect();
    for port in &established {
        assert_eq!(
            node.run(program_names::FROM_POD, &syn(*port)).0,
            TC_ACT_REDIRECT
        );
    }
    // Twice the capacity in new flows, TCP and UDP.
    for i in 0..CAPACITY as u16 {
        assert_eq!(
            node.run(program_names::FROM_POD, &syn(41000 + i)).0,
            TC_ACT_SHOT
        );
        let udp = packet(POD, 42000 + i, DEST, 53, L4::Udp);
        assert_eq!(node.run(program_names::FROM_POD, &udp).0, TC_ACT_SHOT);
    }
    assert_eq!(
        node.counter(reason::DROP_FLOW_TABLE_FULL),
        2 * u64::from(CAPACITY)
    );
    for port in &established {
        let (verdict, output) = node.run(program_names::FROM_POD, &ack(*port));
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "flow from port {port} lost its path"
        );
        assert_eq!(seen(&output).src, POD, "steered, untranslated");
    }
    assert_eq!(
        node.counter(reason::PASS_EXISTING_FLOW),
        0,
        "nothing leaked"
    );
    assert_eq!(node.steered().len(), CAPACITY as usize);
}

/// On the gateway, a full NAT map refuses new flows (not counted as port exhaustion: other
/// ports are free), and established flows keep their translation both ways.
#[test]
fn a_full_nat_map_refuses_new_flows_and_keeps_established_ones() {
    if !root() {
        return;
    }
    let mut node = Node::with_flow_capacity(GATEWAY, CAPACITY);
    node.policy(POD, "198.51.100.0/24", to_gateway(EGRESS_IP));
    node.egress_ip(EGRESS_IP, EGRESS_IFINDEX);
    let mut translated = Vec::new();
    for i in 0..CAPACITY as u16 {
        let (verdict, output) = from_pod_node(&node, &syn(40000 + i));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        translated.push((40000 + i, seen(&output).sport));
    }
    for i in 0..CAPACITY as u16 {
        assert_eq!(from_pod_node(&node, &syn(41000 + i)).0, TC_ACT_SHOT);
    }
    assert_eq!(
        node.counter(reason::DROP_FLOW_TABLE_FULL),
        u64::from(CAPACITY)
    );
    assert_eq!(node.counter(reason::DROP_NAT_EXHAUSTED), 0);
    for (pod_port, nat_port) in translated {
        let (verdict, output) = from_pod_node(&node, &ack(pod_port));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(
            (seen(&output).src, seen(&output).sport),
            (EGRESS_IP, nat_port)
        );
        let reply = packet(DEST, 443, EGRESS_IP, nat_port, L4::Tcp { flags: ACK });
        let (verdict, back) = node.run(program_names::FROM_EGRESS, &reply);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!((seen(&back).dst, seen(&back).dport), (POD, pod_port));
    }
}

/// A flow whose forward half was lost keeps its port: its surviving reverse entry names it,
/// so the translation is rebuilt around it and the remote sees the same source.
#[test]
fn a_flow_whose_forward_entry_was_lost_keeps_its_port() {
    if !root() {
        return;
    }
    let mut node = gateway_node();
    // A pod port inside the NAT range is kept as the translated port.
    let request = packet(POD, 5000, DEST, 53, L4::Udp);
    from_pod_node(&node, &request);
    let (flow, _) = node.nat_forward()[0];
    node.hash::<FlowKey, NatForward>(map_names::NAT_FORWARD)
        .remove(&flow)
        .unwrap();
    let (verdict, output) = from_pod_node(&node, &request);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((seen(&output).src, seen(&output).sport), (EGRESS_IP, 5000));
    let (forward, reverse) = (node.nat_forward(), node.nat_reverse());
    assert_eq!((forward.len(), reverse.len()), (1, 1));
    assert_eq!(forward[0].1.nat_port, 5000u16.to_be_bytes());
    let reply = packet(DEST, 53, EGRESS_IP, 5000, L4::Udp);
    let (verdict, back) = node.run(program_names::FROM_EGRESS, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((seen(&back).dst, seen(&back).dport), (POD, 5000));
}
