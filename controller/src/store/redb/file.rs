//! Opening the store file: what exists at the path decides between creating a new store and
//! opening the existing one, and an existing file that cannot be read as a store is refused with
//! the way out (restore a backup), never re-initialised.
//!
//! Also owns the layout check and the one-time rewrite of layout-1 records (no checksum) into
//! checksummed envelopes.

use std::cell::Cell;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;

use ::redb::{Database, DatabaseError, ReadableTable, StorageError};

use super::{
    backend, read_revision, record, StoreError, HEADER_LEN, KV, LAYOUT, LAYOUT_VERSION,
    LEGACY_LAYOUT_VERSION, META,
};

/// The first bytes of every redb file (its "magic number").
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// Opens the store at `path`, or creates a new one when nothing exists there at all: not a file,
/// not a symlink (a dangling one is a store on a disk that did not mount). A symlink to a store
/// file is opened through.
pub(super) fn open_or_create(path: &Path) -> Result<Database, StoreError> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        refuse_dangling(dir, "the data_dir")?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            refuse_if_created_before(path)?;
            create(path)
        }
        _ => {
            refuse_dangling(path, "the store file")?;
            open_existing(path)
        }
    }
}

/// Name of the marker beside the store: it exists once a store was created (or opened) in this
/// data_dir, so a missing store file there is a loss, not a first start.
pub const MARKER: &str = "store.id";

fn marker_path(store: &Path) -> PathBuf {
    store.with_file_name(MARKER)
}

fn refuse_if_created_before(path: &Path) -> Result<(), StoreError> {
    let marker = marker_path(path);
    if std::fs::symlink_metadata(&marker).is_err() {
        return Ok(());
    }
    Err(StoreError::Missing {
        path: path.to_owned(),
        reason: format!(
            "store file {} is gone, but {} says this data_dir held a store: nothing was created, \
             since a new store would replace the CA, every node and every token. Restore a \
             backup with `skymesh-controller restore --config <file> --from <backup>`, or \
             remove {} to start over with an empty store on purpose",
            path.display(),
            marker.display(),
            marker.display()
        ),
    })
}

/// Writes the marker beside an opened store if it is not there yet (stores created before the
/// marker existed get it at their next start).
pub(super) fn mark_created(path: &Path) -> Result<(), StoreError> {
    use std::io::Write;
    let marker = marker_path(path);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&marker);
    match file {
        Ok(mut f) => f
            .write_all(
                format!(
                    "A skymesh store lives beside this file ({}); while this file exists a \
                     missing store is refused at start, not re-created.\n",
                    path.file_name().unwrap_or_default().to_string_lossy()
                )
                .as_bytes(),
            )
            .and_then(|()| f.sync_all())
            .and_then(|()| sync_parent(&marker))
            .map_err(|e| unreadable(&marker, &e)),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(unreadable(&marker, &e)),
    }
}

/// Device and inode of what `path` leads to.
pub(super) type Identity = (u64, u64);

pub(super) fn identity(path: &Path) -> Result<Identity, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| unreadable(path, &e))?;
    Ok((meta.dev(), meta.ino()))
}

/// Refuses `path` when it is a symlink whose target does not exist: creating anything there
/// would start a new store (and CA) beside the real one, on the disk that did not mount.
pub fn refuse_dangling(path: &Path, what: &str) -> Result<(), StoreError> {
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return Ok(());
    }
    match std::fs::metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let target = std::fs::read_link(path).unwrap_or_default();
            Err(StoreError::Backend(format!(
                "{what} {} is a symlink to {}, which does not exist; nothing was created, since a                  new store would replace the CA, every node and every token. Mount the disk that                  holds it, or restore a backup with `skymesh-controller restore`",
                path.display(),
                target.display()
            )))
        }
        _ => Ok(()),
    }
}

/// Opens an existing store file; refuses what is not one.
pub(super) fn open_existing(path: &Path) -> Result<Database, StoreError> {
    let unusable = |reason: String| StoreError::Unusable {
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| unusable(e.to_string()))?;
    if meta.is_dir() {
        return Err(unusable("is a directory, not a store file".into()));
    }
    if !meta.is_file() {
        return Err(unusable("is not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(unusable("is empty (0 bytes)".into()));
    }
    let mut head = Vec::with_capacity(REDB_MAGIC.len());
    std::fs::File::open(path)
        .and_then(|f| f.take(REDB_MAGIC.len() as u64).read_to_end(&mut head))
        .map_err(|e| unreadable(path, &e))?;
    if head != REDB_MAGIC {
        return Err(unusable(format!(
            "does not start with a redb file header ({} bytes, first bytes {:02x?}): it is not a \
             store file, or its header is damaged",
            meta.len(),
            head
        )));
    }
    // redb panics on some damaged headers (a file shorter than its header says, a region table
    // out of bounds); a bad file must be an error that names it, not an abort.
    match quietly(|| Database::builder().open(path)) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(DatabaseError::DatabaseAlreadyOpen)) => Err(StoreError::InUse {
            path: path.to_owned(),
        }),
        Ok(Err(DatabaseError::Storage(StorageError::Io(e))))
            if !matches!(e.kind(), ErrorKind::InvalidData | ErrorKind::UnexpectedEof) =>
        {
            Err(unreadable(path, &e))
        }
        Ok(Err(e)) => Err(unusable(format!("is damaged: {e}"))),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(unusable(format!(
                "is damaged ({} bytes; redb failed reading it: {message})",
                meta.len()
            )))
        }
    }
}

thread_local! {
    /// Set while this thread runs [`quietly`]: its panics are caught and reported as errors.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `work`, turning a panic into an `Err` without the panic hook's report (a backtrace on
/// stderr reads like a crash, while the caller reports a plain error). Panics on other threads
/// are reported as before.
fn quietly<T>(work: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET.with(|quiet| quiet.set(true));
    let result = catch_unwind(AssertUnwindSafe(work));
    QUIET.with(|quiet| quiet.set(false));
    result
}

/// The file may be fine but this process cannot use it (permissions, an I/O error): restoring a
/// backup is not the fix, so this is not [`StoreError::Unusable`].
fn unreadable(path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::Backend(format!(
        "opening the store file {}: {e}; check its owner and mode (the controller reads and \
         writes it) and the disk",
        path.display()
    ))
}

/// Creates a new store: built under a temporary name and renamed into place only once it holds
/// its tables and layout, so a file at `path` is always a complete store.
fn create(path: &Path) -> Result<Database, StoreError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Backend(format!(
            "creating the store {}: {what}: {e}",
            path.display()
        ))
    };
    let staging = staging_path(path, "creating");
    {
        // Ours from an earlier start that died mid-way, if it exists: truncate and reuse.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&staging)
            .map_err(|e| fail(&format!("{}", staging.display()), &e))?;
        let db = Database::builder()
            .create_file(file)
            .map_err(|e| fail("initialising", &e))?;
        let wtx = db.begin_write().map_err(|e| fail("begin write", &e))?;
        wtx.open_table(KV).map_err(|e| fail("kv table", &e))?;
        wtx.open_table(META)
            .map_err(|e| fail("meta table", &e))?
            .insert(LAYOUT, LAYOUT_VERSION)
            .map_err(|e| fail("layout version", &e))?;
        wtx.commit().map_err(|e| fail("commit", &e))?;
    }
    std::fs::rename(&staging, path).map_err(|e| fail("rename into place", &e))?;
    sync_parent(path).map_err(|e| fail("sync the directory", &e))?;
    tracing::info!(file = %path.display(), "created a new, empty state store");
    open_existing(path)
}

/// `<path>.<what>` beside `path`.
pub(super) fn staging_path(path: &Path, what: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{what}"));
    path.with_file_name(name)
}

/// Makes a rename in `path`'s directory durable.
pub(super) fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Checks the layout of a freshly opened store, rewrites a legacy layout, and returns the store
/// revision.
pub(super) fn prepare(db: &Database, path: &Path) -> Result<u64, StoreError> {
    match layout(db, path)? {
        LAYOUT_VERSION => {}
        LEGACY_LAYOUT_VERSION => upgrade_legacy(db, path)?,
        other => return Err(other_layout(path, other)),
    }
    let rtx = db.begin_read().map_err(|e| backend("begin read", e))?;
    let meta = rtx
        .open_table(META)
        .map_err(|e| backend("open meta table", e))?;
    read_revision(&meta)
}

/// Like [`prepare`] without rewriting anything: for a reopen, where the layout is known.
pub(super) fn check_layout(db: &Database, path: &Path) -> Result<(), StoreError> {
    match layout(db, path)? {
        LAYOUT_VERSION => Ok(()),
        other => Err(other_layout(path, other)),
    }
}

fn layout(db: &Database, path: &Path) -> Result<u64, StoreError> {
    let rtx = db.begin_read().map_err(|e| backend("begin read", e))?;
    let not_a_store = |why: String| StoreError::Unusable {
        path: path.to_owned(),
        reason: format!("is a redb file but not a skymesh store ({why})"),
    };
    let meta = match rtx.open_table(META) {
        Ok(meta) => meta,
        Err(::redb::TableError::TableDoesNotExist(_)) => {
            return Err(not_a_store("no meta table".into()))
        }
        Err(e) => return Err(backend("open meta table", e)),
    };
    match rtx.open_table(KV) {
        Ok(_) => {}
        Err(::redb::TableError::TableDoesNotExist(_)) => {
            return Err(not_a_store("no kv table".into()))
        }
        Err(e) => return Err(backend("open kv table", e)),
    }
    meta.get(LAYOUT)
        .map_err(|e| backend("read layout version", e))?
        .map(|v| v.value())
        .ok_or_else(|| not_a_store("no layout version".into()))
}

fn other_layout(path: &Path, found: u64) -> StoreError {
    StoreError::Unusable {
        path: path.to_owned(),
        reason: format!(
            "has store layout version {found}, this controller reads version {LAYOUT_VERSION} \
             (and {LEGACY_LAYOUT_VERSION}); run a matching controller version"
        ),
    }
}

/// Wraps every layout-1 record (revisions ++ value, no checksum) in a checksummed envelope, in
/// one transaction with the layout bump. A record too short to be one is left as it is: it then
/// fails its checksum and is reported like any other corrupt record.
fn upgrade_legacy(db: &Database, path: &Path) -> Result<(), StoreError> {
    let wtx = db.begin_write().map_err(|e| backend("begin write", e))?;
    let (mut upgraded, mut skipped) = (0usize, Vec::new());
    {
        let mut kv = wtx
            .open_table(KV)
            .map_err(|e| backend("open kv table", e))?;
        let mut legacy = Vec::new();
        for entry in kv.iter().map_err(|e| backend("read records", e))? {
            let (key, record) = entry.map_err(|e| backend("read records", e))?;
            legacy.push((key.value().to_owned(), record.value().to_vec()));
        }
        for (key, payload) in legacy {
            if payload.len() < HEADER_LEN {
                skipped.push(key);
                continue;
            }
            kv.insert(key.as_str(), record::seal(&key, &payload).as_slice())
                .map_err(|e| backend("rewrite record", e))?;
            upgraded += 1;
        }
        wtx.open_table(META)
            .map_err(|e| backend("open meta table", e))?
            .insert(LAYOUT, LAYOUT_VERSION)
            .map_err(|e| backend("write layout version", e))?;
    }
    wtx.commit().map_err(|e| backend("commit", e))?;
    tracing::info!(
        file = %path.display(),
        records = upgraded,
        "store layout 1 upgraded to 2: every record now carries a checksum"
    );
    for key in skipped {
        tracing::error!(
            file = %path.display(),
            key,
            "a layout-1 record is shorter than its revision header; left as it is (reported as corrupt)"
        );
    }
    Ok(())
}
