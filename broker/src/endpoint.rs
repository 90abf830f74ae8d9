//! The QUIC endpoint: TLS setup and the accept loop (which stays outside the actor tree).
//!
//! Each incoming connection is handshaken (the [`PairingVerifier`] runs inside), then
//! routed by ALPN: `runnel-enroll/1` to [`crate::enroll`], `runnel/1` to the tenant named
//! by the verified certificate, after the runner's Hello.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use runnel_certs::{Identity, RunnerIdentity, parse_cert};
use runnel_protocol::{
    ALPN_API, ALPN_ENROLL, ALPN_RUNNER, ClientControl, ErrorCode, Redirect, ServerControl,
    read_frame, version, write_frame,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::actors::{Attach, TenantMsg, Tenants};
use crate::broker::SpawnError;
use crate::cluster::Home;
use crate::shared::Shared;
use crate::verifier::PairingVerifier;

mod limits;
pub(crate) use limits::{Admission, EnrollBusy, IntakeLimits};

/// Time a peer has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a runner has to open its control stream and send Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a peer may open towards the broker before its ALPN is known: a runner opens one
/// (its control stream), an enrolling client one (its request); jobs are streams the broker
/// opens. quinn keeps a table entry per stream a peer may open, from the handshake on, so
/// no headroom. A native API client is allowed its calls once it is known
/// (`native::MAX_CALLS`), before its welcome.
const MAX_RUNNER_STREAMS: u32 = 1;
/// Per-stream receive window: frames are small; job output is the largest traffic.
const STREAM_WINDOW: u32 = 64 * 1024;
/// Per-connection receive window.
const CONN_WINDOW: u32 = 256 * 1024;
/// Per-connection send window.
const SEND_WINDOW: u64 = 256 * 1024;

/// Kernel buffer the broker asks for on its UDP socket, each direction. Every runner shares
/// this one socket; with the Linux default (208 KiB) a burst of handshakes or keep-alives
/// from tens of thousands of runners overflows it, and each dropped packet costs a QUIC
/// retransmission timeout (BENCHMARKS.md: p999 of seconds at 20k runners).
pub(crate) const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Binds the runner-facing UDP socket with [`SOCKET_BUFFER`] buffers, and the endpoint on it.
///
/// The kernel caps the size at `net.core.rmem_max` / `wmem_max`; when it does, the broker
/// still starts, and says which sysctl to raise.
pub(crate) fn bind(
    addr: SocketAddr,
    server: quinn::ServerConfig,
) -> std::io::Result<quinn::Endpoint> {
    let (socket, recv, send) = udp_socket(addr)?;
    if recv < SOCKET_BUFFER || send < SOCKET_BUFFER {
        tracing::warn!(
            wanted = SOCKET_BUFFER,
            recv,
            send,
            "UDP socket buffers are smaller than wanted; under load packets will be dropped. \
             Raise net.core.rmem_max and net.core.wmem_max to at least {SOCKET_BUFFER}"
        );
    }
    let runtime = Arc::new(quinn::TokioRuntime);
    let mut endpoint = quinn::EndpointConfig::default();
    endpoint.cid_generator(|| Box::new(RandomCids));
    quinn::Endpoint::new(endpoint, Some(server), socket, runtime)
}

/// Connection IDs of [`CID_LEN`] random bytes.
///
/// quinn's default generator puts only 24 random bits in each 8-byte ID (the other 40 are
/// a check hash), and it checks a Retry's new ID against nothing. With a few thousand
/// runners connected (each holding several IDs) and a burst of Retries, a Retry's ID
/// sometimes equalled a live connection's: the runner's next Initial, sent to that ID, went
/// to the live connection and was dropped there, and the handshake stalled until QUIC's
/// idle timeout (about one runner in 2,000 in half of the `connect -n 2000` runs;
/// BENCHMARKS.md). 64 random bits make that vanishingly rare.
struct RandomCids;

/// Length of the broker's connection IDs.
const CID_LEN: usize = 8;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        use rand::RngCore;
        let mut id = [0u8; CID_LEN];
        rand::rng().fill_bytes(&mut id);
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// A UDP socket on `addr` with [`SOCKET_BUFFER`] asked for, and the receive and send sizes
/// the kernel granted.
fn udp_socket(addr: SocketAddr) -> std::io::Result<(std::net::UdpSocket, usize, usize)> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    // Linux reports twice what it granted (it counts its bookkeeping).
    let granted = |n: std::io::Result<usize>| {
        let n = n.unwrap_or(0);
        if cfg!(target_os = "linux") { n / 2 } else { n }
    };
    let (recv, send) = (granted(sock.recv_buffer_size()), granted(sock.send_buffer_size()));
    Ok((socket, recv, send))
}

/// No TLS session is resumed, and no ticket handed out: rustls resumes a session without
/// verifying the client certificate again, so the pairing check (a runner's current
/// serial, its validity, a node's certificate) would be skipped for a client that kept a
/// ticket. rustls's default would send two tickets per handshake and keep each session in
/// a cache: CPU and bytes spent on every runner's handshake for nothing.
pub(crate) fn resume_nothing(tls: &mut rustls::ServerConfig) {
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
}

/// Builds the endpoint's QUIC server config.
pub(crate) fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<PairingVerifier>,
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, SpawnError> {
    let provider = runnel_certs::tls::provider();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN_RUNNER.to_vec(), ALPN_ENROLL.to_vec(), ALPN_API.to_vec()];
    resume_nothing(&mut tls);
    runnel_certs::tls::keep_our_order(&mut tls);
    let crypto = QuicServerConfig::try_from(tls).map_err(|_| SpawnError::NoQuicCipherSuite)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(MAX_RUNNER_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(CONN_WINDOW.into())
        .send_window(SEND_WINDOW)
        .max_idle_timeout(Some(
            idle_timeout.try_into().map_err(|_| SpawnError::IdleTimeoutTooLarge(idle_timeout))?,
        ))
        // With GSO, quinn keeps a per-connection transmit buffer sized for a batch of up to
        // 10 datagrams (~13 KiB on every idle connection, heaptrack). Runner traffic is small
        // frames, so one datagram per send costs little and saves that memory.
        .enable_segmentation_offload(false)
        .mtu_discovery_config(Some(runnel_protocol::transport::mtu_discovery()))
        .ack_frequency_config(Some(runnel_protocol::transport::ack_frequency()));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// How long, at shutdown, connections still in their handshake, Hello or enrollment get to
/// finish before their tasks are aborted.
pub(crate) const INTAKE_STOP_WAIT: Duration = Duration::from_secs(2);

/// Accepts connections until `shutdown` fires. Each connection's intake (handshake, Hello
/// or enrollment) runs in a task this loop owns; at shutdown they get [`INTAKE_STOP_WAIT`]
/// and are then aborted.
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    tenants: Arc<Tenants>,
    shutdown: CancellationToken,
) {
    let mut intakes = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        while intakes.try_join_next().is_some() {}
        let (ip, validated) = (incoming.remote_address().ip(), incoming.remote_address_validated());
        let permit = match shared.intake.admit(ip, validated) {
            Admission::Admit(permit) => permit,
            // (A Retry is impossible only for a source that already came back with one,
            // and those are admitted above.)
            Admission::Retry => match incoming.retry() {
                Ok(()) => continue,
                Err(e) => {
                    e.into_incoming().refuse();
                    continue;
                }
            },
            Admission::Refuse => {
                incoming.refuse();
                continue;
            }
        };
        intakes.spawn(handle_incoming(incoming, permit, shared.clone(), tenants.clone()));
    }
    let _ = tokio::time::timeout(INTAKE_STOP_WAIT, async {
        while intakes.join_next().await.is_some() {}
    })
    .await;
}

/// The name of the TLS alert this broker sent when it refused a handshake, if it did.
fn refusal_alert(e: &quinn::ConnectionError) -> Option<&'static str> {
    let quinn::ConnectionError::TransportError(t) = e else { return None };
    let alert = u64::from(t.code).checked_sub(u64::from(quinn::TransportErrorCode::crypto(0)))?;
    let name = match u8::try_from(alert).ok().map(rustls::AlertDescription::from)? {
        rustls::AlertDescription::UnknownCA => "handshake refused: unknown_ca",
        rustls::AlertDescription::CertificateExpired => "handshake refused: certificate_expired",
        rustls::AlertDescription::CertificateRevoked => "handshake refused: certificate_revoked",
        rustls::AlertDescription::AccessDenied => "handshake refused: access_denied",
        rustls::AlertDescription::BadCertificate => "handshake refused: bad_certificate",
        rustls::AlertDescription::CertificateRequired => "handshake refused: certificate_required",
        _ => "handshake refused: other tls alert",
    };
    Some(name)
}

/// One connection's intake; `slot` (its [`IntakeLimits`] slot) is given back when it
/// ends: Welcome sent (the session then belongs to the tenant actor), enrollment answered,
/// a native API client's hello answered, or refused.
async fn handle_incoming(
    incoming: quinn::Incoming,
    slot: tokio::sync::OwnedSemaphorePermit,
    shared: Arc<Shared>,
    tenants: Arc<Tenants>,
) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "handshake failed");
            // Our own TLS alert means we refused the peer: counted per source host into
            // the cluster log (the verifier, which knows why, cannot see the address).
            if let Some(reason) = refusal_alert(&e) {
                shared.refusals.note(None, &remote.ip().to_string(), reason);
            }
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "handshake timed out");
            shared.refusals.note(None, &remote.ip().to_string(), "handshake timed out");
            return;
        }
    };
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol);
    match alpn.as_deref() {
        Some(p) if p == ALPN_ENROLL => crate::enroll::serve(conn, shared).await,
        Some(p) if p == ALPN_RUNNER => runner_intake(conn, remote, &shared, tenants).await,
        Some(p) if p == ALPN_API => crate::native::serve(conn, slot, shared, tenants).await,
        _ => conn.close(ErrorCode::Protocol.as_u32().into(), b"unknown ALPN"),
    }
}

/// The verified identity of a `runnel/1` peer (the verifier already accepted the cert),
/// and its certificate's public key: one parse for both.
fn peer_identity(conn: &quinn::Connection) -> Option<(RunnerIdentity, Vec<u8>)> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let cert = parse_cert(certs.first()?).ok()?;
    match cert.identity {
        Identity::Runner(r) => Some((r, cert.public_key)),
        Identity::Node(_) => None,
    }
}

fn refuse(conn: &quinn::Connection, code: ErrorCode, why: &str) {
    conn.close(code.as_u32().into(), why.as_bytes());
}

/// Sends one control message, gives it a moment to arrive, and closes the connection.
async fn say_and_close(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    msg: &ServerControl,
    code: ErrorCode,
    why: &str,
) {
    let _ = write_frame(send, msg).await;
    let _ = send.finish();
    // The runner closes once it has read the message; don't wait for ever.
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
    refuse(conn, code, why);
}

async fn runner_intake(
    conn: quinn::Connection,
    remote: SocketAddr,
    shared: &Shared,
    tenants: Arc<Tenants>,
) {
    let Some((identity, peer_key)) = peer_identity(&conn) else {
        // runnel/1 without a client certificate: nothing is read from it.
        return refuse(&conn, ErrorCode::Unauthenticated, "client certificate required");
    };
    let hello = async {
        let (mut send, mut recv) =
            conn.accept_bi().await.map_err(|e| (ErrorCode::Protocol, e.to_string()))?;
        let msg = read_frame::<ClientControl, _>(&mut recv)
            .await
            .map_err(|e| (e.code(), e.to_string()))?;
        let Some(ClientControl::Hello(hello)) = msg else {
            return Err((ErrorCode::Protocol, "expected Hello".to_string()));
        };
        let Some(v) = version::negotiate(hello.min_version, hello.max_version) else {
            let message = format!(
                "no common protocol version (runner {}..={}, broker {}..={})",
                hello.min_version,
                hello.max_version,
                version::MIN_PROTOCOL_VERSION,
                version::PROTOCOL_VERSION
            );
            let _ = write_frame(
                &mut send,
                &ServerControl::Error {
                    code: ErrorCode::UnsupportedVersion,
                    message: message.clone(),
                },
            )
            .await;
            let _ = send.finish();
            return Err((ErrorCode::UnsupportedVersion, message));
        };
        // No kinds is allowed (a runner started with `--no-exec` and no other handler is
        // present but serves nothing: jobs for it are refused at once as `no_runner`).
        if hello.capacity == 0 {
            return Err((ErrorCode::Protocol, "Hello needs capacity >= 1".into()));
        }
        Ok((hello, v, send, recv))
    };
    let (hello, version, send, recv) = match tokio::time::timeout(HELLO_TIMEOUT, hello).await {
        Ok(Ok(x)) => x,
        Ok(Err((code, why))) => {
            tracing::info!(%remote, runner = %identity.runner, error = %why, "runner refused before Welcome");
            // Give a version error frame a moment to leave before closing.
            if code == ErrorCode::UnsupportedVersion {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            return refuse(&conn, code, &why);
        }
        Err(_) => return refuse(&conn, ErrorCode::Timeout, "no Hello in time"),
    };
    // In a cluster, only the tenant's home serves its runners: others redirect there.
    let (epoch, send) = match shared.cluster.as_ref() {
        None => (0, send),
        Some(cluster) => match cluster.home_for_runner(&identity.tenant).await {
            Ok(Home::Here { epoch }) => (u64::try_from(epoch).unwrap_or(0), send),
            Ok(Home::There(node)) => {
                metrics::counter!(crate::metrics::names::CLUSTER_REDIRECTS).increment(1);
                tracing::debug!(%remote, runner = %identity.runner, home = %node.id, "redirecting runner to its tenant's home");
                let mut send = send;
                let msg = ServerControl::Redirect(Redirect { addr: node.quic });
                return say_and_close(&conn, &mut send, &msg, ErrorCode::Ok, "redirect").await;
            }
            Ok(Home::Nowhere(why)) => {
                let mut send = send;
                let msg = ServerControl::Error { code: ErrorCode::Unavailable, message: why };
                return say_and_close(&conn, &mut send, &msg, ErrorCode::Unavailable, "no home")
                    .await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "placement lookup failed");
                let mut send = send;
                let msg = ServerControl::Error {
                    code: ErrorCode::Unavailable,
                    message: "the broker cannot reach its store; reconnect later".into(),
                };
                return say_and_close(&conn, &mut send, &msg, ErrorCode::Unavailable, "store")
                    .await;
            }
        },
    };
    let tenant = match tenants.actor(&identity.tenant).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "no tenant actor");
            return refuse(&conn, ErrorCode::Internal, "broker busy");
        }
    };
    let attach = Attach {
        conn: conn.clone(),
        identity,
        peer_key,
        hello,
        version,
        control: (send, recv),
        epoch,
    };
    if tenant.cast(TenantMsg::Attach(Box::new(attach))).is_err() {
        refuse(&conn, ErrorCode::TenantRestart, "tenant restarting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctl(name: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// 200,000 IDs, as many as 40,000 runners hold with their spares, are all distinct. With
    /// quinn's default generator (24 random bits) about a thousand would collide.
    #[test]
    fn connection_ids_do_not_collide_at_fleet_scale() {
        use quinn::ConnectionIdGenerator;
        let mut ids = std::collections::HashSet::new();
        for _ in 0..200_000 {
            let id = RandomCids.generate_cid();
            assert_eq!(id.len(), CID_LEN);
            assert!(ids.insert(id.to_vec()), "a connection ID came twice: {id}");
        }
    }

    /// The socket gets the large buffers, up to what the kernel allows; with the default
    /// (~208 KiB) a 20k-runner broker drops packets.
    #[test]
    fn udp_socket_asks_for_large_buffers() {
        let (_s, recv, send) = udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let (rmax, wmax) = (sysctl("rmem_max"), sysctl("wmem_max"));
        assert!(rmax > 0 && wmax > 0, "no /proc/sys/net/core on this machine");
        assert!(recv >= SOCKET_BUFFER.min(rmax), "recv buffer {recv}, rmem_max {rmax}");
        assert!(send >= SOCKET_BUFFER.min(wmax), "send buffer {send}, wmem_max {wmax}");
    }
}
