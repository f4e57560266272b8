//! Scenarios of Cilium's own egress gateway BPF tests (`bpf/tests/tc_egressgw_*.c`) that the
//! per-program files do not cover already: tuple collisions over a stale NAT entry (the
//! policy's egress IP changed under an established flow) with their replies, and an
//! excluded CIDR on the gateway's path.

use crate::support::*;

const NEW_EGRESS_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 201);

/// The gateway after the policy moved from `EGRESS_IP` to `NEW_EGRESS_IP`, with a NAT entry
/// for `request` made under the old one.
fn gateway_with_stale_entry(request: &[u8]) -> Node {
    let mut node = gateway_node();
    let (_, out) = from_pod_node(&node, request);
    assert_eq!(seen(&out).src, EGRESS_IP);
    node.policy(POD, "198.51.100.0/24", to_gateway(NEW_EGRESS_IP));
    node.egress_ip(NEW_EGRESS_IP, EGRESS_IFINDEX + 1);
    node
}

/// Tuple collision 1: the next packet of the flow leaves with the new egress IP, through
/// the new IP's interface; the stale translation is gone, so the old IP serves it no more.
#[test]
fn tuple_collision_1_a_stale_entry_gives_way_to_the_new_egress_ip() {
    if !root() {
        return;
    }
    let request = packet(POD, 5000, DEST, 443, L4::Tcp { flags: SYN });
    let node = gateway_with_stale_entry(&request);
    let (verdict, out) = from_pod_node(&node, &request);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&out).src, NEW_EGRESS_IP);
    assert_checksums(&out);
    assert_eq!(node.sent_to(), Some(SentTo::Interface(EGRESS_IFINDEX + 1)));
    let forward = node.nat_forward();
    assert_eq!(forward.len(), 1);
    assert_eq!(forward[0].1.nat_ip, NEW_EGRESS_IP.octets());
    let reverse = node.nat_reverse();
    assert_eq!(reverse.len(), 1, "the old reply key is gone: {reverse:?}");
    assert_eq!(reverse[0].0.dst_ip, NEW_EGRESS_IP.octets());
}

/// Tuple collision 1, reply: a reply to the new egress IP reaches the pod's node; one to
/// the old IP is not translated (it goes to the gateway's own stack).
#[test]
fn tuple_collision_1_reply_comes_back_only_through_the_new_egress_ip() {
    if !root() {
        return;
    }
    let request = packet(POD, 5000, DEST, 443, L4::Tcp { flags: SYN });
    let node = gateway_with_stale_entry(&request);
    let (_, out) = from_pod_node(&node, &request);
    let port = seen(&out).sport;
    let reply = packet(DEST, 443, NEW_EGRESS_IP, port, L4::Tcp { flags: SYN | ACK });
    let (verdict, back) = node.run(program_names::FROM_EGRESS, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((seen(&back).dst, seen(&back).dport), (POD, 5000));
    assert_eq!(
        node.sent_to(),
        Some(SentTo::Tunnel {
            remote: POD_NODE,
            vni: VNI_TO_POD_NODE
        })
    );
    let old = packet(DEST, 443, EGRESS_IP, port, L4::Tcp { flags: SYN | ACK });
    let (verdict, untouched) = node.run(program_names::FROM_EGRESS, &old);
    assert_eq!(verdict, TC_ACT_NEXT);
    assert_eq!(untouched, old);
}

/// Tuple collision 2: another pod's flow took the old translation's reply key under the new
/// egress IP while the stale entry lingered; the stale flow gets a port of its own, and each
/// flow's replies reach its own pod.
#[test]
fn tuple_collision_2_flows_sharing_a_stale_reply_key_get_their_own_ports() {
    if !root() {
        return;
    }
    let request = packet(POD, 5000, DEST, 443, L4::Tcp { flags: SYN });
    let mut node = gateway_with_stale_entry(&request);
    let other_pod = Ipv4Addr::new(10, 244, 1, 11);
    node.policy(other_pod, "198.51.100.0/24", to_gateway(NEW_EGRESS_IP));
    // The other pod, same source port: it claims (DEST:443 -> NEW_EGRESS_IP:5000) first.
    let other = packet(other_pod, 5000, DEST, 443, L4::Tcp { flags: SYN });
    let (_, other_out) = from_pod_node(&node, &other);
    assert_eq!(
        (seen(&other_out).src, seen(&other_out).sport),
        (NEW_EGRESS_IP, 5000)
    );
    let (_, out) = from_pod_node(&node, &request);
    assert_eq!(seen(&out).src, NEW_EGRESS_IP);
    assert_ne!(seen(&out).sport, 5000, "the port serves the other flow");
    for (port, pod) in [(5000, other_pod), (seen(&out).sport, POD)] {
        let reply = packet(DEST, 443, NEW_EGRESS_IP, port, L4::Tcp { flags: SYN | ACK });
        let (verdict, back) = node.run(program_names::FROM_EGRESS, &reply);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!((seen(&back).dst, seen(&back).dport), (pod, 5000));
    }
}

/// An excluded CIDR on the gateway: a pod's node never sends such traffic, so a tunnel
/// packet to it is not translated (Cilium's gateway drops it the same way).
#[test]
fn excluded_destination_is_not_translated_on_the_gateway() {
    if !root() {
        return;
    }
    let mut node = gateway_node();
    node.policy(
        POD,
        "198.51.100.0/28",
        PolicyValue {
            gateway_ip: GATEWAY_EXCLUDED,
            ..to_gateway(EGRESS_IP)
        },
    );
    let excluded = packet(POD, 5000, DEST, 443, L4::Tcp { flags: SYN });
    let (verdict, _) = from_pod_node(&node, &excluded);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_NOT_ALLOWED), 1);
    assert!(node.nat_forward().is_empty());
    // The rest of the policy's destinations still are.
    let other = packet(
        POD,
        5001,
        Ipv4Addr::new(198, 51, 100, 200),
        443,
        L4::Tcp { flags: SYN },
    );
    assert_eq!(from_pod_node(&node, &other).0, TC_ACT_REDIRECT);
    assert_eq!(node.sent_to(), Some(SentTo::Interface(EGRESS_IFINDEX)));
}
