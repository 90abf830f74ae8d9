//! The API's accept loop: hyper's HTTP/1 server with its header-read timer, instead of
//! `axum::serve`, which has neither that timer nor a connection cap.
//!
//! - A client must finish its request headers within `--http-header-timeout`; on a
//!   keep-alive connection the same timer runs from the end of one response to the end of
//!   the next request's headers, so an idle connection is closed after it too.
//! - A request body must arrive within `--http-body-timeout`.
//! - A client with an answer to take must take some of it within `--api-send-timeout`
//!   of the socket filling up, or its connection is closed (and the answer, with its
//!   share of the tenant's answer budget, let go of).
//! - At most `--http-max-connections` are open, and at most
//!   `--http-max-connections-per-source` from one source address; past either a new
//!   connection is closed at once (and counted by `limit`), so half-sent requests cannot
//!   take every socket and task, and one client cannot take every place.
//! - Each request is checked against its source's rate limit before it reaches the router
//!   (`Connection`: no middleware, so no boxed future per request for it), and the source
//!   address reaches the handlers as `ConnectInfo`.
//! - With `--http-tls`, each connection is a TLS 1.3 server handshake (tokio-rustls)
//!   first, bounded by the header timeout, then HTTP/1.1 inside it.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use futures::future::{Either, Ready, ready};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::deadline::{SendDeadline, Stall};
use crate::metrics::names;
use crate::open_counts::OpenCounts;
use crate::shared::Shared;

/// Serves `app` on `listener` (through `tls` when set) until `stop`; then lets open
/// requests finish. `shared` holds the configuration and the per-source rate limit.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: CancellationToken,
) {
    let config = &shared.config;
    let slots = Arc::new(Semaphore::new(config.http_max_connections));
    let per_source = Arc::new(OpenCounts::<IpAddr>::default());
    let most_per_source = config.http_max_connections_per_source;
    let (header_timeout, body_timeout) = (config.http_header_timeout, config.http_body_timeout);
    let send_timeout = config.api_send_timeout;
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(names::HTTP_CONNECTIONS_REFUSED, "limit" => "all").increment(1);
            drop(stream);
            continue;
        };
        let Some(source_slot) = per_source.open(crate::rate::source_of(peer.ip()), most_per_source)
        else {
            metrics::counter!(names::HTTP_CONNECTIONS_REFUSED, "limit" => "source").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = SendDeadline::new(stream, send_timeout);
        let svc = Connection { app: app.clone(), shared: shared.clone(), peer, body_timeout };
        let (stop, tls) = (stop.clone(), tls.clone());
        conns.spawn(async move {
            let _slots = (slot, source_slot);
            metrics::gauge!(names::HTTP_CONNECTIONS).increment(1.0);
            let result = match tls {
                None => drive(stream, svc, header_timeout, stop).await,
                // The handshake gets the header timeout too: a client that opens a
                // connection and never says hello is closed like a slow request.
                Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                    Ok(Ok(stream)) => drive(stream, svc, header_timeout, stop).await,
                    Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                    Err(_) => Err("TLS handshake timed out".to_owned()),
                },
            };
            // Timeouts, resets and bad handshakes are the client's business: debug only.
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            metrics::gauge!(names::HTTP_CONNECTIONS).decrement(1.0);
        });
    }
    while conns.join_next().await.is_some() {}
}

/// Serves HTTP/1.1 on one connection until it ends, or `stop` (then gracefully).
async fn drive<I, S>(
    io: I,
    svc: S,
    header_timeout: Duration,
    stop: CancellationToken,
) -> Result<(), String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            hyper::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let conn = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    let done = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = stop.cancelled() => None,
    };
    let result = match done {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    result.map_err(|e| e.to_string())
}

/// One connection's requests: each checked against its source's rate limit (429 with
/// `Retry-After` past it, before routing and authentication), then given its body deadline
/// and its source (`ConnectInfo`) and handed to the router.
#[derive(Clone)]
struct Connection {
    app: Router,
    shared: Arc<Shared>,
    peer: SocketAddr,
    body_timeout: Duration,
}

impl tower::Service<hyper::Request<Incoming>> for Connection {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Either<
        Ready<Result<Response, Self::Error>>,
        <Router as tower::Service<axum::extract::Request>>::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<axum::extract::Request>::poll_ready(&mut self.app, cx)
    }

    fn call(&mut self, req: hyper::Request<Incoming>) -> Self::Future {
        if let Err(refused) = self.shared.rate_limits.check_source(self.peer.ip()) {
            return Either::Left(ready(Ok(refused.into_response())));
        }
        let body_timeout = self.body_timeout;
        let mut req = req.map(|b| axum::body::Body::new(BodyDeadline::new(b, body_timeout)));
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(self.peer));
        Either::Right(self.app.call(req))
    }
}

/// A request body that must keep coming: each frame within `limit` of the broker starting
/// to wait for it (`--http-body-timeout`), else the read fails and the request is refused.
/// The timer is armed only when a frame is not already there, so a body that came with its
/// headers (nearly every API request) costs no timer; tower-http's `TimeoutBody` armed and
/// dropped one for every frame (1.5% of the broker's CPU per HTTP job).
struct BodyDeadline {
    body: Incoming,
    stall: Stall,
}

impl BodyDeadline {
    fn new(body: Incoming, limit: Duration) -> Self {
        Self { body, stall: Stall::new(limit) }
    }
}

/// The body did not come within `--http-body-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within the body timeout")]
struct BodyTimedOut;

impl hyper::body::Body for BodyDeadline {
    type Data = axum::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.stall.progressed();
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending if this.stall.expired(cx) => {
                Poll::Ready(Some(Err(Box::new(BodyTimedOut))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
