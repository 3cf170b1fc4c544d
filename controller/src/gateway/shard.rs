//! The gateway's serving threads ("shards"), as nginx runs its workers: one
//! per core (at most [`MAX_SHARDS`]), each a single-threaded tokio runtime
//! accepting on the gateway's listening socket, with its own upstream
//! connection pools. A request is served start to end on one thread, without
//! the cross-thread wake-ups of a work-stealing runtime, and the controller's
//! runtime (control plane, API) stays out of the gateway's way and vice versa.
//!
//! It owns threads only: what a request does is [`super::proxy`]'s.

use super::proxy::{self, Gateway};
use anyhow::{bail, Context, Result};
use std::cell::Cell;
use std::sync::Arc;
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
    for i in 0..gw.shards() {
        // The same socket in every shard: an idle shard takes the next client.
        let listener = listener
            .try_clone()
            .context("sharing the AI gateway listener")?;
        let gw = gw.clone();
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
                                r = proxy::serve(listener, gw) => r,
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
