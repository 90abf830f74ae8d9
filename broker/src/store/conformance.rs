//! What every [`Store`] engine must do, as test bodies each engine's tests run (redb in a
//! temp file, etcd as a real server on loopback).

use std::sync::Arc;

use super::{Store, WatchEvent};

/// Get/put/delete, prefix scans with limits, CAS (present and absent), and the watch.
/// Leaves `runners/a/1 = "1"`, `new = "x"`, and no `runners/b/1`.
pub(crate) async fn kv_scan_cas_watch(store: &dyn Store) {
    let mut watch = store.watch();
    store.put("runners/a/1", b"one".to_vec()).await.expect("put");
    store.put("runners/a/2", b"two".to_vec()).await.expect("put");
    store.put("runners/b/1", b"other".to_vec()).await.expect("put");
    assert_eq!(store.get("runners/a/2").await.expect("get"), Some(b"two".to_vec()));
    assert_eq!(store.get("runners/a/9").await.expect("get"), None);
    let scan = store.scan_prefix("runners/a/", 100).await.expect("scan");
    assert_eq!(scan.len(), 2);
    assert_eq!(scan[0], ("runners/a/1".to_string(), b"one".to_vec()));
    assert_eq!(store.scan_prefix("runners/", 1).await.expect("scan").len(), 1);

    assert!(!store.compare_and_swap("runners/a/1", Some(b"nope"), None).await.expect("cas"));
    assert!(
        store
            .compare_and_swap("runners/a/1", Some(b"one"), Some(b"1".to_vec()))
            .await
            .expect("cas")
    );
    assert!(store.compare_and_swap("new", None, Some(b"x".to_vec())).await.expect("cas"));
    assert!(!store.compare_and_swap("new", None, Some(b"y".to_vec())).await.expect("cas"));
    assert!(store.delete("runners/b/1").await.expect("delete"));
    assert!(!store.delete("runners/b/1").await.expect("delete"));

    // Every committed change, in order; nothing for the failed swaps or the second delete.
    let put = |k: &str, v: &[u8]| WatchEvent::Put { key: k.into(), value: v.to_vec() };
    let expected = [
        put("runners/a/1", b"one"),
        put("runners/a/2", b"two"),
        put("runners/b/1", b"other"),
        put("runners/a/1", b"1"),
        put("new", b"x"),
        WatchEvent::Delete { key: "runners/b/1".into() },
    ];
    for want in expected {
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), watch.recv())
            .await
            .expect("watch event in time")
            .expect("watch open");
        assert_eq!(got, want);
    }
}

/// Reverse scans page newest first, with an exclusive cursor, inside their prefix.
pub(crate) async fn reverse_scans(store: &dyn Store) {
    for i in 0..5 {
        store.put(&format!("log/a/{i:03}"), vec![i]).await.expect("put");
    }
    store.put("log/b/999", vec![9]).await.expect("put");
    store.put("log/", vec![0]).await.expect("put");
    let keys = |v: Vec<(String, Vec<u8>)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    let page = keys(store.scan_prefix_rev("log/a/", None, 2).await.expect("scan"));
    assert_eq!(page, ["log/a/004", "log/a/003"]);
    let page = keys(store.scan_prefix_rev("log/a/", Some("log/a/003"), 10).await.expect("scan"));
    assert_eq!(page, ["log/a/002", "log/a/001", "log/a/000"]);
    assert!(store.scan_prefix_rev("log/a/", Some("log/a/000"), 10).await.expect("scan").is_empty());
    assert!(store.scan_prefix_rev("log/a/", Some("log/"), 10).await.expect("scan").is_empty());
}

/// Sixteen concurrent swaps of one value: exactly one wins.
pub(crate) async fn concurrent_cas(store: Arc<dyn Store>) {
    store.put("token", b"fresh".to_vec()).await.expect("put");
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.compare_and_swap("token", Some(b"fresh"), Some(vec![i])).await.expect("cas")
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.expect("join"));
    }
    assert_eq!(winners, 1);
}
