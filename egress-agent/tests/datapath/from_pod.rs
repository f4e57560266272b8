//! `from_pod` (and `to_pod`), on the pod's node: which packets are steered into the tunnel,
//! and which keep their path.

use crate::support::*;

#[test]
fn no_match_is_untouched() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let input = packet(POD, 40000, OTHER_DEST, 443, L4::Tcp { flags: SYN });
    let (verdict, output) = node.run(program_names::FROM_POD, &input);
    assert_eq!(verdict, TC_ACT_NEXT);
    assert_eq!(output, input);
    assert_eq!(node.counter(reason::PASS_NO_MATCH), 1);
}

#[test]
fn excluded_cidr_is_untouched() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.0.0/16", with_gateway(GATEWAY.octets()));
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY_EXCLUDED));
    let input = packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN });
    let (verdict, output) = node.run(program_names::FROM_POD, &input);
    assert_eq!(verdict, TC_ACT_NEXT);
    assert_eq!(output, input);
    assert_eq!(node.counter(reason::PASS_EXCLUDED), 1);
    assert!(node.steered().is_empty());
}

#[test]
fn new_connection_is_redirected_to_the_remote_gateway() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let input = packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN });
    let (verdict, output) = node.run(program_names::FROM_POD, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // The pod's node does not translate: the gateway does.
    assert_eq!(output, input);
    assert_eq!(node.counter(reason::REDIRECT_TO_GATEWAY), 1);
    assert_eq!(
        node.sent_to(),
        Some(SentTo::Tunnel {
            remote: GATEWAY,
            vni: VNI_TO_GATEWAY
        })
    );
    assert_eq!(node.steered().len(), 1);
    // Later packets of the steered connection follow it.
    let next = packet(POD, 40000, DEST, 443, L4::Tcp { flags: ACK });
    assert_eq!(node.run(program_names::FROM_POD, &next).0, TC_ACT_REDIRECT);
}

#[test]
fn connection_opened_before_the_policy_keeps_its_path() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    // An ACK of a connection the node never steered (or a SYN-ACK of an inbound one).
    for flags in [ACK, SYN | ACK] {
        let input = packet(POD, 40000, DEST, 443, L4::Tcp { flags });
        let (verdict, output) = node.run(program_names::FROM_POD, &input);
        assert_eq!(verdict, TC_ACT_NEXT);
        assert_eq!(output, input);
    }
    assert_eq!(node.counter(reason::PASS_EXISTING_FLOW), 2);
}

#[test]
fn replies_of_inbound_udp_keep_their_path() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let inbound = packet(DEST, 5353, POD, 53, L4::Udp);
    assert_eq!(node.run(program_names::TO_POD, &inbound).0, TC_ACT_NEXT);
    let reply = packet(POD, 53, DEST, 5353, L4::Udp);
    assert_eq!(node.run(program_names::FROM_POD, &reply).0, TC_ACT_NEXT);
    assert_eq!(node.counter(reason::PASS_EXISTING_FLOW), 1);
    // A new UDP flow from the pod is steered.
    let outbound = packet(POD, 53000, DEST, 53, L4::Udp);
    assert_eq!(
        node.run(program_names::FROM_POD, &outbound).0,
        TC_ACT_REDIRECT
    );
}

/// An inbound UDP flow the pod now does all the sending of (a server streaming to a client
/// that asked once): the pod's packets keep the flow's record alive, so it is not taken for a
/// new outbound flow once the client goes quiet.
#[test]
fn the_pods_packets_keep_an_inbound_flow_alive() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    node.run(program_names::TO_POD, &packet(DEST, 5353, POD, 53, L4::Udp));
    let (flow, mut entry) = {
        let inbound: HashMap<&mut MapData, FlowKey, InboundFlow> =
            node.hash(map_names::INBOUND_FLOWS);
        inbound.iter().next().unwrap().unwrap()
    };
    entry.last_seen_ns = 0;
    node.hash::<FlowKey, InboundFlow>(map_names::INBOUND_FLOWS)
        .insert(flow, entry, 0)
        .unwrap();
    let sent = packet(POD, 53, DEST, 5353, L4::Udp);
    assert_eq!(node.run(program_names::FROM_POD, &sent).0, TC_ACT_NEXT);
    let inbound: HashMap<&mut MapData, FlowKey, InboundFlow> = node.hash(map_names::INBOUND_FLOWS);
    assert!(
        inbound.get(&flow, 0).unwrap().last_seen_ns > 0,
        "the pod's packet refreshed it"
    );
}

#[test]
fn no_gateway_drops() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY_NONE));
    for l4 in [
        L4::Tcp { flags: SYN },
        L4::Udp,
        L4::IcmpEcho { reply: false },
    ] {
        let input = packet(POD, 40000, DEST, 443, l4);
        assert_eq!(node.run(program_names::FROM_POD, &input).0, TC_ACT_SHOT);
    }
    assert_eq!(node.counter(reason::DROP_NO_GATEWAY), 3);
}

// ---- gateway: SNAT ----

#[test]
fn pod_on_the_gateway_is_translated_without_tunnel() {
    if !root() {
        return;
    }
    let mut node = Node::new(GATEWAY);
    let value = PolicyValue {
        pod_node_ip: GATEWAY.octets(),
        ..to_gateway(EGRESS_IP)
    };
    node.policy(POD, "198.51.100.0/24", value);
    node.egress_ip(EGRESS_IP, EGRESS_IFINDEX);
    let (verdict, output) = node.run(
        program_names::FROM_POD,
        &packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&output).src, EGRESS_IP);
    assert_eq!(node.sent_to(), Some(SentTo::Interface(EGRESS_IFINDEX)));
    assert_eq!(node.counter(reason::SNAT_NEW_FLOW), 1);
    assert_eq!(node.counter(reason::REDIRECT_TO_GATEWAY), 0);
    // Its reply goes straight to the pod, no tunnel.
    node.local_pod(POD, POD_IFINDEX);
    let reply = packet(DEST, 443, EGRESS_IP, 20000, L4::Tcp { flags: SYN | ACK });
    let (verdict, back) = node.run(program_names::FROM_EGRESS, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&back).dst, POD);
    assert_eq!(node.sent_to(), Some(SentTo::Interface(POD_IFINDEX)));
}

#[test]
fn mss_of_syns_entering_the_tunnel_is_clamped() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let syn = packet(
        POD,
        40000,
        DEST,
        443,
        L4::TcpMss {
            flags: SYN,
            mss: 1460,
        },
    );
    let (verdict, output) = node.run(program_names::FROM_POD, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(mss_of(&output), TUNNEL_MSS);
    assert_checksums(&output);
    // A smaller MSS is left alone.
    let small = packet(
        POD,
        40001,
        DEST,
        443,
        L4::TcpMss {
            flags: SYN,
            mss: 1200,
        },
    );
    assert_eq!(mss_of(&node.run(program_names::FROM_POD, &small).1), 1200);
}

#[test]
fn icmp_errors_a_pod_sends_keep_their_path() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let inbound = packet(DEST, 5353, POD, 9, L4::Udp);
    let error = icmp_error(POD, DEST, 3, 3, &inbound);
    assert_eq!(node.run(program_names::FROM_POD, &error).0, TC_ACT_NEXT);
    assert_eq!(node.counter(reason::PASS_EXISTING_FLOW), 1);
}

/// A ping from outside to a pod inside a policy's destinations: the pod's echo reply answers
/// an inbound flow and keeps its path, untouched (it used to be steered as a new flow).
#[test]
fn echo_replies_a_pod_sends_keep_their_path() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    let reply = packet(POD, 0, DEST, 4242, L4::IcmpEcho { reply: true });
    let (verdict, output) = node.run(program_names::FROM_POD, &reply);
    assert_eq!(verdict, TC_ACT_NEXT);
    assert_eq!(output, reply);
    assert_eq!(node.counter(reason::PASS_EXISTING_FLOW), 1);
    assert_eq!(node.counter(reason::REDIRECT_TO_GATEWAY), 0);
    assert!(node.steered().is_empty());
}

#[test]
fn in_cluster_destinations_are_never_steered() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "0.0.0.0/0", with_gateway(GATEWAY.octets()));
    let mut cidrs: LpmTrie<&mut MapData, [u8; 4], egress_common::nodes::ClusterCidr> =
        LpmTrie::try_from(node.ebpf.map_mut(map_names::CLUSTER_CIDRS).unwrap()).unwrap();
    cidrs
        .insert(
            &Key::new(16, [10, 244, 0, 0]),
            egress_common::nodes::ClusterCidr::default(),
            0,
        )
        .unwrap();
    let other_pod = Ipv4Addr::new(10, 244, 2, 7);
    for dst in [other_pod, GATEWAY] {
        let input = packet(POD, 40000, dst, 8080, L4::Tcp { flags: SYN });
        let (verdict, output) = node.run(program_names::FROM_POD, &input);
        assert_eq!(verdict, TC_ACT_NEXT, "{dst} is in the cluster");
        assert_eq!(output, input);
    }
    assert_eq!(node.counter(reason::PASS_IN_CLUSTER), 2);
    let outside = packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN });
    assert_eq!(
        node.run(program_names::FROM_POD, &outside).0,
        TC_ACT_REDIRECT
    );
}
