//! The peer row: the same targeted dispatch through a real `nats-server` with mutual TLS.
//!
//! Each simulated runner has its own NATS connection and subscribes to its own subject
//! (`bench.t<T>.r<R>`), echoing every request's payload to the reply subject. Requesters use
//! request-reply, addressing one runner of their tenant at a time, in two rows: one
//! connection each (like the HTTP keep-alive connections of the runnel dispatchers), and
//! all on one shared connection (NATS at its best). TLS is 1.3 with ed25519
//! certificates from the same CA code runnel uses, and nats-server verifies client certs, so
//! both systems pay for the same kind of authenticated, encrypted hop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use runnel_certs::{ClusterCa, RunnerIdentity, key};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

use crate::drive::{Dispatched, closed_loop};
use crate::proc_usage::{Usage, usage};

/// Where Debian puts the binary (`/usr/sbin` is often not on a user's PATH).
const WELL_KNOWN: &[&str] = &["/usr/sbin/nats-server", "/usr/bin/nats-server"];

/// The nats-server binary: `explicit`, else `nats-server` on PATH, else Debian's location.
pub(crate) fn find_bin(explicit: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    if let Some(p) = explicit {
        if !p.exists() {
            bail!("--nats-bin {}: no such file", p.display());
        }
        return Ok(Some(p.to_owned()));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nats-server")).collect::<Vec<_>>())
        .unwrap_or_default();
    Ok(on_path.into_iter().chain(WELL_KNOWN.iter().map(PathBuf::from)).find(|p| p.is_file()))
}

/// A nats-server child process on a loopback port, TLS required and client certs verified.
pub(crate) struct NatsProc {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
    tls: rustls::ClientConfig,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl NatsProc {
    pub(crate) async fn start(bin: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = ClusterCa::generate("natsbench")?;
        let (server, server_key) =
            ca.issue_server_cert(&["localhost".into()], &[[127, 0, 0, 1].into()])?;
        let client_key = key::generate_key()?;
        let client = ca.issue_runner_cert(
            &key::csr_pem(&client_key)?,
            &RunnerIdentity::new("natsbench", "t", "o", "bench")?,
            Duration::from_secs(3600),
        )?;
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), ca.cert_pem())?;
        std::fs::write(path("server.pem"), &server.cert_pem)?;
        std::fs::write(path("server.key"), &server_key)?;
        let port = free_port()?;
        let conf = format!(
            "listen: \"127.0.0.1:{port}\"\nmax_payload: 1048576\n\
             tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 5\n}}\n",
            path("server.pem"),
            path("server.key"),
            path("ca.pem"),
        );
        std::fs::write(path("nats.conf"), conf)?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(path("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![client.cert_der],
                runnel_certs::pem::private_key_from_pem(&client_key.serialize_pem())?,
            )?;
        let me = Self { child, dir, url: format!("tls://127.0.0.1:{port}"), tls };
        // Ready when a TLS client gets through the handshake and the INFO/CONNECT exchange.
        let t0 = Instant::now();
        loop {
            match me.client().await {
                Ok(_) => break,
                Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                    bail!("nats-server did not accept a TLS client within 10s: {e:#}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        Ok(me)
    }

    /// A new client connection (mutual TLS).
    async fn client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(async_nats::ConnectOptions::new()
            .require_tls(true)
            .tls_client_config(self.tls.clone())
            .request_timeout(Some(Duration::from_secs(10)))
            .connect(&self.url)
            .await?)
    }

    pub(crate) fn usage(&self) -> anyhow::Result<Usage> {
        usage(self.child.id().context("nats-server exited")?)
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
        drop(self.dir);
    }
}

/// Connected echo runners; dropping stops them.
pub(crate) struct Runners {
    _tasks: JoinSet<()>,
    pub(crate) took: Duration,
}

/// Connects `tenants × per_tenant` runners, each subscribed to its own subject.
pub(crate) async fn connect_runners(
    n: &NatsProc,
    tenants: usize,
    per_tenant: usize,
) -> anyhow::Result<Runners> {
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    for t in 0..tenants {
        for r in 0..per_tenant {
            let client = n.client().await?;
            let mut sub = client.subscribe(subject(t, r)).await?;
            client.flush().await?;
            tasks.spawn(async move {
                while let Some(msg) = sub.next().await {
                    if let Some(reply) = msg.reply
                        && client.publish(reply, msg.payload).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    }
    Ok(Runners { _tasks: tasks, took: t0.elapsed() })
}

fn subject(tenant: usize, runner: usize) -> String {
    format!("bench.t{tenant}.r{runner}")
}

/// How the requesters reach nats-server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Requesters {
    /// One connection each (like the HTTP keep-alive connections of the runnel row).
    OwnConnection,
    /// All on one connection, multiplexed (how NATS applications usually run: NATS at its
    /// best on this load).
    SharedConnection,
}

impl Requesters {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Requesters::OwnConnection => "one connection per requester",
            Requesters::SharedConnection => "requesters share one connection",
        }
    }
}

/// `concurrency` requesters for `len`; requester `w` belongs to tenant `w % tenants` and
/// addresses that tenant's runners in turn.
pub(crate) async fn dispatch(
    n: &NatsProc,
    tenants: usize,
    per_tenant: usize,
    concurrency: usize,
    len: Duration,
    payload: usize,
    how: Requesters,
) -> anyhow::Result<Dispatched> {
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let client = match (how, clients.first()) {
            (Requesters::SharedConnection, Some(first)) => async_nats::Client::clone(first),
            _ => n.client().await?,
        };
        clients.push(client);
    }
    let clients: Arc<[async_nats::Client]> = clients.into();
    let body = bytes::Bytes::from(vec![b'x'; payload]);
    Ok(closed_loop(concurrency, len, move |w, seq| {
        let (clients, body) = (clients.clone(), body.clone());
        async move {
            let tenant = w % tenants;
            let runner = (w / tenants + seq as usize) % per_tenant.max(1);
            let reply = clients[w]
                .request(subject(tenant, runner), body)
                .await
                .map_err(|e| format!("nats:{:?}", e.kind()))?;
            if reply.payload.len() != payload {
                return Err("wrong_output".to_string());
            }
            Ok(1)
        }
    })
    .await)
}
