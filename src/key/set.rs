use std::{fmt, hash::BuildHasher, sync::Arc};

use hashbrown::HashTable;

use crate::{ApiKey, Error};

/// A complete, validated set of keys: what a [`KeySource`](crate::KeySource) yields.
///
/// Every id is unique and no secret appears under two ids; [`KeySet::insert`] refuses
/// anything else, so a set that exists is a set the store can apply. An empty set is
/// valid and means "let nobody in": the layer never fails open.
///
/// Cloning is cheap (the keys are shared).
///
/// # Example
///
/// ```
/// use tower_api_key::{ApiKey, KeySet};
///
/// let set = KeySet::from_keys([
///     ApiKey::new("old", "key-1"),
///     ApiKey::new("new", "key-2"),
/// ])?;
/// assert_eq!(set.len(), 2);
///
/// // The same secret under two ids is refused, naming the ids only.
/// let err = KeySet::from_keys([ApiKey::new("a", "same"), ApiKey::new("b", "same")])
///     .unwrap_err();
/// assert_eq!(err.to_string(), "key `b` has the same secret as key `a`");
/// # Ok::<(), tower_api_key::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct KeySet {
    inner: Arc<Inner>,
}

#[derive(Clone, Default)]
struct Inner {
    keys: Vec<ApiKey>,
    /// Positions in `keys`, found by id and by digest: four bytes a key each, where a
    /// map holding the ids and digests again took a hundred.
    by_id: HashTable<u32>,
    by_digest: HashTable<u32>,
    ids: foldhash::fast::RandomState,
}

/// Fills an empty `table` with the positions `0..hashes.len()`, placed by `hashes`,
/// in the order of their places in the table, keeping the first of any positions
/// that `same` says are equal. Returns the first repeat in position order, with the
/// position it repeats.
///
/// Every position but the first of its group is seen as a repeat on the way (the
/// table keeps the lowest of a group so far), so the lowest repeat seen is the
/// second of its group, and it repeats the first.
fn fill(
    table: &mut HashTable<u32>,
    hashes: &[u64],
    same: impl Fn(usize, usize) -> bool,
) -> Option<(usize, usize)> {
    // The table's places: the low bits of a hash, as many as it has buckets
    // (hashbrown keeps seven-eighths of its buckets usable).
    let buckets = (table.capacity().saturating_mul(8).div_ceil(7)).next_power_of_two();
    let place = |h: u64| h & (buckets as u64 - 1);
    debug_assert!(u32::try_from(hashes.len()).is_ok(), "positions are u32");
    let mut order: Vec<u32> = (0..hashes.len() as u32).collect();
    order.sort_unstable_by_key(|&i| place(hashes[i as usize]));
    let mut first_repeat: Option<(usize, usize)> = None;
    for i in order {
        let (at, hash) = (i as usize, hashes[i as usize]);
        match table.find_mut(hash, |&j| same(j as usize, at)) {
            Some(kept) => {
                let (first, later) = match (*kept as usize) < at {
                    true => (*kept as usize, at),
                    false => (at, std::mem::replace(kept, i) as usize),
                };
                if first_repeat.is_none_or(|(seen, _)| later < seen) {
                    first_repeat = Some((later, first));
                }
            }
            None => {
                table.insert_unique(hash, i, |&j| hashes[j as usize]);
            }
        }
    }
    first_repeat
}

/// Where a digest goes in a set's index: its keyed
/// [`place`](crate::key::KeyDigest::place), the hash the store places it by, not its
/// own bits. A digest computed from a secret is uniform, but a key file's `sha256`
/// entries are whatever was written: `000…001`, `000…002`, … all shared their bits,
/// and building a set of 30,000 of them compared every pair (ten minutes).
fn digest_hash(digest: &crate::key::KeyDigest) -> u64 {
    digest.place().0
}

/// What a set says to a key that would be its 2^32nd (positions are four bytes).
fn too_many(id: &str) -> Error {
    Error::invalid(Some(id), "a key set holds fewer than 2^32 keys")
}

/// The position of the key with this id, from its hash.
fn find_id(table: &HashTable<u32>, keys: &[ApiKey], hash: u64, id: &str) -> Option<usize> {
    table
        .find(hash, |&i| *keys[i as usize].id == *id)
        .map(|&i| i as usize)
}

impl Inner {
    fn insert(&mut self, key: ApiKey) -> Result<(), Error> {
        key.validate()?;
        let position = match u32::try_from(self.keys.len()) {
            Ok(position) if position < u32::MAX => position,
            _ => return Err(too_many(&key.id)),
        };
        let id_hash = self.ids.hash_one(&*key.id);
        if find_id(&self.by_id, &self.keys, id_hash, &key.id).is_some() {
            return Err(Error::DuplicateId {
                id: key.id.to_string(),
            });
        }
        let hash = digest_hash(&key.digest);
        let keys = &self.keys;
        if let Some(&first) = self
            .by_digest
            .find(hash, |&i| keys[i as usize].digest == key.digest)
        {
            return Err(Error::DuplicateKey {
                first: self.keys[first as usize].id.to_string(),
                second: key.id.to_string(),
            });
        }
        let (ids, keys) = (&self.ids, &self.keys);
        self.by_id
            .insert_unique(id_hash, position, |&i| ids.hash_one(&*keys[i as usize].id));
        self.by_digest
            .insert_unique(hash, position, |&i| digest_hash(&keys[i as usize].digest));
        self.keys.push(key);
        Ok(())
    }
}

impl KeySet {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set with room for `n` keys.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn with_capacity(n: usize) -> Self {
        let mut inner = Inner::default();
        inner.keys.reserve(n);
        inner.by_id = HashTable::with_capacity(n);
        inner.by_digest = HashTable::with_capacity(n);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Builds a set from keys, validating each.
    ///
    /// # Errors
    ///
    /// The first [`Error::InvalidKey`], [`Error::DuplicateId`] or
    /// [`Error::DuplicateKey`] met, in order, as inserting the keys one by one
    /// would find it. Nothing after the first invalid key is taken from `keys`.
    pub fn from_keys(keys: impl IntoIterator<Item = ApiKey>) -> Result<Self, Error> {
        // Taken up to the first invalid key, as inserting one by one would stop there.
        let keys = keys.into_iter();
        let mut taken = Vec::with_capacity(keys.size_hint().0);
        let mut invalid = None;
        for key in keys {
            if let Err(error) = key.validate() {
                invalid = Some(error);
                break;
            }
            taken.push(key);
        }
        let set = Self::build(taken).map_err(|(error, _)| error)?;
        match invalid {
            Some(error) => Err(error),
            None => Ok(set),
        }
    }

    /// Builds a set from keys in one go, with what [`from_keys`](Self::from_keys)
    /// refuses and the position of the key refused: the first one that is invalid or
    /// repeats an id or a secret of a key before it, exactly as inserting them one by
    /// one would find.
    ///
    /// Inserting a million keys one by one into the id and digest indexes is two trips
    /// to memory a key (a new key's place is anywhere). Here each index is filled in
    /// the order of its places, so its memory is walked once, front to back.
    pub(crate) fn build(mut keys: Vec<ApiKey>) -> Result<Self, (Error, usize)> {
        // The first key refused on its own: an invalid one, or the 2^32nd. Only the
        // keys before it count: a repeat among them comes first.
        let invalid = keys
            .iter()
            .take(u32::MAX as usize + 1)
            .enumerate()
            .find_map(|(at, key)| key.validate().err().map(|e| (e, at)))
            .or_else(|| {
                let at = u32::MAX as usize;
                keys.get(at).map(|key| (too_many(&key.id), at))
            });
        if let Some((_, at)) = &invalid {
            keys.truncate(*at);
        }
        let mut inner = Inner {
            by_id: HashTable::with_capacity(keys.len()),
            by_digest: HashTable::with_capacity(keys.len()),
            ..Inner::default()
        };
        let ids = &inner.ids;
        let id_hashes: Vec<u64> = keys.iter().map(|k| ids.hash_one(&*k.id)).collect();
        let repeated_id = fill(&mut inner.by_id, &id_hashes, |a, b| {
            keys[a].id == keys[b].id
        });
        drop(id_hashes);
        let digest_hashes: Vec<u64> = keys.iter().map(|k| digest_hash(&k.digest)).collect();
        let repeated_digest = fill(&mut inner.by_digest, &digest_hashes, |a, b| {
            keys[a].digest == keys[b].digest
        });
        // The first repeat in order; an id before a secret, as `insert` checks them.
        let repeat = match (repeated_id, repeated_digest) {
            (Some((at, _)), Some((other, _))) if at <= other => repeated_id,
            (Some(_), Some(_)) => repeated_digest,
            (id, digest) => id.or(digest),
        };
        if let Some((at, first)) = repeat {
            let second = keys[at].id.to_string();
            let error = match repeated_id.is_some_and(|(i, _)| i == at) {
                true => Error::DuplicateId { id: second },
                false => Error::DuplicateKey {
                    first: keys[first].id.to_string(),
                    second,
                },
            };
            return Err((error, at));
        }
        if let Some(invalid) = invalid {
            return Err(invalid);
        }
        inner.keys = keys;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Adds a key.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidKey`] if the id is empty, longer than 256 bytes, or holds
    ///   whitespace or invisible characters (Unicode controls, format characters such
    ///   as bidirectional overrides, line separators); if the secret is empty, longer
    ///   than 4,096 bytes, or has leading or trailing whitespace or a control
    ///   character (no request could present it); or if `not_before` is not before
    ///   `expires_at`, or if the set holds 2^32 − 1 keys already;
    /// - [`Error::DuplicateId`] if the set has a key with this id;
    /// - [`Error::DuplicateKey`] if the set has this secret under another id.
    ///
    /// The set is unchanged on error.
    pub fn insert(&mut self, key: ApiKey) -> Result<(), Error> {
        Arc::make_mut(&mut self.inner).insert(key)
    }

    /// Whether writing this set's keys over `stored` (the keys held beside it, each
    /// replaced by this set's key of the same id, if any) would put one secret under
    /// two ids: [`Error::DuplicateKey`] naming the first stored key found whose
    /// secret a key of this set, under another id, holds.
    #[cfg_attr(not(any(feature = "redis", feature = "postgres")), allow(dead_code))]
    pub(crate) fn clashes_with<'a>(
        &self,
        stored: impl IntoIterator<Item = &'a ApiKey>,
    ) -> Result<(), Error> {
        let inner = &*self.inner;
        for key in stored {
            if self.get(&key.id).is_some() {
                continue;
            }
            let hash = digest_hash(&key.digest);
            if let Some(&at) = inner
                .by_digest
                .find(hash, |&i| inner.keys[i as usize].digest == key.digest)
            {
                return Err(Error::DuplicateKey {
                    first: key.id.to_string(),
                    second: inner.keys[at as usize].id.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.inner.keys.len()
    }

    /// Whether the set has no keys (and so lets nobody in).
    pub fn is_empty(&self) -> bool {
        self.inner.keys.is_empty()
    }

    /// The key with this id.
    pub fn get(&self, id: &str) -> Option<&ApiKey> {
        let inner = &*self.inner;
        let hash = inner.ids.hash_one(id);
        find_id(&inner.by_id, &inner.keys, hash, id).map(|i| &inner.keys[i])
    }

    /// The keys, in insertion order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &ApiKey> {
        self.inner.keys.iter()
    }

    /// The set as a key file, in insertion order: one `[[keys]]` table per key,
    /// holding its digest (`sha256`), never a secret. [`FileSource`] reads it back as
    /// this set; an empty set is written `keys = []`.
    ///
    /// [`FileSource`]: https://docs.rs/tower-api-key/latest/tower_api_key/struct.FileSource.html
    ///
    /// # Example
    ///
    /// ```
    /// use tower_api_key::{ApiKey, KeySet};
    ///
    /// let set = KeySet::from_keys([ApiKey::new("o'brien", "s3cr3t").with_scopes(["read"])])?;
    /// let text = set.to_toml();
    /// assert!(text.starts_with("[[keys]]\nid = \"o'brien\"\nsha256 = "));
    /// assert!(!text.contains("s3cr3t"));
    /// # Ok::<(), tower_api_key::Error>(())
    /// ```
    pub fn to_toml(&self) -> String {
        crate::source::key_file::write::file(self.iter())
    }

    /// Writes the set as a key file at `path` ([`KeySet::to_toml`]), replacing it
    /// atomically: a new file is created beside it (readable by its owner only, or with
    /// the permissions, owner and group of the file it replaces), synced and renamed
    /// over it, so a watching [`FileSource`](crate::FileSource) and a crash alike see
    /// the old file or the new one. A `path` that is a symlink is written through: the
    /// file it names is replaced, the link stays (but not a link into `/proc`, such as
    /// `/dev/stdout`, nor, in a directory others may write to such as `/tmp`, a link
    /// or file another user owns). A hard link to the old file keeps the old file.
    ///
    /// # Errors
    ///
    /// [`Error::Write`] if the file cannot be written, or if something other than a
    /// regular file is at `path` (a directory, a device such as `/dev/null`, a FIFO, a
    /// socket, a symlink that leads nowhere): that is left as it is, never replaced by
    /// a file of keys. Where the error's source says the new file is in place but
    /// its directory could not be synced, the file was written, but the write may
    /// not survive a crash.
    #[cfg(feature = "file")]
    pub fn write_file(&self, path: impl AsRef<std::path::Path>) -> Result<(), Error> {
        let path = path.as_ref();
        crate::source::key_file::write::replace(path, self.to_toml().as_bytes())
            .map_err(|e| Error::write(path, e))
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("len", &self.len())
            .field("ids", &First(self.into_iter().map(ApiKey::id)))
            .finish()
    }
}

/// As `Debug`, a list's first sixteen items and how many more: a set or a report of
/// a million keys prints a line, not a million ids.
pub(crate) struct First<I>(pub(crate) I);

impl<I> fmt::Debug for First<I>
where
    I: ExactSizeIterator + Clone,
    I::Item: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 16;
        let mut list = f.debug_list();
        list.entries(self.0.clone().take(SHOWN));
        if self.0.len() > SHOWN {
            list.entry(&format_args!("… {} more", self.0.len() - SHOWN));
        }
        list.finish()
    }
}

impl<'a> IntoIterator for &'a KeySet {
    type Item = &'a ApiKey;
    type IntoIter = std::slice::Iter<'a, ApiKey>;

    fn into_iter(self) -> Self::IntoIter {
        self.inner.keys.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `import` checks before it writes over stored keys: a key written that
    /// holds the secret of a stored key it does not replace is named with it; one
    /// that replaces the stored key of its own id, or swaps secrets with it, is not.
    #[test]
    fn keys_written_over_stored_ones_clash_only_with_those_they_leave() {
        let key = |id: &str, secret: &str| ApiKey::new(id, secret);
        let stored = [key("old", "s1"), key("other", "s2")];
        let import = KeySet::from_keys([key("new", "s1")]).unwrap();
        match import.clashes_with(&stored) {
            Err(Error::DuplicateKey { first, second }) => {
                assert_eq!((first.as_str(), second.as_str()), ("old", "new"));
            }
            other => panic!("{other:?}"),
        }
        // "old" rewritten with "other"'s secret, "other" given a new one: the result
        // holds each secret once.
        let swap = KeySet::from_keys([key("old", "s2"), key("other", "s3")]).unwrap();
        assert!(swap.clashes_with(&stored).is_ok());
        let same = KeySet::from_keys([key("old", "s1")]).unwrap();
        assert!(same.clashes_with(&stored).is_ok());
    }

    /// Random lists of keys with repeated ids, repeated secrets and invalid ids: a
    /// set built in one go refuses the same key for the same reason as inserting them
    /// one by one, and otherwise holds the same keys, found by id and by digest.
    #[test]
    fn building_in_one_go_finds_what_inserting_one_by_one_finds() {
        let mut random = crate::testing::xorshift(0x2545_f491_4f6c_dd1d);
        let mut next = move |n: u64| random() % n;
        let mut refusals = 0;
        for _ in 0..5_000 {
            let len = next(40);
            let (keys, secrets): (Vec<ApiKey>, Vec<String>) = (0..len)
                .map(|_| {
                    let id = match next(50) {
                        0 => " spaced".to_owned(),
                        n => format!("k{}", n % (len * 8 + 5)),
                    };
                    let secret = format!("secret-{}", next(len * 12 + 1));
                    (ApiKey::new(id, secret.clone()), secret)
                })
                .unzip();
            let mut one_by_one = KeySet::new();
            let expected = keys.iter().enumerate().find_map(|(at, key)| {
                one_by_one
                    .insert(key.clone())
                    .err()
                    .map(|e| (e.to_string(), at))
            });
            let from_keys = KeySet::from_keys(keys.clone()).map(|s| s.len());
            match &expected {
                Some((refused, _)) => {
                    assert_eq!(from_keys.map_err(|e| e.to_string()), Err(refused.clone()));
                }
                None => assert_eq!(from_keys.ok(), Some(keys.len())),
            }
            match (KeySet::build(keys.clone()), expected) {
                (Err((error, at)), Some(expected)) => {
                    assert_eq!((error.to_string(), at), expected);
                    refusals += 1;
                }
                (Ok(set), None) => {
                    assert_eq!(set.len(), keys.len());
                    for ((built, key), secret) in set.iter().zip(&keys).zip(&secrets) {
                        assert_eq!(built.id, key.id);
                        assert_eq!(set.get(&key.id).map(|k| k.digest), Some(key.digest));
                        // The digest index holds it too.
                        let again = set.clone().insert(ApiKey::new("fresh", secret.as_str()));
                        let refused =
                            format!("key `fresh` has the same secret as key `{}`", key.id);
                        assert_eq!(again.map_err(|e| e.to_string()), Err(refused));
                    }
                    assert!(set.get("absent").is_none());
                }
                (built, expected) => panic!(
                    "built: {:?}, one by one: {expected:?}",
                    built
                        .map(|s| s.len())
                        .map_err(|(e, at)| (e.to_string(), at))
                ),
            }
        }
        assert!(refusals > 1_000 && refusals < 4_500, "{refusals} refusals");
    }

    /// `from_keys` takes nothing past the first invalid key (a key source may be
    /// long), and a repeat before it is still what it says.
    #[test]
    fn from_keys_stops_at_the_first_invalid_key() {
        let never = std::iter::from_fn(|| -> Option<ApiKey> { panic!("read past an invalid key") });
        let keys = [ApiKey::new("a", "k1"), ApiKey::new("", "k2")];
        let refused = KeySet::from_keys(keys.into_iter().chain(never));
        assert!(
            matches!(refused, Err(Error::InvalidKey { .. })),
            "{refused:?}"
        );
        let never = std::iter::from_fn(|| -> Option<ApiKey> { panic!("read past an invalid key") });
        let keys = [
            ApiKey::new("a", "k1"),
            ApiKey::new("a", "k2"),
            ApiKey::new("", "k3"),
        ];
        let refused = KeySet::from_keys(keys.into_iter().chain(never));
        assert!(
            matches!(refused, Err(Error::DuplicateId { .. })),
            "{refused:?}"
        );
    }

    #[test]
    fn refuses_duplicates_and_bad_ids_and_stays_unchanged() {
        let mut set = KeySet::new();
        set.insert(ApiKey::new("a", "k1")).unwrap();
        assert!(matches!(
            set.insert(ApiKey::new("a", "k2")),
            Err(Error::DuplicateId { id }) if id == "a"
        ));
        assert!(matches!(
            set.insert(ApiKey::new("b", "k1")),
            Err(Error::DuplicateKey { first, second }) if first == "a" && second == "b"
        ));
        assert!(set.insert(ApiKey::new("", "k3")).is_err());
        assert!(set.insert(ApiKey::new("has space", "k3")).is_err());
        assert!(set.insert(ApiKey::new("x".repeat(257), "k3")).is_err());
        assert_eq!(set.len(), 1);
        assert!(set.get("a").is_some());
    }

    #[test]
    fn bulk_validation_reports_like_one_by_one() {
        let err = KeySet::from_keys([
            ApiKey::new("a", "k1"),
            ApiKey::new("b", "k2"),
            ApiKey::new("a", "k3"),
            ApiKey::new("c", "k2"),
        ])
        .unwrap_err();
        assert_eq!(err.to_string(), "duplicate key id `a`");
        let err = KeySet::from_keys([
            ApiKey::new("a", "k1"),
            ApiKey::new("b", "k2"),
            ApiKey::new("c", "k2"),
        ])
        .unwrap_err();
        assert_eq!(err.to_string(), "key `c` has the same secret as key `b`");
        // Many ids: an equal-hash check must not report distinct ids.
        let set =
            KeySet::from_keys((0..10_000).map(|i| ApiKey::new(format!("k{i}"), format!("s{i}"))))
                .unwrap();
        assert_eq!(set.get("k9999").unwrap().id(), "k9999");
    }

    #[test]
    fn large_sets_find_duplicates_anywhere() {
        // A clash between the first and the last key is found, and named in order.
        let many = |last: ApiKey| {
            KeySet::from_keys(
                (0..20_000)
                    .map(|i| ApiKey::new(format!("k{i}"), format!("s{i}")))
                    .chain([last]),
            )
        };
        let err = many(ApiKey::new("k0", "fresh")).unwrap_err();
        assert_eq!(err.to_string(), "duplicate key id `k0`");
        let err = many(ApiKey::new("last", "s0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "key `last` has the same secret as key `k0`"
        );
        assert_eq!(many(ApiKey::new("last", "fresh")).unwrap().len(), 20_001);
    }

    #[test]
    fn clones_are_independent() {
        let mut a = KeySet::from_keys([ApiKey::new("a", "k1")]).unwrap();
        let b = a.clone();
        a.insert(ApiKey::new("b", "k2")).unwrap();
        assert_eq!((a.len(), b.len()), (2, 1));
    }

    #[test]
    fn len_emptiness_iteration_and_a_long_debug() {
        let empty = KeySet::new();
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
        let set = KeySet::from_keys((0..20).map(|i| ApiKey::new(format!("k{i}"), format!("s{i}"))))
            .unwrap();
        assert!(!set.is_empty());
        let ids: Vec<&str> = (&set).into_iter().map(ApiKey::id).collect();
        assert_eq!(ids.len(), 20);
        assert_eq!(ids[19], "k19");
        let dbg = format!("{set:?}");
        assert!(
            dbg.contains("k15") && !dbg.contains("k16") && dbg.contains("… 4 more"),
            "{dbg}"
        );
        let sixteen =
            KeySet::from_keys((0..16).map(|i| ApiKey::new(format!("k{i}"), format!("s{i}"))))
                .unwrap();
        assert!(!format!("{sixteen:?}").contains("more"));
    }

    #[test]
    fn debug_lists_ids_not_secrets() {
        let set = KeySet::from_keys([ApiKey::new("visible-id", "hidden-secret")]).unwrap();
        let dbg = format!("{set:?}");
        assert!(dbg.contains("visible-id"));
        assert!(!dbg.contains("hidden-secret"));
    }
}
