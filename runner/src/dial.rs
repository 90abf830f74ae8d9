//! Which broker address the next session dials: the configured addresses in turn, a node a
//! Redirect named, and not the address whose session just failed.
//!
//! When a tenant's home dies, the other nodes go on naming it in their Redirects until its
//! lease runs out (the lease TTL, 5 s by default), and a handshake with a dead node waits
//! out the whole connect timeout. So an address that stopped answering is avoided for
//! [`AVOID_FOR`]: it is skipped in the rotation, and a Redirect to it is not followed,
//! however many live nodes name it. The avoidance ends by itself, because a node that only
//! looked dead from here (a network blip) may still be the home, and then every node keeps
//! naming it.
//!
//! A node that answered, even to refuse (draining, busy, a tenant moving, GoAway), is alive:
//! the rotation moves on from it, and a Redirect to it is followed. Avoiding it would keep
//! the runner from the home of its tenant's jobs: a draining home still takes its tenant's
//! runners for the jobs it waits for, and in a rolling restart the tenant's next home can be
//! the node that sent the runner away a moment ago.

use std::time::{Duration, Instant};

/// Redirects followed in a row before the runner backs off: a cluster whose nodes disagree
/// about a tenant's home for a moment (a failover) must not make runners loop.
const MAX_REDIRECTS: u32 = 3;

/// How long an address whose session failed is avoided: longer than the default lease TTL
/// (5 s) with room for the claim, short enough that a home that only looked dead is dialled
/// again soon.
pub(crate) const AVOID_FOR: Duration = Duration::from_secs(15);

/// Why a Redirect was not followed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotFollowed {
    /// It named the node that just stopped answering: the cluster has not yet noticed
    /// that the home died, and will within its lease TTL.
    HomeJustFailed(String),
    /// [`MAX_REDIRECTS`] in a row: the nodes disagree about the home.
    TooMany(String),
}

impl NotFollowed {
    /// Says why, for the log.
    pub(crate) fn into_reason(self) -> String {
        match self {
            Self::HomeJustFailed(r) | Self::TooMany(r) => r,
        }
    }
}

/// The runner's choice of address, one session after another.
#[derive(Debug)]
pub(crate) struct Dialer {
    /// The configured (cluster-wide) addresses; each failure moves on to the next one.
    configured: Vec<String>,
    next: usize,
    /// The node a Redirect named, dialled next instead of the rotation.
    target: Option<String>,
    redirects: u32,
    /// The address whose session failed, and until when it is avoided.
    avoid: Option<(String, Instant)>,
}

impl Dialer {
    /// Over the configured addresses, first one first.
    pub(crate) fn new(configured: Vec<String>) -> Self {
        Self { configured, next: 0, target: None, redirects: 0, avoid: None }
    }

    fn avoids(&self, addr: &str, now: Instant) -> bool {
        matches!(&self.avoid, Some((a, until)) if a == addr && now < *until)
    }

    /// The address the next session dials.
    pub(crate) fn address(&mut self, now: Instant) -> String {
        if let Some(target) = &self.target {
            return target.clone();
        }
        let n = self.configured.len();
        if n == 0 {
            return String::new();
        }
        if n > 1 && self.avoids(&self.configured[self.next % n], now) {
            self.next = self.next.wrapping_add(1);
        }
        self.configured[self.next % n].clone()
    }

    /// `from` redirected the runner to `to`: Ok when the next session follows it, else why
    /// not (the caller backs off, then [`Self::move_on`]).
    pub(crate) fn redirected(
        &mut self,
        from: &str,
        to: String,
        now: Instant,
    ) -> Result<(), NotFollowed> {
        if self.avoids(&to, now) {
            // `from` is alive but has not yet noticed that `to` died: `to` stays avoided.
            return Err(NotFollowed::HomeJustFailed(format!(
                "{from} redirected to {to}, which just failed; its node may be gone"
            )));
        }
        if self.redirects >= MAX_REDIRECTS {
            return Err(NotFollowed::TooMany(format!(
                "{MAX_REDIRECTS} redirects in a row (last to {to})"
            )));
        }
        self.redirects += 1;
        self.target = Some(to);
        Ok(())
    }

    /// `dial` stopped answering: avoid it, and go back to the configured addresses (the
    /// node a redirect named may be the one that died). A single configured address is
    /// dialled regardless (see [`Self::address`]).
    pub(crate) fn unreachable(&mut self, dial: String, now: Instant) {
        self.avoid = Some((dial, now + AVOID_FOR));
        self.move_on();
    }

    /// The session ended another way (the node refused, closed, or sent the runner away):
    /// back to the configured addresses, at the next one.
    pub(crate) fn move_on(&mut self) {
        self.target = None;
        self.redirects = 0;
        self.next = self.next.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Dialer {
        Dialer::new(vec!["a".into(), "b".into(), "c".into()])
    }

    #[test]
    fn a_dead_home_named_by_every_live_node_is_not_dialled_until_the_avoidance_ends() {
        let t = Instant::now();
        let mut d = three();
        assert_eq!(d.address(t), "a");
        d.unreachable("a".into(), t);
        // b and c both still name a as the home: neither redirect is followed, and the
        // rotation keeps passing a over (the bug: the second redirect was followed, and
        // the handshake with the dead node waited out its 5 s timeout).
        for _ in 0..4 {
            let at = d.address(t);
            assert_ne!(at, "a");
            let e = d.redirected(&at, "a".into(), t);
            assert!(matches!(e, Err(NotFollowed::HomeJustFailed(_))), "{e:?}");
            d.move_on();
        }
        // The avoidance ends: a node that only looked dead may still be the home.
        let later = t + AVOID_FOR;
        let at = d.address(later);
        assert!(d.redirected(&at, "a".into(), later).is_ok());
        assert_eq!(d.address(later), "a");
    }

    #[test]
    fn a_redirect_is_followed_then_a_silent_node_is_passed_over() {
        let t = Instant::now();
        let mut d = three();
        assert!(d.redirected("a", "c".into(), t).is_ok());
        assert_eq!(d.address(t), "c");
        d.unreachable("c".into(), t);
        assert_eq!(d.address(t), "b");
        assert!(d.redirected("b", "c".into(), t).is_err(), "c just stopped answering");
        d.move_on();
        assert_eq!(d.address(t), "a", "c is passed over in the rotation");
    }

    #[test]
    fn a_node_that_refused_is_still_followed_when_named_the_home() {
        // Rolling restart: a sent the runner away (GoAway), b refused it (draining); the
        // tenant's home is then b again, or a, back from its restart.
        let t = Instant::now();
        let mut d = three();
        d.move_on();
        assert_eq!(d.address(t), "b");
        d.move_on();
        assert_eq!(d.address(t), "c");
        assert!(d.redirected("c", "b".into(), t).is_ok());
        assert_eq!(d.address(t), "b");
        d.move_on();
        let at = d.address(t);
        assert!(d.redirected(&at, "a".into(), t).is_ok());
        assert_eq!(d.address(t), "a");
    }

    #[test]
    fn redirects_in_a_row_stop_at_the_limit() {
        let t = Instant::now();
        let mut d = three();
        for i in 0..MAX_REDIRECTS {
            assert!(d.redirected("x", format!("n{i}"), t).is_ok());
        }
        let e = d.redirected("x", "n9".into(), t).unwrap_err();
        assert!(matches!(&e, NotFollowed::TooMany(r) if r.contains("redirects in a row")), "{e:?}");
        d.move_on();
        assert_eq!(d.address(t), "b", "back to the rotation");
    }

    #[test]
    fn one_configured_address_is_always_dialled() {
        let t = Instant::now();
        let mut d = Dialer::new(vec!["a".into()]);
        d.unreachable("a".into(), t);
        assert_eq!(d.address(t), "a");
        assert_eq!(Dialer::new(vec![]).address(t), "");
    }
}
