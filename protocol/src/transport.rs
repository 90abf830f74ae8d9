//! QUIC settings every runnel endpoint (broker, runner, client) asks of its peer or runs
//! itself, as plain numbers: this crate has no sockets, so each side builds its own `quinn`
//! config from them.
//!
//! **Acknowledgement frequency** (the QUIC ACK-frequency extension, which quinn speaks on
//! both ends). By default a QUIC receiver acknowledges every second ack-eliciting packet at
//! once. On runnel's connections traffic is request/answer in both directions (a job and its
//! result, a call and its answer), so those acknowledgements nearly always find a data
//! packet to ride on if the receiver may wait a little; sent on their own they were ~0.8 of
//! the ~4.8 datagrams a native dispatch cost on loopback (`runnel-bench load --api native`,
//! BENCHMARKS.md). Each side asks its peer to wait for up to
//! [`ACK_ELICITING_THRESHOLD`] packets or [`MAX_ACK_DELAY`], whichever comes first. Loss
//! recovery stays prompt: quinn's loss timer already allows for the peer's ack delay, and a
//! packet received out of order is still acknowledged at once.
//!
//! **Path MTU discovery** probes once each way ([`mtu_discovery`]).
//!
//! **Keep-alive and heartbeat** ([`DEFAULT_KEEP_ALIVE`], [`DEFAULT_HEARTBEAT_INTERVAL`]):
//! by default a runner's QUIC keep-alive is a little longer than the heartbeat interval a
//! broker asks for, so an idle runner sends its heartbeats and nothing else.

use std::time::Duration;

/// How many ack-eliciting packets the peer may receive before it must acknowledge.
pub const ACK_ELICITING_THRESHOLD: u32 = 10;

/// The longest the peer may hold back an acknowledgement.
pub const MAX_ACK_DELAY: Duration = Duration::from_millis(5);

/// [`ACK_ELICITING_THRESHOLD`] and [`MAX_ACK_DELAY`] as the config a quinn endpoint asks
/// its peer for (feature `quinn`): the broker, the runner and the client all use this one.
#[cfg(feature = "quinn")]
pub fn ack_frequency() -> quinn_proto::AckFrequencyConfig {
    let mut ack = quinn_proto::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into()).max_ack_delay(Some(MAX_ACK_DELAY));
    ack
}

/// The heartbeat interval a broker asks of its runners (in Welcome) unless its operator
/// sets another (`--heartbeat-interval`).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// A runner's QUIC keep-alive unless its operator sets another (`--keep-alive`): how long
/// the runner may receive nothing before it sends a PING, which keeps the NAT mapping in
/// front of it alive and makes the broker answer. quinn restarts that wait at every packet
/// the runner receives, and the broker acknowledges a heartbeat within [`MAX_ACK_DELAY`];
/// so a keep-alive longer than the heartbeat interval sends nothing while heartbeats flow
/// (a shorter one sent a PING between every two heartbeats, and the broker acknowledged
/// each: twice the packets an idle runner needs, BENCHMARKS.md), and still refreshes the
/// mapping every 6 s when heartbeats are rarer (a broker asking for a longer interval).
/// NAT mappings commonly last 30 s, some 10-20 s.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(6);

const _: () = assert!(DEFAULT_KEEP_ALIVE.as_millis() > DEFAULT_HEARTBEAT_INTERVAL.as_millis());

/// The largest UDP payload a connection probes for: a 1,500-byte Ethernet path less the
/// IPv6 and UDP headers (quinn's default bound).
pub const MTU_PROBE_SIZE: u16 = 1452;

/// How far the next probe must be from the last one for quinn's path MTU search to go on.
/// QUIC starts every connection at 1,200 bytes; with quinn's default (20) the search halves
/// its way up to [`MTU_PROBE_SIZE`] in four probes each way (1,326, 1,389, 1,420, 1,452
/// bytes). With this, the first midpoint (1,326) is too close to 1,200, so the search
/// probes [`MTU_PROBE_SIZE`] at once and stops there: one probe each way.
pub const MTU_PROBE_MIN_CHANGE: u16 = 200;

/// Path MTU discovery with one probe per direction (feature `quinn`): the broker, the runner
/// and the client all use this one.
///
/// A probe is a PING padded with ~1,400 one-byte PADDING frames, and quinn parses PADDING
/// one frame per byte. quinn's default search (four probes each way, again every ten
/// minutes) cost the broker ~20% of its CPU per runner handshake in a reconnect storm:
/// 0.43 ms → 0.34 ms per handshake with one probe, BENCHMARKS.md. A path of full Ethernet
/// size gets its 1,452 bytes after one probe, as before; a smaller one (a tunnel, PPPoE)
/// stays at 1,200 instead of finding the size in between: ~15% more datagrams for bulk
/// output on such a path, nothing for the small frames a dispatch sends.
#[cfg(feature = "quinn")]
pub fn mtu_discovery() -> quinn_proto::MtuDiscoveryConfig {
    let mut mtu = quinn_proto::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_PROBE_SIZE).minimum_change(MTU_PROBE_MIN_CHANGE);
    mtu
}

/// What a QUIC connection has carried, as a runnel client or runner reports it
/// (`runnel_client::Client::stats`, `runnel_runner::RunnerHandle::stats`). Under load a
/// busy connection carries fewer datagrams than calls or jobs: frames written together
/// share them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// UDP datagrams sent.
    pub datagrams_sent: u64,
    /// UDP datagrams received.
    pub datagrams_received: u64,
    /// Bytes of the datagrams sent.
    pub bytes_sent: u64,
    /// Bytes of the datagrams received.
    pub bytes_received: u64,
    /// The largest UDP payload the path is known to carry now (path MTU discovery).
    pub path_mtu: u16,
    /// Path MTU probes this side sent and did not count as lost (acknowledged, or still in
    /// flight).
    pub mtu_probes: u64,
    /// PING frames sent: keep-alives, path MTU probes, and loss probes with nothing else to
    /// carry.
    pub pings_sent: u64,
}

#[cfg(feature = "quinn")]
impl From<&quinn_proto::ConnectionStats> for Stats {
    fn from(s: &quinn_proto::ConnectionStats) -> Self {
        Self {
            datagrams_sent: s.udp_tx.datagrams,
            datagrams_received: s.udp_rx.datagrams,
            bytes_sent: s.udp_tx.bytes,
            bytes_received: s.udp_rx.bytes,
            path_mtu: s.path.current_mtu,
            mtu_probes: s.path.sent_plpmtud_probes.saturating_sub(s.path.lost_plpmtud_probes),
            pings_sent: s.frame_tx.ping,
        }
    }
}
