//! The controller's state store: the [`Store`] trait every backend implements, its value types,
//! and the in-process `WatchHub` that a backend without native watch uses to fan out events.
//!
//! Owns the semantics of durable controller state (nodes, certificates, join tokens, IP
//! allocations, prefixes), modelled one-to-one on etcd v3's KV API so an etcd backend can slot in:
//! a global store revision incremented by each committed write transaction that changes something,
//! per-key `create_revision` / `mod_revision`, transactions guarded by compares, and watches that
//! resume from a revision. Invariants such as "one allocation per address" are enforced by callers
//! through [`Txn`] compares, never by state held only in memory.
//!
//! Does not own what the values mean (callers encode them) nor key layout beyond "UTF-8 string,
//! prefix-ranged". The default backend is [`redb::RedbStore`], an embedded crash-safe file.
//!
//! What every backend shares lives here too: the checksummed `record` envelope each stored
//! value is wrapped in, and the [`health::StoreStats`] each backend reports to `/healthz` and
//! `/metrics`.

pub mod health;
pub(crate) mod record;
pub mod records;
pub mod redb;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

pub use health::{StoreHealth, StoreStats};

use tokio::sync::mpsc;

/// One key's current value and the revisions that describe its history, like etcd's `KeyValue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Store revision of the write that created the key (reset when it is deleted and re-created).
    pub create_revision: u64,
    /// Store revision of the latest write to the key.
    pub mod_revision: u64,
}

/// A condition of a transaction, like etcd's `Compare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's mod_revision equals `revision`; 0 means "the key does not exist"
    /// (etcd: `mod_revision == 0` / `create_revision == 0`).
    ModRevision { key: String, revision: u64 },
}

impl Compare {
    pub fn key(&self) -> &str {
        match self {
            Compare::ModRevision { key, .. } => key,
        }
    }
}

/// A write inside a transaction, like etcd's `RequestOp` put / delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// A compare-and-apply transaction: if every compare holds, all ops commit as one revision.
///
/// As in etcd, a transaction may touch each key at most once in its ops
/// ([`StoreError::DuplicateKey`] otherwise), so the result never depends on op order.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    /// Require that `key` does not exist (create-if-absent).
    pub fn when_absent(self, key: impl Into<String>) -> Self {
        self.when_revision(key, 0)
    }

    /// Require that `key`'s mod_revision is `revision` (0: the key does not exist).
    pub fn when_revision(mut self, key: impl Into<String>, revision: u64) -> Self {
        self.compares.push(Compare::ModRevision {
            key: key.into(),
            revision,
        });
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    /// Rejects what etcd rejects: empty keys and ops touching the same key twice.
    /// Backends call this before taking any lock.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.compares.iter().any(|c| c.key().is_empty())
            || self.ops.iter().any(|o| o.key().is_empty())
        {
            return Err(StoreError::EmptyKey);
        }
        let mut keys: Vec<&str> = self.ops.iter().map(Op::key).collect();
        keys.sort_unstable();
        if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(StoreError::DuplicateKey(pair[0].to_owned()));
        }
        Ok(())
    }
}

/// What [`Store::txn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every compare held and the ops are durable. `revision` is the revision the ops were
    /// committed at, or the current revision if they changed nothing (e.g. deleting absent keys).
    Committed { revision: u64 },
    /// A compare failed; nothing was changed.
    Conflict,
}

impl TxnOutcome {
    pub fn is_committed(&self) -> bool {
        matches!(self, TxnOutcome::Committed { .. })
    }
}

/// A committed change to one key. All events of one transaction share its revision and arrive in
/// op order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key's new state; its `mod_revision` is the event's revision.
    Put(KeyValue),
    Delete {
        key: String,
        revision: u64,
    },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// Errors at the store boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O error, full disk, corrupt file, file locked by another process).
    /// A write that fails this way may or may not have been committed: re-read before retrying
    /// anything that is not idempotent.
    #[error("store backend: {0}")]
    Backend(String),
    /// A write was refused without being tried: the last write failed and the backend is waiting
    /// before it tries again. Nothing was done.
    #[error("the state store cannot take writes now: {0}")]
    NotWritable(String),
    /// The record under `key` failed its checksum or does not decode; it is left out of ranges
    /// (and reported in [`StoreStats`]), and reading it alone fails with this.
    #[error(
        "the stored record of key {key:?} is corrupt ({reason}); delete it or restore a backup \
         with `skymesh-controller restore`"
    )]
    Corrupt { key: String, reason: String },
    /// The store file exists but is not a usable store (empty, truncated, damaged, not a store).
    /// It is never re-initialised: that would lose the CA, the nodes and the tokens.
    #[error(
        "store file {}: {reason}. It was left as it is, since starting afresh would lose the \
         CA, every node and every token: stop the controller and restore a backup with \
         `skymesh-controller restore --config <file> --from <backup>` (or move the file away to \
         start with an empty store on purpose)",
        .path.display()
    )]
    Unusable { path: PathBuf, reason: String },
    /// The store is not where it was: a dangling symlink (a disk that did not mount), or a
    /// data_dir whose `store.id` says a store was created there and is now gone. Nothing is
    /// created in its place, as a new store would have a new CA.
    #[error("{reason}")]
    Missing { path: PathBuf, reason: String },
    /// Another process (a running controller) has the store file open.
    #[error(
        "store file {} is in use by another process: is a controller already running on \
         this data_dir? Stop it first",
        .path.display()
    )]
    InUse { path: PathBuf },
    /// The events after `requested` are no longer retained (history is bounded, and does not
    /// survive a restart). The caller re-ranges and watches from the revision that range returns;
    /// `oldest` is the smallest `after_revision` a watch currently accepts.
    #[error("watch from revision {requested}: events up to revision {oldest} are compacted; re-range and watch again")]
    Compacted { requested: u64, oldest: u64 },
    /// The store is shutting down (its runtime is going away); nothing was done.
    #[error("store is closed")]
    Closed,
    /// A key in a request is empty; etcd rejects empty keys too.
    #[error("store key is empty")]
    EmptyKey,
    /// A transaction's ops touch the same key more than once; nothing was done.
    #[error("transaction touches key {0:?} more than once; merge those ops into one")]
    DuplicateKey(String),
}

/// Durable, revisioned key-value state with etcd v3 semantics.
///
/// Dropping the future of a write does not cancel it: it may still commit.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key starting with `prefix`, sorted by key, and the store revision the snapshot was
    /// read at. A record that fails its checksum is left out and reported (log and
    /// [`StoreStats`]), so one damaged record does not hide the others.
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError>;
    /// Unconditional put; returns the new store revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Returns whether the key existed. Deleting an absent key changes nothing and does not
    /// advance the revision (as in etcd).
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Atomic: if every compare holds, apply all ops as ONE revision (all-or-nothing, durable
    /// before returning) and return Committed; else change nothing and return Conflict. An empty
    /// ops list (or one that changes nothing) with holding compares commits nothing and returns
    /// Committed with the current revision.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;
    /// Events for keys starting with `prefix` with revision > `after_revision`, in revision order,
    /// then live ones, without gaps or duplicates. The usual pattern:
    /// `(kvs, rev) = range(p); watch(p, rev)`. If events after `after_revision` are no longer
    /// retained, `Err(StoreError::Compacted{..})` and the caller re-ranges.
    ///
    /// The receiver closes (`recv()` returns `None`) when the watcher fell too far behind (its
    /// channel filled up) or the store shut down; the caller then re-ranges and watches again.
    async fn watch(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, StoreError>;
    /// Current store revision (0 for a store that was never written).
    async fn revision(&self) -> Result<u64, StoreError>;
    /// The store's health counters, shared with `/metrics`.
    fn stats(&self) -> Arc<StoreStats>;
    /// Whether writes succeed now. After a failed write the backend retries on its own (with
    /// back-off) on the next write or on this call, so this reports recovery even when nothing
    /// else writes.
    async fn check_writable(&self) -> StoreHealth;
    /// A consistent copy of the whole store as of one revision, in the backend's own file
    /// format (for redb: a store file `skymesh-controller restore` takes). It holds the CA key.
    async fn backup(&self) -> Result<Vec<u8>, StoreError>;
}

/// How many committed events a [`WatchHub`] retains for watchers that start behind.
const DEFAULT_WATCH_HISTORY: usize = 10_000;

/// Events a watcher may have queued, beyond its replay, before it is dropped as too slow.
const WATCH_CHANNEL_CAPACITY: usize = 1024;

/// In-memory watch fan-out for backends without native watch (redb; etcd has its own).
///
/// The backend calls [`WatchHub::publish`] once per committed revision, in commit order, while
/// still holding its write lock, so the hub sees every revision exactly once and in order. The hub
/// retains the latest events (whole revisions, about `history` events) so a watcher that starts
/// from a slightly older revision replays them before live ones. A watcher whose channel is full
/// or closed is dropped, never waited for: commits must not stall on a slow reader.
///
/// It holds no durable state: after a restart it starts empty at the store's current revision.
struct WatchHub {
    state: Mutex<HubState>,
}

struct HubState {
    /// Every event with a revision above this one is retained.
    compacted: u64,
    /// The newest published revision.
    last: u64,
    /// Retained events grouped by revision, oldest first.
    retained: VecDeque<(u64, Vec<WatchEvent>)>,
    retained_events: usize,
    history: usize,
    watchers: Vec<Watcher>,
}

struct Watcher {
    prefix: String,
    after: u64,
    tx: mpsc::Sender<WatchEvent>,
}

impl Watcher {
    /// Sends the events this watcher wants; false if it must be dropped (closed or too slow).
    fn offer(&self, events: &[WatchEvent]) -> bool {
        events
            .iter()
            .filter(|e| e.revision() > self.after && e.key().starts_with(&self.prefix))
            .all(|e| self.tx.try_send(e.clone()).is_ok())
    }
}

impl WatchHub {
    /// A hub for a store whose current revision is `revision`: nothing before it is replayable.
    fn new(revision: u64, history: usize) -> Self {
        Self {
            state: Mutex::new(HubState {
                compacted: revision,
                last: revision,
                retained: VecDeque::new(),
                retained_events: 0,
                history,
                watchers: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        // Nothing in the hub panics while holding the lock; if something did, its state is still
        // a valid (at worst truncated) history, so keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the events of committed `revision` and fans them out to live watchers.
    fn publish(&self, revision: u64, events: Vec<WatchEvent>) {
        let mut state = self.lock();
        if revision != state.last + 1 {
            // A revision went unpublished (a commit reported an error after all) or arrived out
            // of order. Watchers would silently miss events, so end them all: they re-range.
            tracing::warn!(
                revision,
                last_published = state.last,
                "watch hub saw a revision gap; closing all watchers"
            );
            state.watchers.clear();
            state.retained.clear();
            state.retained_events = 0;
            state.compacted = revision.saturating_sub(1);
        }
        state.last = revision;
        state
            .watchers
            .retain(|w| !w.tx.is_closed() && w.offer(&events));
        state.retained_events += events.len();
        state.retained.push_back((revision, events));
        while state.retained_events > state.history && state.retained.len() > 1 {
            if let Some((evicted, events)) = state.retained.pop_front() {
                state.retained_events -= events.len();
                state.compacted = evicted;
            }
        }
    }

    /// Registers a watcher for `prefix` from `after_revision`: retained events first, then live.
    fn watch(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        let mut state = self.lock();
        if after_revision < state.compacted {
            return Err(StoreError::Compacted {
                requested: after_revision,
                oldest: state.compacted,
            });
        }
        let replay: Vec<&WatchEvent> = state
            .retained
            .iter()
            .filter(|(revision, _)| *revision > after_revision)
            .flat_map(|(_, events)| events)
            .filter(|e| e.key().starts_with(prefix))
            .collect();
        // Room for the whole replay, so a watcher is never dropped before it starts.
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL_CAPACITY + replay.len());
        for event in replay {
            if tx.try_send(event.clone()).is_err() {
                unreachable!("the channel was sized for the replay and its receiver is held here");
            }
        }
        state.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            after: after_revision,
            tx,
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_event(key: &str, revision: u64) -> WatchEvent {
        WatchEvent::Put(KeyValue {
            key: key.to_owned(),
            value: revision.to_be_bytes().to_vec(),
            create_revision: revision,
            mod_revision: revision,
        })
    }

    fn drain(rx: &mut mpsc::Receiver<WatchEvent>) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        while let Ok(event) = rx.try_recv() {
            out.push((event.key().to_owned(), event.revision()));
        }
        out
    }

    #[test]
    fn txn_builder_collects_compares_and_ops_in_order() {
        let txn = Txn::new()
            .when_absent("/a")
            .when_revision("/b", 7)
            .put("/a", b"1".to_vec())
            .delete("/b");
        assert_eq!(
            txn.compares,
            vec![
                Compare::ModRevision {
                    key: "/a".into(),
                    revision: 0
                },
                Compare::ModRevision {
                    key: "/b".into(),
                    revision: 7
                },
            ]
        );
        assert_eq!(
            txn.ops,
            vec![
                Op::Put {
                    key: "/a".into(),
                    value: b"1".to_vec()
                },
                Op::Delete { key: "/b".into() },
            ]
        );
        assert!(txn.validate().is_ok());
    }

    #[test]
    fn txn_validation_rejects_empty_and_duplicate_keys() {
        assert!(matches!(
            Txn::new().put("", b"x".to_vec()).validate(),
            Err(StoreError::EmptyKey)
        ));
        assert!(matches!(
            Txn::new().when_absent("").validate(),
            Err(StoreError::EmptyKey)
        ));
        match Txn::new().put("/k", b"x".to_vec()).delete("/k").validate() {
            Err(StoreError::DuplicateKey(key)) => assert_eq!(key, "/k"),
            other => panic!("expected DuplicateKey, got {other:?}"),
        }
    }

    #[test]
    fn hub_replays_retained_events_after_the_revision_then_live_ones() {
        let hub = WatchHub::new(0, 100);
        hub.publish(1, vec![put_event("/n/a", 1)]);
        hub.publish(2, vec![put_event("/n/b", 2), put_event("/other", 2)]);
        let mut rx = hub.watch("/n/", 1).expect("watch");
        hub.publish(3, vec![put_event("/n/c", 3)]);
        assert_eq!(drain(&mut rx), vec![("/n/b".into(), 2), ("/n/c".into(), 3)]);
    }

    #[test]
    fn hub_does_not_send_live_events_at_or_below_the_start_revision() {
        // A backend may commit revision 2, let a reader range at 2 and watch from 2, and only
        // then publish 2: the watcher must not see it twice.
        let hub = WatchHub::new(1, 100);
        let mut rx = hub.watch("/", 2).expect("watch");
        hub.publish(2, vec![put_event("/a", 2)]);
        hub.publish(3, vec![put_event("/b", 3)]);
        assert_eq!(drain(&mut rx), vec![("/b".into(), 3)]);
    }

    #[test]
    fn hub_evicts_whole_revisions_and_reports_compacted() {
        let hub = WatchHub::new(0, 3);
        hub.publish(1, vec![put_event("/a", 1), put_event("/b", 1)]);
        hub.publish(2, vec![put_event("/c", 2)]);
        hub.publish(3, vec![put_event("/d", 3)]);
        // Four events retained > 3: revision 1 goes as a whole.
        match hub.watch("/", 0) {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (0, 1));
            }
            other => panic!("expected Compacted, got {other:?}"),
        }
        let mut rx = hub.watch("/", 1).expect("watch from the oldest retained");
        assert_eq!(drain(&mut rx), vec![("/c".into(), 2), ("/d".into(), 3)]);
    }

    #[test]
    fn hub_keeps_a_revision_larger_than_the_history() {
        let hub = WatchHub::new(0, 2);
        let big: Vec<WatchEvent> = (0..5).map(|i| put_event(&format!("/k{i}"), 1)).collect();
        hub.publish(1, big);
        let mut rx = hub.watch("/", 0).expect("watch");
        assert_eq!(drain(&mut rx).len(), 5);
    }

    #[test]
    fn hub_starts_compacted_at_its_initial_revision() {
        let hub = WatchHub::new(5, 100);
        assert!(matches!(
            hub.watch("/", 4),
            Err(StoreError::Compacted {
                requested: 4,
                oldest: 5
            })
        ));
        assert!(hub.watch("/", 5).is_ok());
        assert!(
            hub.watch("/", 9).is_ok(),
            "a future start revision is allowed"
        );
    }

    #[test]
    fn hub_drops_a_watcher_whose_channel_is_full_and_keeps_the_others() {
        let hub = WatchHub::new(0, 10);
        let mut slow = hub.watch("/", 0).expect("watch");
        let mut fast = hub.watch("/", 0).expect("watch");
        let total = WATCH_CHANNEL_CAPACITY as u64 + 1;
        let mut fast_seen = 0;
        for revision in 1..=total {
            hub.publish(revision, vec![put_event("/k", revision)]);
            fast_seen += drain(&mut fast).len();
        }
        assert_eq!(fast_seen as u64, total);
        // The slow watcher keeps what fitted, then sees its channel close: re-range time.
        assert_eq!(drain(&mut slow).len(), WATCH_CHANNEL_CAPACITY);
        assert!(matches!(
            slow.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert_eq!(hub.lock().watchers.len(), 1);
    }

    #[test]
    fn hub_forgets_watchers_whose_receiver_was_dropped() {
        let hub = WatchHub::new(0, 10);
        drop(hub.watch("/a/", 0).expect("watch"));
        // Even an event the watcher does not match prunes it.
        hub.publish(1, vec![put_event("/b", 1)]);
        assert!(hub.lock().watchers.is_empty());
    }

    #[test]
    fn hub_closes_watchers_on_a_revision_gap() {
        let hub = WatchHub::new(0, 10);
        let mut rx = hub.watch("/", 0).expect("watch");
        hub.publish(1, vec![put_event("/a", 1)]);
        hub.publish(3, vec![put_event("/c", 3)]);
        assert_eq!(drain(&mut rx), vec![("/a".into(), 1)]);
        assert!(matches!(
            rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert!(matches!(
            hub.watch("/", 1),
            Err(StoreError::Compacted {
                requested: 1,
                oldest: 2
            })
        ));
        let mut rx = hub.watch("/", 2).expect("watch after the gap");
        assert_eq!(drain(&mut rx), vec![("/c".into(), 3)]);
    }
}
