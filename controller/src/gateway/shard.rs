//! The gateway's serving threads ("shards"), as nginx runs its workers: one
//! per core (at most [`MAX_SHARDS`]), each a single-threaded tokio runtime
//! accepting on the gateway's listening socket, with its own upstream
//! connection pools. A request is served start to end on one thread, without
//! the cross-thread wake-ups of a work-stealing runtime, and the controller's
//! runtime (control plane, API) stays out of the gateway's way and vice versa.
//!
//! Whichever shard wakes first accepts, so left alone one busy shard would take
//! most clients and the other cores would idle. Each accepted connection goes
//! to the shard serving the fewest client connections ([`Load::assign`]), as
//! Envoy's exact connection balancer does; a connection changes threads once,
//! before its first byte is read, and stays there.
//!
//! It owns threads and connection placement only: what a request does is
//! [`super::proxy`]'s.

use super::proxy::{self, Gateway};
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
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building the shard's runtime")
                    .and_then(|rt| {
                        rt.block_on(async move {
                            let listener = tokio::net::TcpListener::from_std(listener)?;
                            tokio::select! {
                                r = serve(i, listener, gw, peers, inbox) => r,
                                _ = stopped.changed() => Ok(()),
                            }
                        })
                    });
                let _ = done_tx.send((i, result));
            })
            .context("starting an AI gateway shard thread")?;
    }
    drop(done_tx);
    match done.recv().await {
        Some((i, Err(e))) => Err(e.context(format!("AI gateway shard {i}"))),
        Some((i, Ok(()))) => bail!("AI gateway shard {i} stopped"),
        None => bail!("an AI gateway shard panicked"),
    }
}

/// A client connection on its way to another shard.
type Inbox = mpsc::UnboundedSender<std::net::TcpStream>;

/// Client connections open on each shard.
pub struct Load(Box<[AtomicUsize]>);

impl Load {
    pub fn new(shards: usize) -> Self {
        Self((0..shards.max(1)).map(|_| AtomicUsize::new(0)).collect())
    }

    /// Open client connections per shard.
    pub fn snapshot(&self) -> Vec<usize> {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).collect()
    }

    /// The shard that serves a connection shard `me` accepted, counted there:
    /// the one with the fewest connections, `me` when it is among them (no
    /// move). Shards accepting at once may both pick the same one; the counts
    /// stay right and the next connections even it out.
    pub fn assign(&self, me: usize) -> usize {
        let mine = self.0[me].load(Ordering::Relaxed);
        let (to, least) = self
            .0
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .enumerate()
            .min_by_key(|&(_, n)| n)
            .unwrap_or((me, mine));
        let to = if least == mine { me } else { to };
        self.add(to);
        to
    }

    /// Counts a connection on shard `shard`.
    pub fn add(&self, shard: usize) {
        self.0[shard].fetch_add(1, Ordering::Relaxed);
    }

    /// A connection of shard `shard` closed.
    pub fn release(&self, shard: usize) {
        self.0[shard].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a connection against its shard while it is open.
struct Counted<'a>(&'a Load, usize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

/// Shard `me`'s accept loop: takes connections from the shared listener and
/// from its inbox, and serves each on the shard [`Load::assign`] picks.
async fn serve(
    me: usize,
    listener: tokio::net::TcpListener,
    gw: Arc<Gateway>,
    peers: Arc<[Inbox]>,
    mut inbox: mpsc::UnboundedReceiver<std::net::TcpStream>,
) -> anyhow::Result<()> {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let to = gw.load().assign(me);
                    if to == me {
                        stream
                    } else {
                        match hand_over(stream, &peers[to]) {
                            Ok(None) => continue,
                            Ok(Some(back)) => {
                                // That shard is gone: serve it here.
                                gw.load().release(to);
                                gw.load().add(me);
                                back
                            }
                            Err(e) => {
                                gw.load().release(to);
                                tracing::warn!(error = %e, "AI gateway: moving a client connection to another shard failed");
                                continue;
                            }
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: keep serving.
                    tracing::warn!(error = %e, "AI gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(moved) = inbox.recv() => match TcpStream::from_std(moved) {
                Ok(stream) => stream,
                Err(e) => {
                    gw.load().release(me);
                    tracing::warn!(error = %e, "AI gateway: taking over a client connection failed");
                    continue;
                }
            },
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let _counted = Counted(gw.load(), me);
            proxy::serve_connection(stream, gw.clone()).await;
        });
    }
}

/// Moves a connection to another shard's runtime; `Some` gives it back,
/// registered here again, when that shard takes none any more.
fn hand_over(stream: TcpStream, to: &Inbox) -> std::io::Result<Option<TcpStream>> {
    match to.send(stream.into_std()?) {
        Ok(()) => Ok(None),
        Err(back) => TcpStream::from_std(back.0).map(Some),
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
