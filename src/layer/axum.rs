//! The axum glue (feature `axum`): [`KeyInfo`] as an extractor, [`Rejection`](crate::Rejection) as a
//! response, and custom refusals with any body an axum router takes.
//!
//! # Example
//!
//! ```
//! use axum::{Router, body::Body, routing::get};
//! use http::{Request, StatusCode};
//! use tower::ServiceExt as _;
//! use tower_api_key::{ApiKey, ApiKeyLayer, KeyInfo, KeySet};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = ApiKeyLayer::new(KeySet::from_keys([ApiKey::new("ci", "k-1")])?);
//! let app: Router = Router::new()
//!     .route("/", get(|key: KeyInfo| async move { format!("hello, {}", key.id()) }))
//!     .route_layer(keys);
//!
//! let res = app.clone().oneshot(Request::get("/").header("x-api-key", "k-1").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! // route_layer: an unknown path stays 404, whatever the key.
//! let res = app.oneshot(Request::get("/nope").body(Body::empty())?).await?;
//! assert_eq!(res.status(), StatusCode::NOT_FOUND);
//! # Ok(()) }
//! ```

use axum_core::{
    extract::{FromRequestParts, OptionalFromRequestParts},
    response::{IntoResponse, Response},
};
use http::{StatusCode, request::Parts};

use crate::KeyInfo;

/// With the `axum` feature, [`KeyInfo`] is an extractor: the key the request was let
/// in with.
///
/// If no [`ApiKeyLayer`](crate::ApiKeyLayer) ran before the handler, extraction fails
/// with [`MissingKeyInfo`] (a 500: the route is not guarded, which is a server bug).
/// Take `Option<KeyInfo>` on routes where the layer is optional.
///
/// # Example
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_api_key::{ApiKey, ApiKeyLayer, KeyInfo, KeySet};
///
/// async fn whoami(key: KeyInfo) -> String {
///     format!("{} ({})", key.id(), key.tenant().unwrap_or("no tenant"))
/// }
///
/// let keys = KeySet::from_keys([ApiKey::new("ci", "s3cr3t").with_tenant("team-a")])?;
/// let app: Router = Router::new()
///     .route("/whoami", get(whoami))
///     .route_layer(ApiKeyLayer::new(keys));
/// # Ok::<(), tower_api_key::Error>(())
/// ```
impl<S: Send + Sync> FromRequestParts<S> for KeyInfo {
    type Rejection = MissingKeyInfo;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<KeyInfo>()
            .cloned()
            .ok_or(MissingKeyInfo)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for KeyInfo {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<KeyInfo>().cloned())
    }
}

/// Rejection of the [`KeyInfo`] extractor when no
/// [`ApiKeyLayer`](crate::ApiKeyLayer) guards the route.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct MissingKeyInfo;

impl std::fmt::Display for MissingKeyInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no KeyInfo in the request: is the route guarded by ApiKeyLayer?")
    }
}

impl std::error::Error for MissingKeyInfo {}

impl IntoResponse for MissingKeyInfo {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

/// With the `axum` feature, a [`Rejection`](crate::Rejection) is a response: the
/// layer's default HTTP refusal (401 or 403 with a `WWW-Authenticate: Bearer`
/// challenge, realm `api`), with the rejection in its extensions. Handy in a custom
/// refusal that adds a body, or in a handler that checks a key itself with
/// [`KeyStore::verify`](crate::KeyStore::verify).
///
/// ```
/// use axum::response::IntoResponse;
/// use tower_api_key::{KeyStore, Rejection};
///
/// let store = KeyStore::new();
/// let res = match store.verify("guess") {
///     Ok(key) => key.id().to_owned().into_response(),
///     Err(rejection) => rejection.into_response(),
/// };
/// assert_eq!(res.status(), 401);
/// assert!(res.headers().contains_key("www-authenticate"));
/// ```
impl IntoResponse for crate::Rejection {
    fn into_response(self) -> Response {
        let mut res: Response = self.http_response("api");
        res.extensions_mut().insert(self);
        res
    }
}

impl<C> crate::FromRejectionBody<C> for axum_core::body::Body
where
    C: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn from_rejection_body(body: C) -> Self {
        Self::new(body)
    }
}
