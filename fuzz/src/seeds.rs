//! Built-in seeds: one valid input of each shape per target (the fuzzer mutates from
//! these and from the files in `corpus/<target>/`).

use std::collections::BTreeMap;

use runnel_protocol::{
    BrokerJobFrame, ClientControl, EnrollRequest, EnrollResponse, ErrorCode, ExecSpec, GoAway,
    Heartbeat, Hello, JobOutcome, JobRequest, JobResult, LaneCall, LaneFrame, OutputStream,
    PeerCaller, PeerRequest, Redirect, RunnerJobFrame, ServerControl, encode,
};

/// A frame's body: the encoding without its 4-byte length prefix.
fn body<T: serde::Serialize>(m: &T) -> Vec<u8> {
    encode(m).expect("seeds encode").split_off(4)
}

fn hello() -> ClientControl {
    ClientControl::Hello(Hello {
        min_version: 2,
        max_version: 2,
        runner_version: "fuzz".into(),
        labels: BTreeMap::from([("os".into(), "linux".into())]),
        capacity: 4,
        kinds: vec!["exec".into(), "echo".into()],
    })
}

/// Standard base64 decoding of a PEM body (the seeds' own CSR: trusted input).
fn pem_der(pem: &str) -> Vec<u8> {
    let text: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(val).collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &v)| acc | (u32::from(v) << (18 - 6 * i)));
        let take = chunk.len().saturating_sub(1);
        out.extend_from_slice(&n.to_be_bytes()[1..=take]);
    }
    out
}

/// The seeds of target `name`.
pub fn of(name: &str) -> Vec<Vec<u8>> {
    match name {
        "frame" => vec![
            encode(&hello()).expect("encodes"),
            encode(&ClientControl::Heartbeat(Heartbeat { in_flight: 3, load_milli: 750 }))
                .expect("encodes"),
            encode(&ClientControl::RenewCert { csr_pem: "-----BEGIN".into() }).expect("encodes"),
            encode(&ClientControl::Draining).expect("encodes"),
        ],
        "control" => vec![
            body(&hello()),
            body(&ClientControl::Heartbeat(Heartbeat { in_flight: 0, load_milli: 0 })),
            body(&ServerControl::GoAway(GoAway { reason: "drain".into(), reconnect_after_ms: 500 })),
            body(&ServerControl::Redirect(Redirect { addr: "10.0.0.2:7443".into() })),
            body(&ServerControl::Error { code: ErrorCode::Revoked, message: "revoked".into() }),
        ],
        "job" => vec![
            body(&BrokerJobFrame::Job(JobRequest {
                job_id: "job-00ff-e3-node1".into(),
                kind: "exec".into(),
                payload: postcard::to_allocvec(&ExecSpec {
                    program: "sh".into(),
                    args: vec!["-c".into(), "echo hi".into()],
                    env: vec![("A".into(), "b".into())],
                    cwd: None,
                })
                .expect("encodes"),
                timeout_ms: 60_000,
            })),
            body(&BrokerJobFrame::Cancel),
            body(&LaneFrame { job: 7, frame: BrokerJobFrame::Cancel }),
            body(&LaneFrame {
                job: u32::MAX,
                frame: RunnerJobFrame::Output { stream: OutputStream::Stdout, data: b"x".to_vec() },
            }),
            body(&RunnerJobFrame::Output { stream: OutputStream::Stderr, data: b"out\n".to_vec() }),
            body(&PeerRequest::Lane),
            body(&PeerRequest::OutputSince {
                caller: PeerCaller {
                    key_id: "k1".into(),
                    role: "member".into(),
                    tenant: Some("acme".into()),
                    owner: Some("alice".into()),
                },
                id: "job-00ff-e3-node1".into(),
                offset: 65_536,
            }),
            body(&LaneCall {
                call: 3,
                request: PeerRequest::GetJob {
                    caller: PeerCaller {
                        key_id: "k1".into(),
                        role: "admin".into(),
                        tenant: Some("acme".into()),
                        owner: None,
                    },
                    id: "job-00ff-e3-node1".into(),
                },
            }),
            body(&RunnerJobFrame::Result(JobResult {
                outcome: JobOutcome::Succeeded,
                exit_code: Some(0),
                message: String::new(),
                output_truncated: false,
            })),
        ],
        "enroll" => vec![
            body(&EnrollRequest {
                version: 2,
                token: "rt_0123456789abcdef_secret".into(),
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\n".into(),
            }),
            body(&EnrollResponse::Refused { code: ErrorCode::Unavailable, message: "later".into() }),
        ],
        "csr" => {
            let key = runnel_certs::key::generate_key().expect("a key");
            let pem = runnel_certs::key::csr_pem(&key).expect("a CSR");
            vec![pem_der(&pem), pem.into_bytes()]
        }
        "api_json" => [
            r#"{"owner":"alice","kind":"exec","exec":{"program":"sh","args":["-c","true"],"env":{"A":"b"}},"timeout_ms":1000,"wait":true}"#,
            r#"{"owner":"alice","kind":"echo","payload":"hi","labels":{"os":"linux"},"queue_timeout_ms":5}"#,
            r#"{"owner":"alice","name":"box 1","labels":{"gpu":"yes"},"token_ttl_secs":600}"#,
            r#"{"role":"member","owner":"alice","expires_in_secs":3600}"#,
            r#"{"role":"metrics"}"#,
            r#"{"id":"acme"}"#,
            r#"{"jobs":[{"owner":"alice","kind":"echo","payload":"a","wait":true},{"owner":"bob","kind":"exec","exec":{"program":"true"},"timeout_ms":5}]}"#,
        ]
        .into_iter()
        .map(|s| s.as_bytes().to_vec())
        .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_csr_seed_in_der_is_the_pem_seed() {
        let seeds = super::of("csr");
        let pem = String::from_utf8(seeds[1].clone()).unwrap();
        assert_eq!(crate::targets::pem_wrap(&seeds[0]).replace('\n', ""), pem.replace('\n', ""));
    }
}
