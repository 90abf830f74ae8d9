//! Numeric error codes. They appear as QUIC application close codes, as stream reset codes
//! and inside refusal messages, so one table serves all three.

use serde::{Deserialize, Serialize};

/// A runnel error code. The numbers are part of the protocol and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u32)]
pub enum ErrorCode {
    /// Normal close, nothing went wrong.
    Ok = 0,
    /// The peer sent a frame that does not decode, or a message out of order.
    Protocol = 1,
    /// The peer sent a frame larger than [`crate::limits::MAX_FRAME_LEN`].
    FrameTooLarge = 2,
    /// No protocol version in common.
    UnsupportedVersion = 3,
    /// The runner was revoked.
    Revoked = 4,
    /// The peer is not authenticated for what it asked.
    Unauthenticated = 5,
    /// The broker is going away (shutdown or drain); reconnect later.
    GoingAway = 6,
    /// The enrollment token is unknown.
    TokenUnknown = 7,
    /// The enrollment token has expired.
    TokenExpired = 8,
    /// The enrollment token was already used.
    TokenConsumed = 9,
    /// The request is malformed (bad CSR, bad field).
    BadRequest = 10,
    /// Something failed inside the broker.
    Internal = 11,
    /// The job was cancelled by its caller: the broker resets a job stream with it when the
    /// runner did not confirm a `Cancel` frame in time.
    Cancelled = 12,
    /// The runner refused the job (draining, full, unknown kind).
    Rejected = 13,
    /// The tenant's actor restarted; reconnect.
    TenantRestart = 14,
    /// The peer was silent for too long.
    Timeout = 15,
    /// A newer session of the same runner identity took over (one live session per
    /// runner; the newest wins, e.g. after the runner's NAT mapping changed).
    Replaced = 16,
    /// The broker cannot do it now (its store, etcd, is unreachable); nothing was used up,
    /// try again later.
    Unavailable = 17,
}

impl ErrorCode {
    /// Every code, in number order (the code at index `n` has number `n`).
    pub const ALL: [ErrorCode; 18] = {
        use ErrorCode::*;
        [
            Ok,
            Protocol,
            FrameTooLarge,
            UnsupportedVersion,
            Revoked,
            Unauthenticated,
            GoingAway,
            TokenUnknown,
            TokenExpired,
            TokenConsumed,
            BadRequest,
            Internal,
            Cancelled,
            Rejected,
            TenantRestart,
            Timeout,
            Replaced,
            Unavailable,
        ]
    };

    /// The code as a number, for QUIC close and reset codes.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// Maps a number back to a code; unknown numbers (from a newer peer) give `None`.
    pub fn from_u32(n: u32) -> Option<Self> {
        usize::try_from(n).ok().and_then(|i| Self::ALL.get(i)).copied()
    }

    /// A short lowercase name, for logs and metrics labels.
    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Ok => "ok",
            Protocol => "protocol",
            FrameTooLarge => "frame_too_large",
            UnsupportedVersion => "unsupported_version",
            Revoked => "revoked",
            Unauthenticated => "unauthenticated",
            GoingAway => "going_away",
            TokenUnknown => "token_unknown",
            TokenExpired => "token_expired",
            TokenConsumed => "token_consumed",
            BadRequest => "bad_request",
            Internal => "internal",
            Cancelled => "cancelled",
            Rejected => "rejected",
            TenantRestart => "tenant_restart",
            Timeout => "timeout",
            Replaced => "replaced",
            Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The number of each code, spelled out once more. The match is exhaustive, so a new
    /// variant does not compile here until it is listed, and then the test below fails
    /// until [`ErrorCode::ALL`] (and so `from_u32`) has it at the right place.
    fn number(c: ErrorCode) -> u32 {
        use ErrorCode::*;
        match c {
            Ok => 0,
            Protocol => 1,
            FrameTooLarge => 2,
            UnsupportedVersion => 3,
            Revoked => 4,
            Unauthenticated => 5,
            GoingAway => 6,
            TokenUnknown => 7,
            TokenExpired => 8,
            TokenConsumed => 9,
            BadRequest => 10,
            Internal => 11,
            Cancelled => 12,
            Rejected => 13,
            TenantRestart => 14,
            Timeout => 15,
            Replaced => 16,
            Unavailable => 17,
        }
    }

    #[test]
    fn every_code_round_trips_through_its_number() {
        let mut names = std::collections::HashSet::new();
        for (i, code) in ErrorCode::ALL.iter().copied().enumerate() {
            let n = u32::try_from(i).expect("small");
            assert_eq!(code.as_u32(), n, "{code:?} sits at index {i}");
            assert_eq!(number(code), n, "{code:?} has the number the protocol fixed");
            assert_eq!(ErrorCode::from_u32(n), Some(code));
            assert!(names.insert(code.name()), "{code:?}'s name is taken");
        }
        let past = u32::try_from(ErrorCode::ALL.len()).expect("small");
        assert_eq!(ErrorCode::from_u32(past), None);
        assert_eq!(ErrorCode::from_u32(u32::MAX), None);
    }
}
