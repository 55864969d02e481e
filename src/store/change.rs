//! Changes to one source's keys, and how they are checked against the store before
//! anything is swapped in: the diff of a published set, and the plan of an edit.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use crate::{
    ApiKey, Error, KeySet,
    key::Meta,
    key::digest::{DigestMap, DigestSet, KeyDigest},
    limit::state::{Limiter, now_ns},
    store::entry::{KeyEntry, SharedMeta},
    store::report::Diff,
    store::snapshot::{Edit, Snapshot},
};

/// One change to a source's keys, applied with [`KeyUpdater::apply`](crate::KeyUpdater::apply).
///
/// # Example
///
/// ```
/// use tower_api_key::{ApiKey, ChannelSource, KeyChange, KeySet, KeyStore};
///
/// let store = KeyStore::new();
/// let (source, publisher) = ChannelSource::new(KeySet::from_keys([ApiKey::new("old", "k1")])?);
/// store.add_source(source)?;
/// let report = publisher.apply([
///     KeyChange::Upsert(ApiKey::new("new", "k2")),
///     KeyChange::remove("old"),
/// ])?;
/// assert_eq!((report.added(), report.removed()), (vec!["new"], vec!["old"]));
/// # Ok::<(), tower_api_key::Error>(())
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum KeyChange {
    /// Adds the key, or replaces the source's key with the same id (its usage counts
    /// carry over).
    Upsert(ApiKey),
    /// Removes the source's key with this id; nothing if no key has it. Refused
    /// ([`Error::Conflict`](crate::Error::Conflict)) if another source's key has it,
    /// unless this source has a set waiting: then it is made to that set (see
    /// [`KeyUpdater::apply`](crate::KeyUpdater::apply)).
    Remove(Arc<str>),
}

impl KeyChange {
    /// A [`KeyChange::Remove`] of `id`.
    pub fn remove(id: impl Into<Arc<str>>) -> Self {
        Self::Remove(id.into())
    }

    pub(crate) fn id(&self) -> &str {
        match self {
            Self::Upsert(key) => &key.id,
            Self::Remove(id) => id,
        }
    }
}

/// Keys alike (metadata, window, flag) and the one copy they share.
type MetaMap<'a> =
    HashMap<(Option<&'a Meta>, u64, u64, bool), Arc<SharedMeta>, foldhash::fast::RandomState>;

/// The source a plan is for: its index and name, and the names of every source of
/// the store (to name the other side of a conflict).
pub(crate) struct Source<'a> {
    pub(crate) index: u16,
    /// The store's id.
    pub(crate) store: u64,
    pub(crate) name: &'a Arc<str>,
    pub(crate) names: &'a [Arc<str>],
    /// How many keys the source has in `old`.
    pub(crate) count: usize,
    /// Whether its keys' limits are the fleet's (leased shares).
    pub(crate) fleet: bool,
}

/// What an update asks for.
#[derive(Clone, Copy)]
pub(crate) enum Update<'a> {
    /// The source's complete new set: what it lacks is removed.
    Set(&'a KeySet),
    /// Changes by id; keys not named stay as they are.
    Changes(&'a [KeyChange]),
}

/// Checks `update` against `old` and works out the edit and its report, or the first
/// reason to refuse it. Nothing is changed.
///
/// `expiring_before` is the instant (Unix ms) up to which a key's expiry is reported
/// as coming soon; `now` is the instant the update is made.
pub(crate) fn plan(
    old: &Snapshot,
    source: &Source<'_>,
    update: Update<'_>,
    (now, expiring_before): (u64, u64),
) -> Result<(Edit, Diff), Error> {
    let mut edit = Edit::default();
    let mut diff = Diff::default();
    // Keys alike (metadata, window, flag) share one copy of what they have in common.
    let mut metas: MetaMap<'_> = MetaMap::default();
    let mut named: HashSet<&str> = HashSet::new();
    let mut own = 0usize;
    let (keys, removals): (Vec<&ApiKey>, Vec<&str>) = match update {
        Update::Set(set) => (set.iter().collect(), Vec::new()),
        Update::Changes(changes) => {
            let mut keys = Vec::new();
            let mut removals = Vec::new();
            for change in changes {
                if !named.insert(change.id()) {
                    return Err(Error::DuplicateId {
                        id: change.id().to_owned(),
                    });
                }
                match change {
                    KeyChange::Upsert(key) => {
                        key.validate()?;
                        keys.push(key);
                    }
                    KeyChange::Remove(id) => removals.push(&**id),
                }
            }
            (keys, removals)
        }
    };
    // Keys that stay or come.
    let empty = old.len() == 0;
    for &key in &keys {
        // Most keys of a large set are unchanged: found by digest in one lookup, and
        // by id only when the digest is new. (A first load has nothing to look up.)
        let existing = match (!empty).then(|| old.entry(&key.digest)).flatten() {
            Some((entry, _)) if *entry.id == *key.id => Some((key.digest, entry)),
            _ if empty => None,
            _ => old
                .digest_of(&key.id)
                .and_then(|d| Some((d, old.entry(&d)?.0))),
        };
        if let Some((_, entry)) = existing
            && entry.source() != source.index
        {
            return Err(conflict(&key.id, &entry.id, entry.source(), source));
        }
        if existing.is_some() {
            own += 1;
        }
        if key.valid_until != u64::MAX
            && !key.disabled
            && key.valid_until > now
            && key.valid_until <= expiring_before
        {
            diff.expiring.push(key.id.clone());
        }
        let replaced = match existing {
            Some((digest, entry)) if digest == key.digest && entry.shared.describes(key) => {
                diff.kept.push(key.id.clone());
                continue;
            }
            Some((digest, _)) => {
                diff.changed.push(key.id.clone());
                edit.remove.push((digest, key.id.clone()));
                Some(digest)
            }
            None => {
                diff.added.push(key.id.clone());
                None
            }
        };
        let shared = metas
            .entry((
                key.meta.as_deref(),
                key.valid_from,
                key.valid_until,
                key.disabled,
            ))
            .or_insert_with(|| {
                // Share the copy of a key already loaded with the same metadata.
                let fresh = SharedMeta::of(key, source.name, source.index, source.store);
                existing
                    .map(|(_, e)| &e.shared)
                    .filter(|m| ***m == fresh)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(fresh))
            })
            .clone();
        // A key that keeps its id and its limits keeps their state; a key whose
        // limits change carries what each unchanged one counted (see
        // `Limiter::carried`); a new key starts afresh.
        let limiter = key
            .meta
            .as_deref()
            .filter(|m| !m.limits.is_empty())
            .map(|m| match existing.and_then(|(_, e)| e.limiter.as_ref()) {
                Some(old) if old.limits == m.limits => old.clone(),
                Some(old) => Arc::new(Limiter::carried(old, &m.limits, now_ns(), source.fleet)),
                None => Arc::new(Limiter::new(&m.limits, source.fleet)),
            });
        let entry = Arc::new(KeyEntry {
            id: key.id.clone(),
            shared,
            limiter,
        });
        edit.insert.push((key.digest, entry, replaced));
    }
    // Keys that go.
    let gone = |id: &str, digest: KeyDigest, diff: &mut Diff, edit: &mut Edit| {
        diff.removed.push(id.into());
        edit.remove.push((digest, id.into()));
    };
    for id in removals {
        let Some(digest) = old.digest_of(id) else {
            continue;
        };
        if let Some((entry, _)) = old.entry(&digest) {
            if entry.source() != source.index {
                return Err(conflict(id, &entry.id, entry.source(), source));
            }
            gone(&entry.id, digest, &mut diff, &mut edit);
        }
    }
    if let Update::Set(set) = update
        && own < source.count
    {
        for (digest, entry, _) in old.iter() {
            if entry.source() == source.index && set.get(&entry.id).is_none() {
                gone(&entry.id, digest, &mut diff, &mut edit);
            }
        }
    }
    diff.removed.sort();
    // A `KeySet` never holds one key under two ids: only changes by id need that
    // checked among themselves.
    let unique = matches!(update, Update::Set(_));
    check_digests(old, source, &edit, unique)?;
    Ok((edit, diff))
}

/// Refuses an edit that would put one digest under two ids: twice among the keys that
/// come (unless they are `unique` already), or once more beside a key that stays.
fn check_digests(
    old: &Snapshot,
    source: &Source<'_>,
    edit: &Edit,
    unique: bool,
) -> Result<(), Error> {
    let leaving: DigestSet = edit.remove.iter().map(|(d, _)| *d).collect();
    let mut coming: DigestMap<&str> = DigestMap::default();
    if !unique {
        coming.reserve(edit.insert.len());
    }
    for (digest, entry, _) in &edit.insert {
        if !unique && let Some(first) = coming.insert(*digest, &entry.id) {
            return Err(Error::DuplicateKey {
                first: first.to_owned(),
                second: entry.id.to_string(),
            });
        }
        if leaving.contains(digest) {
            continue;
        }
        if let Some((other, _)) = old.entry(digest) {
            if other.source() == source.index {
                return Err(Error::DuplicateKey {
                    first: other.id.to_string(),
                    second: entry.id.to_string(),
                });
            }
            return Err(conflict(&entry.id, &other.id, other.source(), source));
        }
    }
    Ok(())
}

fn conflict(id: &str, other_id: &str, other: u16, source: &Source<'_>) -> Error {
    Error::Conflict {
        id: id.to_owned(),
        other_id: other_id.to_owned(),
        other_source: source
            .names
            .get(usize::from(other))
            .map(|s| s.to_string())
            .unwrap_or_default(),
    }
}
