//! The QUIC endpoint and one task per agent connection: the handshake and
//! the authentication under [`PRE_AUTH`], enrollment, then a session that
//! writes what the hub queues in the agent's outbox and hands its link reports
//! to the hub. See the module docs of [`crate::control`].

use crate::listen;
use crate::metrics::Metrics;
use crate::pki::{self, Ca};
use crate::registry::{Registry, RegistryError};
use crate::store::records::{self, NodeRecord};
use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::CertificateDer;
use skymesh_wire::control::{
    self, AgentMessage, ControllerMessage, EnrollRequest, Enrolled, FrameBuffer, Refusal,
    RefusalCode,
};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::hub::{Hub, Render};
use super::outbox::Outbox;
use super::sessions::Admission;

/// How long a write to an agent may make no progress before the session ends:
/// an agent that is still reading, however slowly, is never dropped (what
/// waits for it merges in its outbox), but one that reads nothing for this
/// long is gone.
const WRITE_STALL: Duration = Duration::from_secs(60);
/// The least time between two writes to one agent. A change after a quiet
/// spell goes out at once; a burst (a mesh starting, many paths moving) is
/// merged into one update per agent this often instead of one per change,
/// which is what a packet costs the controller.
const WRITE_PACE: Duration = Duration::from_millis(50);
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
/// Bytes sent to one agent and not acknowledged yet.
const SEND_WINDOW: u64 = 256 << 10;
/// Writes of large frames (whole netmaps, big merged updates) in progress at
/// once across all agents: each holds its frame until the agent has taken most
/// of it, so this bounds their memory when thousands of agents start together.
const LARGE_WRITES: usize = 32;
/// What counts as a large frame.
const LARGE_FRAME: usize = 16 << 10;
/// Connection attempts quinn holds before the accept loop takes them, and the
/// bytes it buffers for each and for all of them.
const MAX_INCOMING: usize = 512;
const INCOMING_BUFFER: u64 = 64 << 10;
const INCOMING_BUFFER_TOTAL: u64 = 4 << 20;

/// Everything a connection handler needs.
pub struct Control {
    pub registry: Arc<Registry>,
    pub ca: Arc<Ca>,
    pub hub: Hub,
    pub metrics: Arc<Metrics>,
    /// Connections that have not authenticated yet, under [`PRE_AUTH`].
    pub pre_auth: Arc<listen::Guard>,
    /// Large writes to agents in progress at once (32).
    pub large_writes: Arc<tokio::sync::Semaphore>,
}

/// A fresh [`Control::large_writes`].
pub fn large_writes() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(LARGE_WRITES))
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
    // What waits for an agent's acknowledgement is bounded here, not by the
    // agent's credit; the rest waits, merged, in its outbox.
    transport.send_window(SEND_WINDOW);
    // With segmentation offload each connection keeps a transmit buffer of
    // ten datagrams (~24 KB) for its whole life: 24 MB at 1,000 agents, for
    // batching that only the rare whole netmap needs.
    transport.enable_segmentation_offload(false);
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
        .register(&node.name, &reg, remote, records::unix_now())
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
    let outbox = Arc::new(Outbox::new(reg.capability));
    let session = ctx
        .hub
        .subscribe(&registered.name, outbox.clone(), revision)
        .await?;
    tracing::info!(node = %registered.name, %remote, capability = reg.capability, "agent connected");
    ctx.metrics.agents_connected.fetch_add(1, Ordering::Relaxed);
    let end = {
        let writer = write_loop(&outbox, &mut send, ctx, &registered.name);
        let reader = read_loop(&mut recv, &mut frames, ctx, &registered.name);
        tokio::select! {
            end = writer => end,
            end = reader => end,
        }
    };
    let result = match end {
        End::Closed => Ok(()),
        End::Failed(e) => Err(e),
        End::Refuse(code, message) => refuse(&conn, &mut send, code, message).await,
    };
    ctx.metrics.agents_connected.fetch_sub(1, Ordering::Relaxed);
    ctx.hub.unsubscribe(&registered.name, session);
    tracing::info!(node = %registered.name, "agent disconnected");
    if let Err(e) = ctx
        .registry
        .touch(&registered.name, records::unix_now())
        .await
    {
        tracing::debug!(error = %e, "could not record last_seen");
    }
    result
}

/// How a session ended.
enum End {
    /// The agent ended it.
    Closed,
    /// Refuse with this, then close.
    Refuse(RefusalCode, String),
    Failed(anyhow::Error),
}

/// Sends what gathers in the session's outbox whenever the agent can take it:
/// the whole netmap or path list (rendered by the hub at that moment), then the
/// merged changes.
async fn write_loop(
    outbox: &Outbox,
    send: &mut quinn::SendStream,
    ctx: &Control,
    node: &str,
) -> End {
    let mut next_write = tokio::time::Instant::now();
    loop {
        outbox.ready().await;
        tokio::time::sleep_until(next_write).await;
        let pending = outbox.take();
        // A whole netmap is rendered only once a large write may start.
        let large = if pending.full || pending.whole_paths || pending.peers.len() > 32 {
            match ctx.large_writes.clone().acquire_owned().await {
                Ok(permit) => Some(permit),
                Err(_) => return End::Closed,
            }
        } else {
            None
        };
        let pending = pending.merge(outbox.take());
        if let Some((code, message)) = pending.close {
            return End::Refuse(code, message);
        }
        let mut frames = Vec::with_capacity(3);
        if pending.full {
            match ctx.hub.render(node, Render::NetMap).await {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {
                    return End::Refuse(
                        RefusalCode::InvalidCertificate,
                        format!("node {node:?} is not enrolled"),
                    )
                }
                Err(e) => return End::Failed(e),
            }
        }
        if pending.has_update() {
            match pending.update_frame() {
                Ok(f) => frames.push(f),
                Err(e) => tracing::error!(node, error = %e, "could not encode an update"),
            }
        }
        if pending.whole_paths {
            match ctx.hub.render(node, Render::Paths).await {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {}
                Err(e) => return End::Failed(e),
            }
        }
        let mut large = large;
        for frame in frames {
            if large.is_none() && frame.len() > LARGE_FRAME {
                large = ctx.large_writes.clone().acquire_owned().await.ok();
            }
            let len = frame.len() as u64;
            if let Err(e) = write_frame(send, frame).await {
                return End::Failed(e);
            }
            ctx.metrics.updates_sent.fetch_add(1, Ordering::Relaxed);
            ctx.metrics
                .netmap_bytes_sent
                .fetch_add(len, Ordering::Relaxed);
        }
        drop(large);
        next_write = tokio::time::Instant::now() + WRITE_PACE;
    }
}

/// Writes a whole frame, failing only when the agent took nothing for
/// [`WRITE_STALL`].
/// The frame is handed over, not copied: quinn keeps it until the agent
/// acknowledges it, and a whole netmap is not held twice meanwhile.
async fn write_frame(send: &mut quinn::SendStream, frame: Vec<u8>) -> Result<()> {
    let mut chunks = [Bytes::from(frame)];
    let mut chunks = &mut chunks[..];
    while !chunks.is_empty() {
        match tokio::time::timeout(WRITE_STALL, send.write_chunks(chunks)).await {
            Ok(Ok(written)) => chunks = &mut chunks[written.chunks..],
            Ok(Err(e)) => return Err(anyhow!("writing to the agent: {e}")),
            Err(_) => {
                return Err(anyhow!(
                    "the agent read nothing for {} s; ending its session",
                    WRITE_STALL.as_secs()
                ))
            }
        }
    }
    Ok(())
}

/// Takes the agent's link reports until it ends the session or breaks the
/// protocol.
async fn read_loop(
    recv: &mut quinn::RecvStream,
    frames: &mut FrameBuffer,
    ctx: &Control,
    node: &str,
) -> End {
    loop {
        frames.set_limit(
            control::max_links_frame(ctx.hub.enrolled()),
            "a link report for the enrolled nodes",
        );
        match read_message(recv, frames).await {
            Err(e) => return End::Refuse(refusal_code(&e), format!("{e:#}")),
            Ok(None) => return End::Closed,
            Ok(Some(AgentMessage::Links(report))) => ctx.hub.report(node, true, report.links).await,
            Ok(Some(AgentMessage::LinkChanges(c))) => ctx.hub.report(node, false, c.changed).await,
            Ok(Some(other)) => {
                return End::Refuse(
                    RefusalCode::Protocol,
                    format!("unexpected {} after register", describe(&Some(other))),
                )
            }
        }
    }
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
            records::unix_now(),
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
    send_refusal(send, code, &message).await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(1u8.into(), b"refused");
    Err(anyhow!("refused ({code:?}): {message}"))
}

/// Writes the refusal and finishes the stream; the peer may be gone already,
/// so only an encoding failure is an error.
async fn send_refusal(
    send: &mut quinn::SendStream,
    code: RefusalCode,
    message: &str,
) -> Result<()> {
    let frame = control::encode(&ControllerMessage::Refused(Refusal {
        code,
        message: message.to_string(),
    }))?;
    let _ = send.write_all(&frame).await;
    let _ = send.finish();
    Ok(())
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
    send_refusal(send, code, &message).await?;
    let _ = tokio::time::timeout_at(deadline, async {
        let mut left = rest;
        while left > 0 {
            match recv.read_chunk(left.min(16 * 1024), true).await {
                Ok(Some(chunk)) => left = left.saturating_sub(chunk.bytes.len()),
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

/// Reads the next message; `Ok(None)` at the end of the stream. Takes the
/// stream's own buffers rather than copying through one of its own, so a
/// session waiting for its agent holds no read buffer.
async fn read_message(
    recv: &mut quinn::RecvStream,
    frames: &mut FrameBuffer,
) -> Result<Option<AgentMessage>> {
    loop {
        if let Some(msg) = frames.next_message_with(control::decode_agent)? {
            return Ok(Some(msg));
        }
        match recv.read_chunk(16 * 1024, true).await? {
            Some(chunk) => frames.extend(&chunk.bytes),
            None => return Ok(None),
        }
    }
}

/// The control socket's receive buffer. Every agent's packets (ACKs of
/// netmaps, link reports, handshakes) land in this one socket; with the
/// default (~208 KiB, about 90 datagrams) a cold start of 1,000 agents
/// overflowed it 17–18 thousand times (3.5% of datagrams, measured), and lost
/// handshakes made agents time out and reconnect.
const RECV_BUFFER: usize = 4 << 20;

/// Binds the control endpoint, with a 4 MiB receive buffer (or as
/// much as `net.core.rmem_max` allows, with a warning).
pub fn bind(addr: SocketAddr, ca: &Ca) -> Result<quinn::Endpoint> {
    let context = || format!("binding the control endpoint {addr} ([control] listen)");
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .with_context(context)?;
    if socket.set_recv_buffer_size(RECV_BUFFER).is_ok() {
        // Linux reports twice what it grants (the other half is bookkeeping).
        let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
        if granted < RECV_BUFFER {
            tracing::warn!(
                granted,
                wanted = RECV_BUFFER,
                "the control socket's receive buffer is smaller than wanted; with many agents, \
                 packets may be dropped: raise net.core.rmem_max to at least {RECV_BUFFER}"
            );
        }
    }
    socket.bind(&addr.into()).with_context(context)?;
    let runtime = quinn::default_runtime().context("no async runtime for the control endpoint")?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config(ca)?),
        socket.into(),
        runtime,
    )
    .with_context(context)
}
