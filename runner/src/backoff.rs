//! Reconnect backoff: exponential ceiling, full jitter. With full jitter each delay is drawn
//! anywhere in `[0, ceiling]`, so a fleet that lost its broker at the same instant does not
//! come back in step (the reconnect storm a restart would otherwise cause).

use std::time::Duration;

use rand::Rng;

/// First reconnect delay ceiling.
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(200);
/// Largest reconnect delay ceiling.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// First reconnect delay ceiling after an established session was lost (or the broker sent
/// the runner away). A fleet loses its broker at the same instant, and runners that
/// connected together heartbeat in step, so they notice together too: drawn from 200 ms
/// they all came back within 0.4 s (tests/nat.rs, 500 runners: 32% of them in one 100 ms
/// window; 14-18% drawn from 2 s, on a 2-core machine that also runs the 500 runners).
/// One runner whose network blipped waits 1 s on average, after an idle timeout of 15 s;
/// a cluster failover (lease TTL, then the redial) stays within 10 s. Failures after this
/// first delay climb from [`BACKOFF_START`] again.
pub(crate) const LOST_SESSION_SPREAD: Duration = Duration::from_secs(2);
/// Largest delay ceiling while live nodes still name a home that just stopped answering
/// (see [`Backoff::awaiting_failover`]).
pub(crate) const FAILOVER_POLL: Duration = Duration::from_secs(1);

/// The reconnect delays of one runner.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    ceiling: Duration,
    /// The next delay is drawn from [`LOST_SESSION_SPREAD`] (once).
    spread_next: bool,
}

impl Backoff {
    /// Starts at [`BACKOFF_START`].
    pub(crate) fn new() -> Self {
        Self { ceiling: BACKOFF_START, spread_next: false }
    }

    /// After a success (a renewal went through): the next failure starts small again.
    pub(crate) fn reset(&mut self) {
        self.ceiling = BACKOFF_START;
    }

    /// After a session that got as far as Welcome and was then lost: the next delay is
    /// drawn from [`LOST_SESSION_SPREAD`]; failures after it start small again, so that a
    /// runner waiting for a failover (its tenant's next home) is not kept away for long.
    pub(crate) fn after_lost_session(&mut self) {
        self.ceiling = BACKOFF_START;
        self.spread_next = true;
    }

    /// The broker refused a connection (busy, or stopping): the next delay is drawn from at
    /// least [`LOST_SESSION_SPREAD`]; the ceiling keeps doubling.
    pub(crate) fn spread(&mut self) {
        self.spread_next = true;
    }

    /// A live node named as the tenant's home the node that just stopped answering: the
    /// cluster has not yet seen that home's lease run out, which it will within the lease
    /// TTL. The next delay is drawn from at most [`FAILOVER_POLL`], so the runner is back
    /// within about that of the new claim. Left to double, the ceiling reached 3.2 s by
    /// the claim (the 4th or 5th refusal), and a failover took 10.8 s on CI instead of 5.5.
    /// A fleet's extra handshakes stay bounded: one per runner per half second on
    /// average, for at most the lease TTL.
    pub(crate) fn awaiting_failover(&mut self) {
        self.ceiling = self.ceiling.min(FAILOVER_POLL);
    }

    /// The delay before the next attempt, drawn uniformly in `[0, ceiling]`; the ceiling
    /// then doubles, up to [`BACKOFF_MAX`].
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = if std::mem::take(&mut self.spread_next) {
            self.ceiling.max(LOST_SESSION_SPREAD)
        } else {
            self.ceiling
        };
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        let delay = Duration::from_millis(rng.random_range(0..=ceiling_ms));
        self.ceiling = (self.ceiling * 2).min(BACKOFF_MAX);
        delay
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn the_ceiling_doubles_to_its_cap_and_a_lost_session_starts_over_at_the_spread() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new();
        let mut ceiling = BACKOFF_START;
        for _ in 0..20 {
            let d = b.next_delay(&mut rng);
            assert!(d <= ceiling, "{d:?} over its ceiling {ceiling:?}");
            ceiling = (ceiling * 2).min(BACKOFF_MAX);
        }
        assert_eq!(b.ceiling, BACKOFF_MAX);
        b.after_lost_session();
        assert!(b.next_delay(&mut rng) <= LOST_SESSION_SPREAD);
        // Only the first: the failures after it climb from the start again.
        assert!(b.next_delay(&mut rng) <= BACKOFF_START * 2);
        assert_eq!(b.ceiling, BACKOFF_START * 4);
        b.spread();
        assert!(b.next_delay(&mut rng) <= LOST_SESSION_SPREAD);
        assert!(b.next_delay(&mut rng) <= BACKOFF_START * 16);
        b.reset();
        assert!(b.next_delay(&mut rng) <= BACKOFF_START);
    }

    #[test]
    fn awaiting_a_failover_never_waits_past_the_poll() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::new();
        b.after_lost_session();
        for i in 0..50 {
            b.awaiting_failover();
            let d = b.next_delay(&mut rng);
            let most = if i == 0 { LOST_SESSION_SPREAD } else { FAILOVER_POLL };
            assert!(d <= most, "delay {i}: {d:?} over {most:?}");
        }
        // Another failure after it climbs as before.
        let mut top = Duration::ZERO;
        for _ in 0..10 {
            top = top.max(b.next_delay(&mut rng));
        }
        assert!(top > FAILOVER_POLL * 4, "{top:?}");
    }

    #[test]
    fn full_jitter_spreads_a_fleet_over_the_whole_window() {
        // 1000 runners at the cap: the delays cover [0, 30 s] rather than bunching.
        let mut rng = StdRng::seed_from_u64(42);
        let delays: Vec<Duration> = (0..1000)
            .map(|_| Backoff { ceiling: BACKOFF_MAX, spread_next: false }.next_delay(&mut rng))
            .collect();
        let tenth = BACKOFF_MAX / 10;
        for i in 0..10 {
            let (lo, hi) = (tenth * i, tenth * (i + 1));
            let n = delays.iter().filter(|d| **d >= lo && **d < hi).count();
            assert!((50..=150).contains(&n), "{n} of 1000 delays in [{lo:?}, {hi:?})");
        }
    }
}
