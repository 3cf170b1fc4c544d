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
        Err(e @ StoreError::InUse { .. }) => {
            assert!(e.to_string().contains("state.redb"), "{e}")
        }
        Err(other) => panic!("expected InUse, got {other:?}"),
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
async fn a_corrupt_record_is_reported_and_left_out_of_ranges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let store = RedbStore::open(&path).expect("open");
    store.put("/t/a", b"a".to_vec()).await.expect("put");
    store.put("/t/c", b"c".to_vec()).await.expect("put");
    drop(store);
    {
        let db = Database::create(&path).expect("raw open");
        let wtx = db.begin_write().expect("begin");
        wtx.open_table(KV)
            .expect("table")
            .insert("/t/b", [1u8, 2, 3].as_slice())
            .expect("insert");
        wtx.commit().expect("commit");
    }
    let store = RedbStore::open(&path).expect("open");
    match store.get("/t/b").await {
        Err(e @ StoreError::Corrupt { .. }) => assert!(e.to_string().contains("/t/b"), "{e}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let (kvs, _) = store.range("/t/").await.expect("range answers");
    let keys: Vec<_> = kvs.into_iter().map(|kv| kv.key).collect();
    assert_eq!(keys, vec!["/t/a", "/t/c"]);
    assert_eq!(store.stats().corrupt_keys(), vec!["/t/b".to_owned()]);
    // Deleting the damaged key clears the report.
    assert!(store.delete("/t/b").await.expect("delete"));
    assert!(store.stats().corrupt_keys().is_empty());
}

#[tokio::test]
async fn a_file_with_another_layout_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    {
        let db = Database::create(&path).expect("raw open");
        let wtx = db.begin_write().expect("begin");
        wtx.open_table(KV).expect("table");
        wtx.open_table(META)
            .expect("table")
            .insert(LAYOUT, LAYOUT_VERSION + 1)
            .expect("insert");
        wtx.commit().expect("commit");
    }
    match RedbStore::open(&path) {
        Err(e @ StoreError::Unusable { .. }) => {
            assert!(e.to_string().contains("layout version 3"), "{e}");
        }
        Err(other) => panic!("expected Unusable, got {other:?}"),
        Ok(_) => panic!("opened a file with an unknown layout"),
    }
}

/// A store file with a few records, closed; returns its bytes too.
async fn written(dir: &tempfile::TempDir) -> (PathBuf, Vec<u8>) {
    let path = dir.path().join("state.redb");
    let store = RedbStore::open(&path).expect("open");
    for i in 0..5 {
        store
            .put(
                &format!("/skymesh/tokens/t{i}"),
                format!("token {i}").into_bytes(),
            )
            .await
            .expect("put");
    }
    drop(store);
    let bytes = std::fs::read(&path).expect("read");
    (path, bytes)
}

fn expect_unusable(path: &Path, what: &str) -> String {
    match RedbStore::open(path) {
        Err(e @ StoreError::Unusable { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains(&path.display().to_string())
                    && message.contains("skymesh-controller restore"),
                "{what}: {message}"
            );
            message
        }
        Err(other) => panic!("{what}: expected Unusable, got {other:?}"),
        Ok(_) => panic!("{what}: opened"),
    }
}

#[tokio::test]
async fn only_a_missing_path_is_created_and_an_unusable_file_is_refused_as_it_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, good) = written(&dir).await;
    let mut variants: Vec<(String, Vec<u8>)> = vec![("empty".into(), vec![])];
    for cut in [
        1,
        5,
        9,
        10,
        100,
        511,
        512,
        4096,
        good.len() / 3,
        good.len() - 1,
    ] {
        variants.push((format!("truncated to {cut}"), good[..cut].to_vec()));
    }
    let mut garbage = good.clone();
    garbage[..1024].fill(0xa5);
    variants.push(("garbage header".into(), garbage));
    let mut after_magic = good.clone();
    after_magic[9..200].fill(0);
    variants.push(("zeroed header fields".into(), after_magic));
    for (what, bytes) in &variants {
        std::fs::write(&path, bytes).expect("write");
        expect_unusable(&path, what);
        assert_eq!(
            &std::fs::read(&path).expect("read"),
            bytes,
            "{what}: changed"
        );
    }

    std::fs::remove_file(&path).expect("remove");
    std::fs::create_dir(&path).expect("mkdir");
    assert!(expect_unusable(&path, "directory").contains("is a directory"));
    std::fs::remove_dir(&path).expect("rmdir");

    // A redb file that is not a store (another program's, or a create that never finished).
    drop(Database::create(&path).expect("bare redb file"));
    assert!(expect_unusable(&path, "bare redb").contains("not a skymesh store"));
    std::fs::remove_file(&path).expect("remove");

    // The marker says a store was created here: its loss is refused until the operator removes
    // the marker on purpose.
    assert!(matches!(
        RedbStore::open(&path),
        Err(StoreError::Missing { .. })
    ));
    assert!(
        !path.exists(),
        "nothing created while the marker says a store is gone"
    );
    std::fs::remove_file(path.with_file_name(file::MARKER)).expect("remove the marker");
    let store = RedbStore::open(&path).expect("a missing path is a new store");
    assert_eq!(store.revision().await.expect("revision"), 0);
    assert!(
        !file::staging_path(&path, "creating").exists(),
        "the staging file was renamed into place"
    );
}

#[tokio::test]
async fn a_layout_1_store_is_rewritten_with_checksums_at_its_first_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let legacy = |create: u64, modified: u64, value: &[u8]| {
        let mut record = create.to_be_bytes().to_vec();
        record.extend_from_slice(&modified.to_be_bytes());
        record.extend_from_slice(value);
        record
    };
    {
        let db = Database::create(&path).expect("raw create");
        let wtx = db.begin_write().expect("begin");
        {
            let mut kv = wtx.open_table(KV).expect("kv");
            kv.insert("/a", legacy(1, 3, b"a3").as_slice()).expect("a");
            kv.insert("/b", legacy(2, 2, b"b").as_slice()).expect("b");
            kv.insert("/short", [9u8; 7].as_slice()).expect("short");
            let mut meta = wtx.open_table(META).expect("meta");
            meta.insert(LAYOUT, LEGACY_LAYOUT_VERSION).expect("layout");
            meta.insert(REVISION, 3).expect("revision");
        }
        wtx.commit().expect("commit");
    }
    let store = RedbStore::open(&path).expect("open a layout-1 store");
    let (kvs, revision) = store.range("/").await.expect("range");
    assert_eq!(revision, 3);
    assert_eq!(kvs, vec![kv("/a", b"a3", 1, 3), kv("/b", b"b", 2, 2)]);
    assert_eq!(store.stats().corrupt_keys(), vec!["/short".to_owned()]);
    drop(store);

    let db = Database::open(&path).expect("raw open");
    let rtx = db.begin_read().expect("read");
    let meta = rtx.open_table(META).expect("meta");
    assert_eq!(
        meta.get(LAYOUT).expect("get").map(|v| v.value()),
        Some(LAYOUT_VERSION)
    );
    let raw = rtx.open_table(KV).expect("kv");
    let record = raw.get("/a").expect("get").expect("/a").value().to_vec();
    assert_eq!(
        record::open("/a", &record),
        Ok(legacy(1, 3, b"a3").as_slice())
    );
}

#[tokio::test]
async fn no_single_bit_flip_in_a_stored_record_goes_undetected_and_ranges_keep_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _) = written(&dir).await;
    let victim = "/skymesh/tokens/t2";
    let good = {
        let db = Database::open(&path).expect("raw open");
        let rtx = db.begin_read().expect("read");
        let kv = rtx.open_table(KV).expect("kv");
        let record = kv
            .get(victim)
            .expect("get")
            .expect("victim")
            .value()
            .to_vec();
        record
    };
    for bit in 0..good.len() * 8 {
        let mut flipped = good.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        {
            let db = Database::open(&path).expect("raw open");
            let wtx = db.begin_write().expect("write");
            wtx.open_table(KV)
                .expect("kv")
                .insert(victim, flipped.as_slice())
                .expect("insert");
            wtx.commit().expect("commit");
        }
        let store = RedbStore::open(&path).expect("open");
        assert_eq!(
            store.stats().corrupt_keys(),
            vec![victim.to_owned()],
            "bit {bit}: reported at open, before any read"
        );
        let (kvs, _) = store
            .range("/skymesh/tokens/")
            .await
            .expect("range answers");
        let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "/skymesh/tokens/t0",
                "/skymesh/tokens/t1",
                "/skymesh/tokens/t3",
                "/skymesh/tokens/t4"
            ],
            "bit {bit}"
        );
        assert_eq!(
            store.stats().corrupt_keys(),
            vec![victim.to_owned()],
            "bit {bit}"
        );
        assert!(store.stats().corrupt_reads() >= 1);
        assert!(matches!(
            store.get(victim).await,
            Err(StoreError::Corrupt { .. })
        ));
    }
}

#[tokio::test]
async fn a_backup_taken_while_serving_verifies_and_restores_keeping_the_old_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let store = RedbStore::open(&path).expect("open");
    store.put("/k/a", b"a".to_vec()).await.expect("put");
    store.put("/k/b", b"b".to_vec()).await.expect("put");
    let bytes = store.backup().await.expect("backup");
    store
        .put("/k/c", b"c".to_vec())
        .await
        .expect("put after the backup");
    let backup_path = dir.path().join("backup.redb");
    std::fs::write(&backup_path, &bytes).expect("write the backup");
    let checked = dir.path().join("checked.redb");
    std::fs::copy(&backup_path, &checked).expect("copy");
    assert_eq!(
        verify(&checked).expect("verify"),
        Verified {
            records: 2,
            revision: 2
        }
    );

    assert!(is_in_use(&path).expect("lock check"));
    assert!(matches!(
        restore(&path, &backup_path, 1000),
        Err(StoreError::InUse { .. })
    ));
    drop(store);
    assert!(!is_in_use(&path).expect("lock check"));
    let before = std::fs::read(&path).expect("read");

    // A backup with a flipped bit in a record is refused and nothing changes.
    let mut damaged = bytes.clone();
    let at = damaged
        .windows(4)
        .position(|w| w == b"/k/b")
        .expect("a key in the backup");
    damaged[at + 1] ^= 0x10;
    let damaged_path = dir.path().join("damaged.redb");
    std::fs::write(&damaged_path, &damaged).expect("write");
    assert!(restore(&path, &damaged_path, 1000).is_err());
    assert_eq!(std::fs::read(&path).expect("read"), before);
    assert!(!file::staging_path(&path, "restoring").exists());

    // The controller's user owns its file; restore (as root) keeps that owner.
    let controller_user = nix::unistd::geteuid()
        .is_root()
        .then(|| std::os::unix::fs::chown(&path, Some(65534), Some(65534)).expect("chown"))
        .is_some();

    let restored = restore(&path, &backup_path, 1000).expect("restore");
    if controller_user {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&path).expect("restored file");
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    }
    assert_eq!(restored.verified.records, 2);
    let aside = restored.kept_aside.expect("the old file is kept");
    assert_eq!(aside, dir.path().join("state.redb.before-restore-1000"));
    assert_eq!(std::fs::read(&aside).expect("kept"), before);
    let store = RedbStore::open(&path).expect("open the restored store");
    let (kvs, revision) = store.range("/k/").await.expect("range");
    assert_eq!(revision, 2);
    assert_eq!(kvs, vec![kv("/k/a", b"a", 1, 1), kv("/k/b", b"b", 2, 2)]);
}
