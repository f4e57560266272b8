//! The verdicts on gateways, from the probes sent and the replies seen; pure, so it is
//! unit-tested.

use std::{collections::BTreeMap, net::Ipv4Addr};

use egress_common::gateway::{PROBE_VIA_ANY, PROBE_VIA_TC};

use super::Traffic;

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
    /// Rounds without a probe since the last one (the gateway was quiet).
    skipped: u32,
    /// Probes answered in a row (by a gateway saying it can serve).
    streak: u32,
    /// Answers in a row a down gateway needs to be up again (0: `multiplier`).
    hold_down: u32,
    /// Rounds judged up since it last came up.
    rounds_up: u32,
    /// Whether the probes before this round were all answered, by a gateway saying it can
    /// serve (also while it is held down).
    answering: bool,
}

/// The verdicts, from probes sent and replies seen: pure, so it is unit-tested.
#[derive(Debug)]
pub struct Judge {
    multiplier: u64,
    /// `ProbeSettings::quiet_rounds`.
    quiet_rounds: u32,
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
    /// clock in microseconds). Probes go every round until [`Judge::with_quiet_rounds`].
    pub fn new(multiplier: u32, seq_base: u64) -> Judge {
        Judge {
            multiplier: u64::from(multiplier.max(1)),
            quiet_rounds: 1,
            fallbacks: 0,
            seq_base,
            peers: BTreeMap::new(),
        }
    }

    /// A gateway that is quiet (see [`Traffic`]) is probed every `rounds` rounds only.
    #[must_use]
    pub fn with_quiet_rounds(self, rounds: u32) -> Judge {
        Judge {
            quiet_rounds: rounds.max(1),
            ..self
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
                skipped: 0,
                streak: 0,
                hold_down: 0,
                // No flaps on record.
                rounds_up: FLAP_ROUNDS,
                answering: false,
            });
            kept.insert(ip, peer);
        }
        self.peers = kept;
    }

    /// The sequence number of the next probe to `ip`, and who may answer it
    /// (`Probe::path`); `None`: no probe this round.
    ///
    /// A gateway that is up, answered its last probe and is quiet (its replies reach the
    /// pods, or no traffic goes to it) is probed every `quiet_rounds` rounds only. Traffic
    /// that gets no reply brings back a probe every round (BFD's poll): a dead gateway is
    /// down one round later than if none had been skipped. The silence itself is no lost
    /// probe: a reply may just take longer than a round (a far destination, a slow server).
    ///
    /// After a lost probe the next one asks for the TC program, so an XDP responder whose
    /// answers get lost on their way back (a driver that cannot send what XDP sends) never
    /// makes a live gateway look dead. When that happens twice in a row (a single loss is
    /// just a loss), the next `TC_ONLY_PROBES` probes ask for the TC program alone, twice as
    /// many each time XDP fails again, until a probe for any responder is answered.
    pub fn next_probe(&mut self, ip: Ipv4Addr, traffic: Traffic) -> Option<(u64, u8)> {
        let quiet_rounds = self.quiet_rounds;
        let peer = self.peers.entry(ip).or_default();
        let previous_lost = peer.answered < peer.sent;
        let previous_was_any = peer.last_any == Some(peer.sent);
        if peer.heard && peer.down.is_none() && !previous_lost {
            match traffic {
                Traffic::Answered | Traffic::Idle => {
                    peer.skipped += 1;
                    if peer.skipped < quiet_rounds {
                        return None;
                    }
                }
                Traffic::Unanswered | Traffic::Ignored => {}
            }
        }
        peer.skipped = 0;
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
        Some((peer.sent, path))
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
        // A gap in the sequence numbers is a lost probe.
        peer.streak = match (serving, seq == peer.answered + 1) {
            (false, _) => 0,
            (true, true) => peer.streak.saturating_add(1),
            (true, false) => 1,
        };
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
    ///
    /// A down gateway is up again once it answered `multiplier` probes in a row, saying it
    /// can serve. One that goes down again within `FLAP_ROUNDS` of coming up (a starved CPU,
    /// a flaky link) needs twice as many answers each time, up to `MAX_HOLD_DOWN` times
    /// `multiplier`, so a flapping gateway does not pull new flows back and forth; staying
    /// up that long forgives it.
    pub fn judge(&mut self) -> Vec<(Ipv4Addr, Change)> {
        let mut changes = Vec::new();
        let base = u32::try_from(self.multiplier).unwrap_or(u32::MAX);
        for (ip, peer) in &mut self.peers {
            let hold_down = if peer.hold_down == 0 {
                base
            } else {
                peer.hold_down
            };
            let unanswered = peer.sent - peer.answered.min(peer.sent);
            peer.answering = peer.heard && unanswered == 0 && !peer.not_serving;
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
            } else if peer.down.is_some() && peer.streak < hold_down {
                // Answering again, not long enough yet.
                peer.down
            } else {
                None
            };
            match (peer.down.is_some(), verdict.is_some()) {
                (false, true) => {
                    peer.hold_down = if peer.rounds_up < FLAP_ROUNDS {
                        hold_down
                            .saturating_mul(2)
                            .min(base.saturating_mul(MAX_HOLD_DOWN))
                    } else {
                        base
                    };
                }
                (true, false) => peer.rounds_up = 0,
                (false, false) => {
                    peer.rounds_up = peer.rounds_up.saturating_add(1);
                    if peer.rounds_up >= FLAP_ROUNDS {
                        peer.hold_down = base;
                    }
                }
                (true, true) => {}
            }
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

    /// Whether `ip` answered every probe so far and said it can serve, held down or not: a
    /// standby of a floating IP hands the address back on that, since no flow state stays
    /// behind on a floating IP's gateway.
    pub fn is_answering(&self, ip: Ipv4Addr) -> bool {
        self.peers.get(&ip).is_some_and(|peer| peer.answering)
    }

    /// Whether `ip` answered since this agent started probing it.
    pub fn has_answered(&self, ip: Ipv4Addr) -> bool {
        self.peers.get(&ip).is_some_and(|peer| peer.heard)
    }
}

/// Rounds a gateway must stay up after coming back before a new failure counts as a fresh
/// one rather than a flap (30 s at the default interval).
const FLAP_ROUNDS: u32 = 600;
/// Most times `multiplier` answers in a row a flapping gateway needs to come back (about
/// 10 s at the defaults).
const MAX_HOLD_DOWN: u32 = 64;

/// Probes asked of the TC program alone the first time it answered where the probe before,
/// for any responder, twice in a row got no answer (30 s at the default interval); each
/// further time twice as many, up to `MAX_BACKOFF` doublings (8 minutes at 50 ms).
const TC_ONLY_PROBES: u32 = 600;
const XDP_LOSSES_BEFORE_TC_ONLY: u32 = 2;
const MAX_BACKOFF: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);

    /// The next probe, for a gateway whose traffic is not consulted.
    fn probe(judge: &mut Judge) -> (u64, u8) {
        judge
            .next_probe(GW, Traffic::Ignored)
            .expect("a probe every round")
    }

    fn round(judge: &mut Judge, answered: bool) -> Vec<(Ipv4Addr, Change)> {
        let (seq, _) = probe(judge);
        if answered {
            judge.replied(GW, seq, true);
        }
        judge.judge()
    }

    #[test]
    fn a_gateway_is_down_after_multiplier_unanswered_probes_and_up_after_as_many_answers() {
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
        assert!(round(&mut judge, true).is_empty());
        assert!(
            round(&mut judge, false).is_empty(),
            "answers in a row, or none"
        );
        assert!(round(&mut judge, true).is_empty());
        assert!(round(&mut judge, true).is_empty());
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
        assert!(round(&mut judge, true).is_empty());
        assert_eq!(round(&mut judge, true), [(GW, Change::Up)]);
    }

    /// Replies left by an earlier agent carry sequence numbers below the new base: no news.
    #[test]
    fn replies_from_before_a_restart_do_not_count() {
        let mut judge = Judge::new(3, 1_000);
        judge.retain([(GW, true)]);
        assert!(!judge.replied(GW, 5, true), "an old agent's reply");
        assert!(!judge.has_answered(GW));
        let (seq, _) = probe(&mut judge);
        assert_eq!(seq, 1_001);
        assert!(judge.replied(GW, seq, true));
        assert!(judge.has_answered(GW));
        assert!(judge.judge().is_empty(), "one answer of the three needed");
        assert!(round(&mut judge, true).is_empty());
        assert_eq!(round(&mut judge, true), [(GW, Change::Up)]);
    }

    #[test]
    fn a_gateway_that_says_it_cannot_serve_is_down() {
        let mut judge = Judge::new(3, 0);
        judge.retain([(GW, false)]);
        let (seq, _) = probe(&mut judge);
        judge.replied(GW, seq, false);
        assert_eq!(judge.judge(), [(GW, Change::Down(Cause::NotServing))]);
        assert!(round(&mut judge, true).is_empty());
        assert!(round(&mut judge, true).is_empty());
        assert_eq!(round(&mut judge, true), [(GW, Change::Up)]);
    }

    /// A restarted agent keeps the verdict it found until probes say otherwise; stale or
    /// duplicate replies are no news.
    #[test]
    fn verdicts_survive_a_restart_and_old_replies_count_once() {
        let mut judge = Judge::new(3, 0);
        judge.retain([(GW, true)]);
        assert!(judge.is_down(GW));
        let (seq, _) = probe(&mut judge);
        assert!(judge.replied(GW, seq, true));
        assert!(!judge.replied(GW, seq, true), "the same reply twice");
        assert!(
            !judge.replied(GW, seq + 5, true),
            "a reply to a probe never sent"
        );
        assert!(judge.judge().is_empty());
        assert!(round(&mut judge, true).is_empty());
        assert_eq!(round(&mut judge, true), [(GW, Change::Up)]);
        judge.retain([]);
        assert!(!judge.is_down(GW), "no longer probed");
    }

    /// Rounds until `GW` is up again, answering every probe (at most `limit`).
    fn rounds_to_come_back(judge: &mut Judge, limit: usize) -> Option<usize> {
        (1..=limit).find(|_| round(judge, true) == [(GW, Change::Up)])
    }

    fn take_down(judge: &mut Judge) {
        for _ in 0..2 {
            assert!(round(judge, false).is_empty());
        }
        assert_eq!(round(judge, false), [(GW, Change::Down(Cause::Unanswered))]);
    }

    /// A gateway that goes down again soon after it came back needs twice as many answers
    /// in a row each time (up to 64 times the multiplier); staying up `FLAP_ROUNDS` forgives
    /// it.
    #[test]
    fn a_flapping_gateway_needs_ever_more_answers_to_come_back() {
        let mut judge = Judge::new(3, 0);
        judge.retain([(GW, false)]);
        assert!(round(&mut judge, true).is_empty());
        let mut needed = Vec::new();
        for _ in 0..8 {
            take_down(&mut judge);
            needed.push(rounds_to_come_back(&mut judge, 1000).unwrap());
        }
        assert_eq!(needed, [3, 6, 12, 24, 48, 96, 192, 192]);
        for _ in 0..FLAP_ROUNDS {
            assert!(round(&mut judge, true).is_empty());
        }
        take_down(&mut judge);
        assert_eq!(rounds_to_come_back(&mut judge, 1000), Some(3));
    }

    /// Probes whose answers arrive only when they ask for the TC program (the XDP
    /// responder's answers are lost on their way back), from `next_probe` on for `probes`.
    fn only_tc_answers(judge: &mut Judge, probes: usize) -> Vec<u8> {
        let mut paths = Vec::new();
        for _ in 0..probes {
            let (seq, path) = probe(judge);
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
        let (seq, path) = probe(&mut judge);
        assert_eq!(path, PROBE_VIA_TC);
        judge.replied(GW, seq, true);
        assert!(
            round(&mut judge, true).is_empty(),
            "for any responder, answered"
        );
        assert!(round(&mut judge, false).is_empty());
        assert_eq!(probe(&mut judge).1, PROBE_VIA_TC);
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
        assert_eq!(probe(&mut judge).1, PROBE_VIA_ANY);
    }

    /// One round with what the traffic showed; whether a probe went, and the changes.
    fn quiet_round(
        judge: &mut Judge,
        traffic: Traffic,
        answered: bool,
    ) -> (bool, Vec<(Ipv4Addr, Change)>) {
        let probe = judge.next_probe(GW, traffic);
        if let Some((seq, _)) = probe
            && answered
        {
            judge.replied(GW, seq, true);
        }
        (probe.is_some(), judge.judge())
    }

    /// Demand mode: a gateway whose replies keep reaching the pods, or that no traffic
    /// goes to, is probed every `quiet_rounds` rounds; a newcomer, a down gateway and one
    /// that missed its last probe are probed every round.
    #[test]
    fn a_quiet_gateway_is_probed_every_quiet_rounds_only() {
        let mut judge = Judge::new(3, 0).with_quiet_rounds(4);
        judge.retain([(GW, false)]);
        assert_eq!(
            quiet_round(&mut judge, Traffic::Idle, false),
            (true, vec![]),
            "never heard: probed"
        );
        assert!(quiet_round(&mut judge, Traffic::Idle, true).0);
        for traffic in [Traffic::Answered, Traffic::Idle] {
            let probed: Vec<bool> = (0..8)
                .map(|_| quiet_round(&mut judge, traffic, true).0)
                .collect();
            assert_eq!(
                probed,
                [false, false, false, true, false, false, false, true],
                "{traffic:?}"
            );
        }
        // A lost probe: every round from then on, down after three, probed while down.
        for _ in 0..3 {
            assert_eq!(
                quiet_round(&mut judge, Traffic::Idle, false),
                (false, vec![])
            );
        }
        let (probed, changes) = quiet_round(&mut judge, Traffic::Idle, false);
        assert!(probed);
        assert!(changes.is_empty(), "first loss");
        assert!(quiet_round(&mut judge, Traffic::Idle, false).0);
        assert_eq!(
            quiet_round(&mut judge, Traffic::Answered, false),
            (true, vec![(GW, Change::Down(Cause::Unanswered))])
        );
        assert!(
            quiet_round(&mut judge, Traffic::Answered, false).0,
            "down: probed"
        );
        for _ in 0..2 {
            assert_eq!(
                quiet_round(&mut judge, Traffic::Answered, true),
                (true, vec![])
            );
        }
        assert_eq!(
            quiet_round(&mut judge, Traffic::Answered, true),
            (true, vec![(GW, Change::Up)])
        );
        assert!(!quiet_round(&mut judge, Traffic::Answered, true).0);
    }

    /// Traffic that stops getting replies brings back a probe every round: the gateway is
    /// down `multiplier` rounds later. A slow reply (a server thinking) costs probes, never
    /// a verdict.
    #[test]
    fn traffic_without_replies_brings_back_a_probe_every_round() {
        let mut judge = Judge::new(3, 0).with_quiet_rounds(20);
        judge.retain([(GW, false)]);
        assert!(
            quiet_round(&mut judge, Traffic::Answered, true)
                .1
                .is_empty()
        );
        assert_eq!(
            quiet_round(&mut judge, Traffic::Answered, true),
            (false, vec![])
        );
        for _ in 0..10 {
            assert_eq!(
                quiet_round(&mut judge, Traffic::Unanswered, true),
                (true, vec![])
            );
        }
        for _ in 0..2 {
            assert_eq!(
                quiet_round(&mut judge, Traffic::Unanswered, false),
                (true, vec![])
            );
        }
        assert_eq!(
            quiet_round(&mut judge, Traffic::Unanswered, false),
            (true, vec![(GW, Change::Down(Cause::Unanswered))])
        );
        assert!(!judge.is_answering(GW));
        // Answering again: a standby hands a floating IP back at once, new flows wait for
        // the hold-down.
        assert_eq!(
            quiet_round(&mut judge, Traffic::Unanswered, true),
            (true, vec![])
        );
        assert!(judge.is_answering(GW));
        assert!(judge.is_down(GW));
    }
}
