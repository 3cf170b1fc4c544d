//! The control channel, agent side: enrollment with a join token, then a
//! long-lived mutual-TLS QUIC session that registers the node and receives its
//! netmap and updates.
//!
//! Enrollment trusts the controller only through the CA fingerprint pinned in
//! the token; afterwards the CA certificate kept in the state dir is the only
//! trust root. The identity (control key, certificate, CA, controller list) lives
//! in the state dir, the key with mode 0600.

use crate::config::bounded;
use crate::config::paths::{temp_name, STATE_FILES};
use crate::link_report::{LinkReporter, ReportMode};
use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use skymesh_wire::control::{
    self, AgentMessage, ControllerMessage, EnrollRequest, FrameBuffer, FullNetMap, NetMapUpdate,
    Refusal, RefusalCode, Register,
};
use skymesh_wire::{JoinToken, LinkReport};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;

const IDENTITY_FILE: &str = STATE_FILES[0];
const KEY_FILE: &str = STATE_FILES[1];
const CERT_FILE: &str = STATE_FILES[2];
const CA_FILE: &str = STATE_FILES[3];
const CACHE_FILE: &str = STATE_FILES[4];
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Backoff between reconnects: exponential from 250 ms to 30 s, with full jitter
/// so that agents cut off together do not come back together.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Who this agent is to the controller, as kept in the state dir.
#[derive(Clone)]
pub struct Identity {
    pub node: String,
    pub controllers: Vec<String>,
    pub ca_pem: String,
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node", &self.node)
            .field("controllers", &self.controllers)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    node: String,
    controllers: Vec<String>,
}

impl Identity {
    /// The identity in `dir`, `None` if this agent never enrolled.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(IDENTITY_FILE);
        let text = match bounded::read_file(&path, bounded::SECRET_LIMIT) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let file: IdentityFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; remove the state dir's controller files and join again",
                path.display()
            )
        })?;
        let read = |name: &str| {
            let p = dir.join(name);
            bounded::read_file(&p, bounded::SECRET_LIMIT)
                .with_context(|| format!("reading {}", p.display()))
        };
        Ok(Some(Self {
            node: file.node,
            controllers: file.controllers,
            ca_pem: read(CA_FILE)?,
            cert_pem: read(CERT_FILE)?,
            key_pem: read(KEY_FILE)?,
        }))
    }

    fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        refuse_foreign_enrollment_files(dir)?;
        write_private(&dir.join(KEY_FILE), self.key_pem.as_bytes())?;
        write_private(&dir.join(CERT_FILE), self.cert_pem.as_bytes())?;
        write_private(&dir.join(CA_FILE), self.ca_pem.as_bytes())?;
        let file = IdentityFile {
            node: self.node.clone(),
            controllers: self.controllers.clone(),
        };
        // The identity file last: its presence means the others are complete.
        write_private(
            &dir.join(IDENTITY_FILE),
            serde_json::to_string_pretty(&file)?.as_bytes(),
        )
    }
}

/// The enrollment files are the agent's own only when the identity file (written
/// last) exists and parses. Without it, a certificate or CA file already in the
/// state dir belongs to something else (state.dir = /etc/openvpn, say) and is not
/// replaced. (The control key is checked where it is made: an existing one is
/// reused only if it parses as a key.)
fn refuse_foreign_enrollment_files(dir: &Path) -> Result<()> {
    let identity = dir.join(IDENTITY_FILE);
    let own = bounded::read_file(&identity, bounded::SECRET_LIMIT)
        .ok()
        .is_some_and(|t| serde_json::from_str::<IdentityFile>(&t).is_ok());
    if own {
        return Ok(());
    }
    for name in [CERT_FILE, CA_FILE, IDENTITY_FILE] {
        let path = dir.join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            bail!(
                "[state] dir: {} exists but the agent did not write it (there is no complete enrollment in {}), so the agent will not replace it; set [state] dir to a directory of the agent's own (e.g. /var/lib/skymesh), or remove the file if it is a left-over of this agent",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Writes a file atomically (temp file + rename) with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = path.with_file_name(temp_name(&name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The controller's refusal of an enrollment or a session.
#[derive(Debug, thiserror::Error)]
#[error("the controller refused: {message}")]
pub struct Refused {
    pub code: RefusalCode,
    pub message: String,
}

impl Refused {
    /// Whether asking again, unchanged, gets the same answer: everything but a
    /// controller that is overloaded or cannot reach its store.
    pub fn is_permanent(&self) -> bool {
        !matches!(self.code, RefusalCode::Unavailable)
    }
}

/// Why an enrollment failed on the agent's side (the controller's own refusals
/// are [`Refused`]).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The controller's CA is not the one the join token pins: the token is for
    /// another controller, or the address reaches something else. Permanent.
    #[error(
        "the controller at {controller} presented a CA with SHA-256 fingerprint {presented}, \
         but the join token pins {expected}; check that the token was created by this \
         controller (`skymeshctl join-token create` on it) and that the token's controller \
         address reaches it"
    )]
    PinMismatch {
        controller: String,
        expected: String,
        /// The fingerprints of the CA certificates the controller sent, or "none".
        presented: String,
    },
    /// The controller speaks another protocol version. Permanent.
    #[error(
        "the controller at {controller} speaks another protocol version; install an agent \
         of the controller's release"
    )]
    Version {
        controller: String,
        source: control::FrameError,
    },
    /// The controller address can never be dialled (port 0, the unspecified,
    /// broadcast or a multicast address). Permanent. A host name that does not
    /// resolve is not this: DNS can come back, so that is [`EnrollError::Unreachable`].
    #[error("cannot enroll")]
    Undialable {
        #[from]
        source: skymesh_wire::TokenError,
    },
    /// No answer: the network, a timeout, a dropped connection. Transient.
    #[error("enrolling with {controller}")]
    Unreachable {
        controller: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl EnrollError {
    /// Whether retrying with the same token and controller list cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            EnrollError::PinMismatch { .. }
            | EnrollError::Version { .. }
            | EnrollError::Undialable { .. } => true,
            EnrollError::Unreachable { .. } => false,
        }
    }
}

/// Whether an error from [`enroll`] is permanent (a pin mismatch, a token refused
/// as invalid, expired or used, another protocol version): the join must stop and
/// say why. Everything else (the network, a timeout, an overloaded controller) is
/// worth retrying with back-off. Decided on the error's type, never its text.
pub fn is_permanent(e: &anyhow::Error) -> bool {
    if let Some(refused) = e.downcast_ref::<Refused>() {
        return refused.is_permanent();
    }
    e.downcast_ref::<EnrollError>()
        .is_some_and(EnrollError::is_permanent)
}

/// How long an enrollment may wait for the controller's answer once its request
/// is sent. A controller that answers later has still committed at most once: the
/// retry with the same token and key gets the same answer.
const ENROLL_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The control key for an enrollment: the one an earlier attempt left in the
/// state dir, so that a retry after a lost answer presents the same key (and the
/// controller answers it as before, instead of finding the token used); else a
/// new one, saved (mode 0600) before it is sent anywhere.
fn enrollment_key(state_dir: &Path) -> Result<rcgen::KeyPair> {
    let path = state_dir.join(KEY_FILE);
    match bounded::read_file(&path, bounded::SECRET_LIMIT) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem).with_context(|| {
            format!(
                "{} is not a usable control key; remove it and join again",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .context("generating the control key")?;
            std::fs::create_dir_all(state_dir)
                .with_context(|| format!("creating {}", state_dir.display()))?;
            write_private(&path, key.serialize_pem().as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Enrolls with `token` and saves the identity in `state_dir`: one attempt per
/// controller the token names. The error's type says whether to retry
/// ([`is_permanent`]): a [`Refused`] from the controller, an [`EnrollError`] of
/// the agent's own.
pub async fn enroll(token: &JoinToken, state_dir: &Path) -> Result<Identity> {
    let key = enrollment_key(state_dir)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .context("building the certificate request")?
        .pem()
        .context("encoding the certificate request")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut last_err = anyhow!("the token names no controller");
    for addr in &token.controllers {
        // A token that did not come through JoinToken::decode is checked here too.
        if let Err(e) = skymesh_wire::token::check_controller(addr) {
            last_err = EnrollError::from(e).into();
            continue;
        }
        let pinned = Arc::new(PinnedCa {
            pin: token.ca_sha256.clone(),
            provider: provider.clone(),
            mismatch: std::sync::Mutex::new(None),
        });
        let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(pinned.clone())
            .with_no_client_auth();
        let attempt = async {
            let (conn, mut send, mut recv) = open(addr, tls).await?;
            let req = AgentMessage::Enroll(EnrollRequest {
                token_id: token.id.clone(),
                secret: token.secret.clone(),
                csr_pem: csr.clone(),
            });
            send.write_all(&control::encode(&req)?).await?;
            send.finish()?;
            let mut frames = FrameBuffer::new();
            let reply =
                tokio::time::timeout(ENROLL_ANSWER_TIMEOUT, read_message(&mut recv, &mut frames))
                    .await
                    .map_err(|_| anyhow!("no answer within {ENROLL_ANSWER_TIMEOUT:?}"))??
                    .ok_or_else(|| anyhow!("the controller closed the stream without an answer"))?;
            conn.close(0u8.into(), b"done");
            Ok::<_, anyhow::Error>(reply)
        };
        match attempt.await {
            Ok(ControllerMessage::Enrolled(e)) => {
                let identity = Identity {
                    node: e.node,
                    controllers: token.controllers.clone(),
                    ca_pem: e.ca_pem,
                    cert_pem: e.certificate_pem,
                    key_pem: key.serialize_pem(),
                };
                identity.save(state_dir)?;
                tracing::info!(node = %identity.node, "enrolled with the controller");
                return Ok(identity);
            }
            Ok(ControllerMessage::Refused(Refusal { code, message })) => {
                return Err(Refused { code, message }.into());
            }
            Ok(other) => last_err = anyhow!("unexpected answer to enroll: {other:?}"),
            Err(e) => {
                let mismatch = pinned.mismatch.lock().ok().and_then(|mut m| m.take());
                let err = match (mismatch, e.downcast::<control::FrameError>()) {
                    (Some(presented), _) => EnrollError::PinMismatch {
                        controller: addr.clone(),
                        expected: token.ca_sha256.clone(),
                        presented,
                    },
                    (None, Ok(source @ control::FrameError::Version(_))) => EnrollError::Version {
                        controller: addr.clone(),
                        source,
                    },
                    (None, Ok(other)) => EnrollError::Unreachable {
                        controller: addr.clone(),
                        source: other.into(),
                    },
                    (None, Err(e)) => EnrollError::Unreachable {
                        controller: addr.clone(),
                        source: e.into(),
                    },
                };
                // A wrong pin or version is final for this controller, not for
                // the next one the token names.
                last_err = err.into();
            }
        }
    }
    Err(last_err)
}

/// What the session reports to the daemon.
#[derive(Debug)]
pub enum ControlEvent {
    Connected { controller: String },
    NetMap(Box<FullNetMap>),
    Update(NetMapUpdate),
    Disconnected { reason: String },
}

/// Keeps a session to one of the controllers up for as long as the process runs,
/// reconnecting with jittered exponential backoff. Returns only on a refusal that
/// retrying cannot fix (a revoked certificate).
pub async fn run_session(
    identity: Identity,
    register: Register,
    events: mpsc::Sender<ControlEvent>,
) -> Result<()> {
    run_session_reporting(identity, register, events, None).await
}

/// Produces the agent's link measurements, asked every [`REPORT_INTERVAL`]. A
/// report may leave out links that have not changed since the previous one:
/// they keep their last sample. What reaches the controller is decided by a
/// [`LinkReporter`]: a full report when a session opens, then only material
/// changes (or the whole report every time, for an agent registering without
/// [`control::CAPABILITY`]).
pub type ReportSource = Arc<dyn Fn() -> LinkReport + Send + Sync>;

/// How often a connected agent reports its link measurements.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// [`run_session`], also reporting the links `reports` measures while connected.
/// One [`LinkReporter`] serves every session, so the samples known survive a
/// reconnect; each session starts with a full report.
pub async fn run_session_reporting(
    identity: Identity,
    register: Register,
    events: mpsc::Sender<ControlEvent>,
    reports: Option<ReportSource>,
) -> Result<()> {
    let tls = mtls_config(&identity)?;
    let reporting = reports.map(|source| Reporting {
        source,
        reporter: Arc::new(Mutex::new(LinkReporter::new(ReportMode::for_capability(
            register.capability,
        )))),
    });
    let mut backoff = BACKOFF_MIN;
    let mut attempt = 0usize;
    loop {
        let addr = &identity.controllers[attempt % identity.controllers.len()];
        attempt += 1;
        match session(
            addr,
            tls.clone(),
            &register,
            &events,
            &mut backoff,
            reporting.as_ref(),
        )
        .await
        {
            Ok(()) => {}
            Err(e) => {
                if let Some(r) = e.downcast_ref::<Refused>() {
                    if matches!(
                        r.code,
                        RefusalCode::InvalidCertificate | RefusalCode::Version
                    ) {
                        let _ = events
                            .send(ControlEvent::Disconnected {
                                reason: r.message.clone(),
                            })
                            .await;
                        return Err(e);
                    }
                }
                let reason = format!("{e:#}");
                tracing::warn!(controller = %addr, error = %reason, "control session failed");
                if events
                    .send(ControlEvent::Disconnected { reason })
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
        }
        let wait = jitter(backoff);
        tracing::debug!(?wait, "reconnecting to the controller after backoff");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A link source and the reporter that decides what of it each session sends.
struct Reporting {
    source: ReportSource,
    /// Shared by the session's reader (which tells it the netmaps) and its
    /// report task; held only for short, non-blocking calls.
    reporter: Arc<Mutex<LinkReporter>>,
}

fn lock(reporter: &Mutex<LinkReporter>) -> MutexGuard<'_, LinkReporter> {
    // The reporter's state is consistent between calls; a panic elsewhere
    // while holding the lock leaves nothing half-done.
    reporter.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A random duration in [d/2, d]: jittered, but never a hot loop.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + Duration::from_nanos(rand::random::<u64>() % (half.as_nanos().max(1) as u64))
}

async fn session(
    addr: &str,
    tls: rustls::ClientConfig,
    register: &Register,
    events: &mpsc::Sender<ControlEvent>,
    backoff: &mut Duration,
    reporting: Option<&Reporting>,
) -> Result<()> {
    let (conn, mut send, mut recv) = open(addr, tls).await?;
    send.write_all(&control::encode(&AgentMessage::Register(register.clone()))?)
        .await?;
    // Reports go out on their own task, so a slow read never delays them; it
    // ends with the session (the guard aborts it).
    let mut _idle_send = None;
    let _reporter = match reporting {
        None => {
            // Kept open: finishing the stream would end the session.
            _idle_send = Some(send);
            None
        }
        Some(Reporting { source, reporter }) => {
            lock(reporter).session_started();
            let (source, reporter) = (source.clone(), reporter.clone());
            Some(AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(REPORT_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    let now = tick.tick().await.into_std();
                    // The source is asked outside the lock: it may take the node's.
                    let report = source();
                    let msg = {
                        let mut reporter = lock(&reporter);
                        reporter.observe(report);
                        reporter.next_message(now)
                    };
                    let Some(msg) = msg else {
                        continue;
                    };
                    let frame = match control::encode(&msg) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot encode the link report");
                            continue;
                        }
                    };
                    if send.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            })))
        }
    };
    let mut frames = FrameBuffer::new();
    let mut connected = false;
    loop {
        let msg = match read_message(&mut recv, &mut frames).await {
            Ok(Some(m)) => m,
            Ok(None) => bail!("the controller closed the session"),
            Err(e) => {
                return Err(match conn.close_reason() {
                    Some(reason) => anyhow!("{reason}"),
                    None => e,
                })
            }
        };
        // The reporter learns of departed peers before the daemon applies the
        // change, so a report taken meanwhile cannot bring their links back.
        let event = match msg {
            ControllerMessage::NetMap(full) => {
                if let Some(r) = reporting {
                    lock(&r.reporter).handle_netmap(&full.netmap);
                }
                ControlEvent::NetMap(Box::new(full))
            }
            ControllerMessage::Update(u) => {
                if let Some(r) = reporting {
                    lock(&r.reporter).handle_update(&u);
                }
                ControlEvent::Update(u)
            }
            ControllerMessage::Refused(Refusal { code, message }) => {
                return Err(Refused { code, message }.into());
            }
            ControllerMessage::Enrolled(_) => bail!("unexpected enrolled message in a session"),
        };
        if !connected {
            connected = true;
            *backoff = BACKOFF_MIN;
            tracing::info!(controller = %addr, "connected to the controller");
            let _ = events
                .send(ControlEvent::Connected {
                    controller: addr.to_string(),
                })
                .await;
        }
        if events.send(event).await.is_err() {
            return Ok(());
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn open(
    addr: &str,
    tls: rustls::ClientConfig,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let target = resolve(addr)?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mut tls = tls;
    tls.alpn_protocols = vec![control::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("QUIC TLS configuration")?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(2)));
    transport.max_idle_timeout(Some(Duration::from_secs(8).try_into()?));
    cfg.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(bind).context("opening a QUIC socket")?;
    endpoint.set_default_client_config(cfg);
    let conn = tokio::time::timeout(
        CONNECT_TIMEOUT,
        endpoint
            .connect(target, control::SERVER_NAME)
            .context("starting the QUIC connection")?,
    )
    .await
    .map_err(|_| anyhow!("no answer from {addr} within {CONNECT_TIMEOUT:?}"))?
    .with_context(|| format!("connecting to {addr}"))?;
    let (send, recv) = conn.open_bi().await?;
    Ok((conn, send, recv))
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

async fn read_message(
    recv: &mut quinn::RecvStream,
    frames: &mut FrameBuffer,
) -> Result<Option<ControllerMessage>> {
    loop {
        if let Some(msg) = frames.next_message_with(control::decode_controller)? {
            return Ok(Some(msg));
        }
        // quinn's own buffer, in order; at most a chunk past the frame.
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => frames.extend(&chunk.bytes),
            None => return Ok(None),
        }
    }
}

fn mtls_config(identity: &Identity) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(pem_cert(&identity.ca_pem)?)
        .context("the saved CA certificate is not usable")?;
    let key = rcgen::KeyPair::from_pem(&identity.key_pem).context("the saved control key")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![pem_cert(&identity.cert_pem)?], key)
        .context("the saved client certificate")
}

fn pem_cert(pem: &str) -> Result<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow!("not a PEM certificate: {e}"))
}

/// Accepts the controller's chain only if it contains the pinned CA and the leaf
/// is valid for [`control::SERVER_NAME`] under that CA.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// Set when the pin did not match: the fingerprints the controller presented,
    /// for [`EnrollError::PinMismatch`] (the TLS error itself carries only text).
    mismatch: std::sync::Mutex<Option<String>>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| fingerprint(c) == self.pin) else {
            let presented: Vec<String> = intermediates.iter().map(|c| fingerprint(c)).collect();
            let presented = if presented.is_empty() {
                "none".to_string()
            } else {
                presented.join(", ")
            };
            if let Ok(mut slot) = self.mismatch.lock() {
                *slot = Some(presented);
            }
            return Err(rustls::Error::General(
                "the controller's CA does not match the fingerprint in the join token".into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where the agent caches its last netmap (mode 0600), to keep forwarding and
/// restart while the controller is unreachable.
pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CACHE_FILE)
}

/// Replaces the cached netmap, but only a file the agent can show is its own: none
/// yet, or one that parses as a cached netmap. Anything else (another program's
/// `netmap.json`, or a damaged cache) is refused and kept as it is, never
/// deleted or moved: the operator decides what it is.
pub fn save_cache(state_dir: &Path, full: &FullNetMap) -> Result<()> {
    let path = cache_path(state_dir);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", path.display())),
        Ok(meta) => {
            let own = meta.is_file()
                && bounded::read_file(&path, bounded::CACHE_LIMIT)
                    .ok()
                    .is_some_and(|t| serde_json::from_str::<FullNetMap>(&t).is_ok());
            if !own {
                bail!(
                    "[state] dir: {} is not a netmap cache of this agent (another program's file, or a damaged cache), so the agent will not replace it; set [state] dir to a directory of the agent's own (e.g. /var/lib/skymesh), or move the file away if it is a damaged cache",
                    path.display()
                );
            }
        }
    }
    write_private(&path, &serde_json::to_vec(full)?)
}

pub fn load_cache(state_dir: &Path) -> Result<Option<FullNetMap>> {
    let path = cache_path(state_dir);
    match bounded::read_file(&path, bounded::CACHE_LIMIT) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a netmap cache of this agent; the agent will not use or replace it (move it away if it is a damaged cache, or set [state] dir to a directory of the agent's own)",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: RefusalCode) -> anyhow::Error {
        Refused {
            code,
            message: "m".into(),
        }
        .into()
    }

    #[test]
    fn join_errors_are_permanent_or_transient_by_type() {
        for code in [
            RefusalCode::InvalidToken,
            RefusalCode::InvalidCertificate,
            RefusalCode::Protocol,
            RefusalCode::Version,
            RefusalCode::NameTaken,
        ] {
            assert!(is_permanent(&refused(code)), "{code:?}");
        }
        assert!(!is_permanent(&refused(RefusalCode::Unavailable)));
        let pin = EnrollError::PinMismatch {
            controller: "192.0.2.1:7443".into(),
            expected: "ab".repeat(32),
            presented: "cd".repeat(32),
        };
        assert!(pin.to_string().contains(&"ab".repeat(32)));
        assert!(pin.to_string().contains(&"cd".repeat(32)));
        assert!(is_permanent(&pin.into()));
        let version = EnrollError::Version {
            controller: "192.0.2.1:7443".into(),
            source: control::FrameError::Version(2),
        };
        assert!(is_permanent(&version.into()));
        let unreachable = EnrollError::Unreachable {
            controller: "192.0.2.1:7443".into(),
            source: "timed out".into(),
        };
        assert!(!is_permanent(&unreachable.into()));
        let undialable = EnrollError::from(
            skymesh_wire::token::check_controller("0.0.0.0:0").expect_err("refused"),
        );
        assert!(format!("{:#}", anyhow::Error::from(undialable)).contains("0.0.0.0:0"));
        // Context added on the way up does not change the kind.
        let wrapped = anyhow::Error::from(EnrollError::PinMismatch {
            controller: "c".into(),
            expected: "e".into(),
            presented: "p".into(),
        })
        .context("joining");
        assert!(is_permanent(&wrapped));
        // An error of no known kind is retried.
        assert!(!is_permanent(&anyhow!("something else")));
    }

    /// Issue 14.4 re-review: a controller address no agent can dial ends the join
    /// at once instead of being retried for ever.
    #[tokio::test]
    async fn an_undialable_controller_is_a_permanent_join_error() {
        let dir = std::env::temp_dir().join(format!(
            "skymesh-undialable-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        for bad in ["0.0.0.0:0", "255.255.255.255:1", "224.0.0.1:7443"] {
            let token = JoinToken {
                controllers: vec![bad.into()],
                ca_sha256: "ab".repeat(32),
                id: "t-1".into(),
                secret: "s".into(),
            };
            let err = enroll(&token, &dir).await.expect_err("enrolled");
            assert!(is_permanent(&err), "{bad}: {err:#}");
            assert!(format!("{err:#}").contains(bad), "{err:#}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn scratch(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "skymesh-{what}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn full_netmap(seq: u64) -> FullNetMap {
        serde_json::from_value(serde_json::json!({
            "seq": seq,
            "node": {"name": "a", "overlay_ip": "100.96.0.1", "prefixes": [], "rejected_prefixes": []},
            "netmap": {"version": skymesh_wire::PROTOCOL_VERSION, "address": "100.96.0.1/32", "mtu": 1420, "peers": []},
        }))
        .expect("a cached netmap")
    }

    /// Issue 14.2 re-review: a `netmap.json` the agent cannot show is its own
    /// (another program's, or damaged) is refused and kept; its own is replaced.
    #[test]
    fn the_netmap_cache_replaces_only_its_own_file() {
        let dir = scratch("cache-own");
        let path = cache_path(&dir);
        save_cache(&dir, &full_netmap(1)).expect("absent: written");
        save_cache(&dir, &full_netmap(2)).expect("own: replaced");
        assert_eq!(load_cache(&dir).expect("load").expect("cached").seq, 2);
        for foreign in ["{\"openvpn\": true}\n", "{\"seq\": 3, \"node\""] {
            std::fs::write(&path, foreign).expect("foreign file");
            let err = save_cache(&dir, &full_netmap(4)).expect_err("replaced a foreign file");
            assert!(
                format!("{err:#}").contains(&path.display().to_string()),
                "{err:#}"
            );
            assert!(format!("{err:#}").contains("[state] dir"), "{err:#}");
            assert_eq!(std::fs::read_to_string(&path).expect("kept"), foreign);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 14.2 re-review: enrollment never replaces a `ca.crt` or
    /// `control.crt` that no complete enrollment of this agent wrote.
    #[test]
    fn enrollment_never_replaces_foreign_files_in_the_state_dir() {
        let identity = |dir: &Path| Identity {
            node: "a".into(),
            controllers: vec!["192.0.2.1:7443".into()],
            ca_pem: "ca".into(),
            cert_pem: "cert".into(),
            key_pem: enrollment_key(dir).expect("key").serialize_pem(),
        };
        for name in [CA_FILE, CERT_FILE, IDENTITY_FILE] {
            let dir = scratch("enroll-foreign");
            let path = dir.join(name);
            std::fs::write(&path, "someone else's\n").expect("foreign file");
            let err = identity(&dir)
                .save(&dir)
                .expect_err("replaced a foreign file");
            assert!(
                format!("{err:#}").contains(&path.display().to_string()),
                "{err:#}"
            );
            assert_eq!(
                std::fs::read_to_string(&path).expect("kept"),
                "someone else's\n"
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
        // An empty dir, and a complete enrollment of its own, are written.
        let dir = scratch("enroll-own");
        identity(&dir).save(&dir).expect("empty dir");
        identity(&dir).save(&dir).expect("own files");
        assert_eq!(
            Identity::load(&dir).expect("load").expect("enrolled").node,
            "a"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 14.5 re-review: the state files are read with a cap too.
    #[test]
    fn oversized_state_files_are_refused_naming_the_limit() {
        let dir = scratch("state-oversized");
        let big = vec![b' '; bounded::SECRET_LIMIT as usize + 1];
        std::fs::write(dir.join(IDENTITY_FILE), &big).expect("identity");
        let err = Identity::load(&dir).expect_err("read an oversized identity");
        assert!(
            format!("{err:#}").contains("limit of 65536 bytes"),
            "{err:#}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_enrollment_reuses_the_key_an_earlier_attempt_saved() {
        let dir = std::env::temp_dir().join(format!(
            "skymesh-enrollment-key-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let first = enrollment_key(&dir).expect("new key");
        let again = enrollment_key(&dir).expect("saved key");
        assert_eq!(first.serialize_pem(), again.serialize_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(mode & 0o777, 0o600);
    }
}
