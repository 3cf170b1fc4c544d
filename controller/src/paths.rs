//! Path choice: from the link reports agents send, which way each pair of nodes
//! sends traffic to the other (direct, or through one transit node), and which
//! path each end falls back to on its own when the first one fails.
//!
//! Sans-IO: the control server feeds membership ([`PathEngine::set_nodes`]),
//! reports, operator overrides and the time, calls [`PathEngine::recompute`]
//! about once a second and pushes the path lists of the nodes it names. This
//! module must not persist anything (the caller stores overrides and replays
//! them with [`PathEngine::set_override`]), send anything or read the clock.
//!
//! One decision is made per unordered pair, so both ends always name the same
//! via. A usable primary is only replaced by a path that has been clearly cheaper
//! for a while (hysteresis), so measurement noise does not make paths flap; an
//! unusable primary is replaced at once. Costs are in milliseconds:
//! `rtt + loss% x loss_penalty_ms + weight` per link, plus `transit_penalty_ms`
//! per transit hop.

use serde::{Deserialize, Serialize};
use skymesh_wire::{LinkReport, LinkSample, PathSpec, Via};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// How paths are chosen. Check it once with [`PathConfig::validate`] when loading.
#[derive(Debug, Clone, PartialEq)]
pub struct PathConfig {
    /// Cost added per percentage point of loss, in ms. Default 10.
    pub loss_penalty_ms: f64,
    /// Cost added per transit hop, in ms, so that direct wins ties. Default 1.
    pub transit_penalty_ms: f64,
    /// A usable primary is replaced only by a path cheaper by at least this
    /// fraction of the primary's cost... Default 0.10.
    pub switch_ratio: f64,
    /// ...and by at least this much... Default 5 ms.
    pub switch_min: Duration,
    /// ...continuously for this long. Default 5 s.
    pub hold: Duration,
    /// A side's report older than this is ignored. Default 5 s.
    pub stale_after: Duration,
    /// Per-link costs from the configuration (e.g. egress price expressed in ms).
    pub weights: Vec<LinkWeight>,
}

impl Default for PathConfig {
    fn default() -> Self {
        Self {
            loss_penalty_ms: 10.0,
            transit_penalty_ms: 1.0,
            switch_ratio: 0.10,
            switch_min: Duration::from_millis(5),
            hold: Duration::from_secs(5),
            stale_after: Duration::from_secs(5),
            weights: Vec::new(),
        }
    }
}

impl PathConfig {
    /// Rejects values that would make costs negative or hysteresis meaningless.
    pub fn validate(&self) -> Result<(), PathConfigError> {
        for (field, value) in [
            ("loss_penalty_ms", self.loss_penalty_ms),
            ("transit_penalty_ms", self.transit_penalty_ms),
        ] {
            if !is_cost(value) {
                return Err(PathConfigError::NotACost { field, value });
            }
        }
        if !(0.0..1.0).contains(&self.switch_ratio) {
            return Err(PathConfigError::SwitchRatio(self.switch_ratio));
        }
        let mut seen: PairMap<f64> = PairMap::default();
        for w in &self.weights {
            if w.a == w.b {
                return Err(PathConfigError::SelfLink(w.a.clone()));
            }
            if !is_cost(w.weight_ms) {
                return Err(PathConfigError::Weight {
                    a: w.a.clone(),
                    b: w.b.clone(),
                    value: w.weight_ms,
                });
            }
            if let Some(first) = seen.insert(&w.a, &w.b, w.weight_ms) {
                return Err(PathConfigError::DuplicateWeight {
                    a: w.a.clone(),
                    b: w.b.clone(),
                    first,
                    second: w.weight_ms,
                });
            }
        }
        Ok(())
    }
}

/// A configured cost added to one link, in either direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkWeight {
    /// One end's node name; the order of `a` and `b` does not matter.
    pub a: String,
    pub b: String,
    /// Cost added to the link, in ms (e.g. its egress price expressed as latency).
    pub weight_ms: f64,
}

/// What is wrong with a [`PathConfig`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PathConfigError {
    #[error("{field} = {value}: must be a finite number of milliseconds >= 0")]
    NotACost { field: &'static str, value: f64 },
    #[error("switch_ratio = {0}: must be >= 0 and < 1 (0.10 means a path must be 10% cheaper to replace the primary)")]
    SwitchRatio(f64),
    #[error("weights: link {0}-{0} joins a node to itself; name two different nodes in a and b")]
    SelfLink(String),
    #[error(
        "weights: link {a}-{b} weight_ms = {value}: must be a finite number of milliseconds >= 0"
    )]
    Weight { a: String, b: String, value: f64 },
    #[error("weights: link {a}-{b} is listed twice ({first} ms and {second} ms); keep one entry (the order of a and b does not matter)")]
    DuplicateWeight {
        a: String,
        b: String,
        first: f64,
        second: f64,
    },
}

/// An operator's override of one link, stored as JSON; the default changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkOverride {
    /// No path may use the link.
    pub disabled: bool,
    /// Replaces the configured weight of the link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_ms: Option<f64>,
    /// The pair's primary while that path is usable, without hysteresis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin: Option<Via>,
}

/// Why an override was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OverrideError {
    #[error("link {0}-{0} joins a node to itself; name two different nodes")]
    SelfLink(String),
    #[error("link {a}-{b}: weight_ms = {value} must be a finite number of milliseconds >= 0")]
    Weight { a: String, b: String, value: f64 },
    #[error("link {a}-{b}: pin = {transit:?} names an end of the link; pin \"direct\" or a third node to transit through")]
    PinThroughEnd {
        a: String,
        b: String,
        transit: String,
    },
}

/// One link as `GET /v1/links` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkView {
    /// The alphabetically smaller end.
    pub a: String,
    pub b: String,
    /// Whether paths may use it: measured by a fresh report, up and not disabled.
    pub usable: bool,
    /// Every side with a fresh report says it is up.
    pub up: bool,
    /// Mean of the fresh sides; `None` without a fresh report (same for the
    /// other measurements).
    pub rtt_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    /// Worst of the fresh sides, as a ratio (0.03 is 3%).
    pub loss: Option<f64>,
    /// Ends whose report of this link is fresh.
    pub reported_by: Vec<String>,
    /// Seconds since the newest report of this link from either end, fresh or not.
    pub age_s: Option<f64>,
    /// Cost in ms (including the weight) while measured, even if down or disabled.
    pub cost_ms: Option<f64>,
    /// The weight in effect: the override's, else the configured one, else 0.
    pub weight_ms: f64,
    pub disabled: bool,
    /// The pair's pinned path ("direct" or the transit's name).
    pub pin: Option<String>,
}

/// One pair of nodes as `GET /v1/paths` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairView {
    /// The alphabetically smaller node.
    pub a: String,
    pub b: String,
    /// "direct" or the transit's name; the same in both directions.
    pub primary: String,
    /// `None` while the primary is not usable.
    pub primary_cost_ms: Option<f64>,
    pub backup: Option<String>,
    pub backup_cost_ms: Option<f64>,
    /// Why this primary, with the figures, as of the last recompute.
    pub reason: String,
    /// Seconds the primary has been in use.
    pub since_s: f64,
    /// How often the primary changed (the first measured choice does not count).
    pub changes: u64,
    /// What the last change was and why.
    pub last_change: Option<String>,
}

/// Chooses primary and backup paths for every pair of nodes. See the module docs.
#[derive(Debug)]
pub struct PathEngine {
    config: PathConfig,
    /// Node name → whether it may transit.
    nodes: BTreeMap<String, bool>,
    inputs: LinkInputs,
    /// One state per pair of current nodes.
    pairs: PairMap<PairState>,
    /// The path lists returned by the last recompute, to tell what changed.
    published: BTreeMap<String, Vec<PathSpec>>,
}

impl PathEngine {
    /// `config` should have passed [`PathConfig::validate`]; of duplicate weights
    /// the last wins.
    pub fn new(config: PathConfig) -> Self {
        let mut weights = PairMap::default();
        for w in &config.weights {
            weights.insert(&w.a, &w.b, w.weight_ms);
        }
        Self {
            config,
            nodes: BTreeMap::new(),
            inputs: LinkInputs {
                samples: BTreeMap::new(),
                overrides: PairMap::default(),
                weights,
            },
            pairs: PairMap::default(),
            published: BTreeMap::new(),
        }
    }

    /// Sets the current membership: each node's name and whether it may transit.
    /// Forgets the reports and path state of nodes no longer present (overrides
    /// stay: they belong to the store).
    pub fn set_nodes(&mut self, nodes: impl IntoIterator<Item = (String, bool)>) {
        self.nodes = nodes.into_iter().collect();
        let nodes = &self.nodes;
        self.inputs
            .samples
            .retain(|from, _| nodes.contains_key(from));
        for peers in self.inputs.samples.values_mut() {
            peers.retain(|peer, _| nodes.contains_key(peer));
        }
        self.pairs
            .retain(|a, b, _| nodes.contains_key(a) && nodes.contains_key(b));
        for (i, a) in nodes.keys().enumerate() {
            for b in nodes.keys().skip(i + 1) {
                self.pairs.get_or_insert_with(a, b, PairState::new);
            }
        }
        self.published.retain(|name, _| nodes.contains_key(name));
    }

    /// Takes `from`'s latest measurements. A report replaces the previous one
    /// whole: a peer it leaves out has no measurement from `from` any more.
    /// Reports from unknown nodes and samples about unknown peers are ignored.
    pub fn report(&mut self, from: &str, report: &LinkReport, now: Instant) {
        if !self.nodes.contains_key(from) {
            return;
        }
        let sides = report
            .links
            .iter()
            .filter(|s| s.peer != from && self.nodes.contains_key(&s.peer))
            .map(|s| {
                let side = Side {
                    sample: s.clone(),
                    at: now,
                };
                (s.peer.clone(), side)
            })
            .collect();
        self.inputs.samples.insert(from.to_string(), sides);
    }

    /// Sets (or with `None` clears) the override of link `a`-`b`; the order of
    /// `a` and `b` does not matter and the nodes need not be members yet. An
    /// override equal to the default is the same as none. Takes effect at the
    /// next [`recompute`](Self::recompute).
    pub fn set_override(
        &mut self,
        a: &str,
        b: &str,
        o: Option<LinkOverride>,
    ) -> Result<(), OverrideError> {
        if a == b {
            return Err(OverrideError::SelfLink(a.to_string()));
        }
        let o = o.filter(|o| *o != LinkOverride::default());
        let Some(o) = o else {
            self.inputs.overrides.remove(a, b);
            return Ok(());
        };
        if let Some(value) = o.weight_ms.filter(|w| !is_cost(*w)) {
            return Err(OverrideError::Weight {
                a: a.to_string(),
                b: b.to_string(),
                value,
            });
        }
        if let Some(t) = o.pin.as_ref().and_then(Via::transit) {
            if t == a || t == b {
                return Err(OverrideError::PinThroughEnd {
                    a: a.to_string(),
                    b: b.to_string(),
                    transit: t.to_string(),
                });
            }
        }
        self.inputs.overrides.insert(a, b, o);
        Ok(())
    }

    /// The override of link `a`-`b`, in either order.
    pub fn override_for(&self, a: &str, b: &str) -> Option<&LinkOverride> {
        self.inputs.overrides.get(a, b)
    }

    /// Every override as `(a, b, override)` with `a < b`, sorted.
    pub fn overrides(&self) -> impl Iterator<Item = (&str, &str, &LinkOverride)> + '_ {
        self.inputs.overrides.iter()
    }

    /// Re-evaluates every pair at `now` and returns the names of the nodes whose
    /// path list ([`paths_for`](Self::paths_for)) differs from what the previous
    /// call returned (all nodes on the first call), sorted. O(N³) for N nodes.
    pub fn recompute(&mut self, now: Instant) -> Vec<String> {
        let snap = Snapshot::build(&self.config, &self.nodes, &self.inputs, now);
        for (a, b, state) in self.pairs.iter_mut() {
            if let (Some(&i), Some(&j)) = (snap.index.get(a), snap.index.get(b)) {
                decide(state, &PairOptions::new(&snap, i, j), now);
            }
        }
        let mut changed = Vec::new();
        for name in self.nodes.keys() {
            let paths = self.paths_for(name);
            if self.published.get(name) != Some(&paths) {
                changed.push(name.clone());
                self.published.insert(name.clone(), paths);
            }
        }
        changed
    }

    /// The paths of `node`: one per other current node, sorted by destination.
    /// Empty for an unknown node.
    pub fn paths_for(&self, node: &str) -> Vec<PathSpec> {
        if !self.nodes.contains_key(node) {
            return Vec::new();
        }
        self.nodes
            .keys()
            .filter(|dest| *dest != node)
            .map(|dest| match self.pairs.get(node, dest) {
                Some(state) => PathSpec {
                    dest: dest.clone(),
                    primary: state.primary.clone(),
                    backup: state.backup.clone(),
                },
                None => PathSpec {
                    dest: dest.clone(),
                    primary: Via::Direct,
                    backup: None,
                },
            })
            .collect()
    }

    /// Every link with a report (fresh or not) between current nodes or with an
    /// override, sorted by `(a, b)`.
    pub fn links(&self, now: Instant) -> Vec<LinkView> {
        let mut keys: BTreeSet<(&str, &str)> = BTreeSet::new();
        for (from, peers) in &self.inputs.samples {
            for peer in peers.keys() {
                keys.insert(ordered(from, peer));
            }
        }
        keys.extend(self.inputs.overrides.iter().map(|(a, b, _)| (a, b)));
        keys.into_iter()
            .map(|(a, b)| self.link_view(a, b, now))
            .collect()
    }

    /// Every pair of current nodes, sorted by `(a, b)`.
    pub fn pairs(&self, now: Instant) -> Vec<PairView> {
        self.pairs
            .iter()
            .map(|(a, b, st)| PairView {
                a: a.to_string(),
                b: b.to_string(),
                primary: st.primary.label().to_string(),
                primary_cost_ms: st.primary_cost.map(round3),
                backup: st.backup.as_ref().map(|v| v.label().to_string()),
                backup_cost_ms: st.backup_cost.map(round3),
                reason: st.reason.clone(),
                since_s: st.since.map_or(0.0, |t| {
                    round3(now.saturating_duration_since(t).as_secs_f64())
                }),
                changes: st.changes,
                last_change: st.last_change.clone(),
            })
            .collect()
    }

    fn link_view(&self, a: &str, b: &str, now: Instant) -> LinkView {
        let state = self.inputs.state(&self.config, a, b, now);
        let sides = self.inputs.sides(a, b);
        let fresh = |side: &Side| is_fresh(side, &self.config, now);
        let reported_by = [(a, sides[0]), (b, sides[1])]
            .into_iter()
            .filter(|(_, side)| side.is_some_and(fresh))
            .map(|(name, _)| name.to_string())
            .collect();
        let newest = sides.iter().flatten().map(|s| s.at).max();
        let metrics = match state.measurement {
            Measurement::Fresh(m) => Some(m),
            Measurement::Never | Measurement::Stale => None,
        };
        LinkView {
            a: a.to_string(),
            b: b.to_string(),
            usable: state.usable_cost(&self.config).is_some(),
            up: metrics.is_some_and(|m| m.up),
            rtt_ms: metrics.map(|m| round3(m.rtt_ms)),
            jitter_ms: metrics.map(|m| round3(m.jitter_ms)),
            loss: metrics.map(|m| m.loss),
            reported_by,
            age_s: newest.map(|t| round3(now.saturating_duration_since(t).as_secs_f64())),
            cost_ms: state.cost_ms(&self.config).map(round3),
            weight_ms: state.weight_ms,
            disabled: state.disabled,
            pin: state.pin.map(|p| p.label().to_string()),
        }
    }
}

/// The decision about one pair, kept between recomputes.
#[derive(Debug)]
struct PairState {
    primary: Via,
    backup: Option<Via>,
    /// False until a usable path has been chosen; until then the primary is a
    /// placeholder that any usable path replaces at once.
    chosen: bool,
    /// When the primary came into use (set at the first recompute).
    since: Option<Instant>,
    changes: u64,
    /// A path clearly cheaper than the primary, and since when it has been.
    challenger: Option<Challenger>,
    primary_cost: Option<f64>,
    backup_cost: Option<f64>,
    reason: String,
    last_change: Option<String>,
}

impl PairState {
    fn new() -> Self {
        Self {
            primary: Via::Direct,
            backup: None,
            chosen: false,
            since: None,
            changes: 0,
            challenger: None,
            primary_cost: None,
            backup_cost: None,
            reason: NO_MEASUREMENTS.to_string(),
            last_change: None,
        }
    }
}

const NO_MEASUREMENTS: &str = "no measurements yet; using direct until a path is measured";

#[derive(Debug)]
struct Challenger {
    via: Via,
    since: Instant,
}

/// Chooses the primary and backup of one pair and explains the choice.
fn decide(st: &mut PairState, opts: &PairOptions, now: Instant) {
    let cfg = opts.snap.cfg;
    st.since.get_or_insert(now);
    let current = opts.find(&st.primary);
    let pin = opts.snap.link(opts.i, opts.j).pin.as_ref();
    let pinned = pin.and_then(|p| opts.find(p));

    // The new primary (None: nothing is usable) and, for a switch, why.
    let (primary, why) = if let Some(p) = pinned {
        (Some(p), Some("pinned by operator".to_string()))
    } else {
        match (current, opts.best()) {
            (_, None) => (None, None),
            (Some(cur), Some(best)) if st.chosen => hysteresis(st, opts, cur, best, now),
            (None, Some(best)) if st.chosen => {
                let why = format!(
                    "{} became unusable ({})",
                    via_text(&st.primary),
                    opts.why_unusable(&st.primary)
                );
                (Some(best), Some(why))
            }
            (_, Some(best)) => (Some(best), None),
        }
    };
    if primary.is_none() || pinned.is_some() {
        st.challenger = None;
    }

    if let Some(p) = primary {
        let via = opts.via(p.route);
        if via != st.primary {
            if st.chosen {
                st.changes += 1;
                let why = why.unwrap_or_default();
                st.last_change = Some(format!(
                    "{} -> {}: {why}",
                    via_text(&st.primary),
                    via_text(&via)
                ));
            }
            st.primary = via;
            st.since = Some(now);
            st.challenger = None;
        }
        st.chosen = true;
    }

    let primary_route = primary.map(|p| p.route);
    let best_other = opts
        .cands
        .iter()
        .copied()
        .find(|c| Some(c.route) != primary_route);
    let kept_backup = st
        .backup
        .as_ref()
        .and_then(|v| opts.find(v))
        .filter(|c| Some(c.route) != primary_route);
    let backup = match (kept_backup, best_other) {
        (Some(kept), Some(other)) if !cfg.beats(other.cost, kept.cost) => Some(kept),
        (_, other) => other,
    };
    st.backup = backup.map(|c| opts.via(c.route));
    st.backup_cost = backup.map(|c| c.cost);
    st.primary_cost = primary.map(|p| p.cost);

    let mut reason = String::new();
    if let (Some(p), None) = (pin, pinned) {
        let _ = write!(
            reason,
            "pin {} is unusable ({}); ",
            via_text(p),
            opts.why_unusable(p)
        );
    }
    match primary {
        Some(p) => opts.explain(&mut reason, st, p, pinned.is_some(), now),
        None => opts.explain_no_path(&mut reason, st),
    }
    st.reason = reason;
}

/// Keeps the usable primary `cur` unless a challenger has been clearly cheaper
/// for `hold`. A challenger keeps its timer while it stays clearly cheaper than
/// the primary, and is replaced only by a path clearly cheaper than itself, so two
/// near-equal alternatives taking turns at being cheapest do not keep restarting it.
fn hysteresis(
    st: &mut PairState,
    opts: &PairOptions,
    cur: Candidate,
    best: Candidate,
    now: Instant,
) -> (Option<Candidate>, Option<String>) {
    let cfg = opts.snap.cfg;
    let held = st
        .challenger
        .as_ref()
        .and_then(|ch| opts.find(&ch.via).map(|c| (c, ch.since)))
        .filter(|(c, _)| {
            c.route != cur.route && cfg.beats(c.cost, cur.cost) && !cfg.beats(best.cost, c.cost)
        });
    let (challenger, since) = match held {
        Some(held) => held,
        None if best.route != cur.route && cfg.beats(best.cost, cur.cost) => {
            st.challenger = Some(Challenger {
                via: opts.via(best.route),
                since: now,
            });
            (best, now)
        }
        None => {
            st.challenger = None;
            return (Some(cur), None);
        }
    };
    let held_for = now.saturating_duration_since(since);
    if held_for < cfg.hold {
        return (Some(cur), None);
    }
    let why = format!(
        "{} was {:.0}% cheaper ({:.1} ms vs {:.1} ms) for {:.1} s",
        via_text(&opts.via(challenger.route)),
        percent_cheaper(challenger.cost, cur.cost),
        challenger.cost,
        cur.cost,
        held_for.as_secs_f64()
    );
    (Some(challenger), Some(why))
}

/// One way for a pair to go, and what it costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Direct,
    /// Through the node with this index in the snapshot.
    Transit(usize),
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    route: Route,
    cost: f64,
}

/// Everything the decision for one pair looks at.
struct PairOptions<'s> {
    snap: &'s Snapshot<'s>,
    i: usize,
    j: usize,
    /// The usable paths, cheapest first (direct first on a tie).
    cands: Vec<Candidate>,
}

impl<'s> PairOptions<'s> {
    fn new(snap: &'s Snapshot<'s>, i: usize, j: usize) -> Self {
        let mut cands = Vec::new();
        if let Some(cost) = snap.usable_cost(i, j) {
            cands.push(Candidate {
                route: Route::Direct,
                cost,
            });
        }
        for t in 0..snap.names.len() {
            if t == i || t == j || !snap.transit[t] {
                continue;
            }
            if let (Some(x), Some(y)) = (snap.usable_cost(i, t), snap.usable_cost(t, j)) {
                cands.push(Candidate {
                    route: Route::Transit(t),
                    cost: x + y + snap.cfg.transit_penalty_ms,
                });
            }
        }
        cands.sort_by(|x, y| x.cost.total_cmp(&y.cost).then(x.route.cmp(&y.route)));
        Self { snap, i, j, cands }
    }

    fn best(&self) -> Option<Candidate> {
        self.cands.first().copied()
    }

    /// The candidate for `via`, if it is usable.
    fn find(&self, via: &Via) -> Option<Candidate> {
        let route = match via {
            Via::Direct => Route::Direct,
            Via::Transit(name) => Route::Transit(*self.snap.index.get(name.as_str())?),
        };
        self.cands.iter().copied().find(|c| c.route == route)
    }

    fn via(&self, route: Route) -> Via {
        match route {
            Route::Direct => Via::Direct,
            Route::Transit(t) => Via::Transit(self.snap.names[t].to_string()),
        }
    }

    fn names(&self) -> (&str, &str) {
        (self.snap.names[self.i], self.snap.names[self.j])
    }

    /// Why `via` is not a usable path for this pair.
    fn why_unusable(&self, via: &Via) -> String {
        let (a, b) = self.names();
        let snap = self.snap;
        match via {
            Via::Direct => snap.link(self.i, self.j).why_unusable(a, b),
            Via::Transit(name) => {
                let Some(&t) = snap.index.get(name.as_str()) else {
                    return format!("{name} is not a member");
                };
                if t == self.i || t == self.j {
                    format!("{name} is an end of the pair")
                } else if !snap.transit[t] {
                    format!("{name} may not transit")
                } else if snap.usable_cost(self.i, t).is_none() {
                    snap.link(self.i, t).why_unusable(a, name)
                } else if snap.usable_cost(t, self.j).is_none() {
                    snap.link(t, self.j).why_unusable(name, b)
                } else {
                    "it is usable".to_string()
                }
            }
        }
    }

    /// "181.3 ms (a-t 150.2 ms + t-b 30.1 ms + 1.0 ms transit)".
    fn describe(&self, c: Candidate) -> String {
        let snap = self.snap;
        let cfg = snap.cfg;
        let (a, b) = self.names();
        match c.route {
            Route::Direct => format!(
                "{:.1} ms ({})",
                c.cost,
                snap.link(self.i, self.j).breakdown(cfg)
            ),
            Route::Transit(t) => {
                let name = snap.names[t];
                let first = snap.usable_cost(self.i, t).unwrap_or(f64::NAN);
                let second = snap.usable_cost(t, self.j).unwrap_or(f64::NAN);
                let mut s = format!(
                    "{:.1} ms ({a}-{name} {first:.1} ms + {name}-{b} {second:.1} ms",
                    c.cost
                );
                if cfg.transit_penalty_ms != 0.0 {
                    let _ = write!(s, " + {:.1} ms transit", cfg.transit_penalty_ms);
                }
                s.push(')');
                s
            }
        }
    }

    fn explain(
        &self,
        out: &mut String,
        st: &PairState,
        primary: Candidate,
        pinned: bool,
        now: Instant,
    ) {
        let cfg = self.snap.cfg;
        let text = |c: Candidate| format!("{} {}", via_text(&self.via(c.route)), self.describe(c));
        if pinned {
            out.push_str("pinned by operator: ");
        }
        let _ = write!(
            out,
            "{}: {}",
            via_text(&self.via(primary.route)),
            self.describe(primary)
        );
        let cheapest = self.best().unwrap_or(primary);
        if cheapest.route == primary.route {
            match self
                .cands
                .iter()
                .copied()
                .find(|c| c.route != primary.route)
            {
                Some(alt) => {
                    let _ = write!(out, " beats {}", text(alt));
                }
                None => out.push_str("; no alternative path"),
            }
            // Through a transit, always say what the direct path costs (or why it
            // cannot be used): that is the question an operator asks.
            if primary.route != Route::Direct {
                let direct = self
                    .cands
                    .iter()
                    .copied()
                    .find(|c| c.route == Route::Direct);
                let next_best = self
                    .cands
                    .iter()
                    .copied()
                    .find(|c| c.route != primary.route);
                match direct {
                    Some(_) if next_best.is_some_and(|n| n.route == Route::Direct) => {}
                    Some(d) => {
                        let _ = write!(out, " and {}", text(d));
                    }
                    None => {
                        let (a, b) = self.names();
                        let _ = write!(
                            out,
                            "; direct is unusable ({})",
                            self.snap.link(self.i, self.j).why_unusable(a, b)
                        );
                    }
                }
            }
            return;
        }
        let challenger = st
            .challenger
            .as_ref()
            .and_then(|ch| self.find(&ch.via).map(|c| (c, ch.since)));
        if let Some((ch, ch_since)) = challenger {
            let left = cfg
                .hold
                .saturating_sub(now.saturating_duration_since(ch_since));
            let _ = write!(
                out,
                "; {} is {:.0}% cheaper, switching in {:.1} s if it holds",
                text(ch),
                percent_cheaper(ch.cost, primary.cost),
                left.as_secs_f64()
            );
        } else if pinned {
            let _ = write!(
                out,
                "; {} would be {:.0}% cheaper",
                text(cheapest),
                percent_cheaper(cheapest.cost, primary.cost)
            );
        } else {
            let _ = write!(
                out,
                "; {} is {:.0}% cheaper, less than the {:.0}% and {:.1} ms needed to switch",
                text(cheapest),
                percent_cheaper(cheapest.cost, primary.cost),
                cfg.switch_ratio * 100.0,
                duration_ms(cfg.switch_min)
            );
        }
    }

    fn explain_no_path(&self, out: &mut String, st: &PairState) {
        let snap = self.snap;
        let direct = snap.link(self.i, self.j);
        if !st.chosen && matches!(direct.measurement, Measurement::Never) {
            out.push_str(NO_MEASUREMENTS);
            return;
        }
        let (a, b) = self.names();
        let any_transit =
            (0..snap.names.len()).any(|t| t != self.i && t != self.j && snap.transit[t]);
        let transits = if any_transit {
            "no transit has both links usable"
        } else {
            "no other node may transit"
        };
        let _ = write!(
            out,
            "no usable path (direct: {}; {transits}); ",
            direct.why_unusable(a, b)
        );
        if st.chosen {
            let _ = write!(out, "keeping {}", via_text(&st.primary));
            if st.primary != Via::Direct {
                let _ = write!(out, " ({})", self.why_unusable(&st.primary));
            }
        } else {
            out.push_str("using direct");
        }
    }
}

/// The links between current nodes at one instant, indexed for the O(N³) pass.
struct Snapshot<'a> {
    cfg: &'a PathConfig,
    names: Vec<&'a str>,
    transit: Vec<bool>,
    index: HashMap<&'a str, usize>,
    /// n×n, row-major; only entries with row < column are filled.
    links: Vec<LinkState>,
    /// The cost of each usable link, same layout.
    usable: Vec<Option<f64>>,
}

impl<'a> Snapshot<'a> {
    fn build(
        cfg: &'a PathConfig,
        nodes: &'a BTreeMap<String, bool>,
        inputs: &LinkInputs,
        now: Instant,
    ) -> Self {
        let names: Vec<&str> = nodes.keys().map(String::as_str).collect();
        let transit = nodes.values().copied().collect();
        let index = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let n = names.len();
        let mut links = vec![LinkState::default(); n * n];
        let mut usable = vec![None; n * n];
        for i in 0..n {
            for j in i + 1..n {
                let state = inputs.state(cfg, names[i], names[j], now);
                usable[i * n + j] = state.usable_cost(cfg);
                links[i * n + j] = state;
            }
        }
        Self {
            cfg,
            names,
            transit,
            index,
            links,
            usable,
        }
    }

    fn slot(&self, i: usize, j: usize) -> usize {
        let (lo, hi) = if i < j { (i, j) } else { (j, i) };
        lo * self.names.len() + hi
    }

    fn link(&self, i: usize, j: usize) -> &LinkState {
        &self.links[self.slot(i, j)]
    }

    fn usable_cost(&self, i: usize, j: usize) -> Option<f64> {
        self.usable[self.slot(i, j)]
    }
}

/// What the engine knows about links: reports, overrides, configured weights.
#[derive(Debug)]
struct LinkInputs {
    /// Each node's latest report: reporting node → peer → sample.
    samples: BTreeMap<String, BTreeMap<String, Side>>,
    overrides: PairMap<LinkOverride>,
    weights: PairMap<f64>,
}

impl LinkInputs {
    /// `a`'s sample of `b` and `b`'s sample of `a`.
    fn sides(&self, a: &str, b: &str) -> [Option<&Side>; 2] {
        let side = |from: &str, peer: &str| self.samples.get(from).and_then(|p| p.get(peer));
        [side(a, b), side(b, a)]
    }

    fn state(&self, cfg: &PathConfig, a: &str, b: &str, now: Instant) -> LinkState {
        let sides = self.sides(a, b);
        let fresh: Vec<&LinkSample> = sides
            .iter()
            .flatten()
            .filter(|s| is_fresh(s, cfg, now))
            .map(|s| &s.sample)
            .collect();
        let measurement = if fresh.is_empty() {
            if sides.iter().any(Option::is_some) {
                Measurement::Stale
            } else {
                Measurement::Never
            }
        } else {
            let count = fresh.len() as f64;
            Measurement::Fresh(Metrics {
                up: fresh.iter().all(|s| s.up),
                rtt_ms: fresh.iter().map(|s| f64::from(s.rtt_us)).sum::<f64>() / count / 1000.0,
                jitter_ms: fresh.iter().map(|s| f64::from(s.jitter_us)).sum::<f64>()
                    / count
                    / 1000.0,
                loss: fresh
                    .iter()
                    .map(|s| s.loss_ppm)
                    .max()
                    .map_or(0.0, f64::from)
                    / 1e6,
            })
        };
        let o = self.overrides.get(a, b);
        LinkState {
            measurement,
            disabled: o.is_some_and(|o| o.disabled),
            weight_ms: o
                .and_then(|o| o.weight_ms)
                .or_else(|| self.weights.get(a, b).copied())
                .unwrap_or(0.0),
            pin: o.and_then(|o| o.pin.clone()),
        }
    }
}

/// One end's sample of a link and when it arrived.
#[derive(Debug)]
struct Side {
    sample: LinkSample,
    at: Instant,
}

fn is_fresh(side: &Side, cfg: &PathConfig, now: Instant) -> bool {
    now.saturating_duration_since(side.at) <= cfg.stale_after
}

#[derive(Debug, Clone, Copy, Default)]
enum Measurement {
    /// Neither end has reported the link.
    #[default]
    Never,
    /// Reported, but every report is older than `stale_after`.
    Stale,
    /// The fresh ends' reports combined.
    Fresh(Metrics),
}

#[derive(Debug, Clone, Copy)]
struct Metrics {
    up: bool,
    rtt_ms: f64,
    jitter_ms: f64,
    /// Ratio, 0.03 is 3%.
    loss: f64,
}

/// One link at one instant: measurement and override combined.
#[derive(Debug, Clone, Default)]
struct LinkState {
    measurement: Measurement,
    disabled: bool,
    weight_ms: f64,
    pin: Option<Via>,
}

impl LinkState {
    fn cost_ms(&self, cfg: &PathConfig) -> Option<f64> {
        match self.measurement {
            Measurement::Fresh(m) => {
                Some(m.rtt_ms + m.loss * 100.0 * cfg.loss_penalty_ms + self.weight_ms)
            }
            Measurement::Never | Measurement::Stale => None,
        }
    }

    fn usable_cost(&self, cfg: &PathConfig) -> Option<f64> {
        match self.measurement {
            Measurement::Fresh(m) if m.up && !self.disabled => self.cost_ms(cfg),
            _ => None,
        }
    }

    fn why_unusable(&self, a: &str, b: &str) -> String {
        if self.disabled {
            return format!("link {a}-{b} disabled by operator");
        }
        match self.measurement {
            Measurement::Never => format!("link {a}-{b} never measured"),
            Measurement::Stale => format!("link {a}-{b} has no fresh report"),
            Measurement::Fresh(m) if !m.up => format!("link {a}-{b} down"),
            Measurement::Fresh(_) => format!("link {a}-{b} is usable"),
        }
    }

    /// "rtt 220.4 ms + loss 3.0% x 10 ms + weight 5.0 ms".
    fn breakdown(&self, cfg: &PathConfig) -> String {
        let Measurement::Fresh(m) = self.measurement else {
            return "not measured".to_string();
        };
        let mut s = format!("rtt {:.1} ms", m.rtt_ms);
        if m.loss > 0.0 {
            let _ = write!(
                s,
                " + loss {:.1}% x {} ms",
                m.loss * 100.0,
                cfg.loss_penalty_ms
            );
        }
        if self.weight_ms != 0.0 {
            let _ = write!(s, " + weight {:.1} ms", self.weight_ms);
        }
        s
    }
}

impl PathConfig {
    /// Whether a path costing `challenger` ms is clearly cheaper than one costing
    /// `incumbent` ms: by `switch_ratio` of it and by `switch_min`.
    fn beats(&self, challenger: f64, incumbent: f64) -> bool {
        let needed = (self.switch_ratio * incumbent).max(duration_ms(self.switch_min));
        incumbent - challenger >= needed
    }
}

/// Values per unordered pair of names, stored under (smaller, larger) so that a
/// lookup in either order needs no allocation.
#[derive(Debug)]
struct PairMap<T>(BTreeMap<String, BTreeMap<String, T>>);

impl<T> Default for PairMap<T> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<T> PairMap<T> {
    fn get(&self, a: &str, b: &str) -> Option<&T> {
        let (a, b) = ordered(a, b);
        self.0.get(a)?.get(b)
    }

    fn insert(&mut self, a: &str, b: &str, value: T) -> Option<T> {
        let (a, b) = ordered(a, b);
        self.0
            .entry(a.to_string())
            .or_default()
            .insert(b.to_string(), value)
    }

    fn get_or_insert_with(&mut self, a: &str, b: &str, make: impl FnOnce() -> T) -> &mut T {
        let (a, b) = ordered(a, b);
        self.0
            .entry(a.to_string())
            .or_default()
            .entry(b.to_string())
            .or_insert_with(make)
    }

    fn remove(&mut self, a: &str, b: &str) -> Option<T> {
        let (a, b) = ordered(a, b);
        let row = self.0.get_mut(a)?;
        let value = row.remove(b);
        if row.is_empty() {
            self.0.remove(a);
        }
        value
    }

    fn retain(&mut self, mut keep: impl FnMut(&str, &str, &T) -> bool) {
        for (a, row) in self.0.iter_mut() {
            row.retain(|b, v| keep(a, b, v));
        }
        self.0.retain(|_, row| !row.is_empty());
    }

    /// `(a, b, value)` with `a < b`, sorted.
    fn iter(&self) -> impl Iterator<Item = (&str, &str, &T)> + '_ {
        self.0
            .iter()
            .flat_map(|(a, row)| row.iter().map(move |(b, v)| (a.as_str(), b.as_str(), v)))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &str, &mut T)> + '_ {
        self.0.iter_mut().flat_map(|(a, row)| {
            row.iter_mut()
                .map(move |(b, v)| (a.as_str(), b.as_str(), v))
        })
    }
}

fn ordered<'s>(a: &'s str, b: &'s str) -> (&'s str, &'s str) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// "direct" or "via <transit>".
fn via_text(via: &Via) -> String {
    match via {
        Via::Direct => "direct".to_string(),
        Via::Transit(t) => format!("via {t}"),
    }
}

fn percent_cheaper(cheaper: f64, dearer: f64) -> f64 {
    if dearer > 0.0 {
        (dearer - cheaper) / dearer * 100.0
    } else {
        0.0
    }
}

fn duration_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn is_cost(value: f64) -> bool {
    value.is_finite() && value >= 0.0
}

/// Rounds to 0.001 (a microsecond when the unit is ms), for tidy JSON.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const SECOND: Duration = Duration::from_secs(1);

    #[derive(Clone, Copy)]
    struct SimLink {
        rtt_ms: f64,
        loss_pct: f64,
        up: bool,
    }

    /// Agents reporting every second to an engine that recomputes every second.
    struct Sim {
        engine: PathEngine,
        now: Instant,
        nodes: Vec<(String, bool)>,
        links: BTreeMap<(String, String), SimLink>,
        /// Nodes that have stopped reporting.
        silent: BTreeSet<String>,
        /// Each side's RTT is multiplied by a random factor in 1 ± this.
        jitter: Option<(StdRng, f64)>,
    }

    impl Sim {
        fn new(nodes: &[(&str, bool)], config: PathConfig) -> Self {
            let nodes: Vec<(String, bool)> =
                nodes.iter().map(|(n, t)| (n.to_string(), *t)).collect();
            let mut engine = PathEngine::new(config);
            engine.set_nodes(nodes.clone());
            Self {
                engine,
                now: Instant::now(),
                nodes,
                links: BTreeMap::new(),
                silent: BTreeSet::new(),
                jitter: None,
            }
        }

        fn link(&mut self, a: &str, b: &str, rtt_ms: f64, loss_pct: f64) {
            let (a, b) = ordered(a, b);
            self.links.insert(
                (a.to_string(), b.to_string()),
                SimLink {
                    rtt_ms,
                    loss_pct,
                    up: true,
                },
            );
        }

        fn set_up(&mut self, a: &str, b: &str, up: bool) {
            let (a, b) = ordered(a, b);
            if let Some(l) = self.links.get_mut(&(a.to_string(), b.to_string())) {
                l.up = up;
            }
        }

        fn report_all(&mut self) {
            for (node, _) in self.nodes.clone() {
                if self.silent.contains(&node) {
                    continue;
                }
                let mut links = Vec::new();
                for ((a, b), l) in &self.links {
                    let peer = if *a == node {
                        b
                    } else if *b == node {
                        a
                    } else {
                        continue;
                    };
                    let factor = match &mut self.jitter {
                        Some((rng, j)) => rng.gen_range(1.0 - *j..=1.0 + *j),
                        None => 1.0,
                    };
                    links.push(sample(peer, l.rtt_ms * factor, l.loss_pct, l.up));
                }
                self.engine.report(&node, &LinkReport { links }, self.now);
            }
        }

        /// Reports and recomputes at the current instant.
        fn start(&mut self) -> Vec<String> {
            self.report_all();
            self.engine.recompute(self.now)
        }

        /// One second later: reports, then recompute.
        fn tick(&mut self) -> Vec<String> {
            self.now += SECOND;
            self.start()
        }

        fn run(&mut self, secs: u64) {
            for _ in 0..secs {
                self.tick();
            }
        }

        fn spec(&self, from: &str, to: &str) -> PathSpec {
            self.engine
                .paths_for(from)
                .into_iter()
                .find(|p| p.dest == to)
                .unwrap_or_else(|| panic!("{from} has no path to {to}"))
        }

        /// The primary of the pair, checking that both ends agree.
        fn primary(&self, a: &str, b: &str) -> Via {
            let (ab, ba) = (self.spec(a, b), self.spec(b, a));
            assert_eq!(ab.primary, ba.primary, "{a}-{b} asymmetric");
            assert_eq!(ab.backup, ba.backup, "{a}-{b} asymmetric backup");
            ab.primary
        }

        fn backup(&self, a: &str, b: &str) -> Option<Via> {
            self.spec(a, b).backup
        }

        fn pair(&self, a: &str, b: &str) -> PairView {
            let (a, b) = ordered(a, b);
            self.engine
                .pairs(self.now)
                .into_iter()
                .find(|p| p.a == a && p.b == b)
                .unwrap_or_else(|| panic!("no pair {a}-{b}"))
        }

        fn link_view(&self, a: &str, b: &str) -> LinkView {
            let (a, b) = ordered(a, b);
            self.engine
                .links(self.now)
                .into_iter()
                .find(|l| l.a == a && l.b == b)
                .unwrap_or_else(|| panic!("no link {a}-{b}"))
        }
    }

    fn sample(peer: &str, rtt_ms: f64, loss_pct: f64, up: bool) -> LinkSample {
        LinkSample {
            peer: peer.to_string(),
            up,
            rtt_us: (rtt_ms * 1000.0).round() as u32,
            jitter_us: 0,
            loss_ppm: (loss_pct * 10_000.0).round() as u32,
        }
    }

    fn via(name: &str) -> Via {
        Via::Transit(name.to_string())
    }

    /// The lab: azure is the only transit; aws-alibaba and gcp-alibaba are long
    /// and lossy, so their best way is through azure.
    fn lab_with(config: PathConfig, gcp_transit: bool) -> Sim {
        let mut sim = Sim::new(
            &[
                ("aws", false),
                ("gcp", gcp_transit),
                ("azure", true),
                ("alibaba", false),
            ],
            config,
        );
        sim.link("aws", "gcp", 20.0, 0.0);
        sim.link("aws", "azure", 150.0, 0.0);
        sim.link("gcp", "azure", 140.0, 0.0);
        sim.link("azure", "alibaba", 30.0, 0.0);
        sim.link("aws", "alibaba", 220.0, 3.0);
        sim.link("gcp", "alibaba", 210.0, 3.0);
        sim
    }

    fn lab() -> Sim {
        lab_with(PathConfig::default(), false)
    }

    /// a-b direct, and a transit t whose path costs 121 ms.
    fn triangle(direct_ms: f64) -> Sim {
        let mut sim = Sim::new(
            &[("a", false), ("b", false), ("t", true)],
            PathConfig::default(),
        );
        sim.link("a", "b", direct_ms, 0.0);
        sim.link("a", "t", 60.0, 0.0);
        sim.link("t", "b", 60.0, 0.0);
        sim
    }

    fn links_of(a: &str, b: &str, via: &Via) -> BTreeSet<(String, String)> {
        let link = |x: &str, y: &str| {
            let (x, y) = ordered(x, y);
            (x.to_string(), y.to_string())
        };
        match via {
            Via::Direct => [link(a, b)].into(),
            Via::Transit(t) => [link(a, t), link(t, b)].into(),
        }
    }

    #[test]
    fn before_any_report_every_pair_is_direct_with_no_measurements() {
        let mut sim = lab();
        let changed = sim.engine.recompute(sim.now);
        assert_eq!(changed, ["alibaba", "aws", "azure", "gcp"]);
        for p in sim.engine.pairs(sim.now) {
            assert_eq!(p.primary, "direct");
            assert_eq!(p.backup, None);
            assert!(p.reason.starts_with("no measurements yet"), "{}", p.reason);
        }
        assert_eq!(sim.engine.paths_for("aws").len(), 3);
        assert!(sim.engine.links(sim.now).is_empty());
    }

    #[test]
    fn direct_is_chosen_when_cheapest() {
        let mut sim = lab();
        sim.start();
        assert_eq!(sim.primary("aws", "gcp"), Via::Direct);
        assert_eq!(sim.primary("azure", "alibaba"), Via::Direct);
        let p = sim.pair("aws", "gcp");
        assert_eq!(p.primary_cost_ms, Some(20.0));
        assert_eq!(
            p.reason,
            "direct: 20.0 ms (rtt 20.0 ms) beats via azure 291.0 ms \
             (aws-azure 150.0 ms + azure-gcp 140.0 ms + 1.0 ms transit)"
        );
    }

    #[test]
    fn lab_long_lossy_direct_goes_via_azure_in_both_directions() {
        let mut sim = lab();
        sim.start();
        assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
        assert_eq!(sim.spec("aws", "alibaba").primary, via("azure"));
        assert_eq!(sim.spec("alibaba", "aws").primary, via("azure"));
        assert_eq!(sim.primary("gcp", "alibaba"), via("azure"));
        let p = sim.pair("aws", "alibaba");
        assert_eq!(p.primary_cost_ms, Some(181.0));
        assert_eq!(p.backup.as_deref(), Some("direct"));
        assert_eq!(p.backup_cost_ms, Some(250.0));
        assert_eq!(
            p.reason,
            "via azure: 181.0 ms (alibaba-azure 30.0 ms + azure-aws 150.0 ms + 1.0 ms transit) \
             beats direct 250.0 ms (rtt 220.0 ms + loss 3.0% x 10 ms)"
        );
        assert_eq!(p.changes, 0, "the first measured choice is not a change");
    }

    #[test]
    fn only_transit_nodes_carry_traffic() {
        let mut sim = Sim::new(
            &[("a", false), ("b", false), ("x", false), ("y", true)],
            PathConfig::default(),
        );
        sim.link("a", "b", 200.0, 0.0);
        sim.link("a", "x", 10.0, 0.0);
        sim.link("x", "b", 10.0, 0.0);
        sim.link("a", "y", 80.0, 0.0);
        sim.link("y", "b", 80.0, 0.0);
        sim.start();
        assert_eq!(
            sim.primary("a", "b"),
            via("y"),
            "x is much cheaper but may not transit"
        );
        assert_eq!(sim.backup("a", "b"), Some(Via::Direct));

        // y stops being a transit: its path is unusable, so the switch is immediate.
        sim.nodes = vec![
            ("a".into(), false),
            ("b".into(), false),
            ("x".into(), false),
            ("y".into(), false),
        ];
        sim.engine.set_nodes(sim.nodes.clone());
        sim.tick();
        assert_eq!(sim.primary("a", "b"), Via::Direct);
        let p = sim.pair("a", "b");
        assert_eq!(p.changes, 1);
        assert_eq!(
            p.last_change.as_deref(),
            Some("via y -> direct: via y became unusable (y may not transit)")
        );
    }

    #[test]
    fn nine_percent_cheaper_never_switches() {
        let mut sim = triangle(100.0);
        sim.start();
        assert_eq!(sim.primary("a", "b"), Via::Direct);
        sim.link("a", "b", 133.0, 0.0); // via t, 121 ms, is 9.0% cheaper
        sim.run(60);
        assert_eq!(sim.primary("a", "b"), Via::Direct);
        let p = sim.pair("a", "b");
        assert_eq!(p.changes, 0);
        assert_eq!(
            p.reason,
            "direct: 133.0 ms (rtt 133.0 ms); via t 121.0 ms (a-t 60.0 ms + t-b 60.0 ms \
             + 1.0 ms transit) is 9% cheaper, less than the 10% and 5.0 ms needed to switch"
        );
    }

    #[test]
    fn twenty_percent_cheaper_switches_only_after_hold() {
        let mut sim = triangle(100.0);
        sim.start();
        sim.link("a", "b", 152.0, 0.0); // via t, 121 ms, is 20.4% cheaper
        let changed = sim.tick(); // the challenger appears now
        assert!(changed.is_empty(), "{changed:?}");
        sim.run(3);
        assert_eq!(sim.primary("a", "b"), Via::Direct);
        let p = sim.pair("a", "b");
        assert!(
            p.reason
                .ends_with("is 20% cheaper, switching in 2.0 s if it holds"),
            "{}",
            p.reason
        );
        sim.tick();
        assert_eq!(sim.primary("a", "b"), Via::Direct, "held 4 s of 5");
        let changed = sim.tick();
        assert_eq!(sim.primary("a", "b"), via("t"), "held 5 s");
        assert_eq!(changed, ["a", "b"]);
        let p = sim.pair("a", "b");
        assert_eq!(p.changes, 1);
        assert_eq!(p.since_s, 0.0);
        assert_eq!(
            p.last_change.as_deref(),
            Some("direct -> via t: via t was 20% cheaper (121.0 ms vs 152.0 ms) for 5.0 s")
        );
        assert_eq!(sim.backup("a", "b"), Some(Via::Direct));
    }

    #[test]
    fn margin_lost_mid_hold_restarts_the_timer() {
        let mut sim = triangle(100.0);
        sim.start();
        sim.link("a", "b", 152.0, 0.0);
        sim.run(3); // challenger held 2 s
        sim.link("a", "b", 130.0, 0.0); // only 6.9% cheaper now
        sim.tick();
        sim.link("a", "b", 152.0, 0.0); // the timer starts again here
        sim.run(5);
        assert_eq!(
            sim.primary("a", "b"),
            Via::Direct,
            "8 s of 20% but only 4 s in a row"
        );
        sim.tick();
        assert_eq!(sim.primary("a", "b"), via("t"));
        assert_eq!(sim.pair("a", "b").changes, 1);
    }

    #[test]
    fn challenger_timer_restarts_only_for_a_clearly_better_one() {
        let mut sim = Sim::new(
            &[("a", false), ("b", false), ("t1", true), ("t2", true)],
            PathConfig::default(),
        );
        sim.link("a", "b", 200.0, 0.0);
        sim.link("a", "t1", 100.0, 0.0);
        sim.link("t1", "b", 100.0, 0.0);
        sim.link("a", "t2", 100.0, 0.0);
        sim.link("t2", "b", 110.0, 0.0);
        sim.start();
        assert_eq!(sim.primary("a", "b"), Via::Direct);

        sim.link("a", "t1", 80.0, 0.0);
        sim.link("t1", "b", 80.0, 0.0); // via t1: 161 ms, 19.5% cheaper
        sim.run(2);
        sim.link("t2", "b", 59.0, 0.0); // via t2: 160 ms, a hair cheaper than t1
        sim.run(3);
        assert_eq!(sim.primary("a", "b"), Via::Direct);
        sim.tick();
        assert_eq!(sim.primary("a", "b"), via("t1"), "t1 kept its timer");

        // Now t2 gets clearly cheaper than t1: it needs its own full hold.
        sim.link("t2", "b", 20.0, 0.0); // via t2: 121 ms, 25% cheaper than t1
        sim.run(5);
        assert_eq!(sim.primary("a", "b"), via("t1"));
        sim.tick();
        assert_eq!(sim.primary("a", "b"), via("t2"));
        assert_eq!(sim.pair("a", "b").changes, 2);
    }

    #[test]
    fn rtt_jitter_of_20_percent_for_a_minute_changes_at_most_once() {
        for seed in 0..5 {
            let mut sim = lab();
            sim.jitter = Some((StdRng::seed_from_u64(seed), 0.2));
            sim.start();
            let mut pushes = 0;
            for _ in 0..60 {
                pushes += sim.tick().len();
            }
            let changes: u64 = sim.engine.pairs(sim.now).iter().map(|p| p.changes).sum();
            assert!(changes <= 1, "seed {seed}: {changes} changes");
            assert!(pushes <= 4, "seed {seed}: {pushes} pushes");
            assert_eq!(sim.primary("aws", "alibaba"), via("azure"), "seed {seed}");
        }
    }

    #[test]
    fn down_primary_switches_at_once() {
        let mut sim = lab();
        sim.start();
        sim.set_up("azure", "alibaba", false);
        let changed = sim.tick();
        assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
        assert_eq!(sim.primary("gcp", "alibaba"), Via::Direct);
        assert_eq!(sim.backup("aws", "alibaba"), None, "no other usable path");
        assert_eq!(changed, ["alibaba", "aws", "gcp"]);
        let p = sim.pair("aws", "alibaba");
        assert_eq!(p.changes, 1);
        assert_eq!(
            p.last_change.as_deref(),
            Some("via azure -> direct: via azure became unusable (link alibaba-azure down)")
        );
        assert_eq!(
            p.reason,
            "direct: 250.0 ms (rtt 220.0 ms + loss 3.0% x 10 ms); no alternative path"
        );
    }

    #[test]
    fn one_side_saying_down_makes_the_link_down() {
        let mut sim = lab();
        sim.start();
        // Only alibaba sees its link to azure fail.
        let mut links = vec![
            sample("azure", 30.0, 0.0, false),
            sample("aws", 220.0, 3.0, true),
            sample("gcp", 210.0, 3.0, true),
        ];
        sim.now += SECOND;
        sim.report_all();
        sim.engine.report(
            "alibaba",
            &LinkReport {
                links: links.clone(),
            },
            sim.now,
        );
        sim.engine.recompute(sim.now);
        assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
        let l = sim.link_view("azure", "alibaba");
        assert!(!l.up && !l.usable);
        assert_eq!(l.reported_by, ["alibaba", "azure"]);

        links[0].up = true;
        sim.engine.report("alibaba", &LinkReport { links }, sim.now);
        sim.engine.recompute(sim.now);
        assert_eq!(
            sim.primary("aws", "alibaba"),
            Via::Direct,
            "hysteresis on the way back"
        );
    }

    #[test]
    fn disabled_primary_switches_at_once_and_no_path_keeps_the_primary() {
        let mut sim = lab();
        sim.start();
        let disabled = LinkOverride {
            disabled: true,
            ..LinkOverride::default()
        };
        sim.engine
            .set_override("azure", "aws", Some(disabled.clone()))
            .expect("override");
        sim.tick();
        assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
        assert_eq!(
            sim.pair("aws", "azure").reason,
            "no usable path (direct: link aws-azure disabled by operator; \
             no other node may transit); keeping direct"
        );

        // Nothing usable between aws and alibaba either: keep the primary.
        sim.engine
            .set_override("aws", "alibaba", Some(disabled))
            .expect("override");
        let changed = sim.tick();
        assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
        assert!(
            changed.is_empty(),
            "primary kept, no backup before or after: {changed:?}"
        );
        let p = sim.pair("aws", "alibaba");
        assert_eq!(p.primary_cost_ms, None);
        assert!(p.reason.starts_with("no usable path"), "{}", p.reason);
        assert_eq!(sim.link_view("aws", "alibaba").cost_ms, Some(250.0));
        assert!(!sim.link_view("aws", "alibaba").usable);
    }

    #[test]
    fn backup_is_link_disjoint_and_kept_until_clearly_beaten() {
        let mut sim = lab_with(PathConfig::default(), true);
        sim.start();
        for (a, b) in [("aws", "alibaba"), ("gcp", "alibaba"), ("aws", "gcp")] {
            let primary = sim.primary(a, b);
            let backup = sim.backup(a, b).expect("backup");
            assert_ne!(primary, backup);
            assert!(
                links_of(a, b, &primary).is_disjoint(&links_of(a, b, &backup)),
                "{a}-{b}: {primary} and {backup} share a link"
            );
        }
        // aws-alibaba: via azure 181, direct 250, via gcp 261.
        assert_eq!(sim.backup("aws", "alibaba"), Some(Via::Direct));
        assert_eq!(sim.backup("aws", "azure"), Some(via("gcp")));

        sim.link("aws", "alibaba", 235.0, 3.0); // direct 265: via gcp 1.5% cheaper
        sim.tick();
        assert_eq!(sim.backup("aws", "alibaba"), Some(Via::Direct));
        sim.link("aws", "alibaba", 280.0, 3.0); // direct 310: via gcp 16% cheaper
        sim.tick();
        assert_eq!(
            sim.backup("aws", "alibaba"),
            Some(via("gcp")),
            "no hold for backups"
        );
        assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
    }

    #[test]
    fn pin_applies_at_once_and_yields_while_unusable() {
        let mut sim = lab();
        sim.start();
        let pin = LinkOverride {
            pin: Some(Via::Direct),
            ..LinkOverride::default()
        };
        sim.engine
            .set_override("alibaba", "aws", Some(pin))
            .expect("override");
        sim.tick();
        assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
        assert_eq!(sim.backup("aws", "alibaba"), Some(via("azure")));
        let p = sim.pair("aws", "alibaba");
        assert_eq!(
            p.reason,
            "pinned by operator: direct: 250.0 ms (rtt 220.0 ms + loss 3.0% x 10 ms); \
             via azure 181.0 ms (alibaba-azure 30.0 ms + azure-aws 150.0 ms + 1.0 ms transit) \
             would be 28% cheaper"
        );
        assert_eq!(
            p.last_change.as_deref(),
            Some("via azure -> direct: pinned by operator")
        );

        sim.set_up("aws", "alibaba", false);
        sim.tick();
        assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
        let reason = sim.pair("aws", "alibaba").reason;
        assert!(
            reason
                .starts_with("pin direct is unusable (link alibaba-aws down); via azure: 181.0 ms"),
            "{reason}"
        );

        sim.set_up("aws", "alibaba", true);
        sim.tick();
        assert_eq!(
            sim.primary("aws", "alibaba"),
            Via::Direct,
            "pin usable again"
        );

        sim.engine
            .set_override("aws", "alibaba", None)
            .expect("clear");
        sim.run(5);
        assert_eq!(
            sim.primary("aws", "alibaba"),
            Via::Direct,
            "unpinned: hysteresis"
        );
        sim.tick();
        assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
        assert_eq!(sim.pair("aws", "alibaba").changes, 4);
    }

    #[test]
    fn pin_through_a_non_transit_is_reported_unusable() {
        let mut sim = lab();
        let pin = LinkOverride {
            pin: Some(via("gcp")),
            ..LinkOverride::default()
        };
        sim.engine
            .set_override("aws", "alibaba", Some(pin))
            .expect("override");
        sim.start();
        assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
        let p = sim.pair("aws", "alibaba");
        assert!(
            p.reason
                .starts_with("pin via gcp is unusable (gcp may not transit); via azure:"),
            "{}",
            p.reason
        );
        assert_eq!(sim.link_view("aws", "alibaba").pin.as_deref(), Some("gcp"));
    }

    #[test]
    fn config_weight_and_override_weight_change_the_choice() {
        let config = PathConfig {
            weights: vec![LinkWeight {
                a: "aws".into(),
                b: "azure".into(),
                weight_ms: 100.0,
            }],
            ..PathConfig::default()
        };
        let mut sim = lab_with(config, false);
        sim.start();
        // via azure now costs 281 ms, more than direct's 250.
        assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
        assert!(
            sim.pair("aws", "alibaba")
                .reason
                .contains("azure-aws 250.0 ms"),
            "{}",
            sim.pair("aws", "alibaba").reason
        );
        assert_eq!(
            sim.pair("aws", "azure").reason,
            "direct: 250.0 ms (rtt 150.0 ms + weight 100.0 ms); no alternative path"
        );
        let l = sim.link_view("aws", "azure");
        assert_eq!((l.weight_ms, l.cost_ms), (100.0, Some(250.0)));

        let free = LinkOverride {
            weight_ms: Some(0.0),
            ..LinkOverride::default()
        };
        sim.engine
            .set_override("azure", "aws", Some(free))
            .expect("override");
        sim.run(6);
        assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
        let l = sim.link_view("aws", "azure");
        assert_eq!((l.weight_ms, l.cost_ms), (0.0, Some(150.0)));
    }

    #[test]
    fn stale_reports_make_a_link_unusable() {
        let mut sim = Sim::new(
            &[("a", false), ("b", false), ("t", true)],
            PathConfig::default(),
        );
        sim.link("a", "b", 50.0, 0.0);
        sim.link("a", "t", 40.0, 0.0);
        sim.link("t", "b", 40.0, 0.0);
        sim.start();
        assert_eq!(sim.primary("a", "b"), Via::Direct);

        // a and b go quiet; t still reports its links to both.
        sim.silent = ["a".to_string(), "b".to_string()].into();
        sim.run(5);
        assert_eq!(sim.primary("a", "b"), Via::Direct, "5 s old is still fresh");
        sim.tick();
        assert_eq!(
            sim.primary("a", "b"),
            via("t"),
            "6 s old is stale: switch at once"
        );
        assert_eq!(
            sim.pair("a", "b").last_change.as_deref(),
            Some("direct -> via t: direct became unusable (link a-b has no fresh report)")
        );
        let l = sim.link_view("a", "b");
        assert!(!l.usable);
        assert!(l.reported_by.is_empty());
        assert_eq!((l.age_s, l.rtt_ms), (Some(6.0), None));
        assert_eq!(sim.link_view("a", "t").reported_by, ["t"]);
    }

    #[test]
    fn removed_nodes_vanish() {
        let mut sim = lab();
        sim.start();
        sim.nodes.retain(|(n, _)| n != "azure");
        sim.engine.set_nodes(sim.nodes.clone());
        let changed = sim.tick();
        assert_eq!(changed, ["alibaba", "aws", "gcp"]);
        assert_eq!(sim.primary("aws", "alibaba"), Via::Direct);
        assert_eq!(
            sim.pair("aws", "alibaba").last_change.as_deref(),
            Some("via azure -> direct: via azure became unusable (azure is not a member)")
        );
        let dests: Vec<String> = sim
            .engine
            .paths_for("aws")
            .into_iter()
            .map(|p| p.dest)
            .collect();
        assert_eq!(dests, ["alibaba", "gcp"]);
        assert!(sim.engine.paths_for("azure").is_empty());
        let now = sim.now;
        assert!(sim
            .engine
            .pairs(now)
            .iter()
            .all(|p| p.a != "azure" && p.b != "azure"));
        assert!(sim
            .engine
            .links(now)
            .iter()
            .all(|l| l.a != "azure" && l.b != "azure"));
        // A late report from the removed node is ignored.
        let report = LinkReport {
            links: vec![sample("aws", 1.0, 0.0, true)],
        };
        sim.engine.report("azure", &report, now);
        assert!(sim.engine.links(now).iter().all(|l| l.b != "azure"));
    }

    #[test]
    fn recompute_returns_exactly_the_nodes_whose_paths_changed() {
        let mut sim = lab();
        assert_eq!(sim.start(), ["alibaba", "aws", "azure", "gcp"]);
        assert!(sim.tick().is_empty());
        // Direct aws-alibaba was only a backup: just the two ends hear about it.
        sim.set_up("aws", "alibaba", false);
        assert_eq!(sim.tick(), ["alibaba", "aws"]);
        assert!(sim.tick().is_empty());
        // aws-alibaba has no usable path left and keeps its primary; gcp-alibaba
        // switches to direct.
        sim.set_up("azure", "alibaba", false);
        assert_eq!(sim.tick(), ["alibaba", "gcp"]);
        assert!(sim
            .pair("aws", "alibaba")
            .reason
            .starts_with("no usable path"));
        assert_eq!(sim.primary("aws", "alibaba"), via("azure"));
        // A new node: everyone gets a path to it.
        sim.nodes.push(("oracle".into(), false));
        sim.engine.set_nodes(sim.nodes.clone());
        assert_eq!(sim.tick(), ["alibaba", "aws", "azure", "gcp", "oracle"]);
    }

    #[test]
    fn link_view_combines_both_sides() {
        let mut sim = Sim::new(&[("a", false), ("b", false)], PathConfig::default());
        let now = sim.now;
        let report = |peer: &str, rtt_ms, loss_pct, up| LinkReport {
            links: vec![
                sample(peer, rtt_ms, loss_pct, up),
                sample("stranger", 1.0, 0.0, true),
            ],
        };
        sim.engine.report("a", &report("b", 100.0, 1.0, true), now);
        sim.engine.report("b", &report("a", 120.0, 2.0, true), now);
        let l = &sim.engine.links(now)[0];
        assert_eq!((l.a.as_str(), l.b.as_str()), ("a", "b"));
        assert_eq!(l.rtt_ms, Some(110.0));
        assert_eq!(l.loss, Some(0.02));
        assert_eq!(l.cost_ms, Some(130.0));
        assert!(l.up && l.usable);
        assert_eq!(sim.engine.links(now).len(), 1, "unknown peers are ignored");

        let later = now + Duration::from_secs(6);
        sim.engine
            .report("a", &report("b", 100.0, 1.0, true), later);
        let l = &sim.engine.links(later)[0];
        assert_eq!(l.reported_by, ["a"]);
        assert_eq!(
            (l.rtt_ms, l.loss, l.age_s),
            (Some(100.0), Some(0.01), Some(0.0))
        );
    }

    #[test]
    fn overrides_are_validated_unordered_and_cleared() {
        let mut engine = PathEngine::new(PathConfig::default());
        let o = LinkOverride {
            disabled: true,
            weight_ms: Some(3.0),
            pin: Some(via("azure")),
        };
        engine
            .set_override("gcp", "aws", Some(o.clone()))
            .expect("valid");
        assert_eq!(engine.override_for("aws", "gcp"), Some(&o));
        let all: Vec<_> = engine.overrides().collect();
        assert_eq!(all, [("aws", "gcp", &o)]);
        assert_eq!(
            engine.links(Instant::now()).len(),
            1,
            "an override alone is listed"
        );

        engine
            .set_override("aws", "gcp", Some(LinkOverride::default()))
            .expect("default");
        assert_eq!(
            engine.override_for("gcp", "aws"),
            None,
            "the default is no override"
        );
        engine.set_override("aws", "gcp", Some(o)).expect("valid");
        engine.set_override("aws", "gcp", None).expect("clear");
        assert_eq!(engine.overrides().count(), 0);

        let err = engine.set_override("aws", "aws", None).expect_err("self");
        assert_eq!(err, OverrideError::SelfLink("aws".into()));
        let through_end = LinkOverride {
            pin: Some(via("gcp")),
            ..LinkOverride::default()
        };
        let err = engine
            .set_override("aws", "gcp", Some(through_end))
            .expect_err("pin via an end");
        assert!(
            err.to_string().contains("pin \"direct\" or a third node"),
            "{err}"
        );
        let negative = LinkOverride {
            weight_ms: Some(-1.0),
            ..LinkOverride::default()
        };
        let err = engine
            .set_override("aws", "gcp", Some(negative))
            .expect_err("negative");
        assert!(err.to_string().contains("weight_ms = -1"), "{err}");
    }

    #[test]
    fn link_override_json_is_stable() {
        let o: LinkOverride = serde_json::from_str(r#"{"pin":{"transit":"azure"}}"#).expect("json");
        assert_eq!(o.pin, Some(via("azure")));
        assert!(!o.disabled);
        let o: LinkOverride =
            serde_json::from_str(r#"{"pin":"direct","disabled":true}"#).expect("json");
        assert_eq!(o.pin, Some(Via::Direct));
        assert_eq!(
            serde_json::to_string(&LinkOverride::default()).expect("json"),
            r#"{"disabled":false}"#
        );
        assert!(serde_json::from_str::<LinkOverride>(r#"{"disable":true}"#).is_err());
    }

    #[test]
    fn config_validation_names_the_field() {
        assert_eq!(PathConfig::default().validate(), Ok(()));
        let bad_ratio = PathConfig {
            switch_ratio: 1.5,
            ..PathConfig::default()
        };
        assert!(bad_ratio
            .validate()
            .expect_err("ratio")
            .to_string()
            .starts_with("switch_ratio = 1.5"));
        let weight = |a: &str, b: &str, weight_ms| LinkWeight {
            a: a.into(),
            b: b.into(),
            weight_ms,
        };
        let cases = [
            (
                vec![weight("aws", "aws", 1.0)],
                "link aws-aws joins a node to itself",
            ),
            (vec![weight("aws", "gcp", f64::NAN)], "weight_ms = NaN"),
            (
                vec![weight("aws", "gcp", 1.0), weight("gcp", "aws", 2.0)],
                "listed twice (1 ms and 2 ms)",
            ),
        ];
        for (weights, message) in cases {
            let config = PathConfig {
                weights,
                ..PathConfig::default()
            };
            let err = config.validate().expect_err(message).to_string();
            assert!(err.contains(message), "{err}");
        }
        let negative = PathConfig {
            loss_penalty_ms: -1.0,
            ..PathConfig::default()
        };
        assert!(negative
            .validate()
            .expect_err("negative")
            .to_string()
            .starts_with("loss_penalty_ms = -1"));
    }

    #[test]
    fn fifty_node_full_mesh_recomputes_quickly() {
        let names: Vec<String> = (0..50).map(|i| format!("n{i:02}")).collect();
        let nodes: Vec<(&str, bool)> = names.iter().map(|n| (n.as_str(), true)).collect();
        let mut sim = Sim::new(&nodes, PathConfig::default());
        let mut rng = StdRng::seed_from_u64(7);
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                sim.link(a, b, rng.gen_range(5.0..300.0), rng.gen_range(0.0..2.0));
            }
        }
        sim.report_all();
        let started = Instant::now();
        let changed = sim.engine.recompute(sim.now);
        let elapsed = started.elapsed();
        assert_eq!(changed.len(), 50);
        assert!(
            elapsed < Duration::from_secs(1),
            "recompute took {elapsed:?}"
        );
        for p in sim.engine.pairs(sim.now) {
            assert!(p.primary_cost_ms.is_some(), "{p:?}");
            assert_eq!(sim.primary(&p.a, &p.b).label(), p.primary);
        }
    }
}
