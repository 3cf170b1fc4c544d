//! What the API shows of links and paths, with the reason for each pair's
//! choice: built when asked, from the engine's compact state, never per pair
//! per recompute.

use super::config::{duration_ms, ordered, percent_cheaper, round3, via_text};
use super::engine::{Candidate, Cause, Leg, LinkCause, Measurement, PathEngine};
use super::table::{slot, Id, Route, DIRECT, NO_ROUTE};
use serde::{Deserialize, Serialize};
use skymesh_wire::Via;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Instant;

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
    /// Seconds since the newest report of this link from either end, fresh or
    /// not; 0 while an end that reported it is connected (a connected agent
    /// sends only changes, so what it reported is current).
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

const NO_MEASUREMENTS: &str = "no measurements yet; using direct until a path is measured";

impl PathEngine {
    /// Every link with a report (fresh or not) between current nodes or with an
    /// override, sorted by `(a, b)`.
    pub fn links(&self, now: Instant) -> Vec<LinkView> {
        self.links_where(now, |_, _| true)
    }

    /// [`links`](Self::links) for which `keep(a, b)` holds.
    pub fn links_where(&self, now: Instant, keep: impl Fn(&str, &str) -> bool) -> Vec<LinkView> {
        let mut keys: BTreeSet<(&str, &str)> = BTreeSet::new();
        let members: Vec<(&str, Id)> = self.nodes.members().collect();
        for (i, &(a, x)) in members.iter().enumerate() {
            for &(b, y) in &members[i + 1..] {
                let sides = &self.sides[slot(x, y)];
                if (sides.has(0) || sides.has(1)) && keep(a, b) {
                    keys.insert((a, b));
                }
            }
        }
        keys.extend(
            self.overrides
                .iter()
                .map(|(a, b, _)| (a, b))
                .filter(|(a, b)| keep(a, b)),
        );
        keys.into_iter()
            .map(|(a, b)| self.link_view(a, b, now))
            .collect()
    }

    fn link_view(&self, a: &str, b: &str, now: Instant) -> LinkView {
        let ids = self.nodes.id(a).zip(self.nodes.id(b));
        let o = self.overrides.get(a, b);
        let mut view = LinkView {
            a: a.to_string(),
            b: b.to_string(),
            usable: false,
            up: false,
            rtt_ms: None,
            jitter_ms: None,
            loss: None,
            reported_by: Vec::new(),
            age_s: None,
            cost_ms: None,
            weight_ms: o
                .and_then(|o| o.weight_ms)
                .or_else(|| self.weights.get(a, b).copied())
                .unwrap_or(0.0),
            disabled: o.is_some_and(|o| o.disabled),
            pin: o
                .and_then(|o| o.pin.as_ref())
                .map(|p| p.label().to_string()),
        };
        let Some((x, y)) = ids else {
            return view;
        };
        let (lo, hi) = if x < y { (x, y) } else { (y, x) };
        let sides = &self.sides[slot(lo, hi)];
        let mut reporters: Vec<(Id, bool)> = Vec::new();
        for (side, reporter) in [(0, lo), (1, hi)] {
            if sides.has(side) {
                reporters.push((reporter, self.is_fresh(reporter, Some(now))));
            }
        }
        let mut fresh: Vec<String> = reporters
            .iter()
            .filter(|(_, fresh)| *fresh)
            .map(|(r, _)| self.nodes.name(*r).to_string())
            .collect();
        fresh.sort();
        view.reported_by = fresh;
        view.age_s = reporters
            .iter()
            .filter_map(|(r, _)| self.nodes.get(*r))
            .map(|n| match (n.live, n.heard_at) {
                (true, _) | (_, None) => 0.0,
                (false, Some(at)) => round3(now.saturating_duration_since(at).as_secs_f64()),
            })
            .reduce(f64::min);
        if let Measurement::Fresh(m) = self.measurement_at(x, y, Some(now)) {
            view.up = m.up;
            view.rtt_ms = Some(round3(m.rtt_ms));
            view.jitter_ms = Some(round3(m.jitter_ms));
            view.loss = Some(m.loss);
            view.usable = m.up && !view.disabled;
        }
        view.cost_ms = self.cost_at(x, y, Some(now)).map(round3);
        view
    }

    /// Every pair of current nodes, sorted by `(a, b)`.
    pub fn pairs(&self, now: Instant) -> Vec<PairView> {
        let members: Vec<(&str, Id)> = self.nodes.members().collect();
        let mut out = Vec::with_capacity(members.len() * members.len().saturating_sub(1) / 2);
        for (i, &(_, x)) in members.iter().enumerate() {
            for &(_, y) in &members[i + 1..] {
                out.push(self.pair_view(x, y, now));
            }
        }
        out
    }

    /// [`pairs`](Self::pairs) with `node` as an end.
    pub fn pairs_of(&self, node: &str, now: Instant) -> Vec<PairView> {
        let Some(me) = self.nodes.id(node) else {
            return Vec::new();
        };
        let mut out: Vec<PairView> = self
            .nodes
            .members()
            .filter(|(_, other)| *other != me)
            .map(|(_, other)| self.pair_view(me, other, now))
            .collect();
        out.sort_by(|p, q| (&p.a, &p.b).cmp(&(&q.a, &q.b)));
        out
    }

    fn pair_view(&self, x: Id, y: Id, now: Instant) -> PairView {
        let (a, b) = ordered(self.nodes.name(x), self.nodes.name(y));
        let (i, j) = if self.nodes.name(x) == a {
            (x, y)
        } else {
            (y, x)
        };
        let s = slot(i, j);
        let st = self.pairs[s];
        let mut cands = Vec::new();
        self.candidates(i, j, &mut cands);
        let find = |route| cands.iter().copied().find(|c: &Candidate| c.route == route);
        let primary = find(st.primary);
        let backup = (st.backup != NO_ROUTE).then_some(st.backup);
        PairView {
            a: a.to_string(),
            b: b.to_string(),
            primary: self.via(st.primary).label().to_string(),
            primary_cost_ms: primary.map(|c| round3(c.cost)),
            backup: backup.map(|r| self.via(r).label().to_string()),
            backup_cost_ms: backup.and_then(find).map(|c| round3(c.cost)),
            reason: self.reason(i, j, &cands, now),
            since_s: if st.decided() {
                f64::from(self.now_ds(now).saturating_sub(st.since_ds)) / 10.0
            } else {
                0.0
            },
            changes: st.changes(),
            last_change: self.last_change_of(i, j),
        }
    }

    /// Why `{i, j}` uses its primary, with the figures (`i` names the smaller
    /// end, for the wording).
    fn reason(&self, i: Id, j: Id, cands: &[Candidate], now: Instant) -> String {
        let st = self.pairs[slot(i, j)];
        let find = |route| cands.iter().copied().find(|c| c.route == route);
        let pin = self.pin(i, j);
        let pinned = pin.as_ref().and_then(|(_, r)| *r).and_then(find);
        let mut out = String::new();
        if let (Some((via, _)), None) = (&pin, pinned) {
            let _ = write!(
                out,
                "pin {} is unusable ({}); ",
                via_text(via),
                self.why_unusable(i, j, via)
            );
        }
        // The primary is the pin when one is usable; else the decided one.
        let primary = match pinned {
            Some(p) if p.route == st.primary => Some(p),
            _ => find(st.primary),
        };
        match primary {
            Some(p) if st.chosen() => self.explain(&mut out, i, j, cands, p, pinned.is_some(), now),
            _ => self.explain_no_path(&mut out, i, j, cands),
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn explain(
        &self,
        out: &mut String,
        i: Id,
        j: Id,
        cands: &[Candidate],
        primary: Candidate,
        pinned: bool,
        now: Instant,
    ) {
        let cfg = &self.config;
        let text = |c: Candidate| {
            format!(
                "{} {}",
                via_text(&self.via(c.route)),
                self.describe(i, j, c)
            )
        };
        if pinned {
            out.push_str("pinned by operator: ");
        }
        let _ = write!(
            out,
            "{}: {}",
            via_text(&self.via(primary.route)),
            self.describe(i, j, primary)
        );
        let cheapest = cands.first().copied().unwrap_or(primary);
        if cheapest.route == primary.route {
            match cands.iter().copied().find(|c| c.route != primary.route) {
                Some(alt) => {
                    let _ = write!(out, " beats {}", text(alt));
                }
                None => out.push_str("; no alternative path"),
            }
            // Through a transit, always say what the direct path costs (or why it
            // cannot be used): that is the question an operator asks.
            if primary.route != DIRECT {
                let direct = cands.iter().copied().find(|c| c.route == DIRECT);
                let next_best = cands.iter().copied().find(|c| c.route != primary.route);
                match direct {
                    Some(_) if next_best.is_some_and(|n| n.route == DIRECT) => {}
                    Some(d) => {
                        let _ = write!(out, " and {}", text(d));
                    }
                    None => {
                        let _ = write!(
                            out,
                            "; direct is unusable ({})",
                            self.why_unusable(i, j, &Via::Direct)
                        );
                    }
                }
            }
            return;
        }
        let challenger = self.challengers.get(&slot(i, j)).and_then(|ch| {
            cands
                .iter()
                .copied()
                .find(|c| c.route == ch.route)
                .map(|c| (c, ch.since))
        });
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

    fn explain_no_path(&self, out: &mut String, i: Id, j: Id, cands: &[Candidate]) {
        let st = self.pairs[slot(i, j)];
        if !st.chosen() && matches!(self.measurement(i, j), Measurement::Never) {
            out.push_str(NO_MEASUREMENTS);
            return;
        }
        if !cands.is_empty() {
            // Usable paths exist but none is decided yet (before the next
            // recompute): say what the next recompute will see.
            let _ = write!(
                out,
                "not decided yet; {} {} is usable",
                via_text(&self.via(cands[0].route)),
                self.describe(i, j, cands[0])
            );
            return;
        }
        let any_transit = self.nodes.transits().iter().any(|t| *t != i && *t != j);
        let transits = if any_transit {
            "no transit has both links usable"
        } else {
            "no other node may transit"
        };
        let _ = write!(
            out,
            "no usable path (direct: {}; {transits}); ",
            self.why_unusable(i, j, &Via::Direct)
        );
        if st.chosen() {
            let primary = self.via(st.primary);
            let _ = write!(out, "keeping {}", via_text(&primary));
            if st.primary != DIRECT {
                let _ = write!(out, " ({})", self.why_unusable(i, j, &primary));
            }
        } else {
            out.push_str("using direct");
        }
    }

    /// "181.3 ms (a-t 150.2 ms + t-b 30.1 ms + 1.0 ms transit)".
    fn describe(&self, i: Id, j: Id, c: Candidate) -> String {
        let cfg = &self.config;
        let (a, b) = (self.nodes.name(i), self.nodes.name(j));
        if c.route == DIRECT {
            return format!("{:.1} ms ({})", c.cost, self.breakdown(i, j));
        }
        let t = c.route;
        let name = self.nodes.name(t);
        let first = self.usable_cost(i, t).unwrap_or(f64::NAN);
        let second = self.usable_cost(t, j).unwrap_or(f64::NAN);
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

    /// "rtt 220.4 ms + loss 3.0% x 10 ms + weight 5.0 ms".
    fn breakdown(&self, x: Id, y: Id) -> String {
        let Measurement::Fresh(m) = self.measurement(x, y) else {
            return "not measured".to_string();
        };
        let (_, weight, _) = self.adjustment(x, y);
        let mut s = format!("rtt {:.1} ms", m.rtt_ms);
        if m.loss > 0.0 {
            let _ = write!(
                s,
                " + loss {:.1}% x {} ms",
                m.loss * 100.0,
                self.config.loss_penalty_ms
            );
        }
        if weight != 0.0 {
            let _ = write!(s, " + weight {weight:.1} ms");
        }
        s
    }

    /// Why `via` is not a usable path for `{i, j}` (`i` first in the wording).
    pub(super) fn why_unusable(&self, i: Id, j: Id, via: &Via) -> String {
        let route = match via {
            Via::Direct => DIRECT,
            Via::Transit(name) => match self.nodes.id(name).filter(|t| self.nodes.is_member(*t)) {
                Some(t) => t,
                None => return format!("{name} is not a member"),
            },
        };
        self.cause_text(i, j, route, self.unusable_cause(i, j, route))
    }

    /// Why `route` is not a usable path for `{i, j}`, as it stands now.
    pub(super) fn unusable_cause(&self, i: Id, j: Id, route: Route) -> Cause {
        if route == DIRECT {
            return Cause::Link(Leg::Direct, self.link_cause(i, j));
        }
        let t = route;
        if !self.nodes.is_member(t) {
            Cause::NotMember
        } else if t == i || t == j {
            Cause::EndOfPair
        } else if !self.nodes.is_transit(t) {
            Cause::NotTransit
        } else if self.usable_cost(i, t).is_none() {
            Cause::Link(Leg::ToTransit, self.link_cause(i, t))
        } else if self.usable_cost(t, j).is_none() {
            Cause::Link(Leg::FromTransit, self.link_cause(t, j))
        } else {
            Cause::Usable
        }
    }

    /// [`unusable_cause`](Self::unusable_cause) worded (`i` first).
    pub(super) fn cause_text(&self, i: Id, j: Id, route: Route, cause: Cause) -> String {
        let (a, b) = (self.nodes.name(i), self.nodes.name(j));
        let t = self.nodes.name(route);
        match cause {
            Cause::NotMember => format!("{t} is not a member"),
            Cause::EndOfPair => format!("{t} is an end of the pair"),
            Cause::NotTransit => format!("{t} may not transit"),
            Cause::Usable => "it is usable".to_string(),
            Cause::Link(leg, why) => {
                let (x, y) = match leg {
                    Leg::Direct => (a, b),
                    Leg::ToTransit => (a, t),
                    Leg::FromTransit => (t, b),
                };
                match why {
                    LinkCause::Disabled => format!("link {x}-{y} disabled by operator"),
                    LinkCause::Never => format!("link {x}-{y} never measured"),
                    LinkCause::Stale => format!("link {x}-{y} has no fresh report"),
                    LinkCause::Down => format!("link {x}-{y} down"),
                    LinkCause::Usable => format!("link {x}-{y} is usable"),
                }
            }
        }
    }

    fn link_cause(&self, x: Id, y: Id) -> LinkCause {
        if self.adjustment(x, y).0 {
            return LinkCause::Disabled;
        }
        match self.measurement(x, y) {
            Measurement::Never => LinkCause::Never,
            Measurement::Stale => LinkCause::Stale,
            Measurement::Fresh(m) if !m.up => LinkCause::Down,
            Measurement::Fresh(_) => LinkCause::Usable,
        }
    }
}
