//! What an HTTP answer holds until its client reads it.
//!
//! A job's JSON is made whole (up to ~6 MiB: its 1 MiB of output, control characters
//! escaped), and hyper keeps a body until the socket takes it, so a client that sends
//! reads and never reads the answers would pin one per connection, up to
//! `--http-max-connections` of them. An answer over [`UNCOUNTED`] bytes therefore first
//! takes its size from its tenant's `--http-answer-budget-bytes` (waiting, without the
//! answer made, while the tenant's unread answers hold it all) and gives it back when
//! its body is dropped: written out, or its connection gone. Its body leaves in copies of
//! [`UNCOUNTED`] bytes, so what hyper queues (a few hundred KiB per connection, however
//! large the answer) never keeps the whole answer alive after the budget let go of it.
//! Another tenant's answers wait for nothing of this one's.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dashmap::DashMap;
use hyper::body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::ApiError;
use crate::metrics::{AnswerApi, answers_held};

/// Answers up to this size are not counted (one such is all a connection holds beyond
/// hyper's own write buffer), and larger ones are written in pieces of it.
pub(crate) const UNCOUNTED: usize = 64 * 1024;

/// Each tenant's budget of unread HTTP answer bytes.
#[derive(Debug)]
pub(crate) struct AnswerBudgets {
    /// Bytes per tenant (`--http-answer-budget-bytes`).
    budget: usize,
    tenants: DashMap<String, Arc<Semaphore>>,
}

impl AnswerBudgets {
    /// Budgets of `budget` bytes per tenant.
    pub(crate) fn new(budget: usize) -> Self {
        Self { budget: budget.min(Semaphore::MAX_PERMITS), tenants: DashMap::new() }
    }

    fn of(&self, tenant: &str) -> Arc<Semaphore> {
        if let Some(s) = self.tenants.get(tenant) {
            return s.clone();
        }
        self.tenants
            .entry(tenant.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.budget)))
            .clone()
    }

    /// The status and JSON `make` answers, within `tenant`'s budget (an operator's:
    /// `None`). `make` runs again after a wait for room, so the answer is the job as it
    /// stands when it can be held.
    pub(crate) async fn json(
        &self,
        tenant: Option<&str>,
        mut make: impl FnMut() -> Result<(StatusCode, Vec<u8>), serde_json::Error>,
    ) -> Result<Response, ApiError> {
        let (mut status, mut body) = make().map_err(ApiError::internal)?;
        if body.len() <= UNCOUNTED {
            return Ok(json_response(status, Body::from(body)));
        }
        let room = self.of(tenant.unwrap_or_default());
        let permit = loop {
            // One larger than the whole budget takes all of it.
            let want = body.len().min(self.budget);
            let n = u32::try_from(want).unwrap_or(u32::MAX);
            match room.clone().try_acquire_many_owned(n) {
                Ok(permit) => break permit,
                Err(TryAcquireError::Closed) => return Err(ApiError::internal("budget closed")),
                Err(TryAcquireError::NoPermits) => {}
            }
            // Wait without the answer made: a wait holds nothing but the job.
            drop(body);
            let permit = room.clone().acquire_many_owned(n).await.map_err(ApiError::internal)?;
            (status, body) = make().map_err(ApiError::internal)?;
            if body.len().min(self.budget) <= want {
                break permit;
            }
            // The job grew while this waited: ask for its new size.
        };
        Ok(json_response(status, Body::new(HeldBody::new(body, permit))))
    }

    /// `v` as a 200's JSON, within the budget of `tenant`.
    pub(crate) async fn value(
        &self,
        tenant: Option<&str>,
        v: &impl serde::Serialize,
    ) -> Result<Response, ApiError> {
        self.json(tenant, || Ok((StatusCode::OK, serde_json::to_vec(v)?))).await
    }
}

fn json_response(status: StatusCode, body: Body) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// An answer that holds its bytes of the tenant's budget until it is dropped, and leaves
/// in copies of [`UNCOUNTED`] bytes.
struct HeldBody {
    data: Vec<u8>,
    at: usize,
    /// Bytes of the budget held (and added to `runnel_http_answer_bytes`).
    held: u32,
    _permit: OwnedSemaphorePermit,
}

impl HeldBody {
    fn new(data: Vec<u8>, permit: OwnedSemaphorePermit) -> Self {
        let held = u32::try_from(permit.num_permits()).unwrap_or(u32::MAX);
        answers_held(AnswerApi::Http, i64::from(held));
        Self { data, at: 0, held, _permit: permit }
    }
}

impl Drop for HeldBody {
    fn drop(&mut self) {
        answers_held(AnswerApi::Http, -i64::from(self.held));
    }
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let end = this.data.len().min(this.at + UNCOUNTED);
        if this.at >= end {
            return Poll::Ready(None);
        }
        // A copy, not a slice: a slice would keep all of `data` alive in hyper's queue.
        let piece = Bytes::copy_from_slice(&this.data[this.at..end]);
        this.at = end;
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.at >= self.data.len()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.data.len() - self.at) as u64)
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn an_answer_leaves_whole_in_pieces_and_its_room_returns_when_dropped() {
        let budgets = AnswerBudgets::new(1 << 20);
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let answer = budgets
            .json(Some("acme"), || Ok((StatusCode::OK, big.clone())))
            .await
            .unwrap_or_else(|_| panic!("answered"));
        let room = budgets.of("acme");
        assert_eq!(room.available_permits(), (1 << 20) - big.len());
        // Another tenant's room is its own.
        assert_eq!(budgets.of("other").available_permits(), 1 << 20);
        let mut body = answer.into_body().into_data_stream();
        let mut got = Vec::new();
        let mut pieces = 0;
        while let Some(data) = body.next().await {
            let data = data.expect("a piece");
            assert!(data.len() <= UNCOUNTED);
            got.extend_from_slice(&data);
            pieces += 1;
        }
        assert_eq!((got, pieces), (big, 5));
        drop(body);
        assert_eq!(room.available_permits(), 1 << 20);
    }

    #[tokio::test]
    async fn an_answer_past_the_room_waits_for_it_and_is_made_again() {
        let budgets = AnswerBudgets::new(1 << 20);
        let first = budgets
            .json(Some("acme"), || Ok((StatusCode::OK, vec![b'a'; 900_000])))
            .await
            .unwrap_or_else(|_| panic!("answered"));
        let made = std::sync::atomic::AtomicUsize::new(0);
        let second = budgets.json(Some("acme"), || {
            made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok((StatusCode::OK, vec![b'b'; 200_000]))
        });
        tokio::pin!(second);
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(100), second.as_mut()).await;
        assert!(waited.is_err(), "answered past the budget");
        drop(first);
        let second = second.await.unwrap_or_else(|_| panic!("answered"));
        // Made once to learn its size, dropped, and made again once there was room.
        assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 2);
        let bytes = axum::body::to_bytes(second.into_body(), usize::MAX).await.expect("a body");
        assert_eq!(bytes.len(), 200_000);
    }
}
