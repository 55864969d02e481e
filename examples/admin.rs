//! A server with the key-management API mounted: `/` takes any valid key, and
//! `/v1/api-keys…` manages the keys, written into the key file. Run it with
//! `cargo run --example admin --features admin`, then follow the curl commands it
//! prints: create a key, list, rotate, revoke.
//!
//! It works on a copy of `examples/keys.toml` (the `ops-admin` key, secret
//! `ops-admin-key`, has the `admin` scope); pass a path to use your own file. `PORT`
//! picks the port (default 3001; `PORT=0` a free one, printed on the first line).

use std::{error::Error, net::SocketAddr, path::PathBuf};

use axum::{Extension, Router, routing::get};
use tower_api_key::{
    ApiKeyLayer, FileSource, KeyInfo, KeyStore,
    admin::{AdminApi, FileBackend},
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_api_key=info".into()),
        )
        .init();
    let path = match std::env::args().nth(1) {
        Some(path) => PathBuf::from(path),
        None => {
            let dir = std::env::temp_dir().join(format!(
                "tower-api-key-admin-example-{}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir)?;
            let copy = dir.join("keys.toml");
            std::fs::copy(
                concat!(env!("CARGO_MANIFEST_DIR"), "/examples/keys.toml"),
                &copy,
            )?;
            copy
        }
    };
    let store = KeyStore::new();
    store.add_source(FileSource::new(&path))?;
    let app =
        Router::new()
            .route(
                "/",
                get(|Extension(key): Extension<KeyInfo>| async move {
                    format!("hello, {}\n", key.id())
                }),
            )
            .route_layer(ApiKeyLayer::from_store(store.clone()))
            .merge(AdminApi::new(store, FileBackend::new(&path)).router());

    let port = match std::env::var("PORT") {
        Ok(port) => port
            .parse()
            .map_err(|_| format!("PORT={port} is not a port number"))?,
        Err(_) => 3001,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e} (set PORT to use another port)"))?;
    // PORT=0 picks a free port; the line below says which.
    let url = format!("http://{}", listener.local_addr()?);
    let admin = "-H 'authorization: Bearer ops-admin-key'";
    println!(
        "listening on {url}, keys in {} (managed by the API)\n",
        path.display()
    );
    println!("# create a key (its secret is in `key`, shown once):");
    println!(
        "curl -s -X POST {url}/v1/api-keys {admin} -H 'content-type: application/json' -d '{{\"id\": \"billing\", \"scopes\": [\"read\"]}}'"
    );
    println!("# list the keys:");
    println!("curl -s {url}/v1/api-keys {admin}");
    println!("# rotate: a successor, and the old key works one more hour:");
    println!(
        "curl -s -X POST {url}/v1/api-keys/billing/rotate {admin} -H 'content-type: application/json' -d '{{\"overlap_seconds\": 3600}}'"
    );
    println!("# revoke the old key at once:");
    println!("curl -i -X DELETE {url}/v1/api-keys/billing {admin}");
    println!("# the OpenAPI description:");
    println!("curl -s {url}/v1/openapi.json");
    axum::serve(listener, app).await?;
    Ok(())
}
