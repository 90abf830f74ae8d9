//! A lane: the calls answered once (`submit`, `get`, `cancel`, `wait`) share one stream of
//! the connection (`ApiRequest::Lane`), instead of a stream each: no stream to open,
//! track, acknowledge and close per call, on either side.
//!
//! One task writes the calls (those posted at about the same time together, so they share
//! datagrams), one reads the answers and hands each to its caller by the call's number.
//! When the lane breaks (the connection closed, or the broker answered out of protocol),
//! every call still waiting fails with the reason, the connection is closed so that the
//! next call dials again, and no call is taken after.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use runnel_protocol::{
    ApiRequest, ErrorCode, JobInfo, LaneCall, encode, lane_reader, read_lane_answer, write_lane,
};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;

/// The calls of one connection that are answered once.
pub(crate) struct Lane {
    /// Encoded calls, for the writing task.
    queue: mpsc::UnboundedSender<Vec<u8>>,
    waiting: Arc<Mutex<Waiting>>,
    next: AtomicU32,
}

/// The calls sent and not yet answered.
#[derive(Default)]
struct Waiting {
    calls: HashMap<u32, oneshot::Sender<Result<JobInfo, Error>>>,
    /// Why the lane broke; once set, no call is taken.
    broken: Option<Broken>,
}

#[derive(Clone)]
enum Broken {
    /// The connection closed (why).
    Lost(String),
    /// The broker ended the lane or answered out of protocol.
    Protocol(String),
}

impl Broken {
    fn error(&self) -> Error {
        match self {
            Broken::Lost(why) => Error::Lost(why.clone()),
            Broken::Protocol(why) => Error::Protocol(why.clone()),
        }
    }
}

/// Why a call on a lane failed.
pub(crate) enum Failed {
    /// Nothing was sent: the lane had broken. Safe to try on a new connection.
    Unsent,
    /// The call was sent (or may have been); its error.
    Sent(Error),
}

impl Lane {
    /// Opens a lane on `conn` (a connection whose Welcome has come). Its first frame
    /// leaves with the first call.
    pub(crate) async fn open(conn: &quinn::Connection) -> Result<Self, Error> {
        let (send, recv) = conn.open_bi().await.map_err(|e| Error::Connect(e.to_string()))?;
        let first = encode(&ApiRequest::Lane).map_err(|e| Error::Protocol(e.to_string()))?;
        let (queue, calls) = mpsc::unbounded_channel();
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        tokio::spawn(write_calls(send, calls, first));
        tokio::spawn(read_answers(recv, waiting.clone(), conn.clone()));
        Ok(Self { queue, waiting, next: AtomicU32::new(0) })
    }

    /// Sends `request` and waits for its answer.
    pub(crate) async fn call(&self, request: &ApiRequest) -> Result<JobInfo, Failed> {
        let call = self.next.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&LaneCall { call, request })
            .map_err(|e| Failed::Sent(Error::Protocol(format!("request: {e}"))))?;
        let (answer, answered) = oneshot::channel();
        {
            let mut waiting = lock(&self.waiting);
            if waiting.broken.is_some() {
                return Err(Failed::Unsent);
            }
            waiting.calls.insert(call, answer);
        }
        if self.queue.send(frame).is_err() {
            lock(&self.waiting).calls.remove(&call);
            return Err(Failed::Unsent);
        }
        match answered.await {
            Ok(r) => r.map_err(Failed::Sent),
            // The reading task ended without answering: only if its runtime is shutting
            // down.
            Err(_) => Err(Failed::Sent(Error::Lost("the client is shutting down".into()))),
        }
    }
}

fn lock(waiting: &Mutex<Waiting>) -> MutexGuard<'_, Waiting> {
    // The map stays whole if a holder panicked.
    waiting.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes the calls posted to `calls`, after the lane's `first` frame: those posted
/// together in one write. Ends the lane once every [`Lane`] handle is gone.
async fn write_calls(
    mut send: quinn::SendStream,
    mut calls: mpsc::UnboundedReceiver<Vec<u8>>,
    first: Vec<u8>,
) {
    // A failed write breaks the connection's stream: the reader sees it and answers every
    // waiting call.
    if write_lane(&mut send, &mut calls, first).await {
        let _ = send.finish();
    }
}

/// Hands each answer to its caller; when the lane ends, fails the calls still waiting and
/// closes the connection.
async fn read_answers(
    recv: quinn::RecvStream,
    waiting: Arc<Mutex<Waiting>>,
    conn: quinn::Connection,
) {
    let mut recv = lane_reader(recv);
    let why = loop {
        match read_lane_answer(&mut recv).await {
            Ok(Some((call, answer))) => {
                let caller = lock(&waiting).calls.remove(&call);
                // A caller that gave up has dropped its end; an unknown number is ignored.
                if let Some(caller) = caller {
                    let _ = caller.send(answer.map_err(|e| Error::answer(e, &conn)));
                }
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let broken = match (conn.close_reason(), why) {
        (Some(closed), _) => Broken::Lost(closed.to_string()),
        // After the client ended it (every handle gone), or the broker stopped.
        (None, None) => {
            conn.close(0u32.into(), b"lane ended");
            Broken::Protocol("the broker ended the lane".into())
        }
        (None, Some(e)) => {
            tracing::debug!(error = %e, "native API lane broke; closing the connection");
            conn.close(ErrorCode::Protocol.as_u32().into(), b"lane broke");
            Broken::Protocol(e.to_string())
        }
    };
    let mut waiting = lock(&waiting);
    for (_, caller) in waiting.calls.drain() {
        let _ = caller.send(Err(broken.error()));
    }
    waiting.broken = Some(broken);
}
