//! The SHA-256 digest that stands for a key everywhere in memory.

use std::fmt;

use sha2::{Digest as _, Sha256};

/// SHA-256 of a presented or configured key. Only digests are kept in memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KeyDigest(pub(crate) [u8; 32]);

impl KeyDigest {
    #[inline]
    pub(crate) fn of(secret: &[u8]) -> Self {
        Self(Sha256::digest(secret).into())
    }

    /// Parses 64 hex digits (either case).
    pub(crate) fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Self(out))
    }

    /// The 64 lower-case hex digits.
    #[cfg(test)]
    pub(crate) fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A short, non-reversible name for the key: the first 12 hex digits of its digest.
    pub(crate) fn fingerprint(&self) -> String {
        self.0[..6].iter().map(|b| format!("{b:02x}")).collect()
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

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

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
        assert_eq!(KeyDigest::from_hex(&hex.to_uppercase()), Some(d));
        assert_eq!(KeyDigest::from_hex(&hex[..63]), None);
        assert_eq!(KeyDigest::from_hex(&format!("{}g", &hex[..63])), None);
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
