//! API keys can be taken back: revoked and expired keys are refused from their next request
//! on (and audited), listings never show secrets, tenants have a key cap, operator keys
//! rotate, and operators can revoke any tenant's runner.
#![allow(missing_docs, clippy::unwrap_used)]

use runnel_tests::{TestBroker, wait_past_unix};
use serde_json::json;

fn events(v: &serde_json::Value, event: &str) -> usize {
    v["events"].as_array().unwrap().iter().filter(|e| e["event"] == event).count()
}

#[tokio::test]
async fn revoked_and_expired_keys_get_401_and_both_are_audited() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let (_, d) = b.api.post("/v1/tenants/acme/keys", &admin, json!({ "role": "dispatcher" })).await;
    let (dispatcher, id) =
        (d["key"].as_str().unwrap().to_owned(), d["id"].as_str().unwrap().to_owned());
    assert_eq!(b.api.get("/v1/jobs", &dispatcher).await.0, 200);

    // The listing shows the key, never its secret.
    let (s, list) = b.api.get("/v1/tenants/acme/keys", &admin).await;
    assert_eq!(s, 200);
    assert!(list["keys"].as_array().unwrap().iter().any(|k| k["id"] == id.as_str()));
    assert!(!list.to_string().contains(dispatcher.rsplit('_').next().unwrap()), "{list}");
    assert!(list["keys"].as_array().unwrap().iter().any(|k| k["last_used_at"].is_i64()));

    let (s, v) = b.api.delete(&format!("/v1/tenants/acme/keys/{id}"), &admin).await;
    assert_eq!((s, v["revoked_at"].is_i64()), (200, true), "{v}");
    let (s, v) = b.api.get("/v1/jobs", &dispatcher).await;
    assert_eq!((s, v["error"]["message"].as_str()), (401, Some("API key revoked")), "{v}");

    // An expiring key works until it expires, then is refused.
    let (_, e) = b
        .api
        .post(
            "/v1/tenants/acme/keys",
            &admin,
            json!({ "role": "dispatcher", "expires_in_secs": 1 }),
        )
        .await;
    let short = e["key"].as_str().unwrap().to_owned();
    assert_eq!(b.api.get("/v1/jobs", &short).await.0, 200);
    wait_past_unix(e["expires_at"].as_i64().unwrap(), "the key to expire").await;
    let (s, v) = b.api.get("/v1/jobs", &short).await;
    assert_eq!((s, v["error"]["message"].as_str()), (401, Some("API key expired")), "{v}");

    // The revocation is audited; each refused use is counted into the tenant's log.
    for _ in 0..3 {
        assert_eq!(b.api.get("/v1/jobs", &dispatcher).await.0, 401);
    }
    // (The counts may be split over several windows: add them up.)
    let counted = |audit: &serde_json::Value, what: &str| -> u64 {
        audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["detail"].as_str())
            .filter(|d| d.contains(what))
            .filter_map(|d| d.split('×').next()?.parse::<u64>().ok())
            .sum()
    };
    let revoked_use = format!("revoked key used from key:{id}");
    let audit =
        runnel_tests::wait_for(std::time::Duration::from_secs(5), "refused uses", || async {
            let (_, audit) = b.api.get("/v1/audit", &admin).await;
            (counted(&audit, &revoked_use) == 4
                && counted(&audit, "expired key used from key:") == 1)
                .then_some(audit)
        })
        .await;
    assert_eq!(events(&audit, "key_revoked"), 1, "{audit}");
    // Wrong secrets for a real key id are counted per key id, with no key material.
    // (Change the last character to one it is not: a guess equal to the key would pass.)
    let (head, last) = dispatcher.split_at(dispatcher.len() - 1);
    let guess = format!("{head}{}", if last == "0" { "1" } else { "0" });
    assert_ne!(guess, dispatcher);
    assert_eq!(b.api.get("/v1/jobs", &guess).await.0, 401);
    let metrics = b.api.raw("/metrics", &b.operator_key).await;
    assert!(
        metrics.lines().any(|l| l.starts_with("runnel_api_key_failures_total")
            && l.contains(&format!("key=\"{id}\""))
            && l.contains("reason=\"bad_secret\"")),
        "{metrics}"
    );
    assert!(!metrics.contains(dispatcher.rsplit('_').next().unwrap()));
}

#[tokio::test]
async fn tenants_are_capped_and_cannot_touch_each_others_keys() {
    let b = TestBroker::start_with(|c| c.max_keys_per_tenant = 3).await;
    let admin = b.tenant("acme").await; // key 1
    let other = b.tenant("other").await;
    for _ in 0..2 {
        assert_eq!(
            b.api.post("/v1/tenants/acme/keys", &admin, json!({ "role": "dispatcher" })).await.0,
            201
        );
    }
    let (s, v) = b.api.post("/v1/tenants/acme/keys", &admin, json!({ "role": "admin" })).await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("too_many_keys")), "{v}");
    // Another tenant's admin sees nothing: 404 for list and revoke.
    assert_eq!(b.api.get("/v1/tenants/acme/keys", &other).await.0, 404);
    let (_, list) = b.api.get("/v1/tenants/acme/keys", &admin).await;
    let id = list["keys"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(b.api.delete(&format!("/v1/tenants/acme/keys/{id}"), &other).await.0, 404);
    assert_eq!(b.api.delete(&format!("/v1/tenants/other/keys/{id}"), &other).await.0, 404);
    // Revoking one makes room again.
    let victim =
        list["keys"].as_array().unwrap().iter().find(|k| k["role"] == "dispatcher").unwrap();
    let vid = victim["id"].as_str().unwrap();
    assert_eq!(b.api.delete(&format!("/v1/tenants/acme/keys/{vid}"), &admin).await.0, 200);
    assert_eq!(
        b.api.post("/v1/tenants/acme/keys", &admin, json!({ "role": "dispatcher" })).await.0,
        201
    );
}

#[tokio::test]
async fn operator_keys_rotate_and_the_operator_revokes_a_tenants_runner() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (runner_id, _h) = b.runner(&admin, "alice", &dir.path().join("r"), 1).await;

    let (s, v) = b.api.delete(&format!("/v1/runners/{runner_id}"), &b.operator_key).await;
    assert_eq!((s, v["connections_closed"].as_u64()), (200, Some(1)), "{v}");
    let (_, audit) = b.api.get("/v1/audit", &admin).await;
    let revoked: Vec<_> =
        audit["events"].as_array().unwrap().iter().filter(|e| e["event"] == "revoked").collect();
    assert_eq!(revoked.len(), 1, "{audit}");
    assert!(revoked[0]["actor"].as_str().unwrap().starts_with("key:"), "{audit}");

    // Rotation: a second operator key, then the first revoked; the last cannot go.
    let (_, list) = b.api.get("/v1/operator-keys", &b.operator_key).await;
    let first = list["keys"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        b.api.delete(&format!("/v1/operator-keys/{first}"), &b.operator_key).await.0,
        409,
        "the last operator key"
    );
    let (s, new) = b.api.post("/v1/operator-keys", &b.operator_key, json!({})).await;
    assert_eq!(s, 201, "{new}");
    let new_key = new["key"].as_str().unwrap().to_owned();
    assert_eq!(b.api.delete(&format!("/v1/operator-keys/{first}"), &new_key).await.0, 200);
    assert_eq!(b.api.get("/v1/tenants", &b.operator_key).await.0, 401);
    assert_eq!(b.api.get("/v1/tenants", &new_key).await.0, 200);
    // Tenant keys cannot touch operator keys.
    assert_eq!(b.api.get("/v1/operator-keys", &admin).await.0, 403);
}

#[tokio::test]
async fn runners_are_capped_per_tenant_and_a_revoke_makes_room() {
    let b = TestBroker::start_with(|c| c.max_runners_per_tenant = 2).await;
    let admin = b.tenant("acme").await;
    let other = b.tenant("other").await;
    let create = |key: &str| {
        let key = key.to_owned();
        let api = &b.api;
        async move { api.post("/v1/runners", &key, json!({ "owner": "alice", "name": "r" })).await }
    };
    let (s, first) = create(&admin).await;
    assert_eq!(s, 201, "{first}");
    assert_eq!(create(&admin).await.0, 201);
    let (s, v) = create(&admin).await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("too_many_runners")), "{v}");
    // Another tenant's quota is its own.
    assert_eq!(create(&other).await.0, 201);
    // A revoked (here: pending) runner no longer counts.
    let id = first["runner_id"].as_str().unwrap();
    assert_eq!(b.api.delete(&format!("/v1/runners/{id}"), &admin).await.0, 200);
    assert_eq!(create(&admin).await.0, 201);
}
