//! One immutable version of a store's keys, and how a new version is made from it.
//!
//! The keys are cut into shards by a keyed hash of their digest (see [`Shard`] and
//! [`Place`]), and an id index, cut the same way by a hash of the id, finds a key by
//! its id: each id shard is a sorted list of (the id hash's low 32 bits, digest), 36
//! bytes a key, checked against the entry's id. A new version shares every shard an
//! edit does not touch with the old one: a one-key change copies the key's shard and
//! its id's (each about the square root of the set's size) and the arrays that hold
//! the shards.

use std::{hash::BuildHasher, sync::Arc};

use crate::{
    key::digest::{DigestSet, KeyDigest, Place},
    store::counters::{Counter, Counters},
    store::entry::KeyEntry,
    store::shard::{GROUPS, Handle, Shard, ShardBuilder},
};

/// The fewest keys a shard holds on average when the shard count is chosen: a set of
/// fewer than twice this is then one shard (see [`bits_after`] for a set that shrinks).
const MIN_PER_SHARD: usize = 64;

/// The most shards (as a power of two): as many as a [`Place`] has bits for.
const MAX_BITS: u32 = Place::SHARD_BITS;

/// (the low 32 bits of the id's hash, digest of the key), sorted by those bits. The
/// top bits chose the id shard; the low ones, among its thousand-odd ids, rarely
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
    /// The shards themselves, not pointers to them: a lookup reads where a shard's
    /// slots and tags are from here (see [`Shard`]).
    shards: Box<[Shard]>,
    /// Each shard's handles, one per group of threads: what a request's `KeyInfo`
    /// holds (see [`Handle`]). Shared, as the shards are, by the versions that have
    /// the shard. Held by value, eight pointers a shard, as the shards are: a request
    /// goes from here straight to its handle's count, not through an allocation
    /// holding the shard's eight first (in a large, cold set, 26–35 ns less a
    /// request; a new version clones eight pointers a shard instead of one, which
    /// makes a one-key change at 1M keys take about 0.25 ms longer, see
    /// `benches/README.md`).
    handles: Box<[Handles]>,
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
        let shard = ShardBuilder::with_capacity(0).build();
        Self {
            version: 0,
            len: 0,
            bits: 0,
            handles: Box::new([Handle::all(&shard)]),
            shards: Box::new([shard]),
            ids: Box::new([Arc::new(IdShard::new())]),
            id_hasher: IdHasher::default(),
        }
    }
}

/// The shard count, as a power of two, for `n` keys: shards of 1.4 to 2.8 times the
/// square root of `n` keys (512 shards of about 2,000 keys at a million, 2,048 of
/// about 4,900 at ten million), and of at least [`MIN_PER_SHARD`] keys. That is when
/// the count is chosen: a set that shrinks keeps it until it calls for a quarter as
/// many shards (see [`bits_after`]), down to 32 keys a shard on average (a set of
/// fewer than 128 keys may keep two shards).
///
/// A one-key change copies one shard and the array of all of them, so its cost is
/// least with the two about the same size: a square root. Fewer, larger shards also
/// make a lookup's first reads, the shard's entry in the array and its handle, hit
/// the cache in a large, cold set: a million keys in 4,096 shards of 256 spread those
/// over most of a megabyte, which every request's trip to its slot evicts from; 512
/// shards keep them in about a hundred kilobytes (see `benches/README.md`).
fn bits_for(n: usize) -> u32 {
    // ⌈log2 n⌉, 0 for 0 and 1.
    let log = usize::BITS - n.saturating_sub(1).leading_zeros();
    let root = (log / 2).saturating_sub(1);
    let fullest = (n / MIN_PER_SHARD).checked_ilog2().unwrap_or(0);
    root.min(fullest).min(MAX_BITS)
}

/// The shard count, as a power of two, for `n` keys cut into `1 << bits` shards
/// before. Resharded (every shard built anew) as soon as the set calls for more
/// shards, but for fewer only when it calls for a quarter as many: a set that goes
/// back and forth across one size is not resharded each time.
fn bits_after(bits: u32, n: usize) -> u32 {
    let ideal = bits_for(n);
    match ideal > bits || ideal + 1 < bits {
        true => ideal,
        false => bits,
    }
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

    /// The shard of a key at `place`.
    #[inline]
    fn shard_of(&self, place: Place) -> usize {
        place.shard(self.bits)
    }

    fn id_hash(&self, id: &str) -> u64 {
        self.id_hasher.hash_one(id)
    }

    /// The shard and slot holding this digest.
    #[inline]
    pub(crate) fn find(&self, digest: &KeyDigest) -> Option<(&Shard, usize)> {
        let place = digest.place();
        let shard = &self.shards[self.shard_of(place)];
        shard.find(digest, place).map(|i| (shard, i))
    }

    /// The shard and slot holding this digest, and the shard's handle for `group`:
    /// the request path.
    #[inline]
    pub(crate) fn lookup(
        &self,
        digest: &KeyDigest,
        group: usize,
    ) -> Option<(&Shard, usize, &Arc<Handle>)> {
        // One keyed hash for the shard, the slot the walk starts at and the tag.
        let place = digest.place();
        let s = self.shard_of(place);
        let shard = &self.shards[s];
        let handle = &self.handles[s][group % GROUPS];
        // In a large, cold set: after this array's entry (where the shard's tags and
        // slots are), two trips to memory, the tags and the slot, made at once rather
        // than one after the other: the slot where the walk starts does not depend on
        // the tags. Only a load, of a line the request reads next. The handle is read
        // when the request's `KeyInfo` is made.
        shard.warm(place);
        let i = shard.find(digest, place)?;
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

    /// How many keys each shard holds.
    #[cfg(test)]
    pub(crate) fn shard_lens(&self) -> Vec<usize> {
        self.shards.iter().map(|shard| shard.len()).collect()
    }

    /// The slots a lookup of each key reads, on average over the keys.
    #[cfg(test)]
    pub(crate) fn mean_walk(&self) -> f64 {
        let walked: usize = self.shards.iter().map(|shard| shard.walked()).sum();
        walked as f64 / self.len.max(1) as f64
    }

    /// The longest run of occupied slots in any shard: the most a lookup reads.
    #[cfg(test)]
    pub(crate) fn longest_run(&self) -> usize {
        (self.shards.iter())
            .map(|shard| shard.longest_run())
            .max()
            .unwrap_or(0)
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
        let bits = bits_after(self.bits, len);
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
            touched[next.shard_of(digest.place())] = true;
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
            counts[next.shard_of(digest.place())] += 1;
        }
        for (digest, _, _) in &edit.insert {
            counts[next.shard_of(digest.place())] += 1;
        }
        let mut built: Vec<Option<ShardBuilder>> = (0..1 << bits)
            .map(|s| touched[s].then(|| ShardBuilder::with_capacity(counts[s])))
            .collect();
        let mut put = |digest: KeyDigest, entry: Arc<KeyEntry>, counter: Counter| {
            // Free by the caller's checks; a clash would only drop a duplicate.
            let place = digest.place();
            if let Some(shard) = &mut built[next.shard_of(place)] {
                let _ = shard.insert(digest, place, entry, counter);
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
                    let shard = shard.build();
                    let handles = Handle::all(&shard);
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

    /// `n` digests alike but for a counter written over `width` bytes from `at`, as a
    /// script writing `sha256` values makes them: little-endian, or big-endian ending
    /// at `at + width` (`000…001`, `000…002`, … over zeros).
    fn alike(n: usize, at: usize, width: usize, big_endian: bool) -> Vec<KeyDigest> {
        let base = match big_endian {
            true => [0; 32],
            false => KeyDigest::of(b"base").0,
        };
        (0..n as u64)
            .map(|i| {
                let mut d = base;
                let counter = match big_endian {
                    true => i.to_be_bytes()[8 - width..].to_vec(),
                    false => i.to_le_bytes()[..width].to_vec(),
                };
                d[at..at + width].copy_from_slice(&counter);
                KeyDigest(d)
            })
            .collect()
    }

    /// Digests made up alike, in whichever bytes they share, are spread as real ones
    /// are: shards of about even size and no long run of slots in any of them. Placed
    /// by their own bits, those differing in their last bytes all went to one shard
    /// and one slot (a run of 20,000, and a build that compared every pair).
    #[test]
    fn made_up_digests_alike_but_for_a_few_bytes_are_spread_as_real_ones() {
        const N: usize = 20_000;
        let counters = Counters::new();
        let build = |digests: &[KeyDigest]| {
            let insert = (digests.iter().enumerate())
                .map(|(i, d)| {
                    let key = ApiKey::from_digest(format!("m{i}").into(), *d);
                    (*d, KeyEntry::for_tests(&key), None)
                })
                .collect();
            Snapshot::default().edited(
                Edit {
                    remove: Vec::new(),
                    insert,
                },
                &counters,
            )
        };
        let real: Vec<KeyDigest> = (0..N)
            .map(|i| KeyDigest::of(format!("real{i}").as_bytes()))
            .collect();
        let patterns = [
            ("real digests", real),
            ("the last four bytes", alike(N, 28, 4, false)),
            ("the first four bytes", alike(N, 0, 4, false)),
            ("bytes 8 to 12", alike(N, 8, 4, false)),
            ("bytes 16 to 20", alike(N, 16, 4, false)),
            ("000…001, 000…002, …", alike(N, 24, 8, true)),
        ];
        for (what, digests) in patterns {
            let snapshot = build(&digests);
            assert_eq!(snapshot.len(), N, "{what}");
            for (i, d) in digests.iter().enumerate() {
                let (entry, _) = snapshot.entry(d).expect("present");
                assert_eq!(*entry.id, format!("m{i}"), "{what}");
            }
            // 64 shards of 312 keys on average (390 slots): a binomial spread stays
            // far from twice that (1.24 times at most over 900 such sets).
            let lens = snapshot.shard_lens();
            let mean = N / lens.len();
            let largest = lens.iter().copied().max().unwrap_or(0);
            assert!(lens.len() >= 64, "{what}: {} shards", lens.len());
            assert!(
                largest < 2 * mean,
                "{what}: a shard of {largest}, {mean} on average"
            );
            // Four-fifths full, linear probing: a lookup reads 2.7 slots on average
            // (3.05 at most over 900 such sets), and the longest run of the 64 shards
            // is a hundred-odd slots (123 in the median set, 187 at most). By the
            // digest's own bits, the keys of a shard all started at one slot: a walk
            // of half a shard on average, and a run of the whole shard.
            let walk = snapshot.mean_walk();
            assert!(walk < 4.0, "{what}: {walk:.2} slots read per lookup");
            let run = snapshot.longest_run();
            assert!(run <= 300, "{what}: a run of {run} slots");
        }
    }

    /// Invariants of the shard count as a set grows and shrinks at random (by one
    /// key, by batches, by large jumps): a shard holds at most about three times the
    /// square root of the set's keys on average (or 128), at least 32 (a set of fewer
    /// than 128 keys may keep two shards), and a set that then goes back and forth by one
    /// key from wherever it is reshards at most twice. `TAK_SEED=<seed>` replays one.
    #[test]
    fn the_shard_count_follows_the_set_and_does_not_flap() {
        let seeds: Vec<u64> = match std::env::var("TAK_SEED").ok().and_then(|s| s.parse().ok()) {
            Some(seed) => vec![seed],
            None => (1..=200).map(|i| 0x5eed_5000 + i).collect(),
        };
        for seed in seeds {
            let replay = format!("replay with TAK_SEED={seed} cargo test --lib the_shard_count");
            let mut next = crate::testing::xorshift(seed);
            let (mut n, mut bits) = (0usize, 0u32);
            for step in 0..400 {
                n = match next() % 4 {
                    0 => n.saturating_sub(next() as usize % 3),
                    1 => n + next() as usize % 3,
                    2 => n + next() as usize % 5_000,
                    _ => match next() % 2 {
                        0 => n / 4,
                        _ => n.saturating_mul(3).min(1 << 34),
                    },
                };
                bits = bits_after(bits, n);
                let mean = n >> bits;
                let root = (n as f64).sqrt();
                assert!(
                    (mean as f64) <= (3.0 * root).max(128.0),
                    "{n} keys in {} shards at step {step}: {replay}",
                    1u64 << bits
                );
                assert!(
                    mean >= 32 || (n < 128 && bits <= 1),
                    "{n} keys in {} shards at step {step}: {replay}",
                    1u64 << bits
                );
                // Back and forth by one key from here.
                let (mut b, mut reshards) = (bits, 0);
                for k in 0..20 {
                    let was = b;
                    b = bits_after(b, if k % 2 == 0 { n + 1 } else { n });
                    reshards += usize::from(b != was);
                }
                assert!(
                    reshards <= 2,
                    "{reshards} reshards around {n} keys: {replay}"
                );
            }
        }
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
            .filter(|&s| big.shards[s].is(&next.shards[s]))
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
