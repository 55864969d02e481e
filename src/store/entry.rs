//! A loaded key: what the store holds for each key it serves.

use std::sync::Arc;

use crate::{ApiKey, key::Meta, limit::state::Limiter};

/// What the keys of one source with the same metadata, validity window and
/// `disabled` flag share: one copy for all of them (a million keys usually have a
/// handful of distinct values), which keeps each entry small.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SharedMeta {
    /// The source's name, and its index in the store.
    pub(crate) source: Arc<str>,
    pub(crate) index: u16,
    /// The store's id (unique in the process), so a layer can tell its own keys.
    pub(crate) store: u64,
    pub(crate) meta: Meta,
    /// Validity window in Unix milliseconds: `[valid_from, valid_until)`.
    pub(crate) valid_from: u64,
    pub(crate) valid_until: u64,
    pub(crate) disabled: bool,
}

impl SharedMeta {
    /// What `key`, from source `index` named `source` of store `store`, shares with
    /// keys like it.
    pub(crate) fn of(key: &ApiKey, source: &Arc<str>, index: u16, store: u64) -> Self {
        Self {
            source: source.clone(),
            index,
            store,
            meta: key.meta.as_deref().cloned().unwrap_or_default(),
            valid_from: key.valid_from,
            valid_until: key.valid_until,
            disabled: key.disabled,
        }
    }

    /// Whether `key` has this metadata, window and flag.
    pub(crate) fn describes(&self, key: &ApiKey) -> bool {
        let meta = key.meta.as_deref();
        self.valid_from == key.valid_from
            && self.valid_until == key.valid_until
            && self.disabled == key.disabled
            && match meta {
                Some(meta) => *meta == self.meta,
                None => self.meta == Meta::default(),
            }
    }
}

/// A loaded key's identity and metadata: what a shard slot points at, and what a
/// detached [`KeyInfo`](crate::KeyInfo) shares. Immutable: a change to a key makes a
/// new entry. The digest, the flags and the usage counters a request needs sit in
/// the slot itself (see [`Shard`](crate::store::shard::Shard)), so a lookup never comes here.
#[derive(Debug)]
pub(crate) struct KeyEntry {
    /// Shared with the [`ApiKey`] it was built from and with the id index.
    pub(crate) id: Arc<str>,
    pub(crate) shared: Arc<SharedMeta>,
    /// The state of the key's limits, for a key that has any: carried to the next
    /// version while the key keeps its id and its limits.
    pub(crate) limiter: Option<Arc<Limiter>>,
}

impl KeyEntry {
    /// The index of the source the key came from.
    pub(crate) fn source(&self) -> u16 {
        self.shared.index
    }

    pub(crate) fn disabled(&self) -> bool {
        self.shared.disabled
    }

    /// Whether the key grants `scope`.
    pub(crate) fn has_scope(&self, scope: &str) -> bool {
        self.shared.meta.scopes.iter().any(|s| &**s == scope)
    }

    /// Whether the key has a validity window.
    pub(crate) fn windowed(&self) -> bool {
        self.shared.valid_from != 0 || self.shared.valid_until != u64::MAX
    }

    /// Whether a request must read the entry: a validity window or limits.
    pub(crate) fn examined(&self) -> bool {
        self.windowed() || self.limiter.is_some()
    }

    pub(crate) fn valid_from(&self) -> u64 {
        self.shared.valid_from
    }

    pub(crate) fn valid_until(&self) -> u64 {
        self.shared.valid_until
    }

    /// An entry for `key` from a source "test".
    #[cfg(test)]
    pub(crate) fn for_tests(key: &ApiKey) -> Arc<Self> {
        Arc::new(Self {
            id: key.id.clone(),
            shared: Arc::new(SharedMeta::of(key, &Arc::from("test"), 0, 0)),
            limiter: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_two_pointers() {
        // A million keys' memory depends on it: 16 bytes of counts plus the entry
        // (id, metadata, limiter) stay in the allocator's 48-byte class.
        assert!(16 + std::mem::size_of::<KeyEntry>() <= 48);
        // And the limiter's pointer, on a key without limits, costs nothing more.
        assert_eq!(std::mem::size_of::<Option<Arc<Limiter>>>(), 8);
    }

    #[test]
    fn describes_compares_every_field() {
        let key = ApiKey::new("a", "s").with_scopes(["read"]);
        let shared = SharedMeta::of(&key, &Arc::from("src"), 1, 0);
        assert!(shared.describes(&key));
        assert!(!shared.describes(&key.clone().with_disabled(true)));
        assert!(!shared.describes(&key.clone().with_scopes(["write"])));
        assert!(!shared.describes(&ApiKey::new("a", "s")));
        let bare = SharedMeta::of(&ApiKey::new("b", "s"), &Arc::from("src"), 1, 0);
        assert!(bare.describes(&ApiKey::new("b", "t")));
    }
}
