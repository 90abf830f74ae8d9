//! Secrets: API keys and enrollment tokens.
//!
//! A secret is `<prefix>_<id>_<random>`: the id (64 bits, public) finds the record, the
//! random part (256 bits) proves possession. Only `SHA-256(salt || random)` with a
//! per-secret 128-bit salt is stored, and the comparison is constant-time.

use rand::RngCore;
use subtle::ConstantTimeEq;

/// Prefix of API keys.
pub(crate) const KEY_PREFIX: &str = "rk";
/// Prefix of enrollment tokens.
pub(crate) const TOKEN_PREFIX: &str = "rt";

/// A freshly minted secret: the plaintext (shown once) and what is stored.
pub(crate) struct Minted {
    /// Public id of the secret (the record key).
    pub id: String,
    /// The full plaintext secret. Never log or store it.
    pub plaintext: String,
    /// What the store keeps.
    pub hashed: HashedSecret,
}

/// The stored form of a secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct HashedSecret {
    /// Hex salt.
    pub salt: String,
    /// Hex `SHA-256(salt || secret)`.
    pub sha256: String,
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Random bytes in an id (64 bits: ids name things, they are not secrets).
const ID_BYTES: usize = 8;

/// A random id with a readable prefix, for runners and jobs: `<prefix>-<16 hex digits>`,
/// built in one allocation (a job id is made for every dispatch).
pub(crate) fn new_id(prefix: &str) -> String {
    new_keyed_id(prefix, "").1
}

/// [`new_id`] with `suffix` appended, and its random part as a number (the key a table
/// can find the id by: see [`id_key`]).
pub(crate) fn new_keyed_id(prefix: &str, suffix: &str) -> (u64, String) {
    let key = rand::rng().next_u64();
    let mut hex = [0u8; 2 * ID_BYTES];
    // Cannot fail: the output is exactly twice the input.
    let _ = hex::encode_to_slice(key.to_be_bytes(), &mut hex);
    let mut id = String::with_capacity(prefix.len() + 1 + hex.len() + suffix.len());
    id.push_str(prefix);
    id.push('-');
    id.extend(hex.iter().map(|&b| char::from(b)));
    id.push_str(suffix);
    (key, id)
}

/// The random part of an id [`new_keyed_id`] made with `prefix`, as that function
/// answered it; None when `id` does not start like one. Only a key: two ids can share
/// one, so whoever finds an entry by it still compares the whole id.
pub(crate) fn id_key(prefix: &str, id: &str) -> Option<u64> {
    let hex = id.strip_prefix(prefix)?.strip_prefix('-')?.get(..2 * ID_BYTES)?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None; // from_str_radix would take a leading '+'
    }
    u64::from_str_radix(hex, 16).ok()
}

fn digest(salt: &[u8], secret: &[u8]) -> ring::digest::Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(salt);
    ctx.update(secret);
    ctx.finish()
}

/// Mints a new secret with the given prefix.
pub(crate) fn mint(prefix: &str) -> Minted {
    let id = random_hex(8);
    let random = random_hex(32);
    let salt = random_hex(16);
    let sha256 = hex::encode(digest(salt.as_bytes(), random.as_bytes()));
    Minted {
        plaintext: format!("{prefix}_{id}_{random}"),
        id,
        hashed: HashedSecret { salt, sha256 },
    }
}

/// Splits a presented secret into `(id, random)` if it has the expected shape.
pub(crate) fn split<'a>(prefix: &str, presented: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = presented.strip_prefix(prefix)?.strip_prefix('_')?;
    let (id, random) = rest.split_once('_')?;
    let hex_ok = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex_ok(id, 16) && hex_ok(random, 64)).then_some((id, random))
}

impl HashedSecret {
    /// Constant-time check of the random part of a presented secret.
    pub(crate) fn verify(&self, random: &str) -> bool {
        // Decoded on the stack: this runs for every API request.
        let mut expected = [0u8; 32];
        if hex::decode_to_slice(&self.sha256, &mut expected).is_err() {
            return false;
        }
        let actual = digest(self.salt.as_bytes(), random.as_bytes());
        expected.ct_eq(actual.as_ref()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_prefix_and_16_random_hex_digits() {
        let (a, b) = (new_id("job"), new_id("job"));
        assert_ne!(a, b);
        for id in [&a, &b] {
            let hex = id.strip_prefix("job-").expect("prefix");
            assert_eq!(hex.len(), 16, "{id}");
            assert!(hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{id}");
        }
        assert!(new_id("r").starts_with("r-"));
    }

    #[test]
    fn minted_secret_verifies_and_nothing_else_does() {
        let m = mint(KEY_PREFIX);
        let (id, random) = split(KEY_PREFIX, &m.plaintext).expect("shape");
        assert_eq!(id, m.id);
        assert!(m.hashed.verify(random));
        let mut wrong = random.to_string();
        wrong.replace_range(0..1, if wrong.starts_with('0') { "1" } else { "0" });
        assert!(!m.hashed.verify(&wrong));
        assert!(!m.hashed.sha256.contains(random));
        assert!(split(TOKEN_PREFIX, &m.plaintext).is_none());
        assert!(split(KEY_PREFIX, "rk_short_x").is_none());
        assert!(split(KEY_PREFIX, "").is_none());
        // Same secret, different salts, different hashes.
        assert_ne!(mint(KEY_PREFIX).hashed.salt, m.hashed.salt);
    }
}
