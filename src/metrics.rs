//! Counters and gauges through the `metrics` facade (the `metrics` feature); no-ops
//! without it.
//!
//! - `tower_api_key_requests_total{outcome, reason}`: every request the layer decides
//!   on; `outcome` is `accepted` or `refused`, `reason` is `valid` or the refusal
//!   (`missing`, `malformed`, `conflicting`, `unknown`, `invalid_checksum`,
//!   `disabled`, `expired`, `not_yet_valid`, `insufficient_scope`, `rate_limited`,
//!   `quota_exceeded`, `address_not_allowed`);
//! - `tower_api_key_key_requests_total{key_id}`: per key, only with
//!   [`ApiKeyLayer::per_key_metrics`](crate::ApiKeyLayer::per_key_metrics) (a million
//!   keys must not become a million series by default);
//! - `tower_api_key_reloads_total{source, result}`: `applied` or `refused`;
//! - `tower_api_key_keys{source}`: the keys each source has loaded;
//! - `tower_api_key_last_reload_timestamp_seconds{source}`: when the source last
//!   changed the store (Unix seconds).

use crate::{KeyInfo, Rejection, ReloadReport};

/// A request let in with `key`.
#[inline]
pub(crate) fn accepted(key: &KeyInfo, per_key: bool) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("tower_api_key_requests_total", "outcome" => "accepted", "reason" => "valid")
            .increment(1);
        if per_key {
            metrics::counter!("tower_api_key_key_requests_total", "key_id" => key.id().to_owned())
                .increment(1);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (key, per_key);
}

/// A request refused for `rejection`.
#[inline]
pub(crate) fn refused(rejection: &Rejection) {
    #[cfg(feature = "metrics")]
    metrics::counter!("tower_api_key_requests_total", "outcome" => "refused", "reason" => rejection.reason())
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = rejection;
}

/// An update of a source's keys, applied or refused; `keys` is how many the source
/// has now.
pub(crate) fn reloaded(report: &ReloadReport, keys: usize) {
    #[cfg(feature = "metrics")]
    {
        let source = report.source().to_owned();
        let result = if report.is_applied() {
            "applied"
        } else {
            "refused"
        };
        metrics::counter!("tower_api_key_reloads_total", "source" => source.clone(), "result" => result)
            .increment(1);
        if report.is_applied() {
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!("tower_api_key_keys", "source" => source.clone()).set(keys as f64);
            let at = report
                .at()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            metrics::gauge!("tower_api_key_last_reload_timestamp_seconds", "source" => source)
                .set(at);
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (report, keys);
}
