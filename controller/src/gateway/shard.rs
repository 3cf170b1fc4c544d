//! The gateway's serving threads ("shards"), as nginx runs its workers: one
//! per core (at most [`MAX_SHARDS`]), each a single-threaded tokio runtime
//! accepting on the gateway's listening socket, with its own upstream
//! connection pools. A request is served start to end on one thread, without
//! the cross-thread wake-ups of a work-stealing runtime, and the controller's
//! runtime (control plane, API) stays out of the gateway's way and vice versa.
//!
//! Whichever shard wakes first accepts, so left alone one busy shard would take
//! most clients and the other cores would idle. Each accepted connection goes
//! to the shard serving the fewest client connections (`Load::assign`), as
//! Envoy's exact connection balancer does; a connection changes threads once,
//! before its first byte is read, and stays there.
//!
//! It owns threads and connection placement only: what a request does is
//! [`super::proxy`]'s.

use super::proxy::{self, Gateway};
use crate::listen::{AcceptBackoff, Admitted};
use anyhow::{bail, Context, Result};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// More shards than this buy little for a proxy and multiply the upstream
/// connection pools.
pub const MAX_SHARDS: usize = 8;

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// The shard this thread serves; 0 off the shard threads.
pub fn current() -> usize {
    CURRENT.get()
}

/// One shard per core, at most [`MAX_SHARDS`].
pub fn count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_SHARDS)
}

/// Serves the gateway on `gw.shards()` threads until this future is dropped
/// (the controller aborts its task); then every shard stops, and its runtime
/// takes its connections with it. Fails when a shard cannot start or stops.
pub async fn run(listener: tokio::net::TcpListener, gw: Arc<Gateway>) -> Result<()> {
    let listener = listener
        .into_std()
        .context("handing the AI gateway listener to its shards")?;
    // Dropped with this future: the shards' `changed()` then ends.
    let (stop, _) = watch::channel(());
    let (done_tx, mut done) = mpsc::unbounded_channel();
    // Each shard's inbox of connections another shard accepted for it.
    let (inboxes, mut receivers): (Vec<_>, Vec<_>) =
        (0..gw.shards()).map(|_| mpsc::unbounded_channel()).unzip();
    let inboxes: Arc<[Inbox]> = inboxes.into();
    for (i, inbox) in receivers.drain(..).enumerate() {
        // The same socket in every shard: an idle shard takes the next client.
        let listener = listener
            .try_clone()
            .context("sharing the AI gateway listener")?;
        let gw = gw.clone();
        let peers = inboxes.clone();
        let mut stopped = stop.subscribe();
        let done_tx = done_tx.clone();
        std::thread::Builder::new()
            .name(format!("skymesh-ai-{i}"))
            .spawn(move || {
                CURRENT.set(i);
                // Reports the shard's end, a panic included (the others keep
                // `done` open, so a silent death would go unnoticed).
                let mut report = Report {
                    shard: i,
                    to: done_tx,
                    result: None,
                };
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building the shard's runtime")
                    .and_then(|rt| {
                        rt.block_on(async move {
                            let listener = tokio::net::TcpListener::from_std(listener)?;
                            tokio::select! {
                                r = serve(i, listener, gw.clone(), peers, inbox) => r,
                                r = housekeeping(&gw) => r,
                                _ = stopped.changed() => Ok(()),
                            }
                        })
                    });
                report.result = Some(result);
            })
            .context("starting an AI gateway shard thread")?;
    }
    drop(done_tx);
    match done.recv().await {
        Some((i, Err(e))) => Err(e.context(format!("AI gateway shard {i}"))),
        Some((i, Ok(()))) => bail!("AI gateway shard {i} stopped"),
        None => bail!("every AI gateway shard is gone"),
    }
}

/// A shard's end, sent when its thread finishes or unwinds.
struct Report {
    shard: usize,
    to: mpsc::UnboundedSender<(usize, Result<()>)>,
    /// Set when the shard returns; still `None` while unwinding.
    result: Option<Result<()>>,
}

impl Drop for Report {
    fn drop(&mut self) {
        let result = self
            .result
            .take()
            .unwrap_or_else(|| Err(anyhow::anyhow!("the shard's thread panicked")));
        let _ = self.to.send((self.shard, result));
    }
}

/// How often a shard sweeps its idle upstream connections.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Every [`SWEEP_EVERY`], closes the shard's pooled upstream connections that
/// idled too long or that the upstream closed. Its timer also keeps one
/// deadline within a second in the runtime's timer wheel: tokio wakes its
/// driver (an eventfd write, one syscall) whenever a timer is armed earlier
/// than every other, which each request's timeouts (seconds) otherwise would
/// be on a shard with nothing in flight.
async fn housekeeping(gw: &Gateway) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        gw.sweep_idle();
    }
}

/// A client connection on its way to another shard, counted there.
type Inbox = mpsc::UnboundedSender<Moving>;

/// A connection handed to another shard, with its place under the cap.
type Moving = (std::net::TcpStream, Counted, Admitted);

/// Client connections open on each shard.
pub struct Load(Box<[AtomicUsize]>);

impl Load {
    pub fn new(shards: usize) -> Self {
        Self((0..shards.max(1)).map(|_| AtomicUsize::new(0)).collect())
    }

    /// How many shards there are.
    pub fn shards(&self) -> usize {
        self.0.len()
    }

    /// Open client connections per shard.
    pub fn snapshot(&self) -> Vec<usize> {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).collect()
    }

    /// The shard that serves a connection shard `me` accepted: the one with
    /// the fewest connections, `me` on a tie (no move). It is counted there
    /// until the returned guard drops. Shards accepting at once may pick the
    /// same one; the counts stay right and the next connections even it out.
    fn assign(&self, me: usize) -> usize {
        let to = self
            .0
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(i, n)| (n, i != me))
            .map_or(me, |(i, _)| i);
        self.add(to);
        to
    }

    fn add(&self, shard: usize) {
        self.0[shard].fetch_add(1, Ordering::Relaxed);
    }

    fn release(&self, shard: usize) {
        self.0[shard].fetch_sub(1, Ordering::Relaxed);
    }
}

/// One connection counted on a shard; dropped with the connection (its task
/// ending, panicking or never running, or a hand-over that never arrived).
struct Counted(Arc<Gateway>, usize);

impl Counted {
    /// Counted on the shard [`Load::assign`] picks for shard `me`.
    fn new(gw: &Arc<Gateway>, me: usize) -> Self {
        let to = gw.load().assign(me);
        Self(gw.clone(), to)
    }

    /// Counted on shard `shard`.
    fn on(gw: &Arc<Gateway>, shard: usize) -> Self {
        gw.load().add(shard);
        Self(gw.clone(), shard)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.load().release(self.1);
    }
}

/// Shard `me`'s accept loop: takes connections from the shared listener and
/// from its inbox, and serves each on the shard [`Load::assign`] picks.
async fn serve(
    me: usize,
    listener: tokio::net::TcpListener,
    gw: Arc<Gateway>,
    peers: Arc<[Inbox]>,
    mut inbox: mpsc::UnboundedReceiver<Moving>,
) -> anyhow::Result<()> {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (stream, counted, admitted) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff.success();
                    // At the cap with every connection busy: closed at once.
                    let Some(admitted) = gw.clients.admit() else {
                        continue;
                    };
                    let counted = Counted::new(&gw, me);
                    if counted.1 == me {
                        (stream, counted, admitted)
                    } else {
                        let to = counted.1;
                        match hand_over((stream, counted, admitted), &peers[to]) {
                            Ok(None) => continue,
                            // That shard is gone: serve it here.
                            Ok(Some((stream, admitted))) => (stream, Counted::on(&gw, me), admitted),
                            Err(e) => {
                                tracing::warn!(error = %e, "AI gateway: moving a client connection to another shard failed");
                                continue;
                            }
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: keep serving,
                    // without spinning.
                    gw.clients.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    let pause = backoff.failure();
                    tracing::warn!(error = %e, retry_in = ?pause, "AI gateway accept failed");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            },
            Some((moved, counted, admitted)) = inbox.recv() => match TcpStream::from_std(moved) {
                Ok(stream) => (stream, counted, admitted),
                Err(e) => {
                    tracing::warn!(error = %e, "AI gateway: taking over a client connection failed");
                    continue;
                }
            },
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let _counted = counted;
            let clients = gw.clients.clone();
            clients
                .serve(admitted, stream, |io, conn| {
                    proxy::serve_connection(io, conn, gw)
                })
                .await;
        });
    }
}

/// Moves a connection to another shard's runtime; `Some` gives it back,
/// registered here again, when that shard takes none any more (its count
/// there is dropped).
fn hand_over(
    (stream, counted, admitted): (TcpStream, Counted, Admitted),
    to: &Inbox,
) -> std::io::Result<Option<(TcpStream, Admitted)>> {
    match to.send((stream.into_std()?, counted, admitted)) {
        Ok(()) => Ok(None),
        Err(back) => {
            let (stream, counted, admitted) = back.0;
            drop(counted);
            TcpStream::from_std(stream).map(|s| Some((s, admitted)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_least_loaded_shard_and_stay_put_on_a_tie() {
        let load = Load::new(3);
        // Shard 0 accepts everything: it keeps one, then spreads the rest.
        let placed: Vec<usize> = (0..6).map(|_| load.assign(0)).collect();
        assert_eq!(placed, [0, 1, 2, 0, 1, 2]);
        assert_eq!(load.snapshot(), [2, 2, 2]);
        load.release(1);
        load.release(1);
        assert_eq!(load.assign(2), 1, "the emptiest shard takes the next one");
        assert_eq!(load.assign(1), 1, "a tie with the least loaded stays home");
        assert_eq!(load.snapshot(), [2, 2, 2]);
    }
}
