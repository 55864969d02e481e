//! The store's lookup table: open addressing on the key digest.
//!
//! A SHA-256 digest is uniformly distributed and cannot be steered by an attacker, so
//! its bits place a key in the table directly, with no further hashing. Each slot is
//! one 64-byte cache line holding everything a request needs: the whole digest to
//! compare, the flags to check and the usage counters to update. A lookup therefore
//! makes one trip to memory, for the slot; the entry the slot points at (id,
//! metadata) is read only when someone asks for it. The [`KeyInfo`](crate::KeyInfo) a
//! lookup hands out is a [`TableHandle`] plus the slot's index, so handing it out
//! increments a counter in a handle this thread uses, not one in the key's memory.
//! The table is built once per reload and never changed after.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
};

use crate::{
    background::Pacer,
    key::{KeyDigest, KeyEntry},
};

pub(crate) struct Table {
    slots: Box<[Slot]>,
    len: usize,
}

/// One key, in one cache line.
#[repr(C, align(64))]
#[derive(Default)]
pub(crate) struct Slot {
    digest: [u8; 32],
    requests: AtomicU64,
    /// Unix seconds of the last use (coarse clock); 0 for never.
    last_used: AtomicU32,
    disabled: bool,
    /// Whether the key has a validity window (in its entry's metadata).
    windowed: bool,
    entry: Option<Arc<KeyEntry>>,
}

impl Slot {
    pub(crate) fn digest(&self) -> KeyDigest {
        KeyDigest(self.digest)
    }

    pub(crate) fn is_disabled(&self) -> bool {
        self.disabled
    }

    pub(crate) fn is_windowed(&self) -> bool {
        self.windowed
    }

    /// The request count and the last use (Unix seconds, 0 for never).
    pub(crate) fn usage(&self) -> (u64, u32) {
        (
            self.requests.load(Ordering::Relaxed),
            self.last_used.load(Ordering::Relaxed),
        )
    }

    /// Adds requests counted elsewhere (by requests still reading a replaced table).
    pub(crate) fn add_usage(&self, requests: u64, last_used: u32) {
        if requests > 0 {
            self.requests.fetch_add(requests, Ordering::Relaxed);
        }
        self.last_used.fetch_max(last_used, Ordering::Relaxed);
    }

    /// Counts one request at `now_ms`.
    #[inline]
    pub(crate) fn touch(&self, now_ms: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let now = u32::try_from(now_ms / 1000).unwrap_or(u32::MAX);
        // Write the last-use stamp only when the second changes.
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }
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
}

impl Table {
    /// A table for up to `n` keys, at most four-fifths full.
    pub(crate) fn with_capacity(n: usize) -> Self {
        let len = n.saturating_add(n / 4).saturating_add(1).max(2);
        // Tens of megabytes for a large set: written (and faulted in) with pauses.
        let mut pacer = Pacer::new();
        let mut slots = Vec::with_capacity(len);
        slots.resize_with(len, || {
            pacer.step();
            Slot::default()
        });
        Self {
            slots: slots.into_boxed_slice(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Puts `entry` under `digest`, with usage counters carried from elsewhere, and
    /// returns its slot; if the digest is taken, returns the slot that has it.
    pub(crate) fn insert(
        &mut self,
        digest: KeyDigest,
        entry: Arc<KeyEntry>,
        (requests, last_used): (u64, u32),
    ) -> Result<usize, usize> {
        let len = self.slots.len();
        debug_assert!(self.len < len - 1, "table sized for fewer keys");
        let mut i = digest.home(len);
        loop {
            let slot = &mut self.slots[i];
            match &slot.entry {
                None => {
                    *slot = Slot {
                        digest: digest.0,
                        requests: AtomicU64::new(requests),
                        last_used: AtomicU32::new(last_used),
                        disabled: entry.disabled(),
                        windowed: entry.windowed(),
                        entry: Some(entry),
                    };
                    self.len += 1;
                    return Ok(i);
                }
                Some(_) if slot.digest == digest.0 => return Err(i),
                Some(_) => i = if i + 1 == len { 0 } else { i + 1 },
            }
        }
    }

    /// The slot holding this digest.
    #[inline]
    pub(crate) fn find(&self, digest: &KeyDigest) -> Option<usize> {
        let len = self.slots.len();
        let mut i = digest.home(len);
        loop {
            let slot = &self.slots[i];
            slot.entry.as_ref()?;
            if slot.digest == digest.0 {
                return Some(i);
            }
            i = if i + 1 == len { 0 } else { i + 1 };
        }
    }

    #[inline]
    pub(crate) fn slot(&self, i: usize) -> &Slot {
        &self.slots[i]
    }

    /// The entry in slot `i`, which holds a key (as every index this table hands
    /// out does).
    pub(crate) fn entry_at(&self, i: usize) -> &Arc<KeyEntry> {
        self.slots[i]
            .entry
            .as_ref()
            .expect("a slot index handed out by the table holds a key")
    }

    /// The occupied slots: index, slot, entry.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &Slot, &Arc<KeyEntry>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s, s.entry.as_ref()?)))
    }

    /// Frees the table slot by slot (each may free an entry), pausing as `pacer`
    /// says; the slots' own memory is one block, freed last.
    pub(crate) fn drop_paced(self, pacer: &mut Pacer) {
        for slot in self.slots {
            pacer.step();
            drop(slot);
        }
    }
}

impl Default for Table {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

/// A counted reference to a table. A snapshot holds a few, one per group of threads
/// (each on its own cache lines), so that threads handing out
/// [`KeyInfo`](crate::KeyInfo)s do not all bump one counter.
#[repr(align(128))]
pub(crate) struct TableHandle {
    table: Arc<Table>,
}

impl TableHandle {
    pub(crate) fn table(&self) -> &Table {
        &self.table
    }
}

/// The handles to make for a table: the machine's parallelism, rounded up to a power
/// of two (at most 64), so a thread picks its own with a mask.
fn handle_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(64)
            .next_power_of_two()
    })
}

/// One handle per group of threads on `table`.
pub(crate) fn handles(table: &Arc<Table>) -> Box<[Arc<TableHandle>]> {
    (0..handle_count())
        .map(|_| {
            Arc::new(TableHandle {
                table: table.clone(),
            })
        })
        .collect()
}

/// The handle this thread uses among `handles` (a power-of-two count).
#[inline]
pub(crate) fn this_threads(handles: &[Arc<TableHandle>]) -> &Arc<TableHandle> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    let shard = SHARD.with(|s| *s);
    &handles[shard & (handles.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiKey;

    fn entry(id: &str) -> (KeyDigest, Arc<KeyEntry>) {
        let key = ApiKey::new(id, id);
        (key.digest, KeyEntry::for_tests(&key))
    }

    #[test]
    fn finds_every_key_and_nothing_else() {
        let keys: Vec<_> = (0..5_000).map(|i| entry(&format!("k{i}"))).collect();
        let mut table = Table::with_capacity(keys.len());
        for (digest, entry) in &keys {
            assert!(table.insert(*digest, entry.clone(), (7, 1)).is_ok());
        }
        let (digest, entry) = &keys[42];
        let taken = table.insert(*digest, entry.clone(), (0, 0)).unwrap_err();
        assert_eq!(&*table.entry_at(taken).id, "k42", "duplicates are refused");
        assert_eq!(table.len(), 5_000);
        for (digest, entry) in &keys {
            let i = table.find(digest).unwrap();
            assert_eq!(table.entry_at(i).id, entry.id);
            assert_eq!(table.slot(i).digest(), *digest);
            assert_eq!(table.slot(i).usage(), (7, 1), "carried counters kept");
        }
        for i in 0..5_000 {
            assert!(
                table
                    .find(&KeyDigest::of(format!("absent{i}").as_bytes()))
                    .is_none()
            );
        }
        assert!(Table::default().find(&KeyDigest::of(b"x")).is_none());
        assert_eq!(table.iter().count(), 5_000);
    }

    #[test]
    fn a_slot_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Slot>(), 64);
        assert_eq!(std::mem::align_of::<Slot>(), 64);
    }

    #[test]
    fn usage_counts_and_merges() {
        let (digest, entry) = entry("k");
        let mut table = Table::with_capacity(1);
        let i = table.insert(digest, entry, (0, 0)).unwrap();
        let slot = table.slot(i);
        slot.touch(5_000);
        slot.touch(6_500);
        assert_eq!(slot.usage(), (2, 6));
        slot.add_usage(3, 4);
        assert_eq!(slot.usage(), (5, 6), "the later stamp wins");
    }
}
