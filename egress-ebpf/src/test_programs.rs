//! Programs for BPF_PROG_TEST_RUN only, built into a separate object with the
//! `test-programs` feature: the agent's datapath tests and `cargo xtask bench` load them, the
//! agent never does.

use aya_ebpf::{
    btf_maps::Array,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use egress_common::Ipv4;

use crate::{DROP, PASS, from_tunnel_peer, packet::parse};

/// Where the last redirect sent its packet (`map_names::TEST_LAST_REDIRECT`): tests check
/// the interface, tunnel remote and VNI, which BPF_PROG_TEST_RUN does not report.
#[btf_map]
static TEST_LAST_REDIRECT: Array<[u32; 4], 1> = Array::new();

/// Notes a redirect out of `ifindex`, through the tunnel to `remote` with `vni` when
/// `ifindex` is the tunnel device.
#[inline(always)]
pub(crate) fn note_redirect(ifindex: u32, remote: Ipv4, vni: u32) {
    if let Some(slot) = TEST_LAST_REDIRECT.get_ptr_mut(0) {
        // SAFETY: the one slot of a test map; tests run one packet at a time.
        unsafe { *slot = [ifindex, u32::from_ne_bytes(remote), vni, 0] };
    }
}

/// Test-only twin of `from_tunnel`: BPF_PROG_TEST_RUN cannot attach tunnel metadata, so the
/// outer source (network byte order) comes from `cb[0]` and the VNI from `cb[1]`. The agent
/// never attaches this program.
#[classifier]
pub(crate) fn test_from_tunnel(mut ctx: TcContext) -> i32 {
    let cb = ctx.skb.cb();
    let (remote, vni) = (cb[0].to_ne_bytes(), cb[1]);
    from_tunnel_peer(&mut ctx, remote, vni)
}

/// Bench-only floor: does nothing. `cargo xtask bench` measures it through
/// BPF_PROG_TEST_RUN as the cost of running any TC program; the agent never attaches it.
#[classifier]
pub(crate) fn bench_empty(_ctx: TcContext) -> i32 {
    PASS
}

/// Bench-only floor: parses Ethernet/IPv4/L4 like every datapath program, then passes.
/// The verdict depends on every parsed field so the compiler cannot drop the parsing; the
/// agent never attaches it.
#[classifier]
pub(crate) fn bench_parse_only(ctx: TcContext) -> i32 {
    let Some(packet) = parse(&ctx) else {
        return PASS;
    };
    let flow = &packet.flow;
    let folded = u32::from_ne_bytes(flow.src_ip)
        ^ u32::from_ne_bytes(flow.dst_ip)
        ^ u32::from(u16::from_ne_bytes(flow.src_port))
        ^ (u32::from(u16::from_ne_bytes(flow.dst_port)) << 16)
        ^ u32::from(flow.protocol)
        ^ u32::from(packet.tcp_flags)
        ^ u32::from(packet.icmp_type)
        ^ packet.l4_off as u32
        ^ u32::from(packet.translatable);
    // Never true for real traffic; only there to keep the parse alive.
    if folded == 0x5a5a_5a5a { DROP } else { PASS }
}
