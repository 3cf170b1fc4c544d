//! [`StoreStats`]: what every backend reports about its own health, for `/healthz` and
//! `/metrics`: whether writes currently succeed, how many failed, and which records failed their
//! checksum.
//!
//! Owns counting and logging those events; deciding when a backend is writable again is the
//! backend's job.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// How many distinct corrupt keys are remembered for the metric; beyond it they are counted only.
const MAX_CORRUPT_KEYS: usize = 100;

/// Whether the store can take writes now, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Writable,
    /// The last write failed with `reason`; the backend retries by itself.
    NotWritable {
        reason: String,
    },
}

/// Shared counters of one store, read by `/metrics` and `/healthz`.
#[derive(Debug)]
pub struct StoreStats {
    writable: AtomicBool,
    reason: Mutex<Option<String>>,
    write_errors: AtomicU64,
    corrupt_reads: AtomicU64,
    corrupt_keys: Mutex<BTreeSet<String>>,
}

impl Default for StoreStats {
    fn default() -> Self {
        Self {
            writable: AtomicBool::new(true),
            reason: Mutex::new(None),
            write_errors: AtomicU64::new(0),
            corrupt_reads: AtomicU64::new(0),
            corrupt_keys: Mutex::new(BTreeSet::new()),
        }
    }
}

impl StoreStats {
    /// A write (or a write probe) committed: the store is writable.
    pub fn write_succeeded(&self) {
        if !self.writable.swap(true, Ordering::AcqRel) {
            tracing::info!("state store is writable again");
        }
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// A write failed in the backend (not a conflict, not bad input).
    pub fn write_failed(&self, reason: &str) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        if self.writable.swap(false, Ordering::AcqRel) {
            tracing::error!(
                error = reason,
                "state store write failed; writes are refused until it can write again \
                 (free disk space on the data_dir's file system if it is full)"
            );
        }
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.to_owned());
    }

    /// A record under `key` failed its checksum or could not be decoded.
    pub fn corrupt_record(&self, key: &str, reason: &str) {
        self.corrupt_reads.fetch_add(1, Ordering::Relaxed);
        let mut keys = self
            .corrupt_keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let first = !keys.contains(key);
        if first && keys.len() < MAX_CORRUPT_KEYS {
            keys.insert(key.to_owned());
        }
        drop(keys);
        if first {
            tracing::error!(
                key,
                reason,
                "state store record is corrupt; it is left out of listings. Delete the key's \
                 object through the API, or restore a backup (skymesh-controller restore)"
            );
        } else {
            tracing::debug!(key, reason, "state store record is still corrupt");
        }
    }

    /// The corrupt record under `key` was deleted or overwritten.
    pub fn record_replaced(&self, key: &str) {
        self.corrupt_keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    pub fn health(&self) -> StoreHealth {
        if self.writable.load(Ordering::Acquire) {
            return StoreHealth::Writable;
        }
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "the last write failed".to_owned());
        StoreHealth::NotWritable { reason }
    }

    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Backend write failures since start.
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }

    /// Reads that met a corrupt record since start (one record read twice counts twice).
    pub fn corrupt_reads(&self) -> u64 {
        self.corrupt_reads.load(Ordering::Relaxed)
    }

    /// The keys currently known to hold a corrupt record (at most `MAX_CORRUPT_KEYS`).
    pub fn corrupt_keys(&self) -> Vec<String> {
        self.corrupt_keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}
