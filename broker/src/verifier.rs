//! The pairing verifier: runs inside the TLS handshake.
//!
//! rustls calls [`PairingVerifier::verify_client_cert`] synchronously while it processes the
//! client's certificate. It first checks the chain to the cluster CA (webpki, which also
//! checks validity and the client-auth key usage), then reads the identity from the URI SAN
//! and asks the [`RunnerIndex`] whether that runner is paired. Unknown, revoked, expired and
//! foreign-CA peers get a TLS alert; not one application byte of theirs is read.
//!
//! Client certificates are *optional* at the TLS layer because enrollment connections
//! (`runnel-enroll/1`) have none; a `runnel/1` connection without one is closed right after
//! the handshake, before any stream is accepted.
#![cfg_attr(not(feature = "bench-internals"), allow(unreachable_pub))] // `pub` items: see lib.rs `bench_internals`

use std::sync::Arc;

use runnel_certs::{Identity, RunnerIdentity, parse_cert};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::mpsc;

use crate::index::{IndexRefusal, RunnerIndex};

/// Why a handshake was refused (also the `result` label of handshake metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeRefusal {
    /// The runner is not in the index (or names another tenant/owner than its record).
    Unknown,
    /// The runner was revoked.
    Revoked,
    /// The certificate has expired or is not yet valid.
    Expired,
    /// The certificate does not chain to the cluster CA.
    ForeignCa,
    /// The certificate chains but carries no usable runner identity, or is otherwise bad.
    Malformed,
}

impl HandshakeRefusal {
    /// Short lowercase name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            HandshakeRefusal::Unknown => "unknown",
            HandshakeRefusal::Revoked => "revoked",
            HandshakeRefusal::Expired => "expired",
            HandshakeRefusal::ForeignCa => "foreign_ca",
            HandshakeRefusal::Malformed => "malformed",
        }
    }

    fn to_rustls(self) -> rustls::Error {
        let e = match self {
            HandshakeRefusal::Revoked => CertificateError::Revoked,
            HandshakeRefusal::Expired => CertificateError::Expired,
            HandshakeRefusal::ForeignCa => CertificateError::UnknownIssuer,
            HandshakeRefusal::Unknown | HandshakeRefusal::Malformed => {
                CertificateError::ApplicationVerificationFailure
            }
        };
        rustls::Error::InvalidCertificate(e)
    }
}

/// A refused handshake whose identity we could read, for the audit log.
#[derive(Debug, Clone)]
pub struct Denial {
    /// Which check refused it (also the `result` label of the handshake metric).
    pub reason: HandshakeRefusal,
    /// The identity the certificate claims (verified only when the chain was ours).
    pub claimed: Option<RunnerIdentity>,
}

/// The verifier.
#[derive(Debug)]
pub struct PairingVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    cluster: String,
    index: Arc<RunnerIndex>,
    denials: Option<mpsc::Sender<Denial>>,
}

impl PairingVerifier {
    /// Builds a verifier trusting only `ca` for client certificates.
    pub fn new(
        ca: &CertificateDer<'static>,
        cluster: &str,
        index: Arc<RunnerIndex>,
        denials: Option<mpsc::Sender<Denial>>,
    ) -> Result<Self, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone())?;
        let webpki = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(Self { webpki, cluster: cluster.into(), index, denials })
    }

    /// The whole decision, as a plain function (tests and benchmarks call it directly).
    pub fn decide(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<RunnerIdentity, HandshakeRefusal> {
        let claimed = || match parse_cert(end_entity).map(|p| p.identity) {
            Ok(Identity::Runner(r)) => Some(r),
            _ => None,
        };
        if let Err(e) = self.webpki.verify_client_cert(end_entity, intermediates, now) {
            let reason = match e {
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. },
                ) => HandshakeRefusal::Expired,
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                ) => HandshakeRefusal::ForeignCa,
                _ => HandshakeRefusal::Malformed,
            };
            // A foreign cert's claims are not trustworthy, but they help an operator see
            // who is knocking; they are labelled as claims in the audit log.
            return Err(self.deny(reason, claimed()));
        }
        let identity = match parse_cert(end_entity).map(|p| p.identity) {
            Ok(Identity::Runner(r)) if r.cluster == self.cluster => r,
            _ => return Err(self.deny(HandshakeRefusal::Malformed, None)),
        };
        match self.index.check(&identity.runner, &identity.tenant, &identity.owner) {
            Ok(()) => {
                metrics::counter!(crate::metrics::names::HANDSHAKES, "result" => "ok").increment(1);
                Ok(identity)
            }
            Err(IndexRefusal::Revoked) => Err(self.deny(HandshakeRefusal::Revoked, Some(identity))),
            Err(IndexRefusal::Unknown | IndexRefusal::Pending) => {
                Err(self.deny(HandshakeRefusal::Unknown, Some(identity)))
            }
        }
    }

    fn deny(&self, reason: HandshakeRefusal, claimed: Option<RunnerIdentity>) -> HandshakeRefusal {
        metrics::counter!(crate::metrics::names::HANDSHAKES, "result" => reason.name())
            .increment(1);
        tracing::info!(reason = reason.name(), runner = ?claimed.as_ref().map(|c| &c.runner), "handshake refused");
        if let Some(tx) = &self.denials {
            // Never block the handshake: when the auditor lags, denials are dropped.
            let _ = tx.try_send(Denial { reason, claimed });
        }
        reason
    }
}

impl ClientCertVerifier for PairingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.decide(end_entity, intermediates, now)
            .map(|_| ClientCertVerified::assertion())
            .map_err(HandshakeRefusal::to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
