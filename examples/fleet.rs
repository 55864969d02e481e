//! A replica of a fleet on Redis: seeds the namespace from a key file (the first admin
//! key), follows it, serves the key-management API, and exports the namespace to a key
//! file (digests only) for inspection. Run several, on different ports, against one
//! Redis: a key created through one is enforced by all.
//!
//! `REDIS_URL=redis://127.0.0.1:6379/ PORT=3002 cargo run --example fleet --features redis`
//! (`REDIS_URL` defaults to that; start one with `redis-server --port 6379`).

use std::{error::Error, net::SocketAddr, time::Duration};

use axum::{Router, routing::get};
use tower_api_key::{
    ApiKeyLayer, KeyStore,
    admin::AdminApi,
    redis::{RedisBackend, RedisSource},
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_api_key=info".into()),
        )
        .init();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let backend = RedisBackend::new(&url, "example")?;
    // The namespace comes into being with its first write: seed it with the sample
    // keys (`ops-admin`, secret `ops-admin-key`, has the `admin` scope).
    let seeded = backend
        .import_file(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/keys.toml"))
        .await?;
    println!("seeded namespace `example` with {seeded} keys");

    let store = KeyStore::new();
    let snapshot = std::env::temp_dir().join("tower-api-key-fleet-example.toml");
    store.add_source(
        RedisSource::new(&url, "example")?
            .with_usage_flush(Duration::from_secs(2))
            .with_snapshot(&snapshot),
    )?;
    let app = Router::new()
        .route("/", get(|| async { "hello from the fleet\n" }))
        .route_layer(ApiKeyLayer::from_store(store.clone()))
        .merge(AdminApi::new(store, backend).router());

    let exported = std::env::temp_dir().join("tower-api-key-fleet-export.toml");
    let n = RedisBackend::new(&url, "example")?
        .export_file(&exported)
        .await?;
    println!("exported {n} keys to {} (digests only)", exported.display());

    let port = match std::env::var("PORT") {
        Ok(port) => port
            .parse()
            .map_err(|_| format!("PORT={port} is not a port number"))?,
        Err(_) => 3002,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e} (set PORT to use another port)"))?;
    println!("listening on http://{addr}; create a key on any replica:");
    println!(
        "curl -s -X POST http://{addr}/v1/api-keys -H 'authorization: Bearer ops-admin-key' -H 'content-type: application/json' -d '{{\"id\": \"billing\"}}'"
    );
    axum::serve(listener, app).await?;
    Ok(())
}
