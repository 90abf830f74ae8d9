//! TLS on the API (`--http-tls`): the server config for `auto` (the broker's own server
//! certificate, issued by the cluster CA at start, so that clients pin the CA fingerprint
//! as runners do) or for the operator's PEM files. TLS 1.3 only, ring only, HTTP/1.1.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::broker::SpawnError;
use crate::config::HttpTls;

fn read(what: &str, path: &Path) -> Result<String, SpawnError> {
    std::fs::read_to_string(path)
        .map_err(|e| SpawnError::HttpTls(format!("reading {what} {}: {e}", path.display())))
}

/// The acceptor `mode` asks for (None: plain HTTP); `auto` is the chain and key `auto`
/// serves.
pub(crate) fn acceptor(
    mode: &HttpTls,
    auto: (&[CertificateDer<'static>], &PrivateKeyDer<'static>),
) -> Result<Option<TlsAcceptor>, SpawnError> {
    let (chain, key) = match mode {
        HttpTls::Off => return Ok(None),
        HttpTls::Auto => (auto.0.to_vec(), auto.1.clone_key()),
        HttpTls::Files { cert, key } => {
            let chain = runnel_certs::pem::certs_from_pem(&read("--http-tls-cert", cert)?)
                .map_err(|e| SpawnError::HttpTls(format!("{}: {e}", cert.display())))?;
            if chain.is_empty() {
                return Err(SpawnError::HttpTls(format!(
                    "{}: no certificate in it",
                    cert.display()
                )));
            }
            let pk = runnel_certs::pem::private_key_from_pem(&read("--http-tls-key", key)?)
                .map_err(|e| SpawnError::HttpTls(format!("{}: {e}", key.display())))?;
            (chain, pk)
        }
    };
    let provider = runnel_certs::tls::provider();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| SpawnError::HttpTls(format!("certificate and key: {e}")))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    runnel_certs::tls::keep_our_order(&mut tls);
    Ok(Some(TlsAcceptor::from(Arc::new(tls))))
}
