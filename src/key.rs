use std::{
    fmt,
    hash::{BuildHasher, Hash, Hasher},
    sync::Arc,
    time::SystemTime,
};

use sha2::{Digest as _, Sha256};

use crate::{Error, clock, table::TableHandle};

/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const SHA256_INIT: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// SHA-256 of a presented or configured key. Only digests are kept in memory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyDigest(pub(crate) [u8; 32]);

impl KeyDigest {
    #[inline]
    pub(crate) fn of(secret: &[u8]) -> Self {
        // Keys up to 55 bytes fit one padded SHA-256 block: compress it directly,
        // skipping the streaming machinery (buffering, length tracking) that
        // `Digest` needs for messages of any length. Same result, fewer steps.
        if secret.len() <= 55 {
            let mut block = [0u8; 64];
            block[..secret.len()].copy_from_slice(secret);
            block[secret.len()] = 0x80;
            let bits = (secret.len() as u64) * 8;
            block[56..].copy_from_slice(&bits.to_be_bytes());
            let mut state = SHA256_INIT;
            sha2::block_api::compress256(&mut state, &[block]);
            let mut out = [0u8; 32];
            for (chunk, word) in out.chunks_exact_mut(4).zip(state) {
                chunk.copy_from_slice(&word.to_be_bytes());
            }
            return Self(out);
        }
        Self(Sha256::digest(secret).into())
    }

    pub(crate) fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Self(out))
    }

    /// A short, non-reversible name for the key: the first 12 hex digits of its digest.
    pub(crate) fn fingerprint(&self) -> String {
        self.0[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Hex digit values, `0xff` for bytes that are not hex digits: one load per digit
/// when a million digests are read from a key file.
const HEX: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

fn nibble(c: u8) -> Option<u8> {
    match HEX[usize::from(c)] {
        0xff => None,
        n => Some(n),
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // A SHA-256 digest is already uniformly distributed, and an attacker cannot pick
        // the digest of what they present: its first eight bytes are a fine hash.
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_ne_bytes(head));
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({}…)", self.fingerprint())
    }
}

/// Hasher for maps keyed by [`KeyDigest`]: passes the digest's own bits through.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than `KeyDigest` is hashed; fold it in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl BuildHasher for DigestHasher {
    type Hasher = Self;

    fn build_hasher(&self) -> Self {
        Self(0)
    }
}

/// The free-form metadata of a key. Many keys often share the same metadata, so the
/// store keeps one copy of each distinct value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Meta {
    pub(crate) scopes: Box<[Box<str>]>,
    pub(crate) tenant: Option<Box<str>>,
    pub(crate) owner: Option<Box<str>>,
    pub(crate) description: Option<Box<str>>,
}

/// One API key to put in a [`KeySet`](crate::KeySet): its id, its digest and its
/// metadata.
///
/// The secret is hashed with SHA-256 as soon as the key is built and never kept.
/// `Debug` prints the id and metadata, never key material.
///
/// # Example
///
/// ```
/// use tower_api_key::ApiKey;
///
/// let key = ApiKey::new("billing-2026-11", "s3cr3t-value")
///     .with_scopes(["read", "write"])
///     .with_tenant("team-a")
///     .with_owner("billing@example.com");
/// assert_eq!(key.id(), "billing-2026-11");
/// assert!(!format!("{key:?}").contains("s3cr3t"));
/// ```
#[derive(Clone)]
pub struct ApiKey {
    pub(crate) digest: KeyDigest,
    pub(crate) id: Arc<str>,
    /// `None` for the common key with no metadata: eight bytes instead of sixty-four
    /// when a million keys are loaded.
    pub(crate) meta: Option<Box<Meta>>,
    /// Validity window in Unix milliseconds: `[valid_from, valid_until)`.
    pub(crate) valid_from: u64,
    pub(crate) valid_until: u64,
    pub(crate) disabled: bool,
}

impl ApiKey {
    /// A key with this id whose secret is `secret`. Only its SHA-256 digest is kept.
    #[must_use]
    pub fn new(id: impl Into<Arc<str>>, secret: impl AsRef<[u8]>) -> Self {
        Self::from_digest(id.into(), KeyDigest::of(secret.as_ref()))
    }

    /// A key given by the SHA-256 of its secret, as 64 hex digits: the configuration
    /// then holds no secret at all.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] if `sha256_hex` is not 64 hex digits.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_api_key::ApiKey;
    ///
    /// // echo -n "s3cr3t" | sha256sum
    /// let key = ApiKey::from_sha256(
    ///     "ci-runner",
    ///     "4e738ca5563c06cfd0018299933d58db1dd8bf97f6973dc99bf6cdc64b5550bd",
    /// )?;
    /// assert_eq!(key.id(), "ci-runner");
    /// assert!(ApiKey::from_sha256("ci-runner", "not-hex").is_err());
    /// # Ok::<(), tower_api_key::Error>(())
    /// ```
    pub fn from_sha256(id: impl Into<Arc<str>>, sha256_hex: &str) -> Result<Self, Error> {
        let id = id.into();
        let digest = KeyDigest::from_hex(sha256_hex.trim())
            .ok_or_else(|| Error::invalid(Some(&id), "`sha256` must be 64 hexadecimal digits"))?;
        Ok(Self::from_digest(id, digest))
    }

    pub(crate) fn from_digest(id: Arc<str>, digest: KeyDigest) -> Self {
        Self {
            digest,
            id,
            meta: None,
            valid_from: 0,
            valid_until: u64::MAX,
            disabled: false,
        }
    }

    /// The key's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The scopes the key grants.
    pub fn scopes(&self) -> impl ExactSizeIterator<Item = &str> {
        let scopes: &[Box<str>] = self.meta.as_ref().map_or(&[], |m| &m.scopes);
        scopes.iter().map(|s| &**s)
    }

    /// The key's tenant, if set.
    pub fn tenant(&self) -> Option<&str> {
        self.meta.as_ref()?.tenant.as_deref()
    }

    /// The key's owner, if set.
    pub fn owner(&self) -> Option<&str> {
        self.meta.as_ref()?.owner.as_deref()
    }

    /// The key's description, if set.
    pub fn description(&self) -> Option<&str> {
        self.meta.as_ref()?.description.as_deref()
    }

    /// The instant before which the key is refused, if set (to the millisecond).
    pub fn not_before(&self) -> Option<SystemTime> {
        (self.valid_from != 0).then(|| clock::from_unix_ms(self.valid_from))
    }

    /// The instant from which the key is refused, if set (to the millisecond).
    pub fn expires_at(&self) -> Option<SystemTime> {
        (self.valid_until != u64::MAX).then(|| clock::from_unix_ms(self.valid_until))
    }

    /// Whether the key is disabled.
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// Sets the scopes this key grants (see [`ApiKeyLayer::require_scope`](crate::ApiKeyLayer::require_scope)).
    #[must_use]
    pub fn with_scopes<I, T>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<Box<str>>,
    {
        self.meta_mut().scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the tenant this key belongs to.
    #[must_use]
    pub fn with_tenant(mut self, tenant: impl Into<Box<str>>) -> Self {
        self.meta_mut().tenant = Some(tenant.into());
        self
    }

    /// Sets the key's owner (free text: a team, a person, a service).
    #[must_use]
    pub fn with_owner(mut self, owner: impl Into<Box<str>>) -> Self {
        self.meta_mut().owner = Some(owner.into());
        self
    }

    /// Sets a free-text description.
    #[must_use]
    pub fn with_description(mut self, description: impl Into<Box<str>>) -> Self {
        self.meta_mut().description = Some(description.into());
        self
    }

    /// The key is refused before this instant (kept to the millisecond).
    #[must_use]
    pub fn with_not_before(mut self, at: SystemTime) -> Self {
        self.valid_from = clock::to_unix_ms(at);
        self
    }

    /// The key is refused from this instant on (kept to the millisecond).
    #[must_use]
    pub fn with_expires_at(mut self, at: SystemTime) -> Self {
        self.valid_until = clock::to_unix_ms(at);
        self
    }

    /// A disabled key is refused like a revoked one, but stays listed for the record.
    #[must_use]
    pub fn with_disabled(mut self, disabled: bool) -> Self {
        self.disabled = disabled;
        self
    }

    fn meta_mut(&mut self) -> &mut Meta {
        self.meta.get_or_insert_with(Box::default)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("secret", &format_args!("<redacted>"))
            .field("meta", &self.meta)
            .field("not_before", &self.not_before())
            .field("expires_at", &self.expires_at())
            .field("disabled", &self.disabled)
            .finish()
    }
}

/// What the keys of one source with the same metadata, validity window and
/// `disabled` flag share: one copy for all of them (a million keys usually have a
/// handful of distinct values), which keeps each entry small.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SharedMeta {
    /// The source's name, and its index in the store.
    pub(crate) source: Arc<str>,
    pub(crate) index: u16,
    pub(crate) meta: Meta,
    /// Validity window in Unix milliseconds: `[valid_from, valid_until)`.
    pub(crate) valid_from: u64,
    pub(crate) valid_until: u64,
    pub(crate) disabled: bool,
}

/// A loaded key's identity and metadata: what a table slot points at, and what a
/// detached [`KeyInfo`] shares. Immutable, so a reload that leaves a key unchanged
/// keeps its entry. The digest, the flags and the usage counters a request needs sit
/// in the table slot itself (see [`Table`](crate::table::Table)), so a lookup never
/// has to come here; and an entry is two pointers, which a million keys feel.
pub(crate) struct KeyEntry {
    /// Shared with the [`ApiKey`] it was built from: no second copy per key.
    pub(crate) id: Arc<str>,
    /// Everything else; `key`'s own fields must match it.
    pub(crate) shared: Arc<SharedMeta>,
}

impl KeyEntry {
    /// The entry for `key`, whose metadata, window and flag `shared` holds.
    pub(crate) fn new(key: &ApiKey, shared: Arc<SharedMeta>) -> Self {
        debug_assert!(
            shared.disabled == key.disabled
                && (shared.valid_from, shared.valid_until) == (key.valid_from, key.valid_until)
        );
        Self {
            id: key.id.clone(),
            shared,
        }
    }

    /// Whether `key`, with `shared` as its metadata, describes exactly this entry,
    /// which is already known to have `key`'s digest.
    pub(crate) fn same_as(&self, key: &ApiKey, shared: &Arc<SharedMeta>) -> bool {
        (Arc::ptr_eq(&self.shared, shared) || self.shared == *shared) && *self.id == *key.id
    }

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

    pub(crate) fn valid_from(&self) -> u64 {
        self.shared.valid_from
    }

    /// An entry for `key` (no metadata, no window, enabled) from a source "test".
    #[cfg(test)]
    pub(crate) fn for_tests(key: &ApiKey) -> Arc<Self> {
        let shared = Arc::new(SharedMeta {
            source: Arc::from("test"),
            index: 0,
            meta: Meta::default(),
            valid_from: 0,
            valid_until: u64::MAX,
            disabled: false,
        });
        Arc::new(Self::new(key, shared))
    }

    pub(crate) fn valid_until(&self) -> u64 {
        self.shared.valid_until
    }
}

/// The non-secret identity of the key a request was let in with.
///
/// [`ApiKeyService`](crate::ApiKeyService) inserts it into the request extensions, so
/// handlers know which key (and so which client, tenant and scopes) they serve. It
/// holds no key material.
///
/// The one in the request is a handle on the key set the request was checked
/// against, which is what lets a lookup touch a single cache line; a clone is
/// independent of that key set, so keeping one (for a long-lived stream, say) never
/// keeps a replaced key set in memory.
///
/// - axum: take it as an extractor (`axum` feature) or with `Extension<KeyInfo>`.
/// - tonic: `request.extensions().get::<KeyInfo>()`.
pub struct KeyInfo(Repr);

enum Repr {
    /// Slot `.1` of the table behind the handle: made by a lookup.
    InTable(Arc<TableHandle>, usize),
    /// The entry itself: a clone, or a key listed by the store.
    Entry(Arc<KeyEntry>),
}

impl Clone for KeyInfo {
    fn clone(&self) -> Self {
        Self::detached(self.entry_arc().clone())
    }
}

impl KeyInfo {
    pub(crate) fn in_table(handle: Arc<TableHandle>, slot: usize) -> Self {
        Self(Repr::InTable(handle, slot))
    }

    pub(crate) fn detached(entry: Arc<KeyEntry>) -> Self {
        Self(Repr::Entry(entry))
    }

    fn entry_arc(&self) -> &Arc<KeyEntry> {
        match &self.0 {
            Repr::InTable(handle, slot) => handle.table().entry_at(*slot),
            Repr::Entry(entry) => entry,
        }
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

    pub(crate) fn entry(&self) -> &KeyEntry {
        self.entry_arc()
    }

    /// Whether both are the same loaded entry (not merely equal).
    #[cfg(test)]
    pub(crate) fn same_entry(&self, other: &Self) -> bool {
        Arc::ptr_eq(self.entry_arc(), other.entry_arc())
    }

    #[cfg(test)]
    pub(crate) fn for_tests(id: &str) -> Self {
        Self::detached(KeyEntry::for_tests(&ApiKey::new(id, id)))
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

    #[test]
    fn an_entry_fits_a_48_byte_allocation() {
        // 16 bytes of reference counts + the entry + the allocator's 8-byte header:
        // a million keys' memory depends on staying in this size class.
        assert!(
            std::mem::size_of::<KeyEntry>() <= 24,
            "{}",
            std::mem::size_of::<KeyEntry>()
        );
    }

    #[test]
    fn single_block_digest_matches_sha2_at_every_length() {
        let data: Vec<u8> = (0..200u8)
            .map(|i| i.wrapping_mul(31).wrapping_add(7))
            .collect();
        for len in 0..data.len() {
            let expected: [u8; 32] = Sha256::digest(&data[..len]).into();
            assert_eq!(KeyDigest::of(&data[..len]).0, expected, "length {len}");
        }
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let d = KeyDigest::of(b"s3cr3t");
        let hex: String = d.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(KeyDigest::from_hex(&hex), Some(d));
        assert_eq!(KeyDigest::from_hex(&hex.to_uppercase()), Some(d));
        assert_eq!(KeyDigest::from_hex(&hex[..63]), None);
        assert_eq!(KeyDigest::from_hex(&format!("{}g", &hex[..63])), None);
        assert_eq!(KeyDigest::from_hex("é"), None);
    }

    #[test]
    fn debug_never_shows_the_secret_or_full_digest() {
        let key = ApiKey::new("id-1", "super-secret-value");
        let hex: String = key.digest.0.iter().map(|b| format!("{b:02x}")).collect();
        let dbg = format!("{key:?} {:?}", key.digest);
        assert!(dbg.contains("id-1"));
        assert!(!dbg.contains("super-secret-value"));
        assert!(!dbg.contains(&hex));
        let info = KeyInfo::detached(KeyEntry::for_tests(&key));
        assert!(format!("{info:?}").contains("id-1"));
        assert!(!format!("{info:?}").contains(&hex));
    }
}
