//! What every listener of the agent (the admin socket, `/metrics`) serves behind:
//! back-off on accept errors, a cap on concurrent connections, and the record of
//! what each connection is doing, from which its deadline follows.
//!
//! At the cap a newcomer takes the place of the connection that has waited
//! longest for a request, so clients that open connections and say nothing
//! cannot lock an operator out; a connection in the middle of a request is
//! never taken. When every connection is busy the newcomer is closed at once
//! (one accept and one close). This module owns no protocol: callers parse and
//! tell it when a request starts and ends; it only admits, evicts and times.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The first pause after a failed accept; it doubles on each failure in a row.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// The longest pause between accepts while they keep failing.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Pauses between failing accepts (out of descriptors, out of memory): 10 ms,
/// doubling to 1 s, back to nothing after an accept succeeds. Without it a
/// listener whose accepts fail at once spins a core until they succeed.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    current: Option<Duration>,
}

impl Backoff {
    /// An accept failed: how long to wait before the next one.
    pub(crate) fn failed(&mut self) -> Duration {
        let next = self
            .current
            .map_or(BACKOFF_FIRST, |d| (d * 2).min(BACKOFF_MAX));
        self.current = Some(next);
        next
    }

    /// An accept succeeded: the next failure starts over at the first pause.
    pub(crate) fn succeeded(&mut self) {
        self.current = None;
    }

    /// Whether accepts are failing now.
    pub(crate) fn failing(&self) -> bool {
        self.current.is_some()
    }
}

/// A listener whose connections [`accept`] hands out.
pub(crate) trait Listener {
    type Stream;
    fn accept_stream(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_stream(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// The next connection, pausing per `backoff` while accepts fail. An episode of
/// failures is logged once when it starts and once when it ends, not per failure.
pub(crate) async fn accept<L: Listener>(
    listener: &L,
    backoff: &mut Backoff,
    name: &'static str,
) -> L::Stream {
    loop {
        match listener.accept_stream().await {
            Ok(stream) => {
                if backoff.failing() {
                    tracing::info!(listener = name, "accepting connections again");
                }
                backoff.succeeded();
                return stream;
            }
            // A connection that died in the queue: the peer's failure, and it
            // used up what it failed on, so the next accept can go at once.
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(listener = name, error = %e, "a queued connection failed");
            }
            Err(e) => {
                if !backoff.failing() {
                    tracing::warn!(listener = name, error = %e, "accepting connections fails; retrying with back-off up to 1 s");
                }
                let pause = backoff.failed();
                tracing::debug!(listener = name, error = %e, ?pause, "accept failed");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// The connections of one listener, at most `cap` at once.
pub(crate) struct Conns {
    cap: usize,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    live: HashMap<u64, Slot>,
}

/// What one connection is doing.
struct Slot {
    opened: Instant,
    /// Since when it has waited for a request head; `None` while it answers one.
    waiting_since: Option<Instant>,
    /// When the first byte of the awaited request head arrived.
    head_started: Option<Instant>,
    /// Since when its writes have been blocked by a client that does not read.
    stalled_since: Option<Instant>,
    /// Requests answered.
    served: u64,
    evict: Arc<Notify>,
    changed: Arc<Notify>,
}

/// Why [`Conns::admit`] admitted a connection, or did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// There was room.
    Room,
    /// The connection that had waited longest for a request was closed to make room.
    Evicted,
    /// Every connection is answering a request: the newcomer is closed.
    Full,
}

impl Conns {
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            table: Mutex::new(Table::default()),
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // The table is consistent after every statement; a panic elsewhere leaves it usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in a new connection at `now`, making room at the cap by evicting the
    /// connection that has waited longest for a request head.
    pub(crate) fn admit(self: &Arc<Self>, now: Instant) -> (Admission, Option<Conn>) {
        let mut table = self.table();
        let mut admission = Admission::Room;
        if table.live.len() >= self.cap {
            let victim = table
                .live
                .iter()
                .filter_map(|(id, slot)| slot.waiting_since.map(|t| (t, *id)))
                .min();
            let Some((_, victim)) = victim else {
                return (Admission::Full, None);
            };
            if let Some(slot) = table.live.remove(&victim) {
                slot.evict.notify_one();
            }
            admission = Admission::Evicted;
        }
        let id = table.next_id;
        table.next_id += 1;
        let evict = Arc::new(Notify::new());
        let changed = Arc::new(Notify::new());
        table.live.insert(
            id,
            Slot {
                opened: now,
                waiting_since: Some(now),
                head_started: None,
                stalled_since: None,
                served: 0,
                evict: evict.clone(),
                changed: changed.clone(),
            },
        );
        let conn = Conn(Arc::new(ConnInner {
            conns: self.clone(),
            id,
            evict,
            changed,
        }));
        (admission, Some(conn))
    }

    /// Connections open now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table().live.len()
    }
}

/// One admitted connection; it leaves the table when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Conn(Arc<ConnInner>);

struct ConnInner {
    conns: Arc<Conns>,
    id: u64,
    evict: Arc<Notify>,
    changed: Arc<Notify>,
}

impl Drop for ConnInner {
    fn drop(&mut self) {
        self.conns.table().live.remove(&self.id);
    }
}

/// The limits a connection's deadline follows from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deadlines {
    /// From a connection's opening, or the first byte of a request head, to the
    /// complete head.
    pub(crate) header: Duration,
    /// From the end of an answer to the first byte of the next request; `None`
    /// when the protocol's own timer keeps it.
    pub(crate) idle: Option<Duration>,
    /// How long a client may leave an answer unread.
    pub(crate) write_stall: Duration,
}

impl Conn {
    fn update(&self, f: impl FnOnce(&mut Slot)) {
        let mut table = self.0.conns.table();
        if let Some(slot) = table.live.get_mut(&self.0.id) {
            f(slot);
            slot.changed.notify_one();
        }
    }

    /// A complete request head arrived: the connection is answering it and is
    /// not evicted until [`Conn::waiting`].
    pub(crate) fn busy(&self) {
        self.update(|s| {
            s.waiting_since = None;
            s.head_started = None;
        });
    }

    /// The answer is out; the connection waits for the next request head.
    pub(crate) fn waiting(&self, now: Instant) {
        self.update(|s| {
            s.waiting_since = Some(now);
            s.head_started = None;
            s.served += 1;
        });
    }

    /// Bytes arrived at `now`: the first of a request head starts its deadline.
    pub(crate) fn received(&self, now: Instant) {
        let mut table = self.0.conns.table();
        if let Some(slot) = table.live.get_mut(&self.0.id) {
            if slot.waiting_since.is_some() && slot.head_started.is_none() {
                slot.head_started = Some(now);
                slot.changed.notify_one();
            }
        }
    }

    /// Whether a write is blocked on a client that does not read (since `now`).
    pub(crate) fn write_blocked(&self, blocked: bool, now: Instant) {
        let mut table = self.0.conns.table();
        if let Some(slot) = table.live.get_mut(&self.0.id) {
            if blocked != slot.stalled_since.is_some() {
                slot.stalled_since = blocked.then_some(now);
                slot.changed.notify_one();
            }
        }
    }

    /// When the connection is to be closed, as things stand; `None`: not by a
    /// deadline of this module (it answers a request, or the protocol times
    /// its idle wait).
    pub(crate) fn deadline(&self, limits: &Deadlines) -> Option<Instant> {
        let table = self.0.conns.table();
        let slot = table.live.get(&self.0.id)?;
        let stall = slot.stalled_since.map(|t| t + limits.write_stall);
        let waiting = slot
            .waiting_since
            .and_then(|since| match slot.head_started {
                Some(first_byte) => Some(first_byte + limits.header),
                None if slot.served == 0 => Some(slot.opened + limits.header),
                None => limits.idle.map(|idle| since + idle),
            });
        match (stall, waiting) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Completes when the connection was evicted to make room for another.
    pub(crate) async fn evicted(&self) {
        self.0.evict.notified().await
    }

    /// Completes when what the connection is doing changed (its deadline may have).
    pub(crate) async fn changed(&self) {
        self.0.changed.notified().await
    }

    /// Runs `work` (the connection's protocol) until it ends, the connection is
    /// evicted, or its deadline passes; what ended it.
    pub(crate) async fn supervise<F: Future>(&self, limits: &Deadlines, work: F) -> Ended {
        tokio::pin!(work);
        loop {
            let deadline = self.deadline(limits);
            let expired = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut work => return Ended::Done,
                _ = self.evicted() => return Ended::Evicted,
                _ = expired => return Ended::Deadline,
                _ = self.changed() => {}
            }
        }
    }
}

/// Why a supervised connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Done,
    Evicted,
    Deadline,
}

/// A stream whose bytes tell its [`Conn`] when a request head starts and when
/// the client stops reading answers.
pub(crate) struct Watched<S> {
    inner: S,
    conn: Conn,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, conn: Conn) -> Self {
        Self { inner, conn }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.received(Instant::now());
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        self.conn.write_blocked(polled.is_pending(), Instant::now());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.conn.write_blocked(polled.is_pending(), Instant::now());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.conn.write_blocked(polled.is_pending(), Instant::now());
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let pauses: Vec<u64> = (0..10).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.succeeded();
        assert!(!b.failing());
        assert_eq!(b.failed(), BACKOFF_FIRST);
    }

    const LIMITS: Deadlines = Deadlines {
        header: Duration::from_secs(10),
        idle: Some(Duration::from_secs(60)),
        write_stall: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_longest_waiting_makes_room_never_a_busy_one() {
        let conns = Conns::new(3);
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let (_, a) = conns.admit(t0);
        let (_, b) = conns.admit(t0 + s);
        let (_, c) = conns.admit(t0 + 2 * s);
        let (a, b, c) = (a.expect("a"), b.expect("b"), c.expect("c"));
        // a is answering a request; b has waited longest of the others.
        a.busy();
        let (why, d) = conns.admit(t0 + 3 * s);
        assert_eq!(why, Admission::Evicted);
        assert_eq!(conns.len(), 3);
        tokio::time::timeout(Duration::from_millis(1), b.evicted())
            .await
            .expect("b was told to close");
        assert!(tokio::time::timeout(Duration::from_millis(1), a.evicted())
            .await
            .is_err());
        // c finishes a request later than d opened: d has waited longest now.
        c.busy();
        c.waiting(t0 + 5 * s);
        let (why, _e) = conns.admit(t0 + 6 * s);
        assert_eq!(why, Admission::Evicted);
        let d = d.expect("d");
        tokio::time::timeout(Duration::from_millis(1), d.evicted())
            .await
            .expect("d was told to close");
        drop(d);
        // Everyone busy: the newcomer is refused.
        c.busy();
        _e.as_ref().expect("e").busy();
        let (why, f) = conns.admit(t0 + 7 * s);
        assert_eq!((why, f.is_none()), (Admission::Full, true));
        drop(b);
        assert_eq!(conns.len(), 3, "a, c and e");
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_what_the_connection_does() {
        let conns = Conns::new(4);
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let (_, c) = conns.admit(t0);
        let c = c.expect("admitted");
        assert_eq!(c.deadline(&LIMITS), Some(t0 + 10 * s), "opened, silent");
        c.received(t0 + 3 * s);
        assert_eq!(
            c.deadline(&LIMITS),
            Some(t0 + 13 * s),
            "from the first byte"
        );
        c.busy();
        assert_eq!(c.deadline(&LIMITS), None, "answering");
        c.write_blocked(true, t0 + 4 * s);
        assert_eq!(c.deadline(&LIMITS), Some(t0 + 14 * s), "answer unread");
        c.write_blocked(false, t0 + 5 * s);
        c.waiting(t0 + 5 * s);
        assert_eq!(c.deadline(&LIMITS), Some(t0 + 65 * s), "idle keep-alive");
        c.received(t0 + 20 * s);
        assert_eq!(c.deadline(&LIMITS), Some(t0 + 30 * s), "the next head");
        let no_idle = Deadlines {
            idle: None,
            ..LIMITS
        };
        c.busy();
        c.waiting(t0 + 31 * s);
        assert_eq!(c.deadline(&no_idle), None, "the protocol times idling");
    }

    #[tokio::test(start_paused = true)]
    async fn supervise_closes_at_the_deadline_and_on_eviction() {
        let conns = Conns::new(1);
        let (_, c) = conns.admit(Instant::now());
        let c = c.expect("admitted");
        let t0 = Instant::now();
        let ended = c.supervise(&LIMITS, std::future::pending::<()>()).await;
        assert_eq!(ended, Ended::Deadline);
        assert_eq!(t0.elapsed(), Duration::from_secs(10));

        let (_, c2) = conns.admit(Instant::now());
        let c2 = c2.expect("room");
        let evictor = conns.clone();
        let ended = tokio::join!(
            c2.supervise(&LIMITS, std::future::pending::<()>()),
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                evictor.admit(Instant::now())
            }
        );
        assert_eq!(ended.0, Ended::Evicted);
        assert_eq!(ended.1 .0, Admission::Evicted);
    }
}
