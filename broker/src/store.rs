//! The durable store behind the broker: a small KV with prefix scans, compare-and-swap and
//! watch. The default engine is an embedded redb file ([`RedbStore`]); a cluster will put
//! etcd behind the same trait (leases and linearizable transactions map onto it).
//!
//! Keys are `/`-separated strings; values are opaque bytes (the registry stores JSON).

#[cfg(test)]
mod conformance;
mod etcd;
#[cfg(feature = "fault-injection")]
mod faulty;
mod redb;

use async_trait::async_trait;
use tokio::sync::broadcast;

pub(crate) use self::etcd::{EtcdOptions, EtcdStore, etcd_error};
#[cfg(feature = "fault-injection")]
pub(crate) use self::faulty::FaultyStore;
pub(crate) use self::redb::RedbStore;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine failed (I/O, corruption, closed database).
    #[error("store: {0}")]
    Engine(String),
    /// The store cannot be reached now (etcd down or partitioned away); retrying later may
    /// succeed. Nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored value does not decode.
    #[error("store: corrupt value at {key}: {message}")]
    Corrupt {
        /// The key whose value is corrupt.
        key: String,
        /// What the decoder said.
        message: String,
    },
}

/// One change, as seen by [`Store::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WatchEvent {
    /// `key` now holds `value`.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Vec<u8>,
    },
    /// `key` was deleted.
    Delete {
        /// The key.
        key: String,
    },
    /// Changes were missed (the etcd watch fell behind a compaction): rescan everything
    /// this watcher mirrors.
    Resync,
}

/// A KV store. Every write is durable when the call returns.
#[async_trait]
pub(crate) trait Store: Send + Sync + 'static {
    /// The value at `key`.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets `key` to `value`.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError>;
    /// Deletes `key`; true if it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// All `(key, value)` pairs whose key starts with `prefix`, in key order, at most `limit`.
    async fn scan_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Like [`Store::scan_prefix`], newest key first: the pairs whose key starts with
    /// `prefix` and sorts before `before` (when given), in descending key order, at most
    /// `limit`. Cursor pagination of logs whose keys grow with time.
    async fn scan_prefix_rev(
        &self,
        prefix: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Atomically replaces the value at `key` with `new` (None deletes) if and only if it is
    /// currently `expected` (None: absent). Returns whether the swap happened.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError>;
    /// A stream of every committed change from now on, by any writer (with etcd: any
    /// node). A receiver that lags loses events (`RecvError::Lagged`) and must rescan, as
    /// on [`WatchEvent::Resync`].
    fn watch(&self) -> broadcast::Receiver<WatchEvent>;
}
