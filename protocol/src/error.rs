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
    /// The job was cancelled by its caller.
    Cancelled = 12,
    /// The runner refused the job (draining, full, unknown kind).
    Rejected = 13,
    /// The tenant's actor restarted; reconnect.
    TenantRestart = 14,
    /// The peer was silent for too long.
    Timeout = 15,
}

impl ErrorCode {
    /// The code as a number, for QUIC close and reset codes.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// Maps a number back to a code; unknown numbers (from a newer peer) give `None`.
    pub fn from_u32(n: u32) -> Option<Self> {
        use ErrorCode::*;
        Some(match n {
            0 => Ok,
            1 => Protocol,
            2 => FrameTooLarge,
            3 => UnsupportedVersion,
            4 => Revoked,
            5 => Unauthenticated,
            6 => GoingAway,
            7 => TokenUnknown,
            8 => TokenExpired,
            9 => TokenConsumed,
            10 => BadRequest,
            11 => Internal,
            12 => Cancelled,
            13 => Rejected,
            14 => TenantRestart,
            15 => Timeout,
            _ => return None,
        })
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

    #[test]
    fn every_code_round_trips_through_its_number() {
        for n in 0..64 {
            if let Some(code) = ErrorCode::from_u32(n) {
                assert_eq!(code.as_u32(), n);
            }
        }
        assert_eq!(ErrorCode::from_u32(15), Some(ErrorCode::Timeout));
        assert_eq!(ErrorCode::from_u32(9999), None);
    }
}
