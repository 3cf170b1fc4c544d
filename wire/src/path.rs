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

/// An agent's measurements of all its links; sent about once a second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkReport {
    pub links: Vec<LinkSample>,
}
