//! The targets. Each takes arbitrary bytes and checks properties beyond "does not panic":
//! a decoded message re-encodes to bytes that decode to the same encoding, a decoder never
//! claims more bytes than it was given, a CSR cannot choose the names in its certificate,
//! and a bad API body is a 400, never a 5xx.

use std::time::Duration;

use runnel_protocol::{
    ApiRequest, BrokerJobFrame, ClientControl, EnrollRequest, EnrollResponse, ExecSpec, LaneAnswer,
    LaneCall, LaneFrame, PeerRequest, PeerResponse, RunnerJobFrame, ServerControl, decode, encode,
    read_frame,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A fuzz target: a name and a function over one input that panics on a broken property.
#[derive(Clone, Copy)]
pub struct Target {
    /// Its name on the command line and in `corpus/` and `crashes/`.
    pub name: &'static str,
    /// Runs one input.
    pub run: fn(&Ctx, &[u8]) -> Outcome,
}

/// Whether an input was accepted (kept as a seed for later mutations: deeper inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Decoded / parsed and checked.
    Accepted,
    /// Refused cleanly.
    Refused,
}

/// State the targets share, made on first use (afl-fuzz starts a process per input, so
/// a target that does not need one must not pay for it): a CA for CSRs, a runtime for the
/// async frame reader.
#[derive(Default)]
pub struct Ctx {
    ca: std::sync::OnceLock<runnel_certs::ClusterCa>,
    rt: std::sync::OnceLock<tokio::runtime::Runtime>,
}

impl Ctx {
    /// A fresh context.
    pub fn new() -> Self {
        Self::default()
    }

    fn ca(&self) -> &runnel_certs::ClusterCa {
        self.ca.get_or_init(|| runnel_certs::ClusterCa::generate("fuzz").expect("a CA"))
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread().build().expect("a runtime")
        })
    }
}

/// Every target.
pub const ALL: &[Target] = &[
    Target { name: "frame", run: frame },
    Target { name: "control", run: control },
    Target { name: "job", run: job },
    Target { name: "enroll", run: enroll },
    Target { name: "csr", run: csr },
    Target { name: "api_json", run: api_json },
];

/// Decodes `buf` as a frame of `T`; on success the re-encoded message decodes again to
/// the same bytes.
fn roundtrip<T: Serialize + DeserializeOwned>(buf: &[u8]) -> Outcome {
    match decode::<T>(buf) {
        Ok((msg, used)) => {
            assert!(used <= buf.len(), "decode claimed {used} of {} bytes", buf.len());
            let again = encode(&msg).expect("a decoded message encodes");
            let (msg2, used2) = decode::<T>(&again).expect("a re-encoded message decodes");
            assert_eq!(used2, again.len());
            assert_eq!(encode(&msg2).expect("encodes"), again, "round trip changed the bytes");
            Outcome::Accepted
        }
        Err(_) => Outcome::Refused,
    }
}

/// `bytes` as the body of a well-formed frame (a correct length prefix), so that the
/// message decoder, not the prefix check, sees the mutation.
fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes().to_vec();
    f.extend_from_slice(bytes);
    f
}

fn either(a: Outcome, b: Outcome) -> Outcome {
    if a == Outcome::Accepted || b == Outcome::Accepted {
        Outcome::Accepted
    } else {
        Outcome::Refused
    }
}

/// The frame decoder on raw bytes (prefix included), both the slice decoder and the
/// stream reader, which must agree.
fn frame(ctx: &Ctx, bytes: &[u8]) -> Outcome {
    let sliced = roundtrip::<ClientControl>(bytes);
    let mut reader = bytes;
    let streamed = ctx.rt().block_on(read_frame::<ClientControl, _>(&mut reader));
    let decoded = decode::<ClientControl>(bytes).ok().map(|(m, _)| m);
    match (streamed, decoded) {
        (Ok(Some(a)), Some(b)) => {
            assert_eq!(encode(&a).ok(), encode(&b).ok(), "stream and slice decoders disagree")
        }
        (Ok(Some(_)), None) => panic!("the stream reader accepted what the slice decoder refused"),
        _ => {}
    }
    sliced
}

/// Control messages in both directions.
fn control(_: &Ctx, bytes: &[u8]) -> Outcome {
    let f = framed(bytes);
    either(roundtrip::<ClientControl>(&f), roundtrip::<ServerControl>(&f))
}

/// Job frames both ways (on a stream per job, or on a job lane), the exec payload a runner
/// decodes, the peer calls and the native API's calls (on a stream of their own or on a
/// lane).
fn job(_: &Ctx, bytes: &[u8]) -> Outcome {
    let f = framed(bytes);
    let a = either(roundtrip::<BrokerJobFrame>(&f), roundtrip::<RunnerJobFrame>(&f));
    let lane = either(
        roundtrip::<LaneFrame<BrokerJobFrame>>(&f),
        roundtrip::<LaneFrame<RunnerJobFrame>>(&f),
    );
    let a = either(a, lane);
    let b = either(roundtrip::<PeerRequest>(&f), roundtrip::<PeerResponse>(&f));
    let api = either(roundtrip::<ApiRequest>(&f), roundtrip::<LaneCall>(&f));
    let api = either(api, roundtrip::<LaneCall<PeerRequest>>(&f));
    let b = either(b, either(api, roundtrip::<LaneAnswer>(&f)));
    let exec = match postcard::from_bytes::<ExecSpec>(bytes) {
        Ok(spec) => {
            let again = postcard::to_allocvec(&spec).expect("encodes");
            let spec2: ExecSpec = postcard::from_bytes(&again).expect("decodes");
            assert_eq!(postcard::to_allocvec(&spec2).expect("encodes"), again);
            Outcome::Accepted
        }
        Err(_) => Outcome::Refused,
    };
    either(either(a, b), exec)
}

/// The enrollment request and answer.
fn enroll(_: &Ctx, bytes: &[u8]) -> Outcome {
    let f = framed(bytes);
    either(roundtrip::<EnrollRequest>(&f), roundtrip::<EnrollResponse>(&f))
}

/// A CSR as the broker handles one: its public key, then a certificate for an identity
/// the broker chooses. Whatever the CSR asks for, the certificate names that identity.
fn csr(ctx: &Ctx, bytes: &[u8]) -> Outcome {
    // Half the inputs are PEM text, half DER wrapped in PEM here.
    let pem = if bytes.first() == Some(&b'-') {
        String::from_utf8_lossy(bytes).into_owned()
    } else {
        pem_wrap(bytes)
    };
    if runnel_certs::csr_public_key(&pem).is_err() {
        return Outcome::Refused;
    }
    let identity = runnel_certs::RunnerIdentity {
        cluster: "fuzz".into(),
        tenant: "t".into(),
        owner: "o".into(),
        runner: "r-0".into(),
    };
    match ctx.ca().issue_runner_cert(&pem, &identity, Duration::from_secs(3600)) {
        Ok(cert) => {
            let parsed = runnel_certs::parse_cert(&cert.cert_der).expect("our own cert parses");
            assert_eq!(
                parsed.identity,
                runnel_certs::Identity::Runner(identity),
                "the CSR chose the identity"
            );
            Outcome::Accepted
        }
        Err(_) => Outcome::Refused,
    }
}

/// DER bytes as a PEM CSR (standard base64, 64 columns).
pub fn pem_wrap(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE REQUEST-----\n");
    out
}

/// Every API body; a refusal must be what the API answers as 400.
fn api_json(_: &Ctx, bytes: &[u8]) -> Outcome {
    use runnel_broker::bench_internals::{Body, check_body};
    let mut outcome = Outcome::Refused;
    for body in Body::ALL {
        match check_body(body, bytes) {
            Ok(()) => outcome = Outcome::Accepted,
            Err(e) => {
                let status = e.split_once(' ').map(|(s, _)| s).filter(|s| s.len() == 3);
                if let Some(s) = status.filter(|s| s.bytes().all(|b| b.is_ascii_digit())) {
                    assert_eq!(s, "400", "{body:?}: a bad body answered {e}");
                }
            }
        }
    }
    outcome
}
