//! One session with the broker: connect, Hello → Welcome, the control stream (heartbeats,
//! renewal, drain, GoAway), and accepting job streams until the connection ends.
//!
//! A runner is *connected* only once the broker's Welcome arrives: with TLS 1.3 a client's
//! handshake can complete before the broker has refused its certificate, so `connect`
//! succeeding proves nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::OptionFuture;
use runnel_certs::{CLOCK_SKEW, key, parse_cert, pem};
use runnel_protocol::{
    ClientControl, ErrorCode, Heartbeat, Hello, Outbox, PROTOCOL_VERSION, ServerControl,
    read_frame, version, version::MIN_PROTOCOL_VERSION, write_frame,
};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::RunnerError;
use crate::backoff::Backoff;
use crate::job::{run_lane_job, serve_job};
use crate::lane::Lane;
use crate::runner::{Inner, RunnerStatus};
use crate::state::StateDir;
use crate::tls::{client_endpoint, job_streams, resolve, runner_config};

/// Time a QUIC handshake may take: a node that is gone (killed, unplugged) answers
/// nothing, and QUIC's own idle timeout would keep the runner waiting far longer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time the broker has to answer Hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Never ask for a new certificate more often than this.
const MIN_RENEW_SPACING: Duration = Duration::from_secs(1);

/// How a session ended.
pub(crate) enum SessionEnd {
    /// Drained or stopped on request: do not reconnect.
    Finished,
    /// The broker refused this runner for good.
    Fatal(String),
    /// Anything else: reconnect. `welcomed` says whether the session got that far.
    Retry { reason: String, welcomed: bool },
    /// The node stopped answering: the handshake or the connection timed out. It may be
    /// dead, so it is avoided for a while (`crate::dial`). Reconnect as for `Retry`.
    Silent { reason: String, welcomed: bool },
    /// (cluster) The node is not this runner's tenant's home: dial this `host:port` now.
    Redirect(String),
    /// The broker asked this runner to leave (its node drains): running jobs finished, the
    /// runner reconnects after the delay the broker chose.
    GoAway(Duration),
    /// The broker refused the connection before the handshake (busy, over a rate, or
    /// stopping): reconnect after a spread-out delay, not the short end of the backoff,
    /// so that a fleet waiting for a restarting broker does not arrive in step.
    Busy(String),
}

/// Whether the broker refused the connection outright (QUIC `CONNECTION_REFUSED`).
pub(crate) fn is_refused(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
}

/// Whether a connection ended because this runner is revoked: the broker closed a live
/// connection with `Revoked`, or refused the handshake with the TLS alert
/// `certificate_revoked`.
pub(crate) fn is_revocation(e: &quinn::ConnectionError) -> bool {
    match e {
        // The broker closed a live connection because the runner was revoked.
        quinn::ConnectionError::ApplicationClosed(c) => {
            c.error_code == ErrorCode::Revoked.as_u32().into()
        }
        // The TLS alert certificate_revoked (44) in the handshake: QUIC crypto error 0x100+44.
        quinn::ConnectionError::ConnectionClosed(c) => {
            c.error_code
                == quinn::TransportErrorCode::crypto(u8::from(
                    rustls::AlertDescription::CertificateRevoked,
                ))
        }
        _ => false,
    }
}

fn retry(reason: impl std::fmt::Display) -> SessionEnd {
    SessionEnd::Retry { reason: reason.to_string(), welcomed: false }
}

/// A connection that ended with `e`: `Silent` when the node stopped answering, else `Retry`.
fn lost(e: &quinn::ConnectionError, reason: String, welcomed: bool) -> SessionEnd {
    if matches!(e, quinn::ConnectionError::TimedOut) {
        SessionEnd::Silent { reason, welcomed }
    } else {
        SessionEnd::Retry { reason, welcomed }
    }
}

/// When a certificate valid over `[not_before, not_after]` should be renewed: after 2/3 of
/// its life, counted from its issue (the CA backdates `not_before` by [`CLOCK_SKEW`]).
pub(crate) fn renewal_due(
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> time::OffsetDateTime {
    let issued = not_before + CLOCK_SKEW;
    let life: time::Duration = not_after - issued;
    issued + (life * 2) / 3
}

/// [`renewal_due`] of a PEM certificate, as a system time (None: it does not parse).
fn renew_at(cert_pem: &str) -> Option<std::time::SystemTime> {
    let der = pem::certs_from_pem(cert_pem).ok()?.into_iter().next()?;
    let parsed = parse_cert(&der).ok()?;
    let at = renewal_due(parsed.not_before, parsed.not_after);
    Some(
        std::time::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(at.unix_timestamp()).unwrap_or(0)),
    )
}

pub(crate) async fn session(
    inner: &Arc<Inner>,
    dial: &str,
    sessions: &mut u64,
    due: (std::time::SystemTime, Duration),
) -> SessionEnd {
    let st = &inner.state;
    let loaded = (|| -> Result<_, RunnerError> {
        let ca = pem::certs_from_pem(&st.read(&st.ca_path())?)?.into_iter().next();
        let cert_pem = st.read(&st.cert_path())?;
        let chain = pem::certs_from_pem(&cert_pem)?;
        let key = pem::private_key_from_pem(&st.read(&st.key_path())?)?;
        Ok((ca, cert_pem, chain, key))
    })();
    let (ca, cert_pem, chain, key) = match loaded {
        Ok((Some(ca), c, ch, k)) => (ca, c, ch, k),
        Ok((None, ..)) => return SessionEnd::Fatal("state dir has no CA".into()),
        Err(e) => return SessionEnd::Fatal(e.to_string()),
    };
    let cfg = match runner_config(ca, chain, key, inner.keep_alive, job_streams(inner.capacity)) {
        Ok(c) => c,
        Err(e) => return SessionEnd::Fatal(e.to_string()),
    };
    let (addr, server_name) = match resolve(dial).await {
        Ok(x) => x,
        Err(e) => return retry(e),
    };
    let endpoint = match client_endpoint(addr) {
        Ok(e) => e,
        Err(e) => return retry(e),
    };
    let connecting = match endpoint.connect_with(cfg, addr, &server_name) {
        Ok(c) => c,
        Err(e) => return retry(e),
    };
    let conn = tokio::select! {
        c = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => match c {
            Ok(Ok(c)) => c,
            Ok(Err(e)) if is_revocation(&e) => return SessionEnd::Fatal(format!("runner revoked: {e}")),
            Ok(Err(e)) if is_refused(&e) => return SessionEnd::Busy(format!("connect: {e}")),
            Ok(Err(e)) => return lost(&e, format!("connect: {e}"), false),
            Err(_) => {
                let reason = format!("connect to {dial}: no answer in {CONNECT_TIMEOUT:?}");
                return SessionEnd::Silent { reason, welcomed: false };
            }
        },
        _ = inner.stop.cancelled() => return SessionEnd::Finished,
    };
    let live = LiveConnection::set(inner, &conn);
    let end = serve_connection(inner, &conn, sessions, &cert_pem, due).await;
    drop(live);
    endpoint.wait_idle().await;
    end
}

/// The session's connection in `RunnerHandle::stats`, for as long as the session serves
/// it (however the session ends: also when its future is dropped).
struct LiveConnection<'a>(&'a Inner);

impl<'a> LiveConnection<'a> {
    fn set(inner: &'a Inner, conn: &quinn::Connection) -> Self {
        *inner.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Self(inner)
    }
}

impl Drop for LiveConnection<'_> {
    fn drop(&mut self) {
        *self.0.live.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

async fn serve_connection(
    inner: &Arc<Inner>,
    conn: &quinn::Connection,
    sessions: &mut u64,
    cert_pem: &str,
    (dial_due, waited): (std::time::SystemTime, Duration),
) -> SessionEnd {
    let closed_why = |e: &quinn::ConnectionError| {
        if is_revocation(e) {
            SessionEnd::Fatal(format!("runner revoked: {e}"))
        } else {
            lost(e, e.to_string(), false)
        }
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return closed_why(&e),
    };
    let hello = ClientControl::Hello(Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        runner_version: env!("CARGO_PKG_VERSION").into(),
        labels: inner.labels.clone(),
        capacity: inner.capacity,
        kinds: inner.handlers.keys().cloned().collect(),
    });
    if let Err(e) = write_frame(&mut send, &hello).await {
        return retry(format!("sending Hello: {e}"));
    }
    let welcome = match tokio::time::timeout(
        WELCOME_TIMEOUT,
        read_frame::<ServerControl, _>(&mut recv),
    )
    .await
    {
        Ok(Ok(Some(ServerControl::Welcome(w)))) => w,
        Ok(Ok(Some(ServerControl::Redirect(r)))) => {
            conn.close(ErrorCode::Ok.as_u32().into(), b"redirected");
            return SessionEnd::Redirect(r.addr);
        }
        // Passing trouble (no home for the tenant right now, a store outage, a restart):
        // reconnect with backoff.
        Ok(Ok(Some(ServerControl::Error { code, message })))
            if matches!(
                code,
                ErrorCode::Unavailable | ErrorCode::GoingAway | ErrorCode::TenantRestart
            ) =>
        {
            return retry(format!("broker cannot serve this runner now ({code}): {message}"));
        }
        Ok(Ok(Some(ServerControl::Error { code, message }))) => {
            return SessionEnd::Fatal(format!("broker refused the session ({code}): {message}"));
        }
        Ok(Ok(_)) => return retry("broker closed the control stream before Welcome"),
        Ok(Err(e)) => {
            // Most likely the broker refused our certificate: the close reason says why.
            return match conn.close_reason() {
                Some(reason) => closed_why(&reason),
                None => retry(format!("waiting for Welcome: {e}")),
            };
        }
        Err(_) => return retry("no Welcome in time"),
    };
    // A node that lost its claim on the tenant (paused, partitioned) and did not notice yet
    // is refused: a newer home has already welcomed this runner.
    let seen = inner.epoch_seen.fetch_max(welcome.epoch, Ordering::AcqRel);
    if welcome.epoch < seen {
        conn.close(ErrorCode::Ok.as_u32().into(), b"stale epoch");
        return retry(format!(
            "stale Welcome: epoch {} is older than {seen}, already seen",
            welcome.epoch
        ));
    }
    *sessions += 1;
    tracing::info!(runner = %welcome.runner_id, tenant = %welcome.tenant, owner = %welcome.owner, "connected");
    let _ = inner.status.send(RunnerStatus::Connected {
        runner_id: welcome.runner_id.clone(),
        session: *sessions,
        dial_due,
        waited,
    });

    // Control writer: heartbeats, renewal requests, the drain notice.
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ClientControl>(8);
    let writer = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(m) = ctl_rx.recv().await {
            if write_frame(&mut send, &m).await.is_err() {
                return;
            }
        }
    }));
    let heartbeat_every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    let hb_tx = ctl_tx.clone();
    let hb_permits = inner.permits.clone();
    let capacity = inner.capacity;
    let heartbeats = AbortOnDropHandle::new(tokio::spawn(async move {
        let mut tick = tokio::time::interval(heartbeat_every);
        loop {
            tick.tick().await;
            let free = u32::try_from(hb_permits.available_permits()).unwrap_or(u32::MAX);
            let in_flight = capacity.saturating_sub(free);
            let hb = ClientControl::Heartbeat(Heartbeat { in_flight, load_milli: load_milli() });
            if hb_tx.send(hb).await.is_err() {
                return;
            }
        }
    }));
    // Control reader: renewed certificates, GoAway, errors; asks for renewal in time.
    let (leave_tx, mut leave_rx) = mpsc::channel::<u32>(1);
    let reader = AbortOnDropHandle::new(tokio::spawn(control_reader(
        inner.clone(),
        ctl_tx.clone(),
        cert_pem.to_owned(),
        recv,
        leave_tx,
    )));
    // Owned: dropped (and so aborted) when this function returns or is dropped.
    let _tasks = (writer, heartbeats, reader);

    let mut jobs = tokio::task::JoinSet::new();
    // The jobs' results leave through one task, so that results written together share
    // datagrams (runnel_protocol::Outbox).
    let outbox = Outbox::start();
    // Protocol 3: the job lane, once the broker has opened it.
    let mut lane: Option<Lane> = None;
    // Set by the broker's GoAway: finish the running jobs, then leave.
    let mut leaving: Option<Duration> = None;
    let end = loop {
        tokio::select! {
            Some(ms) = leave_rx.recv(), if leaving.is_none() => {
                tracing::info!(in_flight = jobs.len(), reconnect_after_ms = ms, "broker asked us to go away: finishing running jobs first");
                leaving = Some(Duration::from_millis(u64::from(ms)));
            }
            _ = std::future::ready(()), if leaving.is_some() && jobs.is_empty() => {
                Lane::leave(lane.take(), conn, b"go away").await;
                break SessionEnd::GoAway(leaving.unwrap_or_default());
            }
            s = conn.accept_bi() => match s {
                // Protocol 3: the broker's first stream is the job lane, and the only one.
                Ok((mut send, recv)) if welcome.version >= version::JOB_LANE => {
                    if lane.is_some() {
                        let _ = send.reset(ErrorCode::Protocol.as_u32().into());
                    } else {
                        lane = Some(Lane::open(conn.clone(), send, recv, inner.capacity));
                    }
                }
                Ok((send, recv)) => {
                    let (inner, outbox) = (inner.clone(), outbox.clone());
                    jobs.spawn(async move { serve_job(&inner, outbox, send, recv).await });
                }
                Err(e) => break lost(&e, e.to_string(), true),
            },
            Some(Some((n, req, cancel))) = OptionFuture::from(lane.as_mut().map(|l| l.jobs.recv())), if lane.is_some() => {
                let Some(l) = lane.as_ref() else { continue };
                let (inner, writer, cancels) = (inner.clone(), l.writer.clone(), l.cancels());
                let span = tracing::info_span!("job", job = %req.job_id, kind = %req.kind);
                jobs.spawn(
                    async move {
                        run_lane_job(&inner, n, req, writer, cancel).await;
                        cancels.ended(n);
                    }
                    .instrument(span),
                );
            }
            _ = inner.drain.cancelled(), if !inner.draining.load(Ordering::Relaxed) => {
                inner.draining.store(true, Ordering::Relaxed);
                tracing::info!(in_flight = jobs.len(), "draining: finishing running jobs, refusing new ones");
                let _ = ctl_tx.send(ClientControl::Draining).await;
            }
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
            _ = std::future::ready(()), if inner.draining.load(Ordering::Relaxed) && jobs.is_empty() => {
                Lane::leave(lane.take(), conn, b"drained").await;
                break SessionEnd::Finished;
            }
            _ = inner.stop.cancelled() => {
                conn.close(ErrorCode::GoingAway.as_u32().into(), b"runner stopping");
                break SessionEnd::Finished;
            }
        }
    };
    jobs.abort_all();
    match (&end, conn.close_reason()) {
        (SessionEnd::Retry { .. }, Some(reason)) if is_revocation(&reason) => {
            SessionEnd::Fatal(format!("runner revoked: {reason}"))
        }
        _ => end,
    }
}

/// The control-stream reader: handles what the broker sends (renewed certificates, GoAway,
/// errors) and asks for a new certificate when the current one is due for renewal.
async fn control_reader(
    inner: Arc<Inner>,
    ctl: mpsc::Sender<ClientControl>,
    mut cert_pem: String,
    mut recv: quinn::RecvStream,
    leave: mpsc::Sender<u32>,
) {
    let st = &inner.state;
    let mut pending = false;
    // After a refusal that may pass later (too soon, broker trouble), try again with
    // backoff rather than never: a long-lived session must not outlive its certificate.
    let mut retry = Backoff::new();
    let mut not_before = tokio::time::Instant::now();
    loop {
        let due = renew_at(&cert_pem)
            .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok())
            .unwrap_or(Duration::ZERO)
            .max(MIN_RENEW_SPACING);
        let due = tokio::time::Instant::now().max(not_before) + due;
        tokio::select! {
            _ = tokio::time::sleep_until(due), if !pending => {
                let csr = st.read(&st.key_path()).and_then(|k| Ok(key::csr_pem(&key::key_from_pem(&k)?)?));
                match csr {
                    Ok(csr_pem) => {
                        pending = ctl.send(ClientControl::RenewCert { csr_pem }).await.is_ok();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build a renewal request");
                        return;
                    }
                }
            }
            frame = read_frame::<ServerControl, _>(&mut recv) => match frame {
                Ok(Some(ServerControl::RenewedCert { cert_pem: new, not_after_unix })) => {
                    pending = false;
                    match accept_renewed(&inner.state, &new) {
                        Ok(()) => {
                            tracing::info!(not_after_unix, "certificate renewed");
                            cert_pem = new;
                            retry.reset();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "refusing the renewed certificate");
                            not_before = tokio::time::Instant::now() + retry.next_delay(&mut rand::rng());
                        }
                    }
                }
                Ok(Some(ServerControl::RenewRefused { code, message })) => {
                    pending = false;
                    if code == ErrorCode::Revoked {
                        tracing::warn!(%code, %message, "renewal refused for good");
                        return;
                    }
                    let wait = retry.next_delay(&mut rand::rng());
                    tracing::warn!(%code, %message, retry_in_ms = wait.as_millis() as u64, "renewal refused; retrying");
                    not_before = tokio::time::Instant::now() + wait;
                }
                Ok(Some(ServerControl::GoAway(g))) => {
                    tracing::info!(reason = %g.reason, "broker asked us to go away");
                    let _ = leave.try_send(g.reconnect_after_ms);
                }
                Ok(Some(ServerControl::Error { code, message })) => {
                    tracing::warn!(%code, %message, "broker reported an error");
                }
                Ok(Some(other)) => tracing::debug!(?other, "ignoring control message"),
                Ok(None) | Err(_) => return,
            },
        }
    }
}

/// Checks a renewed certificate before it replaces the current one: it must certify this
/// runner's own key and chain to the CA pinned at enrollment (a client certificate, valid
/// now). Then writes it atomically (temp file + rename), so a crash never leaves half a
/// certificate.
pub(crate) fn accept_renewed(state: &StateDir, cert_pem: &str) -> Result<(), String> {
    let der = pem::certs_from_pem(cert_pem)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or("no certificate in the answer")?;
    let own = key::key_from_pem(&state.read(&state.key_path()).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let parsed = parse_cert(&der).map_err(|e| e.to_string())?;
    if parsed.public_key != own.public_key_raw() {
        return Err("it certifies another key".into());
    }
    let ca = pem::certs_from_pem(&state.read(&state.ca_path()).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or("state dir has no CA")?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| e.to_string())?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        runnel_certs::tls::provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    verifier
        .verify_client_cert(&der, &[], rustls_pki_types::UnixTime::now())
        .map_err(|e| format!("it does not chain to the pinned CA: {e}"))?;
    let path = state.cert_path();
    let tmp = path.with_extension("pem.new");
    pem::write_public(&tmp, cert_pem).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))
}

/// 1-minute load average × 1000, from /proc (0 where unavailable).
fn load_milli() -> u32 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()))
        .map(|l| (l * 1000.0) as u32)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_two_thirds_of_the_life_from_issue() {
        let issued = time::OffsetDateTime::from_unix_timestamp(1_000_000).expect("time");
        let due = renewal_due(issued - CLOCK_SKEW, issued + time::Duration::hours(30));
        assert_eq!(due, issued + time::Duration::hours(20));
        // A certificate already past its life is due at once (in the past).
        let old = renewal_due(issued - CLOCK_SKEW, issued + time::Duration::seconds(3));
        assert_eq!(old, issued + time::Duration::seconds(2));
    }

    /// A state dir holding `key` and trusting `ca`, with a first certificate.
    fn state_dir(dir: &std::path::Path, ca: &runnel_certs::ClusterCa) -> (StateDir, String) {
        let state = StateDir::new(dir.join("s"));
        state.create().expect("create");
        let key = key::generate_key().expect("key");
        let csr = key::csr_pem(&key).expect("csr");
        let id = runnel_certs::RunnerIdentity::new("runnel", "t", "o", "r1").expect("id");
        let first = ca.issue_runner_cert(&csr, &id, Duration::from_secs(60)).expect("cert");
        pem::write_private(&state.key_path(), &key.serialize_pem()).expect("key");
        pem::write_public(&state.cert_path(), &first.cert_pem).expect("cert");
        pem::write_public(&state.ca_path(), ca.cert_pem()).expect("ca");
        (state, csr)
    }

    #[test]
    fn a_renewed_certificate_must_be_for_our_key_and_from_our_ca() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = runnel_certs::ClusterCa::generate("runnel").expect("ca");
        let (state, csr) = state_dir(dir.path(), &ca);
        let id = runnel_certs::RunnerIdentity::new("runnel", "t", "o", "r1").expect("id");
        let before = std::fs::read_to_string(state.cert_path()).expect("read");
        // Another key's certificate, from the right CA.
        let other = key::csr_pem(&key::generate_key().expect("key")).expect("csr");
        let wrong_key = ca.issue_runner_cert(&other, &id, Duration::from_secs(60)).expect("c");
        assert!(accept_renewed(&state, &wrong_key.cert_pem).unwrap_err().contains("another key"));
        // Our key, another CA.
        let foreign = runnel_certs::ClusterCa::generate("runnel").expect("ca");
        let wrong_ca = foreign.issue_runner_cert(&csr, &id, Duration::from_secs(60)).expect("c");
        assert!(accept_renewed(&state, &wrong_ca.cert_pem).unwrap_err().contains("pinned CA"));
        assert!(accept_renewed(&state, "garbage").is_err());
        assert_eq!(std::fs::read_to_string(state.cert_path()).expect("read"), before, "untouched");
        // The genuine one is written, and no temp file is left.
        let good = ca.issue_runner_cert(&csr, &id, Duration::from_secs(120)).expect("c");
        accept_renewed(&state, &good.cert_pem).expect("accept");
        assert_eq!(std::fs::read_to_string(state.cert_path()).expect("read"), good.cert_pem);
        assert!(!state.cert_path().with_extension("pem.new").exists());
    }

    #[test]
    fn revocation_is_told_apart_from_other_closes() {
        let app = |code: ErrorCode| {
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: code.as_u32().into(),
                reason: bytes::Bytes::new(),
            })
        };
        let alert = |a: rustls::AlertDescription| {
            quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: quinn::TransportErrorCode::crypto(u8::from(a)),
                frame_type: None,
                reason: bytes::Bytes::new(),
            })
        };
        assert!(is_revocation(&app(ErrorCode::Revoked)));
        assert!(is_revocation(&alert(rustls::AlertDescription::CertificateRevoked)));
        assert!(!is_revocation(&app(ErrorCode::GoingAway)));
        assert!(!is_revocation(&app(ErrorCode::TenantRestart)));
        assert!(!is_revocation(&alert(rustls::AlertDescription::CertificateExpired)));
        assert!(!is_revocation(&alert(rustls::AlertDescription::UnknownCA)));
        assert!(!is_revocation(&quinn::ConnectionError::TimedOut));
        assert!(!is_revocation(&quinn::ConnectionError::LocallyClosed));
    }
}
