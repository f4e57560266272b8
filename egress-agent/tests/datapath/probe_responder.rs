//! The XDP probe responder on a gateway's underlay interface: a probe arrives as a whole
//! VXLAN frame and leaves the way it came (`XDP_REDIRECT` to its own interface), turned into the reply the TC program would
//! send; everything that is not a well-formed probe for this node passes untouched.

use egress_agent::health::probe_frame;
use egress_common::gateway::{
    GATEWAY_DOWN, PROBE_REPLY, PROBE_VIA_ANY, PROBE_VIA_TC, PROBE_VIA_XDP,
};

/// The gateway, its TC program having just answered a probe (so XDP may answer).
fn gateway_with_tc_answering() -> Node {
    let gateway = gateway_node();
    let through_tunnel = probe_frame(POD_NODE, GATEWAY, 1, 0, PROBE_VIA_ANY)[8..].to_vec();
    assert_eq!(from_pod_node(&gateway, &through_tunnel).0, TC_ACT_REDIRECT);
    gateway
}

use crate::support::*;

/// Offsets in the whole frame: outer IPv4 and UDP, VXLAN, inner IPv4, the probe.
const OUTER_IP: usize = 14;
const OUTER_UDP: usize = 34;
const VXLAN: usize = 42;
const INNER_IP: usize = 64;
const PROBE: usize = 92;

/// A probe from the pod's node to the gateway as it arrives on the gateway's underlay.
fn request(path: u8) -> Vec<u8> {
    on_underlay(
        POD_NODE,
        GATEWAY,
        TUNNEL_PORT,
        &probe_frame(POD_NODE, GATEWAY, 5, 1234, path),
    )
}

fn ipv4(frame: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::from(<[u8; 4]>::try_from(&frame[at..at + 4]).unwrap())
}

#[test]
fn a_probe_is_turned_around_on_the_underlay_with_the_gateways_own_health() {
    if !root() {
        return;
    }
    let mut gateway = gateway_with_tc_answering();
    let request = request(PROBE_VIA_ANY);
    let (verdict, reply) = gateway.run_xdp(&request);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(reply.len(), request.len());
    // Back to where it came from, on every layer.
    assert_eq!(reply[0..6], UNDERLAY_MAC_A);
    assert_eq!(reply[6..12], UNDERLAY_MAC_B);
    assert_eq!(ipv4(&reply, OUTER_IP + 12), GATEWAY);
    assert_eq!(ipv4(&reply, OUTER_IP + 16), POD_NODE);
    assert_eq!(reply[OUTER_IP + 8], 64, "a fresh TTL");
    assert_eq!(
        checksum(&reply[OUTER_IP..OUTER_UDP], 0),
        0,
        "outer IPv4 checksum"
    );
    assert_eq!(
        reply[OUTER_UDP..OUTER_UDP + 4],
        [VXLAN_SOURCE_PORT.to_be_bytes(), TUNNEL_PORT.to_be_bytes()].concat(),
        "from the entropy port to the prober's tunnel port"
    );
    assert_eq!(
        reply[OUTER_UDP + 6..OUTER_UDP + 8],
        [0, 0],
        "no UDP checksum"
    );
    assert_eq!(
        u32::from_be_bytes(reply[VXLAN + 4..VXLAN + 8].try_into().unwrap()) >> 8,
        VNI_TO_POD_NODE
    );
    assert_eq!(ipv4(&reply, INNER_IP + 12), GATEWAY);
    assert_eq!(ipv4(&reply, INNER_IP + 16), POD_NODE);
    assert_eq!(
        checksum(&reply[INNER_IP..INNER_IP + 20], 0),
        0,
        "inner IPv4 checksum"
    );
    let probe = &reply[PROBE..];
    assert_eq!(probe[4..6], [PROBE_REPLY, PROBE_VIA_XDP]);
    assert_eq!(u32::from_ne_bytes(probe[8..12].try_into().unwrap()), 0);
    assert_eq!(u64::from_ne_bytes(probe[16..24].try_into().unwrap()), 5);
    assert_eq!(u64::from_ne_bytes(probe[24..32].try_into().unwrap()), 1234);
    assert_eq!(gateway.counter(reason::PROBE_ANSWERED_XDP), 1);
    // A gateway that cannot serve says so.
    set_health(&mut gateway, GATEWAY, GATEWAY_DOWN);
    let (_, reply) = gateway.run_xdp(&request);
    assert_eq!(
        u32::from_ne_bytes(reply[PROBE + 8..PROBE + 12].try_into().unwrap()),
        GATEWAY_DOWN
    );
}

/// The reply the XDP responder sends is one the probing node's TC program notes, as it
/// notes the TC program's.
#[test]
fn the_probing_node_notes_the_xdp_reply() {
    if !root() {
        return;
    }
    let gateway = gateway_with_tc_answering();
    let (_, reply) = gateway.run_xdp(&request(PROBE_VIA_ANY));
    let mut node = pod_node();
    // What the probing node's tunnel device hands its program: the frame after VXLAN.
    let (verdict, _) = from_gateway_node(&node, &reply[VXLAN + 8..]);
    assert_eq!(verdict, TC_ACT_SHOT, "consumed");
    assert_eq!(node.counter(reason::PROBE_REPLY_RECEIVED), 1);
    let noted = node
        .hash::<[u8; 4], egress_common::gateway::ProbeReply>(map_names::PROBE_REPLIES)
        .get(&GATEWAY.octets(), 0)
        .unwrap();
    assert_eq!(
        (noted.seq, noted.sent_ns, noted.path),
        (5, 1234, PROBE_VIA_XDP)
    );
}

/// Whatever is not a probe request for any responder, from a known node to this node, on
/// the tunnel port, passes untouched: the TC program judges it (and counts drops).
#[test]
fn everything_but_a_well_formed_probe_passes_untouched() {
    if !root() {
        return;
    }
    let gateway = gateway_with_tc_answering();
    let spoil = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = request(PROBE_VIA_ANY);
        edit(&mut frame);
        frame
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("asks for the TC program", request(PROBE_VIA_TC)),
        (
            "another UDP port",
            on_underlay(
                POD_NODE,
                GATEWAY,
                TUNNEL_PORT + 1,
                &probe_frame(POD_NODE, GATEWAY, 5, 1234, PROBE_VIA_ANY),
            ),
        ),
        (
            "to another address",
            on_underlay(
                POD_NODE,
                EGRESS_IP,
                TUNNEL_PORT,
                &probe_frame(POD_NODE, EGRESS_IP, 5, 1234, PROBE_VIA_ANY),
            ),
        ),
        (
            "from an unknown node",
            on_underlay(
                DEST,
                GATEWAY,
                TUNNEL_PORT,
                &probe_frame(DEST, GATEWAY, 5, 1234, PROBE_VIA_ANY),
            ),
        ),
        (
            "inner source is not the sender",
            on_underlay(
                POD_NODE,
                GATEWAY,
                TUNNEL_PORT,
                &probe_frame(DEST, GATEWAY, 5, 1234, PROBE_VIA_ANY),
            ),
        ),
        ("the VNI of replies", spoil(&|f| f[VXLAN + 6] ^= 0x03)),
        ("spoilt magic", spoil(&|f| f[PROBE] ^= 0xff)),
        (
            "a reply, not a request",
            spoil(&|f| f[PROBE + 4] = PROBE_REPLY),
        ),
        ("outer IPv4 fragment", spoil(&|f| f[OUTER_IP + 6] = 0x20)),
        ("inner not UDP", spoil(&|f| f[INNER_IP + 9] = 6)),
        ("outer IPv4 options", spoil(&|f| f[OUTER_IP] = 0x46)),
        (
            "an ARP frame",
            spoil(&|f| f[12..14].copy_from_slice(&[0x08, 0x06])),
        ),
        ("truncated", request(PROBE_VIA_ANY)[..120].to_vec()),
        (
            "plain traffic",
            packet(POD_NODE, 40000, GATEWAY, 443, L4::Tcp { flags: SYN }),
        ),
    ];
    for (what, frame) in cases {
        let (verdict, out) = gateway.run_xdp(&frame);
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(out, frame, "{what}: untouched");
    }
    assert_eq!(gateway.counter(reason::PROBE_ANSWERED_XDP), 0);
}

/// XDP answers only while the TC program has answered lately: before its first answer, and
/// once its last one is over a second old, probes pass to it (a broken tunnel path behind
/// XDP then fails the probes).
#[test]
fn without_a_recent_tc_answer_probes_pass_to_the_tc_program() {
    if !root() {
        return;
    }
    let mut gateway = gateway_node();
    let request = request(PROBE_VIA_ANY);
    let (verdict, out) = gateway.run_xdp(&request);
    assert_eq!((verdict, &out), (XDP_PASS, &request), "no TC answer yet");
    let through_tunnel = probe_frame(POD_NODE, GATEWAY, 1, 0, PROBE_VIA_ANY)[8..].to_vec();
    assert_eq!(from_pod_node(&gateway, &through_tunnel).0, TC_ACT_REDIRECT);
    assert_eq!(
        gateway.run_xdp(&request).0,
        XDP_REDIRECT,
        "the TC program just answered"
    );
    // The TC program's last answer, long ago.
    let mut answered_at: Array<&mut MapData, u64> =
        Array::try_from(gateway.ebpf.map_mut(map_names::TC_ANSWERED_AT).unwrap()).unwrap();
    answered_at.set(0, 1, 0).unwrap();
    let (verdict, out) = gateway.run_xdp(&request);
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &request),
        "the TC answer is stale"
    );
    assert_eq!(gateway.counter(reason::PROBE_ANSWERED_XDP), 1);
}
