//! A fleet on Redis (feature `redis`): every replica follows one shared namespace of
//! keys, which the key-management API of any replica writes.
//!
//! - [`RedisSource`] is each replica's [`KeySource`](crate::KeySource): it loads the
//!   namespace, follows its change log (each change applied by id), resyncs after a
//!   gap or a reconnection, and keeps serving its last good keys while Redis is down.
//! - [`RedisBackend`] is the [`AdminBackend`](crate::admin::AdminBackend) that writes
//!   the namespace, one atomic Lua script per call, and seeds or exports it from and
//!   to a key file.
//!
//! # What is stored
//!
//! For namespace `ns` (`{ns}` is the cluster hash tag):
//!
//! | Redis key | type | holds |
//! |---|---|---|
//! | `tak:{ns}:keys` | hash | key id → the key's record, JSON: `id`, `sha256`, `scopes`, `tenant`, `owner`, `description`, `not_before`, `expires_at`, `created_at` (Unix ms), `disabled`, `created_by`, `rotated_from`. Never a secret. |
//! | `tak:{ns}:version` | integer | one more at every change; the namespace exists while it does |
//! | `tak:{ns}:log` | stream, ~10,000 entries | one entry per key changed: `v` (version), `op` (`put`/`del`), `id`, `record` |
//! | `tak:{ns}:requests` | hash | key id → requests, the fleet's (replicas add theirs in batches) |
//! | `tak:{ns}:last_used` | hash | key id → Unix seconds of the fleet's latest use |
//!
//! A change writes the record, the version and the log entry in one script. A replica
//! reads the hash, the version and the last log id in one transaction, then reads the
//! log from there (`XREAD BLOCK`); it checks the version every few seconds, the safety
//! net for a lost signal. A namespace whose version counter is gone (a wiped Redis) is
//! not "zero keys": replicas keep their last good set and say so.

mod backend;
mod model;
mod source;

use redis::Value;

pub use self::{backend::RedisBackend, source::RedisSource};
use crate::Error;

/// A client for `url`, checked but not connected.
fn client(url: &str, namespace: &str) -> Result<redis::Client, Error> {
    if namespace.is_empty() || namespace.contains(['{', '}']) {
        return Err(Error::custom(
            "redis",
            "the namespace must be non-empty, without braces",
        ));
    }
    // The URL may hold a password: say what is wrong without repeating it.
    redis::Client::open(url).map_err(|_| {
        Error::custom(
            format!("redis:{namespace}"),
            "not a Redis URL (redis://host:port/db, rediss:// for TLS)",
        )
    })
}

/// Where the client connects, without the password.
fn server(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}

/// A Redis error of our own making (a bad record).
fn redis_error(message: String) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Client, "invalid key record", message))
}

/// The pairs of a hash or a flat array of fields and values.
fn pairs(value: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    let bytes = |v: Value| match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(n) => n.to_string().into_bytes(),
        _ => Vec::new(),
    };
    match value {
        Value::Map(map) => map.into_iter().map(|(k, v)| (bytes(k), bytes(v))).collect(),
        Value::Array(items) => {
            let mut items = items.into_iter();
            let mut out = Vec::new();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                out.push((bytes(k), bytes(v)));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// A value as text.
fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}
