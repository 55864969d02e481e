//! RFC 8594 `Sunset` and RFC 9745 `Deprecation` headers for a key close to its
//! `expires_at`, added to the responses of requests made with it when the layer has
//! [`deprecation_headers(true)`](crate::ApiKeyLayer::deprecation_headers): the
//! clients still using a key that is being rotated out are told when it stops.
//!
//! # Example
//!
//! ```
//! use std::{convert::Infallible, time::{Duration, SystemTime}};
//!
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_api_key::{ApiKey, ApiKeyLayer, KeySet};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let soon = SystemTime::now() + Duration::from_secs(3600);
//! let layer = ApiKeyLayer::new(KeySet::from_keys([
//!     ApiKey::new("old", "k-old").with_expires_at(soon),
//!     ApiKey::new("new", "k-new"),
//! ])?)
//! .deprecation_headers(true);
//! let svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
//!
//! let old = svc.clone().oneshot(Request::get("/").header("x-api-key", "k-old").body(())?).await?;
//! assert!(old.headers().contains_key("sunset") && old.headers().contains_key("deprecation"));
//! let new = svc.oneshot(Request::get("/").header("x-api-key", "k-new").body(())?).await?;
//! assert!(!new.headers().contains_key("sunset"));
//! # Ok(()) }
//! ```

use http::{HeaderValue, Response};

use crate::clock;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Sunset {
    /// `expires_at`, Unix milliseconds.
    expires_at: u64,
    /// When the key entered its expiry notice, Unix milliseconds.
    deprecated_at: u64,
}

impl Sunset {
    /// The headers for a key expiring at `expires_at`, if that is within `notice` of
    /// `now` (all in milliseconds).
    /// An expiry past year 9999, which no HTTP date can write, gets none.
    pub(crate) fn within(expires_at: u64, notice: u64, now: u64) -> Option<Self> {
        let writable = expires_at <= clock::LAST_RFC3339_MS;
        (writable && now.saturating_add(notice) >= expires_at).then(|| Self {
            expires_at,
            deprecated_at: expires_at.saturating_sub(notice),
        })
    }

    /// Adds the pair to `res`, unless the handler set either: the two go together
    /// (RFC 9745 wants a `Sunset` no earlier than the `Deprecation` beside it), and
    /// the handler's say about its own endpoint outranks the key's.
    pub(crate) fn apply<B>(self, res: &mut Response<B>) {
        let headers = res.headers_mut();
        if headers.contains_key("deprecation") || headers.contains_key("sunset") {
            return;
        }
        if let Ok(v) = HeaderValue::from_str(&format!("@{}", self.deprecated_at / 1000)) {
            headers.insert("deprecation", v);
        }
        let date = clock::http_date(clock::from_unix_ms(self.expires_at / 1000 * 1000));
        if let Ok(v) = HeaderValue::from_str(&date) {
            headers.insert("sunset", v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_within_the_notice_only() {
        let day = 86_400_000;
        let expires = 1_796_083_200_000; // 2026-12-01T00:00:00Z
        assert!(Sunset::within(expires, day, expires - 2 * day).is_none());
        assert!(Sunset::within(u64::MAX, day, 0).is_none());
        let mut res = Response::new(());
        Sunset::within(expires, day, expires - day / 2)
            .unwrap()
            .apply(&mut res);
        assert_eq!(res.headers()["sunset"], "Tue, 01 Dec 2026 00:00:00 GMT");
        assert_eq!(res.headers()["deprecation"], "@1795996800");
    }

    #[test]
    fn an_expiry_past_year_9999_gets_no_headers_and_no_panic() {
        let last = clock::LAST_RFC3339_MS;
        // Within any notice, even one of `Duration::MAX`.
        for expires in [last + 1, last + 1000, u64::MAX - 1] {
            assert!(Sunset::within(expires, u64::MAX, expires - 1).is_none());
        }
        let mut res = Response::new(());
        Sunset::within(last, u64::MAX, 0).unwrap().apply(&mut res);
        assert_eq!(res.headers()["sunset"], "Fri, 31 Dec 9999 23:59:59 GMT");
    }
}
