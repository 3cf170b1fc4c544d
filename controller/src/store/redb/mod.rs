//! [`RedbStore`]: the default [`Store`] backend, one embedded crash-safe redb file.
//!
//! Owns the on-disk layout: table `kv` maps each key to a `record` envelope
//! around `create_revision (u64 BE) ++ mod_revision (u64 BE) ++ value`; table `meta` holds the
//! store revision and the layout version. Every write is one redb transaction committed with
//! `Durability::Immediate` (fsync) before the call returns, so the revision, per-key revisions and
//! values all survive a crash together and the revision never goes back after a reopen.
//!
//! A write that fails in redb (a full disk, an I/O error) leaves redb refusing every later write
//! until the file is reopened, so the store then reopens it before the next write, backing off
//! between attempts, and reports itself not writable in [`StoreStats`] until a write succeeds.
//! Reads keep using the open file meanwhile.
//!
//! Watch history lives in the in-memory `WatchHub` and is not durable: after a reopen, watching
//! from before the current revision reports [`StoreError::Compacted`].
//!
//! Must not hold anything that matters only in memory besides that watch history.

mod backup;
mod file;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use ::redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::mpsc;

use super::health::{StoreHealth, StoreStats};
use super::{
    record, Compare, KeyValue, Op, Store, StoreError, Txn, TxnOutcome, WatchEvent, WatchHub,
    DEFAULT_WATCH_HISTORY,
};

pub use backup::{copy_stopped, is_in_use, is_store_own_name, restore, verify, Restored, Verified};
pub use file::refuse_dangling;

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `meta` key of the store revision: the revision of the latest committed write.
const REVISION: &str = "revision";
/// `meta` key of the on-disk layout version, so a future layout change is detected, not misread.
const LAYOUT: &str = "layout";
/// `meta` key a write probe rewrites to learn whether the file takes writes again.
const PROBE: &str = "write_probe";
/// 1: records without an envelope (read once, then rewritten as 2 at the first open);
/// 2: every record in a checksummed [`record`] envelope.
const LAYOUT_VERSION: u64 = 2;
const LEGACY_LAYOUT_VERSION: u64 = 1;
/// Bytes of revisions before the value in a record's payload.
const HEADER_LEN: usize = 16;
/// First wait before reopening after a failed write; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A [`Store`] in one redb file. Cheap to share behind an `Arc`; the file is locked against a
/// second opener until the store is dropped.
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Store operations running on blocking threads at once. Writes take one
    /// lock anyway; without a bound, a burst of them (a thousand agents
    /// registering) parks hundreds of blocking threads on it, each with its
    /// stack and allocator heap, which a controller keeps as memory.
    slots: tokio::sync::Semaphore,
    path: PathBuf,
    /// `None` only between closing the file after a failed write and a successful reopen.
    db: RwLock<Option<Database>>,
    /// Serialises commit + publish so the watch hub sees revisions in commit order (redb already
    /// admits one writer at a time, so this costs no concurrency), and holds the recovery state.
    writer: Mutex<Writer>,
    hub: WatchHub,
    stats: Arc<StoreStats>,
    /// Device and inode of the file opened at `path`: a path that no longer leads to it (the
    /// file removed or replaced) would take writes into an unlinked file, lost at the next start.
    identity: Mutex<file::Identity>,
    /// Set while `path` does not lead to the open file; writes are refused meanwhile.
    moved: std::sync::atomic::AtomicBool,
}

/// Set after a write failed in redb: the file must be reopened before the next write.
#[derive(Default)]
struct Writer {
    broken: Option<Broken>,
}

struct Broken {
    retry_at: Instant,
    backoff: Duration,
    reason: String,
}

/// What one write transaction did, before it is turned into the caller's answer.
enum Applied {
    Conflict,
    Committed { revision: u64, changed: usize },
}

/// See [`Inner::slots`].
const BLOCKING_SLOTS: usize = 4;

impl RedbStore {
    /// Opens the store file at `path`, creating it only when nothing exists there. A file that
    /// exists but is empty, truncated, damaged, not a store or locked by another process is
    /// refused ([`StoreError::Unusable`], [`StoreError::InUse`]), never re-initialised.
    /// Blocking: it may fsync; call it at startup or from `spawn_blocking`.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = file::open_or_create(path)?;
        let identity = file::identity(path)?;
        file::mark_created(path)?;
        let revision = file::prepare(&db, path)?;
        let stats = Arc::new(StoreStats::default());
        report_corrupt(&db, &stats)?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                slots: tokio::sync::Semaphore::new(BLOCKING_SLOTS),
                path: path.to_owned(),
                db: RwLock::new(Some(db)),
                writer: Mutex::new(Writer::default()),
                hub: WatchHub::new(revision, DEFAULT_WATCH_HISTORY),
                stats,
                identity: Mutex::new(identity),
                moved: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// Runs blocking redb work off the async runtime.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let _slot = self
            .inner
            .slots
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || work(&inner)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(StoreError::Closed),
        }
    }

    async fn write(&self, txn: Txn) -> Result<Applied, StoreError> {
        txn.validate()?;
        self.blocking(move |inner| inner.write(txn)).await
    }
}

impl Inner {
    /// Runs `work` on the open database; fails while it is being reopened.
    fn with_db<T>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let slot = self.db.read().unwrap_or_else(PoisonError::into_inner);
        match slot.as_ref() {
            Some(db) => work(db),
            None => Err(StoreError::Backend(format!(
                "store file {} is closed after a failed write and could not be reopened yet; \
                 it is retried with back-off",
                self.path.display()
            ))),
        }
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        // Writer state is replaced whole, and redb transactions are atomic, so a panic elsewhere
        // leaves nothing half-done behind this lock.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checks the compares and applies the ops in one redb transaction, then publishes the
    /// events, all under the writer lock. After a failed write, reopens the file first.
    fn write(&self, txn: Txn) -> Result<Applied, StoreError> {
        let mut writer = self.lock_writer();
        self.check_identity()?;
        self.recover(&mut writer)?;
        let result = self.with_db(|db| self.write_once(db, txn));
        self.account(&mut writer, result)
    }

    /// Notes the outcome of a write in the recovery state and the stats.
    fn account<T>(
        &self,
        writer: &mut Writer,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(value) => {
                writer.broken = None;
                if !self.stats.is_writable() {
                    self.stats.write_succeeded();
                }
                Ok(value)
            }
            Err(StoreError::Backend(reason)) => {
                let backoff = writer
                    .broken
                    .as_ref()
                    .map_or(FIRST_BACKOFF, |b| (b.backoff * 2).min(MAX_BACKOFF));
                self.stats.write_failed(&reason);
                writer.broken = Some(Broken {
                    retry_at: Instant::now() + backoff,
                    backoff,
                    reason: reason.clone(),
                });
                Err(StoreError::Backend(reason))
            }
            Err(other) => Err(other),
        }
    }

    /// Refuses while `path` does not lead to the open file (removed, or replaced by another),
    /// and reports it in the stats; clears that once the same file is back.
    fn check_identity(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let opened = *self.identity.lock().unwrap_or_else(PoisonError::into_inner);
        let problem = match file::identity(&self.path) {
            Ok(now) if now == opened => None,
            Ok(_) => Some("was replaced by another file"),
            Err(_) => Some("was removed"),
        };
        match problem {
            None => {
                if self.moved.swap(false, Ordering::AcqRel) {
                    self.stats.write_succeeded();
                }
                Ok(())
            }
            Some(what) => {
                let reason = format!(
                    "store file {} {what} while the controller runs (store_file_replaced); \
                     writes are refused so that nothing acknowledged is lost. Put the file back \
                     at that path, or stop the controller and restore a backup with \
                     `skymesh-controller restore`",
                    self.path.display()
                );
                self.moved.store(true, Ordering::Release);
                self.stats.write_failed(&reason);
                Err(StoreError::NotWritable(reason))
            }
        }
    }

    /// After a failed write: refuses until the back-off has passed, then reopens the file.
    fn recover(&self, writer: &mut Writer) -> Result<(), StoreError> {
        let Some(broken) = &writer.broken else {
            return Ok(());
        };
        let now = Instant::now();
        if now < broken.retry_at {
            return Err(StoreError::NotWritable(format!(
                "{}; the next attempt is in {} ms",
                broken.reason,
                (broken.retry_at - now).as_millis()
            )));
        }
        match self.reopen() {
            Ok(()) => Ok(()),
            // Whatever refused the reopen (a damaged file, ENOSPC during redb's repair), the
            // store stays not writable and backs off further.
            Err(e) => self.account(writer, Err(StoreError::Backend(e.to_string()))),
        }
    }

    /// Closes the database (redb refuses writes after an I/O error until then) and opens it
    /// again, with the same checks as at startup.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // Drop first: the file lock is released only when the old handle is gone.
        drop(slot.take());
        let db = file::open_existing(&self.path)?;
        file::check_layout(&db, &self.path)?;
        *self.identity.lock().unwrap_or_else(PoisonError::into_inner) = file::identity(&self.path)?;
        *slot = Some(db);
        tracing::info!(file = %self.path.display(), "reopened the state store after a failed write");
        Ok(())
    }

    /// Whether writes succeed; after a failed write, tries a reopen and a small write when the
    /// back-off allows, so recovery shows even when nothing else writes.
    fn check_writable(&self) -> StoreHealth {
        let mut writer = self.lock_writer();
        if self.check_identity().is_err() {
            return self.stats.health();
        }
        // A recovery error is either the back-off still running or a failed reopen, which
        // `recover` has accounted for already.
        if writer.broken.is_some() && self.recover(&mut writer).is_ok() {
            let probed = self.with_db(probe);
            let _ = self.account(&mut writer, probed);
        }
        self.stats.health()
    }

    fn write_once(&self, db: &Database, txn: Txn) -> Result<Applied, StoreError> {
        let wtx = db.begin_write().map_err(|e| backend("begin write", e))?;
        match stage(&wtx, txn)? {
            Staged::Conflict => {
                wtx.abort().map_err(|e| backend("abort", e))?;
                Ok(Applied::Conflict)
            }
            Staged::Unchanged { revision } => {
                wtx.abort().map_err(|e| backend("abort", e))?;
                Ok(Applied::Committed {
                    revision,
                    changed: 0,
                })
            }
            Staged::Changed { revision, events } => {
                wtx.commit().map_err(|e| backend("commit", e))?;
                let changed = events.len();
                for event in &events {
                    self.stats.record_replaced(event.key());
                }
                self.hub.publish(revision, events);
                Ok(Applied::Committed { revision, changed })
            }
        }
    }

    /// Reports a corrupt record and leaves it out; passes other errors on.
    fn skip_corrupt(
        &self,
        result: Result<KeyValue, StoreError>,
    ) -> Result<Option<KeyValue>, StoreError> {
        match result {
            Ok(kv) => Ok(Some(kv)),
            Err(StoreError::Corrupt { key, reason }) => {
                self.stats.corrupt_record(&key, &reason);
                Ok(None)
            }
            Err(other) => Err(other),
        }
    }
}

/// Checks every record once at open, so damage is in the log and the metrics from the start,
/// not only once something reads the key.
fn report_corrupt(db: &Database, stats: &StoreStats) -> Result<(), StoreError> {
    let rtx = db.begin_read().map_err(|e| backend("begin read", e))?;
    let kv = rtx
        .open_table(KV)
        .map_err(|e| backend("open kv table", e))?;
    for entry in kv.iter().map_err(|e| backend("read records", e))? {
        let (key, record) = entry.map_err(|e| backend("read records", e))?;
        if let Err(StoreError::Corrupt { key, reason }) = decode(key.value(), record.value()) {
            stats.corrupt_record(&key, &reason);
        }
    }
    Ok(())
}

/// A write that changes no key: rewrites the probe entry in `meta`.
fn probe(db: &Database) -> Result<(), StoreError> {
    let wtx = db.begin_write().map_err(|e| backend("begin write", e))?;
    {
        let mut meta = wtx
            .open_table(META)
            .map_err(|e| backend("open meta table", e))?;
        let previous = meta
            .get(PROBE)
            .map_err(|e| backend("read write probe", e))?
            .map_or(0, |v| v.value());
        meta.insert(PROBE, previous.wrapping_add(1))
            .map_err(|e| backend("write probe", e))?;
    }
    wtx.commit().map_err(|e| backend("commit write probe", e))
}

enum Staged {
    Conflict,
    Unchanged {
        revision: u64,
    },
    Changed {
        revision: u64,
        events: Vec<WatchEvent>,
    },
}

/// Evaluates `txn` inside `wtx`; on success the writes are staged but not yet committed.
fn stage(wtx: &WriteTransaction, txn: Txn) -> Result<Staged, StoreError> {
    let mut kv = wtx
        .open_table(KV)
        .map_err(|e| backend("open kv table", e))?;
    let mut meta = wtx
        .open_table(META)
        .map_err(|e| backend("open meta table", e))?;
    let current = read_revision(&meta)?;

    for compare in &txn.compares {
        match compare {
            Compare::ModRevision { key, revision } => {
                let actual = read_key(&kv, key)?.map_or(0, |found| found.mod_revision);
                if actual != *revision {
                    return Ok(Staged::Conflict);
                }
            }
        }
    }

    let next = current
        .checked_add(1)
        .ok_or_else(|| StoreError::Backend("store revision overflowed u64".into()))?;
    let mut events = Vec::with_capacity(txn.ops.len());
    for op in txn.ops {
        match op {
            Op::Put { key, value } => {
                let create_revision =
                    read_key(&kv, &key)?.map_or(next, |found| found.create_revision);
                let record = encode(&key, create_revision, next, &value);
                kv.insert(key.as_str(), record.as_slice())
                    .map_err(|e| backend("write key", e))?;
                events.push(WatchEvent::Put(KeyValue {
                    key,
                    value,
                    create_revision,
                    mod_revision: next,
                }));
            }
            Op::Delete { key } => {
                let existed = kv
                    .remove(key.as_str())
                    .map_err(|e| backend("delete key", e))?
                    .is_some();
                if existed {
                    events.push(WatchEvent::Delete {
                        key,
                        revision: next,
                    });
                }
            }
        }
    }
    if events.is_empty() {
        return Ok(Staged::Unchanged { revision: current });
    }
    meta.insert(REVISION, next)
        .map_err(|e| backend("write revision", e))?;
    Ok(Staged::Changed {
        revision: next,
        events,
    })
}

fn read_revision(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64, StoreError> {
    Ok(meta
        .get(REVISION)
        .map_err(|e| backend("read revision", e))?
        .map_or(0, |v| v.value()))
}

/// Partial view of a stored key: its revisions, for compares and create_revision carry-over.
struct Revisions {
    create_revision: u64,
    mod_revision: u64,
}

fn read_key(
    kv: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Revisions>, StoreError> {
    let Some(guard) = kv.get(key).map_err(|e| backend("read key", e))? else {
        return Ok(None);
    };
    let found = decode(key, guard.value())?;
    Ok(Some(Revisions {
        create_revision: found.create_revision,
        mod_revision: found.mod_revision,
    }))
}

fn encode(key: &str, create_revision: u64, mod_revision: u64, value: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(HEADER_LEN + value.len());
    payload.extend_from_slice(&create_revision.to_be_bytes());
    payload.extend_from_slice(&mod_revision.to_be_bytes());
    payload.extend_from_slice(value);
    record::seal(key, &payload)
}

fn decode(key: &str, record: &[u8]) -> Result<KeyValue, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.to_owned(),
        reason,
    };
    let payload = record::open(key, record).map_err(|damage| corrupt(damage.to_string()))?;
    let short = || {
        corrupt(format!(
            "payload of {} bytes is shorter than its {HEADER_LEN}-byte revision header",
            payload.len()
        ))
    };
    let (create, rest) = payload.split_first_chunk::<8>().ok_or_else(short)?;
    let (modified, value) = rest.split_first_chunk::<8>().ok_or_else(short)?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: value.to_vec(),
        create_revision: u64::from_be_bytes(*create),
        mod_revision: u64::from_be_bytes(*modified),
    })
}

fn backend(context: impl std::fmt::Display, error: impl Into<::redb::Error>) -> StoreError {
    StoreError::Backend(format!("{context}: {}", error.into()))
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |inner| {
            let found = inner.with_db(|db| {
                let rtx = db.begin_read().map_err(|e| backend("begin read", e))?;
                let kv = rtx
                    .open_table(KV)
                    .map_err(|e| backend("open kv table", e))?;
                let Some(guard) = kv.get(key.as_str()).map_err(|e| backend("read key", e))? else {
                    return Ok(None);
                };
                decode(&key, guard.value()).map(Some)
            });
            if let Err(StoreError::Corrupt { key, reason }) = &found {
                inner.stats.corrupt_record(key, reason);
            }
            found
        })
        .await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |inner| {
            inner.with_db(|db| {
                // One read transaction: the keys and the revision come from the same snapshot.
                let rtx = db.begin_read().map_err(|e| backend("begin read", e))?;
                let kv = rtx
                    .open_table(KV)
                    .map_err(|e| backend("open kv table", e))?;
                let meta = rtx
                    .open_table(META)
                    .map_err(|e| backend("open meta table", e))?;
                let revision = read_revision(&meta)?;
                let mut found = Vec::new();
                for entry in kv
                    .range(prefix.as_str()..)
                    .map_err(|e| backend("range", e))?
                {
                    let (key, record) = entry.map_err(|e| backend("range", e))?;
                    let key = key.value();
                    if !key.starts_with(prefix.as_str()) {
                        break;
                    }
                    found.extend(inner.skip_corrupt(decode(key, record.value()))?);
                }
                Ok((found, revision))
            })
        })
        .await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        match self.write(Txn::new().put(key, value)).await? {
            Applied::Committed { revision, .. } => Ok(revision),
            Applied::Conflict => Err(StoreError::Backend(
                "unconditional put reported a conflict".into(),
            )),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        match self.write(Txn::new().delete(key)).await? {
            Applied::Committed { changed, .. } => Ok(changed > 0),
            Applied::Conflict => Err(StoreError::Backend(
                "unconditional delete reported a conflict".into(),
            )),
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        Ok(match self.write(txn).await? {
            Applied::Committed { revision, .. } => TxnOutcome::Committed { revision },
            Applied::Conflict => TxnOutcome::Conflict,
        })
    }

    async fn watch(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<mpsc::Receiver<WatchEvent>, StoreError> {
        self.inner.hub.watch(prefix, after_revision)
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        self.blocking(|inner| {
            inner.with_db(|db| {
                let rtx = db.begin_read().map_err(|e| backend("begin read", e))?;
                let meta = rtx
                    .open_table(META)
                    .map_err(|e| backend("open meta table", e))?;
                read_revision(&meta)
            })
        })
        .await
    }

    fn stats(&self) -> Arc<StoreStats> {
        Arc::clone(&self.inner.stats)
    }

    async fn check_writable(&self) -> StoreHealth {
        self.blocking(|inner| Ok(inner.check_writable()))
            .await
            .unwrap_or_else(|e| StoreHealth::NotWritable {
                reason: e.to_string(),
            })
    }

    async fn backup(&self) -> Result<Vec<u8>, StoreError> {
        self.blocking(|inner| inner.with_db(|db| backup::snapshot(db, &inner.stats)))
            .await
    }
}
