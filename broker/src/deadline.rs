//! Timers armed only while something waits: a request body that stops coming (HTTP's
//! `BodyDeadline` uses [`Stall`]), and a client that stops taking what is written to it
//! ([`SendDeadline`]: `--api-send-timeout`, on HTTP connections and native API streams).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// A timer armed only while something waits: it fires `limit` after a wait began, unless
/// progress came first. Nothing is armed for what is ready at once.
pub(crate) struct Stall {
    limit: Duration,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stall {
    pub(crate) fn new(limit: Duration) -> Self {
        Self { limit, waiting: None }
    }

    /// After a poll that made progress: the next wait starts afresh.
    pub(crate) fn progressed(&mut self) {
        self.waiting = None;
    }

    /// After a poll that did not: whether `limit` has passed since the wait began (else
    /// `cx` is woken when it does).
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let waiting = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        waiting.as_mut().poll(cx).is_ready()
    }
}

/// Writes that must make progress: once the socket (or a QUIC stream's flow control)
/// stops taking bytes, the client has `limit` (`--api-send-timeout`) to take some, or the
/// write fails with `TimedOut` (hyper then closes the connection; the native API resets
/// the stream). The timer is armed only while a write waits, so a client that reads
/// costs none.
pub(crate) struct SendDeadline<I> {
    io: I,
    stall: Stall,
}

/// Why a write past its deadline failed (inside its `TimedOut` I/O error).
#[derive(Debug, thiserror::Error)]
#[error("the client took none of its answer within the send timeout")]
struct SendStalled;

/// The error a write past its deadline fails with.
fn stalled() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, SendStalled)
}

/// Whether `e` is a write past its deadline (not some other timeout underneath).
pub(crate) fn is_stalled(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<SendStalled>())
}

impl<I> SendDeadline<I> {
    pub(crate) fn new(io: I, limit: Duration) -> Self {
        Self { io, stall: Stall::new(limit) }
    }

    /// What it wraps.
    pub(crate) fn get_mut(&mut self) -> &mut I {
        &mut self.io
    }

    /// `polled`, a write's outcome, held to the deadline.
    fn held<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stall.progressed();
            return polled;
        }
        if self.stall.expired(cx) {
            return Poll::Ready(Err(stalled()));
        }
        Poll::Pending
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for SendDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SendDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.held(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.held(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.held(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.held(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_write_nobody_takes_fails_after_its_limit_and_one_taken_in_time_does_not() {
        let limit = Duration::from_millis(300);
        // A pipe whose reader takes nothing: 64 bytes fit, then writes wait.
        let (_reader, writer) = tokio::io::duplex(64);
        let mut w = SendDeadline::new(writer, limit);
        w.write_all(&[1; 64]).await.expect("fits");
        let started = std::time::Instant::now();
        let e = w.write_all(&[2; 64]).await.expect_err("nobody takes it");
        assert!(is_stalled(&e), "{e}");
        assert!(started.elapsed() >= limit, "gave up after {:?}", started.elapsed());
        // Another timeout is not this one.
        assert!(!is_stalled(&std::io::Error::new(std::io::ErrorKind::TimedOut, "other")));

        // A reader that takes a little every 200 ms keeps the writer going well past the
        // limit in all: only a wait with no progress counts.
        let (mut reader, writer) = tokio::io::duplex(64);
        let mut w = SendDeadline::new(writer, limit);
        let slow = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut got = 0;
            while got < 384 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                got += reader.read(&mut buf).await.expect("read");
            }
        });
        let started = std::time::Instant::now();
        w.write_all(&[3; 384]).await.expect("taken in time, if slowly");
        assert!(started.elapsed() > limit);
        slow.await.expect("reader");
    }
}
