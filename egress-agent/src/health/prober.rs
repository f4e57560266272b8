//! The prober thread: reads the replies and the traffic stamps, judges, writes the
//! verdicts, sends the next probes, holds the floating egress IPs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{Arc, Mutex},
    thread,
};

use aya::maps::{HashMap, MapData};
use egress_common::{
    gateway::{GATEWAY_DOWN, GatewayHealth, GatewayTraffic, ProbeReply},
    map_names,
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    Cause, Change, HealthMetrics, HealthView, Judge, ProbeSettings, Targets, Traffic, health_flags,
    probe_frame,
};
use crate::{
    chain::Chain,
    datapath::{PinLayout, monotonic_now_ns, pinned},
    floating::{Holder, should_hold},
    privileges,
    say_once::SayOnce,
};

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
type TrafficMap = HashMap<MapData, [u8; 4], GatewayTraffic>;

/// The pinned maps the prober reads and writes, opened once (again after an error).
struct ProberMaps {
    health: HealthMap,
    replies: ReplyMap,
    /// Demand mode only: without it every gateway is probed every round.
    traffic: Result<TrafficMap, String>,
}

impl ProberMaps {
    fn open(pins: &PinLayout) -> anyhow::Result<ProberMaps> {
        Ok(ProberMaps {
            health: pinned::hash_map(pins, map_names::GATEWAY_HEALTH)?,
            replies: pinned::hash_map(pins, map_names::PROBE_REPLIES)?,
            traffic: pinned::hash_map(pins, map_names::GATEWAY_TRAFFIC)
                .map_err(|error| Chain(&error).to_string()),
        })
    }
}

/// `bpf_map_update_elem` flag: only create an entry that is missing.
const BPF_NOEXIST: u64 = 1;

struct Prober {
    pins: PinLayout,
    tunnel_port: u16,
    settings: ProbeSettings,
    metrics: HealthMetrics,
    judge: Judge,
    socket: Option<(Ipv4Addr, UdpSocket)>,
    maps: Option<ProberMaps>,
    /// When the last two rounds began (monotonic ns): the windows `Traffic` is judged in.
    last_rounds: [u64; 2],
    /// Flags as last written to the health map, by gateway (and this node).
    written: BTreeMap<Ipv4Addr, u32>,
    /// The gateways of the last round, with their node names (for the metric).
    probed: BTreeMap<Ipv4Addr, String>,
    /// Holds this node's floating egress IPs; made in the first round (it removes those an
    /// earlier run left).
    holder: Option<Holder>,
    said: SayOnce<String>,
    /// The last failure to read the traffic stamps, and to hold the floating IPs.
    said_traffic: SayOnce<String>,
    said_floating: SayOnce<String>,
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
            judge: Judge::new(settings.multiplier, monotonic_now_ns() / 1000)
                .with_quiet_rounds(settings.quiet_rounds()),
            socket: None,
            maps: None,
            last_rounds: [0; 2],
            written: BTreeMap::new(),
            probed: BTreeMap::new(),
            holder: None,
            said: SayOnce::new(String::new()),
            said_traffic: SayOnce::new(String::new()),
            said_floating: SayOnce::new(String::new()),
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
        let mut maps = match self.maps.take() {
            Some(maps) => maps,
            None => ProberMaps::open(&self.pins)?,
        };
        let result = self.judge_and_probe(&mut maps, targets, started);
        if result.is_ok() {
            self.maps = Some(maps);
        }
        result
    }

    fn judge_and_probe(
        &mut self,
        maps: &mut ProberMaps,
        targets: &Targets,
        started: bool,
    ) -> anyhow::Result<()> {
        let ProberMaps {
            health,
            replies,
            traffic,
        } = maps;
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
        // Without the traffic stamps every gateway is probed every round: a failure there
        // must not stop the health checks.
        let traffic = match traffic
            .as_mut()
            .map_err(|error| anyhow::anyhow!("{error}"))
            .and_then(|map| self.read_traffic(map, targets))
        {
            Ok(traffic) => {
                self.said_traffic.update(String::new());
                traffic
            }
            Err(error) => {
                let message = format!("{error:#}");
                if self.said_traffic.update(message.clone()).is_some() {
                    warn!(
                        error = message,
                        "cannot read the traffic stamps: probing every interval"
                    );
                }
                BTreeMap::new()
            }
        };
        self.send_probes(targets, &traffic)?;
        // After the probes: a failure here must not stop the health checks.
        match self.hold_floating_ips(targets) {
            Ok(()) => {
                self.said_floating.update(String::new());
            }
            Err(error) => {
                let message = Chain(&*error).to_string();
                if self.said_floating.update(message.clone()).is_some() {
                    warn!(error = message, "cannot hold the floating egress IPs");
                }
            }
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
        // The first round makes the holder even without floating IPs: it removes those an
        // earlier run left (their policy may be gone).
        let wanted: BTreeMap<Ipv4Addr, (u32, String)> = targets
            .floating
            .iter()
            .filter(|(_, target)| {
                // A candidate before this one is out when it is down, draining, or has not
                // answered yet (a newcomer must prove itself before this one hands over).
                should_hold(target, targets.self_serving, targets.self_draining, |ip| {
                    (self.judge.is_down(ip) && !self.judge.is_answering(ip))
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

    /// What the pods' traffic showed of each gateway since the last rounds; makes the
    /// datapath's entries of new gateways and removes those of gateways no longer probed.
    fn read_traffic(
        &mut self,
        map: &mut TrafficMap,
        targets: &Targets,
    ) -> anyhow::Result<BTreeMap<Ipv4Addr, Traffic>> {
        let now = monotonic_now_ns();
        let [last, before_last] = self.last_rounds;
        self.last_rounds = [now, last];
        // A standby of a floating egress IP watches the candidates before it every round.
        let watched: BTreeSet<Ipv4Addr> = targets
            .floating
            .values()
            .flat_map(|floating| floating.candidates_before.iter().copied())
            .collect();
        // Entries of gateways no longer probed go first, making room for new ones.
        let gone: Vec<[u8; 4]> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|ip| !targets.gateways.contains_key(&Ipv4Addr::from(*ip)))
            .collect();
        for ip in gone {
            let _ = map.remove(&ip);
        }
        let mut seen = BTreeMap::new();
        for ip in targets.gateways.keys() {
            let stamps = match map.get(&ip.octets(), 0) {
                Ok(stamps) => stamps,
                Err(aya::maps::MapError::KeyNotFound) => {
                    map.insert(ip.octets(), GatewayTraffic::default(), BPF_NOEXIST)?;
                    GatewayTraffic::default()
                }
                Err(error) => return Err(error.into()),
            };
            let traffic = if watched.contains(ip) || before_last == 0 {
                Traffic::Ignored
            } else {
                traffic_since(stamps, last, before_last)
            };
            seen.insert(*ip, traffic);
        }
        Ok(seen)
    }

    fn send_probes(
        &mut self,
        targets: &Targets,
        traffic: &BTreeMap<Ipv4Addr, Traffic>,
    ) -> anyhow::Result<()> {
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
            let traffic = traffic.get(ip).copied().unwrap_or(Traffic::Ignored);
            let Some((seq, path)) = self.judge.next_probe(*ip, traffic) else {
                continue;
            };
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

/// What a gateway's traffic stamps say, for the rounds that began at `last` and
/// `before_last`.
fn traffic_since(stamps: GatewayTraffic, last: u64, before_last: u64) -> Traffic {
    let latest = stamps.sent_ns.max(stamps.received_ns);
    if stamps.received_ns != 0 && stamps.received_ns >= last {
        Traffic::Answered
    } else if latest != 0 && latest >= before_last {
        Traffic::Unanswered
    } else {
        Traffic::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The traffic stamps, read in the rounds that began at 100 and 200 (ns).
    #[test]
    fn traffic_is_answered_unanswered_or_idle_by_its_stamps() {
        let stamps = |sent_ns, received_ns| GatewayTraffic {
            sent_ns,
            received_ns,
        };
        let at = |stamps| traffic_since(stamps, 200, 100);
        assert_eq!(at(stamps(0, 0)), Traffic::Idle);
        assert_eq!(at(stamps(250, 210)), Traffic::Answered);
        assert_eq!(at(stamps(50, 200)), Traffic::Answered);
        assert_eq!(
            at(stamps(250, 0)),
            Traffic::Unanswered,
            "sent, never answered"
        );
        assert_eq!(
            at(stamps(150, 150)),
            Traffic::Unanswered,
            "stopped a round ago"
        );
        assert_eq!(at(stamps(250, 150)), Traffic::Unanswered);
        assert_eq!(at(stamps(90, 80)), Traffic::Idle);
    }
}
