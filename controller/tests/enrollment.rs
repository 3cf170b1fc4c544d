//! Enrollment under pressure, in one process on loopback with the real agent
//! control client: a node over the prefix cap is refused at once and never holds
//! up a join; a join whose answer was lost gets the same answer again; a join
//! that cannot succeed stops and says why, one that can keeps trying.

use skymesh_agent::control::{self, ControlEvent, EnrollError};
use skymesh_agent::daemon::enroll_with_retry;
use skymesh_controller::config::Config;
use skymesh_controller::registry::NewToken;
use skymesh_controller::server::{self, Controller};
use skymesh_wire::control::{RefusalCode, Register};
use skymesh_wire::{JoinToken, PublicKey};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Generous: these tests must not be flaky on a loaded 2-core machine.
const T: Duration = Duration::from_secs(30);

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
    async fn token(&self, name: &str) -> JoinToken {
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
                    reusable: false,
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

fn slash24s(first: Ipv4Addr, count: u32) -> Vec<ipnet::IpNet> {
    (0..count)
        .map(|i| {
            let addr = Ipv4Addr::from(u32::from(first) + (i << 8));
            ipnet::IpNet::new(IpAddr::V4(addr), 24).expect("cidr")
        })
        .collect()
}

fn register(key: u8, advertise: Vec<ipnet::IpNet>) -> Register {
    Register {
        public_key: PublicKey::from_bytes([key; 32]),
        listen_port: 51820,
        endpoints: Vec::new(),
        advertise,
        underlay: vec!["203.0.113.0/24".parse().expect("cidr")],
        agent_version: "test".into(),
        transit: false,
        capability: 0,
    }
}

/// The 150k-prefix stall: registering them took ~100 s of CPU under the lock
/// every enrollment takes, so a join meanwhile timed out. Now the registration
/// is refused before any work, with the count, the cap and the key to change,
/// and the join goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_the_prefix_cap_is_refused_at_once_and_joins_go_on() {
    let f = start().await;
    let big = control::enroll(&f.token("big-gw").await, &f.state_dir("big-gw"))
        .await
        .expect("enroll");
    let (tx, mut events) = mpsc::channel(64);
    let started = Instant::now();
    let session = tokio::spawn(control::run_session(
        big,
        register(1, slash24s(Ipv4Addr::new(20, 0, 0, 0), 150_000)),
        tx,
    ));
    // A join while the big registration is in.
    let join = {
        let token = f.token("late-gw").await;
        let dir = f.state_dir("late-gw");
        tokio::spawn(async move { control::enroll(&token, &dir).await })
    };
    let reason = loop {
        match tokio::time::timeout(T, events.recv()).await {
            Ok(Some(ControlEvent::Disconnected { reason })) => break reason,
            Ok(Some(ControlEvent::NetMap(full))) => panic!(
                "150,000 prefixes were registered: {} accepted",
                full.node.prefixes.len()
            ),
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the session ended"),
            Err(_) => panic!("no answer to the registration within {T:?}"),
        }
    };
    let refused_in = started.elapsed();
    // The registration is refused at its frame header, before it is read:
    // the reason names the size bound, the cap and the key to change.
    for needle in [
        "limit of a registration",
        "at most 1000 prefixes",
        "max_prefixes_per_node",
    ] {
        assert!(reason.contains(needle), "{needle:?} in {reason:?}");
    }
    let late = tokio::time::timeout(T, join)
        .await
        .expect("the join is not held up")
        .expect("task")
        .expect("enrolled");
    assert_eq!(late.node, "late-gw");
    println!("150k prefixes refused in {refused_in:?}");
    assert!(refused_in < T, "{refused_in:?}");
    // Nothing of the refused registration was recorded.
    let (node, _) = f
        .ctl
        .registry
        .node("big-gw")
        .await
        .expect("read")
        .expect("node");
    assert!(node.advertised.is_empty() && node.prefixes.is_empty());
    session.abort();
    f.ctl.shutdown().await;
}

/// 50 nodes at the cap (50,000 prefixes) register at once: every prefix is
/// admitted, and a join meanwhile is not held up by the admissions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_nodes_at_the_cap_are_admitted_while_a_join_goes_through() {
    const NODES: u32 = 50;
    let f = start().await;
    let ca = f.ctl.registry.load_or_create_ca().await.expect("ca");
    let now = skymesh_controller::store::records::unix_now();
    let mut names = Vec::new();
    for i in 0..NODES {
        let name = format!("n{i}");
        let token = f.token(&name).await;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        f.ctl
            .registry
            .enroll(&ca, &token.id, &token.secret, &csr, now)
            .await
            .expect("enroll");
        names.push(name);
    }
    let started = Instant::now();
    let registrations: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let registry = f.ctl.registry.clone();
            let name = name.clone();
            // Node i holds 1,000 /24s from 20.0.0.0 + i * 1,000 /24s.
            let first =
                Ipv4Addr::from(u32::from(Ipv4Addr::new(20, 0, 0, 0)) + ((i as u32 * 1000) << 8));
            let reg = register(i as u8, slash24s(first, 1000));
            tokio::spawn(async move {
                registry
                    .register(
                        &name,
                        &reg,
                        "198.51.100.1:51820".parse().expect("addr"),
                        now,
                    )
                    .await
            })
        })
        .collect();
    let join_started = Instant::now();
    let late = tokio::time::timeout(
        T,
        control::enroll(&f.token("late-gw").await, &f.state_dir("late-gw")),
    )
    .await
    .expect("the join is not held up by the admissions")
    .expect("enrolled");
    let join_took = join_started.elapsed();
    assert_eq!(late.node, "late-gw");
    let mut accepted = 0;
    for r in registrations {
        let node = tokio::time::timeout(T * 4, r)
            .await
            .expect("admissions finish")
            .expect("task")
            .expect("registered");
        assert!(
            node.rejected_prefixes.is_empty(),
            "{:?}",
            node.rejected_prefixes.first()
        );
        accepted += node.prefixes.len();
    }
    println!(
        "{accepted} prefixes admitted from {NODES} nodes in {:?}; a join meanwhile took {join_took:?}",
        started.elapsed()
    );
    assert_eq!(accepted, 50_000);
    f.ctl.shutdown().await;
}

/// An enrollment committed but its answer never reached the agent (it timed out,
/// the connection dropped, the controller crashed after the commit): the agent
/// asks again with the same token and the same key, kept in its state dir, and
/// gets the same node and certificate instead of "already used". Anyone else
/// with the token still finds it used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_enrollment_answer_is_given_again_for_the_same_token_and_key() {
    let f = start().await;
    let token = f.token("aws-gw").await;
    let dir = f.state_dir("aws-gw");
    // The agent's first attempt: it saves its key, sends the request, and the
    // controller commits; the answer is lost.
    std::fs::create_dir_all(&dir).expect("dir");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    std::fs::write(dir.join("control.key"), key.serialize_pem()).expect("key file");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let ca = f.ctl.registry.load_or_create_ca().await.expect("ca");
    let lost = f
        .ctl
        .registry
        .enroll(
            &ca,
            &token.id,
            &token.secret,
            &csr,
            skymesh_controller::store::records::unix_now(),
        )
        .await
        .expect("the first enrollment commits");

    // The retry, by the real agent client.
    let identity = tokio::time::timeout(T, control::enroll(&token, &dir))
        .await
        .expect("answered")
        .expect("the retry gets the answer");
    assert_eq!(identity.node, lost.node.name);
    assert_eq!(identity.cert_pem, lost.certificate_pem);
    assert_eq!(f.ctl.registry.nodes().await.expect("nodes").len(), 1);
    // The agent can use it.
    let (tx, mut events) = mpsc::channel(16);
    let session = tokio::spawn(control::run_session(identity, register(1, Vec::new()), tx));
    loop {
        match tokio::time::timeout(T, events.recv())
            .await
            .expect("netmap")
        {
            Some(ControlEvent::NetMap(full)) => {
                assert_eq!(full.node.name, "aws-gw");
                break;
            }
            Some(ControlEvent::Disconnected { reason }) => panic!("{reason}"),
            Some(_) => continue,
            None => panic!("session ended"),
        }
    }
    session.abort();

    // Another key with the same token: used.
    let err = control::enroll(&token, &f.state_dir("thief"))
        .await
        .expect_err("the token is used");
    let refused = err.downcast::<control::Refused>().expect("a refusal");
    assert_eq!(refused.code, RefusalCode::InvalidToken);
    assert!(
        refused.message.contains("already used"),
        "{}",
        refused.message
    );

    // Once the node is revoked, the old answer is not given again.
    assert!(f.ctl.registry.revoke_node("aws-gw").await.expect("revoke"));
    std::fs::remove_file(dir.join("controller.json")).expect("forget the identity");
    let err = control::enroll(&token, &dir).await.expect_err("revoked");
    let refused = err.downcast::<control::Refused>().expect("a refusal");
    assert_eq!(refused.code, RefusalCode::InvalidToken);
    f.ctl.shutdown().await;
}

/// `join` with a token whose CA pin is not the controller's used to retry
/// forever. It stops at once, naming both fingerprints and what to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_stops_on_a_ca_pin_mismatch_and_says_why() {
    let f = start().await;
    let mut token = f.token("aws-gw").await;
    token.ca_sha256 = "ab".repeat(32);
    let err = tokio::time::timeout(T, enroll_with_retry(&token, &f.state_dir("aws-gw")))
        .await
        .expect("the join stops instead of retrying")
        .expect_err("pin mismatch");
    assert!(control::is_permanent(&err));
    let message = format!("{err:#}");
    match err.downcast::<EnrollError>().expect("an enrollment error") {
        EnrollError::PinMismatch {
            controller,
            expected,
            presented,
        } => {
            assert_eq!(controller, f.ctl.control_addr.to_string());
            assert_eq!(expected, "ab".repeat(32));
            assert_eq!(presented, f.ctl.ca_fingerprint);
        }
        other => panic!("not a pin mismatch: {other:?}"),
    }
    for needle in [
        "ab".repeat(32).as_str(),
        f.ctl.ca_fingerprint.as_str(),
        "check that the token was created by this controller",
    ] {
        assert!(message.contains(needle), "{needle:?} in {message}");
    }
    // Nothing was enrolled, and the token is still good.
    assert!(f.ctl.registry.nodes().await.expect("nodes").is_empty());
    f.ctl.shutdown().await;
}

/// A used token is as final as a wrong pin; an unreachable controller is not:
/// the join keeps trying until the controller is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_stops_on_a_used_token_and_retries_an_unreachable_controller() {
    let f = start().await;
    let token = f.token("aws-gw").await;
    control::enroll(&token, &f.state_dir("first"))
        .await
        .expect("first use");
    let err = tokio::time::timeout(T, enroll_with_retry(&token, &f.state_dir("second")))
        .await
        .expect("the join stops")
        .expect_err("used");
    assert!(control::is_permanent(&err), "{err:#}");

    // The controller goes away; a join with a fresh token waits for it.
    let fresh = f.token("gcp-gw").await;
    let Fixture { _dir, root, ctl } = f;
    let addrs = (ctl.control_addr, ctl.api_addr);
    ctl.shutdown().await;
    let dir = root.join("agents").join("gcp-gw");
    let join = tokio::spawn(async move { enroll_with_retry(&fresh, &dir).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !join.is_finished(),
        "the join gave up on an unreachable controller"
    );
    let mut cfg = config(&root);
    (cfg.control_listen, cfg.api_listen) = addrs;
    let ctl = server::start(&cfg).await.expect("restart");
    let identity = tokio::time::timeout(T * 2, join)
        .await
        .expect("the join succeeds once the controller is back")
        .expect("task")
        .expect("enrolled");
    assert_eq!(identity.node, "gcp-gw");
    ctl.shutdown().await;
}

// ---- connections that have not authenticated ----

/// A QUIC client that trusts the controller's CA and presents no certificate:
/// what anybody on the network can open.
fn anonymous_client(ca_der: rustls::pki_types::CertificateDer<'static>) -> quinn::Endpoint {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).expect("ca");
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![skymesh_wire::control::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut cfg = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("idle")));
    cfg.transport_config(std::sync::Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("udp");
    endpoint.set_default_client_config(cfg);
    endpoint
}

async fn connect(
    endpoint: &quinn::Endpoint,
    to: std::net::SocketAddr,
) -> Option<quinn::Connection> {
    let connecting = endpoint
        .connect(to, skymesh_wire::control::SERVER_NAME)
        .expect("connect");
    tokio::time::timeout(T, connecting).await.ok()?.ok()
}

/// Reads one controller message from `recv`, if one comes within `within`.
async fn answer(
    recv: &mut quinn::RecvStream,
    within: Duration,
) -> Option<skymesh_wire::control::ControllerMessage> {
    let mut frames = skymesh_wire::control::FrameBuffer::new();
    let mut buf = vec![0u8; 16 * 1024];
    tokio::time::timeout(within, async {
        loop {
            if let Some(m) = frames.next_message().ok()? {
                return Some(m);
            }
            let n = recv.read(&mut buf).await.ok()??;
            frames.extend(&buf[..n]);
        }
    })
    .await
    .ok()?
}

/// Before it has authenticated, a connection's first frame may be no larger
/// than an enrollment needs: a header announcing more is refused at once,
/// naming the limit, instead of the controller buffering up to 8 MiB for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_first_frame_larger_than_an_enrollment_is_refused() {
    let f = start().await;
    let ca = f.ctl.registry.load_or_create_ca().await.expect("ca");
    let client = anonymous_client(ca.cert_der().clone());
    let conn = connect(&client, f.ctl.control_addr)
        .await
        .expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&(1u32 << 20).to_be_bytes())
        .await
        .expect("header");
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        send.write_all(&vec![b' '; 64 << 10]),
    )
    .await;
    match answer(&mut recv, Duration::from_secs(5)).await {
        Some(skymesh_wire::control::ControllerMessage::Refused(r)) => {
            assert_eq!(r.code, RefusalCode::Protocol);
            assert!(r.message.contains("16384-byte limit"), "{}", r.message);
        }
        other => panic!("expected a refusal naming the limit, got {other:?}"),
    }
    f.ctl.shutdown().await;
}

/// 300 connections that complete their handshake and say nothing: at most 256
/// stay (the oldest make room), none stays past the pre-authentication
/// deadline, and an agent joins while they are held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_unauthenticated_connections_are_capped_and_a_join_goes_through() {
    const ATTACKERS: usize = 300;
    let f = start().await;
    let ca = f.ctl.registry.load_or_create_ca().await.expect("ca");
    let client = anonymous_client(ca.cert_der().clone());
    let opened = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..ATTACKERS {
        conns.extend(connect(&client, f.ctl.control_addr).await);
    }
    // Evicted connections close within a scheduling round; allow a loaded
    // machine a few.
    let settle = Instant::now() + Duration::from_secs(5);
    let mut open = conns.len();
    while Instant::now() < settle {
        open = conns.iter().filter(|c| c.close_reason().is_none()).count();
        if open <= 256 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} of {ATTACKERS} handshakes completed in {:?}; {open} still open",
        conns.len(),
        opened.elapsed()
    );
    assert!(open <= 256, "{open} unauthenticated connections held");

    // An agent joins while the attacker holds the cap.
    let joined = tokio::time::timeout(
        T,
        control::enroll(&f.token("aws-gw").await, &f.state_dir("aws-gw")),
    )
    .await
    .expect("the join is not locked out")
    .expect("enrolled");
    assert_eq!(joined.node, "aws-gw");

    // None outlives the deadline (10 s from its arrival).
    let deadline = opened + Duration::from_secs(20);
    for c in &conns {
        tokio::time::timeout_at(deadline.into(), c.closed())
            .await
            .expect("a silent unauthenticated connection is closed by the deadline");
    }
    f.ctl.shutdown().await;
}

/// Accepts any server certificate: an attacker needs no trust in the controller.
#[derive(Debug)]
struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn blind_client() -> quinn::Endpoint {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![skymesh_wire::control::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("udp");
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    endpoint
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The real controller binary, as an attacker meets it: 20 connections without
/// a certificate each announce an 8 MiB first frame and send 6 MiB of it. The
/// controller used to buffer all of it (+130 MiB for 20); now it refuses each at
/// the frame header, and its resident memory barely moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_first_frames_do_not_grow_the_controllers_memory() {
    const CONNS: usize = 20;
    let dir = tempfile::tempdir().expect("tmp");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "[control]\nlisten = \"127.0.0.1:{port}\"\nadvertise = [\"127.0.0.1:{port}\"]\n[api]\nlisten = \"127.0.0.1:0\"\nadmin_token_file = {:?}\n[state]\ndata_dir = {:?}\n",
            dir.path().join("admin.token"),
            dir.path().join("data")
        ),
    )
    .expect("config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_skymesh-controller"))
        .args(["run", "--config"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn skymesh-controller");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let _kill = Kill(&mut child);
    let to: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let client = blind_client();
    let up = Instant::now() + T;
    loop {
        if let Some(c) = connect(&client, to).await {
            c.close(0u8.into(), b"probe");
            break;
        }
        assert!(Instant::now() < up, "the controller did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = vm_rss_kib(pid);
    let mut peak = before;
    let floods: Vec<_> = (0..CONNS)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let conn = connect(&client, to).await?;
                let (mut send, _recv) = conn.open_bi().await.ok()?;
                send.write_all(&(8u32 << 20).to_be_bytes()).await.ok()?;
                let chunk = vec![b' '; 64 << 10];
                let _ = tokio::time::timeout(Duration::from_secs(8), async {
                    for _ in 0..96 {
                        send.write_all(&chunk).await?;
                    }
                    Ok::<_, quinn::WriteError>(())
                })
                .await;
                Some(conn)
            })
        })
        .collect();
    let sampling = Instant::now() + Duration::from_secs(10);
    while Instant::now() < sampling {
        peak = peak.max(vm_rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for f in floods {
        let _ = f.await;
    }
    let grew_mib = (peak.saturating_sub(before)) as f64 / 1024.0;
    println!(
        "controller VmRSS {} MiB before, peak {} MiB with {CONNS} unauthenticated 8 MiB first frames: +{grew_mib:.1} MiB",
        before / 1024,
        peak / 1024
    );
    assert!(grew_mib < 40.0, "+{grew_mib:.1} MiB");
}

/// The same answer is given again only within the retry window: the token's
/// TTL, and at least 10 minutes after the enrollment. Time is injected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_answer_is_given_again_only_within_the_retry_window() {
    let f = start().await;
    let ca = f.ctl.registry.load_or_create_ca().await.expect("ca");
    let now = skymesh_controller::store::records::unix_now();
    let (rec, secret) = f
        .ctl
        .registry
        .create_token(
            NewToken {
                name: "aws-gw".into(),
                site: "aws".into(),
                cloud: "aws".into(),
                region: "us-west-2".into(),
                ttl: Some(60),
                reusable: false,
            },
            now,
        )
        .await
        .expect("token");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = |key: &rcgen::KeyPair| {
        rcgen::CertificateParams::default()
            .serialize_request(key)
            .expect("csr")
            .pem()
            .expect("pem")
    };
    let registry = &f.ctl.registry;
    let first = registry
        .enroll(&ca, &rec.id, &secret, &csr(&key), now)
        .await
        .expect("enrolls");
    // A new CSR for the same key (signatures differ), after the token expired
    // but within the 10-minute minimum: the same answer.
    let again = registry
        .enroll(&ca, &rec.id, &secret, &csr(&key), now + 300)
        .await
        .expect("the same answer");
    assert_eq!(again.node.name, first.node.name);
    assert_eq!(again.certificate_pem, first.certificate_pem);
    // A wrong secret gets nothing.
    let wrong = registry
        .enroll(&ca, &rec.id, &"0".repeat(64), &csr(&key), now + 300)
        .await
        .expect_err("wrong secret");
    assert!(wrong.to_string().contains("not valid"), "{wrong}");
    // After the window, the token is simply expired.
    let late = registry
        .enroll(&ca, &rec.id, &secret, &csr(&key), now + 601)
        .await
        .expect_err("window closed");
    assert!(late.to_string().contains("expired"), "{late}");
    assert_eq!(registry.nodes().await.expect("nodes").len(), 1);
    f.ctl.shutdown().await;
}

// ---- connections that have authenticated ----

/// Enrolls `name` through the registry with a key of its own.
async fn enroll_direct(
    f: &Fixture,
    name: &str,
) -> (skymesh_controller::registry::Enrollment, rcgen::KeyPair) {
    let ca = f.ctl.registry.load_or_create_ca().await.expect("ca");
    let (rec, secret) = f
        .ctl
        .registry
        .create_token(
            NewToken {
                name: name.into(),
                site: name.into(),
                cloud: "aws".into(),
                region: "us-west-2".into(),
                ttl: Some(3600),
                reusable: false,
            },
            skymesh_controller::store::records::unix_now(),
        )
        .await
        .expect("token");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let enrolled = f
        .ctl
        .registry
        .enroll(
            &ca,
            &rec.id,
            &secret,
            &csr,
            skymesh_controller::store::records::unix_now(),
        )
        .await
        .expect("enrolled");
    (enrolled, key)
}

/// A QUIC client holding a real node's certificate: enrolled through the
/// registry with a key of its own, as an agent that went rogue (or a stolen
/// state dir) would present it.
async fn node_client(f: &Fixture, name: &str) -> quinn::Endpoint {
    use rustls::pki_types::pem::PemObject;
    let ca = f.ctl.registry.load_or_create_ca().await.expect("ca");
    let (enrolled, key) = enroll_direct(f, name).await;
    let cert =
        rustls::pki_types::CertificateDer::from_pem_slice(enrolled.certificate_pem.as_bytes())
            .expect("cert");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        key.serialize_der(),
    ));
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).expect("ca");
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .expect("client cert");
    tls.alpn_protocols = vec![skymesh_wire::control::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut cfg = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("idle")));
    cfg.transport_config(std::sync::Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("udp");
    endpoint.set_default_client_config(cfg);
    endpoint
}

/// One enrolled node's certificate used to open many connections, each
/// announcing a large first frame and sending it slowly: the controller used
/// to buffer up to 8 MiB for each (100 connections: +340 MB). Now a header
/// larger than a registration at the prefix cap is refused at once, naming
/// the limit; a newer connection of the node closes its older one before
/// anything is read, so at most one is held; and other agents keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_certificate_cannot_make_the_controller_buffer_without_limit() {
    const CONNS: usize = 40;
    let f = start().await;
    let mut good = {
        let identity = control::enroll(&f.token("good-gw").await, &f.state_dir("good-gw"))
            .await
            .expect("enroll");
        let (tx, events) = mpsc::channel(1024);
        tokio::spawn(control::run_session(
            identity,
            register(1, slash24s(Ipv4Addr::new(10, 1, 0, 0), 1)),
            tx,
        ));
        events
    };
    loop {
        match tokio::time::timeout(T, good.recv()).await.expect("netmap") {
            Some(ControlEvent::NetMap(_)) => break,
            Some(_) => continue,
            None => panic!("the good agent's session ended"),
        }
    }
    let bad = node_client(&f, "bad-gw").await;

    // A header announcing 8 MiB (within the protocol's frame limit) is refused
    // at once, naming the registration limit derived from the prefix cap.
    let conn = connect(&bad, f.ctl.control_addr).await.expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&(8u32 << 20).to_be_bytes())
        .await
        .expect("header");
    let _ = send.write_all(&vec![b' '; 16 << 10]).await;
    match answer(&mut recv, Duration::from_secs(5)).await {
        Some(skymesh_wire::control::ControllerMessage::Refused(r)) => {
            assert_eq!(r.code, RefusalCode::Protocol);
            assert!(
                r.message.contains("112384-byte limit of a registration"),
                "{}",
                r.message
            );
        }
        other => panic!("expected a refusal naming the limit, got {other:?}"),
    }

    // Many connections, each within the limit but sent slowly: a newer one
    // closes the older, so one stays.
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        let Some(conn) = connect(&bad, f.ctl.control_addr).await else {
            continue;
        };
        let Ok((mut send, recv)) = conn.open_bi().await else {
            continue;
        };
        let _ = send.write_all(&(100_000u32).to_be_bytes()).await;
        let _ = send.write_all(&vec![b' '; 60_000]).await;
        conns.push((conn, send, recv));
    }
    let settle = Instant::now() + Duration::from_secs(5);
    let mut open = conns.len();
    while Instant::now() < settle {
        open = conns
            .iter()
            .filter(|(c, _, _)| c.close_reason().is_none())
            .count();
        if open <= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} connections with one node's certificate, each 60 KB into a 100 KB first frame: {open} still open",
        conns.len()
    );
    assert_eq!(conns.len(), CONNS, "every connection authenticated");
    assert!(open <= 1, "{open} sessions of one node held");

    // The good agent still gets news: a node that joins now reaches it.
    let late = control::enroll(&f.token("late-gw").await, &f.state_dir("late-gw"))
        .await
        .expect("a join goes through");
    let (tx, _late_events) = mpsc::channel(1024);
    tokio::spawn(control::run_session(
        late,
        register(2, slash24s(Ipv4Addr::new(10, 2, 0, 0), 1)),
        tx,
    ));
    let deadline = Instant::now() + T;
    'seen: loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, good.recv())
            .await
            .expect("the good agent hears of late-gw")
        {
            Some(ControlEvent::Update(u)) if u.upsert.iter().any(|p| p.name == "late-gw") => {
                break 'seen
            }
            Some(ControlEvent::NetMap(m)) if m.netmap.peers.iter().any(|p| p.name == "late-gw") => {
                break 'seen
            }
            Some(_) => continue,
            None => panic!("the good agent's session ended"),
        }
    }
    drop(conns);
    f.ctl.shutdown().await;
}

/// A node whose prefixes are all refused (1,000 of them, inside another
/// node's) reconnecting in a tight loop, from several connections at once,
/// while an operator revokes a third node: the revocation takes no longer
/// than it does on a quiet controller, however many reconnects are queued.
/// Each of those reconnects used to redo the admission under the lock the
/// revocation takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reconnecting_with_refused_prefixes_does_not_hold_up_a_revocation() {
    const LOOPS: usize = 16;
    let f = start().await;
    let registry = f.ctl.registry.clone();
    let observed: std::net::SocketAddr = "203.0.113.9:40000".parse().expect("addr");
    let now = skymesh_controller::store::records::unix_now;
    for name in ["holder-gw", "looper-gw", "victim-gw", "quiet-gw"] {
        enroll_direct(&f, name).await;
    }
    registry
        .register(
            "holder-gw",
            &register(1, vec!["10.0.0.0/8".parse().expect("cidr")]),
            observed,
            now(),
        )
        .await
        .expect("holder registers");
    let refused = register(2, slash24s(Ipv4Addr::new(10, 0, 0, 0), 1000));
    let started = Instant::now();
    let node = registry
        .register("looper-gw", &refused, observed, now())
        .await
        .expect("looper registers");
    let admission = started.elapsed();
    assert!(node.prefixes.is_empty());
    assert_eq!(node.rejected_prefixes.len(), 1000);

    // A revocation on a quiet controller.
    let started = Instant::now();
    assert!(registry.revoke_node("quiet-gw").await.expect("revoke"));
    let quiet = started.elapsed();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reconnects = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let loops: Vec<_> = (0..LOOPS)
        .map(|_| {
            let (registry, refused, stop, reconnects) = (
                registry.clone(),
                refused.clone(),
                stop.clone(),
                reconnects.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = registry
                        .register("looper-gw", &refused, observed, now())
                        .await;
                    reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    assert!(registry.revoke_node("victim-gw").await.expect("revoke"));
    let busy = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loops {
        l.await.expect("loop");
    }
    println!(
        "admission of 1000 refused prefixes {admission:?}; revoke quiet {quiet:?}, \
         with {LOOPS} reconnect loops {busy:?}; {} reconnects",
        reconnects.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        busy < quiet * 4 + Duration::from_millis(100),
        "revoke took {busy:?} behind {LOOPS} reconnect loops (quiet: {quiet:?}, one admission: {admission:?})"
    );
    // Nothing the loop did changed what the looper holds.
    let (node, _) = registry
        .node("looper-gw")
        .await
        .expect("read")
        .expect("node");
    assert!(node.prefixes.is_empty());
    assert_eq!(node.rejected_prefixes.len(), 1000);
    f.ctl.shutdown().await;
}
