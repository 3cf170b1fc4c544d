//! Crash safety of the real controller binary, as an operator meets it: the
//! process is killed with SIGKILL in the middle of 200 concurrent enrollments and
//! of racing prefix registrations, then restarted on the same ports and data dir
//! while the agents (the real agent control client) retry and reconnect. Nothing
//! an agent was told is lost, no address or prefix is given twice, and a restart,
//! graceful or not, keeps every allocation.

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use skymesh_agent::control::{self, ControlEvent, Identity};
use skymesh_agent::daemon::enroll_with_retry;
use skymesh_controller::api::{NodeView, TokenView};
use skymesh_wire::control::{Register, RejectedPrefix, SelfInfo};
use skymesh_wire::{JoinToken, PublicKey};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Each test runs a controller process and hundreds of QUIC clients; run in
/// parallel on a small machine they would starve each other into timeouts.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const POOL: &str = "100.96.0.0/12";
/// The admin bearer token, written before the first start (mode 0600).
const ADMIN_TOKEN: &str = "crash-test-admin-token-0123456789abcdef";

/// The controller binary on fixed loopback ports, with its data dir and logs
/// (one log per start) in a temp dir. Dropping it kills the process; a failing
/// test prints the end of every log.
struct ControllerProc {
    dir: tempfile::TempDir,
    config: PathBuf,
    api: SocketAddr,
    child: Option<Child>,
    starts: usize,
}

impl ControllerProc {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // Free ports, picked by binding port 0 and letting go: the restarted
        // controller must come back on the same ones.
        let control = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free UDP port");
        let api = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free TCP port");
        let token_file = dir.path().join("admin.token");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&token_file)
                .expect("admin token file");
            std::io::Write::write_all(&mut f, format!("{ADMIN_TOKEN}\n").as_bytes())
                .expect("write the admin token");
        }
        let config = dir.path().join("controller.toml");
        std::fs::write(
            &config,
            format!(
                "[control]\nlisten = \"{control}\"\nadvertise = [\"{control}\"]\n\
                 [api]\nlisten = \"{api}\"\nadmin_token_file = {:?}\n\
                 [state]\ndata_dir = {:?}\n\
                 [network]\noverlay_pool = \"{POOL}\"\n",
                token_file,
                dir.path().join("data"),
            ),
        )
        .expect("write the config");
        Self {
            dir,
            config,
            api,
            child: None,
            starts: 0,
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self, start: usize) -> PathBuf {
        self.root().join(format!("controller-{start}.log"))
    }

    /// Starts the binary and waits until GET /healthz answers.
    async fn start(&mut self) -> Duration {
        assert!(self.child.is_none(), "the controller is already running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
        let t0 = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_skymesh-controller"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("SKYMESH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn skymesh-controller");
        self.child = Some(child);
        let deadline = t0 + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                panic!(
                    "the controller exited during start #{} with {status}; its log:\n{}",
                    self.starts,
                    tail(&self.log_path(self.starts), 40)
                );
            }
            if let Ok((200, _)) = self.try_call("GET", "/healthz", None).await {
                return t0.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "the controller did not answer GET /healthz within 30 s of start #{}",
                self.starts
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL (what `kill -9` sends): no shutdown code runs.
    fn kill_9(&mut self) {
        let mut child = self.child.take().expect("the controller is running");
        child.kill().expect("SIGKILL the controller");
        let status = child.wait().expect("reap the controller");
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status}");
    }

    /// SIGTERM, as systemd stops it; the controller must exit 0 on its own.
    async fn terminate(&mut self) {
        let mut child = self.child.take().expect("the controller is running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                assert!(
                    status.success(),
                    "the controller should exit 0 on SIGTERM, got {status}; its log:\n{}",
                    tail(&self.log_path(self.starts), 40)
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the controller did not exit within 15 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn try_call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let (api, path) = (self.api, path.to_string());
        blocking(move || http(&http_agent(), api, method, &path, body)).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> T {
        let (code, v) = self
            .try_call("GET", path, None)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(code, 200, "GET {path}: {v}");
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("GET {path}: {e}: {v}"))
    }

    async fn nodes(&self) -> Vec<NodeView> {
        self.get("/v1/nodes").await
    }

    async fn tokens(&self) -> Vec<TokenView> {
        self.get("/v1/join-tokens").await
    }

    /// Single-use join tokens, one per name, created over the API.
    async fn create_tokens(&self, names: &[String]) -> Vec<JoinToken> {
        let (api, names) = (self.api, names.to_vec());
        blocking(move || {
            let agent = http_agent();
            names
                .iter()
                .map(|name| {
                    let body = json!({
                        "name": name, "site": "lab", "cloud": "aws",
                        "region": "us-west-2", "ttl": "1h",
                    });
                    let (code, v) = http(&agent, api, "POST", "/v1/join-tokens", Some(body))
                        .unwrap_or_else(|e| panic!("creating the join token {name}: {e}"));
                    assert_eq!(code, 201, "creating the join token {name}: {v}");
                    let text = v["token"].as_str().expect("the token text");
                    JoinToken::decode(text).expect("a join token")
                })
                .collect()
        })
        .await
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for start in 1..=self.starts {
                eprintln!(
                    "---- end of controller log of start #{start} ----\n{}",
                    tail(&self.log_path(start), 30)
                );
            }
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn http_agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(2))
        .timeout(Duration::from_secs(20))
        .build()
}

/// One API call with the admin token: status and JSON body, or why there was
/// no HTTP answer at all.
fn http(
    agent: &ureq::Agent,
    api: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let req = agent
        .request(method, &format!("http://{api}{path}"))
        .set("Authorization", &format!("Bearer {ADMIN_TOKEN}"));
    let resp = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let r = match resp {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let code = r.status();
    let text = r.into_string().map_err(|e| e.to_string())?;
    Ok((
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// Runs blocking work (ureq) off the test's two runtime workers, re-raising its
/// panic as is.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// How one agent's enrollment ended.
enum Outcome {
    Acknowledged(Identity),
    Refused(control::Refused),
    Failed(String),
}

/// Enrolls every token concurrently, each agent with its own state dir and
/// retrying unreachable controllers (a refusal is final), and counts the
/// acknowledged ones as they come in.
fn enroll_all(
    tokens: Vec<JoinToken>,
    names: &[String],
    agents_dir: &Path,
    acknowledged: Arc<AtomicUsize>,
    within: Duration,
) -> Vec<tokio::task::JoinHandle<(String, PathBuf, Outcome)>> {
    let deadline = tokio::time::Instant::now() + within;
    tokens
        .into_iter()
        .zip(names)
        .map(|(token, name)| {
            let name = name.clone();
            let dir = agents_dir.join(&name);
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                let outcome = match tokio::time::timeout_at(
                    deadline,
                    enroll_with_retry(&token, &dir),
                )
                .await
                {
                    Err(_) => Outcome::Failed(format!("not enrolled within {within:?}")),
                    Ok(Ok(identity)) => {
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                        Outcome::Acknowledged(identity)
                    }
                    Ok(Err(e)) => match e.downcast::<control::Refused>() {
                        Ok(refused) => Outcome::Refused(refused),
                        Err(e) => Outcome::Failed(format!("{e:#}")),
                    },
                };
                (name, dir, outcome)
            })
        })
        .collect()
}

/// An agent's control session, with what the agent knows about itself.
struct Session {
    name: String,
    advertise: Vec<IpNet>,
    netmaps: Arc<AtomicUsize>,
    me: Arc<Mutex<Option<SelfInfo>>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Session {
    fn start(identity: Identity, key: u8, advertise: Vec<IpNet>) -> Self {
        let (tx, mut rx) = mpsc::channel(1024);
        let register = Register {
            public_key: PublicKey::from_bytes([key; 32]),
            listen_port: 51820,
            endpoints: vec![SocketAddr::from(([203, 0, 113, key], 51820))],
            advertise: advertise.clone(),
            underlay: Vec::new(),
            agent_version: "crash-test".into(),
            transit: false,
            capability: 0,
        };
        let name = identity.node.clone();
        let task = tokio::spawn(control::run_session(identity, register, tx));
        let netmaps = Arc::new(AtomicUsize::new(0));
        let me = Arc::new(Mutex::new(None));
        let reader = {
            let (netmaps, me) = (netmaps.clone(), me.clone());
            tokio::spawn(async move {
                while let Some(ev) = rx.recv().await {
                    let info = match ev {
                        ControlEvent::NetMap(full) => {
                            netmaps.fetch_add(1, Ordering::Relaxed);
                            Some(full.node)
                        }
                        ControlEvent::Update(u) => u.node,
                        ControlEvent::Connected { .. } | ControlEvent::Disconnected { .. } => None,
                    };
                    if let Some(info) = info {
                        *me.lock().expect("lock") = Some(info);
                    }
                }
            })
        };
        Self {
            name,
            advertise,
            netmaps,
            me,
            task,
            reader,
        }
    }

    fn netmaps(&self) -> usize {
        self.netmaps.load(Ordering::Relaxed)
    }

    fn me(&self) -> Option<SelfInfo> {
        self.me.lock().expect("lock").clone()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
        self.reader.abort();
    }
}

/// Waits until every session is connected to the running controller (the API
/// shows the node online with its key) and has its netmap from this controller,
/// and returns the nodes.
async fn wait_connected(
    ctl: &ControllerProc,
    sessions: &[Session],
    netmaps_before: &[usize],
    within: Duration,
) -> Vec<NodeView> {
    let deadline = Instant::now() + within;
    loop {
        let nodes = ctl.nodes().await;
        let missing: Vec<&str> = sessions
            .iter()
            .zip(netmaps_before)
            .filter(|(s, before)| {
                s.netmaps() <= **before
                    || !nodes
                        .iter()
                        .any(|n| n.name == s.name && n.online && n.public_key.is_some())
            })
            .map(|(s, _)| s.name.as_str())
            .collect();
        if missing.is_empty() {
            return nodes;
        }
        if Instant::now() > deadline {
            let ended: Vec<&str> = sessions
                .iter()
                .filter(|s| s.task.is_finished())
                .map(|s| s.name.as_str())
                .collect();
            panic!(
                "{} of {} agents not connected and registered within {within:?}: {missing:?}; \
                 sessions that ended: {ended:?}",
                missing.len(),
                sessions.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn net(text: &str) -> IpNet {
    text.parse().expect("cidr")
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn has_identity(dir: &Path) -> bool {
    dir.join("controller.json").exists()
}

/// Checks the acceptance invariants on overlay addresses: one per node, all
/// from the pool, and, since allocation takes the lowest free address in the
/// same transaction as the node, exactly the first `n` (none leaked by a crash).
fn check_addresses(nodes: &[NodeView]) {
    let pool = net(POOL);
    let mut seen: BTreeMap<IpAddr, &str> = BTreeMap::new();
    for n in nodes {
        assert!(
            pool.contains(&n.overlay_ip),
            "{} has overlay address {} outside the pool {pool}",
            n.name,
            n.overlay_ip
        );
        if let Some(other) = seen.insert(n.overlay_ip, &n.name) {
            panic!(
                "overlay address {} given twice: to {other} and to {}",
                n.overlay_ip, n.name
            );
        }
    }
    let first = u32::from(Ipv4Addr::new(100, 96, 0, 1));
    let expected: Vec<IpAddr> = (0..nodes.len() as u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(first + i)))
        .collect();
    let got: Vec<IpAddr> = seen.keys().copied().collect();
    assert_eq!(
        got,
        expected,
        "the {} nodes should hold exactly the lowest addresses of the pool",
        nodes.len()
    );
}

/// Prefixes agent `j` of the race advertises: agents 2k and 2k+1 race for the
/// same /16, and for a /24 and a /25 inside it.
fn racer_prefixes(j: usize) -> Vec<IpNet> {
    let pair = j / 2;
    let nested = match j % 2 {
        0 => format!("172.16.{pair}.0/24"),
        _ => format!("172.16.{pair}.128/25"),
    };
    vec![net(&format!("10.{pair}.0.0/16")), net(&nested)]
}

const AGENTS: usize = 200;
const RACERS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_concurrent_enrollments_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    let t_test = Instant::now();
    let mut ctl = ControllerProc::new();
    let first_start = ctl.start().await;
    let names: Vec<String> = (0..AGENTS).map(|i| format!("node-{i:03}")).collect();
    let t0 = Instant::now();
    let tokens = ctl.create_tokens(&names).await;
    let token_time = t0.elapsed();

    // ---- 200 concurrent enrollments, SIGKILL when about a third are through ----
    let agents_dir = ctl.root().join("agents");
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let tasks = enroll_all(
        tokens,
        &names,
        &agents_dir,
        acknowledged.clone(),
        Duration::from_secs(60),
    );
    let kill_deadline = Instant::now() + Duration::from_secs(10);
    while acknowledged.load(Ordering::Relaxed) < AGENTS / 3 && Instant::now() < kill_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ctl.kill_9();
    let at_kill = acknowledged.load(Ordering::Relaxed);
    let killed_after = t0.elapsed();
    let restart = ctl.start().await;
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("enrollment task"));
    }
    let enroll_time = t0.elapsed();

    // ---- every outcome is accounted for ----
    let nodes = ctl.nodes().await;
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut identities = Vec::new();
    let mut unacknowledged = Vec::new();
    let mut lost = Vec::new();
    let mut bad = Vec::new();
    for (name, dir, outcome) in outcomes {
        match outcome {
            Outcome::Acknowledged(identity) => {
                assert_eq!(identity.node, name, "the node is named after its token");
                assert!(has_identity(&dir), "{name}: enrolled but no identity saved");
                if !by_name.contains_key(name.as_str()) {
                    lost.push(name);
                    continue;
                }
                identities.push(identity);
            }
            // The enrollment committed but the crash ate the reply: the retry
            // finds the token used. The node must exist all the same.
            Outcome::Refused(r)
                if r.message.contains("already used")
                    && by_name.contains_key(name.as_str())
                    && !has_identity(&dir) =>
            {
                unacknowledged.push(name)
            }
            Outcome::Refused(r) => bad.push(format!(
                "{name}: refused ({:?}): {}; node in the store: {}",
                r.code,
                r.message,
                by_name.contains_key(name.as_str())
            )),
            Outcome::Failed(e) => bad.push(format!("{name}: {e}")),
        }
    }
    let summary = format!(
        "{AGENTS} enrollments: {} tokens created in {token_time:?}; SIGKILL after \
         {killed_after:?} with {at_kill} acknowledged; restart answered in {restart:?} \
         (first start {first_start:?}); all done in {enroll_time:?}: {} acknowledged, {} \
         committed but unacknowledged {unacknowledged:?}, {} failed, {} lost",
        names.len(),
        identities.len(),
        unacknowledged.len(),
        bad.len(),
        lost.len(),
    );
    println!("{summary}");
    assert!(bad.is_empty(), "{summary}\nfailed enrollments:\n{bad:#?}");
    assert!(
        lost.is_empty(),
        "{summary}\nacknowledged enrollments missing after the crash: {lost:?}"
    );
    assert!(at_kill < AGENTS, "the kill came after every enrollment");

    // One node per token, one token per node.
    let node_names: BTreeSet<&str> = by_name.keys().copied().collect();
    let token_names: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(node_names, token_names, "{summary}");
    check_addresses(&nodes);
    let tokens = ctl.tokens().await;
    assert_eq!(tokens.len(), AGENTS, "tokens listed");
    for t in &tokens {
        assert_eq!(
            t.used_by,
            std::slice::from_ref(&t.name),
            "token {} ({}) should be used by exactly its node; state {}",
            t.id,
            t.name,
            t.state
        );
        assert_eq!(t.state, "used", "token {}", t.id);
    }
    let used: BTreeSet<&str> = tokens
        .iter()
        .flat_map(|t| &t.used_by)
        .map(String::as_str)
        .collect();
    assert_eq!(used.len(), nodes.len(), "distinct token users = nodes");

    // ---- 50 agents race for prefixes in pairs; SIGKILL in the middle ----
    assert!(
        identities.len() >= RACERS,
        "{summary}: too few acknowledged agents for the prefix race"
    );
    identities.sort_by(|a, b| a.node.cmp(&b.node));
    let addresses_before: BTreeMap<String, IpAddr> = nodes
        .iter()
        .map(|n| (n.name.clone(), n.overlay_ip))
        .collect();
    let t0 = Instant::now();
    let sessions: Vec<Session> = identities
        .into_iter()
        .take(RACERS)
        .enumerate()
        .map(|(j, id)| Session::start(id, j as u8 + 1, racer_prefixes(j)))
        .collect();
    let registered = || sessions.iter().filter(|s| s.netmaps() > 0).count();
    let kill_deadline = Instant::now() + Duration::from_secs(10);
    while registered() < RACERS / 3 && Instant::now() < kill_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ctl.kill_9();
    let registered_at_kill = registered();
    let killed_after = t0.elapsed();
    let marks: Vec<usize> = sessions.iter().map(Session::netmaps).collect();
    ctl.start().await;
    let nodes = wait_connected(&ctl, &sessions, &marks, Duration::from_secs(45)).await;
    let race_time = t0.elapsed();

    // No accepted prefix overlaps another node's, across every node.
    let accepted: Vec<(&str, &IpNet)> = nodes
        .iter()
        .flat_map(|n| n.prefixes.iter().map(move |p| (n.name.as_str(), p)))
        .collect();
    for (i, (a, pa)) in accepted.iter().enumerate() {
        for (b, pb) in &accepted[i + 1..] {
            assert!(
                !overlaps(pa, pb),
                "{pa} of {a} overlaps {pb} of {b}: a prefix given twice"
            );
        }
    }
    // Every advertised prefix is accepted or refused with a reason naming the
    // node that holds it; of each racing pair exactly one wins each prefix.
    let by_name: BTreeMap<&str, &NodeView> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut wins: BTreeMap<(usize, usize), Vec<&str>> = BTreeMap::new();
    for (j, s) in sessions.iter().enumerate() {
        let n = by_name[s.name.as_str()];
        assert_eq!(n.advertised, s.advertise, "{}: advertised", s.name);
        for (k, cidr) in s.advertise.iter().enumerate() {
            let won = n.prefixes.contains(cidr);
            let refused: Vec<&RejectedPrefix> = n
                .rejected_prefixes
                .iter()
                .filter(|r| r.cidr == *cidr)
                .collect();
            assert!(
                won != (refused.len() == 1),
                "{}: {cidr} should be either accepted or refused once; node: {n:?}",
                s.name
            );
            if won {
                wins.entry((j / 2, k)).or_default().push(&s.name);
            } else {
                let holder = accepted
                    .iter()
                    .find(|(_, p)| overlaps(p, cidr))
                    .unwrap_or_else(|| panic!("{}: {cidr} refused but nobody holds it", s.name));
                assert!(
                    refused[0].reason.contains(holder.0),
                    "{}: the refusal of {cidr} should name {}: {}",
                    s.name,
                    holder.0,
                    refused[0].reason
                );
            }
        }
    }
    for pair in 0..RACERS / 2 {
        for k in 0..2 {
            let winners = wins.get(&(pair, k)).map_or(0, Vec::len);
            assert_eq!(
                winners,
                1,
                "pair {pair} prefix #{k}: winners {:?}",
                wins.get(&(pair, k))
            );
        }
    }
    // The agents were told what the store holds.
    let deadline = Instant::now() + Duration::from_secs(10);
    for s in &sessions {
        let n = by_name[s.name.as_str()];
        loop {
            let me = s.me();
            if me.as_ref().is_some_and(|m| {
                m.prefixes == n.prefixes
                    && m.rejected_prefixes == n.rejected_prefixes
                    && m.overlay_ip == n.overlay_ip
            }) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the agent's view {me:?} differs from the store's {n:?}",
                s.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Addresses did not move.
    let addresses_after: BTreeMap<String, IpAddr> = nodes
        .iter()
        .map(|n| (n.name.clone(), n.overlay_ip))
        .collect();
    assert_eq!(addresses_after, addresses_before, "overlay addresses moved");
    check_addresses(&nodes);
    println!(
        "prefix race: {RACERS} agents, {} prefixes advertised, SIGKILL after {killed_after:?} \
         with {registered_at_kill} registered; all reconnected and registered after \
         {race_time:?}: {} accepted, {} refused; test took {:?}",
        RACERS * 2,
        accepted.len(),
        nodes
            .iter()
            .map(|n| n.rejected_prefixes.len())
            .sum::<usize>(),
        t_test.elapsed()
    );
}

/// What a node was given, as the API shows it (liveness left out).
#[derive(Debug, PartialEq)]
struct Allocation {
    overlay_ip: IpAddr,
    public_key: Option<String>,
    advertised: Vec<IpNet>,
    prefixes: Vec<IpNet>,
    rejected_prefixes: Vec<RejectedPrefix>,
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    nodes: BTreeMap<String, Allocation>,
    /// Token id -> (name, used_by, state).
    tokens: BTreeMap<String, (String, Vec<String>, String)>,
}

async fn snapshot(ctl: &ControllerProc) -> Snapshot {
    let nodes = ctl
        .nodes()
        .await
        .into_iter()
        .map(|n| {
            (
                n.name,
                Allocation {
                    overlay_ip: n.overlay_ip,
                    public_key: n.public_key,
                    advertised: n.advertised,
                    prefixes: n.prefixes,
                    rejected_prefixes: n.rejected_prefixes,
                },
            )
        })
        .collect();
    let tokens = ctl
        .tokens()
        .await
        .into_iter()
        .map(|t| (t.id, (t.name, t.used_by, t.state)))
        .collect();
    Snapshot { nodes, tokens }
}

/// The entries that differ, one line each.
fn diff(before: &Snapshot, after: &Snapshot) -> String {
    let mut out = Vec::new();
    let names: BTreeSet<&String> = before.nodes.keys().chain(after.nodes.keys()).collect();
    for name in names {
        let (b, a) = (before.nodes.get(name), after.nodes.get(name));
        if b != a {
            out.push(format!("node {name}: before {b:?}\n  after {a:?}"));
        }
    }
    let ids: BTreeSet<&String> = before.tokens.keys().chain(after.tokens.keys()).collect();
    for id in ids {
        let (b, a) = (before.tokens.get(id), after.tokens.get(id));
        if b != a {
            out.push(format!("token {id}: before {b:?}, after {a:?}"));
        }
    }
    out.join("\n")
}

fn assert_same(before: &Snapshot, after: &Snapshot, when: &str) {
    assert!(
        before == after,
        "{when}: allocations changed:\n{}",
        diff(before, after)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_every_allocation() {
    const N: usize = 20;
    let _serial = SERIAL.lock().await;
    let t_test = Instant::now();
    let mut ctl = ControllerProc::new();
    ctl.start().await;
    let names: Vec<String> = (0..N).map(|i| format!("gw-{i:02}")).collect();
    let tokens = ctl.create_tokens(&names).await;
    let agents_dir = ctl.root().join("agents");
    let tasks = enroll_all(
        tokens,
        &names,
        &agents_dir,
        Arc::new(AtomicUsize::new(0)),
        Duration::from_secs(20),
    );
    let mut sessions = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (name, _, outcome) = t.await.expect("enrollment task");
        let identity = match outcome {
            Outcome::Acknowledged(id) => id,
            Outcome::Refused(r) => panic!("{name}: refused ({:?}): {}", r.code, r.message),
            Outcome::Failed(e) => panic!("{name}: {e}"),
        };
        // A prefix of its own, and one it shares with its neighbour (so there
        // are refusals to keep too).
        let advertise = vec![
            net(&format!("10.{}.0.0/16", 100 + i)),
            net(&format!("192.168.{}.0/24", i / 2)),
        ];
        sessions.push(Session::start(identity, i as u8 + 1, advertise));
    }
    let none = vec![0; N];
    let nodes = wait_connected(&ctl, &sessions, &none, Duration::from_secs(30)).await;
    check_addresses(&nodes);
    let before = snapshot(&ctl).await;
    assert_eq!(before.nodes.len(), N);
    let accepted: usize = before.nodes.values().map(|a| a.prefixes.len()).sum();
    let refused: usize = before
        .nodes
        .values()
        .map(|a| a.rejected_prefixes.len())
        .sum();
    assert_eq!((accepted, refused), (N + N / 2, N / 2), "{before:#?}");
    assert!(before.tokens.values().all(|(_, used, _)| used.len() == 1));

    // Graceful: SIGTERM, restart. The store answers the same before and after
    // the agents come back and register again.
    // Netmaps counted before the stop: any later one comes from the restarted
    // controller (agents may be back before the first snapshot below).
    let marks: Vec<usize> = sessions.iter().map(Session::netmaps).collect();
    let t0 = Instant::now();
    ctl.terminate().await;
    ctl.start().await;
    assert_same(&before, &snapshot(&ctl).await, "after SIGTERM and restart");
    wait_connected(&ctl, &sessions, &marks, Duration::from_secs(30)).await;
    assert_same(
        &before,
        &snapshot(&ctl).await,
        "after SIGTERM, restart and the agents' return",
    );
    let graceful = t0.elapsed();

    // Not graceful: SIGKILL, restart.
    let marks: Vec<usize> = sessions.iter().map(Session::netmaps).collect();
    let t0 = Instant::now();
    ctl.kill_9();
    ctl.start().await;
    assert_same(&before, &snapshot(&ctl).await, "after SIGKILL and restart");
    wait_connected(&ctl, &sessions, &marks, Duration::from_secs(30)).await;
    assert_same(
        &before,
        &snapshot(&ctl).await,
        "after SIGKILL, restart and the agents' return",
    );
    let killed = t0.elapsed();

    // A node enrolled afterwards gets a fresh address, never an earlier one.
    let late = ctl.create_tokens(&["late-gw".to_string()]).await;
    let identity = control::enroll(&late[0], &agents_dir.join("late-gw"))
        .await
        .expect("enroll after the restarts");
    let nodes = ctl.nodes().await;
    let late_node = nodes
        .iter()
        .find(|n| n.name == identity.node)
        .expect("the late node is listed");
    assert!(
        before
            .nodes
            .values()
            .all(|a| a.overlay_ip != late_node.overlay_ip),
        "late-gw got {}, an address already given",
        late_node.overlay_ip
    );
    check_addresses(&nodes);
    println!(
        "restart: {N} nodes, {accepted} accepted and {refused} refused prefixes kept through \
         SIGTERM ({graceful:?} until every agent was back) and SIGKILL ({killed:?}); test \
         took {:?}",
        t_test.elapsed()
    );
}
