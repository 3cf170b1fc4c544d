//! The path engine's configuration and the operator's per-link overrides, with
//! their validation; and the small helpers every part of path choice shares.

use serde::{Deserialize, Serialize};
use skymesh_wire::Via;
use std::collections::BTreeMap;
use std::time::Duration;

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
    /// How long a node's reports count after its session ends (or, for a
    /// node that repeats whole reports, after its last one). Default 5 s.
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

impl PathConfig {
    /// Whether a path costing `challenger` ms is clearly cheaper than one costing
    /// `incumbent` ms: by `switch_ratio` of it and by `switch_min`.
    pub(super) fn beats(&self, challenger: f64, incumbent: f64) -> bool {
        let needed = (self.switch_ratio * incumbent).max(duration_ms(self.switch_min));
        incumbent - challenger >= needed
    }
}

/// Values per unordered pair of names, stored under (smaller, larger) so that a
/// lookup in either order needs no allocation.
#[derive(Debug)]
pub(super) struct PairMap<T>(BTreeMap<String, BTreeMap<String, T>>);

impl<T> Default for PairMap<T> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<T> PairMap<T> {
    pub(super) fn get(&self, a: &str, b: &str) -> Option<&T> {
        let (a, b) = ordered(a, b);
        self.0.get(a)?.get(b)
    }

    pub(super) fn insert(&mut self, a: &str, b: &str, value: T) -> Option<T> {
        let (a, b) = ordered(a, b);
        self.0
            .entry(a.to_string())
            .or_default()
            .insert(b.to_string(), value)
    }

    pub(super) fn remove(&mut self, a: &str, b: &str) -> Option<T> {
        let (a, b) = ordered(a, b);
        let row = self.0.get_mut(a)?;
        let value = row.remove(b);
        if row.is_empty() {
            self.0.remove(a);
        }
        value
    }

    /// `(a, b, value)` with `a < b`, sorted.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &str, &T)> + '_ {
        self.0
            .iter()
            .flat_map(|(a, row)| row.iter().map(move |(b, v)| (a.as_str(), b.as_str(), v)))
    }
}

pub(super) fn ordered<'s>(a: &'s str, b: &'s str) -> (&'s str, &'s str) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// "direct" or "via <transit>".
pub(super) fn via_text(via: &Via) -> String {
    match via {
        Via::Direct => "direct".to_string(),
        Via::Transit(t) => format!("via {t}"),
    }
}

pub(super) fn percent_cheaper(cheaper: f64, dearer: f64) -> f64 {
    if dearer > 0.0 {
        (dearer - cheaper) / dearer * 100.0
    } else {
        0.0
    }
}

pub(super) fn duration_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(super) fn is_cost(value: f64) -> bool {
    value.is_finite() && value >= 0.0
}

/// Rounds to 0.001 (a microsecond when the unit is ms), for tidy JSON.
pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
