//! Every message round-trips; truncated, oversized and garbage input errors without panics.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use runnel_protocol::limits::{LENGTH_PREFIX_LEN, MAX_FRAME_LEN};
use runnel_protocol::*;

fn roundtrip<T>(msg: T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode(&msg).expect("encode");
    let (back, used): (T, usize) = decode(&bytes).expect("decode");
    assert_eq!(used, bytes.len());
    assert_eq!(back, msg);
    // Every strict prefix is incomplete, never malformed and never a panic.
    for cut in 0..bytes.len() {
        match decode::<T>(&bytes[..cut]) {
            Err(FrameError::Incomplete { needed }) => assert!(needed > 0),
            other => panic!("prefix of {cut} bytes gave {other:?}"),
        }
    }
}

fn hello() -> Hello {
    Hello {
        min_version: 1,
        max_version: 1,
        runner_version: "0.1.0".into(),
        labels: BTreeMap::from([("os".into(), "linux".into())]),
        capacity: 4,
        kinds: vec!["exec".into()],
    }
}

#[test]
fn control_messages_round_trip() {
    roundtrip(ClientControl::Hello(hello()));
    roundtrip(ClientControl::Heartbeat(Heartbeat { in_flight: 3, load_milli: 1500 }));
    roundtrip(ClientControl::RenewCert { csr_pem: "-----BEGIN".into() });
    roundtrip(ClientControl::Draining);
    roundtrip(ServerControl::Welcome(Welcome {
        version: 1,
        runner_id: "r1".into(),
        tenant: "t".into(),
        owner: "o".into(),
        heartbeat_interval_ms: 5000,
        epoch: 7,
    }));
    roundtrip(ServerControl::RenewedCert { cert_pem: "pem".into(), not_after_unix: 1_900_000_000 });
    roundtrip(ServerControl::RenewRefused { code: ErrorCode::Revoked, message: "no".into() });
    roundtrip(ServerControl::GoAway(GoAway { reason: "drain".into(), reconnect_after_ms: 500 }));
    roundtrip(ServerControl::Redirect(Redirect { addr: "10.0.0.2:7443".into() }));
    roundtrip(ServerControl::Error { code: ErrorCode::UnsupportedVersion, message: "v9".into() });
}

#[test]
fn job_messages_round_trip() {
    let spec = ExecSpec {
        program: "echo".into(),
        args: vec!["hello".into()],
        env: vec![("A".into(), "B".into())],
        cwd: Some("/tmp".into()),
    };
    let payload = postcard::to_allocvec(&spec).expect("spec");
    roundtrip(BrokerJobFrame::Job(JobRequest {
        job_id: "j1".into(),
        kind: "exec".into(),
        payload,
        timeout_ms: 1000,
    }));
    roundtrip(BrokerJobFrame::Cancel);
    roundtrip(RunnerJobFrame::Output { stream: OutputStream::Stderr, data: b"oops\n".to_vec() });
    for outcome in [
        JobOutcome::Succeeded,
        JobOutcome::Failed,
        JobOutcome::Cancelled,
        JobOutcome::TimedOut,
        JobOutcome::Rejected,
    ] {
        roundtrip(RunnerJobFrame::Result(JobResult {
            outcome,
            exit_code: Some(2),
            message: "exit status 2".into(),
            output_truncated: true,
        }));
    }
}

#[test]
fn enroll_messages_round_trip_and_debug_hides_the_token() {
    let req = EnrollRequest { version: 1, token: "rt_secret_value".into(), csr_pem: "csr".into() };
    assert!(!format!("{req:?}").contains("secret"));
    roundtrip(req);
    roundtrip(EnrollResponse::Ok(Enrolled {
        cert_pem: "c".into(),
        ca_pem: "ca".into(),
        runner_id: "r".into(),
        tenant: "t".into(),
        owner: "o".into(),
    }));
    roundtrip(EnrollResponse::Refused { code: ErrorCode::TokenConsumed, message: "used".into() });
}

#[test]
fn oversized_length_prefix_is_refused_before_reading_the_body() {
    let len = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
    match decode::<ClientControl>(&len) {
        Err(FrameError::TooLarge { len, max }) => assert!(len > max),
        other => panic!("{other:?}"),
    }
    let big = ClientControl::RenewCert { csr_pem: "x".repeat(MAX_FRAME_LEN + 10) };
    assert!(matches!(encode(&big), Err(FrameError::TooLarge { .. })));
}

#[test]
fn trailing_bytes_inside_a_frame_are_malformed() {
    let mut bytes = encode(&ClientControl::Draining).expect("encode");
    bytes.push(0xff);
    let len = (bytes.len() - LENGTH_PREFIX_LEN) as u32;
    bytes[..LENGTH_PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(decode::<ClientControl>(&bytes), Err(FrameError::Malformed(_))));
}

#[tokio::test]
async fn stream_reader_distinguishes_clean_end_truncation_and_size() {
    let frame = encode(&ClientControl::Draining).expect("encode");
    let mut two = frame.clone();
    two.extend_from_slice(&frame);
    let mut r = &two[..];
    assert_eq!(
        read_frame::<ClientControl, _>(&mut r).await.expect("1"),
        Some(ClientControl::Draining)
    );
    assert_eq!(
        read_frame::<ClientControl, _>(&mut r).await.expect("2"),
        Some(ClientControl::Draining)
    );
    assert_eq!(read_frame::<ClientControl, _>(&mut r).await.expect("eof"), None);

    let mut cut = &frame[..frame.len() - 1];
    assert!(matches!(read_frame::<ClientControl, _>(&mut cut).await, Err(FrameError::Truncated)));
    let mut half_prefix = &frame[..2];
    assert!(matches!(
        read_frame::<ClientControl, _>(&mut half_prefix).await,
        Err(FrameError::Truncated)
    ));

    let huge = u32::MAX.to_be_bytes();
    let mut r = &huge[..];
    let err = read_frame::<ClientControl, _>(&mut r).await.expect_err("too large");
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
}

proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode::<ClientControl>(&bytes);
        let _ = decode::<ServerControl>(&bytes);
        let _ = decode::<BrokerJobFrame>(&bytes);
        let _ = decode::<RunnerJobFrame>(&bytes);
        let _ = decode::<EnrollRequest>(&bytes);
        let _ = decode::<EnrollResponse>(&bytes);
    }

    #[test]
    fn garbage_bodies_with_a_valid_prefix_error_cleanly(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        match decode::<ClientControl>(&bytes) {
            Ok((_, used)) => prop_assert_eq!(used, bytes.len()),
            Err(e) => prop_assert!(matches!(e, FrameError::Malformed(_))),
        }
    }
}

proptest! {
    /// The broker encodes each job from borrowed parts (`encode_job_request`); the runner
    /// decodes the owned `BrokerJobFrame`. The bytes must be the owned frame's exactly, for
    /// any id, kind, payload (lengths past one varint byte included) and timeout.
    #[test]
    fn a_borrowed_job_request_encodes_as_the_owned_frame(
        job_id in ".{0,40}",
        kind in "[a-z]{0,12}",
        payload in proptest::collection::vec(any::<u8>(), 0..600),
        timeout_ms in any::<u64>(),
    ) {
        let borrowed = encode_job_request(&job_id, &kind, &payload, timeout_ms).unwrap();
        let owned = BrokerJobFrame::Job(JobRequest { job_id, kind, payload, timeout_ms });
        prop_assert_eq!(&borrowed, &encode(&owned).unwrap());
        let (back, used): (BrokerJobFrame, usize) = decode(&borrowed).unwrap();
        prop_assert_eq!(used, borrowed.len());
        prop_assert_eq!(back, owned);
    }
}

prop_compose! {
    fn any_job()(
        (id, owner, kind) in (".{0,40}", ".{0,20}", "[a-z]{0,12}"),
        state in prop_oneof![Just(JobState::Queued), Just(JobState::Succeeded), Just(JobState::NodeLost)],
        runner_id in proptest::option::of(".{0,20}"),
        exit_code in proptest::option::of(any::<i32>()),
        message in ".{0,60}",
        times in (any::<i64>(), proptest::option::of(any::<i64>()), proptest::option::of(any::<i64>())),
        output in ".{0,300}",
        flags in (any::<bool>(), any::<bool>()),
    ) -> JobInfo {
        JobInfo {
            id, owner, kind, state, runner_id, exit_code, message,
            created_at_ms: times.0, started_at_ms: times.1, finished_at_ms: times.2,
            output, output_truncated: flags.0, output_expired: flags.1,
        }
    }
}

proptest! {
    /// A broker answers from its job entry through the borrowed view: postcard and JSON
    /// write the owned view's bytes for it, for any job (fails if a field is added to one
    /// and not the other, or their order drifts), and it converts back to the same job.
    #[test]
    fn a_borrowed_job_view_encodes_as_the_owned_one(job in any_job()) {
        prop_assert_eq!(encode(&job.borrowed()).unwrap(), encode(&job).unwrap());
        prop_assert_eq!(
            serde_json::to_vec(&job.borrowed()).unwrap(),
            serde_json::to_vec(&job).unwrap()
        );
        prop_assert_eq!(job.borrowed().to_info(), job);
    }
}

/// The frames' byte fields as serde's own `Vec<u8>` impls write them (one `u8` at a
/// time): what every peer built before those fields were written as byte strings sent.
mod as_a_sequence {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    pub(crate) enum RunnerJobFrame {
        Output { stream: runnel_protocol::OutputStream, data: Vec<u8> },
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    pub(crate) enum PeerResponse {
        Job(runnel_protocol::JobInfo),
        Jobs(Vec<runnel_protocol::JobInfo>),
        Output(Vec<u8>),
    }
}

proptest! {
    /// Output chunks, job payloads and dispatch payloads are written as byte strings now
    /// (one copy instead of a call per byte): the bytes on the wire are the ones a peer
    /// that writes and reads them as sequences of `u8` sends and expects, both ways.
    #[test]
    fn byte_fields_keep_the_sequence_encoding(
        data in proptest::collection::vec(any::<u8>(), 0..700),
    ) {
        let new = RunnerJobFrame::Output { stream: OutputStream::Stderr, data: data.clone() };
        let old = as_a_sequence::RunnerJobFrame::Output {
            stream: OutputStream::Stderr,
            data: data.clone(),
        };
        let bytes = encode(&new).unwrap();
        prop_assert_eq!(&bytes, &encode(&old).unwrap());
        let (back, _): (as_a_sequence::RunnerJobFrame, usize) = decode(&bytes).unwrap();
        prop_assert_eq!(back, old);
        let (back, _): (RunnerJobFrame, usize) = decode(&bytes).unwrap();
        prop_assert_eq!(back, new);

        let new = PeerResponse::Output(data.clone());
        let old = as_a_sequence::PeerResponse::Output(data);
        let bytes = encode(&new).unwrap();
        prop_assert_eq!(&bytes, &encode(&old).unwrap());
        let (back, _): (PeerResponse, usize) = decode(&bytes).unwrap();
        prop_assert_eq!(back, new);
    }
}

fn ended_job() -> JobInfo {
    JobInfo {
        id: "job-0123456789abcdef".into(),
        owner: "ci".into(),
        kind: "exec".into(),
        state: JobState::Succeeded,
        runner_id: Some("r-1".into()),
        exit_code: Some(0),
        message: "exited 0".into(),
        created_at_ms: 1,
        started_at_ms: Some(2),
        finished_at_ms: Some(3),
        output: String::new(),
        output_truncated: false,
        output_expired: false,
    }
}

/// The job answer in one buffer is, byte for byte, its frames encoded one by one (the
/// Job, each output chunk, the End), and reads back as that job and that output; at
/// every chunk boundary (fails if the borrowed variants drift from `PeerResponse`'s).
#[test]
fn a_job_answer_in_one_buffer_is_its_frames_one_by_one() {
    let job = ended_job();
    for len in [0, 1, 256, PEER_OUTPUT_CHUNK - 1, PEER_OUTPUT_CHUNK, PEER_OUTPUT_CHUNK + 1, 150_000]
    {
        // Two-byte characters, so that chunks also split one.
        let output: String = (0..len).map(|i| if i % 7 == 0 { 'é' } else { 'x' }).collect();
        let output = output.as_bytes()[..len].to_vec();
        let output = String::from_utf8_lossy(&output).into_owned();
        let mut expected = encode(&PeerResponse::Job(job.clone())).unwrap();
        for chunk in output.as_bytes().chunks(PEER_OUTPUT_CHUNK) {
            expected.extend(encode(&PeerResponse::Output(chunk.to_vec())).unwrap());
        }
        expected.extend(encode(&PeerResponse::End).unwrap());
        let with_output = JobInfo { output: output.clone(), ..job.clone() };
        let answer = encode_job_answer(with_output.borrowed()).unwrap();
        assert_eq!(answer, expected, "{len} bytes of output");
        let (back, used): (PeerResponse, usize) = decode(&answer).unwrap();
        assert_eq!(back, PeerResponse::Job(job.clone()));
        let mut rest = &answer[used..];
        let mut got = Vec::new();
        loop {
            let (frame, used): (PeerResponse, usize) = decode(rest).unwrap();
            rest = &rest[used..];
            match frame {
                PeerResponse::Output(chunk) => got.extend(chunk),
                PeerResponse::End => break,
                other => panic!("{other:?}"),
            }
        }
        assert!(rest.is_empty());
        assert_eq!(got, output.as_bytes());
    }
}

/// A frame too large to encode leaves what the buffer held before it as it was.
#[test]
fn a_refused_frame_leaves_the_buffer_as_it_was() {
    let mut out = encode(&PeerResponse::End).unwrap();
    let before = out.clone();
    let big = PeerResponse::Output(vec![0; MAX_FRAME_LEN + 1]);
    assert!(matches!(encode_append(&mut out, &big), Err(FrameError::TooLarge { .. })));
    assert_eq!(out, before);
    encode_append(&mut out, &PeerResponse::End).unwrap();
    assert_eq!(out, [before.clone(), before].concat());
}

/// A lane's answers follow one another on one stream: each is read whole and nothing of
/// the next (a reader that took a stream's end after each answer, as a call on a stream
/// of its own does, would eat the next answer's first byte). A refusal is that call's
/// answer, not the lane's end; the lane's clean end is `None`.
#[tokio::test]
async fn lane_answers_back_to_back_are_read_one_by_one() {
    let job = JobInfo { output: "out".into(), ..ended_job() };
    let mut wire = Vec::new();
    for call in [3u32, 1, 2] {
        wire.extend(encode(&LaneAnswer { call }).unwrap());
        if call == 1 {
            let refusal = PeerResponse::Refused {
                status: 404,
                code: "not_found".into(),
                message: "no".into(),
            };
            wire.extend(encode(&refusal).unwrap());
        } else {
            wire.extend(encode_job_answer(job.borrowed()).unwrap());
        }
    }
    let mut reader = wire.as_slice();
    let (call, first) = read_lane_answer(&mut reader).await.unwrap().unwrap();
    assert_eq!((call, first.unwrap()), (3, LaneReply::Job(job.clone())));
    let (call, second) = read_lane_answer(&mut reader).await.unwrap().unwrap();
    assert_eq!(call, 1);
    assert!(matches!(second, Err(AnswerError::Refused { status: 404, .. })), "{second:?}");
    let (call, third) = read_lane_answer(&mut reader).await.unwrap().unwrap();
    assert_eq!((call, third.unwrap()), (2, LaneReply::Job(job)));
    assert!(read_lane_answer(&mut reader).await.unwrap().is_none());
    // An answer cut short breaks the lane.
    let cut = &wire[..wire.len() - 3];
    let mut reader = cut;
    for _ in 0..2 {
        let (_, answer) = read_lane_answer(&mut reader).await.unwrap().unwrap();
        assert!(answer.is_ok() || matches!(answer, Err(AnswerError::Refused { .. })));
    }
    assert!(read_lane_answer(&mut reader).await.is_err());
}

/// A call encoded from a borrowed request is the owned call's bytes (the client encodes
/// its requests without a copy).
#[test]
fn a_lane_call_borrowed_or_owned_is_the_same_bytes() {
    let request = ApiRequest::GetJob { id: "job-1".into() };
    let borrowed = encode(&LaneCall { call: 9, request: &request }).unwrap();
    assert_eq!(borrowed, encode(&LaneCall { call: 9, request: request.clone() }).unwrap());
    roundtrip(LaneCall { call: u32::MAX, request });
    roundtrip(ApiRequest::Lane);
}
