use std::{
    collections::HashMap,
    fmt,
    hash::BuildHasher,
    sync::{Arc, OnceLock},
};

use crate::{
    ApiKey, Error,
    background::Pacer,
    key::{DigestHasher, KeyDigest},
};

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
    /// Built on first use: a large set validated in bulk never needs it.
    index: OnceLock<Index>,
}

#[derive(Clone, Default)]
struct Index {
    by_digest: HashMap<KeyDigest, usize, DigestHasher>,
    by_id: HashMap<Arc<str>, usize>,
}

impl Inner {
    fn index(&self) -> &Index {
        self.index.get_or_init(|| {
            let n = self.keys.len();
            let mut index = Index {
                by_digest: HashMap::with_capacity_and_hasher(n, DigestHasher::default()),
                by_id: HashMap::with_capacity(n),
            };
            let mut pacer = Pacer::new();
            for (i, key) in self.keys.iter().enumerate() {
                pacer.step();
                index.by_digest.insert(key.digest, i);
                index.by_id.insert(key.id.clone(), i);
            }
            index
        })
    }
}

impl KeySet {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a set from keys, validating each.
    ///
    /// # Errors
    ///
    /// The first [`Error::InvalidKey`], [`Error::DuplicateId`] or
    /// [`Error::DuplicateKey`] met.
    pub fn from_keys(keys: impl IntoIterator<Item = ApiKey>) -> Result<Self, Error> {
        let keys: Vec<ApiKey> = keys.into_iter().collect();
        if keys.iter().all(|k| validate_id(&k.id).is_ok()) && !has_duplicates(&keys) {
            return Ok(Self {
                inner: Arc::new(Inner {
                    keys,
                    index: OnceLock::new(),
                }),
            });
        }
        // Something is wrong: insert one by one, which finds the first offending key
        // in order and says exactly what is wrong with it.
        let mut set = Self::new();
        for key in keys {
            set.insert(key)?;
        }
        Ok(set)
    }

    /// The keys, if no other copy of the set shares them (for freeing piecemeal).
    pub(crate) fn into_unshared_keys(self) -> Option<Vec<ApiKey>> {
        Arc::try_unwrap(self.inner).ok().map(|inner| inner.keys)
    }

    /// Adds a key.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidKey`] if the id is empty, longer than 256 bytes, or holds
    ///   whitespace or control characters;
    /// - [`Error::DuplicateId`] if the set has a key with this id;
    /// - [`Error::DuplicateKey`] if the set has this secret under another id.
    ///
    /// The set is unchanged on error.
    pub fn insert(&mut self, key: ApiKey) -> Result<(), Error> {
        validate_id(&key.id)?;
        let inner = Arc::make_mut(&mut self.inner);
        inner.index();
        let Some(index) = inner.index.get_mut() else {
            unreachable!("the index was just built");
        };
        if index.by_id.contains_key(&key.id) {
            return Err(Error::DuplicateId {
                id: key.id.to_string(),
            });
        }
        if let Some(&first) = index.by_digest.get(&key.digest) {
            return Err(Error::DuplicateKey {
                first: inner.keys[first].id.to_string(),
                second: key.id.to_string(),
            });
        }
        let position = inner.keys.len();
        index.by_digest.insert(key.digest, position);
        index.by_id.insert(key.id.clone(), position);
        inner.keys.push(key);
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
        self.inner
            .index()
            .by_id
            .get(id)
            .map(|&i| &self.inner.keys[i])
    }

    /// The keys, in insertion order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &ApiKey> {
        self.inner.keys.iter()
    }
}

/// Whether two keys share a digest or an id, found by sorting compact copies rather
/// than by a million random hash-map probes.
fn has_duplicates(keys: &[ApiKey]) -> bool {
    // One thread on purpose: a reload runs beside live traffic, and on a small machine
    // a second busy thread takes a core from the requests.
    has_duplicate_digests(keys) || has_duplicate_ids(keys)
}

fn has_duplicate_digests(keys: &[ApiKey]) -> bool {
    // Sort eight-byte prefixes, which sort fast; digests are uniform, so equal
    // prefixes are rare and are then compared in full.
    let mut pacer = Pacer::new();
    let mut prefixes = Vec::with_capacity(keys.len());
    for (key, i) in keys.iter().zip(0u32..) {
        pacer.step();
        let mut head = [0u8; 8];
        head.copy_from_slice(&key.digest.0[..8]);
        prefixes.push((u64::from_be_bytes(head), i));
    }
    let prefixes = sort_uniform(prefixes, &mut pacer);
    prefixes.chunk_by(|a, b| a.0 == b.0).any(|run| {
        any_pair(run, |a, b| {
            keys[a as usize].digest == keys[b as usize].digest
        })
    })
}

/// Sorts pairs whose first halves are spread evenly over `u64` (digest prefixes,
/// hashes): one pass deals them into buckets by their top bits, then each bucket is
/// sorted on its own. As fast as one big sort, and a background thread can pause
/// between buckets instead of holding the processor for the whole of it.
fn sort_uniform(mut pairs: Vec<(u64, u32)>, pacer: &mut Pacer) -> Vec<(u64, u32)> {
    const BITS: u32 = 10;
    if pairs.len() < 1 << 14 {
        pairs.sort_unstable();
        return pairs;
    }
    let bucket = |pair: &(u64, u32)| (pair.0 >> (64 - BITS)) as usize;
    let mut starts = vec![0usize; (1 << BITS) + 1];
    for pair in &pairs {
        starts[bucket(pair) + 1] += 1;
    }
    for b in 1..starts.len() {
        starts[b] += starts[b - 1];
    }
    let mut next = starts.clone();
    let mut sorted = vec![(0, 0); pairs.len()];
    for pair in &pairs {
        pacer.step();
        let at = &mut next[bucket(pair)];
        sorted[*at] = *pair;
        *at += 1;
    }
    for window in starts.windows(2) {
        sorted[window[0]..window[1]].sort_unstable();
        pacer.pause();
    }
    sorted
}

/// Whether any two members of `run` (usually one or two long) are `equal`.
fn any_pair(run: &[(u64, u32)], equal: impl Fn(u32, u32) -> bool) -> bool {
    run.iter()
        .enumerate()
        .any(|(i, a)| run[i + 1..].iter().any(|b| equal(a.1, b.1)))
}

fn has_duplicate_ids(keys: &[ApiKey]) -> bool {
    let state = std::hash::RandomState::new();
    let mut pacer = Pacer::new();
    let mut ids = Vec::with_capacity(keys.len());
    for (key, i) in keys.iter().zip(0u32..) {
        pacer.step();
        ids.push((state.hash_one(&*key.id), i));
    }
    let ids = sort_uniform(ids, &mut pacer);
    // Equal hashes are almost always equal ids; compare the strings to be sure.
    ids.chunk_by(|a, b| a.0 == b.0)
        .any(|run| any_pair(run, |a, b| keys[a as usize].id == keys[b as usize].id))
}

fn validate_id(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::invalid(None, "`id` must not be empty"));
    }
    if id.len() > 256 {
        return Err(Error::invalid(None, "`id` is longer than 256 bytes"));
    }
    if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(
            Some(&id.escape_debug().to_string()),
            "`id` must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("len", &self.len())
            .field("ids", &DebugIds(self))
            .finish()
    }
}

struct DebugIds<'a>(&'a KeySet);

impl fmt::Debug for DebugIds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 16;
        let mut list = f.debug_list();
        list.entries(self.0.iter().take(SHOWN).map(ApiKey::id));
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
        // Over 16K keys the checks sort bucket by bucket: a clash between the first
        // and the last key must still be found, and named as one by one would.
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
    fn sort_uniform_sorts_like_sort_unstable() {
        // Spread like digests, with some equal values and some in one bucket.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut pairs: Vec<(u64, u32)> = (0..50_000u32)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (if i % 1000 == 0 { 42 } else { x }, i)
            })
            .collect();
        pairs.push((u64::MAX, 7));
        pairs.push((0, 9));
        let mut expected = pairs.clone();
        expected.sort_unstable();
        assert_eq!(sort_uniform(pairs, &mut Pacer::new()), expected);
    }

    #[test]
    fn any_pair_looks_past_neighbours() {
        // Three with one hash, the first and last equal: not adjacent after sorting.
        let run = [(7, 0), (7, 1), (7, 2)];
        assert!(any_pair(&run, |a, b| (a, b) == (0, 2)));
        assert!(!any_pair(&run, |_, _| false));
        assert!(!any_pair(&run[..1], |_, _| true));
    }

    #[test]
    fn clones_are_independent() {
        let mut a = KeySet::from_keys([ApiKey::new("a", "k1")]).unwrap();
        let b = a.clone();
        a.insert(ApiKey::new("b", "k2")).unwrap();
        assert_eq!((a.len(), b.len()), (2, 1));
    }

    #[test]
    fn debug_lists_ids_not_secrets() {
        let set = KeySet::from_keys([ApiKey::new("visible-id", "hidden-secret")]).unwrap();
        let dbg = format!("{set:?}");
        assert!(dbg.contains("visible-id"));
        assert!(!dbg.contains("hidden-secret"));
    }
}
