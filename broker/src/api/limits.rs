//! Request rate limits (GCRA through `governor`): one bucket per source address, checked
//! before anything else, and one per API key, checked once the key is verified (so that a
//! stranger cannot spend someone else's budget). Over the limit: 429 with `Retry-After`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::ApiError;
use crate::metrics::names;
use crate::shared::Shared;

/// The broker's two keyed limiters; a rate of 0 turns one off.
#[derive(Debug)]
pub(crate) struct RateLimits {
    per_source: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_key: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

/// `rate` requests per second with a burst of twice that; None for 0 (off).
fn limiter<K: std::hash::Hash + Eq + Clone>(rate: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    let rate = NonZeroU32::new(rate)?;
    let burst = rate.saturating_mul(NonZeroU32::MIN.saturating_add(1));
    Some(RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)))
}

impl RateLimits {
    /// Limits of `per_source` and `per_key` requests per second (0: no limit).
    pub(crate) fn new(per_source: u32, per_key: u32) -> Self {
        Self {
            per_source: limiter(per_source),
            per_key: limiter(per_key),
            clock: DefaultClock::default(),
        }
    }

    fn refuse(
        &self,
        which: &'static str,
        not_until: governor::NotUntil<<DefaultClock as Clock>::Instant>,
    ) -> ApiError {
        metrics::counter!(names::HTTP_RATE_LIMITED, "limit" => which).increment(1);
        let wait = not_until.wait_time_from(self.clock.now());
        // Whole seconds, rounded up: a client that honours it is not refused again.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests from this {which}; retry after {secs} s"),
        )
        .retry_after(secs.max(1))
    }

    /// One request from `ip`.
    pub(crate) fn check_source(&self, ip: IpAddr) -> Result<(), ApiError> {
        match &self.per_source {
            Some(l) => l.check_key(&ip.to_canonical()).map_err(|n| self.refuse("source", n)),
            None => Ok(()),
        }
    }

    /// One request with the verified key `key_id`.
    pub(crate) fn check_key(&self, key_id: &str) -> Result<(), ApiError> {
        match &self.per_key {
            Some(l) => l.check_key(&key_id.to_owned()).map_err(|n| self.refuse("key", n)),
            None => Ok(()),
        }
    }

    /// Forgets the buckets that are full again (an idle source costs nothing): run
    /// periodically, so that a scan from many addresses does not grow the table for good.
    pub(crate) fn forget_idle(&self) {
        if let Some(l) = &self.per_source {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.per_key {
            l.retain_recent();
        }
    }
}

/// Middleware: the per-source limit, before routing and authentication.
pub(super) async fn per_source(
    State(shared): State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    // Set by the accept loop (`serve`) for every connection.
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<std::net::SocketAddr>>() {
        shared.rate_limits.check_source(peer.ip())?;
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_limit_holds_per_key_and_off_means_off() {
        let l = RateLimits::new(5, 3);
        let ip: IpAddr = [10, 0, 0, 1].into();
        // Burst = 2 × rate.
        for _ in 0..10 {
            l.check_source(ip).expect("within the burst");
        }
        let refused = l.check_source(ip).expect_err("over the burst");
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.retry_after.is_some_and(|s| s >= 1));
        // Another source has its own bucket.
        l.check_source([10, 0, 0, 2].into()).expect("another source");
        for _ in 0..6 {
            l.check_key("k1").expect("within the burst");
        }
        assert!(l.check_key("k1").is_err());
        assert!(l.check_key("k2").is_ok());
        let off = RateLimits::new(0, 0);
        for _ in 0..10_000 {
            off.check_source(ip).expect("no limit");
            off.check_key("k1").expect("no limit");
        }
    }
}
