//! The engine: takes membership, reports, overrides and the time, and decides
//! again only the pairs whose inputs changed.
//!
//! A pair's decision depends on its own state, the cost of its direct link,
//! the costs of the two links through each transit node, its pin, and the
//! time while a challenger is held. So:
//! - a link whose cost changes makes its own pair dirty, and, when an end is a
//!   transit, every pair that can go through that end over this link;
//! - a transit node coming, going or changing makes every pair dirty (rare);
//! - a new node makes its own pairs dirty; a node leaving, the pairs whose
//!   decision names it;
//! - timers make a pair dirty when its challenger's hold ends, and a silent
//!   reporter's links when its reports go stale.
//!
//! Nothing else is looked at: steady state costs nothing but the timers.

use super::config::{is_cost, via_text, LinkOverride, OverrideError, PairMap, PathConfig};
use super::shared::{Hop, SharedPath};
use super::table::{
    self, slot, table_len, Chunked, Id, Nodes, PairState, Route, Sides, ADJUSTED, CHALLENGED,
    DIRECT, DIRTY, NO_ROUTE,
};
use rustc_hash::FxHashMap;
use skymesh_wire::{LinkReport, LinkSample, PathSpec, Via};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

/// Chooses primary and backup paths for every pair of nodes. See the module
/// docs of [`crate::paths`].
#[derive(Debug)]
pub struct PathEngine {
    pub(super) config: PathConfig,
    pub(super) nodes: Nodes,
    /// Per pair: the link's sides, its usable cost (NaN: unusable), the decision.
    pub(super) sides: Chunked<Sides>,
    /// The usable cost of each link, NaN if paths may not use it (f32: 4
    /// bytes a pair; 24 bits of mantissa keep a cost to about a ten-millionth
    /// of itself, under 0.2 µs up to a second).
    pub(super) costs: Chunked<f32>,
    pub(super) pairs: Chunked<PairState>,
    pub(super) overrides: PairMap<LinkOverride>,
    pub(super) weights: PairMap<f64>,
    /// Pairs with a path clearly cheaper than their primary, and since when.
    pub(super) challengers: FxHashMap<usize, Challenger>,
    /// What each pair's last change was and why, for the pairs that changed,
    /// by slot; worded only when the API asks.
    pub(super) last_change: FxHashMap<u32, Change>,
    /// The same, worded, for changes naming a node whose id was freed (the
    /// id may name another node later).
    pub(super) last_change_text: FxHashMap<u32, Box<str>>,
    dirty: Vec<(Id, Id)>,
    all_dirty: bool,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    /// Nodes removed since the last recompute; freed by it.
    leaving: Vec<Id>,
    /// A node left since the last recompute: every other node's list shrank.
    removed: bool,
    /// Pairs whose path list entry changed in the last recompute, new pairs
    /// included.
    changed: Vec<(Id, Id)>,
    /// The same without new pairs decided direct with no backup: an agent
    /// reaches a new peer directly until told otherwise, so those need no
    /// message.
    published: Vec<(Id, Id)>,
    epoch: Option<Instant>,
    scratch: Vec<Candidate>,
    /// Pair decisions made so far.
    decisions: u64,
}

/// A path clearly cheaper than the primary, and since when it has been.
#[derive(Debug, Clone, Copy)]
pub(super) struct Challenger {
    pub(super) route: Route,
    pub(super) since: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// The challenger of pair `{lo, hi}` set at `since` has been held long enough.
    Hold { lo: Id, hi: Id, since: Instant },
    /// The reports of a node that is not live go stale (generation `gen`).
    Stale { node: Id, gen: u32 },
    /// A node whose session started has not reported a link for a hold: its
    /// pairs stop waiting for it (wait generation `gen`).
    Await { node: Id, gen: u32 },
}

/// One usable way for a pair to go, and what it costs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Candidate {
    pub(super) route: Route,
    pub(super) cost: f64,
    /// Ties go to direct, then to the transit whose name sorts first.
    rank: u32,
}

impl PathEngine {
    /// `config` should have passed [`PathConfig::validate`]; of duplicate
    /// weights the last wins.
    pub fn new(config: PathConfig) -> Self {
        let mut weights = PairMap::default();
        for w in &config.weights {
            weights.insert(&w.a, &w.b, w.weight_ms);
        }
        Self {
            config,
            nodes: Nodes::default(),
            sides: Chunked::default(),
            costs: Chunked::default(),
            pairs: Chunked::default(),
            overrides: PairMap::default(),
            weights,
            challengers: FxHashMap::default(),
            last_change: FxHashMap::default(),
            last_change_text: FxHashMap::default(),
            dirty: Vec::new(),
            all_dirty: false,
            timers: BinaryHeap::new(),
            leaving: Vec::new(),
            removed: false,
            changed: Vec::new(),
            published: Vec::new(),
            epoch: None,
            scratch: Vec::new(),
            decisions: 0,
        }
    }

    // ---- membership ----

    /// Sets the whole membership: each node's name and whether it may transit.
    /// The same as [`upsert_node`](Self::upsert_node) for each and
    /// [`remove_node`](Self::remove_node) for every member left out.
    pub fn set_nodes(&mut self, nodes: impl IntoIterator<Item = (String, bool)>) {
        let wanted: BTreeMap<String, bool> = nodes.into_iter().collect();
        let gone: Vec<String> = self
            .nodes
            .members()
            .filter(|(name, _)| !wanted.contains_key(*name))
            .map(|(name, _)| name.to_string())
            .collect();
        for name in gone {
            self.remove_node(&name);
        }
        for (name, transit) in wanted {
            self.upsert_node(&name, transit);
        }
    }

    /// Adds a node, or changes whether it may transit.
    pub fn upsert_node(&mut self, name: &str, transit: bool) {
        if let Some(id) = self.nodes.id(name) {
            if self.nodes.is_transit(id) != transit {
                self.nodes.set_transit(id, transit);
                self.all_dirty = true;
            }
            return;
        }
        let (id, reused) = self.nodes.insert(name, transit);
        let len = table_len(self.nodes.capacity());
        if reused {
            for other in 0..self.nodes.capacity() as Id {
                if other != id {
                    let s = slot(id, other);
                    self.sides[s] = Sides::default();
                    self.costs[s] = f32::NAN;
                    self.pairs[s] = PairState::default();
                    self.challengers.remove(&s);
                    self.forget_change(s);
                }
            }
        } else {
            self.sides.grow(len, Sides::default());
            self.costs.grow(len, f32::NAN);
            self.pairs.grow(len, PairState::default());
        }
        // Overrides and weights may name the node before it joins.
        let adjusted: Vec<(String, String)> = self
            .overrides
            .iter()
            .map(|(a, b, _)| (a.to_string(), b.to_string()))
            .chain(
                self.weights
                    .iter()
                    .map(|(a, b, _)| (a.to_string(), b.to_string())),
            )
            .filter(|(a, b)| a == name || b == name)
            .collect();
        for (a, b) in adjusted {
            if let (Some(x), Some(y)) = (self.nodes.id(&a), self.nodes.id(&b)) {
                self.sides[slot(x, y)].flags |= ADJUSTED;
            }
        }
        if transit {
            self.all_dirty = true;
        }
        let others: Vec<Id> = self
            .nodes
            .members()
            .map(|(_, o)| o)
            .filter(|o| *o != id)
            .collect();
        for other in others {
            self.mark(id, other);
        }
    }

    /// Removes a node: its reports are forgotten at once; the pairs whose
    /// decision goes through it are decided again at the next recompute, and its
    /// own pairs vanish. Overrides naming it stay (they belong to the store).
    pub fn remove_node(&mut self, name: &str) {
        let Some(id) = self.nodes.id(name) else {
            return;
        };
        let was_transit = self.nodes.is_transit(id);
        self.nodes.leave(id);
        self.leaving.push(id);
        self.removed = true;
        for other in 0..self.nodes.capacity() as Id {
            if other != id {
                let s = slot(id, other);
                self.sides[s].flags &= !(table::PRESENT[0] | table::PRESENT[1]);
                self.costs[s] = f32::NAN;
            }
        }
        if was_transit {
            self.all_dirty = true;
            return;
        }
        // A pair may still name a node that lost its transit role while nothing
        // else was usable; find those (rare, so a scan).
        let cap = self.nodes.capacity() as Id;
        for hi in 1..cap {
            for lo in 0..hi {
                let p = &self.pairs[slot(lo, hi)];
                if p.primary == id || p.backup == id {
                    self.mark(lo, hi);
                }
            }
        }
        let named: Vec<usize> = self
            .challengers
            .iter()
            .filter(|(_, c)| c.route == id)
            .map(|(s, _)| *s)
            .collect();
        for s in named {
            self.drop_challenger(s);
        }
    }

    /// Whether `name`'s session is up. While it is, what it reported stays
    /// current however long it is silent; from the moment it ends, its
    /// reports go stale after `stale_after`.
    ///
    /// From the session's start until the node reports a link (at most the
    /// hold, or until the session ends), the node's pairs keep what they
    /// have: a node that joins is decided once, with its own links to the
    /// transits known, instead of on the direct link its peers measured
    /// first and again, through a transit, a hold later. An agent reports
    /// its links about a second after it gets its netmap.
    pub fn set_live(&mut self, name: &str, live: bool, now: Instant) {
        let Some(id) = self.nodes.id(name) else {
            return;
        };
        self.epoch.get_or_insert(now);
        let Some(node) = self.nodes.get_mut(id) else {
            return;
        };
        if node.live == live {
            return;
        }
        node.live = live;
        let was_awaiting = std::mem::replace(&mut node.awaiting, live);
        if live {
            node.await_gen = node.await_gen.wrapping_add(1);
            let gen = node.await_gen;
            self.timers.push(Reverse((
                now + self.config.hold,
                Timer::Await { node: id, gen },
            )));
            self.heard(id, now);
        } else {
            if was_awaiting {
                self.mark_pairs_of(id);
            }
            let Some(node) = self.nodes.get_mut(id) else {
                return;
            };
            node.heard_at = Some(now);
            node.stale_gen = node.stale_gen.wrapping_add(1);
            let gen = node.stale_gen;
            self.timers.push(Reverse((
                now + self.config.stale_after,
                Timer::Stale { node: id, gen },
            )));
        }
    }

    // ---- reports ----

    /// Takes `from`'s whole report: it replaces everything `from` reported
    /// before, so a peer it leaves out has no measurement from `from` any
    /// more. Reports from unknown nodes and samples about unknown peers are
    /// ignored. A sample that does not differ materially from the one held
    /// ([`LinkSample::differs_materially`]) changes nothing.
    pub fn report(&mut self, from: &str, report: &LinkReport, now: Instant) {
        let Some(id) = self.nodes.id(from) else {
            return;
        };
        self.heard(id, now);
        let cap = self.nodes.capacity();
        let mut seen = vec![false; cap];
        let mut any = false;
        for s in &report.links {
            if let Some(peer) = self.nodes.id(&s.peer).filter(|p| *p != id) {
                seen[peer as usize] = true;
                any = true;
                self.take_sample(id, peer, s);
            }
        }
        if any {
            self.stop_awaiting(id);
        }
        for (peer, seen) in seen.iter().enumerate() {
            let peer = peer as Id;
            if *seen || peer == id {
                continue;
            }
            let s = slot(id, peer);
            let side = side_of(id, peer);
            if self.sides[s].has(side) {
                self.sides[s].clear(side);
                self.refresh_link(id, peer);
            }
        }
    }

    /// Takes the samples of `from` that changed; the others it reported stay.
    pub fn report_changes(&mut self, from: &str, changed: &[LinkSample], now: Instant) {
        let Some(id) = self.nodes.id(from) else {
            return;
        };
        self.heard(id, now);
        let mut any = false;
        for s in changed {
            if let Some(peer) = self.nodes.id(&s.peer).filter(|p| *p != id) {
                any = true;
                self.take_sample(id, peer, s);
            }
        }
        if any {
            self.stop_awaiting(id);
        }
    }

    fn take_sample(&mut self, from: Id, peer: Id, sample: &LinkSample) {
        let s = slot(from, peer);
        let side = side_of(from, peer);
        if self.sides[s].differs(side, sample) {
            self.sides[s].set(side, sample);
            self.refresh_link(from, peer);
        }
    }

    /// `id` was heard from at `now`.
    fn heard(&mut self, id: Id, now: Instant) {
        self.epoch.get_or_insert(now);
        let stale_after = self.config.stale_after;
        let Some(node) = self.nodes.get_mut(id) else {
            return;
        };
        node.heard_at = Some(now);
        let was_fresh = std::mem::replace(&mut node.fresh, true);
        if !node.live {
            node.stale_gen = node.stale_gen.wrapping_add(1);
            let gen = node.stale_gen;
            self.timers
                .push(Reverse((now + stale_after, Timer::Stale { node: id, gen })));
        }
        if !was_fresh {
            self.refresh_links_of(id);
        }
    }

    /// `id`'s pairs stop waiting for its links (see [`Self::set_live`]).
    fn stop_awaiting(&mut self, id: Id) {
        let waited = self
            .nodes
            .get_mut(id)
            .is_some_and(|n| std::mem::take(&mut n.awaiting));
        if waited {
            self.mark_pairs_of(id);
        }
    }

    /// Queues every pair of `id` for a decision.
    fn mark_pairs_of(&mut self, id: Id) {
        if self.all_dirty {
            return;
        }
        for other in 0..self.nodes.capacity() as Id {
            if other != id && self.nodes.is_member(other) {
                self.mark(id, other);
            }
        }
    }

    fn refresh_links_of(&mut self, id: Id) {
        for other in 0..self.nodes.capacity() as Id {
            if other != id && self.nodes.is_member(other) {
                self.refresh_link(id, other);
            }
        }
    }

    // ---- overrides ----

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
        match o {
            None => {
                self.overrides.remove(a, b);
            }
            Some(o) => {
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
                self.overrides.insert(a, b, o);
            }
        }
        if let (Some(x), Some(y)) = (self.nodes.id(a), self.nodes.id(b)) {
            let s = slot(x, y);
            self.sides[s].flags |= ADJUSTED;
            self.refresh_link(x, y);
            self.mark(x, y);
        }
        Ok(())
    }

    /// The override of link `a`-`b`, in either order.
    pub fn override_for(&self, a: &str, b: &str) -> Option<&LinkOverride> {
        self.overrides.get(a, b)
    }

    /// Every override as `(a, b, override)` with `a < b`, sorted.
    pub fn overrides(&self) -> impl Iterator<Item = (&str, &str, &LinkOverride)> + '_ {
        self.overrides.iter()
    }

    // ---- link state ----

    /// The override and configured weight of link `{x, y}`: (disabled, weight).
    pub(super) fn adjustment(&self, x: Id, y: Id) -> (bool, f64, Option<&LinkOverride>) {
        if self.sides[slot(x, y)].flags & ADJUSTED == 0 {
            return (false, 0.0, None);
        }
        let (a, b) = (self.nodes.name(x), self.nodes.name(y));
        let o = self.overrides.get(a, b);
        let weight = o
            .and_then(|o| o.weight_ms)
            .or_else(|| self.weights.get(a, b).copied())
            .unwrap_or(0.0);
        (o.is_some_and(|o| o.disabled), weight, o)
    }

    /// The link's measurement from its fresh sides, as of the last recompute.
    pub(super) fn measurement(&self, x: Id, y: Id) -> Measurement {
        self.measurement_at(x, y, None)
    }

    /// Whether `id`'s reports count: as of the last recompute, or at `at`.
    pub(super) fn is_fresh(&self, id: Id, at: Option<Instant>) -> bool {
        let Some(node) = self.nodes.get(id) else {
            return false;
        };
        match at {
            None => node.fresh,
            Some(now) => {
                node.live
                    || node.heard_at.is_some_and(|h| {
                        now.saturating_duration_since(h) <= self.config.stale_after
                    })
            }
        }
    }

    /// The link's measurement from the sides fresh at `at` (None: as of the
    /// last recompute, which is what decisions use).
    pub(super) fn measurement_at(&self, x: Id, y: Id, at: Option<Instant>) -> Measurement {
        let (lo, hi) = if x < y { (x, y) } else { (y, x) };
        let sides = &self.sides[slot(lo, hi)];
        let mut fresh = [false; 2];
        for (side, reporter) in [(0, lo), (1, hi)] {
            fresh[side] = sides.has(side) && self.is_fresh(reporter, at);
        }
        let count = fresh.iter().filter(|f| **f).count();
        if count == 0 {
            return if sides.has(0) || sides.has(1) {
                Measurement::Stale
            } else {
                Measurement::Never
            };
        }
        let fresh_sides = || (0..2).filter(|s| fresh[*s]);
        let sum = |v: &[u32; 2]| fresh_sides().map(|s| f64::from(v[s])).sum::<f64>();
        let n = count as f64;
        Measurement::Fresh(Metrics {
            up: fresh_sides().all(|s| sides.flags & table::UP[s] != 0),
            rtt_ms: sum(&sides.rtt_us) / n / 1000.0,
            jitter_ms: sum(&[sides.jitter_us(0), sides.jitter_us(1)]) / n / 1000.0,
            loss: fresh_sides()
                .map(|s| sides.loss_ppm[s])
                .max()
                .map_or(0.0, f64::from)
                / 1e6,
        })
    }

    /// [`cost_ms`](Self::cost_ms) with the sides fresh at `at`.
    pub(super) fn cost_at(&self, x: Id, y: Id, at: Option<Instant>) -> Option<f64> {
        match self.measurement_at(x, y, at) {
            Measurement::Fresh(m) => {
                let (_, weight, _) = self.adjustment(x, y);
                Some(m.rtt_ms + m.loss * 100.0 * self.config.loss_penalty_ms + weight)
            }
            Measurement::Never | Measurement::Stale => None,
        }
    }

    /// The cost of the link if paths may use it.
    pub(super) fn usable_cost(&self, x: Id, y: Id) -> Option<f64> {
        let c = self.costs[slot(x, y)];
        (!c.is_nan()).then_some(f64::from(c))
    }

    /// The cost of `{x, y}` (slot `s`) if paths may use it, else NaN: what
    /// [`cost_at`](Self::cost_at) gives for a fresh link that is up and not
    /// disabled, computed in one pass (this runs for every sample taken).
    fn usable_now(&self, x: Id, y: Id, s: usize) -> f64 {
        let (lo, hi) = if x < y { (x, y) } else { (y, x) };
        let sides = &self.sides[s];
        let fresh =
            |side: usize, id: Id| sides.has(side) && self.nodes.get(id).is_some_and(|n| n.fresh);
        let f = [fresh(0, lo), fresh(1, hi)];
        let n = usize::from(f[0]) + usize::from(f[1]);
        if n == 0 || (0..2).any(|side| f[side] && sides.flags & table::UP[side] == 0) {
            return f64::NAN;
        }
        let mut weight = 0.0;
        if sides.flags & ADJUSTED != 0 {
            let (disabled, w, _) = self.adjustment(x, y);
            if disabled {
                return f64::NAN;
            }
            weight = w;
        }
        let n = n as f64;
        let rtt: f64 = (0..2)
            .filter(|side| f[*side])
            .map(|side| f64::from(sides.rtt_us[side]))
            .sum();
        let loss = (0..2)
            .filter(|side| f[*side])
            .map(|side| sides.loss_ppm[side])
            .max()
            .map_or(0.0, f64::from)
            / 1e6;
        rtt / n / 1000.0 + loss * 100.0 * self.config.loss_penalty_ms + weight
    }

    /// Recomputes the cached usable cost of `{x, y}`; on a change, marks the
    /// pairs that can use the link.
    fn refresh_link(&mut self, x: Id, y: Id) {
        let s = slot(x, y);
        let new = self.usable_now(x, y, s);
        debug_assert_eq!(
            new.to_bits(),
            match self.measurement(x, y) {
                Measurement::Fresh(m) if m.up && !self.adjustment(x, y).0 =>
                    self.cost_at(x, y, None),
                _ => None,
            }
            .unwrap_or(f64::NAN)
            .to_bits(),
            "the one-pass cost of {x}-{y} differs from the measured one"
        );
        let new = if new.is_nan() { f32::NAN } else { new as f32 };
        let old = self.costs[s];
        if old.to_bits() == new.to_bits() {
            return;
        }
        self.costs[s] = new;
        self.mark(x, y);
        if self.all_dirty {
            return;
        }
        for (end, other) in [(x, y), (y, x)] {
            if self.nodes.is_transit(end) {
                // Every pair {n, other} may go through `end` over this link;
                // those for which that way does not matter are left alone.
                for n in 0..self.nodes.capacity() as Id {
                    if n != end
                        && n != other
                        && self.nodes.is_member(n)
                        && self.transit_matters(n, other, end)
                    {
                        self.mark(n, other);
                    }
                }
            }
        }
    }

    /// Whether a change of the cost of going from `a` to `b` through transit
    /// `t` can change the pair's decision: the way through `t` is part of it
    /// (primary, backup, challenger, pin), the decision is incomplete (no
    /// backup, no usable primary), or the way is now no dearer than the backup.
    /// Otherwise it is neither the cheapest path nor the cheapest alternative,
    /// before or after, and deciding the pair again would change nothing (the
    /// property test holds this against a full recompute).
    fn transit_matters(&self, a: Id, b: Id, t: Id) -> bool {
        let s = slot(a, b);
        let st = &self.pairs[s];
        if self.sides[s].flags & DIRTY != 0 {
            return false;
        }
        if !st.decided()
            || !st.chosen()
            || st.primary == t
            || st.backup == t
            || st.backup == NO_ROUTE
            || self.sides[s].flags & ADJUSTED != 0
            || (self.sides[s].flags & CHALLENGED != 0
                && self.challengers.get(&s).is_some_and(|c| c.route == t))
        {
            return true;
        }
        if self.route_cost(a, b, st.primary).is_none() {
            return true;
        }
        let Some(through) = self.route_cost(a, b, t) else {
            return false;
        };
        match self.route_cost(a, b, st.backup) {
            Some(backup) => through <= backup,
            None => true,
        }
    }

    /// The cost of going from `a` to `b` by `route`, if usable.
    fn route_cost(&self, a: Id, b: Id, route: Route) -> Option<f64> {
        if route == DIRECT {
            return self.usable_cost(a, b);
        }
        if route == NO_ROUTE || route == a || route == b || !self.nodes.is_transit(route) {
            return None;
        }
        Some(
            self.usable_cost(a, route)?
                + self.usable_cost(route, b)?
                + self.config.transit_penalty_ms,
        )
    }

    /// Forgets the pair's challenger, if it has one.
    fn drop_challenger(&mut self, s: usize) {
        if self.sides[s].flags & CHALLENGED != 0 {
            self.sides[s].flags &= !CHALLENGED;
            self.challengers.remove(&s);
        }
    }

    fn mark(&mut self, a: Id, b: Id) {
        let s = slot(a, b);
        if self.sides[s].flags & DIRTY == 0 {
            self.sides[s].flags |= DIRTY;
            self.dirty.push(if a < b { (a, b) } else { (b, a) });
        }
    }

    // ---- decisions ----

    /// Decides again every pair whose inputs changed, and those whose timers
    /// are due at `now`; returns the names of the nodes whose path list
    /// ([`paths_for`](Self::paths_for)) changed since the previous call (every
    /// node on the first call), sorted.
    pub fn recompute(&mut self, now: Instant) -> Vec<String> {
        let removed = self.removed;
        self.decide_due(now);
        let mut names: Vec<String> = if removed {
            self.nodes.members().map(|(n, _)| n.to_string()).collect()
        } else {
            let mut ids: Vec<Id> = self.changed.iter().flat_map(|(a, b)| [*a, *b]).collect();
            ids.sort_unstable();
            ids.dedup();
            ids.iter()
                .map(|id| self.nodes.name(*id).to_string())
                .collect()
        };
        names.sort();
        names
    }

    /// [`recompute`](Self::recompute), then each changed path as the node it
    /// is for and its new spec (two per changed pair), for the nodes `wanted`
    /// keeps. Specs are built as they are taken: after a burst (a node joining
    /// a mesh of thousands) there are millions, and only those for connected
    /// nodes are needed.
    pub fn recompute_paths<'a>(
        &'a mut self,
        now: Instant,
        wanted: impl Fn(&str) -> bool + 'a,
    ) -> impl Iterator<Item = (&'a str, SharedPath)> + 'a {
        self.decide_due(now);
        let this = &*self;
        this.published
            .iter()
            .flat_map(|(a, b)| [(*a, *b), (*b, *a)])
            .filter(move |(from, _)| wanted(this.nodes.name(*from)))
            .map(move |(from, to)| (this.nodes.name(from), this.shared_spec(from, to)))
    }

    /// Decides every pair again, as if every input had changed: what the
    /// incremental decisions must always agree with.
    pub fn recompute_from_scratch(&mut self, now: Instant) -> Vec<String> {
        self.all_dirty = true;
        self.recompute(now)
    }

    /// When the next timer is due, if any: a recompute before then with no
    /// new input decides nothing.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Pairs queued for a decision (for the engine's metrics).
    pub fn pending(&self) -> usize {
        if self.all_dirty {
            table_len(self.nodes.member_count())
        } else {
            self.dirty.len()
        }
    }

    fn decide_due(&mut self, now: Instant) {
        self.epoch.get_or_insert(now);
        // A burst (a node joining thousands) must not pin its size.
        for v in [&mut self.changed, &mut self.published] {
            v.clear();
            v.shrink_to(1 << 12);
        }
        if self.challengers.capacity() > 4 * self.challengers.len() + 1024 {
            self.challengers.shrink_to(2 * self.challengers.len());
        }
        self.fire_timers(now);
        if std::mem::take(&mut self.all_dirty) {
            for (a, b) in std::mem::take(&mut self.dirty) {
                self.sides[slot(a, b)].flags &= !DIRTY;
            }
            let members: Vec<Id> = self.nodes.members().map(|(_, id)| id).collect();
            for (i, &a) in members.iter().enumerate() {
                for &b in &members[i + 1..] {
                    self.decide(a, b, now);
                }
            }
        } else {
            let dirty = std::mem::take(&mut self.dirty);
            for &(a, b) in &dirty {
                self.sides[slot(a, b)].flags &= !DIRTY;
            }
            for (a, b) in dirty {
                if self.nodes.is_member(a) && self.nodes.is_member(b) {
                    self.decide(a, b, now);
                }
            }
        }
        self.removed = false;
        for id in std::mem::take(&mut self.leaving) {
            for other in 0..self.nodes.capacity() as Id {
                if other != id {
                    let s = slot(id, other);
                    self.sides[s] = Sides::default();
                    self.costs[s] = f32::NAN;
                    self.pairs[s] = PairState::default();
                    self.challengers.remove(&s);
                    self.forget_change(s);
                }
            }
            self.word_changes_naming(id);
            self.nodes.free(id);
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            let due = match timer {
                Timer::Hold { .. } => now >= at,
                // Strict as stale timers, which sort before at the same instant.
                Timer::Stale { .. } | Timer::Await { .. } => now > at,
            };
            if !due {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Hold { lo, hi, since } => {
                    let current = self
                        .challengers
                        .get(&slot(lo, hi))
                        .is_some_and(|c| c.since == since);
                    if current && self.nodes.is_member(lo) && self.nodes.is_member(hi) {
                        self.mark(lo, hi);
                    }
                }
                Timer::Await { node, gen } => {
                    let current = self
                        .nodes
                        .get(node)
                        .is_some_and(|n| n.member && n.await_gen == gen);
                    if current {
                        self.stop_awaiting(node);
                    }
                }
                Timer::Stale { node, gen } => {
                    let stale = self
                        .nodes
                        .get(node)
                        .is_some_and(|n| n.member && !n.live && n.stale_gen == gen && n.fresh);
                    if stale {
                        if let Some(n) = self.nodes.get_mut(node) {
                            n.fresh = false;
                        }
                        self.refresh_links_of(node);
                    }
                }
            }
        }
    }

    /// The usable paths of `{i, j}`, cheapest first, into `out`.
    pub(super) fn candidates(&self, i: Id, j: Id, out: &mut Vec<Candidate>) {
        out.clear();
        if let Some(cost) = self.usable_cost(i, j) {
            out.push(Candidate {
                route: DIRECT,
                cost,
                rank: 0,
            });
        }
        for (rank, &t) in self.nodes.transits().iter().enumerate() {
            if t == i || t == j {
                continue;
            }
            if let (Some(x), Some(y)) = (self.usable_cost(i, t), self.usable_cost(t, j)) {
                out.push(Candidate {
                    route: t,
                    cost: x + y + self.config.transit_penalty_ms,
                    rank: rank as u32 + 1,
                });
            }
        }
        out.sort_by(|x, y| x.cost.total_cmp(&y.cost).then(x.rank.cmp(&y.rank)));
    }

    /// The pair's pin as a route: `Some(None)` for a pin through a node that
    /// is not a member.
    pub(super) fn pin(&self, i: Id, j: Id) -> Option<(Via, Option<Route>)> {
        let (_, _, o) = self.adjustment(i, j);
        let via = o?.pin.clone()?;
        let route = match &via {
            Via::Direct => Some(DIRECT),
            Via::Transit(name) => self.nodes.id(name),
        };
        Some((via, route))
    }

    fn ds(&self, now: Instant) -> u32 {
        let epoch = self.epoch.unwrap_or(now);
        let ds = now.saturating_duration_since(epoch).as_millis() / 100;
        u32::try_from(ds).unwrap_or(u32::MAX)
    }

    /// Chooses the primary and backup of `{i, j}`; records whether the
    /// published path changed.
    fn decide(&mut self, i: Id, j: Id, now: Instant) {
        let s = slot(i, j);
        debug_assert_eq!(
            self.sides[s].flags & CHALLENGED != 0,
            self.challengers.contains_key(&s),
            "the challenged flag of {i}-{j} disagrees with the challengers"
        );
        if self.nodes.get(i).is_some_and(|n| n.awaiting)
            || self.nodes.get(j).is_some_and(|n| n.awaiting)
        {
            // Decided when the node reports its links (see `set_live`).
            return;
        }
        self.decisions += 1;
        let mut cands = std::mem::take(&mut self.scratch);
        self.candidates(i, j, &mut cands);
        let find = |route: Route| cands.iter().copied().find(|c| c.route == route);
        let mut st = self.pairs[s];
        let before = (st.primary, st.backup, st.decided());
        if !st.decided() {
            st.since_ds = self.ds(now);
            st.set_decided();
        }
        let current = find(st.primary);
        let pinned = self.pin(i, j).and_then(|(_, r)| r).and_then(find);
        let best = cands.first().copied();

        // The new primary (None: nothing is usable) and, for a switch, why.
        let (primary, why) = if let Some(p) = pinned {
            (Some(p), Some(Why::Pinned))
        } else {
            match (current, best) {
                (_, None) => (None, None),
                (Some(cur), Some(best)) if st.chosen() => self.hysteresis(s, i, j, cur, best, now),
                (None, Some(best)) if st.chosen() => (Some(best), Some(Why::Unusable)),
                (_, Some(best)) => (Some(best), None),
            }
        };
        if primary.is_none() || pinned.is_some() {
            self.drop_challenger(s);
        }

        match primary {
            Some(p) => {
                if p.route != st.primary {
                    if st.chosen() {
                        st.count_change();
                        let change = self.change(i, j, st.primary, p.route, why);
                        self.record_change(s, change);
                    }
                    st.primary = p.route;
                    st.since_ds = self.ds(now);
                    self.drop_challenger(s);
                }
                st.set_chosen(true);
            }
            None if st.primary != DIRECT && !self.nodes.is_member(st.primary) => {
                // Nothing is usable and the primary went through a node that
                // left: an agent drops such a path, so say what it does.
                st.count_change();
                let change = Change::new(st.primary, DIRECT, ChangeWhy::Left);
                self.record_change(s, change);
                st.primary = DIRECT;
                st.since_ds = self.ds(now);
                st.set_chosen(false);
            }
            None => {}
        }

        let primary_route = primary.map(|p| p.route);
        let best_other = cands
            .iter()
            .copied()
            .find(|c| Some(c.route) != primary_route);
        let kept_backup = find(st.backup).filter(|c| Some(c.route) != primary_route);
        let backup = match (kept_backup, best_other) {
            (Some(kept), Some(other)) if !self.config.beats(other.cost, kept.cost) => Some(kept),
            (_, other) => other,
        };
        st.backup = backup.map_or(NO_ROUTE, |c| c.route);
        self.pairs[s] = st;
        self.scratch = cands;
        if before != (st.primary, st.backup, true) {
            self.changed.push((i, j));
            if before.2 || (st.primary, st.backup) != (DIRECT, NO_ROUTE) {
                self.published.push((i, j));
            }
        }
    }

    /// Keeps the usable primary `cur` unless a challenger has been clearly
    /// cheaper for `hold`. A challenger keeps its timer while it stays clearly
    /// cheaper than the primary, and is replaced only by a path clearly cheaper
    /// than itself, so two near-equal alternatives taking turns at being
    /// cheapest do not keep restarting it.
    fn hysteresis(
        &mut self,
        s: usize,
        i: Id,
        j: Id,
        cur: Candidate,
        best: Candidate,
        now: Instant,
    ) -> (Option<Candidate>, Option<Why>) {
        let cfg = &self.config;
        let challenged = self.sides[s].flags & CHALLENGED != 0;
        let held = challenged
            .then(|| self.challengers.get(&s))
            .flatten()
            .and_then(|ch| {
                let c = Candidate {
                    route: ch.route,
                    cost: self.route_cost(i, j, ch.route)?,
                    rank: 0,
                };
                (c.route != cur.route
                    && cfg.beats(c.cost, cur.cost)
                    && !cfg.beats(best.cost, c.cost))
                .then_some((c, ch.since))
            });
        let (challenger, since) = match held {
            Some(held) => held,
            None if best.route != cur.route && cfg.beats(best.cost, cur.cost) => {
                self.sides[s].flags |= CHALLENGED;
                self.challengers.insert(
                    s,
                    Challenger {
                        route: best.route,
                        since: now,
                    },
                );
                let (lo, hi) = if i < j { (i, j) } else { (j, i) };
                self.timers.push(Reverse((
                    now + self.config.hold,
                    Timer::Hold { lo, hi, since: now },
                )));
                (best, now)
            }
            None => {
                self.drop_challenger(s);
                return (Some(cur), None);
            }
        };
        let held_for = now.saturating_duration_since(since);
        if held_for < self.config.hold {
            return (Some(cur), None);
        }
        (
            Some(challenger),
            Some(Why::Cheaper {
                cost: challenger.cost,
                incumbent: cur.cost,
                held_for,
            }),
        )
    }

    /// The record of a switch of `{i, j}` from `from` to `to`, with what
    /// made `from` unusable worded as it stands now.
    fn change(&self, i: Id, j: Id, from: Route, to: Route, why: Option<Why>) -> Change {
        match why {
            None => Change::new(from, to, ChangeWhy::Plain),
            Some(Why::Pinned) => Change::new(from, to, ChangeWhy::Pinned),
            Some(Why::Unusable) => {
                let (i, j) = self.name_order(i, j);
                Change::new(
                    from,
                    to,
                    ChangeWhy::Unusable(self.unusable_cause(i, j, from)),
                )
            }
            Some(Why::Cheaper {
                cost,
                incumbent,
                held_for,
            }) => {
                let mut c = Change::new(from, to, ChangeWhy::Cheaper);
                c.cost = cost as f32;
                c.incumbent = incumbent as f32;
                c.held_ms = u32::try_from(held_for.as_millis()).unwrap_or(u32::MAX);
                c
            }
        }
    }

    fn record_change(&mut self, s: usize, change: Change) {
        let key = change_key(s);
        self.last_change_text.remove(&key);
        self.last_change.insert(key, change);
    }

    fn forget_change(&mut self, s: usize) {
        let key = change_key(s);
        self.last_change.remove(&key);
        self.last_change_text.remove(&key);
    }

    /// Words, once, the recorded changes that name `id` before its id is
    /// freed (rare: a transit left).
    fn word_changes_naming(&mut self, id: Id) {
        let named: Vec<u32> = self
            .last_change
            .iter()
            .filter(|(_, c)| c.from == id || c.to == id)
            .map(|(k, _)| *k)
            .collect();
        for key in named {
            if let Some(c) = self.last_change.remove(&key) {
                let (i, j) = pair_of_slot(key as usize);
                let text = self.change_text(i, j, &c);
                self.last_change_text.insert(key, text.into_boxed_str());
            }
        }
    }

    /// The last change of `{i, j}`, worded.
    pub(super) fn last_change_of(&self, i: Id, j: Id) -> Option<String> {
        let key = change_key(slot(i, j));
        if let Some(t) = self.last_change_text.get(&key) {
            return Some(t.to_string());
        }
        self.last_change
            .get(&key)
            .map(|c| self.change_text(i, j, c))
    }

    fn change_text(&self, i: Id, j: Id, c: &Change) -> String {
        let (i, j) = self.name_order(i, j);
        let from = via_text(&self.via(c.from));
        let to = via_text(&self.via(c.to));
        match c.why {
            ChangeWhy::Plain => format!("{from} -> {to}: "),
            ChangeWhy::Pinned => format!("{from} -> {to}: pinned by operator"),
            ChangeWhy::Unusable(cause) => format!(
                "{from} -> {to}: {from} became unusable ({})",
                self.cause_text(i, j, c.from, cause)
            ),
            ChangeWhy::Cheaper => {
                let (cost, incumbent) = (f64::from(c.cost), f64::from(c.incumbent));
                format!(
                    "{from} -> {to}: {to} was {:.0}% cheaper ({cost:.1} ms vs {incumbent:.1} ms) for {:.1} s",
                    super::config::percent_cheaper(cost, incumbent),
                    f64::from(c.held_ms) / 1000.0
                )
            }
            ChangeWhy::Left => format!(
                "{from} -> {to}: {} left the mesh and no other path is usable",
                self.nodes.name(c.from)
            ),
        }
    }

    /// `{i, j}` with the end whose name sorts first first (the wording's order).
    pub(super) fn name_order(&self, i: Id, j: Id) -> (Id, Id) {
        if self.nodes.name(i) <= self.nodes.name(j) {
            (i, j)
        } else {
            (j, i)
        }
    }

    // ---- what agents get ----

    pub(super) fn via(&self, route: Route) -> Via {
        if route == DIRECT {
            Via::Direct
        } else {
            Via::Transit(self.nodes.name(route).to_string())
        }
    }

    fn hop(&self, route: Route) -> Hop {
        if route == DIRECT {
            Hop::Direct
        } else {
            Hop::Transit(self.nodes.shared_name(route))
        }
    }

    /// [`spec`](Self::spec) with the engine's names shared, not copied.
    fn shared_spec(&self, from: Id, to: Id) -> SharedPath {
        let st = &self.pairs[slot(from, to)];
        SharedPath {
            dest: self.nodes.shared_name(to),
            primary: self.hop(st.primary),
            backup: (st.backup != NO_ROUTE).then(|| self.hop(st.backup)),
        }
    }

    fn spec(&self, from: Id, to: Id) -> PathSpec {
        self.shared_spec(from, to).to_spec()
    }

    /// The paths of `node`: one per other current node, sorted by destination.
    /// Empty for an unknown node.
    pub fn paths_for(&self, node: &str) -> Vec<PathSpec> {
        let Some(id) = self.nodes.id(node) else {
            return Vec::new();
        };
        self.nodes
            .members()
            .filter(|(_, other)| *other != id)
            .map(|(_, other)| self.spec(id, other))
            .collect()
    }

    /// Pair decisions made so far: what the engine's work grows with.
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// Tenths of a second since the epoch at `now`.
    pub(super) fn now_ds(&self, now: Instant) -> u32 {
        self.ds(now)
    }
}

/// Why a pair switched.
#[derive(Debug, Clone, Copy)]
enum Why {
    Pinned,
    Unusable,
    Cheaper {
        cost: f64,
        incumbent: f64,
        held_for: Duration,
    },
}

/// A pair's last switch of primary and why, as decided: 24 bytes, worded
/// only when the API asks ([`PathEngine::last_change_of`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Change {
    from: Route,
    to: Route,
    /// For [`ChangeWhy::Cheaper`]: the new path's and the old one's cost (ms)
    /// and how long the new one had been clearly cheaper.
    cost: f32,
    incumbent: f32,
    held_ms: u32,
    why: ChangeWhy,
}

impl Change {
    fn new(from: Route, to: Route, why: ChangeWhy) -> Self {
        Self {
            from,
            to,
            cost: 0.0,
            incumbent: 0.0,
            held_ms: 0,
            why,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum ChangeWhy {
    /// The first usable path replaced a placeholder.
    Plain,
    Pinned,
    /// The old path became unusable, for this reason.
    Unusable(Cause),
    Cheaper,
    /// The old path's transit left and nothing else was usable.
    Left,
}

/// Why a path is not usable for a pair `{i, j}` (`i` the end whose name
/// sorts first), in a byte or two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    NotMember,
    EndOfPair,
    NotTransit,
    /// Both legs of the transit are usable.
    Usable,
    /// This link of the path is unusable (or usable) for this reason.
    Link(Leg, LinkCause),
}

/// A link of a path of `{i, j}`: direct, or the leg `i`-transit or
/// transit-`j`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Leg {
    Direct,
    ToTransit,
    FromTransit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkCause {
    Disabled,
    Never,
    Stale,
    Down,
    Usable,
}

/// The key of slot `s` in the change maps (a table of 2^32 slots holds
/// 92,000 nodes).
fn change_key(s: usize) -> u32 {
    u32::try_from(s).unwrap_or(u32::MAX)
}

/// The pair `(lo, hi)` at slot `s` (the inverse of [`slot`]).
pub(super) fn pair_of_slot(s: usize) -> (Id, Id) {
    // hi is the largest with hi * (hi - 1) / 2 <= s.
    let mut hi = ((1.0 + (1.0 + 8.0 * s as f64).sqrt()) / 2.0) as usize;
    while hi * (hi - 1) / 2 > s {
        hi -= 1;
    }
    while (hi + 1) * hi / 2 <= s {
        hi += 1;
    }
    let lo = s - hi * (hi - 1) / 2;
    (lo as Id, hi as Id)
}

/// Which side of the pair `{from, peer}` holds `from`'s report.
fn side_of(from: Id, peer: Id) -> usize {
    usize::from(from > peer)
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) enum Measurement {
    /// Neither end has reported the link.
    #[default]
    Never,
    /// Reported, but no report is fresh.
    Stale,
    /// The fresh ends' reports combined.
    Fresh(Metrics),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Metrics {
    pub(super) up: bool,
    pub(super) rtt_ms: f64,
    pub(super) jitter_ms: f64,
    /// Ratio, 0.03 is 3%.
    pub(super) loss: f64,
}
