//! A configured key: what a source hands the store.

pub(crate) mod digest;
mod generate;
mod info;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod record;
mod set;

pub(crate) use self::set::First;
pub use self::{
    generate::{GeneratedKey, generate, has_valid_checksum},
    info::KeyInfo,
    set::KeySet,
};

use std::{fmt, sync::Arc, time::SystemTime};

use crate::{
    Error, clock,
    key::digest::KeyDigest,
    limit::{IpNet, Limits, Quota, RateLimit},
};

/// The longest secret accepted: no request header carries more.
pub(crate) const MAX_SECRET_LEN: usize = 4096;

/// The longest id accepted, in bytes.
const MAX_ID_LEN: usize = 256;

/// The free-form metadata of a key. Many keys often share the same metadata, so the
/// store keeps one copy of each distinct value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Meta {
    pub(crate) scopes: Box<[Box<str>]>,
    pub(crate) tenant: Option<Box<str>>,
    pub(crate) owner: Option<Box<str>>,
    pub(crate) description: Option<Box<str>>,
    /// The audit record: when the key was made (Unix ms), by whom, replacing which.
    pub(crate) created_at: Option<u64>,
    pub(crate) created_by: Option<Box<str>>,
    pub(crate) rotated_from: Option<Box<str>>,
    /// Rate limits, quota and address rules: none by default.
    pub(crate) limits: Limits,
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
    /// What is wrong with the secret the key was built from, found while it was at
    /// hand: a [`KeySet`](crate::KeySet) refuses the key for it.
    pub(crate) secret_problem: Option<SecretProblem>,
}

impl ApiKey {
    /// A key with this id whose secret is `secret`. Only its SHA-256 digest is kept.
    ///
    /// A secret no request can present (empty, longer than 4,096 bytes, with leading
    /// or trailing whitespace or any control character) makes the key invalid: a
    /// [`KeySet`](crate::KeySet) refuses it with [`Error::InvalidKey`].
    #[must_use]
    pub fn new(id: impl Into<Arc<str>>, secret: impl AsRef<[u8]>) -> Self {
        let secret = secret.as_ref();
        let mut key = Self::from_digest(id.into(), KeyDigest::of(secret));
        key.secret_problem = secret_problem(secret);
        key
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
            secret_problem: None,
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

    /// When the key was created, if recorded (to the millisecond).
    pub fn created_at(&self) -> Option<SystemTime> {
        self.meta.as_ref()?.created_at.map(clock::from_unix_ms)
    }

    /// Who created the key (a caller's key id, a person), if recorded.
    pub fn created_by(&self) -> Option<&str> {
        self.meta.as_ref()?.created_by.as_deref()
    }

    /// The id of the key this one replaced in a rotation, if any.
    pub fn rotated_from(&self) -> Option<&str> {
        self.meta.as_ref()?.rotated_from.as_deref()
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

    /// Records when the key was created (kept to the millisecond).
    #[must_use]
    pub fn with_created_at(mut self, at: SystemTime) -> Self {
        self.meta_mut().created_at = Some(clock::to_unix_ms(at));
        self
    }

    /// Records who created the key.
    #[must_use]
    pub fn with_created_by(mut self, by: impl Into<Box<str>>) -> Self {
        self.meta_mut().created_by = Some(by.into());
        self
    }

    /// Records the id of the key this one replaces in a rotation.
    #[must_use]
    pub fn with_rotated_from(mut self, id: impl Into<Box<str>>) -> Self {
        self.meta_mut().rotated_from = Some(id.into());
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

    /// Adds a named rate limit (see [`limit`](crate::limit)): a request over it gets
    /// `429 Too Many Requests`. A key may have several, all-or-nothing.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_api_key::{ApiKey, limit::{Quota, QuotaPeriod, RateLimit}};
    ///
    /// let key = ApiKey::new("partner", "s3cr3t")
    ///     .with_rate_limit(RateLimit::new("burst", 100, Duration::from_secs(1)))
    ///     .with_rate_limit(RateLimit::new("daily", 100_000, Duration::from_secs(86_400)))
    ///     .with_quota(Quota::new(1_000_000, QuotaPeriod::Month))
    ///     .with_allowed_ips(["203.0.113.0/24".parse()?, "2001:db8::/32".parse()?]);
    /// assert_eq!(key.rate_limits().len(), 2);
    /// assert_eq!(key.allowed_ips().map(<[_]>::len), Some(2));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        let limits = &mut self.meta_mut().limits;
        let mut rates = std::mem::take(&mut limits.rates).into_vec();
        rates.push(limit);
        limits.rates = rates.into();
        self
    }

    /// Sets the key's calendar quota: requests over it get `429` until the next day
    /// or month (UTC).
    #[must_use]
    pub fn with_quota(mut self, quota: Quota) -> Self {
        self.meta_mut().limits.quota = Some(quota);
        self
    }

    /// Lets the key in only from these networks: a request from another address, or
    /// from an unknown one, gets `403`. An empty list makes the key invalid.
    #[must_use]
    pub fn with_allowed_ips(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.meta_mut().limits.allowed_ips = Some(nets.into_iter().collect());
        self
    }

    /// The key's rate limits.
    pub fn rate_limits(&self) -> &[RateLimit] {
        self.meta.as_ref().map_or(&[], |m| &m.limits.rates)
    }

    /// The key's quota, if any.
    pub fn quota(&self) -> Option<Quota> {
        self.meta.as_ref()?.limits.quota
    }

    /// The networks the key is let in from, if restricted.
    pub fn allowed_ips(&self) -> Option<&[IpNet]> {
        self.meta.as_ref()?.limits.allowed_ips.as_deref()
    }

    fn meta_mut(&mut self) -> &mut Meta {
        self.meta.get_or_insert_with(Box::default)
    }

    /// Checks what every source must refuse alike: a bad id, a secret no request can
    /// present, a validity window that is empty.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        validate_id(&self.id)?;
        if let Some(problem) = self.secret_problem {
            return Err(Error::invalid(Some(&self.id), problem.message()));
        }
        if self.valid_from != 0
            && self.valid_until != u64::MAX
            && self.valid_from >= self.valid_until
        {
            return Err(Error::invalid(
                Some(&self.id),
                "`not_before` must be earlier than `expires_at`",
            ));
        }
        if let Some(meta) = &self.meta {
            meta.limits
                .check()
                .map_err(|reason| Error::invalid(Some(&self.id), reason))?;
        }
        Ok(())
    }
}

/// Why no request could ever present a secret: headers are trimmed and hold no
/// control characters, and the layer reads at most [`MAX_SECRET_LEN`] bytes. One byte
/// in every [`ApiKey`], where a message would take sixteen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SecretProblem {
    Empty,
    TooLong,
    Whitespace,
    Control,
}

impl SecretProblem {
    fn message(self) -> &'static str {
        match self {
            Self::Empty => "the secret must not be empty",
            Self::TooLong => "the secret is longer than 4096 bytes",
            Self::Whitespace => "the secret has leading or trailing whitespace",
            Self::Control => "the secret contains a control character",
        }
    }
}

fn secret_problem(secret: &[u8]) -> Option<SecretProblem> {
    if secret.is_empty() {
        return Some(SecretProblem::Empty);
    }
    if secret.len() > MAX_SECRET_LEN {
        return Some(SecretProblem::TooLong);
    }
    if secret.first().is_some_and(u8::is_ascii_whitespace)
        || secret.last().is_some_and(u8::is_ascii_whitespace)
    {
        return Some(SecretProblem::Whitespace);
    }
    if secret.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Some(SecretProblem::Control);
    }
    None
}

/// Ids appear in logs and audit trails: they must be short, visible and unambiguous.
pub(crate) fn validate_id(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(Error::invalid(None, "`id` must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid(None, "`id` is longer than 256 bytes"));
    }
    if id.chars().any(|c| c.is_whitespace() || invisible(c)) {
        return Err(Error::invalid(
            Some(&id.escape_unicode().to_string()),
            "`id` must not contain whitespace, control, format or separator characters",
        ));
    }
    Ok(())
}

/// Unicode control (Cc) and format (Cf) characters, and the line and paragraph
/// separators: characters that do not show, or that reorder or hide text in a log.
pub(crate) fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00ad}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061c}'
            | '\u{06dd}'
            | '\u{070f}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08e2}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}')
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret_or_digest() {
        let key = ApiKey::new("id-1", "super-secret-value");
        let dbg = format!("{key:?}");
        assert!(dbg.contains("id-1"));
        assert!(!dbg.contains("super-secret-value"));
        assert!(!dbg.contains(&key.digest.to_hex()));
    }

    #[test]
    fn secrets_no_request_can_present_are_invalid() {
        for secret in [
            &b""[..],
            b" padded",
            b"padded\n",
            b"tab\tinside",
            b"cr\rinside",
            &[b'x'; MAX_SECRET_LEN + 1],
        ] {
            let err = ApiKey::new("k", secret).validate().unwrap_err().to_string();
            assert!(err.starts_with("key `k`: "), "{err}");
        }
        assert!(ApiKey::new("k", [b'x'; MAX_SECRET_LEN]).validate().is_ok());
        assert!(ApiKey::new("k", "inner space ok").validate().is_ok());
    }

    #[test]
    fn a_key_is_small() {
        // A million of them are held while a large key file is checked.
        assert!(
            std::mem::size_of::<ApiKey>() <= 80,
            "{}",
            std::mem::size_of::<ApiKey>()
        );
    }

    #[test]
    fn empty_windows_are_invalid() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let key = ApiKey::new("k", "s")
            .with_not_before(at)
            .with_expires_at(at);
        assert!(
            key.validate()
                .unwrap_err()
                .to_string()
                .contains("not_before")
        );
        let key = ApiKey::new("k", "s")
            .with_not_before(at)
            .with_expires_at(at + std::time::Duration::from_millis(1));
        assert!(key.validate().is_ok());
    }

    #[test]
    fn ids_must_be_visible() {
        for id in [
            "",
            "a b",
            "a\u{202e}b",
            "a\u{200b}b",
            "a\u{2028}b",
            "a\u{feff}",
            "a\u{7}",
        ] {
            assert!(validate_id(id).is_err(), "{id:?}");
        }
        let err = validate_id("evil\u{202e}gnp.exe").unwrap_err().to_string();
        assert!(!err.contains('\u{202e}'), "{err}");
        for id in ["billing-2026", "clé-été", "ключ", "鍵"] {
            assert!(validate_id(id).is_ok(), "{id:?}");
        }
        assert!(validate_id(&"x".repeat(257)).is_err());
    }
}
