//! QUIC settings every runnel endpoint (broker, runner, client) asks of its peer, as plain
//! numbers: this crate has no sockets, so each side builds its own `quinn` config from them.
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
}

#[cfg(feature = "quinn")]
impl From<&quinn_proto::ConnectionStats> for Stats {
    fn from(s: &quinn_proto::ConnectionStats) -> Self {
        Self {
            datagrams_sent: s.udp_tx.datagrams,
            datagrams_received: s.udp_rx.datagrams,
            bytes_sent: s.udp_tx.bytes,
            bytes_received: s.udp_rx.bytes,
        }
    }
}
