//! The endpoints: `/v1/api-keys` and its children. Handlers speak only to the
//! [`AdminBackend`] and to the store (to wait for a change to apply, and for usage).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::{
    AdminBackend, Inner,
    model::{CreateRequest, CreatedKey, KeyList, KeyResource, RotateRequest, instant, status},
    problem::Problem,
    record_etag,
};
use crate::{ApiKey, KeyInfo, clock, key::digest::KeyDigest, key::validate_id};

type Api<B> = State<Arc<Inner<B>>>;
type Answer = Result<Response, Problem>;

/// What a list request may ask for.
const MAX_LIMIT: usize = 1000;
const DEFAULT_LIMIT: usize = 100;
const DEFAULT_OVERLAP: Duration = Duration::from_secs(86_400);

#[utoipa::path(
    get, path = "/v1/api-keys", tag = "api-keys",
    params(
        ("tenant" = Option<String>, Query, description = "Only this tenant's keys"),
        ("status" = Option<String>, Query, description = "`active`, `expired`, `not_yet_valid` or `disabled`"),
        ("limit" = Option<usize>, Query, description = "1 to 1000, default 100"),
        ("cursor" = Option<String>, Query, description = "From the previous page's `next_cursor`"),
    ),
    responses(
        (status = 200, description = "A page of keys, ordered by id", body = KeyList),
        (status = 401, body = super::problem::ProblemDocument), (status = 403, body = super::problem::ProblemDocument),
        (status = 422, body = super::problem::ProblemDocument),
    )
)]
pub(crate) async fn list<B: AdminBackend>(
    State(api): Api<B>,
    Extension(caller): Extension<KeyInfo>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Answer {
    let Query(query) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    let limit = match query.get("limit") {
        None => DEFAULT_LIMIT,
        Some(limit) => match limit.parse::<usize>() {
            Ok(n @ 1..=MAX_LIMIT) => n,
            _ => {
                return Err(Problem::validation(
                    "`limit` must be a whole number from 1 to 1000",
                ));
            }
        },
    };
    if let Some(status) = query.get("status")
        && !["active", "expired", "not_yet_valid", "disabled"].contains(&status.as_str())
    {
        return Err(Problem::validation(
            "`status` must be `active`, `expired`, `not_yet_valid` or `disabled`",
        ));
    }
    let after = match query.get("cursor") {
        Some(cursor) => Some(
            decode_cursor(cursor)
                .ok_or_else(|| Problem::validation("`cursor` is not one this API gave"))?,
        ),
        None => None,
    };
    let now = SystemTime::now();
    let mut keys: Vec<ApiKey> = api
        .backend
        .list()
        .await?
        .into_iter()
        .filter(|k| visible(&caller, k))
        .filter(|k| {
            query
                .get("tenant")
                .is_none_or(|t| k.tenant() == Some(t.as_str()))
        })
        .filter(|k| query.get("status").is_none_or(|s| status(k, now) == s))
        .filter(|k| after.as_deref().is_none_or(|after| k.id() > after))
        .collect();
    keys.sort_by(|a, b| a.id().cmp(b.id()));
    let more = keys.len() > limit;
    keys.truncate(limit);
    let ids: Vec<String> = keys.iter().map(|k| k.id().to_owned()).collect();
    let fleet = api.backend.usage(&ids).await?;
    let items: Vec<KeyResource> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let usage = fleet.as_ref().and_then(|f| f.get(i).copied());
            KeyResource::of(k, &api.store, now, usage)
        })
        .collect();
    let next = more
        .then(|| items.last().map(|k| encode_cursor(k.id())))
        .flatten();
    Ok(Json(KeyList::new(items, next)).into_response())
}

#[utoipa::path(
    post, path = "/v1/api-keys", tag = "api-keys",
    request_body(content = CreateRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created; the secret is in `key`, shown this once", body = CreatedKey,
            headers(("Location" = String), ("ETag" = String))),
        (status = 400, body = super::problem::ProblemDocument), (status = 401, body = super::problem::ProblemDocument),
        (status = 403, body = super::problem::ProblemDocument), (status = 409, body = super::problem::ProblemDocument),
        (status = 415, body = super::problem::ProblemDocument), (status = 422, body = super::problem::ProblemDocument),
        (status = 503, body = super::problem::ProblemDocument),
    )
)]
pub(crate) async fn create<B: AdminBackend>(
    State(api): Api<B>,
    Extension(caller): Extension<KeyInfo>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let request: CreateRequest = json_body(&headers, &body, false)?;
    let tenant = match (caller.tenant(), request.tenant) {
        (Some(mine), Some(asked)) if asked != mine => {
            return Err(Problem::forbidden(
                "a tenant's admin key creates keys in its own tenant only",
            ));
        }
        (mine, asked) => asked.or(mine.map(str::to_owned)),
    };
    allowed_scopes(&caller, request.scopes.iter().map(String::as_str))?;
    let now = SystemTime::now();
    let mut key = ApiKey::from_digest(Arc::from(""), KeyDigest([0; 32]))
        .with_scopes(request.scopes.clone())
        .with_created_at(now)
        .with_created_by(caller.id());
    if let Some(tenant) = tenant {
        key = key.with_tenant(tenant);
    }
    if let Some(owner) = request.owner {
        key = key.with_owner(owner);
    }
    if let Some(description) = request.description {
        key = key.with_description(description);
    }
    if let Some(at) = request.not_before {
        key = key.with_not_before(instant("not_before", &at)?);
    }
    if let Some(at) = request.expires_at {
        key = key.with_expires_at(instant("expires_at", &at)?);
    }
    let prefix = request.prefix.as_deref().unwrap_or("tak");
    let (key, secret) = api
        .issue(key, request.id, prefix, super::Write::Create)
        .await?;
    api.audit("create", key.id(), &caller);
    Ok(created(&api, &key, secret, now))
}

#[utoipa::path(
    get, path = "/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = String, Path)),
    responses(
        (status = 200, body = KeyResource, headers(("ETag" = String))),
        (status = 401, body = super::problem::ProblemDocument), (status = 403, body = super::problem::ProblemDocument),
        (status = 404, body = super::problem::ProblemDocument),
    )
)]
pub(crate) async fn get_key<B: AdminBackend>(
    State(api): Api<B>,
    Extension(caller): Extension<KeyInfo>,
    Path(id): Path<String>,
) -> Answer {
    let key = api.visible(&caller, &id).await?;
    let fleet = api.fleet_usage(key.id()).await?;
    let resource = KeyResource::of(&key, &api.store, SystemTime::now(), fleet);
    Ok(with_etag(Json(resource).into_response(), &key))
}

#[utoipa::path(
    patch, path = "/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = String, Path), ("If-Match" = String, Header, description = "The key's current ETag")),
    request_body(content = super::model::PatchRequest, content_type = "application/merge-patch+json"),
    responses(
        (status = 200, body = KeyResource, headers(("ETag" = String))),
        (status = 400, body = super::problem::ProblemDocument), (status = 401, body = super::problem::ProblemDocument),
        (status = 403, body = super::problem::ProblemDocument), (status = 404, body = super::problem::ProblemDocument),
        (status = 412, body = super::problem::ProblemDocument), (status = 415, body = super::problem::ProblemDocument),
        (status = 422, body = super::problem::ProblemDocument), (status = 428, body = super::problem::ProblemDocument),
        (status = 503, body = super::problem::ProblemDocument),
    )
)]
pub(crate) async fn patch_key<B: AdminBackend>(
    State(api): Api<B>,
    Extension(caller): Extension<KeyInfo>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let patch: serde_json::Map<String, serde_json::Value> = json_body(&headers, &body, true)?;
    let current = api.visible(&caller, &id).await?;
    let if_match = if_match(&headers)?.ok_or_else(Problem::precondition_required)?;
    let key = super::patch::apply(&current, &patch)?;
    if caller.tenant().is_some() && key.tenant() != caller.tenant() {
        return Err(Problem::forbidden(
            "a tenant's admin key cannot move a key to another tenant",
        ));
    }
    allowed_scopes(&caller, key.scopes())?;
    key.validate()
        .map_err(|e| Problem::validation(e.to_string()))?;
    let reloads = api.store.subscribe();
    api.backend.update(key.clone(), Some(&if_match)).await?;
    api.applied(reloads, |store| api.serves(store, &key))
        .await?;
    api.audit("update", key.id(), &caller);
    let fleet = api.fleet_usage(key.id()).await?;
    let resource = KeyResource::of(&key, &api.store, SystemTime::now(), fleet);
    Ok(with_etag(Json(resource).into_response(), &key))
}

#[utoipa::path(
    post, path = "/v1/api-keys/{id}/rotate", tag = "api-keys",
    params(("id" = String, Path), ("If-Match" = Option<String>, Header)),
    request_body(content = RotateRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The successor; the secret is in `key`, shown this once", body = CreatedKey,
            headers(("Location" = String), ("ETag" = String))),
        (status = 400, body = super::problem::ProblemDocument), (status = 401, body = super::problem::ProblemDocument),
        (status = 403, body = super::problem::ProblemDocument), (status = 404, body = super::problem::ProblemDocument),
        (status = 409, body = super::problem::ProblemDocument), (status = 412, body = super::problem::ProblemDocument),
        (status = 415, body = super::problem::ProblemDocument), (status = 422, body = super::problem::ProblemDocument),
        (status = 503, body = super::problem::ProblemDocument),
    )
)]
pub(crate) async fn rotate_key<B: AdminBackend>(
    State(api): Api<B>,
    Extension(caller): Extension<KeyInfo>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let request: RotateRequest = if body.is_empty() {
        RotateRequest::default()
    } else {
        json_body(&headers, &body, false)?
    };
    let old = api.visible(&caller, &id).await?;
    let if_match = if_match(&headers)?;
    allowed_scopes(&caller, old.scopes())?;
    let now = SystemTime::now();
    let overlap = request
        .overlap_seconds
        .map_or(DEFAULT_OVERLAP, Duration::from_secs);
    let until = clock::to_unix_ms(now).saturating_add(clock::duration_ms(overlap));
    let mut shortened = old.clone();
    shortened.valid_until = shortened.valid_until.min(until);
    if shortened.valid_from != 0 && shortened.valid_from >= shortened.valid_until {
        return Err(Problem::validation(
            "the overlap would end before the old key's `not_before`",
        ));
    }
    let mut successor = ApiKey::from_digest(Arc::from(""), KeyDigest([0; 32]))
        .with_scopes(old.scopes().map(str::to_owned).collect::<Vec<_>>())
        .with_created_at(now)
        .with_created_by(caller.id())
        .with_rotated_from(old.id());
    for (set, value) in [
        (
            ApiKey::with_tenant as fn(ApiKey, Box<str>) -> ApiKey,
            old.tenant(),
        ),
        (ApiKey::with_owner, old.owner()),
        (ApiKey::with_description, old.description()),
    ] {
        if let Some(value) = value {
            successor = set(successor, value.into());
        }
    }
    let (key, secret) = api
        .issue(
            successor,
            request.id,
            "tak",
            super::Write::Rotate {
                shortened,
                if_match,
            },
        )
        .await?;
    // Issued: the successor is enforced; the old key's shorter expiry too.
    api.audit("rotate", old.id(), &caller);
    Ok(created(&api, &key, secret, now))
}

#[utoipa::path(
    delete, path = "/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = String, Path), ("If-Match" = Option<String>, Header)),
    responses(
        (status = 204, description = "Revoked: the next request with the key is refused"),
        (status = 401, body = super::problem::ProblemDocument), (status = 403, body = super::problem::ProblemDocument),
        (status = 404, body = super::problem::ProblemDocument), (status = 412, body = super::problem::ProblemDocument),
        (status = 503, body = super::problem::ProblemDocument),
    )
)]
pub(crate) async fn delete_key<B: AdminBackend>(
    State(api): Api<B>,
    Extension(caller): Extension<KeyInfo>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Answer {
    let key = api.visible(&caller, &id).await?;
    let if_match = if_match(&headers)?;
    let reloads = api.store.subscribe();
    api.backend.delete(key.id(), if_match.as_deref()).await?;
    api.applied(reloads, |store| !api.serves_id(store, key.id()))
        .await?;
    api.audit("delete", key.id(), &caller);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A path under `/v1/api-keys` that names nothing.
pub(crate) async fn not_found() -> Problem {
    Problem::not_found()
}

/// A method the path does not take.
pub(crate) async fn method_not_allowed() -> Problem {
    Problem::method_not_allowed()
}

/// The 201 for a key just issued: its resource, its secret, where it is, its ETag.
fn created<B>(api: &Inner<B>, key: &ApiKey, secret: String, now: SystemTime) -> Response {
    let body = CreatedKey::new(KeyResource::of(key, &api.store, now, None), secret);
    let mut res = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(location) =
        HeaderValue::from_str(&format!("/v1/api-keys/{}", percent_encode(key.id())))
    {
        res.headers_mut().insert(header::LOCATION, location);
    }
    with_etag(res, key)
}

fn with_etag(mut res: Response, key: &ApiKey) -> Response {
    if let Ok(etag) = HeaderValue::from_str(&record_etag(key)) {
        res.headers_mut().insert(header::ETAG, etag);
    }
    res
}

/// Whether the caller may see `key`: an admin key with a tenant sees its tenant's.
pub(crate) fn visible(caller: &KeyInfo, key: &ApiKey) -> bool {
    caller.tenant().is_none() || key.tenant() == caller.tenant()
}

/// Refuses scopes the caller does not hold itself.
fn allowed_scopes<'a>(
    caller: &KeyInfo,
    scopes: impl IntoIterator<Item = &'a str>,
) -> Result<(), Problem> {
    for scope in scopes {
        if !caller.has_scope(scope) {
            return Err(Problem::forbidden(format!(
                "the caller cannot give scope `{scope}`, which it does not hold"
            )));
        }
    }
    Ok(())
}

/// Parses a JSON body: 415 for another content type, 400 for bad JSON, 422 for an
/// unknown field or a value of the wrong type.
fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
    merge_patch: bool,
) -> Result<T, Problem> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let accepted = match content_type.as_deref() {
        Some("application/json") => true,
        Some("application/merge-patch+json") => merge_patch,
        _ => false,
    };
    if !accepted {
        return Err(Problem::unsupported_media_type(if merge_patch {
            "application/merge-patch+json or application/json"
        } else {
            "application/json"
        }));
    }
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Problem::validation(e.to_string()),
        _ => Problem::bad_request(format!("the body is not JSON: {e}")),
    })
}

/// The `If-Match` header, if any.
fn if_match(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    match headers.get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|v| Some(v.trim().to_owned()))
            .map_err(|_| Problem::bad_request("If-Match is not text")),
    }
}

/// A page cursor: the last id, hex-encoded so that it is opaque and URL-safe.
fn encode_cursor(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(cursor: &str) -> Option<String> {
    if !cursor.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// An id in a path segment: characters outside the unreserved set percent-encoded.
fn percent_encode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A checked id: the request's, or a fresh one.
pub(crate) fn checked_id(id: Option<String>) -> Result<(String, bool), Problem> {
    match id {
        Some(id) => {
            validate_id(&id).map_err(|e| Problem::validation(e.to_string()))?;
            Ok((id, true))
        }
        None => Ok((super::fresh_id(), false)),
    }
}
