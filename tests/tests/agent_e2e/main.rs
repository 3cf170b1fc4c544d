//! End-to-end tests of `skymesh-agent` in network namespaces, run as a user runs it:
//! real binary, real TUN, real UDP on a veth underlay, checked with ping, TCP transfers,
//! `status`, `/metrics` and packet captures. Every test builds its own namespaces, so the
//! tests run in parallel.

mod dataplane;
mod hostile;
mod interop;
mod rekey;
mod resilience;
mod status;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time allowed for a fresh tunnel to carry its first ping (handshake included).
pub(crate) const FIRST_PING: Duration = Duration::from_secs(10);

/// Seconds since the Unix epoch, for comparing with handshake timestamps.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
