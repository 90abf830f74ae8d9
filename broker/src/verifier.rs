//! The pairing verifier: runs inside the TLS handshake.
//!
//! rustls calls [`PairingVerifier::verify_client_cert`] synchronously while it processes the
//! client's certificate. It first checks the chain to the cluster CA (webpki, which also
//! checks validity and the client-auth key usage), then reads the identity from the URI SAN
//! and asks the [`RunnerIndex`] whether that runner is paired. A runner's current
//! certificate whose exact bytes this broker issued or already verified skips the chain's
//! signature check; its validity window and pairing are checked on every handshake.
//! Unknown, revoked, expired and foreign-CA peers get a TLS alert; not one application
//! byte of theirs is read.
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
    /// A genuine certificate of the runner, but not its current one (a renewal retired it).
    Retired,
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
            HandshakeRefusal::Retired => "retired",
        }
    }

    fn to_rustls(self) -> rustls::Error {
        let e = match self {
            HandshakeRefusal::Revoked => CertificateError::Revoked,
            HandshakeRefusal::Expired => CertificateError::Expired,
            HandshakeRefusal::ForeignCa => CertificateError::UnknownIssuer,
            // Retired is not final for the runner: it may hold the renewed cert on disk.
            HandshakeRefusal::Unknown | HandshakeRefusal::Malformed | HandshakeRefusal::Retired => {
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
    /// The identity the certificate claims.
    pub claimed: Option<RunnerIdentity>,
    /// Whether the claim is proven: the certificate was signed by the cluster CA (its
    /// chain verified, at least within its own validity window). Only a proven claim may
    /// reach that tenant's audit log; anything else is a stranger's words.
    pub proven: bool,
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
            runnel_certs::tls::provider(),
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
        let parsed = parse_cert(end_entity).ok();
        let claimed = || match parsed.as_ref().map(|p| &p.identity) {
            Some(Identity::Runner(r)) => Some(r.clone()),
            _ => None,
        };
        // Bytes this broker issued, or whose chain it has verified since it started, are
        // not checked against the CA again (a signature verification, a tenth of a
        // handshake's CPU): a SHA-256 match is as binding as the signature. What can have
        // changed since is checked every time: the validity window here, the pairing below.
        let digest = runnel_certs::digest(end_entity);
        let known = parsed.as_ref().filter(|p| match &p.identity {
            Identity::Runner(r) => {
                r.cluster == self.cluster && self.index.is_known_cert(&r.runner, &digest)
            }
            _ => false,
        });
        if let Some(p) = known {
            let t = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
            if t < p.not_before.unix_timestamp() || t > p.not_after.unix_timestamp() {
                return Err(self.deny(HandshakeRefusal::Expired, claimed(), true));
            }
        } else if let Err(e) = self.webpki.verify_client_cert(end_entity, intermediates, now) {
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
            // webpki reports expiry before it checks the issuer, so an expired claim is
            // proven only if the chain verifies at a moment inside the cert's own validity.
            let proven = reason == HandshakeRefusal::Expired
                && parsed.as_ref().is_some_and(|p| {
                    let inside = (p.not_before + time::Duration::seconds(1)).unix_timestamp();
                    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                        u64::try_from(inside).unwrap_or(0),
                    ));
                    self.webpki.verify_client_cert(end_entity, intermediates, at).is_ok()
                });
            // An unproven claim still helps an operator see who is knocking; it goes to the
            // cluster log, labelled as a claim.
            return Err(self.deny(reason, claimed(), proven));
        }
        let known = known.is_some();
        let (identity, serial) = match parsed {
            Some(p) => match p.identity {
                Identity::Runner(r) if r.cluster == self.cluster => (r, p.serial_hex),
                _ => return Err(self.deny(HandshakeRefusal::Malformed, None, false)),
            },
            None => return Err(self.deny(HandshakeRefusal::Malformed, None, false)),
        };
        match self.index.check_cert(&identity.runner, &identity.tenant, &identity.owner, &serial) {
            Ok(()) => {
                if !known {
                    self.index.remember_cert(&identity.runner, &serial, digest);
                }
                metrics::counter!(crate::metrics::names::HANDSHAKES, "result" => "ok").increment(1);
                Ok(identity)
            }
            Err(IndexRefusal::Revoked) => {
                Err(self.deny(HandshakeRefusal::Revoked, Some(identity), true))
            }
            Err(IndexRefusal::Retired) => {
                Err(self.deny(HandshakeRefusal::Retired, Some(identity), true))
            }
            Err(IndexRefusal::Unknown | IndexRefusal::Pending) => {
                Err(self.deny(HandshakeRefusal::Unknown, Some(identity), true))
            }
        }
    }

    fn deny(
        &self,
        reason: HandshakeRefusal,
        claimed: Option<RunnerIdentity>,
        proven: bool,
    ) -> HandshakeRefusal {
        metrics::counter!(crate::metrics::names::HANDSHAKES, "result" => reason.name())
            .increment(1);
        tracing::info!(reason = reason.name(), runner = ?claimed.as_ref().map(|c| &c.runner), "handshake refused");
        if let Some(tx) = &self.denials {
            // Never block the handshake: when the auditor lags, denials are dropped.
            let _ = tx.try_send(Denial { reason, claimed, proven });
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use runnel_certs::{ClusterCa, key};

    use super::*;
    use crate::records::{RunnerRecord, RunnerState};

    /// A verifier for CA `ca` whose index holds one paired runner, and that runner's
    /// current certificate (its serial in the record, as enrollment leaves it).
    fn paired(ca: &ClusterCa) -> (PairingVerifier, CertificateDer<'static>) {
        let index = Arc::new(RunnerIndex::new());
        let id = RunnerIdentity::new("runnel", "t", "o", "r1").expect("identity");
        let csr = key::csr_pem(&key::generate_key().expect("key")).expect("csr");
        let issued = ca.issue_runner_cert(&csr, &id, Duration::from_secs(3600)).expect("issue");
        index.apply(&RunnerRecord {
            id: "r1".into(),
            tenant: "t".into(),
            owner: "o".into(),
            name: "r1".into(),
            labels: BTreeMap::new(),
            state: RunnerState::Paired,
            created_at: 0,
            enrolled_at: None,
            revoked_at: None,
            cert_serial: Some(issued.serial_hex),
            cert_not_after: None,
            last_seen: None,
        });
        let v = PairingVerifier::new(ca.cert_der(), "runnel", index, None).expect("verifier");
        (v, issued.cert_der)
    }

    fn at(t: UnixTime, shift: i64) -> UnixTime {
        let secs = t.as_secs().checked_add_signed(shift).expect("in range");
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    #[test]
    fn a_certificate_whose_chain_was_verified_is_known_by_its_bytes() {
        let ca = ClusterCa::generate("runnel").expect("ca");
        let (v, cert) = paired(&ca);
        let digest = runnel_certs::digest(&cert);
        assert!(!v.index.is_known_cert("r1", &digest));
        let now = UnixTime::now();
        assert!(v.decide(&cert, &[], now).is_ok());
        assert!(v.index.is_known_cert("r1", &digest), "the verified bytes are remembered");
        assert!(v.decide(&cert, &[], now).is_ok(), "and pass again");
    }

    /// [`paired`], its runner's certificate accepted once (so known by its bytes), and the
    /// moment it was.
    fn known() -> (PairingVerifier, CertificateDer<'static>, UnixTime) {
        let (v, cert) = paired(&ClusterCa::generate("runnel").expect("ca"));
        let now = UnixTime::now();
        assert!(v.decide(&cert, &[], now).is_ok());
        (v, cert, now)
    }

    #[test]
    fn a_known_certificate_is_refused_outside_its_validity_window() {
        let (v, cert, now) = known();
        assert!(v.index.is_known_cert("r1", &runnel_certs::digest(&cert)));
        assert_eq!(v.decide(&cert, &[], at(now, 7200)).err(), Some(HandshakeRefusal::Expired));
        assert_eq!(v.decide(&cert, &[], at(now, -7200)).err(), Some(HandshakeRefusal::Expired));
        assert!(v.decide(&cert, &[], now).is_ok());
    }

    #[test]
    fn a_certificate_differing_from_a_known_one_only_in_its_signature_is_refused() {
        let (v, cert, now) = known();
        // Same identity, serial and window as the known certificate; the signature (the
        // DER's last bytes) no longer the CA's.
        let mut forged = cert.to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 0x01;
        let forged = CertificateDer::from(forged);
        assert_eq!(
            runnel_certs::parse_cert(&forged).expect("still parses").serial_hex,
            runnel_certs::parse_cert(&cert).expect("parses").serial_hex
        );
        assert_eq!(v.decide(&forged, &[], now).err(), Some(HandshakeRefusal::ForeignCa));
        assert!(v.decide(&cert, &[], now).is_ok());
    }
}
