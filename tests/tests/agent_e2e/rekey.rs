//! Rekeying: WireGuard starts a new handshake once a session is two minutes old
//! (REKEY_AFTER_TIME). The agent drives boringtun's timers; this checks that a
//! long-running flow gets a fresh session without losing traffic.

use anyhow::{ensure, Context, Result};
use skymesh_tests::topo::{AgentPair, B_OVERLAY};
use skymesh_tests::traffic::{ping_once, ping_until};
use skymesh_tests::{e2e, require_root};
use std::time::{Duration, Instant};

#[test]
fn session_rekeys_after_two_minutes_without_losing_traffic() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    e2e("rekey", |env| {
        let p = AgentPair::start(env)?;
        ping_until(&p.a_ns, B_OVERLAY, Duration::from_secs(10))?;
        let first =
            p.a.status()?
                .peer("b")?
                .latest_handshake_unix
                .context("no handshake after the first ping")?;

        // Steady traffic, as a long-lived flow would send; WireGuard rekeys
        // after 120 s of session age (plus jitter) on the next data packet.
        let started = Instant::now();
        let (mut sent, mut lost) = (0u32, 0u32);
        let rekeyed_at = loop {
            ensure!(
                started.elapsed() < Duration::from_secs(170),
                "no new handshake within 170 s of the first (sent {sent} pings, lost {lost})"
            );
            sent += 1;
            if !ping_once(&p.a_ns, B_OVERLAY) {
                lost += 1;
            }
            let now =
                p.a.status()?
                    .peer("b")?
                    .latest_handshake_unix
                    .unwrap_or(first);
            if now > first {
                break now;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let age = rekeyed_at - first;
        eprintln!("rekeyed after {age} s; {lost} of {sent} pings lost");
        ensure!(
            (110..=170).contains(&age),
            "the new handshake came {age} s after the first; WireGuard rekeys at about 120 s"
        );
        ensure!(
            lost <= 1,
            "{lost} of {sent} pings were lost around the rekey"
        );
        // And the new session carries traffic.
        ping_until(&p.a_ns, B_OVERLAY, Duration::from_secs(5))?;
        Ok(())
    })
}
