//! Tenant and owner isolation through the API: another tenant's things are 404, a member
//! reaches only its own owner.
#![allow(missing_docs, clippy::unwrap_used)]

use runnel_tests::TestBroker;
use serde_json::json;

#[tokio::test]
async fn tenants_cannot_see_or_touch_each_others_runners_and_jobs() {
    let b = TestBroker::start().await;
    let a_admin = b.tenant("a").await;
    let b_admin = b.tenant("b").await;
    let dir = tempfile::tempdir().unwrap();
    let (b_runner, _h) = b.runner(&b_admin, "bob", &dir.path().join("b"), 2).await;
    let (a_runner, _ha) = b.runner(&a_admin, "bob", &dir.path().join("a"), 2).await;

    // List: each tenant sees only its own (a 200 listing A's runner, and only it: an error
    // answer would not contain B's runner either).
    let (s, list) = b.api.get("/v1/runners", &a_admin).await;
    let ids: Vec<&str> =
        list["runners"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!((s, ids), (200, vec![a_runner.as_str()]), "{list}");
    // Get, revoke: 404, never 403 (which would confirm it exists).
    assert_eq!(b.api.get(&format!("/v1/runners/{b_runner}"), &a_admin).await.0, 404);
    assert_eq!(b.api.delete(&format!("/v1/runners/{b_runner}"), &a_admin).await.0, 404);
    // Dispatch naming B's runner from A, even with the same owner name: 404.
    let (s, _) = b
        .api
        .post("/v1/jobs", &a_admin, json!({ "owner": "bob", "runner_id": b_runner, "kind": "exec", "exec": { "program": "true" } }))
        .await;
    assert_eq!(s, 404);
    // A dispatch for owner "bob" from tenant A runs on A's bob runner, never B's.
    let (_, job) = b.run(&a_admin, "bob", "true", &[]).await;
    assert_eq!(job["state"], "succeeded");
    assert_ne!(job["runner_id"], b_runner.as_str());
    // B's jobs are invisible to A.
    let (_, bjob) = b.run(&b_admin, "bob", "true", &[]).await;
    let bjob_id = bjob["id"].as_str().unwrap();
    assert_eq!(b.api.get(&format!("/v1/jobs/{bjob_id}"), &a_admin).await.0, 404);
    assert_eq!(b.api.post(&format!("/v1/jobs/{bjob_id}/cancel"), &a_admin, json!({})).await.0, 404);
    let (s, jobs) = b.api.get("/v1/jobs", &a_admin).await;
    let ids: Vec<&str> =
        jobs["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!((s, ids), (200, vec![job["id"].as_str().unwrap()]), "{jobs}");
    // A's admin cannot mint keys for B.
    let (s, _) = b.api.post("/v1/tenants/b/keys", &a_admin, json!({ "role": "admin" })).await;
    assert_eq!(s, 404);
    // B still works, untouched.
    let (s, _) = b.api.get(&format!("/v1/runners/{b_runner}"), &b_admin).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn member_keys_reach_only_their_own_owner() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let alice = b.key("acme", json!({ "role": "member", "owner": "alice" })).await;
    let dispatcher = b.key("acme", json!({ "role": "dispatcher" })).await;
    let dir = tempfile::tempdir().unwrap();
    let (alice_runner, _h1) = b.runner(&admin, "alice", &dir.path().join("1"), 2).await;
    let (bob_runner, _h2) = b.runner(&admin, "bob", &dir.path().join("2"), 2).await;

    assert_eq!(b.api.get(&format!("/v1/runners/{alice_runner}"), &alice).await.0, 200);
    assert_eq!(b.api.get(&format!("/v1/runners/{bob_runner}"), &alice).await.0, 404);
    let (s, list) = b.api.get("/v1/runners", &alice).await;
    assert_eq!(s, 200, "{list}");
    let ids: Vec<&str> =
        list["runners"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [alice_runner.as_str()]);
    // Dispatch: own owner (implicit) works; another owner is forbidden; naming bob's runner
    // under alice is not found.
    let (s, job) = b
        .api
        .post(
            "/v1/jobs",
            &alice,
            json!({ "kind": "exec", "exec": { "program": "true" }, "wait": true }),
        )
        .await;
    assert_eq!((s, job["runner_id"].as_str()), (200, Some(alice_runner.as_str())));
    let (s, _) = b
        .api
        .post(
            "/v1/jobs",
            &alice,
            json!({ "owner": "bob", "kind": "exec", "exec": { "program": "true" } }),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = b
        .api
        .post(
            "/v1/jobs",
            &alice,
            json!({ "runner_id": bob_runner, "kind": "exec", "exec": { "program": "true" } }),
        )
        .await;
    assert_eq!(s, 404);
    // Bob's job is invisible to alice's key; the dispatcher sees both.
    let (_, bob_job) = b.run(&dispatcher, "bob", "true", &[]).await;
    let bob_job = bob_job["id"].as_str().unwrap();
    assert_eq!(b.api.get(&format!("/v1/jobs/{bob_job}"), &alice).await.0, 404);
    assert_eq!(b.api.get(&format!("/v1/jobs/{bob_job}"), &dispatcher).await.0, 200);
    // Members and dispatchers cannot revoke or create runners.
    assert_eq!(b.api.delete(&format!("/v1/runners/{alice_runner}"), &alice).await.0, 403);
    assert_eq!(b.api.delete(&format!("/v1/runners/{alice_runner}"), &dispatcher).await.0, 403);
    assert_eq!(
        b.api.post("/v1/runners", &dispatcher, json!({ "owner": "x", "name": "y" })).await.0,
        403
    );
}

#[tokio::test]
async fn bad_keys_and_bad_bodies_get_clear_json_errors() {
    let b = TestBroker::start().await;
    let admin = b.tenant("acme").await;
    let (s, v) = b
        .api
        .get(
            "/v1/runners",
            "rk_0000000000000000_0000000000000000000000000000000000000000000000000000000000000000",
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (401, Some("unauthorized")));
    assert_eq!(b.api.get("/v1/runners", "garbage").await.0, 401);
    // Operator keys are cluster-wide, not tenant keys.
    assert_eq!(b.api.get("/v1/runners", &b.operator_key).await.0, 403);
    // Tenant keys cannot create tenants.
    assert_eq!(b.api.post("/v1/tenants", &admin, json!({ "id": "x" })).await.0, 403);
    for body in [json!({ "id": "../etc" }), json!({ "id": "" }), json!({ "id": "ok", "extra": 1 })]
    {
        let (s, v) = b.api.post("/v1/tenants", &b.operator_key, body).await;
        assert_eq!(s, 400, "{v}");
        assert!(v["error"]["message"].as_str().is_some());
    }
    assert_eq!(b.api.post("/v1/tenants", &b.operator_key, json!({ "id": "acme" })).await.0, 409);
    let bad_jobs = [
        json!({ "owner": "a", "kind": "exec" }),
        json!({ "owner": "a", "kind": "exec", "exec": { "program": "" } }),
        json!({ "owner": "a b", "kind": "exec", "exec": { "program": "true" } }),
        json!({ "owner": "a", "kind": "exec", "exec": { "program": "true" }, "timeout_ms": 0 }),
        json!({ "owner": "a", "kind": "exec", "exec": { "program": "true" }, "labels": { "k": "v v" } }),
        json!({ "kind": "exec", "exec": { "program": "true" } }),
    ];
    for body in bad_jobs {
        let (s, v) = b.api.post("/v1/jobs", &admin, body.clone()).await;
        assert_eq!(s, 400, "{body} → {v}");
    }
    let (s, v) = b
        .api
        .post("/v1/runners", &admin, json!({ "owner": "a", "name": "n", "token_ttl_secs": 0 }))
        .await;
    assert_eq!(s, 400, "{v}");
    // A body over the limit is 413 (HTTP's word for it), with the JSON error shape.
    let huge =
        json!({ "owner": "a", "kind": "exec", "exec": { "program": "x".repeat(600 * 1024) } });
    let (s, v) = b.api.post("/v1/jobs", &admin, huge).await;
    assert_eq!((s, v["error"]["code"].as_str()), (413, Some("body_too_large")), "{v}");
}
