//! New keys in a recognisable, checksummed format.

use std::fmt;

use zeroize::Zeroizing;

use crate::{ApiKey, Error, key::digest::KeyDigest};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random base62 characters in a key: 30 × log2(62) ≈ 178 bits.
const RANDOM_CHARS: usize = 30;
/// Base62 characters of the CRC-32 checksum at the end of a key.
const CHECKSUM_CHARS: usize = 6;

/// A newly generated API key: `<prefix>_` + 30 random base62 characters (≈178 bits) +
/// a 6-character base62 CRC-32 checksum of what precedes it.
///
/// This is the shape of GitHub's tokens: the prefix tells a secret scanner (and a
/// human) what the key is for, and the checksum lets a scanner, or
/// [`ApiKeyLayer::require_checksum`](crate::ApiKeyLayer::require_checksum), tell a
/// real key from a typo or a random string without a lookup.
///
/// The secret is zeroed from memory when the value is dropped, and `Debug` does not
/// print it.
///
/// # Example
///
/// ```
/// use tower_api_key::{generate, has_valid_checksum};
///
/// let key = generate("acme")?;
/// assert!(key.secret().starts_with("acme_"));
/// assert_eq!(key.secret().len(), "acme_".len() + 36);
/// assert!(has_valid_checksum(key.secret()));
///
/// // The entry to paste into the key file holds only the digest.
/// let entry = key.toml_entry("acme-ci-2026-11")?;
/// assert!(entry.starts_with("\n[[keys]]\nid = \"acme-ci-2026-11\"\n"));
/// assert!(entry.contains(&key.sha256_hex()));
/// assert!(!entry.contains(key.secret()));
/// # Ok::<(), tower_api_key::Error>(())
/// ```
pub struct GeneratedKey {
    secret: Zeroizing<String>,
}

/// Generates a new key with this prefix (1 to 16 ASCII letters and digits).
///
/// # Errors
///
/// [`Error::InvalidKey`] for a bad prefix; [`Error::Random`] if the operating system
/// has no randomness to give.
pub fn generate(prefix: &str) -> Result<GeneratedKey, Error> {
    if prefix.is_empty() || prefix.len() > 16 || !prefix.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(Error::invalid(
            None,
            "a key prefix must be 1 to 16 ASCII letters and digits",
        ));
    }
    let mut secret = Zeroizing::new(String::with_capacity(
        prefix.len() + 1 + RANDOM_CHARS + CHECKSUM_CHARS,
    ));
    secret.push_str(prefix);
    secret.push('_');
    let mut pool = Zeroizing::new([0u8; 64]);
    while secret.len() < prefix.len() + 1 + RANDOM_CHARS {
        getrandom::fill(pool.as_mut()).map_err(|e| Error::Random(e.to_string()))?;
        // Rejection sampling keeps every character equally likely: 248 = 4 × 62.
        for &b in pool.iter().filter(|&&b| b < 248) {
            if secret.len() == prefix.len() + 1 + RANDOM_CHARS {
                break;
            }
            secret.push(char::from(BASE62[usize::from(b % 62)]));
        }
    }
    let checksum = checksum(secret.as_bytes());
    secret.extend(checksum.iter().map(|&b| char::from(b)));
    Ok(GeneratedKey { secret })
}

/// Whether `key` has the shape [`generate`] gives (`<prefix>_<36 base62>`) and a
/// correct checksum. Cheap: no hashing beyond a CRC-32.
pub fn has_valid_checksum(key: impl AsRef<[u8]>) -> bool {
    let key = key.as_ref();
    // `<prefix>_` + 30 random base62 + 6 checksum digits: the separator's place is
    // fixed by the length.
    let Some(sep) = key.len().checked_sub(RANDOM_CHARS + CHECKSUM_CHARS + 1) else {
        return false;
    };
    if sep == 0 || key[sep] != b'_' {
        return false;
    }
    let split = key.len() - CHECKSUM_CHARS;
    if !key[sep + 1..split].iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    // Decode the 6 digits rather than encode the CRC: multiplications, not divisions.
    let mut given = 0u64;
    for &c in &key[split..] {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'Z' => c - b'A' + 10,
            b'a'..=b'z' => c - b'a' + 36,
            _ => return false,
        };
        given = given * 62 + u64::from(digit);
    }
    given == u64::from(crc32fast::hash(&key[..split]))
}

/// CRC-32 (IEEE) of `data` as 6 base62 digits, most significant first.
fn checksum(data: &[u8]) -> [u8; CHECKSUM_CHARS] {
    let mut n = crc32fast::hash(data);
    let mut out = [b'0'; CHECKSUM_CHARS];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

impl GeneratedKey {
    /// The key to hand to the client. Show it once; store only
    /// [`sha256_hex`](Self::sha256_hex).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The SHA-256 of the key, as 64 hex digits: what the key file's `sha256` holds.
    pub fn sha256_hex(&self) -> String {
        KeyDigest::of(self.secret.as_bytes()).to_hex()
    }

    /// The key as an [`ApiKey`] with this id.
    pub fn to_api_key(&self, id: &str) -> ApiKey {
        ApiKey::new(id, self.secret.as_bytes())
    }

    /// A `[[keys]]` entry for the key file, holding the digest only. It starts with a
    /// newline, so that appended to a key file (`>> keys.toml`) whose last line has
    /// no newline of its own, it starts a line rather than ending that one; and
    /// ends with one. The key file reads it back as this key under `id`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] for an id the key file would refuse: empty, longer than
    /// 256 bytes, or holding whitespace, control, format or separator characters.
    pub fn toml_entry(&self, id: &str) -> Result<String, Error> {
        crate::key::validate_id(id)?;
        let digest = KeyDigest::of(self.secret.as_bytes());
        let entry = crate::source::key_file::write::entry(&ApiKey::from_digest(id.into(), digest));
        Ok(format!("\n{entry}"))
    }
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("secret", &format_args!("<redacted>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // CRC-32/ISO-HDLC check value of "123456789" is 0xCBF43926.
        let mut n: u64 = 0xCBF4_3926;
        let mut expected = String::new();
        for _ in 0..CHECKSUM_CHARS {
            expected.insert(0, char::from(BASE62[(n % 62) as usize]));
            n /= 62;
        }
        assert_eq!(checksum(b"123456789"), expected.as_bytes());
    }

    #[test]
    fn generated_keys_are_distinct_and_valid() {
        let a = generate("tak").unwrap();
        let b = generate("tak").unwrap();
        assert_ne!(a.secret(), b.secret());
        assert!(has_valid_checksum(a.secret()));
        assert!(!format!("{a:?}").contains(a.secret()));
    }

    #[test]
    fn checksum_catches_typos_and_foreign_strings() {
        let key = generate("tak").unwrap();
        let mut typo = key.secret().as_bytes().to_vec();
        typo[8] = if typo[8] == b'a' { b'b' } else { b'a' };
        assert!(!has_valid_checksum(&typo));
        for other in ["", "tak_", "no-separator", "_abc", "tak_short", "tak_é"] {
            assert!(!has_valid_checksum(other), "{other}");
        }
        assert!(generate("").is_err());
        assert!(generate("has_underscore").is_err());
        assert!(generate("waytoolongprefix17").is_err());
    }
}
