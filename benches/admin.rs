//! The key-management API over a 10,000-key file: creates per second, and how long a
//! revocation takes from the DELETE to the moment the store refuses the key (the call
//! returns only then). A real axum server on 127.0.0.1 and a real HTTP client.
//!
//! Run: `cargo bench --bench admin --features admin` (about half a minute).
#![allow(clippy::unwrap_used)]

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use axum::Router;
use sha2::{Digest, Sha256};
use tower_api_key::{
    ApiKeyLayer, FileSource, KeyStore,
    admin::{AdminApi, FileBackend},
};

const KEYS: usize = 10_000;
const CALLS: usize = 100;

fn hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let mut file = format!(
        "# benchmark keys\n[[keys]]\nid = \"root\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n\n",
        hex("root-secret")
    );
    for i in 0..KEYS {
        let _ = write!(
            file,
            "[[keys]]\nid = \"key-{i:05}\"\nsha256 = \"{}\"\n\n",
            hex(&format!("secret-{i}"))
        );
    }
    std::fs::write(&path, &file).unwrap();
    let store = KeyStore::new();
    store.add_source(FileSource::new(&path)).unwrap();
    let app = Router::new()
        .route("/", axum::routing::get(|| async { "ok" }))
        .route_layer(ApiKeyLayer::from_store(store.clone()))
        .merge(AdminApi::new(store.clone(), FileBackend::new(&path)).router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    println!(
        "{} keys, {:.1} MB key file",
        KEYS + 1,
        file.len() as f64 / 1e6
    );

    let start = Instant::now();
    let mut secrets = Vec::new();
    for i in 0..CALLS {
        let res = client
            .post(format!("http://{addr}/v1/api-keys"))
            .header("authorization", "Bearer root-secret")
            .header("content-type", "application/json")
            .body(format!(r#"{{"id": "new-{i}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        let body: serde_json::Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
        secrets.push(body["key"].as_str().unwrap().to_owned());
    }
    let took = start.elapsed();
    println!(
        "create: {CALLS} sequential calls in {took:.2?}, {:.1} creates/s (each enforced when it returns)",
        CALLS as f64 / took.as_secs_f64()
    );

    let mut revoke = Vec::new();
    for (i, secret) in secrets.iter().enumerate() {
        let start = Instant::now();
        let res = client
            .delete(format!("http://{addr}/v1/api-keys/new-{i}"))
            .header("authorization", "Bearer root-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 204);
        revoke.push(start.elapsed());
        let next = client
            .get(format!("http://{addr}/"))
            .header("x-api-key", secret)
            .send()
            .await
            .unwrap();
        assert_eq!(next.status(), 401, "refused by the very next request");
    }
    revoke.sort();
    println!(
        "revoke to enforced: p50 {:.1?}, p99 {:.1?}, max {:.1?} ({CALLS} revocations)",
        percentile(&revoke, 0.5),
        percentile(&revoke, 0.99),
        revoke[revoke.len() - 1]
    );
}
