//! Gateway health, BFD-style: this node probes the candidate gateways of its pods' groups
//! through the tunnel, every `interval`, and a gateway whose last `multiplier` probes all went
//! unanswered, or that answers that it cannot serve, is down. The verdict is one
//! `GATEWAY_HEALTH` write per gateway that changed, which the datapath reads on every new
//! flow and on every packet of a flow whose gateway went down: a failover costs no policy
//! rewrite.
//!
//! The probes are answered by the gateway's datapath, never its agent: a busy or restarting
//! agent is no dead gateway. The prober is a thread of its own, so a busy reconcile never
//! delays it; when this agent stops, the health entries stay as they are (no failover, no
//! recovery) until the next agent judges again. On a gateway, its own entry says whether it
//! can serve (egress interface up, with its address), and its probe replies carry it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use egress_common::{
    config::VNI_TO_GATEWAY,
    gateway::{
        GATEWAY_DOWN, GATEWAY_DRAINING, GatewayHealth, PROBE_MAGIC, PROBE_PORT, PROBE_REQUEST,
        PROBE_VIA_ANY, PROBE_VIA_TC, ProbeReply,
    },
    map_names,
};
use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    chain::Chain,
    datapath::{PinLayout, monotonic_now_ns, pinned},
    floating::{FloatingTarget, Holder, should_hold},
    privileges,
    say_once::SayOnce,
};

/// How often, and after how many unanswered probes a gateway is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub multiplier: u32,
}

/// A gateway to probe, as the reconcile found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub node: String,
    pub draining: bool,
}

/// What the reconcile tells the prober: whom to probe, and this node's own state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    /// This node's underlay address (probes go from it); `None` while unknown.
    pub node_ip: Option<Ipv4Addr>,
    pub gateways: BTreeMap<Ipv4Addr, Target>,
    /// Whether this node can serve as a gateway (its egress interfaces are up, with their
    /// addresses); told to whoever probes it.
    pub self_serving: bool,
    pub self_draining: bool,
    /// Floating egress IPs this node is a candidate of: it holds one when every candidate
    /// before it is down.
    pub floating: BTreeMap<Ipv4Addr, FloatingTarget>,
}

/// What this node's prober finds, for the status writer: the gateway candidates it judged
/// down, by node name, and whether this node itself can serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthView {
    pub down: BTreeSet<String>,
    /// Candidates being drained: up, but taking no new flows.
    pub draining: BTreeSet<String>,
    pub self_serving: bool,
    pub self_draining: bool,
}

impl Default for HealthView {
    /// Nothing judged yet.
    fn default() -> Self {
        HealthView {
            down: BTreeSet::new(),
            draining: BTreeSet::new(),
            self_serving: true,
            self_draining: false,
        }
    }
}

/// Why a gateway went down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Its last probes went unanswered: the node, its links or its datapath are gone.
    Unanswered,
    /// It never answered since this agent started probing it (its datapath is not up yet,
    /// or it was down before): new flows avoid it from then on, but it is not counted as a
    /// failover.
    NeverAnswered,
    /// It answered that it cannot serve: egress interface down or without its address.
    NotServing,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Unanswered => "unanswered",
            Cause::NeverAnswered => "never_answered",
            Cause::NotServing => "not_serving",
        }
    }
}

/// One gateway's probing state.
#[derive(Clone, Debug, Default)]
struct Peer {
    /// Sequence number of the last probe sent (the first is 1).
    sent: u64,
    /// Highest sequence number answered.
    answered: u64,
    /// Whether any probe was answered since this agent started probing the peer.
    heard: bool,
    /// What the last reply said about the gateway itself.
    not_serving: bool,
    down: Option<Cause>,
    /// The last probe that asked for any responder.
    last_any: Option<u64>,
    /// The probe asked of the TC program because the one before it, for any responder,
    /// went unanswered: if it is answered, the XDP responder's answers may be the ones lost.
    tc_after_loss: Option<u64>,
    /// Times in a row a probe for any responder was lost and the TC probe after it answered.
    xdp_losses: u32,
    /// TC-only windows since an answer to a probe for any responder: each is twice as long.
    backoff: u32,
    /// Probes still to ask of the TC program alone.
    tc_only_left: u32,
}

/// The verdicts, from probes sent and replies seen: pure, so it is unit-tested.
#[derive(Debug)]
pub struct Judge {
    multiplier: u64,
    /// Times a probe asked of the TC program was answered right after a lost one: the XDP
    /// responder's way back loses answers (or an answer was lost by chance).
    fallbacks: u64,
    /// Where a new peer's sequence numbers start: a reply left in `PROBE_REPLIES` by an
    /// earlier agent (or an earlier life of the peer) must never pass for a new one.
    seq_base: u64,
    peers: BTreeMap<Ipv4Addr, Peer>,
}

/// A change of a gateway's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Down(Cause),
    Up,
}

impl Judge {
    /// `seq_base` should grow from one agent to the next (the prober passes the monotonic
    /// clock in microseconds).
    pub fn new(multiplier: u32, seq_base: u64) -> Judge {
        Judge {
            multiplier: u64::from(multiplier.max(1)),
            fallbacks: 0,
            seq_base,
            peers: BTreeMap::new(),
        }
    }

    /// Keeps exactly the gateways of `targets`; a new one starts as `down_before` says (what
    /// the health map held, so a restarted agent does not undo a failover).
    pub fn retain(&mut self, targets: impl IntoIterator<Item = (Ipv4Addr, bool)>) {
        let mut kept = BTreeMap::new();
        for (ip, down_before) in targets {
            let base = self.seq_base;
            let peer = self.peers.remove(&ip).unwrap_or_else(|| Peer {
                sent: base,
                answered: base,
                heard: false,
                not_serving: false,
                down: down_before.then_some(Cause::Unanswered),
                last_any: None,
                tc_after_loss: None,
                xdp_losses: 0,
                backoff: 0,
                tc_only_left: 0,
            });
            kept.insert(ip, peer);
        }
        self.peers = kept;
    }

    /// The sequence number of the next probe to `ip`, and who may answer it
    /// (`Probe::path`). After a lost probe the next one asks for the TC program, so an XDP
    /// responder whose answers get lost on their way back (a driver that cannot send what XDP
    /// sends) never makes a live gateway look dead. When that happens twice in a row (a
    /// single loss is just a loss), the next `TC_ONLY_PROBES` probes ask for the TC program
    /// alone, twice as many each time XDP fails again, until a probe for any responder is
    /// answered.
    pub fn next_probe(&mut self, ip: Ipv4Addr) -> (u64, u8) {
        let peer = self.peers.entry(ip).or_default();
        let previous_lost = peer.answered < peer.sent;
        let previous_was_any = peer.last_any == Some(peer.sent);
        peer.sent += 1;
        let path = if peer.tc_only_left > 0 {
            peer.tc_only_left -= 1;
            PROBE_VIA_TC
        } else if previous_lost {
            peer.tc_after_loss = previous_was_any.then_some(peer.sent);
            PROBE_VIA_TC
        } else {
            peer.last_any = Some(peer.sent);
            PROBE_VIA_ANY
        };
        (peer.sent, path)
    }

    /// How often the prober turned to the TC program alone for a while.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    /// A reply from `ip` to probe `seq`; `serving` is what the gateway said of itself.
    /// Whether it is news (a newer probe answered).
    pub fn replied(&mut self, ip: Ipv4Addr, seq: u64, serving: bool) -> bool {
        let Some(peer) = self.peers.get_mut(&ip) else {
            return false;
        };
        if seq <= peer.answered || seq > peer.sent {
            return false;
        }
        peer.answered = seq;
        peer.heard = true;
        peer.not_serving = !serving;
        if peer.tc_after_loss.take() == Some(seq) {
            peer.xdp_losses += 1;
            if peer.xdp_losses >= XDP_LOSSES_BEFORE_TC_ONLY {
                peer.tc_only_left = TC_ONLY_PROBES << peer.backoff.min(MAX_BACKOFF);
                peer.backoff += 1;
                peer.xdp_losses = 0;
                self.fallbacks += 1;
            }
        } else if peer.last_any == Some(seq) {
            peer.xdp_losses = 0;
            peer.backoff = 0;
        }
        true
    }

    /// Judges every gateway, just before the next round of probes: each probe sent so far
    /// had an interval to be answered. Returns the changes.
    pub fn judge(&mut self) -> Vec<(Ipv4Addr, Change)> {
        let mut changes = Vec::new();
        for (ip, peer) in &mut self.peers {
            let unanswered = peer.sent - peer.answered.min(peer.sent);
            let verdict = if unanswered >= self.multiplier {
                Some(if peer.heard {
                    Cause::Unanswered
                } else {
                    Cause::NeverAnswered
                })
            } else if !peer.heard {
                // Nothing heard yet, and too few probes to say: keep what was.
                peer.down
            } else if peer.not_serving {
                Some(Cause::NotServing)
            } else {
                None
            };
            // Down for another reason is no news.
            if verdict.is_some() != peer.down.is_some() {
                changes.push((*ip, verdict.map_or(Change::Up, Change::Down)));
                peer.down = verdict;
            }
        }
        changes
    }

    pub fn is_down(&self, ip: Ipv4Addr) -> bool {
        self.peers.get(&ip).is_some_and(|peer| peer.down.is_some())
    }

    /// Whether `ip` answered since this agent started probing it.
    pub fn has_answered(&self, ip: Ipv4Addr) -> bool {
        self.peers.get(&ip).is_some_and(|peer| peer.heard)
    }
}

/// Probes asked of the TC program alone the first time it answered where the probe before,
/// for any responder, twice in a row got no answer (30 s at the default interval); each
/// further time twice as many, up to `MAX_BACKOFF` doublings (8 minutes at 50 ms).
const TC_ONLY_PROBES: u32 = 600;
const XDP_LOSSES_BEFORE_TC_ONLY: u32 = 2;
const MAX_BACKOFF: u32 = 4;

/// The datapath's flags for a gateway.
pub fn health_flags(down: bool, draining: bool) -> u32 {
    (if down { GATEWAY_DOWN } else { 0 }) | (if draining { GATEWAY_DRAINING } else { 0 })
}

/// VXLAN header + Ethernet + IPv4 + UDP + probe: what the prober sends to the gateway's
/// VXLAN port, so the probe arrives as the pods' traffic does, decapsulated by the
/// gateway's tunnel device and seen by its `from_tunnel` program.
pub fn probe_frame(from: Ipv4Addr, to: Ipv4Addr, seq: u64, sent_ns: u64, path: u8) -> Vec<u8> {
    const PAYLOAD: usize = 32;
    let mut frame = Vec::with_capacity(8 + 14 + 20 + 8 + PAYLOAD);
    // VXLAN: flags (VNI valid), reserved, VNI (24 bits), reserved.
    frame.extend_from_slice(&[0x08, 0, 0, 0]);
    frame.extend_from_slice(&(VNI_TO_GATEWAY << 8).to_be_bytes());
    // Ethernet: the tunnel device does not look at the addresses.
    frame.extend_from_slice(&[0; 12]);
    frame.extend_from_slice(&0x0800_u16.to_be_bytes());
    let ip_start = frame.len();
    let total = u16::try_from(20 + 8 + PAYLOAD).unwrap_or(u16::MAX);
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    frame.extend_from_slice(&from.octets());
    frame.extend_from_slice(&to.octets());
    let checksum = ipv4_checksum(&frame[ip_start..]);
    frame[ip_start + 10..ip_start + 12].copy_from_slice(&checksum.to_be_bytes());
    // UDP, no checksum (IPv4 allows it): the gateway rewrites the payload.
    frame.extend_from_slice(&PROBE_PORT.to_be_bytes());
    frame.extend_from_slice(&PROBE_PORT.to_be_bytes());
    frame.extend_from_slice(&u16::try_from(8 + PAYLOAD).unwrap_or(0).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    // The probe, in this host's byte order (only this host reads seq and sent_ns back).
    frame.extend_from_slice(&PROBE_MAGIC);
    frame.extend_from_slice(&[PROBE_REQUEST, path, 0, 0]);
    frame.extend_from_slice(&[0; 8]);
    frame.extend_from_slice(&seq.to_ne_bytes());
    frame.extend_from_slice(&sent_ns.to_ne_bytes());
    frame
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).unwrap_or(0))
}

/// Gateway health metrics, shared with `/metrics` (clones share the values).
#[derive(Clone)]
pub struct HealthMetrics {
    /// 1 when the gateway is up, 0 when down, by gateway node.
    pub healthy: Family<Vec<(&'static str, String)>, Gauge>,
    /// Gateways that went down, by cause.
    pub failovers: Family<Vec<(&'static str, String)>, Counter>,
    /// Probe round trips, in seconds.
    pub rtt: Histogram,
    /// `Judge::fallbacks`.
    pub fallbacks: Counter,
}

impl Default for HealthMetrics {
    fn default() -> Self {
        HealthMetrics {
            healthy: Family::default(),
            failovers: Family::default(),
            // 50 µs .. 3.3 s
            rtt: Histogram::new(exponential_buckets(0.00005, 2.0, 17)),
            fallbacks: Counter::default(),
        }
    }
}

/// Starts the prober thread; the reconcile updates `targets`, the prober `view`.
pub fn spawn_prober(
    pins: PinLayout,
    tunnel_port: u16,
    settings: ProbeSettings,
    targets: Arc<Mutex<Targets>>,
    metrics: HealthMetrics,
    view: watch::Sender<HealthView>,
) {
    let spawned = thread::Builder::new()
        .name("gateway-prober".into())
        .spawn(move || {
            Prober::new(pins, tunnel_port, settings, metrics, view).run(&targets);
        });
    if let Err(error) = spawned {
        warn!(error = %error, "cannot start the gateway prober: gateways are not health-checked");
    }
}

type HealthMap = HashMap<MapData, [u8; 4], GatewayHealth>;
type ReplyMap = HashMap<MapData, [u8; 4], ProbeReply>;

struct Prober {
    pins: PinLayout,
    tunnel_port: u16,
    settings: ProbeSettings,
    metrics: HealthMetrics,
    judge: Judge,
    socket: Option<(Ipv4Addr, UdpSocket)>,
    /// The pinned health and reply maps, opened once (again after an error).
    maps: Option<(HealthMap, ReplyMap)>,
    /// Flags as last written to the health map, by gateway (and this node).
    written: BTreeMap<Ipv4Addr, u32>,
    /// The gateways of the last round, with their node names (for the metric).
    probed: BTreeMap<Ipv4Addr, String>,
    /// Holds this node's floating egress IPs; made when the first one shows up.
    holder: Option<Holder>,
    said: SayOnce<String>,
    view: watch::Sender<HealthView>,
}

impl Prober {
    fn new(
        pins: PinLayout,
        tunnel_port: u16,
        settings: ProbeSettings,
        metrics: HealthMetrics,
        view: watch::Sender<HealthView>,
    ) -> Self {
        Prober {
            view,
            pins,
            tunnel_port,
            settings,
            metrics,
            judge: Judge::new(settings.multiplier, monotonic_now_ns() / 1000),
            socket: None,
            maps: None,
            written: BTreeMap::new(),
            probed: BTreeMap::new(),
            holder: None,
            said: SayOnce::new(String::new()),
        }
    }

    fn run(mut self, targets: &Mutex<Targets>) {
        // Capabilities are per thread: this one started before the agent dropped its own.
        if let Err(error) = privileges::drop_capabilities() {
            warn!(error = %Chain(&error), "the gateway prober runs with all capabilities");
        }
        let mut started = false;
        loop {
            let current = targets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            if current.node_ip.is_none() {
                // No reconcile yet: judging (or releasing) on empty targets would undo what
                // an earlier agent found.
                thread::sleep(self.settings.interval);
                continue;
            }
            match self.round(&current, started) {
                Ok(()) => {
                    started = true;
                    self.said.update(String::new());
                }
                Err(error) => {
                    let message = format!("{error:#}");
                    if self.said.update(message.clone()).is_some() && !message.is_empty() {
                        warn!(error = message, "gateway probing failed");
                    }
                }
            }
            thread::sleep(self.settings.interval);
        }
    }

    /// One round: read the replies, judge, write the verdicts, send the next probes.
    fn round(&mut self, targets: &Targets, started: bool) -> anyhow::Result<()> {
        let (mut health, replies) = match self.maps.take() {
            Some(maps) => maps,
            None => (
                pinned::hash_map(&self.pins, map_names::GATEWAY_HEALTH)?,
                pinned::hash_map(&self.pins, map_names::PROBE_REPLIES)?,
            ),
        };
        let result = self.judge_and_probe(&mut health, &replies, targets, started);
        if result.is_ok() {
            self.maps = Some((health, replies));
        }
        result
    }

    fn judge_and_probe(
        &mut self,
        health: &mut HealthMap,
        replies: &ReplyMap,
        targets: &Targets,
        started: bool,
    ) -> anyhow::Result<()> {
        if !started {
            // What an earlier agent judged stands until this one knows better.
            for (ip, flags) in health.iter().filter_map(Result::ok) {
                self.written.insert(Ipv4Addr::from(ip), flags.flags);
            }
        }
        let written = &self.written;
        self.judge.retain(targets.gateways.keys().map(|ip| {
            let down_before = written
                .get(ip)
                .is_some_and(|flags| flags & GATEWAY_DOWN != 0);
            (*ip, down_before)
        }));
        for ip in targets.gateways.keys() {
            if let Ok(reply) = replies.get(&ip.octets(), 0)
                && self
                    .judge
                    .replied(*ip, reply.seq, reply.gateway_flags & GATEWAY_DOWN == 0)
            {
                let rtt = reply.received_ns.saturating_sub(reply.sent_ns);
                #[expect(clippy::cast_precision_loss, reason = "nanoseconds of a round trip")]
                self.metrics.rtt.observe(rtt as f64 / 1e9);
            }
        }
        let fallbacks = self.judge.fallbacks();
        let counted = self.metrics.fallbacks.get();
        if fallbacks > counted {
            self.metrics.fallbacks.inc_by(fallbacks - counted);
        }
        for (ip, change) in self.judge.judge() {
            let node = targets
                .gateways
                .get(&ip)
                .map_or("", |target| target.node.as_str());
            match change {
                Change::Down(Cause::NeverAnswered) => {
                    info!(gateway = node, ip = %ip, "gateway not answering yet: new flows take the next candidate");
                }
                Change::Down(cause) => {
                    warn!(gateway = node, ip = %ip, cause = cause.as_str(), "gateway down: its flows move to the next candidate");
                    self.metrics
                        .failovers
                        .get_or_create(&vec![("cause", cause.as_str().to_string())])
                        .inc();
                }
                Change::Up => {
                    info!(gateway = node, ip = %ip, "gateway up: new flows take it again");
                }
            }
        }
        self.write_health(health, targets)?;
        let view = HealthView {
            down: targets
                .gateways
                .iter()
                .filter(|(ip, _)| self.judge.is_down(**ip))
                .map(|(_, target)| target.node.clone())
                .collect(),
            draining: targets
                .gateways
                .values()
                .filter(|target| target.draining)
                .map(|target| target.node.clone())
                .collect(),
            self_serving: targets.self_serving,
            self_draining: targets.self_draining,
        };
        self.view.send_if_modified(|current| {
            let changed = *current != view;
            *current = view;
            changed
        });
        self.send_probes(targets)?;
        // After the probes: a failure here must not stop the health checks.
        if let Err(error) = self.hold_floating_ips(targets) {
            warn!(error = %Chain(&*error), "cannot hold the floating egress IPs");
        }
        Ok(())
    }

    fn write_health(&mut self, health: &mut HealthMap, targets: &Targets) -> anyhow::Result<()> {
        let mut wanted: BTreeMap<Ipv4Addr, u32> = targets
            .gateways
            .iter()
            .map(|(ip, target)| (*ip, health_flags(self.judge.is_down(*ip), target.draining)))
            .collect();
        if let Some(own) = targets.node_ip {
            wanted.insert(
                own,
                health_flags(!targets.self_serving, targets.self_draining),
            );
        }
        for (ip, flags) in &wanted {
            if self.written.get(ip) != Some(flags) {
                let value = GatewayHealth {
                    flags: *flags,
                    _pad: 0,
                };
                health.insert(ip.octets(), value, 0)?;
                self.written.insert(*ip, *flags);
            }
        }
        let gone: Vec<Ipv4Addr> = self
            .written
            .keys()
            .filter(|ip| !wanted.contains_key(*ip))
            .copied()
            .collect();
        for ip in gone {
            let _ = health.remove(&ip.octets());
            self.written.remove(&ip);
        }
        for (ip, target) in &targets.gateways {
            let up = i64::from(!self.judge.is_down(*ip));
            self.metrics
                .healthy
                .get_or_create(&vec![("node", target.node.clone())])
                .set(up);
        }
        // Gateways no longer probed (gone from the inventory, no pod needs them) leave the
        // metric rather than keep their last value.
        for (ip, node) in &self.probed {
            if targets
                .gateways
                .get(ip)
                .is_none_or(|target| target.node != *node)
            {
                self.metrics.healthy.remove(&vec![("node", node.clone())]);
            }
        }
        self.probed = targets
            .gateways
            .iter()
            .map(|(ip, target)| (*ip, target.node.clone()))
            .collect();
        Ok(())
    }

    /// Holds the floating egress IPs whose candidates before this node are all down.
    fn hold_floating_ips(&mut self, targets: &Targets) -> anyhow::Result<()> {
        if targets.floating.is_empty() && self.holder.is_none() {
            return Ok(());
        }
        let wanted: BTreeMap<Ipv4Addr, (u32, String)> = targets
            .floating
            .iter()
            .filter(|(_, target)| {
                // A candidate before this one is out when it is down, draining, or has not
                // answered yet (a newcomer must prove itself before this one hands over).
                should_hold(target, targets.self_serving, targets.self_draining, |ip| {
                    self.judge.is_down(ip)
                        || !self.judge.has_answered(ip)
                        || targets
                            .gateways
                            .get(&ip)
                            .is_some_and(|gateway| gateway.draining)
                })
            })
            .map(|(ip, target)| (*ip, (target.ifindex, target.interface.clone())))
            .collect();
        let holder = match &mut self.holder {
            Some(holder) => holder,
            None => self.holder.insert(Holder::new()?),
        };
        holder.apply(&wanted, &targets.floating);
        Ok(())
    }

    fn send_probes(&mut self, targets: &Targets) -> anyhow::Result<()> {
        let Some(node_ip) = targets.node_ip else {
            return Ok(());
        };
        if targets.gateways.is_empty() {
            return Ok(());
        }
        if self
            .socket
            .as_ref()
            .is_none_or(|(bound, _)| *bound != node_ip)
        {
            let socket = UdpSocket::bind(SocketAddrV4::new(node_ip, 0))?;
            socket.set_nonblocking(true)?;
            self.socket = Some((node_ip, socket));
        }
        let Some((_, socket)) = &self.socket else {
            return Ok(());
        };
        for ip in targets.gateways.keys() {
            let (seq, path) = self.judge.next_probe(*ip);
            let frame = probe_frame(node_ip, *ip, seq, monotonic_now_ns(), path);
            // A full socket buffer or an unreachable gateway is a lost probe: that is what
            // the judge counts.
            if let Err(error) = socket.send_to(&frame, SocketAddrV4::new(*ip, self.tunnel_port)) {
                tracing::debug!(gateway = %ip, error = %Chain(&error), "probe not sent");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);

    fn round(judge: &mut Judge, answered: bool) -> Vec<(Ipv4Addr, Change)> {
        let (seq, _) = judge.next_probe(GW);
        if answered {
            judge.replied(GW, seq, true);
        }
        judge.judge()
    }

    #[test]
    fn a_gateway_is_down_after_multiplier_unanswered_probes_and_up_at_the_next_reply() {
        let mut judge = Judge::new(3, 0);
        judge.retain([(GW, false)]);
        assert!(round(&mut judge, true).is_empty());
        assert!(round(&mut judge, false).is_empty());
        assert!(round(&mut judge, false).is_empty());
        assert_eq!(
            round(&mut judge, false),
            [(GW, Change::Down(Cause::Unanswered))]
        );
        assert!(round(&mut judge, false).is_empty(), "no news while down");
        assert_eq!(round(&mut judge, true), [(GW, Change::Up)]);
        assert!(!judge.is_down(GW));
    }

    /// A gateway that never answered (its datapath is not up yet) is not used, but its
    /// going down is no failover.
    #[test]
    fn a_gateway_that_never_answered_is_down_but_failed_nothing_over() {
        let mut judge = Judge::new(2, 0);
        judge.retain([(GW, false)]);
        assert!(round(&mut judge, false).is_empty());
        assert_eq!(
            round(&mut judge, false),
            [(GW, Change::Down(Cause::NeverAnswered))]
        );
        assert_eq!(round(&mut judge, true), [(GW, Change::Up)]);
    }

    /// Replies left by an earlier agent carry sequence numbers below the new base: no news.
    #[test]
    fn replies_from_before_a_restart_do_not_count() {
        let mut judge = Judge::new(3, 1_000);
        judge.retain([(GW, true)]);
        assert!(!judge.replied(GW, 5, true), "an old agent's reply");
        assert!(!judge.has_answered(GW));
        let (seq, _) = judge.next_probe(GW);
        assert_eq!(seq, 1_001);
        assert!(judge.replied(GW, seq, true));
        assert!(judge.has_answered(GW));
        assert_eq!(judge.judge(), [(GW, Change::Up)]);
    }

    #[test]
    fn a_gateway_that_says_it_cannot_serve_is_down() {
        let mut judge = Judge::new(3, 0);
        judge.retain([(GW, false)]);
        let (seq, _) = judge.next_probe(GW);
        judge.replied(GW, seq, false);
        assert_eq!(judge.judge(), [(GW, Change::Down(Cause::NotServing))]);
        let (seq, _) = judge.next_probe(GW);
        judge.replied(GW, seq, true);
        assert_eq!(judge.judge(), [(GW, Change::Up)]);
    }

    /// A restarted agent keeps the verdict it found until probes say otherwise; stale or
    /// duplicate replies are no news.
    #[test]
    fn verdicts_survive_a_restart_and_old_replies_count_once() {
        let mut judge = Judge::new(3, 0);
        judge.retain([(GW, true)]);
        assert!(judge.is_down(GW));
        let (seq, _) = judge.next_probe(GW);
        assert!(judge.replied(GW, seq, true));
        assert!(!judge.replied(GW, seq, true), "the same reply twice");
        assert!(
            !judge.replied(GW, seq + 5, true),
            "a reply to a probe never sent"
        );
        assert_eq!(judge.judge(), [(GW, Change::Up)]);
        judge.retain([]);
        assert!(!judge.is_down(GW), "no longer probed");
    }

    /// Probes whose answers arrive only when they ask for the TC program (the XDP
    /// responder's answers are lost on their way back), from `next_probe` on for `probes`.
    fn only_tc_answers(judge: &mut Judge, probes: usize) -> Vec<u8> {
        let mut paths = Vec::new();
        for _ in 0..probes {
            let (seq, path) = judge.next_probe(GW);
            paths.push(path);
            if path == PROBE_VIA_TC {
                judge.replied(GW, seq, true);
            }
            assert!(
                judge.judge().is_empty(),
                "a live gateway went down: {paths:?}"
            );
        }
        paths
    }

    /// A responder whose answers are lost (what XDP sends back is dropped by the driver)
    /// while its TC program answers: the probe after each loss asks for the TC program, so
    /// the gateway is never down; after the second such loss in a row the TC program alone
    /// is asked, and a dead gateway still goes down after `multiplier` probes.
    #[test]
    fn lost_xdp_answers_fall_back_to_the_tc_program_and_no_live_gateway_goes_down() {
        let mut judge = Judge::new(3, 0);
        judge.retain([(GW, false)]);
        assert!(round(&mut judge, true).is_empty());
        let paths = only_tc_answers(&mut judge, 20);
        assert_eq!(
            paths[..5],
            [
                PROBE_VIA_ANY,
                PROBE_VIA_TC,
                PROBE_VIA_ANY,
                PROBE_VIA_TC,
                PROBE_VIA_TC
            ]
        );
        assert!(paths[3..].iter().all(|path| *path == PROBE_VIA_TC));
        assert_eq!(judge.fallbacks(), 1);
        for _ in 0..2 {
            assert!(round(&mut judge, false).is_empty());
        }
        assert_eq!(
            round(&mut judge, false),
            [(GW, Change::Down(Cause::Unanswered))]
        );
    }

    /// One lost probe (a gateway starting, or attaching its responder; plain loss) asks the
    /// TC program once, then any responder again.
    #[test]
    fn a_single_lost_probe_does_not_avoid_the_xdp_responder() {
        let mut judge = Judge::new(3, 0);
        judge.retain([(GW, false)]);
        assert!(round(&mut judge, true).is_empty());
        assert!(round(&mut judge, false).is_empty());
        let (seq, path) = judge.next_probe(GW);
        assert_eq!(path, PROBE_VIA_TC);
        judge.replied(GW, seq, true);
        assert!(
            round(&mut judge, true).is_empty(),
            "for any responder, answered"
        );
        assert!(round(&mut judge, false).is_empty());
        assert_eq!(judge.next_probe(GW).1, PROBE_VIA_TC);
        assert_eq!(judge.fallbacks(), 0, "two losses, but not in a row");
    }

    /// After the TC-only probes XDP is asked again; while it still fails, each TC-only
    /// stretch is twice as long; an answer for any responder ends that.
    #[test]
    fn tc_only_stretches_double_while_xdp_keeps_failing() {
        let mut judge = Judge::new(3, 0);
        judge.retain([(GW, false)]);
        assert!(round(&mut judge, true).is_empty());
        let tc_only = TC_ONLY_PROBES as usize;
        let paths = only_tc_answers(&mut judge, 4 + tc_only + 4 + 2 * tc_only + 1);
        let any_at: Vec<usize> = paths
            .iter()
            .enumerate()
            .filter(|(_, path)| **path == PROBE_VIA_ANY)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            any_at,
            [0, 2, 4 + tc_only, 6 + tc_only, 8 + 3 * tc_only],
            "XDP is tried after 600, then 1,200 TC-only probes"
        );
        assert_eq!(judge.fallbacks(), 2);
        // XDP answers again (after the TC probe that follows the last loss): back to
        // probes for any responder.
        assert!(round(&mut judge, true).is_empty());
        assert!(round(&mut judge, true).is_empty());
        assert_eq!(judge.next_probe(GW).1, PROBE_VIA_ANY);
    }

    #[test]
    fn probes_are_vxlan_frames_with_a_valid_inner_header() {
        let from = Ipv4Addr::new(10, 0, 0, 11);
        let frame = probe_frame(from, GW, 7, 123, PROBE_VIA_TC);
        assert_eq!(frame.len(), 8 + 14 + 20 + 8 + 32);
        assert_eq!(&frame[..8], &[0x08, 0, 0, 0, 0xE6, 0x00, 0x01, 0]);
        let ip = &frame[22..42];
        assert_eq!(ipv4_checksum(ip), 0, "a valid header sums to 0xffff");
        assert_eq!(&ip[12..16], &from.octets());
        assert_eq!(&ip[16..20], &GW.octets());
        let payload = &frame[50..];
        assert_eq!(&payload[..4], b"EGWP");
        assert_eq!(payload[4..6], [PROBE_REQUEST, PROBE_VIA_TC]);
        assert_eq!(u64::from_ne_bytes(payload[16..24].try_into().unwrap()), 7);
    }

    #[test]
    fn flags() {
        assert_eq!(health_flags(false, false), 0);
        assert_eq!(health_flags(true, true), GATEWAY_DOWN | GATEWAY_DRAINING);
    }
}
