//! Prometheus exposition of the agent: renders a snapshot of the core's counters
//! at scrape time (no per-packet atomics) and serves it at GET /metrics, behind
//! the listener guards of `listen.rs` (see [`serve`] for the limits).

use crate::admin::Status;
use crate::listen::{self, Backoff, Conn, Conns, Deadlines, Watched};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;

type Labels = Vec<(String, String)>;

fn peer_label(name: &str) -> Labels {
    vec![("peer".to_string(), name.to_string())]
}

/// Renders `status` as Prometheus text. Every name starts with `skymesh_`.
pub fn render(status: &Status) -> String {
    let mut registry = Registry::with_prefix("skymesh");

    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )])
        .set(1);
    registry.register("build_info", "skymesh-agent build information", build);

    let rx_bytes = Family::<Labels, Counter>::default();
    let tx_bytes = Family::<Labels, Counter>::default();
    let rx_packets = Family::<Labels, Counter>::default();
    let tx_packets = Family::<Labels, Counter>::default();
    let handshake = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for p in &status.peers {
        let l = peer_label(&p.name);
        rx_bytes.get_or_create(&l).inc_by(p.rx_bytes);
        tx_bytes.get_or_create(&l).inc_by(p.tx_bytes);
        rx_packets.get_or_create(&l).inc_by(p.rx_packets);
        tx_packets.get_or_create(&l).inc_by(p.tx_packets);
        handshake
            .get_or_create(&l)
            .set(p.latest_handshake_unix.map(|t| t as f64).unwrap_or(0.0));
    }
    registry.register(
        "peer_rx_bytes",
        "WireGuard bytes received from the peer",
        rx_bytes,
    );
    registry.register(
        "peer_tx_bytes",
        "WireGuard bytes sent to the peer",
        tx_bytes,
    );
    registry.register(
        "peer_rx_packets",
        "WireGuard data packets received from the peer",
        rx_packets,
    );
    registry.register(
        "peer_tx_packets",
        "WireGuard data packets sent to the peer",
        tx_packets,
    );
    registry.register(
        "peer_last_handshake_timestamp_seconds",
        "Unix time of the last completed handshake with the peer (0: never)",
        handshake,
    );

    let drops = Family::<Labels, Counter>::default();
    for (reason, n) in &status.drops {
        drops
            .get_or_create(&vec![("reason".to_string(), reason.clone())])
            .inc_by(*n);
    }
    registry.register("dropped_packets", "Packets dropped, by reason", drops);

    let cookies = Counter::<u64>::default();
    cookies.inc_by(status.handshake_cookie_replies);
    registry.register(
        "handshake_cookie_replies",
        "Cookie replies sent because handshakes arrived faster than the rate limit",
        cookies,
    );

    let stalls = Counter::<u64>::default();
    stalls.inc_by(status.link_check_stalls);
    registry.register(
        "link_check_stalls",
        "Link checks that ran over 50 ms late (the agent's timers did not run: CPU starvation, a paused VM); that time is not counted as probe silence",
        stalls,
    );

    let rtt = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let jitter = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let loss = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let up = Family::<Labels, Gauge>::default();
    let probes_sent = Family::<Labels, Counter>::default();
    let probes_received = Family::<Labels, Counter>::default();
    for l in &status.links {
        let labels = peer_label(&l.peer);
        if let Some(ms) = l.rtt_ms {
            rtt.get_or_create(&labels).set(ms / 1e3);
            jitter.get_or_create(&labels).set(l.jitter_ms / 1e3);
        }
        loss.get_or_create(&labels).set(l.loss);
        up.get_or_create(&labels).set(i64::from(l.up));
        probes_sent.get_or_create(&labels).inc_by(l.probes_sent);
        probes_received
            .get_or_create(&labels)
            .inc_by(l.probes_received);
    }
    registry.register(
        "link_rtt_seconds",
        "Smoothed round-trip time of the link, measured by in-tunnel probes",
        rtt,
    );
    registry.register(
        "link_jitter_seconds",
        "Mean deviation between consecutive round-trip samples (RFC 3550 style)",
        jitter,
    );
    registry.register(
        "link_loss_ratio",
        "Probes lost over the window, both directions pooled (1 while the link is down)",
        loss,
    );
    registry.register(
        "link_up",
        "1 while probes get through; 0 after down_after lost in a row",
        up,
    );
    registry.register("link_probes_sent", "Probes sent to the peer", probes_sent);
    registry.register(
        "link_probes_received",
        "Probes received from the peer",
        probes_received,
    );

    let path = Family::<Labels, Gauge>::default();
    let changes = Family::<Labels, Counter>::default();
    let failovers = Family::<Labels, Counter>::default();
    for r in &status.paths {
        let dest = vec![("dest".to_string(), r.dest.clone())];
        for via in std::iter::once(&r.primary).chain(&r.backup) {
            let labels = vec![
                ("dest".to_string(), r.dest.clone()),
                ("via".to_string(), via.clone()),
            ];
            path.get_or_create(&labels).set(i64::from(*via == r.active));
        }
        changes.get_or_create(&dest).inc_by(r.changes);
        failovers.get_or_create(&dest).inc_by(r.failovers);
    }
    registry.register(
        "route_path",
        "1 for the path in use to the destination, 0 for its alternative; via is \"direct\" or the transit node",
        path,
    );
    registry.register(
        "path_changes",
        "Times traffic to the destination moved to another path (controller or local)",
        changes,
    );
    registry.register(
        "failovers",
        "Local switches to the backup path because the primary's first hop failed",
        failovers,
    );

    if let Some(c) = &status.controller {
        let connected = Gauge::<i64>::default();
        connected.set(i64::from(c.connected.is_some()));
        registry.register(
            "controller_connected",
            "1 while a control session to the controller is open (controller mode)",
            connected,
        );
        let rejected = Family::<Labels, Gauge>::default();
        for r in &c.rejected_prefixes {
            rejected
                .get_or_create(&vec![("prefix".to_string(), r.cidr.clone())])
                .set(1);
        }
        registry.register(
            "advertised_prefix_rejected",
            "Advertised prefixes the controller refused (1 each; see `status` for why)",
            rejected,
        );
    }

    let mut out = String::new();
    if encode(&mut out, &registry).is_err() {
        out.clear();
    }
    skymesh_wire::prom::classic_text(&out)
}

/// Connections `/metrics` serves at once. At the cap the connection that has
/// waited longest for a request head is closed to make room, so silent clients
/// cannot lock out a scrape; when all are answering, the newcomer is closed.
pub const MAX_CONNECTIONS: usize = 64;
/// From a connection's opening, or the first byte of a request head, to the
/// complete head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a keep-alive connection may wait for its next request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may leave an answer unread.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a connection buffers of a request head (hyper's minimum is 8 KiB); a
/// scrape's head is a few hundred bytes. Larger heads get 431.
const MAX_HEAD_BUFFER: usize = 16 * 1024;

const LIMITS: Deadlines = Deadlines {
    header: HEADER_TIMEOUT,
    // hyper's header_read_timeout runs from the end of an answer to the next
    // complete head: that is the idle keep-alive timeout.
    idle: None,
    write_stall: WRITE_STALL_TIMEOUT,
};

/// Serves `/metrics` for ever; `status` is read at each scrape. Accept errors
/// pause the loop with back-off instead of spinning.
pub async fn serve(listener: TcpListener, status: impl Fn() -> Status + Send + Sync + 'static) {
    let status: Arc<dyn Fn() -> Status + Send + Sync> = Arc::new(status);
    let conns = Conns::new(MAX_CONNECTIONS);
    let mut backoff = Backoff::default();
    loop {
        let stream = listen::accept(&listener, &mut backoff, "metrics").await;
        let (admission, conn) = conns.admit(Instant::now());
        let Some(conn) = conn else {
            tracing::debug!(
                ?admission,
                "metrics: every connection is answering; closing a new one"
            );
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let service_conn = conn.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                service_conn.busy();
                let answer = respond(&req, &*status).map(|body| Answer {
                    body,
                    _done: Done(service_conn.clone()),
                });
                std::future::ready(Ok::<_, Infallible>(answer))
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(IDLE_TIMEOUT)
                .max_buf_size(MAX_HEAD_BUFFER)
                .keep_alive(true);
            let io = TokioIo::new(Watched::new(stream, conn.clone()));
            let ended = conn
                .supervise(&LIMITS, http.serve_connection(io, service))
                .await;
            tracing::trace!(?ended, "metrics connection closed");
        });
    }
}

/// The answer to one request.
fn respond<B>(
    req: &Request<B>,
    status: &(dyn Fn() -> Status + Send + Sync),
) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = code;
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "not found; the metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(render(&status()))));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// An answer's body; dropped by hyper once written, which ends the request.
struct Answer {
    body: Full<Bytes>,
    _done: Done,
}

/// Marks the connection as waiting for its next request when the answer is out.
struct Done(Conn);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.waiting(Instant::now());
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{InterfaceStatus, PeerStatusJson};
    use std::collections::BTreeMap;

    #[test]
    fn names_and_values() {
        let status = Status {
            interface: InterfaceStatus {
                name: "skymesh0".into(),
                public_key: "PUB".into(),
                listen_port: 51820,
                address: None,
                mtu: 1420,
            },
            peers: vec![PeerStatusJson {
                name: "gcp-gw".into(),
                public_key: "KEY".into(),
                endpoint: None,
                allowed_ips: vec![],
                latest_handshake_unix: Some(1_700_000_000),
                rx_bytes: 10,
                tx_bytes: 20,
                rx_packets: 1,
                tx_packets: 2,
                persistent_keepalive: None,
            }],
            drops: BTreeMap::from([("replay".to_string(), 3)]),
            handshake_cookie_replies: 4,
            link_check_stalls: 5,
            controller: Some(crate::admin::ControllerStatus {
                node: "aws-gw".into(),
                connected: Some("203.0.113.2:7443".into()),
                rejected_prefixes: vec![crate::admin::RejectedPrefixStatus {
                    cidr: "10.0.5.0/24".into(),
                    reason: "overlaps".into(),
                }],
                ..Default::default()
            }),
            links: vec![crate::admin::LinkStatusJson {
                peer: "gcp-gw".into(),
                up: true,
                rtt_ms: Some(20.0),
                jitter_ms: 0.5,
                loss: 0.05,
                probes_sent: 7,
                probes_received: 6,
            }],
            paths: vec![crate::admin::PathStatusJson {
                dest: "gcp-gw".into(),
                primary: "azure".into(),
                backup: Some("direct".into()),
                active: "direct".into(),
                changes: 2,
                failovers: 1,
            }],
        };
        let text = render(&status);
        for line in [
            "skymesh_peer_rx_bytes_total{peer=\"gcp-gw\"} 10",
            "skymesh_peer_tx_bytes_total{peer=\"gcp-gw\"} 20",
            "skymesh_peer_tx_packets_total{peer=\"gcp-gw\"} 2",
            "skymesh_peer_last_handshake_timestamp_seconds{peer=\"gcp-gw\"} 1700000000",
            "skymesh_dropped_packets_total{reason=\"replay\"} 3",
            "skymesh_handshake_cookie_replies_total 4",
            "skymesh_link_check_stalls_total 5",
            "skymesh_build_info{version=\"",
            "skymesh_controller_connected 1",
            "skymesh_advertised_prefix_rejected{prefix=\"10.0.5.0/24\"} 1",
            "skymesh_link_rtt_seconds{peer=\"gcp-gw\"} 0.02",
            "skymesh_link_jitter_seconds{peer=\"gcp-gw\"} 0.0005",
            "skymesh_link_loss_ratio{peer=\"gcp-gw\"} 0.05",
            "skymesh_link_up{peer=\"gcp-gw\"} 1",
            "skymesh_link_probes_sent_total{peer=\"gcp-gw\"} 7",
            "skymesh_route_path{dest=\"gcp-gw\",via=\"direct\"} 1",
            "skymesh_route_path{dest=\"gcp-gw\",via=\"azure\"} 0",
            "skymesh_path_changes_total{dest=\"gcp-gw\"} 2",
            "skymesh_failovers_total{dest=\"gcp-gw\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        for l in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(l.starts_with("skymesh_"), "{l}");
        }
        // Classic text format: counters' metadata names the _total series.
        assert!(
            text.contains("# TYPE skymesh_peer_rx_bytes_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP skymesh_failovers_total Local switches"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE skymesh_link_rtt_seconds gauge\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn answers_get_and_head_at_metrics_only() {
        let status = || Status {
            interface: InterfaceStatus {
                name: "skymesh0".into(),
                public_key: "PUB".into(),
                listen_port: 51820,
                address: None,
                mtu: 1420,
            },
            peers: vec![],
            drops: BTreeMap::new(),
            handshake_cookie_replies: 0,
            link_check_stalls: 0,
            controller: None,
            links: vec![],
            paths: vec![],
        };
        let req = |method: Method, path: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .expect("request")
        };
        let ok = respond(&req(Method::GET, "/metrics"), &status);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            ok.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert_eq!(
            respond(&req(Method::HEAD, "/metrics"), &status).status(),
            StatusCode::OK
        );
        let post = respond(&req(Method::POST, "/metrics"), &status);
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
        assert_eq!(
            respond(&req(Method::GET, "/"), &status).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond(&req(Method::GET, "/metrics/../x"), &status).status(),
            StatusCode::NOT_FOUND
        );
    }
}
