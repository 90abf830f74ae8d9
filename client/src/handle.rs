//! A followed dispatch: the accepted job, its output as it comes, its result.

use runnel_protocol::{JobInfo, PeerResponse, read_answer};
use tokio::sync::OwnedSemaphorePermit;

use crate::error::Error;

/// A job dispatched with [`Client::dispatch`](crate::Client::dispatch). It holds one of
/// the client's in-flight turns until its result is read or it is dropped. Dropping it
/// stops following the job, not the job: [`Client::cancel`](crate::Client::cancel) does.
#[derive(Debug)]
pub struct JobHandle {
    job: JobInfo,
    recv: quinn::RecvStream,
    conn: quinn::Connection,
    /// The ended job, once its frame has been read.
    ended: Option<JobInfo>,
    _turn: OwnedSemaphorePermit,
}

impl JobHandle {
    pub(crate) fn new(
        job: JobInfo,
        recv: quinn::RecvStream,
        conn: quinn::Connection,
        turn: OwnedSemaphorePermit,
    ) -> Self {
        Self { job, recv, conn, ended: None, _turn: turn }
    }

    /// The job as the broker accepted it (its id, owner, state `queued` or later).
    pub fn job(&self) -> &JobInfo {
        &self.job
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.job.id
    }

    /// The next piece of the job's output (stdout and stderr, as the runner sent them);
    /// `None` once the job has ended and all of its output has been read.
    pub async fn output(&mut self) -> Result<Option<Vec<u8>>, Error> {
        if self.ended.is_some() {
            return Ok(None);
        }
        match self.next().await? {
            PeerResponse::Output(chunk) => Ok(Some(chunk)),
            PeerResponse::Job(end) => {
                match self.next().await? {
                    PeerResponse::End => {}
                    other => return Err(unexpected(&other)),
                }
                self.ended = Some(end);
                Ok(None)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Waits for the job to end and answers its final view; its `output` holds what
    /// [`JobHandle::output`] had not yet taken (all of it, if that was never called).
    pub async fn result(mut self) -> Result<JobInfo, Error> {
        let mut rest = Vec::new();
        while let Some(chunk) = self.output().await? {
            rest.extend_from_slice(&chunk);
        }
        let mut end = self.ended.take().ok_or_else(|| Error::Protocol("no result".into()))?;
        end.output = String::from_utf8_lossy(&rest).into_owned();
        Ok(end)
    }

    async fn next(&mut self) -> Result<PeerResponse, Error> {
        read_answer(&mut self.recv).await.map_err(|e| Error::answer(e, &self.conn))
    }
}

fn unexpected(got: &PeerResponse) -> Error {
    Error::Protocol(format!("unexpected {} while following a job", got.what()))
}
