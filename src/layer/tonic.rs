//! The tonic glue (feature `tonic`): a service wrapped by the layer keeps its gRPC
//! name ([`NamedService`](tonic::server::NamedService)), so a scope can guard one
//! service of a server while others (health checks) stay open. A gRPC call (HTTP/2
//! with a `application/grpc` content type) is refused with a gRPC status:
//! `UNAUTHENTICATED`, or `PERMISSION_DENIED` for a missing scope.
//!
//! # Example
//!
//! ```
//! use http::{Request, Version};
//! use tonic::server::NamedService;
//! use tower::{Layer, ServiceExt};
//! use tower_api_key::{ApiKey, ApiKeyLayer, KeySet};
//!
//! fn name_of<S: NamedService>(_: &S) -> &'static str {
//!     S::NAME
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = ApiKeyLayer::new(KeySet::from_keys([ApiKey::new("ci", "k-ci")])?);
//! let (_reporter, health) = tonic_health::server::health_reporter();
//! let guarded = keys.layer(health);
//! // Still the service tonic routes `/grpc.health.v1.Health/*` to.
//! assert_eq!(name_of(&guarded), "grpc.health.v1.Health");
//!
//! // A call without a key gets a gRPC status, not an HTTP 401 a gRPC client cannot read.
//! let call = Request::post("/grpc.health.v1.Health/Check")
//!     .version(Version::HTTP_2)
//!     .header("content-type", "application/grpc")
//!     .body(tonic::body::Body::empty())?;
//! let res = guarded.oneshot(call).await?;
//! let status = tonic::Status::from_header_map(res.headers()).ok_or("no grpc-status")?;
//! assert_eq!(status.code(), tonic::Code::Unauthenticated);
//! # Ok(()) }
//! ```

use crate::ApiKeyService;

/// With the `tonic` feature, a service wrapped by the layer keeps its gRPC name, so
/// it can be added to a tonic server on its own: a scope for one service, and other
/// services (the `grpc.health.v1` health checks Kubernetes probes call) left open.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tonic_health::server::health_reporter;
/// use tower::Layer as _;
/// use tower_api_key::{ApiKeyLayer, EnvSource};
///
/// let keys = ApiKeyLayer::try_new(EnvSource::new("API_KEYS"))?;
/// let (_reporter, health) = health_reporter();
/// # let my_service = health.clone();
/// tonic::transport::Server::builder()
///     .add_service(health)                                    // open to probes
///     .add_service(keys.require_scope("admin").layer(my_service)) // guarded
///     .serve("127.0.0.1:50051".parse()?)
///     .await?;
/// # Ok(()) }
/// ```
impl<S: tonic::server::NamedService, R> tonic::server::NamedService for ApiKeyService<S, R> {
    const NAME: &'static str = S::NAME;
}

impl<C> crate::FromRejectionBody<C> for tonic::body::Body
where
    C: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn from_rejection_body(body: C) -> Self {
        Self::new(body)
    }
}
