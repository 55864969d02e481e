//! A fleet on Redis, against a `redis-server` started here on a free loopback port:
//!
//! - convergence: 200 changes made through the key-management API of one replica,
//!   from the call's return to enforcement on each of 8 replicas (p50, p99, max);
//! - a one-key change to a 1,000,000-key namespace, from the call's return to
//!   enforcement on another replica;
//! - the initial load of 1,000,000 keys from Redis.
//!
//! Run: `cargo bench --bench fleet --features redis` (needs `redis-server`; about a
//! minute; ~2 GiB).
#![allow(clippy::unwrap_used)]

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use tower_api_key::{
    ApiKeyLayer, KeyStore,
    admin::AdminApi,
    redis::{RedisBackend, RedisSource},
};

const REPLICAS: usize = 8;
const CHANGES: usize = 200;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Creates key `id` through the API at `addr`; its secret.
async fn create(client: &reqwest::Client, addr: SocketAddr, id: &str) -> String {
    let res = client
        .post(format!("http://{addr}/v1/api-keys"))
        .header("authorization", "Bearer root-secret")
        .header("content-type", "application/json")
        .body(format!(r#"{{"id": "{id}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: serde_json::Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    body["key"].as_str().unwrap().to_owned()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn serve(store: &KeyStore, admin: Option<RedisBackend>) -> SocketAddr {
    let mut app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route_layer(ApiKeyLayer::from_store(store.clone()));
    if let Some(backend) = admin {
        app = app.merge(AdminApi::new(store.clone(), backend).router());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Server(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)"),
    );
    let url = format!("redis://127.0.0.1:{port}/");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seed = dir.path().join("seed.toml");
    std::fs::write(
        &seed,
        "[[keys]]\nid = \"root\"\nsecret = \"root-secret\"\nscopes = [\"admin\"]\n",
    )
    .unwrap();
    RedisBackend::new(&url, "bench")
        .unwrap()
        .import_file(&seed)
        .await
        .unwrap();

    // Convergence across 8 replicas.
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        let store = KeyStore::new();
        store
            .add_source(RedisSource::new(&url, "bench").unwrap())
            .unwrap();
        replicas.push(store);
    }
    let writer = serve(
        &replicas[0],
        Some(RedisBackend::new(&url, "bench").unwrap()),
    )
    .await;
    let client = reqwest::Client::new();
    let mut times = Vec::with_capacity(CHANGES * (REPLICAS - 1));
    for c in 0..CHANGES {
        let secret = create(&client, writer, &format!("k{c}")).await;
        let returned = Instant::now();
        let mut pending: Vec<usize> = (1..REPLICAS).collect();
        while !pending.is_empty() {
            pending.retain(|&r| {
                if replicas[r].verify(&secret).is_ok() {
                    times.push(returned.elapsed());
                    false
                } else {
                    true
                }
            });
            tokio::time::sleep(Duration::from_micros(200)).await;
            assert!(
                returned.elapsed() < Duration::from_secs(10),
                "never converged"
            );
        }
    }
    times.sort();
    println!(
        "convergence, {CHANGES} changes x {} replicas, from the API's return to enforcement: p50 {:.1?}, p99 {:.1?}, max {:.1?}",
        REPLICAS - 1,
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[times.len() - 1]
    );
    drop(replicas);

    // A million keys.
    let big = dir.path().join("million.toml");
    {
        use sha2::{Digest, Sha256};
        use std::fmt::Write as _;
        let mut text = String::with_capacity(110_000_000);
        let _ = write!(
            text,
            "[[keys]]\nid = \"root\"\nsecret = \"root-secret\"\nscopes = [\"admin\"]\n\n"
        );
        for i in 0..1_000_000 {
            let digest: String = Sha256::digest(format!("tak_{i:0>36}").as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let _ = write!(
                text,
                "[[keys]]\nid = \"key-{i:07}\"\nsha256 = \"{digest}\"\n\n"
            );
        }
        std::fs::write(&big, text).unwrap();
    }
    let start = Instant::now();
    RedisBackend::new(&url, "million")
        .unwrap()
        .import_file(&big)
        .await
        .unwrap();
    println!("import of 1M keys into Redis: {:.2?}", start.elapsed());
    let mut loads = Vec::new();
    let mut stores = Vec::new();
    for _ in 0..2 {
        let store = KeyStore::new();
        let start = Instant::now();
        store
            .add_source(RedisSource::new(&url, "million").unwrap())
            .unwrap();
        loads.push(start.elapsed());
        assert_eq!(store.len(), 1_000_001);
        stores.push(store);
    }
    println!(
        "initial load of 1M keys from Redis: {:.2?} and {:.2?}",
        loads[0], loads[1]
    );
    let writer = serve(
        &stores[0],
        Some(RedisBackend::new(&url, "million").unwrap()),
    )
    .await;
    let mut times = Vec::new();
    for c in 0..50 {
        let secret = create(&client, writer, &format!("big-{c}")).await;
        let returned = Instant::now();
        while stores[1].verify(&secret).is_err() {
            tokio::time::sleep(Duration::from_micros(200)).await;
            assert!(returned.elapsed() < Duration::from_secs(10));
        }
        times.push(returned.elapsed());
    }
    times.sort();
    println!(
        "one-key change to a 1M-key namespace, from the API's return to enforcement on another replica: p50 {:.1?}, p99 {:.1?}, max {:.1?} (50 changes)",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times[times.len() - 1]
    );
}
