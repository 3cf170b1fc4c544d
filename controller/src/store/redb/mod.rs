//! [`RedbStore`]: the default [`Store`] backend, one embedded crash-safe redb file.
//!
//! Owns the on-disk layout: table `kv` maps each key to `create_revision (u64 BE) ++
//! mod_revision (u64 BE) ++ value`, table `meta` holds the store revision and the layout version.
//! Every write is one redb transaction committed with `Durability::Immediate` (fsync) before the
//! call returns, so the revision, per-key revisions and values all survive a crash together and
//! the revision never goes back after a reopen.
//!
//! Watch history lives in the in-memory [`WatchHub`] and is not durable: after a reopen, watching
//! from before the current revision reports [`StoreError::Compacted`].
//!
//! Must not hold anything that matters only in memory besides that watch history.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use ::redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::mpsc;

use super::{
    Compare, KeyValue, Op, Store, StoreError, Txn, TxnOutcome, WatchEvent, WatchHub,
    DEFAULT_WATCH_HISTORY,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `meta` key of the store revision: the revision of the latest committed write.
const REVISION: &str = "revision";
/// `meta` key of the on-disk layout version, so a future layout change is detected, not misread.
const LAYOUT: &str = "layout";
const LAYOUT_VERSION: u64 = 1;
/// Bytes of revisions before the value in a `kv` record.
const HEADER_LEN: usize = 16;

/// A [`Store`] in one redb file. Cheap to share behind an `Arc`; the file is locked against a
/// second opener until the store is dropped.
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Serialises commit + publish so the watch hub sees revisions in commit order. redb already
    /// admits one writer at a time, so this costs no concurrency.
    write_lock: Mutex<()>,
    hub: WatchHub,
}

/// What one write transaction did, before it is turned into the caller's answer.
enum Applied {
    Conflict,
    Committed { revision: u64, changed: usize },
}

impl RedbStore {
    /// Opens (or creates) the store file at `path`. Blocking: it may fsync; call it at startup or
    /// from `spawn_blocking`.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db =
            Database::create(path).map_err(|e| backend(format!("open {}", path.display()), e))?;
        let wtx = db.begin_write().map_err(|e| backend("begin write", e))?;
        let revision = {
            // Creates both tables on first open, so readers never meet a missing table.
            wtx.open_table(KV)
                .map_err(|e| backend("open kv table", e))?;
            let mut meta = wtx
                .open_table(META)
                .map_err(|e| backend("open meta table", e))?;
            let layout = meta
                .get(LAYOUT)
                .map_err(|e| backend("read layout version", e))?
                .map(|v| v.value());
            match layout {
                None => {
                    meta.insert(LAYOUT, LAYOUT_VERSION)
                        .map_err(|e| backend("write layout version", e))?;
                }
                Some(LAYOUT_VERSION) => {}
                Some(other) => {
                    return Err(StoreError::Backend(format!(
                        "{} has store layout version {other}, this controller reads version \
                         {LAYOUT_VERSION}; run a matching controller version",
                        path.display()
                    )));
                }
            }
            read_revision(&meta)?
        };
        wtx.commit().map_err(|e| backend("commit", e))?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                db,
                write_lock: Mutex::new(()),
                hub: WatchHub::new(revision, DEFAULT_WATCH_HISTORY),
            }),
        })
    }

    /// Runs blocking redb work off the async runtime.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
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
    /// Checks the compares and applies the ops in one redb transaction, then publishes the
    /// events, all under `write_lock`.
    fn write(&self, txn: Txn) -> Result<Applied, StoreError> {
        // The guarded data is `()` and redb transactions are atomic, so a panic elsewhere leaves
        // nothing half-done behind this lock.
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let wtx = self
            .db
            .begin_write()
            .map_err(|e| backend("begin write", e))?;
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
                self.hub.publish(revision, events);
                Ok(Applied::Committed { revision, changed })
            }
        }
    }

    fn read_revision(&self) -> Result<u64, StoreError> {
        let rtx = self.db.begin_read().map_err(|e| backend("begin read", e))?;
        let meta = rtx
            .open_table(META)
            .map_err(|e| backend("open meta table", e))?;
        read_revision(&meta)
    }
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
                let record = encode(create_revision, next, &value);
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

fn encode(create_revision: u64, mod_revision: u64, value: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(HEADER_LEN + value.len());
    record.extend_from_slice(&create_revision.to_be_bytes());
    record.extend_from_slice(&mod_revision.to_be_bytes());
    record.extend_from_slice(value);
    record
}

fn decode(key: &str, record: &[u8]) -> Result<KeyValue, StoreError> {
    let corrupt = || {
        StoreError::Backend(format!(
            "record of key {key:?} is corrupt: {} bytes, shorter than its {HEADER_LEN}-byte header",
            record.len()
        ))
    };
    let (create, rest) = record.split_first_chunk::<8>().ok_or_else(corrupt)?;
    let (modified, value) = rest.split_first_chunk::<8>().ok_or_else(corrupt)?;
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
            let rtx = inner
                .db
                .begin_read()
                .map_err(|e| backend("begin read", e))?;
            let kv = rtx
                .open_table(KV)
                .map_err(|e| backend("open kv table", e))?;
            let Some(guard) = kv.get(key.as_str()).map_err(|e| backend("read key", e))? else {
                return Ok(None);
            };
            decode(&key, guard.value()).map(Some)
        })
        .await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |inner| {
            // One read transaction: the keys and the revision come from the same snapshot.
            let rtx = inner
                .db
                .begin_read()
                .map_err(|e| backend("begin read", e))?;
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
                found.push(decode(key, record.value())?);
            }
            Ok((found, revision))
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
        self.blocking(|inner| inner.read_revision()).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    use super::*;

    /// A fresh store in its own temp dir; the dir lives as long as the returned guard.
    fn fresh() -> (tempfile::TempDir, PathBuf, RedbStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        let store = RedbStore::open(&path).expect("open");
        (dir, path, store)
    }

    fn drain(rx: &mut mpsc::Receiver<WatchEvent>) -> Vec<WatchEvent> {
        let mut out = Vec::new();
        while let Ok(event) = rx.try_recv() {
            out.push(event);
        }
        out
    }

    fn kv(key: &str, value: &[u8], create_revision: u64, mod_revision: u64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision,
            mod_revision,
        }
    }

    #[tokio::test]
    async fn put_get_delete_and_revision_semantics() {
        let (_dir, _path, store) = fresh();
        assert_eq!(store.revision().await.expect("revision"), 0);
        assert_eq!(store.get("/skymesh/nodes/aws-gw").await.expect("get"), None);

        assert_eq!(
            store
                .put("/skymesh/nodes/aws-gw", b"v1".to_vec())
                .await
                .expect("put"),
            1
        );
        assert_eq!(
            store.get("/skymesh/nodes/aws-gw").await.expect("get"),
            Some(kv("/skymesh/nodes/aws-gw", b"v1", 1, 1))
        );
        assert_eq!(store.revision().await.expect("revision"), 1);

        assert!(store.delete("/skymesh/nodes/aws-gw").await.expect("delete"));
        assert_eq!(store.revision().await.expect("revision"), 2);
        assert_eq!(store.get("/skymesh/nodes/aws-gw").await.expect("get"), None);

        // As in etcd, deleting an absent key reports it and does not burn a revision.
        assert!(!store.delete("/skymesh/nodes/aws-gw").await.expect("delete"));
        assert_eq!(store.revision().await.expect("revision"), 2);
    }

    #[tokio::test]
    async fn create_revision_stays_until_delete_and_mod_revision_follows_each_write() {
        let (_dir, _path, store) = fresh();
        store.put("/a", b"1".to_vec()).await.expect("put");
        store.put("/b", b"1".to_vec()).await.expect("put");
        store.put("/a", b"2".to_vec()).await.expect("put");
        assert_eq!(
            store.get("/a").await.expect("get"),
            Some(kv("/a", b"2", 1, 3))
        );
        assert_eq!(
            store.get("/b").await.expect("get"),
            Some(kv("/b", b"1", 2, 2))
        );

        store.delete("/a").await.expect("delete");
        store.put("/a", b"3".to_vec()).await.expect("put");
        assert_eq!(
            store.get("/a").await.expect("get"),
            Some(kv("/a", b"3", 5, 5)),
            "a re-created key starts a new life"
        );
    }

    #[tokio::test]
    async fn create_if_absent_commits_once_then_conflicts() {
        let (_dir, _path, store) = fresh();
        let create = |value: &[u8]| {
            Txn::new()
                .when_absent("/skymesh/ipam/10.0.0.1")
                .put("/skymesh/ipam/10.0.0.1", value.to_vec())
        };
        assert_eq!(
            store.txn(create(b"node-a")).await.expect("txn"),
            TxnOutcome::Committed { revision: 1 }
        );
        assert_eq!(
            store.txn(create(b"node-b")).await.expect("txn"),
            TxnOutcome::Conflict
        );
        assert_eq!(
            store.get("/skymesh/ipam/10.0.0.1").await.expect("get"),
            Some(kv("/skymesh/ipam/10.0.0.1", b"node-a", 1, 1))
        );
        assert_eq!(store.revision().await.expect("revision"), 1);
    }

    #[tokio::test]
    async fn compare_on_mod_revision_guards_updates_and_deletes() {
        let (_dir, _path, store) = fresh();
        let rev = store.put("/k", b"1".to_vec()).await.expect("put");
        store.put("/other", b"x".to_vec()).await.expect("put");

        // The store revision moved, but /k's mod_revision did not: the compare still holds.
        let update = Txn::new().when_revision("/k", rev).put("/k", b"2".to_vec());
        assert_eq!(
            store.txn(update.clone()).await.expect("txn"),
            TxnOutcome::Committed { revision: 3 }
        );
        assert_eq!(store.txn(update).await.expect("txn"), TxnOutcome::Conflict);

        let stale_delete = Txn::new().when_revision("/k", rev).delete("/k");
        assert_eq!(
            store.txn(stale_delete).await.expect("txn"),
            TxnOutcome::Conflict
        );
        let delete = Txn::new().when_revision("/k", 3).delete("/k");
        assert_eq!(
            store.txn(delete).await.expect("txn"),
            TxnOutcome::Committed { revision: 4 }
        );
        assert_eq!(store.get("/k").await.expect("get"), None);
    }

    #[tokio::test]
    async fn failed_compare_changes_nothing_and_emits_nothing() {
        let (_dir, _path, store) = fresh();
        store.put("/keep", b"old".to_vec()).await.expect("put");
        store.put("/gone", b"old".to_vec()).await.expect("put");
        let mut watch = store.watch("/", 2).await.expect("watch");

        // One compare holds, one fails: the whole transaction is off.
        let txn = Txn::new()
            .when_revision("/keep", 1)
            .when_absent("/gone")
            .put("/keep", b"new".to_vec())
            .put("/fresh", b"new".to_vec())
            .delete("/gone");
        assert_eq!(store.txn(txn).await.expect("txn"), TxnOutcome::Conflict);

        let (kvs, revision) = store.range("/").await.expect("range");
        assert_eq!(revision, 2);
        assert_eq!(
            kvs,
            vec![kv("/gone", b"old", 2, 2), kv("/keep", b"old", 1, 1)]
        );
        assert_eq!(drain(&mut watch), vec![]);
    }

    #[tokio::test]
    async fn txn_applies_all_ops_as_one_revision() {
        let (_dir, _path, store) = fresh();
        store.put("/n/old", b"x".to_vec()).await.expect("put");
        store.put("/n/keep", b"x".to_vec()).await.expect("put");
        let mut watch = store.watch("/n/", 2).await.expect("watch");

        let txn = Txn::new()
            .when_absent("/n/a")
            .put("/n/a", b"a".to_vec())
            .put("/n/keep", b"y".to_vec())
            .delete("/n/old")
            .put("/n/b", b"b".to_vec());
        assert_eq!(
            store.txn(txn).await.expect("txn"),
            TxnOutcome::Committed { revision: 3 }
        );
        let (kvs, revision) = store.range("/n/").await.expect("range");
        assert_eq!(revision, 3);
        assert_eq!(
            kvs,
            vec![
                kv("/n/a", b"a", 3, 3),
                kv("/n/b", b"b", 3, 3),
                kv("/n/keep", b"y", 2, 3),
            ]
        );
        // One revision, events in op order.
        assert_eq!(
            drain(&mut watch),
            vec![
                WatchEvent::Put(kv("/n/a", b"a", 3, 3)),
                WatchEvent::Put(kv("/n/keep", b"y", 2, 3)),
                WatchEvent::Delete {
                    key: "/n/old".into(),
                    revision: 3
                },
                WatchEvent::Put(kv("/n/b", b"b", 3, 3)),
            ]
        );
    }

    #[tokio::test]
    async fn txn_that_changes_nothing_commits_at_the_current_revision() {
        let (_dir, _path, store) = fresh();
        store.put("/k", b"1".to_vec()).await.expect("put");
        assert_eq!(
            store
                .txn(Txn::new().when_revision("/k", 1))
                .await
                .expect("txn"),
            TxnOutcome::Committed { revision: 1 }
        );
        assert_eq!(
            store
                .txn(Txn::new().when_revision("/k", 9))
                .await
                .expect("txn"),
            TxnOutcome::Conflict
        );
        assert_eq!(
            store.txn(Txn::new().delete("/absent")).await.expect("txn"),
            TxnOutcome::Committed { revision: 1 }
        );
        assert_eq!(store.revision().await.expect("revision"), 1);
        // The next real write takes the next revision: no hole was left.
        assert_eq!(store.put("/k", b"2".to_vec()).await.expect("put"), 2);
    }

    #[tokio::test]
    async fn invalid_requests_are_rejected_before_touching_the_store() {
        let (_dir, _path, store) = fresh();
        assert!(matches!(
            store.put("", b"x".to_vec()).await,
            Err(StoreError::EmptyKey)
        ));
        assert!(matches!(store.delete("").await, Err(StoreError::EmptyKey)));
        match store
            .txn(Txn::new().put("/k", b"1".to_vec()).put("/k", b"2".to_vec()))
            .await
        {
            Err(StoreError::DuplicateKey(key)) => assert_eq!(key, "/k"),
            other => panic!("expected DuplicateKey, got {other:?}"),
        }
        assert_eq!(store.revision().await.expect("revision"), 0);
        assert_eq!(store.get("/k").await.expect("get"), None);
    }

    #[tokio::test]
    async fn range_is_sorted_and_stops_at_the_prefix_boundary() {
        let (_dir, _path, store) = fresh();
        for key in [
            "/a/bc", "/a/b/z", "/a/b", "/a/b/a", "/a/b0", "/a/c", "/a/b/m/n", "/",
        ] {
            store.put(key, key.as_bytes().to_vec()).await.expect("put");
        }
        let keys = |kvs: Vec<KeyValue>| kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>();

        let (kvs, revision) = store.range("/a/b/").await.expect("range");
        assert_eq!(revision, 8);
        assert_eq!(keys(kvs), vec!["/a/b/a", "/a/b/m/n", "/a/b/z"]);

        let (kvs, _) = store.range("/a/b").await.expect("range");
        assert_eq!(
            keys(kvs),
            vec!["/a/b", "/a/b/a", "/a/b/m/n", "/a/b/z", "/a/b0", "/a/bc"]
        );
        let (kvs, _) = store.range("").await.expect("range");
        assert_eq!(kvs.len(), 8);
        let (kvs, revision) = store.range("/zzz/").await.expect("range");
        assert_eq!((kvs, revision), (vec![], 8));
    }

    #[tokio::test]
    async fn data_and_revision_survive_reopen_and_the_revision_keeps_growing() {
        let (_dir, path, store) = fresh();
        store
            .put("/skymesh/nodes/a", b"a".to_vec())
            .await
            .expect("put");
        store
            .put("/skymesh/nodes/b", b"b".to_vec())
            .await
            .expect("put");
        store
            .put("/skymesh/nodes/a", b"a2".to_vec())
            .await
            .expect("put");
        store.delete("/skymesh/nodes/b").await.expect("delete");
        drop(store);

        let store = RedbStore::open(&path).expect("reopen");
        assert_eq!(store.revision().await.expect("revision"), 4);
        let (kvs, revision) = store.range("/skymesh/").await.expect("range");
        assert_eq!(revision, 4);
        assert_eq!(kvs, vec![kv("/skymesh/nodes/a", b"a2", 1, 3)]);
        assert_eq!(
            store
                .put("/skymesh/nodes/b", b"b2".to_vec())
                .await
                .expect("put"),
            5,
            "a revision is never reused"
        );
        drop(store);

        let store = RedbStore::open(&path).expect("reopen again");
        assert_eq!(
            store.get("/skymesh/nodes/b").await.expect("get"),
            Some(kv("/skymesh/nodes/b", b"b2", 5, 5))
        );
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_file_is_refused_while_the_first_lives() {
        let (_dir, path, _store) = fresh();
        match RedbStore::open(&path) {
            Err(StoreError::Backend(message)) => {
                assert!(message.contains("state.redb"), "{message}")
            }
            Err(other) => panic!("expected Backend, got {other:?}"),
            Ok(_) => panic!("two stores on one file"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_create_if_absent_commits_exactly_once() {
        let (_dir, _path, store) = fresh();
        let store: Arc<dyn Store> = Arc::new(store);
        let tasks: Vec<_> = (0..200u32)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let txn = Txn::new()
                        .when_absent("/skymesh/ipam/10.0.0.7")
                        .put("/skymesh/ipam/10.0.0.7", i.to_be_bytes().to_vec());
                    store.txn(txn).await.expect("txn")
                })
            })
            .collect();
        let mut winners = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            if let TxnOutcome::Committed { revision } = task.await.expect("join") {
                winners.push((i, revision));
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        let (winner, revision) = winners[0];
        assert_eq!(revision, 1);
        let stored = store.get("/skymesh/ipam/10.0.0.7").await.expect("get");
        assert_eq!(
            stored.map(|kv| kv.value),
            Some((winner as u32).to_be_bytes().to_vec())
        );
        assert_eq!(store.revision().await.expect("revision"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_cas_increments_lose_no_update() {
        let (_dir, _path, store) = fresh();
        let store: Arc<dyn Store> = Arc::new(store);
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    loop {
                        let current = store.get("/counter").await.expect("get");
                        let (count, seen) = match &current {
                            Some(kv) => {
                                let bytes: [u8; 8] = kv.value.as_slice().try_into().expect("u64");
                                (u64::from_be_bytes(bytes), kv.mod_revision)
                            }
                            None => (0, 0),
                        };
                        let txn = Txn::new()
                            .when_revision("/counter", seen)
                            .put("/counter", (count + 1).to_be_bytes().to_vec());
                        if store.txn(txn).await.expect("txn").is_committed() {
                            return;
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("join");
        }
        let counter = store.get("/counter").await.expect("get").expect("counter");
        let bytes: [u8; 8] = counter.value.as_slice().try_into().expect("u64");
        assert_eq!(u64::from_be_bytes(bytes), 200);
        assert_eq!((counter.create_revision, counter.mod_revision), (1, 200));
        assert_eq!(store.revision().await.expect("revision"), 200);
    }

    #[tokio::test]
    async fn watch_replays_from_a_revision_then_streams_live_events() {
        let (_dir, _path, store) = fresh();
        store.put("/n/a", b"1".to_vec()).await.expect("put");
        store.put("/n/b", b"1".to_vec()).await.expect("put");
        store.delete("/n/a").await.expect("delete");

        let mut watch = store.watch("/n/", 1).await.expect("watch");
        assert_eq!(
            drain(&mut watch),
            vec![
                WatchEvent::Put(kv("/n/b", b"1", 2, 2)),
                WatchEvent::Delete {
                    key: "/n/a".into(),
                    revision: 3
                },
            ]
        );
        store.put("/n/b", b"2".to_vec()).await.expect("put");
        // Published before put returns: no waiting needed.
        assert_eq!(
            drain(&mut watch),
            vec![WatchEvent::Put(kv("/n/b", b"2", 2, 4))]
        );
        let mut from_now = store.watch("/n/", 4).await.expect("watch");
        assert_eq!(drain(&mut from_now), vec![]);
    }

    #[tokio::test]
    async fn watch_sees_only_its_prefix() {
        let (_dir, _path, store) = fresh();
        let mut nodes = store.watch("/skymesh/nodes/", 0).await.expect("watch");
        let mut everything = store.watch("", 0).await.expect("watch");
        store
            .put("/skymesh/nodes/a", b"1".to_vec())
            .await
            .expect("put");
        store
            .put("/skymesh/nodesx", b"1".to_vec())
            .await
            .expect("put");
        store
            .put("/skymesh/certs/a", b"1".to_vec())
            .await
            .expect("put");
        let txn = Txn::new()
            .put("/skymesh/certs/b", b"1".to_vec())
            .put("/skymesh/nodes/b", b"1".to_vec());
        store.txn(txn).await.expect("txn");

        let keys = |events: Vec<WatchEvent>| {
            events
                .iter()
                .map(|e| (e.key().to_owned(), e.revision()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(drain(&mut nodes)),
            vec![
                ("/skymesh/nodes/a".into(), 1),
                ("/skymesh/nodes/b".into(), 4)
            ]
        );
        assert_eq!(drain(&mut everything).len(), 5);
    }

    #[tokio::test]
    async fn watch_from_before_a_reopen_reports_compacted() {
        let (_dir, path, store) = fresh();
        store.put("/k", b"1".to_vec()).await.expect("put");
        store.put("/k", b"2".to_vec()).await.expect("put");
        drop(store);

        let store = RedbStore::open(&path).expect("reopen");
        match store.watch("/", 1).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (1, 2));
            }
            other => panic!("expected Compacted, got {other:?}"),
        }
        // The documented recovery: re-range, watch from the range's revision.
        let (kvs, revision) = store.range("/").await.expect("range");
        assert_eq!(kvs, vec![kv("/k", b"2", 1, 2)]);
        let mut watch = store.watch("/", revision).await.expect("watch");
        store.put("/k", b"3".to_vec()).await.expect("put");
        assert_eq!(
            drain(&mut watch),
            vec![WatchEvent::Put(kv("/k", b"3", 1, 3))]
        );
    }

    #[tokio::test]
    async fn dropping_the_store_closes_its_watchers() {
        let (_dir, _path, store) = fresh();
        let mut watch = store.watch("/", 0).await.expect("watch");
        store.put("/k", b"1".to_vec()).await.expect("put");
        drop(store);
        assert!(watch.recv().await.is_some());
        assert!(watch.recv().await.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn range_then_watch_during_concurrent_writes_misses_and_repeats_nothing() {
        const WRITES: u64 = 300;
        let (_dir, _path, store) = fresh();
        let store = Arc::new(store);
        let writer = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for i in 0..WRITES {
                    store
                        .put(&format!("/w/{i:04}"), b"x".to_vec())
                        .await
                        .expect("put");
                }
            })
        };
        // Start reading while the writer is mid-way.
        while store.revision().await.expect("revision") < WRITES / 3 {
            tokio::task::yield_now().await;
        }
        let (kvs, revision) = store.range("/w/").await.expect("range");
        let mut watch = store.watch("/w/", revision).await.expect("watch");
        writer.await.expect("writer");

        let mut seen: Vec<String> = kvs.into_iter().map(|kv| kv.key).collect();
        let mut last = revision;
        for event in drain(&mut watch) {
            assert_eq!(
                event.revision(),
                last + 1,
                "events arrive in order without gaps"
            );
            last = event.revision();
            seen.push(event.key().to_owned());
        }
        assert_eq!(last, WRITES);
        let unique: BTreeSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "no key seen twice");
        assert_eq!(seen.len() as u64, WRITES);
    }

    #[tokio::test]
    async fn a_corrupt_record_is_reported_not_misread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        drop(RedbStore::open(&path).expect("open"));
        {
            let db = Database::create(&path).expect("raw open");
            let wtx = db.begin_write().expect("begin");
            wtx.open_table(KV)
                .expect("table")
                .insert("/bad", [1u8, 2, 3].as_slice())
                .expect("insert");
            wtx.commit().expect("commit");
        }
        let store = RedbStore::open(&path).expect("open");
        match store.get("/bad").await {
            Err(StoreError::Backend(message)) => assert!(message.contains("/bad"), "{message}"),
            other => panic!("expected Backend, got {other:?}"),
        }
        assert!(matches!(
            store.range("/").await,
            Err(StoreError::Backend(_))
        ));
    }

    #[tokio::test]
    async fn a_file_with_another_layout_version_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        {
            let db = Database::create(&path).expect("raw open");
            let wtx = db.begin_write().expect("begin");
            wtx.open_table(META)
                .expect("table")
                .insert(LAYOUT, LAYOUT_VERSION + 1)
                .expect("insert");
            wtx.commit().expect("commit");
        }
        match RedbStore::open(&path) {
            Err(StoreError::Backend(message)) => {
                assert!(message.contains("layout version 2"), "{message}");
            }
            Err(other) => panic!("expected Backend, got {other:?}"),
            Ok(_) => panic!("opened a file with an unknown layout"),
        }
    }
}
