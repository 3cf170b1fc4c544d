//! Shared domain types of skymesh: keys, node names, prefixes and the [`NetMap`]
//! that an agent applies, whether it comes from its own config file (static mode)
//! or from the controller.
//!
//! This crate is pure: no IO, no tokio, no clocks. It owns the encoding of
//! everything that crosses a process boundary; it must not know how agents or the
//! controller store or transport it.

pub mod key;
pub mod netmap;

pub use key::{KeyError, PublicKey};
pub use netmap::{NetMap, NetMapError, PeerSpec, PROTOCOL_VERSION};
