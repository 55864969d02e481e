//! Issue 16, "nothing lost, nothing resurrected", on Redis: each finding made by
//! attacking the fleet becomes a test here, against a real `redis-server` (see
//! `redis_support`). Replicas must apply every change whole, never apply one twice or
//! out of order, never read a wiped namespace as "zero keys", and a record they cannot
//! read is one refused key, never a frozen replica.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "redis")]

mod common;
mod redis_support;

use std::{
    thread,
    time::{Duration, Instant},
};

use redis_support::*;
use serde_json::json;
use tower_api_key::{
    ApiKey, ChannelSource, KeyPublisher, KeySet, KeyStore,
    admin::{AdminBackend, BackendError},
    redis::RedisBackend,
};

/// How long a replica may take to reach what a test waits for. A fault these tests
/// show leaves a replica wrong for good, so a generous bound loses nothing; a short
/// one failed on a two-core machine running other builds, with 300,000 keys to apply.
const BOUND: Duration = Duration::from_secs(15);

/// A store following `ns` beside a channel source, whose publisher can hold the
/// store's writer (a large publish) so that the Redis follower cannot apply anything
/// meanwhile: how a replica falls behind the log on demand.
fn held_store(redis: &Redis, ns: &str) -> (KeyStore, KeyPublisher) {
    let store = KeyStore::new();
    let (channel, publisher) = ChannelSource::new(KeySet::new());
    store.add_source(channel.with_name("bulk")).unwrap();
    // No version check during the test: what the log shows must be enough.
    store
        .add_source(source(redis, ns).with_version_check(Duration::from_secs(60)))
        .unwrap();
    (store, publisher)
}

/// A large set for the channel source: publishing it holds the store's writer for a
/// few hundred milliseconds.
fn bulk(n: usize, round: usize) -> KeySet {
    KeySet::from_keys(
        (0..n).map(|i| ApiKey::new(format!("bulk-{round}-{i}"), format!("bulk-{round}-{i}-s"))),
    )
    .unwrap()
}

/// Publishes `set` on a thread of its own; returns when it finished.
fn hold(publisher: KeyPublisher, set: KeySet) -> thread::JoinHandle<Instant> {
    let handle = thread::spawn(move || {
        publisher.publish(set).unwrap();
        Instant::now()
    });
    // Let it take the writer.
    thread::sleep(Duration::from_millis(30));
    handle
}

/// Whether `store` has every id of the namespace's hash from Redis, and `others` keys
/// besides (the other source's).
fn equals_redis(store: &KeyStore, redis: &Redis, ns: &str, others: usize) -> bool {
    let name = format!("redis:{ns}");
    let ids = redis.ids(ns);
    store.len() == ids.len() + others
        && ids
            .iter()
            .all(|id| store.get(id).is_some_and(|k| k.source() == name))
}

/// Finding 1: one 1-entry version then a 1,000-entry one, read by a follower that
/// was behind: `XREAD COUNT 1000` returns the first and 999 of the second, and the
/// follower must not treat the second as applied until it holds all of it.
#[tokio::test]
async fn a_version_split_across_two_log_reads_is_applied_whole() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "split").await;
    let (store, publisher) = held_store(&redis, "split");
    let set = bulk(300_000, 0);
    let held = hold(publisher, set);
    // The follower reads this, then waits for the writer...
    import(&redis, "split", &keys_file("c", 1)).await;
    // ...while these two versions are written behind it.
    import(&redis, "split", &keys_file("a", 1)).await;
    import(&redis, "split", &keys_file("b", 1000)).await;
    let written = Instant::now();
    let released = tokio::task::spawn_blocking(move || held.join().unwrap())
        .await
        .unwrap();
    assert!(
        released > written,
        "the writer was released before the versions were written: inconclusive"
    );
    eventually("the replica holds every key of Redis", BOUND, || {
        equals_redis(&store, &redis, "split", 300_000)
    })
    .await;
    assert!(store.verify("b-999-secret").is_ok());
}

/// Finding 1: `MAXLEN ~` (or `XTRIM`) removing the start of a version a follower has
/// not read: what is left of it is not the version.
#[tokio::test]
async fn a_version_whose_start_was_trimmed_makes_a_resync() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "trim").await;
    let (store, publisher) = held_store(&redis, "trim");
    let held = hold(publisher, bulk(300_000, 0));
    import(&redis, "trim", &keys_file("c", 1)).await;
    import(&redis, "trim", &keys_file("b", 1000)).await;
    // Trim the log up to the 11th entry of the 1,000-entry version.
    let log = "tak:{trim}:log";
    let redis::Value::Array(entries) = redis.query(&["XRANGE", log, "-", "+"]).unwrap() else {
        panic!("no log")
    };
    let ids: Vec<String> = entries
        .into_iter()
        .filter_map(|e| match e {
            redis::Value::Array(mut parts) => match parts.swap_remove(0) {
                redis::Value::BulkString(b) => String::from_utf8(b).ok(),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let eleventh = &ids[ids.len() - 1000 + 10];
    assert!(
        !redis
            .cli(&["XTRIM", log, "MINID", "=", eleventh])
            .is_empty()
    );
    let written = Instant::now();
    let released = tokio::task::spawn_blocking(move || held.join().unwrap())
        .await
        .unwrap();
    assert!(released > written, "inconclusive: released too early");
    eventually("the replica holds every key of Redis", BOUND, || {
        equals_redis(&store, &redis, "trim", 300_000)
    })
    .await;
    assert!(store.verify("b-0-secret").is_ok());
}

/// Finding 2: the version counter deleted (or evicted): writes are refused, not
/// written behind the replicas' backs, and an explicit re-creation is followed.
#[tokio::test]
async fn a_missing_version_counter_refuses_writes_and_replicas_follow_a_recreation() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "nover").await;
    let writer = replica(&redis, "nover", true).await;
    let other = replica(&redis, "nover", false).await;
    assert_eq!(redis.cli(&["DEL", "tak:{nover}:version"]), "1");
    let (code, body) = api(
        writer.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/reader",
        None,
    )
    .await;
    assert_eq!((code, problem(&body)), (503, "store-missing"), "{body}");
    assert!(
        redis.ids("nover").contains(&"reader".to_owned()),
        "nothing written"
    );
    for r in [&writer, &other] {
        assert_eq!(status(r.addr, "reader-secret").await, 200);
    }
    // Recreated explicitly, with one more key.
    import(
        &redis,
        "nover",
        &format!("{SEED}\n[[keys]]\nid = \"late\"\nsecret = \"late-secret\"\n"),
    )
    .await;
    for r in [&writer, &other] {
        until(r.addr, "late-secret", 200, BOUND).await;
    }
    // And a revocation afterwards is enforced everywhere.
    let (code, body) = api(
        writer.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/reader",
        None,
    )
    .await;
    assert_eq!(code, 204, "{body}");
    for r in [&writer, &other] {
        until(r.addr, "reader-secret", 401, BOUND).await;
    }
}

/// Finding 3: after a wipe, one create through the API must not become the whole
/// namespace every replica applies.
#[tokio::test]
async fn a_wiped_namespace_refuses_api_writes_and_lists() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "wipe1").await;
    let writer = replica(&redis, "wipe1", true).await;
    let other = replica(&redis, "wipe1", false).await;
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    let (code, body) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "solo"})),
    )
    .await;
    assert_eq!((code, problem(&body)), (503, "store-missing"), "{body}");
    assert!(redis.ids("wipe1").is_empty(), "nothing written");
    assert_eq!(redis.cli(&["EXISTS", "tak:{wipe1}:version"]), "0");
    let (code, body) = api(writer.addr, reqwest::Method::GET, "/v1/api-keys", None).await;
    assert_eq!((code, problem(&body)), (503, "store-missing"), "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in [&writer, &other] {
        assert_eq!(status(r.addr, "reader-secret").await, 200);
        assert_eq!(status(r.addr, "root-secret").await, 200);
    }
}

/// Finding 4: a record that is not a key record (not JSON, or a `secret` where the
/// digest belongs) is that one key refused, not every replica frozen.
#[tokio::test]
async fn an_unreadable_record_is_one_refused_key_not_a_frozen_replica() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "bad").await;
    let writer = replica(&redis, "bad", true).await;
    let other = replica(&redis, "bad", false).await;
    let keys = "tak:{bad}:keys";
    redis.cli(&["HSET", keys, "bad1", "not json"]);
    redis.cli(&[
        "HSET",
        keys,
        "bad2",
        r#"{"id":"bad2","secret":"plain-secret"}"#,
    ]);
    // Every connection cut: a replica reconnects (and may read everything again).
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = api(
        writer.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/reader",
        None,
    )
    .await;
    assert_eq!(code, 204, "{body}");
    for r in [&writer, &other] {
        until(r.addr, "reader-secret", 401, BOUND).await;
        assert_eq!(status(r.addr, "plain-secret").await, 401);
    }
    // A replica starting now gets every readable key.
    let fresh = replica(&redis, "bad", false).await;
    assert_eq!(status(fresh.addr, "root-secret").await, 200);
    assert_eq!(status(fresh.addr, "plain-secret").await, 401);
    // The API says which record is broken: the store's fault, not the caller's.
    let (code, body) = api(writer.addr, reqwest::Method::GET, "/v1/api-keys", None).await;
    assert_eq!((code, problem(&body)), (500, "corrupt-record"), "{body}");
    assert!(!body.to_string().contains("plain-secret"), "{body}");
}

/// Finding 5: a record stored under one id that names another is refused, and can be
/// removed by the id it is stored under.
#[tokio::test]
async fn a_record_naming_another_id_is_refused_and_removable() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "alias").await;
    let record = format!(
        r#"{{"id":"phantom","sha256":"{}"}}"#,
        sha256_hex("ghost-secret")
    );
    redis.cli(&["HSET", "tak:{alias}:keys", "ghost", &record]);
    let r = replica(&redis, "alias", true).await;
    assert_eq!(status(r.addr, "root-secret").await, 200);
    assert_eq!(status(r.addr, "ghost-secret").await, 401, "a live alias");
    let backend = RedisBackend::new(&redis.url(), "alias").unwrap();
    match backend.get("ghost").await {
        Err(BackendError::Corrupt { id, .. }) => assert_eq!(id, "ghost"),
        other => panic!("{other:?}"),
    }
    // The API clears it by the name it is stored under (it answered 404 on both).
    let (code, body) = api(r.addr, reqwest::Method::DELETE, "/v1/api-keys/ghost", None).await;
    assert_eq!(code, 204, "{body}");
    assert!(!redis.ids("alias").contains(&"ghost".to_owned()));
    assert_eq!(status(r.addr, "root-secret").await, 200);
}

/// Finding 6: a log entry reusing the next version must not make replicas skip the
/// real change that has it.
#[tokio::test]
async fn a_log_entry_reusing_the_next_version_does_not_hide_the_real_one() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "reuse").await;
    let writer = replica(&redis, "reuse", true).await;
    let other = replica(&redis, "reuse", false).await;
    let next = (redis.version("reuse") + 1).to_string();
    let epoch = redis.epoch("reuse");
    redis.xadd(
        "reuse",
        &[
            ("e", &epoch),
            ("v", &next),
            ("i", "0"),
            ("n", "1"),
            ("op", "del"),
            ("id", "nobody"),
        ],
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (code, created) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "real"})),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let secret = created["key"].as_str().unwrap();
    until(other.addr, secret, 200, BOUND).await;
}

/// Finding 6: an entry with an operation this crate does not know is not a removal.
#[tokio::test]
async fn an_unknown_log_operation_is_not_a_removal() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "unknown").await;
    let r = replica(&redis, "unknown", false).await;
    let next = (redis.version("unknown") + 1).to_string();
    let epoch = redis.epoch("unknown");
    redis.xadd(
        "unknown",
        &[
            ("e", &epoch),
            ("v", &next),
            ("i", "0"),
            ("n", "1"),
            ("op", "frobnicate"),
            ("id", "reader"),
        ],
    );
    for _ in 0..20 {
        assert_eq!(status(r.addr, "reader-secret").await, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    import(
        &redis,
        "unknown",
        "[[keys]]\nid = \"late\"\nsecret = \"late-secret\"\n",
    )
    .await;
    until(r.addr, "late-secret", 200, BOUND).await;
    assert_eq!(status(r.addr, "reader-secret").await, 200);
}

/// Finding 7: a change that clashes with another source of the store: the store
/// keeps the namespace's set pending, and the follower keeps following the log,
/// without reconnecting and reading the whole namespace again and again.
#[tokio::test]
async fn a_conflict_with_another_source_does_not_loop() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "clash").await;
    let store = KeyStore::new();
    let (channel, publisher) =
        ChannelSource::new(KeySet::from_keys([ApiKey::new("dup", "local-secret")]).unwrap());
    store.add_source(channel.with_name("local")).unwrap();
    store.add_source(source(&redis, "clash")).unwrap();
    // Redis gets a key with the id the other source has.
    import(
        &redis,
        "clash",
        "[[keys]]\nid = \"dup\"\nsecret = \"dup-secret\"\n",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = redis.calls("hgetall");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reads = redis.calls("hgetall") - before;
    assert!(reads <= 1, "the namespace was read {reads} times in 2 s");
    assert_eq!(store.verify("reader-secret").unwrap().id(), "reader");
    // Changes made meanwhile are part of the set the store applies once the clash is
    // gone.
    import(
        &redis,
        "clash",
        "[[keys]]\nid = \"late\"\nsecret = \"late-secret\"\n",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publisher.publish(KeySet::new()).unwrap();
    eventually("the pending set applied", BOUND, || {
        store.verify("late-secret").is_ok() && store.verify("dup-secret").is_ok()
    })
    .await;
    assert!(store.verify("local-secret").is_err());
    assert!(equals_redis(&store, &redis, "clash", 0));
}

/// Finding 7: a namespace refused whole at the first load (a clash) stays whole: a
/// later change by id must not replace the set the store keeps pending.
#[tokio::test]
async fn a_set_pending_for_a_conflict_is_not_cut_down_by_a_later_change() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "pending").await;
    let store = KeyStore::new();
    let (channel, publisher) =
        ChannelSource::new(KeySet::from_keys([ApiKey::new("reader", "other-secret")]).unwrap());
    store.add_source(channel.with_name("local")).unwrap();
    assert!(store.add_source(source(&redis, "pending")).is_err());
    import(
        &redis,
        "pending",
        "[[keys]]\nid = \"late\"\nsecret = \"late-secret\"\n",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publisher.publish(KeySet::new()).unwrap();
    eventually("the whole namespace applied", BOUND, || {
        equals_redis(&store, &redis, "pending", 0)
    })
    .await;
    assert_eq!(store.verify("root-secret").unwrap().id(), "root");
}

/// Finding 11: a Redis that answers after the backend gave up: the write happened,
/// so the backend must not say "nothing changed".
#[tokio::test]
async fn a_write_that_timed_out_is_never_reported_as_not_written() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "slow").await;
    let backend = RedisBackend::new(&redis.url(), "slow")
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    assert!(backend.get("root").await.unwrap().is_some());
    for (round, sleep) in ["0.6", "2"].into_iter().enumerate() {
        let url = redis.url();
        let sleeper = thread::spawn(move || {
            let client = redis::Client::open(url).unwrap();
            let mut con = client.get_connection().unwrap();
            let _: redis::Value = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(sleep)
                .query(&mut con)
                .unwrap();
        });
        thread::sleep(Duration::from_millis(50));
        let id = format!("slow-{round}");
        let result = backend
            .create(ApiKey::new(id.as_str(), format!("{id}-secret")))
            .await;
        sleeper.join().unwrap();
        let written = redis.ids("slow").contains(&id);
        match result {
            Ok(()) => assert!(written, "Ok but not written"),
            Err(BackendError::OutcomeUnknown(_)) => {}
            Err(BackendError::Unavailable(e)) => {
                assert!(!written, "`Unavailable` for a write that happened: {e}")
            }
            Err(other) => panic!("{other:?}"),
        }
    }
}

/// Finding 13: a connection Redis dropped is made again by the next call, which
/// succeeds.
#[tokio::test]
async fn the_backend_reconnects_after_a_dropped_connection() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "drop").await;
    let backend = RedisBackend::new(&redis.url(), "drop").unwrap();
    assert!(backend.get("root").await.unwrap().is_some());
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    assert!(backend.get("root").await.unwrap().is_some());
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    backend
        .create(ApiKey::new("after-drop", "after-drop-secret"))
        .await
        .unwrap();
    redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    backend.delete("after-drop", None).await.unwrap();
    assert!(!redis.ids("drop").contains(&"after-drop".to_owned()));
}

/// Finding 13: a replica says what is wrong now, not only the first failure of an
/// outage: Redis down, then back but wiped.
#[tokio::test]
async fn a_replica_reports_each_new_cause() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    seed(&redis, "cause").await;
    let r = replica(&redis, "cause", false).await;
    redis.stop();
    let error = |r: &Replica| {
        r.store
            .last_reload()
            .and_then(|x| x.error().map(|e| common::chain(e)))
            .unwrap_or_default()
    };
    eventually("the outage reported", BOUND, || !error(&r).is_empty()).await;
    assert!(!error(&r).contains("version counter"), "{}", error(&r));
    redis.run_empty();
    eventually("the wipe reported", Duration::from_secs(5), || {
        error(&r).contains("version counter")
    })
    .await;
    assert_eq!(status(r.addr, "reader-secret").await, 200);
}

/// Finding 13: Redis's own error text (which names the script by its hash) stays in
/// the logs; the API's answer says what failed without it.
#[tokio::test]
async fn script_hashes_never_reach_the_caller() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "hash").await;
    let writer = replica(&redis, "hash", true).await;
    redis.cli(&["DEL", "tak:{hash}:log"]);
    redis.cli(&["SET", "tak:{hash}:log", "not a stream"]);
    let (code, body) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "h1"})),
    )
    .await;
    assert!(code >= 500, "{code} {body}");
    assert!(!has_hex_run(&body.to_string(), 40), "{body}");
    assert!(
        !redis.ids("hash").contains(&"h1".to_owned()),
        "nothing written"
    );
    redis.cli(&["DEL", "tak:{hash}:log"]);
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    let (code, body) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "h2"})),
    )
    .await;
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    assert!(code >= 500, "{code} {body}");
    assert!(!has_hex_run(&body.to_string(), 40), "{body}");
}

/// Review of issue 16: the records hash alone gone (`DEL tak:{ns}:keys`, or evicted
/// under `allkeys-lru`: it is the namespace's largest key and replicas never read it
/// while they follow the log) while the version counter stays. That is a partly
/// wiped namespace, not "zero keys": a replica that reads it whole (here made to by
/// an entry it cannot follow) keeps its last good keys, and the API writes nothing
/// into it (a create would make it a namespace of one key).
#[tokio::test]
async fn a_namespace_whose_records_are_gone_is_not_zero_keys() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "nokeys").await;
    let writer = replica(&redis, "nokeys", true).await;
    let other = replica(&redis, "nokeys", false).await;
    assert_eq!(redis.cli(&["DEL", "tak:{nokeys}:keys"]), "1");
    // An entry no follower can apply: each reads the namespace whole.
    let epoch = redis.epoch("nokeys");
    redis.xadd("nokeys", &[("e", &epoch), ("op", "frobnicate")]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in [&writer, &other] {
        assert_eq!(status(r.addr, "root-secret").await, 200);
        assert_eq!(status(r.addr, "reader-secret").await, 200);
    }
    let (code, body) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "solo"})),
    )
    .await;
    assert_eq!((code, problem(&body)), (503, "store-missing"), "{body}");
    assert!(redis.ids("nokeys").is_empty(), "nothing written");
    let (code, body) = api(writer.addr, reqwest::Method::GET, "/v1/api-keys", None).await;
    assert_eq!((code, problem(&body)), (503, "store-missing"), "{body}");
    // Restored explicitly: followed again.
    import(
        &redis,
        "nokeys",
        &format!("{SEED}\n[[keys]]\nid = \"late\"\nsecret = \"late-secret\"\n"),
    )
    .await;
    for r in [&writer, &other] {
        until(r.addr, "late-secret", 200, BOUND).await;
        assert_eq!(status(r.addr, "root-secret").await, 200);
    }
}

/// Review of issue 16: Redis restarted from an older save (a crash with RDB
/// snapshots, or `appendfsync everysec` losing its last second; here the AOF of an
/// earlier moment put back). The namespace keeps its epoch and goes back to an
/// earlier version, a revocation answered 204 undone in it. Replicas that enforced
/// the revocation must not take the key back: they keep their last good keys, as for
/// a wiped namespace, until it is restored explicitly.
#[tokio::test]
async fn a_namespace_gone_back_to_an_older_save_does_not_bring_revoked_keys_back() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    seed(&redis, "older").await;
    let writer = replica(&redis, "older", true).await;
    let other = replica(&redis, "older", false).await;
    let (code, body) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "kept"})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    // The save Redis will come back from.
    let saved = tempfile::tempdir().unwrap();
    copy_dir(redis.dir.path(), saved.path());
    let (code, body) = api(
        writer.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/reader",
        None,
    )
    .await;
    assert_eq!(code, 204, "{body}");
    for r in [&writer, &other] {
        until(r.addr, "reader-secret", 401, BOUND).await;
    }
    redis.stop();
    for entry in std::fs::read_dir(redis.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
    copy_dir(saved.path(), redis.dir.path());
    redis.run();
    assert!(
        redis.ids("older").contains(&"reader".to_owned()),
        "the older save"
    );
    // Several version checks, and a whole read forced by an entry no one can follow.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let epoch = redis.epoch("older");
    redis.xadd("older", &[("e", &epoch), ("op", "frobnicate")]);
    for _ in 0..20 {
        for r in [&writer, &other] {
            assert_eq!(
                status(r.addr, "reader-secret").await,
                401,
                "revoked key back"
            );
            assert_eq!(status(r.addr, "root-secret").await, 200);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The API that saw the later version writes nothing into the older one: a
    // restore would replace what it wrote.
    let (code, body) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "meanwhile"})),
    )
    .await;
    assert_eq!((code, problem(&body)), (503, "store-missing"), "{body}");
    assert!(!redis.ids("older").contains(&"meanwhile".to_owned()));
    // Restored explicitly (from a replica's keys): followed again.
    let keys = tower_api_key::KeySet::from_keys([
        ApiKey::new("root", "root-secret").with_scopes(["admin", "read"]),
        ApiKey::new("late", "late-secret"),
    ])
    .unwrap();
    let backend = RedisBackend::new(&redis.url(), "older").unwrap();
    assert_eq!(backend.restore(&keys).await.unwrap(), 2);
    for r in [&writer, &other] {
        until(r.addr, "late-secret", 200, BOUND).await;
        assert_eq!(status(r.addr, "reader-secret").await, 401);
    }
    let (code, body) = api(
        writer.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/late",
        None,
    )
    .await;
    assert_eq!(code, 204, "{body}");
}

/// Copies the files of directory `from` (and its subdirectories) into `to`.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&path, &target);
        } else if path.is_file() {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// Review of issue 16: a log entry with the largest stream id there is
/// (`XADD tak:{ns}:log 18446744073709551615-18446744073709551615 ...`, by a hostile
/// hand) makes every later `XADD *` fail. The write script failed there, after it had
/// written the record and the version: Redis scripts keep what they wrote before an
/// error, so a call answered 503 "nothing written" had written its change. A write is
/// now refused before its first write, and a restore replaces such a log.
#[tokio::test]
async fn a_log_that_cannot_grow_refuses_writes_before_writing() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "full").await;
    let writer = replica(&redis, "full", true).await;
    let version = redis.version("full");
    redis.cli(&[
        "XADD",
        "tak:{full}:log",
        "18446744073709551615-18446744073709551615",
        "op",
        "frobnicate",
    ]);
    let (code, body) = api(
        writer.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/reader",
        None,
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(
        redis.ids("full").contains(&"reader".to_owned()),
        "503 for a revocation written: {body}"
    );
    assert_eq!(redis.version("full"), version, "a version used, unlogged");
    // Restored explicitly: the log is made again and the namespace followed.
    let keys = tower_api_key::KeySet::from_keys([
        ApiKey::new("root", "root-secret").with_scopes(["admin", "read"]),
        ApiKey::new("late", "late-secret"),
    ])
    .unwrap();
    let backend = RedisBackend::new(&redis.url(), "full").unwrap();
    assert_eq!(backend.restore(&keys).await.unwrap(), 2);
    until(writer.addr, "late-secret", 200, BOUND).await;
    until(writer.addr, "reader-secret", 401, BOUND).await;
    let (code, body) = api(
        writer.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/late",
        None,
    )
    .await;
    assert_eq!(code, 204, "{body}");
}

/// A TCP proxy to the Redis at `port` that holds what the client sends for `delay`
/// before passing it on (in order): a replica on a slow link, whose usage flush
/// reaches Redis after a change made meanwhile over a fast one. Each time what the
/// client sends holds `mark`, `seen` hears of it (as it starts its delay).
async fn slow_link(
    port: u16,
    delay: Duration,
    mark: &'static [u8],
    seen: tokio::sync::mpsc::UnboundedSender<()>,
) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
            tokio::spawn(async move {
                while let Some((at, bytes)) = rx.recv().await {
                    tokio::time::sleep_until((at + delay).into()).await;
                    if server_write.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = client_read.read(&mut buf).await {
                    if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        return;
                    }
                    if buf[..n].windows(mark.len()).any(|w| w == mark) {
                        let _ = seen.send(());
                    }
                }
            });
        }
    });
    local
}

/// Review of issue 16: a key's usage counts go with it, in the same script, and a
/// replica's flush that reaches Redis after the removal (a slow link: its counts
/// were taken while the key still worked there) does not bring them back. A key
/// created again under the id starts unused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_go_with_a_removed_key_and_stay_gone() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "gone").await;
    let backend = RedisBackend::new(&redis.url(), "gone").unwrap();
    backend.create(ApiKey::new("k", "k-secret")).await.unwrap();
    // A replica whose every command reaches Redis 300 ms late; told when it sends
    // a usage flush.
    let (flushing, mut flushes) = tokio::sync::mpsc::unbounded_channel();
    let port = slow_link(
        redis.port,
        Duration::from_millis(300),
        b"tak:{gone}:requests",
        flushing,
    )
    .await;
    let store = KeyStore::new();
    store
        .add_source(
            tower_api_key::redis::RedisSource::new(&format!("redis://127.0.0.1:{port}/"), "gone")
                .unwrap()
                .with_version_check(Duration::from_millis(200))
                .with_usage_flush(Duration::from_millis(50))
                .with_connect_timeout(Duration::from_millis(1000)),
        )
        .unwrap();
    let addr = serve_store(store).await;
    until(addr, "k-secret", 200, BOUND).await;
    let counted = |id: &str| {
        let requests = redis.cli(&["HEXISTS", "tak:{gone}:requests", id]);
        let last_used = redis.cli(&["HEXISTS", "tak:{gone}:last_used", id]);
        (requests == "1", last_used == "1")
    };
    // The key in use on the replica, its counts flushed every 50 ms.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let user = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                status(addr, "k-secret").await;
            }
        })
    };
    eventually("the key's use counted", BOUND, || {
        counted("k") == (true, true)
    })
    .await;
    // The key removed while a flush of its counts is on its way.
    while flushes.try_recv().is_ok() {}
    flushes.recv().await.unwrap();
    backend.delete("k", None).await.unwrap();
    assert_eq!(counted("k"), (false, false), "counts kept past the removal");
    until(addr, "k-secret", 401, BOUND).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    user.await.unwrap();
    // Every flush sent before the replica dropped the key has arrived by now.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        counted("k"),
        (false, false),
        "a late flush brought the counts back"
    );
    backend.create(ApiKey::new("k", "k2-secret")).await.unwrap();
    let usage = backend.usage(&["k".to_owned()]).await.unwrap().unwrap();
    assert_eq!(usage[0].0, 0, "a new key under an old id is unused");
    assert!(usage[0].1.is_none());
}

/// Review of issue 16: a change that keeps meeting other writers' changes to the
/// same key is tried again for a bounded time; a caller that sent no `If-Match`
/// never gets "precondition failed" (412) for it: the change is made, or refused
/// whole as unavailable (nothing written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_without_if_match_never_fails_a_precondition() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "hot").await;
    let backend = RedisBackend::new(&redis.url(), "hot")
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    backend
        .create(ApiKey::new("hot", "hot-secret"))
        .await
        .unwrap();
    let raw = || redis.cli(&["HGET", "tak:{hot}:keys", "hot"]);
    backend
        .update(ApiKey::new("hot", "hot-secret").with_description("b"), None)
        .await
        .unwrap();
    let b = raw();
    assert!(b.contains("\"b\""), "{b}");
    // Other writers changing the key's record (to a new valid record each time) as
    // fast as Redis takes it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (stop, url, b) = (stop.clone(), redis.url(), b.clone());
            thread::spawn(move || {
                let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut pipe = redis::pipe();
                    for _ in 0..20 {
                        n += 1;
                        let record = b.replace("\"b\"", &format!("\"w{w}-{n}\""));
                        pipe.hset("tak:{hot}:keys", "hot", record).ignore();
                    }
                    let () = pipe.query(&mut con).unwrap();
                }
            })
        })
        .collect();
    eventually("the other writers at work", BOUND, || {
        raw().contains("\"w1-")
    })
    .await;
    let (mut made, mut refused) = (0, 0);
    for i in 0..8 {
        let key = ApiKey::new("hot", "hot-secret").with_description(format!("try {i}"));
        match backend.update(key, None).await {
            Ok(()) => made += 1,
            Err(BackendError::Unavailable(_)) => refused += 1,
            Err(other) => panic!("try {i} without If-Match: {other:?}"),
        }
    }
    match backend.delete("hot", None).await {
        Ok(()) | Err(BackendError::Unavailable(_)) => {}
        Err(other) => panic!("a removal without If-Match: {other:?}"),
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    eprintln!("under a racing writer: {made} made, {refused} refused as unavailable");
}

/// Review of issue 16: a version counter that is not a whole number (`1.5`) passed
/// the write script's `tonumber` while replicas call such a namespace damaged, so
/// the API answered 2xx for writes no replica applied. The script, the namespace's
/// head and the follower agree now: it is damaged, the API refuses with the
/// damaged namespace's answer (`unavailable`, nothing written), and a restore
/// replaces it.
#[tokio::test]
async fn a_version_that_is_not_a_whole_number_is_a_damaged_namespace() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "frac").await;
    let r = replica(&redis, "frac", true).await;
    let version = redis.version("frac");
    // The last one left for the restore to replace.
    for bad in [
        "-1".into(),
        "0x10".into(),
        " 7".into(),
        "1e3".into(),
        format!("{version}.5"),
    ] {
        redis.cli(&["HSET", "tak:{frac}:version", "version", &bad]);
        let (code, body) = api(
            r.addr,
            reqwest::Method::POST,
            "/v1/api-keys",
            Some(json!({"id": "late"})),
        )
        .await;
        assert_eq!(code, 503, "version {bad:?}: {body}");
        assert_eq!(problem(&body), "unavailable", "version {bad:?}: {body}");
        assert!(!redis.ids("frac").contains(&"late".to_owned()), "{bad:?}");
        assert_eq!(
            redis.cli(&["HGET", "tak:{frac}:version", "version"]),
            bad,
            "written over"
        );
        let backend = RedisBackend::new(&redis.url(), "frac").unwrap();
        assert!(!backend.exists().await.unwrap(), "version {bad:?}");
    }
    eventually("the damage reported", BOUND, || {
        r.store
            .last_reload()
            .and_then(|x| x.error().map(|e| common::chain(e)))
            .is_some_and(|e| e.contains("wrong type"))
    })
    .await;
    assert_eq!(status(r.addr, "reader-secret").await, 200);
    // A restore replaces it with a whole-number version, and writes work again.
    let path = redis.dir.path().join("frac-restore.toml");
    std::fs::write(&path, SEED).unwrap();
    let backend = RedisBackend::new(&redis.url(), "frac").unwrap();
    assert_eq!(backend.restore_file(&path).await.unwrap(), 2);
    let restored = redis.cli(&["HGET", "tak:{frac}:version", "version"]);
    assert!(restored.parse::<u64>().is_ok(), "{restored:?}");
    let (code, body) = api(
        r.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "late"})),
    )
    .await;
    assert!(code == 201 || code == 202, "{code} {body}");
}
