//! Why a request is refused ([`Rejection`]) and the response for it: an RFC 6750
//! `WWW-Authenticate: Bearer` challenge over HTTP, a trailers-only gRPC status for gRPC
//! calls, or a response of your own ([`RejectionResponse`], with
//! [`ApiKeyLayer::with_rejection`](crate::ApiKeyLayer::with_rejection)).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//!
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_api_key::{ApiKey, ApiKeyLayer, KeySet, Rejection};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = ApiKeyLayer::new(KeySet::from_keys([ApiKey::new("ci", "k-1")])?)
//!     .with_rejection(|rejection: &Rejection| {
//!         let mut res = Response::new(format!("{{\"error\":\"{}\"}}", rejection.reason()));
//!         *res.status_mut() = rejection.status();
//!         res
//!     });
//! let svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|_req: Request<String>| async { Ok::<_, Infallible>(Response::new(String::new())) });
//!
//! let res = svc.oneshot(Request::get("/").header("x-api-key", "guess").body(String::new())?).await?;
//! assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(res.into_body(), r#"{"error":"unknown"}"#);
//! # Ok(()) }
//! ```

use std::{
    fmt,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::{
    KeyInfo,
    limit::{LimitKind, state::Refusal},
};

/// Why [`ApiKeyService`](crate::ApiKeyService) refused a request.
///
/// It is inserted into the extensions of every refusal response, so an outer logging or
/// metrics layer can tell the reasons apart. Variants where a key matched carry its
/// [`KeyInfo`] (never the key itself).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Rejection {
    /// The request carries no API key.
    Missing,
    /// A credential header is present but unusable (`Authorization: Bearer` with no
    /// token, an empty key header).
    Malformed,
    /// The request carries two different keys.
    Conflicting,
    /// The key is not in the store (never issued, or revoked).
    Unknown,
    /// The key's checksum is wrong (see
    /// [`ApiKeyLayer::require_checksum`](crate::ApiKeyLayer::require_checksum)).
    InvalidChecksum,
    /// The key is listed but disabled.
    Disabled(KeyInfo),
    /// The key's `expires_at` has passed.
    Expired(KeyInfo),
    /// The key's `not_before` has not come yet.
    NotYetValid(KeyInfo),
    /// The key is valid but lacks the scope this route requires.
    InsufficientScope {
        /// The key.
        key: KeyInfo,
        /// The scope required.
        scope: Arc<str>,
    },
    /// The key is over one of its rate limits: `429 Too Many Requests` with
    /// `Retry-After`, gRPC `RESOURCE_EXHAUSTED`.
    RateLimited {
        /// The key.
        key: KeyInfo,
        /// The name of the limit (the one that lets the request in last, when
        /// several refuse it).
        limit: Arc<str>,
        /// Exactly how long until the key's limits let a request in, from the
        /// limiter's schedule (`Retry-After` rounds it up to whole seconds).
        retry_after: Duration,
    },
    /// The key has used its quota for this period: `429` with `Retry-After` set to
    /// the start of the next period, gRPC `RESOURCE_EXHAUSTED`. For a key whose
    /// quota a fleet shares, also this replica's share of it spent while the fleet
    /// has quota left: then `Retry-After` is a second away, when the next share is.
    QuotaExceeded {
        /// The key.
        key: KeyInfo,
        /// When to try again: the start of the next period (UTC midnight, or the
        /// first of a month), or, for a fleet's spent share, a second from now.
        resets_at: SystemTime,
    },
    /// The key has `allowed_ips` and the client's address is not in them, or is
    /// unknown: `403`, gRPC `PERMISSION_DENIED`.
    AddressNotAllowed {
        /// The key.
        key: KeyInfo,
        /// The client's address as the layer's
        /// [`ClientIp`](crate::ClientIp) read it, if it could.
        address: Option<IpAddr>,
    },
}

impl Rejection {
    /// The key that matched, for refusals of a known key.
    pub fn key(&self) -> Option<&KeyInfo> {
        match self {
            Self::Disabled(key)
            | Self::Expired(key)
            | Self::NotYetValid(key)
            | Self::InsufficientScope { key, .. }
            | Self::RateLimited { key, .. }
            | Self::QuotaExceeded { key, .. }
            | Self::AddressNotAllowed { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The refusal of `key` by its limiter.
    pub(crate) fn limited(key: KeyInfo, refusal: Refusal) -> Self {
        match refusal {
            Refusal::Rate { name, wait } => Self::RateLimited {
                key,
                limit: name,
                retry_after: wait,
            },
            Refusal::Quota { next } => Self::QuotaExceeded {
                key,
                resets_at: crate::clock::from_unix_ms(next),
            },
        }
    }

    /// The HTTP status for this refusal: 403 for a missing scope or an address not
    /// allowed, 429 over a rate limit or the quota, else 401.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InsufficientScope { .. } | Self::AddressNotAllowed { .. } => {
                StatusCode::FORBIDDEN
            }
            Self::RateLimited { .. } | Self::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The gRPC status code for this refusal: 7 (`PERMISSION_DENIED`) for a missing
    /// scope or an address not allowed, 8 (`RESOURCE_EXHAUSTED`) over a limit, else
    /// 16 (`UNAUTHENTICATED`).
    pub fn grpc_code(&self) -> u8 {
        match self {
            Self::InsufficientScope { .. } | Self::AddressNotAllowed { .. } => 7,
            Self::RateLimited { .. } | Self::QuotaExceeded { .. } => 8,
            _ => 16,
        }
    }

    /// A short, stable name for the reason, for metrics and logs: `missing`,
    /// `malformed`, `conflicting`, `unknown`, `invalid_checksum`, `disabled`,
    /// `expired`, `not_yet_valid`, `insufficient_scope`, `rate_limited`,
    /// `quota_exceeded` or `address_not_allowed`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Conflicting => "conflicting",
            Self::Unknown => "unknown",
            Self::InvalidChecksum => "invalid_checksum",
            Self::Disabled(_) => "disabled",
            Self::Expired(_) => "expired",
            Self::NotYetValid(_) => "not_yet_valid",
            Self::InsufficientScope { .. } => "insufficient_scope",
            Self::RateLimited { .. } => "rate_limited",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::AddressNotAllowed { .. } => "address_not_allowed",
        }
    }

    /// The RFC 6750 `error` code, if any (none when no credential was presented).
    pub fn error_code(&self) -> Option<&'static str> {
        match self {
            Self::Missing
            | Self::RateLimited { .. }
            | Self::QuotaExceeded { .. }
            | Self::AddressNotAllowed { .. } => None,
            Self::Malformed | Self::Conflicting => Some("invalid_request"),
            Self::InsufficientScope { .. } => Some("insufficient_scope"),
            _ => Some("invalid_token"),
        }
    }

    fn message(&self) -> &'static str {
        match self {
            Self::Missing => "API key required",
            Self::Malformed => "malformed API key credential",
            Self::Conflicting => "more than one API key presented",
            Self::Unknown => "invalid API key",
            Self::InvalidChecksum => "malformed API key (bad checksum)",
            Self::Disabled(_) => "API key disabled",
            Self::Expired(_) => "API key expired",
            Self::NotYetValid(_) => "API key not yet valid",
            Self::InsufficientScope { .. } => "API key lacks the required scope",
            Self::RateLimited { .. } => "API key over its rate limit",
            Self::QuotaExceeded { .. } => "API key over its quota",
            Self::AddressNotAllowed { .. } => "API key not allowed from this address",
        }
    }

    /// Whether the refusal is for the key's limits: answered without a challenge,
    /// since the credential itself is fine.
    fn is_limit(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::QuotaExceeded { .. } | Self::AddressNotAllowed { .. }
        )
    }

    /// Sets the header fields of a refusal for a limit: `Retry-After` (whole seconds
    /// over a rate limit, rounded up; over the quota, the next period's date, or
    /// whole seconds when it is less than a minute away, as a fleet's spent share
    /// is) and the key's `RateLimit-Policy` and `RateLimit` fields. Nothing for other
    /// refusals.
    pub(crate) fn limit_headers(&self, headers: &mut HeaderMap) {
        let retry_after = match self {
            Self::RateLimited { retry_after, .. } => {
                let secs = retry_after.as_nanos().div_ceil(1_000_000_000).max(1);
                HeaderValue::from(u64::try_from(secs).unwrap_or(u64::MAX))
            }
            Self::QuotaExceeded { resets_at, .. } => {
                // Soon: whole seconds, which need no clock of the client's to agree.
                let soon = resets_at
                    .duration_since(SystemTime::now())
                    .ok()
                    .filter(|d| *d < Duration::from_secs(60));
                match soon {
                    Some(wait) => HeaderValue::from(
                        u64::try_from(wait.as_millis().div_ceil(1_000))
                            .unwrap_or(60)
                            .max(1),
                    ),
                    None => match HeaderValue::from_str(&crate::clock::http_date(*resets_at)) {
                        Ok(value) => value,
                        Err(_) => return,
                    },
                }
            }
            _ => return,
        };
        headers.insert(header::RETRY_AFTER, retry_after);
        let Some(key) = self.key() else { return };
        let mut limits = key.limits();
        // The limit that refused has nothing left for this request, whatever the
        // replica's own count says: in a fleet, the refusal can be the fleet's (this
        // replica's share of it spent) while the replica alone has let in fewer.
        let (kind, name, wait) = match self {
            Self::RateLimited {
                limit, retry_after, ..
            } => (LimitKind::Rate, Some(limit), *retry_after),
            Self::QuotaExceeded { resets_at, .. } => (
                LimitKind::Quota,
                None,
                resets_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default(),
            ),
            _ => return,
        };
        for limit in &mut limits {
            if limit.kind == kind && name.is_none_or(|name| limit.name == *name) {
                limit.remaining = 0;
                limit.reset = limit.reset.max(wait);
            }
        }
        if let Some((policy, state)) = crate::layer::ratelimit::fields(&limits) {
            headers.insert(crate::layer::ratelimit::POLICY, policy);
            headers.insert(crate::layer::ratelimit::STATE, state);
        }
    }

    /// The plain HTTP refusal: 401 or 403, an empty body, and a `WWW-Authenticate:
    /// Bearer` challenge with `realm` and the RFC 6750 `error` (and `scope`).
    ///
    /// # Example
    ///
    /// ```
    /// use tower_api_key::Rejection;
    ///
    /// let res: http::Response<String> = Rejection::Unknown.http_response("api");
    /// assert_eq!(res.status(), 401);
    /// assert_eq!(
    ///     res.headers()["www-authenticate"],
    ///     r#"Bearer realm="api", error="invalid_token", error_description="invalid API key""#
    /// );
    /// ```
    pub fn http_response<B: Default>(&self, realm: &str) -> Response<B> {
        self.respond(self.challenge(realm))
    }

    fn respond<B: Default>(&self, challenge: Option<HeaderValue>) -> Response<B> {
        let mut res = Response::new(B::default());
        *res.status_mut() = self.status();
        if self.is_limit() {
            self.limit_headers(res.headers_mut());
            return res;
        }
        if let Some(challenge) = challenge {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        res
    }

    /// The `WWW-Authenticate` value for this refusal.
    fn challenge(&self, realm: &str) -> Option<HeaderValue> {
        if self.is_limit() {
            return None;
        }
        let mut challenge = format!("Bearer realm=\"{}\"", quoted(realm));
        if let Some(code) = self.error_code() {
            challenge.push_str(&format!(
                ", error=\"{code}\", error_description=\"{}\"",
                self.message()
            ));
        }
        if let Self::InsufficientScope { scope, .. } = self {
            challenge.push_str(&format!(", scope=\"{}\"", quoted(scope)));
        }
        HeaderValue::from_str(&challenge).ok()
    }

    /// Which of [`DefaultRejection`]'s prepared challenges fits, if one does.
    fn prepared_index(&self) -> Option<usize> {
        Some(match self {
            Self::Missing => 0,
            Self::Malformed => 1,
            Self::Conflicting => 2,
            Self::Unknown => 3,
            Self::InvalidChecksum => 4,
            Self::Disabled(_) => 5,
            Self::Expired(_) => 6,
            Self::NotYetValid(_) => 7,
            Self::InsufficientScope { .. }
            | Self::RateLimited { .. }
            | Self::QuotaExceeded { .. }
            | Self::AddressNotAllowed { .. } => return None,
        })
    }

    /// The gRPC refusal: a trailers-only response (HTTP 200, `content-type:
    /// application/grpc`, `grpc-status` 16 or 7, `grpc-message`), which gRPC clients
    /// read as `UNAUTHENTICATED` or `PERMISSION_DENIED`.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_api_key::Rejection;
    ///
    /// let res: http::Response<String> = Rejection::Missing.grpc_response();
    /// assert_eq!(res.status(), 200);
    /// assert_eq!(res.headers()["grpc-status"], "16");
    /// ```
    pub fn grpc_response<B: Default>(&self) -> Response<B> {
        let mut res = Response::new(B::default());
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(
            "grpc-status",
            HeaderValue::from(u16::from(self.grpc_code())),
        );
        // Messages are fixed ASCII without '%', so they need no percent-encoding.
        headers.insert("grpc-message", HeaderValue::from_static(self.message()));
        res
    }
}

/// Escapes a value for an RFC 7235 quoted-string, dropping what a header can't carry.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars().filter(|c| *c == ' ' || c.is_ascii_graphic()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())?;
        match self {
            Self::InsufficientScope { key, scope } => {
                write!(f, " (key `{}`, scope `{scope}`)", key.id())
            }
            // A limit's name is quoted only if it cannot be a secret pasted as one.
            Self::RateLimited { key, limit, .. } if crate::error::may_quote_name(limit) => {
                write!(f, " (key `{}`, limit `{limit}`)", key.id())
            }
            Self::RateLimited { key, .. } => write!(f, " (key `{}`, a rate limit)", key.id()),
            _ => match self.key() {
                Some(key) => write!(f, " (key `{}`)", key.id()),
                None => Ok(()),
            },
        }
    }
}

impl std::error::Error for Rejection {}

/// Builds the response for a refused plain-HTTP request.
///
/// Implemented by [`DefaultRejection`] and by any `Fn(&Rejection) -> Response<B> +
/// Clone`, so [`ApiKeyLayer::with_rejection`](crate::ApiKeyLayer::with_rejection) takes
/// a closure. gRPC requests always get the gRPC refusal
/// ([`Rejection::grpc_response`]), whatever this returns, so one layer can guard both.
pub trait RejectionResponse<B>: Clone {
    /// The response for `rejection`. The layer adds the [`Rejection`] to its extensions.
    fn response(&self, rejection: &Rejection) -> Response<B>;
}

/// The default refusal: [`Rejection::http_response`] with the configured realm.
///
/// The challenges are prepared once, so a refusal (say, a flood of unknown keys)
/// formats nothing.
#[derive(Clone, Debug)]
pub struct DefaultRejection {
    realm: Arc<str>,
    prepared: Arc<[Option<HeaderValue>]>,
}

impl DefaultRejection {
    pub(crate) fn new(realm: impl Into<Arc<str>>) -> Self {
        let realm = realm.into();
        let kinds = [
            Rejection::Missing,
            Rejection::Malformed,
            Rejection::Conflicting,
            Rejection::Unknown,
            Rejection::InvalidChecksum,
        ];
        let mut prepared: Vec<_> = kinds.iter().map(|r| r.challenge(&realm)).collect();
        // Disabled, Expired and NotYetValid carry a key; their challenge does not
        // depend on it, so any key-less refusal with the same code stands in.
        for message in [
            "API key disabled",
            "API key expired",
            "API key not yet valid",
        ] {
            let value = format!(
                "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{message}\"",
                quoted(&realm)
            );
            prepared.push(HeaderValue::from_str(&value).ok());
        }
        Self {
            realm,
            prepared: prepared.into(),
        }
    }
}

impl Default for DefaultRejection {
    fn default() -> Self {
        Self::new("api")
    }
}

impl<B: Default> RejectionResponse<B> for DefaultRejection {
    fn response(&self, rejection: &Rejection) -> Response<B> {
        let challenge = match rejection.prepared_index() {
            Some(i) => self.prepared.get(i).cloned().flatten(),
            None => rejection.challenge(&self.realm),
        };
        rejection.respond(challenge)
    }
}

/// A closure makes the refusal, with a body of its own type `C`, which becomes the
/// service's body type `B` through [`FromRejectionBody`]: one layer value with a
/// custom refusal fits an axum router and a tonic server alike.
impl<F, B, C> RejectionResponse<B> for F
where
    F: Fn(&Rejection) -> Response<C> + Clone,
    B: FromRejectionBody<C>,
{
    fn response(&self, rejection: &Rejection) -> Response<B> {
        self(rejection).map(B::from_rejection_body)
    }
}

/// A response body type that a custom refusal's body (of type `C`) can become: how a
/// refusal written once serves services with different body types.
///
/// Implemented for `String` from `String`; with the `axum` feature, for axum's `Body`
/// from any body (`String`, axum's own `Body`, ...); with the `tonic` feature, for
/// tonic's `Body` likewise. Implement it for your own body type if you have one.
pub trait FromRejectionBody<C>: Sized {
    /// Converts the refusal's body.
    fn from_rejection_body(body: C) -> Self;
}

impl FromRejectionBody<String> for String {
    fn from_rejection_body(body: String) -> Self {
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reviewer's finding: the line logged for every 429 (`reason = %rejection`)
    /// quoted the limit's name as configured, a secret pasted as one included.
    #[test]
    fn a_rate_limited_refusal_names_its_limit_only_when_it_looks_like_a_name() {
        let refusal = |limit: &str| Rejection::RateLimited {
            key: crate::KeyInfo::for_tests("k"),
            limit: Arc::from(limit),
            retry_after: Duration::from_secs(1),
        };
        assert!(refusal("burst").to_string().contains("limit `burst`"));
        let shown = refusal("tak_Live_0123456789").to_string();
        assert!(!shown.contains("tak_Live"), "{shown}");
        assert!(
            shown.contains("key `k`") && shown.contains("a rate limit"),
            "{shown}"
        );
    }

    #[test]
    fn challenge_quotes_realm_and_scope() {
        let res: Response<()> = Rejection::Missing.http_response("my \"realm\"\n");
        assert_eq!(
            res.headers()[header::WWW_AUTHENTICATE],
            r#"Bearer realm="my \"realm\"""#
        );
    }

    #[test]
    fn prepared_challenges_match_the_computed_ones() {
        let key = crate::KeyInfo::for_tests("k");
        let all = [
            Rejection::Missing,
            Rejection::Malformed,
            Rejection::Conflicting,
            Rejection::Unknown,
            Rejection::InvalidChecksum,
            Rejection::Disabled(key.clone()),
            Rejection::Expired(key.clone()),
            Rejection::NotYetValid(key.clone()),
            Rejection::InsufficientScope {
                key,
                scope: "admin".into(),
            },
        ];
        let default = DefaultRejection::new("r\"ealm");
        for rejection in all {
            let prepared: Response<()> = default.response(&rejection);
            let computed: Response<()> = rejection.http_response("r\"ealm");
            assert_eq!(prepared.status(), computed.status(), "{rejection:?}");
            assert_eq!(prepared.headers(), computed.headers(), "{rejection:?}");
        }
    }

    #[test]
    fn a_quota_refusal_says_seconds_when_soon_and_a_date_otherwise() {
        let at = |secs: u64| {
            let rejection = Rejection::QuotaExceeded {
                key: KeyInfo::for_tests("k"),
                resets_at: SystemTime::now() + Duration::from_secs(secs),
            };
            let mut headers = HeaderMap::new();
            rejection.limit_headers(&mut headers);
            headers[header::RETRY_AFTER].to_str().unwrap().to_owned()
        };
        // A fleet's spent share: a second, as a number a client needs no clock for.
        assert!(matches!(at(1).as_str(), "1" | "2"), "{}", at(1));
        // The next period: its date.
        assert!(
            httpdate::parse_http_date(&at(7_200)).is_ok(),
            "{}",
            at(7_200)
        );
    }

    #[test]
    fn grpc_codes() {
        let res: Response<()> = Rejection::Conflicting.grpc_response();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "16");
        assert_eq!(res.headers()["content-type"], "application/grpc");
    }
}
