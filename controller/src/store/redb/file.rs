//! The store file's layout version: set on a new file, checked at every open, and the one-time
//! rewrite of layout-1 records (no checksum) into checksummed envelopes.

use std::path::Path;

use ::redb::{Database, ReadableTable, WriteTransaction};

use super::{
    backend, read_revision, record, StoreError, HEADER_LEN, KV, LAYOUT, LAYOUT_VERSION,
    LEGACY_LAYOUT_VERSION, META,
};

/// Creates both tables on first open (so readers never meet a missing table), checks the
/// layout, rewrites a legacy layout, and returns the store revision.
pub(super) fn prepare(db: &Database, path: &Path) -> Result<u64, StoreError> {
    let wtx = db.begin_write().map_err(|e| backend("begin write", e))?;
    wtx.open_table(KV)
        .map_err(|e| backend("open kv table", e))?;
    let layout = wtx
        .open_table(META)
        .map_err(|e| backend("open meta table", e))?
        .get(LAYOUT)
        .map_err(|e| backend("read layout version", e))?
        .map(|v| v.value());
    match layout {
        None => set_layout(&wtx)?,
        Some(LAYOUT_VERSION) => {}
        Some(LEGACY_LAYOUT_VERSION) => upgrade_legacy(&wtx, path)?,
        Some(other) => {
            return Err(StoreError::Backend(format!(
                "{} has store layout version {other}, this controller reads version \
                 {LAYOUT_VERSION} (and {LEGACY_LAYOUT_VERSION}); run a matching controller version",
                path.display()
            )));
        }
    }
    let revision = read_revision(
        &wtx.open_table(META)
            .map_err(|e| backend("open meta table", e))?,
    )?;
    wtx.commit().map_err(|e| backend("commit", e))?;
    Ok(revision)
}

fn set_layout(wtx: &WriteTransaction) -> Result<(), StoreError> {
    wtx.open_table(META)
        .map_err(|e| backend("open meta table", e))?
        .insert(LAYOUT, LAYOUT_VERSION)
        .map_err(|e| backend("write layout version", e))?;
    Ok(())
}

/// Wraps every layout-1 record (revisions ++ value, no checksum) in a checksummed envelope, in
/// the same transaction as the layout bump. A record too short to be one is left as it is: it
/// then fails its checksum and is reported like any other corrupt record.
fn upgrade_legacy(wtx: &WriteTransaction, path: &Path) -> Result<(), StoreError> {
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
    }
    set_layout(wtx)?;
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
