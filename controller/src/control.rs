//! The control channel, controller side: a QUIC endpoint with rustls where agents
//! enroll (server-authenticated TLS, a join token) and then connect with mutual
//! TLS to register and receive their netmap and its updates.
//!
//! Until a connection has authenticated (a client certificate of a live node,
//! or an enrollment request read whole) it is held under [`PRE_AUTH`]: at most
//! 256 at once, at the cap the one that has waited longest makes room (so a
//! flood of silent connections cannot lock an agent out), 10 s from its arrival
//! to its handshake, its stream and its first frame, which may be
//! [`control::MAX_ENROLL_FRAME`] bytes for an enrollment. The QUIC receive
//! windows are sized for what agents send (a registration within the prefix
//! cap, link reports), not for the netmaps the controller sends.
//!
//! Once authenticated, a node has one session (a newer connection closes its
//! older one before anything is read from it), at most twice
//! as many sessions as enrolled nodes are open in all, and every frame an agent
//! sends is bounded by what it needs: its registration by the configured prefix
//! cap ([`control::max_register_frame`]), a link report by the enrolled nodes
//! ([`control::max_links_frame`]). A larger header is refused at once.
//!
//! The hub is one task that owns the [`Fabric`]: it follows the store's node
//! records through a watch (so a change made by any controller replica reaches
//! every agent) and fans the resulting messages out to the sessions. Each
//! session is a task per agent connection that writes the hub's frames to the
//! agent's stream.

mod sessions;

use crate::fabric::{Audience, Fabric, Output};
use crate::listen;
use crate::metrics::Metrics;
use crate::model::{self, NodeRecord};
use crate::paths::{LinkOverride, LinkView, PairView, PathConfig, PathEngine};
use crate::pki::{self, Ca};
use crate::registry::{Registry, RegistryError};
use crate::store::{StoreError, WatchEvent};
use anyhow::{anyhow, Context, Result};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::CertificateDer;
use skymesh_wire::control::{
    self, AgentMessage, ControllerMessage, EnrollRequest, Enrolled, FrameBuffer, NetMapUpdate,
    Refusal, RefusalCode,
};
use skymesh_wire::LinkReport;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

use sessions::{Admission, Sessions};

/// Frames queued for one agent before it counts as too slow and is dropped (it
/// reconnects and gets a full netmap).
const SESSION_QUEUE: usize = 1024;
/// How long an agent has to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections that have not authenticated yet: how many at once, and how long
/// each has from its arrival to a checked certificate or a whole enrollment
/// request (`header_timeout`; the other deadlines do not apply before then).
pub const PRE_AUTH: listen::Limits = listen::Limits {
    max_connections: 256,
    header_timeout: Duration::from_secs(10),
    // Deadlines of requests on a byte stream, which a QUIC connection does not
    // pass through the guard.
    ..listen::Limits::API
};
/// What the controller lets one agent stream have in flight to it: a
/// registration at the prefix cap is about 70 KB, a link report a few KB.
/// Larger registrations still arrive, paced by flow control.
const STREAM_RECEIVE_WINDOW: u32 = 256 << 10;
/// The same for the whole connection (one stream, plus QUIC's own frames).
const CONNECTION_RECEIVE_WINDOW: u32 = 512 << 10;
/// Connection attempts quinn holds before the accept loop takes them, and the
/// bytes it buffers for each and for all of them.
const MAX_INCOMING: usize = 512;
const INCOMING_BUFFER: u64 = 64 << 10;
const INCOMING_BUFFER_TOTAL: u64 = 4 << 20;
/// How often paths are recomputed from the link reports.
const PATH_TICK: Duration = Duration::from_secs(1);
/// After a (re)start, paths are neither computed nor sent until the agents have
/// had time to report: netmaps sent meanwhile carry no paths, which tells an agent
/// to keep the ones it has, instead of every pair falling back to direct.
const PATH_WARMUP: Duration = Duration::from_secs(3);

/// Everything a connection handler needs.
pub struct Control {
    pub registry: Arc<Registry>,
    pub ca: Arc<Ca>,
    pub hub: Hub,
    pub metrics: Arc<Metrics>,
    /// Connections that have not authenticated yet, under [`PRE_AUTH`].
    pub pre_auth: Arc<listen::Guard>,
}

/// The rustls + QUIC server configuration: our chain, client certificates
/// optional at the TLS layer (enrollment has none) but verified against our CA
/// when present.
pub fn server_config(ca: &Ca) -> Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.cert_der().clone())
        .context("adding the CA to the client verifier")?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .context("building the client verifier")?;
    let (chain, key) = ca.issue_server(SystemTime::now())?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("server certificate")?;
    tls.alpn_protocols = vec![control::ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).context("QUIC TLS configuration")?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        Duration::from_secs(30).try_into().context("idle timeout")?,
    ));
    transport.max_concurrent_uni_streams(0u8.into());
    transport.max_concurrent_bidi_streams(1u8.into());
    transport.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    transport.receive_window(CONNECTION_RECEIVE_WINDOW.into());
    transport.datagram_receive_buffer_size(None);
    cfg.transport_config(Arc::new(transport));
    cfg.max_incoming(MAX_INCOMING)
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    Ok(cfg)
}

/// Accepts connections until the endpoint closes. Each is admitted under
/// [`PRE_AUTH`] until it has authenticated; at the cap with every slot busy,
/// the newcomer is refused before its handshake.
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<Control>) {
    let guard = ctx.pre_auth.clone();
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let Some(admitted) = guard.admit() else {
            tracing::debug!(%remote, "too many unauthenticated control connections; refusing one");
            // Counted by the guard as refused at the cap.
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        let guard = guard.clone();
        tokio::spawn(async move {
            let mut outcome = None;
            let slot = &mut outcome;
            guard
                .serve(admitted, (), |_, _| async {
                    *slot = Some(authenticate(incoming, &ctx).await);
                })
                .await;
            let result = match outcome {
                None => Err(anyhow!(
                    "closed before it authenticated (too slow, or made room for a newer one)"
                )),
                Some(Err(e)) => Err(e),
                Some(Ok(Authenticated::Node(conn, node))) => session(conn, *node, &ctx).await,
                Some(Ok(Authenticated::Enroll(conn, req))) => enroll(conn, *req, &ctx).await,
            };
            if let Err(e) = result {
                tracing::debug!(%remote, error = %format!("{e:#}"), "control connection ended");
            }
        });
    }
}

/// A connection with its one stream.
struct Conn {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// What a connection proved before it leaves [`PRE_AUTH`].
enum Authenticated {
    /// The current certificate of a live node.
    Node(Conn, Box<NodeRecord>),
    /// No certificate, and a whole enrollment request.
    Enroll(Conn, Box<EnrollRequest>),
}

/// The handshake, the stream, and the certificate check or the enrollment
/// request: everything the controller does for a peer it does not know yet.
/// The caller bounds its time; this bounds its memory.
async fn authenticate(incoming: quinn::Incoming, ctx: &Control) -> Result<Authenticated> {
    let conn = incoming.await.context("handshake")?;
    let cert = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.into_iter().next());
    let (mut send, mut recv) = conn.accept_bi().await.context("opening the stream")?;
    let Some(cert) = cert else {
        // Only an enrollment request may come, so no more than one is buffered.
        let mut frames = FrameBuffer::with_limit(
            control::MAX_ENROLL_FRAME,
            "the first message of a connection without a client certificate (an enrollment)",
        );
        let req = match read_message(&mut recv, &mut frames).await {
            Ok(Some(AgentMessage::Enroll(req))) => req,
            Ok(other) => {
                let message = format!(
                    "a connection without a client certificate may only enroll; got {}",
                    describe(&other)
                );
                refuse(&conn, &mut send, RefusalCode::Protocol, message).await?;
                unreachable_refusal()?
            }
            Err(e) => {
                let code = refusal_code(&e);
                refuse(&conn, &mut send, code, format!("{e:#}")).await?;
                unreachable_refusal()?
            }
        };
        return Ok(Authenticated::Enroll(
            Conn { conn, send, recv },
            Box::new(req),
        ));
    };

    // A client certificate: check it is the current certificate of a live node
    // before reading anything the agent sent.
    let remote = conn.remote_address();
    let name = pki::client_name(&cert)?;
    let sha = pki::fingerprint(&cert);
    match ctx.registry.node_for_cert(&name, &sha).await {
        Ok(Some(node)) => Ok(Authenticated::Node(
            Conn { conn, send, recv },
            Box::new(node),
        )),
        Ok(None) => {
            tracing::info!(node = %name, %remote, "refused a certificate that belongs to no enrolled node (revoked or replaced)");
            refuse(
                &conn,
                &mut send,
                RefusalCode::InvalidCertificate,
                format!("the certificate of {name:?} is revoked or unknown; enroll again with a new join token"),
            )
            .await?;
            unreachable_refusal()
        }
        Err(e) => {
            refuse(&conn, &mut send, RefusalCode::Unavailable, e.to_string()).await?;
            unreachable_refusal()
        }
    }
}

/// [`refuse`] always fails; this satisfies the type checker after it.
fn unreachable_refusal<T>() -> Result<T> {
    Err(anyhow!("refused"))
}

/// The refusal code for a message that could not be read.
fn refusal_code(e: &anyhow::Error) -> RefusalCode {
    match e.downcast_ref::<control::FrameError>() {
        Some(control::FrameError::Version(_)) => RefusalCode::Version,
        _ => RefusalCode::Protocol,
    }
}

/// An authenticated node's session: its registration, then netmaps out and
/// link reports in until either side ends it.
async fn session(c: Conn, node: NodeRecord, ctx: &Control) -> Result<()> {
    let Conn {
        conn,
        mut send,
        mut recv,
    } = c;
    let remote = conn.remote_address();
    let _ticket = match ctx.hub.admit_session(&node.name, conn.clone()) {
        Admission::Admitted { ticket, replaced } => {
            if let Some(older) = replaced {
                tracing::info!(node = %node.name, %remote, "a newer session of the node replaces its older one");
                older.close(2u8.into(), b"replaced by a newer session of this node");
            }
            ticket
        }
        Admission::AtCap { open, cap } => {
            tracing::warn!(node = %node.name, %remote, open, cap, "at the cap of authenticated control sessions; refusing one");
            conn.close(
                3u8.into(),
                b"the controller is at its cap of sessions; retry later",
            );
            return Err(anyhow!("refused at the session cap ({open} of {cap} open)"));
        }
    };
    let mut frames = FrameBuffer::with_limit(
        control::max_register_frame(ctx.registry.max_prefixes()),
        "a registration at the configured prefix cap",
    );
    let deadline = tokio::time::Instant::now() + FIRST_MESSAGE_TIMEOUT;
    let first = tokio::time::timeout_at(deadline, read_message(&mut recv, &mut frames))
        .await
        .context("no register message in time")?;
    let reg = match first {
        Ok(Some(AgentMessage::Register(reg))) => reg,
        Ok(other) => {
            return refuse(
                &conn,
                &mut send,
                RefusalCode::Protocol,
                format!("expected register first, got {}", describe(&other)),
            )
            .await;
        }
        Err(e) => {
            if let Some(&control::FrameError::OverLimit { len, .. }) = e.downcast_ref() {
                let cap = ctx.registry.max_prefixes();
                let message = format!(
                    "{e:#}: node {:?} may advertise at most {cap} prefixes (`max_prefixes_per_node` \
                     in the controller config's [network] table); aggregate them into fewer, \
                     larger prefixes, or raise the cap",
                    node.name
                );
                tracing::info!(node = %node.name, %remote, error = %message, "registration refused");
                let rest = (len + 4).saturating_sub(frames.pending());
                return refuse_then_discard(&conn, &mut send, &mut recv, rest, deadline, message)
                    .await;
            }
            let code = refusal_code(&e);
            return refuse(&conn, &mut send, code, format!("{e:#}")).await;
        }
    };
    let registered = match ctx
        .registry
        .register(&node.name, &reg, remote, model::unix_now())
        .await
    {
        Ok(n) => n,
        Err(e) => {
            let code = match &e {
                // Over the prefix cap, or a malformed prefix: the agent's config
                // must change; reconnecting as is gets the same answer.
                RegistryError::Invalid { .. } => RefusalCode::Protocol,
                _ => RefusalCode::Unavailable,
            };
            tracing::info!(node = %node.name, %remote, error = %e, "registration refused");
            return refuse(&conn, &mut send, code, e.to_string()).await;
        }
    };
    let revision = ctx.registry.store().revision().await?;
    let (tx, mut rx) = mpsc::channel(SESSION_QUEUE);
    let session = ctx.hub.subscribe(&registered.name, tx, revision).await?;
    tracing::info!(node = %registered.name, %remote, "agent connected");
    ctx.metrics.agents_connected.fetch_add(1, Ordering::Relaxed);
    let result = async {
        loop {
            frames.set_limit(
                control::max_links_frame(ctx.hub.enrolled()),
                "a link report for the enrolled nodes",
            );
            tokio::select! {
                out = rx.recv() => match out {
                    Some(SessionMsg::Frame(frame)) => {
                        send.write_all(&frame).await.context("writing to the agent")?;
                    }
                    Some(SessionMsg::Close(code, message)) => {
                        return refuse(&conn, &mut send, code, message).await;
                    }
                    None => return Ok(()),
                },
                msg = read_message(&mut recv, &mut frames) => match msg {
                    Err(e) => {
                        let code = refusal_code(&e);
                        return refuse(&conn, &mut send, code, format!("{e:#}")).await;
                    }
                    Ok(None) => return Ok(()),
                    Ok(Some(AgentMessage::Links(report))) => {
                        ctx.hub.report(&registered.name, report);
                    }
                    Ok(Some(other)) => {
                        return refuse(&conn, &mut send, RefusalCode::Protocol,
                            format!("unexpected {} after register", describe(&Some(other)))).await;
                    }
                },
            }
        }
    }
    .await;
    ctx.metrics.agents_connected.fetch_sub(1, Ordering::Relaxed);
    ctx.hub.unsubscribe(&registered.name, session);
    tracing::info!(node = %registered.name, "agent disconnected");
    if let Err(e) = ctx
        .registry
        .touch(&registered.name, model::unix_now())
        .await
    {
        tracing::debug!(error = %e, "could not record last_seen");
    }
    result
}

async fn enroll(c: Conn, req: EnrollRequest, ctx: &Control) -> Result<()> {
    let Conn {
        conn,
        mut send,
        recv: _recv,
    } = c;
    let (conn, send) = (&conn, &mut send);
    match ctx
        .registry
        .enroll(
            &ctx.ca,
            &req.token_id,
            &req.secret,
            &req.csr_pem,
            model::unix_now(),
        )
        .await
    {
        Ok(enrollment) => {
            ctx.metrics.enrollments_ok.fetch_add(1, Ordering::Relaxed);
            let reply = ControllerMessage::Enrolled(Enrolled {
                node: enrollment.node.name,
                certificate_pem: enrollment.certificate_pem,
                ca_pem: ctx.ca.cert_pem().to_string(),
            });
            send.write_all(&control::encode(&reply)?).await?;
            send.finish()?;
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
            conn.close(0u8.into(), b"enrolled");
            Ok(())
        }
        Err(e) => {
            ctx.metrics
                .enrollments_refused
                .fetch_add(1, Ordering::Relaxed);
            let code = match &e {
                RegistryError::TokenRefused(_) => RefusalCode::InvalidToken,
                RegistryError::NameTaken(_) => RefusalCode::NameTaken,
                RegistryError::Invalid { .. } => RefusalCode::Protocol,
                _ => RefusalCode::Unavailable,
            };
            tracing::info!(remote = %conn.remote_address(), token = %req.token_id, error = %e, "enrollment refused");
            refuse(conn, send, code, e.to_string()).await
        }
    }
}

/// Sends a refusal, lets it arrive, closes the connection.
async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: RefusalCode,
    message: String,
) -> Result<()> {
    let frame = control::encode(&ControllerMessage::Refused(Refusal {
        code,
        message: message.clone(),
    }))?;
    let _ = send.write_all(&frame).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(1u8.into(), b"refused");
    Err(anyhow!("refused ({code:?}): {message}"))
}

/// [`refuse`] for a frame too large to read: the refusal goes out at once, then
/// the rest of the frame (`rest` bytes) is read and thrown away until
/// `deadline`, so an agent that writes its whole frame before it reads
/// (as agents do) gets to read why. Memory stays one chunk.
async fn refuse_then_discard(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    rest: usize,
    deadline: tokio::time::Instant,
    message: String,
) -> Result<()> {
    let code = RefusalCode::Protocol;
    let frame = control::encode(&ControllerMessage::Refused(Refusal {
        code,
        message: message.clone(),
    }))?;
    let _ = send.write_all(&frame).await;
    let _ = send.finish();
    let _ = tokio::time::timeout_at(deadline, async {
        let mut buf = [0u8; 16 * 1024];
        let mut left = rest;
        while left > 0 {
            match recv.read(&mut buf[..left.min(16 * 1024)]).await {
                Ok(Some(n)) => left = left.saturating_sub(n),
                _ => break,
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(1u8.into(), b"refused");
    Err(anyhow!("refused ({code:?}): {message}"))
}

fn describe(msg: &Option<AgentMessage>) -> &'static str {
    match msg {
        None => "end of stream",
        Some(AgentMessage::Enroll(_)) => "enroll",
        Some(AgentMessage::Register(_)) => "register",
        Some(AgentMessage::Links(_)) => "links",
        Some(AgentMessage::LinkChanges(_)) => "link_changes",
    }
}

/// Reads the next message; `Ok(None)` at the end of the stream.
async fn read_message(
    recv: &mut quinn::RecvStream,
    frames: &mut FrameBuffer,
) -> Result<Option<AgentMessage>> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(msg) = frames.next_message::<AgentMessage>()? {
            return Ok(Some(msg));
        }
        match recv.read(&mut buf).await? {
            Some(n) => frames.extend(&buf[..n]),
            None => return Ok(None),
        }
    }
}

// ---- the hub ----

pub enum SessionMsg {
    Frame(Arc<Vec<u8>>),
    Close(RefusalCode, String),
}

/// Identifies one session of a node, so an old session ending does not remove a
/// newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionId(u64);

struct Subscriber {
    id: SessionId,
    tx: mpsc::Sender<SessionMsg>,
    since: u64,
}

enum HubCmd {
    Subscribe {
        node: String,
        tx: mpsc::Sender<SessionMsg>,
        min_revision: u64,
        reply: oneshot::Sender<SessionId>,
    },
    Unsubscribe {
        node: String,
        id: SessionId,
    },
    Links {
        node: String,
        report: LinkReport,
    },
    Paths {
        /// Reload overrides and recompute first (after an operator change).
        refresh: bool,
        reply: oneshot::Sender<PathsSnapshot>,
    },
}

/// The measured links and the chosen paths, as the API shows them.
#[derive(Debug, Clone)]
pub struct PathsSnapshot {
    pub links: Vec<LinkView>,
    pub pairs: Vec<PairView>,
}

/// Handle to the hub task.
#[derive(Clone)]
pub struct Hub {
    cmds: mpsc::UnboundedSender<HubCmd>,
    online: Arc<Mutex<HashMap<String, u64>>>,
    /// The authenticated sessions, one per node.
    sessions: Arc<Sessions<quinn::Connection>>,
    /// Nodes enrolled as of the hub's last event: what the session cap and the
    /// link report bound scale with.
    enrolled: Arc<AtomicUsize>,
}

impl Hub {
    /// Starts the hub: it loads every node record and follows the store.
    pub fn start(
        registry: Arc<Registry>,
        mtu: u16,
        metrics: Arc<Metrics>,
        paths: PathConfig,
    ) -> Self {
        let (cmds, rx) = mpsc::unbounded_channel();
        let online = Arc::new(Mutex::new(HashMap::new()));
        let enrolled = Arc::new(AtomicUsize::new(0));
        let hub = Self {
            cmds,
            online: online.clone(),
            sessions: Sessions::new(),
            enrolled: enrolled.clone(),
        };
        tokio::spawn(async move {
            let mut state = HubState {
                registry,
                mtu,
                metrics,
                fabric: Fabric::new(mtu, []),
                engine: PathEngine::new(paths),
                started: Instant::now(),
                warm: false,
                revision: 0,
                sessions: HashMap::new(),
                pending: Vec::new(),
                next_id: 0,
                online,
                enrolled,
            };
            if let Err(e) = state.run(rx).await {
                tracing::error!(error = %format!("{e:#}"), "netmap hub stopped");
            }
        });
        hub
    }

    /// Registers a session of `node`; the hub first sends it the full netmap as of
    /// at least `min_revision`, then every update. A newer session of the same
    /// node replaces an older one.
    pub async fn subscribe(
        &self,
        node: &str,
        tx: mpsc::Sender<SessionMsg>,
        min_revision: u64,
    ) -> Result<SessionId> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(HubCmd::Subscribe {
                node: node.to_string(),
                tx,
                min_revision,
                reply,
            })
            .map_err(|_| anyhow!("the netmap hub has stopped"))?;
        rx.await.map_err(|_| anyhow!("the netmap hub has stopped"))
    }

    pub fn unsubscribe(&self, node: &str, id: SessionId) {
        let _ = self.cmds.send(HubCmd::Unsubscribe {
            node: node.to_string(),
            id,
        });
    }

    /// A node's link report.
    pub fn report(&self, node: &str, report: LinkReport) {
        let _ = self.cmds.send(HubCmd::Links {
            node: node.to_string(),
            report,
        });
    }

    /// The links and paths now; with `refresh`, after reloading the operator's
    /// overrides from the store and recomputing.
    pub async fn paths(&self, refresh: bool) -> Result<PathsSnapshot> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(HubCmd::Paths { refresh, reply })
            .map_err(|_| anyhow!("the netmap hub has stopped"))?;
        rx.await.map_err(|_| anyhow!("the netmap hub has stopped"))
    }

    /// Takes an authenticated session of `node` in: at most one per node (the
    /// older one is handed back to close), at most [`sessions::cap`] in all.
    fn admit_session(&self, node: &str, conn: quinn::Connection) -> Admission<quinn::Connection> {
        self.sessions
            .admit(node, conn, self.enrolled.load(Ordering::Relaxed))
    }

    /// Nodes enrolled, as the hub last saw the store.
    pub fn enrolled(&self) -> usize {
        self.enrolled.load(Ordering::Relaxed)
    }

    /// Authenticated control sessions open now, replaced ones still closing
    /// included.
    pub fn sessions_open(&self) -> usize {
        self.sessions.open()
    }

    /// Connected nodes, with the unix time their session started.
    pub fn online(&self) -> HashMap<String, u64> {
        self.online.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

struct HubState {
    registry: Arc<Registry>,
    mtu: u16,
    metrics: Arc<Metrics>,
    fabric: Fabric,
    engine: PathEngine,
    started: Instant,
    /// Paths have been pushed since the warm-up ended.
    warm: bool,
    revision: u64,
    sessions: HashMap<String, Subscriber>,
    pending: Vec<(
        String,
        mpsc::Sender<SessionMsg>,
        u64,
        oneshot::Sender<SessionId>,
    )>,
    next_id: u64,
    online: Arc<Mutex<HashMap<String, u64>>>,
    enrolled: Arc<AtomicUsize>,
}

impl HubState {
    async fn run(&mut self, mut cmds: mpsc::UnboundedReceiver<HubCmd>) -> Result<()> {
        let mut watch = self.resync().await?;
        // Overrides are loaded before the first command is served, so the API
        // shows them right after a restart.
        self.update_paths().await;
        let mut tick = tokio::time::interval(PATH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.update_paths().await,
                cmd = cmds.recv() => match cmd {
                    Some(HubCmd::Subscribe { node, tx, min_revision, reply }) => {
                        self.pending.push((node, tx, min_revision, reply));
                        self.serve_pending();
                    }
                    Some(HubCmd::Unsubscribe { node, id }) => {
                        if self.sessions.get(&node).is_some_and(|s| s.id == id) {
                            self.sessions.remove(&node);
                            self.set_online();
                        }
                    }
                    Some(HubCmd::Links { node, report }) => {
                        self.engine.report(&node, &report, Instant::now());
                    }
                    Some(HubCmd::Paths { refresh, reply }) => {
                        if refresh {
                            self.update_paths().await;
                        }
                        let now = Instant::now();
                        let _ = reply.send(PathsSnapshot {
                            links: self.engine.links(now),
                            pairs: self.engine.pairs(now),
                        });
                    }
                    None => return Ok(()),
                },
                ev = watch.recv() => match ev {
                    Some(ev) => {
                        self.handle_event(ev);
                        self.serve_pending();
                    }
                    None => {
                        tracing::warn!("store watch ended; reloading every node and resending full netmaps");
                        watch = self.resync().await?;
                        self.resend_full();
                        self.serve_pending();
                    }
                },
            }
        }
    }

    /// Loads every node record and watches from there.
    async fn resync(&mut self) -> Result<mpsc::Receiver<WatchEvent>> {
        loop {
            let (kvs, rev) = self.registry.store().range(model::NODES).await?;
            let nodes = kvs
                .iter()
                .filter_map(|kv| match model::decode::<NodeRecord>(&kv.key, &kv.value) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        tracing::error!(error = %e, "skipping an unreadable node record");
                        None
                    }
                })
                .collect::<Vec<_>>();
            match self.registry.store().watch(model::NODES, rev).await {
                Ok(w) => {
                    self.enrolled.store(nodes.len(), Ordering::Relaxed);
                    self.fabric = Fabric::new(self.mtu, nodes);
                    self.revision = rev;
                    return Ok(w);
                }
                Err(StoreError::Compacted { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn handle_event(&mut self, ev: WatchEvent) {
        let outputs = match ev {
            WatchEvent::Put(kv) => {
                self.revision = self.revision.max(kv.mod_revision);
                match model::decode::<NodeRecord>(&kv.key, &kv.value) {
                    Ok(node) => {
                        if !self.fabric.contains(&node.name) {
                            self.enrolled.fetch_add(1, Ordering::Relaxed);
                        }
                        self.fabric.handle_put(node, kv.mod_revision)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "ignoring an unreadable node record");
                        Vec::new()
                    }
                }
            }
            WatchEvent::Delete { key, revision } => {
                self.revision = self.revision.max(revision);
                let name = key.strip_prefix(model::NODES).unwrap_or(&key).to_string();
                if self.fabric.contains(&name) {
                    self.enrolled.fetch_sub(1, Ordering::Relaxed);
                }
                self.fabric.handle_delete(&name, revision)
            }
        };
        for out in outputs {
            match out {
                Output::Send(audience, msg) => {
                    let frame = match control::encode(&msg) {
                        Ok(f) => Arc::new(f),
                        Err(e) => {
                            tracing::error!(error = %e, "could not encode an update");
                            continue;
                        }
                    };
                    match audience {
                        Audience::AllBut(except) => {
                            let names: Vec<String> = self
                                .sessions
                                .keys()
                                .filter(|n| **n != except)
                                .cloned()
                                .collect();
                            for name in names {
                                self.deliver(&name, SessionMsg::Frame(frame.clone()));
                            }
                        }
                        Audience::Only(name) => self.deliver(&name, SessionMsg::Frame(frame)),
                    }
                }
                Output::Disconnect(name) => {
                    self.deliver(
                        &name,
                        SessionMsg::Close(
                            RefusalCode::InvalidCertificate,
                            format!("node {name:?} was revoked"),
                        ),
                    );
                    self.sessions.remove(&name);
                    self.set_online();
                }
            }
        }
    }

    /// Queues a message to a session, dropping the session if it cannot keep up.
    fn deliver(&mut self, name: &str, msg: SessionMsg) {
        let Some(s) = self.sessions.get(name) else {
            return;
        };
        match s.tx.try_send(msg) {
            Ok(()) => {
                self.metrics.updates_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                tracing::warn!(node = %name, "agent is not keeping up with netmap updates; dropping its session (it reconnects for a full netmap)");
                self.sessions.remove(name);
                self.set_online();
            }
        }
    }

    fn serve_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for (node, tx, min_rev, reply) in pending {
            if self.revision < min_rev || !self.fabric.contains(&node) {
                if self.revision < min_rev {
                    self.pending.push((node, tx, min_rev, reply));
                } else {
                    // Revoked between its register and now.
                    let _ = tx.try_send(SessionMsg::Close(
                        RefusalCode::InvalidCertificate,
                        format!("node {node:?} is not enrolled"),
                    ));
                    self.next_id += 1;
                    let _ = reply.send(SessionId(self.next_id));
                }
                continue;
            }
            self.next_id += 1;
            let id = SessionId(self.next_id);
            if let Some(full) = self
                .fabric
                .full(&node, self.revision, self.paths_for(&node))
            {
                if let Ok(frame) = control::encode(&ControllerMessage::NetMap(full)) {
                    let _ = tx.try_send(SessionMsg::Frame(Arc::new(frame)));
                }
            }
            self.sessions.insert(
                node,
                Subscriber {
                    id,
                    tx,
                    since: model::unix_now(),
                },
            );
            self.set_online();
            let _ = reply.send(id);
        }
    }

    fn resend_full(&mut self) {
        let names: Vec<String> = self.sessions.keys().cloned().collect();
        for name in names {
            if let Some(full) = self
                .fabric
                .full(&name, self.revision, self.paths_for(&name))
            {
                if let Ok(frame) = control::encode(&ControllerMessage::NetMap(full)) {
                    self.deliver(&name, SessionMsg::Frame(Arc::new(frame)));
                }
            }
        }
    }

    /// Reloads the operator's link overrides (the store is the truth, so every
    /// replica and a restarted controller agree), recomputes every pair's path
    /// and sends each connected node whose path list changed its new list.
    async fn update_paths(&mut self) {
        match self.registry.store().range(model::LINKS).await {
            Ok((kvs, _)) => {
                let mut wanted: BTreeMap<(String, String), LinkOverride> = BTreeMap::new();
                for kv in &kvs {
                    let Some((a, b)) = model::link_from_key(&kv.key) else {
                        continue;
                    };
                    match serde_json::from_slice::<LinkOverride>(&kv.value) {
                        Ok(o) => {
                            wanted.insert((a, b), o);
                        }
                        Err(e) => {
                            tracing::error!(key = %kv.key, error = %e, "ignoring an unreadable link override")
                        }
                    }
                }
                let stale: Vec<(String, String)> = self
                    .engine
                    .overrides()
                    .map(|(a, b, _)| (a.to_string(), b.to_string()))
                    .filter(|k| !wanted.contains_key(k))
                    .collect();
                for (a, b) in stale {
                    let _ = self.engine.set_override(&a, &b, None);
                }
                for ((a, b), o) in wanted {
                    if self.engine.override_for(&a, &b) != Some(&o) {
                        if let Err(e) = self.engine.set_override(&a, &b, Some(o)) {
                            tracing::error!(error = %e, "ignoring an invalid link override");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read link overrides; keeping the previous ones")
            }
        }
        self.engine.set_nodes(self.fabric.members());
        let changed = self.engine.recompute(Instant::now());
        let warm = self.started.elapsed() >= PATH_WARMUP;
        if !warm {
            return;
        }
        // The first push after the warm-up goes to everyone: netmaps sent during
        // it carried no paths.
        let changed = if std::mem::replace(&mut self.warm, true) {
            changed
        } else {
            self.sessions.keys().cloned().collect()
        };
        for name in changed {
            if !self.sessions.contains_key(&name) {
                continue;
            }
            let paths = self.engine.paths_for(&name);
            tracing::debug!(node = %name, ?paths, "sending new paths");
            let update = ControllerMessage::Update(NetMapUpdate {
                seq: self.revision,
                node: None,
                upsert: Vec::new(),
                remove: Vec::new(),
                paths: Some(paths),
                path_changes: Vec::new(),
            });
            match control::encode(&update) {
                Ok(frame) => self.deliver(&name, SessionMsg::Frame(Arc::new(frame))),
                Err(e) => tracing::error!(error = %e, "could not encode a path update"),
            }
        }
    }

    /// The paths for a full netmap: none during the warm-up (the agent keeps its own).
    fn paths_for(&self, node: &str) -> Vec<skymesh_wire::PathSpec> {
        if !self.warm {
            Vec::new()
        } else {
            self.engine.paths_for(node)
        }
    }

    fn set_online(&self) {
        if let Ok(mut m) = self.online.lock() {
            *m = self
                .sessions
                .iter()
                .map(|(n, s)| (n.clone(), s.since))
                .collect();
        }
    }
}

/// Binds the control endpoint.
pub fn bind(addr: SocketAddr, ca: &Ca) -> Result<quinn::Endpoint> {
    quinn::Endpoint::server(server_config(ca)?, addr)
        .with_context(|| format!("binding the control endpoint {addr} ([control] listen)"))
}
