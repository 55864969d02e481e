//! The `fleet_postgres` example as a user runs it (its own code, included here),
//! against a real PostgreSQL (see `postgres_support`): the first start seeds, a
//! restart does not bring back keys revoked through the API, and a second replica
//! enforces what the first one's API wrote.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "postgres")]

mod common;
mod postgres_support;

#[allow(dead_code)]
#[path = "../examples/fleet_postgres.rs"]
mod fleet;

use std::{path::PathBuf, time::Duration};

use postgres_support::*;
use serde_json::json;

fn config(pg: &Postgres, port: u16, seed: bool) -> fleet::Config {
    fleet::Config {
        url: pg.url(),
        port,
        seed: seed
            .then(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/keys.toml"))),
        restore: None,
        snapshot: pg.dir.path().join(format!("replica-{port}.toml")),
    }
}

#[tokio::test]
async fn the_example_serves_a_guarded_route_and_the_api_across_replicas() {
    let Some(pg) = Postgres::start() else { return };
    let (app, _store) = fleet::replica(&config(&pg, 3002, true)).await.unwrap();
    let first = common::serve(app).await;
    assert_eq!(status(first, "ops-admin-key").await, 200);
    let (app, _store) = fleet::replica(&config(&pg, 3003, false)).await.unwrap();
    let second = common::serve(app).await;
    // An admin key of the operator's own, then the public sample one revoked.
    let res = common::client()
        .post(format!("http://{first}/v1/api-keys"))
        .header("authorization", "Bearer ops-admin-key")
        .header("content-type", "application/json")
        .body(json!({"id": "ops-2", "scopes": ["admin", "read"]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 201);
    let created: serde_json::Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    let mine = created["key"].as_str().unwrap().to_owned();
    until(second, &mine, 200, Duration::from_secs(3)).await;
    let res = common::client()
        .delete(format!("http://{first}/v1/api-keys/ops-admin"))
        .header("authorization", format!("Bearer {mine}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 204);
    until(second, "ops-admin-key", 401, Duration::from_secs(3)).await;
    // Restarted with the same command line (SEED still set): nothing comes back.
    let (app, _store) = fleet::replica(&config(&pg, 3002, true)).await.unwrap();
    let again = common::serve(app).await;
    assert_eq!(status(again, "ops-admin-key").await, 401);
    assert_eq!(status(again, &mine).await, 200);
}
