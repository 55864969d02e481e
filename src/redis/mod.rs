//! A fleet on Redis (feature `redis`): every replica follows one shared namespace of
//! keys, which the key-management API of any replica writes.
//!
//! - [`RedisSource`] is each replica's [`KeySource`](crate::KeySource): it loads the
//!   namespace, follows its change log (each version applied by id once it is held
//!   whole), reads it whole again on anything the log cannot explain, and keeps
//!   serving its last good keys while Redis is down or the namespace is missing.
//! - [`RedisBackend`] is the [`AdminBackend`](crate::admin::AdminBackend) that writes
//!   the namespace, one atomic Lua script per call; it creates a namespace, or
//!   restores a wiped one, only when told to ([`RedisBackend::import_file`],
//!   [`RedisBackend::restore_file`]).
//!
//! # What is stored
//!
//! For namespace `ns` (`{ns}` is the cluster hash tag):
//!
//! | Redis key | type | holds |
//! |---|---|---|
//! | `tak:{ns}:keys` | hash | key id → the key's record, JSON: `id` (the same id), `sha256`, `scopes`, `tenant`, `owner`, `description`, `not_before`, `expires_at`, `created_at` (Unix ms), `disabled`, `created_by`, `rotated_from`. Never a secret. |
//! | `tak:{ns}:version` | hash | `epoch`: the namespace's identity, new at each explicit (re)creation; `version`: one more at every change. The namespace exists while both do. |
//! | `tak:{ns}:log` | stream, ~10,000 entries | one entry per key changed: `e` (epoch), `v` (version), `i` and `n` (index in the version, and its size), `op` (`put`, `del`, or `reset` at a re-creation), `id`, `record` |
//! | `tak:{ns}:requests` | hash | key id → requests, the fleet's (replicas add theirs in batches) |
//! | `tak:{ns}:last_used` | hash | key id → Unix seconds of the fleet's latest use |
//! | `tak:{ns}:write:<nonce>` | string, expires | `done` or `fenced`: how a write whose answer was lost is settled |
//! | `tak:{ns}:staging:<epoch>` | hash, expires | a re-creation being written, swapped in whole |
//!
//! A change writes the record, the version and its log entries in one script, which
//! refuses to run when the namespace has no epoch or version: a wiped namespace is
//! never re-created by a write that happens to come first. A replica reads the hash
//! with the epoch, version and last log id in one transaction, then reads the log
//! from there (`XREAD BLOCK`). It applies a version only when it holds all `n` of
//! its entries, of its epoch, numbered one more than the last it applied; on
//! anything else (a gap, a version whose start was trimmed, a version number seen
//! twice, an unknown operation, another epoch) it reads the hash whole. Every few
//! seconds it compares the namespace's epoch and version with its own: a new epoch,
//! a version lower than its own, or one ahead of what the log holds also means a
//! whole read.
//!
//! # When Redis is wiped
//!
//! A namespace without its epoch or version (Redis flushed, restarted without
//! persistence, the key evicted or deleted), or without its records while its
//! version hash says it holds some (the records hash evicted or deleted alone), is
//! **not** "zero keys":
//!
//! - replicas keep their last good keys and say so (a `warn`, and
//!   [`KeyStore::last_reload`](crate::KeyStore::last_reload));
//! - the API's writes are refused ([`BackendError::StoreMissing`], HTTP 503
//!   `store-missing`), and so is listing, rather than answering an empty list;
//! - an operator restores it, explicitly: [`RedisBackend::restore_file`] from a
//!   replica's snapshot ([`RedisSource::with_snapshot`]) or an export, or
//!   [`RedisBackend::import_file`] from a key file. Either gives the namespace a new
//!   epoch, and every replica reads it whole.
//!
//! A namespace that **went back** within its epoch (Redis restarted from an older
//! save: RDB snapshots, `appendfsync everysec`, a backup) lost writes, revocations
//! among them. A replica that saw a later version, or applied one whose log entry is
//! gone, does not take it: it keeps its last good keys, says so, and follows the
//! namespace again once it is restored as above. An API whose backend saw the later
//! version refuses writes into it (503 `store-missing`: a restore would replace
//! them); one that never saw it cannot tell.
//!
//! A record a replica cannot read (not a key record, or one stored under another id
//! than the one it names) is that one key refused, logged at `error` with its id; the
//! API answers `corrupt-record` for it, and can delete it by the id it is stored
//! under.
//!
//! [`BackendError::StoreMissing`]: crate::admin::BackendError::StoreMissing

mod backend;
mod follow;
mod lease;
mod link;
mod log;
mod model;
pub(crate) mod moves;
mod read;
mod source;

use redis::Value;

pub use self::{backend::RedisBackend, source::RedisSource};

/// How many changes one version of a large write holds, and the most any holds.
#[cfg(feature = "cli")]
pub(crate) use self::model::{CHUNK, MAX_VERSION_ENTRIES};
use crate::Error;

/// What a namespace with a key of the wrong type (or a version counter that is not
/// a whole number) is said as.
const DAMAGED: &str = "a key of the namespace has the wrong type in Redis, or its version is not \
                       a whole number (written by something else than this crate?); keeping \
                       the last good keys";

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

/// What went wrong with Redis, for callers and reports: the kind of failure and
/// Redis's error code, never Redis's own text, which names scripts by their hash
/// and can quote what a command carried. (The whole error is logged at `debug`.)
fn describe(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        "Redis did not answer in time".to_owned()
    } else if e.is_connection_refusal() {
        "Redis refused the connection (not running?)".to_owned()
    } else if e.is_io_error() || e.is_connection_dropped() {
        "the connection to Redis was lost".to_owned()
    } else if e.kind() == redis::ErrorKind::AuthenticationFailed {
        "Redis refused the credentials".to_owned()
    } else if let Some(code) = e.code() {
        let code: String = code
            .chars()
            .take(24)
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        format!("Redis refused the command ({code})")
    } else {
        format!("Redis failed ({})", e.category())
    }
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
            let mut out = Vec::with_capacity(items.len() / 2);
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
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}
