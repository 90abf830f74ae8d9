//! Token buckets (GCRA through `governor`) in the one shape the broker uses everywhere: a
//! rate per second with a burst of twice that, where a rate of 0 means "no limit". The API's
//! request limits and the QUIC intake limits are built from these.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// `rate` per second, burst `2 × rate`; None for 0.
fn quota(rate: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst = rate.saturating_mul(NonZeroU32::MIN.saturating_add(1));
    Some(Quota::per_second(rate).allow_burst(burst))
}

/// Whole seconds (at least 1) until `not_until`: a client that waits this long is not
/// refused again.
fn wait_secs(not_until: &governor::NotUntil<<DefaultClock as Clock>::Instant>) -> u64 {
    let wait = not_until.wait_time_from(DefaultClock::default().now());
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// The source a limit per source counts `ip` under: an IPv4 address (an IPv4-mapped IPv6
/// one too) as it is, an IPv6 address by its /64, the prefix one host or site is usually
/// given, so that one client cannot take a new place with each of its 2^64 addresses.
pub(crate) fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !(u128::from(u64::MAX));
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// One bucket per key (a source address, a key id).
#[derive(Debug)]
pub(crate) struct Keyed<K: Hash + Eq + Clone> {
    limiter: Option<DefaultKeyedRateLimiter<K>>,
    /// What a bucket holds when full.
    burst: u32,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    /// `rate` per second per key (0: no limit).
    pub(crate) fn new(rate: u32) -> Self {
        let quota = quota(rate);
        let burst = quota.map_or(0, |q| q.burst_size().get());
        Self { limiter: quota.map(RateLimiter::keyed), burst }
    }

    /// Takes one token of `key`'s bucket; Err: the seconds until one is there.
    pub(crate) fn check(&self, key: &K) -> Result<(), u64> {
        match &self.limiter {
            Some(l) => l.check_key(key).map_err(|n| wait_secs(&n)),
            None => Ok(()),
        }
    }

    /// The rest of `n` requests of `key` whose first already took its token (a batch's
    /// jobs past the first), taken together or not at all. Err(Some(secs)): there is room
    /// in `secs`; Err(None): never, `n` is more than the bucket holds.
    pub(crate) fn check_rest_of(&self, key: &K, n: usize) -> Result<(), Option<u64>> {
        let Some(l) = &self.limiter else { return Ok(()) };
        let Ok(n) = u32::try_from(n) else { return Err(None) };
        if n > self.burst {
            return Err(None);
        }
        let Some(rest) = NonZeroU32::new(n.saturating_sub(1)) else { return Ok(()) };
        match l.check_key_n(key, rest) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(wait_secs(&not_until))),
            Err(_) => Err(None),
        }
    }

    /// Forgets the buckets that are full again (an idle key costs nothing): run
    /// periodically, so that a scan from many addresses does not grow the table for good.
    pub(crate) fn forget_idle(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// One bucket for everything (the rate of incoming QUIC connections).
#[derive(Debug)]
pub(crate) struct Direct {
    limiter: Option<DefaultDirectRateLimiter>,
}

impl Direct {
    /// `rate` per second (0: no limit: [`Direct::check`] always passes).
    pub(crate) fn new(rate: u32) -> Self {
        Self { limiter: quota(rate).map(RateLimiter::direct) }
    }

    /// Takes one token; false when the bucket is empty.
    pub(crate) fn check(&self) -> bool {
        self.limiter.as_ref().is_none_or(|l| l.check().is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(source_of(ip("10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(source_of(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(source_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")), ip("2001:db8:1:2::"));
        assert_ne!(source_of(ip("2001:db8:1:3::1")), source_of(ip("2001:db8:1:2::1")));
        assert_eq!(source_of(ip("::1")), ip("::"));
    }

    #[test]
    fn a_burst_of_twice_the_rate_passes_then_the_bucket_holds_and_zero_is_off() {
        let keyed = Keyed::<u8>::new(5);
        for _ in 0..10 {
            keyed.check(&1).expect("within the burst");
        }
        let wait = keyed.check(&1).expect_err("over the burst");
        assert!(wait >= 1, "{wait}");
        keyed.check(&2).expect("another key has its own bucket");
        let direct = Direct::new(3);
        assert_eq!((0..7).filter(|_| direct.check()).count(), 6);
        let (off, off_direct) = (Keyed::<u8>::new(0), Direct::new(0));
        assert!((0..10_000).all(|_| off.check(&1).is_ok() && off_direct.check()));
    }

    #[test]
    fn the_rest_of_a_batch_is_taken_whole_or_not_at_all_and_past_the_burst_never() {
        let keyed = Keyed::<u8>::new(5);
        // More than a full bucket can never pass, whatever is left in it.
        assert_eq!(keyed.check_rest_of(&1, 11), Err(None));
        assert_eq!(keyed.check_rest_of(&1, usize::MAX), Err(None));
        // The first of 7 was taken on its own; the other 6 now, together.
        keyed.check(&1).expect("the request");
        keyed.check_rest_of(&1, 7).expect("6 of the 9 left");
        // The next request leaves 2: the rest of 5 (4) does not fit, and takes none.
        keyed.check(&1).expect("the next request");
        assert!(matches!(keyed.check_rest_of(&1, 5), Err(Some(s)) if s >= 1));
        keyed.check_rest_of(&1, 3).expect("the 2 still there");
        // A batch of one takes nothing more; a limit of 0 takes nothing at all.
        keyed.check_rest_of(&1, 1).expect("nothing to take");
        assert_eq!(Keyed::<u8>::new(0).check_rest_of(&1, 1_000_000), Ok(()));
    }
}
