//! The SHA-256 digest that stands for a key everywhere in memory.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    hash::{BuildHasherDefault, Hash, Hasher},
};

use sha2::{Digest as _, Sha256};

/// SHA-256 of a presented or configured key. Only digests are kept in memory.
#[derive(Clone, Copy, Eq)]
pub(crate) struct KeyDigest(pub(crate) [u8; 32]);

impl PartialEq for KeyDigest {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        same(&self.0, &other.0)
    }
}

/// Whether two digests are equal: two 16-byte compares, where `==` on the arrays
/// calls `memcmp` (a tenth of a large load's time).
#[inline]
pub(crate) fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    halves(a) == halves(b)
}

#[inline]
fn halves(x: &[u8; 32]) -> (u128, u128) {
    let (mut lo, mut hi) = ([0u8; 16], [0u8; 16]);
    lo.copy_from_slice(&x[..16]);
    hi.copy_from_slice(&x[16..]);
    (u128::from_ne_bytes(lo), u128::from_ne_bytes(hi))
}

impl KeyDigest {
    #[inline]
    pub(crate) fn of(secret: &[u8]) -> Self {
        Self(Sha256::digest(secret).into())
    }

    /// Parses 64 hex digits (either case).
    pub(crate) fn from_hex(hex: impl AsRef<[u8]>) -> Option<Self> {
        // A million are read when a fleet replica starts: faster-hex decodes one in a
        // quarter of the instructions of the `hex` crate.
        let hex = hex.as_ref();
        let mut out = [0u8; 32];
        (hex.len() == 64 && faster_hex::hex_decode(hex, &mut out).is_ok()).then_some(Self(out))
    }

    /// The 64 lower-case hex digits.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn to_hex(self) -> String {
        faster_hex::hex_string(&self.0)
    }

    /// A short, non-reversible name for the key: the first 12 hex digits of its digest.
    pub(crate) fn fingerprint(&self) -> String {
        faster_hex::hex_string(&self.0[..6])
    }

    /// 64 bits of the digest starting at byte `at` (0, 8, 16 or 24). A SHA-256 digest is
    /// uniform and an attacker cannot choose the digest of what they present, so these
    /// bits place a key in a table with no further hashing.
    #[inline]
    pub(crate) fn bits(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(b)
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already uniform, and not chosen by an attacker: 64 of its bits are a hash.
        state.write_u64(self.bits(16));
    }
}

/// Passes a [`KeyDigest`]'s own bits through as its hash.
#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a digest is hashed: fold it in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map keyed by digest, hashed by the digest's own bits.
pub(crate) type DigestMap<V> = HashMap<KeyDigest, V, BuildHasherDefault<DigestHasher>>;

/// A set of digests, hashed by their own bits.
pub(crate) type DigestSet = HashSet<KeyDigest, BuildHasherDefault<DigestHasher>>;

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({}…)", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects() {
        let d = KeyDigest::of(b"s3cr3t");
        let hex = d.to_hex();
        assert_eq!(
            hex,
            "4e738ca5563c06cfd0018299933d58db1dd8bf97f6973dc99bf6cdc64b5550bd"
        );
        assert_eq!(KeyDigest::from_hex(&hex), Some(d));
        assert_eq!(KeyDigest::from_hex(hex.to_uppercase()), Some(d));
        assert_eq!(KeyDigest::from_hex(&hex[..63]), None);
        assert_eq!(KeyDigest::from_hex(format!("{}g", &hex[..63])), None);
        assert_eq!(KeyDigest::from_hex("é"), None);
    }

    #[test]
    fn debug_shows_a_fingerprint_only() {
        let d = KeyDigest::of(b"s3cr3t");
        let dbg = format!("{d:?}");
        assert!(dbg.contains("4e738ca5563c"));
        assert!(!dbg.contains(&d.to_hex()));
    }
}
