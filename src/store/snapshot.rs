//! One immutable version of a store's keys, and how a new version is made from it.
//!
//! The keys are cut into shards by digest (see [`Shard`]), and an id index, cut the
//! same way by a hash of the id, finds a key by its id: each id shard is a sorted
//! list of (the id hash's low 32 bits, digest), 36 bytes a key, checked against the
//! entry's id. A new version shares every shard an edit does not touch with the old
//! one: a one-key change copies one or two shards of a few hundred keys, whatever
//! the size of the set.

use std::{hash::BuildHasher, sync::Arc};

use crate::{
    key::digest::{DigestSet, KeyDigest},
    store::counters::{Counter, Counters},
    store::entry::KeyEntry,
    store::shard::{GROUPS, Handle, Shard},
};

/// Keys per shard that the shard count aims at.
const PER_SHARD: usize = 256;

/// The most shards (as a power of two).
const MAX_BITS: u32 = 16;

/// (the low 32 bits of the id's hash, digest of the key), sorted by those bits. The
/// top bits chose the id shard; the low ones, among its few hundred ids, rarely
/// repeat, and a repeat is told apart by the entry's id.
type IdShard = Vec<(u32, KeyDigest)>;
const _: () = assert!(std::mem::size_of::<(u32, KeyDigest)>() == 36);

/// The bits of an id's hash that its id shard keeps.
#[inline]
fn low(hash: u64) -> u32 {
    hash as u32
}

/// The handles of one shard.
type Handles = [Arc<Handle>; GROUPS];

/// Hashes ids: fast on short strings, seeded per store.
type IdHasher = foldhash::fast::RandomState;

pub(crate) struct Snapshot {
    pub(crate) version: u64,
    len: usize,
    /// log2 of the shard count.
    bits: u32,
    shards: Box<[Arc<Shard>]>,
    /// Each shard's handles, one per group of threads: what a request's `KeyInfo`
    /// holds (see [`Handle`]). Shared, as the shards are, by the versions that have
    /// the shard.
    handles: Box<[Arc<Handles>]>,
    ids: Box<[Arc<IdShard>]>,
    /// Places ids in id shards; the same for every version of one store.
    id_hasher: IdHasher,
}

/// What an edit changes: keys that leave (by digest and id), and keys that come,
/// each with the digest of the key whose usage counter it takes over, if any.
#[derive(Default)]
pub(crate) struct Edit {
    pub(crate) remove: Vec<(KeyDigest, Arc<str>)>,
    pub(crate) insert: Vec<(KeyDigest, Arc<KeyEntry>, Option<KeyDigest>)>,
}

impl Default for Snapshot {
    fn default() -> Self {
        let shard = Arc::new(Shard::with_capacity(0));
        Self {
            version: 0,
            len: 0,
            bits: 0,
            handles: Box::new([Arc::new(Handle::all(&shard))]),
            shards: Box::new([shard]),
            ids: Box::new([Arc::new(IdShard::new())]),
            id_hasher: IdHasher::default(),
        }
    }
}

/// The shard count, as a power of two, for `n` keys.
fn bits_for(n: usize) -> u32 {
    (n / PER_SHARD)
        .checked_next_power_of_two()
        .map_or(MAX_BITS, usize::trailing_zeros)
        .min(MAX_BITS)
}

/// The top `bits` bits of `hash`.
#[inline]
fn top(hash: u64, bits: u32) -> usize {
    hash.checked_shr(64 - bits).unwrap_or(0) as usize
}

impl Snapshot {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn shard_of(&self, digest: &KeyDigest) -> usize {
        top(digest.bits(0).swap_bytes(), self.bits)
    }

    fn id_hash(&self, id: &str) -> u64 {
        self.id_hasher.hash_one(id)
    }

    /// The shard and slot holding this digest.
    #[inline]
    pub(crate) fn find(&self, digest: &KeyDigest) -> Option<(&Arc<Shard>, usize)> {
        let shard = &self.shards[self.shard_of(digest)];
        shard.find(digest).map(|i| (shard, i))
    }

    /// The shard and slot holding this digest, and the shard's handle for `group`:
    /// the request path.
    #[inline]
    pub(crate) fn lookup(
        &self,
        digest: &KeyDigest,
        group: usize,
    ) -> Option<(&Shard, usize, &Arc<Handle>)> {
        let s = self.shard_of(digest);
        let shard = &self.shards[s];
        let handle = &self.handles[s][group % GROUPS];
        // Three trips to memory in a large, cold set (the tags, the slot, the handle's
        // count) made at once rather than one after the other: neither of the last two
        // addresses depends on the tags. Only loads, of lines the request reads next.
        shard.warm(digest);
        std::hint::black_box(Arc::strong_count(handle));
        let i = shard.find(digest)?;
        Some((shard, i, handle))
    }

    /// The digest of the key with this id.
    pub(crate) fn digest_of(&self, id: &str) -> Option<KeyDigest> {
        let hash = self.id_hash(id);
        let list = &self.ids[top(hash, self.bits)];
        let from = list.partition_point(|(h, _)| *h < low(hash));
        list[from..]
            .iter()
            .take_while(|(h, _)| *h == low(hash))
            .map(|(_, d)| *d)
            .find(|d| self.entry(d).is_some_and(|(e, _)| &*e.id == id))
    }

    /// The entry and usage counter of the key with this digest.
    pub(crate) fn entry(&self, digest: &KeyDigest) -> Option<(&Arc<KeyEntry>, Counter)> {
        let (shard, i) = self.find(digest)?;
        Some((shard.entry_at(i)?, shard.slot(i).counter()))
    }

    /// The entry and usage counter of the key with this id.
    pub(crate) fn by_id(&self, id: &str) -> Option<(&Arc<KeyEntry>, Counter)> {
        self.entry(&self.digest_of(id)?)
    }

    /// Every key: its digest, entry and usage counter, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (KeyDigest, &Arc<KeyEntry>, Counter)> {
        self.shards
            .iter()
            .flat_map(|shard| shard.iter())
            .map(|(_, slot, entry)| (slot.digest(), entry, slot.counter()))
    }

    /// The next version: this one with `edit` made. Every digest removed must be here,
    /// and every digest inserted must be free once the removals are made (the caller
    /// has checked). A key that stays, or comes in place of one with its id, keeps
    /// its usage counter; a key that leaves for good gives its counter back to
    /// `counters`, and a new id gets a fresh one.
    pub(crate) fn edited(&self, edit: Edit, counters: &Counters) -> Self {
        let len = self.len - edit.remove.len() + edit.insert.len();
        let ideal = bits_for(len);
        let bits = if ideal > self.bits + 1 || ideal + 2 < self.bits {
            ideal
        } else {
            self.bits
        };
        let mut next = Self {
            version: self.version,
            len,
            bits,
            shards: Box::new([]),
            handles: Box::new([]),
            ids: Box::new([]),
            id_hasher: self.id_hasher.clone(),
        };
        let removed: DigestSet = edit.remove.iter().map(|(d, _)| *d).collect();
        // Counters of keys that leave with no successor under their id: given back
        // first, so that the keys that come can have them.
        let succeeded: DigestSet = edit.insert.iter().filter_map(|(_, _, d)| *d).collect();
        let mut cells = counters.cells();
        for (digest, _) in &edit.remove {
            if !succeeded.contains(digest)
                && let Some((_, counter)) = self.entry(digest)
            {
                cells.release(counter);
            }
        }
        let resharded = bits != self.bits;
        // The shards to build: every one when the count changes, else those touched.
        let mut touched = vec![resharded; 1 << bits];
        for digest in
            (edit.remove.iter().map(|(d, _)| d)).chain(edit.insert.iter().map(|(d, _, _)| d))
        {
            touched[next.shard_of(digest)] = true;
        }
        // The keys that stay in the shards being built, with where their counters are.
        let staying = || {
            self.shards
                .iter()
                .enumerate()
                .filter(|&(s, _)| resharded || touched[s])
                .flat_map(|(_, shard)| {
                    shard
                        .iter()
                        .map(move |(_, slot, e)| (slot.digest(), e, slot.counter()))
                })
                .filter(|(d, _, _)| !removed.contains(d))
        };
        // Count first, so that each shard is allocated once at its size, then insert
        // straight into it: no list of a million keys in between.
        let mut counts = vec![0usize; 1 << bits];
        for (digest, _, _) in staying() {
            counts[next.shard_of(&digest)] += 1;
        }
        for (digest, _, _) in &edit.insert {
            counts[next.shard_of(digest)] += 1;
        }
        let mut built: Vec<Option<Shard>> = (0..1 << bits)
            .map(|s| touched[s].then(|| Shard::with_capacity(counts[s])))
            .collect();
        let mut put = |digest: KeyDigest, entry: Arc<KeyEntry>, counter: Counter| {
            // Free by the caller's checks; a clash would only drop a duplicate.
            if let Some(shard) = &mut built[next.shard_of(&digest)] {
                let _ = shard.insert(digest, entry, counter);
            }
        };
        for (digest, entry, counter) in staying() {
            put(digest, entry.clone(), counter);
        }
        for (digest, entry, from) in &edit.insert {
            let carried = from.and_then(|d| self.entry(&d)).map(|(_, c)| c);
            put(
                *digest,
                entry.clone(),
                carried.unwrap_or_else(|| cells.assign()),
            );
        }
        let (shards, handles): (Vec<_>, Vec<_>) = built
            .into_iter()
            .enumerate()
            .map(|(s, shard)| match shard {
                Some(shard) => {
                    let shard = Arc::new(shard);
                    let handles = Arc::new(Handle::all(&shard));
                    (shard, handles)
                }
                None => (self.shards[s].clone(), self.handles[s].clone()),
            })
            .unzip();
        (next.shards, next.handles) = (shards.into(), handles.into());
        next.ids = self.edited_ids(&next, &edit, &removed);
        next
    }

    /// The id index of `next`, which has this one's id hasher.
    fn edited_ids(&self, next: &Self, edit: &Edit, removed: &DigestSet) -> Box<[Arc<IdShard>]> {
        if next.bits != self.bits {
            let hashes: Vec<(u64, KeyDigest)> = (next.shards.iter())
                .flat_map(|shard| shard.iter())
                .map(|(_, slot, entry)| (self.id_hash(&entry.id), slot.digest()))
                .collect();
            let mut counts = vec![0usize; 1 << next.bits];
            for (hash, _) in &hashes {
                counts[top(*hash, next.bits)] += 1;
            }
            let mut ids: Vec<IdShard> = counts.into_iter().map(Vec::with_capacity).collect();
            for (hash, digest) in hashes {
                ids[top(hash, next.bits)].push((low(hash), digest));
            }
            return ids
                .into_iter()
                .map(|mut list| {
                    list.sort_unstable_by_key(|(h, _)| *h);
                    Arc::new(list)
                })
                .collect();
        }
        // Each id shard an edit touches is copied once: what leaves is dropped, what
        // comes is added, and the list sorted again.
        let mut ids = self.ids.to_vec();
        let mut coming: Vec<Vec<(u32, KeyDigest)>> = vec![Vec::new(); ids.len()];
        let mut touched = vec![false; ids.len()];
        for (_, id) in &edit.remove {
            touched[top(self.id_hash(id), next.bits)] = true;
        }
        for (digest, entry, _) in &edit.insert {
            let hash = self.id_hash(&entry.id);
            touched[top(hash, next.bits)] = true;
            coming[top(hash, next.bits)].push((low(hash), *digest));
        }
        for (s, coming) in coming.into_iter().enumerate() {
            if touched[s] {
                let mut list: IdShard = ids[s]
                    .iter()
                    .filter(|(_, d)| !removed.contains(d))
                    .copied()
                    .chain(coming)
                    .collect();
                list.sort_unstable_by_key(|(h, _)| *h);
                ids[s] = Arc::new(list);
            }
        }
        ids.into_boxed_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiKey;

    fn insert(n: std::ops::Range<usize>) -> Edit {
        Edit {
            remove: Vec::new(),
            insert: n
                .map(|i| {
                    let key = ApiKey::new(format!("k{i}"), format!("s{i}"));
                    (key.digest, KeyEntry::for_tests(&key), None)
                })
                .collect(),
        }
    }

    /// An edit that removes the keys `insert` made for `n`.
    fn remove(n: impl Iterator<Item = usize>) -> Edit {
        Edit {
            remove: n
                .map(|i| {
                    let key = ApiKey::new(format!("k{i}"), format!("s{i}"));
                    (key.digest, key.id.clone())
                })
                .collect(),
            insert: Vec::new(),
        }
    }

    fn check(snapshot: &Snapshot, live: impl Iterator<Item = usize> + Clone, gone: &[usize]) {
        for i in live.clone() {
            let digest = KeyDigest::of(format!("s{i}").as_bytes());
            let (entry, _) = snapshot.entry(&digest).expect("present");
            assert_eq!(&*entry.id, format!("k{i}"));
            assert_eq!(snapshot.digest_of(&format!("k{i}")), Some(digest));
        }
        for i in gone {
            assert!(
                snapshot
                    .find(&KeyDigest::of(format!("s{i}").as_bytes()))
                    .is_none()
            );
            assert!(snapshot.digest_of(&format!("k{i}")).is_none());
        }
        assert_eq!(snapshot.len(), live.clone().count());
        assert_eq!(snapshot.iter().count(), live.count());
    }

    /// Each key's id and counter.
    fn counters_of(snapshot: &Snapshot) -> std::collections::HashMap<String, Counter> {
        (snapshot.iter())
            .map(|(_, e, c)| (e.id.to_string(), c))
            .collect()
    }

    /// Two ids whose hashes have the same low 32 bits, the bits an id shard keeps:
    /// each is found as itself, in a version made by an edit and in one rebuilt when
    /// the shard count changes, and removing one leaves the other.
    #[test]
    fn ids_whose_kept_hash_bits_are_equal_are_told_apart() {
        let counters = Counters::new();
        let empty = Snapshot::default();
        let mut seen = std::collections::HashMap::new();
        let (a, b) = (0..10_000_000)
            .find_map(|i| {
                let bits = low(empty.id_hash(&format!("c{i}")));
                seen.insert(bits, i).map(|j| (j, i))
            })
            .expect("a repeat of 32 bits among ten million hashes");
        let pair = |i| ApiKey::new(format!("c{i}"), format!("cs{i}"));
        let entry = |key: &ApiKey| (key.digest, KeyEntry::for_tests(key), None);
        let (a, b) = (pair(a), pair(b));
        let found = |snapshot: &Snapshot, key: &ApiKey| snapshot.digest_of(&key.id);
        // Into an empty version: one id shard, the two side by side.
        let both = empty.edited(
            Edit {
                remove: Vec::new(),
                insert: vec![entry(&a), entry(&b)],
            },
            &counters,
        );
        assert_eq!(both.bits, 0);
        assert_eq!(found(&both, &a), Some(a.digest));
        assert_eq!(found(&both, &b), Some(b.digest));
        let one = both.edited(
            Edit {
                remove: vec![(a.digest, a.id.clone())],
                insert: Vec::new(),
            },
            &counters,
        );
        assert_eq!((found(&one, &a), found(&one, &b)), (None, Some(b.digest)));
        // Rebuilt: many shards with thousands of other keys, then one again.
        let mut many = insert(0..5_000);
        many.insert.push(entry(&a));
        let big = one.edited(many, &counters);
        assert!(big.bits >= 3, "{} bits", big.bits);
        assert_eq!(found(&big, &a), Some(a.digest));
        assert_eq!(found(&big, &b), Some(b.digest));
        let small = big.edited(remove(0..5_000), &counters);
        assert_eq!(small.bits, 0);
        assert_eq!(found(&small, &a), Some(a.digest));
        assert_eq!(found(&small, &b), Some(b.digest));
    }

    #[test]
    fn grows_shrinks_and_reshards_keeping_every_key_and_its_counter() {
        let counters = Counters::new();
        let empty = Snapshot::default();
        let big = empty.edited(insert(0..5_000), &counters);
        assert!(big.bits >= 3, "{} bits for 5,000 keys", big.bits);
        check(&big, 0..5_000, &[]);
        let before = counters_of(&big);
        assert_eq!(
            before
                .values()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            5_000,
            "one counter per id"
        );
        // One key out, one in: only their shards are new.
        let gone = ApiKey::new("k7", "s7");
        let next = big.edited(
            Edit {
                remove: vec![(gone.digest, gone.id.clone())],
                insert: insert(5_000..5_001).insert,
            },
            &counters,
        );
        check(&next, (0..5_001).filter(|&i| i != 7), &[7]);
        let shared = (0..big.shards.len())
            .filter(|&s| Arc::ptr_eq(&big.shards[s], &next.shards[s]))
            .count();
        assert!(shared + 2 >= big.shards.len(), "only touched shards copied");
        // Down to a few keys: fewer shards, the same counters.
        let small = next.edited(remove((10..5_001).filter(|&i| i != 7)), &counters);
        assert_eq!(small.bits, 0);
        check(&small, (0..10).filter(|&i| i != 7), &[7, 11, 5_000]);
        for (id, counter) in counters_of(&small) {
            assert_eq!(before[&id], counter, "{id}");
        }
    }

    #[test]
    fn a_key_keeps_its_counter_under_its_id_and_a_removed_one_is_reused_afresh() {
        let counters = Counters::new();
        let first = Snapshot::default().edited(insert(0..3), &counters);
        let old = counters_of(&first);
        let replacement = ApiKey::new("k1", "new-secret");
        let gone = ApiKey::new("k2", "s2");
        let next = first.edited(
            Edit {
                remove: vec![
                    (KeyDigest::of(b"s1"), replacement.id.clone()),
                    (gone.digest, gone.id.clone()),
                ],
                insert: vec![
                    (
                        replacement.digest,
                        KeyEntry::for_tests(&replacement),
                        Some(KeyDigest::of(b"s1")),
                    ),
                    insert(9..10).insert.remove(0),
                ],
            },
            &counters,
        );
        let new = counters_of(&next);
        assert_eq!(new["k1"], old["k1"], "carried under its id");
        assert_eq!(new["k0"], old["k0"]);
        // `k9` takes the cell `k2` gave back, in a new generation.
        assert_ne!(new["k9"], old["k2"]);
        assert_eq!(new.len(), 3);
        assert!(!new.values().any(|c| *c == old["k2"]));
    }
}
