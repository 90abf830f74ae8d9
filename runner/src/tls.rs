//! Client TLS configurations.
//!
//! - Enrollment: the runner has no CA yet, only the fingerprint from the enroll command
//!   (as `kubeadm join` does): [`runnel_certs::pin`] trusts the CA the broker sends if it
//!   matches.
//! - Runner: mutual TLS with the runner's certificate, the pinned CA as the only root.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::RunnerError;

fn provider() -> Arc<CryptoProvider> {
    runnel_certs::tls::provider()
}

fn tls_err(e: impl Into<crate::BoxError>) -> RunnerError {
    RunnerError::tls(e)
}

fn quic(
    tls: rustls::ClientConfig,
    keep_alive: Option<Duration>,
    max_streams: u32,
) -> Result<quinn::ClientConfig, RunnerError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(keep_alive)
        .max_concurrent_bidi_streams(max_streams.into())
        .max_concurrent_uni_streams(0u32.into())
        .mtu_discovery_config(Some(runnel_protocol::transport::mtu_discovery()))
        .ack_frequency_config(Some(runnel_protocol::transport::ack_frequency()));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Config for `runnel-enroll/1`, pinned to a CA fingerprint.
pub fn enroll_config(pin: [u8; 32]) -> Result<quinn::ClientConfig, RunnerError> {
    let mut tls = runnel_certs::pin::client_config(pin).map_err(tls_err)?;
    tls.alpn_protocols = vec![runnel_protocol::ALPN_ENROLL.to_vec()];
    quic(tls, None, 0)
}

/// The fewest job streams a runner lets the broker have open at once.
pub const MIN_JOB_STREAMS: u32 = 256;

/// How many job streams a runner of `capacity` lets the broker have open at once: room
/// for its jobs and for those it refuses or is still closing, and never fewer than
/// [`MIN_JOB_STREAMS`]. quinn grants new streams once an eighth of this many have closed,
/// each grant a datagram of its own; at twice the capacity plus 8 (40 for 16) that was one
/// datagram per 6 jobs (BENCHMARKS.md, 2026-12-05 later). quinn keeps two map entries per
/// allowed stream on the runner's one connection (about 10 KiB at 256), and nothing on the
/// broker's side.
pub fn job_streams(capacity: u32) -> u32 {
    capacity.saturating_mul(2).saturating_add(8).max(MIN_JOB_STREAMS)
}

/// Config for `runnel/1`: mTLS with the runner's certificate.
pub fn runner_config(
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    keep_alive: Duration,
    max_streams: u32,
) -> Result<quinn::ClientConfig, RunnerError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(tls_err)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![runnel_protocol::ALPN_RUNNER.to_vec()];
    quic(tls, Some(keep_alive), max_streams)
}

/// Resolves `host:port`, returning the address and the TLS server name.
/// The addresses in a broker address: one `host:port`, or several separated by commas (the
/// nodes of a cluster without a shared address), tried in turn.
pub fn broker_addrs(broker: &str) -> Vec<&str> {
    broker.split(',').map(str::trim).filter(|a| !a.is_empty()).collect()
}

/// Resolves one `host:port`; answers the address and the TLS server name.
pub async fn resolve(broker: &str) -> Result<(std::net::SocketAddr, String), RunnerError> {
    let bad = |m: &str| RunnerError::Address(broker.to_owned(), m.to_owned());
    let (host, _) = broker.rsplit_once(':').ok_or_else(|| bad("expected host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let addr = tokio::net::lookup_host(broker)
        .await
        .map_err(|e| bad(&e.to_string()))?
        .next()
        .ok_or_else(|| bad("does not resolve"))?;
    Ok((addr, host))
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn client_endpoint(target: std::net::SocketAddr) -> Result<quinn::Endpoint, RunnerError> {
    let bind: std::net::SocketAddr = if target.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(RunnerError::connection)?;
    quinn::Endpoint::client(bind).map_err(RunnerError::connection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_streams_leave_room_past_capacity_and_never_go_below_the_floor() {
        assert_eq!(job_streams(0), MIN_JOB_STREAMS);
        assert_eq!(job_streams(16), MIN_JOB_STREAMS);
        assert_eq!(job_streams(1000), 2008);
        assert_eq!(job_streams(u32::MAX), u32::MAX);
    }
}
