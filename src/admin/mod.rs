//! The key-management HTTP API (feature `admin`): create, list, update, rotate and
//! revoke keys, as an axum router any service mounts.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use tower_api_key::{KeyStore, FileSource, admin::{AdminApi, FileBackend}};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = KeyStore::new();
//! store.add_source(FileSource::new("keys.toml"))?;
//! let my_routes = Router::new().route("/", get(|| async { "hello" }));
//! let api: Router = AdminApi::new(store.clone(), FileBackend::new("keys.toml")).router();
//! let app = my_routes.merge(api); // serves /v1/api-keys…, guarded by keys with scope "admin"
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! # Endpoints
//!
//! - `POST /v1/api-keys`: a new key, its secret (generated in the crate's
//!   [format](crate::key::generate)) returned once as `key`; only its SHA-256 is stored.
//! - `GET /v1/api-keys`: `{"items": [...], "next_cursor": ...}` ordered by id; query
//!   `tenant`, `status`, `limit` (1 to 1000, default 100), `cursor`.
//! - `GET /v1/api-keys/{id}`: one key, with its `ETag`.
//! - `PATCH /v1/api-keys/{id}`: a JSON merge patch of `scopes`, `tenant`, `owner`,
//!   `description`, `not_before`, `expires_at`, `disabled`, `rate_limits`, `quota`,
//!   `allowed_ips`; `If-Match` required.
//! - `POST /v1/api-keys/{id}/rotate`: a successor with the same scopes, tenant, owner,
//!   description, rate limits, quota and address rules (`rotated_from` the old id;
//!   its limits count afresh), its secret returned once; the old key
//!   keeps working for `overlap_seconds` (default a day), never past its own expiry.
//! - `DELETE /v1/api-keys/{id}`: revoked; the next request with it is refused.
//! - `GET /v1/openapi.json` (no key needed): the OpenAPI 3.1 description.
//!
//! Errors are `application/problem+json` (RFC 9457), `type`
//! `urn:tower-api-key:problem:<kind>`. A body that is not JSON is 400 `bad-request`;
//! one with an unknown field, a value of the wrong type, or an object that names a
//! member twice (JSON leaves open which of the two counts) is 422 `validation`.
//!
//! # Rules
//!
//! - When a change returns 2xx, the store the router was built with already enforces
//!   it. If it is written but the store has not applied it within the timeout
//!   (default 5 s), the answer is **202 Accepted** with the same body (a new key's
//!   secret included): the change applies when the store catches up.
//! - 503 `unavailable` means nothing was written: the call may be retried as it is.
//!   412 answers only a call that gave `If-Match`: a change without one that keeps
//!   meeting other writers' changes to the same key is tried again for a bounded
//!   time, then refused with 503 (nothing written).
//!   504 `outcome-unknown` means the backend did not confirm a write that may have
//!   happened: the problem's `key_id` names the key to `GET` before retrying.
//! - Every write (create, update, rotate, delete) follows one rule: the caller must
//!   see the key (its tenant, for a tenant's admin key) and hold every scope it has
//!   or would have. `If-Match` takes `*`, a list, and never matches a weak tag
//!   (RFC 9110 § 13.1.1).
//! - A rotation names the successor after the old key (`billing` → `billing-r2`),
//!   unless the request gives an `id`. An id this API revoked lately (its last
//!   4,096 revocations) is not given to a new key: a derived one skips it, a given
//!   one is refused with 409, so that one id does not name two keys in a row.
//! - Only keys with the admin scope get in. An admin key with a tenant sees and
//!   manages only its tenant's keys and creates keys only in it. No caller can give a
//!   key a scope it lacks itself.
//! - The API manages the keys its backend holds; keys of the store's other sources
//!   are not listed and are 404 to it.
//! - Every change emits a `tracing` event on target `tower_api_key::audit` (action,
//!   key id, the caller's key id, outcome `enforced` or `written`, time), and is
//!   recorded in the key itself (`created_at`, `created_by`, `rotated_from`). A write
//!   refused because of who the caller is (another tenant's key, a scope it lacks) is
//!   an event too, at `warn`, with outcome `refused` and the reason.

mod backend;
mod file;
mod model;
mod patch;
mod path;
mod problem;
mod routes;
mod unique;

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    routing::{any, get, post},
};
use utoipa::OpenApi as _;

use self::problem::Problem;
pub use self::{
    backend::{AdminBackend, BackendError, UsageCounts, record_etag},
    file::FileBackend,
};
use crate::{ApiKey, ApiKeyLayer, KeyInfo, KeyStore, Reloads, key::digest::KeyDigest};

/// The key-management API over `store` and a backend: build it, then mount its
/// [`router`](AdminApi::router).
#[must_use]
pub struct AdminApi<B> {
    store: KeyStore,
    backend: B,
    scope: Arc<str>,
    timeout: Duration,
    client_ip: crate::ClientIp,
}

/// What the handlers share.
pub(crate) struct Inner<B> {
    pub(crate) store: KeyStore,
    pub(crate) backend: B,
    /// The store source the backend's keys arrive through.
    pub(crate) source: String,
    /// Other names of that source: a key file's path spelled another way by the
    /// `FileSource` (`keys.toml` and `./keys.toml`), as looked up so far.
    aliases: std::sync::Mutex<Vec<(String, bool)>>,
    timeout: Duration,
    /// Ids this API revoked lately, or set out to (the last 4,096), and whether the
    /// revocation was written: a successor's derived id skips them all, a given one
    /// is refused (409) once revoked, so that an id does not come back naming
    /// another key.
    revoked: std::sync::Mutex<std::collections::VecDeque<(String, bool)>>,
}

impl<B: AdminBackend> AdminApi<B> {
    /// The API over `backend`, whose keys reach `store` through one of its sources:
    /// changes are enforced by `store` when a call returns. Keys with the scope
    /// `admin` may use it.
    pub fn new(store: KeyStore, backend: B) -> Self {
        Self {
            store,
            backend,
            scope: Arc::from("admin"),
            timeout: Duration::from_secs(5),
            client_ip: crate::ClientIp::peer(),
        }
    }

    /// The scope a key needs to use the API (default `admin`).
    pub fn with_scope(mut self, scope: impl Into<Arc<str>>) -> Self {
        self.scope = scope.into();
        self
    }

    /// How long a change may take to be enforced by the store before the call
    /// answers 202 Accepted, written but not yet enforced (default 5 s).
    pub fn with_apply_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where the API's guard finds the client's address, for admin keys with
    /// `allowed_ips` (default: the connection's peer, see
    /// [`ApiKeyLayer::client_ip`](crate::ApiKeyLayer::client_ip)). Behind a load
    /// balancer, name it here, or such keys are checked against the balancer's
    /// address.
    ///
    /// ```
    /// use tower_api_key::{ClientIp, KeyStore, admin::{AdminApi, FileBackend}};
    ///
    /// let api = AdminApi::new(KeyStore::new(), FileBackend::new("keys.toml"))
    ///     .with_client_ip(ClientIp::x_forwarded_for(["10.0.0.0/8".parse()?]));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_client_ip(mut self, client_ip: crate::ClientIp) -> Self {
        self.client_ip = client_ip;
        self
    }

    /// The router: `/v1/api-keys…` guarded by keys with the scope, and
    /// `/v1/openapi.json`. Merge it into your application's router.
    pub fn router<S: Clone + Send + Sync + 'static>(self) -> Router<S> {
        let guard = ApiKeyLayer::from_store(self.store.clone())
            .with_realm("admin")
            .require_scope(self.scope)
            .client_ip(self.client_ip)
            .with_rejection(problem::refusal);
        let inner = Arc::new(Inner {
            source: self.backend.source_name(),
            aliases: std::sync::Mutex::default(),
            store: self.store,
            backend: self.backend,
            timeout: self.timeout,
            revoked: std::sync::Mutex::default(),
        });
        let keys = Router::new()
            .route(
                "/v1/api-keys",
                get(routes::list::<B>).post(routes::create::<B>),
            )
            .route(
                "/v1/api-keys/{id}",
                get(routes::get_key::<B>)
                    .patch(routes::patch_key::<B>)
                    .delete(routes::delete_key::<B>),
            )
            .route("/v1/api-keys/{id}/rotate", post(routes::rotate_key::<B>))
            // Paths under the API's own that name nothing answer problem documents
            // too, not the application's fallback.
            .route("/v1/api-keys/{id}/{*rest}", any(routes::not_found))
            .route("/v1/api-keys/", any(routes::not_found))
            .route("/v1/api-keys//", any(routes::not_found))
            .route("/v1/api-keys//{*rest}", any(routes::not_found))
            .method_not_allowed_fallback(routes::method_not_allowed)
            .route_layer(guard)
            .with_state(inner);
        Router::new()
            .route("/v1/openapi.json", get(|| async { Json(openapi()) }))
            .merge(keys)
    }
}

/// The OpenAPI 3.1 description of the API, generated from its handlers and types,
/// as `GET /v1/openapi.json` serves it.
pub fn openapi() -> serde_json::Value {
    let mut doc = serde_json::to_value(Doc::openapi()).unwrap_or_default();
    // The generator writes a link's fields in snake case; OpenAPI spells them in
    // camel case.
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for operation in paths
            .values_mut()
            .filter_map(|i| i.as_object_mut())
            .flat_map(|i| i.values_mut())
        {
            let Some(responses) = operation
                .get_mut("responses")
                .and_then(|r| r.as_object_mut())
            else {
                continue;
            };
            for links in responses
                .values_mut()
                .filter_map(|r| r.get_mut("links"))
                .filter_map(|l| l.as_object_mut())
            {
                for link in links.values_mut().filter_map(|l| l.as_object_mut()) {
                    for (snake, camel) in [
                        ("operation_id", "operationId"),
                        ("operation_ref", "operationRef"),
                        ("request_body", "requestBody"),
                    ] {
                        if let Some(value) = link.remove(snake) {
                            link.insert(camel.to_owned(), value);
                        }
                    }
                }
            }
        }
    }
    doc
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "tower-api-key key management", description = "Create, list, update, rotate and revoke API keys."),
    paths(routes::list, routes::create, routes::get_key, routes::patch_key, routes::rotate_key, routes::delete_key),
    modifiers(&Security, &Links, &Guard),
    security(("bearer" = []), ("x_api_key" = [])),
)]
struct Doc;

/// The two ways to present an admin key.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey as Header, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "x_api_key",
            SecurityScheme::ApiKey(Header::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

/// What the API's own guard answers besides 401 and 403: 429, with `Retry-After`,
/// when the admin key has a rate limit and has spent it. Every operation is guarded,
/// so every one may answer it.
struct Guard;

impl utoipa::Modify for Guard {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{Object, RefOr, Type, header::Header};
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                item.get.as_mut(),
                item.post.as_mut(),
                item.patch.as_mut(),
                item.delete.as_mut(),
            ];
            for operation in operations.into_iter().flatten() {
                let responses = &mut operation.responses.responses;
                // Shaped as the operation's 401: a problem document.
                let Some(RefOr::T(mut limited)) = responses.get("401").cloned() else {
                    continue;
                };
                limited.description = "The admin key's rate limit is spent: try again after \
                                       `Retry-After` seconds"
                    .into();
                let mut retry = Header::new(Object::with_type(Type::Integer));
                retry.description = Some("Seconds until the key may be used again".into());
                limited.headers.insert("Retry-After".into(), retry);
                responses.insert("429".into(), RefOr::T(limited));
            }
        }
    }
}

/// The links from a response that names a key (its id in the body, its version in
/// the `ETag`) to the operations that take them: how a client, or a stateful
/// fuzzer, gets from a created key to a conditional update.
struct Links;

impl utoipa::Modify for Links {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, link::LinkBuilder};
        let link = |operation: &str, etag: bool| {
            let mut link = LinkBuilder::new()
                .operation_id(operation)
                .parameter("id", "$response.body#/id");
            if etag {
                link = link.parameter("If-Match", "$response.header.ETag");
            }
            link.build()
        };
        let from = [
            ("/v1/api-keys", "201"),
            ("/v1/api-keys", "202"),
            ("/v1/api-keys/{id}/rotate", "201"),
            ("/v1/api-keys/{id}/rotate", "202"),
            ("/v1/api-keys/{id}", "200"),
        ];
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [item.get.as_mut(), item.post.as_mut(), item.patch.as_mut()];
            for operation in operations.into_iter().flatten() {
                for (status, response) in operation.responses.responses.iter_mut() {
                    if !from.contains(&(path.as_str(), status.as_str())) {
                        continue;
                    }
                    if let RefOr::T(response) = response {
                        response
                            .links
                            .insert("GetKey".into(), link("get_key", false).into());
                        response
                            .links
                            .insert("UpdateKey".into(), link("patch_key", true).into());
                        response
                            .links
                            .insert("RotateKey".into(), link("rotate_key", true).into());
                        response
                            .links
                            .insert("DeleteKey".into(), link("delete_key", true).into());
                    }
                }
            }
        }
    }
}

impl<B: AdminBackend> Inner<B> {
    /// The backend's key with this id, if the caller may see it.
    pub(crate) async fn visible(&self, caller: &KeyInfo, id: &str) -> Result<ApiKey, Problem> {
        match self.backend.get(id).await? {
            Some(key) if routes::visible(caller, &key) => Ok(key),
            Some(_) => Err(Problem::not_found()),
            None => Err(self.absent(caller, id).await),
        }
    }

    /// What to answer for an id the backend has no key for: 404, unless this server
    /// still lets in a key of that id from the backend's source once its store has
    /// caught up (at most the timeout: a key another writer removed a moment ago is
    /// gone by then) and this API did not revoke it itself. The store of record then
    /// lost a key the fleet enforces (a record deleted by hand, a partly wiped store),
    /// or this server is far behind it, and "not found" would tell an operator
    /// revoking it that it is gone: 503 `store-missing` says which. A key of another
    /// tenant stays 404.
    pub(crate) async fn absent(&self, caller: &KeyInfo, id: &str) -> Problem {
        let reloads = self.store.subscribe();
        let seen = |store: &KeyStore| {
            store
                .get(id)
                .filter(|k| self.ours(k.source()))
                .is_some_and(|k| caller.tenant().is_none() || k.tenant() == caller.tenant())
        };
        if !seen(&self.store) || self.was_revoked(id, true) {
            return Problem::not_found();
        }
        match self.applied(reloads, |store| !seen(store)).await {
            Enforced::Yes => Problem::not_found(),
            Enforced::NotYet => Problem::lost(id),
        }
    }

    /// The backend's key with this id, for a write by `caller` (see
    /// `routes::may_write`): 404 if it does not exist or belongs to another tenant
    /// (audited as refused: the caller is not told it exists), 403 if it holds a scope
    /// the caller lacks.
    pub(crate) async fn writable(
        &self,
        caller: &KeyInfo,
        id: &str,
        action: &str,
    ) -> Result<ApiKey, Problem> {
        let Some(key) = self.backend.get(id).await? else {
            return Err(self.absent(caller, id).await);
        };
        if !routes::visible(caller, &key) {
            self.audit_refused(action, id, caller, "another tenant's key");
            return Err(Problem::not_found());
        }
        routes::may_write(self, caller, &key, action, id)?;
        Ok(key)
    }

    /// Gives `key` an id and a fresh secret, hands it to `write` (one backend
    /// operation), and waits until the store enforces it. A generated or derived id
    /// that turns out taken is drawn again (the next one).
    pub(crate) async fn issue(
        &self,
        mut key: ApiKey,
        id: IdChoice,
        prefix: &str,
        write: Write,
    ) -> Result<(ApiKey, String, Enforced), Problem> {
        let (mut id, chosen) = match &id {
            IdChoice::Given(id) => {
                let id = routes::checked_id(id)?;
                if self.was_revoked(&id, true) {
                    return Err(Problem::conflict(format!(
                        "key id `{id}` named a key revoked lately; give the new key another id"
                    )));
                }
                (id, true)
            }
            IdChoice::Fresh => (fresh_id(), false),
            IdChoice::After(old) => (successor_id(old, 2), false),
        };
        for attempt in 2..32 {
            if !chosen && self.was_revoked(&id, false) {
                id = next_id(&id, attempt);
                continue;
            }
            if self.store.get(&id).is_some_and(|k| !self.ours(k.source())) {
                if !chosen {
                    id = next_id(&id, attempt);
                    continue;
                }
                return Err(Problem::conflict(format!(
                    "key id `{id}` is taken by another key source"
                )));
            }
            let generated =
                crate::key::generate(prefix).map_err(|e| Problem::validation(e.to_string()))?;
            key.id = Arc::from(id.as_str());
            key.digest = KeyDigest::of(generated.secret().as_bytes());
            key.validate()
                .map_err(|e| Problem::validation(e.to_string()))?;
            let reloads = self.store.subscribe();
            let written = match &write {
                Write::Create => self.backend.create(key.clone()).await,
                Write::Rotate {
                    shortened,
                    if_match,
                } => {
                    let old = shortened.clone();
                    self.backend
                        .rotate(key.clone(), old, if_match.as_deref())
                        .await
                }
            };
            match written {
                Err(BackendError::Conflict(taken)) if !chosen && taken == id => {
                    id = next_id(&id, attempt);
                }
                Err(error) => return Err(Problem::of(error, &id)),
                Ok(()) => {
                    let enforced = self
                        .applied(reloads, |store| {
                            self.serves(store, &key)
                                && match &write {
                                    Write::Create => true,
                                    Write::Rotate { shortened, .. } => {
                                        self.serves(store, shortened)
                                    }
                                }
                        })
                        .await;
                    return Ok((key, generated.secret().to_owned(), enforced));
                }
            }
        }
        Err(Problem::conflict("no free key id after 30 tries; give one"))
    }

    /// Notes that this API revokes the key with this id: `written` once the delete
    /// is, and before the write too, so that no rotation picks the id meanwhile (see
    /// `routes::delete_key`). A note is never taken back: an id noted for a delete
    /// that then failed is only never picked.
    pub(crate) fn note_revoked(&self, id: &str, written: bool) {
        let mut revoked = self
            .revoked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(at) = revoked.iter().position(|(r, _)| r == id) {
            if !written || revoked[at].1 {
                return;
            }
            // Written now: the newest note, kept the longest.
            revoked.remove(at);
        } else if revoked.len() >= 4096 {
            // A delete under way or refused goes first, then the oldest.
            match revoked.iter().position(|(_, done)| !done) {
                Some(at) => {
                    revoked.remove(at);
                }
                None => {
                    revoked.pop_front();
                }
            }
        }
        revoked.push_back((id.to_owned(), written));
    }

    /// Whether this API revoked the key with this id lately (`written`), or set out
    /// to.
    fn was_revoked(&self, id: &str, written: bool) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|(r, done)| r == id && (*done || !written))
    }

    /// Whether `store` serves exactly `key`, from the backend's source.
    pub(crate) fn serves(&self, store: &KeyStore, key: &ApiKey) -> bool {
        self.serves_id(store, key.id()) && store.contains(key)
    }

    /// Whether `store` serves a key with this id from the backend's source.
    pub(crate) fn serves_id(&self, store: &KeyStore, id: &str) -> bool {
        store.get(id).is_some_and(|k| self.ours(k.source()))
    }

    /// Whether a store source named `source` is the one the backend's keys arrive
    /// through: the same name, or the same key file with its path spelled another
    /// way.
    pub(crate) fn ours(&self, source: &str) -> bool {
        if source == self.source {
            return true;
        }
        let (Some(theirs), Some(mine)) = (
            source.strip_prefix("file:"),
            self.source.strip_prefix("file:"),
        ) else {
            return false;
        };
        let mut aliases = self
            .aliases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, same)) = aliases.iter().find(|(name, _)| name == source) {
            return *same;
        }
        let same = crate::source::link::canonical(std::path::Path::new(theirs))
            == crate::source::link::canonical(std::path::Path::new(mine));
        // A handful of sources in practice; bounded all the same.
        if aliases.len() >= 64 {
            aliases.clear();
        }
        aliases.push((source.to_owned(), same));
        same
    }

    /// The fleet's usage of one key, if the backend knows it.
    pub(crate) async fn fleet_usage(
        &self,
        id: &str,
    ) -> Result<Option<(u64, Option<std::time::SystemTime>)>, Problem> {
        let usage = self.backend.usage(&[id.to_owned()]).await?;
        Ok(usage.and_then(|u| u.first().copied()))
    }

    /// Waits until `done` holds of the store, at most the timeout: whether the
    /// change is enforced, or written and not yet enforced.
    pub(crate) async fn applied(
        &self,
        reloads: Reloads,
        done: impl Fn(&KeyStore) -> bool,
    ) -> Enforced {
        self.wait(reloads, None, done).await
    }

    /// [`applied`](Self::applied), or until the store serves what the backend holds
    /// under `id` now: a write that came after this one (a concurrent `If-Match: *`
    /// patch, a rotation, a delete) overtook it, and what the key is now is enforced.
    /// Looked at (one read) after a reload, at most every 100 ms, and only while
    /// `done` does not hold: a change overtaken at once would otherwise wait the whole
    /// timeout and be answered 202. Compared by content, not by version: a later write
    /// that put the key back as it was before this one counts at once, and a store
    /// that had read neither may then serve this one's change for a moment as it
    /// applies the writes in order.
    pub(crate) async fn applied_or_overtaken(
        &self,
        reloads: Reloads,
        id: &str,
        done: impl Fn(&KeyStore) -> bool,
    ) -> Enforced {
        self.wait(reloads, Some(id), done).await
    }

    /// [`applied`](Self::applied), or with `overtaken`,
    /// [`applied_or_overtaken`](Self::applied_or_overtaken) for that id.
    async fn wait(
        &self,
        mut reloads: Reloads,
        overtaken: Option<&str>,
        done: impl Fn(&KeyStore) -> bool,
    ) -> Enforced {
        let deadline = Instant::now() + self.timeout;
        let mut looked: Option<Instant> = None;
        let mut reloaded = false;
        loop {
            if done(&self.store) {
                return Enforced::Yes;
            }
            if let Some(id) = overtaken
                && reloaded
                && looked.is_none_or(|at| at.elapsed() >= Duration::from_millis(100))
            {
                looked = Some(Instant::now());
                let caught_up = match self.backend.get(id).await {
                    Ok(Some(now)) => self.serves(&self.store, &now),
                    Ok(None) => !self.serves_id(&self.store, id),
                    Err(_) => false,
                };
                if caught_up {
                    return Enforced::Yes;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Enforced::NotYet;
            }
            // The store is gone: it never will.
            if let Ok(None) = tokio::time::timeout(left, reloads.next()).await {
                return Enforced::NotYet;
            }
            reloaded = true;
        }
    }

    /// The audit event of a change: `outcome` is `enforced` (2xx), `written` (202:
    /// written, not yet enforced by this server's store).
    pub(crate) fn audit(&self, action: &str, key_id: &str, caller: &KeyInfo, enforced: Enforced) {
        let outcome = match enforced {
            Enforced::Yes => "enforced",
            Enforced::NotYet => "written",
        };
        #[cfg(feature = "tracing")]
        tracing::info!(
            target: "tower_api_key::audit",
            action,
            key_id,
            caller = caller.id(),
            outcome,
            at = %crate::clock::rfc3339(std::time::SystemTime::now()),
            "api key {action}"
        );
        #[cfg(not(feature = "tracing"))]
        let _ = (action, key_id, caller, outcome);
    }

    /// The audit event of an attempt the API refused because of who the caller is
    /// (another tenant's key, a scope it lacks): outcome `refused`, at `warn`.
    pub(crate) fn audit_refused(&self, action: &str, key_id: &str, caller: &KeyInfo, reason: &str) {
        #[cfg(feature = "tracing")]
        tracing::warn!(
            target: "tower_api_key::audit",
            action,
            key_id,
            caller = caller.id(),
            outcome = "refused",
            reason,
            at = %crate::clock::rfc3339(std::time::SystemTime::now()),
            "api key {action} refused"
        );
        #[cfg(not(feature = "tracing"))]
        let _ = (action, key_id, caller, reason);
    }
}

/// Whether a written change is enforced by the API's store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Enforced {
    /// Enforced: 2xx.
    Yes,
    /// Written, not enforced within the timeout: 202.
    NotYet,
}

/// Where an issued key's id comes from.
pub(crate) enum IdChoice {
    /// The caller's.
    Given(String),
    /// Generated.
    Fresh,
    /// Derived from the id of the key it replaces: `old-r2`, `old-r3`, ….
    After(String),
}

/// The one backend operation that issues a key.
pub(crate) enum Write {
    Create,
    /// Rotation: the old key, its expiry shortened, replaced in the same operation.
    Rotate {
        shortened: ApiKey,
        if_match: Option<String>,
    },
}

/// The id of the successor of key `old` in the `n`th generation: `old` without a
/// trailing `-r<digits>`, then `-r<n>` (`billing` → `billing-r2` → `billing-r3`),
/// shortened to fit 256 bytes.
pub(crate) fn successor_id(old: &str, n: u64) -> String {
    let (base, generation) = match old.rsplit_once("-r") {
        Some((base, digits))
            if !base.is_empty()
                && !digits.is_empty()
                && digits.len() <= 9
                && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (base, digits.parse::<u64>().unwrap_or(1))
        }
        _ => (old, 1),
    };
    let suffix = format!("-r{}", n.max(generation + 1));
    let mut end = base.len().min(256 - suffix.len());
    while !base.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{suffix}", &base[..end])
}

/// The id to try after `id` turned out taken: the next generation of a derived id,
/// or a fresh one.
fn next_id(id: &str, attempt: u64) -> String {
    match id.rsplit_once("-r") {
        Some((_, digits)) if digits.bytes().all(|b| b.is_ascii_digit()) && !digits.is_empty() => {
            successor_id(id, 0)
        }
        _ => {
            let _ = attempt;
            fresh_id()
        }
    }
}

/// A fresh key id: `key-` and 16 random base62 characters.
pub(crate) fn fresh_id() -> String {
    let generated =
        crate::key::generate("key").map_or_else(|_| String::new(), |g| g.secret().to_owned());
    generated.chars().take(4 + 16).collect()
}

impl<B> fmt::Debug for AdminApi<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminApi")
            .field("store", &self.store)
            .field("scope", &self.scope)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}
