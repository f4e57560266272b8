//! Floating egress IPs: the pod's node translates with its own block of the egress IP's
//! ports and the gateway only forwards, checking the block is the sender's; replies go to the
//! block's node, which turns them back. A flow keeps its translation when its gateway
//! changes.

use egress_common::gateway::{
    GATEWAY_DOWN, GROUP_POD_NODE_TRANSLATES, PortBlock, PortBlockKey, PortBlockOwner,
};

use crate::support::*;

const GATEWAY_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 13);
const GROUP: u32 = 9;
/// The pod node's block: ports 2048-2111 of the egress IP.
const BLOCK_FIRST: u16 = 2048;
const BLOCK: u16 = (BLOCK_FIRST - NAT_MIN) / 64;

fn floating_value(pod_node: [u8; 4]) -> PolicyValue {
    PolicyValue {
        egress_ip: EGRESS_IP.octets(),
        gateway_ip: GATEWAY.octets(),
        pod_node_ip: pod_node,
        gateway_group: GROUP,
    }
}

/// The pod's node: the pod's entry names the floating group, and the node owns a block.
fn pod_node_floating() -> Node {
    let mut node = pod_node();
    node.hash::<[u8; 4], NodeInfo>(map_names::NODES)
        .insert(GATEWAY_B.octets(), NodeInfo::default(), 0)
        .unwrap();
    set_group(
        &mut node,
        GROUP,
        &[GATEWAY, GATEWAY_B],
        GROUP_POD_NODE_TRANSLATES,
    );
    node.policy(POD, "198.51.100.0/24", floating_value(POD_NODE.octets()));
    node.hash::<[u8; 4], PortBlock>(map_names::OWN_PORT_BLOCKS)
        .insert(
            EGRESS_IP.octets(),
            PortBlock {
                first: BLOCK_FIRST,
                count: 64,
                _pad: 0,
            },
            0,
        )
        .unwrap();
    node
}

/// A candidate gateway: the egress IP's gateway-side entry and the block table.
fn gateway_floating(own: Ipv4Addr) -> Node {
    let mut node = Node::new(own);
    set_group(
        &mut node,
        GROUP,
        &[GATEWAY, GATEWAY_B],
        GROUP_POD_NODE_TRANSLATES,
    );
    node.policy(EGRESS_IP, "198.51.100.0/24", floating_value([0; 4]));
    node.egress_ip(EGRESS_IP, EGRESS_IFINDEX);
    node.hash::<PortBlockKey, PortBlockOwner>(map_names::PORT_BLOCK_OWNERS)
        .insert(
            PortBlockKey {
                egress_ip: EGRESS_IP.octets(),
                block: BLOCK,
                _pad: 0,
            },
            PortBlockOwner {
                node_ip: POD_NODE.octets(),
                _pad: 0,
            },
            0,
        )
        .unwrap();
    node
}

fn syn() -> Vec<u8> {
    packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN })
}

#[test]
fn the_pods_node_translates_with_its_block_and_tunnels_the_result() {
    if !root() {
        return;
    }
    let node = pod_node_floating();
    let (verdict, output) = node.run(program_names::FROM_POD, &syn());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        node.sent_to(),
        Some(SentTo::Tunnel {
            remote: GATEWAY,
            vni: VNI_TO_GATEWAY
        })
    );
    let out = seen(&output);
    assert_eq!(out.src, EGRESS_IP);
    assert!(
        (BLOCK_FIRST..BLOCK_FIRST + 64).contains(&out.sport),
        "port {} outside the node's block",
        out.sport
    );
    assert_checksums(&output);
    assert_eq!(node.nat_forward().len(), 1, "the translation lives here");
}

#[test]
fn a_node_without_a_block_drops_and_counts() {
    if !root() {
        return;
    }
    let mut node = pod_node_floating();
    node.hash::<[u8; 4], PortBlock>(map_names::OWN_PORT_BLOCKS)
        .remove(&EGRESS_IP.octets())
        .unwrap();
    assert_eq!(node.run(program_names::FROM_POD, &syn()).0, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_NO_PORT_BLOCK), 1);
    assert_eq!(node.sent_to(), None);
}

/// The gateway forwards what the block's owner translated, unchanged but for the TTL, and
/// refuses the same packet from another node or to another destination.
#[test]
fn a_gateway_forwards_only_the_block_owners_translated_packets() {
    if !root() {
        return;
    }
    let gateway = gateway_floating(GATEWAY_B);
    let translated = packet(
        EGRESS_IP,
        BLOCK_FIRST + 5,
        DEST,
        443,
        L4::Tcp { flags: SYN },
    );
    let (verdict, output) = from_pod_node(&gateway, &translated);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(gateway.sent_to(), Some(SentTo::Interface(EGRESS_IFINDEX)));
    let out = seen(&output);
    assert_eq!((out.src, out.sport), (EGRESS_IP, BLOCK_FIRST + 5));
    assert_eq!(ttl_of(&output), ttl_of(&translated) - 1);
    assert_checksums(&output);
    assert_eq!(gateway.counter(reason::FORWARD_TRANSLATED), 1);
    assert!(gateway.nat_forward().is_empty(), "no state on the gateway");

    let from_elsewhere = gateway.run_with_cb(
        program_names::TEST_FROM_TUNNEL,
        &translated,
        [u32::from_ne_bytes(GATEWAY.octets()), VNI_TO_GATEWAY],
    );
    assert_eq!(from_elsewhere.0, TC_ACT_SHOT, "another node's block");
    let other_port = packet(
        EGRESS_IP,
        BLOCK_FIRST + 64,
        DEST,
        443,
        L4::Tcp { flags: SYN },
    );
    assert_eq!(from_pod_node(&gateway, &other_port).0, TC_ACT_SHOT);
    let elsewhere = packet(
        EGRESS_IP,
        BLOCK_FIRST,
        OTHER_DEST,
        443,
        L4::Tcp { flags: SYN },
    );
    assert_eq!(
        from_pod_node(&gateway, &elsewhere).0,
        TC_ACT_SHOT,
        "no open relay"
    );
    assert_eq!(gateway.counter(reason::DROP_NOT_ALLOWED), 3);
}

/// A reply reaches whichever candidate holds the egress IP: it goes on, untouched, to the
/// block's node, which turns it back to the pod.
#[test]
fn replies_go_to_the_blocks_node_which_turns_them_back() {
    if !root() {
        return;
    }
    let node = pod_node_floating();
    let (_, request) = node.run(program_names::FROM_POD, &syn());
    let port = seen(&request).sport;
    let reply = packet(DEST, 443, EGRESS_IP, port, L4::Tcp { flags: SYN | ACK });

    let gateway = gateway_floating(GATEWAY_B);
    let (verdict, forwarded) = gateway.run(program_names::FROM_EGRESS, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        gateway.sent_to(),
        Some(SentTo::Tunnel {
            remote: POD_NODE,
            vni: VNI_TO_POD_NODE
        })
    );
    assert_eq!(forwarded, reply, "untouched");
    assert_eq!(gateway.counter(reason::REPLY_TO_BLOCK_OWNER), 1);

    let (verdict, delivered) = node.run_with_cb(
        program_names::TEST_FROM_TUNNEL,
        &forwarded,
        [u32::from_ne_bytes(GATEWAY_B.octets()), VNI_TO_POD_NODE],
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(node.sent_to(), Some(SentTo::Interface(POD_IFINDEX)));
    let back = seen(&delivered);
    assert_eq!((back.src, back.dst, back.dport), (DEST, POD, 40000));
    assert_checksums(&delivered);
    // A port of no block is not a floating reply: the node's own traffic.
    let stray = packet(DEST, 443, EGRESS_IP, 31000, L4::Udp);
    assert_eq!(
        gateway.run(program_names::FROM_EGRESS, &stray).0,
        TC_ACT_NEXT
    );
}

/// Its gateway goes down: the flow moves to the next candidate with the same translation,
/// so the destination sees the same source address and port.
#[test]
fn a_flow_keeps_its_translation_when_its_gateway_changes() {
    if !root() {
        return;
    }
    let mut node = pod_node_floating();
    let (_, before) = node.run(program_names::FROM_POD, &syn());
    set_health(&mut node, GATEWAY, GATEWAY_DOWN);
    let ack = packet(POD, 40000, DEST, 443, L4::Tcp { flags: ACK });
    let (verdict, after) = node.run(program_names::FROM_POD, &ack);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        node.sent_to(),
        Some(SentTo::Tunnel {
            remote: GATEWAY_B,
            vni: VNI_TO_GATEWAY
        })
    );
    let (before, after) = (seen(&before), seen(&after));
    assert_eq!((after.src, after.sport), (before.src, before.sport));
    assert_eq!(node.nat_forward().len(), 1);
}

/// On a candidate that also runs pods (and owns a block), a pod sending with the floating
/// egress IP as its source matches the gateway-side entry, which is no pod's: dropped, never
/// translated nor forwarded.
#[test]
fn a_pod_cannot_send_as_the_floating_egress_ip() {
    if !root() {
        return;
    }
    let mut node = gateway_floating(GATEWAY_B);
    node.hash::<[u8; 4], PortBlock>(map_names::OWN_PORT_BLOCKS)
        .insert(
            EGRESS_IP.octets(),
            PortBlock {
                first: BLOCK_FIRST + 64,
                count: 64,
                _pad: 0,
            },
            0,
        )
        .unwrap();
    let spoofed = packet(EGRESS_IP, 2100, DEST, 443, L4::Tcp { flags: SYN });
    assert_eq!(node.run(program_names::FROM_POD, &spoofed).0, TC_ACT_SHOT);
    assert_eq!(node.sent_to(), None);
    assert_eq!(node.counter(reason::DROP_NOT_ALLOWED), 1);
    assert!(node.nat_forward().is_empty());
}

/// A floating egress IP's flow that its pod's node did not translate (an old agent there):
/// the gateway does not translate it with its own range, whose ports belong to other nodes'
/// blocks.
#[test]
fn a_gateway_refuses_an_untranslated_flow_of_a_floating_egress_ip() {
    if !root() {
        return;
    }
    let mut gateway = gateway_floating(GATEWAY_B);
    gateway.policy(POD, "198.51.100.0/24", floating_value(POD_NODE.octets()));
    assert_eq!(from_pod_node(&gateway, &syn()).0, TC_ACT_SHOT);
    assert_eq!(gateway.counter(reason::DROP_NOT_ALLOWED), 1);
    assert!(gateway.nat_forward().is_empty());
}

/// Replies keep a floating flow alive on the pod's node (a feed where only the remote
/// sends), and a flow held for TIME_WAIT takes no late segment.
#[test]
fn replies_refresh_the_pod_nodes_translation_and_time_wait_holds() {
    if !root() {
        return;
    }
    let mut node = pod_node_floating();
    let (_, request) = node.run(program_names::FROM_POD, &syn());
    let port = seen(&request).sport;
    let reply = packet(DEST, 443, EGRESS_IP, port, L4::Tcp { flags: ACK });
    let from_b = [u32::from_ne_bytes(GATEWAY_B.octets()), VNI_TO_POD_NODE];
    let key = FlowKey {
        src_ip: DEST.octets(),
        dst_ip: EGRESS_IP.octets(),
        src_port: 443_u16.to_be_bytes(),
        dst_port: port.to_be_bytes(),
        protocol: 6,
        _pad: [0; 3],
    };
    // Make the entry look old, then a reply arrives.
    let mut reverse = node.hash::<FlowKey, NatReverse>(map_names::NAT_REVERSE);
    let mut entry = reverse.get(&key, 0).unwrap();
    entry.last_seen_ns = 1;
    reverse.insert(key, entry, 0).unwrap();
    let (verdict, _) = node.run_with_cb(program_names::TEST_FROM_TUNNEL, &reply, from_b);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let refreshed = node
        .hash::<FlowKey, NatReverse>(map_names::NAT_REVERSE)
        .get(&key, 0)
        .unwrap();
    assert!(
        refreshed.last_seen_ns > 1,
        "the reply refreshed the translation"
    );
    let mut held = refreshed;
    held.flags = NAT_TIME_WAIT;
    node.hash::<FlowKey, NatReverse>(map_names::NAT_REVERSE)
        .insert(key, held, 0)
        .unwrap();
    let (verdict, _) = node.run_with_cb(program_names::TEST_FROM_TUNNEL, &reply, from_b);
    assert_eq!(verdict, TC_ACT_SHOT, "a late segment after the end");
}

/// The node's block moved (the control plane reassigned it): an existing flow gets a port of
/// the new block, never keeps one of the old, which the gateway would refuse.
#[test]
fn a_moved_block_gives_existing_flows_a_port_of_the_new_one() {
    if !root() {
        return;
    }
    let mut node = pod_node_floating();
    let (_, before) = node.run(program_names::FROM_POD, &syn());
    assert!((BLOCK_FIRST..BLOCK_FIRST + 64).contains(&seen(&before).sport));
    node.hash::<[u8; 4], PortBlock>(map_names::OWN_PORT_BLOCKS)
        .insert(
            EGRESS_IP.octets(),
            PortBlock {
                first: BLOCK_FIRST + 640,
                count: 64,
                _pad: 0,
            },
            0,
        )
        .unwrap();
    let ack = packet(POD, 40000, DEST, 443, L4::Tcp { flags: ACK });
    let (verdict, after) = node.run(program_names::FROM_POD, &ack);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let port = seen(&after).sport;
    assert!(
        (BLOCK_FIRST + 640..BLOCK_FIRST + 704).contains(&port),
        "port {port} outside the new block"
    );
    assert_eq!(node.nat_forward().len(), 1);
    assert_eq!(node.nat_reverse().len(), 1, "the old port was given back");
}
