//! Limits on what strangers can make the QUIC endpoint do before anyone is authenticated:
//! how many connections are in their intake (handshake, Hello, enrollment) at once, how
//! many enrollments run at once, how often one source address may connect and try to
//! enroll, and — past a rate of incoming connections — a Retry round trip that makes a
//! source prove it can receive at its address before the broker spends a TLS handshake
//! on it.
//!
//! The per-source connection limit is decided before any cryptography. A source over it
//! that has not proven its address is sent a Retry rather than refused: its address may be
//! spoofed, and refusing would let a stranger lock a real fleet's NAT address out. Only a
//! proven address over its limit is refused.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::metrics::names;
use crate::rate::{Direct, Keyed};

/// What to do with one incoming connection.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Go ahead; the permit is the connection's intake slot, held until its intake ends
    /// (Welcome sent, enrollment answered, or refused).
    Admit(OwnedSemaphorePermit),
    /// Busy, or this source is over its rate, and it has not proven its address: answer
    /// with a Retry.
    Retry,
    /// Every intake slot is taken, or a proven source is over its rate: refuse (the runner
    /// backs off and dials again).
    Refuse,
}

/// Why an enrollment was turned away before its request was read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum EnrollBusy {
    /// This source tried too often; the seconds until it may try again.
    Rate(u64),
    /// [`Config::max_enrollments`] are in progress.
    Full,
}

impl EnrollBusy {
    /// What the enrolling client is told.
    pub(crate) fn message(&self) -> String {
        match self {
            Self::Rate(secs) => format!(
                "enrollment unavailable: too many enrollment attempts from this address; \
                 try again in {secs} s"
            ),
            Self::Full => "enrollment unavailable: the broker is busy enrolling other runners; \
                           try again in a few seconds"
                .to_owned(),
        }
    }
}

/// The endpoint's intake limits (one per broker, in `Shared`).
#[derive(Debug)]
pub(crate) struct IntakeLimits {
    handshakes: Arc<Semaphore>,
    enrollments: Arc<Semaphore>,
    incoming: Direct,
    always_validate: bool,
    per_source: Keyed<IpAddr>,
    enroll_per_source: Keyed<IpAddr>,
    /// Set by a drain: the node is going away, every new connection is refused.
    closed: AtomicBool,
}

fn limited(which: &'static str) {
    metrics::counter!(names::QUIC_INTAKE_LIMITED, "limit" => which).increment(1);
}

impl IntakeLimits {
    /// The limits `config` asks for.
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            handshakes: Arc::new(Semaphore::new(config.quic_max_handshakes)),
            enrollments: Arc::new(Semaphore::new(config.max_enrollments)),
            incoming: Direct::new(config.quic_validate_above),
            always_validate: config.quic_validate_above == 0,
            per_source: Keyed::new(config.quic_rate_per_source),
            enroll_per_source: Keyed::new(config.enroll_rate_per_source),
            closed: AtomicBool::new(false),
        }
    }

    /// From now on every new connection is refused (the node drains before it stops).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Decides for one incoming connection from `ip`. Every connection spends a token of
    /// the incoming-rate bucket and of its source's; once either is empty, a source that
    /// has not yet proven its address (`validated`: it came back with our Retry token)
    /// gets a Retry instead, and a proven one over its own rate is refused.
    pub(crate) fn admit(&self, ip: IpAddr, validated: bool) -> Admission {
        if self.closed.load(Ordering::Acquire) {
            limited("closed");
            return Admission::Refuse;
        }
        let over_rate = !self.incoming.check() || self.always_validate;
        if over_rate && !validated {
            limited("retry");
            return Admission::Retry;
        }
        if self.per_source.check(&crate::rate::source_of(ip)).is_err() {
            if validated {
                limited("source");
                return Admission::Refuse;
            }
            limited("retry");
            return Admission::Retry;
        }
        match self.handshakes.clone().try_acquire_owned() {
            Ok(permit) => Admission::Admit(permit),
            Err(_) => {
                limited("handshakes");
                Admission::Refuse
            }
        }
    }

    /// One enrollment attempt from `ip` (after its handshake): a slot among
    /// [`Config::max_enrollments`], held while it runs.
    pub(crate) fn enroll(&self, ip: IpAddr) -> Result<OwnedSemaphorePermit, EnrollBusy> {
        if let Err(secs) = self.enroll_per_source.check(&crate::rate::source_of(ip)) {
            limited("enroll_rate");
            return Err(EnrollBusy::Rate(secs));
        }
        self.enrollments.clone().try_acquire_owned().map_err(|_| {
            limited("enrollments");
            EnrollBusy::Full
        })
    }

    /// Forgets idle per-source buckets (see [`Keyed::forget_idle`]).
    pub(crate) fn forget_idle(&self) {
        self.per_source.forget_idle();
        self.enroll_per_source.forget_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(tweak: impl FnOnce(&mut Config)) -> IntakeLimits {
        let mut c = Config::default();
        tweak(&mut c);
        IntakeLimits::new(&c)
    }

    #[test]
    fn a_closed_intake_refuses_everyone() {
        let l = limits(|_| {});
        let ip = IpAddr::from([10, 0, 0, 1]);
        assert!(matches!(l.admit(ip, true), Admission::Admit(_)));
        l.close();
        assert!(matches!(l.admit(ip, true), Admission::Refuse));
        assert!(matches!(l.admit(ip, false), Admission::Refuse));
    }

    #[test]
    fn past_the_rate_unvalidated_sources_get_a_retry_and_validated_ones_a_slot() {
        let l = limits(|c| c.quic_validate_above = 2);
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        // Burst of 4, then Retry for the unvalidated; a validated source still gets in.
        let admitted =
            (0..4).filter(|n| matches!(l.admit(ip(*n), false), Admission::Admit(_))).count();
        assert_eq!(admitted, 4);
        assert!(matches!(l.admit(ip(9), false), Admission::Retry));
        assert!(matches!(l.admit(ip(9), true), Admission::Admit(_)));
        let always = limits(|c| c.quic_validate_above = 0);
        assert!(matches!(always.admit(ip(1), false), Admission::Retry));
        assert!(matches!(always.admit(ip(1), true), Admission::Admit(_)));
    }

    #[test]
    fn one_source_over_its_rate_gets_a_retry_then_is_refused_and_others_pass() {
        let l = limits(|c| c.quic_rate_per_source = 2);
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let mut slots = Vec::new();
        for _ in 0..4 {
            match l.admit(a, false) {
                Admission::Admit(p) => slots.push(p),
                other => panic!("within the burst: {other:?}"),
            }
        }
        // An unproven address may be spoofed: it is asked to prove itself, not refused.
        assert!(matches!(l.admit(a, false), Admission::Retry));
        assert!(matches!(l.admit(a, true), Admission::Refuse));
        assert!(matches!(l.admit(b, false), Admission::Admit(_)));
    }

    #[test]
    fn intake_slots_are_capped_and_come_back_when_released() {
        let l = limits(|c| c.quic_max_handshakes = 2);
        let ip = IpAddr::from([10, 0, 0, 1]);
        let (a, b) = (l.admit(ip, true), l.admit(ip, true));
        assert!(matches!(l.admit(ip, true), Admission::Refuse));
        drop(a);
        assert!(matches!(l.admit(ip, true), Admission::Admit(_)));
        drop(b);
    }

    #[test]
    fn enrollments_are_capped_and_rate_limited_per_source() {
        let l = limits(|c| {
            c.max_enrollments = 1;
            c.enroll_rate_per_source = 2;
        });
        let ip: IpAddr = [10, 0, 0, 1].into();
        let first = l.enroll(ip).expect("a slot");
        assert_eq!(l.enroll([10, 0, 0, 2].into()).err(), Some(EnrollBusy::Full));
        drop(first);
        // The burst is 4 attempts per source (two already spent on 10.0.0.1 and .2 above:
        // one each), then this source waits.
        for _ in 0..3 {
            drop(l.enroll(ip).expect("within the burst"));
        }
        assert!(matches!(l.enroll(ip), Err(EnrollBusy::Rate(s)) if s >= 1));
        // An IPv4-mapped IPv6 address is the same source.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert!(matches!(l.enroll(mapped), Err(EnrollBusy::Rate(_))));
        assert!(EnrollBusy::Rate(3).message().contains("try again in 3 s"));
    }
}
