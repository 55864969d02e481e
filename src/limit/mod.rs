//! Per-key limits: rate limits, a calendar quota and an address allow-list.
//!
//! A key may carry any of them ([`ApiKey::with_rate_limit`](crate::ApiKey::with_rate_limit),
//! [`ApiKey::with_quota`](crate::ApiKey::with_quota),
//! [`ApiKey::with_allowed_ips`](crate::ApiKey::with_allowed_ips), or the key file's
//! `rate_limits`, `quota` and `allowed_ips`). The layer decides on each request
//! locally, with no lock for a key with one limit and no allocation:
//!
//! - a **rate limit** (`{ name = "burst", requests = 100, per = "1s" }`) is a GCRA
//!   (generic cell rate algorithm, the token bucket in one number): a burst of up to
//!   `requests` at once, refilled at `requests` per `per`. Over any interval of length
//!   `d`, a key is let in at most `requests + d × requests / per` times; a refusal
//!   says exactly when the next request will be let in;
//! - a **quota** (`{ requests = 1000000, per = "month" }`) counts the requests of a
//!   calendar day or month in UTC, and refuses the rest until the next one starts;
//! - **allowed_ips** lets the key in only from these networks
//!   ([`IpNet`]); a request whose client address is unknown is refused.
//!
//! A key's limits are all-or-nothing: a request refused by one is counted by none.
//! Their state (when each rate limit's next request is due, the quota's count) is
//! kept beside the key, outside the part of the key set a lookup reads, and carried
//! over a reload that keeps the key's id. A change of the key's limits takes effect
//! at once without forgetting what was counted: a limit left as it was keeps its
//! state, one whose `requests` or `per` changed keeps the requests it counted (at
//! most a whole burst of the new schedule), the quota keeps this period's count
//! while its period stays; a new or renamed limit starts afresh.
//!
//! This module knows nothing of HTTP: the layer turns its answers into `429` and
//! `403` responses and `RateLimit` header fields.

mod cidr;
mod gcra;
mod quota;
pub(crate) mod state;

pub use self::{
    cidr::{IpNet, IpNetError},
    quota::QuotaPeriod,
    state::{LimitKind, LimitStatus},
};

use std::{fmt, sync::Arc, time::Duration};

/// The longest `per` of a rate limit: a year.
const MAX_PER: Duration = Duration::from_secs(366 * 86_400);

/// The most requests a quota may count in one period: 2⁴⁰ − 1 (about 1.1 × 10¹²).
pub(crate) const MAX_QUOTA: u64 = (1 << 40) - 1;

/// The most requests a rate limit may let in per window: the largest integer a
/// structured header field carries (`RateLimit-Policy: "burst";q=…`), 10¹⁵ − 1.
pub(crate) const MAX_REQUESTS: u64 = 999_999_999_999_999;

/// The longest name of a rate limit, in bytes.
const MAX_NAME: usize = 64;

/// One named rate limit of a key: at most `requests` per `per`, with bursts of up
/// to `requests`.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_api_key::limit::RateLimit;
///
/// let burst = RateLimit::new("burst", 100, Duration::from_secs(1));
/// assert_eq!((burst.name(), burst.requests(), burst.per()), ("burst", 100, Duration::from_secs(1)));
/// assert_eq!(RateLimit::parse_per("5m"), Ok(Duration::from_secs(300)));
/// assert!(RateLimit::parse_per("0s").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub(crate) name: Arc<str>,
    pub(crate) requests: u64,
    pub(crate) per: Duration,
}

impl RateLimit {
    /// A rate limit named `name` of `requests` per `per`. It is checked when the key
    /// is (see [`RateLimit::check`]): a key with an invalid limit is refused by any
    /// [`KeySet`](crate::KeySet).
    #[must_use]
    pub fn new(name: impl Into<Arc<str>>, requests: u64, per: Duration) -> Self {
        Self {
            name: name.into(),
            requests,
            per,
        }
    }

    /// The limit's name, as `RateLimit-Policy` and the admin API show it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many requests it lets in per [`per`](Self::per).
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Its window.
    pub fn per(&self) -> Duration {
        self.per
    }

    /// Reads a `per` duration as the key file writes it: a whole number and a unit,
    /// `s`, `m`, `h` or `d` (`"1s"`, `"15m"`, `"1d"`).
    ///
    /// # Errors
    ///
    /// Anything else, a zero duration, or one longer than 366 days.
    pub fn parse_per(text: &str) -> Result<Duration, String> {
        const HELP: &str =
            "a whole number and a unit, `s`, `m`, `h` or `d` (e.g. \"1s\", \"15m\", \"1d\")";
        let split = text.len().saturating_sub(1);
        let (number, unit) = (
            text.get(..split).unwrap_or(""),
            text.get(split..).unwrap_or(""),
        );
        let scale = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => return Err(HELP.into()),
        };
        if number.is_empty() || number.len() > 12 || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HELP.into());
        }
        let n: u64 = number.parse().map_err(|_| HELP.to_owned())?;
        let per = Duration::from_secs(n.saturating_mul(scale));
        Self::check_per(per)?;
        Ok(per)
    }

    fn check_per(per: Duration) -> Result<(), String> {
        if per.is_zero() {
            return Err("a window of zero lets nothing through: give a positive duration".into());
        }
        if per > MAX_PER {
            return Err("a window longer than 366 days (use a quota)".into());
        }
        Ok(())
    }

    /// `per` as the key file writes it: the largest unit that divides it whole.
    pub fn format_per(per: Duration) -> String {
        let secs = per.as_secs();
        for (unit, scale) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
            if secs.is_multiple_of(scale) && secs > 0 {
                return format!("{}{unit}", secs / scale);
            }
        }
        format!("{secs}s")
    }

    /// Whether the limit can be enforced: a name of 1 to 64 letters, digits, `-`,
    /// `_` or `.` (not `quota`, the quota's name), 1 to 10¹⁵ − 1 requests, and a
    /// window of whole seconds from 1 second to 366 days in which each request has at
    /// least a nanosecond.
    ///
    /// # Errors
    ///
    /// What is wrong, naming the field. The limit's name is quoted only when it
    /// looks like one (lowercase letters and `_`): any other may be a secret pasted
    /// into the wrong field, and an error may reach a log.
    pub fn check(&self) -> Result<(), String> {
        self.check_as(&self.label(None))
    }

    /// How an error names this limit: by its place among the key's limits (`at`,
    /// 1-based) where known, and by its name only if
    /// [`may_quote_name`](crate::error::may_quote_name) allows it.
    fn label(&self, at: Option<usize>) -> String {
        let name = crate::error::may_quote_name(&self.name).then_some(&*self.name);
        match (at, name) {
            (Some(at), Some(name)) => format!("`rate_limits` entry {at} (`{name}`)"),
            (Some(at), None) => format!("`rate_limits` entry {at}"),
            (None, Some(name)) => format!("`rate_limits` `{name}`"),
            (None, None) => "`rate_limits` (a limit whose name is not repeated)".to_owned(),
        }
    }

    /// [`check`](Self::check), naming the limit as `label` says.
    fn check_as(&self, label: &str) -> Result<(), String> {
        if self.name.is_empty()
            || self.name.len() > MAX_NAME
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "{label}: a name must be 1 to {MAX_NAME} letters, digits, `-`, `_` or `.`"
            ));
        }
        if &*self.name == "quota" {
            return Err(format!("{label}: the name `quota` is the quota's"));
        }
        if self.requests == 0 {
            return Err(format!(
                "{label}: `requests` must be at least 1 (to refuse every request, disable the key)"
            ));
        }
        Self::check_per(self.per).map_err(|e| format!("{label}: `per`: {e}"))?;
        if self.per.subsec_nanos() != 0 {
            return Err(format!("{label}: `per` must be whole seconds"));
        }
        if u128::from(self.requests) > self.per.as_nanos() {
            return Err(format!(
                "{label}: `requests` is more than one per nanosecond of `per`"
            ));
        }
        if self.requests > MAX_REQUESTS {
            return Err(format!(
                "{label}: `requests` must be at most {MAX_REQUESTS} (the largest integer a `RateLimit-Policy` field carries)"
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} per {}",
            self.name,
            self.requests,
            Self::format_per(self.per)
        )
    }
}

/// A key's quota: at most `requests` per calendar [`QuotaPeriod`] (UTC).
///
/// # Example
///
/// ```
/// use tower_api_key::limit::{Quota, QuotaPeriod};
///
/// let quota = Quota::new(1_000_000, QuotaPeriod::Month);
/// assert_eq!((quota.requests(), quota.period()), (1_000_000, QuotaPeriod::Month));
/// assert_eq!("day".parse::<QuotaPeriod>(), Ok(QuotaPeriod::Day));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quota {
    pub(crate) requests: u64,
    pub(crate) period: QuotaPeriod,
}

impl Quota {
    /// A quota of `requests` per `period`.
    #[must_use]
    pub fn new(requests: u64, period: QuotaPeriod) -> Self {
        Self { requests, period }
    }

    /// How many requests it lets in per period.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Its period.
    pub fn period(&self) -> QuotaPeriod {
        self.period
    }

    /// Whether the quota can be enforced: 1 to 2⁴⁰ − 1 requests.
    ///
    /// # Errors
    ///
    /// What is wrong, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if self.requests == 0 {
            return Err(
                "`quota`: `requests` must be at least 1 (to refuse every request, disable the key)"
                    .into(),
            );
        }
        if self.requests > MAX_QUOTA {
            return Err(format!("`quota`: `requests` must be at most {MAX_QUOTA}"));
        }
        Ok(())
    }
}

/// Everything a key is limited by: what [`Meta`](crate::key::Meta) keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Limits {
    pub(crate) rates: Box<[RateLimit]>,
    pub(crate) quota: Option<Quota>,
    /// `None`: any address.
    pub(crate) allowed_ips: Option<Box<[IpNet]>>,
}

impl Limits {
    /// Whether the key is limited at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.rates.is_empty() && self.quota.is_none() && self.allowed_ips.is_none()
    }

    /// Every problem a source must refuse: the first found.
    pub(crate) fn check(&self) -> Result<(), String> {
        // The count first: the names are then compared among at most 16.
        if self.rates.len() > 16 {
            return Err("`rate_limits`: at most 16 per key".into());
        }
        // Each named by its place: its name is quoted only if it looks like one.
        for (i, rate) in self.rates.iter().enumerate() {
            let label = rate.label(Some(i + 1));
            rate.check_as(&label)?;
            if let Some(first) = self.rates[..i].iter().position(|r| r.name == rate.name) {
                return Err(format!(
                    "{label}: the same name as entry {} (names must differ)",
                    first + 1
                ));
            }
        }
        if let Some(quota) = &self.quota {
            quota.check()?;
        }
        if let Some(ips) = &self.allowed_ips {
            if ips.is_empty() {
                return Err(
                    "`allowed_ips` is empty, which would refuse every address: leave it out to allow any, or disable the key"
                        .into(),
                );
            }
            if ips.len() > 1024 {
                return Err("`allowed_ips`: at most 1024 networks per key".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_durations() {
        for (text, secs) in [
            ("1s", 1),
            ("15m", 900),
            ("2h", 7_200),
            ("1d", 86_400),
            ("366d", 366 * 86_400),
        ] {
            assert_eq!(
                RateLimit::parse_per(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
            assert_eq!(RateLimit::format_per(Duration::from_secs(secs)), text);
        }
        assert_eq!(RateLimit::format_per(Duration::from_secs(90)), "90s");
        assert_eq!(RateLimit::format_per(Duration::from_secs(3_600)), "1h");
        for bad in [
            "",
            "s",
            "0s",
            "0d",
            "1",
            "1 s",
            " 1s",
            "1S",
            "1ms",
            "1.5s",
            "-1s",
            "+1s",
            "1w",
            "367d",
            "99999999999999999999s",
            "1é",
            "é",
        ] {
            assert!(RateLimit::parse_per(bad).is_err(), "{bad:?}");
        }
    }

    /// A tester's finding: 30,000 limits in one API body had their names compared
    /// pairwise (15.7 s of a server thread) before the count was checked.
    #[test]
    fn too_many_rate_limits_are_refused_before_their_names_are_compared() {
        let s = Duration::from_secs(1);
        let many = Limits {
            rates: (0..30_000)
                .map(|i| RateLimit::new(format!("r{}", i % 20_000), 1, s))
                .collect(),
            ..Limits::default()
        };
        assert_eq!(
            many.check(),
            Err("`rate_limits`: at most 16 per key".into())
        );
    }

    /// An attacker's report: a name that may be a secret pasted into the wrong field
    /// was quoted back in every error about its limit (a 422 of the API, a refused
    /// reload's log line). A name that looks like one still is.
    #[test]
    fn a_limit_is_named_in_an_error_only_when_its_name_looks_like_one() {
        let s = Duration::from_secs(1);
        let pasted = "tak_Live_0123456789abcdef";
        assert_eq!(
            RateLimit::new("burst", 0, s).check().unwrap_err(),
            "`rate_limits` `burst`: `requests` must be at least 1 (to refuse every request, disable the key)"
        );
        let err = RateLimit::new(pasted, 0, s).check().unwrap_err();
        assert!(!err.contains(pasted) && err.contains("`requests`"), "{err}");
        for (rates, says) in [
            (
                vec![RateLimit::new(pasted, 0, s)],
                "`rate_limits` entry 1: `requests`",
            ),
            (
                vec![
                    RateLimit::new("burst", 1, s),
                    RateLimit::new(pasted, 1, Duration::ZERO),
                ],
                "`rate_limits` entry 2: `per`",
            ),
            (
                vec![RateLimit::new(pasted, 1, s), RateLimit::new(pasted, 2, s)],
                "`rate_limits` entry 2: the same name as entry 1",
            ),
            (
                vec![RateLimit::new("daily", 0, s)],
                "`rate_limits` entry 1 (`daily`): `requests`",
            ),
        ] {
            let limits = Limits {
                rates: rates.into(),
                ..Limits::default()
            };
            let err = limits.check().unwrap_err();
            assert!(err.starts_with(says), "{err}");
            assert!(!err.contains(pasted), "{err}");
        }
    }

    #[test]
    fn limits_that_cannot_be_enforced_are_refused() {
        let s = Duration::from_secs(1);
        assert!(RateLimit::new("burst", 100, s).check().is_ok());
        assert!(RateLimit::new("burst", 1_000_000_000, s).check().is_ok());
        assert!(
            RateLimit::new("burst", MAX_REQUESTS, MAX_PER)
                .check()
                .is_ok()
        );
        for bad in [
            RateLimit::new("burst", 0, s),
            RateLimit::new("burst", 1_000_000_001, s),
            RateLimit::new("burst", u64::MAX, s),
            // Possible for GCRA, but no `RateLimit-Policy` field could say it.
            RateLimit::new("burst", MAX_REQUESTS + 1, MAX_PER),
            RateLimit::new("burst", 1, Duration::ZERO),
            RateLimit::new("burst", 1, Duration::from_millis(1_500)),
            RateLimit::new("burst", 1, Duration::from_secs(400 * 86_400)),
            RateLimit::new("", 1, s),
            RateLimit::new("quota", 1, s),
            RateLimit::new("a\"b", 1, s),
            RateLimit::new("x".repeat(65), 1, s),
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        assert!(Quota::new(0, QuotaPeriod::Day).check().is_err());
        assert!(Quota::new(MAX_QUOTA + 1, QuotaPeriod::Day).check().is_err());
        assert!(Quota::new(MAX_QUOTA, QuotaPeriod::Month).check().is_ok());
        let twice = Limits {
            rates: vec![RateLimit::new("a", 1, s), RateLimit::new("a", 2, s)].into(),
            ..Limits::default()
        };
        assert_eq!(
            twice.check(),
            Err("`rate_limits` entry 2 (`a`): the same name as entry 1 (names must differ)".into())
        );
        let none = Limits {
            allowed_ips: Some(Box::new([])),
            ..Limits::default()
        };
        assert!(none.check().is_err());
    }
}
