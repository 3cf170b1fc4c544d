//! Control-plane benchmark (issue 4): N simulated agents enroll with the real
//! controller binary and hold their netmaps; then K new nodes join one after
//! another, and for each the delay until every one of the N agents has received
//! the new node's peer entry is measured. Also reports the time to converge and
//! the controller's memory.
//!
//! The controller runs as its own process (as in production); the agents are the
//! real agent control client (`skymesh_agent::control`), all in this process on
//! loopback, each with its own QUIC endpoint (one UDP socket). Run it through
//! `tests/bench/control.sh`; it is a benchmark, not a test: it prints numbers and
//! compares them with the targets, it does not fail on a miss.

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use futures::StreamExt;
use ipnet::IpNet;
use serde_json::{json, Value};
use skymesh_agent::control::{self, ControlEvent, Identity};
use skymesh_wire::control::Register;
use skymesh_wire::{JoinToken, NetMap, PublicKey};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

/// Targets of issue 4 at N = 1,000.
const TARGET_P99: Duration = Duration::from_secs(1);
const TARGET_RSS_BYTES: u64 = 200_000_000;
/// Linux reports utime/stime in USER_HZ ticks, 100 per second on every
/// architecture the kernel exposes to user space.
const USER_HZ: f64 = 100.0;
/// How long the idle cost of holding the sessions is measured.
const IDLE_WINDOW: Duration = Duration::from_secs(3);

#[derive(Parser)]
#[command(about = "skymesh control-plane benchmark: change propagation to N agents")]
struct Args {
    /// Simulated agents that hold netmaps.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// New nodes added one after another; each is one measured change.
    #[arg(long, default_value_t = 20)]
    changes: usize,
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
    let nofile = raise_nofile_limit()?;
    // Each session is one UDP socket; the rest is the runtime, files and margin.
    let needed = (args.agents + args.changes) as u64 + 256;
    if nofile < needed {
        bail!(
            "the open-files limit is {nofile}, {needed} are needed for {} agents; raise the hard limit (ulimit -Hn, or LimitNOFILE=) or lower --agents",
            args.agents
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let n = args.agents;
    let k = args.changes;
    let timeout = Duration::from_secs(args.timeout_secs);
    let work = tempdir_in(args.work_dir.as_deref(), "skymesh-control-bench.")?;
    let agent_root = match &args.agent_dir {
        Some(d) => tempdir_in(Some(d), "skymesh-bench-agents.")?,
        None if Path::new("/dev/shm").is_dir() => {
            tempdir_in(Some(Path::new("/dev/shm")), "skymesh-bench-agents.")?
        }
        None => tempdir_in(None, "skymesh-bench-agents.")?,
    };
    let mut ctl = ControllerProc::start(&args.controller, work.path())?;
    progress(format!(
        "controller pid {} up in {} (log {})",
        ctl.pid(),
        fmt_dur(ctl.started),
        ctl.log.display()
    ));

    // Join tokens: one per node, so each enrollment is one lookup (a reusable
    // token makes the controller probe name, name-2, ... one by one).
    let t = Instant::now();
    let mut names: Vec<String> = (0..n).map(|i| format!("sim-{i:05}")).collect();
    names.extend((0..k).map(|i| format!("new-{i:03}")));
    let tokens = create_tokens(&ctl.api, &names, args.concurrency.min(8)).await?;
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

    // Sessions, at most `concurrency` of them still waiting for their first netmap.
    let shared = Arc::new(Shared::new(n + k));
    let mut sessions = tokio::task::JoinSet::new();
    let cpu0 = Cpu::now(&ctl);
    let t = Instant::now();
    let gate = Arc::new(Semaphore::new(args.concurrency));
    for (i, identity) in identities.into_iter().enumerate() {
        let permit = gate.clone().acquire_owned().await?;
        start_agent(&mut sessions, &shared, i, identity, Some(permit));
        if t.elapsed() > timeout {
            bail!("starting {n} sessions took more than {timeout:?}");
        }
    }
    let all_started = t.elapsed();
    wait_until(timeout, || shared.holding(0..n, n - 1) == n)
        .await
        .with_context(|| {
            format!(
                "only {} of {n} agents hold a full netmap of {} peers",
                shared.holding(0..n, n - 1),
                n - 1
            )
        })?;
    let converge_time = t.elapsed();
    let converge_cpu = Cpu::since(&ctl, cpu0, 1.0);
    let rss_converged = ctl.memory()?;
    progress(format!(
        "{n} agents hold {} peers each after {} (all sessions started after {})",
        n - 1,
        fmt_dur(converge_time),
        fmt_dur(all_started)
    ));

    // Idle: what holding N sessions costs (a QUIC keepalive every 2 s per agent).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = Cpu::now(&ctl);
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_cpu = Cpu::since(&ctl, cpu0, IDLE_WINDOW.as_secs_f64());

    let cpu0 = Cpu::now(&ctl);
    let changes_start = Instant::now();
    let mut delays: Vec<Duration> = Vec::with_capacity(n * k);
    let mut per_change: Vec<Duration> = Vec::with_capacity(k);
    let mut first: Vec<Duration> = Vec::with_capacity(k);
    let mut own_netmap: Vec<Duration> = Vec::with_capacity(k);
    let mut missed = 0usize;
    for (c, (name, token)) in tokens[n..].iter().enumerate() {
        let idx = n + c;
        let identity = control::enroll(token, &agent_root.path().join(name))
            .await
            .with_context(|| format!("enrolling {name}"))?;
        let done = shared.arm(&identity.node, idx, n);
        let t0 = Instant::now();
        start_agent(&mut sessions, &shared, idx, identity, None);
        let complete = tokio::time::timeout(timeout, done.notified()).await.is_ok();
        let probe = shared.disarm();
        for at in &probe.arrived {
            match at {
                Some(at) => delays.push(at.saturating_duration_since(t0)),
                None => missed += 1,
            }
        }
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
            "change {}/{k}: {} reached {} of {n} agents, the last after {}",
            c + 1,
            probe.name,
            probe.arrived.iter().flatten().count(),
            last.map(fmt_dur).unwrap_or_else(|| "-".into())
        ));
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    let changes_cpu = Cpu::since(&ctl, cpu0, 1.0);
    let changes_wall = changes_start.elapsed();
    let rss_end = ctl.memory()?;
    let own_rss = memory(Path::new("/proc/self/status"))?;
    let metrics = ctl.metrics().unwrap_or_default();
    let disconnects = shared.disconnects.load(Ordering::Relaxed);
    let full_maps = shared.full_maps.load(Ordering::Relaxed);
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
    let pass_p99 = missed == 0 && d.p99 < TARGET_P99;
    let pass_rss = peak < TARGET_RSS_BYTES;

    println!();
    println!(
        "control plane, {n} agents on loopback, {k} changes (one new node each), controller pid {}",
        ctl.pid()
    );
    println!();
    println!("| what | value |");
    println!("|---|---|");
    println!(
        "| join tokens ({} via the API) | {} |",
        n + k,
        fmt_dur(tokens_time)
    );
    println!(
        "| enrollment of {n} agents ({} at once) | {} |",
        args.concurrency,
        fmt_dur(enroll_time)
    );
    println!(
        "| convergence: every agent holds {} peers | {} |",
        n - 1,
        fmt_dur(converge_time)
    );
    println!(
        "| CPU during convergence: controller / bench process | {:.1} s / {:.1} s |",
        converge_cpu.controller, converge_cpu.bench
    );
    println!(
        "| idle CPU holding {n} sessions: controller / bench process | {:.1}% / {:.1}% of a core |",
        idle_cpu.controller * 100.0,
        idle_cpu.bench * 100.0
    );
    println!(
        "| change -> agent delay p50 / p90 / p99 / max ({} samples) | {} / {} / {} / {} |",
        delays.len(),
        fmt_dur(d.p50),
        fmt_dur(d.p90),
        fmt_dur(d.p99),
        fmt_dur(d.max)
    );
    println!(
        "| change -> first of {n} agents p50 / max | {} / {} |",
        fmt_dur(fa.p50),
        fmt_dur(fa.max)
    );
    println!(
        "| change -> last of {n} agents p50 / max | {} / {} |",
        fmt_dur(pc.p50),
        fmt_dur(pc.max)
    );
    println!(
        "| new node's own full netmap p50 / max | {} / {} |",
        fmt_dur(own.p50),
        fmt_dur(own.max)
    );
    println!(
        "| deliveries missed (after {}) | {missed} |",
        fmt_dur(timeout)
    );
    println!(
        "| CPU during the {k} changes ({}): controller / bench process | {:.2} s / {:.2} s |",
        fmt_dur(changes_wall),
        changes_cpu.controller,
        changes_cpu.bench
    );
    println!(
        "| controller VmRSS / VmHWM after convergence | {} / {} |",
        mib(rss_converged.rss),
        mib(rss_converged.hwm)
    );
    println!(
        "| controller VmRSS / VmHWM at the end | {} / {} |",
        mib(rss_end.rss),
        mib(rss_end.hwm)
    );
    println!(
        "| bench process VmRSS / VmHWM ({} agents) | {} / {} |",
        n + k,
        mib(own_rss.rss),
        mib(own_rss.hwm)
    );
    println!("| session drops: agent-side disconnects / controller 'not keeping up' | {disconnects} / {dropped_slow} |");
    println!(
        "| full netmaps received (expected {}) | {full_maps} |",
        n + k
    );
    println!();
    println!(
        "p99 {} < {}: {}",
        fmt_dur(d.p99),
        fmt_dur(TARGET_P99),
        if pass_p99 { "PASS" } else { "MISS" }
    );
    println!(
        "controller peak RSS {} < 200 MB: {}",
        mib(peak),
        if pass_rss { "PASS" } else { "MISS" }
    );
    let line = json!({
        "bench": "control",
        "agents": n,
        "changes": k,
        "tokens_s": tokens_time.as_secs_f64(),
        "enroll_s": enroll_time.as_secs_f64(),
        "converge_s": converge_time.as_secs_f64(),
        "converge_cpu_s": {"controller": converge_cpu.controller, "bench": converge_cpu.bench},
        "idle_cpu_cores": {"controller": idle_cpu.controller, "bench": idle_cpu.bench},
        "delay_s": {"p50": d.p50.as_secs_f64(), "p90": d.p90.as_secs_f64(),
                    "p99": d.p99.as_secs_f64(), "max": d.max.as_secs_f64(), "samples": delays.len()},
        "change_first_s": {"p50": fa.p50.as_secs_f64(), "max": fa.max.as_secs_f64()},
        "change_complete_s": {"p50": pc.p50.as_secs_f64(), "max": pc.max.as_secs_f64()},
        "own_netmap_s": {"p50": own.p50.as_secs_f64(), "max": own.max.as_secs_f64()},
        "missed": missed,
        "changes_cpu_s": {"controller": changes_cpu.controller, "bench": changes_cpu.bench,
                          "wall": changes_wall.as_secs_f64()},
        "controller_rss_bytes": {"converged": rss_converged.rss, "end": rss_end.rss, "hwm": peak},
        "bench_rss_bytes": {"rss": own_rss.rss, "hwm": own_rss.hwm},
        "disconnects": disconnects,
        "dropped_slow": dropped_slow,
        "full_netmaps": full_maps,
        "controller_metrics": metrics,
        "pass": {"p99": pass_p99, "rss": pass_rss},
    });
    println!("{line}");
    if args.keep {
        let kept = work.keep();
        progress(format!("kept {}", kept.display()));
    }
    Ok(())
}

// ---- the simulated agents ----

/// What the agent tasks report to the measuring task.
struct Shared {
    /// Peers in each agent's netmap; `usize::MAX` before its first netmap.
    peers: Vec<AtomicUsize>,
    disconnects: AtomicUsize,
    full_maps: AtomicUsize,
    probe: Mutex<Option<Probe>>,
    done: Arc<Notify>,
}

/// The change being measured: when each of the first `arrived.len()` agents got
/// the named peer.
struct Probe {
    name: String,
    new_index: usize,
    arrived: Vec<Option<Instant>>,
    missing: usize,
    own_netmap: Option<Instant>,
}

impl Shared {
    fn new(agents: usize) -> Self {
        Self {
            peers: (0..agents).map(|_| AtomicUsize::new(usize::MAX)).collect(),
            disconnects: AtomicUsize::new(0),
            full_maps: AtomicUsize::new(0),
            probe: Mutex::new(None),
            done: Arc::new(Notify::new()),
        }
    }

    fn holding(&self, agents: std::ops::Range<usize>, peers: usize) -> usize {
        self.peers[agents]
            .iter()
            .filter(|p| p.load(Ordering::Relaxed) == peers)
            .count()
    }

    /// Starts watching for `name` at the first `watched` agents.
    fn arm(&self, name: &str, new_index: usize, watched: usize) -> Arc<Notify> {
        *self.lock() = Some(Probe {
            name: name.to_string(),
            new_index,
            arrived: vec![None; watched],
            missing: watched,
            own_netmap: None,
        });
        self.done.clone()
    }

    fn disarm(&self) -> Probe {
        self.lock().take().unwrap_or(Probe {
            name: String::new(),
            new_index: usize::MAX,
            arrived: Vec::new(),
            missing: 0,
            own_netmap: None,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Probe>> {
        self.probe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Agent `idx` received, at `at`, a message with these peers upserted.
    fn saw(&self, idx: usize, upserted: &mut dyn Iterator<Item = &str>, full: bool, at: Instant) {
        let mut guard = self.lock();
        let Some(p) = guard.as_mut() else {
            return;
        };
        if full && idx == p.new_index && p.own_netmap.is_none() {
            p.own_netmap = Some(at);
        }
        if idx >= p.arrived.len() || p.arrived[idx].is_some() {
            return;
        }
        let mut hit = false;
        for name in upserted {
            if name == p.name {
                hit = true;
                break;
            }
        }
        if hit {
            p.arrived[idx] = Some(at);
            p.missing -= 1;
            if p.missing == 0 {
                self.done.notify_one();
            }
        }
    }
}

fn start_agent(
    sessions: &mut tokio::task::JoinSet<()>,
    shared: &Arc<Shared>,
    idx: usize,
    identity: Identity,
    first_netmap: Option<OwnedSemaphorePermit>,
) {
    let (tx, rx) = mpsc::channel(1024);
    sessions.spawn(follow(idx, rx, shared.clone(), first_netmap));
    sessions.spawn(async move {
        // Returns only on a refusal retrying cannot fix; the follower sees its end.
        let _ = control::run_session(identity, register(idx), tx).await;
    });
}

/// One agent's view: applies its netmap and updates, as the daemon does.
async fn follow(
    idx: usize,
    mut events: mpsc::Receiver<ControlEvent>,
    shared: Arc<Shared>,
    mut first_netmap: Option<OwnedSemaphorePermit>,
) {
    let mut map: Option<NetMap> = None;
    while let Some(ev) = events.recv().await {
        let at = Instant::now();
        match ev {
            ControlEvent::NetMap(full) => {
                shared.full_maps.fetch_add(1, Ordering::Relaxed);
                shared.saw(
                    idx,
                    &mut full.netmap.peers.iter().map(|p| p.name.as_str()),
                    true,
                    at,
                );
                map = Some(full.netmap);
                first_netmap = None;
            }
            ControlEvent::Update(u) => {
                shared.saw(
                    idx,
                    &mut u.upsert.iter().map(|p| p.name.as_str()),
                    false,
                    at,
                );
                if let Some(m) = map.as_mut() {
                    u.apply_to(m);
                }
            }
            ControlEvent::Disconnected { .. } => {
                shared.disconnects.fetch_add(1, Ordering::Relaxed);
            }
            ControlEvent::Connected { .. } => {}
        }
        if let Some(m) = &map {
            shared.peers[idx].store(m.peers.len(), Ordering::Relaxed);
        }
    }
    drop(first_netmap);
}

/// Agent `i`'s registration: a random key, a documentation endpoint and its own /24.
fn register(i: usize) -> Register {
    let (hi, lo) = ((i >> 8) as u8, i as u8);
    let advertise: IpNet = format!("10.{hi}.{lo}.0/24")
        .parse()
        .unwrap_or_else(|_| IpNet::default());
    Register {
        public_key: PublicKey::from_bytes(rand::random()),
        listen_port: 51820,
        endpoints: vec![std::net::SocketAddr::from(([198, 18, hi, lo], 51820))],
        advertise: vec![advertise],
        underlay: vec![],
        agent_version: "control-bench".into(),
        transit: false,
        capability: 0,
    }
}

async fn wait_until(timeout: Duration, done: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("not done within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

// ---- the controller process and its API ----

struct ControllerProc {
    child: Child,
    log: PathBuf,
    api: Api,
    started: Duration,
}

#[derive(Clone)]
struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl ControllerProc {
    fn start(bin: &Path, dir: &Path) -> Result<Self> {
        if !bin.is_file() {
            bail!(
                "controller binary {} not found; build it (cargo build --release -p skymesh-controller) or pass --controller",
                bin.display()
            );
        }
        let control_port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let api_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let token_file = dir.join("admin.token");
        let config = dir.join("controller.toml");
        std::fs::write(
            &config,
            format!(
                "[control]\nlisten = \"127.0.0.1:{control_port}\"\nadvertise = [\"127.0.0.1:{control_port}\"]\n\
                 [api]\nlisten = \"127.0.0.1:{api_port}\"\nadmin_token_file = {:?}\n[state]\ndata_dir = {:?}\n",
                token_file,
                dir.join("data")
            ),
        )?;
        let log = dir.join("controller.log");
        let log_file = std::fs::File::create(&log)?;
        let started = Instant::now();
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut proc = Self {
            child,
            log,
            api: Api {
                base: format!("http://127.0.0.1:{api_port}"),
                token: String::new(),
                agent: ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(30))
                    .build(),
            },
            started: Duration::ZERO,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.child.try_wait()? {
                bail!("the controller exited ({status}):\n{}", proc.log_tail());
            }
            if proc.api.token.is_empty() {
                if let Ok(t) = std::fs::read_to_string(&token_file) {
                    proc.api.token = t.trim().to_string();
                }
            }
            if !proc.api.token.is_empty() && proc.api.call("GET", "/healthz", None).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the controller's /healthz did not answer within 30 s:\n{}",
                    proc.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        proc.started = started.elapsed();
        Ok(proc)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn memory(&self) -> Result<Memory> {
        memory(&PathBuf::from(format!("/proc/{}/status", self.pid())))
    }

    /// User + system CPU time of every controller thread so far.
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(&format!("/proc/{}/stat", self.pid()))
    }

    /// The controller's own counters, from /metrics.
    fn metrics(&self) -> Result<Value> {
        let text = self
            .api
            .agent
            .get(&format!("{}/metrics", self.api.base))
            .set("Authorization", &format!("Bearer {}", self.api.token))
            .call()?
            .into_string()?;
        let mut out = serde_json::Map::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((name, value)) = line.rsplit_once(' ') {
                if !name.contains('{') {
                    if let Ok(v) = value.parse::<f64>() {
                        out.insert(name.to_string(), json!(v));
                    }
                }
            }
        }
        Ok(Value::Object(out))
    }

    fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Api {
    /// One blocking API call; errors carry the API's error code and detail.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token));
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(code, r)) => Err(anyhow!(
                "{method} {path}: HTTP {code}: {}",
                r.into_string().unwrap_or_default()
            )),
            Err(e) => Err(anyhow!("{method} {path}: {e}")),
        }
    }
}

/// One join token per name, `parallel` API calls at a time.
async fn create_tokens(
    api: &Api,
    names: &[String],
    parallel: usize,
) -> Result<Vec<(String, JoinToken)>> {
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            tokio::task::spawn_blocking(move || {
                let reply = api.call(
                    "POST",
                    "/v1/join-tokens",
                    Some(json!({"name": name, "site": "bench", "cloud": "sim", "region": "loopback"})),
                )?;
                let text = reply["token"]
                    .as_str()
                    .ok_or_else(|| anyhow!("no token in the reply {reply}"))?;
                Ok::<_, anyhow::Error>((name, JoinToken::decode(text)?))
            })
        })
        .buffered(parallel.max(1))
        .map(|r| r.map_err(|e| anyhow!("token task: {e}")).and_then(|r| r))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

// ---- measurement helpers ----

/// User + system CPU time of every thread of a process so far, from its
/// /proc/PID/stat.
fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the command name, which ends with the last ')'; utime and
    // stime are fields 14 and 15, i.e. the 12th and 13th after it.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let ticks: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    ticks.iter().sum::<f64>() / USER_HZ
}

/// CPU seconds of the controller and of this process.
#[derive(Clone, Copy, Default)]
struct Cpu {
    controller: f64,
    bench: f64,
}

impl Cpu {
    fn now(ctl: &ControllerProc) -> Self {
        Self {
            controller: ctl.cpu_seconds(),
            bench: cpu_seconds("/proc/self/stat"),
        }
    }

    /// CPU used since `start`, divided by `per` (1.0 for seconds).
    fn since(ctl: &ControllerProc, start: Cpu, per: f64) -> Self {
        let now = Self::now(ctl);
        Self {
            controller: (now.controller - start.controller) / per,
            bench: (now.bench - start.bench) / per,
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Memory {
    rss: u64,
    hwm: u64,
}

/// VmRSS and VmHWM of a /proc/PID/status file, in bytes.
fn memory(status: &Path) -> Result<Memory> {
    let text =
        std::fs::read_to_string(status).with_context(|| format!("reading {}", status.display()))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| anyhow!("{name} missing in {}", status.display()))
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

#[derive(Default)]
struct Percentiles {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

impl Percentiles {
    /// Nearest-rank percentiles of sorted samples.
    fn of(sorted: &[Duration]) -> Self {
        let rank = |q: f64| {
            let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
            sorted.get(i).copied().unwrap_or_default()
        };
        Self {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

/// Raises the soft open-files limit to the hard one; returns the new soft limit.
fn raise_nofile_limit() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the rlimit struct we pass,
    // which lives on this stack frame for the duration of the call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
            }
        }
    }
    Ok(lim.rlim_cur)
}

fn tempdir_in(parent: Option<&Path>, prefix: &str) -> Result<tempfile::TempDir> {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    match parent {
        Some(p) => b.tempdir_in(p),
        None => b.tempdir(),
    }
    .with_context(|| format!("creating a {prefix}* temp dir"))
}

fn progress(msg: String) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "== {msg}");
}

fn fmt_dur(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
