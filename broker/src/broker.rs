//! [`Broker::spawn`]: builds everything from a [`Config`] and returns a [`BrokerHandle`]
//! with the bound addresses and `shutdown()`. The binary, every integration test and the
//! bench harness start brokers through this one function.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ractor::Actor;
use runnel_certs::{CertError, pem};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::actors::{BrokerRoot, RootArgs, Tenants};
use crate::cluster::{Cluster, NODES_PREFIX, NodeRecord, PLACEMENT_PREFIX};
use crate::config::{Config, ConfigError};
use crate::data_dir::DataDirError;
use crate::index::RunnerIndex;
use crate::records::{ApiKey, AuditEvent, Registry, RunnerRecord, RunnerState};
use crate::shared::ACTOR_CALL_TIMEOUT;
use crate::shared::Shared;
use crate::store::{StoreError, WatchEvent};
use crate::verifier::{Denial, PairingVerifier};

/// Denials waiting to be written to the audit log before new ones are dropped.
const DENIAL_QUEUE: usize = 1024;
/// At shutdown, how long the actor tree gets to stop (tenants close their connections).
const ROOT_STOP_WAIT: Duration = Duration::from_secs(10);
/// At shutdown, how long runners get to acknowledge the endpoint's close.
const ENDPOINT_IDLE_WAIT: Duration = Duration::from_secs(5);
/// At shutdown, how long the accept loop and the HTTP server (finishing its requests) get
/// before they are aborted.
const TASKS_STOP_WAIT: Duration = Duration::from_secs(5);

/// Starts brokers: [`Broker::spawn`] is the one way a broker process, a test or the bench
/// harness gets a running broker.
#[derive(Debug)]
pub struct Broker;

/// Why [`Broker::spawn`] could not start a broker. Nothing is left running when it fails.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The configuration was refused.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The data dir (CA files, store, cluster name) could not be opened.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// Loading runners or keys from the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server certificate could not be issued or loaded.
    #[error("server certificate: {0}")]
    Cert(#[from] CertError),
    /// rustls refused the TLS configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// `--http-tls-cert`/`--http-tls-key` could not be read or do not go together.
    #[error("API TLS: {0}")]
    HttpTls(String),
    /// The rustls provider offers no cipher suite QUIC can use.
    #[error("TLS configuration: no cipher suite usable for QUIC")]
    NoQuicCipherSuite,
    /// The idle timeout does not fit QUIC's varint.
    #[error("idle-timeout {0:?} is too large for QUIC")]
    IdleTimeoutTooLarge(Duration),
    /// A listener could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// `QUIC`, `HTTP` or `peer`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The node could not join the cluster.
    #[error("joining the cluster: {0}")]
    Join(#[from] crate::cluster::JoinError),
    /// The actor tree did not start.
    #[error("starting the actor tree: {0}")]
    Actors(#[from] ractor::SpawnErr),
}

/// A running broker.
pub struct BrokerHandle {
    quic_addr: SocketAddr,
    http_addr: SocketAddr,
    /// The operator key, on the first start of a data dir only (in memory, for an
    /// embedding program or test; the `runnel-broker` binary prints only the file's path).
    pub first_operator_key: Option<String>,
    /// Where the first start wrote the operator key (0600), on that start only.
    pub first_operator_key_file: Option<std::path::PathBuf>,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    root: ractor::ActorRef<crate::actors::RootMsg>,
    /// The tenant directory (drain, and `crash_tenant` in tests).
    tenants: Arc<Tenants>,
    /// The store wrapper `fail_store_writes` flips (tests only).
    #[cfg(feature = "fault-injection")]
    faulty: Arc<crate::store::FaultyStore>,
    shutdown: CancellationToken,
    /// The accept loop and the HTTP server: they end on `shutdown`, given time.
    serving: JoinSet<()>,
    /// Loops that only end when aborted (index sync, audit writer, metrics upkeep).
    background: JoinSet<()>,
    /// The node-to-node endpoint (cluster only).
    peer_endpoint: Option<quinn::Endpoint>,
}

impl std::fmt::Debug for BrokerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerHandle")
            .field("quic_addr", &self.quic_addr)
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// The DNS names and IPs the server certificate carries.
fn server_names(config: &Config) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = vec!["localhost".to_string()];
    let mut ips: Vec<IpAddr> = vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
    // The cluster-wide names and this node's own (where other nodes redirect runners).
    let advertised_hosts: Vec<String> = [&config.advertise, &config.node_advertise]
        .into_iter()
        .flatten()
        .flat_map(|a| a.split(','))
        .filter_map(|a| a.trim().rsplit_once(':').map(|(h, _)| h.to_owned()))
        .collect();
    // The QUIC and the HTTP listen addresses (the same certificate serves `--http-tls auto`).
    let listen_ips: Vec<String> = [config.quic_listen.ip(), config.http_listen.ip()]
        .into_iter()
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| ip.to_string())
        .collect();
    for name in config
        .server_names
        .iter()
        .map(String::as_str)
        .chain(advertised_hosts.iter().map(String::as_str))
        .chain(listen_ips.iter().map(String::as_str))
    {
        let name = name.trim_start_matches('[').trim_end_matches(']');
        match name.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !dns.iter().any(|d| d == name) => dns.push(name.to_owned()),
            Err(_) => {}
        }
    }
    (dns, ips)
}

impl Broker {
    /// Opens the data dir, binds both listeners and starts serving.
    pub async fn spawn(config: Config) -> Result<BrokerHandle, SpawnError> {
        config.validate()?;
        let opened = crate::data_dir::open(&config).await?;
        let config_data_dir = config.data_dir.clone();
        #[cfg(feature = "fault-injection")]
        let faulty = Arc::new(crate::store::FaultyStore::new(opened.store.clone()));
        #[cfg(feature = "fault-injection")]
        let store: Arc<dyn crate::store::Store> = faulty.clone();
        #[cfg(not(feature = "fault-injection"))]
        let store = opened.store.clone();
        let registry = Registry::new(store);
        let index = Arc::new(RunnerIndex::new());
        for r in registry.runners(None).await? {
            index.apply(&r);
        }

        let (dns, ips) = server_names(&config);
        let (server_cert, server_key) = opened.ca.issue_server_cert(&dns, &ips)?;
        let chain = vec![server_cert.cert_der.clone(), opened.ca.cert_der().clone()];
        let key = pem::private_key_from_pem(&server_key)?;
        let http_tls = crate::api::tls_acceptor(&config.http_tls, (&chain, &key))?;
        let (denial_tx, denial_rx) = mpsc::channel(DENIAL_QUEUE);
        let verifier = Arc::new(PairingVerifier::new(
            opened.ca.cert_der(),
            opened.ca.cluster(),
            index.clone(),
            Some(denial_tx),
        )?);
        let server_config =
            crate::endpoint::server_config(chain, key, verifier, config.idle_timeout)?;
        let quic_bind =
            |source| SpawnError::Bind { what: "QUIC", addr: config.quic_listen, source };
        let endpoint =
            crate::endpoint::bind(config.quic_listen, server_config).map_err(quic_bind)?;
        let quic_addr = endpoint.local_addr().map_err(quic_bind)?;
        let http_bind =
            |source| SpawnError::Bind { what: "HTTP", addr: config.http_listen, source };
        let listener =
            tokio::net::TcpListener::bind(config.http_listen).await.map_err(http_bind)?;
        let http_addr = listener.local_addr().map_err(http_bind)?;

        let advertise = config.advertised(quic_addr);
        // The node-to-node endpoint (cluster only), with this node's certificate.
        let peer = match &opened.etcd {
            Some(_) => {
                let tls = crate::peer::PeerTls::new(&opened.ca, &config.node_id)?;
                let peer_bind =
                    |source| SpawnError::Bind { what: "peer", addr: config.peer_listen, source };
                let ep =
                    quinn::Endpoint::server(tls.server, config.peer_listen).map_err(peer_bind)?;
                let bound = ep.local_addr().map_err(peer_bind)?;
                // Bound to every interface: other nodes reach it at this node's own host.
                let addr = if bound.ip().is_unspecified() {
                    let host = config
                        .node_advertise
                        .as_deref()
                        .and_then(|a| a.rsplit_once(':'))
                        .map_or("127.0.0.1", |(h, _)| h);
                    format!("{host}:{}", bound.port())
                } else {
                    bound.to_string()
                };
                Some((ep, tls.client, addr))
            }
            None => None,
        };
        let cluster = match opened.etcd {
            Some(etcd) => {
                let record = NodeRecord {
                    id: config.node_id.clone(),
                    quic: config.node_advertise.clone().unwrap_or_else(|| {
                        // Without --node-advertise, the bound address (or the cluster-wide
                        // one when bound to every interface).
                        if quic_addr.ip().is_unspecified() {
                            advertise.clone()
                        } else {
                            quic_addr.to_string()
                        }
                    }),
                    http: http_addr.to_string(),
                    peer: peer.as_ref().map(|(_, _, a)| a.clone()).unwrap_or_default(),
                    lease: 0,
                    started_at: crate::records::now_unix(),
                };
                Some(Cluster::join(etcd, record, config.lease_ttl).await?)
            }
            None => None,
        };
        let peers = peer.as_ref().map(|(ep, client, _)| {
            Arc::new(crate::peer::PeerClient::new(ep.clone(), client.clone(), &config.cluster))
        });
        let shared = Arc::new(Shared::new(
            config,
            registry.clone(),
            index.clone(),
            opened.ca,
            advertise,
            cluster.clone(),
            peers,
        ));
        for k in registry.keys().await? {
            shared.keys.insert(k.id.clone(), k);
        }
        let tenants = Arc::new(Tenants::new());
        let root_args = RootArgs { shared: shared.clone(), tenants: tenants.clone() };
        let (root, _) = Actor::spawn(None, BrokerRoot, root_args).await?;
        tenants.set_root(root.clone());

        let shutdown = CancellationToken::new();
        // Both sets abort what is left of them when the handle goes.
        let (mut serving, mut background) = (JoinSet::new(), JoinSet::new());
        serving.spawn(crate::endpoint::accept_loop(
            endpoint.clone(),
            shared.clone(),
            tenants.clone(),
            shutdown.clone(),
        ));
        background.spawn(audit_denials(shared.clone(), denial_rx));
        background.spawn(audit_upkeep(shared.clone()));
        let peer_endpoint = peer.map(|(ep, _, _)| ep);
        if let Some(ep) = &peer_endpoint {
            serving.spawn(crate::peer::serve(
                ep.clone(),
                shared.clone(),
                tenants.clone(),
                shutdown.clone(),
            ));
        }
        background.spawn(follow_store(shared.clone(), index, tenants.clone()));
        if let Some(cluster) = cluster {
            background.spawn(cluster.clone().keep_alive());
            background.spawn(fence(cluster, tenants.clone()));
        }
        if let Some(handle) = shared.prometheus.clone() {
            background.spawn(async move {
                let mut tick = tokio::time::interval(crate::metrics::UPKEEP_EVERY);
                loop {
                    tick.tick().await;
                    handle.run_upkeep();
                }
            });
        }
        let app = crate::api::router(shared.clone(), tenants.clone());
        let stop = shutdown.clone();
        let api_shared = shared.clone();
        serving.spawn(async move {
            crate::api::serve(listener, app, api_shared, http_tls, stop).await;
        });
        let limits_shared = shared.clone();
        background.spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                limits_shared.rate_limits.forget_idle();
                limits_shared.intake.forget_idle();
                limits_shared.jobs.sweep();
            }
        });
        tracing::info!(%quic_addr, %http_addr, advertise = %shared.advertise, ca = %shared.ca.fingerprint(), "broker started");
        Ok(BrokerHandle {
            quic_addr,
            http_addr,
            first_operator_key_file: opened
                .first_operator_key
                .is_some()
                .then(|| config_data_dir.join(crate::data_dir::OPERATOR_KEY_FILE)),
            first_operator_key: opened.first_operator_key,
            shared,
            endpoint,
            root,
            tenants,
            #[cfg(feature = "fault-injection")]
            faulty,
            shutdown,
            serving,
            background,
            peer_endpoint,
        })
    }
}

/// Writes handshake denials to the audit log, off the handshake path: a proven tenant's
/// one by one into its log. Every refusal, proven or not, is also counted per source host
/// into the cluster log by the accept loop (which sees the address).
async fn audit_denials(shared: Arc<Shared>, mut rx: mpsc::Receiver<Denial>) {
    while let Some(d) = rx.recv().await {
        // Unproven claims are a stranger's words: only the accept loop's per-source count
        // records them.
        let Some(c) = d.claimed.as_ref().filter(|_| d.proven) else { continue };
        let detail = format!("handshake refused ({}): runner {}", d.reason.name(), c.runner);
        let ev = AuditEvent::now(
            "denied",
            format!("runner:{}", c.runner),
            Some(&c.tenant),
            Some(&c.runner),
            detail,
        );
        shared.registry.audit_best_effort(ev).await;
    }
}

/// Writes the aggregated refusals every window, and applies audit retention.
async fn audit_upkeep(shared: Arc<Shared>) {
    let config = &shared.config;
    let mut flush = tokio::time::interval(config.audit_aggregate_every);
    let mut prune = tokio::time::interval(config.audit_prune_every);
    loop {
        tokio::select! {
            _ = flush.tick() => shared.refusals.flush(&shared.registry).await,
            _ = prune.tick() => {
                let tenants = shared.registry.tenants(usize::MAX).await.unwrap_or_default();
                let logs = tenants.iter().map(|t| Some(t.id.as_str())).chain([None]);
                for log in logs {
                    let pruned = shared
                        .registry
                        .prune_audit(log, config.audit_retention_count, config.audit_retention_age)
                        .await;
                    match pruned {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(log = log.unwrap_or("cluster"), n, "audit events past retention deleted"),
                        Err(e) => tracing::warn!(error = %e, "audit retention pass failed"),
                    }
                }
            }
        }
    }
}

/// Keeps this node's mirrors of the store (the runner index that the handshake verifier
/// reads, and the API key cache) in step with records written by anyone: this node, or
/// another node of the cluster through etcd. A lagged or compacted watch rescans both.
async fn follow_store(shared: Arc<Shared>, index: Arc<RunnerIndex>, tenants: Arc<Tenants>) {
    use tokio::sync::broadcast::error::RecvError;
    let registry = &shared.registry;
    let mut watch = registry.store().watch();
    loop {
        match watch.recv().await {
            Ok(WatchEvent::Put { key, value }) if key.starts_with("runners/") => {
                match serde_json::from_slice::<RunnerRecord>(&value) {
                    Ok(r) => {
                        index.apply(&r);
                        if r.state == RunnerState::Revoked {
                            close_revoked(&tenants, r);
                        }
                    }
                    Err(e) => tracing::warn!(%key, error = %e, "runner record does not decode"),
                }
            }
            Ok(WatchEvent::Put { key, value }) if key.starts_with("keys/") => {
                match serde_json::from_slice::<ApiKey>(&value) {
                    Ok(k) => {
                        shared.keys.insert(k.id.clone(), k);
                    }
                    Err(e) => tracing::warn!(%key, error = %e, "API key record does not decode"),
                }
            }
            Ok(WatchEvent::Put { key, value }) if key.starts_with(NODES_PREFIX) => {
                if let Some(c) = &shared.cluster {
                    c.node_changed(&key, Some(&value));
                }
            }
            Ok(WatchEvent::Put { key, value }) if key.starts_with(PLACEMENT_PREFIX) => {
                if let Some(c) = &shared.cluster {
                    c.placement_changed(&key, Some(&value));
                }
            }
            Ok(WatchEvent::Delete { key }) => {
                if let Some(id) = key.strip_prefix("keys/") {
                    shared.keys.remove(id);
                } else if let Some(c) = &shared.cluster {
                    c.node_changed(&key, None);
                    c.placement_changed(&key, None);
                    if key.starts_with(NODES_PREFIX) {
                        forget_departed_nodes(&shared, c);
                    }
                }
            }
            Ok(WatchEvent::Put { .. }) => {}
            Ok(WatchEvent::Resync) | Err(RecvError::Lagged(_)) => {
                if let Ok(all) = registry.runners(None).await {
                    all.iter().for_each(|r| index.apply(r));
                }
                if let Ok(keys) = registry.keys().await {
                    for k in keys {
                        shared.keys.insert(k.id.clone(), k);
                    }
                }
                if let Some(c) = &shared.cluster {
                    if c.rescan_nodes().await.is_ok() {
                        forget_departed_nodes(&shared, c);
                    }
                    let _ = c.rescan_placement().await;
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// The peer client lets go of its connection and dial lock to every node that is no
/// longer in the cluster's view of its nodes (it kept one of each per node id forever).
fn forget_departed_nodes(shared: &Shared, cluster: &Cluster) {
    if let Some(peers) = &shared.peers {
        peers.forget_all_but(|id| cluster.nodes.contains_key(id));
    }
}

/// A runner revoked through any node (seen in the watch) loses its live connection here,
/// if this node holds it (fail closed: the index already refuses its next handshake).
fn close_revoked(tenants: &Tenants, r: RunnerRecord) {
    let Some(tenant) = tenants.get(&r.tenant) else { return };
    tokio::spawn(async move {
        let call = tenant
            .call(
                |reply| crate::actors::TenantMsg::Revoke(r.id.clone(), reply),
                Some(ACTOR_CALL_TIMEOUT),
            )
            .await;
        if let Ok(ractor::rpc::CallResult::Success(n)) = call
            && n > 0
        {
            tracing::info!(runner = %r.id, tenant = %r.tenant, closed = n, "runner revoked elsewhere: connection closed");
        }
    });
}

/// How often the fence loop checks this node's lease and claims.
const FENCE_EVERY: Duration = Duration::from_millis(100);

/// Fencing: every tenant actor running here must be one this node is home of, under a
/// current lease; any other is stopped (its runners are disconnected and reconnect to the
/// new home). Once the lease was last renewed TTL/2 ago, no claim counts any more.
async fn fence(cluster: Arc<Cluster>, tenants: Arc<Tenants>) {
    let mut tick = tokio::time::interval(FENCE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !cluster.lease_valid() && !cluster.mine.is_empty() {
            tracing::error!(
                age_ms = cluster.lease_age().as_millis() as u64,
                "etcd lease not renewed for TTL/2: stopping every tenant of this node"
            );
            cluster.forget_claims();
        }
        for tenant in tenants.running() {
            if !cluster.is_home(&tenant)
                && let Some(actor) = tenants.get(&tenant)
            {
                tracing::warn!(%tenant, "no longer this tenant's home: stopping its actor");
                actor.stop(Some("no longer this tenant's home".into()));
            }
        }
        metrics::gauge!(crate::metrics::names::CLUSTER_TENANTS_HOMED)
            .set(if cluster.lease_valid() { cluster.mine.len() } else { 0 } as f64);
    }
}

impl BrokerHandle {
    /// Bound QUIC address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// Bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://<http addr>`, or `https://` with `--http-tls`.
    pub fn http_url(&self) -> String {
        let scheme = if self.shared.config.http_tls == crate::config::HttpTls::Off {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}", self.http_addr)
    }

    /// `sha256:<hex>` of the cluster CA.
    pub fn ca_fingerprint(&self) -> String {
        self.shared.ca.fingerprint()
    }

    /// The address written into enroll commands.
    pub fn advertise(&self) -> &str {
        &self.shared.advertise
    }

    /// The node-to-node endpoint's bound address (cluster only).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_endpoint.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// Makes a tenant's actor fail, to exercise supervision (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn crash_tenant(&self, tenant: &str) -> bool {
        self.tenants.get(tenant).is_some_and(|t| t.cast(crate::actors::TenantMsg::Crash).is_ok())
    }

    /// The cluster CA with its key, as this node holds it (a cluster keeps it in etcd, not
    /// in the data dir), to issue certificates in tests (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn cluster_ca(&self) -> runnel_certs::ClusterCa {
        let ca = &self.shared.ca;
        runnel_certs::ClusterCa::from_pem(ca.cluster(), ca.cert_pem(), &ca.key_pem())
            .expect("the CA this node runs on parses")
    }

    /// Keeps a tenant's actor busy for `d`, its mailbox unread (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn stall_tenant(&self, tenant: &str, d: std::time::Duration) -> bool {
        self.tenants.get(tenant).is_some_and(|t| t.cast(crate::actors::TenantMsg::Stall(d)).is_ok())
    }

    /// Makes a tenant's actor take `d` over its next dispatch, once that dispatch is its
    /// to decide (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn slow_next_dispatch(&self, tenant: &str, d: std::time::Duration) -> bool {
        self.fault_next_dispatch(tenant, crate::actors::DispatchFault::Slow(d))
    }

    /// Makes a tenant's actor fail (and its supervisor restart it) on its next dispatch,
    /// once that dispatch is its to decide (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn crash_on_next_dispatch(&self, tenant: &str) -> bool {
        self.fault_next_dispatch(tenant, crate::actors::DispatchFault::Crash)
    }

    #[cfg(feature = "fault-injection")]
    fn fault_next_dispatch(&self, tenant: &str, f: crate::actors::DispatchFault) -> bool {
        let msg = crate::actors::TenantMsg::FaultNextDispatch(f);
        self.tenants.get(tenant).is_some_and(|t| t.cast(msg).is_ok())
    }

    /// Makes every store write fail from now on (`true`) or succeed again (tests only).
    #[cfg(feature = "fault-injection")]
    pub fn fail_store_writes(&self, on: bool) {
        self.faulty.fail_writes(on);
    }

    /// Drains this node before it stops (SIGTERM), so that a restart does not cut jobs off
    /// or bring every runner back at once. It tells its runners to go away, each with its
    /// own reconnect delay drawn from the GoAway window (each finishes what it runs first),
    /// and waits, up to the drain timeout, until they have left. A single node's QUIC
    /// endpoint then refuses new connections: a runner whose delay is up before the node has
    /// stopped backs off rather than settling here again.
    ///
    /// In a cluster, first it takes no new dispatch (503, callers retry and reach the next
    /// home) and waits for the jobs it accepted to end, still taking its own tenants'
    /// runners (a job waiting for one needs it), and at the end it releases its claims so
    /// that the next home claims at once.
    pub async fn drain(&self) {
        let config = &self.shared.config;
        let deadline = tokio::time::Instant::now() + config.drain_timeout;
        if let Some(cluster) = &self.shared.cluster {
            cluster.draining.store(true, std::sync::atomic::Ordering::Release);
            while self.shared.jobs.unfinished_count() > 0 && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            // A single node: nowhere else to send a runner whose delay is up before this
            // process stops. (A cluster node keeps accepting: a runner that comes back is
            // redirected to the tenant's next home.)
            self.shared.intake.close();
        }
        let left = self.shared.jobs.unfinished_count();
        tracing::info!(unfinished = left, "drain: telling runners to go away");
        if let Some(cluster) = &self.shared.cluster {
            // From here no runner attaches (one that does would not be sent away).
            cluster.runners_leaving.store(true, std::sync::atomic::Ordering::Release);
        }
        let window_ms = u32::try_from(config.goaway_window.as_millis()).unwrap_or(u32::MAX);
        for tenant in self.tenants_running() {
            let _ = tenant.cast(crate::actors::TenantMsg::GoAway { window_ms });
        }
        // Runners finish what they run, then leave; wait for them (bounded).
        while self.shared.index.connected(None) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(cluster) = &self.shared.cluster {
            cluster.release_claims().await;
        }
    }

    fn tenants_running(&self) -> Vec<ractor::ActorRef<crate::actors::TenantMsg>> {
        self.tenants.running().iter().filter_map(|t| self.tenants.get(t)).collect()
    }

    /// Stops accepting, tells runners to go away, stops the actor tree and waits (bounded
    /// by named limits) for connections to close and for the broker's tasks to end.
    pub async fn shutdown(mut self) {
        let had_runners = self.shared.index.connected(None) > 0;
        self.shutdown.cancel();
        self.endpoint
            .close(runnel_protocol::ErrorCode::GoingAway.as_u32().into(), b"broker shutting down");
        self.root.stop_and_wait(Some("shutdown".into()), Some(ROOT_STOP_WAIT)).await.ok();
        // Runners still connected get time to acknowledge the close. With none (a drained node)
        // there is nothing to wait for: waiting anyway kept a drained node up for the whole
        // ENDPOINT_IDLE_WAIT while its runners' early redials sat unaccepted, as long as the
        // GoAway window it had spread them over (tests/nat.rs restart storm).
        if had_runners {
            let _ = tokio::time::timeout(ENDPOINT_IDLE_WAIT, self.endpoint.wait_idle()).await;
        }
        let serving = &mut self.serving;
        let _ = tokio::time::timeout(TASKS_STOP_WAIT, async {
            while serving.join_next().await.is_some() {}
        })
        .await;
        self.serving.abort_all();
        self.background.abort_all();
        // Refusals counted since the last window are not lost with the process.
        self.shared.refusals.flush(&self.shared.registry).await;
        if let Some(c) = &self.shared.cluster {
            c.leave().await;
        }
        if let Some(ep) = &self.peer_endpoint {
            ep.close(runnel_protocol::ErrorCode::GoingAway.as_u32().into(), b"node stopping");
        }
    }
}
