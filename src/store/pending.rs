//! Sets that wait: a complete set a source published that was refused because another
//! source held one of its ids or secrets, applied once that source lets go.
//!
//! A waiting set follows its source: a change by id applied to the source's live keys
//! is applied to the waiting set too, so that the set applied later is the source's
//! newest state, not the one it had when it was refused; a change the live keys
//! refuse for another source's key is made to the waiting set alone. It is planned
//! again only when an id it waits for is let go (removed, or changed by its source),
//! when its own source changes one of the ids that clash, or when its own source's
//! change is refused for a conflict (the set is then tried whole): never on another
//! source's update that lets go of nothing it waits for.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use crate::{ApiKey, Error, KeyChange, KeySet, store::snapshot::Snapshot};

/// Ids, hashed with foldhash.
type Ids = HashSet<Arc<str>, foldhash::fast::RandomState>;

/// A set refused for another source's ids or secrets, and what it waits for.
pub(crate) struct Pending {
    pub(crate) set: KeySet,
    /// Other sources' ids that hold one of its ids or secrets.
    waits_for: Ids,
    /// Its own ids whose key clashes: a change by id to one of them may end the wait.
    clashing: Ids,
}

impl Pending {
    /// `set` of source `source`, refused against `live`: what it waits for.
    pub(crate) fn new(set: KeySet, live: &Snapshot, source: u16) -> Self {
        let mut waits_for = Ids::default();
        let mut clashing = Ids::default();
        for key in set.iter() {
            // Its id held by another source, or its secret under another source's id.
            let held = [
                live.entry(&key.digest).map(|(e, _)| e),
                live.digest_of(&key.id)
                    .and_then(|d| Some(live.entry(&d)?.0)),
            ];
            for entry in held.into_iter().flatten() {
                if entry.source() != source {
                    waits_for.insert(entry.id.clone());
                    clashing.insert(key.id.clone());
                }
            }
        }
        Self {
            set,
            waits_for,
            clashing,
        }
    }

    /// Whether letting go of `ids` may let this set in.
    pub(crate) fn waits_for_any<'a>(&self, mut ids: impl Iterator<Item = &'a Arc<str>>) -> bool {
        ids.any(|id| self.waits_for.contains(id))
    }

    /// Whether `changes`, made by its own source, touch a key that clashes.
    pub(crate) fn clashes_with(&self, changes: &[KeyChange]) -> bool {
        changes.iter().any(|c| self.clashing.contains(c.id()))
    }

    /// This set with `changes` made on top (see [`with_changes`]), still waiting for
    /// the same ids.
    ///
    /// # Errors
    ///
    /// The changes would put one secret under two ids of the set.
    pub(crate) fn with_changes(&self, changes: &[KeyChange]) -> Result<Self, Error> {
        Ok(Self {
            set: with_changes(&self.set, changes)?,
            waits_for: self.waits_for.clone(),
            clashing: self.clashing.clone(),
        })
    }
}

/// `set` with `changes` made: an upsert replaces the key with its id in place or comes
/// last, a removal drops it. One pass over the set, whatever the number of changes.
///
/// # Errors
///
/// [`Error::DuplicateKey`] if an upsert gives a secret that a key it does not replace
/// already has.
pub(crate) fn with_changes(set: &KeySet, changes: &[KeyChange]) -> Result<KeySet, Error> {
    // Each id the changes name, and the key it gets (none for a removal).
    let mut named: HashMap<&str, Option<&ApiKey>, foldhash::fast::RandomState> = HashMap::default();
    for change in changes {
        let key = match change {
            KeyChange::Upsert(key) => Some(key),
            KeyChange::Remove(_) => None,
        };
        named.insert(change.id(), key);
    }
    let mut keys: Vec<ApiKey> = Vec::with_capacity(set.len() + changes.len());
    for key in set.iter() {
        match named.get_mut(&*key.id) {
            None => keys.push(key.clone()),
            // Replaced in place (taken, so that it is not appended below) or removed.
            Some(change) => keys.extend(change.take().cloned()),
        }
    }
    keys.extend(changes.iter().filter_map(|c| match c {
        KeyChange::Upsert(key) if named.get(&*key.id).is_some_and(Option::is_some) => {
            Some(key.clone())
        }
        _ => None,
    }));
    KeySet::from_keys(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    fn ids(set: &KeySet) -> Vec<&str> {
        set.iter().map(|k| &*k.id).collect()
    }

    #[test]
    fn changes_replace_in_place_remove_and_append() {
        let set = KeySet::from_keys([
            ApiKey::new("a", "ka"),
            ApiKey::new("b", "kb"),
            ApiKey::new("c", "kc"),
        ])
        .unwrap();
        let changed = with_changes(
            &set,
            &[
                KeyChange::Upsert(ApiKey::new("new", "kn")),
                KeyChange::remove("a"),
                KeyChange::Upsert(ApiKey::new("b", "kb2")),
                KeyChange::remove("absent"),
            ],
        )
        .unwrap();
        assert_eq!(ids(&changed), ["b", "c", "new"]);
        assert_eq!(
            changed.get("b").unwrap().digest,
            ApiKey::new("b", "kb2").digest
        );
        // A secret already in the set under an id the changes leave alone.
        let err = with_changes(&set, &[KeyChange::Upsert(ApiKey::new("d", "kc"))]).unwrap_err();
        assert!(matches!(err, Error::DuplicateKey { .. }), "{err}");
        // ...but moving it from one id to another is fine.
        let moved = with_changes(
            &set,
            &[
                KeyChange::remove("c"),
                KeyChange::Upsert(ApiKey::new("d", "kc")),
            ],
        )
        .unwrap();
        assert_eq!(ids(&moved), ["a", "b", "d"]);
    }
}
