//! Tower middleware that checks API keys, with keys you can add, rotate and revoke
//! while the server keeps running.
//!
//! [`ApiKeyLayer`] wraps any tower [`Service`](tower_service::Service): an axum
//! `Router`, a tonic `Server`, or your own. A request gets through only with a valid
//! key; the handler then finds the key's [`KeyInfo`] (id, scopes, tenant, owner) in the
//! request extensions. Everything else is refused before your service runs.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//!
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_api_key::{ApiKey, ApiKeyLayer, KeyInfo, KeySet, Rejection};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = KeySet::from_keys([
//!     ApiKey::new("billing-2026-11", "k-7Yp2vQ").with_scopes(["read"]),
//! ])?;
//!
//! let svc = ServiceBuilder::new()
//!     .layer(ApiKeyLayer::new(keys))
//!     .service_fn(|req: Request<String>| async move {
//!         let key = req.extensions().get::<KeyInfo>().expect("set by ApiKeyLayer");
//!         Ok::<_, Infallible>(Response::new(format!("hello, {}", key.id())))
//!     });
//!
//! // Accepted: `Authorization: Bearer <key>` or `X-API-Key: <key>`.
//! let req = Request::get("/").header("authorization", "Bearer k-7Yp2vQ").body(String::new())?;
//! let res = svc.clone().oneshot(req).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(res.into_body(), "hello, billing-2026-11");
//!
//! // Refused: 401 with a challenge, and the reason in the response extensions.
//! let req = Request::get("/").header("x-api-key", "guess").body(String::new())?;
//! let res = svc.oneshot(req).await?;
//! assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
//! assert!(res.headers()["www-authenticate"].to_str()?.contains("invalid_token"));
//! assert!(matches!(res.extensions().get::<Rejection>(), Some(Rejection::Unknown)));
//! # Ok(()) }
//! ```
//!
//! # Key sources
//!
//! Keys live in a [`KeyStore`], fed by one or more [`KeySource`]s:
//!
//! - [`FileSource`] (feature `file`, on by default): a TOML key file, reloaded when it
//!   changes, however it is replaced (in place, renamed over, Kubernetes volumes).
//! - [`EnvSource`]: an environment variable (or the file its `NAME_FILE` names).
//! - [`ChannelSource`]: sets published from your own code.
//! - A [`KeySet`] or `Vec<ApiKey>`: a fixed set.
//! - Your own: implement [`KeySource`] for Vault, a database, a control plane.
//!
//! Several sources can feed one store ([`KeyStore::add_source`], then
//! [`ApiKeyLayer::from_store`]); the layer sees their union, and each [`KeyInfo`] names
//! its [source](KeyInfo::source).
//!
//! # gRPC
//!
//! The same layer value works on `tonic::transport::Server::builder().layer(..)`. gRPC
//! metadata is headers, so clients send `authorization: Bearer <key>` or `x-api-key`.
//! Requests whose `content-type` is `application/grpc…` are refused with a gRPC status,
//! `UNAUTHENTICATED` (or `PERMISSION_DENIED` for a missing scope), which tonic clients
//! see as such. Handlers read `request.extensions().get::<KeyInfo>()`.
//!
//! # Reloading
//!
//! A source publishes a complete key set ([`KeyUpdater::publish`]) or changes by id
//! ([`KeyUpdater::apply`], [`KeyChange`]); the store checks each update whole and
//! swaps it in atomically: a request sees the old keys or the new ones, never a mix,
//! and keys the update does not touch keep their entries and usage counts. A one-key
//! change copies one shard, a small part of the set (some two thousand keys of a
//! million). An update that fails validation (a bad edit of the key file) is
//! refused, logged at `warn`, recorded in [`KeyStore::last_reload`], and the last
//! good keys stay. The layer
//! never fails open: no keys means every request is refused. Wait for updates with
//! [`KeyStore::subscribe`]; every applied update is logged at `info` with the key ids
//! added, changed, removed and kept.
//!
//! # Rotation
//!
//! The dual-key overlap, with a key file:
//!
//! 1. add the new key next to the old one and save: both work;
//! 2. move your clients to the new key;
//! 3. watch the old key go idle in [`KeyStore::usage`] (request counts, last use);
//! 4. remove the old key (or set `disabled = true`, or an `expires_at`).
//!
//! Per-route scopes come from [`ApiKeyLayer::require_scope`], which shares the store.
//!
//! # Secrets
//!
//! Only SHA-256 digests of keys are kept in memory; the key file can hold digests
//! (`sha256 = "…"`) instead of secrets. No `Debug` or `Display` output, log line or
//! error of this crate contains key material; key ids appear everywhere.
//!
//! # Features
//!
//! - `file` (default): [`FileSource`], watched with `notify`.
//! - `tracing` (default): log reloads, refused reloads and refused requests.
//! - `axum`: [`KeyInfo`] as an axum extractor.
//!
#![cfg_attr(feature = "file", doc = "[`FileSource`]: crate::FileSource")]
#![cfg_attr(
    not(feature = "file"),
    doc = "[`FileSource`]: https://docs.rs/tower-api-key/latest/tower_api_key/struct.FileSource.html"
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "admin")]
pub mod admin;
#[cfg(feature = "cli")]
pub mod cli;
mod clock;
mod error;
mod key;
mod layer;
pub mod limit;
mod log;
mod metrics;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
mod source;
mod store;
#[cfg(test)]
mod testing;

pub use crate::{
    error::Error,
    key::{ApiKey, GeneratedKey, KeyInfo, KeySet, generate, has_valid_checksum},
    layer::{
        ApiKeyLayer, ApiKeyService, ClientIp, DefaultRejection, FromRejectionBody, KeyLocation,
        Rejection, RejectionResponse, ResponseFuture,
    },
    source::{ChannelSource, EnvSource, KeyPublisher, KeySource},
    store::{KeyChange, KeyStore, KeyUpdater, KeyUsage, ReloadReport, Reloads},
};

#[cfg(feature = "file")]
pub use crate::source::FileSource;

#[cfg(feature = "axum")]
pub use crate::layer::MissingKeyInfo;

/// The README's Rust examples, compiled as doctests so they cannot rot.
#[cfg(all(doctest, feature = "file"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
