//! An outbox: a stream's last frame, written (and the stream ended) by one task per
//! connection, so that frames posted at about the same time by different tasks leave in
//! the same datagrams.
//!
//! quinn sends a connection's data from its driver task, which a write wakes. A task that
//! wrote its own frame woke the driver and went on to wait; tokio ran the driver next on
//! that thread, and it sent the one frame in a datagram of its own: one UDP send per call
//! (the client's requests) or per job (a runner's results), and one more datagram for the
//! broker to receive, decrypt and acknowledge (`runnel-bench load --api native`,
//! BENCHMARKS.md). The outbox first lets every other task that is ready run
//! ([`tokio::task::yield_now`], which waits until the thread has run what is ready), then
//! writes all that has come in before the driver runs, so quinn packs them together. A
//! frame posted alone is written at once.
//!
//! Generic over the stream (`AsyncWrite`, ended with `shutdown`: for a quinn `SendStream`,
//! `finish`), so this crate stays without sockets.

use std::task::{Context, Poll};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Frames taken from the queue per round (more wait for the next round).
const ROUND: usize = 256;

/// One stream's last frame, and where to hand the stream back once it is written and
/// ended (`None`: drop it).
struct Letter<W> {
    stream: W,
    frame: Vec<u8>,
    back: Option<oneshot::Sender<std::io::Result<W>>>,
}

/// Where tasks post a stream's last frame. Clones share the task, which ends once every
/// clone is gone and it has written what it holds. It is unbounded: what it holds is
/// bounded by what its owner has in flight (a client's turns, a runner's capacity).
pub struct Outbox<W> {
    queue: mpsc::UnboundedSender<Letter<W>>,
}

impl<W> Clone for Outbox<W> {
    fn clone(&self) -> Self {
        Self { queue: self.queue.clone() }
    }
}

impl<W> std::fmt::Debug for Outbox<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> Outbox<W> {
    /// Starts the outbox's task on the current tokio runtime.
    pub fn start() -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_letters(rx));
        Self { queue }
    }

    /// Writes `frame` (encoded, one or more frames) to `stream` and ends it, then drops
    /// the stream. A failed write is not reported: the peer's answer on that stream
    /// (which the caller reads) fails with the connection's error. Answers the stream back
    /// only if the outbox's task has ended (its runtime is shutting down).
    pub fn post(&self, stream: W, frame: Vec<u8>) -> Result<(), W> {
        self.queue.send(Letter { stream, frame, back: None }).map_err(|e| e.0.stream)
    }

    /// Writes `frame` to `stream` and ends it, as [`Outbox::post`] does; answers the
    /// stream once both are done (to wait, say, for the peer to acknowledge it), or the
    /// write's error.
    pub async fn deliver(&self, stream: W, frame: Vec<u8>) -> std::io::Result<W> {
        let (back, written) = oneshot::channel();
        let gone = || std::io::Error::other("the outbox has stopped");
        self.queue.send(Letter { stream, frame, back: Some(back) }).map_err(|_| gone())?;
        written.await.map_err(|_| gone())?
    }
}

/// Lets the tasks already woken run first and post theirs ([`tokio::task::yield_now`]),
/// then takes what has come into `queue` meanwhile, until `round` holds `most`. How a
/// writer that has just been woken by one frame collects the others of the same moment,
/// so that they share datagrams (the outbox, a client's lane).
pub async fn gather<T>(queue: &mut impl Queue<T>, round: &mut Vec<T>, most: usize) {
    tokio::task::yield_now().await;
    while round.len() < most {
        match queue.take() {
            Some(more) => round.push(more),
            None => break,
        }
    }
}

/// Writes the frames posted to `queue` on a lane (`send`), `first` ahead of them: those
/// posted together ([`gather`]) in one write, so that they share datagrams. Answers when
/// every sender is gone and all is written (`true`), or when a write failed (`false`).
/// The writer of a client's lane, a runner's job lane and a simulated runner's.
pub async fn write_lane<W, Q>(send: &mut W, queue: &mut Q, first: Vec<u8>) -> bool
where
    W: AsyncWrite + Unpin,
    Q: Queue<Vec<u8>>,
{
    let mut round = Vec::with_capacity(ROUND);
    let mut out = first;
    while std::future::poll_fn(|cx| queue.poll_many(cx, &mut round, ROUND)).await > 0 {
        gather(queue, &mut round, ROUND).await;
        for frame in round.drain(..) {
            out.extend_from_slice(&frame);
        }
        if send.write_all(&out).await.is_err() {
            return false;
        }
        out.clear();
    }
    out.is_empty() || send.write_all(&out).await.is_ok()
}

/// A channel's receiving end that [`gather`] and [`write_lane`] take from.
pub trait Queue<T> {
    /// The next item if one is there.
    fn take(&mut self) -> Option<T>;
    /// Waits for items and moves up to `most` of them into `buf`; `0` once every sender
    /// is gone and nothing is left.
    fn poll_many(&mut self, cx: &mut Context<'_>, buf: &mut Vec<T>, most: usize) -> Poll<usize>;
}

impl<T> Queue<T> for mpsc::UnboundedReceiver<T> {
    fn take(&mut self) -> Option<T> {
        self.try_recv().ok()
    }

    fn poll_many(&mut self, cx: &mut Context<'_>, buf: &mut Vec<T>, most: usize) -> Poll<usize> {
        self.poll_recv_many(cx, buf, most)
    }
}

impl<T> Queue<T> for mpsc::Receiver<T> {
    fn take(&mut self) -> Option<T> {
        self.try_recv().ok()
    }

    fn poll_many(&mut self, cx: &mut Context<'_>, buf: &mut Vec<T>, most: usize) -> Poll<usize> {
        self.poll_recv_many(cx, buf, most)
    }
}

/// Writes each letter and ends its stream. A write that cannot finish at once (stream or
/// connection credit) waits without holding back the others.
async fn write_letters<W: AsyncWrite + Unpin>(mut queue: mpsc::UnboundedReceiver<Letter<W>>) {
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
                gather(&mut queue, &mut round, ROUND).await;
                for Letter { mut stream, frame, back } in round.drain(..) {
                    writes.push(async move {
                        let written = match stream.write_all(&frame).await {
                            Ok(()) => stream.shutdown().await,
                            Err(e) => Err(e),
                        };
                        if let Some(back) = back {
                            let _ = back.send(written.map(|()| stream));
                        }
                    });
                }
            }
        }
    }
    while writes.next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Records each write it is given.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_lane_writes_what_was_posted_together_in_one_write_first_ahead() {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
        for frame in [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()] {
            tx.send(frame).await.expect("open");
        }
        let later = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            tx.send(b"d".to_vec()).await.expect("open");
        });
        let mut send = Writes::default();
        assert!(write_lane(&mut send, &mut rx, b"first:".to_vec()).await, "all written");
        later.await.expect("sent");
        assert_eq!(send.0, [b"first:abc".to_vec(), b"d".to_vec()]);
        // Nothing ever posted: `first` is written all the same.
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        drop(tx);
        let mut send = Writes::default();
        assert!(write_lane(&mut send, &mut rx, b"only".to_vec()).await);
        assert_eq!(send.0, [b"only".to_vec()]);
    }

    #[tokio::test]
    async fn frames_are_written_and_their_streams_ended() {
        let outbox = Outbox::start();
        let (near, mut far) = tokio::io::duplex(64);
        outbox.post(near, b"posted".to_vec()).expect("running");
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"posted");

        let (near, mut far) = tokio::io::duplex(64);
        let back = outbox.deliver(near, b"delivered".to_vec()).await.expect("written");
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"delivered");
        drop(back);
    }

    #[tokio::test]
    async fn a_stream_that_cannot_take_its_frame_holds_back_no_other() {
        let outbox = Outbox::start();
        // 4 bytes of room and nobody reading: this write waits.
        let (stuck, _unread) = tokio::io::duplex(4);
        outbox.post(stuck, vec![0; 64]).expect("running");
        let (near, mut far) = tokio::io::duplex(64);
        let written = outbox.deliver(near, b"next".to_vec());
        tokio::time::timeout(std::time::Duration::from_secs(5), written)
            .await
            .expect("not held back")
            .expect("written");
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"next");
    }

    #[tokio::test]
    async fn a_failed_write_is_answered_to_who_waits_for_it() {
        let outbox = Outbox::start();
        let (near, far) = tokio::io::duplex(64);
        drop(far);
        assert!(outbox.deliver(near, b"lost".to_vec()).await.is_err());
    }
}
