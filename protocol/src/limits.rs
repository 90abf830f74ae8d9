//! Limits both sides enforce. A peer that exceeds one is closed with a protocol error.

/// Largest encoded frame body (after the 4-byte length prefix) either side accepts.
/// Output is streamed in chunks well below this; a job request carries its payload inline.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Largest output chunk a runner sends in one `Output` frame.
pub const MAX_OUTPUT_CHUNK: usize = 32 * 1024;

/// Length of the big-endian length prefix in front of every frame.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Calls a native API lane may have unanswered at once; past it the broker reads no more
/// of the lane until answers have gone out. Also the most a client keeps unanswered.
pub const LANE_MAX_CALLS: usize = 256;

/// Bytes of answers a lane may hold unwritten (a client that does not read) before the
/// broker stops taking its calls, and stops encoding the answers of calls already under
/// way (they wait with their jobs lent, not copied): a lane holds at most this and one
/// answer.
pub const LANE_MAX_UNWRITTEN: usize = 1024 * 1024;

/// Bytes of encoded answers the broker holds at once for one native API connection's
/// calls on streams of their own. An answer is a copy of its job's output (up to 1 MiB),
/// held from its encoding until the transport has taken all of it, which a client that
/// does not read never lets happen: without a budget, 256 calls could pin 256 copies.
/// Past it, a finished call waits for room with its job lent (no copy).
pub const ANSWER_BUDGET: usize = 4 * 1024 * 1024;
