//! Shared domain types of skymesh: keys, node names, prefixes, the [`NetMap`]
//! that an agent applies (whether it comes from its own config file in static
//! mode or from the controller), the control protocol and the join token.
//!
//! This crate is pure: no IO, no tokio, no clocks. It owns the encoding of
//! everything that crosses a process boundary; it must not know how agents or the
//! controller store or transport it.

#![forbid(unsafe_code)]

pub mod control;
pub mod key;
pub mod netmap;
pub mod path;
pub mod prom;
pub mod token;

pub use key::{KeyError, PublicKey};
pub use netmap::{NetMap, NetMapError, PeerSpec, PROTOCOL_VERSION};
pub use path::{LinkChanges, LinkReport, LinkSample, PathSpec, Via};
pub use token::{JoinToken, TokenError};
