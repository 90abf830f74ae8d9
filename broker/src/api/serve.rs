//! The API's accept loop: hyper's HTTP/1 server with its header-read timer, instead of
//! `axum::serve`, which has neither that timer nor a connection cap.
//!
//! - A client must finish its request headers within `--http-header-timeout`; on a
//!   keep-alive connection the same timer runs from the end of one response to the end of
//!   the next request's headers, so an idle connection is closed after it too.
//! - A request body must arrive within `--http-body-timeout`.
//! - At most `--http-max-connections` are open; past that a new connection is closed at
//!   once (and counted), so half-sent requests cannot take every socket and task.
//! - The source address reaches the handlers as `ConnectInfo` (per-source rate limit).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use crate::config::Config;
use crate::metrics::names;

/// Serves `app` on `listener` until `stop`; then lets open requests finish.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    config: &Config,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(config.http_max_connections));
    let (header_timeout, body_timeout) = (config.http_header_timeout, config.http_body_timeout);
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
            metrics::counter!(names::HTTP_CONNECTIONS_REFUSED).increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = app.clone().map_request(move |req: hyper::Request<Incoming>| {
            let mut req = req.map(|b| axum::body::Body::new(TimeoutBody::new(body_timeout, b)));
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            req
        });
        let stop = stop.clone();
        conns.spawn(async move {
            let _slot = slot;
            metrics::gauge!(names::HTTP_CONNECTIONS).increment(1.0);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
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
            // Timeouts and resets are the client's business; nothing to log at warn.
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            metrics::gauge!(names::HTTP_CONNECTIONS).decrement(1.0);
        });
    }
    while conns.join_next().await.is_some() {}
}
