//! Reading a namespace: where it is (its head), and the whole of it, atomically.

use std::{sync::mpsc, thread, time::Duration};

use redis::Value;

use super::{
    log::{Cursor, StreamId},
    model::{self, Keys},
};
use crate::{
    ApiKey, Error, KeySet,
    key::record,
    source::replica::{self, Clashed},
};

/// A connection to the server, with read and write timeouts.
pub(super) fn connect(
    client: &redis::Client,
    timeout: Duration,
) -> Result<redis::Connection, redis::RedisError> {
    let con = client.get_connection_with_timeout(timeout)?;
    // A whole namespace may take a while to read; a dead peer must not hang us.
    con.set_read_timeout(Some(timeout.max(Duration::from_secs(30))))?;
    con.set_write_timeout(Some(timeout.max(Duration::from_secs(5))))?;
    Ok(con)
}

/// Where a namespace is.
pub(super) enum Head {
    /// It exists: its epoch, version and last log entry.
    At {
        epoch: String,
        version: u64,
        last: StreamId,
    },
    /// No epoch or no version: wiped, partly wiped, or never created.
    Missing,
    /// One of its keys has the wrong type.
    Damaged,
}

/// Where the namespace is, in one atomic step that fails on nothing it finds.
pub(super) fn head(
    con: &mut redis::Connection,
    keys: &Keys,
    script: &redis::Script,
) -> Result<Head, redis::RedisError> {
    let reply: Vec<Value> = script
        .key(&keys.version)
        .key(&keys.records)
        .key(&keys.log)
        .invoke(con)?;
    let mut reply = reply.into_iter();
    let state = match reply.next() {
        Some(Value::Int(n)) => n,
        _ => 2,
    };
    let epoch = reply.next().and_then(super::text);
    let version = reply
        .next()
        .and_then(super::text)
        .and_then(|v| v.parse::<u64>().ok());
    let last = reply
        .next()
        .and_then(super::text)
        .and_then(|v| StreamId::parse(&v))
        .unwrap_or_default();
    Ok(match (state, epoch, version) {
        (0, Some(epoch), Some(version)) => Head::At {
            epoch,
            version,
            last,
        },
        (1, ..) => Head::Missing,
        _ => Head::Damaged,
    })
}

/// What a whole read found.
pub(super) enum Read {
    /// The readable keys, where they leave the follower, and the ids left out for a
    /// digest two of them claim.
    Whole(KeySet, Cursor, Clashed),
    Missing,
    Damaged,
}

/// The whole namespace, read atomically with its epoch, version and last log entry.
/// A record that cannot be read is left out (its key refused), logged at `error`
/// with its id.
pub(super) fn read_all(
    con: &mut redis::Connection,
    keys: &Keys,
    source: &str,
) -> Result<Read, redis::RedisError> {
    // Look first: a missing or damaged namespace is not read whole.
    match head(con, keys, &redis::Script::new(model::HEAD))? {
        Head::At { .. } => {}
        Head::Missing => return Ok(Read::Missing),
        Head::Damaged => return Ok(Read::Damaged),
    }
    /// The namespace's epoch, version and record count.
    type Meta = (Option<String>, Option<u64>, Option<String>);
    let (meta, records, last): (Meta, Value, Value) = redis::pipe()
        .atomic()
        .cmd("HMGET")
        .arg(&keys.version)
        .arg("epoch")
        .arg("version")
        .arg("records")
        .hgetall(&keys.records)
        .cmd("XREVRANGE")
        .arg(&keys.log)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(con)?;
    let (Some(epoch), Some(version), held) = meta else {
        return Ok(Read::Missing);
    };
    let items = match records {
        Value::Array(items) => items,
        Value::Map(map) => map.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    };
    // The hash gone alone (deleted, evicted) while it held records: partly wiped,
    // not zero keys.
    if items.is_empty()
        && held
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    {
        return Ok(Read::Missing);
    }
    let (set, clashed) = key_set(&items, source);
    // Two million small buffers: freed off the path to serving.
    let _ = thread::Builder::new()
        .name("tower-api-key-free".into())
        .spawn(move || drop(items));
    let last = match last {
        Value::Array(entries) => entries
            .into_iter()
            .next()
            .and_then(|e| match e {
                Value::Array(mut parts) if !parts.is_empty() => super::text(parts.swap_remove(0)),
                _ => None,
            })
            .and_then(|id| StreamId::parse(&id))
            .unwrap_or_default(),
        _ => StreamId::default(),
    };
    Ok(Read::Whole(set, Cursor::new(epoch, version, last), clashed))
}

/// The set of the readable keys of an `HGETALL` reply (ids and records, flat). A
/// record that cannot be read, or that shares its digest with another (one secret
/// under two ids: which is meant?), is left out, so that its key is refused; each is
/// logged at `error` with its id; those that share one are returned too.
///
/// A large namespace (a million records is most of a second of JSON) is decoded by
/// worker threads, chunk by chunk, while this thread builds the set from the chunks
/// already decoded: the initial load is what a replica waits for before it serves.
fn key_set(items: &[Value], source: &str) -> (KeySet, Clashed) {
    /// Records per chunk handed to a worker.
    const CHUNK: usize = 16_384;
    let mut set = KeySet::with_capacity(items.len() / 2);
    let mut shared = Vec::new();
    let mut insert = |chunk: &[Value], keys: Vec<Result<ApiKey, Error>>| {
        for (at, key) in keys.into_iter().enumerate() {
            if let Err(error) = key.and_then(|key| set.insert(key)) {
                let id = String::from_utf8_lossy(bytes(&chunk[2 * at])).into_owned();
                replica::refused(source, "Redis", &id, &error);
                if let Error::DuplicateKey { first, second } = error {
                    shared.extend([first, second]);
                }
            }
        }
    };
    let workers = thread::available_parallelism()
        .map_or(1, usize::from)
        .min(4);
    if items.len() < 4 * CHUNK || workers < 2 {
        insert(items, decode_all(items));
    } else {
        let chunks: Vec<&[Value]> = items.chunks(2 * CHUNK).collect();
        thread::scope(|scope| {
            let receivers: Vec<_> = (0..workers)
                .map(|w| {
                    let (tx, rx) = mpsc::sync_channel::<Vec<Result<ApiKey, Error>>>(2);
                    let mine: Vec<&[Value]> =
                        chunks.iter().skip(w).step_by(workers).copied().collect();
                    let spawned = thread::Builder::new()
                        .name("tower-api-key-decode".into())
                        .spawn_scoped(scope, move || {
                            for chunk in mine {
                                if tx.send(decode_all(chunk)).is_err() {
                                    return;
                                }
                            }
                        });
                    // A worker that could not start: its chunks are decoded here.
                    spawned.ok().map(|_| rx)
                })
                .collect();
            for (at, chunk) in chunks.iter().enumerate() {
                let keys = receivers[at % workers]
                    .as_ref()
                    .and_then(|rx| rx.recv().ok())
                    .unwrap_or_else(|| decode_all(chunk));
                insert(chunk, keys);
            }
        });
    }
    replica::without_shared(set, shared)
}

/// A reply's bytes (a field or a value of a hash).
fn bytes(value: &Value) -> &[u8] {
    match value {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.as_bytes(),
        _ => &[],
    }
}

/// The keys of a flat list of ids and records, in order.
fn decode_all(items: &[Value]) -> Vec<Result<ApiKey, Error>> {
    items
        .chunks_exact(2)
        .map(|pair| record::decode(&String::from_utf8_lossy(bytes(&pair[0])), bytes(&pair[1])))
        .collect()
}

/// Whether Redis answered with a refusal rather than not at all.
pub(super) fn is_refusal(e: &redis::RedisError) -> bool {
    !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal())
}
