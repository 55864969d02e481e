//! One shard of the store's lookup table: open addressing on the key digest.
//!
//! A key set is cut into shards by the top bits of each key's [`Place`] (a keyed hash
//! of its digest), so that a change to one key copies one shard (1.4 to 2.8 times
//! the square root of the set's size: some two thousand keys of a million), not the
//! whole set. Within a shard, other bits of the same place say where the key's walk
//! starts and which tag it has: a key file's made-up digests, however alike, are
//! spread as real ones are. Each slot is 48 bytes holding everything a
//! request needs: the whole digest to compare, the flags to check and where its usage
//! is counted, so a lookup in a large, cold set makes one trip to memory (one cache
//! line, or two adjacent ones). The entry a slot points at (id, metadata) is read only
//! when someone asks. A shard is built whole and never changed after: the counts live
//! outside it (see [`Counters`](crate::store::counters::Counters)), so no request
//! writes to it.

use std::sync::Arc;

use crate::{
    key::digest::{KeyDigest, Place, same},
    store::{counters::Counter, entry::KeyEntry},
};

/// A built shard: its slots and tags, each in an allocation of its own that the
/// versions having the shard share.
///
/// The two pointers (with their lengths) are all a shard is, and a snapshot keeps them
/// in its own array of shards: a lookup goes from there straight to the tags and the
/// slot, not through a shard's allocation first. In a large, cold set that is one
/// dependent trip to memory fewer (46–55 ns a request, see `benches/README.md`).
#[derive(Clone)]
#[cfg_attr(test, derive(Default))]
pub(crate) struct Shard {
    slots: Arc<[Slot]>,
    /// One byte of each slot's digest (never 0), or 0 for an empty slot: a lookup
    /// walks these, eight bytes at a time in one cache line, and reads only the slot
    /// whose byte matches, instead of every slot from where the digest's walk starts
    /// (three on average, four-fifths full). After the last come `GROUP - 1` more,
    /// copies of the tags a walk meets next when it runs past the end (`tags[len + j]`
    /// is `tags[j % len]`), so that it reads whole words.
    tags: Arc<[u8]>,
}

/// A shard being built: keys go in one by one, then [`build`](Self::build) freezes it.
pub(crate) struct ShardBuilder {
    slots: Vec<Slot>,
    /// As [`Shard`]'s, the copies at the end included.
    tags: Vec<u8>,
    len: usize,
}

/// How many tags a lookup reads at once.
const GROUP: usize = 8;
/// The lowest bit of each byte of a word.
const LOW: u64 = u64::from_le_bytes([1; 8]);
/// The highest bit of each byte of a word.
const HIGH: u64 = LOW << 7;

/// The bytes of `word` that are 0, as their high bits. The lowest one set is exact;
/// above a zero byte, a byte of 1 may be marked too (the borrow), which a caller
/// checks anyway (a tag match is confirmed by the digest) or does not use (only the
/// first empty byte matters).
#[inline]
fn zero_bytes(word: u64) -> u64 {
    word.wrapping_sub(LOW) & !word & HIGH
}

/// Slot `i` of a walk that may have run past the end, back in `0..len` (`i` is below
/// `len + GROUP`, so the division is only for shards of fewer than eight slots).
#[inline]
fn wrap(i: usize, len: usize) -> usize {
    match i < len {
        true => i,
        false => (i - len) % len,
    }
}

/// How many handles each shard has: threads take them in turn (see [`group`]).
pub(crate) const GROUPS: usize = 8;

/// A reference-counted handle on a shard's slots, one of [`GROUPS`] per shard: what
/// the [`KeyInfo`](crate::KeyInfo) of a request holds. A request clones it and drops
/// it again, writing its reference count: were there one count per shard, two cores
/// serving the same key would bounce its cache line on every request. Each thread
/// uses the handle of its group, whose count no thread of another group writes.
pub(crate) struct Handle {
    slots: Arc<[Slot]>,
    /// Makes the allocation 64 bytes (with the reference counts), so that no two
    /// handles' counts share a cache line.
    _pad: [usize; 4],
}

impl Handle {
    /// The handles of `shard`, one per group.
    pub(crate) fn all(shard: &Shard) -> [Arc<Self>; GROUPS] {
        std::array::from_fn(|_| {
            Arc::new(Self {
                slots: shard.slots.clone(),
                _pad: [0; 4],
            })
        })
    }

    /// The entry in slot `i`, if it holds a key (every index a lookup hands out does).
    pub(crate) fn entry_at(&self, i: usize) -> Option<&Arc<KeyEntry>> {
        self.slots.get(i)?.entry.as_ref()
    }
}

/// This thread's group: handed out in turn as threads first look a key up.
#[inline]
pub(crate) fn group() -> usize {
    use std::{
        cell::Cell,
        sync::atomic::{AtomicUsize, Ordering},
    };
    thread_local! {
        static GROUP: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    GROUP.with(|group| match group.get() {
        usize::MAX => {
            let next = NEXT.fetch_add(1, Ordering::Relaxed) % GROUPS;
            group.set(next);
            next
        }
        known => known,
    })
}

/// One key, in 48 bytes.
#[derive(Default)]
pub(crate) struct Slot {
    digest: [u8; 32],
    entry: Option<Arc<KeyEntry>>,
    /// The key's usage cell, carried from version to version while its id stays.
    index: u32,
    /// The cell's generation (the high 30 bits), whether the key is disabled (bit
    /// 0) and whether a request must read its entry (bit 1): for a validity window
    /// or limits. A key without either never pays for them.
    tag: u32,
}

const DISABLED: u32 = 1;
const WINDOWED: u32 = 2;

impl Slot {
    fn new(digest: KeyDigest, entry: Arc<KeyEntry>, counter: Counter) -> Self {
        let flags = u32::from(entry.disabled()) * DISABLED + u32::from(entry.examined()) * WINDOWED;
        Self {
            digest: digest.0,
            entry: Some(entry),
            index: counter.index(),
            tag: (counter.generation() << 2) | flags,
        }
    }

    pub(crate) fn digest(&self) -> KeyDigest {
        KeyDigest(self.digest)
    }

    pub(crate) fn is_disabled(&self) -> bool {
        self.tag & DISABLED != 0
    }

    pub(crate) fn is_windowed(&self) -> bool {
        self.tag & WINDOWED != 0
    }

    #[inline]
    pub(crate) fn counter(&self) -> Counter {
        Counter::new(self.index, self.tag >> 2)
    }
}

impl ShardBuilder {
    /// A shard for `n` keys, at most four-fifths full.
    pub(crate) fn with_capacity(n: usize) -> Self {
        let len = n.saturating_add(n / 4).saturating_add(1).max(2);
        let mut slots = Vec::with_capacity(len);
        slots.resize_with(len, Slot::default);
        Self {
            slots,
            tags: vec![0; len + GROUP - 1],
            len: 0,
        }
    }

    /// Where the walk of a key at `place` starts.
    fn home(&self, place: Place) -> usize {
        place.home(self.slots.len())
    }

    /// Puts `entry` under `digest`, whose place is `place`, counted in `counter`, and
    /// returns its slot; if the digest is taken, returns the slot that has it.
    pub(crate) fn insert(
        &mut self,
        digest: KeyDigest,
        place: Place,
        entry: Arc<KeyEntry>,
        counter: Counter,
    ) -> Result<usize, usize> {
        let len = self.slots.len();
        debug_assert!(self.len + 1 < len, "shard sized for fewer keys");
        let want = place.tag();
        let mut i = self.home(place);
        loop {
            match self.tags[i] {
                0 => {
                    self.slots[i] = Slot::new(digest, entry, counter);
                    self.tags[i] = want;
                    // The copies of the first tags, after the last, that `group` reads.
                    let mut copy = i;
                    while copy < GROUP - 1 {
                        self.tags[len + copy] = want;
                        copy += len;
                    }
                    self.len += 1;
                    return Ok(i);
                }
                t if t == want && same(&self.slots[i].digest, &digest.0) => return Err(i),
                _ => i = if i + 1 == len { 0 } else { i + 1 },
            }
        }
    }

    /// The shard, frozen: its slots and tags copied into shared allocations (once, as
    /// it is built: a shard is a small part of the set, some two thousand keys of a
    /// million).
    pub(crate) fn build(self) -> Shard {
        Shard {
            slots: self.slots.into(),
            tags: self.tags.into(),
        }
    }
}

impl Shard {
    /// How many keys the shard holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.entry.is_some())
            .count()
    }

    /// Whether `other` is this shard, shared (not a copy).
    #[cfg(test)]
    pub(crate) fn is(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.slots, &other.slots)
    }

    /// A weak pointer to the slots: whether anything still holds the shard.
    #[cfg(test)]
    pub(crate) fn downgrade(&self) -> std::sync::Weak<[Slot]> {
        Arc::downgrade(&self.slots)
    }

    /// The slots lookups of every key read, all told: each key's distance from where
    /// its walk starts, plus its own slot.
    #[cfg(test)]
    pub(crate) fn walked(&self) -> usize {
        let len = self.slots.len();
        (self.iter())
            .map(|(i, slot, _)| (i + len - self.home(slot.digest().place())) % len + 1)
            .sum()
    }

    /// The longest run of occupied slots, wrapping round: the most a walk can read,
    /// for a key that is there or one that is not.
    #[cfg(test)]
    pub(crate) fn longest_run(&self) -> usize {
        let len = self.slots.len();
        let Some(empty) = (0..len).find(|&i| self.tags[i] == 0) else {
            return len;
        };
        let (mut longest, mut run) = (0, 0);
        for j in 1..=len {
            run = match self.tags[(empty + j) % len] {
                0 => 0,
                _ => run + 1,
            };
            longest = longest.max(run);
        }
        longest
    }

    /// Where the walk of a key at `place` starts.
    #[inline]
    fn home(&self, place: Place) -> usize {
        place.home(self.slots.len())
    }

    /// The slot holding `digest`, whose place is `place` (computed once by the caller,
    /// who chose this shard with it).
    ///
    /// The tags are read eight at a time: a word's bytes equal to the digest's tag,
    /// before its first empty byte, are the only slots to compare. Most lookups read
    /// one word and compare one slot, so the branches a lookup takes do not depend on
    /// how far its key sits from home (a byte-by-byte walk mispredicts its exit
    /// whenever requests alternate between keys at different distances).
    #[inline]
    pub(crate) fn find(&self, digest: &KeyDigest, place: Place) -> Option<usize> {
        let len = self.slots.len();
        let want = u64::from(place.tag()) * LOW;
        let mut i = self.home(place);
        loop {
            let group = self.group(i);
            let empty = zero_bytes(group);
            // Only the matches before the first empty byte: past it, the walk is over.
            let before = match empty {
                0 => u64::MAX,
                e => (e & e.wrapping_neg()).wrapping_sub(1),
            };
            let mut matches = zero_bytes(group ^ want) & before;
            while matches != 0 {
                let at = wrap(i + (matches.trailing_zeros() / 8) as usize, len);
                if same(&self.slots[at].digest, &digest.0) {
                    return Some(at);
                }
                matches &= matches - 1;
            }
            if empty != 0 {
                return None;
            }
            i = wrap(i + GROUP, len);
        }
    }

    /// Loads the first byte of the digest in the slot where the walk of a key at
    /// `place` starts, without waiting for it: the slot a lookup most often ends at
    /// (or the one next to it, in the same or the next cache line) is then on its way
    /// while the tags are read.
    #[inline]
    pub(crate) fn warm(&self, place: Place) {
        if let Some(slot) = self.slots.get(self.home(place)) {
            std::hint::black_box(slot.digest[0]);
        }
    }

    /// The eight tags from slot `i` on (wrapping round, through the copies at the end).
    #[inline]
    fn group(&self, i: usize) -> u64 {
        match self.tags.get(i..i + GROUP) {
            Some(bytes) => {
                let mut word = [0u8; GROUP];
                word.copy_from_slice(bytes);
                u64::from_le_bytes(word)
            }
            None => 0,
        }
    }

    #[inline]
    pub(crate) fn slot(&self, i: usize) -> &Slot {
        &self.slots[i]
    }

    /// The entry in slot `i`, if it holds a key (every index this shard hands out
    /// does).
    pub(crate) fn entry_at(&self, i: usize) -> Option<&Arc<KeyEntry>> {
        self.slots.get(i)?.entry.as_ref()
    }

    /// The occupied slots: index, slot, entry.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &Slot, &Arc<KeyEntry>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s, s.entry.as_ref()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiKey;

    fn entry(id: &str) -> (KeyDigest, Arc<KeyEntry>) {
        let key = ApiKey::new(id, id);
        (key.digest, KeyEntry::for_tests(&key))
    }

    /// The place a digest made for these tests is given: laid out as the store once
    /// placed digests, by their own bits (the walk's start from bytes 8 to 16, the tag
    /// from byte 16), so that a test can crowd a shard where it wants.
    fn laid_out(digest: &KeyDigest) -> Place {
        Place(((digest.bits(8) >> 24) << 8) | u64::from(digest.0[16]))
    }

    /// A digest whose walk starts at the last slot of a shard of `len` slots (as
    /// [`laid_out`]), with `tag` for its tag byte and `n` to tell it apart.
    fn at_the_end(tag: u8, n: u8) -> KeyDigest {
        let mut digest = [0u8; 32];
        digest[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        digest[16] = tag;
        digest[31] = n;
        KeyDigest(digest)
    }

    #[test]
    fn a_walk_past_the_last_slot_finds_keys_sharing_a_tag_and_stops_at_an_empty_one() {
        let mut building = ShardBuilder::with_capacity(8);
        let len = building.slots.len();
        let key = |n| at_the_end(7, n);
        for n in 0..8 {
            let (_, entry) = entry(&format!("k{n}"));
            assert!(
                building
                    .insert(key(n), laid_out(&key(n)), entry, Counter::default())
                    .is_ok()
            );
        }
        let shard = building.build();
        // All eight start at the last slot: one there, the others from slot 0 on.
        assert_eq!(shard.find(&key(0), laid_out(&key(0))), Some(len - 1));
        for n in 1..8 {
            assert_eq!(
                shard.find(&key(n), laid_out(&key(n))),
                Some(usize::from(n) - 1),
                "key {n}"
            );
            assert_eq!(
                &*shard.entry_at(usize::from(n) - 1).unwrap().id,
                format!("k{n}")
            );
        }
        assert_eq!(
            shard.find(&key(8), laid_out(&key(8))),
            None,
            "same tag and start, not there"
        );
        assert_eq!(
            shard.find(&at_the_end(9, 0), laid_out(&at_the_end(9, 0))),
            None,
            "another tag"
        );
    }

    /// Random small shards of digests crowded at both ends, with tags one bit apart,
    /// tag 0 (stored as 1) and the all-zero digest: `find` agrees with a plain search,
    /// and the copies after the last tag repeat the first ones.
    #[test]
    fn finds_what_a_plain_search_finds_in_crowded_shards() {
        let mut next = crate::testing::xorshift(0x9e37_79b9_7f4a_7c15);
        let (_, entry) = entry("k");
        let tags = [0u8, 1, 2, 3, 0x80, 0x81, 0xfe, 0xff];
        let digest = |next: &mut dyn FnMut() -> u64| {
            let r = next();
            let mut d = [0u8; 32];
            if !r.is_multiple_of(8) {
                let home = match r % 3 {
                    0 => u64::MAX - (r >> 40) % 4,
                    1 => (r >> 40) % 4,
                    _ => next(),
                };
                d[8..16].copy_from_slice(&home.to_le_bytes());
                d[16] = tags[(r >> 8) as usize % tags.len()];
                d[31] = (r >> 16) as u8 % 32;
            }
            KeyDigest(d)
        };
        for _ in 0..20_000 {
            let n = (next() % 24) as usize;
            let mut building = ShardBuilder::with_capacity(n);
            let len = building.slots.len();
            let mut present: Vec<(KeyDigest, usize)> = Vec::new();
            for _ in 0..n {
                let d = digest(&mut next);
                let known = present.iter().find(|(p, _)| p.0 == d.0).map(|&(_, i)| i);
                match building.insert(d, laid_out(&d), entry.clone(), Counter::default()) {
                    Ok(i) => {
                        assert_eq!(known, None);
                        present.push((d, i));
                    }
                    Err(i) => assert_eq!(known, Some(i)),
                }
            }
            let shard = building.build();
            for j in 0..GROUP - 1 {
                assert_eq!(shard.tags[len + j], shard.tags[j % len]);
            }
            for &(d, i) in &present {
                assert_eq!(shard.find(&d, laid_out(&d)), Some(i));
            }
            for _ in 0..20 {
                let d = digest(&mut next);
                let known = present.iter().find(|(p, _)| p.0 == d.0).map(|&(_, i)| i);
                assert_eq!(shard.find(&d, laid_out(&d)), known);
            }
        }
    }

    #[test]
    fn shards_of_every_small_size_find_their_keys_and_nothing_else() {
        for n in 0..40 {
            let keys: Vec<_> = (0..n).map(|i| entry(&format!("s{n}-{i}"))).collect();
            let mut building = ShardBuilder::with_capacity(n);
            for (i, (digest, entry)) in keys.iter().enumerate() {
                let counter = Counter::new(i as u32, 1);
                assert!(
                    building
                        .insert(*digest, digest.place(), entry.clone(), counter)
                        .is_ok()
                );
            }
            let shard = building.build();
            for (digest, entry) in &keys {
                let i = shard.find(digest, digest.place()).unwrap();
                assert_eq!(shard.entry_at(i).unwrap().id, entry.id);
            }
            for i in 0..200 {
                let absent = KeyDigest::of(format!("absent{n}-{i}").as_bytes());
                assert!(shard.find(&absent, absent.place()).is_none());
            }
        }
        assert!(
            Shard::default()
                .find(&KeyDigest::of(b"x"), KeyDigest::of(b"x").place())
                .is_none()
        );
    }

    #[test]
    fn finds_every_key_and_nothing_else() {
        let keys: Vec<_> = (0..5_000).map(|i| entry(&format!("k{i}"))).collect();
        let mut building = ShardBuilder::with_capacity(keys.len());
        for (i, (digest, entry)) in keys.iter().enumerate() {
            let counter = Counter::new(i as u32, 1 << 29 | i as u32);
            assert!(
                building
                    .insert(*digest, digest.place(), entry.clone(), counter)
                    .is_ok()
            );
        }
        let (digest, entry) = &keys[42];
        let taken = (building.insert(*digest, digest.place(), entry.clone(), Counter::default()))
            .unwrap_err();
        let shard = building.build();
        assert_eq!(
            &*shard.entry_at(taken).unwrap().id,
            "k42",
            "duplicates refused"
        );
        assert_eq!(shard.len(), 5_000);
        for (n, (digest, entry)) in keys.iter().enumerate() {
            let i = shard.find(digest, digest.place()).unwrap();
            assert_eq!(shard.entry_at(i).unwrap().id, entry.id);
            assert_eq!(shard.slot(i).digest(), *digest);
            let counter = shard.slot(i).counter();
            assert_eq!(counter, Counter::new(n as u32, 1 << 29 | n as u32));
            assert!(!shard.slot(i).is_disabled() && !shard.slot(i).is_windowed());
        }
        for i in 0..5_000 {
            let absent = KeyDigest::of(format!("absent{i}").as_bytes());
            assert!(shard.find(&absent, absent.place()).is_none());
        }
        assert!(
            ShardBuilder::with_capacity(0)
                .build()
                .find(&KeyDigest::of(b"x"), KeyDigest::of(b"x").place())
                .is_none()
        );
        assert_eq!(shard.iter().count(), 5_000);
    }

    #[test]
    fn a_slot_is_48_bytes_and_a_handle_s_counts_have_a_cache_line_of_their_own() {
        // A million keys' memory depends on it: 60 bytes a key at four-fifths load.
        assert_eq!(std::mem::size_of::<Slot>(), 48);
        // With the two reference counts before it: 64 bytes.
        assert_eq!(std::mem::size_of::<Handle>() + 16, 64);
    }
}
