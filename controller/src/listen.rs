//! The guards every TCP listener of the controller serves behind (the REST API
//! and the AI gateway): a cap on concurrent connections, a deadline for a
//! complete request head, an idle keep-alive timeout, a deadline on a client
//! that stops reading an answer, and back-off on accept errors.
//!
//! At the cap a new connection takes the place of the one that has waited
//! longest for a request head (one that never finished a request first), or
//! else of one whose client has left an answer untaken for a second or more,
//! so clients that hold connections open without asking anything, or without
//! reading, cannot lock out an operator; a connection whose request is being
//! worked on is never taken. When every connection is busy the newcomer is
//! closed at once, which costs one accept and one close.
//!
//! What a connection is doing is learnt from three places: [`Watched`] sees
//! the first byte of a request head, [`InFlight`] guards mark a request from
//! its head to the end of its answer, [`Tracked`] answers say when the client
//! leaves their next frame untaken (a full socket stops hyper from asking for
//! it, as a shut h2 window does), and `supervise` turns the state into one
//! deadline at a time. It owns no
//! protocol: hyper parses, this module only closes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; at the cap the longest-waiting idle one
    /// makes room, or the newcomer is closed.
    pub max_connections: usize,
    /// From a connection's first byte (or its opening) to a complete request
    /// head.
    pub header_timeout: Duration,
    /// How long a connection may stay open with nothing in flight after a
    /// request.
    pub idle_timeout: Duration,
    /// How long in all a client may keep an answer waiting (the gateway has
    /// the next bytes, the client does not take them: a full socket, a shut
    /// h2 flow-control window) before the connection is closed; every
    /// [`Limits::min_read_rate`] bytes it did take add a second.
    pub write_stall_timeout: Duration,
    /// Bytes per second a client must take an answer at, beyond the stall
    /// allowance, so a 1 byte/s reader cannot hold an answer forever.
    pub min_read_rate: u64,
}

impl Limits {
    /// The REST API's limits (documented in the README).
    pub const API: Limits = Limits {
        max_connections: 512,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        write_stall_timeout: Duration::from_secs(30),
        min_read_rate: 64 * 1024,
    };

    /// Concurrent h2 streams per connection.
    pub const H2_STREAMS: u32 = 32;
}

/// Why a connection was closed by a guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    HeaderTimeout,
    IdleTimeout,
    WriteStall,
    Evicted,
}

impl Closed {
    pub fn label(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::WriteStall => "write_stall",
            Closed::Evicted => "evicted",
        }
    }
}

/// Counters of one listener, for its metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub refused: AtomicU64,
    pub header_timeout: AtomicU64,
    pub idle_timeout: AtomicU64,
    pub write_stall: AtomicU64,
    pub evicted: AtomicU64,
    pub accept_errors: AtomicU64,
}

impl Stats {
    fn closed(&self, why: Closed) -> &AtomicU64 {
        match why {
            Closed::HeaderTimeout => &self.header_timeout,
            Closed::IdleTimeout => &self.idle_timeout,
            Closed::WriteStall => &self.write_stall,
            Closed::Evicted => &self.evicted,
        }
    }
}

/// The connections of one listener.
pub struct Guard {
    name: &'static str,
    limits: Limits,
    table: Mutex<Table>,
    pub stats: Stats,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    live: HashMap<u64, Arc<Conn>>,
    /// Told to close, not yet gone.
    leaving: usize,
}

impl Guard {
    pub fn new(name: &'static str, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            name,
            limits,
            table: Mutex::new(Table::default()),
            stats: Stats::default(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Connections open now (those told to close included until they go).
    pub fn open(&self) -> usize {
        let t = lock(&self.table);
        t.live.len() + t.leaving
    }

    /// Takes a new connection in, making room if needed; `None`: close it.
    pub fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let now = Instant::now();
        let mut t = lock(&self.table);
        // Evicted connections normally go within a scheduling round; a flood
        // faster than that is refused rather than let the table grow.
        if t.live.len() >= self.limits.max_connections {
            let oldest = t
                .live
                .values()
                .filter_map(|c| c.eviction_rank(now).map(|w| (w, c)))
                .min_by_key(|(w, _)| *w)
                .map(|(_, c)| c.clone());
            match oldest {
                Some(victim) if t.leaving < self.limits.max_connections => {
                    t.live.remove(&victim.id);
                    t.leaving += 1;
                    victim.evict();
                    self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(listener = self.name, "connection cap reached: closing the connection that waited longest for a request");
                }
                _ => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        t.next_id += 1;
        let conn = Arc::new(Conn {
            id: t.next_id,
            state: Mutex::new(ConnState {
                in_flight: 0,
                served: false,
                idle_since: now,
                first_byte: None,
                evicted: false,
                answers: Vec::new(),
                next_answer: 0,
            }),
            want_first_byte: AtomicBool::new(true),
            changed: Notify::new(),
        });
        t.live.insert(conn.id, conn.clone());
        Some(Admitted {
            guard: self.clone(),
            conn,
        })
    }

    /// Serves one admitted connection with `serve` until it ends or a limit
    /// closes it.
    pub async fn serve<IO, F, Fut>(&self, admitted: Admitted, io: IO, serve: F)
    where
        F: FnOnce(Watched<IO>, Arc<Conn>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let conn = admitted.conn.clone();
        let watched = Watched {
            io,
            conn: conn.clone(),
        };
        tokio::select! {
            () = serve(watched, conn.clone()) => {}
            why = supervise(&conn, self.limits) => {
                self.stats.closed(why).fetch_add(1, Ordering::Relaxed);
                tracing::debug!(listener = self.name, reason = why.label(), "closing a client connection");
            }
        }
        drop(admitted);
    }
}

/// An admitted connection's place under the cap; released on drop.
pub struct Admitted {
    guard: Arc<Guard>,
    conn: Arc<Conn>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut t = lock(&self.guard.table);
        if t.live.remove(&self.conn.id).is_none() {
            t.leaving = t.leaving.saturating_sub(1);
        }
    }
}

/// One connection's state, as its guards see it.
pub struct Conn {
    id: u64,
    state: Mutex<ConnState>,
    /// Set while nothing is in flight and no byte of the next request came:
    /// the next read stamps when its head began. Read on every read without
    /// the lock.
    want_first_byte: AtomicBool,
    changed: Notify,
}

struct ConnState {
    in_flight: u32,
    /// A request was served on it.
    served: bool,
    /// When the last request ended, or the connection opened.
    idle_since: Instant,
    /// The first byte of a request head not yet complete.
    first_byte: Option<Instant>,
    evicted: bool,
    /// Answers being sent, each with how long it has kept the client waiting.
    answers: Vec<Answer>,
    next_answer: u64,
}

/// One answer on its way to the client.
struct Answer {
    id: u64,
    /// Since when it has had its next frame ready and the client has not
    /// asked for it (hyper polls a body only when it can send).
    ready_since: Option<Instant>,
    /// Time spent so, before `ready_since`.
    waited: Duration,
    /// Bytes the client took.
    bytes: u64,
}

impl Answer {
    /// When the client will have kept this answer waiting too long.
    fn deadline(&self, limits: Limits) -> Option<Instant> {
        let since = self.ready_since?;
        let rate = limits.min_read_rate.max(1);
        let allowance = limits.write_stall_timeout
            + Duration::from_millis(self.bytes.saturating_mul(1000) / rate);
        Some(since + allowance.saturating_sub(self.waited))
    }
}

impl Conn {
    fn state(&self) -> MutexGuard<'_, ConnState> {
        lock(&self.state)
    }

    /// Its place in the line to make room at the cap, lowest first; `None`
    /// when it is doing work. First the connections waiting for a request
    /// head that never finished one, then idle ones that did, each oldest
    /// first; then those whose client has left an answer waiting for a
    /// second or more (a shut h2 window, an unread socket).
    fn eviction_rank(&self, now: Instant) -> Option<(u8, Instant)> {
        let s = self.state();
        if s.evicted {
            return None;
        }
        if s.in_flight == 0 {
            return Some((u8::from(s.served), s.idle_since));
        }
        let stalled = s.answers.iter().filter_map(|a| a.ready_since).min()?;
        (now.saturating_duration_since(stalled) >= Duration::from_secs(1)).then_some((2, stalled))
    }

    fn evict(&self) {
        self.state().evicted = true;
        self.changed.notify_one();
    }

    /// Marks a request in flight until the guard drops (with its answer's
    /// body, see [`Tracked`]).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        {
            let mut s = self.state();
            s.in_flight += 1;
            s.served = true;
            s.first_byte = None;
        }
        self.want_first_byte.store(false, Ordering::Relaxed);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    fn on_read(&self) {
        if self.want_first_byte.swap(false, Ordering::Relaxed) {
            let mut s = self.state();
            if s.in_flight == 0 && s.first_byte.is_none() {
                s.first_byte = Some(Instant::now());
            }
            drop(s);
            self.changed.notify_one();
        }
    }
}

/// A request in flight on a connection.
pub struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let idle = {
            let mut s = self.0.state();
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.idle_since = Instant::now();
                s.first_byte = None;
            }
            s.in_flight == 0
        };
        if idle {
            self.0.want_first_byte.store(true, Ordering::Relaxed);
        }
        self.0.changed.notify_one();
    }
}

/// Waits until a limit closes the connection, and says which.
async fn supervise(conn: &Conn, limits: Limits) -> Closed {
    loop {
        // Registered before the state is read, so a change in between wakes
        // this at once (notify_one keeps a permit).
        let changed = conn.changed.notified();
        let deadline = {
            let s = conn.state();
            if s.evicted {
                return Closed::Evicted;
            }
            if s.in_flight == 0 {
                let (idle, why) = if s.served {
                    (limits.idle_timeout, Closed::IdleTimeout)
                } else {
                    (limits.header_timeout, Closed::HeaderTimeout)
                };
                let mut deadline = (s.idle_since + idle, why);
                if let Some(first) = s.first_byte {
                    let head = first + limits.header_timeout;
                    if head < deadline.0 {
                        deadline = (head, Closed::HeaderTimeout);
                    }
                }
                Some(deadline)
            } else {
                s.answers
                    .iter()
                    .filter_map(|a| a.deadline(limits))
                    .min()
                    .map(|at| (at, Closed::WriteStall))
            }
        };
        match deadline {
            Some((at, why)) if at <= Instant::now() => return why,
            Some((at, _)) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = changed => {}
                }
            }
            None => changed.await,
        }
    }
}

/// A connection's byte stream, telling its [`Conn`] when a request head
/// begins. Writes pass straight through: an unread answer shows in its
/// [`Tracked`] body.
pub struct Watched<IO> {
    io: IO,
    conn: Arc<Conn>,
}

impl<IO> Watched<IO> {
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.on_read();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An answer's body that keeps its request in flight until it ends, and
/// tells its connection when the client keeps it waiting.
pub struct Tracked<B> {
    inner: B,
    id: u64,
    in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        let id = {
            let mut s = in_flight.0.state();
            s.next_answer += 1;
            let id = s.next_answer;
            // Its head is out; its body waits for the client's side to ask.
            s.answers.push(Answer {
                id,
                ready_since: Some(Instant::now()),
                waited: Duration::ZERO,
                bytes: 0,
            });
            id
        };
        in_flight.0.changed.notify_one();
        Self {
            inner,
            id,
            in_flight,
        }
    }

    fn with_answer(&self, f: impl FnOnce(&mut Answer)) {
        let mut s = self.in_flight.0.state();
        if let Some(a) = s.answers.iter_mut().find(|a| a.id == self.id) {
            f(a);
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        let mut s = self.in_flight.0.state();
        s.answers.retain(|a| a.id != self.id);
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let now = Instant::now();
        self.with_answer(|a| {
            if let Some(since) = a.ready_since.take() {
                a.waited += now.saturating_duration_since(since);
            }
        });
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &r {
            use bytes::Buf;
            let n = frame.data_ref().map_or(0, |d| d.remaining() as u64);
            let notify = {
                let mut notify = false;
                self.with_answer(|a| {
                    a.bytes += n;
                    a.ready_since = Some(now);
                    notify = true;
                });
                notify
            };
            if notify {
                self.in_flight.0.changed.notify_one();
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Back-off after failed accepts (out of descriptors, say): 10 ms doubling
/// to 1 s, reset by a success, so a listener never spins.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    pub fn success(&mut self) {
        self.next = Duration::ZERO;
    }

    /// The pause after one more failure.
    pub fn failure(&mut self) -> Duration {
        self.next = if self.next.is_zero() {
            Self::FIRST
        } else {
            (self.next * 2).min(Self::MAX)
        };
        self.next
    }
}

/// How long the REST API gives one request, from its head to its answer's
/// head (a body trickled in included).
pub const API_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the REST API's router on `listener` behind `guard`, HTTP/1.1 and
/// h2, until the future is dropped.
pub async fn serve_api(listener: tokio::net::TcpListener, guard: Arc<Guard>, app: axum::Router) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.success();
                stream
            }
            Err(e) => {
                guard.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                let pause = backoff.failure();
                tracing::warn!(error = %e, retry_in = ?pause, "REST API accept failed");
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let Some(admitted) = guard.admit() else {
            continue;
        };
        let app = app.clone();
        let guard = guard.clone();
        tokio::spawn(async move {
            guard
                .serve(admitted, stream, |io, conn| async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let in_flight = conn.begin();
                            let call = tower_service::Service::call(
                                &mut app.clone(),
                                req.map(axum::body::Body::new),
                            );
                            async move {
                                let resp =
                                    match tokio::time::timeout(API_REQUEST_TIMEOUT, call).await {
                                        Ok(Ok(resp)) => resp,
                                        Ok(Err(never)) => match never {},
                                        Err(_) => request_timeout(),
                                    };
                                Ok::<_, std::convert::Infallible>(resp.map(|body| {
                                    axum::body::Body::new(Tracked::new(body, in_flight))
                                }))
                            }
                        },
                    );
                    let mut builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    builder.http2().max_concurrent_streams(Limits::H2_STREAMS);
                    if let Err(e) = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                        .await
                    {
                        tracing::debug!(error = %e, "REST API connection ended with an error");
                    }
                })
                .await;
        });
    }
}

fn request_timeout() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        http::StatusCode::REQUEST_TIMEOUT,
        [(http::header::CONNECTION, "close")],
        axum::Json(serde_json::json!({
            "error": "request_timeout",
            "detail": format!("the request did not complete within {API_REQUEST_TIMEOUT:?}; send the whole request at once"),
        })),
    )
        .into_response()
}

/// Raises the soft limit on open files to the hard one, so the connection
/// caps (not the default 1,024 descriptors) bound what clients can hold.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "could not raise the open-file limit");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The listeners' guards in OpenMetrics text (counters' HELP and TYPE name
/// the family, as the encoder writes them; see `prom::classic_text`).
pub fn render(out: &mut String, listeners: &[(&str, &Guard)]) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP skymesh_controller_listener_connections Client connections open, per listener (for control: those not authenticated yet).\n# TYPE skymesh_controller_listener_connections gauge");
    for (name, g) in listeners {
        let _ = writeln!(
            out,
            "skymesh_controller_listener_connections{{listener=\"{name}\"}} {}",
            g.open()
        );
    }
    let _ = writeln!(out, "# HELP skymesh_controller_listener_connections_closed Client connections a listener closed or refused, by reason.\n# TYPE skymesh_controller_listener_connections_closed counter");
    for (name, g) in listeners {
        let s = &g.stats;
        for (reason, n) in [
            ("refused_at_cap", &s.refused),
            ("evicted", &s.evicted),
            ("header_timeout", &s.header_timeout),
            ("idle_timeout", &s.idle_timeout),
            ("write_stall", &s.write_stall),
        ] {
            let _ = writeln!(
                out,
                "skymesh_controller_listener_connections_closed_total{{listener=\"{name}\",reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
    let _ = writeln!(out, "# HELP skymesh_controller_listener_accept_errors Failed accepts (out of descriptors and the like), each followed by a back-off.\n# TYPE skymesh_controller_listener_accept_errors counter");
    for (name, g) in listeners {
        let _ = writeln!(
            out,
            "skymesh_controller_listener_accept_errors_total{{listener=\"{name}\"}} {}",
            g.stats.accept_errors.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize) -> Limits {
        Limits {
            max_connections: max,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_stall_timeout: Duration::from_secs(30),
            min_read_rate: 1000,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_gets_the_head_deadline_an_idle_one_the_idle_timeout() {
        let g = Guard::new("t", limits(4));
        let a = g.admit().expect("room");
        let conn = a.conn.clone();
        let t0 = Instant::now();
        assert_eq!(supervise(&conn, g.limits).await, Closed::HeaderTimeout);
        assert_eq!(t0.elapsed(), Duration::from_secs(10));

        // One request served: 60 s of quiet after its answer.
        let b = g.admit().expect("room");
        let conn = b.conn.clone();
        let req = conn.begin();
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(req);
        let t0 = Instant::now();
        assert_eq!(supervise(&conn, g.limits).await, Closed::IdleTimeout);
        assert_eq!(t0.elapsed(), Duration::from_secs(60));

        // A byte of the next head: 10 s from it to a complete head.
        let c = g.admit().expect("room");
        let conn = c.conn.clone();
        drop(conn.begin());
        tokio::time::advance(Duration::from_secs(30)).await;
        conn.on_read();
        let t0 = Instant::now();
        assert_eq!(supervise(&conn, g.limits).await, Closed::HeaderTimeout);
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_timed_out_but_a_client_that_stops_reading_is() {
        let g = Guard::new("t", limits(4));
        let a = g.admit().expect("room");
        let conn = a.conn.clone();
        let req = conn.begin();
        let sup = supervise(&conn, g.limits);
        tokio::pin!(sup);
        // An hour of an upstream thinking: nothing to close.
        assert!(tokio::time::timeout(Duration::from_secs(3600), &mut sup)
            .await
            .is_err());
        // Its answer is ready and the client does not take it.
        let body = Tracked::new(Endless, req);
        let t0 = Instant::now();
        assert_eq!(sup.await, Closed::WriteStall);
        assert_eq!(t0.elapsed(), Duration::from_secs(30));
        drop(body);
    }

    /// A body that always has its next 100 bytes ready.
    struct Endless;

    impl hyper::body::Body for Endless {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
            Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes::Bytes::from(
                vec![0u8; 100],
            )))))
        }
    }

    fn take_frame(body: &mut Tracked<Endless>) {
        use hyper::body::Body;
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(body).poll_frame(&mut cx).is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_the_client_does_not_take_closes_its_connection() {
        // The client never asks for the body (an h2 window of 0): 30 s.
        let g = Guard::new("t", limits(4));
        let a = g.admit().expect("room");
        let body = Tracked::new(Endless, a.conn.begin());
        let t0 = Instant::now();
        assert_eq!(supervise(&a.conn, g.limits).await, Closed::WriteStall);
        assert_eq!(t0.elapsed(), Duration::from_secs(30));
        drop(body);

        // A reader taking 100 bytes every 20 s (the rate allows 1,000/s):
        // each take buys 0.1 s, so it is cut off after about 30 s of waiting
        // in all, not held forever.
        let b = g.admit().expect("room");
        let mut body = Tracked::new(Endless, b.conn.begin());
        let t0 = Instant::now();
        let sup = supervise(&b.conn, g.limits);
        tokio::pin!(sup);
        let mut closed = None;
        for _ in 0..10 {
            if let Ok(why) = tokio::time::timeout(Duration::from_secs(20), &mut sup).await {
                closed = Some(why);
                break;
            }
            take_frame(&mut body);
        }
        assert_eq!(closed, Some(Closed::WriteStall));
        let t = t0.elapsed();
        assert!(
            t > Duration::from_secs(30) && t < Duration::from_secs(41),
            "{t:?}"
        );

        // A client that takes every frame at once is never cut off, however
        // long the upstream takes between frames.
        let c = g.admit().expect("room");
        let mut body = Tracked::new(Slow { ready: true }, c.conn.begin());
        let sup = supervise(&c.conn, g.limits);
        tokio::pin!(sup);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..100 {
            use hyper::body::Body;
            assert!(Pin::new(&mut body).poll_frame(&mut cx).is_ready());
            assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
            assert!(tokio::time::timeout(Duration::from_secs(10), &mut sup)
                .await
                .is_err());
        }
    }

    /// A body whose upstream gives one frame, then makes it wait.
    struct Slow {
        ready: bool,
    }

    impl hyper::body::Body for Slow {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
            self.ready = !self.ready;
            if self.ready {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(hyper::body::Frame::data(
                    bytes::Bytes::from_static(b"token"),
                ))))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_longest_waiting_idle_connection_makes_room() {
        let g = Guard::new("t", limits(3));
        let busy = g.admit().expect("room");
        let _req = busy.conn.begin();
        let served = g.admit().expect("room");
        drop(served.conn.begin());
        tokio::time::advance(Duration::from_secs(1)).await;
        let silent = g.admit().expect("room");
        assert_eq!(g.open(), 3);
        // A never-served connection goes first, though it is the newest.
        let newcomer = g.admit().expect("made room");
        assert!(silent.conn.state().evicted);
        assert!(!served.conn.state().evicted && !busy.conn.state().evicted);
        assert_eq!(supervise(&silent.conn, g.limits).await, Closed::Evicted);
        drop(silent);
        assert_eq!(g.open(), 3);
        // The newcomer asks something; then the idle one that was served
        // makes room.
        let _r1 = newcomer.conn.begin();
        let second = g.admit().expect("made room");
        assert!(served.conn.state().evicted);
        drop(served);
        // Only busy connections left: the next one is refused.
        let _r2 = second.conn.begin();
        assert!(g.admit().is_none());
        // Unless a client has left its answer untaken for a second.
        let stalled = Tracked::new(Endless, in_flight_on(&newcomer));
        assert!(g.admit().is_none(), "a fresh answer is not a stall");
        tokio::time::advance(Duration::from_secs(2)).await;
        let third = g.admit().expect("made room");
        assert!(newcomer.conn.state().evicted);
        drop((stalled, newcomer, third));
        assert_eq!(g.stats.refused.load(Ordering::Relaxed), 2);
        assert_eq!(g.stats.evicted.load(Ordering::Relaxed), 3);
    }

    fn in_flight_on(a: &Admitted) -> InFlight {
        a.conn.begin()
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<u64> = (0..9).map(|_| b.failure().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.success();
        assert_eq!(b.failure(), Duration::from_millis(10));
    }
}
