//! Request rate limits (GCRA through `governor`): one bucket per source address, checked
//! before anything else, and one per API key, checked once the key is verified (so that a
//! stranger cannot spend someone else's budget). Over the limit: 429 with `Retry-After`.

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::StatusCode;

use super::ApiError;
use crate::metrics::names;
use crate::rate::Keyed;

/// The broker's two keyed limiters; a rate of 0 turns one off.
#[derive(Debug)]
pub(crate) struct RateLimits {
    per_source: Keyed<IpAddr>,
    /// By key id, shared with the callers ([`super::Caller::key_id`]): no copy per request.
    per_key: Keyed<Arc<str>>,
}

impl RateLimits {
    /// Limits of `per_source` and `per_key` requests per second (0: no limit).
    pub(crate) fn new(per_source: u32, per_key: u32) -> Self {
        Self { per_source: Keyed::new(per_source), per_key: Keyed::new(per_key) }
    }

    fn refuse(which: &'static str, secs: u64) -> ApiError {
        metrics::counter!(names::HTTP_RATE_LIMITED, "limit" => which).increment(1);
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests from this {which}; retry after {secs} s"),
        )
        .retry_after(secs)
    }

    /// One request from `ip` (its source: [`crate::rate::source_of`]).
    pub(crate) fn check_source(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.per_source.check(&crate::rate::source_of(ip)).map_err(|s| Self::refuse("source", s))
    }

    /// One request with the verified key `key_id`.
    pub(crate) fn check_key(&self, key_id: &Arc<str>) -> Result<(), ApiError> {
        self.per_key.check(key_id).map_err(|s| Self::refuse("key", s))
    }

    /// The rest of `n` requests with the verified key `key_id` whose first was counted
    /// when the key was checked (a batch's jobs past the first), taken together or not at
    /// all; more than the key's burst is refused for good (400), not told to wait.
    pub(crate) fn check_key_rest(&self, key_id: &Arc<str>, n: usize) -> Result<(), ApiError> {
        self.per_key.check_rest_of(key_id, n).map_err(|wait| match wait {
            Some(secs) => Self::refuse("key", secs),
            None => ApiError::bad_request(format!(
                "{n} jobs at once are more than this key's rate limit allows; send fewer"
            )),
        })
    }

    /// Forgets the buckets that are full again (see [`Keyed::forget_idle`]).
    pub(crate) fn forget_idle(&self) {
        self.per_source.forget_idle();
        self.per_key.forget_idle();
    }
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
        let (k1, k2): (Arc<str>, Arc<str>) = ("k1".into(), "k2".into());
        for _ in 0..6 {
            l.check_key(&k1).expect("within the burst");
        }
        // Another Arc of the same id is the same key.
        assert!(l.check_key(&"k1".into()).is_err());
        assert!(l.check_key(&k2).is_ok());
        let off = RateLimits::new(0, 0);
        for _ in 0..10_000 {
            off.check_source(ip).expect("no limit");
            off.check_key(&k1).expect("no limit");
        }
    }
}
