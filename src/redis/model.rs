//! What is stored under which Redis key, in one place.
//!
//! A namespace `ns` is three keys, with `{ns}` as the cluster hash tag:
//!
//! - `tak:{ns}:keys`, a hash: key id → the key's record, as JSON (its SHA-256 and its
//!   metadata; never a secret);
//! - `tak:{ns}:version`, an integer: one more at every change. The namespace exists
//!   while it does: a Redis without it is wiped or new, never "no keys";
//! - `tak:{ns}:log`, a stream capped at about 10,000 entries: one per key changed,
//!   `v` (the version), `op` (`put` or `del`), `id`, and for `put` the `record`.
//!
//! Every change writes all three in one Lua script, atomically. Fleet usage lives in
//! `tak:{ns}:requests` (key id → requests, added to by each replica) and
//! `tak:{ns}:last_used` (key id → Unix seconds, the latest of any replica).

use std::{borrow::Cow, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{ApiKey, Error, clock, key::digest::KeyDigest};

/// How many log entries are kept: a replica further behind than this resyncs whole.
pub(crate) const LOG_LEN: usize = 10_000;

/// The Redis keys of one namespace.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    pub(crate) records: String,
    pub(crate) version: String,
    pub(crate) log: String,
    pub(crate) requests: String,
    pub(crate) last_used: String,
}

impl Keys {
    pub(crate) fn of(namespace: &str) -> Self {
        let key = |part: &str| format!("tak:{{{namespace}}}:{part}");
        Self {
            records: key("keys"),
            version: key("version"),
            log: key("log"),
            requests: key("requests"),
            last_used: key("last_used"),
        }
    }
}

/// A key's record: what `tak:{ns}:keys` holds for it. Instants in Unix milliseconds.
/// Strings are borrowed from the reply where they hold no escapes: a million records
/// are read at start-up.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Record<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    sha256: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    tenant: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    owner: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    description: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not_before: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    disabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    created_by: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    rotated_from: Option<Cow<'a, str>>,
}

/// The JSON record of `key`: the same key always gives the same bytes, which the
/// write script compares to detect a concurrent change.
pub(crate) fn encode(key: &ApiKey) -> String {
    let record = Record {
        id: key.id().into(),
        sha256: key.digest.to_hex().into(),
        scopes: key.scopes().map(str::to_owned).collect(),
        tenant: key.tenant().map(Cow::from),
        owner: key.owner().map(Cow::from),
        description: key.description().map(Cow::from),
        not_before: (key.valid_from != 0).then_some(key.valid_from),
        expires_at: (key.valid_until != u64::MAX).then_some(key.valid_until),
        disabled: key.disabled,
        created_at: key.meta.as_ref().and_then(|m| m.created_at),
        created_by: key.created_by().map(Cow::from),
        rotated_from: key.rotated_from().map(Cow::from),
    };
    serde_json::to_string(&record).unwrap_or_default()
}

/// The key a record stands for. Errors name the id, never a value.
pub(crate) fn decode(id: &str, json: &[u8]) -> Result<ApiKey, Error> {
    let record: Record = serde_json::from_slice(json)
        .map_err(|_| Error::invalid(Some(id), "the record in Redis is not a key record"))?;
    let digest = KeyDigest::from_hex(&record.sha256)
        .ok_or_else(|| Error::invalid(Some(id), "`sha256` must be 64 hexadecimal digits"))?;
    let mut key =
        ApiKey::from_digest(Arc::from(&*record.id), digest).with_disabled(record.disabled);
    if !record.scopes.is_empty() {
        key = key.with_scopes(record.scopes);
    }
    if let Some(tenant) = record.tenant {
        key = key.with_tenant(&*tenant);
    }
    if let Some(owner) = record.owner {
        key = key.with_owner(&*owner);
    }
    if let Some(description) = record.description {
        key = key.with_description(&*description);
    }
    if let Some(at) = record.not_before {
        key = key.with_not_before(clock::from_unix_ms(at));
    }
    if let Some(at) = record.expires_at {
        key = key.with_expires_at(clock::from_unix_ms(at));
    }
    if let Some(at) = record.created_at {
        key = key.with_created_at(clock::from_unix_ms(at));
    }
    if let Some(by) = record.created_by {
        key = key.with_created_by(&*by);
    }
    if let Some(from) = record.rotated_from {
        key = key.with_rotated_from(&*from);
    }
    Ok(key)
}

/// Applies a batch of changes atomically, if every condition holds; one version for
/// the batch, one log entry per key.
///
/// KEYS: records, version, log. ARGV: the log's length, then per change: `put` or
/// `del`, the id, the condition (`-` absent, `*` anything, else the exact current
/// record), the new record (empty for `del`).
///
/// Returns `{version, n}`, or `{-1, i}` (change i's id exists), `{-2, i}` (absent),
/// `{-3, i}` (changed since read).
pub(crate) const APPLY: &str = r"
local n = (#ARGV - 1) / 4
for i = 0, n - 1 do
  local id, expect = ARGV[3 + i * 4], ARGV[4 + i * 4]
  local cur = redis.call('HGET', KEYS[1], id)
  if expect == '-' then
    if cur then return {-1, i} end
  elseif expect ~= '*' then
    if not cur then return {-2, i} end
    if cur ~= expect then return {-3, i} end
  end
end
local v = redis.call('INCR', KEYS[2])
for i = 0, n - 1 do
  local kind, id, record = ARGV[2 + i * 4], ARGV[3 + i * 4], ARGV[5 + i * 4]
  if kind == 'put' then
    redis.call('HSET', KEYS[1], id, record)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', 'v', v, 'op', 'put', 'id', id, 'record', record)
  else
    redis.call('HDEL', KEYS[1], id)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', 'v', v, 'op', 'del', 'id', id)
  end
end
return {v, n}
";

/// Adds a replica's counts: KEYS: requests, last_used; ARGV: pairs of id and
/// `requests:last_used`. The count is added, the later stamp kept.
pub(crate) const ADD_USAGE: &str = r"
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  local sep = string.find(ARGV[i + 1], ':')
  local n = tonumber(string.sub(ARGV[i + 1], 1, sep - 1))
  local at = tonumber(string.sub(ARGV[i + 1], sep + 1))
  if n > 0 then redis.call('HINCRBY', KEYS[1], id, n) end
  local cur = tonumber(redis.call('HGET', KEYS[2], id) or '0')
  if at > cur then redis.call('HSET', KEYS[2], id, at) end
end
return 1
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_hold_no_secret() {
        let key = ApiKey::new("billing", "the-secret")
            .with_scopes(["read"])
            .with_tenant("t")
            .with_created_by("root")
            .with_expires_at(clock::from_unix_ms(1_800_000_000_123));
        let json = encode(&key);
        assert!(!json.contains("the-secret"), "{json}");
        let back = decode("billing", json.as_bytes()).unwrap();
        assert_eq!(encode(&back), json, "the same bytes again");
        assert!(back.digest == key.digest);
        let err = decode("x", br#"{"id":"x","sha256":"not-hex-secret"}"#)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("not-hex-secret"), "{err}");
        assert_eq!(Keys::of("payments").records, "tak:{payments}:keys");
    }
}
