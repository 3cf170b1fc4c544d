//! Control-plane benchmark (issue 15): N simulated agents enroll with the real
//! controller binary, hold their netmaps and report their links as real agents
//! do (looked at every second; urgent changes at once, drift within 5 s);
//! then K new nodes join one after another, and for each the delay until every
//! one of the N agents has received the new node's peer entry is measured. It
//! also measures the cold start, the controller's CPU while idle (link reports
//! still flowing) and while changing, its peak memory, and the netmap bytes it
//! sends per change.
//!
//! The controller runs as its own process (as in production); the agents are
//! the real agent control client (`skymesh_agent::control`), all in this
//! process on loopback, each with its own QUIC endpoint (one UDP socket). Run
//! it through `tests/bench/control.sh`, which runs N = 100, 300, 1,000 and
//! 3,000 and prints the scaling table. It is a benchmark, not a test: it
//! prints numbers beside issue 15's targets and does not fail on a miss. It
//! fails only when something is broken: the controller exits, the agents do
//! not converge, or a change is not delivered within `--timeout-secs`.
//!
//! # Simulated links
//! Each agent reports its links through `run_session_reporting`, as a real
//! agent does (its source is asked once a second). The state of every unordered pair of nodes is one
//! byte in one shared table (`control_bench/links.rs`), not strings per agent,
//! so 3,000 agents (4.5 M pairs, 9 M directed links) stay cheap:
//! - a pair's base RTT is drawn from a hash of the two indices, 5–250 ms, loss 0;
//! - each second a random 2% of each node's links get a new RTT, base × (1 ±
//!   up to 4%); both ends report the new value;
//! - each second each node takes one random link down with probability 0.2%,
//!   for 3–10 s; both ends report it down (loss 100%), then up again.
//!
//! The agent keeps the last sample of each link and sends only material
//! changes; a source may leave out links that did not change. So each call of
//! a simulated agent's source returns only the peers new to its netmap and the
//! links that changed since its previous call: the bench does no work per
//! link per second, the controller gets what real agents would send it.
//!
//! Three of the N agents (`--transit`, spread over the indices; none of the
//! new nodes) register as transit nodes, so transit paths are computed.
//!
//! # What is measured
//! - cold start: from the first session started until every agent holds all
//!   N−1 peers (sessions are started `--concurrency` at a time waiting for
//!   their first netmap);
//! - change → agent: from starting the new node's session until each agent
//!   holds its peer entry; p50/p99 over all N × K deliveries;
//! - controller CPU (user + system, % of one core) while idle, over
//!   `--idle-secs` (≥ 10 s, default 15) starting 7 s after convergence (past
//!   the path engine's 5 s hold on the cold start's switches), with link reports
//!   flowing; and over the K changes; the bench process's own CPU beside it;
//! - controller peak RSS (VmHWM);
//! - netmap bytes per change: the growth of the controller's
//!   `skymesh_controller_netmap_bytes_sent_total` over the K changes, divided
//!   by K. Nothing is subtracted: path updates driven by link reports during
//!   that window, and the new node's own full netmap, are part of the cost.
//!   Beside it, the same net of the background those link reports cause
//!   (the bytes per second sent while idle, times the window), which is what
//!   shows how a change's own cost grows with N;
//! - sessions dropped for slowness: agent-side disconnects and controller log
//!   lines saying "not keeping up" (both must be 0).

#[path = "control_bench/controller.rs"]
mod controller;
#[path = "control_bench/links.rs"]
mod links;
#[path = "control_bench/measure.rs"]
mod measure;
#[path = "control_bench/sims.rs"]
mod sims;

use anyhow::{bail, Context, Result};
use clap::Parser;
use controller::{create_tokens, ControllerProc};
use futures::StreamExt;
use links::LinkModel;
use measure::{fmt_dur, mib, progress, Cpu, Percentiles};
use rand::SeedableRng;
use serde_json::{json, Value};
use sims::{start_agent, Names, Shared};
use skymesh_agent::control::{self, Identity};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};

/// Issue 15's targets for one mesh size (2-core machine, controller and
/// simulated agents sharing it).
struct Target {
    agents: usize,
    cold_start: Duration,
    p99: Duration,
    rss_bytes: u64,
    /// Share of one core.
    idle_cpu: f64,
}

const MIB: u64 = 1024 * 1024;

/// A run of N agents is held to the first target with `agents` ≥ N: a smaller
/// mesh must do at least as well as a larger one.
const TARGETS: [Target; 2] = [
    Target {
        agents: 1_000,
        cold_start: Duration::from_secs(10),
        p99: Duration::from_millis(200),
        rss_bytes: 150 * MIB,
        idle_cpu: 0.10,
    },
    Target {
        agents: 3_000,
        cold_start: Duration::from_secs(60),
        p99: Duration::from_secs(1),
        rss_bytes: 400 * MIB,
        idle_cpu: 0.25,
    },
];

/// The controller counters of netmap delivery (absent from older controllers).
const BYTES_SENT: &str = "skymesh_controller_netmap_bytes_sent_total";
const FRAMES_SENT: &str = "skymesh_controller_netmap_frames_sent_total";
/// Shortest idle window: link reports are once a second, downs last 3–10 s.
const MIN_IDLE: Duration = Duration::from_secs(10);
/// Pause between convergence and the idle window: for the first reports of
/// all peers to pass, and for the path engine's hold (5 s) to end on the
/// switches those reports started, which belong to the cold start; the idle
/// window then measures the steady state.
const SETTLE: Duration = Duration::from_secs(7);

#[derive(Parser)]
#[command(about = "skymesh control-plane benchmark: N agents reporting links, K changes")]
struct Args {
    /// Simulated agents that hold netmaps.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// New nodes added one after another; each is one measured change.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// How many of the agents register as transit nodes.
    #[arg(long, default_value_t = 3)]
    transit: usize,
    /// The skymesh-controller binary to start.
    #[arg(
        long,
        env = "SKYMESH_CONTROLLER_BIN",
        default_value = "target/release/skymesh-controller"
    )]
    controller: PathBuf,
    /// Enrollments, and sessions waiting for their first netmap, in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Pause after one change reached every agent, before the next one.
    #[arg(long, default_value_t = 300)]
    gap_ms: u64,
    /// Give up on a phase (convergence, one change) after this long.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// How long the controller's idle CPU is measured (at least 10; agents
    /// send RTT drift every 5 s, so the default holds three rounds).
    #[arg(long, default_value_t = 15)]
    idle_secs: u64,
    /// Seed of the simulated links (base RTTs, jitter, downs).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the controller's data dir goes (a fresh temp dir inside). Default:
    /// the system temp dir, a real disk like a controller's.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Where the simulated agents' state dirs go (a fresh temp dir inside). Their
    /// fsyncs are not what is measured, so the default is /dev/shm when present.
    #[arg(long)]
    agent_dir: Option<PathBuf>,
    /// Keep the work dir (controller log, store) instead of removing it.
    #[arg(long)]
    keep: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.agents < 2 || args.changes == 0 {
        bail!("--agents must be at least 2 and --changes at least 1");
    }
    if args.agents + args.changes > 65_536 {
        bail!("--agents + --changes must be at most 65536 (one 10.x.y.0/24 per node)");
    }
    if args.transit > args.agents {
        bail!(
            "--transit {} is more than --agents {}; choose at most as many transit nodes as agents",
            args.transit,
            args.agents
        );
    }
    if args.idle_secs < MIN_IDLE.as_secs() {
        bail!(
            "--idle-secs {} is too short to average link reports and downs; use at least {}",
            args.idle_secs,
            MIN_IDLE.as_secs()
        );
    }
    let nofile = measure::raise_nofile_limit()?;
    // Each session is one UDP socket; the rest is the runtime, files and margin.
    let needed = (args.agents + args.changes) as u64 + 256;
    if nofile < needed {
        bail!(
            "the open-files limit is {nofile}, {needed} are needed for {} agents; raise the hard limit (ulimit -Hn, or LimitNOFILE=) or lower --agents",
            args.agents
        );
    }
    let work = measure::tempdir_in(args.work_dir.as_deref(), "skymesh-control-bench.")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = rt.block_on(run(&args, work.path()));
    // Sessions end with the runtime, before the work dir goes.
    drop(rt);
    if args.keep {
        let kept = work.keep();
        progress(format!("kept {}", kept.display()));
    }
    match outcome {
        Ok(report) => {
            println!("{report}");
            match report["error"].as_str() {
                Some(e) => bail!("{e}"),
                None => Ok(()),
            }
        }
        Err(e) => {
            let line = json!({
                "bench": "control",
                "agents": args.agents,
                "changes": args.changes,
                "error": format!("{e:#}"),
            });
            println!("{line}");
            Err(e)
        }
    }
}

/// One run; returns the JSON line, with `error` set when a change was not
/// delivered (the figures up to it are still there).
async fn run(args: &Args, work: &Path) -> Result<Value> {
    let n = args.agents;
    let k = args.changes;
    let timeout = Duration::from_secs(args.timeout_secs);
    let agent_root = match &args.agent_dir {
        Some(d) => measure::tempdir_in(Some(d), "skymesh-bench-agents.")?,
        None if Path::new("/dev/shm").is_dir() => {
            measure::tempdir_in(Some(Path::new("/dev/shm")), "skymesh-bench-agents.")?
        }
        None => measure::tempdir_in(None, "skymesh-bench-agents.")?,
    };
    let mut ctl = ControllerProc::start(&args.controller, work)?;
    progress(format!(
        "controller pid {} up in {} (log {})",
        ctl.pid(),
        fmt_dur(ctl.started),
        ctl.log.display()
    ));

    let names = Names { sims: n };
    let all_names: Vec<String> = (0..n + k).map(|i| names.name(i)).collect();
    let t = Instant::now();
    let tokens = create_tokens(&ctl.api, &all_names, args.concurrency.min(8)).await?;
    let tokens_time = t.elapsed();
    progress(format!(
        "{} join tokens in {}",
        tokens.len(),
        fmt_dur(tokens_time)
    ));

    let t = Instant::now();
    let identities: Vec<Identity> = futures::stream::iter(tokens[..n].iter().cloned())
        .map(|(name, token)| {
            let dir = agent_root.path().join(&name);
            async move {
                control::enroll(&token, &dir)
                    .await
                    .with_context(|| format!("enrolling {name}"))
            }
        })
        .buffered(args.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let enroll_time = t.elapsed();
    progress(format!("{n} agents enrolled in {}", fmt_dur(enroll_time)));

    let model = Arc::new(LinkModel::new(all_names, args.seed));
    model.set_active(n);
    let ticker = {
        let model = model.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                model.tick(Instant::now(), &mut rng);
            }
        })
    };
    let transit: Vec<usize> = (0..args.transit).map(|j| j * n / args.transit).collect();

    // Sessions, at most `concurrency` of them still waiting for their first netmap.
    let shared = Arc::new(Shared::new(names, n + k));
    let mut sessions = tokio::task::JoinSet::new();
    let cpu0 = Cpu::now(ctl.cpu_seconds());
    let t = Instant::now();
    let gate = Arc::new(Semaphore::new(args.concurrency));
    for (i, identity) in identities.into_iter().enumerate() {
        let permit = gate.clone().acquire_owned().await?;
        let is_transit = transit.contains(&i);
        start_agent(
            &mut sessions,
            &shared,
            &model,
            i,
            identity,
            is_transit,
            Some(permit),
        );
        if t.elapsed() > timeout {
            ctl.alive()?;
            bail!("starting {n} sessions took more than {timeout:?}");
        }
    }
    let all_started = t.elapsed();
    wait_until(&mut ctl, timeout, || shared.holding(0..n, n - 1) == n)
        .await
        .with_context(|| {
            format!(
                "cold start did not converge: only {} of {n} agents hold a full netmap of {} peers",
                shared.holding(0..n, n - 1),
                n - 1
            )
        })?;
    let cold_start = t.elapsed();
    let converge_cpu = cpu0.to(Cpu::now(ctl.cpu_seconds()), 1.0);
    let cold_entries = (
        shared.peer_entries.load(Ordering::Relaxed),
        shared
            .path_entries
            .each_ref()
            .map(|c| c.load(Ordering::Relaxed)),
    );
    let needed = (n * (n - 1)) as f64;
    let [in_maps, in_lists, changes] = cold_entries.1;
    progress(format!(
        "cold start: {:.2} × N(N-1) peer entries received; path entries {:.2} × \
         ({:.2} in netmaps, {:.2} in whole lists, {:.2} as changes)",
        cold_entries.0 as f64 / needed,
        (in_maps + in_lists + changes) as f64 / needed,
        in_maps as f64 / needed,
        in_lists as f64 / needed,
        changes as f64 / needed,
    ));
    let rss_converged = ctl.memory()?;
    progress(format!(
        "{n} agents hold {} peers each after {} (all sessions started after {})",
        n - 1,
        fmt_dur(cold_start),
        fmt_dur(all_started)
    ));

    // Idle: holding N sessions (a QUIC keepalive every 2 s each) with link reports flowing.
    tokio::time::sleep(SETTLE).await;
    let samples0 = model.samples();
    let idle_metrics0 = ctl.metrics().unwrap_or_default();
    let cpu0 = Cpu::now(ctl.cpu_seconds());
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let idle_wall = t.elapsed().as_secs_f64();
    let idle_cpu = cpu0.to(Cpu::now(ctl.cpu_seconds()), idle_wall);
    // What link reports alone make the controller send (path updates).
    let idle_metrics = ctl.metrics().unwrap_or_default();
    let idle_bytes_per_s = match (
        idle_metrics0.get(BYTES_SENT).and_then(Value::as_f64),
        idle_metrics.get(BYTES_SENT).and_then(Value::as_f64),
    ) {
        (Some(before), Some(after)) => Some((after - before) / idle_wall),
        _ => None,
    };
    let idle_samples = (model.samples() - samples0) as f64 / idle_wall;
    ctl.alive()?;
    progress(format!(
        "idle over {idle_wall:.1} s with {idle_samples:.0} link samples/s: controller {:.1}% of a core, bench {:.1}%",
        idle_cpu.controller * 100.0,
        idle_cpu.bench * 100.0
    ));

    let metrics0 = ctl.metrics().unwrap_or_default();
    let cpu0 = Cpu::now(ctl.cpu_seconds());
    let changes_start = Instant::now();
    let mut delays: Vec<Duration> = Vec::with_capacity(n * k);
    let mut per_change: Vec<Duration> = Vec::with_capacity(k);
    let mut first: Vec<Duration> = Vec::with_capacity(k);
    let mut own_netmap: Vec<Duration> = Vec::with_capacity(k);
    let mut missed = 0usize;
    let mut changes_made = 0usize;
    let mut error: Option<String> = None;
    for (c, (name, token)) in tokens[n..].iter().enumerate() {
        let idx = n + c;
        let identity = control::enroll(token, &agent_root.path().join(name))
            .await
            .with_context(|| format!("enrolling {name}"))?;
        let done = shared.arm(name, idx, n);
        let t0 = Instant::now();
        model.set_active(idx + 1);
        start_agent(&mut sessions, &shared, &model, idx, identity, false, None);
        changes_made += 1;
        let complete = wait_notified(&mut ctl, &done, timeout).await?;
        let probe = shared.disarm();
        for at in &probe.arrived {
            match at {
                Some(at) => delays.push(at.saturating_duration_since(t0)),
                None => missed += 1,
            }
        }
        let reached = probe.arrived.iter().flatten().count();
        let last = probe
            .arrived
            .iter()
            .flatten()
            .max()
            .map(|at| at.saturating_duration_since(t0));
        if let Some(at) = probe.arrived.iter().flatten().min() {
            first.push(at.saturating_duration_since(t0));
        }
        if let Some(last) = last.filter(|_| complete) {
            per_change.push(last);
        }
        if let Some(own) = probe.own_netmap {
            own_netmap.push(own.saturating_duration_since(t0));
        }
        progress(format!(
            "change {}/{k}: {} reached {reached} of {n} agents, the last after {}",
            c + 1,
            probe.name,
            last.map(fmt_dur).unwrap_or_else(|| "-".into())
        ));
        if !complete {
            error = Some(format!(
                "change {}: {} reached only {reached} of {n} agents within {}",
                c + 1,
                probe.name,
                fmt_dur(timeout)
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    let changes_wall = changes_start.elapsed();
    let changes_cpu = cpu0.to(Cpu::now(ctl.cpu_seconds()), 1.0);
    let metrics = ctl.metrics().unwrap_or_default();
    ctl.alive()?;
    let per_change_of = |name: &str| {
        let before = metrics0.get(name).and_then(Value::as_f64)?;
        let after = metrics.get(name).and_then(Value::as_f64)?;
        Some((after - before) / changes_made.max(1) as f64)
    };
    let bytes_per_change = per_change_of(BYTES_SENT);
    let frames_per_change = per_change_of(FRAMES_SENT);
    // The same without the background of link-report path updates measured
    // while idle: what the changes themselves cost. The background grows
    // with the pairs (N²) and the window with how long K changes take, so
    // only this figure can show how a change's cost grows with N.
    let net_bytes_per_change = match (bytes_per_change, idle_bytes_per_s) {
        (Some(b), Some(bg)) => {
            Some((b - bg * changes_wall.as_secs_f64() / changes_made.max(1) as f64).max(0.0))
        }
        _ => None,
    };
    let rss_end = ctl.memory()?;
    let own_rss = measure::memory(Path::new("/proc/self/status"))?;
    let disconnects = shared.disconnects.load(Ordering::Relaxed);
    let full_maps = shared.full_maps.load(Ordering::Relaxed);
    let transit_paths = shared.transit_paths.load(Ordering::Relaxed);
    let links_down = model.down();
    let reasons = shared.disconnect_reasons(5);
    ticker.abort();
    sessions.abort_all();
    while sessions.join_next().await.is_some() {}
    let dropped_slow = ctl.log_count("not keeping up");
    ctl.stop();

    delays.sort();
    per_change.sort();
    first.sort();
    own_netmap.sort();
    let d = Percentiles::of(&delays);
    let pc = Percentiles::of(&per_change);
    let fa = Percentiles::of(&first);
    let own = Percentiles::of(&own_netmap);
    let peak = rss_end.hwm.max(rss_converged.hwm);
    let target = TARGETS.iter().find(|t| n <= t.agents);
    let pass = |ok: bool| json!(if ok { "PASS" } else { "MISS" });
    let verdicts = match target {
        Some(t) => json!({
            "cold_start": pass(cold_start < t.cold_start),
            "p99": pass(missed == 0 && d.p99 < t.p99),
            "rss": pass(peak < t.rss_bytes),
            "idle_cpu": pass(idle_cpu.controller < t.idle_cpu),
            "dropped": pass(disconnects == 0 && dropped_slow == 0),
        }),
        None => json!({"dropped": pass(disconnects == 0 && dropped_slow == 0)}),
    };
    let changes_share = |s: f64| s / changes_wall.as_secs_f64().max(1e-9);

    let rows: Vec<(String, String)> = vec![
        (
            format!("join tokens ({} via the API)", n + k),
            fmt_dur(tokens_time),
        ),
        (
            format!("enrollment of {n} agents ({} at once)", args.concurrency),
            fmt_dur(enroll_time),
        ),
        (
            format!("cold start: every agent holds {} peers", n - 1),
            fmt_dur(cold_start),
        ),
        (
            "CPU during the cold start: controller / bench process".into(),
            format!(
                "{:.1} s / {:.1} s",
                converge_cpu.controller, converge_cpu.bench
            ),
        ),
        (
            format!(
                "idle CPU over {idle_wall:.0} s, {idle_samples:.0} link samples/s: controller / bench process"
            ),
            format!(
                "{:.1}% / {:.1}% of a core",
                idle_cpu.controller * 100.0,
                idle_cpu.bench * 100.0
            ),
        ),
        (
            format!(
                "change -> agent delay p50 / p90 / p99 / max ({} samples)",
                delays.len()
            ),
            format!(
                "{} / {} / {} / {}",
                fmt_dur(d.p50),
                fmt_dur(d.p90),
                fmt_dur(d.p99),
                fmt_dur(d.max)
            ),
        ),
        (
            format!("change -> first / last of {n} agents, p50"),
            format!("{} / {}", fmt_dur(fa.p50), fmt_dur(pc.p50)),
        ),
        (
            "new node's own full netmap p50 / max".into(),
            format!("{} / {}", fmt_dur(own.p50), fmt_dur(own.max)),
        ),
        (
            format!("deliveries missed (after {})", fmt_dur(timeout)),
            missed.to_string(),
        ),
        (
            format!(
                "CPU during {changes_made} changes ({}): controller / bench process",
                fmt_dur(changes_wall)
            ),
            format!(
                "{:.1}% / {:.1}% of a core",
                changes_share(changes_cpu.controller) * 100.0,
                changes_share(changes_cpu.bench) * 100.0
            ),
        ),
        (
            "netmap bytes / frames sent per change".into(),
            format!(
                "{} / {}",
                opt(bytes_per_change, |b| format!("{:.0} KiB", b / 1024.0)),
                opt(frames_per_change, |f| format!("{f:.0}"))
            ),
        ),
        (
            "netmap bytes sent while idle (link-report path updates) / per change without them"
                .into(),
            format!(
                "{} / {}",
                opt(idle_bytes_per_s, |b| format!("{:.0} KiB/s", b / 1024.0)),
                opt(net_bytes_per_change, |b| format!("{:.0} KiB", b / 1024.0))
            ),
        ),
        (
            "controller VmRSS after convergence / at the end / peak".into(),
            format!(
                "{} / {} / {}",
                mib(rss_converged.rss),
                mib(rss_end.rss),
                mib(peak)
            ),
        ),
        (
            format!("bench process VmRSS / VmHWM ({} agents)", n + k),
            format!("{} / {}", mib(own_rss.rss), mib(own_rss.hwm)),
        ),
        (
            "sessions dropped: agent-side disconnects / controller 'not keeping up'".into(),
            format!("{disconnects} / {dropped_slow}"),
        ),
        (
            format!("full netmaps received (expected {})", n + changes_made),
            full_maps.to_string(),
        ),
        (
            format!(
                "path entries via a transit received ({} transit nodes) / links down at the end",
                args.transit
            ),
            format!("{transit_paths} / {links_down}"),
        ),
    ];
    println!();
    println!(
        "control plane, {n} agents on loopback reporting links, {changes_made} changes (one new node each), controller pid {}",
        ctl.pid()
    );
    println!();
    println!("| what | value |");
    println!("|---|---|");
    for (what, value) in &rows {
        println!("| {what} | {value} |");
    }
    println!();
    if let Some(t) = target {
        println!(
            "targets of {} agents: cold start {} < {}: {}; p99 {} < {}: {}; peak RSS {} < {}: {}; idle CPU {:.1}% < {:.0}%: {}",
            t.agents,
            fmt_dur(cold_start),
            fmt_dur(t.cold_start),
            verdicts["cold_start"].as_str().unwrap_or(""),
            fmt_dur(d.p99),
            fmt_dur(t.p99),
            verdicts["p99"].as_str().unwrap_or(""),
            mib(peak),
            mib(t.rss_bytes),
            verdicts["rss"].as_str().unwrap_or(""),
            idle_cpu.controller * 100.0,
            t.idle_cpu * 100.0,
            verdicts["idle_cpu"].as_str().unwrap_or(""),
        );
    }
    println!(
        "no session dropped for slowness: {}",
        verdicts["dropped"].as_str().unwrap_or("")
    );
    for (reason, count) in &reasons {
        println!("sessions ended {count} times: {reason}");
    }
    Ok(json!({
        "bench": "control",
        "agents": n,
        "changes": changes_made,
        "transit": args.transit,
        "tokens_s": tokens_time.as_secs_f64(),
        "enroll_s": enroll_time.as_secs_f64(),
        "sessions_started_s": all_started.as_secs_f64(),
        "cold_start_s": cold_start.as_secs_f64(),
        "cold_start_cpu_s": {"controller": converge_cpu.controller, "bench": converge_cpu.bench},
        "cold_start_entries": {"peers": cold_entries.0, "paths_in_netmaps": in_maps,
                               "paths_in_whole_lists": in_lists, "path_changes": changes},
        "idle_cpu_cores": {"controller": idle_cpu.controller, "bench": idle_cpu.bench, "window_s": idle_wall},
        "idle_link_samples_per_s": idle_samples,
        "delay_s": {"p50": d.p50.as_secs_f64(), "p90": d.p90.as_secs_f64(),
                    "p99": d.p99.as_secs_f64(), "max": d.max.as_secs_f64(), "samples": delays.len()},
        "change_first_s": {"p50": fa.p50.as_secs_f64(), "max": fa.max.as_secs_f64()},
        "change_complete_s": {"p50": pc.p50.as_secs_f64(), "max": pc.max.as_secs_f64()},
        "own_netmap_s": {"p50": own.p50.as_secs_f64(), "max": own.max.as_secs_f64()},
        "missed": missed,
        "changes_cpu_cores": {"controller": changes_share(changes_cpu.controller),
                              "bench": changes_share(changes_cpu.bench),
                              "wall_s": changes_wall.as_secs_f64()},
        "netmap_bytes_per_change": bytes_per_change,
        "netmap_bytes_idle_per_s": idle_bytes_per_s,
        "netmap_net_bytes_per_change": net_bytes_per_change,
        "netmap_frames_per_change": frames_per_change,
        "controller_rss_bytes": {"converged": rss_converged.rss, "end": rss_end.rss, "hwm": peak},
        "bench_rss_bytes": {"rss": own_rss.rss, "hwm": own_rss.hwm},
        "disconnects": disconnects,
        "dropped_slow": dropped_slow,
        "disconnect_reasons": reasons.iter().map(|(r, c)| json!({"reason": r, "count": c})).collect::<Vec<_>>(),
        "full_netmaps": full_maps,
        "transit_paths": transit_paths,
        "target": target.map(|t| json!({
            "agents": t.agents,
            "cold_start_s": t.cold_start.as_secs_f64(),
            "p99_s": t.p99.as_secs_f64(),
            "rss_bytes": t.rss_bytes,
            "idle_cpu_cores": t.idle_cpu,
        })),
        "verdict": verdicts,
        "controller_metrics": metrics,
        "error": error,
    }))
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "n/a".into())
}

/// Waits until `done` holds, checking every 10 ms; fails if the controller
/// exits or `timeout` passes.
async fn wait_until(
    ctl: &mut ControllerProc,
    timeout: Duration,
    done: impl Fn() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut checked = Instant::now();
    while !done() {
        if Instant::now() > deadline {
            bail!("not done within {timeout:?}");
        }
        if checked.elapsed() > Duration::from_secs(1) {
            ctl.alive()?;
            checked = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Waits for `done` to be notified: true if it was within `timeout`. Fails if
/// the controller exits.
async fn wait_notified(ctl: &mut ControllerProc, done: &Notify, timeout: Duration) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let notified = done.notified();
    tokio::pin!(notified);
    loop {
        tokio::select! {
            _ = &mut notified => return Ok(true),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                ctl.alive()?;
                if tokio::time::Instant::now() >= deadline {
                    return Ok(false);
                }
            }
        }
    }
}
