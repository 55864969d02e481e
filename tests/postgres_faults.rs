//! The PostgreSQL fleet under the faults issue 19 names, one test each, against a
//! real cluster: the server restarted, the listening connection terminated, a long
//! transaction holding the namespace's lock, the change table truncated, a record
//! that does not parse, and notifications lost.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "postgres")]

mod common;
mod postgres_support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use postgres_support::*;
use serde_json::json;
use tower_api_key::KeyStore;

/// A replica whose safety poll is slow (30 s): what it learns within a few seconds
/// it learns from a notification or a reconnection, not the poll.
fn slow_poll(pg: &Postgres, ns: &str) -> KeyStore {
    let store = KeyStore::new();
    store
        .add_source(source(pg, ns).with_version_check(Duration::from_secs(30)))
        .unwrap();
    store
}

async fn create(addr: std::net::SocketAddr, id: &str) -> String {
    let (code, body) = api(
        addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": id})),
    )
    .await;
    assert_eq!(code, 201, "{body:?}");
    body["key"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_restarted_server_loses_nothing_and_replicas_catch_up() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    seed(&pg, "restart").await;
    let writer = replica(&pg, "restart", true).await;
    let other = replica_of(&pg, "restart", slow_poll(&pg, "restart"), false).await;
    let before = create(writer.addr, "before").await;
    until(other.addr, &before, 200, Duration::from_secs(3)).await;
    pg.stop();
    assert_eq!(status(other.addr, &before).await, 200);
    // While it is down, a write is refused as not written (503), never lost.
    let (code, body) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "during"})),
    )
    .await;
    assert_eq!((code, problem(&body)), (503, "unavailable"), "{body:?}");
    pg.run();
    // The backend's first call after the restart reconnects, not 503.
    let after = create(writer.addr, "after").await;
    // The replica reconnects and reads what it missed (the poll is 30 s away).
    until(other.addr, &after, 200, Duration::from_secs(5)).await;
    assert_eq!(status(other.addr, &before).await, 200);
    assert_eq!(pg.ids("restart"), ["after", "before", "reader", "root"]);
}

#[tokio::test]
async fn a_terminated_listening_connection_is_made_again_and_caught_up() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "killed").await;
    let writer = replica(&pg, "killed", true).await;
    let other = replica_of(&pg, "killed", slow_poll(&pg, "killed"), false).await;
    for round in 0..3 {
        // (The replica's connection is made again on its own thread: wait for it.)
        let start = Instant::now();
        while pg.terminate_listeners() == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "round {round}: no listener"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A change right after: the replica's notification is lost with its
        // connection, and the reconnection's read finds it.
        let secret = create(writer.addr, &format!("k{round}")).await;
        until(other.addr, &secret, 200, Duration::from_secs(5)).await;
    }
    assert_eq!(status(other.addr, "reader-secret").await, 200);
}

#[tokio::test]
async fn a_long_transaction_on_the_namespace_lock_is_a_503_that_wrote_nothing() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "locked").await;
    let writer = replica(&pg, "locked", true).await;
    let other = replica(&pg, "locked", false).await;
    // Another program holds the namespace's row for 4 s.
    let mut holder = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-X", "-q", "-c"])
        .arg(
            "BEGIN; SELECT 1 FROM tak_namespaces WHERE namespace = 'locked' FOR UPDATE; \
             SELECT pg_sleep(4); COMMIT;",
        )
        .env("PGPASSWORD", PASSWORD)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    let (code, body) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "blocked"})),
    )
    .await;
    let took = start.elapsed();
    assert_eq!((code, problem(&body)), (503, "unavailable"), "{body:?}");
    assert!(took < Duration::from_secs(3), "waited {took:?}");
    // Reads go on meanwhile: replicas serve, the API lists.
    assert_eq!(status(other.addr, "reader-secret").await, 200);
    let (code, _) = api(writer.addr, reqwest::Method::GET, "/v1/api-keys", None).await;
    assert_eq!(code, 200);
    let _ = holder.wait();
    assert!(
        !pg.ids("locked").contains(&"blocked".to_owned()),
        "a 503 wrote"
    );
    let secret = create(writer.addr, "blocked").await;
    until(other.addr, &secret, 200, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn a_truncated_change_table_makes_replicas_read_whole() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "trunc").await;
    let r = replica_of(&pg, "trunc", slow_poll(&pg, "trunc"), false).await;
    assert_eq!(status(r.addr, "reader-secret").await, 200);
    // `reader` revoked by a change whose row is gone (the table truncated before the
    // replica read it), announced.
    pg.raw_change("trunc", "reader", None, false, false);
    pg.try_psql("TRUNCATE tak_changes; NOTIFY tak_changes, 'trunc'")
        .unwrap();
    until(r.addr, "reader-secret", 401, Duration::from_secs(5)).await;
    assert_eq!(status(r.addr, "root-secret").await, 200);
    // And it follows changes again afterwards.
    let writer = replica(&pg, "trunc", true).await;
    let secret = create(writer.addr, "next").await;
    until(r.addr, &secret, 200, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn a_record_that_does_not_parse_is_that_key_refused_others_kept() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "corrupt").await;
    let writer = replica(&pg, "corrupt", true).await;
    let r = replica(&pg, "corrupt", false).await;
    let bad = r#"{"id": "reader", "secret": "plain-text-secret"}"#;
    pg.raw_change("corrupt", "reader", Some(bad), true, true);
    until(r.addr, "reader-secret", 401, Duration::from_secs(3)).await;
    assert_eq!(status(r.addr, "root-secret").await, 200);
    // A replica starting now reads it whole: the same key refused, the others in.
    let fresh = replica(&pg, "corrupt", false).await;
    assert_eq!(status(fresh.addr, "root-secret").await, 200);
    assert_eq!(status(fresh.addr, "reader-secret").await, 401);
    // The API names the store's fault, without the record's content, and can delete
    // it.
    let (code, body) = api(
        writer.addr,
        reqwest::Method::GET,
        "/v1/api-keys/reader",
        None,
    )
    .await;
    assert_eq!(problem(&body), "corrupt-record", "{code} {body:?}");
    assert!(!body.to_string().contains("plain-text-secret"), "{body}");
    let (code, _) = api(
        writer.addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/reader",
        None,
    )
    .await;
    assert_eq!(code, 204);
    let secret = create(writer.addr, "fine").await;
    until(r.addr, &secret, 200, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn lost_notifications_are_caught_up_by_the_poll() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "quiet").await;
    let store = KeyStore::new();
    store
        .add_source(source(&pg, "quiet").with_version_check(Duration::from_millis(500)))
        .unwrap();
    let r = replica_of(&pg, "quiet", store, false).await;
    // A change committed without its NOTIFY (lost on the way, or a writer that never
    // sends one): the poll finds it.
    pg.raw_change("quiet", "reader", None, true, false);
    let took = until(r.addr, "reader-secret", 401, Duration::from_secs(3)).await;
    assert!(took < Duration::from_millis(1_500), "{took:?}");
    let record = format!(
        r#"{{"id": "late", "sha256": "{}"}}"#,
        sha256_hex("late-secret")
    );
    pg.raw_change("quiet", "late", Some(&record), true, false);
    until(r.addr, "late-secret", 200, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn a_write_whose_connection_is_terminated_mid_transaction_wrote_nothing() {
    let Some(pg) = Postgres::start() else { return };
    seed(&pg, "settle").await;
    let writer = replica(&pg, "settle", true).await;
    // The API's write waits for the namespace's lock held by another program, and
    // its connection is terminated meanwhile: the server says so (FATAL 57P01)
    // before any commit, so the answer is 503, nothing written; and the next call
    // makes a new connection.
    let mut holder = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-X", "-q", "-c"])
        .arg(
            "BEGIN; SELECT 1 FROM tak_namespaces WHERE namespace = 'settle' FOR UPDATE; \
             SELECT pg_sleep(5); COMMIT;",
        )
        .env("PGPASSWORD", PASSWORD)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let port = pg.port;
    let killer = tokio::spawn(async move {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let out = Command::new("psql")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args([
                    "-U", "postgres", "-d", "postgres", "-X", "-A", "-t", "-q", "-c",
                ])
                .arg(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name = 'tower-api-key-api' AND wait_event_type = 'Lock'",
                )
                .env("PGPASSWORD", PASSWORD)
                .output()
                .unwrap();
            let killed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if killed != "0" {
                return killed;
            }
        }
        "0".to_owned()
    });
    let (code, body) = api(
        writer.addr,
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "settled"})),
    )
    .await;
    assert_eq!(
        killer.await.unwrap(),
        "1",
        "the write was not waiting on the lock"
    );
    assert_eq!((code, problem(&body)), (503, "unavailable"), "{body:?}");
    let _ = holder.wait();
    // It did not commit after the lock was released either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pg.ids("settle").contains(&"settled".to_owned()),
        "a 503 wrote"
    );
    let secret = create(writer.addr, "settled").await;
    assert_eq!(status(writer.addr, &secret).await, 200);
}
