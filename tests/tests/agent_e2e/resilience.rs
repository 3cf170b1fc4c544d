//! Recovery: restarts (SIGTERM, kill -9 with a stale interface) and underlay cuts.

use crate::FIRST_PING;
use anyhow::{ensure, Context, Result};
use skymesh_tests::topo::{AgentPair, A_OVERLAY, B_OVERLAY, UNDERLAY_IF};
use skymesh_tests::traffic::{ping_once, ping_until, tcp_transfer, Payload};
use skymesh_tests::{e2e, machine, require_root, require_tool};
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

/// Agents A and B, traffic flowing, and A's probed link to B up.
fn pair_with_probed_link(env: &skymesh_tests::TestEnv) -> Result<AgentPair> {
    let p = AgentPair::start(env)?;
    ping_until(&p.a_ns, B_OVERLAY, FIRST_PING)?;
    ensure!(
        skymesh_tests::wait_until(Duration::from_secs(10), || a_link_up(&p)).is_some(),
        "A's link to B never came up: {:?}",
        p.a.status()?.links
    );
    Ok(p)
}

fn a_link_up(p: &AgentPair) -> bool {
    p.a.status()
        .is_ok_and(|s| s.links.iter().any(|l| l.peer == "b" && l.up))
}

/// A never declared a link down, and its link to B is up.
fn a_kept_its_link(p: &AgentPair, when: &str) -> Result<()> {
    ensure!(
        !p.a.log().contains("link down"),
        "{when}: A declared a link down:\n{}",
        p.a.log()
    );
    ensure!(a_link_up(p), "{when}: A's link to B is down");
    Ok(())
}

/// A paused agent (SIGSTOP for 1 s: a paused VM, a long-stolen vCPU) declares no
/// link down when it resumes: its peer's probes wait in its socket, and the time
/// it stood still is not counted as silence. Three pauses, to catch the order in
/// which its threads happen to wake.
#[test]
fn a_paused_agent_declares_no_link_down_when_it_resumes() -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    if !require_root() {
        return Ok(());
    }
    e2e("pause", |env| {
        let p = pair_with_probed_link(env)?;
        let pid = p.a.pid().context("agent A is not running")?;
        for round in 1..=3 {
            kill(pid, Signal::SIGSTOP).context("SIGSTOP")?;
            std::thread::sleep(Duration::from_secs(1));
            kill(pid, Signal::SIGCONT).context("SIGCONT")?;
            std::thread::sleep(Duration::from_millis(1500));
            let st = p.a.status()?;
            ensure!(
                st.link_check_stalls >= round,
                "round {round}: A counted {} stalled link checks",
                st.link_check_stalls
            );
            a_kept_its_link(&p, &format!("round {round}, after a pause"))?;
        }
        ensure!(
            ping_once(&p.a_ns, B_OVERLAY),
            "A cannot reach B after the pauses"
        );
        Ok(())
    })
}

/// The threads of process `pid`: (tid, name).
fn threads(pid: i32) -> Result<Vec<(i32, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).context("listing threads")? {
        let entry = entry?;
        let tid: i32 = entry.file_name().to_string_lossy().parse()?;
        let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        out.push((tid, name.trim().to_string()));
    }
    Ok(out)
}

/// Pins thread `tid` to one CPU.
fn pin(tid: i32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: a live cpu_set_t of the stated size.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    ensure!(
        rc == 0,
        "pinning thread {tid} to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Keeps `cpu` busy for `d` with a real-time thread, as a hypervisor stealing
/// that vCPU would: ordinary threads pinned there do not run meanwhile.
fn hog_cpu(cpu: usize, d: Duration) -> Result<()> {
    std::thread::spawn(move || -> Result<()> {
        // SAFETY: gettid has no preconditions.
        pin(unsafe { libc::gettid() }, cpu)?;
        machine::make_realtime(10).context("SCHED_FIFO")?;
        let start = Instant::now();
        while start.elapsed() < d {
            std::hint::spin_loop();
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the CPU hog panicked"))?
}

/// The agent's data-plane thread gets no CPU for 700 ms (its vCPU is busy) while
/// its timers run on another: the peer's probes wait unread in the socket, and
/// the agent reads them before it would declare the link down.
#[test]
fn a_starved_data_plane_thread_takes_no_link_down() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    ensure!(cpus >= 2, "this test needs 2 CPUs, the machine has {cpus}");
    e2e("starve", |env| {
        let p = pair_with_probed_link(env)?;
        let pid = p.a.pid().context("agent A is not running")?.as_raw();
        let threads = threads(pid)?;
        let dataplane = threads
            .iter()
            .find(|(_, name)| name.starts_with("skymesh-datapl"))
            .map(|(tid, _)| *tid)
            .with_context(|| format!("no data-plane thread among {threads:?}"))?;
        pin(dataplane, 1)?;
        for (tid, _) in threads.iter().filter(|(tid, _)| *tid != dataplane) {
            // A helper thread may have exited since the listing.
            if let Err(e) = pin(*tid, 0) {
                ensure!(
                    !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists(),
                    "{e:#}"
                );
            }
        }
        for round in 1..=3 {
            let waited = machine::thread_times(pid as u32, dataplane)?.waited;
            hog_cpu(1, Duration::from_millis(700))?;
            // The kernel books a wait when the thread next runs: read it after.
            std::thread::sleep(Duration::from_millis(1000));
            let starved = machine::thread_times(pid as u32, dataplane)?.waited - waited;
            eprintln!("round {round}: the data-plane thread waited {starved:?} for its CPU");
            ensure!(
                starved >= Duration::from_millis(400),
                "round {round}: the data-plane thread waited only {starved:?}: not starved \
                 past the 350 ms detection time, so this round tests nothing"
            );
            a_kept_its_link(&p, &format!("round {round}, data plane starved"))?;
        }
        ensure!(ping_once(&p.a_ns, B_OVERLAY), "A cannot reach B afterwards");
        Ok(())
    })
}
