//! One `[[keys]]` table as both readers read it (the general TOML parser and the
//! fast reader), and the key it makes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use toml::value::Datetime;

use crate::{
    ApiKey, Error,
    key::digest::KeyDigest,
    limit::{IpNet, Quota, RateLimit},
};

/// One `[[keys]]` table. `S` is the string type (owned from the TOML parser,
/// borrowed from the file on the fast path), `T` the secret's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyEntry<S, T> {
    pub(super) id: S,
    pub(super) secret: Option<T>,
    pub(super) sha256: Option<S>,
    #[serde(default = "Vec::new")]
    pub(super) scopes: Vec<S>,
    pub(super) tenant: Option<S>,
    pub(super) owner: Option<S>,
    pub(super) description: Option<S>,
    pub(super) not_before: Option<Datetime>,
    pub(super) expires_at: Option<Datetime>,
    #[serde(default)]
    pub(super) disabled: bool,
    pub(super) created_at: Option<Datetime>,
    pub(super) created_by: Option<S>,
    pub(super) rotated_from: Option<S>,
    #[serde(default = "Vec::new")]
    pub(super) rate_limits: Vec<RateLimitEntry<S>>,
    pub(super) quota: Option<QuotaEntry<S>>,
    pub(super) allowed_ips: Option<Vec<S>>,
}

/// One of `rate_limits = [{ name = "burst", requests = 100, per = "1s" }]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitEntry<S> {
    pub(super) name: S,
    pub(super) requests: u64,
    pub(super) per: S,
}

/// `quota = { requests = 1000000, per = "month" }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QuotaEntry<S> {
    pub(super) requests: u64,
    pub(super) per: S,
}

impl<S, T> KeyEntry<S, T>
where
    S: AsRef<str> + Into<Box<str>>,
    T: AsRef<str>,
{
    pub(super) fn into_key(self) -> Result<ApiKey, Error> {
        let id = self.id.as_ref();
        let key = match (&self.secret, &self.sha256) {
            (Some(secret), None) if secret.as_ref().is_empty() => {
                return Err(Error::invalid(Some(id), "`secret` must not be empty"));
            }
            (Some(secret), None) => ApiKey::new(id, secret.as_ref()),
            (None, Some(hex)) => ApiKey::from_digest(
                id.into(),
                KeyDigest::from_hex(hex.as_ref().trim()).ok_or_else(|| {
                    Error::invalid(Some(id), "`sha256` must be 64 hexadecimal digits")
                })?,
            ),
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    Some(id),
                    "both `secret` and `sha256` are set; give exactly one",
                ));
            }
            (None, None) => {
                return Err(Error::invalid(
                    Some(id),
                    "neither `secret` nor `sha256` is set; give exactly one",
                ));
            }
        };
        let mut key = key.with_disabled(self.disabled);
        if !self.scopes.is_empty() {
            key = key.with_scopes(self.scopes);
        }
        if let Some(tenant) = self.tenant {
            key = key.with_tenant(tenant);
        }
        if let Some(owner) = self.owner {
            key = key.with_owner(owner);
        }
        if let Some(description) = self.description {
            key = key.with_description(description);
        }
        if let Some(at) = self.not_before {
            key = key.with_not_before(instant(id, "not_before", &at)?);
        }
        if let Some(at) = self.created_at {
            key = key.with_created_at(instant(id, "created_at", &at)?);
        }
        if let Some(by) = self.created_by {
            key = key.with_created_by(by);
        }
        if let Some(from) = self.rotated_from {
            key = key.with_rotated_from(from);
        }
        if let Some(at) = self.expires_at {
            key = key.with_expires_at(instant(id, "expires_at", &at)?);
        }
        for (i, rate) in self.rate_limits.into_iter().enumerate() {
            let name = rate.name.as_ref();
            // Named by place: the name is not checked yet.
            let per = RateLimit::parse_per(rate.per.as_ref()).map_err(|e| {
                Error::invalid(
                    Some(id),
                    format!("`rate_limits` entry {}: `per`: {e}", i + 1),
                )
            })?;
            key = key.with_rate_limit(RateLimit::new(name, rate.requests, per));
        }
        if let Some(quota) = self.quota {
            let period = quota
                .per
                .as_ref()
                .parse()
                .map_err(|e| Error::invalid(Some(id), e))?;
            key = key.with_quota(Quota::new(quota.requests, period));
        }
        if let Some(nets) = self.allowed_ips {
            let nets = nets
                .iter()
                .enumerate()
                .map(|(at, net)| {
                    // Named by its place, never quoted: a secret pasted into the
                    // wrong field must not reach a log.
                    net.as_ref().parse::<IpNet>().map_err(|e| {
                        Error::invalid(Some(id), format!("`allowed_ips`, entry {}: {e}", at + 1))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            key = key.with_allowed_ips(nets);
        }
        Ok(key)
    }
}

/// Converts a TOML offset datetime to a `SystemTime`.
pub(super) fn instant(id: &str, field: &str, dt: &Datetime) -> Result<SystemTime, Error> {
    use toml::value::Offset;
    let (Some(date), Some(clock), Some(offset)) = (dt.date, dt.time, dt.offset) else {
        return Err(Error::invalid(
            Some(id),
            format!("`{field}` needs a date, a time and a UTC offset, e.g. 2026-12-01T00:00:00Z"),
        ));
    };
    let offset_seconds = match offset {
        Offset::Z => 0,
        Offset::Custom { minutes } => i32::from(minutes) * 60,
    };
    let nanos = (|| {
        let date = time::Date::from_calendar_date(
            i32::from(date.year),
            time::Month::try_from(date.month).ok()?,
            date.day,
        )
        .ok()?;
        let clock = time::Time::from_hms_nano(
            clock.hour,
            clock.minute,
            clock.second.unwrap_or(0),
            clock.nanosecond.unwrap_or(0),
        )
        .ok()?;
        let offset = time::UtcOffset::from_whole_seconds(offset_seconds).ok()?;
        Some(
            time::PrimitiveDateTime::new(date, clock)
                .assume_offset(offset)
                .unix_timestamp_nanos(),
        )
    })();
    let at = nanos.and_then(|n| {
        // Whole seconds and the rest: a `u64` of nanoseconds ends in 2554, and the
        // writer writes instants up to the year 9999.
        let (secs, nanos) = (
            n.unsigned_abs() / 1_000_000_000,
            n.unsigned_abs() % 1_000_000_000,
        );
        let since = Duration::new(u64::try_from(secs).ok()?, u32::try_from(nanos).ok()?);
        match n >= 0 {
            true => UNIX_EPOCH.checked_add(since),
            false => UNIX_EPOCH.checked_sub(since),
        }
    });
    at.ok_or_else(|| Error::invalid(Some(id), format!("`{field}` is out of range")))
}
