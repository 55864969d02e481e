//! A fleet on PostgreSQL: replicas (separate stores and servers) follow one namespace
//! that the key-management API of one replica writes, against a real PostgreSQL
//! cluster started here on a free loopback port (see `postgres_support` for the
//! helpers and what happens where PostgreSQL is not installed).
#![allow(clippy::unwrap_used)]
#![cfg(feature = "postgres")]

mod common;
mod postgres_support;

use std::{
    fs,
    time::{Duration, Instant},
};

use postgres_support::*;
use serde_json::json;
use tower_api_key::{
    ApiKey, KeySet, KeyStore,
    admin::AdminBackend,
    postgres::{PostgresBackend, PostgresSource},
};

#[tokio::test]
async fn a_change_on_one_replica_reaches_every_replica() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "fleet").await;
    let writer = replica(&pg, "fleet", true).await;
    let others = [
        replica(&pg, "fleet", false).await,
        replica(&pg, "fleet", false).await,
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
    assert_eq!(status(writer.addr, &secret).await, 200);
    for other in &others {
        until(other.addr, &secret, 200, Duration::from_secs(2)).await;
    }
    // A patch, with its ETag, then a revocation.
    let (code, got) = api(
        writer.addr,
        reqwest::Method::GET,
        "/v1/api-keys/billing",
        None,
    )
    .await;
    assert_eq!(code, 200, "{got:?}");
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
    let (code, list) = api(writer.addr, reqwest::Method::GET, "/v1/api-keys", None).await;
    assert_eq!(code, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    // Conflicts and conditions, as the API's contract says.
    let (code, _) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "reader"})),
    )
    .await;
    assert_eq!(code, 409);
    let (code, _) = api(
        writer.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/nobody",
        None,
    )
    .await;
    assert_eq!(code, 404);
    assert_eq!(pg.ids("fleet"), ["reader", "root"]);
}

#[tokio::test]
async fn migrate_is_idempotent_and_creates_no_namespace() {
    let Some(pg) = Postgres::start() else { return };
    let backend = PostgresBackend::new(&pg.url(), "fresh").unwrap();
    // No tables yet: the namespace does not exist, and a replica fails closed.
    assert!(!backend.exists().await.unwrap());
    backend.migrate().await.unwrap();
    let (a, b) = tokio::join!(backend.migrate(), backend.migrate());
    a.unwrap();
    b.unwrap();
    assert!(!backend.exists().await.unwrap());
    assert_eq!(pg.psql("SELECT count(*) FROM tak_namespaces"), "0");
    let store = KeyStore::new();
    let err = store.add_source(source(&pg, "fresh")).unwrap_err();
    assert!(common::chain(&err).contains("never created"), "{err}");
    assert_eq!(store.len(), 0);
    // The API refuses to write into it, and does not list it as empty.
    let r = replica_of(&pg, "fresh", store.clone(), true).await;
    let (code, body) = api(
        r.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "x"})),
    )
    .await;
    assert_eq!(code, 401, "no key at all: not even the admin: {body:?}");
    // An explicit import creates it; the replica, still trying, picks it up.
    seed(&pg, "fresh").await;
    until(r.addr, "root-secret", 200, Duration::from_secs(5)).await;
    assert!(backend.exists().await.unwrap());
}

#[tokio::test]
async fn postgres_down_keeps_every_replica_serving_then_they_catch_up() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    seed(&pg, "outage").await;
    let replicas = [
        replica(&pg, "outage", false).await,
        replica(&pg, "outage", false).await,
    ];
    pg.stop();
    let mut refused = 0;
    for _ in 0..50 {
        for r in &replicas {
            if status(r.addr, "reader-secret").await != 200 {
                refused += 1;
            }
        }
    }
    assert_eq!(
        refused, 0,
        "valid requests refused while PostgreSQL was down"
    );
    // Said once per change of state, not per retry.
    let start = Instant::now();
    let report = loop {
        if let Some(r) = replicas[0].store.last_reload().filter(|r| !r.is_applied()) {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(report.source().starts_with("postgres:outage"));
    let said = common::chain(report.error().unwrap());
    assert!(!said.contains(PASSWORD), "{said}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(replicas[0].store.last_reload().unwrap().at(), report.at());
    pg.run();
    let path = pg.dir.path().join("late.toml");
    fs::write(&path, "[[keys]]\nid = \"late\"\nsecret = \"late-secret\"\n").unwrap();
    PostgresBackend::new(&pg.url(), "outage")
        .unwrap()
        .import_file(&path)
        .await
        .unwrap();
    for r in &replicas {
        until(r.addr, "late-secret", 200, Duration::from_secs(5)).await;
        assert_eq!(status(r.addr, "reader-secret").await, 200);
    }
}

#[tokio::test]
async fn a_first_load_that_fails_is_an_error_and_the_source_keeps_trying() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    seed(&pg, "late").await;
    pg.stop();
    let store = KeyStore::new();
    let err = store.add_source(source(&pg, "late")).unwrap_err();
    let said = common::chain(&err);
    assert!(!said.contains(PASSWORD), "{said}");
    let r = replica_of(&pg, "late", store, false).await;
    // Fail-closed: no snapshot, so no keys.
    assert_eq!(status(r.addr, "reader-secret").await, 401);
    pg.run();
    until(r.addr, "reader-secret", 200, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_replica_starts_from_its_snapshot_while_postgres_is_down() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    seed(&pg, "snap").await;
    let snapshot = pg.dir.path().join("replica.snapshot.toml");
    {
        let store = KeyStore::new();
        store
            .add_source(source(&pg, "snap").with_snapshot(&snapshot))
            .unwrap();
        let start = Instant::now();
        while !fs::read_to_string(&snapshot).is_ok_and(|s| s.contains("reader")) {
            assert!(start.elapsed() < Duration::from_secs(5), "no snapshot");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    pg.stop();
    let store = KeyStore::new();
    store
        .add_source(source(&pg, "snap").with_snapshot(&snapshot))
        .unwrap();
    let r = replica_of(&pg, "snap", store, false).await;
    assert_eq!(status(r.addr, "reader-secret").await, 200);
    let text = fs::read_to_string(&snapshot).unwrap();
    assert!(!text.contains("reader-secret"), "digests only");
}

#[tokio::test]
async fn a_wiped_namespace_is_not_zero_keys_and_is_restored_explicitly() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "wiped").await;
    let r = replica(&pg, "wiped", true).await;
    let backup = pg.dir.path().join("backup.toml");
    let backend = PostgresBackend::new(&pg.url(), "wiped").unwrap();
    assert_eq!(backend.export_file(&backup).await.unwrap(), 2);
    pg.psql("DELETE FROM tak_namespaces WHERE namespace = 'wiped'");
    let start = Instant::now();
    loop {
        if let Some(error) = r
            .store
            .last_reload()
            .and_then(|x| x.error().map(|e| common::chain(e)))
        {
            assert!(error.contains("tak_namespaces"), "{error}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "never reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(r.addr, "reader-secret").await, 200);
    // The API refuses writes and lists, rather than recreating or answering [].
    let (code, body) = api(
        r.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "lonely"})),
    )
    .await;
    assert_eq!((code, problem(&body)), (503, "store-missing"), "{body:?}");
    let (code, body) = api(r.addr, reqwest::Method::GET, "/v1/api-keys", None).await;
    assert_eq!((code, problem(&body)), (503, "store-missing"), "{body:?}");
    assert!(pg.ids("wiped").len() == 2 && !pg.ids("wiped").contains(&"lonely".to_owned()));
    // Restored from the export: a new epoch, read whole by the replica.
    assert_eq!(backend.restore_file(&backup).await.unwrap(), 2);
    let (code, _) = api(
        r.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "after"})),
    )
    .await;
    assert_eq!(code, 201);
    assert_eq!(status(r.addr, "reader-secret").await, 200);
}

#[tokio::test]
async fn an_emptied_keys_table_is_not_zero_keys() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "emptied").await;
    let r = replica(&pg, "emptied", false).await;
    pg.psql("DELETE FROM tak_keys WHERE namespace = 'emptied'");
    // A new replica refuses to read it as a set of no keys...
    let store = KeyStore::new();
    let err = store.add_source(source(&pg, "emptied")).unwrap_err();
    assert!(common::chain(&err).contains("counts"), "{err}");
    // ...and one already running, made to read it whole by a new epoch of the
    // version row, keeps its keys.
    pg.psql("UPDATE tak_namespaces SET epoch = 'other' WHERE namespace = 'emptied'");
    let start = Instant::now();
    while r.store.last_reload().is_none_or(|x| x.is_applied()) {
        assert!(start.elapsed() < Duration::from_secs(5), "never reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(r.addr, "reader-secret").await, 200);
    assert_eq!(status(r.addr, "root-secret").await, 200);
}

/// `TRUNCATE` of the keys table under a running fleet: the API refuses to write on
/// top of it (503 `store-missing`, as it refuses to list), where it used to create
/// keys the replicas would never load and answer 404 for keys they still let in.
#[tokio::test]
async fn the_api_writes_nothing_over_an_emptied_keys_table() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "truncated").await;
    let r = replica(&pg, "truncated", true).await;
    pg.psql("TRUNCATE tak_keys");
    for (method, path, body) in [
        (
            reqwest::Method::POST,
            "/v1/api-keys",
            Some(json!({"id": "t2"})),
        ),
        (reqwest::Method::DELETE, "/v1/api-keys/reader", None),
        (reqwest::Method::POST, "/v1/api-keys/reader/rotate", None),
    ] {
        let (code, body) = api(r.addr, method.clone(), path, body).await;
        assert_eq!(
            (code, problem(&body)),
            (503, "store-missing"),
            "{method} {path}: {body:?}"
        );
    }
    // Nor a read of one key: wiped, not "not found".
    let (code, body) = api(r.addr, reqwest::Method::GET, "/v1/api-keys/reader", None).await;
    assert_eq!((code, problem(&body)), (503, "store-missing"), "{body:?}");
    // Nor an import, which would add its keys to the row's old count.
    let one = pg.dir.path().join("one.toml");
    std::fs::write(&one, "[[keys]]\nid = \"t9\"\nsecret = \"t9-secret\"\n").unwrap();
    let backend = PostgresBackend::new(&pg.url(), "truncated").unwrap();
    let err = backend.import_file(&one).await.unwrap_err();
    assert!(
        common::chain(&err).contains("missing") || common::chain(&err).contains("wiped"),
        "{err}"
    );
    assert!(pg.ids("truncated").is_empty(), "nothing written over it");
    // Wiped, to whoever asks (the cli's `restore` needs no `--force` for it).
    assert!(!backend.exists().await.unwrap());
    assert_eq!(status(r.addr, "reader-secret").await, 200);
    // Restored, it takes writes again.
    let backup = pg.dir.path().join("keys.toml");
    std::fs::write(&backup, SEED).unwrap();
    assert_eq!(backend.restore_file(&backup).await.unwrap(), 2);
    let (code, body) = api(
        r.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "t3"})),
    )
    .await;
    assert!(code == 201 || code == 202, "{code} {body:?}");
}

/// A record deleted by hand (`DELETE FROM tak_keys`, no change written), which the
/// replicas following the change table still let in: the API does not answer "not
/// found" for it (an operator revoking it would take it for gone) but 503
/// `store-missing`, naming the key. Restored, it is revoked as any other key. A key
/// that never existed is still 404, at once.
#[tokio::test]
async fn a_key_deleted_by_hand_is_not_not_found_while_the_fleet_lets_it_in() {
    let Some(pg) = Postgres::start() else { return };
    let backup = seed(&pg, "by-hand").await;
    let store = KeyStore::new();
    let _ = store.add_source(source(&pg, "by-hand"));
    let backend = PostgresBackend::new(&pg.url(), "by-hand").unwrap();
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { "ok" }))
        .route_layer(tower_api_key::ApiKeyLayer::from_store(store.clone()))
        .merge(
            tower_api_key::admin::AdminApi::new(store.clone(), backend)
                .with_apply_timeout(Duration::from_millis(500))
                .router(),
        );
    let addr = common::serve(app).await;
    let other = replica(&pg, "by-hand", false).await;
    until(addr, "reader-secret", 200, Duration::from_secs(5)).await;
    until(other.addr, "reader-secret", 200, Duration::from_secs(5)).await;

    pg.psql("DELETE FROM tak_keys WHERE namespace = 'by-hand' AND id = 'reader'");
    for (method, path) in [
        (reqwest::Method::GET, "/v1/api-keys/reader"),
        (reqwest::Method::DELETE, "/v1/api-keys/reader"),
        (reqwest::Method::POST, "/v1/api-keys/reader/rotate"),
    ] {
        let (code, body) = api(addr, method.clone(), path, None).await;
        assert_eq!(
            (code, problem(&body), body["key_id"].as_str()),
            (503, "store-missing", Some("reader")),
            "{method} {path}: {body:?}"
        );
    }
    let started = Instant::now();
    let (code, _) = api(addr, reqwest::Method::GET, "/v1/api-keys/nobody", None).await;
    assert_eq!(code, 404);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "no wait for it"
    );
    assert_eq!(status(other.addr, "reader-secret").await, 200);

    // Restored from a backup, the key is there to revoke, and is revoked everywhere.
    let restore = PostgresBackend::new(&pg.url(), "by-hand").unwrap();
    assert_eq!(restore.restore_file(&backup).await.unwrap(), 2);
    until(addr, "reader-secret", 200, Duration::from_secs(5)).await;
    let (code, body) = api(addr, reqwest::Method::DELETE, "/v1/api-keys/reader", None).await;
    assert!(code == 204 || code == 202, "{code} {body:?}");
    until(other.addr, "reader-secret", 401, Duration::from_secs(5)).await;
    until(addr, "reader-secret", 401, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn import_export_and_restore_round_trip() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "io").await;
    let r = replica(&pg, "io", false).await;
    let path = pg.dir.path().join("more.toml");
    fs::write(&path, keys_file("k", 50)).unwrap();
    let backend = PostgresBackend::new(&pg.url(), "io").unwrap();
    assert_eq!(backend.import_file(&path).await.unwrap(), 50);
    until(r.addr, "k-49-secret", 200, Duration::from_secs(3)).await;
    let out = pg.dir.path().join("out.toml");
    assert_eq!(backend.export_file(&out).await.unwrap(), 52);
    let text = fs::read_to_string(&out).unwrap();
    assert!(!text.contains("k-49-secret") && text.contains("sha256"));
    // Restore to the seed only: every import key goes.
    let seed_path = pg.dir.path().join("io-seed.toml");
    assert_eq!(backend.restore_file(&seed_path).await.unwrap(), 2);
    until(r.addr, "k-49-secret", 401, Duration::from_secs(3)).await;
    assert_eq!(status(r.addr, "root-secret").await, 200);
}

#[tokio::test]
async fn the_api_shows_the_fleet_s_usage() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "usage").await;
    let a = replica(&pg, "usage", true).await;
    let b = replica(&pg, "usage", false).await;
    for _ in 0..7 {
        assert_eq!(status(b.addr, "reader-secret").await, 200);
    }
    let start = Instant::now();
    loop {
        let (code, body) = api(a.addr, reqwest::Method::GET, "/v1/api-keys/reader", None).await;
        assert_eq!(code, 200);
        if body["usage"]["requests"].as_u64() == Some(7) {
            assert!(body["usage"]["last_used"].is_string(), "{body}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A key removed takes its counts with it: the usage table stays bounded.
    let counted = "SELECT count(*) FROM tak_usage WHERE namespace = 'usage' AND id = 'reader'";
    assert_eq!(pg.psql(counted), "1");
    let (code, _) = api(a.addr, reqwest::Method::DELETE, "/v1/api-keys/reader", None).await;
    assert_eq!(code, 204);
    assert_eq!(pg.psql(counted), "0");
}

#[test]
fn urls_and_errors_never_show_the_password() {
    for url in [
        "postgres://u:hunter2-secret@db.example:5432/app?sslmode=verify-full",
        "postgresql://u:hunter2-secret@db.example/app",
        "host=db.example user=u password=hunter2-secret sslmode=require",
    ] {
        let source = PostgresSource::new(url, "ns").unwrap();
        let backend = PostgresBackend::new(url, "ns").unwrap();
        for text in [format!("{source:?}"), format!("{backend:?}")] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("db.example"), "{text}");
        }
    }
    for bad in [
        "postgres://u:hunter2-secret@db/app?sslmode=nonsense",
        "postgres://u:hunter2-secret@db/app?sslrootcert=/nonexistent/ca.pem",
        "postgres://u:hunter2-secret@db:notaport/app",
    ] {
        let err = PostgresSource::new(bad, "ns").unwrap_err();
        let text = format!("{} {err:?}", common::chain(&err));
        assert!(!text.contains("hunter2"), "{text}");
    }
    assert!(PostgresSource::new("postgres://db/app", "").is_err());
}

#[tokio::test]
async fn tls_with_sslmode_verify_full_and_sslrootcert() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let Some(ca) = pg.enable_tls() else {
        assert!(std::env::var("CI").is_err(), "openssl is needed under CI");
        println!("skipped: openssl not found");
        return;
    };
    let url = |mode: &str| {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres?sslmode={mode}&sslrootcert={}",
            pg.port,
            ca.display()
        )
    };
    let backend = PostgresBackend::new(&url("verify-full"), "tls").unwrap();
    backend.migrate().await.unwrap();
    let seed_file = pg.dir.path().join("tls-seed.toml");
    fs::write(&seed_file, SEED).unwrap();
    backend.import_file(&seed_file).await.unwrap();
    let store = KeyStore::new();
    store
        .add_source(PostgresSource::new(&url("require"), "tls").unwrap())
        .unwrap();
    assert_eq!(store.len(), 2);
    // The connections are encrypted.
    let ssl = pg.psql(
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE ssl AND application_name LIKE 'tower-api-key%'",
    );
    assert!(ssl.parse::<u32>().unwrap() >= 1, "{ssl}");
    // A certificate the CA did not sign is refused: the Web PKI roots do not know it.
    let untrusted = format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres?sslmode=require",
        pg.port
    );
    let err = KeyStore::new()
        .add_source(PostgresSource::new(&untrusted, "tls").unwrap())
        .unwrap_err();
    let said = common::chain(&err);
    assert!(!said.contains(PASSWORD), "{said}");
}

#[tokio::test]
async fn dropped_tables_are_not_zero_keys() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "dropped").await;
    let r = replica(&pg, "dropped", true).await;
    let backup = pg.dir.path().join("dropped-backup.toml");
    let backend = PostgresBackend::new(&pg.url(), "dropped").unwrap();
    backend.export_file(&backup).await.unwrap();
    pg.try_psql("DROP TABLE tak_changes, tak_keys, tak_namespaces, tak_usage, tak_writes")
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(error) = r
            .store
            .last_reload()
            .and_then(|x| x.error().map(|e| common::chain(e)))
        {
            assert!(error.contains("tables are missing"), "{error}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "never reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(r.addr, "reader-secret").await, 200);
    let (code, body) = api(
        r.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "lonely"})),
    )
    .await;
    assert_eq!((code, problem(&body)), (503, "store-missing"), "{body:?}");
    assert!(!backend.exists().await.unwrap());
    // The operator migrates and restores; the replica follows the new epoch.
    backend.migrate().await.unwrap();
    backend.restore_file(&backup).await.unwrap();
    let (code, created) = api(
        r.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "back"})),
    )
    .await;
    assert_eq!(code, 201, "{created:?}");
    assert_eq!(status(r.addr, "reader-secret").await, 200);
}

/// One secret under two ids: an import that would store it is refused, with nothing
/// written. Written anyway (by hand, by an older writer), every replica refuses both
/// keys, those that followed the write and those loaded after it; once one of the two
/// goes, every replica lets the other in again.
#[tokio::test]
async fn a_secret_stored_under_two_ids_is_refused_on_both_until_one_goes() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "twice").await;
    let before = replica(&pg, "twice", false).await;
    assert_eq!(status(before.addr, "reader-secret").await, 200);
    let backend = PostgresBackend::new(&pg.url(), "twice").unwrap();
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
    let after = replica(&pg, "twice", false).await;
    assert_eq!(status(after.addr, "reader-secret").await, 401);
    assert_eq!(status(after.addr, "root-secret").await, 200);
    AdminBackend::delete(&backend, "copy", None).await.unwrap();
    for r in [&before, &after] {
        until(r.addr, "reader-secret", 200, Duration::from_secs(5)).await;
    }
}
