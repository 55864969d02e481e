//! A fleet on Redis: replicas (separate stores and servers, one in a separate OS
//! process) follow one namespace that the key-management API of one replica writes,
//! against a real `redis-server` started here on a free loopback port (see
//! `redis_support` for the helpers and what happens without `redis-server`).
#![allow(clippy::unwrap_used)]
#![cfg(feature = "redis")]

mod common;
mod redis_support;

use std::{
    fs,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use redis_support::*;
use serde_json::json;
use tower_api_key::{
    ApiKey, KeySet, KeyStore,
    admin::AdminBackend,
    redis::{RedisBackend, RedisSource},
};

#[tokio::test]
async fn a_change_on_one_replica_reaches_every_replica() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "fleet").await;
    let writer = replica(&redis, "fleet", true).await;
    let others = [
        replica(&redis, "fleet", false).await,
        replica(&redis, "fleet", false).await,
    ];
    assert_eq!(status(others[0].addr, "reader-secret").await, 200);

    let (code, created) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "billing", "scopes": ["read"]})),
    )
    .await;
    assert_eq!(code, 201, "{created:?}");
    let secret = created["key"].as_str().unwrap().to_owned();
    // Enforced by the replica that took the call when it returns...
    assert_eq!(status(writer.addr, &secret).await, 200);
    // ...and by every other replica within the convergence bound.
    for other in &others {
        until(other.addr, &secret, 200, Duration::from_secs(2)).await;
    }
    let (code, _) = api(
        writer.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/billing",
        None,
    )
    .await;
    assert_eq!(code, 204);
    assert_eq!(status(writer.addr, &secret).await, 401);
    for other in &others {
        until(other.addr, &secret, 401, Duration::from_secs(2)).await;
    }
    // The keys of the namespace only: another namespace is another fleet.
    let (code, list) = api(writer.addr, reqwest::Method::GET, "/v1/api-keys", None).await;
    assert_eq!(code, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn redis_down_keeps_every_replica_serving_then_they_resync() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    seed(&redis, "outage").await;
    let replicas = [
        replica(&redis, "outage", false).await,
        replica(&redis, "outage", false).await,
    ];
    redis.stop();
    // Every valid request still gets in while Redis is down.
    let mut refused = 0;
    for _ in 0..50 {
        for r in &replicas {
            if status(r.addr, "reader-secret").await != 200 {
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 0, "valid requests refused while Redis was down");
    // Said once per change of state, not per retry.
    let start = Instant::now();
    let report = loop {
        if let Some(r) = replicas[0].store.last_reload().filter(|r| !r.is_applied()) {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(report.source().starts_with("redis:outage"));
    tokio::time::sleep(Duration::from_millis(1_500)).await; // several retries
    assert_eq!(replicas[0].store.last_reload().unwrap().at(), report.at());
    // Redis back (from its own persistence), with a change made meanwhile.
    redis.run();
    import(
        &redis,
        "outage",
        "[[keys]]\nid = \"late\"\nsecret = \"late-secret\"\n",
    )
    .await;
    for r in &replicas {
        until(r.addr, "late-secret", 200, Duration::from_secs(3)).await;
        assert_eq!(status(r.addr, "reader-secret").await, 200);
    }
}

#[tokio::test]
async fn a_wiped_redis_is_not_zero_keys() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "wiped").await;
    let r = replica(&redis, "wiped", false).await;
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    let start = Instant::now();
    loop {
        if let Some(error) = r
            .store
            .last_reload()
            .and_then(|x| x.error().map(|e| common::chain(e)))
        {
            assert!(error.contains("version counter"), "{error}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the wipe was never reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        status(r.addr, "reader-secret").await,
        200,
        "the last good keys stay"
    );
    assert_eq!(r.store.len(), 2);
    // Only a namespace that exists with no keys denies everyone.
    import(&redis, "wiped", "keys = []\n").await;
    until(r.addr, "reader-secret", 401, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn a_cut_connection_converges_after_reconnecting() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "cut").await;
    let r = replica(&redis, "cut", false).await;
    assert!(!redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]).is_empty());
    import(
        &redis,
        "cut",
        "[[keys]]\nid = \"after-cut\"\nsecret = \"after-cut-secret\"\n",
    )
    .await;
    until(r.addr, "after-cut-secret", 200, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn a_replica_without_redis_fails_closed_unless_it_has_a_snapshot() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    seed(&redis, "snap").await;
    let snapshot = redis.dir.path().join("snapshot.toml");
    {
        // A replica with a snapshot file, while Redis is up: the file follows.
        let store = KeyStore::new();
        store
            .add_source(source(&redis, "snap").with_snapshot(&snapshot))
            .unwrap();
        let start = Instant::now();
        while !fs::read_to_string(&snapshot).is_ok_and(|s| s.contains("reader")) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no snapshot written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let text = fs::read_to_string(&snapshot).unwrap();
        assert!(
            !text.contains("reader-secret") && text.contains("sha256"),
            "{text}"
        );
    }
    redis.stop();
    // Without one: no keys, everyone refused, and still trying.
    let store = KeyStore::new();
    assert!(store.add_source(source(&redis, "snap")).is_err());
    let plain = serve_store(store).await;
    assert_eq!(status(plain, "reader-secret").await, 401);
    // With one: the last keys, from the first request.
    let store = KeyStore::new();
    store
        .add_source(source(&redis, "snap").with_snapshot(&snapshot))
        .unwrap();
    let snap = serve_store(store).await;
    assert_eq!(status(snap, "reader-secret").await, 200);
    // Redis back: the replica without a snapshot gets its keys.
    redis.run();
    until(plain, "reader-secret", 200, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn a_namespace_that_does_not_exist_yet_fails_closed_until_created() {
    let Some(redis) = Redis::start() else { return };
    let store = KeyStore::new();
    let err = store.add_source(source(&redis, "later")).unwrap_err();
    assert!(common::chain(&err).contains("does not exist"), "{err}");
    let addr = serve_store(store).await;
    assert_eq!(status(addr, "reader-secret").await, 401);
    seed(&redis, "later").await;
    until(addr, "reader-secret", 200, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn fleet_usage_adds_up_across_replicas() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "usage").await;
    let writer = replica(&redis, "usage", true).await;
    let other = replica(&redis, "usage", false).await;
    for _ in 0..3 {
        assert_eq!(status(writer.addr, "reader-secret").await, 200);
    }
    for _ in 0..4 {
        assert_eq!(status(other.addr, "reader-secret").await, 200);
    }
    let start = Instant::now();
    loop {
        let (_, key) = api(
            writer.addr,
            reqwest::Method::GET,
            "/v1/api-keys/reader",
            None,
        )
        .await;
        if key["usage"]["requests"] == 7 {
            assert!(key["usage"]["last_used"].is_string());
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{key:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Counted once: more flushes add nothing.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, key) = api(
        writer.addr,
        reqwest::Method::GET,
        "/v1/api-keys/reader",
        None,
    )
    .await;
    assert_eq!(key["usage"]["requests"], 7);
}

/// A usage count written by hand as something that is not a number: listing the
/// keys and adding the fleet's usage go on, and that count starts again.
#[tokio::test]
async fn a_usage_count_that_is_not_a_number_breaks_nothing() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "garbage").await;
    for (hash, value) in [("requests", "garbage"), ("last_used", "-1.5")] {
        redis.cli(&["HSET", &format!("tak:{{garbage}}:{hash}"), "reader", value]);
    }
    redis.cli(&["HSET", "tak:{garbage}:requests", "root", "4"]);
    let replica = replica(&redis, "garbage", true).await;
    let (code, keys) = api(replica.addr, reqwest::Method::GET, "/v1/api-keys", None).await;
    assert_eq!(code, 200, "{keys}");
    for _ in 0..3 {
        assert_eq!(status(replica.addr, "reader-secret").await, 200);
    }
    let start = Instant::now();
    loop {
        let (code, key) = api(
            replica.addr,
            reqwest::Method::GET,
            "/v1/api-keys/reader",
            None,
        )
        .await;
        assert_eq!(code, 200, "{key}");
        if key["usage"]["requests"] == 3 {
            assert!(key["usage"]["last_used"].is_string(), "{key}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{key}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The other key's count was added to, not lost: root's own API calls count.
    let (_, root) = api(
        replica.addr,
        reqwest::Method::GET,
        "/v1/api-keys/root",
        None,
    )
    .await;
    assert!(root["usage"]["requests"].as_u64().unwrap() >= 4, "{root}");
}

#[tokio::test]
async fn export_writes_a_digest_only_key_file_that_imports_back() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "export").await;
    let backend = RedisBackend::new(&redis.url(), "export").unwrap();
    let out = redis.dir.path().join("exported.toml");
    assert_eq!(backend.export_file(&out).await.unwrap(), 2);
    let text = fs::read_to_string(&out).unwrap();
    assert!(
        !text.contains("root-secret") && text.contains("sha256"),
        "{text}"
    );
    let set = tower_api_key::FileSource::parse(&out, text.as_bytes()).unwrap();
    assert_eq!(set.len(), 2);
    let copy = RedisBackend::new(&redis.url(), "export-copy").unwrap();
    assert_eq!(copy.import_file(&out).await.unwrap(), 2);
    let store = KeyStore::new();
    store.add_source(source(&redis, "export-copy")).unwrap();
    assert_eq!(store.verify("root-secret").unwrap().id(), "root");
}

/// Runs a replica in this process and prints its address: the other half of the
/// separate-process test.
#[tokio::test]
async fn replica_process() {
    let Ok(url) = std::env::var("TAK_TEST_REDIS_URL") else {
        return;
    };
    let store = KeyStore::new();
    let source = RedisSource::new(&url, "procs")
        .unwrap()
        .with_version_check(Duration::from_millis(200));
    store.add_source(source).unwrap();
    let addr = serve_store(store).await;
    println!("REPLICA {addr}");
    tokio::time::sleep(Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_replica_in_another_process_follows_the_admin_api() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "procs").await;
    let writer = replica(&redis, "procs", true).await;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "replica_process", "--nocapture"])
        .env("TAK_TEST_REDIS_URL", redis.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let addr: SocketAddr = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            if let Some(addr) = line.unwrap().strip_prefix("REPLICA ") {
                return addr.parse().unwrap();
            }
        }
        panic!("the replica process never said where it listens");
    })
    .await
    .unwrap();
    let (code, created) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "cross"})),
    )
    .await;
    assert_eq!(code, 201);
    let secret = created["key"].as_str().unwrap();
    until(addr, secret, 200, Duration::from_secs(3)).await;
    api(
        writer.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/cross",
        None,
    )
    .await;
    until(addr, secret, 401, Duration::from_secs(3)).await;
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn auth_through_the_url_and_no_password_in_debug() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    redis.stop();
    redis.run_with(&["--requirepass", "s3cret-pass"]);
    let url = format!("redis://:s3cret-pass@127.0.0.1:{}/", redis.port);
    let backend = RedisBackend::new(&url, "auth").unwrap();
    let path = redis.dir.path().join("auth.toml");
    fs::write(&path, SEED).unwrap();
    assert_eq!(backend.import_file(&path).await.unwrap(), 2);
    let store = KeyStore::new();
    let source = RedisSource::new(&url, "auth").unwrap();
    let shown = format!("{source:?} {backend:?}");
    assert!(!shown.contains("s3cret-pass"), "{shown}");
    store.add_source(source).unwrap();
    assert_eq!(store.verify("reader-secret").unwrap().id(), "reader");
    // A wrong password: refused, and no keys (it fails closed), nor the password.
    let wrong = format!("redis://:wrong-pass@127.0.0.1:{}/", redis.port);
    let store = KeyStore::new();
    let source = RedisSource::new(&wrong, "auth")
        .unwrap()
        .with_connect_timeout(Duration::from_millis(500));
    let err = store.add_source(source).unwrap_err();
    assert!(!common::chain(&err).contains("wrong-pass"), "{err}");
    assert!(store.is_empty());
}

/// A wiped namespace comes back only when an operator restores it: from a replica's
/// snapshot, whole, with a new epoch every replica reads.
#[tokio::test]
async fn a_wiped_namespace_is_restored_from_a_replica_snapshot() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    seed(&redis, "restore").await;
    let snapshot = redis.dir.path().join("replica-1.toml");
    let store = KeyStore::new();
    store
        .add_source(
            source(&redis, "restore")
                .with_snapshot(&snapshot)
                .with_snapshot_interval(Duration::from_millis(50)),
        )
        .unwrap();
    let first = replica_of(&redis, "restore", store, true).await;
    let other = replica(&redis, "restore", false).await;
    let (code, created) = api(
        first.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "billing"})),
    )
    .await;
    assert_eq!(code, 201);
    let secret = created["key"].as_str().unwrap().to_owned();
    let (code, _) = api(
        first.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/reader",
        None,
    )
    .await;
    assert_eq!(code, 204);
    eventually("the snapshot follows", Duration::from_secs(3), || {
        fs::read_to_string(&snapshot).is_ok_and(|s| s.contains("billing") && !s.contains("reader"))
    })
    .await;
    let backend = RedisBackend::new(&redis.url(), "restore").unwrap();
    assert!(backend.exists().await.unwrap());

    // Redis restarts empty.
    redis.stop();
    redis.run_empty();
    assert!(!backend.exists().await.unwrap());
    for r in [&first, &other] {
        until(r.addr, &secret, 200, Duration::from_secs(3)).await;
        assert_eq!(
            status(r.addr, "reader-secret").await,
            401,
            "revoked stays revoked"
        );
    }
    // Nothing but the restore brings it back.
    assert_eq!(backend.restore_file(&snapshot).await.unwrap(), 2);
    assert!(backend.exists().await.unwrap());
    let (code, list) = api(first.addr, reqwest::Method::GET, "/v1/api-keys", None).await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    // Writes work again, and reach every replica.
    let (code, created) = api(
        first.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "after"})),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let after = created["key"].as_str().unwrap();
    for r in [&first, &other] {
        until(r.addr, after, 200, Duration::from_secs(3)).await;
        assert_eq!(status(r.addr, &secret).await, 200);
        assert_eq!(status(r.addr, "reader-secret").await, 401);
    }
}

/// A restore replaces the namespace whole, even one that exists: replicas go from
/// the old set to the restored one in one step.
#[tokio::test]
async fn a_restore_replaces_a_namespace_whole() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "replace").await;
    let r = replica(&redis, "replace", false).await;
    let path = redis.dir.path().join("replacement.toml");
    fs::write(
        &path,
        "[[keys]]\nid = \"root\"\nsecret = \"root-secret\"\nscopes = [\"admin\"]\n\n\
         [[keys]]\nid = \"new\"\nsecret = \"new-secret\"\n",
    )
    .unwrap();
    let backend = RedisBackend::new(&redis.url(), "replace").unwrap();
    let epoch = redis.epoch("replace");
    assert_eq!(backend.restore_file(&path).await.unwrap(), 2);
    assert_ne!(redis.epoch("replace"), epoch, "a new epoch");
    until(r.addr, "new-secret", 200, Duration::from_secs(3)).await;
    assert_eq!(status(r.addr, "reader-secret").await, 401);
    assert_eq!(redis.ids("replace"), ["new", "root"]);
    // No staging left behind.
    let left = redis.cli(&["KEYS", "tak:{replace}:staging:*"]);
    assert!(!left.contains("staging"), "{left}");
}

/// A namespace whose keys have the wrong type (an integer version, as an earlier
/// build wrote it; something else's data) is damaged: replicas keep their keys and
/// say so, an import does not write over it, a restore replaces it.
#[tokio::test]
async fn a_damaged_namespace_is_replaced_only_by_a_restore() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "damaged").await;
    let r = replica(&redis, "damaged", false).await;
    redis.cli(&["DEL", "tak:{damaged}:version"]);
    redis.cli(&["SET", "tak:{damaged}:version", "7"]);
    eventually("the damage reported", Duration::from_secs(3), || {
        r.store
            .last_reload()
            .and_then(|x| x.error().map(|e| common::chain(e)))
            .is_some_and(|e| e.contains("wrong type"))
    })
    .await;
    assert_eq!(status(r.addr, "reader-secret").await, 200);
    let backend = RedisBackend::new(&redis.url(), "damaged").unwrap();
    assert!(!backend.exists().await.unwrap());
    let path = redis.dir.path().join("late.toml");
    fs::write(&path, "[[keys]]\nid = \"late\"\nsecret = \"late-secret\"\n").unwrap();
    let err = backend.import_file(&path).await.unwrap_err();
    assert!(common::chain(&err).contains("wrong type"), "{err}");
    assert_eq!(redis.cli(&["GET", "tak:{damaged}:version"]), "7");
    assert_eq!(backend.restore_file(&path).await.unwrap(), 1);
    until(r.addr, "late-secret", 200, Duration::from_secs(3)).await;
    assert_eq!(status(r.addr, "reader-secret").await, 401);
}

/// One secret under two ids: an import that would store it is refused, with nothing
/// written. Written anyway (by hand, by an older writer), every replica refuses both
/// keys, those that followed the write and those loaded after it; once one of the two
/// goes, every replica lets the other in again.
#[tokio::test]
async fn a_secret_stored_under_two_ids_is_refused_on_both_until_one_goes() {
    let Some(redis) = Redis::start() else { return };
    seed(&redis, "twice").await;
    let before = replica(&redis, "twice", false).await;
    assert_eq!(status(before.addr, "reader-secret").await, 200);
    let backend = RedisBackend::new(&redis.url(), "twice").unwrap();
    let copy = ApiKey::new("copy", "reader-secret");
    let refused = backend
        .import(&KeySet::from_keys([copy.clone()]).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, tower_api_key::Error::DuplicateKey { .. }),
        "{refused}"
    );
    assert!(AdminBackend::get(&backend, "copy").await.unwrap().is_none());
    // Written under the import's check, as a writer that checks nothing would.
    AdminBackend::create(&backend, copy).await.unwrap();
    until(before.addr, "reader-secret", 401, Duration::from_secs(5)).await;
    let after = replica(&redis, "twice", false).await;
    assert_eq!(status(after.addr, "reader-secret").await, 401);
    assert_eq!(status(after.addr, "root-secret").await, 200);
    AdminBackend::delete(&backend, "copy", None).await.unwrap();
    for r in [&before, &after] {
        until(r.addr, "reader-secret", 200, Duration::from_secs(5)).await;
    }
}

/// `RedisBackend::import` into a namespace that exists writes versions of 1,000
/// keys: two keys that swap secrets far apart in the set are written in one, first,
/// so that no version leaves one secret under two ids.
#[tokio::test]
async fn an_import_that_swaps_secrets_swaps_them_in_one_version() {
    let Some(redis) = Redis::start() else { return };
    let backend = RedisBackend::new(&redis.url(), "swaps").unwrap();
    let set = |swapped: bool| {
        KeySet::from_keys((0..1500).map(|i| {
            let n = match (swapped, i) {
                (true, 1) => 1499,
                (true, 1499) => 1,
                _ => i,
            };
            ApiKey::new(format!("k{i:04}"), format!("s-{n:04}"))
        }))
        .unwrap()
    };
    assert_eq!(backend.import(&set(false)).await.unwrap(), 1500);
    let replica = replica(&redis, "swaps", false).await;
    assert_eq!(backend.import(&set(true)).await.unwrap(), 1500);
    let last = redis.last_versions("swaps");
    assert_eq!(last.get("k0001"), last.get("k1499"), "two versions");
    until(replica.addr, "s-1499", 200, Duration::from_secs(5)).await;
    assert_eq!(status(replica.addr, "s-0001").await, 200);
}
