//! The calling side: one cached connection per node. Every call goes on the connection's
//! lane (`runnel_protocol::CallLane`) where both nodes speak `runnel-peer/2`, a followed
//! output asked piece by piece (`OutputSince`): no stream to open, track and close per
//! call on either node, the calls forwarded at about the same time leave together, and no
//! call waits for a stream that another tenant's long calls hold. Every call to a node of
//! an older build takes a stream of its own: requests leave
//! through one outbox (`runnel_protocol::Outbox`), so that calls forwarded at about the
//! same time (each from its own API request's task) share datagrams; each answer's stream
//! end is read (`read_answer` after a job answer or a refusal, `take_end` after a
//! one-frame answer), so that no `STOP_SENDING` follows a call alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use quinn::crypto::rustls::HandshakeData;
use runnel_protocol::{
    ALPN_PEER_LANE, AnswerError, CallLane, ErrorCode, JobInfo, LaneBroken, LaneFailed, LaneReply,
    Outbox, PeerCaller, PeerRequest, PeerResponse, encode, read_answer, read_job_answer, take_end,
};

use super::{SERVER_NAME, peer_node};
use crate::cluster::NodeRecord;

/// The longest connecting to a node may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a forwarded call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    /// The node could not be reached, or the connection broke mid-call.
    #[error("node {node} cannot be reached: {reason}")]
    Unreachable {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// The node answered something that is not a valid answer to the call.
    #[error("node {node} answered out of protocol: {reason}")]
    Protocol {
        /// The node.
        node: String,
        /// What was wrong.
        reason: String,
    },
    /// The home refused the call, as its API would have.
    #[error("{message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
}

/// Calls other nodes.
pub(crate) struct PeerClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    cluster: String,
    conns: DashMap<String, Linked>,
    /// One dial at a time per node: the calls that find no live connection wait for the
    /// one being dialled (a burst of calls would otherwise dial, and open a lane, each).
    /// It holds the last dial that failed (when it ended, and why): the calls that waited
    /// for that one fail with it, instead of each dialling a node that does not answer in
    /// turn.
    dialling: DashMap<String, Arc<tokio::sync::Mutex<LastFailure>>>,
    outbox: Outbox<quinn::SendStream>,
}

/// When a node's last dial that failed ended, and why.
type LastFailure = Option<(Instant, String)>;

/// A cached connection to a node.
#[derive(Clone)]
struct Linked {
    conn: quinn::Connection,
    /// Its lane, where both nodes speak `runnel-peer/2`.
    lane: Option<Arc<CallLane<PeerRequest>>>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient").finish_non_exhaustive()
    }
}

impl PeerClient {
    /// Calls go out from `endpoint` (the node's own peer endpoint) with `config`. Starts
    /// the outbox's task on the current runtime.
    pub(crate) fn new(
        endpoint: quinn::Endpoint,
        config: quinn::ClientConfig,
        cluster: &str,
    ) -> Self {
        let outbox = Outbox::start();
        let (conns, dialling) = (DashMap::new(), DashMap::new());
        Self { endpoint, config, cluster: cluster.into(), conns, dialling, outbox }
    }

    /// Lets go of what this client keeps for every node that `live` does not name: its
    /// cached connection (closed once the calls on it end) and its dial lock. A node that
    /// comes back is dialled again on its next call.
    pub(crate) fn forget_all_but(&self, live: impl Fn(&str) -> bool) {
        let mut gone = 0u32;
        self.conns.retain(|id, _| {
            let keep = live(id);
            gone += u32::from(!keep);
            keep
        });
        connections_kept(-f64::from(gone));
        self.dialling.retain(|id, _| live(id));
    }

    /// How many nodes this client keeps a connection or a dial lock for.
    #[cfg(test)]
    pub(crate) fn nodes_kept(&self) -> usize {
        let mut ids: Vec<String> = self.conns.iter().map(|e| e.key().clone()).collect();
        ids.extend(self.dialling.iter().map(|e| e.key().clone()));
        ids.sort();
        ids.dedup();
        ids.len()
    }

    /// The live connection to `node`, dialled if there is none.
    async fn connection(&self, node: &NodeRecord) -> Result<Linked, PeerError> {
        if let Some(c) = self.live(node) {
            return Ok(c);
        }
        let asked = Instant::now();
        let dial = self.dialling.entry(node.id.clone()).or_default().clone();
        let mut failed = dial.lock().await;
        // Dialled while this call waited for its turn, or failed to be.
        if let Some(c) = self.live(node) {
            return Ok(c);
        }
        if let Some((at, why)) = failed.as_ref().filter(|(at, _)| *at >= asked) {
            let reason = format!("{why} ({:?} ago)", at.elapsed());
            return Err(PeerError::Unreachable { node: node.id.clone(), reason });
        }
        if self.conns.remove(&node.id).is_some() {
            connections_kept(-1.0);
        }
        let dialled = self.dial(node).await;
        *failed = dialled.as_ref().err().map(|e| {
            let why = match e {
                PeerError::Unreachable { reason, .. } => reason.clone(),
                e => e.to_string(),
            };
            (Instant::now(), why)
        });
        dialled
    }

    /// The cached connection to `node`, if it is live: open, its lane (if any) going, and
    /// to the address the node has now.
    fn live(&self, node: &NodeRecord) -> Option<Linked> {
        let c = self.conns.get(&node.id).map(|c| c.clone())?;
        let lane_ended = c.lane.as_ref().is_some_and(|l| l.broken().is_some());
        (c.conn.close_reason().is_none()
            && !lane_ended
            && c.conn.remote_address().to_string() == node.peer)
            .then_some(c)
    }

    async fn dial(&self, node: &NodeRecord) -> Result<Linked, PeerError> {
        let unreachable = |reason: String| PeerError::Unreachable { node: node.id.clone(), reason };
        let addr = tokio::net::lookup_host(&node.peer)
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable(format!("{} does not resolve", node.peer)))?;
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                unreachable(format!("no answer from {} in {CONNECT_TIMEOUT:?}", node.peer))
            })?
            .map_err(|e| unreachable(e.to_string()))?;
        // The CA vouches that it is a node; it must be the node we meant.
        if peer_node(&conn, &self.cluster).as_deref() != Some(node.id.as_str()) {
            conn.close(0u32.into(), b"not the node asked for");
            return Err(PeerError::Protocol {
                node: node.id.clone(),
                reason: "its certificate names another node".into(),
            });
        }
        let lane = match takes_a_lane(&conn) {
            true => Some(Arc::new(open_lane(&conn, &node.id).await?)),
            false => None,
        };
        let linked = Linked { conn, lane };
        if self.conns.insert(node.id.clone(), linked.clone()).is_none() {
            connections_kept(1.0);
        }
        Ok(linked)
    }

    /// Sends `req` on a new stream of `conn`, a connection to `node`; answers the stream to
    /// read the answer from.
    async fn send(
        &self,
        node: &NodeRecord,
        conn: &quinn::Connection,
        req: &PeerRequest,
    ) -> Result<Answer, PeerError> {
        let broken = |reason: String| PeerError::Unreachable { node: node.id.clone(), reason };
        let frame = encode(req).map_err(|e| PeerError::Protocol {
            node: node.id.clone(),
            reason: format!("request: {e}"),
        })?;
        let (send, recv) = conn.open_bi().await.map_err(|e| broken(e.to_string()))?;
        // A write that fails shows as the answer's read failing (the connection broke).
        self.outbox.post(send, frame).map_err(|_| broken("the node is stopping".into()))?;
        Ok(Answer { node: node.id.clone(), source: Source::Stream(recv), peeked: None })
    }

    /// A call answered at once (all but a followed output): on the connection's lane, or
    /// on a stream of its own with a node of an older build (`one_frame`: how its answer
    /// is read there, one frame or a job).
    async fn answered(
        &self,
        node: &NodeRecord,
        req: PeerRequest,
        one_frame: bool,
    ) -> Result<LaneReply, PeerError> {
        // A lane that had ended sent nothing: the call is safe to send once more, on a new
        // connection (one whose lane has ended is not used again).
        for _ in 0..2 {
            let linked = self.connection(node).await?;
            let Some(lane) = linked.lane else {
                let mut a = self.send(node, &linked.conn, &req).await?;
                return a.whole(one_frame).await;
            };
            match lane.call(&req).await {
                Ok(reply) => return Ok(reply),
                Err(LaneFailed::Unsent) => {}
                Err(e) => return Err(lane_error(&node.id, e)),
            }
        }
        Err(PeerError::Unreachable { node: node.id.clone(), reason: "its lane ended twice".into() })
    }

    /// A call answered as a job (dispatch, get, cancel).
    pub(crate) async fn job(
        &self,
        node: &NodeRecord,
        req: PeerRequest,
    ) -> Result<JobInfo, PeerError> {
        match self.answered(node, req, false).await? {
            LaneReply::Job(job) => Ok(job),
            LaneReply::Frame(f) => Err(unexpected(&node.id, f.what())),
        }
    }

    /// A call answered with one frame, which `pick` takes apart.
    async fn one<T>(
        &self,
        node: &NodeRecord,
        req: PeerRequest,
        pick: impl FnOnce(PeerResponse) -> Option<T>,
    ) -> Result<T, PeerError> {
        match self.answered(node, req, true).await? {
            LaneReply::Frame(f) => {
                let what = f.what();
                pick(f).ok_or_else(|| unexpected(&node.id, what))
            }
            LaneReply::Job(_) => Err(unexpected(&node.id, "a job")),
        }
    }

    /// A call answered as a list of jobs.
    pub(crate) async fn jobs(
        &self,
        node: &NodeRecord,
        req: PeerRequest,
    ) -> Result<Vec<JobInfo>, PeerError> {
        self.one(node, req, |r| if let PeerResponse::Jobs(j) = r { Some(j) } else { None }).await
    }

    /// A call answered with a count of closed connections.
    pub(crate) async fn closed(
        &self,
        node: &NodeRecord,
        req: PeerRequest,
    ) -> Result<u32, PeerError> {
        self.one(node, req, |r| if let PeerResponse::Closed(n) = r { Some(n) } else { None }).await
    }

    /// A call answered with the runners that are online on that node.
    pub(crate) async fn online(
        &self,
        node: &NodeRecord,
        req: PeerRequest,
    ) -> Result<Vec<(String, String)>, PeerError> {
        self.one(node, req, |r| if let PeerResponse::Online(v) = r { Some(v) } else { None }).await
    }

    /// A job's output, followed until the job ends: the answer to read chunks from
    /// (refusals come before any chunk). Asked piece by piece on the lane
    /// (`OutputSince`), so that a follow, which lasts as long as its job, holds no stream
    /// that another tenant's calls could be waiting for; on a stream of its own
    /// (`JobOutput`) with a node of an older build.
    pub(crate) async fn output(
        &self,
        node: &NodeRecord,
        caller: PeerCaller,
        id: String,
    ) -> Result<Answer, PeerError> {
        let linked = self.connection(node).await?;
        match linked.lane {
            Some(lane) => {
                let following = Following { lane, caller, id, offset: 0, ended: false };
                let source = Source::Lane(Box::new(following));
                Ok(Answer { node: node.id.clone(), source, peeked: None })
            }
            None => self.send(node, &linked.conn, &PeerRequest::JobOutput { caller, id }).await,
        }
    }
}

/// Whether the node at the other end of `conn` takes a lane (`runnel-peer/2`).
pub(super) fn takes_a_lane(conn: &quinn::Connection) -> bool {
    let alpn = conn.handshake_data().and_then(|d| d.downcast::<HandshakeData>().ok());
    alpn.and_then(|d| d.protocol).is_some_and(|p| p == ALPN_PEER_LANE)
}

/// Moves `runnel_cluster_peer_connections`, the connections this node keeps to its peers.
fn connections_kept(delta: f64) {
    metrics::gauge!(crate::metrics::names::CLUSTER_PEER_CONNECTIONS).increment(delta);
}

/// Opens the lane of `conn`, a connection to `node`; counted in `runnel_cluster_peer_lanes`
/// until it ends. A lane that breaks closes its connection (if it is not already closed);
/// either way a connection whose lane has ended is not used again.
async fn open_lane(
    conn: &quinn::Connection,
    node: &str,
) -> Result<CallLane<PeerRequest>, PeerError> {
    let protocol = |reason: String| PeerError::Protocol { node: node.to_owned(), reason };
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| PeerError::Unreachable { node: node.to_owned(), reason: e.to_string() })?;
    let first = encode(&PeerRequest::Lane).map_err(|e| protocol(e.to_string()))?;
    let lanes = metrics::gauge!(crate::metrics::names::CLUSTER_PEER_LANES);
    lanes.increment(1.0);
    let (conn, node) = (conn.clone(), node.to_owned());
    let ended = move |why: Option<AnswerError>| {
        lanes.decrement(1.0);
        match (conn.close_reason(), why) {
            (Some(closed), _) => LaneBroken::Lost(closed.to_string()),
            // Every handle of it was let go of (the node ends its side after ours); the
            // connection may still carry calls on streams of their own.
            (None, None) => LaneBroken::Lost(format!("the lane to node {node} ended")),
            (None, Some(e)) => {
                tracing::warn!(%node, error = %e, "peer lane broke; closing the connection");
                conn.close(ErrorCode::Protocol.as_u32().into(), b"lane broke");
                LaneBroken::Protocol(e.to_string())
            }
        }
    };
    Ok(CallLane::open(send, recv, first, ended))
}

/// An answer that does not answer the call (`what` it was).
fn unexpected(node: &str, what: &'static str) -> PeerError {
    PeerError::Protocol { node: node.to_owned(), reason: format!("unexpected {what}") }
}

/// A call's failure on a lane, as a forwarded call's.
fn lane_error(node: &str, e: LaneFailed) -> PeerError {
    let node = node.to_owned();
    match e {
        LaneFailed::Refused { status, code, message } => {
            PeerError::Refused { status, code, message }
        }
        LaneFailed::Broken(LaneBroken::Lost(reason)) => PeerError::Unreachable { node, reason },
        LaneFailed::Unsent => PeerError::Unreachable { node, reason: "its lane had ended".into() },
        LaneFailed::Broken(LaneBroken::Protocol(reason)) => PeerError::Protocol { node, reason },
        LaneFailed::Request(e) => PeerError::Protocol { node, reason: format!("request: {e}") },
        LaneFailed::Unexpected(what) => unexpected(&node, what),
    }
}

/// The reading side of one call.
pub(crate) struct Answer {
    node: String,
    source: Source,
    peeked: Option<PeerResponse>,
}

/// Where an answer is read from.
enum Source {
    /// A stream of its own.
    Stream(quinn::RecvStream),
    /// A followed output, asked piece by piece on the lane.
    Lane(Box<Following>),
}

/// A job's output followed on the lane: the next piece is asked from `offset` on.
struct Following {
    lane: Arc<CallLane<PeerRequest>>,
    caller: PeerCaller,
    id: String,
    offset: u64,
    ended: bool,
}

impl Answer {
    /// Reads the first frame ahead (so that a refusal shows before anything is answered).
    pub(crate) async fn peek(&mut self) -> Result<(), PeerError> {
        if self.peeked.is_none() {
            self.peeked = Some(self.read().await?);
        }
        Ok(())
    }

    /// The next frame; a refusal becomes [`PeerError::Refused`].
    pub(crate) async fn next(&mut self) -> Result<PeerResponse, PeerError> {
        match self.peeked.take() {
            Some(r) => Ok(r),
            None => self.read().await,
        }
    }

    async fn read(&mut self) -> Result<PeerResponse, PeerError> {
        let following = match &mut self.source {
            Source::Stream(recv) => {
                let frame = read_answer(recv).await;
                return frame.map_err(|e| self.error(e));
            }
            Source::Lane(f) => f,
        };
        if following.ended {
            return Ok(PeerResponse::End);
        }
        let reply = loop {
            let req = PeerRequest::OutputSince {
                caller: following.caller.clone(),
                id: following.id.clone(),
                offset: following.offset,
            };
            match following.lane.call(&req).await {
                // Nothing new within the home's poll: ask again.
                Ok(LaneReply::Frame(PeerResponse::Output(chunk))) if chunk.is_empty() => {}
                reply => break reply,
            }
        };
        match reply {
            Ok(LaneReply::Frame(PeerResponse::Output(chunk))) => {
                following.offset += chunk.len() as u64;
                Ok(PeerResponse::Output(chunk))
            }
            Ok(LaneReply::Frame(PeerResponse::End)) => {
                following.ended = true;
                Ok(PeerResponse::End)
            }
            Ok(LaneReply::Frame(f)) => Err(unexpected(&self.node, f.what())),
            Ok(LaneReply::Job(_)) => Err(unexpected(&self.node, "a job")),
            Err(e) => Err(lane_error(&self.node, e)),
        }
    }

    /// The whole answer of a call on a stream of its own: one frame, or a job.
    async fn whole(&mut self, one_frame: bool) -> Result<LaneReply, PeerError> {
        let Source::Stream(recv) = &mut self.source else {
            return Err(unexpected(&self.node, "a lane"));
        };
        if one_frame {
            let frame = read_answer(recv).await;
            take_end(recv);
            return frame.map(LaneReply::Frame).map_err(|e| self.error(e));
        }
        let job = read_job_answer(recv).await;
        job.map(LaneReply::Job).map_err(|e| self.error(e))
    }

    fn error(&self, e: AnswerError) -> PeerError {
        let node = self.node.clone();
        match e {
            AnswerError::Refused { status, code, message } => {
                PeerError::Refused { status, code, message }
            }
            AnswerError::Unexpected(what) => unexpected(&node, what),
            e @ (AnswerError::Ended | AnswerError::Frame(_)) => {
                PeerError::Unreachable { node, reason: e.to_string() }
            }
        }
    }
}
