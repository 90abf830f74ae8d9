//! The one rustls crypto provider every runnel endpoint uses (broker, runner, client,
//! peers), and the cipher-suite order a runnel server keeps.
//!
//! rustls's ring provider lists `TLS13_AES_256_GCM_SHA384` first, and a rustls server takes
//! the client's order, so every connection ran AES-256-GCM with SHA-384. SHA-384 is
//! SHA-512's compression function, which x86-64 does not accelerate, while SHA-256 has
//! the SHA extensions: HKDF-SHA384 (the TLS key schedule and QUIC's packet keys) was ~10%
//! of the broker's CPU per runner handshake. AES-128-GCM is TLS 1.3's mandatory suite and
//! what Go's TLS (NATS, Teleport) picks on hardware with AES instructions; its packet
//! protection is cheaper too. The other two suites stay accepted, after it.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::cipher_suite;

/// rustls's ring provider with the TLS 1.3 suites in runnel's order: AES-128-GCM-SHA256,
/// then AES-256-GCM-SHA384, then ChaCha20-Poly1305-SHA256 (every endpoint is TLS 1.3
/// only, so no TLS 1.2 suite is listed).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A server built on [`provider`] picks the suite by its own order, not the client's: a
/// runner or client built before this order (or any rustls client, AES-256 first) gets
/// AES-128-GCM too.
pub fn keep_our_order(server: &mut rustls::ServerConfig) {
    server.ignore_client_order = true;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClusterCa;
    use rustls::{ClientConnection, ServerConnection};

    /// A TLS 1.3 handshake in memory between a server on [`provider`] with
    /// [`keep_our_order`] and a client on `client_provider`: the suite they agree on.
    fn negotiated(client_provider: Arc<CryptoProvider>) -> rustls::CipherSuite {
        let ca = ClusterCa::generate("suites").expect("CA");
        let (cert, key) = ca.issue_server_cert(&["broker.test".into()], &[]).expect("server cert");
        let key = crate::pem::private_key_from_pem(&key).expect("key");
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert_der.clone(), ca.cert_der().clone()], key)
            .expect("server config");
        keep_our_order(&mut server);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(client_provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = "broker.test".try_into().expect("name");
        let mut c = ClientConnection::new(Arc::new(client), name).expect("client");
        let mut s = ServerConnection::new(Arc::new(server)).expect("server");
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).expect("client writes");
            s.read_tls(&mut buf.as_slice()).expect("server reads");
            s.process_new_packets().expect("server accepts");
            let mut buf = Vec::new();
            s.write_tls(&mut buf).expect("server writes");
            c.read_tls(&mut buf.as_slice()).expect("client reads");
            c.process_new_packets().expect("client accepts");
            if !c.is_handshaking() && !s.is_handshaking() {
                break;
            }
        }
        assert!(!s.is_handshaking(), "the handshake finished");
        let suite = s.negotiated_cipher_suite().expect("a suite").suite();
        assert_eq!(c.negotiated_cipher_suite().map(|x| x.suite()), Some(suite));
        suite
    }

    #[test]
    fn a_runnel_server_picks_aes_128_gcm_whatever_order_the_client_prefers() {
        // Ours, and rustls's default, which lists AES-256-GCM-SHA384 first.
        for client in [provider(), Arc::new(rustls::crypto::ring::default_provider())] {
            assert_eq!(negotiated(client), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        }
        // A client that offers only AES-256 still gets in.
        let only_256 = CryptoProvider {
            cipher_suites: vec![cipher_suite::TLS13_AES_256_GCM_SHA384],
            ..rustls::crypto::ring::default_provider()
        };
        assert_eq!(negotiated(Arc::new(only_256)), rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    }
}
