//! A controller with simulated agents, in one process on loopback: enrollment,
//! netmap distribution and updates, refusals, revocation, IPAM admission. The
//! agents use the real agent control client.

use ipnet::IpNet;
use skymesh_agent::control::{self, ControlEvent, Identity};
use skymesh_controller::config::Config;
use skymesh_controller::registry::NewToken;
use skymesh_controller::server::{self, Controller};
use skymesh_wire::control::{FullNetMap, RefusalCode, Register};
use skymesh_wire::{JoinToken, PublicKey};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ctl: Controller,
}

fn config(root: &Path) -> Config {
    Config::parse(&format!(
        "[control]\nlisten = \"127.0.0.1:0\"\nadvertise = [\"127.0.0.1:1\"]\n[api]\nlisten = \"127.0.0.1:0\"\nadmin_token_file = {:?}\n[state]\ndata_dir = {:?}\n",
        root.join("admin.token"),
        root.join("data")
    ))
    .expect("config")
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().to_path_buf();
    let ctl = server::start(&config(&root))
        .await
        .expect("controller starts");
    Fixture {
        _dir: dir,
        root,
        ctl,
    }
}

impl Fixture {
    async fn token(&self, name: &str, reusable: bool) -> JoinToken {
        let (rec, secret) = self
            .ctl
            .registry
            .create_token(
                NewToken {
                    name: name.into(),
                    site: name.into(),
                    cloud: "aws".into(),
                    region: "us-west-2".into(),
                    ttl: Some(3600),
                    reusable,
                },
                skymesh_controller::store::records::unix_now(),
            )
            .await
            .expect("token");
        JoinToken {
            controllers: vec![self.ctl.control_addr.to_string()],
            ca_sha256: self.ctl.ca_fingerprint.clone(),
            id: rec.id,
            secret,
        }
    }

    fn state_dir(&self, name: &str) -> PathBuf {
        self.root.join("agents").join(name)
    }
}

struct Agent {
    identity: Identity,
    events: mpsc::Receiver<ControlEvent>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    map: Option<FullNetMap>,
}

fn register(key: u8, advertise: &[&str]) -> Register {
    Register {
        public_key: PublicKey::from_bytes([key; 32]),
        listen_port: 51820,
        endpoints: vec![format!("203.0.113.{key}:51820").parse().expect("addr")],
        advertise: advertise.iter().map(|c| c.parse().expect("cidr")).collect(),
        underlay: vec!["203.0.113.0/24".parse().expect("cidr")],
        agent_version: "test".into(),
        transit: false,
        capability: 0,
    }
}

impl Agent {
    async fn join(f: &Fixture, name: &str, key: u8, advertise: &[&str]) -> Agent {
        let token = f.token(name, false).await;
        let identity = control::enroll(&token, &f.state_dir(name))
            .await
            .expect("enroll");
        Agent::connect(identity, key, advertise)
    }

    fn connect(identity: Identity, key: u8, advertise: &[&str]) -> Agent {
        let (tx, events) = mpsc::channel(1024);
        let task = tokio::spawn(control::run_session(
            identity.clone(),
            register(key, advertise),
            tx,
        ));
        Agent {
            identity,
            events,
            task,
            map: None,
        }
    }

    /// Applies events until `pred` holds on the netmap, or panics after `within`.
    async fn until(&mut self, within: Duration, pred: impl Fn(&FullNetMap) -> bool) -> FullNetMap {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(m) = &self.map {
                if pred(m) {
                    return m.clone();
                }
            }
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{}: condition not met within {within:?}; netmap: {:#?}",
                        self.identity.node, self.map
                    )
                })
                .expect("session ended");
            match ev {
                ControlEvent::NetMap(full) => self.map = Some(*full),
                ControlEvent::Update(u) => {
                    let m = self.map.as_mut().expect("update before netmap");
                    assert!(u.seq >= m.seq, "updates are in order");
                    u.apply_to(&mut m.netmap);
                    if let Some(me) = u.node {
                        m.node = me;
                    }
                    m.seq = u.seq;
                }
                ControlEvent::Connected { .. } | ControlEvent::Disconnected { .. } => {}
            }
        }
    }
}

fn peers(m: &FullNetMap) -> Vec<String> {
    m.netmap.peers.iter().map(|p| p.name.clone()).collect()
}

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_enroll_and_receive_each_other() {
    let f = start().await;
    let mut a = Agent::join(&f, "aws-gw", 1, &["10.0.0.0/16"]).await;
    let mut b = Agent::join(&f, "gcp-gw", 2, &["10.10.0.0/16", "fd00:10::/48"]).await;
    let ma = a.until(T, |m| peers(m) == ["gcp-gw"]).await;
    let mb = b.until(T, |m| peers(m) == ["aws-gw"]).await;
    // Distinct, stable overlay addresses from the pool.
    assert_ne!(ma.node.overlay_ip, mb.node.overlay_ip);
    assert_eq!(ma.netmap.address, IpNet::from(ma.node.overlay_ip));
    let pool: IpNet = "100.96.0.0/12".parse().expect("pool");
    assert!(pool.contains(&ma.node.overlay_ip));
    // a sees b's overlay address and both prefixes, and its configured endpoint.
    let pb = &ma.netmap.peers[0];
    assert_eq!(pb.public_key, PublicKey::from_bytes([2; 32]));
    assert_eq!(
        pb.endpoint,
        Some("203.0.113.2:51820".parse().expect("addr"))
    );
    let want: Vec<IpNet> = vec![
        IpNet::from(mb.node.overlay_ip),
        "10.10.0.0/16".parse().expect("cidr"),
        "fd00:10::/48".parse().expect("cidr"),
    ];
    assert_eq!(pb.allowed_ips, want);
    ma.netmap.validate().expect("valid netmap");
    // The identity is on disk with private modes.
    use std::os::unix::fs::PermissionsExt;
    let key = f.state_dir("aws-gw").join("control.key");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A third node reaches both as an incremental update.
    let _c = Agent::join(&f, "azure-gw", 3, &["10.20.0.0/16"]).await;
    a.until(T, |m| peers(m) == ["azure-gw", "gcp-gw"]).await;
    b.until(T, |m| peers(m) == ["aws-gw", "azure-gw"]).await;
    f.ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refused_when_reused_wrong_expired_or_revoked() {
    let f = start().await;
    let token = f.token("aws-gw", false).await;
    control::enroll(&token, &f.state_dir("first"))
        .await
        .expect("first use");
    let code = |e: anyhow::Error| {
        e.downcast::<control::Refused>()
            .map(|r| (r.code, r.message))
            .expect("a refusal")
    };
    let (c, msg) = code(
        control::enroll(&token, &f.state_dir("again"))
            .await
            .expect_err("reuse"),
    );
    assert_eq!(c, RefusalCode::InvalidToken);
    assert!(msg.contains("already used"), "{msg}");

    let mut wrong = f.token("gcp-gw", false).await;
    wrong.secret = "0".repeat(64);
    let (c, _) = code(
        control::enroll(&wrong, &f.state_dir("wrong"))
            .await
            .expect_err("wrong secret"),
    );
    assert_eq!(c, RefusalCode::InvalidToken);

    let revoked = f.token("azure-gw", false).await;
    assert!(f
        .ctl
        .registry
        .revoke_token(&revoked.id)
        .await
        .expect("revoke"));
    let (c, msg) = code(
        control::enroll(&revoked, &f.state_dir("revoked"))
            .await
            .expect_err("revoked"),
    );
    assert_eq!(c, RefusalCode::InvalidToken);
    assert!(msg.contains("revoked"), "{msg}");

    // A pin that is not the controller's CA: the agent refuses the controller.
    let mut bad_pin = f.token("ali-gw", false).await;
    bad_pin.ca_sha256 = "ab".repeat(32);
    let err = control::enroll(&bad_pin, &f.state_dir("pin"))
        .await
        .expect_err("pin mismatch");
    assert!(format!("{err:#}").contains("fingerprint"), "{err:#}");
    f.ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_token_works_once_under_concurrent_use() {
    let f = start().await;
    let token = f.token("aws-gw", false).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let t = token.clone();
        let dir = f.state_dir(&format!("racer-{i}"));
        tasks.push(tokio::spawn(async move { control::enroll(&t, &dir).await }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.expect("join").is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 1, "exactly one enrollment with a one-time token");
    assert_eq!(f.ctl.registry.nodes().await.expect("nodes").len(), 1);
    f.ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_prefix_is_refused_and_the_rest_kept() {
    let f = start().await;
    let mut a = Agent::join(&f, "aws-gw", 1, &["10.0.0.0/16"]).await;
    a.until(T, |m| m.node.prefixes.len() == 1).await;
    let mut b = Agent::join(
        &f,
        "gcp-gw",
        2,
        &[
            "10.0.5.0/24",
            "10.10.0.0/16",
            "100.96.7.0/24",
            "203.0.113.128/25",
        ],
    )
    .await;
    let mb = b.until(T, |m| m.node.rejected_prefixes.len() == 3).await;
    assert_eq!(
        mb.node.prefixes,
        vec!["10.10.0.0/16".parse::<IpNet>().expect("cidr")]
    );
    let reasons: Vec<String> = mb
        .node
        .rejected_prefixes
        .iter()
        .map(|r| format!("{} {}", r.cidr, r.reason))
        .collect();
    assert!(
        reasons[0].starts_with("10.0.5.0/24") && reasons[0].contains("aws-gw"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("overlay pool"), "{reasons:?}");
    assert!(reasons[2].contains("underlay"), "{reasons:?}");
    // Peers route only the accepted prefix to b.
    let ma = a.until(T, |m| peers(m) == ["gcp-gw"]).await;
    assert_eq!(ma.netmap.peers[0].allowed_ips.len(), 2);
    f.ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_node_leaves_every_netmap_and_its_certificate_is_refused() {
    let f = start().await;
    let mut a = Agent::join(&f, "aws-gw", 1, &[]).await;
    let mut b = Agent::join(&f, "gcp-gw", 2, &[]).await;
    a.until(T, |m| peers(m) == ["gcp-gw"]).await;
    b.until(T, |m| peers(m) == ["aws-gw"]).await;
    let t0 = std::time::Instant::now();
    assert!(f.ctl.registry.revoke_node("gcp-gw").await.expect("revoke"));
    a.until(Duration::from_secs(2), |m| peers(m).is_empty())
        .await;
    assert!(t0.elapsed() < Duration::from_secs(2));
    // b's session ends with a refusal it cannot retry.
    let res = tokio::time::timeout(T, &mut b.task)
        .await
        .expect("b's session ends")
        .expect("join");
    let err = res.expect_err("refused");
    let refused = err.downcast::<control::Refused>().expect("refusal");
    assert_eq!(refused.code, RefusalCode::InvalidCertificate);
    // Connecting again with the old certificate is refused before anything else.
    let (tx, _rx) = mpsc::channel(16);
    let again = tokio::time::timeout(
        T,
        control::run_session(b.identity.clone(), register(2, &[]), tx),
    )
    .await
    .expect("refused promptly");
    let refused = again
        .expect_err("refused")
        .downcast::<control::Refused>()
        .expect("refusal");
    assert_eq!(refused.code, RefusalCode::InvalidCertificate);
    f.ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_allocations_and_agents_reconnect() {
    let f = start().await;
    let mut a = Agent::join(&f, "aws-gw", 1, &["10.0.0.0/16"]).await;
    let mut b = Agent::join(&f, "gcp-gw", 2, &["10.10.0.0/16"]).await;
    let before_a = a.until(T, |m| peers(m) == ["gcp-gw"]).await;
    let before_b = b.until(T, |m| peers(m) == ["aws-gw"]).await;
    let (control_addr, api_addr) = (f.ctl.control_addr, f.ctl.api_addr);
    let Fixture { _dir, root, ctl } = f;
    ctl.shutdown().await;
    // Same ports, same data dir.
    let mut cfg = config(&root);
    cfg.control_listen = control_addr;
    cfg.api_listen = api_addr;
    let ctl = server::start(&cfg).await.expect("restart");
    let after_a = a
        .until(Duration::from_secs(40), |m| {
            m.seq > before_a.seq && peers(m) == ["gcp-gw"]
        })
        .await;
    assert_eq!(after_a.node.overlay_ip, before_a.node.overlay_ip);
    assert_eq!(after_a.node.prefixes, before_a.node.prefixes);
    assert_eq!(after_a.netmap.peers, before_a.netmap.peers);
    let after_b = b
        .until(Duration::from_secs(40), |m| m.seq > before_b.seq)
        .await;
    assert_eq!(after_b.node.overlay_ip, before_b.node.overlay_ip);
    ctl.shutdown().await;
}

/// An agent that stops reading for a while is not dropped: what changes
/// meanwhile merges on the controller, and when it reads again it catches up
/// with fewer updates than there were changes, in the same session, without
/// a second full netmap (issue 15: slow agents used to lose their session
/// once 1,024 frames were queued, and came back for a full netmap, which fed
/// the load that made them slow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_agent_keeps_its_session_and_gets_merged_updates() {
    let f = start().await;
    let token = f.token("slow-gw", false).await;
    let identity = control::enroll(&token, &f.state_dir("slow-gw"))
        .await
        .expect("enroll");
    // The slow agent's session blocks on its event queue of one, so it stops
    // reading from its stream, and QUIC flow control then stops the
    // controller's writes to it.
    let (tx, mut events) = mpsc::channel(1);
    let _slow = tokio::spawn(control::run_session(
        identity,
        register(1, &["10.0.0.0/16"]),
        tx,
    ));
    let mut fulls = 0;
    loop {
        match events.recv().await.expect("session") {
            ControlEvent::NetMap(_) => {
                fulls += 1;
                break;
            }
            ControlEvent::Disconnected { reason } => panic!("disconnected: {reason}"),
            _ => {}
        }
    }
    // Joins with 1,000 long prefixes each: about 50 KB per change, two
    // megabytes in all, more than the agent's stream buffers (1.25 MB).
    const JOINS: usize = 40;
    let joins = (0..JOINS).map(|i| {
        let f = &f;
        async move {
            let prefixes: Vec<String> = (0..1000)
                .map(|h| format!("fd00:{:x}:ffff:ffff:ffff:ffff:ffff:{h:x}/128", i + 1))
                .collect();
            let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
            let key = u8::try_from(i + 2).expect("key");
            let mut a = Agent::join(f, &format!("gw-{i:03}"), key, &prefixes).await;
            // Registered once it has a netmap; then it leaves, so only the
            // slow agent is sent the mesh.
            a.until(Duration::from_secs(60), |_| true).await;
            a.task.abort();
        }
    });
    use futures::StreamExt;
    futures::stream::iter(joins)
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    // Now the slow agent reads again: it catches up in its first session.
    let mut map: Option<skymesh_wire::NetMap> = None;
    let mut updates = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if map.as_ref().is_some_and(|m| m.peers.len() == JOINS) {
            break;
        }
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("caught up in time")
            .expect("session");
        match ev {
            ControlEvent::NetMap(full) => {
                fulls += 1;
                map = Some(full.netmap);
            }
            ControlEvent::Update(u) => {
                updates += 1;
                let m = map.get_or_insert_with(|| skymesh_wire::NetMap {
                    version: skymesh_wire::PROTOCOL_VERSION,
                    address: "100.96.0.1/32".parse().expect("cidr"),
                    mtu: 1420,
                    peers: Vec::new(),
                    transit: false,
                    paths: Vec::new(),
                });
                u.apply_to(m);
            }
            ControlEvent::Disconnected { reason } => {
                panic!("the slow agent lost its session: {reason}")
            }
            ControlEvent::Connected { .. } => {}
        }
    }
    assert_eq!(
        fulls, 1,
        "one full netmap, at the start of the only session"
    );
    assert!(
        updates < JOINS,
        "{updates} updates for {JOINS} changes: what queued while the agent was slow was not merged"
    );
    f.ctl.shutdown().await;
}
