//! A store wrapper whose writes can be made to fail (feature `fault-injection`, tests only):
//! how the tests show that revocation fails closed when the store does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{Store, StoreError, WatchEvent};

/// Passes everything to `inner`, except that writes fail while `fail_writes` is set.
pub(crate) struct FaultyStore {
    inner: Arc<dyn Store>,
    fail_writes: AtomicBool,
}

impl FaultyStore {
    /// Wraps `inner`, healthy.
    pub(crate) fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner, fail_writes: AtomicBool::new(false) }
    }

    /// Makes every later write fail (`true`) or succeed again (`false`).
    pub(crate) fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Engine("injected write failure".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for FaultyStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.check()?;
        self.inner.put(key, value).await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.delete(key).await
    }

    async fn scan_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.scan_prefix(prefix, limit).await
    }

    async fn scan_prefix_rev(
        &self,
        prefix: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.scan_prefix_rev(prefix, before, limit).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.compare_and_swap(key, expected, new).await
    }

    fn watch(&self) -> broadcast::Receiver<WatchEvent> {
        self.inner.watch()
    }
}
