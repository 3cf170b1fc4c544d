//! The multi-cloud lab: a topology file ([`topology`]) turned into network
//! namespaces, an emulated WAN and running agents.

pub mod build;
pub mod topology;

pub use build::{down, Lab};
pub use topology::{Site, Topology};
