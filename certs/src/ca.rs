//! The cluster CA: one ed25519 key that signs the broker's server certificate and every
//! runner certificate. Its SHA-256 fingerprint is what `runnel-runner enroll` pins.

use std::net::IpAddr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519, SanType,
    SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::{CertError, RunnerIdentity, key::key_from_pem};

/// How far back `not_before` is set, to tolerate small clock differences between hosts.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Default lifetime of a runner certificate.
pub const DEFAULT_RUNNER_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// The DNS name in every node certificate, which `runnel-peer/1` clients verify (the node's
/// own identity is its URI SAN, checked after the handshake).
pub const PEER_SERVER_NAME: &str = "peer.runnel.internal";
/// Lifetime of the broker's server certificate.
pub(crate) const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Lifetime of the cluster CA.
pub(crate) const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start (already moved back by [`CLOCK_SKEW`]).
    pub not_before: OffsetDateTime,
    /// End.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From now for `lifetime`.
    pub fn from_now(lifetime: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self { not_before: now - CLOCK_SKEW, not_after: now + lifetime }
    }
}

/// A freshly issued certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// Its serial, hex.
    pub serial_hex: String,
    /// Its validity.
    pub validity: Validity,
}

/// The cluster CA.
pub struct ClusterCa {
    cluster: String,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").field("cluster", &self.cluster).finish_non_exhaustive()
    }
}

/// The public key a CSR asks to be certified (for ed25519, its 32 raw bytes), after
/// checking the CSR's own signature; compare it with [`crate::ParsedCert::public_key`].
pub fn csr_public_key(csr_pem: &str) -> Result<Vec<u8>, CertError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CertError::Malformed(format!("CSR: {e}")))?;
    Ok(rcgen::PublicKeyData::der_bytes(&csr.public_key).to_vec())
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // keep the INTEGER positive
    bytes[0] |= 0x01; // and 16 bytes long
    SerialNumber::from_slice(&bytes)
}

impl ClusterCa {
    /// Creates a new CA for `cluster`.
    pub fn generate(cluster: &str) -> Result<Self, CertError> {
        crate::identity::validate_segment("cluster", cluster)?;
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("runnel cluster CA {cluster}"));
        dn.push(DnType::OrganizationName, "runnel");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let validity = Validity::from_now(CA_VALIDITY);
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cluster: cluster.into(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
        })
    }

    /// Loads a CA from its certificate and key PEM.
    pub fn from_pem(cluster: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = key_from_pem(key_pem)?;
        let cert_der = crate::pem::certs_from_pem(cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| CertError::Malformed("empty CA PEM".into()))?;
        // Fail now, not at first issuance, if the pair does not go together.
        Issuer::from_ca_cert_der(&cert_der, &key)?;
        Ok(Self { cluster: cluster.into(), cert_pem: cert_pem.into(), cert_der, key })
    }

    /// The cluster name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA private key, PEM (to be written 0600).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// `sha256:<hex>` of the CA certificate.
    pub fn fingerprint(&self) -> String {
        crate::fingerprint(&self.cert_der)
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, CertError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    /// Issues the broker's TLS server certificate (new key) for the given names.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
    ) -> Result<(IssuedCert, String), CertError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("runnel broker {}", self.cluster));
        params.distinguished_name = dn;
        for name in dns_names {
            let ia5 = name
                .clone()
                .try_into()
                .map_err(|_| CertError::Identity(format!("bad DNS name {name:?}")))?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params.subject_alt_names.extend(ips.iter().copied().map(SanType::IpAddress));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued = self.sign(params, &key, Validity::from_now(SERVER_VALIDITY))?;
        Ok((issued, key.serialize_pem()))
    }

    /// Issues a node certificate (new key) for `node`: URI SAN `spiffe://<cluster>/node/<id>`
    /// and the DNS name [`PEER_SERVER_NAME`] every node certificate shares, usable as
    /// server and as client of `runnel-peer/1`. Each side checks the URI identity after
    /// the handshake.
    pub fn issue_node_cert(&self, node: &str) -> Result<(IssuedCert, String), CertError> {
        crate::identity::validate_segment("node", node)?;
        let identity =
            crate::identity::NodeIdentity { cluster: self.cluster.clone(), node: node.into() };
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("runnel node {node}"));
        params.distinguished_name = dn;
        let uri = identity
            .uri()
            .try_into()
            .map_err(|_| CertError::Identity("identity URI is not ASCII".into()))?;
        let dns = PEER_SERVER_NAME
            .to_owned()
            .try_into()
            .map_err(|_| CertError::Identity("bad peer server name".into()))?;
        params.subject_alt_names = vec![SanType::URI(uri), SanType::DnsName(dns)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let issued = self.sign(params, &key, Validity::from_now(SERVER_VALIDITY))?;
        Ok((issued, key.serialize_pem()))
    }

    /// Issues a runner certificate for the key in `csr_pem`.
    ///
    /// Everything the CSR asks for except its public key is ignored: the subject, SANs and
    /// extensions come from `identity` alone. The CSR must be self-consistent (rcgen checks
    /// its signature) and use an ed25519 key.
    pub fn issue_runner_cert(
        &self,
        csr_pem: &str,
        identity: &RunnerIdentity,
        lifetime: Duration,
    ) -> Result<IssuedCert, CertError> {
        self.issue_runner_cert_valid(csr_pem, identity, Validity::from_now(lifetime))
    }

    /// [`Self::issue_runner_cert`] with an explicit validity window (a window wholly in the
    /// past gives an expired certificate, which tests of the handshake need without
    /// waiting on the clock).
    pub fn issue_runner_cert_valid(
        &self,
        csr_pem: &str,
        identity: &RunnerIdentity,
        validity: Validity,
    ) -> Result<IssuedCert, CertError> {
        if identity.cluster != self.cluster {
            return Err(CertError::Identity("identity names another cluster".into()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CertError::Malformed(format!("CSR: {e}")))?;
        if csr.public_key.algorithm() != &PKCS_ED25519 {
            return Err(CertError::KeyAlgorithm);
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.runner.clone());
        params.distinguished_name = dn;
        let uri = identity
            .uri()
            .try_into()
            .map_err(|_| CertError::Identity("identity URI is not ASCII".into()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, &csr.public_key, validity)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        validity: Validity,
    ) -> Result<IssuedCert, CertError> {
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer()?)?;
        Ok(IssuedCert { cert_pem: cert.pem(), cert_der: cert.der().clone(), serial_hex, validity })
    }
}
