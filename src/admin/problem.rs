//! RFC 9457 problem documents: every error the key-management API answers.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

use super::{BackendError, backend::Said};
use crate::Rejection;

/// An error answered as `application/problem+json`, `type` being
/// `urn:tower-api-key:problem:<kind>`.
#[derive(Debug)]
pub(crate) struct Problem {
    status: StatusCode,
    kind: &'static str,
    detail: Option<String>,
    key_id: Option<String>,
}

/// The JSON of a problem (RFC 9457).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ProblemDocument {
    /// `urn:tower-api-key:problem:<kind>`, kind one of `bad-request`, `not-found`,
    /// `method-not-allowed`, `unsupported-media-type`, `payload-too-large`, `conflict`, `validation`,
    /// `precondition-failed`, `precondition-required`, `unauthenticated`,
    /// `forbidden`, `rate-limited`, `unavailable`, `outcome-unknown`, `store-missing`,
    /// `corrupt-record`.
    #[serde(rename = "type")]
    kind: String,
    /// A short summary of the kind.
    title: &'static str,
    /// The HTTP status.
    status: u16,
    /// What happened, for a person.
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    /// The key the request was about, where the caller may not know it (an
    /// `outcome-unknown` create of a generated id): `GET /v1/api-keys/{key_id}` tells
    /// whether the change was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
}

impl Problem {
    fn new(status: StatusCode, kind: &'static str, detail: Option<String>) -> Self {
        Self {
            status,
            kind,
            detail,
            key_id: None,
        }
    }

    /// 504 `outcome-unknown`: the write of key `id` may or may not have happened.
    pub(crate) fn outcome_unknown(id: &str) -> Self {
        let mut problem = Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "outcome-unknown",
            Some(format!(
                "the key backend did not confirm the write: it may or may not have happened. \
                 GET {} to find out before retrying (a retry of a rotation makes \
                 a second successor unless it sends If-Match)",
                super::path::key(id)
            )),
        );
        problem.key_id = Some(id.to_owned());
        problem
    }

    /// The problem of a backend error about key `id`.
    pub(crate) fn of(error: BackendError, id: &str) -> Self {
        match error {
            BackendError::OutcomeUnknown(cause) => {
                log_cause("outcome unknown", &*cause);
                Self::outcome_unknown(id)
            }
            other => other.into(),
        }
    }

    /// 413: the body is too large.
    pub(crate) fn too_large(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            Some(detail.into()),
        )
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", Some(detail.into()))
    }

    pub(crate) fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", None)
    }

    /// 503 `store-missing`: the store of record has no key `id`, but the server's
    /// store (which follows it) still lets it in.
    pub(crate) fn lost(id: &str) -> Self {
        let mut problem = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store-missing",
            Some(format!(
                "the store of record has no key `{id}`, but this server still lets it in: \
                 nothing was done. Either its record was deleted outside the API (or the \
                 store partly wiped), and the replicas will go on letting it in until the \
                 store of record is restored (from an export or a replica's snapshot) and \
                 the key revoked through the API; or this server has not yet applied a \
                 change another writer made (see its reload status), and this answer \
                 becomes 404 once it has"
            )),
        );
        problem.key_id = Some(id.to_owned());
        problem
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", None)
    }

    pub(crate) fn unsupported_media_type(expected: &str) -> Self {
        let detail = format!("send the body as {expected}");
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            Some(detail),
        )
    }

    pub(crate) fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", Some(detail.into()))
    }

    pub(crate) fn validation(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation",
            Some(detail.into()),
        )
    }

    /// Whether this is the 412 of a condition that no longer held.
    pub(crate) fn is_precondition_failed(&self) -> bool {
        self.status == StatusCode::PRECONDITION_FAILED
    }

    pub(crate) fn precondition_failed() -> Self {
        let detail = "the key changed since that ETag: GET it again".to_owned();
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "precondition-failed",
            Some(detail),
        )
    }

    pub(crate) fn precondition_required() -> Self {
        let detail = "send If-Match with the key's current ETag".to_owned();
        Self::new(
            StatusCode::PRECONDITION_REQUIRED,
            "precondition-required",
            Some(detail),
        )
    }

    pub(crate) fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", Some(detail.into()))
    }

    pub(crate) fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            Some(detail.into()),
        )
    }

    fn title(&self) -> &'static str {
        match self.kind {
            "bad-request" => "Bad request",
            "not-found" => "Not found",
            "method-not-allowed" => "Method not allowed",
            "unsupported-media-type" => "Unsupported media type",
            "conflict" => "Conflict",
            "validation" => "Validation failed",
            "precondition-failed" => "Precondition failed",
            "precondition-required" => "Precondition required",
            "unauthenticated" => "Unauthenticated",
            "forbidden" => "Forbidden",
            "rate-limited" => "Too many requests",
            "outcome-unknown" => "Outcome unknown",
            "store-missing" => "Key store missing",
            "corrupt-record" => "Corrupt record",
            "payload-too-large" => "Payload too large",
            _ => "Unavailable",
        }
    }

    fn document(&self) -> ProblemDocument {
        ProblemDocument {
            kind: format!("urn:tower-api-key:problem:{}", self.kind),
            title: self.title(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            key_id: self.key_id.clone(),
        }
    }
}

fn problem_json<B>(res: &mut Response<B>) {
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut res = (self.status, Json(self.document())).into_response();
        problem_json(&mut res);
        res
    }
}

/// Logs what a backend said about a failure: it may name a path, a host or a script,
/// which the caller is not told.
fn log_cause(what: &str, cause: &(dyn std::error::Error + 'static)) {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        target: "tower_api_key::admin",
        cause = %crate::error::Chain(cause),
        "key backend: {what}"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = (what, cause);
}

/// What a backend of this crate said that the caller may be told, if anything.
fn said(cause: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    cause.downcast_ref::<Said>().map(|s| s.said)
}

impl From<BackendError> for Problem {
    fn from(error: BackendError) -> Self {
        match error {
            BackendError::NotFound => Self::not_found(),
            BackendError::Conflict(id) => Self::conflict(format!("key id `{id}` is taken")),
            BackendError::PreconditionFailed => Self::precondition_failed(),
            BackendError::Invalid(e) => {
                // A file's name and line are the server's business; what is wrong is
                // the caller's.
                let e = match e {
                    crate::Error::File { error, .. } => *error,
                    e => e,
                };
                Self::validation(crate::error::Chain(&e).to_string())
            }
            BackendError::Unavailable(cause) => {
                log_cause("unavailable", &*cause);
                let why = said(&*cause).unwrap_or("the key backend is unavailable");
                Self::unavailable(format!("{why}; nothing was written: retry later"))
            }
            BackendError::OutcomeUnknown(cause) => {
                log_cause("outcome unknown", &*cause);
                Self::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "outcome-unknown",
                    Some(
                        "the key backend did not confirm the write: it may or may not have \
                         happened; GET the key to find out before retrying"
                            .to_owned(),
                    ),
                )
            }
            BackendError::StoreMissing(what) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-missing",
                Some(format!(
                    "{what} holds no key set (wiped, or never created): nothing was written; \
                     an operator must restore it (an import or a replica's snapshot) first"
                )),
            ),
            BackendError::Corrupt { id, reason } => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt-record",
                Some(format!(
                    "the stored record of key `{id}` cannot be read: {reason}"
                )),
            ),
        }
    }
}

/// The refusal of the API's own guard: the layer's challenge, with a problem body.
pub(crate) fn refusal(rejection: &Rejection) -> Response<String> {
    let mut res: Response<String> = rejection.http_response("admin");
    // The body's status is the response's (RFC 9457): 429 for a limit, 403 for a
    // scope or an address, 401 for the key itself.
    let status = res.status();
    let kind = match status {
        StatusCode::TOO_MANY_REQUESTS => "rate-limited",
        StatusCode::FORBIDDEN => "forbidden",
        _ => "unauthenticated",
    };
    let problem = Problem::new(status, kind, Some(rejection.to_string()));
    *res.body_mut() = serde_json::to_string(&problem.document()).unwrap_or_default();
    problem_json(&mut res);
    res
}
