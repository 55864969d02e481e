//! Where the key-management API keeps its keys: the public backend trait.

use std::{fmt, future::Future};

use sha2::{Digest as _, Sha256};

use crate::ApiKey;

/// Where the [`AdminApi`](super::AdminApi) keeps the keys it manages: the key file
/// ([`FileBackend`](super::FileBackend)), or your own (a database shared by a fleet).
///
/// Each method is one atomic operation: it succeeds whole or changes nothing.
/// Records are [`ApiKey`]s, which hold digests, never secrets. A record's version,
/// for `If-Match`, is its [`record_etag`]: a backend checks it against the record it
/// holds at the moment of the change.
///
/// A backend checks a change against the rules its store source applies before
/// writing it (a key file must still parse), so that a written change is never
/// refused on reload. The API waits, after each change, until the store it was built
/// with has applied it (at most its timeout; then it answers 202, written but not yet
/// enforced): the backend's keys must reach that store through the source named by
/// [`source_name`](AdminBackend::source_name).
///
/// The errors are a contract with the caller: [`BackendError::Unavailable`] only
/// when nothing was written, [`BackendError::OutcomeUnknown`] when a write may have
/// happened. What an error says is logged; the caller is told its kind, not the
/// error's text (which may name a path, a host or a script).
pub trait AdminBackend: Send + Sync + 'static {
    /// The name of the store source its keys arrive through (a
    /// [`KeySource::name`](crate::KeySource::name)): the API manages those keys and no
    /// others.
    fn source_name(&self) -> String;

    /// Every record, in any order.
    fn list(&self) -> impl Future<Output = Result<Vec<ApiKey>, BackendError>> + Send;

    /// The record with this id.
    fn get(&self, id: &str) -> impl Future<Output = Result<Option<ApiKey>, BackendError>> + Send;

    /// Adds a record; [`BackendError::Conflict`] if its id is taken.
    fn create(&self, key: ApiKey) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Replaces the record with `key`'s id, if its [`record_etag`] is `if_match` (when
    /// given): [`BackendError::NotFound`], [`BackendError::PreconditionFailed`].
    fn update(
        &self,
        key: ApiKey,
        if_match: Option<&str>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Removes the record with this id, under the same condition.
    fn delete(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// The usage of these keys across the fleet the backend serves, in order, if it
    /// knows it: requests and last use. The default, `None`, shows the usage the API's
    /// own store counted.
    fn usage(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<Option<Vec<UsageCounts>>, BackendError>> + Send {
        let _ = ids;
        async { Ok(None) }
    }

    /// How much of `key`'s quota the fleet the backend serves has taken this period,
    /// if the backend keeps it (the Redis backend does: the tokens its replicas leased,
    /// which is what they let in plus the shares they hold unspent). The default,
    /// `None`, shows what the API's own store counted.
    fn quota_used(
        &self,
        key: &ApiKey,
    ) -> impl Future<Output = Result<Option<u64>, BackendError>> + Send {
        let _ = key;
        async { Ok(None) }
    }

    /// Adds `successor` and replaces the record with `old`'s id by `old` (its shorter
    /// expiry), together, if that record's etag is `if_match` (when given).
    fn rotate(
        &self,
        successor: ApiKey,
        old: ApiKey,
        if_match: Option<&str>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// Requests and last use of one key, as a backend counts them across a fleet.
pub type UsageCounts = (u64, Option<std::time::SystemTime>);

/// Why a backend refused or failed an operation.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackendError {
    /// No record with this id.
    NotFound,
    /// The id is taken.
    Conflict(String),
    /// The record's version is not the one given.
    PreconditionFailed,
    /// The change breaks a rule of the key source (a bad id, a duplicate key, an
    /// empty window).
    Invalid(crate::Error),
    /// The backend cannot serve now: I/O, a key file that does not parse, a lost
    /// connection. Nothing was changed: the call may be retried as it is.
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    /// The write was sent but its outcome is unknown (a time-out or a connection
    /// lost after the request left): it may or may not have happened. Read the
    /// record to find out before retrying a call that is not idempotent.
    OutcomeUnknown(Box<dyn std::error::Error + Send + Sync>),
    /// The store of record holds no key set at all (a wiped Redis, a namespace
    /// never created): nothing was written. Writes are refused until an operator
    /// restores it explicitly, because a wiped store is not "zero keys".
    StoreMissing(String),
    /// A record in the store of record cannot be read (it is not a key record, or
    /// names another id): the fault is the store's, not the caller's.
    Corrupt {
        /// The id the record is stored under.
        id: String,
        /// What is wrong with it; never a value from it.
        reason: String,
    },
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => f.write_str("no such key"),
            Self::Conflict(id) => write!(f, "key id `{id}` is taken"),
            Self::PreconditionFailed => f.write_str("the key changed since the given version"),
            Self::Invalid(error) => write!(f, "{error}"),
            Self::Unavailable(_) => f.write_str("the key backend is unavailable"),
            Self::OutcomeUnknown(_) => f.write_str(
                "the key backend did not confirm the write: it may or may not have happened",
            ),
            Self::StoreMissing(what) => {
                write!(f, "{what} holds no key set (wiped, or never created)")
            }
            Self::Corrupt { id, reason } => write!(
                f,
                "the stored record of key `{id}` cannot be read: {reason}"
            ),
        }
    }
}

/// What the fleet engines' backends share.
#[cfg(any(feature = "redis", feature = "postgres"))]
impl BackendError {
    /// The fault of a store of record whose record of key `id` is not a key (`error`
    /// says why; `None`: not a key record at all).
    pub(crate) fn corrupt(id: &str, error: Option<crate::Error>) -> Self {
        let reason = match error {
            Some(crate::Error::InvalidKey { reason, .. }) => reason,
            Some(other) => other.to_string(),
            None => "it is not a key record".to_owned(),
        };
        Self::Corrupt {
            id: id.to_owned(),
            reason,
        }
    }

    /// The key that the stored record `json` of key `id` stands for, or the store's
    /// fault, named.
    pub(crate) fn checked(id: &str, json: &[u8]) -> Result<crate::ApiKey, Self> {
        crate::key::record::decode_valid(id, json).map_err(|e| Self::corrupt(id, Some(e)))
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unavailable(error) | Self::OutcomeUnknown(error) => Some(error.as_ref()),
            _ => None,
        }
    }
}

/// A reason a backend of this crate gives for a failure that is safe to tell the
/// caller (it names no path, host or script), over the error that caused it, which
/// is only logged.
#[derive(Debug)]
pub(crate) struct Said {
    pub(crate) said: &'static str,
    pub(crate) cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Said {
    pub(crate) fn new(
        said: &'static str,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Box<Self> {
        Box::new(Self {
            said,
            cause: Some(cause.into()),
        })
    }

    pub(crate) fn only(said: &'static str) -> Box<Self> {
        Box::new(Self { said, cause: None })
    }
}

impl fmt::Display for Said {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.said)
    }
}

impl std::error::Error for Said {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The version of a stored record, as an HTTP entity tag (quoted): the SHA-256 of
/// everything the record holds, so it changes when, and only when, the record does
/// (usage and status, which move with traffic and time, are not part of it). The
/// same in every process, so replicas of a fleet agree.
pub fn record_etag(key: &ApiKey) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: Option<&[u8]>| {
        h.update(name.as_bytes());
        match value {
            Some(v) => {
                h.update([1]);
                h.update((v.len() as u64).to_le_bytes());
                h.update(v);
            }
            None => h.update([0]),
        }
    };
    field("id", Some(key.id.as_bytes()));
    field("digest", Some(&key.digest.0));
    let scopes: Vec<&str> = key.scopes().collect();
    field("scopes", Some(scopes.join("\u{1f}").as_bytes()));
    field("tenant", key.tenant().map(str::as_bytes));
    field("owner", key.owner().map(str::as_bytes));
    field("description", key.description().map(str::as_bytes));
    field("not_before", Some(&key.valid_from.to_le_bytes()));
    field("expires_at", Some(&key.valid_until.to_le_bytes()));
    field("disabled", Some(&[u8::from(key.disabled)]));
    let created = key.meta.as_ref().and_then(|m| m.created_at);
    field(
        "created_at",
        created.map(u64::to_le_bytes).as_ref().map(|b| &b[..]),
    );
    field("created_by", key.created_by().map(str::as_bytes));
    field("rotated_from", key.rotated_from().map(str::as_bytes));
    // Limits only when the key has them: the tag of a key without stays as it was.
    if !key.rate_limits().is_empty() {
        let rates: Vec<String> = (key.rate_limits().iter())
            .map(|r| {
                format!(
                    "{}\u{1f}{}\u{1f}{}",
                    r.name(),
                    r.requests(),
                    r.per().as_nanos()
                )
            })
            .collect();
        field("rate_limits", Some(rates.join("\u{1e}").as_bytes()));
    }
    if let Some(quota) = key.quota() {
        let quota = format!("{}\u{1f}{}", quota.requests(), quota.period());
        field("quota", Some(quota.as_bytes()));
    }
    if let Some(nets) = key.allowed_ips() {
        let nets: Vec<String> = nets.iter().map(ToString::to_string).collect();
        field("allowed_ips", Some(nets.join("\u{1f}").as_bytes()));
    }
    let digest = h.finalize();
    format!("\"{}\"", faster_hex::hex_string(&digest[..8]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::{Quota, QuotaPeriod, RateLimit};

    #[test]
    fn an_etag_changes_with_the_record_and_only_with_it() {
        let key = ApiKey::new("a", "s").with_scopes(["read"]);
        assert_eq!(record_etag(&key), record_etag(&key.clone()));
        for changed in [
            key.clone().with_scopes(["read", "write"]),
            key.clone().with_owner("o"),
            key.clone().with_disabled(true),
            key.clone().with_created_by("ops"),
            ApiKey::new("a", "other").with_scopes(["read"]),
            ApiKey::new("b", "s").with_scopes(["read"]),
        ] {
            assert_ne!(record_etag(&key), record_etag(&changed));
        }
        // Limits are part of the record: a change of one is a new version, or an
        // `If-Match` from before it would overwrite it unseen.
        let second = std::time::Duration::from_secs(1);
        let limited = key
            .clone()
            .with_rate_limit(RateLimit::new("burst", 10, second))
            .with_quota(Quota::new(100, QuotaPeriod::Day))
            .with_allowed_ips(["203.0.113.0/24".parse().unwrap()]);
        let mut seen = vec![record_etag(&key), record_etag(&limited)];
        for changed in [
            key.clone()
                .with_rate_limit(RateLimit::new("burst", 11, second))
                .with_quota(Quota::new(100, QuotaPeriod::Day))
                .with_allowed_ips(["203.0.113.0/24".parse().unwrap()]),
            key.clone()
                .with_rate_limit(RateLimit::new("burst", 10, 60 * second))
                .with_quota(Quota::new(100, QuotaPeriod::Day))
                .with_allowed_ips(["203.0.113.0/24".parse().unwrap()]),
            key.clone()
                .with_rate_limit(RateLimit::new("burst", 10, second))
                .with_quota(Quota::new(100, QuotaPeriod::Month))
                .with_allowed_ips(["203.0.113.0/24".parse().unwrap()]),
            key.clone()
                .with_rate_limit(RateLimit::new("burst", 10, second))
                .with_quota(Quota::new(100, QuotaPeriod::Day))
                .with_allowed_ips(["203.0.112.0/24".parse().unwrap()]),
            key.clone()
                .with_rate_limit(RateLimit::new("burst", 10, second))
                .with_quota(Quota::new(100, QuotaPeriod::Day)),
            key.clone()
                .with_rate_limit(RateLimit::new("burst", 10, second))
                .with_allowed_ips(["203.0.113.0/24".parse().unwrap()]),
            key.clone()
                .with_quota(Quota::new(100, QuotaPeriod::Day))
                .with_allowed_ips(["203.0.113.0/24".parse().unwrap()]),
        ] {
            let tag = record_etag(&changed);
            assert!(!seen.contains(&tag), "{changed:?}");
            seen.push(tag);
        }
        // A key without limits keeps the tag it had before limits existed: clients
        // holding one are not refused after an upgrade.
        assert_eq!(record_etag(&key), "\"9dd9aa2d94094550\"");
        // Field boundaries count: an owner "ab" is not a tenant "a" and an owner "b".
        assert_ne!(
            record_etag(&ApiKey::new("a", "s").with_owner("ab")),
            record_etag(&ApiKey::new("a", "s").with_tenant("a").with_owner("b"))
        );
    }
}
