//! Connections to upstreams. Each upstream gets a connection pool per gateway
//! shard (TLS with rustls, HTTP/1.1 or h2 by ALPN) over a connector that checks every
//! address it is about to dial: a fabric upstream only inside the VPC prefixes
//! of its site (so the connection rides the mesh), a public one anywhere but
//! link-local (the cloud metadata service) and unspecified or multicast
//! addresses. Requests never pick the address: it comes from `base_url` alone.

use super::config::UpstreamConfig;
use super::{lock, BoxError};
use anyhow::{Context, Result};
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ipnet::IpNet;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tower_service::Service;

/// What the gateway knows of the fabric, refreshed from the registry and the
/// path engine every few seconds.
#[derive(Debug, Default, Clone)]
pub struct FabricSnapshot {
    /// Site → prefixes the mesh routes to its nodes (accepted VPC prefixes and
    /// overlay addresses).
    pub site_prefixes: HashMap<String, Vec<IpNet>>,
    /// Site → RTT of the current path from this host's node, when measured.
    pub site_rtt: HashMap<String, Duration>,
}

/// The gateway's view of the fabric: the latest [`FabricSnapshot`], shared by
/// the connectors and the proxy (the control plane's own fabric, the netmaps,
/// is [`crate::fabric::Fabric`]).
#[derive(Debug, Default)]
pub struct FabricView(RwLock<Arc<FabricSnapshot>>);

impl FabricView {
    pub fn get(&self) -> Arc<FabricSnapshot> {
        self.0.read().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn set(&self, view: FabricSnapshot) {
        if let Ok(mut v) = self.0.write() {
            *v = Arc::new(view);
        }
    }
}

/// Addresses no upstream may be reached at, whatever the config says.
fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) if v4.is_link_local() => {
            Some("link-local (169.254.0.0/16 holds the cloud metadata service)")
        }
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
            Some("unspecified, broadcast or multicast")
        }
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("link-local (fe80::/10)"),
        IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => {
            Some("unspecified or multicast")
        }
        IpAddr::V6(v6) => v6.to_ipv4_mapped().and_then(|v4| forbidden(IpAddr::V4(v4))),
        _ => None,
    }
}

/// Dials an upstream, refusing addresses outside what its config allows.
/// The client clones it for every request, so it is one `Arc`.
#[derive(Clone)]
pub struct GuardedConnector(Arc<Guard>);

struct Guard {
    upstream: String,
    /// `None` for a public upstream.
    site: Option<String>,
    fabric: Arc<FabricView>,
    connect_timeout: Duration,
}

impl GuardedConnector {
    /// Whether the upstream may be dialled at `ip`; the error says why not.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        self.0.check(ip)
    }
}

impl Guard {
    fn check(&self, ip: IpAddr) -> Result<(), String> {
        if let Some(why) = forbidden(ip) {
            return Err(format!(
                "upstream {}: refusing to connect to {ip}: {why}",
                self.upstream
            ));
        }
        let Some(site) = &self.site else {
            return Ok(());
        };
        let view = self.fabric.get();
        let prefixes = view.site_prefixes.get(site);
        if prefixes.is_some_and(|p| p.iter().any(|n| n.contains(&ip))) {
            return Ok(());
        }
        Err(format!(
            "upstream {}: {ip} is not on the fabric: site {site} routes {}; fix base_url, or set public = true for an upstream outside the fabric",
            self.upstream,
            match prefixes {
                Some(p) if !p.is_empty() => p.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "),
                _ => "nothing (is its node enrolled and its VPC prefix accepted?)".to_string(),
            }
        ))
    }
}

impl Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other("no host in the upstream URL"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, port)],
                Err(_) => tokio::net::lookup_host((host.as_str(), port))
                    .await?
                    .collect(),
            };
            let mut refused = None;
            for addr in addrs {
                if let Err(why) = this.check(addr.ip()) {
                    refused = Some(why);
                    continue;
                }
                let stream = tokio::time::timeout(this.0.connect_timeout, TcpStream::connect(addr))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "connect to {addr} timed out after {:?}",
                                this.0.connect_timeout
                            ),
                        )
                    })??;
                let _ = stream.set_nodelay(true);
                return Ok(TokioIo::new(stream));
            }
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                refused.unwrap_or_else(|| format!("{host}: no address")),
            ))
        })
    }
}

pub type HttpsConnector = hyper_rustls::HttpsConnector<GuardedConnector>;
type Stream = hyper_rustls::MaybeHttpsStream<TokioIo<TcpStream>>;
type H1 = http1::SendRequest<Full<Bytes>>;
type H2 = http2::SendRequest<Full<Bytes>>;

/// Idle HTTP/1.1 connections a pool keeps at most; more are closed.
const MAX_IDLE: usize = 256;
/// An idle connection older than this is closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The connections of one upstream on one gateway shard: idle HTTP/1.1
/// connections (most recently used first) and at most one HTTP/2 connection,
/// which every request of the shard shares. A shard is one thread, so the
/// locks here are never contended; each connection's task runs on the shard
/// that opened it.
pub struct Pool(Arc<PoolInner>);

struct PoolInner {
    connector: HttpsConnector,
    /// `scheme://authority` of the upstream's base URL: where to connect, and
    /// the absolute form HTTP/2 requests take.
    origin: Uri,
    /// The `Host` of HTTP/1.1 requests: the authority without a default port.
    host: HeaderValue,
    idle: Mutex<Vec<(H1, Instant)>>,
    h2: Mutex<Option<H2>>,
}

/// An HTTP/1.1 connection lent to one request: [`Lease::release`] gives it
/// back once the answer has been read to its end; dropped instead, it closes.
pub struct Lease {
    sender: H1,
    pool: Arc<PoolInner>,
}

impl Lease {
    pub fn release(self) {
        let mut idle = lock(&self.pool.idle);
        if idle.len() < MAX_IDLE {
            idle.push((self.sender, Instant::now()));
        }
    }
}

impl Pool {
    /// Sends a request (origin-form URI; the pool adds `Host`, or the scheme
    /// and authority for HTTP/2) and returns the response head, with the
    /// connection's lease for HTTP/1.1. An idle
    /// connection that turns out closed before the request left is skipped;
    /// when none is left, a new connection is dialled through the guard.
    pub async fn send(
        &self,
        mut req: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Option<Lease>), BoxError> {
        let p = &self.0;
        // The cold paths (HTTP/2, dialling) are boxed: the hot path's future,
        // which every request moves around, stays small.
        let h2 = lock(&p.h2).clone();
        if let Some(h2) = h2 {
            if !h2.is_closed() {
                return Box::pin(Self::send_h2(p, h2, req)).await.map(|r| (r, None));
            }
        }
        req.headers_mut().insert(header::HOST, p.host.clone());
        loop {
            let next = {
                let now = Instant::now();
                let mut idle = lock(&p.idle);
                let mut found = None;
                while let Some((sender, since)) = idle.pop() {
                    if reusable(&sender, since, now) {
                        found = Some(sender);
                        break;
                    }
                }
                found
            };
            let Some(mut sender) = next else { break };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        Some(Lease {
                            sender,
                            pool: p.clone(),
                        }),
                    ))
                }
                Err(mut e) => match e.take_message() {
                    // Closed before the request left: it can go elsewhere.
                    Some(back) => req = back,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        Box::pin(Self::dial_and_send(p, req)).await
    }

    /// Closes the idle HTTP/1.1 connections that are closed already or have
    /// idled `IDLE_TIMEOUT` by `now`, and forgets a closed h2 connection;
    /// returns how many idle connections are left.
    pub fn sweep(&self, now: Instant) -> usize {
        let p = &self.0;
        {
            let mut h2 = lock(&p.h2);
            if h2.as_ref().is_some_and(|c| c.is_closed()) {
                *h2 = None;
            }
        }
        let mut idle = lock(&p.idle);
        // Dropping a sender ends its connection's task, which closes it.
        idle.retain(|(sender, since)| reusable(sender, *since, now));
        idle.len()
    }

    /// Opens a new connection (HTTP/2 when TLS negotiates it) and sends on it.
    async fn dial_and_send(
        p: &Arc<PoolInner>,
        mut req: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Option<Lease>), BoxError> {
        let io = p.connector.clone().call(p.origin.clone()).await?;
        if io.connected().is_negotiated_h2() {
            let (h2, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            });
            *lock(&p.h2) = Some(h2.clone());
            req.headers_mut().remove(header::HOST);
            return Self::send_h2(p, h2, req).await.map(|r| (r, None));
        }
        let (mut sender, conn) = http1::handshake::<Stream, Full<Bytes>>(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        let resp = sender.send_request(req).await?;
        Ok((
            resp,
            Some(Lease {
                sender,
                pool: p.clone(),
            }),
        ))
    }

    async fn send_h2(
        p: &PoolInner,
        mut h2: H2,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, BoxError> {
        // HTTP/2 carries the scheme and authority in the request itself.
        let mut parts = p.origin.clone().into_parts();
        parts.path_and_query = req.uri().path_and_query().cloned();
        *req.uri_mut() = Uri::from_parts(parts)?;
        h2.ready().await?;
        Ok(h2.send_request(req).await?)
    }
}

/// Whether an idle HTTP/1.1 connection, pooled since `since`, may take
/// another request at `now`: still open and not idle for [`IDLE_TIMEOUT`].
fn reusable(sender: &H1, since: Instant, now: Instant) -> bool {
    !sender.is_closed() && now.saturating_duration_since(since) < IDLE_TIMEOUT
}

/// The `Host` header for an authority: without the scheme's default port.
fn host_header(origin: &Uri) -> Result<HeaderValue> {
    let authority = origin.authority().context("no host in base_url")?;
    let default = match origin.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let text = match authority.port_u16() {
        Some(p) if p == default => authority.host(),
        _ => authority.as_str(),
    };
    HeaderValue::from_str(text).context("base_url's host is not a valid Host header")
}

/// Builds `n` pools of one upstream (one per gateway shard) over one guarded
/// connector and TLS config.
pub fn pools(cfg: &UpstreamConfig, fabric: Arc<FabricView>, n: usize) -> Result<Vec<Pool>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &cfg.ca_file {
        let pem =
            crate::config::read_text_bounded(path, crate::config::MAX_CONFIG_BYTES, "ca_file")
                .with_context(|| format!("upstream {}", cfg.name))?
                .into_bytes();
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.with_context(|| {
                format!("upstream {}: ca_file {}: bad PEM", cfg.name, path.display())
            })?;
            roots.add(cert).with_context(|| {
                format!(
                    "upstream {}: ca_file {}: not a CA certificate",
                    cfg.name,
                    path.display()
                )
            })?;
            n += 1;
        }
        if n == 0 {
            anyhow::bail!(
                "upstream {}: ca_file {} holds no certificate",
                cfg.name,
                path.display()
            );
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = GuardedConnector(Arc::new(Guard {
        upstream: cfg.name.clone(),
        site: (!cfg.public).then(|| cfg.site.clone()),
        fabric,
        connect_timeout: cfg.connect_timeout,
    }));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(connector);
    let origin = {
        let mut parts = http::uri::Parts::default();
        parts.scheme = cfg.base_url.scheme().cloned();
        parts.authority = cfg.base_url.authority().cloned();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        Uri::from_parts(parts)
            .with_context(|| format!("upstream {}: base_url has no scheme or host", cfg.name))?
    };
    let host = host_header(&origin).with_context(|| format!("upstream {}", cfg.name))?;
    Ok((0..n.max(1))
        .map(|_| {
            Pool(Arc::new(PoolInner {
                connector: https.clone(),
                origin: origin.clone(),
                host: host.clone(),
                idle: Mutex::new(Vec::new()),
                h2: Mutex::new(None),
            }))
        })
        .collect())
}

/// The first refusal or IO error message in an error's chain, for the reason
/// a client and the audit log see.
pub fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut text = err.to_string();
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.to_string();
        }
        text = e.to_string();
        cur = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(site: Option<&str>, fabric: Arc<FabricView>) -> GuardedConnector {
        GuardedConnector(Arc::new(Guard {
            upstream: "az".into(),
            site: site.map(String::from),
            fabric,
            connect_timeout: Duration::from_secs(1),
        }))
    }

    #[tokio::test]
    async fn sweeping_closes_connections_idle_too_long_or_closed() -> Result<()> {
        use super::super::config::Kind;
        let cfg = UpstreamConfig {
            name: "az".into(),
            kind: Kind::OpenAi,
            site: "az".into(),
            region: "eastasia".into(),
            base_url: "http://10.0.0.1/v1".parse()?,
            public: false,
            credential: None,
            models: vec![],
            connect_timeout: Duration::from_secs(1),
            first_byte_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            ca_file: None,
        };
        let pool = pools(&cfg, Arc::new(FabricView::default()), 1)?.remove(0);
        let now = Instant::now();
        let mut peers = Vec::new();
        for age in [
            IDLE_TIMEOUT + Duration::from_secs(1),
            Duration::from_secs(1),
        ] {
            // An HTTP/1.1 connection over an in-memory pipe.
            let (ours, theirs) = tokio::io::duplex(1024);
            let (sender, conn) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(ours)).await?;
            tokio::spawn(conn);
            peers.push(theirs);
            lock(&pool.0.idle).push((sender, now - age));
        }
        assert_eq!(
            pool.sweep(now),
            1,
            "the connection idle past the timeout goes"
        );
        // The other one goes once its peer hangs up.
        peers.clear();
        let mut left = 1;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            left = pool.sweep(now);
            if left == 0 {
                break;
            }
        }
        assert_eq!(left, 0, "a connection its peer closed stays pooled");
        Ok(())
    }

    #[test]
    fn fabric_upstreams_stay_inside_their_site() {
        let fabric = Arc::new(FabricView::default());
        let mut view = FabricSnapshot::default();
        view.site_prefixes
            .insert("azure".into(), vec!["10.20.0.0/16".parse().expect("net")]);
        fabric.set(view);
        let c = connector(Some("azure"), fabric.clone());
        assert!(c.check("10.20.0.10".parse().expect("ip")).is_ok());
        let err = c
            .check("10.30.0.10".parse().expect("ip"))
            .expect_err("other site");
        assert!(
            err.contains("not on the fabric") && err.contains("10.20.0.0/16"),
            "{err}"
        );
        let err = c
            .check("169.254.169.254".parse().expect("ip"))
            .expect_err("metadata");
        assert!(err.contains("metadata"), "{err}");
        let public = connector(None, fabric);
        assert!(public.check("198.51.100.7".parse().expect("ip")).is_ok());
        assert!(public
            .check("169.254.169.254".parse().expect("ip"))
            .is_err());
        assert!(public
            .check("::ffff:169.254.169.254".parse().expect("ip"))
            .is_err());
        assert!(public.check("fe80::1".parse().expect("ip")).is_err());
    }
}
