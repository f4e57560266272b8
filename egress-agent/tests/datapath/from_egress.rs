//! `from_egress`, on the gateway: replies and ICMP errors reverse-translated and sent back
//! through the tunnel to the pod's node.

use crate::support::*;

#[test]
fn reply_is_reverse_translated_and_sent_back_to_the_pods_node() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let request = seen(
        &from_pod_node(
            &node,
            &packet(POD, 45000, DEST, 443, L4::Tcp { flags: SYN }),
        )
        .1,
    );
    let reply = packet(
        DEST,
        443,
        EGRESS_IP,
        request.sport,
        L4::Tcp { flags: SYN | ACK },
    );
    let (verdict, output) = node.run(program_names::FROM_EGRESS, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = seen(&output);
    assert_eq!((out.src, out.sport), (DEST, 443));
    assert_eq!((out.dst, out.dport), (POD, 45000));
    assert_checksums(&output);
    assert_eq!(node.counter(reason::REVERSE_SNAT), 1);
    assert_eq!(
        node.sent_to(),
        Some(SentTo::Tunnel {
            remote: POD_NODE,
            vni: VNI_TO_POD_NODE
        }),
        "back to the pod's node, on the reply VNI"
    );
}

#[test]
fn icmp_echo_reply_is_reverse_translated() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let request = seen(
        &from_pod_node(
            &node,
            &packet(POD, 777, DEST, 0, L4::IcmpEcho { reply: false }),
        )
        .1,
    );
    let reply = packet(
        DEST,
        0,
        EGRESS_IP,
        request.sport,
        L4::IcmpEcho { reply: true },
    );
    let (verdict, output) = node.run(program_names::FROM_EGRESS, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = seen(&output);
    assert_eq!((out.dst, out.dport), (POD, 777));
    assert_checksums(&output);
}

#[test]
fn gateway_nodes_own_traffic_is_untouched() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let input = packet(DEST, 443, EGRESS_IP, 40000, L4::Tcp { flags: ACK });
    let (verdict, output) = node.run(program_names::FROM_EGRESS, &input);
    assert_eq!(verdict, TC_ACT_NEXT);
    assert_eq!(output, input);
}

#[test]
fn icmp_error_about_a_translated_flow_reaches_the_pod_translated() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let (_, sent) = from_pod_node(&node, &packet(POD, 45000, DEST, 53, L4::Udp));
    let nat_port = seen(&sent).sport;
    // The destination answers "port unreachable", quoting the packet it received.
    let error = icmp_error(DEST, EGRESS_IP, 3, 3, &sent);
    let (verdict, output) = node.run(program_names::FROM_EGRESS, &error);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&output).dst, POD);
    assert_checksums(&output);
    // The quoted UDP source port is the first layer-4 field.
    assert_eq!(quoted_source(&output, 0), (POD, 45000));
    assert_ne!(nat_port, 0);
    assert_eq!(node.counter(reason::REVERSE_SNAT), 1);
    // An error quoting a flow the gateway never translated is not the datapath's.
    let stray = icmp_error(
        DEST,
        EGRESS_IP,
        3,
        3,
        &packet(EGRESS_IP, 999, DEST, 53, L4::Udp),
    );
    assert_eq!(node.run(program_names::FROM_EGRESS, &stray).0, TC_ACT_NEXT);
}

/// `ping -t 2` from a pod: a router beyond the gateway answers "time exceeded", quoting the
/// translated echo request; the pod gets it with its own address and echo identifier.
#[test]
fn icmp_error_about_a_translated_echo_reaches_the_pod_translated() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let request = packet(POD, 45000, DEST, 0, L4::IcmpEcho { reply: false });
    let (verdict, sent) = from_pod_node(&node, &request);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&sent).src, EGRESS_IP);
    let router = Ipv4Addr::new(198, 51, 100, 1);
    let error = icmp_error(router, EGRESS_IP, 11, 0, &sent);
    let (verdict, output) = node.run(program_names::FROM_EGRESS, &error);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&output).dst, POD);
    assert_checksums(&output);
    // The quoted echo identifier (4 bytes into the ICMP header) is the pod's again.
    assert_eq!(quoted_source(&output, 4), (POD, 45000));
    assert_eq!(node.counter(reason::REVERSE_SNAT), 1);
}
