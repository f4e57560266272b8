//! `from_tunnel` (its test twin `test_from_tunnel`, which takes the tunnel metadata from the
//! packet's cb): on the gateway, which requests are translated and how; on the pod's node,
//! which replies reach a pod.

use crate::support::*;

#[test]
fn snat_of_a_new_flow_keeps_a_free_port_in_range() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let input = packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN });
    let (verdict, output) = from_pod_node(&node, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let out = seen(&output);
    assert_eq!(out.src, EGRESS_IP);
    assert_eq!(out.sport, 20000, "a free port inside the NAT range is kept");
    assert_eq!((out.dst, out.dport), (DEST, 443));
    assert_checksums(&output);
    assert_eq!(node.sent_to(), Some(SentTo::Interface(EGRESS_IFINDEX)));
    assert_eq!(node.counter(reason::SNAT_NEW_FLOW), 1);
    assert_eq!(node.nat_forward().len(), 1);
    assert_eq!(node.nat_reverse().len(), 1);
}

#[test]
fn snat_of_an_existing_flow_reuses_its_translation() {
    if !root() {
        return;
    }
    let node = gateway_node();
    // Ephemeral pod port outside the NAT range: a port from the range is allocated.
    let syn = packet(POD, 45000, DEST, 443, L4::Tcp { flags: SYN });
    let first = seen(&from_pod_node(&node, &syn).1);
    assert!((NAT_MIN..=NAT_MAX).contains(&first.sport));
    let ack = packet(POD, 45000, DEST, 443, L4::Tcp { flags: ACK });
    let (verdict, output) = from_pod_node(&node, &ack);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&output).sport, first.sport);
    assert_checksums(&output);
    assert_eq!(node.counter(reason::SNAT_EXISTING_FLOW), 1);
    assert_eq!(node.nat_forward().len(), 1);
}

#[test]
fn source_port_collision_picks_another_port() {
    if !root() {
        return;
    }
    let node = gateway_node();
    // Two pods use the same source port towards the same destination.
    let other_pod = Ipv4Addr::new(10, 244, 1, 11);
    let mut node = node;
    node.policy(other_pod, "198.51.100.0/24", to_gateway(EGRESS_IP));
    let a = seen(
        &from_pod_node(
            &node,
            &packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN }),
        )
        .1,
    );
    let (verdict, output) = from_pod_node(
        &node,
        &packet(other_pod, 20000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let b = seen(&output);
    assert_eq!(a.sport, 20000);
    assert_ne!(b.sport, 20000, "the taken port is not reused");
    assert!((NAT_MIN..=NAT_MAX).contains(&b.sport));
    assert_checksums(&output);
    assert_eq!(node.nat_reverse().len(), 2);
}

#[test]
fn udp_and_icmp_echo_are_translated() {
    if !root() {
        return;
    }
    let node = gateway_node();
    for l4 in [L4::Udp, L4::IcmpEcho { reply: false }] {
        let (verdict, output) = from_pod_node(&node, &packet(POD, 50000, DEST, 53, l4));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(seen(&output).src, EGRESS_IP);
        assert_checksums(&output);
    }
}

/// An echo reply never opens a flow on the gateway: refused, not rewritten with an
/// identifier read from the wrong field (which broke its checksum).
#[test]
fn echo_replies_from_a_pod_are_not_translated() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let reply = packet(POD, 0, DEST, 4242, L4::IcmpEcho { reply: true });
    let (verdict, _) = from_pod_node(&node, &reply);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_UNSUPPORTED), 1);
    assert!(node.nat_forward().is_empty());
}

/// The gateway forwards as a router: the TTL goes down by one (and traceroute sees the hop),
/// and a packet whose TTL runs out goes to the kernel, which answers with time exceeded.
#[test]
fn the_gateway_decrements_the_ttl_and_hands_expiring_packets_to_the_kernel() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let request = packet(POD, 50000, DEST, 53, L4::Udp);
    let (verdict, output) = from_pod_node(&node, &with_ttl(request.clone(), 64));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(ttl_of(&output), 63);
    assert_checksums(&output);

    let (verdict, output) = from_pod_node(&node, &with_ttl(request.clone(), 1));
    assert_eq!(verdict, TC_ACT_NEXT);
    assert_eq!(output, with_ttl(request, 1), "handed over untouched");
    assert_eq!(node.counter(reason::PASS_TTL_EXCEEDED), 1);
    assert_eq!(
        node.nat_forward().len(),
        1,
        "only the first packet was translated"
    );
}

/// A pod's IP moves to another node (a new pod gets it) and a flow with the same 5-tuple
/// arrives from there: the translation is kept, and replies go to the new node, not the old.
#[test]
fn a_reused_flow_from_another_node_sends_its_replies_there() {
    if !root() {
        return;
    }
    let mut node = gateway_node();
    let new_node = Ipv4Addr::new(10, 0, 0, 13);
    let request = packet(POD, 50000, DEST, 53, L4::Udp);
    let (_, first) = from_pod_node(&node, &request);
    node.hash::<[u8; 4], NodeInfo>(map_names::NODES)
        .insert(new_node.octets(), NodeInfo::default(), 0)
        .unwrap();
    node.policy(
        POD,
        "198.51.100.0/24",
        PolicyValue {
            pod_node_ip: new_node.octets(),
            ..to_gateway(EGRESS_IP)
        },
    );
    let (verdict, second) = node.run_with_cb(
        program_names::TEST_FROM_TUNNEL,
        &request,
        [u32::from_ne_bytes(new_node.octets()), VNI_TO_GATEWAY],
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        seen(&second).sport,
        seen(&first).sport,
        "the translation is kept"
    );
    let reverse = node.nat_reverse();
    assert_eq!(reverse.len(), 1);
    assert_eq!(
        reverse[0].1.pod_node_ip,
        new_node.octets(),
        "replies go to the node the flow comes from now"
    );
    assert_eq!(node.nat_forward()[0].1.pod_node_ip, new_node.octets());
    let reply = packet(DEST, 53, EGRESS_IP, seen(&second).sport, L4::Udp);
    assert_eq!(
        node.run(program_names::FROM_EGRESS, &reply).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        node.sent_to(),
        Some(SentTo::Tunnel {
            remote: new_node,
            vni: VNI_TO_POD_NODE
        })
    );
}

/// A flow whose reply half was lost (evicted from its LRU map) is translated afresh, both
/// halves together, so its replies come back again (they went to the gateway's own stack).
#[test]
fn a_flow_whose_reverse_entry_was_lost_gets_both_halves_back() {
    if !root() {
        return;
    }
    let mut node = gateway_node();
    let request = packet(POD, 50000, DEST, 53, L4::Udp);
    from_pod_node(&node, &request);
    let (lost, _) = node.nat_reverse()[0];
    node.hash::<FlowKey, NatReverse>(map_names::NAT_REVERSE)
        .remove(&lost)
        .unwrap();
    let (verdict, output) = from_pod_node(&node, &request);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (forward, reverse) = (node.nat_forward(), node.nat_reverse());
    assert_eq!((forward.len(), reverse.len()), (1, 1));
    assert_eq!(reverse[0].1.pod_ip, POD.octets());
    assert_eq!(
        forward[0].1.nat_port, reverse[0].0.dst_port,
        "the halves agree"
    );
    assert_eq!(
        seen(&output).sport,
        u16::from_be_bytes(forward[0].1.nat_port)
    );
    assert_eq!(node.counter(reason::SNAT_NEW_FLOW), 2);
    let reply = packet(DEST, 53, EGRESS_IP, seen(&output).sport, L4::Udp);
    let (verdict, back) = node.run(program_names::FROM_EGRESS, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(seen(&back).dst, POD);
}

#[test]
fn udp_without_checksum_keeps_it_zero() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let mut input = packet(POD, 50000, DEST, 53, L4::Udp);
    input[34 + 6] = 0;
    input[34 + 7] = 0;
    let (_, output) = from_pod_node(&node, &input);
    assert_eq!(&output[40..42], &[0, 0]);
}

#[test]
fn no_egress_ip_drops() {
    if !root() {
        return;
    }
    let mut node = Node::new(GATEWAY);
    // This node is the gateway but could not determine the egress IP.
    node.policy(POD, "198.51.100.0/24", to_gateway(Ipv4Addr::UNSPECIFIED));
    let (verdict, _) = from_pod_node(
        &node,
        &packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_NO_EGRESS_IP), 1);
    assert!(node.nat_forward().is_empty());
}

#[test]
fn gateway_is_not_an_open_relay() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let syn = |src, dst| packet(src, 20000, dst, 443, L4::Tcp { flags: SYN });
    // From an address that is not a node.
    let stranger = u32::from_ne_bytes([10, 0, 0, 99]);
    let (verdict, _) = node.run_with_cb(
        program_names::TEST_FROM_TUNNEL,
        &syn(POD, DEST),
        [stranger, VNI_TO_GATEWAY],
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_UNKNOWN_NODE), 1);
    // To a destination no policy covers.
    assert_eq!(from_pod_node(&node, &syn(POD, OTHER_DEST)).0, TC_ACT_SHOT);
    // A spoofed inner source: a pod that lives on another node.
    let gateway_as_sender = u32::from_ne_bytes(GATEWAY.octets());
    let (verdict, _) = node.run_with_cb(
        program_names::TEST_FROM_TUNNEL,
        &syn(POD, DEST),
        [gateway_as_sender, VNI_TO_GATEWAY],
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_NOT_ALLOWED), 2);
    assert!(node.nat_forward().is_empty());
}

#[test]
fn policy_naming_another_gateway_is_refused() {
    if !root() {
        return;
    }
    let mut node = Node::new(GATEWAY);
    node.policy(
        POD,
        "198.51.100.0/24",
        PolicyValue {
            gateway_ip: [10, 0, 0, 13],
            ..to_gateway(EGRESS_IP)
        },
    );
    node.egress_ip(EGRESS_IP, EGRESS_IFINDEX);
    let (verdict, _) = from_pod_node(
        &node,
        &packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_NOT_ALLOWED), 1);
}

// ---- replies ----

#[test]
fn reply_through_the_tunnel_reaches_only_a_steered_local_pod() {
    if !root() {
        return;
    }
    let node = pod_node();
    let reply = packet(DEST, 443, POD, 40000, L4::Tcp { flags: SYN | ACK });
    // Before the pod opened the connection, the reply is refused.
    assert_eq!(from_gateway_node(&node, &reply).0, TC_ACT_SHOT);
    assert_eq!(node.counter(reason::DROP_UNKNOWN_REPLY), 1);
    node.run(
        program_names::FROM_POD,
        &packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    let (verdict, output) = from_gateway_node(&node, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(output, reply);
    assert_eq!(node.sent_to(), Some(SentTo::Interface(POD_IFINDEX)));
    assert_eq!(node.counter(reason::REPLY_TO_POD), 1);
}

/// Replies keep a flow alive on the pod's node: a flow where the remote does the sending
/// must not expire while replies keep coming (its last_seen used to move only with the pod's
/// own packets).
#[test]
fn replies_refresh_the_pod_nodes_flow() {
    if !root() {
        return;
    }
    let mut node = pod_node();
    node.run(
        program_names::FROM_POD,
        &packet(POD, 40000, DEST, 53, L4::Udp),
    );
    // Age the flow as if the pod had been silent for a minute.
    let (flow, mut entry) = {
        let steered: HashMap<&mut MapData, FlowKey, SteeredFlow> =
            node.hash(map_names::STEERED_FLOWS);
        steered.iter().next().unwrap().unwrap()
    };
    entry.last_seen_ns = 0;
    node.hash::<FlowKey, SteeredFlow>(map_names::STEERED_FLOWS)
        .insert(flow, entry, 0)
        .unwrap();
    let reply = packet(DEST, 53, POD, 40000, L4::Udp);
    let (verdict, _) = from_gateway_node(&node, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let steered: HashMap<&mut MapData, FlowKey, SteeredFlow> = node.hash(map_names::STEERED_FLOWS);
    assert!(
        steered.get(&flow, 0).unwrap().last_seen_ns > 0,
        "the reply refreshed it"
    );
}

#[test]
fn truncated_packets_never_crash_or_translate() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let full = packet(POD, 20000, DEST, 443, L4::Tcp { flags: SYN });
    // BPF_PROG_TEST_RUN refuses IPv4 frames shorter than an IPv4 header; every cut after
    // that, into the header options, ports, flags or payload, is tried.
    for len in 34..full.len() {
        let (verdict, _) = from_pod_node(&node, &full[..len]);
        assert_ne!(
            verdict, TC_ACT_REDIRECT,
            "truncated at {len} bytes was translated"
        );
    }
    assert!(node.nat_forward().is_empty());
}

#[test]
fn mss_of_syn_acks_leaving_the_tunnel_is_clamped() {
    if !root() {
        return;
    }
    let mut node = Node::new(POD_NODE);
    node.policy(POD, "198.51.100.0/24", with_gateway(GATEWAY.octets()));
    node.local_pod(POD, POD_IFINDEX);
    node.run(
        program_names::FROM_POD,
        &packet(POD, 40000, DEST, 443, L4::Tcp { flags: SYN }),
    );
    let syn_ack = packet(
        DEST,
        443,
        POD,
        40000,
        L4::TcpMss {
            flags: SYN | ACK,
            mss: 1460,
        },
    );
    let (verdict, output) = from_gateway_node(&node, &syn_ack);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(mss_of(&output), TUNNEL_MSS);
    assert_checksums(&output);
}

// ---- property: random packets ----

#[test]
fn ports_the_node_itself_listens_on_are_never_allocated() {
    if !root() {
        return;
    }
    // A listener of the node on the egress IP (loopback here: BPF_PROG_TEST_RUN looks sockets
    // up in the test's own network namespace), on a port inside the NAT range.
    let egress = Ipv4Addr::LOCALHOST;
    let listener = (20000..30000)
        .find_map(|port| std::net::TcpListener::bind((egress, port)).ok())
        .expect("a free port in the NAT range");
    let taken = listener.local_addr().unwrap().port();
    let mut node = Node::new(GATEWAY);
    node.policy(POD, "198.51.100.0/24", to_gateway(egress));
    node.egress_ip(egress, EGRESS_IFINDEX);
    // The pod's own port would be kept if free; the node's listener holds it.
    let (verdict, output) = from_pod_node(
        &node,
        &packet(POD, taken, DEST, 443, L4::Tcp { flags: SYN }),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let translated = seen(&output);
    assert_eq!(translated.src, egress);
    assert_ne!(
        translated.sport, taken,
        "the node's listening port was handed to a flow"
    );
    assert!(node.counter(reason::NAT_PORT_RETRY) >= 1);
    // Without the listener, the same flow keeps the pod's port.
    drop(listener);
    let (_, output) = from_pod_node(
        &node,
        &packet(POD, taken, DEST, 444, L4::Tcp { flags: SYN }),
    );
    assert_eq!(seen(&output).sport, taken);
}

/// Thousands of random and randomly corrupted packets through the gateway's tunnel
/// program: whatever it translates left a pod allowed by a policy and now carries the
/// egress IP; checksums stay valid when they were, and a corrupted packet is never
/// laundered into a valid one (the receiver still drops it); nothing else is relayed.
#[test]
fn random_packets_never_break_the_gateway_invariants() {
    if !root() {
        return;
    }
    let node = gateway_node();
    let mut random = Random(0x5eed_cafe_f00d_0001);
    let addresses = [
        POD,
        DEST,
        OTHER_DEST,
        EGRESS_IP,
        GATEWAY,
        Ipv4Addr::new(10, 244, 1, 99),
    ];
    let senders = [POD_NODE, GATEWAY, Ipv4Addr::new(10, 0, 0, 99)];
    for round in 0..3000 {
        let src = addresses[random.below(addresses.len() as u64) as usize];
        let dst = addresses[random.below(addresses.len() as u64) as usize];
        let l4 = match random.below(4) {
            0 => L4::Tcp {
                flags: random.below(64) as u8,
            },
            1 => L4::Udp,
            2 => L4::IcmpEcho {
                reply: random.below(2) == 0,
            },
            _ => L4::TcpMss {
                flags: SYN,
                mss: random.below(9000) as u16,
            },
        };
        let mut frame = packet(
            src,
            random.below(65536) as u16,
            dst,
            random.below(65536) as u16,
            l4,
        );
        // Corrupt a few bytes anywhere past the Ethernet header, now and then.
        if random.below(2) == 0 {
            for _ in 0..=random.below(4) {
                let at = 14 + random.below((frame.len() - 14) as u64) as usize;
                frame[at] = random.next() as u8;
            }
        }
        if random.below(4) == 0 {
            frame.truncate(34 + random.below((frame.len() - 33) as u64) as usize);
        }
        let sender = senders[random.below(senders.len() as u64) as usize];
        let vni = if random.below(8) == 0 {
            7
        } else {
            VNI_TO_GATEWAY
        };
        let program: &SchedClassifier = node
            .ebpf
            .program(program_names::TEST_FROM_TUNNEL)
            .unwrap()
            .try_into()
            .unwrap();
        let mut ctx = [0u8; 68];
        ctx[48..52].copy_from_slice(&u32::from_ne_bytes(sender.octets()).to_ne_bytes());
        ctx[52..56].copy_from_slice(&vni.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let Ok(result) = program.test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        }) else {
            continue; // the kernel refused the frame itself (e.g. a cut IPv4 header)
        };
        if result.return_value != TC_ACT_REDIRECT {
            continue;
        }
        out.truncate(result.data_size_out as usize);
        let input = seen(&frame);
        let output = seen(&out);
        assert_eq!(
            sender, POD_NODE,
            "round {round}: relayed for a non-pod node"
        );
        assert_eq!(vni, VNI_TO_GATEWAY, "round {round}: relayed on another VNI");
        assert_eq!(
            input.src, POD,
            "round {round}: relayed a source no policy selects"
        );
        assert_eq!(
            input.dst, DEST,
            "round {round}: relayed to a destination no policy covers"
        );
        assert_eq!(
            output.src, EGRESS_IP,
            "round {round}: left with the wrong source"
        );
        let (ip_in, l4_in) = checksum_sums(&frame);
        let (ip_out, l4_out) = checksum_sums(&out);
        assert_eq!(
            ip_in == 0,
            ip_out == 0,
            "round {round}: IPv4 checksum validity changed"
        );
        assert_eq!(
            l4_in == 0,
            l4_out == 0,
            "round {round}: layer-4 checksum validity changed"
        );
    }
}
