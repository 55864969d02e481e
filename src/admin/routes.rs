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
    extract::{
        Path, Query, State,
        rejection::{BytesRejection, PathRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::problem::ProblemDocument as Problem_;
use super::{
    AdminBackend, BackendError, Enforced, Inner,
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
/// The longest overlap a rotation takes: an instant past it would not be written as
/// an RFC 3339 date.
const MAX_OVERLAP_SECONDS: u64 = 3_153_600_000;

#[utoipa::path(
    get, path = "/v1/api-keys", tag = "api-keys",
    params(
        ("tenant" = Option<String>, Query, description = "Only this tenant's keys"),
        ("status" = Option<super::model::KeyStatus>, Query, description = "Only keys with this status"),
        ("limit" = Option<u32>, Query, description = "1 to 1000, default 100", minimum = 1, maximum = 1000),
        ("cursor" = Option<String>, Query, description = "From the previous page's `next_cursor`", pattern = "^([0-9a-fA-F]{2})+$"),
    ),
    responses(
        (status = 200, description = "A page of keys, ordered by id", body = KeyList),
        (status = 400, body = Problem_, content_type = "application/problem+json"),
        (status = 401, body = Problem_, content_type = "application/problem+json"),
        (status = 403, body = Problem_, content_type = "application/problem+json"),
        (status = 422, body = Problem_, content_type = "application/problem+json"),
        (status = 500, description = "A record in the store of record cannot be read", body = Problem_, content_type = "application/problem+json"),
        (status = 503, body = Problem_, content_type = "application/problem+json"),
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
        (status = 201, description = "Created and enforced; the secret is in `key`, shown this once", body = CreatedKey,
            headers(("Location" = String), ("ETag" = String))),
        (status = 202, description = "Written, not yet enforced by this server's store within its timeout; the secret is in `key`, shown this once", body = CreatedKey,
            headers(("Location" = String), ("ETag" = String))),
        (status = 400, body = Problem_, content_type = "application/problem+json"),
        (status = 401, body = Problem_, content_type = "application/problem+json"),
        (status = 403, body = Problem_, content_type = "application/problem+json"),
        (status = 409, body = Problem_, content_type = "application/problem+json"),
        (status = 413, body = Problem_, content_type = "application/problem+json"),
        (status = 415, body = Problem_, content_type = "application/problem+json"),
        (status = 422, body = Problem_, content_type = "application/problem+json"),
        (status = 500, body = Problem_, content_type = "application/problem+json"),
        (status = 503, description = "Nothing was written", body = Problem_, content_type = "application/problem+json"),
        (status = 504, description = "The write may or may not have happened: GET the problem's `key_id`", body = Problem_, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create<B: AdminBackend>(
    State(api): Api<B>,
    Extension(caller): Extension<KeyInfo>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let body = body_bytes(body)?;
    let request: CreateRequest = json_body(&headers, &body, false)?;
    let tenant = request
        .tenant
        .clone()
        .or(caller.tenant().map(str::to_owned));
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
    key = super::model::with_limits(
        key,
        request.rate_limits,
        request.quota.map(Some),
        request.allowed_ips.map(Some),
    )?;
    let named = request.id.as_deref().unwrap_or("(generated)");
    may_write(&api, &caller, &key, "create", named)?;
    let prefix = request.prefix.as_deref().unwrap_or("tak");
    let id = match request.id {
        Some(id) => super::IdChoice::Given(id),
        None => super::IdChoice::Fresh,
    };
    let (key, secret, enforced) = api.issue(key, id, prefix, super::Write::Create).await?;
    api.audit("create", key.id(), &caller, enforced);
    Ok(created(&api, &key, secret, now, enforced))
}

#[utoipa::path(
    get, path = "/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = String, Path, min_length = 1, max_length = 256)),
    responses(
        (status = 200, body = KeyResource, headers(("ETag" = String))),
        (status = 400, body = Problem_, content_type = "application/problem+json"),
        (status = 401, body = Problem_, content_type = "application/problem+json"),
        (status = 403, body = Problem_, content_type = "application/problem+json"),
        (status = 404, body = Problem_, content_type = "application/problem+json"),
        (status = 500, body = Problem_, content_type = "application/problem+json"),
        (status = 503, body = Problem_, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_key<B: AdminBackend>(
    State(api): Api<B>,
    Extension(caller): Extension<KeyInfo>,
    id: Result<Path<String>, PathRejection>,
) -> Answer {
    let id = key_path(id)?;
    let key = api.visible(&caller, &id).await?;
    let fleet = api.fleet_usage(key.id()).await?;
    let quota_used = api
        .backend
        .quota_used(&key)
        .await
        .map_err(|e| Problem::of(e, &id))?;
    let resource =
        KeyResource::of(&key, &api.store, SystemTime::now(), fleet).with_quota_used(quota_used);
    Ok(with_etag(Json(resource).into_response(), &key))
}

#[utoipa::path(
    patch, path = "/v1/api-keys/{id}", tag = "api-keys",
    params(
        ("id" = String, Path, min_length = 1, max_length = 256),
        ("If-Match" = String, Header, description = "The key's current ETag (or `*`, or a list of them)"),
    ),
    request_body(content = super::model::PatchRequest, content_type = "application/merge-patch+json"),
    responses(
        (status = 200, description = "Updated and enforced", body = KeyResource, headers(("ETag" = String))),
        (status = 202, description = "Written, not yet enforced by this server's store within its timeout", body = KeyResource, headers(("ETag" = String))),
        (status = 400, body = Problem_, content_type = "application/problem+json"),
        (status = 401, body = Problem_, content_type = "application/problem+json"),
        (status = 403, body = Problem_, content_type = "application/problem+json"),
        (status = 404, body = Problem_, content_type = "application/problem+json"),
        (status = 412, body = Problem_, content_type = "application/problem+json"),
        (status = 413, body = Problem_, content_type = "application/problem+json"),
        (status = 415, body = Problem_, content_type = "application/problem+json"),
        (status = 422, body = Problem_, content_type = "application/problem+json"),
        (status = 428, body = Problem_, content_type = "application/problem+json"),
        (status = 500, body = Problem_, content_type = "application/problem+json"),
        (status = 503, description = "Nothing was written", body = Problem_, content_type = "application/problem+json"),
        (status = 504, description = "The write may or may not have happened", body = Problem_, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn patch_key<B: AdminBackend>(
    State(api): Api<B>,
    Extension(caller): Extension<KeyInfo>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let id = key_path(id)?;
    // A PATCH without If-Match is 428 whatever its body (RFC 6585): the client must
    // read the key first.
    if !headers.contains_key(header::IF_MATCH) {
        return Err(Problem::precondition_required());
    }
    let body = body_bytes(body)?;
    let patch: serde_json::Map<String, serde_json::Value> = json_body(&headers, &body, true)?;
    // `If-Match: *` names no version: a change another writer saves between this
    // read and the write is kept, and the patch applied again on top of it.
    let mut round = 0;
    let (key, reloads) = loop {
        round += 1;
        let current = api.writable(&caller, &id, "update").await?;
        // The patch is checked before the ETag is compared: a malformed patch is 422
        // whatever the ETag.
        let key = super::patch::apply(&current, &patch)?;
        let if_match =
            precondition(&headers, &current)?.ok_or_else(Problem::precondition_required)?;
        may_write(&api, &caller, &key, "update", &id)?;
        key.validate()
            .map_err(|e| Problem::validation(e.to_string()))?;
        let reloads = api.store.subscribe();
        match api.backend.update(key.clone(), Some(&if_match)).await {
            Err(BackendError::PreconditionFailed) if !pins_version(&headers) => {
                if round == MAX_ROUNDS {
                    return Err(kept_changing());
                }
            }
            Err(e) => return Err(Problem::of(e, &id)),
            Ok(()) => break (key, reloads),
        }
    };
    let enforced = api
        .applied_or_overtaken(reloads, key.id(), |store| api.serves(store, &key))
        .await;
    api.audit("update", key.id(), &caller, enforced);
    let fleet = api.fleet_usage(key.id()).await?;
    let resource = KeyResource::of(&key, &api.store, SystemTime::now(), fleet);
    let status = match enforced {
        Enforced::Yes => StatusCode::OK,
        Enforced::NotYet => StatusCode::ACCEPTED,
    };
    Ok(with_etag((status, Json(resource)).into_response(), &key))
}

#[utoipa::path(
    post, path = "/v1/api-keys/{id}/rotate", tag = "api-keys",
    params(
        ("id" = String, Path, min_length = 1, max_length = 256),
        ("If-Match" = Option<String>, Header, description = "The key's current ETag (or `*`, or a list of them): makes a retry safe"),
    ),
    request_body(content = Option<RotateRequest>, content_type = "application/json", description = "Optional: no body rotates with the defaults"),
    responses(
        (status = 201, description = "The successor, enforced; the secret is in `key`, shown this once", body = CreatedKey,
            headers(("Location" = String), ("ETag" = String))),
        (status = 202, description = "Written, not yet enforced by this server's store within its timeout; the secret is in `key`, shown this once", body = CreatedKey,
            headers(("Location" = String), ("ETag" = String))),
        (status = 400, body = Problem_, content_type = "application/problem+json"),
        (status = 401, body = Problem_, content_type = "application/problem+json"),
        (status = 403, body = Problem_, content_type = "application/problem+json"),
        (status = 404, body = Problem_, content_type = "application/problem+json"),
        (status = 409, body = Problem_, content_type = "application/problem+json"),
        (status = 412, body = Problem_, content_type = "application/problem+json"),
        (status = 413, body = Problem_, content_type = "application/problem+json"),
        (status = 415, body = Problem_, content_type = "application/problem+json"),
        (status = 422, body = Problem_, content_type = "application/problem+json"),
        (status = 500, body = Problem_, content_type = "application/problem+json"),
        (status = 503, description = "Nothing was written", body = Problem_, content_type = "application/problem+json"),
        (status = 504, description = "The write may or may not have happened: GET the problem's `key_id`", body = Problem_, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn rotate_key<B: AdminBackend>(
    State(api): Api<B>,
    Extension(caller): Extension<KeyInfo>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let id = key_path(id)?;
    let body = body_bytes(body)?;
    let request: RotateRequest = if body.is_empty() {
        RotateRequest::default()
    } else {
        json_body(&headers, &body, false)?
    };
    // The body is checked before the precondition: a malformed request is 422
    // whatever the ETag.
    let overlap = match request.overlap_seconds {
        None => DEFAULT_OVERLAP,
        Some(seconds @ 0..=MAX_OVERLAP_SECONDS) => Duration::from_secs(seconds),
        Some(_) => {
            return Err(Problem::validation(
                "`overlap_seconds` must be at most 3153600000 (about a century)",
            ));
        }
    };
    if let Some(id) = &request.id {
        checked_id(id)?;
    }
    // The old key is written back shortened only if it is still the record read here:
    // a revocation or a change saved meanwhile is never undone. Unless the caller
    // named a version (`If-Match` with a tag), the rotation reads the key again and
    // retries on top of that change.
    let mut round = 0;
    let (old, key, secret, enforced) = loop {
        round += 1;
        let old = api.writable(&caller, &id, "rotate").await?;
        let if_match = precondition(&headers, &old)?;
        match rotate_once(
            &api,
            &caller,
            &old,
            if_match,
            overlap,
            request.id.as_deref(),
        )
        .await
        {
            Err(problem) if problem.is_precondition_failed() && !pins_version(&headers) => {
                if round == MAX_ROUNDS {
                    return Err(kept_changing());
                }
            }
            Err(problem) => return Err(problem),
            Ok((key, secret, enforced)) => break (old, key, secret, enforced),
        }
    };
    let now = SystemTime::now();
    // Issued: the successor is enforced; the old key's shorter expiry too.
    api.audit("rotate", old.id(), &caller, enforced);
    Ok(created(&api, &key, secret, now, enforced))
}

#[utoipa::path(
    delete, path = "/v1/api-keys/{id}", tag = "api-keys",
    params(
        ("id" = String, Path, min_length = 1, max_length = 256),
        ("If-Match" = Option<String>, Header, description = "The key's current ETag (or `*`, or a list of them)"),
    ),
    responses(
        (status = 204, description = "Revoked: the next request with the key is refused"),
        (status = 202, description = "Revoked in the store of record, not yet enforced by this server's store within its timeout"),
        (status = 400, body = Problem_, content_type = "application/problem+json"),
        (status = 401, body = Problem_, content_type = "application/problem+json"),
        (status = 403, body = Problem_, content_type = "application/problem+json"),
        (status = 404, body = Problem_, content_type = "application/problem+json"),
        (status = 412, body = Problem_, content_type = "application/problem+json"),
        (status = 500, body = Problem_, content_type = "application/problem+json"),
        (status = 503, description = "Nothing was written", body = Problem_, content_type = "application/problem+json"),
        (status = 504, description = "The write may or may not have happened", body = Problem_, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delete_key<B: AdminBackend>(
    State(api): Api<B>,
    Extension(caller): Extension<KeyInfo>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Answer {
    let id = key_path(id)?;
    if let Err(BackendError::Corrupt { .. }) = api.backend.get(&id).await {
        return delete_corrupt(&api, &caller, &id, &headers).await;
    }
    let mut round = 0;
    let (key, reloads) = loop {
        round += 1;
        let key = api.writable(&caller, &id, "delete").await?;
        let if_match = precondition(&headers, &key)?;
        let reloads = api.store.subscribe();
        // Noted before the write: a rotation that picks its successor's id while the
        // delete is under way must not pick this one. Never taken back: an id noted
        // for a delete that then fails is only never picked (taken back, a second
        // delete of the id that failed could drop the note of one that succeeded).
        api.note_revoked(key.id(), false);
        match api.backend.delete(key.id(), if_match.as_deref()).await {
            // `If-Match: *`: any version of the key is removed.
            Err(BackendError::PreconditionFailed) if !pins_version(&headers) => {
                if round == MAX_ROUNDS {
                    return Err(kept_changing());
                }
            }
            Err(e) => {
                // Perhaps written: taken for revoked, or the id could name a new key.
                if matches!(e, BackendError::OutcomeUnknown(_)) {
                    api.note_revoked(key.id(), true);
                }
                return Err(Problem::of(e, &id));
            }
            Ok(()) => break (key, reloads),
        }
    };
    api.note_revoked(key.id(), true);
    let enforced = api
        .applied_or_overtaken(reloads, key.id(), |store| !api.serves_id(store, key.id()))
        .await;
    api.audit("delete", key.id(), &caller, enforced);
    Ok(match enforced {
        Enforced::Yes => StatusCode::NO_CONTENT,
        Enforced::NotYet => StatusCode::ACCEPTED,
    }
    .into_response())
}

/// Deletes a record the store of record holds under `id` but that cannot be read (not
/// a key record, or naming another id): the way an operator clears it. Its tenant and
/// scopes are unknown, so only an admin key without a tenant may, and an `If-Match`
/// can only be `*` (the record has no ETag). Replicas refuse such a key already.
async fn delete_corrupt<B: AdminBackend>(
    api: &Inner<B>,
    caller: &KeyInfo,
    id: &str,
    headers: &HeaderMap,
) -> Answer {
    if caller.tenant().is_some() {
        api.audit_refused(
            "delete",
            id,
            caller,
            "an unreadable record, whose tenant is unknown",
        );
        return Err(Problem::not_found());
    }
    for value in headers.get_all(header::IF_MATCH) {
        let value = value
            .to_str()
            .map_err(|_| Problem::bad_request("If-Match is not text"))?;
        if value.split(',').any(|member| member.trim() != "*") {
            return Err(Problem::precondition_failed());
        }
    }
    let reloads = api.store.subscribe();
    api.note_revoked(id, false);
    if let Err(e) = api.backend.delete(id, None).await {
        // Perhaps written: taken for revoked, or the id could name a new key.
        if matches!(e, BackendError::OutcomeUnknown(_)) {
            api.note_revoked(id, true);
        }
        return Err(Problem::of(e, id));
    }
    api.note_revoked(id, true);
    let enforced = api
        .applied_or_overtaken(reloads, id, |store| !api.serves_id(store, id))
        .await;
    api.audit("delete", id, caller, enforced);
    Ok(match enforced {
        Enforced::Yes => StatusCode::NO_CONTENT,
        Enforced::NotYet => StatusCode::ACCEPTED,
    }
    .into_response())
}

/// A path under `/v1/api-keys` that names nothing.
pub(crate) async fn not_found() -> Problem {
    Problem::not_found()
}

/// A method the path does not take.
pub(crate) async fn method_not_allowed() -> Problem {
    Problem::method_not_allowed()
}

/// The key id in the path; 400 for one that is not UTF-8 once decoded.
fn key_path(id: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    id.map(|Path(id)| id)
        .map_err(|_| Problem::bad_request("the key id in the path is not valid UTF-8"))
}

/// The request body; 413 past the size limit, 400 for a body that could not be read.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Problem> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Problem::too_large("the body is larger than allowed"),
        _ => Problem::bad_request("the body could not be read"),
    })
}

/// One rule for every write: the caller must see the key (its tenant) and hold
/// every scope the key has. A refusal is audited.
pub(crate) fn may_write<B: AdminBackend>(
    api: &Inner<B>,
    caller: &KeyInfo,
    key: &ApiKey,
    action: &str,
    id: &str,
) -> Result<(), Problem> {
    if !visible(caller, key) {
        api.audit_refused(action, id, caller, "another tenant's key");
        return Err(Problem::forbidden(
            "a tenant's admin key manages keys of its own tenant only",
        ));
    }
    if let Some(scope) = key.scopes().find(|s| !caller.has_scope(s)) {
        api.audit_refused(action, id, caller, "a scope the caller lacks");
        // The scope came from a body or a stored record, and may be a secret pasted
        // into the wrong field: named only if it looks like a name.
        let scope = match crate::error::may_quote_name(scope) {
            true => format!("scope `{scope}`"),
            false => "a scope (not repeated here: it does not look like a name)".to_owned(),
        };
        return Err(Problem::forbidden(format!(
            "the caller cannot manage a key with {scope}, which it does not hold"
        )));
    }
    Ok(())
}

/// How often a change that names no version of the key (no `If-Match`, or `*`) is
/// made again on top of a change another writer saved between its read and its write.
const MAX_ROUNDS: usize = 8;

/// A change that named no version found the key changed under it every round: no
/// caller's condition failed (so not 412); nothing was written, and it may be retried.
fn kept_changing() -> Problem {
    Problem::unavailable("the key kept changing under this call; nothing was written: retry")
}

/// Whether the `If-Match` header names a version of the key (a tag), not just any
/// version (`*`) or none: such a condition is the caller's, and is not retried.
fn pins_version(headers: &HeaderMap) -> bool {
    headers.get_all(header::IF_MATCH).iter().any(|value| {
        value.to_str().map_or(true, |v| {
            v.split(',').map(str::trim).any(|member| member != "*")
        })
    })
}

/// One rotation of `old`, written only if `old` is still the record in the backend.
async fn rotate_once<B: AdminBackend>(
    api: &Inner<B>,
    caller: &KeyInfo,
    old: &ApiKey,
    if_match: Option<String>,
    overlap: Duration,
    new_id: Option<&str>,
) -> Result<(ApiKey, String, Enforced), Problem> {
    let if_match = if_match.unwrap_or_else(|| record_etag(old));
    let now = SystemTime::now();
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
    // The successor is the same client's key: its limits and address rules too, or a
    // routine rotation would lift them.
    if let Some(meta) = &old.meta {
        successor.meta.get_or_insert_with(Box::default).limits = meta.limits.clone();
    }
    let choice = match new_id {
        Some(id) => super::IdChoice::Given(id.to_owned()),
        None => super::IdChoice::After(old.id().to_owned()),
    };
    api.issue(
        successor,
        choice,
        "tak",
        super::Write::Rotate {
            shortened,
            if_match: Some(if_match),
        },
    )
    .await
}

/// The `If-Match` precondition (RFC 9110 § 13.1.1) evaluated against `current`:
/// `Ok(Some(its etag))` if it matches, 412 if not, `Ok(None)` without the header. `*`
/// matches the current record; a weak tag never matches (strong comparison); a list
/// matches if any member does.
fn precondition(headers: &HeaderMap, current: &ApiKey) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(header::IF_MATCH).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let etag = record_etag(current);
    let mut matched = false;
    for value in values {
        let value = value
            .to_str()
            .map_err(|_| Problem::bad_request("If-Match is not text"))?;
        for member in value.split(',').map(str::trim) {
            matched |= member == "*" || member == etag;
        }
    }
    match matched {
        true => Ok(Some(etag)),
        false => Err(Problem::precondition_failed()),
    }
}

/// The 201 (or 202, written but not yet enforced) for a key just issued: its
/// resource, its secret, where it is, its ETag.
fn created<B>(
    api: &Inner<B>,
    key: &ApiKey,
    secret: String,
    now: SystemTime,
    enforced: Enforced,
) -> Response {
    let body = CreatedKey::new(KeyResource::of(key, &api.store, now, None), secret);
    let status = match enforced {
        Enforced::Yes => StatusCode::CREATED,
        Enforced::NotYet => StatusCode::ACCEPTED,
    };
    let mut res = (status, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&super::path::key(key.id())) {
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

/// Parses a JSON body: 415 for another content type, 400 for bad JSON, 422 for an
/// unknown field, a value of the wrong type or a member named twice in one object.
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
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => Problem::validation(without_values(&e)),
            _ => Problem::bad_request(format!("the body is not JSON: {e}")),
        })?;
    super::unique::check(body).map_err(|e| Problem::validation(e.to_string()))?;
    // An object, as the schema says: serde would also take a struct's fields as an
    // array.
    if !value.is_object() {
        return Err(Problem::validation("the body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| Problem::validation(without_values(&e)))
}

/// serde's message without the value it did not expect: `invalid type: string
/// "tak_…", expected a sequence` quotes what was sent, and a secret pasted into the
/// wrong field would be echoed to the caller's logs. The kind of value stays. An
/// unknown member is named only if its name looks like a field's (a misspelt
/// `scope`), never when it could be a secret sent as a name.
fn without_values(e: &serde_json::Error) -> String {
    let said = e.to_string();
    if let Some(cut) = crate::error::without_unknown_name(&said) {
        return cut;
    }
    match (said.find(['"', '`']), said.rfind(", expected")) {
        (Some(start), Some(end)) if start < end && said.starts_with("invalid ") => {
            format!("{}{}", said[..start].trim_end(), &said[end..])
        }
        _ => said,
    }
}

/// A page cursor: the last id, hex-encoded so that it is opaque and URL-safe.
fn encode_cursor(id: &str) -> String {
    faster_hex::hex_string(id.as_bytes())
}

fn decode_cursor(cursor: &str) -> Option<String> {
    if cursor.is_empty() {
        return None;
    }
    let mut bytes = vec![0; cursor.len() / 2];
    if !cursor.len().is_multiple_of(2) {
        return None;
    }
    faster_hex::hex_decode(cursor.as_bytes(), &mut bytes).ok()?;
    String::from_utf8(bytes).ok()
}

/// The request's id, checked: 1 to 64 ASCII letters, digits and `.`, `_`, `~`, `-`
/// (the characters a URL path carries as they are). A key file may hold other ids;
/// the API gives only these.
pub(crate) fn checked_id(id: &str) -> Result<String, Problem> {
    validate_id(id).map_err(|e| Problem::validation(e.to_string()))?;
    let url_safe = |b: u8| b.is_ascii_alphanumeric() || b"._~-".contains(&b);
    if id.len() > 64 || !id.bytes().all(url_safe) {
        return Err(Problem::validation(
            "`id` must be 1 to 64 ASCII letters, digits, `.`, `_`, `~` or `-`",
        ));
    }
    Ok(id.to_owned())
}
