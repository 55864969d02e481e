//! Middleware that lets a request through only with a valid API key.
//!
//! [`ApiKeyLayer`] wraps a service in an [`ApiKeyService`]: a request is checked against
//! the layer's [`KeyStore`] before the inner service runs, synchronously in `call`,
//! with one lock-free load of the store and one lookup by the key's SHA-256 digest. An
//! accepted request reaches the inner service with the key's [`KeyInfo`](crate::KeyInfo)
//! in its extensions; a refused one never does, and is answered by the layer with a
//! 401 or 403 (an HTTP challenge, or a gRPC status for gRPC calls) that carries the
//! [`Rejection`] in its extensions. [`ResponseFuture`] is the inner service's future,
//! or the ready refusal.
//!
//! - [`extract`]: where a key is read from ([`KeyLocation`]);
//! - [`rejection`]: why a request is refused and the response for it;
//! - `sunset`: the `Sunset`/`Deprecation` headers of a key close to its expiry;
//! - `axum`, `tonic`: the glue for each framework (features of the same names).
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
//! let layer = ApiKeyLayer::new(KeySet::from_keys([
//!     ApiKey::new("reader", "k-read").with_scopes(["read"]),
//! ])?);
//! let handler = |_req: Request<String>| async { Ok::<_, Infallible>(Response::new(String::new())) };
//! let open = ServiceBuilder::new().layer(layer.clone()).service_fn(handler);
//! let admin = ServiceBuilder::new().layer(layer.require_scope("admin")).service_fn(handler);
//!
//! let req = || Request::get("/").header("x-api-key", "k-read").body(String::new());
//! assert_eq!(open.oneshot(req()?).await?.status(), StatusCode::OK);
//! let refused = admin.oneshot(req()?).await?;
//! assert_eq!(refused.status(), StatusCode::FORBIDDEN);
//! assert!(matches!(
//!     refused.extensions().get::<Rejection>(),
//!     Some(Rejection::InsufficientScope { .. })
//! ));
//! # Ok(()) }
//! ```

#[cfg(feature = "axum")]
mod axum;
mod client_ip;
pub(crate) mod extract;
mod future;
pub(crate) mod ratelimit;
pub(crate) mod rejection;
mod service;
pub(crate) mod sunset;
#[cfg(feature = "tonic")]
mod tonic;

#[cfg(feature = "axum")]
pub use self::axum::MissingKeyInfo;
pub use self::{
    client_ip::ClientIp,
    extract::KeyLocation,
    future::ResponseFuture,
    rejection::{DefaultRejection, FromRejectionBody, Rejection, RejectionResponse},
    service::ApiKeyService,
};

use std::{fmt, sync::Arc};

use http::HeaderName;
use tower_layer::Layer;

use crate::{Error, KeySource, KeyStore};

/// Layer that applies [`ApiKeyService`], which lets a request through only with a
/// valid API key.
///
/// One layer value (or its clones) guards any number of services, axum routers and
/// tonic servers alike, all sharing one [`KeyStore`].
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
///
/// use http::{Request, Response, StatusCode};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_api_key::{ApiKey, ApiKeyLayer, KeyInfo, KeySet};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let keys = KeySet::from_keys([ApiKey::new("ci", "s3cr3t")])?;
/// let svc = ServiceBuilder::new()
///     .layer(ApiKeyLayer::new(keys))
///     .service_fn(|req: Request<String>| async move {
///         let key = req.extensions().get::<KeyInfo>().expect("set by the layer");
///         Ok::<_, Infallible>(Response::new(format!("hello, {}", key.id())))
///     });
///
/// let ok = svc.clone()
///     .oneshot(Request::get("/").header("x-api-key", "s3cr3t").body(String::new())?)
///     .await?;
/// assert_eq!(ok.into_body(), "hello, ci");
///
/// let refused = svc
///     .oneshot(Request::get("/").header("authorization", "Bearer wrong").body(String::new())?)
///     .await?;
/// assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
/// # Ok(()) }
/// ```
#[must_use]
pub struct ApiKeyLayer<R = DefaultRejection> {
    state: Arc<State<R>>,
}

/// Everything a layer and its services share, behind one reference count: axum clones
/// the service for every request, so this is one atomic increment, not four.
#[derive(Clone)]
pub(crate) struct State<R> {
    pub(crate) store: KeyStore,
    pub(crate) config: Config,
    pub(crate) on_rejection: R,
}

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) locations: Box<[KeyLocation]>,
    pub(crate) hide_credentials: bool,
    pub(crate) required_scope: Option<Arc<str>>,
    pub(crate) require_checksum: bool,
    pub(crate) deprecation_headers: bool,
    pub(crate) track_usage: bool,
    pub(crate) optional: bool,
    pub(crate) allow_preflight: bool,
    pub(crate) per_key_metrics: bool,
    pub(crate) client_ip: ClientIp,
    pub(crate) rate_limit_headers: bool,
}

impl ApiKeyLayer {
    /// A layer over a new store fed by `source`.
    ///
    /// Returns after the source's initial load, so the first request already sees its
    /// keys. If that load fails, the error is logged (at `warn`) and recorded in
    /// [`KeyStore::last_reload`], and the layer fails closed: it refuses every request
    /// until the source delivers a valid set. Use [`ApiKeyLayer::try_new`] to refuse to
    /// start instead.
    ///
    /// The built-in sources need no async runtime (the file watcher runs on its own
    /// thread). A source that spawns tasks, as a user-written one may, must be added
    /// from inside a Tokio runtime, for instance in `#[tokio::main]` before the server
    /// starts.
    pub fn new(source: impl KeySource) -> Self {
        let store = KeyStore::new();
        // A failure is already logged and recorded by the store; the empty store
        // refuses every request.
        let _ = store.add_source(source);
        Self::from_store(store)
    }

    /// Like [`ApiKeyLayer::new`], but returns the initial load's error, for services
    /// that would rather not start without their keys.
    ///
    /// # Errors
    ///
    /// The source's initial load failed (a missing or invalid key file, an unset
    /// environment variable, ...).
    pub fn try_new(source: impl KeySource) -> Result<Self, Error> {
        let store = KeyStore::new();
        store.add_source(source)?;
        Ok(Self::from_store(store))
    }

    /// A layer over an existing store, which may be fed by several sources.
    pub fn from_store(store: KeyStore) -> Self {
        Self {
            state: Arc::new(State {
                store,
                config: Config {
                    locations: extract::default_locations().into(),
                    hide_credentials: false,
                    required_scope: None,
                    require_checksum: false,
                    deprecation_headers: false,
                    track_usage: true,
                    optional: false,
                    allow_preflight: false,
                    per_key_metrics: false,
                    client_ip: ClientIp::peer(),
                    rate_limit_headers: true,
                },
                on_rejection: DefaultRejection::default(),
            }),
        }
    }

    /// Sets the `realm` of the `WWW-Authenticate` challenge (default `"api"`).
    pub fn with_realm(mut self, realm: impl Into<Arc<str>>) -> Self {
        Arc::make_mut(&mut self.state).on_rejection = DefaultRejection::new(realm);
        self
    }
}

impl<R: Clone> ApiKeyLayer<R> {
    /// The store this layer checks keys against: shared by every clone of the layer
    /// and every service it builds.
    pub fn store(&self) -> &KeyStore {
        &self.state.store
    }

    /// Reads the key only from these locations, in this order.
    pub fn with_key_locations(mut self, locations: impl IntoIterator<Item = KeyLocation>) -> Self {
        self.config_mut().locations = locations.into_iter().collect();
        self
    }

    /// Reads the key only from `Authorization: Bearer <key>`.
    pub fn bearer_only(self) -> Self {
        self.with_key_locations([KeyLocation::Bearer])
    }

    /// Reads the key only from the header `name` (e.g. `"x-api-key"`, any case, or a
    /// [`HeaderName`]).
    ///
    /// # Panics
    ///
    /// If `name` is not a valid header name, as [`HeaderName::from_static`] does: it
    /// is a constant of the program, not input.
    pub fn header_only(self, name: impl AsRef<str>) -> Self {
        let name = HeaderName::try_from(name.as_ref()).expect("a valid header name");
        self.with_key_locations([KeyLocation::Header(name)])
    }

    /// Removes the credential headers before the inner service sees the request, so a
    /// handler cannot log a key by accident (Kong's and Envoy's `hide_credentials`).
    pub fn hide_credentials(mut self, hide: bool) -> Self {
        self.config_mut().hide_credentials = hide;
        self
    }

    /// Refuses keys without a valid [`generate`](crate::key::generate)d checksum before any
    /// lookup ([`Rejection::InvalidChecksum`](crate::Rejection::InvalidChecksum)). Turn it on only once every key in use
    /// was made by [`generate`](crate::key::generate).
    pub fn require_checksum(mut self, require: bool) -> Self {
        self.config_mut().require_checksum = require;
        self
    }

    /// Announces a key's coming expiry to the client using it: responses to requests
    /// made with a key whose `expires_at` is within the store's
    /// [expiry notice](KeyStore::set_expiry_notice) carry `Sunset: <expires_at>`
    /// (RFC 8594) and `Deprecation: @<start of the notice>` (RFC 9745). A response
    /// whose handler set either (an endpoint's retirement, say) gets neither from
    /// the key: the handler's is kept, and the pair stays consistent.
    pub fn deprecation_headers(mut self, enabled: bool) -> Self {
        self.config_mut().deprecation_headers = enabled;
        self
    }

    /// Lets a request that presents **no** key through, without a
    /// [`KeyInfo`](crate::KeyInfo) (default `false`): handlers take
    /// `Option<KeyInfo>` and serve anonymous callers less. A request with a key that
    /// is wrong, disabled, expired, malformed or lacks a required scope is still
    /// refused.
    ///
    /// # Example
    ///
    /// ```
    /// use http::Request;
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_api_key::{ApiKey, ApiKeyLayer, KeyInfo, KeySet};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let layer = ApiKeyLayer::new(KeySet::from_keys([ApiKey::new("ci", "s3cr3t")])?).optional(true);
    /// let svc = ServiceBuilder::new().layer(layer).service_fn(|req: Request<String>| async move {
    ///     let who = req.extensions().get::<KeyInfo>().map_or("anonymous".into(), |k| k.id().to_owned());
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(who))
    /// });
    /// let anonymous = svc.clone().oneshot(Request::new(String::new())).await?;
    /// assert_eq!(anonymous.into_body(), "anonymous");
    /// let wrong = Request::get("/").header("x-api-key", "guess").body(String::new())?;
    /// assert_eq!(svc.oneshot(wrong).await?.status(), 401);
    /// # Ok(()) }
    /// ```
    pub fn optional(mut self, optional: bool) -> Self {
        self.config_mut().optional = optional;
        self
    }

    /// Lets CORS preflight requests through without a key (default `false`): an
    /// `OPTIONS` request with an `Access-Control-Request-Method` header, which
    /// browsers send without credentials. Put a CORS layer inside this one to answer
    /// them.
    pub fn allow_preflight(mut self, allow: bool) -> Self {
        self.config_mut().allow_preflight = allow;
        self
    }

    /// Whether requests let in through this layer are also counted per key id, as
    /// `tower_api_key_key_requests_total{key_id}`, with the `metrics` feature (default
    /// `false`: a million keys must not become a million series unasked). The other
    /// metrics (`tower_api_key_requests_total{outcome, reason}`, reloads, keys per
    /// source) are always recorded with the feature.
    pub fn per_key_metrics(mut self, enabled: bool) -> Self {
        self.config_mut().per_key_metrics = enabled;
        self
    }

    /// Where the client's address is read from, for keys with `allowed_ips`
    /// (default [`ClientIp::peer`]: the connection's peer).
    ///
    /// # Example
    ///
    /// ```
    /// use tower_api_key::{ApiKeyLayer, ClientIp, KeySet};
    ///
    /// // Behind a load balancer in 10.0.0.0/8 that appends to X-Forwarded-For.
    /// let layer = ApiKeyLayer::new(KeySet::new())
    ///     .client_ip(ClientIp::x_forwarded_for(["10.0.0.0/8".parse()?]));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn client_ip(mut self, client_ip: ClientIp) -> Self {
        self.config_mut().client_ip = client_ip;
        self
    }

    /// Whether responses to requests let in with a key that has rate limits or a
    /// quota carry the `RateLimit-Policy` and `RateLimit` header fields (default
    /// `true`). Refusals for a limit always carry them.
    pub fn rate_limit_headers(mut self, enabled: bool) -> Self {
        self.config_mut().rate_limit_headers = enabled;
        self
    }

    /// Whether requests let in through this layer count in [`KeyStore::usage`]
    /// (default `true`).
    pub fn track_usage(mut self, track: bool) -> Self {
        self.config_mut().track_usage = track;
        self
    }

    /// A layer over the **same store** that also demands `scope`: a valid key without
    /// it gets 403 `insufficient_scope` (gRPC `PERMISSION_DENIED`).
    ///
    /// It may sit inside another layer over the same store (a global `.layer(keys)`
    /// and a route's `.route_layer(keys.require_scope("admin"))`): it then checks the
    /// scope on the [`KeyInfo`](crate::KeyInfo) the outer layer put in the request,
    /// without hashing the key or counting the request a second time. A `KeyInfo` from
    /// another store counts for nothing: the key is checked afresh.
    ///
    /// # Example
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use tower_api_key::{ApiKey, ApiKeyLayer, KeySet};
    ///
    /// let keys = ApiKeyLayer::new(KeySet::from_keys([
    ///     ApiKey::new("ops", "k-ops").with_scopes(["admin"]),
    /// ])?);
    /// let app: Router = Router::new()
    ///     .route("/admin", get(|| async { "admin" }))
    ///     .route_layer(keys.require_scope("admin")) // checks the scope only
    ///     .route("/", get(|| async { "hello" }))
    ///     .layer(keys); // every route: checks and counts the key once
    /// # Ok::<(), tower_api_key::Error>(())
    /// ```
    pub fn require_scope(&self, scope: impl Into<Arc<str>>) -> Self {
        let mut layer = self.clone();
        layer.config_mut().required_scope = Some(scope.into());
        layer
    }

    fn config_mut(&mut self) -> &mut Config {
        &mut Arc::make_mut(&mut self.state).config
    }

    /// Answers refused plain-HTTP requests with `on_rejection`'s response, e.g. a JSON
    /// body for axum. gRPC requests still get a gRPC status.
    ///
    /// # Example
    ///
    /// ```
    /// use http::{Response, StatusCode};
    /// use tower_api_key::{ApiKeyLayer, KeySet, Rejection};
    ///
    /// let layer = ApiKeyLayer::new(KeySet::new()).with_rejection(|r: &Rejection| {
    ///     let mut res = Response::new(format!(r#"{{"error":"{r}"}}"#));
    ///     *res.status_mut() = r.status();
    ///     res
    /// });
    /// ```
    pub fn with_rejection<R2>(self, on_rejection: R2) -> ApiKeyLayer<R2> {
        ApiKeyLayer {
            state: Arc::new(State {
                store: self.state.store.clone(),
                config: self.state.config.clone(),
                on_rejection,
            }),
        }
    }
}

impl<S, R> Layer<S> for ApiKeyLayer<R> {
    type Service = ApiKeyService<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiKeyService::new(inner, self.state.clone())
    }
}

impl<R> Clone for ApiKeyLayer<R> {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
        }
    }
}

impl<R> fmt::Debug for ApiKeyLayer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyLayer")
            .field("store", &self.state.store)
            .field("config", &self.state.config)
            .finish_non_exhaustive()
    }
}
