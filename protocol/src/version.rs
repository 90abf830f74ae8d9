//! Protocol versions and ALPN identifiers.

/// The protocol version this build speaks best. 2: `Welcome` carries the tenant's epoch,
/// and a node that is not the tenant's home answers `Hello` with `Redirect`. 3: a
/// connection's jobs share one job lane (`LaneFrame`) instead of a stream each.
pub const PROTOCOL_VERSION: u16 = 3;

/// The first protocol version whose jobs share one job lane per connection (`LaneFrame`).
pub const JOB_LANE: u16 = 3;

/// The oldest protocol version this build still speaks (1 had no epoch in `Welcome`; no
/// release spoke it).
pub const MIN_PROTOCOL_VERSION: u16 = 2;

/// ALPN of a paired runner's connection (mutual TLS with a runner certificate).
pub const ALPN_RUNNER: &[u8] = b"runnel/1";

/// ALPN of a node-to-node connection in a cluster (mutual TLS with node certificates).
pub const ALPN_PEER: &[u8] = b"runnel-peer/1";

/// ALPN of a node-to-node connection whose nodes both take a lane of calls
/// (`PeerRequest::Lane`: every call answered at once, on one stream): `runnel-peer/1` and
/// the lane. A node offers both and prefers
/// this one; a node of an older build agrees on `runnel-peer/1`, and its calls go on
/// streams of their own as before.
pub const ALPN_PEER_LANE: &[u8] = b"runnel-peer/2";

/// ALPN of a native API client's connection (server-authenticated TLS; an API key in the
/// first frame).
pub const ALPN_API: &[u8] = b"runnel-api/1";

/// ALPN of an enrollment connection (server-authenticated TLS only).
pub const ALPN_ENROLL: &[u8] = b"runnel-enroll/1";

/// Picks the highest version both sides speak, given the peer's inclusive range.
pub fn negotiate(peer_min: u16, peer_max: u16) -> Option<u16> {
    let hi = peer_max.min(PROTOCOL_VERSION);
    let lo = peer_min.max(MIN_PROTOCOL_VERSION);
    (lo <= hi).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_highest_common_version() {
        assert_eq!(negotiate(1, 1), None, "protocol 1 is no longer spoken");
        assert_eq!(negotiate(2, 2), Some(2));
        assert_eq!(negotiate(2, 3), Some(3));
        assert_eq!(negotiate(1, 9), Some(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3), None);
        assert_eq!(negotiate(3, 2), None);
    }
}
