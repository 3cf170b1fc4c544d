//! Paths and link measurements: what agents report about each link, and which way
//! the controller tells a node to send traffic for each destination.
//!
//! A path is direct or goes through exactly one transit node. A transit node only
//! ever forwards directly to the destination, so a packet crosses at most two
//! links and cannot loop, whatever the paths say.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The value of the `via` label and of the API's `via` field for a direct path.
pub const DIRECT: &str = "direct";

/// How traffic to one destination leaves this node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Straight to the destination node.
    Direct,
    /// Through this transit node, which decrypts and re-encrypts to the destination.
    Transit(String),
}

impl Via {
    /// The label used in metrics, the API and the CLI: "direct" or the transit's name.
    pub fn label(&self) -> &str {
        match self {
            Via::Direct => DIRECT,
            Via::Transit(name) => name,
        }
    }

    /// The inverse of [`label`](Self::label).
    pub fn from_label(label: &str) -> Self {
        if label == DIRECT {
            Via::Direct
        } else {
            Via::Transit(label.to_string())
        }
    }

    /// The transit node, if any.
    pub fn transit(&self) -> Option<&str> {
        match self {
            Via::Direct => None,
            Via::Transit(name) => Some(name),
        }
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The path a node uses to one destination, and the one it falls back to on its
/// own when the first hop of the primary fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSpec {
    /// The destination peer's name.
    pub dest: String,
    pub primary: Via,
    /// Shares no link with `primary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<Via>,
}

impl PathSpec {
    /// Whether `hop` may carry traffic between this node and `dest` (and so may
    /// send packets whose source belongs to `dest`).
    pub fn allows_transit(&self, hop: &str) -> bool {
        self.primary.transit() == Some(hop)
            || self.backup.as_ref().and_then(Via::transit) == Some(hop)
    }
}

/// What an agent measured on its link to one peer, over its probe window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSample {
    /// The peer's name.
    pub peer: String,
    /// False while probes fail (the agent has failed over away from this link).
    pub up: bool,
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: u32,
    /// Mean deviation of the round-trip time (RFC 3550 style), microseconds.
    pub jitter_us: u32,
    /// Probes lost over the window, both directions pooled, parts per million.
    pub loss_ppm: u32,
}

/// A change of round-trip time smaller than this fraction of the last reported
/// one is not worth reporting (see [`LinkSample::differs_materially`]).
pub const REPORT_RTT_RATIO: f64 = 0.025;
/// ...nor one smaller than this, in microseconds.
pub const REPORT_RTT_MIN_US: u32 = 500;
/// A change of loss smaller than this, in parts per million, is not worth
/// reporting unless loss starts or ends.
pub const REPORT_LOSS_PPM: u32 = 5_000;
/// A round-trip time that moved by this fraction of the reported one...
/// (see [`LinkSample::is_urgent`]): the path engine's default switch ratio.
pub const URGENT_RTT_RATIO: f64 = 0.10;
/// ...and by at least this, in microseconds: its default minimum switch.
pub const URGENT_RTT_MIN_US: u32 = 5_000;

impl LinkSample {
    /// Whether this sample tells the controller something `reported` (the last
    /// sample of the same link it was told) did not: the link went up or down,
    /// loss started, ended or moved by [`REPORT_LOSS_PPM`], or the round-trip
    /// time moved by [`REPORT_RTT_RATIO`] of the reported one and at least
    /// [`REPORT_RTT_MIN_US`]. Jitter alone is not material: paths are not
    /// chosen by it.
    ///
    /// Agents send only material changes, and the controller keeps a reported
    /// sample until a material change replaces it, so the two cannot disagree
    /// on what counts. The threshold is a quarter of the smallest switch the
    /// path engine makes by default (10%), so a path is still replaced within a
    /// few percent of where exact figures would replace it.
    pub fn differs_materially(&self, reported: &LinkSample) -> bool {
        if self.up != reported.up || (self.loss_ppm == 0) != (reported.loss_ppm == 0) {
            return true;
        }
        if self.loss_ppm.abs_diff(reported.loss_ppm) >= REPORT_LOSS_PPM {
            return true;
        }
        self.rtt_moved(reported, REPORT_RTT_RATIO, REPORT_RTT_MIN_US)
    }

    /// Whether the RTT moved from `reported`'s by at least `ratio` of it and
    /// at least `min_us`.
    fn rtt_moved(&self, reported: &LinkSample, ratio: f64, min_us: u32) -> bool {
        let needed = ((f64::from(reported.rtt_us) * ratio) as u32).max(min_us);
        self.rtt_us.abs_diff(reported.rtt_us) >= needed
    }

    /// Whether this sample's news should reach the controller at once rather
    /// than with the next batch of drift: the link went up or down, loss
    /// changed materially, or the round-trip time moved by at least
    /// [`URGENT_RTT_RATIO`] and [`URGENT_RTT_MIN_US`] of the reported one, a
    /// move that alone can make the path engine switch. Smaller material moves
    /// are drift: they only refine costs that hysteresis already holds
    /// steady, so an agent may gather them for a few seconds.
    pub fn is_urgent(&self, reported: &LinkSample) -> bool {
        if self.up != reported.up {
            return true;
        }
        if (self.loss_ppm == 0) != (reported.loss_ppm == 0)
            || self.loss_ppm.abs_diff(reported.loss_ppm) >= REPORT_LOSS_PPM
        {
            return true;
        }
        self.rtt_moved(reported, URGENT_RTT_RATIO, URGENT_RTT_MIN_US)
    }
}

/// An agent's measurements of all its links: the whole picture, replacing what
/// the controller held from this agent (a peer it leaves out has no
/// measurement from it any more). Sent first after `register`, and by agents
/// that do not send [`LinkChanges`], about once a second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkReport {
    pub links: Vec<LinkSample>,
}

/// The links whose measurement changed materially
/// ([`LinkSample::differs_materially`]) since the agent's previous report or
/// changes, on the same session. The controller keeps every other sample it
/// holds from this agent while the session lasts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkChanges {
    pub changed: Vec<LinkSample>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(up: bool, rtt_us: u32, loss_ppm: u32) -> LinkSample {
        LinkSample {
            peer: "p".into(),
            up,
            rtt_us,
            jitter_us: 0,
            loss_ppm,
        }
    }

    #[test]
    fn only_material_changes_are_worth_reporting() {
        let base = s(true, 100_000, 0);
        // RTT: 2.5% of the reported value, at least 0.5 ms.
        assert!(!s(true, 102_400, 0).differs_materially(&base));
        assert!(s(true, 102_500, 0).differs_materially(&base));
        assert!(s(true, 97_500, 0).differs_materially(&base));
        let short = s(true, 4_000, 0);
        assert!(!s(true, 4_400, 0).differs_materially(&short));
        assert!(s(true, 4_500, 0).differs_materially(&short));
        // Up/down, and loss starting or ending, always count.
        assert!(s(false, 100_000, 0).differs_materially(&base));
        assert!(s(true, 100_000, 1).differs_materially(&base));
        assert!(s(true, 100_000, 0).differs_materially(&s(true, 100_000, 1)));
        // Loss that moves less than 0.5 points does not.
        let lossy = s(true, 100_000, 30_000);
        assert!(!s(true, 100_000, 34_999).differs_materially(&lossy));
        assert!(s(true, 100_000, 35_000).differs_materially(&lossy));
        // Jitter alone does not.
        let mut jittery = base.clone();
        jittery.jitter_us = 50_000;
        assert!(!jittery.differs_materially(&base));
    }

    #[test]
    fn urgent_changes_are_those_that_can_switch_a_path_alone() {
        let base = s(true, 100_000, 0);
        // RTT: 10% of the reported value, at least 5 ms; smaller material
        // moves are drift.
        assert!(s(true, 108_000, 0).differs_materially(&base));
        assert!(!s(true, 109_999, 0).is_urgent(&base));
        assert!(s(true, 110_000, 0).is_urgent(&base));
        assert!(s(true, 90_000, 0).is_urgent(&base));
        let short = s(true, 20_000, 0);
        assert!(!s(true, 24_999, 0).is_urgent(&short));
        assert!(s(true, 25_000, 0).is_urgent(&short));
        // Up/down and every material loss change are urgent.
        assert!(s(false, 100_000, 0).is_urgent(&base));
        assert!(s(true, 100_000, 1).is_urgent(&base));
        assert!(s(true, 100_000, 0).is_urgent(&s(true, 100_000, 1)));
        let lossy = s(true, 100_000, 30_000);
        assert!(!s(true, 100_000, 34_999).is_urgent(&lossy));
        assert!(s(true, 100_000, 35_000).is_urgent(&lossy));
        // Whatever is urgent is material.
        for rtt in (0..300_000).step_by(997) {
            for sample in [s(true, rtt, 0), s(false, rtt, 0), s(true, rtt, 40_000)] {
                assert!(!sample.is_urgent(&base) || sample.differs_materially(&base));
            }
        }
    }
}
