//! API-key secrets as the API layer sees them: `tly_<key id>_<32 characters of base62>`.
//!
//! The key id (16 characters of `a-z0-9`, [`crate::engine::access::KEY_ID_LEN`]) is in the
//! secret so a presented key names its own record; the 32 base62 characters are about 190 bits
//! from the operating system's RNG. Only [`hash`] — SHA-256 of the whole secret — ever reaches
//! the engine; the secret itself is shown once, at creation or rotation.

use sha2::Digest;

use crate::engine::access::{KEY_ID_LEN, SecretHash, valid_key_id};

/// Every secret starts with this.
pub const PREFIX: &str = "tly_";
/// Random characters after the key id.
pub const RANDOM_LEN: usize = 32;
/// Length of every well-formed secret.
pub const SECRET_LEN: usize = PREFIX.len() + KEY_ID_LEN + 1 + RANDOM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const KEY_ID_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// The key id of a well-formed secret; `None` for anything else (which is refused before any
/// lookup).
pub fn parse(secret: &str) -> Option<&str> {
    if secret.len() != SECRET_LEN {
        return None;
    }
    let rest = secret.strip_prefix(PREFIX)?;
    let (id, random) = rest.split_at_checked(KEY_ID_LEN)?;
    let random = random.strip_prefix('_')?;
    (valid_key_id(id)
        && random.len() == RANDOM_LEN
        && random.bytes().all(|b| b.is_ascii_alphanumeric()))
    .then_some(id)
}

/// What the engine stores and compares: SHA-256 of the whole secret.
pub fn hash(secret: &str) -> SecretHash {
    sha2::Sha256::digest(secret.as_bytes()).into()
}

/// A fresh secret for key `key_id` (a well-formed id: see [`new_key_id`]).
pub fn generate(key_id: &str) -> String {
    debug_assert!(valid_key_id(key_id), "{key_id:?} is not a key id");
    let mut out = String::with_capacity(SECRET_LEN);
    out.push_str(PREFIX);
    out.push_str(key_id);
    out.push('_');
    out.push_str(&random_text(BASE62, RANDOM_LEN));
    out
}

/// A fresh key id: 16 characters of `a-z0-9` (about 82 bits, so ids do not collide in
/// practice; the engine refuses a taken one anyway).
pub fn new_key_id() -> String {
    random_text(KEY_ID_ALPHABET, KEY_ID_LEN)
}

/// `len` characters drawn uniformly from `alphabet` (rejection sampling: no modulo bias).
fn random_text(alphabet: &[u8], len: usize) -> String {
    debug_assert!((2..=256).contains(&alphabet.len()));
    // The largest multiple of the alphabet's size that fits a byte.
    let limit = 256 - 256 % alphabet.len();
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf).expect("the operating system's RNG is available");
        for &b in &buf {
            if usize::from(b) < limit && out.len() < len {
                out.push(char::from(alphabet[usize::from(b) % alphabet.len()]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_parse_back_to_their_key_id() {
        let id = new_key_id();
        assert!(valid_key_id(&id), "{id}");
        let secret = generate(&id);
        assert_eq!(secret.len(), SECRET_LEN);
        assert_eq!(parse(&secret), Some(id.as_str()));
        assert_ne!(generate(&id), secret, "fresh randomness every time");
        assert_eq!(hash(&secret), hash(&secret.clone()));
        assert_ne!(hash(&secret), hash(&generate(&id)));
    }

    #[test]
    fn anything_else_is_malformed() {
        let good = format!("tly_{}_{}", "a".repeat(16), "Z9".repeat(16));
        assert!(parse(&good).is_some());
        for bad in [
            String::new(),
            "tly_".into(),
            good.replacen("tly_", "tlx_", 1),
            good.replacen('a', "A", 1),
            format!("{good}x"),
            good[..good.len() - 1].to_owned(),
            good.replacen('Z', "-", 1),
            good.replacen("a_", "aa", 1),
            format!("tly_{}_{}", "a".repeat(15), "Z9".repeat(16) + "x"),
            // Multi-byte characters of the right byte length.
            format!("tly_{}_{}", "a".repeat(16), "é".repeat(16)),
        ] {
            assert_eq!(parse(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn draws_cover_the_whole_alphabet() {
        let text: String = (0..64).map(|_| random_text(BASE62, 32)).collect();
        for &c in BASE62 {
            assert!(text.as_bytes().contains(&c), "{}", char::from(c));
        }
    }
}
