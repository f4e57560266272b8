//! `egress-bench measure probe-flood`: sends one health probe frame (VXLAN-encapsulated, as
//! the agent's prober sends them) to a gateway at a fixed rate from a plain UDP socket, and
//! reports the CPU time of this process and how busy the whole machine's CPUs were meanwhile
//! (`/proc/stat`). Run inside a node's namespace; the failover section compares floods to
//! the tunnel port (answered by the gateway's XDP responder, or with `--tc-only` by its TC
//! program) with one to a closed port.
//!
//! Between namespaces of one kernel a datagram's whole way (the veths, the router, the
//! gateway's VXLAN decapsulation, its program, the answer's encapsulation and its way back)
//! runs in softirq context right after the send, on the sender's CPU, and without
//! `CONFIG_IRQ_TIME_ACCOUNTING` that time is the sender's: this process's CPU time holds it,
//! free of whatever else the machine runs. Softirqs deferred to ksoftirqd (a saturated CPU)
//! escape it, so the caller also checks the machine was not saturated.

use std::{
    net::{Ipv4Addr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Args;
use egress_agent::health::probe_frame;
use egress_common::gateway::{PROBE_VIA_ANY, PROBE_VIA_TC};
use serde::Serialize;

#[derive(Debug, Args)]
pub(super) struct FloodArgs {
    /// This node's address (the probe's inner and outer source).
    #[arg(long)]
    from: Ipv4Addr,
    /// The gateway's node address.
    #[arg(long)]
    to: Ipv4Addr,
    /// UDP port on the gateway (its tunnel port answers probes).
    #[arg(long, default_value_t = egress_common::config::DEFAULT_TUNNEL_PORT)]
    port: u16,
    /// Probes per second (0: none, only the busy CPU of the machine meanwhile).
    #[arg(long, default_value_t = 50_000)]
    rate: u32,
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Spoil the probe's magic: the gateway's program parses it, then drops it.
    #[arg(long)]
    bad_magic: bool,
    /// Ask for the gateway's TC program (`PROBE_VIA_TC`): its XDP responder passes the probe.
    #[arg(long)]
    tc_only: bool,
}

#[derive(Debug, Serialize)]
pub(super) struct FloodReport {
    sent: u64,
    send_errors: u64,
    seconds: f64,
    /// CPU time of this process while sending (`CLOCK_PROCESS_CPUTIME_ID`).
    self_cpu_ns: f64,
    /// Busy CPU time of the whole machine (user, nice, system, irq, softirq) meanwhile.
    busy_ns: f64,
    /// The sender's own share is not subtracted: comparing two floods cancels it.
    cpus: usize,
}

pub(super) fn run(args: &FloodArgs) -> Result<FloodReport> {
    let socket = UdpSocket::bind((args.from, 0)).context("binding the probe socket")?;
    socket.connect((args.to, args.port))?;
    let path = if args.tc_only {
        PROBE_VIA_TC
    } else {
        PROBE_VIA_ANY
    };
    let mut frame = probe_frame(args.from, args.to, 1, 0, path);
    if args.bad_magic {
        // VXLAN 8, Ethernet 14, IPv4 20, UDP 8: then the probe, its magic first.
        frame[8 + 14 + 20 + 8] ^= 0xff;
    }
    let rate = f64::from(args.rate);
    let (mut sent, mut send_errors) = (0u64, 0u64);
    let busy_before = busy_ns()?;
    let cpu_before = process_cpu_ns();
    let started = Instant::now();
    loop {
        let elapsed = started.elapsed().as_secs_f64();
        if elapsed >= args.seconds {
            break;
        }
        // Catch up with the schedule, then sleep a little: a steady rate, in small bursts.
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a positive count of datagrams due"
        )]
        let due = (elapsed * rate) as u64;
        while sent + send_errors < due {
            match socket.send(&frame) {
                Ok(_) => sent += 1,
                Err(_) => send_errors += 1,
            }
        }
        thread::sleep(Duration::from_micros(200));
    }
    let seconds = started.elapsed().as_secs_f64();
    let self_cpu_ns = process_cpu_ns() - cpu_before;
    let busy_ns = busy_ns()? - busy_before;
    Ok(FloodReport {
        sent,
        send_errors,
        seconds,
        self_cpu_ns,
        busy_ns,
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
    })
}

/// CPU time of this process so far, in ns.
fn process_cpu_ns() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &raw mut now) };
    now.tv_sec as f64 * 1e9 + now.tv_nsec as f64
}

/// Busy CPU time of all CPUs since boot, in ns (the first line of `/proc/stat`).
fn busy_ns() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| fields.get(i).copied().unwrap_or(0.0))
        .sum();
    // SAFETY: no arguments.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(busy * 1e9 / ticks)
}
