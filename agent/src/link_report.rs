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
use std::collections::{HashMap, HashSet};
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

/// One link as the reporter keeps it.
#[derive(Debug)]
struct Link {
    peer: String,
    /// The latest sample (none yet for a netmap peer the source has not
    /// reported).
    latest: Option<LinkSample>,
    /// What the current session last sent of it.
    sent: Option<LinkSample>,
    /// `latest` differs materially from `sent` (or was never sent).
    dirty: bool,
    /// The link is in [`LinkReporter::dirty`] (every dirty link is; one that
    /// stopped being dirty stays until the next message looks).
    listed: bool,
    /// ...and the difference is urgent ([`LinkSample::is_urgent`]).
    urgent: bool,
}

impl Link {
    fn new(peer: String) -> Self {
        Self {
            peer,
            latest: None,
            sent: None,
            dirty: false,
            listed: false,
            urgent: false,
        }
    }
}

/// The latest sample of each link and what the current session last sent; see
/// the module doc for the call contract. Lives across sessions, so a reconnect
/// starts from the samples already known.
///
/// Whether a link must be sent, and at once, is decided when its sample
/// changes, and the links due are listed: a tick costs one hash look-up per
/// sample the source reports and a message costs the links in it, nothing per
/// link that did not change, so an agent with thousands of peers reports as
/// cheaply as one with a few.
#[derive(Debug)]
pub struct LinkReporter {
    mode: ReportMode,
    /// The links, in no order.
    links: Vec<Link>,
    /// Peer name → its link's place in `links`.
    index: HashMap<String, usize>,
    /// Links are kept only for the netmap's peers (one was handled); samples
    /// of others are ignored (the source may lag behind the netmap).
    netmap_known: bool,
    /// The places of the links with `dirty` set, and how many of them have
    /// `urgent` set.
    dirty: Vec<usize>,
    urgent: usize,
    /// Since when drift has been waiting to be sent, if it is.
    drift_since: Option<Instant>,
    /// The next message is a full report (a session just started).
    full_due: bool,
}

impl LinkReporter {
    pub fn new(mode: ReportMode) -> Self {
        Self {
            mode,
            links: Vec::new(),
            index: HashMap::new(),
            netmap_known: false,
            dirty: Vec::new(),
            urgent: 0,
            drift_since: None,
            full_due: true,
        }
    }

    /// Takes a report of the source: each sample in it replaces that link's
    /// sample; links it leaves out keep theirs. Samples of peers not in the
    /// netmap last handled are ignored.
    pub fn observe(&mut self, report: LinkReport) {
        for sample in report.links {
            let at = match self.index.get(sample.peer.as_str()) {
                Some(&at) => at,
                None if self.netmap_known => continue,
                None => self.add(sample.peer.clone()),
            };
            let link = &mut self.links[at];
            if link.latest.as_ref() == Some(&sample) {
                continue;
            }
            let (dirty, urgent) = match &link.sent {
                None => (true, true),
                Some(sent) => (sample.differs_materially(sent), sample.is_urgent(sent)),
            };
            link.latest = Some(sample);
            if dirty && !link.listed {
                link.listed = true;
                self.dirty.push(at);
            }
            let urgent = dirty && urgent;
            self.urgent = self.urgent + usize::from(urgent) - usize::from(link.urgent);
            link.dirty = dirty;
            link.urgent = urgent;
        }
    }

    /// A full netmap: its peers are now the only ones whose links are kept
    /// and reported.
    pub fn handle_netmap(&mut self, map: &NetMap) {
        let peers: HashSet<&str> = map.peers.iter().map(|p| p.name.as_str()).collect();
        let before = self.links.len();
        self.links.retain(|link| peers.contains(link.peer.as_str()));
        if self.links.len() != before {
            self.index.clear();
            for (at, link) in self.links.iter().enumerate() {
                self.index.insert(link.peer.clone(), at);
            }
            self.relist_dirty();
        }
        for peer in &map.peers {
            if !self.index.contains_key(&peer.name) {
                self.add(peer.name.clone());
            }
        }
        self.netmap_known = true;
    }

    /// A netmap update: removed peers' links are forgotten, added peers'
    /// samples are taken from now on.
    pub fn handle_update(&mut self, update: &NetMapUpdate) {
        let before = self.links.len();
        for name in &update.remove {
            if let Some(at) = self.index.remove(name) {
                self.links.swap_remove(at);
                if let Some(moved) = self.links.get(at) {
                    if let Some(place) = self.index.get_mut(moved.peer.as_str()) {
                        *place = at;
                    }
                }
            }
        }
        if self.links.len() != before {
            self.relist_dirty();
        }
        if self.netmap_known {
            for peer in &update.upsert {
                if !self.index.contains_key(&peer.name) {
                    self.add(peer.name.clone());
                }
            }
        }
    }

    /// A session opened: it has been told nothing, so the next message is a
    /// full report.
    pub fn session_started(&mut self) {
        for link in &mut self.links {
            link.sent = None;
        }
        self.full_due = true;
    }

    /// What to send at `now`, remembering it as what this session was told:
    /// the full report first in a session (and always in
    /// [`ReportMode::Whole`]); afterwards the links whose latest sample
    /// differs materially from what was sent (new links included), when one
    /// of them is urgent or drift has waited [`DRIFT_DELAY`]; else `None`.
    /// Links are in peer-name order.
    pub fn next_message(&mut self, now: Instant) -> Option<AgentMessage> {
        if self.full_due || self.mode == ReportMode::Whole {
            self.full_due = false;
            self.drift_since = None;
            let all: Vec<usize> = (0..self.links.len()).collect();
            let links = self.take(all);
            return Some(AgentMessage::Links(LinkReport { links }));
        }
        let links = &mut self.links;
        self.dirty.retain(|&at| {
            let link = &mut links[at];
            link.listed = link.dirty;
            link.dirty
        });
        if self.dirty.is_empty() {
            self.drift_since = None;
            return None;
        }
        if self.urgent == 0 {
            let since = *self.drift_since.get_or_insert(now);
            if now.saturating_duration_since(since) < DRIFT_DELAY {
                return None;
            }
        }
        self.drift_since = None;
        let due = std::mem::take(&mut self.dirty);
        let changed = self.take(due);
        Some(AgentMessage::LinkChanges(LinkChanges { changed }))
    }

    /// The latest samples of the links at `places` (every dirty link among
    /// them), sorted by peer, now remembered as sent; no link is dirty
    /// afterwards.
    fn take(&mut self, places: Vec<usize>) -> Vec<LinkSample> {
        let mut out = Vec::with_capacity(places.len());
        for at in places {
            let link = &mut self.links[at];
            if let Some(latest) = &link.latest {
                remember_sent(&mut link.sent, latest);
                out.push(latest.clone());
            }
            link.dirty = false;
            link.listed = false;
            link.urgent = false;
        }
        self.dirty.clear();
        self.urgent = 0;
        out.sort_unstable_by(|a, b| a.peer.cmp(&b.peer));
        out
    }

    /// Adds a link with no sample yet; returns its place.
    fn add(&mut self, peer: String) -> usize {
        let at = self.links.len();
        self.index.insert(peer.clone(), at);
        self.links.push(Link::new(peer));
        at
    }

    /// Lists the dirty links again and counts the urgent ones, after links
    /// were removed (rare: a peer left the mesh) and others moved.
    fn relist_dirty(&mut self) {
        self.dirty.clear();
        self.urgent = 0;
        for (at, link) in self.links.iter_mut().enumerate() {
            link.listed = link.dirty;
            if link.dirty {
                self.dirty.push(at);
                self.urgent += usize::from(link.urgent);
            }
        }
    }
}

/// `sent = latest`, reusing the name already held (the destructuring makes a
/// new field of [`LinkSample`] a compile error here, not a stale copy).
fn remember_sent(sent: &mut Option<LinkSample>, latest: &LinkSample) {
    let LinkSample {
        peer,
        up,
        rtt_us,
        jitter_us,
        loss_ppm,
    } = latest;
    match sent {
        Some(s) if s.peer == *peer => {
            s.up = *up;
            s.rtt_us = *rtt_us;
            s.jitter_us = *jitter_us;
            s.loss_ppm = *loss_ppm;
        }
        _ => *sent = Some(latest.clone()),
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
    /// What the reporter must send, decided from scratch on every call from all
    /// links (the specification the counting reporter implements).
    #[derive(Default)]
    struct Reference {
        latest: std::collections::BTreeMap<String, LinkSample>,
        sent: std::collections::BTreeMap<String, LinkSample>,
        peers: Option<std::collections::BTreeSet<String>>,
        drift_since: Option<Instant>,
        full_due: bool,
    }

    impl Reference {
        fn observe(&mut self, links: &[LinkSample]) {
            for l in links {
                if self.peers.as_ref().is_none_or(|p| p.contains(&l.peer)) {
                    self.latest.insert(l.peer.clone(), l.clone());
                }
            }
        }

        fn netmap(&mut self, names: &[&str]) {
            let peers: std::collections::BTreeSet<String> =
                names.iter().map(|n| n.to_string()).collect();
            self.latest.retain(|p, _| peers.contains(p));
            self.sent.retain(|p, _| peers.contains(p));
            self.peers = Some(peers);
        }

        fn update(&mut self, upsert: &[&str], remove: &[&str]) {
            for n in remove {
                self.latest.remove(*n);
                self.sent.remove(*n);
                if let Some(p) = &mut self.peers {
                    p.remove(*n);
                }
            }
            if let Some(p) = &mut self.peers {
                p.extend(upsert.iter().map(|n| n.to_string()));
            }
        }

        fn next_message(&mut self, now: Instant) -> Option<AgentMessage> {
            if std::mem::take(&mut self.full_due) {
                self.drift_since = None;
                self.sent = self.latest.clone();
                return Some(AgentMessage::Links(LinkReport {
                    links: self.latest.values().cloned().collect(),
                }));
            }
            let due: Vec<LinkSample> = self
                .latest
                .values()
                .filter(|l| {
                    self.sent
                        .get(&l.peer)
                        .is_none_or(|s| l.differs_materially(s))
                })
                .cloned()
                .collect();
            if due.is_empty() {
                self.drift_since = None;
                return None;
            }
            let urgent = due
                .iter()
                .any(|l| self.sent.get(&l.peer).is_none_or(|s| l.is_urgent(s)));
            if !urgent && now - *self.drift_since.get_or_insert(now) < DRIFT_DELAY {
                return None;
            }
            self.drift_since = None;
            for l in &due {
                self.sent.insert(l.peer.clone(), l.clone());
            }
            Some(AgentMessage::LinkChanges(LinkChanges { changed: due }))
        }
    }

    /// The reporter decides what is due as samples arrive and counts it; after
    /// any sequence of reports, netmaps, updates and sessions it must send
    /// exactly what deciding from scratch over every link sends.
    #[test]
    fn counting_what_is_due_agrees_with_deciding_from_scratch() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        const PEERS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
        let mut messages = 0usize;
        for seed in 0..300u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut r = LinkReporter::new(ReportMode::Changes);
            let mut reference = Reference {
                full_due: true,
                ..Reference::default()
            };
            let mut now = t0();
            for step in 0..150 {
                match rng.gen_range(0..100) {
                    0..=59 => {
                        let n = rng.gen_range(0..4);
                        let links: Vec<LinkSample> = (0..n)
                            .map(|_| {
                                // Few values, so moves cross both thresholds and repeat.
                                let rtt = [50_000, 50_400, 51_500, 53_000, 60_000];
                                let mut l = s(
                                    PEERS[rng.gen_range(0..PEERS.len())],
                                    rng.gen_bool(0.9),
                                    rtt[rng.gen_range(0..rtt.len())],
                                );
                                l.loss_ppm = [0, 0, 0, 6_000][rng.gen_range(0..4)];
                                l
                            })
                            .collect();
                        reference.observe(&links);
                        r.observe(report(&links));
                    }
                    60..=64 => {
                        let names: Vec<&str> = PEERS
                            .iter()
                            .copied()
                            .filter(|_| rng.gen_bool(0.7))
                            .collect();
                        reference.netmap(&names);
                        r.handle_netmap(&netmap(&names));
                    }
                    65..=72 => {
                        let pick = |rng: &mut StdRng| PEERS[rng.gen_range(0..PEERS.len())];
                        let (up, gone) = (pick(&mut rng), pick(&mut rng));
                        let remove: Vec<&str> = if up == gone { vec![] } else { vec![gone] };
                        reference.update(&[up], &remove);
                        r.handle_update(&NetMapUpdate {
                            seq: step,
                            node: None,
                            upsert: vec![spec(up, 1)],
                            remove: remove.iter().map(|n| n.to_string()).collect(),
                            paths: None,
                            path_changes: Vec::new(),
                        });
                    }
                    73..=75 => {
                        reference.full_due = true;
                        r.session_started();
                    }
                    _ => {
                        now += Duration::from_millis(rng.gen_range(0..2_500));
                        let want = reference.next_message(now);
                        messages += usize::from(want.is_some());
                        assert_eq!(r.next_message(now), want, "seed {seed}, step {step}");
                    }
                }
            }
        }
        assert!(messages > 3_000, "only {messages} messages compared");
    }
}
