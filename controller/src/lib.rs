//! skymesh-controller: enrollment over QUIC + mTLS, IPAM, netmap distribution,
//! the REST API, and the `skymeshctl` client.

#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod control;
pub mod fabric;
pub mod gateway;
pub mod ipam;
pub mod listen;
pub mod metrics;
pub mod paths;
pub mod pki;
pub mod registry;
pub mod server;
pub mod store;
