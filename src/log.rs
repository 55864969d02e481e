//! `tracing` events, compiled away without the `tracing` feature.

use crate::{Rejection, ReloadReport};

/// How many ids a log line lists before it only counts the rest.
#[cfg(feature = "tracing")]
const LISTED: usize = 20;

/// The first ids of a list and how many more: the list is read where the report keeps
/// it, never copied (a reload of a million keys keeps a million).
#[cfg(feature = "tracing")]
struct Ids<'a>(&'a [std::sync::Arc<str>]);

#[cfg(feature = "tracing")]
impl std::fmt::Display for Ids<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[")?;
        for (i, id) in self.0.iter().take(LISTED).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(id)?;
        }
        if self.0.len() > LISTED {
            write!(f, ", … {} more", self.0.len() - LISTED)?;
        }
        f.write_str("]")
    }
}

pub(crate) fn applied(report: &ReloadReport) {
    #[cfg(feature = "tracing")]
    tracing::info!(
        target: "tower_api_key::reload",
        source = report.source(),
        version = report.version(),
        added = %Ids(report.list(|d| &d.added)),
        changed = %Ids(report.list(|d| &d.changed)),
        removed = %Ids(report.list(|d| &d.removed)),
        kept = %Ids(report.list(|d| &d.kept)),
        "api keys reloaded"
    );
    #[cfg(feature = "tracing")]
    if !report.expiring().is_empty() {
        tracing::warn!(
            target: "tower_api_key::reload",
            source = report.source(),
            expiring = %Ids(report.list(|d| &d.expiring)),
            "api keys expire soon; clients still using them must move to new keys"
        );
    }
    #[cfg(not(feature = "tracing"))]
    let _ = report;
}

pub(crate) fn rejected(report: &ReloadReport) {
    #[cfg(feature = "tracing")]
    if let Some(error) = report.error() {
        tracing::warn!(
            target: "tower_api_key::reload",
            source = report.source(),
            error = %crate::error::Chain(error),
            "api key reload refused; keeping the last good keys"
        );
    }
    #[cfg(not(feature = "tracing"))]
    let _ = report;
}

/// Records the key's id as `key_id` on the current span, for spans that declare the
/// field (`key_id = tracing::field::Empty`, e.g. in tower-http's `TraceLayer`).
#[inline]
pub(crate) fn accepted(key: &crate::KeyInfo) {
    #[cfg(feature = "tracing")]
    // Nothing to record into until some subscriber is set (one relaxed load).
    if tracing::dispatcher::has_been_set() {
        record_key_id(key);
    }
    #[cfg(not(feature = "tracing"))]
    let _ = key;
}

/// [`accepted`] once a subscriber is set: out of line, so that the request path
/// of a program that logs nothing does not carry it.
#[cfg(feature = "tracing")]
#[inline(never)]
fn record_key_id(key: &crate::KeyInfo) {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("key_id", key.id());
    }
}

#[inline]
pub(crate) fn refused(rejection: &Rejection) {
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "tower_api_key::request",
        reason = %rejection,
        key_id = rejection.key().map(crate::KeyInfo::id),
        "request refused"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = rejection;
}
