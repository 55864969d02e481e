//! A JSON merge patch (RFC 7396) applied to a key record.

use serde_json::{Map, Value};

use super::{
    model::{instant, with_limits},
    problem::Problem,
};
use crate::ApiKey;

/// `current` with `patch` applied; `null` removes an optional field. `id` and `key`
/// cannot be changed, and an unknown field or a value of the wrong type is refused.
pub(crate) fn apply(current: &ApiKey, patch: &Map<String, Value>) -> Result<ApiKey, Problem> {
    let mut key = current.clone();
    for (field, value) in patch {
        let text = || match value {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            _ => Err(Problem::validation(format!(
                "`{field}` must be a string or null"
            ))),
        };
        let meta = || key.meta.clone().unwrap_or_default();
        match field.as_str() {
            "id" | "key" => {
                return Err(Problem::validation(format!("`{field}` cannot be changed")));
            }
            "scopes" => {
                let scopes = match value {
                    Value::Null => Vec::new(),
                    Value::Array(items) => items
                        .iter()
                        .map(|s| s.as_str().map(Box::<str>::from))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            Problem::validation("`scopes` must be an array of strings")
                        })?,
                    _ => return Err(Problem::validation("`scopes` must be an array of strings")),
                };
                let mut m = meta();
                m.scopes = scopes.into_boxed_slice();
                key.meta = Some(m);
            }
            "tenant" | "owner" | "description" => {
                let new = text()?.map(Box::<str>::from);
                let mut m = meta();
                match field.as_str() {
                    "tenant" => m.tenant = new,
                    "owner" => m.owner = new,
                    _ => m.description = new,
                }
                key.meta = Some(m);
            }
            "not_before" => {
                key.valid_from = match text()? {
                    Some(at) => crate::clock::to_unix_ms(instant(field, &at)?),
                    None => 0,
                };
            }
            "expires_at" => {
                key.valid_until = match text()? {
                    Some(at) => crate::clock::to_unix_ms(instant(field, &at)?),
                    None => u64::MAX,
                };
            }
            "disabled" => {
                key.disabled = match value {
                    Value::Null => false,
                    Value::Bool(b) => *b,
                    _ => {
                        return Err(Problem::validation(
                            "`disabled` must be true, false or null",
                        ));
                    }
                };
            }
            "rate_limits" => {
                let specs = match value {
                    Value::Null => Vec::new(),
                    other => serde_json::from_value(other.clone()).map_err(|_| {
                        Problem::validation(
                            "`rate_limits` must be an array of {\"name\", \"requests\", \"per\"} or null",
                        )
                    })?,
                };
                key = with_limits(key, Some(specs), None, None)?;
            }
            "quota" => {
                let quota = match value {
                    Value::Null => None,
                    other => Some(serde_json::from_value(other.clone()).map_err(|_| {
                        Problem::validation("`quota` must be {\"requests\", \"per\"} or null")
                    })?),
                };
                key = with_limits(key, None, Some(quota), None)?;
            }
            "allowed_ips" => {
                let nets = match value {
                    Value::Null => None,
                    other => Some(serde_json::from_value(other.clone()).map_err(|_| {
                        Problem::validation("`allowed_ips` must be an array of strings or null")
                    })?),
                };
                key = with_limits(key, None, None, Some(nets))?;
            }
            other => return Err(Problem::validation(format!("unknown field `{other}`"))),
        }
    }
    Ok(key)
}
