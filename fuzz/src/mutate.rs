//! The mutator: deterministic (seeded) byte-level edits, with a dictionary of tokens that
//! matter to the formats under test (JSON punctuation and numbers at the edges, postcard
//! varint edges, PEM armour).

use rand::rngs::StdRng;
use rand::{Rng, RngCore};

/// Tokens spliced in whole: they reach parser states that random bytes rarely do.
const DICTIONARY: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"false",
    b"0",
    b"-1",
    b"1e309",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"\\u0000",
    b"\\ud800",
    b"\"exec\"",
    b"\"program\"",
    b"\"owner\"",
    b"\"kind\"",
    b"\"labels\"",
    b"\"role\"",
    b"\"metrics\"",
    b"\"operator\"",
    b"\"member\"",
    b"\xff\xff\xff\xff\x0f",
    b"\x80\x80\x80\x80",
    b"\x00\x00\x10\x00",
    b"\xff\xff\xff\xff",
    b"-----BEGIN CERTIFICATE REQUEST-----\n",
    b"-----END CERTIFICATE REQUEST-----\n",
    b"\n",
    b"=",
];

/// One mutated copy of `input` (1 to 4 edits); `other` is a second input to splice from.
pub fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    let edits = rng.random_range(1..=4);
    for _ in 0..edits {
        let len = out.len();
        match rng.random_range(0..9) {
            // Flip one bit.
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            // Overwrite a byte with an edge value or a random one.
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = *[0u8, 1, 0x7f, 0x80, 0xfe, 0xff, rng.random()]
                    .get(rng.random_range(0..7))
                    .unwrap_or(&0);
            }
            // Insert random bytes.
            2 => {
                let i = rng.random_range(0..=len);
                let mut bytes = vec![0u8; rng.random_range(1..=8)];
                rng.fill_bytes(&mut bytes);
                out.splice(i..i, bytes);
            }
            // Delete a range.
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(16));
                out.drain(i..i + n);
            }
            // Duplicate a range in place.
            4 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(32));
                let copy = out[i..i + n].to_vec();
                out.splice(i..i, copy);
            }
            // Splice the tail of another input.
            5 if !other.is_empty() => {
                let i = rng.random_range(0..=len);
                let j = rng.random_range(0..other.len());
                out.truncate(i);
                out.extend_from_slice(&other[j..]);
            }
            // Truncate.
            6 if len > 0 => out.truncate(rng.random_range(0..len)),
            // A dictionary token.
            _ => {
                let token = DICTIONARY[rng.random_range(0..DICTIONARY.len())];
                let i = rng.random_range(0..=len);
                out.splice(i..i, token.iter().copied());
            }
        }
    }
    // Bound the size (frames are capped anyway; large inputs only slow the run down).
    out.truncate(64 * 1024);
    out
}
