//! The public-key cryptography one runner handshake costs the broker, measured in this
//! process with the broker's own provider (`runnel_certs::tls::provider`, rustls's ring)
//! on the same machine: the X25519 key exchange (the broker's key share and the shared
//! secret), the Ed25519 signature of its CertificateVerify, and the verification of the
//! runner's. No TLS 1.3 server can do less with these algorithms, so `connect` prints the
//! broker's CPU per handshake as a multiple of it: a figure that, unlike milliseconds, can
//! be compared across machines.

use std::time::Duration;

use anyhow::Context;
use nix::time::{ClockId, clock_gettime};
use rustls::SignatureScheme;
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::sign::Signer;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, SignatureVerificationAlgorithm};

/// Handshakes' worth of operations per timed batch.
const BATCH: u32 = 200;
/// Timed batches; the median is reported.
const BATCHES: usize = 7;

/// One handshake's public-key operations, with what they need made once.
struct Handshake {
    /// The group a runner's key share is for: the provider's first (X25519).
    kx: &'static dyn SupportedKxGroup,
    /// The runner's X25519 key share.
    peer_share: Vec<u8>,
    /// What both CertificateVerify signatures sign.
    msg: Vec<u8>,
    /// The broker's signer (its certificate's key is Ed25519).
    signer: Box<dyn Signer>,
    /// The runner's Ed25519 public key, its signature, and the verifier webpki picks.
    runner_key: Vec<u8>,
    runner_sig: Vec<u8>,
    verify: &'static dyn SignatureVerificationAlgorithm,
}

/// What a CertificateVerify signs: 64 spaces, the context string, a zero, the transcript
/// hash (RFC 8446 §4.4.3).
fn certificate_verify_message() -> Vec<u8> {
    let mut m = vec![b' '; 64];
    m.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
    m.extend_from_slice(&[0x5a; 32]);
    m
}

fn ed25519_signer(p: &CryptoProvider) -> anyhow::Result<(Box<dyn Signer>, Vec<u8>)> {
    let key = runnel_certs::key::generate_key().context("an Ed25519 key")?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = p
        .key_provider
        .load_private_key(der)
        .context("loading the key")?
        .choose_scheme(&[SignatureScheme::ED25519])
        .context("no Ed25519 signer")?;
    Ok((signer, key.public_key_raw().to_vec()))
}

impl Handshake {
    fn new() -> anyhow::Result<Self> {
        let provider = runnel_certs::tls::provider();
        let kx = *provider.kx_groups.first().context("no key exchange group")?;
        anyhow::ensure!(kx.name() == rustls::NamedGroup::X25519, "first group not X25519");
        let peer_share = kx.start().context("a runner key share")?.pub_key().to_vec();
        let msg = certificate_verify_message();
        let (signer, _) = ed25519_signer(&provider)?;
        let (runner, runner_key) = ed25519_signer(&provider)?;
        let runner_sig = runner.sign(&msg).context("runner sign")?;
        let verify = provider
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == SignatureScheme::ED25519)
            .and_then(|(_, algs)| algs.first().copied())
            .context("no Ed25519 verifier")?;
        Ok(Self { kx, peer_share, msg, signer, runner_key, runner_sig, verify })
    }

    /// The broker's share of one handshake's public-key work.
    fn once(&self) -> anyhow::Result<()> {
        self.kx.start_and_complete(&self.peer_share).context("key exchange")?;
        self.signer.sign(&self.msg).context("sign")?;
        self.verify
            .verify_signature(&self.runner_key, &self.msg, &self.runner_sig)
            .map_err(|_| anyhow::anyhow!("the runner's signature did not verify"))
    }
}

/// This thread's CPU time: the broker's handshakes are measured in CPU time too, so time
/// this thread spent off its core (other threads, the VM) is not counted either.
fn thread_cpu() -> anyhow::Result<Duration> {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).context("thread CPU clock")?;
    Ok(Duration::from(t))
}

/// The median CPU time of one handshake's public-key operations over a few short batches
/// (about 0.2 s in all on a 2-core VM).
pub(crate) fn per_handshake() -> anyhow::Result<Duration> {
    let hs = Handshake::new()?;
    hs.once()?; // warm
    let mut batches = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let t = thread_cpu()?;
        for _ in 0..BATCH {
            hs.once()?;
        }
        batches.push((thread_cpu()?.saturating_sub(t) / BATCH).as_secs_f64());
    }
    let secs = crate::report::median(&mut batches).context("no batch timed")?;
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handshakes_operations_run_and_take_time() {
        let hs = Handshake::new().expect("setup");
        hs.once().expect("one handshake's operations");
        let d = per_handshake().expect("measured");
        assert!(d > Duration::from_micros(1) && d < Duration::from_millis(50), "{d:?}");
    }

    #[test]
    fn a_changed_signature_does_not_verify() {
        let mut hs = Handshake::new().expect("setup");
        hs.runner_sig[10] ^= 1;
        assert!(hs.once().is_err(), "a changed signature verified: the floor verifies nothing");
    }
}
