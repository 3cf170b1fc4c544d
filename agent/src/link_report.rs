//! What the agent tells the controller about its links, and when: the latest
//! sample of each link, and per control session what that session was last
//! told, so that after one full report only material changes
//! ([`LinkSample::differs_materially`], the rule the controller shares) go out.
//!
//! When they go out: an urgent change ([`LinkSample::is_urgent`]: up, down,
//! loss, a new link, or an RTT move big enough to switch a path alone) at the
//! next tick, together with whatever else is pending. Drift (smaller material
//! RTT moves) is gathered for up to [`DRIFT_DELAY`] and sent in one message.
//! Drift only refines costs that the engine's hysteresis holds steady for
//! its hold time (5 s by default), so the delay postpones no failover and at
//! most delays a switch made for a better RTT by as long; in exchange a fabric
//! whose RTTs wobble sends one message per agent every few seconds instead of
//! every second, and the controller's cost per message is fixed (QUIC receive,
//! decryption, ACK, wake-ups) whatever it carries.
//!
//! Sans-IO: the session driver in [`crate::control`] feeds it samples, the
//! time and the netmaps it receives, and writes the messages it returns. It
//! owns no socket, no clock and no task, and must not learn of any.
//!
//! Call contract:
//! - [`observe`](LinkReporter::observe) each report of the source. A report may
//!   leave out links that have not changed; they keep their last sample.
//! - [`handle_netmap`](LinkReporter::handle_netmap) /
//!   [`handle_update`](LinkReporter::handle_update) each netmap and update the
//!   controller sends, before the daemon applies it: links of peers that left
//!   the netmap are forgotten, and samples of them ignored until they return.
//! - [`session_started`](LinkReporter::session_started) when a session opens;
//!   then [`next_message`](LinkReporter::next_message) after each observation,
//!   sending what it returns.

use skymesh_wire::control::{AgentMessage, NetMapUpdate, CAPABILITY};
use skymesh_wire::{LinkChanges, LinkReport, LinkSample, NetMap};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

/// The longest a material but not urgent change (drift) waits to be sent:
/// the path engine's default hold, see the module doc.
pub const DRIFT_DELAY: Duration = Duration::from_secs(5);

/// What the controller takes from this agent after the first full report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportMode {
    /// [`AgentMessage::LinkChanges`] of the material changes only (agents of
    /// [`CAPABILITY`] 1 or more).
    Changes,
    /// The whole [`AgentMessage::Links`] report every time (capability 0: the
    /// controller refuses `LinkChanges` from such an agent).
    Whole,
}

impl ReportMode {
    /// The mode an agent announcing `capability` in its `Register` must use.
    pub fn for_capability(capability: u32) -> Self {
        if capability >= CAPABILITY {
            ReportMode::Changes
        } else {
            ReportMode::Whole
        }
    }
}

/// The latest sample of each link and what the current session last sent; see
/// the module doc for the call contract. Lives across sessions, so a reconnect
/// starts from the samples already known.
#[derive(Debug)]
pub struct LinkReporter {
    mode: ReportMode,
    /// The latest sample of each link, by peer name (sorted: full reports are
    /// deterministic).
    latest: BTreeMap<String, LinkSample>,
    /// What the current session last sent of each link.
    sent: HashMap<String, LinkSample>,
    /// Peers whose latest sample changed since it was last sent (or found
    /// immaterial); only these are compared, so a tick where the source
    /// reports little costs little.
    dirty: BTreeSet<String>,
    /// Since when drift has been waiting to be sent, if it is.
    drift_since: Option<Instant>,
    /// The next message is a full report (a session just started).
    full_due: bool,
    /// The netmap's peers, once one was handled; samples of others are
    /// ignored (the source may lag behind the netmap for a moment).
    peers: Option<HashSet<String>>,
}

impl LinkReporter {
    pub fn new(mode: ReportMode) -> Self {
        Self {
            mode,
            latest: BTreeMap::new(),
            sent: HashMap::new(),
            dirty: BTreeSet::new(),
            drift_since: None,
            full_due: true,
            peers: None,
        }
    }

    /// Takes a report of the source: each sample in it replaces that link's
    /// sample; links it leaves out keep theirs. Samples of peers not in the
    /// netmap last handled are ignored.
    pub fn observe(&mut self, report: LinkReport) {
        for sample in report.links {
            if let Some(peers) = &self.peers {
                if !peers.contains(&sample.peer) {
                    continue;
                }
            }
            if self.latest.get(&sample.peer) == Some(&sample) {
                continue;
            }
            self.dirty.insert(sample.peer.clone());
            self.latest.insert(sample.peer.clone(), sample);
        }
    }

    /// A full netmap: its peers are now the only ones whose links are kept
    /// and reported.
    pub fn handle_netmap(&mut self, map: &NetMap) {
        let peers: HashSet<String> = map.peers.iter().map(|p| p.name.clone()).collect();
        self.latest.retain(|peer, _| peers.contains(peer));
        self.sent.retain(|peer, _| peers.contains(peer));
        self.dirty.retain(|peer| peers.contains(peer));
        self.peers = Some(peers);
    }

    /// A netmap update: removed peers' links are forgotten, added peers'
    /// samples are taken from now on.
    pub fn handle_update(&mut self, update: &NetMapUpdate) {
        for name in &update.remove {
            self.latest.remove(name);
            self.sent.remove(name);
            self.dirty.remove(name);
            if let Some(peers) = &mut self.peers {
                peers.remove(name);
            }
        }
        if let Some(peers) = &mut self.peers {
            peers.extend(update.upsert.iter().map(|p| p.name.clone()));
        }
    }

    /// A session opened: it has been told nothing, so the next message is a
    /// full report.
    pub fn session_started(&mut self) {
        self.sent.clear();
        self.full_due = true;
    }

    /// What to send at `now`, remembering it as what this session was told:
    /// the full report first in a session (and always in
    /// [`ReportMode::Whole`]); afterwards the links whose latest sample
    /// differs materially from what was sent (new links included), when one
    /// of them is urgent or drift has waited [`DRIFT_DELAY`]; else `None`.
    pub fn next_message(&mut self, now: Instant) -> Option<AgentMessage> {
        if self.full_due || self.mode == ReportMode::Whole {
            self.full_due = false;
            self.dirty.clear();
            self.drift_since = None;
            self.sent = self
                .latest
                .iter()
                .map(|(peer, s)| (peer.clone(), s.clone()))
                .collect();
            return Some(AgentMessage::Links(LinkReport {
                links: self.latest.values().cloned().collect(),
            }));
        }
        let mut urgent = false;
        let (latest, sent) = (&self.latest, &self.sent);
        // Links that are no longer material (or gone) leave the dirty set;
        // material ones stay in it until they are sent.
        self.dirty.retain(|peer| {
            let Some(latest) = latest.get(peer) else {
                return false;
            };
            match sent.get(peer) {
                None => {
                    urgent = true;
                    true
                }
                Some(sent) => {
                    urgent |= latest.is_urgent(sent);
                    latest.differs_materially(sent)
                }
            }
        });
        if self.dirty.is_empty() {
            self.drift_since = None;
            return None;
        }
        if !urgent {
            let since = *self.drift_since.get_or_insert(now);
            if now.saturating_duration_since(since) < DRIFT_DELAY {
                return None;
            }
        }
        self.drift_since = None;
        let mut changed = Vec::with_capacity(self.dirty.len());
        for peer in std::mem::take(&mut self.dirty) {
            if let Some(latest) = self.latest.get(&peer) {
                changed.push(latest.clone());
                self.sent.insert(peer, latest.clone());
            }
        }
        Some(AgentMessage::LinkChanges(LinkChanges { changed }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_wire::{PeerSpec, PublicKey, PROTOCOL_VERSION};

    fn s(peer: &str, up: bool, rtt_us: u32) -> LinkSample {
        LinkSample {
            peer: peer.into(),
            up,
            rtt_us,
            jitter_us: 300,
            loss_ppm: 0,
        }
    }

    /// The time of every call in tests that do not wait for drift.
    fn t0() -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    fn report(links: &[LinkSample]) -> LinkReport {
        LinkReport {
            links: links.to_vec(),
        }
    }

    fn full(msg: Option<AgentMessage>) -> Vec<LinkSample> {
        match msg {
            Some(AgentMessage::Links(r)) => r.links,
            other => panic!("expected a full report, got {other:?}"),
        }
    }

    fn changes(msg: Option<AgentMessage>) -> Vec<LinkSample> {
        match msg {
            Some(AgentMessage::LinkChanges(c)) => c.changed,
            other => panic!("expected link changes, got {other:?}"),
        }
    }

    fn spec(name: &str, key: u8) -> PeerSpec {
        PeerSpec {
            name: name.into(),
            public_key: PublicKey::from_bytes([key; 32]),
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
        }
    }

    fn netmap(names: &[&str]) -> NetMap {
        NetMap {
            version: PROTOCOL_VERSION,
            address: "100.96.0.1/32".parse().expect("cidr"),
            mtu: 1420,
            peers: names
                .iter()
                .enumerate()
                .map(|(i, n)| spec(n, i as u8 + 1))
                .collect(),
            transit: false,
            paths: Vec::new(),
        }
    }

    /// A reporter in a session that has sent its first full report of `links`.
    fn reporting(links: &[LinkSample]) -> LinkReporter {
        let mut r = LinkReporter::new(ReportMode::Changes);
        r.observe(report(links));
        r.session_started();
        full(r.next_message(t0()));
        r
    }

    #[test]
    fn the_first_message_of_a_session_is_the_full_report_sorted_by_peer() {
        let mut r = LinkReporter::new(ReportMode::Changes);
        r.observe(report(&[s("gcp", true, 20_000), s("aws", true, 10_000)]));
        r.session_started();
        assert_eq!(
            full(r.next_message(t0())),
            vec![s("aws", true, 10_000), s("gcp", true, 20_000)]
        );
        // Nothing new: nothing to send.
        assert_eq!(r.next_message(t0()), None);
        // A session starts with a full report even when no link is known yet.
        let mut empty = LinkReporter::new(ReportMode::Changes);
        empty.session_started();
        assert_eq!(full(empty.next_message(t0())), Vec::new());
    }

    #[test]
    fn jitter_below_the_threshold_sends_nothing() {
        let mut r = reporting(&[s("aws", true, 100_000)]);
        // 2% of the RTT, and jitter alone: not material.
        let mut jittery = s("aws", true, 102_000);
        jittery.jitter_us = 40_000;
        r.observe(report(&[jittery]));
        assert_eq!(r.next_message(t0()), None);
        // Drift is measured from what was sent, not the previous sample: two
        // 2% moves make a material 4% one, sent once it has waited.
        r.observe(report(&[s("aws", true, 104_000)]));
        assert_eq!(r.next_message(t0()), None);
        assert_eq!(
            changes(r.next_message(t0() + DRIFT_DELAY)),
            vec![s("aws", true, 104_000)]
        );
    }

    #[test]
    fn drift_waits_and_goes_with_the_next_urgent_change() {
        let at = |secs: u64| t0() + Duration::from_secs(secs);
        let mut r = reporting(&[
            s("aws", true, 100_000),
            s("azure", true, 70_000),
            s("gcp", true, 50_000),
        ]);
        // 4%: material but not urgent; it waits DRIFT_DELAY from when it was
        // first seen, whatever else is observed meanwhile.
        r.observe(report(&[s("aws", true, 104_000)]));
        assert_eq!(r.next_message(at(0)), None);
        r.observe(report(&[s("aws", true, 104_100)]));
        assert_eq!(r.next_message(at(4)), None);
        assert_eq!(
            changes(r.next_message(at(5))),
            vec![s("aws", true, 104_100)]
        );
        assert_eq!(r.next_message(at(11)), None, "sent twice");

        // Pending drift goes out with an urgent change, at once.
        r.observe(report(&[s("gcp", true, 52_000)]));
        assert_eq!(r.next_message(at(12)), None);
        r.observe(report(&[s("azure", false, 70_000)]));
        assert_eq!(
            changes(r.next_message(at(13))),
            vec![s("azure", false, 70_000), s("gcp", true, 52_000)]
        );

        // Drift that settles back under the threshold before it is sent is
        // not sent, and the wait starts again for the next drift.
        r.observe(report(&[s("aws", true, 108_000)]));
        assert_eq!(r.next_message(at(14)), None);
        r.observe(report(&[s("aws", true, 104_500)]));
        assert_eq!(r.next_message(at(20)), None);
        r.observe(report(&[s("aws", true, 108_000)]));
        assert_eq!(r.next_message(at(21)), None);
        assert_eq!(r.next_message(at(25)), None);
        assert_eq!(
            changes(r.next_message(at(26))),
            vec![s("aws", true, 108_000)]
        );

        // An RTT move big enough to switch a path alone does not wait.
        r.observe(report(&[s("gcp", true, 60_000)]));
        assert_eq!(
            changes(r.next_message(at(27))),
            vec![s("gcp", true, 60_000)]
        );
    }

    #[test]
    fn a_big_rtt_move_a_down_and_a_new_peer_are_sent_at_once_and_once_each() {
        let mut r = reporting(&[s("aws", true, 100_000), s("gcp", true, 50_000)]);
        r.observe(report(&[s("aws", true, 120_000)]));
        assert_eq!(changes(r.next_message(t0())), vec![s("aws", true, 120_000)]);
        r.observe(report(&[s("aws", true, 120_000)]));
        assert_eq!(r.next_message(t0()), None, "sent twice");

        r.observe(report(&[s("gcp", false, 50_000)]));
        assert_eq!(changes(r.next_message(t0())), vec![s("gcp", false, 50_000)]);
        r.observe(report(&[s("gcp", false, 50_000)]));
        assert_eq!(r.next_message(t0()), None, "sent twice");

        r.observe(report(&[s("azure", true, 30_000)]));
        assert_eq!(
            changes(r.next_message(t0())),
            vec![s("azure", true, 30_000)]
        );
        r.observe(report(&[s("azure", true, 30_100)]));
        assert_eq!(r.next_message(t0()), None, "sent twice");
    }

    #[test]
    fn a_new_session_repeats_everything_in_its_full_report() {
        let mut r = reporting(&[s("aws", true, 100_000)]);
        r.observe(report(&[s("gcp", true, 50_000)]));
        changes(r.next_message(t0()));
        // Below the threshold: not sent in this session...
        r.observe(report(&[s("aws", true, 101_000)]));
        assert_eq!(r.next_message(t0()), None);
        // ...but the next session is told the latest of every link.
        r.session_started();
        assert_eq!(
            full(r.next_message(t0())),
            vec![s("aws", true, 101_000), s("gcp", true, 50_000)]
        );
        // And compares with what it sent, not what the old session sent.
        r.observe(report(&[s("aws", true, 102_500)]));
        assert_eq!(r.next_message(t0()), None);
    }

    #[test]
    fn links_left_out_of_a_report_keep_their_sample() {
        let mut r = reporting(&[s("aws", true, 100_000), s("gcp", false, 50_000)]);
        r.observe(report(&[s("aws", true, 200_000)]));
        assert_eq!(changes(r.next_message(t0())), vec![s("aws", true, 200_000)]);
        r.observe(report(&[]));
        assert_eq!(r.next_message(t0()), None);
        r.session_started();
        assert_eq!(
            full(r.next_message(t0())),
            vec![s("aws", true, 200_000), s("gcp", false, 50_000)]
        );
    }

    #[test]
    fn links_of_peers_that_left_the_netmap_are_forgotten() {
        let mut r = reporting(&[
            s("aws", true, 100_000),
            s("gcp", true, 50_000),
            s("azure", true, 70_000),
        ]);
        r.handle_netmap(&netmap(&["aws", "azure"]));
        // A source lagging behind the netmap does not bring gcp back.
        r.observe(report(&[s("gcp", false, 50_000)]));
        assert_eq!(r.next_message(t0()), None);
        r.handle_update(&NetMapUpdate {
            seq: 2,
            node: None,
            upsert: vec![spec("oci", 9)],
            remove: vec!["azure".into()],
            paths: None,
            path_changes: Vec::new(),
        });
        r.observe(report(&[s("azure", false, 1), s("oci", true, 40_000)]));
        assert_eq!(changes(r.next_message(t0())), vec![s("oci", true, 40_000)]);
        r.session_started();
        assert_eq!(
            full(r.next_message(t0())),
            vec![s("aws", true, 100_000), s("oci", true, 40_000)]
        );
        // A peer that comes back is new again: its first sample is sent.
        r.handle_netmap(&netmap(&["aws", "oci", "gcp"]));
        r.observe(report(&[s("gcp", true, 50_000)]));
        assert_eq!(changes(r.next_message(t0())), vec![s("gcp", true, 50_000)]);
    }

    #[test]
    fn an_agent_without_the_capability_sends_the_whole_report_every_time() {
        assert_eq!(ReportMode::for_capability(0), ReportMode::Whole);
        assert_eq!(ReportMode::for_capability(CAPABILITY), ReportMode::Changes);
        let mut r = LinkReporter::new(ReportMode::Whole);
        r.observe(report(&[s("aws", true, 100_000), s("gcp", true, 50_000)]));
        r.session_started();
        full(r.next_message(t0()));
        r.observe(report(&[s("aws", true, 100_001)]));
        assert_eq!(
            full(r.next_message(t0())),
            vec![s("aws", true, 100_001), s("gcp", true, 50_000)]
        );
        assert_eq!(full(r.next_message(t0())).len(), 2);
    }
}
