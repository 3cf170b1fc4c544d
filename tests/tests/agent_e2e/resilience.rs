//! Recovery: restarts (SIGTERM, kill -9 with a stale interface) and underlay cuts.

use crate::FIRST_PING;
use anyhow::{ensure, Context, Result};
use skymesh_tests::topo::{AgentPair, A_OVERLAY, B_OVERLAY, UNDERLAY_IF};
use skymesh_tests::traffic::{ping_once, ping_until, tcp_transfer, Payload};
use skymesh_tests::{e2e, require_root, require_tool};
use std::time::{Duration, Instant};

#[test]
fn restart_after_sigterm_and_after_kill9_recovers() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    e2e("restart", |env| {
        let mut p = AgentPair::start(env)?;
        ping_until(&p.a_ns, B_OVERLAY, FIRST_PING)?;

        let status = p.a.stop()?;
        ensure!(status.success(), "agent A exited with {status} on SIGTERM");
        ensure!(
            !p.a_ns.has_link("skymesh0"),
            "skymesh0 still exists in A after SIGTERM (the agent must remove it)"
        );
        ensure!(
            !ping_once(&p.a_ns, B_OVERLAY),
            "ping worked with agent A stopped"
        );
        p.a.start()?;
        let t = ping_until(&p.a_ns, B_OVERLAY, Duration::from_secs(20))
            .context("traffic A→B did not recover after SIGTERM + start")?;
        eprintln!("after SIGTERM + start: A→B recovered in {t:?}");
        ping_until(&p.b_ns, A_OVERLAY, Duration::from_secs(20))
            .context("traffic B→A did not recover after SIGTERM + start")?;

        p.a.kill9()?;
        if p.a_ns.has_link("skymesh0") {
            eprintln!("skymesh0 survived kill -9 (persistent TUN): the next start must replace it");
        } else {
            // The kernel removed the non-persistent TUN with its last fd. Leave behind what a
            // crashed older agent could: a persistent TUN of the same name, already addressed.
            eprintln!("skymesh0 vanished with kill -9; planting a stale persistent TUN instead");
            p.a_ns
                .ip(&["tuntap", "add", "dev", "skymesh0", "mode", "tun"])?;
            p.a_ns
                .ip(&["addr", "add", &format!("{A_OVERLAY}/32"), "dev", "skymesh0"])?;
            p.a_ns.ip(&["link", "set", "skymesh0", "up"])?;
        }
        p.a.start()
            .context("agent did not start over a stale skymesh0")?;
        let t = ping_until(&p.a_ns, B_OVERLAY, Duration::from_secs(20))
            .context("traffic A→B did not recover after kill -9 + start")?;
        eprintln!("after kill -9 + start: A→B recovered in {t:?}");
        ping_until(&p.b_ns, A_OVERLAY, Duration::from_secs(20))
            .context("traffic B→A did not recover after kill -9 + start")?;
        let x = tcp_transfer(&p.b_ns, &p.a_ns, A_OVERLAY, 5002, Payload::Pattern(1 << 20))?;
        x.verify()?;
        Ok(())
    })
}

/// Cuts the underlay for 10 s with `cut`, restores it with `restore`, and checks that the
/// overlay works again within 30 s.
fn underlay_cut_recovers(
    p: &AgentPair,
    cut: impl FnOnce() -> Result<()>,
    restore: impl FnOnce() -> Result<()>,
) -> Result<()> {
    ping_until(&p.a_ns, B_OVERLAY, FIRST_PING)?;
    let started = Instant::now();
    cut()?;
    ensure!(
        !ping_once(&p.a_ns, B_OVERLAY),
        "ping still works with the underlay cut"
    );
    // Keep offering traffic during the cut, as applications would.
    while started.elapsed() < Duration::from_secs(10) {
        ping_once(&p.a_ns, B_OVERLAY);
    }
    restore()?;
    let t = ping_until(&p.a_ns, B_OVERLAY, Duration::from_secs(30))
        .context("A→B did not recover within 30 s of restoring the underlay")?;
    eprintln!("underlay restored; A→B recovered in {t:?}");
    ping_until(&p.b_ns, A_OVERLAY, Duration::from_secs(30))
        .context("B→A did not recover within 30 s of restoring the underlay")?;
    Ok(())
}

#[test]
fn underlay_blackhole_for_10s_then_recovers() -> Result<()> {
    if !require_root() || !require_tool("nft") {
        return Ok(());
    }
    e2e("blackhole", |env| {
        let p = AgentPair::start(env)?;
        underlay_cut_recovers(
            &p,
            || {
                p.a_ns.blackhole(UNDERLAY_IF)?;
                p.b_ns.blackhole(UNDERLAY_IF)
            },
            || {
                p.a_ns.unblackhole(UNDERLAY_IF)?;
                p.b_ns.unblackhole(UNDERLAY_IF)
            },
        )
    })
}

#[test]
fn underlay_link_down_for_10s_then_recovers() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    e2e("linkdown", |env| {
        let mut p = AgentPair::start(env)?;
        underlay_cut_recovers(&p, || p.link.set_down(), || p.link.set_up())?;
        p.a.ensure_running()?;
        p.b.ensure_running()
    })
}
