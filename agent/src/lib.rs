//! skymesh-agent: the daemon on each cloud gateway. A sans-IO core ([`node`],
//! [`routing`], [`packet`], [`batch`]) driven by thin IO drivers ([`tun`], [`udp`],
//! [`netlink`], [`admin`], [`metrics`]) wired together in [`daemon`]; [`link_report`]
//! decides what the control session tells the controller about links.

pub mod admin;
pub mod batch;
pub mod config;
pub mod control;
pub mod daemon;
pub mod keys;
pub mod link_report;
mod listen;
pub mod metrics;
pub mod netlink;
pub mod node;
pub mod notify;
pub mod packet;
pub mod poller;
pub mod probe;
pub mod routing;
pub mod tun;
pub mod udp;
