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
//!
//! Decisions are incremental (`engine.rs`): a recompute decides again only the
//! pairs whose inputs changed since the last one, so a steady mesh costs next
//! to nothing whatever its size, and [`PathEngine::recompute_from_scratch`] is
//! what it must always agree with (a property test checks it). Per-pair state
//! is compact (`table.rs`); reasons are built when the API asks (`views.rs`).

mod config;
mod engine;
mod shared;
mod table;
mod views;

#[cfg(test)]
mod tests;

pub use config::{LinkOverride, LinkWeight, OverrideError, PathConfig, PathConfigError};
pub use engine::PathEngine;
pub use shared::{Hop, SharedPath};
pub use views::{LinkView, PairView};
