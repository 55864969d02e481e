//! The `fleet` example as a user runs it (its own code, included here), against a
//! real `redis-server` (see `redis_support`): restarting a replica must not bring
//! back keys revoked through the API (issue 16, finding 15).
#![allow(clippy::unwrap_used)]
#![cfg(feature = "redis")]

mod common;
mod redis_support;

#[allow(dead_code)]
#[path = "../examples/fleet.rs"]
mod fleet;

use std::path::PathBuf;

use redis_support::*;
use serde_json::json;

fn config(redis: &Redis, port: u16, seed: bool) -> fleet::Config {
    fleet::Config {
        url: redis.url(),
        port,
        seed: seed
            .then(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/keys.toml"))),
        restore: None,
        snapshot: redis.dir.path().join(format!("replica-{port}.toml")),
    }
}

#[tokio::test]
async fn restarting_a_replica_does_not_bring_back_revoked_keys() {
    let Some(redis) = Redis::start() else { return };
    let (app, _store) = fleet::replica(&config(&redis, 3002, true)).await.unwrap();
    let first = common::serve(app).await;
    assert_eq!(status(first, "ops-admin-key").await, 200);
    // The operator makes an admin key of their own and revokes the public sample one.
    let (code, created) = api_as(
        first,
        "ops-admin-key",
        reqwest::Method::POST,
        "/v1/api-keys",
        Some(json!({"id": "ops-2", "scopes": ["admin", "read"]})),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let mine = created["key"].as_str().unwrap().to_owned();
    let (code, body) = api_as(
        first,
        &mine,
        reqwest::Method::DELETE,
        "/v1/api-keys/ops-admin",
        None,
    )
    .await;
    assert_eq!(code, 204, "{body}");
    assert_eq!(status(first, "ops-admin-key").await, 401);
    // The replica restarts with the same command line (SEED still set), and another
    // one starts beside it.
    let (app, _store) = fleet::replica(&config(&redis, 3002, true)).await.unwrap();
    let again = common::serve(app).await;
    let (app, _store) = fleet::replica(&config(&redis, 3003, false)).await.unwrap();
    let other = common::serve(app).await;
    for addr in [first, again, other] {
        assert_eq!(
            status(addr, "ops-admin-key").await,
            401,
            "{addr}: revoked key back"
        );
        assert_eq!(status(addr, &mine).await, 200);
    }
    assert_ne!(fleet::default_snapshot(3002), fleet::default_snapshot(3003));
}
