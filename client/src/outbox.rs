//! The client's outbox: every call's request is written by one task, so that calls made
//! at about the same time leave in the same datagrams.
//!
//! quinn sends a connection's data from its driver task, which a write wakes. A caller
//! that wrote its own request woke the driver, went on to wait for the answer, and the
//! driver (next in line on that thread) sent the one request in a datagram of its own:
//! one UDP send per call, and one more datagram for the broker to receive, decrypt and
//! acknowledge (`runnel-bench load --api native`: 1.0 datagram per call, BENCHMARKS.md).
//! Here callers hand their request over; the outbox first lets every other caller that is
//! ready run ([`tokio::task::yield_now`]), then writes all that has come in before the
//! driver runs, so quinn packs them together. A caller alone is written at once.

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

/// Requests taken from the queue per round (more wait for the next round).
const ROUND: usize = 256;

/// One request: the call's stream and the request frame, encoded.
pub(crate) struct Outgoing {
    pub(crate) send: quinn::SendStream,
    pub(crate) frame: Vec<u8>,
}

/// The handle callers put requests in. The outbox's task ends when every handle (every
/// clone of the client) is gone and it has written what it holds.
pub(crate) type Outbox = mpsc::UnboundedSender<Outgoing>;

/// Starts the outbox's task (on the current tokio runtime). It is unbounded because what
/// it holds is bounded by the calls in flight (each holds a turn: `Options::max_in_flight`).
pub(crate) fn start() -> Outbox {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(write_requests(rx));
    tx
}

/// Writes each request and ends its stream. A write that cannot finish at once (stream or
/// connection credit) waits without holding back the others. A write that fails (the
/// connection is lost) is not reported here: the caller's read of the answer fails with
/// the connection's error.
async fn write_requests(mut queue: mpsc::UnboundedReceiver<Outgoing>) {
    let mut writes = FuturesUnordered::new();
    let mut round = Vec::with_capacity(ROUND);
    loop {
        tokio::select! {
            biased;
            Some(()) = writes.next(), if !writes.is_empty() => {}
            n = queue.recv_many(&mut round, ROUND) => {
                if n == 0 {
                    break;
                }
                // The callers already woken run first and queue theirs (a yield is
                // deferred until this thread has run what is ready).
                tokio::task::yield_now().await;
                while round.len() < ROUND {
                    match queue.try_recv() {
                        Ok(more) => round.push(more),
                        Err(_) => break,
                    }
                }
                for Outgoing { mut send, frame } in round.drain(..) {
                    writes.push(async move {
                        if send.write_all(&frame).await.is_ok() {
                            let _ = send.finish();
                        }
                    });
                }
            }
        }
    }
    while writes.next().await.is_some() {}
}
