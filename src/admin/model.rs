//! What the key-management API reads and writes: the key resource and the request
//! bodies, with their OpenAPI schemas.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::problem::Problem;
use crate::{
    ApiKey, KeyStore, clock,
    limit::{IpNet, LimitKind, LimitStatus, Quota, RateLimit},
};

/// A key as the API shows it. Never a secret or a digest.
#[derive(Serialize, ToSchema)]
pub(crate) struct KeyResource {
    id: String,
    scopes: Vec<String>,
    tenant: Option<String>,
    owner: Option<String>,
    description: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    not_before: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    disabled: bool,
    /// As of the response.
    #[schema(value_type = KeyStatus)]
    status: &'static str,
    /// RFC 3339.
    #[schema(format = DateTime)]
    created_at: Option<String>,
    /// The key id of the caller that created it.
    created_by: Option<String>,
    /// The key this one replaced in a rotation.
    rotated_from: Option<String>,
    usage: Usage,
    /// The key's rate limits, each with what it allows now in the store the API
    /// serves.
    rate_limits: Vec<RateLimitStatus>,
    /// The key's calendar quota (UTC), with what was used this period.
    quota: Option<QuotaStatus>,
    /// The networks the key is let in from; null for any address.
    allowed_ips: Option<Vec<String>>,
}

/// A rate limit and where it stands.
#[derive(Serialize, ToSchema)]
pub(crate) struct RateLimitStatus {
    name: String,
    requests: u64,
    /// `1s`, `15m`, `1h`, `1d`.
    per: String,
    /// Requests it would let in now.
    remaining: u64,
    /// Seconds until its whole burst is back (rounded up).
    reset_seconds: u64,
}

/// A quota and what was used this period.
#[derive(Serialize, ToSchema)]
pub(crate) struct QuotaStatus {
    requests: u64,
    #[schema(value_type = QuotaPer)]
    per: &'static str,
    /// Requests let in this period: by this server's store, or, with the Redis
    /// backend, by the whole fleet (the tokens its replicas leased, their unspent
    /// shares included).
    used: u64,
    remaining: u64,
    /// RFC 3339: when the next period starts.
    #[schema(format = DateTime)]
    resets_at: String,
}

/// A quota's period.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // the schema of a quota's `per`
pub(crate) enum QuotaPer {
    Day,
    Month,
}

/// A rate limit in a request: `{"name": "burst", "requests": 100, "per": "1s"}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateLimitSpec {
    /// 1 to 64 letters, digits, `-`, `_` or `.`; unique among the key's limits.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._-]+$")]
    name: String,
    /// 1 to 10¹⁵ − 1, and at most one per nanosecond of `per`.
    #[schema(minimum = 1, maximum = 999_999_999_999_999_u64)]
    requests: u64,
    /// A whole number and `s`, `m`, `h` or `d`: `1s`, `15m`, `1d`.
    #[schema(pattern = "^[0-9]+[smhd]$")]
    per: String,
}

/// A quota in a request: `{"requests": 1000000, "per": "month"}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct QuotaSpec {
    #[schema(minimum = 1, maximum = 1_099_511_627_775_u64)]
    requests: u64,
    #[schema(value_type = QuotaPer)]
    per: String,
}

/// `key` with these limits in place of its own (`None`: left as they are; a
/// `Some(None)`: removed). Every limit is checked as a key file's would be.
pub(crate) fn with_limits(
    mut key: ApiKey,
    rate_limits: Option<Vec<RateLimitSpec>>,
    quota: Option<Option<QuotaSpec>>,
    allowed_ips: Option<Option<Vec<String>>>,
) -> Result<ApiKey, Problem> {
    let mut limits = key
        .meta
        .as_ref()
        .map(|m| m.limits.clone())
        .unwrap_or_default();
    if let Some(specs) = rate_limits {
        limits.rates = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                // Named by place: the name is not checked yet, and whatever was sent
                // there (a secret pasted into the wrong field) is not repeated.
                let per = RateLimit::parse_per(&spec.per).map_err(|e| {
                    Problem::validation(format!("`rate_limits` entry {}: `per`: {e}", i + 1))
                })?;
                Ok(RateLimit::new(spec.name, spec.requests, per))
            })
            .collect::<Result<_, Problem>>()?;
    }
    if let Some(quota) = quota {
        limits.quota = quota
            .map(|q| {
                Ok::<_, Problem>(Quota::new(
                    q.requests,
                    q.per.parse().map_err(Problem::validation)?,
                ))
            })
            .transpose()?;
    }
    if let Some(nets) = allowed_ips {
        limits.allowed_ips = nets
            .map(|nets| {
                nets.iter()
                    .enumerate()
                    .map(|(at, n)| {
                        // Named by its place, never quoted: it may be a secret
                        // pasted into the wrong field.
                        n.parse::<IpNet>().map_err(|e| {
                            Problem::validation(format!("`allowed_ips`, entry {}: {e}", at + 1))
                        })
                    })
                    .collect::<Result<Box<[_]>, _>>()
            })
            .transpose()?;
    }
    limits.check().map_err(Problem::validation)?;
    if key.meta.is_some() || !limits.is_empty() {
        key.meta.get_or_insert_with(Box::default).limits = limits;
    }
    Ok(key)
}

/// Requests let in with the key through the store the API serves, since it was
/// loaded, and the last one.
#[derive(Serialize, ToSchema)]
pub(crate) struct Usage {
    requests: u64,
    /// RFC 3339, to the second.
    #[schema(format = DateTime)]
    last_used: Option<String>,
}

/// A key just made: the resource, and its secret, shown this once.
#[derive(Serialize, ToSchema)]
pub(crate) struct CreatedKey {
    #[serde(flatten)]
    resource: KeyResource,
    /// The secret. Only its SHA-256 is stored: it cannot be shown again.
    key: String,
}

/// A page of keys, ordered by id.
#[derive(Serialize, ToSchema)]
pub(crate) struct KeyList {
    items: Vec<KeyResource>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// The status of a key at an instant.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // the schema of the `status` query parameter and field
pub(crate) enum KeyStatus {
    Active,
    Expired,
    NotYetValid,
    Disabled,
}

/// `POST /v1/api-keys`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateRequest {
    /// Generated when absent.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._~-]+$")]
    pub(crate) id: Option<String>,
    /// The secret's prefix, 1 to 16 ASCII letters and digits (default `tak`).
    #[schema(pattern = "^[A-Za-z0-9]{1,16}$")]
    pub(crate) prefix: Option<String>,
    #[serde(default)]
    pub(crate) scopes: Vec<String>,
    /// Defaults to the caller's tenant.
    pub(crate) tenant: Option<String>,
    pub(crate) owner: Option<String>,
    pub(crate) description: Option<String>,
    /// RFC 3339, from 1970 on.
    #[schema(format = DateTime)]
    pub(crate) not_before: Option<String>,
    /// RFC 3339, from 1970 on; after `not_before`.
    #[schema(format = DateTime)]
    pub(crate) expires_at: Option<String>,
    /// Named rate limits, all-or-nothing: a request over one gets 429.
    pub(crate) rate_limits: Option<Vec<RateLimitSpec>>,
    /// A calendar quota (UTC).
    pub(crate) quota: Option<QuotaSpec>,
    /// Networks (CIDR) the key is let in from; absent for any address.
    #[schema(min_items = 1)]
    pub(crate) allowed_ips: Option<Vec<String>>,
}

/// `PATCH /v1/api-keys/{id}`: a JSON merge patch (RFC 7396); `null` removes an
/// optional field. `id` and `key` cannot be changed.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read as a merge patch; this type is its schema
pub(crate) struct PatchRequest {
    scopes: Option<Vec<String>>,
    tenant: Option<String>,
    owner: Option<String>,
    description: Option<String>,
    /// RFC 3339, from 1970 on.
    #[schema(format = DateTime)]
    not_before: Option<String>,
    /// RFC 3339, from 1970 on.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    disabled: Option<bool>,
    /// Replaces the key's rate limits; null or `[]` removes them.
    rate_limits: Option<Vec<RateLimitSpec>>,
    /// Replaces the key's quota; null removes it.
    quota: Option<QuotaSpec>,
    /// Replaces the key's networks; null lets it in from any address.
    #[schema(min_items = 1)]
    allowed_ips: Option<Vec<String>>,
}

/// `POST /v1/api-keys/{id}/rotate`.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateRequest {
    /// How long the old key keeps working (default 86400, a day; at most about a
    /// century); never past the expiry it already had.
    #[schema(minimum = 0, maximum = 3_153_600_000_u64)]
    pub(crate) overlap_seconds: Option<u64>,
    /// The successor's id; when absent, derived from the old key's (`billing` →
    /// `billing-r2`, `billing-r2` → `billing-r3`).
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._~-]+$")]
    pub(crate) id: Option<String>,
}

/// An RFC 3339 instant from a request field.
pub(crate) fn instant(field: &str, text: &str) -> Result<SystemTime, Problem> {
    parse_rfc3339(text).ok_or_else(|| {
        Problem::validation(format!(
            "`{field}` must be an RFC 3339 date and time with an offset, e.g. 2026-12-01T00:00:00Z"
        ))
    })
}

/// The instant an RFC 3339 date and time with an offset names
/// (`2026-12-01T00:00:00Z`, `…T01:00:00.250+01:00`); `None` for anything else, an
/// instant before 1970 included.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    use time::{OffsetDateTime, format_description::well_known::Rfc3339};
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    let nanos = u64::try_from(at.unix_timestamp_nanos()).ok()?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_nanos(nanos))
}

/// The status of `key` at `now`.
pub(crate) fn status(key: &ApiKey, now: SystemTime) -> &'static str {
    let now = clock::to_unix_ms(now);
    if key.disabled {
        "disabled"
    } else if now < key.valid_from {
        "not_yet_valid"
    } else if now >= key.valid_until {
        "expired"
    } else {
        "active"
    }
}

impl KeyResource {
    /// The resource of `key` at `now`; its usage is `fleet`'s when the backend knows
    /// it, else what `store` counted.
    pub(crate) fn of(
        key: &ApiKey,
        store: &KeyStore,
        now: SystemTime,
        fleet: Option<(u64, Option<SystemTime>)>,
    ) -> Self {
        let (requests, last_used) = fleet.unwrap_or_else(|| {
            let usage = store.usage_of(key.id());
            (
                usage.as_ref().map_or(0, crate::KeyUsage::requests),
                usage.and_then(|u| u.last_used()),
            )
        });
        Self {
            id: key.id().to_owned(),
            scopes: key.scopes().map(str::to_owned).collect(),
            tenant: key.tenant().map(str::to_owned),
            owner: key.owner().map(str::to_owned),
            description: key.description().map(str::to_owned),
            not_before: key.not_before().map(clock::rfc3339),
            expires_at: key.expires_at().map(clock::rfc3339),
            disabled: key.is_disabled(),
            status: status(key, now),
            created_at: key.created_at().map(clock::rfc3339),
            created_by: key.created_by().map(str::to_owned),
            rotated_from: key.rotated_from().map(str::to_owned),
            usage: Usage {
                requests,
                last_used: last_used.map(clock::rfc3339),
            },
            rate_limits: Vec::new(),
            quota: None,
            allowed_ips: key
                .allowed_ips()
                .map(|nets| nets.iter().map(ToString::to_string).collect()),
        }
        .with_limit_status(key, store, now)
    }

    /// The key's limits with where they stand in `store`: as the store's copy of the
    /// key counted them, if it has the key with the same limits; else untouched.
    /// The quota's use as the fleet counted it, when the backend keeps that count.
    pub(crate) fn with_quota_used(mut self, used: Option<u64>) -> Self {
        if let (Some(quota), Some(used)) = (&mut self.quota, used) {
            quota.used = used.min(quota.requests);
            quota.remaining = quota.requests - quota.used;
        }
        self
    }

    fn with_limit_status(mut self, key: &ApiKey, store: &KeyStore, now: SystemTime) -> Self {
        let live = store
            .get(key.id())
            .filter(|k| {
                k.entry()
                    .limiter
                    .as_ref()
                    .is_some_and(|l| key.meta.as_ref().is_some_and(|m| m.limits == l.limits))
            })
            .map(|k| k.limits())
            .unwrap_or_default();
        let found = |kind: LimitKind, name: &str| {
            live.iter().find(|s| s.kind() == kind && s.name() == name)
        };
        self.rate_limits = key
            .rate_limits()
            .iter()
            .map(|r| {
                let status = found(LimitKind::Rate, r.name());
                RateLimitStatus {
                    name: r.name().to_owned(),
                    requests: r.requests(),
                    per: RateLimit::format_per(r.per()),
                    remaining: status.map_or(r.requests(), LimitStatus::remaining),
                    reset_seconds: status.map_or(0, |s| {
                        s.reset().as_secs() + u64::from(s.reset().subsec_nanos() > 0)
                    }),
                }
            })
            .collect();
        self.quota = key.quota().map(|q| {
            let now_ms = clock::to_unix_ms(now);
            let period = q.period().index(now_ms);
            let used = found(LimitKind::Quota, "quota").map_or(0, LimitStatus::used);
            QuotaStatus {
                requests: q.requests(),
                per: q.period().as_str(),
                used,
                remaining: q.requests().saturating_sub(used),
                resets_at: clock::rfc3339(clock::from_unix_ms(
                    q.period().start(period.saturating_add(1)),
                )),
            }
        });
        self
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }
}

impl CreatedKey {
    pub(crate) fn new(resource: KeyResource, key: String) -> Self {
        Self { resource, key }
    }
}

impl KeyList {
    pub(crate) fn new(items: Vec<KeyResource>, next_cursor: Option<String>) -> Self {
        Self { items, next_cursor }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parses_offsets_and_refuses_the_rest() {
        let ms = |text: &str| parse_rfc3339(text).map(clock::to_unix_ms);
        assert_eq!(ms("2026-12-01T00:00:00Z"), Some(1_796_083_200_000));
        assert_eq!(ms("2026-12-01T01:00:00.250+01:00"), Some(1_796_083_200_250));
        let written = clock::rfc3339(clock::from_unix_ms(951_782_400_250));
        assert_eq!(ms(&written), Some(951_782_400_250));
        for bad in [
            "2026-12-01",
            "2026-12-01T00:00:00",
            "1969-12-31T23:59:59Z",
            "soon",
            "",
        ] {
            assert_eq!(ms(bad), None, "{bad}");
        }
    }
}
