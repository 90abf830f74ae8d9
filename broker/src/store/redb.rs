//! The embedded default: one redb file in the data dir, zero setup.

use std::path::Path;
use std::sync::Arc;

use ::redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{Store, StoreError, WatchEvent};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// How many unconsumed watch events a slow watcher may fall behind by.
const WATCH_BUFFER: usize = 1024;

fn engine<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Engine(e.to_string())
}

/// A [`Store`] in a redb file. redb is synchronous; calls run on the blocking pool.
#[derive(Clone)]
pub(crate) struct RedbStore {
    db: Arc<Database>,
    events: broadcast::Sender<WatchEvent>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens (or creates) the database file at `path`.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(engine)?;
        let txn = db.begin_write().map_err(engine)?;
        txn.open_table(KV).map_err(engine)?;
        txn.commit().map_err(engine)?;
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        Ok(Self { db: Arc::new(db), events })
    }

    async fn blocking<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        let started = std::time::Instant::now();
        let r = tokio::task::spawn_blocking(move || f(&db)).await.map_err(engine)?;
        metrics::histogram!(crate::metrics::names::STORE_OP, "op" => op)
            .record(started.elapsed().as_secs_f64());
        r
    }

    fn notify(&self, event: WatchEvent) {
        // No watcher is fine.
        let _ = self.events.send(event);
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.blocking("get", move |db| {
            let txn = db.begin_read().map_err(engine)?;
            let table = txn.open_table(KV).map_err(engine)?;
            Ok(table.get(key.as_str()).map_err(engine)?.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let k = key.to_owned();
        let v = value.clone();
        self.blocking("put", move |db| {
            let txn = db.begin_write().map_err(engine)?;
            txn.open_table(KV).map_err(engine)?.insert(k.as_str(), v.as_slice()).map_err(engine)?;
            txn.commit().map_err(engine)
        })
        .await?;
        self.notify(WatchEvent::Put { key: key.to_owned(), value });
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let k = key.to_owned();
        let existed = self
            .blocking("delete", move |db| {
                let txn = db.begin_write().map_err(engine)?;
                let existed = txn
                    .open_table(KV)
                    .map_err(engine)?
                    .remove(k.as_str())
                    .map_err(engine)?
                    .is_some();
                txn.commit().map_err(engine)?;
                Ok(existed)
            })
            .await?;
        if existed {
            self.notify(WatchEvent::Delete { key: key.to_owned() });
        }
        Ok(existed)
    }

    async fn scan_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking("scan", move |db| {
            let txn = db.begin_read().map_err(engine)?;
            let table = txn.open_table(KV).map_err(engine)?;
            let mut out = Vec::new();
            for item in table.range(prefix.as_str()..).map_err(engine)? {
                let (k, v) = item.map_err(engine)?;
                if !k.value().starts_with(prefix.as_str()) || out.len() >= limit {
                    break;
                }
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn scan_prefix_rev(
        &self,
        prefix: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = prefix.to_owned();
        // Keys are ASCII, so this sorts after every key with the prefix.
        let end = before.map_or_else(|| format!("{prefix}\u{10FFFF}"), str::to_owned);
        self.blocking("scan", move |db| {
            let txn = db.begin_read().map_err(engine)?;
            let table = txn.open_table(KV).map_err(engine)?;
            let mut out = Vec::new();
            if end.as_str() <= prefix.as_str() {
                return Ok(out);
            }
            for item in table.range(prefix.as_str()..end.as_str()).map_err(engine)?.rev() {
                let (k, v) = item.map_err(engine)?;
                if out.len() >= limit || !k.value().starts_with(prefix.as_str()) {
                    break;
                }
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let k = key.to_owned();
        let expected = expected.map(<[u8]>::to_vec);
        let n = new.clone();
        let swapped = self
            .blocking("cas", move |db| {
                // redb has one writer at a time, so read-compare-write inside one write
                // transaction is atomic.
                let txn = db.begin_write().map_err(engine)?;
                let swapped = {
                    let mut table = txn.open_table(KV).map_err(engine)?;
                    let current =
                        table.get(k.as_str()).map_err(engine)?.map(|v| v.value().to_vec());
                    if current != expected {
                        false
                    } else {
                        match &n {
                            Some(v) => {
                                table.insert(k.as_str(), v.as_slice()).map_err(engine)?;
                            }
                            None => {
                                table.remove(k.as_str()).map_err(engine)?;
                            }
                        }
                        true
                    }
                };
                if swapped {
                    txn.commit().map_err(engine)?;
                } else {
                    txn.abort().map_err(engine)?;
                }
                Ok(swapped)
            })
            .await?;
        if swapped {
            self.notify(match new {
                Some(value) => WatchEvent::Put { key: key.to_owned(), value },
                None => WatchEvent::Delete { key: key.to_owned() },
            });
        }
        Ok(swapped)
    }

    fn watch(&self) -> broadcast::Receiver<WatchEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn kv_scan_cas_watch_and_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db.redb");
        let store = RedbStore::open(&path).expect("open");
        conformance::kv_scan_cas_watch(&store).await;
        drop(store);

        let reopened = RedbStore::open(&path).expect("reopen");
        assert_eq!(reopened.get("runners/a/1").await.expect("get"), Some(b"1".to_vec()));
        assert_eq!(reopened.get("runners/b/1").await.expect("get"), None);
        assert_eq!(reopened.get("new").await.expect("get"), Some(b"x".to_vec()));
    }

    #[tokio::test]
    async fn reverse_scans_page_newest_first_and_stay_in_their_prefix() {
        let dir = tempfile::tempdir().expect("dir");
        conformance::reverse_scans(&RedbStore::open(&dir.path().join("db")).expect("open")).await;
    }

    #[tokio::test]
    async fn concurrent_cas_has_exactly_one_winner() {
        let dir = tempfile::tempdir().expect("dir");
        let store = RedbStore::open(&dir.path().join("db.redb")).expect("open");
        conformance::concurrent_cas(Arc::new(store)).await;
    }
}
