//! [`ApiKeyService`], the middleware [`ApiKeyLayer`](crate::ApiKeyLayer) builds: how
//! one request is checked.
//!
//! `call` reads the key from the request (see `extract`), looks it up in the live key
//! set (one lock-free load, one lookup by the key's digest), checks what the key
//! allows (scope, validity window, allowed addresses, limits), and then either calls
//! the inner service with the key's [`KeyInfo`](crate::KeyInfo) in the request's
//! extensions or answers at once with the refusal. Nothing before the inner service
//! waits on I/O or on other keys' requests: no lock they share, no I/O, no `await`
//! (a key with more than one counting limit takes a short lock of its own).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//!
//! use http::{Request, Response, StatusCode};
//! use tower::{Layer, Service, ServiceExt};
//! use tower_api_key::{ApiKey, ApiKeyLayer, KeyInfo, KeySet};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = ApiKeyLayer::new(KeySet::from_keys([ApiKey::new("ci", "k-ci")])?);
//! let mut svc = layer.layer(tower::service_fn(|req: Request<String>| async move {
//!     // The handler learns which key let the request in.
//!     let id = req.extensions().get::<KeyInfo>().map(|key| key.id().to_owned());
//!     Ok::<_, Infallible>(Response::new(id.unwrap_or_default()))
//! }));
//!
//! let req = Request::get("/").header("authorization", "Bearer k-ci").body(String::new())?;
//! let res = svc.ready().await?.call(req).await?;
//! assert_eq!(res.into_body(), "ci");
//!
//! let res = svc.ready().await?.call(Request::get("/").body(String::new())?).await?;
//! assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
//! # Ok(()) }
//! ```

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Method, Request, Response, Version, header::CONTENT_TYPE};
use tower_service::Service;

use crate::{
    ApiKeyLayer, DefaultRejection, KeyInfo, KeyStore, Rejection, RejectionResponse, ResponseFuture,
    has_valid_checksum, layer::State, layer::extract, layer::future::Extra, layer::sunset::Sunset,
    store::Accepted,
};

/// Middleware that lets a request through only with a valid API key.
///
/// Built by [`ApiKeyLayer`]. On success the key's [`KeyInfo`](crate::KeyInfo) is inserted into the
/// request extensions and the inner service is called. Otherwise the request is
/// answered at once, without calling the inner service, with an `Ok` response: 401 or
/// 403 with a `WWW-Authenticate` challenge for HTTP, `UNAUTHENTICATED` or
/// `PERMISSION_DENIED` for gRPC. The [`Rejection`] is in its extensions.
pub struct ApiKeyService<S, R = DefaultRejection> {
    inner: S,
    state: Arc<State<R>>,
}

impl<S, R> ApiKeyService<S, R> {
    pub(crate) fn new(inner: S, state: Arc<State<R>>) -> Self {
        Self { inner, state }
    }

    /// Returns a new [`Layer`](tower_layer::Layer) over `store`: the same as
    /// [`ApiKeyLayer::from_store`].
    pub fn layer(store: KeyStore) -> ApiKeyLayer {
        ApiKeyLayer::from_store(store)
    }

    /// The store this service checks keys against.
    pub fn store(&self) -> &KeyStore {
        &self.state.store
    }

    /// Gets a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Gets a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    #[inline]
    fn authenticate<B>(&self, req: &Request<B>) -> Result<Accepted, Rejection> {
        let State { store, config, .. } = &*self.state;
        let key = extract::presented_key(req.uri(), req.headers(), &config.locations)?;
        if config.require_checksum && !checksum_holds(&key) {
            return Err(Rejection::InvalidChecksum);
        }
        store.check(
            &key,
            config.required_scope.as_ref(),
            config.track_usage,
            || config.client_ip.resolve(req),
        )
    }
}

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for ApiKeyService<S, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
    R: RejectionResponse<ResBody>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    // Out of line on purpose: inlined into its caller (as the compiler chose once the
    // rare paths below left its body), a request took 17 ns longer in the paired
    // harness of benches/README.md, 172 against 156-159 ns over the floor.
    #[inline(never)]
    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &self.state.config;
        if config.allow_preflight && is_preflight(&req) {
            return ResponseFuture::inner(self.inner.call(req));
        }
        // Another layer over the same store already let this request in (a global
        // layer, then a route's `require_scope`, or the same layer applied twice):
        // check the scope on its key, if this layer requires one, without hashing,
        // counting or limiting the request again.
        if let Some(key) = req.extensions().get::<KeyInfo>()
            && self.state.store.owns(key)
        {
            match &config.required_scope {
                Some(scope) if !key.has_scope(scope) => {
                    let rejection = Rejection::InsufficientScope {
                        key: key.clone(),
                        scope: scope.clone(),
                    };
                    return self.refuse(&req, rejection);
                }
                _ => return ResponseFuture::inner(self.inner.call(req)),
            }
        }
        match self.authenticate(&req) {
            Ok(Accepted {
                key,
                expires_at,
                limited,
            }) => {
                let config = &self.state.config;
                if config.hide_credentials {
                    extract::strip(&mut req, &config.locations);
                }
                crate::log::accepted(&key);
                crate::metrics::accepted(&key, config.per_key_metrics);
                let extra = match (expires_at, limited) {
                    (None, false) => None,
                    _ => self.extra(&key, expires_at, limited),
                };
                req.extensions_mut().insert(key);
                ResponseFuture::with(self.inner.call(req), extra)
            }
            Err(Rejection::Missing) if self.state.config.optional => {
                ResponseFuture::inner(self.inner.call(req))
            }
            Err(rejection) => self.refuse(&req, rejection),
        }
    }
}

impl<S, R> ApiKeyService<S, R> {
    /// What the response to a request let in with `key` gets besides the inner
    /// service's answer: the `Sunset` headers of a key that expires within the
    /// notice, the `RateLimit` fields of a key with limits. Out of line, so that a
    /// key with neither does not carry its code.
    #[inline(never)]
    fn extra(&self, key: &KeyInfo, expires_at: Option<u64>, limited: bool) -> Option<Box<Extra>> {
        let config = &self.state.config;
        let sunset = expires_at
            .filter(|_| config.deprecation_headers)
            .and_then(|at| {
                let notice = self.state.store.expiry_notice_ms();
                Sunset::within(at, notice, crate::clock::exact_now_ms())
            });
        let ratelimit = match limited && config.rate_limit_headers {
            true => limit_fields(key),
            false => None,
        };
        (sunset.is_some() || ratelimit.is_some()).then(|| Box::new(Extra { sunset, ratelimit }))
    }

    /// The refusal of `req` for `rejection`: a gRPC status for a real gRPC call, else
    /// the configured HTTP response; the rejection in its extensions. Out of line, so
    /// that a request let in does not carry its code.
    #[cold]
    #[inline(never)]
    fn refuse<ReqBody, ResBody, F, E>(
        &self,
        req: &Request<ReqBody>,
        rejection: Rejection,
    ) -> ResponseFuture<F>
    where
        F: std::future::Future<Output = Result<Response<ResBody>, E>>,
        ResBody: Default,
        R: RejectionResponse<ResBody>,
    {
        crate::log::refused(&rejection);
        crate::metrics::refused(&rejection);
        let mut res = if is_grpc(req) {
            rejection.grpc_response()
        } else {
            let mut res = self.state.on_rejection.response(&rejection);
            // A custom refusal over a limit still says when to come back.
            if !res.headers().contains_key(http::header::RETRY_AFTER) {
                rejection.limit_headers(res.headers_mut());
            }
            res
        };
        res.extensions_mut().insert(rejection);
        ResponseFuture::rejected(Ok(res))
    }
}

/// The `RateLimit` fields for a response to a request let in with `key`.
fn limit_fields(key: &KeyInfo) -> Option<(http::HeaderValue, http::HeaderValue)> {
    let limiter = key.entry().limiter.as_deref()?;
    let now = crate::limit::state::now_ns();
    crate::layer::ratelimit::allowed_fields(limiter, now, crate::clock::coarse_now_ms())
}

/// Whether `key` carries a valid checksum: out of line, as most layers do not ask.
#[inline(never)]
fn checksum_holds(key: &[u8]) -> bool {
    has_valid_checksum(key)
}

/// A CORS preflight: `OPTIONS` with `Access-Control-Request-Method`.
fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Whether `req` is a real gRPC call, which gets a gRPC status rather than the HTTP
/// refusal: HTTP/2, and a content type of exactly `application/grpc` or
/// `application/grpc+<codec>`. A header alone does not decide it: an HTTP/1.1 request
/// claiming `application/grpc` (or `grpc-web`, or `grpcfoo`) is refused over HTTP.
fn is_grpc<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_2
        && req.headers().get(CONTENT_TYPE).is_some_and(|ct| {
            let ct = ct.as_bytes();
            ct == b"application/grpc" || ct.starts_with(b"application/grpc+")
        })
}

impl<S: Clone, R> Clone for ApiKeyService<S, R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            state: self.state.clone(),
        }
    }
}

impl<S: fmt::Debug, R> fmt::Debug for ApiKeyService<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyService")
            .field("inner", &self.inner)
            .field("store", &self.state.store)
            .field("config", &self.state.config)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        future::{Ready, ready},
    };

    use http::{StatusCode, header::ACCESS_CONTROL_REQUEST_METHOD};
    use tower::{Layer as _, ServiceExt as _};

    use super::*;
    use crate::{ApiKey, KeySet};

    fn request(method: Method, version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder().method(method).version(version).uri("/");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap()
    }

    #[test]
    fn a_preflight_is_options_asking_for_a_method() {
        let options = |headers: &[(&str, &str)]| {
            is_preflight(&request(Method::OPTIONS, Version::HTTP_11, headers))
        };
        assert!(options(&[(ACCESS_CONTROL_REQUEST_METHOD.as_str(), "POST")]));
        assert!(!options(&[]), "OPTIONS alone is an ordinary request");
        let get = request(
            Method::GET,
            Version::HTTP_11,
            &[(ACCESS_CONTROL_REQUEST_METHOD.as_str(), "POST")],
        );
        assert!(!is_preflight(&get), "only OPTIONS is a preflight");
    }

    #[test]
    fn only_http_2_with_a_grpc_content_type_is_grpc() {
        let grpc = |version, content_type: &str| {
            is_grpc(&request(
                Method::POST,
                version,
                &[("content-type", content_type)],
            ))
        };
        assert!(grpc(Version::HTTP_2, "application/grpc"));
        assert!(grpc(Version::HTTP_2, "application/grpc+proto"));
        assert!(!grpc(Version::HTTP_2, "application/grpc-web"));
        assert!(!grpc(Version::HTTP_2, "application/grpcfoo"));
        assert!(!grpc(Version::HTTP_2, "application/json"));
        assert!(!grpc(Version::HTTP_11, "application/grpc"));
        assert!(!is_grpc(&request(Method::POST, Version::HTTP_2, &[])));
    }

    /// Answers 200, and says which key the request carried.
    #[derive(Clone)]
    struct Echo;

    impl Service<Request<()>> for Echo {
        type Response = Response<String>;
        type Error = Infallible;
        type Future = Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<()>) -> Self::Future {
            let id = req
                .extensions()
                .get::<KeyInfo>()
                .map_or_else(String::new, |k| k.id().to_owned());
            ready(Ok(Response::new(id)))
        }
    }

    fn store(keys: impl IntoIterator<Item = ApiKey>) -> KeyStore {
        let store = KeyStore::new();
        store.add_source(KeySet::from_keys(keys).unwrap()).unwrap();
        store
    }

    async fn status(
        svc: impl Service<Request<()>, Response = Response<String>, Error = Infallible>,
        key: &str,
    ) -> StatusCode {
        let req = request(
            Method::GET,
            Version::HTTP_11,
            &[("authorization", &format!("Bearer {key}"))],
        );
        svc.oneshot(req).await.unwrap().status()
    }

    #[tokio::test]
    async fn a_scope_check_behind_a_layer_of_the_same_store_neither_hashes_nor_counts_again() {
        let keys = store([
            ApiKey::new("reader", "k-read").with_scopes(["read"]),
            ApiKey::new("writer", "k-write").with_scopes(["read", "write"]),
        ]);
        let outer = ApiKeyLayer::from_store(keys.clone());
        let svc = || outer.layer(outer.require_scope("write").layer(Echo));
        assert_eq!(status(svc(), "k-write").await, StatusCode::OK);
        assert_eq!(status(svc(), "k-read").await, StatusCode::FORBIDDEN);
        assert_eq!(status(svc(), "nope").await, StatusCode::UNAUTHORIZED);
        let requests = |id| keys.usage_of(id).map(|u| u.requests());
        assert_eq!(
            requests("writer"),
            Some(1),
            "counted once, by the outer layer"
        );
        assert_eq!(requests("reader"), Some(1));
    }

    #[tokio::test]
    async fn a_layer_applied_twice_over_one_store_counts_a_request_once() {
        let keys = store([ApiKey::new("reader", "k-read")]);
        let layer = ApiKeyLayer::from_store(keys.clone());
        let svc = layer.layer(layer.layer(Echo));
        assert_eq!(status(svc, "k-read").await, StatusCode::OK);
        assert_eq!(keys.usage_of("reader").map(|u| u.requests()), Some(1));
    }

    #[tokio::test]
    async fn a_key_let_in_by_another_store_is_not_taken_for_one_of_this_store() {
        let other = store([ApiKey::new("other-admin", "k-other").with_scopes(["admin"])]);
        let this = store([ApiKey::new("mine", "k-mine").with_scopes(["admin"])]);
        let inner = ApiKeyLayer::from_store(this.clone()).require_scope("admin");
        let svc = ApiKeyLayer::from_store(other).layer(inner.layer(Echo));
        // The outer layer lets `k-other` in; this store does not hold it.
        assert_eq!(status(svc, "k-other").await, StatusCode::UNAUTHORIZED);
    }
}
