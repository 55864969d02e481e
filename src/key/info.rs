//! The identity of the key a request was let in with, handed to the handler.

use std::{fmt, sync::Arc, time::SystemTime};

use crate::{clock, limit::LimitStatus, store::entry::KeyEntry, store::shard::Handle};

/// The non-secret identity of the key a request was let in with.
///
/// [`ApiKeyService`](crate::ApiKeyService) inserts it into the request extensions, so
/// handlers know which key (and so which client, tenant and scopes) they serve. It
/// holds no key material.
///
/// The one in the request points into the part of the key set the request was
/// checked against, which is what lets a lookup touch a single cache line; a clone
/// holds only the key's own entry, so keeping one (for a long-lived stream, say)
/// never keeps a replaced part of the key set in memory.
///
/// - axum: take it as an extractor (`axum` feature) or with `Extension<KeyInfo>`.
/// - tonic: `request.extensions().get::<KeyInfo>()`.
pub struct KeyInfo(Repr);

enum Repr {
    /// Slot `.1` of the shard: made by a lookup.
    InShard(Arc<Handle>, usize),
    /// The entry itself: a clone, or a key listed by the store.
    Entry(Arc<KeyEntry>),
}

impl Clone for KeyInfo {
    fn clone(&self) -> Self {
        Self::detached(self.entry_arc().clone())
    }
}

impl KeyInfo {
    /// The key in slot `slot` of `shard`, which holds one.
    pub(crate) fn in_shard(shard: Arc<Handle>, slot: usize) -> Self {
        debug_assert!(shard.entry_at(slot).is_some());
        Self(Repr::InShard(shard, slot))
    }

    pub(crate) fn detached(entry: Arc<KeyEntry>) -> Self {
        Self(Repr::Entry(entry))
    }

    fn entry_arc(&self) -> &Arc<KeyEntry> {
        match &self.0 {
            Repr::InShard(handle, slot) => handle
                .entry_at(*slot)
                .expect("a KeyInfo is only made for a slot that holds a key"),
            Repr::Entry(entry) => entry,
        }
    }

    pub(crate) fn entry(&self) -> &KeyEntry {
        self.entry_arc()
    }

    /// The key's id, as configured.
    pub fn id(&self) -> &str {
        &self.entry().id
    }

    /// The name of the [`KeySource`](crate::KeySource) the key came from.
    pub fn source(&self) -> &str {
        &self.entry().shared.source
    }

    /// The scopes the key grants.
    pub fn scopes(&self) -> impl ExactSizeIterator<Item = &str> {
        self.entry().shared.meta.scopes.iter().map(|s| &**s)
    }

    /// Whether the key grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.entry().has_scope(scope)
    }

    /// The tenant the key belongs to, if any.
    pub fn tenant(&self) -> Option<&str> {
        self.entry().shared.meta.tenant.as_deref()
    }

    /// The key's owner, if set.
    pub fn owner(&self) -> Option<&str> {
        self.entry().shared.meta.owner.as_deref()
    }

    /// The key's description, if set.
    pub fn description(&self) -> Option<&str> {
        self.entry().shared.meta.description.as_deref()
    }

    /// When the key was created, if recorded.
    pub fn created_at(&self) -> Option<SystemTime> {
        self.entry().shared.meta.created_at.map(clock::from_unix_ms)
    }

    /// Who created the key, if recorded.
    pub fn created_by(&self) -> Option<&str> {
        self.entry().shared.meta.created_by.as_deref()
    }

    /// The id of the key this one replaced in a rotation, if any.
    pub fn rotated_from(&self) -> Option<&str> {
        self.entry().shared.meta.rotated_from.as_deref()
    }

    /// The instant before which the key is refused, if set (to the millisecond).
    pub fn not_before(&self) -> Option<SystemTime> {
        let at = self.entry().valid_from();
        (at != 0).then(|| clock::from_unix_ms(at))
    }

    /// The instant from which the key is refused, if set (to the millisecond).
    pub fn expires_at(&self) -> Option<SystemTime> {
        let at = self.entry().valid_until();
        (at != u64::MAX).then(|| clock::from_unix_ms(at))
    }

    /// Whether the key is disabled.
    pub fn is_disabled(&self) -> bool {
        self.entry().disabled()
    }

    /// Where each of the key's limits stands now (rate limits in order, then the
    /// quota): how many more requests each would let in and when it resets. Empty
    /// for a key without limits.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_api_key::{ApiKey, KeySet, KeyStore, limit::RateLimit};
    ///
    /// let store = KeyStore::new();
    /// store.add_source(KeySet::from_keys([ApiKey::new("ci", "s3cr3t")
    ///     .with_rate_limit(RateLimit::new("burst", 10, Duration::from_secs(1)))])?)?;
    /// let limits = store.get("ci").unwrap().limits();
    /// assert_eq!((limits[0].name(), limits[0].remaining()), ("burst", 10));
    /// # Ok::<(), tower_api_key::Error>(())
    /// ```
    pub fn limits(&self) -> Vec<LimitStatus> {
        match &self.entry().limiter {
            Some(limiter) => limiter.status(crate::limit::state::now_ns(), clock::exact_now_ms()),
            None => Vec::new(),
        }
    }

    /// How many requests the key's limits (rate limits, quota, address rules) have
    /// refused while they stayed as they are.
    pub fn refused(&self) -> u64 {
        self.entry().limiter.as_ref().map_or(0, |l| l.refused())
    }

    /// Whether both are the same loaded entry (not merely equal).
    #[cfg(test)]
    pub(crate) fn same_entry(&self, other: &Self) -> bool {
        Arc::ptr_eq(self.entry_arc(), other.entry_arc())
    }

    #[cfg(test)]
    pub(crate) fn for_tests(id: &str) -> Self {
        Self::detached(KeyEntry::for_tests(&crate::ApiKey::new(id, id)))
    }
}

/// As JSON: `id`, `source`, `scopes`, `tenant`, `owner`, `description`,
/// `not_before` and `expires_at` (RFC 3339, or null), `disabled`, `created_at`,
/// `created_by`, `rotated_from`. Never key material.
///
/// ```
/// use tower_api_key::{ApiKey, KeySet, KeyStore};
///
/// let store = KeyStore::new();
/// store.add_source(KeySet::from_keys([ApiKey::new("ci", "s3cr3t").with_scopes(["read"])])?)?;
/// let json = serde_json::to_value(store.get("ci").unwrap()).unwrap();
/// assert_eq!(json["id"], "ci");
/// assert_eq!(json["scopes"][0], "read");
/// assert!(json["expires_at"].is_null());
/// # Ok::<(), tower_api_key::Error>(())
/// ```
impl serde::Serialize for KeyInfo {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut s = serializer.serialize_struct("KeyInfo", 12)?;
        s.serialize_field("id", self.id())?;
        s.serialize_field("source", self.source())?;
        s.serialize_field("scopes", &self.entry().shared.meta.scopes)?;
        s.serialize_field("tenant", &self.tenant())?;
        s.serialize_field("owner", &self.owner())?;
        s.serialize_field("description", &self.description())?;
        s.serialize_field("not_before", &self.not_before().map(clock::rfc3339))?;
        s.serialize_field("expires_at", &self.expires_at().map(clock::rfc3339))?;
        s.serialize_field("disabled", &self.is_disabled())?;
        s.serialize_field("created_at", &self.created_at().map(clock::rfc3339))?;
        s.serialize_field("created_by", &self.created_by())?;
        s.serialize_field("rotated_from", &self.rotated_from())?;
        s.end()
    }
}

impl fmt::Debug for KeyInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyInfo")
            .field("id", &self.id())
            .field("source", &self.source())
            .field("meta", &self.entry().shared.meta)
            .field("not_before", &self.not_before())
            .field("expires_at", &self.expires_at())
            .field("disabled", &self.is_disabled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiKey;

    #[test]
    fn debug_shows_the_id_and_no_key_material() {
        let key = ApiKey::new("id-1", "super-secret-value");
        let info = KeyInfo::detached(KeyEntry::for_tests(&key));
        let dbg = format!("{info:?}");
        assert!(dbg.contains("id-1"));
        assert!(!dbg.contains("super-secret-value"));
        assert!(!dbg.contains(&key.digest.to_hex()));
    }
}
