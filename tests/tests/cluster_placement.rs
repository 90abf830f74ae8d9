//! Placement and forwarding on a real etcd and real `runnel-broker` processes (the
//! rebalance test: in-process nodes, added one by one): each tenant has one home node; runners that
//! dial another node are redirected there; API calls through any node reach the home over
//! `runnel-peer/1` (dispatch, get, list, cancel, output, revoke), exactly once and never
//! across tenants.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runnel_runner::{Runner, RunnerHandle};
use runnel_tests::{ProcessCluster, Record, TestCluster, metric_value, wait_for};
use serde_json::{Value, json};

fn exec(program: &str, args: &[&str], wait: bool) -> Value {
    json!({ "owner": "alice", "kind": "exec", "exec": { "program": program, "args": args }, "wait": wait })
}

const BROKER: &str = env!("CARGO_BIN_EXE_broker-under-test");

/// The node etcd's placement names as `tenant`'s home (its id).
async fn placed_on(api: &runnel_tests::Api, op: &str, tenant: &str) -> String {
    let (_, v) = api.get("/v1/cluster", op).await;
    let t = v["tenants"].as_array().unwrap().iter().find(|t| t["tenant"] == tenant);
    t.and_then(|t| t["node"].as_str()).unwrap().to_owned()
}

/// A runner of `owner` created through node `via`, which it dials first; online.
async fn runner(
    c: &ProcessCluster,
    via: usize,
    admin: &str,
    owner: &str,
    dir: &std::path::Path,
    rec: Option<Record>,
) -> (String, RunnerHandle) {
    let (id, state) = c.enrolled(via, admin, owner, dir).await;
    let mut b = Runner::builder(state).capacity(4);
    if let Some(mut r) = rec {
        r.runner = id.clone();
        b = b.handler("record", r);
    }
    let h = b.spawn().unwrap();
    h.wait_connected(Duration::from_secs(15)).await.unwrap();
    (id, h)
}

/// `runnel_cluster_redirects_total` of a node.
async fn redirects(api: &runnel_tests::Api, op: &str) -> f64 {
    metric_value(&api.raw("/metrics", op).await, "runnel_cluster_redirects_total").unwrap_or(0.0)
}

#[tokio::test]
async fn calls_through_any_node_reach_the_tenants_home() {
    let Some(c) = ProcessCluster::start(BROKER, 3, &[]).await else { return };
    let op = c.operator_key.clone();
    let admin = c.tenant("acme").await;
    // No runner yet: every node answers as the home would (409), and the home is claimed.
    for n in &c.nodes {
        let (s, v) = n.api.post("/v1/jobs", &admin, exec("true", &[], true)).await;
        assert_eq!(s, 409, "{v}");
        assert_eq!(v["error"]["code"], "no_runner");
    }
    let home = c.home_of("acme").await.unwrap();
    assert_eq!(placed_on(&c.nodes[0].api, &op, "acme").await, c.nodes[home].id);
    let other = (home + 1) % 3;

    // A runner enrolled through (and so dialling) another node comes online at the home,
    // and every node shows it online.
    let dir = tempfile::tempdir().unwrap();
    let before = redirects(&c.nodes[other].api, &op).await;
    let (id, r) = runner(&c, other, &admin, "alice", &dir.path().join("r"), None).await;
    assert_eq!(redirects(&c.nodes[other].api, &op).await, before + 1.0, "it was redirected");
    for n in &c.nodes {
        wait_for(Duration::from_secs(10), "the runner online everywhere", || async {
            let (_, v) = n.api.get(&format!("/v1/runners/{id}"), &admin).await;
            (v["status"] == "online").then_some(())
        })
        .await;
    }
    // Dispatch, get, list, output and cancel through each node.
    for n in &c.nodes {
        let (s, v) = n.api.post("/v1/jobs", &admin, exec("echo", &["hi"], true)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!((v["state"].as_str(), v["output"].as_str()), (Some("succeeded"), Some("hi\n")));
        let job = v["id"].as_str().unwrap().to_owned();
        let home_id = &c.nodes[home].id;
        assert!(job.ends_with(&format!("-{home_id}")), "the id names its home: {job}");
        for m in &c.nodes {
            let (s, got) = m.api.get(&format!("/v1/jobs/{job}"), &admin).await;
            assert_eq!((s, &got["output"]), (200, &v["output"]), "{got}");
            assert_eq!(m.api.raw(&format!("/v1/jobs/{job}/output"), &admin).await, "hi\n");
        }
        let (_, list) = n.api.get("/v1/jobs?limit=100", &admin).await;
        assert!(list["jobs"].as_array().unwrap().iter().any(|j| j["id"] == job.as_str()), "{list}");
    }
    // A batch through each node: every job dispatched at the home, answered in order.
    for n in &c.nodes {
        let jobs = json!({ "jobs": [exec("echo", &["a"], true), exec("echo", &["b"], true)] });
        let (s, v) = n.api.post("/v1/jobs/batch", &admin, jobs).await;
        assert_eq!(s, 200, "{v}");
        let outputs: Vec<&str> =
            v["jobs"].as_array().unwrap().iter().map(|j| j["output"].as_str().unwrap()).collect();
        assert_eq!(outputs, ["a\n", "b\n"], "{v}");
        let home_id = &c.nodes[home].id;
        for j in v["jobs"].as_array().unwrap() {
            assert!(j["id"].as_str().unwrap().ends_with(&format!("-{home_id}")), "{j}");
        }
    }
    // Each other node forwarded its dispatches, gets and cancels on one lane to the home.
    for (i, n) in c.nodes.iter().enumerate() {
        let text = n.api.raw("/metrics", &op).await;
        let lanes = metric_value(&text, "runnel_cluster_peer_lanes").unwrap_or(0.0);
        assert_eq!(lanes, if i == home { 0.0 } else { 1.0 }, "node {i}, home {home}");
    }
    // The native API through each node: forwarded to the home as HTTP calls are, the
    // followed output relayed from there.
    // The CA the runner pinned at enrollment (a cluster's CA lives in etcd).
    let ca = std::fs::read_to_string(dir.path().join("r").join("ca.pem")).unwrap();
    let fp = runnel_certs::fingerprint(&runnel_certs::pem::certs_from_pem(&ca).unwrap()[0]);
    let mut natives = Vec::new();
    for n in &c.nodes {
        natives.push(runnel_client::Client::connect(&n.quic, &fp, &admin).await.unwrap());
    }
    for (i, client) in natives.iter().enumerate() {
        let mut spec = runnel_client::exec("alice", "echo", &[&format!("native{i}")]);
        spec.wait = true;
        let j = client.submit(spec).await.unwrap();
        assert_eq!(j.output, format!("native{i}\n"), "{j:?}");
        assert!(j.id.ends_with(&format!("-{}", c.nodes[home].id)), "homed at the home: {j:?}");
        for other_client in &natives {
            assert_eq!(other_client.get(&j.id).await.unwrap().output, j.output);
        }
        let script = "echo one; sleep 0.2; echo two";
        let followed = client.dispatch(runnel_client::exec("alice", "sh", &["-c", script]));
        let end = followed.await.unwrap().result().await.unwrap();
        assert_eq!((end.state.name(), end.output.as_str()), ("succeeded", "one\ntwo\n"));
    }

    let (s, v) = c.nodes[other].api.post("/v1/jobs", &admin, exec("sleep", &["30"], false)).await;
    assert_eq!(s, 201, "{v}");
    let long = v["id"].as_str().unwrap().to_owned();
    wait_for(Duration::from_secs(10), "the long job to run", || async {
        let (_, v) = c.nodes[other].api.get(&format!("/v1/jobs/{long}"), &admin).await;
        (v["state"] == "running").then_some(())
    })
    .await;
    let (s, _) =
        c.nodes[other].api.post(&format!("/v1/jobs/{long}/cancel"), &admin, json!({})).await;
    assert_eq!(s, 202);
    let end = c.nodes[(home + 2) % 3].api.job_end(&admin, &long, Duration::from_secs(15)).await;
    assert_eq!(end["state"], "cancelled", "{end}");

    // Another tenant sees none of it, through any node.
    let intruder = c.tenant("globex").await;
    for n in &c.nodes {
        let (s, _) = n.api.get(&format!("/v1/jobs/{long}"), &intruder).await;
        assert_eq!(s, 404);
        let (s, _) = n.api.post(&format!("/v1/jobs/{long}/cancel"), &intruder, json!({})).await;
        assert_eq!(s, 404);
        let (_, list) = n.api.get("/v1/jobs", &intruder).await;
        assert_eq!(list["jobs"].as_array().unwrap().len(), 0, "{list}");
        let (s, _) = n.api.get(&format!("/v1/runners/{id}"), &intruder).await;
        assert_eq!(s, 404);
        let theirs = runnel_client::Client::connect(&n.quic, &fp, &intruder).await.unwrap();
        assert_eq!(
            theirs.get(&long).await.unwrap_err().status(),
            Some(404),
            "native, via {}",
            n.id
        );
        assert_eq!(theirs.cancel(&long).await.unwrap_err().status(), Some(404));
    }

    // Exactly one node claims acme, and only it serves it.
    let mut serving = Vec::new();
    for n in &c.nodes {
        let (_, v) = n.api.get("/v1/cluster", &op).await;
        if v["homed_here"].as_array().unwrap().iter().any(|h| h["tenant"] == "acme") {
            serving.push(v["this_node"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(serving, [c.nodes[home].id.clone()]);

    // Revoked through a node that is not the home: closed on the home, and counted.
    let (s, v) = c.nodes[other].api.delete(&format!("/v1/runners/{id}"), &admin).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["connections_closed"], 1, "{v}");
    let end = tokio::time::timeout(Duration::from_secs(10), r.join()).await.expect("runner ends");
    assert!(end.is_err(), "a revoked runner stops for good");
}

#[tokio::test]
async fn three_hundred_jobs_through_random_nodes_each_run_once_on_the_right_owner() {
    let Some(c) = ProcessCluster::start(BROKER, 3, &[]).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = Record { runner: String::new(), seen: seen.clone() };
    let mut keys = Vec::new();
    let mut owner_of = HashMap::new();
    let mut runners = Vec::new();
    for (i, t) in ["t1", "t2", "t3"].iter().enumerate() {
        let admin = c.nodes[i].api.tenant(&c.operator_key, t).await;
        for (j, owner) in ["alice", "bob"].iter().enumerate() {
            let d = dir.path().join(format!("{t}-{owner}"));
            let (id, h) = runner(&c, (i + j) % 3, &admin, owner, &d, Some(rec.clone())).await;
            owner_of.insert(id, (t.to_string(), owner.to_string()));
            runners.push(h);
        }
        keys.push((t.to_string(), admin));
    }
    let mut expected = HashMap::new();
    let mut tasks = Vec::new();
    for i in 0..300usize {
        let (tenant, key) = keys[i % 3].clone();
        let owner = if i % 2 == 0 { "alice" } else { "bob" };
        let api = c.nodes[(i * 7 + i / 3) % 3].api.clone();
        let payload = format!("{tenant}/{owner}/{i}");
        tasks.push(tokio::spawn(async move {
            let body =
                json!({ "owner": owner, "kind": "record", "payload": payload, "wait": true });
            let (s, v) = api.post("/v1/jobs", &key, body).await;
            assert_eq!((s, v["state"].as_str()), (200, Some("succeeded")), "{v}");
            assert_eq!(v["output"], payload);
            (v["id"].as_str().unwrap().to_owned(), v["runner_id"].as_str().unwrap().to_owned())
        }));
        expected.insert(i, (keys[i % 3].0.clone(), owner.to_owned()));
    }
    let mut ran_on = HashMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (job, runner) = t.await.unwrap();
        assert_eq!(owner_of[&runner], expected[&i], "job {i} ran on a runner of the right owner");
        ran_on.insert(job, runner);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 300, "each job ran exactly once");
    for (job, runner) in seen {
        assert_eq!(ran_on.get(&job), Some(&runner), "{job} ran where the API said");
    }
    for h in runners {
        h.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn joining_nodes_take_no_tenant_until_a_rebalance_moves_them_with_their_runners() {
    let quick = |c: &mut runnel_broker::Config| c.goaway_window = Duration::from_millis(200);
    let Some(mut c) = TestCluster::start(1, quick).await else { return };
    let op = c.operator_key().to_owned();
    let mut admins: Vec<String> = Vec::new();
    for i in 0..12 {
        let admin = c.nodes[0].tenant(&format!("t{i}")).await;
        // Claims the tenant on the only node.
        assert_eq!(c.nodes[0].api.post("/v1/jobs", &admin, exec("true", &[], true)).await.0, 409);
        admins.push(admin);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut runners = Vec::new();
    for (i, admin) in admins.iter().enumerate() {
        let (_, h) = c.nodes[0].runner(admin, "alice", &dir.path().join(format!("r{i}")), 4).await;
        runners.push(h);
    }
    c.add_node(quick).await;
    c.add_node(quick).await;
    wait_for(Duration::from_secs(5), "n1 to see 3 nodes", || async {
        let (_, v) = c.nodes[0].api.get("/v1/cluster", &op).await;
        (v["nodes"].as_array()?.len() == 3).then_some(())
    })
    .await;
    // Joining nodes take no existing tenant.
    let (_, v) = c.nodes[0].api.get("/v1/cluster", &op).await;
    assert!(v["tenants"].as_array().unwrap().iter().all(|t| t["node"] == "n1"), "{v}");

    let (s, v) = c.nodes[2].api.post("/v1/cluster/rebalance", &op, json!({})).await;
    assert_eq!(s, 200, "{v}");
    let moved = v["moved"].as_array().unwrap().clone();
    assert!(!moved.is_empty(), "12 tenants over 3 nodes: some move ({v})");
    for m in &moved {
        assert_eq!(m["from"], "n1");
        assert_eq!(m["runners_sent_away"], 1, "{m}");
    }
    // Every tenant works again, and the moved ones are homed where rendezvous says.
    for (i, admin) in admins.iter().enumerate() {
        let t = format!("t{i}");
        wait_for(Duration::from_secs(20), &format!("{t} to run a job again"), || async {
            let (s, v) = c.nodes[0].api.post("/v1/jobs", admin, exec("echo", &["ok"], true)).await;
            (s == 200 && v["state"] == "succeeded").then_some(())
        })
        .await;
        if let Some(m) = moved.iter().find(|m| m["tenant"] == t.as_str()) {
            assert_eq!(placed_on(&c.nodes[0].api, &op, &t).await, m["to"].as_str().unwrap(), "{t}");
        }
    }
    // A second rebalance has nothing left to move.
    let (_, v) = c.nodes[1].api.post("/v1/cluster/rebalance", &op, json!({})).await;
    assert_eq!(v["moved"].as_array().unwrap().len(), 0, "{v}");
    for h in runners {
        h.shutdown().await.unwrap();
    }
}

/// A connection to `node`'s peer endpoint with a node certificate of its cluster
/// (`n9`), offering `alpn`; with `tickets` to count the session tickets handed out.
async fn peer_connection(
    node: &runnel_tests::TestBroker,
    alpn: &[&[u8]],
    tickets: Option<Arc<runnel_tests::CountingTickets>>,
) -> (quinn::Endpoint, quinn::Connection) {
    let ca = node.handle().cluster_ca();
    let (cert, key_pem) = ca.issue_node_cert("n9").unwrap();
    let chain = vec![cert.cert_der.clone(), ca.cert_der().clone()];
    let key = runnel_certs::pem::private_key_from_pem(&key_pem).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    if let Some(tickets) = tickets {
        tls.resumption = rustls::client::Resumption::store(tickets);
    }
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = node.handle().peer_addr().expect("a cluster node has a peer endpoint");
    let conn = ep.connect_with(cfg, addr, runnel_certs::PEER_SERVER_NAME).unwrap().await.unwrap();
    (ep, conn)
}

/// The ALPN `conn` agreed on.
fn agreed(conn: &quinn::Connection) -> Vec<u8> {
    let data = conn.handshake_data().unwrap();
    data.downcast::<quinn::crypto::rustls::HandshakeData>().unwrap().protocol.unwrap()
}

/// A node hands its peers no TLS session tickets either: a node certificate that has since
/// expired could otherwise come back on a kept ticket without its chain checked again
/// (`endpoint::resume_nothing`, as on the runners' port).
#[tokio::test]
async fn a_node_hands_its_peers_no_session_tickets() {
    use runnel_protocol::{PeerRequest, PeerResponse, read_frame, write_frame};
    let Some(c) = TestCluster::start(1, |_| {}).await else { return };
    let tickets = Arc::new(runnel_tests::CountingTickets::default());
    let alpn = [runnel_protocol::ALPN_PEER];
    let (_ep, conn) = peer_connection(&c.nodes[0], &alpn, Some(tickets.clone())).await;
    // A call answered: the handshake's tickets, if any, came before it.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let ask = PeerRequest::RunnersOnline { tenant: "nobody".into(), runner_ids: vec![] };
    write_frame(&mut send, &ask).await.unwrap();
    send.finish().unwrap();
    let answer =
        tokio::time::timeout(Duration::from_secs(5), read_frame::<PeerResponse, _>(&mut recv));
    assert!(matches!(answer.await, Ok(Ok(Some(PeerResponse::Online(_))))), "no answer");
    let given = tickets.given.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(given, 0, "the node handed out {given} session tickets");
}

/// `runnel-peer/2`: a node's calls share one lane, each answered by its number, a job or
/// one frame (a refusal is the call's alone, and a followed output, which needs a stream
/// of its own, is refused on the lane); a second lane on the connection is reset. A node of an older build, which
/// offers only `runnel-peer/1`, agrees on it and has its calls answered on streams.
#[tokio::test]
async fn a_peer_lane_answers_each_call_by_its_number_and_an_older_node_still_gets_streams() {
    use runnel_protocol::{
        ALPN_PEER, ALPN_PEER_LANE, LaneCall, LaneReply, PeerCaller, PeerRequest, PeerResponse,
        encode, encode_append, lane_reader, read_job_answer, read_lane_answer,
    };
    let Some(c) = TestCluster::start(1, |_| {}).await else { return };
    let node = &c.nodes[0];
    node.tenant("acme").await;
    let caller = |tenant: &str| PeerCaller {
        key_id: "k1".into(),
        role: "admin".into(),
        tenant: Some(tenant.into()),
        owner: None,
    };
    let get = |id: &str| PeerRequest::GetJob { caller: caller("acme"), id: id.into() };
    let spec = runnel_protocol::DispatchSpec {
        owner: "alice".into(),
        runner_id: None,
        labels: Default::default(),
        kind: "echo".into(),
        payload: b"hi".to_vec(),
        timeout_ms: 10_000,
        queue_timeout_ms: 0,
        wait: false,
    };

    let (_ep, conn) = peer_connection(node, &[ALPN_PEER_LANE, ALPN_PEER], None).await;
    assert_eq!(agreed(&conn), ALPN_PEER_LANE);
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut out = encode(&PeerRequest::Lane).unwrap();
    let calls = [
        (7, get("nope")),
        (8, PeerRequest::ListJobs { caller: caller("acme"), owner: None, limit: 10, before: None }),
        (12, PeerRequest::JobOutput { caller: caller("acme"), id: "nope".into() }),
        (13, PeerRequest::OutputSince { caller: caller("acme"), id: "nope".into(), offset: 0 }),
        (9, PeerRequest::Dispatch { caller: caller("acme"), spec }),
        (10, PeerRequest::GetJob { caller: caller("globex"), id: "nope".into() }),
    ];
    for (call, request) in &calls {
        encode_append(&mut out, &LaneCall { call: *call, request }).unwrap();
    }
    tokio::io::AsyncWriteExt::write_all(&mut send, &out).await.unwrap();
    let mut recv = lane_reader(recv);
    let mut answers = HashMap::new();
    for _ in 0..calls.len() {
        let read = tokio::time::timeout(Duration::from_secs(5), read_lane_answer(&mut recv));
        let (call, answer) = read.await.expect("answered in time").unwrap().expect("an answer");
        let said = match answer {
            Err(runnel_protocol::AnswerError::Refused { status, .. }) => status.to_string(),
            Ok(LaneReply::Frame(PeerResponse::Jobs(jobs))) => format!("{} jobs", jobs.len()),
            other => panic!("call {call}: {other:?}"),
        };
        assert!(answers.insert(call, said).is_none(), "call {call} answered twice");
    }
    // Not found; the (empty) list in one frame; a followed output needs a stream of its
    // own; no runner of alice; another tenant's caller.
    let said = |s: &[(u32, &str)]| s.iter().map(|(c, a)| (*c, (*a).to_owned())).collect();
    let expected: HashMap<u32, String> =
        said(&[(7, "404"), (8, "0 jobs"), (12, "400"), (13, "404"), (9, "409"), (10, "404")]);
    assert_eq!(answers, expected);

    // A second lane on the same connection is reset; the first goes on.
    let (mut second, mut second_recv) = conn.open_bi().await.unwrap();
    let mut out = encode(&PeerRequest::Lane).unwrap();
    encode_append(&mut out, &LaneCall { call: 1, request: get("nope") }).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut second, &out).await.unwrap();
    let reset = tokio::time::timeout(Duration::from_secs(5), read_lane_answer(&mut second_recv));
    assert!(reset.await.expect("in time").is_err(), "a second lane was served");
    let mut out = Vec::new();
    encode_append(&mut out, &LaneCall { call: 11, request: get("still") }).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut send, &out).await.unwrap();
    let (call, answer) = read_lane_answer(&mut recv).await.unwrap().unwrap();
    assert_eq!(call, 11);
    assert!(matches!(answer, Err(runnel_protocol::AnswerError::Refused { status: 404, .. })));
    // Ended by its caller: the node ends its side once every call is answered.
    send.finish().unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), read_lane_answer(&mut recv));
    assert!(matches!(end.await, Ok(Ok(None))), "the lane did not end");

    let (_ep, old) = peer_connection(node, &[ALPN_PEER], None).await;
    assert_eq!(agreed(&old), ALPN_PEER);
    let (mut send, mut recv) = old.open_bi().await.unwrap();
    runnel_protocol::write_frame(&mut send, &get("nope")).await.unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_job_answer(&mut recv));
    let refused = answer.await.expect("answered in time").unwrap_err();
    assert!(
        matches!(refused, runnel_protocol::AnswerError::Refused { status: 404, .. }),
        "{refused:?}"
    );
}

/// The answers a node's peer lane holds for a node that does not take them show in
/// `runnel_cluster_peer_answer_bytes` (within the lane's `LANE_MAX_UNWRITTEN`), and are let
/// go of as they are read.
#[tokio::test]
async fn a_peer_lanes_unread_answers_show_in_its_answer_bytes_and_go_when_read() {
    use runnel_protocol::limits::LANE_MAX_UNWRITTEN;
    use runnel_protocol::{
        ALPN_PEER_LANE, LaneCall, PeerCaller, PeerRequest, encode, encode_append, lane_reader,
        read_lane_answer,
    };
    let Some(c) = TestCluster::start(1, |_| {}).await else { return };
    let node = &c.nodes[0];
    node.tenant("acme").await;
    let held = || async {
        let text = node.api.raw("/metrics", &node.operator_key).await;
        metric_value(&text, "runnel_cluster_peer_answer_bytes").unwrap_or(0.0)
    };
    let (_ep, conn) = peer_connection(node, &[ALPN_PEER_LANE], None).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    // 40,000 refusals of ~60 bytes each: more than the stream lets the node send before
    // this side reads (quinn's default window, 1.25 MB), so the rest waits at the node.
    const CALLS: u32 = 40_000;
    let mut out = encode(&PeerRequest::Lane).unwrap();
    for call in 0..CALLS {
        let caller = PeerCaller {
            key_id: "k1".into(),
            role: "admin".into(),
            tenant: Some("acme".into()),
            owner: None,
        };
        let request = PeerRequest::GetJob { caller, id: format!("no-such-job-{call}") };
        encode_append(&mut out, &LaneCall { call, request }).unwrap();
    }
    // The node stops reading calls while its answers wait: the write finishes only once
    // this side reads.
    let writing = tokio::spawn(async move {
        tokio::io::AsyncWriteExt::write_all(&mut send, &out).await.unwrap();
        send.finish().unwrap();
        send
    });
    let most = wait_for(Duration::from_secs(10), "answers held for the caller", || async {
        let h = held().await;
        (h > 0.0).then_some(h)
    })
    .await;
    assert!(most <= LANE_MAX_UNWRITTEN as f64 + 4096.0, "held {most} bytes");
    let mut recv = lane_reader(recv);
    let mut answered = 0;
    while let Some((_, answer)) = read_lane_answer(&mut recv).await.unwrap() {
        assert!(matches!(answer, Err(runnel_protocol::AnswerError::Refused { status: 404, .. })));
        answered += 1;
    }
    assert_eq!(answered, CALLS);
    let _send = writing.await.unwrap();
    wait_for(Duration::from_secs(5), "the held answers let go of", || async {
        (held().await == 0.0).then_some(())
    })
    .await;
}

/// Two nodes with `acme` homed on one and one runner of `alice` (capacity 4) there.
struct TwoNodes {
    c: ProcessCluster,
    admin: String,
    home: usize,
    other: usize,
    /// The CA fingerprint for native clients.
    fp: String,
    runner_id: String,
    _runner: (RunnerHandle, tempfile::TempDir),
}

impl TwoNodes {
    async fn start(flags: &[&str]) -> Option<Self> {
        let c = ProcessCluster::start(BROKER, 2, flags).await?;
        let admin = c.tenant("acme").await;
        let (s, _) = c.nodes[0].api.post("/v1/jobs", &admin, exec("true", &[], true)).await;
        assert_eq!(s, 409, "no runner yet; the call placed the tenant");
        let home = c.home_of("acme").await.unwrap();
        let other = 1 - home;
        let dir = tempfile::tempdir().unwrap();
        let (runner_id, r) = runner(&c, home, &admin, "alice", &dir.path().join("r"), None).await;
        let ca = std::fs::read_to_string(dir.path().join("r").join("ca.pem")).unwrap();
        let fp = runnel_certs::fingerprint(&runnel_certs::pem::certs_from_pem(&ca).unwrap()[0]);
        let _runner = (r, dir);
        Some(Self { c, admin, home, other, fp, runner_id, _runner })
    }
}

/// [`TwoNodes`] with `calls` waiting `sleep 60` jobs dispatched through the other node's
/// native API: the runner runs 4, the rest queue at the home. Each call waits for its
/// job's end, or (`follow`) follows its output.
struct BusyHome {
    n: TwoNodes,
    calls: tokio::task::JoinSet<()>,
    /// Jobs queued at the home once the calls came in.
    queued: usize,
    /// A job that ran before them (`echo done`), dispatched through the other node.
    done: String,
}

impl BusyHome {
    async fn start(calls: usize, follow: bool) -> Option<Self> {
        // The one key sends them all at once: no per-key rate limit here.
        let n = TwoNodes::start(&["--queue-limit", "2000", "--rate-limit-per-key", "0"]).await?;
        let (c, admin, home, other) = (&n.c, &n.admin, n.home, n.other);
        let (s, v) =
            c.nodes[other].api.post("/v1/jobs", admin, exec("echo", &["done"], true)).await;
        assert_eq!((s, v["output"].as_str()), (200, Some("done\n")), "{v}");
        let done = v["id"].as_str().unwrap().to_owned();
        let mut clients = Vec::new();
        for _ in 0..calls.div_ceil(250) {
            let client = runnel_client::Client::connect(&c.nodes[other].quic, &n.fp, admin).await;
            clients.push(client.unwrap());
        }
        let mut waiting = tokio::task::JoinSet::new();
        for i in 0..calls {
            let client = clients[i % clients.len()].clone();
            waiting.spawn(async move {
                let mut spec = runnel_client::exec("alice", "sleep", &["60"]);
                spec.queue_timeout_ms = 120_000;
                let ended = if follow {
                    let handle = client.dispatch(spec).await.expect("dispatched");
                    handle.result().await
                } else {
                    spec.wait = true;
                    client.submit(spec).await
                };
                panic!("a call ended early: {ended:?}");
            });
        }
        let depth = || async {
            let text = c.nodes[home].api.raw("/metrics", &c.operator_key).await;
            metric_value(&text, "runnel_queue_depth{tenant=\"acme\"}").unwrap_or(0.0) as usize
        };
        wait_for(Duration::from_secs(60), "the dispatches queued at the home", || async {
            (depth().await >= 1_000).then_some(())
        })
        .await;
        // The rest come in now, unless something holds them back.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let queued = depth().await;
        if let Some(ended) = waiting.try_join_next() {
            panic!("{ended:?}");
        }
        Some(Self { n, calls: waiting, queued, done })
    }
}

/// A dispatch that waits for its job holds its place on the peer lane until the job ends,
/// and a tenant may have thousands of jobs under way (`--max-jobs-per-tenant`). 1,100
/// waiting dispatches forwarded by one node (more than a peer connection's 1,024 streams,
/// the old bound) must not hold up the next call that node forwards to the same home: a
/// get is answered at once.
#[tokio::test]
async fn waiting_dispatches_do_not_hold_up_the_calls_forwarded_after_them() {
    const WAITING: usize = 1_100;
    let Some(mut b) = BusyHome::start(WAITING, false).await else { return };
    let (c, n) = (&b.n.c, &b.n);
    // The burst dialled the home once, and its calls share that connection's one lane.
    let text = c.nodes[n.other].api.raw("/metrics", &c.operator_key).await;
    assert_eq!(metric_value(&text, "runnel_cluster_peer_lanes"), Some(1.0));

    // A call forwarded after them: answered at once, not after the jobs ahead of it.
    let probe = runnel_client::Client::connect(&c.nodes[n.other].quic, &n.fp, &n.admin).await;
    let missing = format!("job-00000000000000000000-e1-{}", c.nodes[n.home].id);
    let answer = tokio::time::timeout(Duration::from_secs(5), probe.unwrap().get(&missing)).await;
    let queued = b.queued;
    let status = answer.unwrap_or_else(|_| {
        panic!("the get was held up behind the waiting dispatches ({queued} of them queued)")
    });
    assert_eq!(queued, WAITING - 4, "every waiting dispatch reached the home");
    assert_eq!(status.unwrap_err().status(), Some(404));
    b.calls.abort_all();
}

/// A followed output lasts as long as its job; 1,100 of them forwarded by one node (more
/// than a peer connection's 1,024 streams, which each held one) must not hold up the
/// calls forwarded after them, any tenant's: a job list, a runner's status, another
/// job's output.
#[tokio::test]
async fn followed_outputs_do_not_hold_up_the_calls_forwarded_after_them() {
    const FOLLOWED: usize = 1_100;
    let Some(mut b) = BusyHome::start(FOLLOWED, true).await else { return };
    assert_eq!(b.queued, FOLLOWED - 4, "every followed dispatch reached the home");
    let (n, api) = (&b.n, &b.n.c.nodes[b.n.other].api);
    let list = tokio::time::timeout(Duration::from_secs(5), api.get("/v1/jobs?limit=1", &n.admin));
    let (s, v) = list.await.expect("the list was held up behind the followed outputs");
    assert_eq!((s, v["jobs"].as_array().map(Vec::len)), (200, Some(1)), "{v}");
    let runner = format!("/v1/runners/{}", n.runner_id);
    let status = tokio::time::timeout(Duration::from_secs(5), api.get(&runner, &n.admin));
    let (s, v) = status.await.expect("the runner's status was held up");
    assert_eq!((s, v["status"].as_str()), (200, Some("online")), "{v}");
    let output = format!("/v1/jobs/{}/output", b.done);
    let output = tokio::time::timeout(Duration::from_secs(5), api.raw(&output, &n.admin));
    assert_eq!(output.await.expect("another job's output was held up"), "done\n");
    b.calls.abort_all();
}

/// A followed output asked on a lane is answered within the home's poll even while the job
/// writes nothing: an empty piece (ask again). A follow whose caller went away (an HTTP
/// client that hung up on a quiet job) so frees its place on the lane, instead of holding
/// it until the job writes or ends.
#[tokio::test]
async fn a_quiet_jobs_output_asked_on_a_lane_is_answered_empty_within_the_poll() {
    use runnel_protocol::{
        ALPN_PEER_LANE, LaneCall, LaneReply, PeerCaller, PeerRequest, PeerResponse, encode,
        encode_append, lane_reader, read_lane_answer,
    };
    let Some(c) = TestCluster::start(1, |_| {}).await else { return };
    let node = &c.nodes[0];
    let admin = node.tenant("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let (_id, _runner) = node.runner(&admin, "alice", &dir.path().join("r"), 1).await;
    let (s, v) = node.api.post("/v1/jobs", &admin, exec("sleep", &["60"], false)).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();

    let (_ep, conn) = peer_connection(node, &[ALPN_PEER_LANE], None).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut out = encode(&PeerRequest::Lane).unwrap();
    let caller = PeerCaller {
        key_id: "k1".into(),
        role: "admin".into(),
        tenant: Some("acme".into()),
        owner: None,
    };
    let request = PeerRequest::OutputSince { caller, id, offset: 0 };
    encode_append(&mut out, &LaneCall { call: 1, request }).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut send, &out).await.unwrap();
    let mut recv = lane_reader(recv);
    // The home polls for 10 s.
    let answer = tokio::time::timeout(Duration::from_secs(20), read_lane_answer(&mut recv));
    let (call, answer) = answer.await.expect("answered within the poll").unwrap().unwrap();
    assert_eq!(call, 1);
    assert!(
        matches!(answer, Ok(LaneReply::Frame(PeerResponse::Output(ref piece))) if piece.is_empty()),
        "{answer:?}"
    );
}

/// A job followed through another node that writes nothing for longer than the home's
/// poll (10 s) still reaches its follower whole: the forwarding node asks again after the
/// empty piece.
#[tokio::test]
async fn a_forwarded_follow_of_a_job_quiet_past_the_poll_gets_its_output() {
    let Some(n) = TwoNodes::start(&[]).await else { return };
    let api = &n.c.nodes[n.other].api;
    let script = "echo early; sleep 11; echo late";
    let (s, v) = api.post("/v1/jobs", &n.admin, exec("sh", &["-c", script], false)).await;
    assert_eq!(s, 201, "{v}");
    let output = format!("/v1/jobs/{}/output", v["id"].as_str().unwrap());
    let followed = tokio::time::timeout(Duration::from_secs(40), api.raw(&output, &n.admin));
    assert_eq!(followed.await.expect("the follow ended"), "early\nlate\n");
}
