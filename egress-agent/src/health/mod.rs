//! Gateway health, BFD-style: this node probes the candidate gateways of its pods' groups
//! through the tunnel, every `interval`, and a gateway whose last `multiplier` probes all went
//! unanswered, or that answers that it cannot serve, is down. The verdict is one
//! `GATEWAY_HEALTH` write per gateway that changed, which the datapath reads on every new
//! flow and on every packet of a flow whose gateway went down: a failover costs no policy
//! rewrite.
//!
//! Demand mode, as BFD's: a gateway that is quiet (the replies to this node's pods' traffic
//! show it alive, or no traffic goes to it) is probed every `quiet_interval` only; traffic
//! that stops getting replies brings back a probe every interval, so a dead gateway is found
//! one interval later than with a probe every interval, at a twentieth of the probes while
//! all is well (at the defaults; `GATEWAY_TRAFFIC`: the
//! datapath stamps what it sent to each gateway and what came back).
//!
//! The probes are answered by the gateway's datapath, never its agent: a busy or restarting
//! agent is no dead gateway. The prober is a thread of its own, so a busy reconcile never
//! delays it; when this agent stops, the health entries stay as they are (no failover, no
//! recovery) until the next agent judges again. On a gateway, its own entry says whether it
//! can serve (egress interface up, with its address), and its probe replies carry it.
//!
//! `judge` holds the verdicts (pure), `prober` the thread that sends the probes and writes
//! the verdicts, `frame` the probe as it goes on the wire.

mod frame;
mod judge;
mod prober;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Duration,
};

use egress_common::gateway::{GATEWAY_DOWN, GATEWAY_DRAINING};
use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
};

pub use self::{
    frame::probe_frame,
    judge::{Cause, Change, Judge},
    prober::spawn_prober,
};
use crate::floating::FloatingTarget;

/// How often, and after how many unanswered probes a gateway is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub multiplier: u32,
    /// How often a gateway is probed while this node's traffic shows it alive, or while no
    /// traffic goes to it (BFD's demand mode); `interval` or less: every interval.
    pub quiet_interval: Duration,
}

impl ProbeSettings {
    /// Rounds from one probe of a quiet gateway to the next.
    fn quiet_rounds(&self) -> u32 {
        let rounds = self.quiet_interval.as_nanos() / self.interval.as_nanos().max(1);
        u32::try_from(rounds).unwrap_or(u32::MAX).max(1)
    }
}

/// What this node's pods' traffic showed of a gateway since the last round of probes
/// (BFD's demand mode: replies that keep coming show a gateway alive as well as a probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// Not consulted: probe every round (a floating egress IP's candidate before this node,
    /// whose failure this node must see at once to take the address over).
    Ignored,
    /// A reply from the gateway reached a pod since the last round.
    Answered,
    /// Traffic went to the gateway, or came from it, in the round before, but no reply
    /// came since the last round: probe every round until it is answered again.
    Unanswered,
    /// No traffic in the last two rounds.
    Idle,
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

/// The datapath's flags for a gateway.
pub fn health_flags(down: bool, draining: bool) -> u32 {
    (if down { GATEWAY_DOWN } else { 0 }) | (if draining { GATEWAY_DRAINING } else { 0 })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_rounds_follow_the_intervals() {
        let settings = |interval, quiet| ProbeSettings {
            interval: Duration::from_millis(interval),
            multiplier: 3,
            quiet_interval: Duration::from_millis(quiet),
        };
        assert_eq!(settings(50, 1000).quiet_rounds(), 20);
        assert_eq!(settings(50, 10).quiet_rounds(), 1);
        assert_eq!(settings(300, 1000).quiet_rounds(), 3);
    }

    #[test]
    fn flags() {
        assert_eq!(health_flags(false, false), 0);
        assert_eq!(health_flags(true, true), GATEWAY_DOWN | GATEWAY_DRAINING);
    }
}
