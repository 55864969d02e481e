//! The `RateLimit-Policy` and `RateLimit` header fields of the IETF httpapi draft
//! (*RateLimit header fields for HTTP*), in its structured-field syntax: one list
//! item per limit, named by a string, with the policy's quota `q` and window `w`
//! (seconds), and the state's remaining `r` and reset `t` (seconds, rounded up).
//!
//! ```text
//! RateLimit-Policy: "burst";q=100;w=1, "quota";q=1000000;w=2678400
//! RateLimit: "burst";r=99;t=1, "quota";r=999999;t=86400
//! ```

use std::{fmt::Write as _, time::Duration};

use http::{HeaderName, HeaderValue};

use crate::limit::{LimitStatus, state::Limiter};

/// `RateLimit-Policy`.
pub(crate) const POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub(crate) const STATE: HeaderName = HeaderName::from_static("ratelimit");

/// Whole seconds, rounded up.
fn secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The two fields for an allowed response of a key with `limiter`, at `now`: the
/// policy made once and shared, the state written straight from the limiter, one
/// allocation in all.
pub(crate) fn allowed_fields(
    limiter: &Limiter,
    now: u64,
    unix_ms: u64,
) -> Option<(HeaderValue, HeaderValue)> {
    let quota = limiter.quota_status(unix_ms);
    let policy = limiter.policy_field(|| {
        let mut all: Vec<LimitStatus> = limiter.status(now, unix_ms);
        all.retain(|s| s.kind() == crate::limit::LimitKind::Rate);
        all.extend(quota.clone());
        fields(&all).map(|(policy, _)| policy)
    })?;
    let mut state = String::with_capacity(48);
    for (name, remaining, ahead) in limiter.rate_states(now) {
        let sep = if state.is_empty() { "" } else { ", " };
        let _ = write!(
            state,
            "{sep}\"{name}\";r={remaining};t={}",
            ahead.div_ceil(1_000_000_000)
        );
    }
    if let Some(quota) = quota {
        let sep = if state.is_empty() { "" } else { ", " };
        let _ = write!(
            state,
            "{sep}\"quota\";r={};t={}",
            quota.remaining(),
            secs(quota.reset())
        );
    }
    Some((policy, HeaderValue::try_from(state).ok()?))
}

/// The two fields for `limits`, if there are any. Names are checked to be letters,
/// digits, `-`, `_` and `.` when the key is loaded, so they need no escaping.
pub(crate) fn fields(limits: &[LimitStatus]) -> Option<(HeaderValue, HeaderValue)> {
    if limits.is_empty() {
        return None;
    }
    let (mut policy, mut state) = (String::new(), String::new());
    for (i, limit) in limits.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let name = limit.name();
        let _ = write!(
            policy,
            "{sep}\"{name}\";q={};w={}",
            limit.limit(),
            secs(limit.window())
        );
        let _ = write!(
            state,
            "{sep}\"{name}\";r={};t={}",
            limit.remaining(),
            secs(limit.reset())
        );
    }
    Some((
        HeaderValue::from_str(&policy).ok()?,
        HeaderValue::from_str(&state).ok()?,
    ))
}
