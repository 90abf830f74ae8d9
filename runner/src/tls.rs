//! Client TLS configurations.
//!
//! - Enrollment: the runner has no CA yet, only the fingerprint from the enroll command
//!   (as `kubeadm join` does). The broker sends `[leaf, CA]`; the CA whose SHA-256 matches
//!   the pin becomes the only root, and the leaf is verified against it as usual
//!   (signature, validity, server name).
//! - Runner: mutual TLS with the runner's certificate, the pinned CA as the only root.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::RunnerError;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: impl Into<crate::BoxError>) -> RunnerError {
    RunnerError::tls(e)
}

/// Verifies the broker against the CA it presents, if that CA matches the pin.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| ring::digest::digest(&ring::digest::SHA256, c).as_ref() == self.pin)
            .ok_or_else(|| {
                rustls::Error::General("broker CA does not match --ca-fingerprint".into())
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
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
        .max_concurrent_uni_streams(0u32.into());
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Config for `runnel-enroll/1`, pinned to a CA fingerprint.
pub fn enroll_config(pin: [u8; 32]) -> Result<quinn::ClientConfig, RunnerError> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier { pin, provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![runnel_protocol::ALPN_ENROLL.to_vec()];
    quic(tls, None, 0)
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
