//! The connection to the broker: dialled on first use and again after it closed; the
//! calls answered once on its lane, a followed dispatch on a stream of its own; a bounded
//! number of calls at once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runnel_protocol::transport::Stats;
use runnel_protocol::{
    ALPN_API, ApiHello, ApiRequest, ApiWelcome, DispatchSpec, JobInfo, Outbox, PROTOCOL_VERSION,
    PeerResponse, encode, read_answer, read_frame, write_frame,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;
use crate::handle::JobHandle;
use crate::lane::{Failed, Lane};

/// How a [`Client`] connects and how much it may ask at once.
#[derive(Debug, Clone)]
pub struct Options {
    /// Calls open at once (a [`JobHandle`] holds one until it is done or dropped); more
    /// wait for a turn. 0, or more than the broker allows a connection, means the
    /// broker's limit (its Welcome says: 256 today).
    pub max_in_flight: usize,
    /// The longest dialling the broker (QUIC and TLS handshake, then the key check) may
    /// take.
    pub connect_timeout: Duration,
    /// How often an idle connection is kept alive. It must stay below the broker's idle
    /// timeout (at least 1 s, 15 s by default), or a long `wait` on a quiet job would
    /// see its connection time out.
    pub keep_alive: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_in_flight: 0,
            connect_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_millis(500),
        }
    }
}

/// A connection to a broker's native API for one API key. Cheap to clone: clones share
/// the connection and the in-flight bound.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    /// Where the broker answers, in the order given: one address, or the nodes of a
    /// cluster (any node serves any tenant's calls).
    targets: Vec<Target>,
    /// The target of the live connection, tried first when dialling again.
    preferred: std::sync::atomic::AtomicUsize,
    /// The API key (a secret: never printed).
    key: String,
    connect_timeout: Duration,
    /// The live connection and its lane; replaced when it has closed.
    live: Mutex<Live>,
    /// Held while dialling again, so that one caller dials and the others wait for it.
    dialling: tokio::sync::Mutex<()>,
    calls: Arc<Semaphore>,
    /// Where calls post their requests, so that calls made together share datagrams.
    outbox: Outbox<quinn::SendStream>,
    tenant: Option<String>,
    role: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("broker", &self.inner.targets.iter().map(|t| t.addr).collect::<Vec<_>>())
            .field("tenant", &self.inner.tenant)
            .field("role", &self.inner.role)
            .finish_non_exhaustive()
    }
}

/// A connection and its lane (the calls answered once).
#[derive(Clone)]
struct Live {
    conn: quinn::Connection,
    lane: Arc<Lane>,
}

/// Which calls may be sent again on a new connection after their connection broke.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Only when the request never left (a dispatch: a second one could run twice).
    IfUnsent,
    /// Always once (reads and cancel, which are idempotent).
    Once,
}

impl Client {
    /// Connects to the broker at `addr` (`host:port` of its QUIC port, as runners dial
    /// it; or several, comma-separated, such as a cluster's nodes: tried in turn, when
    /// connecting and when dialling again), trusting only the CA with fingerprint `ca_fingerprint` (`sha256:…`), as the
    /// holder of API key `key`, with the default [`Options`].
    pub async fn connect(addr: &str, ca_fingerprint: &str, key: &str) -> Result<Self, Error> {
        Self::connect_with(addr, ca_fingerprint, key, Options::default()).await
    }

    /// [`Client::connect`] with `options`.
    pub async fn connect_with(
        addr: &str,
        ca_fingerprint: &str,
        key: &str,
        options: Options,
    ) -> Result<Self, Error> {
        let pin = runnel_certs::parse_fingerprint(ca_fingerprint)
            .map_err(|e| Error::Fingerprint(e.to_string()))?;
        let mut targets = Vec::new();
        for one in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            targets.push(resolve(one).await?);
        }
        let Some(first) = targets.first() else {
            return Err(Error::Address { addr: addr.to_owned(), reason: "no address".into() });
        };
        let mut tls = runnel_certs::pin::client_config(pin)
            .map_err(|e| Error::Connect(format!("TLS config: {e}")))?;
        tls.alpn_protocols = vec![ALPN_API.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| Error::Connect(format!("TLS config: {e}")))?;
        let mut transport = quinn::TransportConfig::default();
        // The broker opens no streams towards a client.
        transport
            .max_concurrent_bidi_streams(0u32.into())
            .max_concurrent_uni_streams(0u32.into())
            .keep_alive_interval(Some(options.keep_alive))
            .mtu_discovery_config(Some(runnel_protocol::transport::mtu_discovery()))
            .ack_frequency_config(Some(runnel_protocol::transport::ack_frequency()));
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        // One socket for every target: of the first one's family.
        let bind: SocketAddr = if first.addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| Error::Connect(e.to_string()))?;
        let (at, live, welcome) =
            dial_any(&endpoint, &config, &targets, 0, key, options.connect_timeout).await?;
        let most = usize::try_from(welcome.max_calls).unwrap_or(usize::MAX);
        let max_in_flight = match options.max_in_flight {
            0 => most,
            n => n.min(most),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                config,
                targets,
                preferred: at.into(),
                key: key.to_owned(),
                connect_timeout: options.connect_timeout,
                live: Mutex::new(live),
                dialling: tokio::sync::Mutex::new(()),
                calls: Arc::new(Semaphore::new(max_in_flight.max(1))),
                outbox: Outbox::start(),
                tenant: welcome.tenant,
                role: welcome.role,
            }),
        })
    }

    /// The key's tenant (None for an operator key, which dispatches nothing).
    pub fn tenant(&self) -> Option<&str> {
        self.inner.tenant.as_deref()
    }

    /// The key's role (`admin`, `dispatcher`, `member`, …).
    pub fn role(&self) -> &str {
        &self.inner.role
    }

    /// The live connection's counters, since it was dialled (a connection dialled again
    /// starts from zero).
    pub fn stats(&self) -> Stats {
        Stats::from(&self.current().conn.stats())
    }

    /// Calls that may still start now without waiting for a turn.
    pub fn available_calls(&self) -> usize {
        self.inner.calls.available_permits()
    }

    /// Dispatches a job and follows it: the handle answers the accepted job at once, then
    /// its output as it comes, then its result. `spec.wait` is ignored (the handle waits).
    pub async fn dispatch(&self, spec: DispatchSpec) -> Result<JobHandle, Error> {
        let req = ApiRequest::Dispatch { spec: DispatchSpec { wait: false, ..spec }, follow: true };
        let (permit, conn, mut recv) = self.open(&req).await?;
        let job = match read_answer(&mut recv).await {
            Ok(PeerResponse::Job(job)) => job,
            Ok(other) => return Err(Error::Protocol(format!("unexpected {}", other.what()))),
            Err(e) => return Err(Error::answer(e, &conn)),
        };
        Ok(JobHandle::new(job, recv, conn, permit))
    }

    /// Dispatches a job, answered once as `POST /v1/jobs` answers: with `spec.wait`, the
    /// ended job with all of its output; without, the accepted job.
    pub async fn submit(&self, spec: DispatchSpec) -> Result<JobInfo, Error> {
        self.job_call(&ApiRequest::Dispatch { spec, follow: false }, Retry::IfUnsent).await
    }

    /// A job's current view, with its output so far.
    pub async fn get(&self, id: &str) -> Result<JobInfo, Error> {
        self.job_call(&ApiRequest::GetJob { id: id.to_owned() }, Retry::Once).await
    }

    /// Cancels a job (an ended job is answered as it stands).
    pub async fn cancel(&self, id: &str) -> Result<JobInfo, Error> {
        self.job_call(&ApiRequest::CancelJob { id: id.to_owned() }, Retry::Once).await
    }

    /// Waits until a job has ended; answers its view with its output.
    pub async fn wait(&self, id: &str) -> Result<JobInfo, Error> {
        self.job_call(&ApiRequest::WaitJob { id: id.to_owned() }, Retry::Once).await
    }

    /// Closes the connection; calls still open fail with [`Error::Lost`]. A later call
    /// dials again.
    pub fn close(&self) {
        self.current().conn.close(0u32.into(), b"client closed");
    }

    /// A call answered as one job, on the connection's lane; sent again on a new
    /// connection as `retry` allows.
    async fn job_call(&self, req: &ApiRequest, retry: Retry) -> Result<JobInfo, Error> {
        let _permit = self.turn().await?;
        let mut resent = false;
        for _ in 0..3 {
            let lane = self.live().await?.lane;
            match lane.call(req).await {
                Ok(job) => return Ok(job),
                // Its lane had broken: nothing left, the next try dials again.
                Err(Failed::Unsent) => {}
                Err(Failed::Sent(Error::Lost(_))) if retry == Retry::Once && !resent => {
                    resent = true;
                }
                Err(Failed::Sent(e)) => return Err(e),
            }
        }
        Err(Error::Lost("the connection broke again and again".into()))
    }

    /// A turn among [`Options::max_in_flight`].
    async fn turn(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.inner
            .calls
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Lost("the client is closed".into()))
    }

    /// Waits for a turn, then sends `req` on a new stream of a live connection; answers
    /// the turn, the connection and the stream to read the answer from.
    async fn open(
        &self,
        req: &ApiRequest,
    ) -> Result<(OwnedSemaphorePermit, quinn::Connection, quinn::RecvStream), Error> {
        let permit = self.turn().await?;
        let frame = encode(req).map_err(|e| Error::Protocol(format!("request: {e}")))?;
        let mut last = None;
        for _ in 0..2 {
            let conn = self.live().await?.conn;
            // Nothing has left when opening fails: always safe to try once more on a new
            // connection.
            match conn.open_bi().await {
                Ok((send, recv)) => {
                    self.inner
                        .outbox
                        .post(send, frame)
                        .map_err(|_| Error::Lost("the client is closed".into()))?;
                    return Ok((permit, conn, recv));
                }
                Err(e) => last = Some(e.to_string()),
            }
        }
        Err(Error::Lost(last.unwrap_or_default()))
    }

    fn current(&self) -> Live {
        // A poisoned lock still holds a valid connection handle.
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The live connection, dialled again if it has closed.
    async fn live(&self) -> Result<Live, Error> {
        let live = self.current();
        if live.conn.close_reason().is_none() {
            return Ok(live);
        }
        let _dialling = self.inner.dialling.lock().await;
        let live = self.current();
        if live.conn.close_reason().is_none() {
            return Ok(live);
        }
        let i = &self.inner;
        tracing::debug!(why = ?live.conn.close_reason(), "dialling the broker again");
        let start = i.preferred.load(std::sync::atomic::Ordering::Relaxed);
        let (at, live, _) =
            dial_any(&i.endpoint, &i.config, &i.targets, start, &i.key, i.connect_timeout).await?;
        i.preferred.store(at, std::sync::atomic::Ordering::Relaxed);
        *i.live.lock().unwrap_or_else(|p| p.into_inner()) = live.clone();
        Ok(live)
    }
}

/// What the broker's Welcome grants.
struct Welcomed {
    tenant: Option<String>,
    role: String,
    max_calls: u32,
}

/// One address of the broker.
struct Target {
    addr: SocketAddr,
    /// The name its certificate must carry (the host as given).
    server_name: String,
}

/// [`dial`] each target in turn, from `start`, until one answers; answers which. A
/// refusal of the caller (a bad key) is the same everywhere and ends the search.
async fn dial_any(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    targets: &[Target],
    start: usize,
    key: &str,
    limit: Duration,
) -> Result<(usize, Live, Welcomed), Error> {
    let mut last = None;
    for i in (0..targets.len()).map(|k| (start + k) % targets.len()) {
        let t = &targets[i];
        match dial(endpoint, config, t.addr, &t.server_name, key, limit).await {
            Ok((conn, welcome)) => return Ok((i, conn, welcome)),
            // The caller's own fault (a bad key: 401; 403, 400): the same on every node.
            Err(e @ Error::Refused { status: 400..=499, .. }) => return Err(e),
            // Unreachable, unavailable (503 while its etcd is away), stopping: the next.
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::Connect("no address to dial".into())))
}

/// Handshake, hello with the key, the broker's answer; then the connection's lane.
async fn dial(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    key: &str,
    limit: Duration,
) -> Result<(Live, Welcomed), Error> {
    let connect = |e: &dyn std::fmt::Display| Error::Connect(e.to_string());
    let hello = async {
        let conn = endpoint
            .connect_with(config.clone(), addr, server_name)
            .map_err(|e| connect(&e))?
            .await
            .map_err(|e| connect(&e))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| connect(&e))?;
        let hello = ApiHello { version: PROTOCOL_VERSION, key: key.to_owned() };
        write_frame(&mut send, &hello).await.map_err(|e| connect(&e))?;
        send.finish().map_err(|e| connect(&e))?;
        let welcome = read_frame::<ApiWelcome, _>(&mut recv).await;
        match welcome {
            Ok(Some(ApiWelcome::Welcome { tenant, role, max_calls })) => {
                let lane = Arc::new(Lane::open(&conn).await?);
                Ok((Live { conn, lane }, Welcomed { tenant, role, max_calls }))
            }
            Ok(Some(ApiWelcome::Refused { status, code, message })) => {
                Err(Error::Refused { status, code, message })
            }
            Ok(None) => Err(Error::Protocol("the broker closed the hello unanswered".into())),
            Err(e) => Err(Error::Protocol(format!("hello: {e}"))),
        }
    };
    tokio::time::timeout(limit, hello)
        .await
        .map_err(|_| Error::Connect(format!("no answer from {addr} within {limit:?}")))?
}

/// `host:port` → the address to dial and the name the broker's certificate must carry.
async fn resolve(addr: &str) -> Result<Target, Error> {
    let bad = |reason: &str| Error::Address { addr: addr.to_owned(), reason: reason.to_owned() };
    let (host, _) = addr.rsplit_once(':').ok_or_else(|| bad("expected host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let sock = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| bad(&e.to_string()))?
        .next()
        .ok_or_else(|| bad("does not resolve"))?;
    Ok(Target { addr: sock, server_name: host })
}
