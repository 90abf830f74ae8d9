//! The cluster store: etcd, through `etcd-client`. Every node of a cluster shares one
//! prefix (`--etcd-prefix`, default `/runnel`); the keys under it are the same as in redb.
//!
//! - Reads and writes are linearizable etcd requests with a per-request deadline, so an
//!   unreachable etcd answers [`StoreError::Unavailable`] quickly instead of hanging.
//! - Compare-and-swap is one txn: `value == expected` (or `create_revision == 0` for
//!   "absent"), then put or delete.
//! - [`Store::watch`] is fed by one etcd watch over the whole prefix, which resumes from
//!   the last revision it delivered after a broken stream. When that revision has been
//!   compacted away, watchers get [`WatchEvent::Resync`] and rescan.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, SortOrder,
    SortTarget, Txn, TxnOp, WatchOptions,
};
use tokio::sync::broadcast;
use tokio_util::task::AbortOnDropHandle;

use super::{Store, StoreError, WatchEvent};

/// How many unconsumed watch events a slow watcher may fall behind by.
const WATCH_BUFFER: usize = 4096;
/// The longest one etcd request may take before it counts as unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest connecting to an endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts to re-establish a broken watch.
const WATCH_RETRY: Duration = Duration::from_millis(250);

/// gRPC status codes that mean "not reachable right now": CANCELLED, DEADLINE_EXCEEDED and
/// UNAVAILABLE (grpc/grpc `doc/statuscodes.md`; tonic is reached only through etcd-client).
const UNAVAILABLE_CODES: [i32; 3] = [1, 4, 14];

/// Maps a client error: transport failures and deadlines are "etcd unavailable", anything
/// else is an engine error. A status that carries a source error was made on this side
/// from a broken connection (tonic attaches the transport error), never sent by etcd.
pub(crate) fn etcd_error(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use std::error::Error as _;
    match e {
        E::TransportError(_) | E::IoError(_) => StoreError::Unavailable(e.to_string()),
        E::GRpcStatus(ref s)
            if UNAVAILABLE_CODES.contains(&i32::from(s.code())) || s.source().is_some() =>
        {
            StoreError::Unavailable(e.to_string())
        }
        other => StoreError::Engine(other.to_string()),
    }
}

/// How to reach etcd.
#[derive(Debug, Clone)]
pub(crate) struct EtcdOptions {
    /// `http://host:port` (or `https://`) endpoints.
    pub endpoints: Vec<String>,
    /// The key prefix, e.g. `/runnel`; keys are `<prefix>/<key>`.
    pub prefix: String,
}

/// A [`Store`] on etcd.
#[derive(Clone)]
pub(crate) struct EtcdStore {
    client: Client,
    /// `<prefix>/`, with exactly one trailing slash.
    root: String,
    events: broadcast::Sender<WatchEvent>,
    /// The watch feeding `events`; it ends when the last clone of the store goes.
    _watcher: Arc<AbortOnDropHandle<()>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("root", &self.root).finish_non_exhaustive()
    }
}

/// The first key after every key that starts with `prefix` (etcd's "range end").
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

fn timed<T>(
    op: &'static str,
    started: Instant,
    r: Result<T, etcd_client::Error>,
) -> Result<T, StoreError> {
    metrics::histogram!(crate::metrics::names::STORE_OP, "op" => op)
        .record(started.elapsed().as_secs_f64());
    r.map_err(etcd_error)
}

impl EtcdStore {
    /// Connects and starts the watch. Fails with [`StoreError::Unavailable`] when no
    /// endpoint answers.
    pub(crate) async fn connect(options: &EtcdOptions) -> Result<Self, StoreError> {
        let connect = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let client =
            Client::connect(&options.endpoints, Some(connect)).await.map_err(etcd_error)?;
        let root = format!("{}/", options.prefix.trim_end_matches('/'));
        // The revision the watch starts after: everything before it is what a caller's
        // first scan sees.
        let mut kv = client.kv_client();
        let resp = kv
            .get(root.as_bytes(), Some(GetOptions::new().with_prefix().with_count_only()))
            .await
            .map_err(etcd_error)?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let watcher =
            tokio::spawn(watch_loop(client.clone(), root.clone(), revision, events.clone()));
        Ok(Self { client, root, events, _watcher: Arc::new(AbortOnDropHandle::new(watcher)) })
    }

    fn full(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.root).into_bytes()
    }

    fn strip(&self, key: &[u8]) -> Result<String, StoreError> {
        let s = std::str::from_utf8(key).map_err(|e| StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            message: e.to_string(),
        })?;
        Ok(s.strip_prefix(self.root.as_str()).unwrap_or(s).to_owned())
    }

    /// The client, for the cluster's own lease and placement requests.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// `<prefix>/<key>` as etcd sees it.
    pub(crate) fn etcd_key(&self, key: &str) -> Vec<u8> {
        self.full(key)
    }

    fn pairs(&self, kvs: &[etcd_client::KeyValue]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        kvs.iter().map(|kv| Ok((self.strip(kv.key())?, kv.value().to_vec()))).collect()
    }
}

/// Feeds `events` from one etcd watch over `root`, resuming after `revision`.
async fn watch_loop(
    client: Client,
    root: String,
    revision: i64,
    events: broadcast::Sender<WatchEvent>,
) {
    let last = AtomicI64::new(revision);
    loop {
        let from = last.load(Ordering::Relaxed) + 1;
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = match client.watch_client().watch(root.as_bytes(), Some(options)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "etcd watch: cannot start; retrying");
                tokio::time::sleep(WATCH_RETRY).await;
                continue;
            }
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "etcd watch broken; resuming");
                    break;
                }
            };
            if resp.compact_revision() > 0 {
                // Events between `last` and the compaction point are gone: rescan.
                tracing::warn!(
                    compacted = resp.compact_revision(),
                    "etcd watch fell behind a compaction; watchers rescan"
                );
                // The rescan sees at least everything up to now; watch from here on.
                let now = current_revision(&client, &root).await;
                if let Some(now) = now {
                    last.store(now, Ordering::Relaxed);
                    let _ = events.send(WatchEvent::Resync);
                } else {
                    tokio::time::sleep(WATCH_RETRY).await;
                }
                break;
            }
            if resp.canceled() {
                break;
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Some(key) = std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| k.strip_prefix(root.as_str()))
                    .map(str::to_owned)
                else {
                    continue;
                };
                let event = match ev.event_type() {
                    EventType::Put => WatchEvent::Put { key, value: kv.value().to_vec() },
                    EventType::Delete => WatchEvent::Delete { key },
                };
                last.store(kv.mod_revision(), Ordering::Relaxed);
                // No watcher is fine.
                let _ = events.send(event);
            }
        }
        tokio::time::sleep(WATCH_RETRY).await;
    }
}

async fn current_revision(client: &Client, root: &str) -> Option<i64> {
    let resp = client
        .kv_client()
        .get(root.as_bytes(), Some(GetOptions::new().with_prefix().with_count_only()))
        .await
        .ok()?;
    resp.header().map(|h| h.revision())
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let started = Instant::now();
        let r = self.client.kv_client().get(self.full(key), None).await;
        let resp = timed("get", started, r)?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.client.kv_client().put(self.full(key), value, None).await;
        timed("put", started, r).map(drop)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let started = Instant::now();
        let r = self.client.kv_client().delete(self.full(key), None::<DeleteOptions>).await;
        Ok(timed("delete", started, r)?.deleted() > 0)
    }

    async fn scan_prefix(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let started = Instant::now();
        let mut options =
            GetOptions::new().with_prefix().with_sort(SortTarget::Key, SortOrder::Ascend);
        if limit < i64::MAX as usize {
            options = options.with_limit(limit as i64);
        }
        let r = self.client.kv_client().get(self.full(prefix), Some(options)).await;
        self.pairs(timed("scan", started, r)?.kvs())
    }

    async fn scan_prefix_rev(
        &self,
        prefix: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let started = Instant::now();
        let start = self.full(prefix);
        let mut end = prefix_end(&start);
        if let Some(before) = before.map(|b| self.full(b)) {
            end = end.min(before);
        }
        if end <= start {
            return Ok(Vec::new());
        }
        let mut options =
            GetOptions::new().with_range(end).with_sort(SortTarget::Key, SortOrder::Descend);
        if limit < i64::MAX as usize {
            options = options.with_limit(limit as i64);
        }
        let r = self.client.kv_client().get(start, Some(options)).await;
        self.pairs(timed("scan", started, r)?.kvs())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let started = Instant::now();
        let k = self.full(key);
        let when = match expected {
            Some(v) => Compare::value(k.clone(), CompareOp::Equal, v.to_vec()),
            None => Compare::create_revision(k.clone(), CompareOp::Equal, 0),
        };
        let then = match new {
            Some(v) => TxnOp::put(k, v, None),
            None => TxnOp::delete(k, None),
        };
        let txn = Txn::new().when([when]).and_then([then]);
        let r = self.client.kv_client().txn(txn).await;
        Ok(timed("cas", started, r)?.succeeded())
    }

    fn watch(&self) -> broadcast::Receiver<WatchEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    /// A real etcd on free loopback ports in a temp dir, killed on drop.
    struct Etcd {
        child: std::process::Child,
        url: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }

    /// None (and a SKIPPED line) where etcd is not installed; CI installs it.
    async fn etcd() -> Option<Etcd> {
        let installed = std::process::Command::new("etcd").arg("--version").output().is_ok();
        if !installed {
            assert!(std::env::var_os("CI").is_none(), "etcd missing in CI: .ci/run installs it");
            eprintln!("SKIPPED: etcd not installed (apt-get install etcd-server)");
            return None;
        }
        let dir = tempfile::tempdir().expect("dir");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path())
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}"), "--log-level", "error"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn etcd");
        let etcd = Etcd { child, url, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut c) = Client::connect([&etcd.url], None).await
                && c.status().await.is_ok()
            {
                return Some(etcd);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd did not come up on {}", etcd.url);
    }

    async fn store(etcd: &Etcd, prefix: &str) -> EtcdStore {
        let options = EtcdOptions { endpoints: vec![etcd.url.clone()], prefix: prefix.into() };
        EtcdStore::connect(&options).await.expect("connect")
    }

    #[tokio::test]
    async fn etcd_store_behaves_like_every_store() {
        let Some(etcd) = etcd().await else { return };
        let s = store(&etcd, "/t1").await;
        conformance::kv_scan_cas_watch(&s).await;
        conformance::reverse_scans(&store(&etcd, "/t2").await).await;
        conformance::concurrent_cas(Arc::new(store(&etcd, "/t3").await)).await;
        // What one node writes, another node's store reads and watches.
        let other = store(&etcd, "/t1").await;
        assert_eq!(other.get("new").await.expect("get"), Some(b"x".to_vec()));
        let mut watch = other.watch();
        s.put("tenants/acme", b"{}".to_vec()).await.expect("put");
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.recv()).await;
        assert_eq!(
            ev.expect("in time").expect("open"),
            WatchEvent::Put { key: "tenants/acme".into(), value: b"{}".to_vec() }
        );
    }

    #[tokio::test]
    async fn prefixes_keep_clusters_apart() {
        let Some(etcd) = etcd().await else { return };
        let (a, b) = (store(&etcd, "/a").await, store(&etcd, "/ab").await);
        a.put("k", b"1".to_vec()).await.expect("put");
        b.put("k", b"2".to_vec()).await.expect("put");
        assert_eq!(a.scan_prefix("", 10).await.expect("scan"), [("k".into(), b"1".to_vec())]);
        assert_eq!(b.scan_prefix_rev("", None, 10).await.expect("scan").len(), 1);
        assert_eq!(a.get("k").await.expect("get"), Some(b"1".to_vec()));
    }

    #[tokio::test]
    async fn a_watch_behind_a_compaction_asks_for_a_resync() {
        let Some(etcd) = etcd().await else { return };
        let s = store(&etcd, "/c").await;
        for i in 0..5u8 {
            s.put("k", vec![i]).await.expect("put");
        }
        let mut kv = s.client().kv_client();
        let rev = kv.get("x", None).await.expect("get").header().map_or(0, |h| h.revision());
        kv.compact(rev, None).await.expect("compact");
        // A watch resuming from revision 1 (a node that was away) cannot replay.
        let (events, mut rx) = broadcast::channel(16);
        let task = tokio::spawn(watch_loop(s.client().clone(), "/c/".into(), 1, events));
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(ev.expect("in time").expect("open"), WatchEvent::Resync);
        // And it goes on from the present.
        s.put("k", b"after".to_vec()).await.expect("put");
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert_eq!(
            ev.expect("in time").expect("open"),
            WatchEvent::Put { key: "k".into(), value: b"after".to_vec() }
        );
        task.abort();
    }

    #[tokio::test]
    async fn an_unreachable_etcd_is_unavailable_not_a_hang() {
        let Some(mut etcd) = etcd().await else { return };
        let s = store(&etcd, "/u").await;
        s.put("k", b"v".to_vec()).await.expect("put");
        let _ = etcd.child.kill();
        let _ = etcd.child.wait();
        let err = s.get("k").await.expect_err("etcd is gone");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        let err = s.compare_and_swap("k", None, Some(vec![1])).await.expect_err("etcd is gone");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
}
