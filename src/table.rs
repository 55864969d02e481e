//! The store's lookup table: open addressing on the key digest.
//!
//! A SHA-256 digest is uniformly distributed and cannot be steered by an attacker, so
//! its bits index the table directly, with no further hashing. Each slot holds 8 more
//! digest bits as a tag beside the entry pointer, so a probe compares slots without
//! touching the entries they point at: a hit reads one slot line and one entry, a miss
//! only slot lines. The table is built once per reload and never changed after.

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
    #[inline]
    fn index(&self) -> usize {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        // Truncation is fine: only the low bits are used.
        u64::from_le_bytes(b) as usize
    }

    #[inline]
    fn tag(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[8..16]);
        u64::from_le_bytes(b)
    }
}

impl Table {
    /// A table for up to `n` keys, at most half full.
    pub(crate) fn with_capacity(n: usize) -> Self {
        let slots = n.saturating_mul(2).next_power_of_two().max(2);
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
        debug_assert!(
            self.len < self.slots.len() / 2 + 1,
            "table sized for fewer keys"
        );
        let digest = key.entry().digest;
        let mask = self.slots.len() - 1;
        let mut i = digest.index() & mask;
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
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    /// The key with this digest.
    #[inline]
    pub(crate) fn get(&self, digest: &KeyDigest) -> Option<&KeyInfo> {
        let mask = self.slots.len() - 1;
        let tag = digest.tag();
        let mut i = digest.index() & mask;
        loop {
            let slot = &self.slots[i];
            match &slot.key {
                None => return None,
                Some(key) if slot.tag == tag && key.entry().digest == *digest => return Some(key),
                Some(_) => i = (i + 1) & mask,
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
