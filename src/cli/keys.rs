//! `keys list|get|create|patch|rotate|revoke`: requests to the key-management API,
//! the crate's own in this process or a running one.

use http::Method;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value, json};

use super::{
    Done, Exit, Failure, SecretFile,
    args::{Fields, KeysCommand},
    output::{self, Out},
    target::{Admin, Reply, Target, problem},
};

const JSON: &str = "application/json";
const MERGE_PATCH: &str = "application/merge-patch+json";

pub(crate) fn run(command: KeysCommand, max: u64, out: Out) -> Done {
    super::runtime()?.block_on(async move {
        match command {
            KeysCommand::List {
                target,
                tenant,
                status,
            } => {
                let admin = Target::of(&target)?.admin(max, &[]).await?;
                let items = list(&admin, tenant.as_deref(), status.as_deref()).await?;
                if out.json() {
                    out.print_json(&Value::Array(items));
                } else {
                    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
                    output::table(
                        &["ID", "STATUS", "SCOPES", "TENANT", "EXPIRES", "LAST USED"],
                        &rows,
                    );
                }
                Ok(Exit::Ok)
            }
            KeysCommand::Get { id, target } => {
                let admin = Target::of(&target)?.admin(max, &[]).await?;
                let reply = get(&admin, &id).await?;
                show(out, &reply.body, false);
                Ok(Exit::Ok)
            }
            KeysCommand::Create {
                target,
                fields,
                id,
                prefix,
                secret,
            } => {
                let admin = Target::of(&target)?.admin(max, &fields.scopes).await?;
                let mut body = body_of(&fields);
                if let Some(id) = id {
                    body.insert("id".into(), id.into());
                }
                if let Some(prefix) = prefix {
                    body.insert("prefix".into(), prefix.into());
                }
                // The secret's file first: one that cannot be made costs no key.
                let file = secret_file(secret.secret_file.as_deref())?;
                let reply = admin
                    .send(
                        Method::POST,
                        "/v1/api-keys",
                        None,
                        JSON,
                        Some(&Value::Object(body)),
                    )
                    .await?;
                issued(out, reply, file)
            }
            KeysCommand::Patch {
                id,
                target,
                fields,
                clear_scopes,
                unset,
                disabled,
                version,
            } => {
                let mut body = body_of(&fields);
                if clear_scopes {
                    body.insert("scopes".into(), json!([]));
                }
                for field in unset {
                    if !["tenant", "owner", "description", "not_before", "expires_at"]
                        .contains(&field.as_str())
                    {
                        return Err(Failure::new(
                            Exit::Usage,
                            format!(
                                "--unset {field}: only tenant, owner, description, not_before \
                                 and expires_at can be removed"
                            ),
                        ));
                    }
                    body.insert(field, Value::Null);
                }
                if let Some(disabled) = disabled {
                    body.insert("disabled".into(), disabled.into());
                }
                if body.is_empty() {
                    return Err(Failure::new(Exit::Usage, "nothing to change: give a field"));
                }
                let admin = Target::of(&target)?.admin(max, &fields.scopes).await?;
                let tag = version_of(&admin, &id, version.if_match).await?;
                let reply = admin
                    .send(
                        Method::PATCH,
                        &key_path(&id, ""),
                        Some(&tag),
                        MERGE_PATCH,
                        Some(&Value::Object(body)),
                    )
                    .await?;
                let body = success(reply)?;
                show(out, &body, false);
                Ok(Exit::Ok)
            }
            KeysCommand::Rotate {
                id,
                target,
                new_id,
                overlap,
                version,
                secret,
            } => {
                let admin = Target::of(&target)?.admin(max, &[]).await?;
                let tag = version_of(&admin, &id, version.if_match).await?;
                let mut body = Map::new();
                if let Some(new_id) = new_id {
                    body.insert("id".into(), new_id.into());
                }
                if let Some(overlap) = overlap {
                    body.insert("overlap_seconds".into(), overlap.into());
                }
                let file = secret_file(secret.secret_file.as_deref())?;
                let reply = admin
                    .send(
                        Method::POST,
                        &key_path(&id, "/rotate"),
                        Some(&tag),
                        JSON,
                        Some(&Value::Object(body)),
                    )
                    .await?;
                issued(out, reply, file)
            }
            KeysCommand::Revoke {
                id,
                target,
                version,
            } => {
                let admin = Target::of(&target)?.admin(max, &[]).await?;
                let tag = version_of(&admin, &id, version.if_match).await?;
                let reply = admin
                    .send(Method::DELETE, &key_path(&id, ""), Some(&tag), JSON, None)
                    .await?;
                if !reply.status.is_success() {
                    return Err(problem(&reply));
                }
                written_note(&reply);
                if out.json() {
                    out.print_json(&json!({ "id": id, "revoked": true }));
                } else {
                    output::line(&format!("revoked {id}"));
                }
                Ok(Exit::Ok)
            }
        }
    })
}

/// The path of a key (and a suffix such as `/rotate`), its id percent-encoded.
fn key_path(id: &str, suffix: &str) -> String {
    format!(
        "/v1/api-keys/{}{suffix}",
        utf8_percent_encode(id, NON_ALPHANUMERIC)
    )
}

/// Every key, all pages.
pub(crate) async fn list(
    admin: &Admin,
    tenant: Option<&str>,
    status: Option<&str>,
) -> Result<Vec<Value>, Failure> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    // A server whose cursors come round again (or never end) is not followed for
    // ever: each cursor once, and at most `MAX_LISTED` keys.
    let mut seen = std::collections::HashSet::new();
    loop {
        let mut path = "/v1/api-keys?limit=1000".to_owned();
        for (name, value) in [
            ("tenant", tenant),
            ("status", status),
            ("cursor", cursor.as_deref()),
        ] {
            if let Some(value) = value {
                path.push_str(&format!(
                    "&{name}={}",
                    utf8_percent_encode(value, NON_ALPHANUMERIC)
                ));
            }
        }
        let reply = admin.send(Method::GET, &path, None, JSON, None).await?;
        let mut body = success(reply)?;
        let Some(Value::Array(page)) = body.get_mut("items").map(Value::take) else {
            return Err(Failure::new(
                Exit::Unavailable,
                "the key-management API's list has no `items`: is the URL the API's?",
            ));
        };
        items.extend(page);
        if items.len() > MAX_LISTED {
            return Err(Failure::new(
                Exit::Unavailable,
                format!("the key-management API listed more than {MAX_LISTED} keys; stopped"),
            ));
        }
        match body.get("next_cursor").and_then(Value::as_str) {
            Some(next) if !seen.insert(next.to_owned()) => {
                return Err(Failure::new(
                    Exit::Unavailable,
                    "the key-management API's pages come round again (a cursor seen before); \
                     stopped",
                ));
            }
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(items),
        }
    }
}

/// The most keys `list` reads from an API before it gives up.
const MAX_LISTED: usize = 10_000_000;

async fn get(admin: &Admin, id: &str) -> Result<Reply, Failure> {
    let reply = admin
        .send(Method::GET, &key_path(id, ""), None, JSON, None)
        .await?;
    if reply.status.is_success() {
        Ok(reply)
    } else if reply.status == http::StatusCode::NOT_FOUND {
        Err(Failure::new(Exit::NotFound, format!("no key `{id}`")))
    } else {
        Err(problem(&reply))
    }
}

/// The version a change is conditional on: the one given, or the one read now.
async fn version_of(admin: &Admin, id: &str, given: Option<String>) -> Result<String, Failure> {
    if let Some(tag) = given {
        return Ok(tag);
    }
    get(admin, id)
        .await?
        .etag
        .ok_or_else(|| Failure::new(Exit::Unavailable, "the API gave the key no version (ETag)"))
}

fn success(reply: Reply) -> Result<Value, Failure> {
    if !reply.status.is_success() {
        return Err(problem(&reply));
    }
    written_note(&reply);
    Ok(reply.body)
}

/// 202: written, not yet enforced by the API's store.
fn written_note(reply: &Reply) {
    if reply.status == http::StatusCode::ACCEPTED {
        eprintln!("tower-api-key: written; the API's store does not enforce it yet (202 Accepted)");
    }
}

/// The new secret's file, created now, empty, if one is asked for.
fn secret_file(path: Option<&std::path::Path>) -> Result<Option<SecretFile>, Failure> {
    path.map(SecretFile::create).transpose()
}

/// A new key's answer: its secret once (standard output or the secret file), its
/// resource separately.
fn issued(out: Out, reply: Reply, secret_file: Option<SecretFile>) -> Done {
    let mut body = success(reply)?;
    let secret = match body.as_object_mut().and_then(|b| b.remove("key")) {
        Some(Value::String(secret)) => zeroize::Zeroizing::new(secret),
        _ => {
            return Err(Failure::new(
                Exit::Unavailable,
                "the API's answer holds no key",
            ));
        }
    };
    if let Some(file) = secret_file {
        file.write(&secret).map_err(|f| {
            let id = body.get("id").and_then(Value::as_str).unwrap_or("?");
            Failure::new(
                Exit::SecretNotSaved,
                format!(
                    "key `{id}` was written, but not its secret file: {}; if the secret \
                     is nowhere, revoke the key",
                    f.message
                ),
            )
        })?;
        show(out, &body, false);
    } else if out.json() {
        body["key"] = Value::String(secret.to_string());
        out.print_json(&body);
    } else {
        output::line(&secret);
        show(out, &body, true);
    }
    Ok(Exit::Ok)
}

/// One key: JSON, or its fields one a line (on standard error when standard output
/// carries the secret).
fn show(out: Out, body: &Value, to_stderr: bool) {
    if out.json() {
        out.print_json(body);
        return;
    }
    let mut text = String::new();
    if let Some(fields) = body.as_object() {
        for (name, value) in fields {
            let value = match value {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(","),
                Value::Object(o) => o
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "{k}={}",
                            v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.to_string(),
            };
            let (name, value) = (output::one_line(name), output::one_line(&value));
            text.push_str(&format!("{name:<13} {value}\n"));
        }
    }
    if to_stderr {
        eprint!("{}", output::visible(&text));
    } else {
        output::line(text.trim_end());
    }
}

fn text(item: &Value, field: &str) -> String {
    item.get(field)
        .and_then(Value::as_str)
        .unwrap_or("-")
        .to_owned()
}

fn row(item: &Value) -> Vec<String> {
    let scopes = item
        .get("scopes")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let last = item
        .get("usage")
        .and_then(|u| u.get("last_used"))
        .and_then(Value::as_str)
        .unwrap_or("never")
        .to_owned();
    vec![
        text(item, "id"),
        text(item, "status"),
        scopes,
        text(item, "tenant"),
        text(item, "expires_at"),
        last,
    ]
}

/// The JSON body of the fields given.
fn body_of(fields: &Fields) -> Map<String, Value> {
    let mut body = Map::new();
    if !fields.scopes.is_empty() {
        body.insert("scopes".into(), json!(fields.scopes));
    }
    for (name, value) in [
        ("tenant", &fields.tenant),
        ("owner", &fields.owner),
        ("description", &fields.description),
        ("not_before", &fields.not_before),
        ("expires_at", &fields.expires_at),
    ] {
        if let Some(value) = value {
            body.insert(name.into(), value.clone().into());
        }
    }
    body
}
