//! A fleet on Redis, against a `redis-server` started here on a free loopback port:
//!
//! - `convergence`: 200 changes made through the key-management API of one replica,
//!   from the call's return to enforcement on each of 8 replicas (p50, p99, max);
//! - `creates`: creates per second through one replica's API with 50 concurrent
//!   clients (each call returns once the replica's own store enforces the key, so
//!   this includes the follower's latency);
//! - `snapshot`: a one-key change to a 100,000-key namespace, from the write's
//!   return to enforcement on a replica that keeps a snapshot file, one change every
//!   20 ms, against a replica without one;
//! - `million`: the initial load of 1,000,000 keys from Redis, and a one-key change
//!   to that namespace from the API's return to enforcement on another replica.
//!
//! Run: `cargo bench --bench fleet --features redis` (needs `redis-server`; a couple
//! of minutes; ~2 GiB), or name the parts to run: `... -- creates snapshot`.
#![allow(clippy::unwrap_used)]

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use tower_api_key::{
    ApiKey, ApiKeyLayer, KeyStore,
    admin::{AdminApi, AdminBackend},
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

fn summary(times: &mut [Duration]) -> String {
    times.sort();
    format!(
        "p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        percentile(times, 0.5),
        percentile(times, 0.99),
        times[times.len() - 1]
    )
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

/// A key file of `n` digest-only keys `key-{i}`, and the admin key `root`.
fn key_file(path: &Path, n: usize) {
    use sha2::{Digest, Sha256};
    use std::fmt::Write as _;
    let mut text = String::with_capacity(n * 110 + 100);
    let _ = write!(
        text,
        "[[keys]]\nid = \"root\"\nsecret = \"root-secret\"\nscopes = [\"admin\"]\n\n"
    );
    for i in 0..n {
        let digest: String = Sha256::digest(format!("tak_{i:0>36}").as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let _ = write!(
            text,
            "[[keys]]\nid = \"key-{i:07}\"\nsha256 = \"{digest}\"\n\n"
        );
    }
    std::fs::write(path, text).unwrap();
}

struct Bench {
    url: String,
    dir: tempfile::TempDir,
    client: reqwest::Client,
}

impl Bench {
    async fn seed(&self, ns: &str, n: usize) {
        let path = self.dir.path().join(format!("{ns}.toml"));
        key_file(&path, n);
        RedisBackend::new(&self.url, ns)
            .unwrap()
            .import_file(&path)
            .await
            .unwrap();
    }

    async fn convergence(&self) {
        self.seed("bench", 0).await;
        let mut replicas = Vec::new();
        for _ in 0..REPLICAS {
            let store = KeyStore::new();
            store
                .add_source(RedisSource::new(&self.url, "bench").unwrap())
                .unwrap();
            replicas.push(store);
        }
        let writer = serve(
            &replicas[0],
            Some(RedisBackend::new(&self.url, "bench").unwrap()),
        )
        .await;
        let mut times = Vec::with_capacity(CHANGES * (REPLICAS - 1));
        for c in 0..CHANGES {
            let secret = create(&self.client, writer, &format!("k{c}")).await;
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
        println!(
            "convergence, {CHANGES} changes x {} replicas, from the API's return to enforcement: {}",
            REPLICAS - 1,
            summary(&mut times)
        );
    }

    async fn creates(&self) {
        const CLIENTS: usize = 50;
        const PER_CLIENT: usize = 100;
        self.seed("creates", 0).await;
        let store = KeyStore::new();
        store
            .add_source(RedisSource::new(&self.url, "creates").unwrap())
            .unwrap();
        let writer = serve(
            &store,
            Some(RedisBackend::new(&self.url, "creates").unwrap()),
        )
        .await;
        // Warm: the connections and the script cache.
        create(&self.client, writer, "warm").await;
        for round in 0..3 {
            let start = Instant::now();
            let tasks: Vec<_> = (0..CLIENTS)
                .map(|c| {
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let mut times = Vec::with_capacity(PER_CLIENT);
                        for i in 0..PER_CLIENT {
                            let t = Instant::now();
                            create(&client, writer, &format!("r{round}-c{c}-{i}")).await;
                            times.push(t.elapsed());
                        }
                        times
                    })
                })
                .collect();
            let mut times = Vec::new();
            for task in tasks {
                times.extend(task.await.unwrap());
            }
            let elapsed = start.elapsed();
            println!(
                "creates through the API, {CLIENTS} clients, {} creates: {:.0}/s; per call {}",
                CLIENTS * PER_CLIENT,
                (CLIENTS * PER_CLIENT) as f64 / elapsed.as_secs_f64(),
                summary(&mut times)
            );
        }
    }

    async fn snapshot(&self) {
        const KEYS: usize = 100_000;
        self.seed("snap", KEYS).await;
        let with = KeyStore::new();
        let path = self.dir.path().join("replica-snapshot.toml");
        with.add_source(
            RedisSource::new(&self.url, "snap")
                .unwrap()
                .with_snapshot(&path),
        )
        .unwrap();
        let without = KeyStore::new();
        without
            .add_source(RedisSource::new(&self.url, "snap").unwrap())
            .unwrap();
        let backend = RedisBackend::new(&self.url, "snap").unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for c in 0..200 {
            let secret = format!("snap-secret-{c}");
            backend
                .create(ApiKey::new(format!("snap-{c}"), secret.as_str()))
                .await
                .unwrap();
            let returned = Instant::now();
            let (mut on_a, mut on_b) = (None, None);
            while on_a.is_none() || on_b.is_none() {
                if on_a.is_none() && with.verify(&secret).is_ok() {
                    on_a = Some(returned.elapsed());
                }
                if on_b.is_none() && without.verify(&secret).is_ok() {
                    on_b = Some(returned.elapsed());
                }
                // Poll without taking a core from the replicas (two cores here).
                std::thread::sleep(Duration::from_micros(50));
                assert!(returned.elapsed() < Duration::from_secs(10));
            }
            a.extend(on_a);
            b.extend(on_b);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The snapshot catches up, in the background.
        let start = Instant::now();
        while !std::fs::read_to_string(&path).is_ok_and(|t| t.contains("snap-199")) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the snapshot follows"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "the snapshot had the last change {:.2?} after it",
            start.elapsed()
        );
        println!(
            "one-key change at {KEYS} keys, write to enforcement, one every 20 ms: with a snapshot {}; without {}",
            summary(&mut a),
            summary(&mut b)
        );
    }

    async fn million(&self) {
        let big = self.dir.path().join("million.toml");
        key_file(&big, 1_000_000);
        let start = Instant::now();
        RedisBackend::new(&self.url, "million")
            .unwrap()
            .import_file(&big)
            .await
            .unwrap();
        println!("import of 1M keys into Redis: {:.2?}", start.elapsed());
        let mut loads = Vec::new();
        let mut stores = Vec::new();
        for _ in 0..3 {
            let store = KeyStore::new();
            let start = Instant::now();
            store
                .add_source(RedisSource::new(&self.url, "million").unwrap())
                .unwrap();
            loads.push(start.elapsed());
            assert_eq!(store.len(), 1_000_001);
            stores.push(store);
            if stores.len() > 2 {
                stores.remove(0);
            }
        }
        println!(
            "initial load of 1M keys from Redis: {}",
            loads
                .iter()
                .map(|d| format!("{d:.2?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let writer = serve(
            &stores[0],
            Some(RedisBackend::new(&self.url, "million").unwrap()),
        )
        .await;
        let mut times = Vec::new();
        for c in 0..50 {
            let secret = create(&self.client, writer, &format!("big-{c}")).await;
            let returned = Instant::now();
            while stores[1].verify(&secret).is_err() {
                tokio::time::sleep(Duration::from_micros(200)).await;
                assert!(returned.elapsed() < Duration::from_secs(10));
            }
            times.push(returned.elapsed());
        }
        println!(
            "one-key change to a 1M-key namespace, from the API's return to enforcement on another replica (50 changes): {}",
            summary(&mut times)
        );
    }
}

#[tokio::main]
async fn main() {
    let parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |part: &str| parts.is_empty() || parts.iter().any(|p| p == part);
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bench = Arc::new(Bench {
        url: format!("redis://127.0.0.1:{port}/"),
        dir,
        client: reqwest::Client::new(),
    });
    if run("convergence") {
        bench.convergence().await;
    }
    if run("creates") {
        bench.creates().await;
    }
    if run("snapshot") {
        bench.snapshot().await;
    }
    if run("million") {
        bench.million().await;
    }
}
