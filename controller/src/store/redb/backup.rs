//! Backups of a [`RedbStore`](super::RedbStore): a consistent copy taken from one read
//! transaction while the store serves, the check a backup must pass, and putting one in place
//! of the store file.
//!
//! A backup is itself a redb store file with the same layout, so it is checked and opened with
//! the same code as the live store. Restoring never deletes the file it replaces: that file is
//! kept beside it under a `.before-restore-<unix time>` name.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use ::redb::{Database, ReadableTable, StorageBackend};

use super::{backend, decode, file, read_revision, StoreError, StoreStats, KV, META};

/// What a check of a store or backup file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub records: usize,
    pub revision: u64,
}

/// What [`restore`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub verified: Verified,
    /// Where the replaced store file now is, if there was one.
    pub kept_aside: Option<PathBuf>,
}

/// A copy of the store as of one read transaction, as the bytes of a redb file. Corrupt records
/// are copied as they are (and reported), so the backup holds everything the store holds.
pub(super) fn snapshot(db: &Database, stats: &StoreStats) -> Result<Vec<u8>, StoreError> {
    let memory = Memory::default();
    let rtx = db.begin_read().map_err(|e| backend("begin read", e))?;
    let kv = rtx
        .open_table(KV)
        .map_err(|e| backend("open kv table", e))?;
    let meta = rtx
        .open_table(META)
        .map_err(|e| backend("open meta table", e))?;
    {
        let copy = Database::builder()
            .create_with_backend(memory.clone())
            .map_err(|e| backend("create the backup", e))?;
        let wtx = copy
            .begin_write()
            .map_err(|e| backend("begin backup write", e))?;
        {
            let mut kv_copy = wtx
                .open_table(KV)
                .map_err(|e| backend("backup kv table", e))?;
            for entry in kv.iter().map_err(|e| backend("read records", e))? {
                let (key, record) = entry.map_err(|e| backend("read records", e))?;
                if let Err(StoreError::Corrupt { key, reason }) =
                    decode(key.value(), record.value())
                {
                    stats.corrupt_record(&key, &reason);
                }
                kv_copy
                    .insert(key.value(), record.value())
                    .map_err(|e| backend("copy record", e))?;
            }
            let mut meta_copy = wtx
                .open_table(META)
                .map_err(|e| backend("backup meta table", e))?;
            for entry in meta.iter().map_err(|e| backend("read meta", e))? {
                let (key, value) = entry.map_err(|e| backend("read meta", e))?;
                meta_copy
                    .insert(key.value(), value.value())
                    .map_err(|e| backend("copy meta", e))?;
            }
        }
        wtx.commit().map_err(|e| backend("commit the backup", e))?;
    }
    Ok(memory.take())
}

/// Opens the store or backup file at `path` as the controller would, checks redb's page
/// checksums and every record's checksum, and counts the records. Fails on anything a start
/// would refuse, on a file redb had to repair, and on any corrupt record.
///
/// It may rewrite the file (a legacy layout is upgraded, redb may repair): check a copy.
pub fn verify(path: &Path) -> Result<Verified, StoreError> {
    let mut db = file::open_existing(path)?;
    let damaged = |reason: String| StoreError::Unusable {
        path: path.to_owned(),
        reason,
    };
    match db.check_integrity() {
        Ok(true) => {}
        Ok(false) => {
            return Err(damaged(
                "failed redb's page checksums (redb rolled it back to an older commit)".into(),
            ))
        }
        Err(e) => return Err(damaged(format!("failed redb's integrity check: {e}"))),
    }
    let revision = file::prepare(&db, path)?;
    let rtx = db.begin_read().map_err(|e| backend("begin read", e))?;
    let kv = rtx
        .open_table(KV)
        .map_err(|e| backend("open kv table", e))?;
    let mut records = 0;
    let mut corrupt = Vec::new();
    for entry in kv.iter().map_err(|e| backend("read records", e))? {
        let (key, record) = entry.map_err(|e| backend("read records", e))?;
        match decode(key.value(), record.value()) {
            Ok(_) => records += 1,
            Err(e) => corrupt.push(e.to_string()),
        }
    }
    let meta = rtx
        .open_table(META)
        .map_err(|e| backend("open meta table", e))?;
    if read_revision(&meta)? != revision {
        return Err(damaged("its revision changed while it was checked".into()));
    }
    if !corrupt.is_empty() {
        return Err(damaged(format!(
            "{} of {} records fail their checksum: {}",
            corrupt.len(),
            records + corrupt.len(),
            corrupt.join("; ")
        )));
    }
    Ok(Verified { records, revision })
}

/// Whether `path` names the store file at `store` or one of the files the store keeps beside it
/// (`<store>.<anything>`: staging, kept-aside, and the `store.id` marker), however the directory is
/// spelled: compared by the directory's device and inode and the file name.
pub fn is_store_own_name(store: &Path, path: &Path) -> bool {
    use std::ffi::OsStr;
    let dir_of = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let identity = |d: &Path| std::fs::metadata(d).ok().map(|m| (m.dev(), m.ino()));
    let (Some(name), Some(store_name)) = (path.file_name(), store.file_name()) else {
        return false;
    };
    if identity(&dir_of(path)).is_none() || identity(&dir_of(path)) != identity(&dir_of(store)) {
        return false;
    }
    let mut prefix = store_name.to_os_string();
    prefix.push(".");
    name == store_name
        || name == OsStr::new(file::MARKER)
        || name
            .as_encoded_bytes()
            .starts_with(prefix.as_encoded_bytes())
}

/// The bytes of a store file no controller runs on, read under its lock (so none starts
/// meanwhile) without opening it as a database: nothing of the source is upgraded or repaired.
pub fn copy_stopped(store: &Path) -> Result<Vec<u8>, StoreError> {
    use std::io::Read;
    match lock(store)? {
        None => Err(StoreError::InUse {
            path: store.to_owned(),
        }),
        Some(None) => Err(StoreError::Backend(format!(
            "no store file at {}: nothing to back up",
            store.display()
        ))),
        Some(Some(mut held)) => {
            let mut bytes = Vec::new();
            held.read_to_end(&mut bytes)
                .map_err(|e| StoreError::Backend(format!("reading {}: {e}", store.display())))?;
            Ok(bytes)
        }
    }
}

/// Whether a running process (a controller) holds the store file at `path` open.
pub fn is_in_use(path: &Path) -> Result<bool, StoreError> {
    Ok(lock(path)?.is_none())
}

/// The exclusive lock redb takes on a store file, held while it is replaced. `Ok(None)`: someone
/// else holds it. A missing file or a directory has no lock to take: `Ok(Some(None))`.
fn lock(path: &Path) -> Result<Option<Option<nix::fcntl::Flock<File>>>, StoreError> {
    let io = |e: std::io::Error| StoreError::Backend(format!("{}: {e}", path.display()));
    let file = match File::open(path) {
        Ok(f) if f.metadata().map_err(io)?.is_file() => f,
        Ok(_) => return Ok(Some(None)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(None)),
        Err(e) => return Err(io(e)),
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(Some(Some(held))),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io(errno.into())),
    }
}

/// Replaces the store file at `store` with a verified copy of the backup `from`. Refuses while
/// a controller holds `store` open, and when the backup fails [`verify`]; the replaced file is
/// kept beside the store, not deleted.
pub fn restore(store: &Path, from: &Path, now_unix: u64) -> Result<Restored, StoreError> {
    let io = |what: String, e: std::io::Error| StoreError::Backend(format!("{what}: {e}"));
    // Held to the end, so no controller starts on the old file while it is swapped.
    let Some(_held) = lock(store)? else {
        return Err(StoreError::InUse {
            path: store.to_owned(),
        });
    };
    let staging = file::staging_path(store, "restoring");
    // The source must be neither the staging file (copying onto itself truncates it, and the
    // error path removes it) nor the live store, by any name or hard link.
    let source =
        std::fs::metadata(from).map_err(|e| io(format!("--from {}", from.display()), e))?;
    let is_source = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == (source.dev(), source.ino()))
    };
    if is_source(&staging) || is_source(store) {
        return Err(StoreError::Backend(format!(
            "--from {} is the store file {} or its restore staging file {}; nothing was changed. \
             Copy the backup to another name outside the data_dir and restore from that",
            from.display(),
            store.display(),
            staging.display()
        )));
    }
    copy_private(from, &staging).map_err(|e| {
        io(
            format!("copying {} to {}", from.display(), staging.display()),
            e,
        )
    })?;
    // Restore runs as root while the controller runs as its own (often dynamic) user: the new
    // file gets the owner the controller's file or data_dir has, or the controller could not
    // open it.
    let owner = std::fs::metadata(store)
        .ok()
        .filter(std::fs::Metadata::is_file)
        .or_else(|| store.parent().and_then(|dir| std::fs::metadata(dir).ok()));
    if let Some(owner) = owner {
        let ours = std::fs::metadata(&staging).map_err(|e| io(staging.display().to_string(), e))?;
        if (ours.uid(), ours.gid()) != (owner.uid(), owner.gid()) {
            std::os::unix::fs::chown(&staging, Some(owner.uid()), Some(owner.gid())).map_err(
                |e| {
                    let _ = std::fs::remove_file(&staging);
                    io(
                        format!(
                            "giving {} the owner {}:{} of the store (run restore as root or as \
                             that user)",
                            staging.display(),
                            owner.uid(),
                            owner.gid()
                        ),
                        e,
                    )
                },
            )?;
        }
    }
    let verified = match verify(&staging) {
        Ok(v) => v,
        Err(e) => {
            // Our own copy; the backup itself is untouched.
            let _ = std::fs::remove_file(&staging);
            let reason = match e {
                StoreError::Unusable { reason, .. } => reason,
                other => other.to_string(),
            };
            return Err(StoreError::Backend(format!(
                "backup {} cannot be restored, nothing was changed: it {reason}",
                from.display()
            )));
        }
    };
    let kept_aside = match std::fs::symlink_metadata(store) {
        Ok(meta) => {
            let aside = file::staging_path(store, &format!("before-restore-{now_unix}"));
            if meta.is_file() {
                // A second name for the old file, then an atomic swap: at no moment is there no
                // store file (a controller starting then would create an empty store).
                std::fs::hard_link(store, &aside).map_err(|e| {
                    io(
                        format!("keeping {} as {}", store.display(), aside.display()),
                        e,
                    )
                })?;
            } else {
                std::fs::rename(store, &aside).map_err(|e| {
                    io(
                        format!("moving {} to {}", store.display(), aside.display()),
                        e,
                    )
                })?;
            }
            Some(aside)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(format!("{}", store.display()), e)),
    };
    std::fs::rename(&staging, store).map_err(|e| {
        io(
            format!("moving {} to {}", staging.display(), store.display()),
            e,
        )
    })?;
    file::sync_parent(store).map_err(|e| io(format!("syncing {}", store.display()), e))?;
    Ok(Restored {
        verified,
        kept_aside,
    })
}

/// Copies `from` to `to` (created or truncated, mode 0600) and syncs it.
fn copy_private(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut source = File::open(from)?;
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)?;
    target.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    std::io::copy(&mut source, &mut target)?;
    target.flush()?;
    target.sync_all()
}

/// An in-memory redb backend whose bytes can be taken out afterwards.
#[derive(Debug, Clone, Default)]
struct Memory(Arc<Mutex<Vec<u8>>>);

impl Memory {
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.bytes())
    }
}

impl StorageBackend for Memory {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.bytes().len() as u64)
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
        let bytes = self.bytes();
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        bytes
            .get(start..start.saturating_add(len))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        self.bytes().resize(len, 0);
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut bytes = self.bytes();
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let end = start.saturating_add(data.len());
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(data);
        Ok(())
    }
}
