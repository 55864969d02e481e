//! The store's lookup table: open addressing on the key digest.
//!
//! A SHA-256 digest is uniformly distributed and cannot be steered by an attacker, so
//! its bits place a key in the table directly, with no further hashing. Each slot
//! holds 64 more digest bits as a tag beside the entry pointer, so a probe compares
//! slots without touching the entries they point at: a hit reads one slot and one
//! entry (whose reference count and usage counters it updates anyway), a miss only
//! slots. The table is built once per reload and never changed after.

use crate::{KeyInfo, key::KeyDigest};

pub(crate) struct Table {
    slots: Box<[Slot]>,
    len: usize,
}

#[derive(Clone, Default)]
struct Slot {
    tag: u64,
    key: Option<KeyInfo>,
}

impl KeyDigest {
    /// Where the digest's probe sequence starts in a table of `len` slots.
    #[inline]
    fn home(&self, len: usize) -> usize {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        // Multiply-shift maps the 64 bits onto 0..len without a power-of-two size,
        // so the table can be sized to its load factor rather than doubled.
        ((u128::from(u64::from_le_bytes(b)) * len as u128) >> 64) as usize
    }

    #[inline]
    fn tag(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[8..16]);
        u64::from_le_bytes(b)
    }
}

impl Table {
    /// A table for up to `n` keys, at most four-fifths full.
    pub(crate) fn with_capacity(n: usize) -> Self {
        let slots = n.saturating_add(n / 4).saturating_add(1).max(2);
        Self {
            slots: vec![Slot::default(); slots].into_boxed_slice(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Inserts `key`; if a key with the same digest is present, returns it instead.
    pub(crate) fn insert(&mut self, key: KeyInfo) -> Result<(), KeyInfo> {
        let digest = key.entry().digest;
        let len = self.slots.len();
        debug_assert!(self.len < len - 1, "table sized for fewer keys");
        let mut i = digest.home(len);
        loop {
            let slot = &mut self.slots[i];
            match &slot.key {
                None => {
                    slot.tag = digest.tag();
                    slot.key = Some(key);
                    self.len += 1;
                    return Ok(());
                }
                Some(existing) if existing.entry().digest == digest => {
                    return Err(existing.clone());
                }
                Some(_) => i = if i + 1 == len { 0 } else { i + 1 },
            }
        }
    }

    /// The key with this digest.
    #[inline]
    pub(crate) fn get(&self, digest: &KeyDigest) -> Option<&KeyInfo> {
        let len = self.slots.len();
        let tag = digest.tag();
        let mut i = digest.home(len);
        loop {
            let slot = &self.slots[i];
            match &slot.key {
                None => return None,
                Some(key) if slot.tag == tag && key.entry().digest == *digest => return Some(key),
                Some(_) => i = if i + 1 == len { 0 } else { i + 1 },
            }
        }
    }

    pub(crate) fn into_keys(self) -> Vec<KeyInfo> {
        self.slots
            .into_vec()
            .into_iter()
            .filter_map(|s| s.key)
            .collect()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &KeyInfo> {
        self.slots.iter().filter_map(|s| s.key.as_ref())
    }
}

impl Default for Table {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_key_and_nothing_else() {
        let keys: Vec<KeyInfo> = (0..5_000)
            .map(|i| KeyInfo::for_tests(&format!("k{i}")))
            .collect();
        let mut table = Table::with_capacity(keys.len());
        for key in &keys {
            assert!(table.insert(key.clone()).is_ok());
        }
        assert!(
            table.insert(keys[42].clone()).is_err(),
            "duplicates are refused"
        );
        assert_eq!(table.len(), 5_000);
        for key in &keys {
            assert_eq!(table.get(&key.entry().digest).unwrap().id(), key.id());
        }
        for i in 0..5_000 {
            assert!(
                table
                    .get(&KeyDigest::of(format!("absent{i}").as_bytes()))
                    .is_none()
            );
        }
        assert!(Table::default().get(&KeyDigest::of(b"x")).is_none());
    }
}
