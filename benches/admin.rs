//! The key-management API over a 10,000-key file: creates per second from 50
//! concurrent clients, and how long a revocation takes from the DELETE to the moment
//! the store refuses the key (the call returns only then), one client at a time and
//! 50 at once. A real axum server on 127.0.0.1 and a real HTTP client.
//!
//! Run: `cargo bench --bench admin --features admin` (under a minute); with
//! `BENCH_DIR=/dev/shm`, on a memory file system.
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
const CLIENTS: usize = 50;
const CREATES: usize = 2_000;
const REVOKES: usize = 200;

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
    // BENCH_DIR=/dev/shm puts the key file on a memory file system, where a sync
    // costs nothing: the figures then show the API's own cost.
    let dir = match std::env::var_os("BENCH_DIR") {
        Some(at) => tempfile::tempdir_in(at).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
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
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    println!(
        "{} keys, {:.1} MB key file",
        KEYS + 1,
        file.len() as f64 / 1e6
    );

    // Creates: 50 clients at once, each making its share; every call returns once
    // the store enforces its key.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            for i in 0..CREATES / CLIENTS {
                let id = format!("new-{c}-{i}");
                let res = client
                    .post(format!("http://{addr}/v1/api-keys"))
                    .header("authorization", "Bearer root-secret")
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"id": "{id}"}}"#))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 201);
                let body: serde_json::Value =
                    serde_json::from_str(&res.text().await.unwrap()).unwrap();
                made.push((id, body["key"].as_str().unwrap().to_owned()));
            }
            made
        }));
    }
    let mut secrets = Vec::new();
    for task in tasks {
        secrets.extend(task.await.unwrap());
    }
    let took = start.elapsed();
    println!(
        "create: {CREATES} calls from {CLIENTS} concurrent clients in {took:.2?}, {:.0} creates/s (each enforced when it returns)",
        CREATES as f64 / took.as_secs_f64()
    );

    // Revocations one at a time: from the DELETE to the moment the store refuses
    // the key (a thread watching the store), and to the DELETE's answer (which comes
    // once the change is durable); the next request is checked.
    let mut enforced = Vec::new();
    let mut revoke = Vec::new();
    for (id, secret) in secrets.iter().take(REVOKES) {
        let watcher = {
            let (store, id) = (store.clone(), id.clone());
            std::thread::spawn(move || {
                while store.get(&id).is_some() {
                    std::thread::yield_now();
                }
                Instant::now()
            })
        };
        let start = Instant::now();
        let res = client
            .delete(format!("http://{addr}/v1/api-keys/{id}"))
            .header("authorization", "Bearer root-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 204);
        revoke.push(start.elapsed());
        enforced.push(watcher.join().unwrap().duration_since(start));
        let next = client
            .get(format!("http://{addr}/"))
            .header("x-api-key", secret)
            .send()
            .await
            .unwrap();
        assert_eq!(next.status(), 401, "refused by the very next request");
    }
    revoke.sort();
    enforced.sort();
    println!(
        "revoke to enforced, one client: p50 {:.2?}, p99 {:.2?}, max {:.2?} ({REVOKES} revocations)",
        percentile(&enforced, 0.5),
        percentile(&enforced, 0.99),
        enforced[enforced.len() - 1]
    );
    println!(
        "revoke to answered (durable), one client: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        percentile(&revoke, 0.5),
        percentile(&revoke, 0.99),
        revoke[revoke.len() - 1]
    );

    // Revocations from 50 clients at once.
    let rest: Vec<(String, String)> = secrets.iter().skip(REVOKES).cloned().collect();
    let mut tasks = Vec::new();
    for chunk in rest.chunks(rest.len().div_ceil(CLIENTS)) {
        let (client, chunk) = (client.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            for (id, _) in chunk {
                let start = Instant::now();
                let res = client
                    .delete(format!("http://{addr}/v1/api-keys/{id}"))
                    .header("authorization", "Bearer root-secret")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 204);
                took.push(start.elapsed());
            }
            took
        }));
    }
    let mut concurrent = Vec::new();
    for task in tasks {
        concurrent.extend(task.await.unwrap());
    }
    concurrent.sort();
    println!(
        "revoke to answered (durable), {CLIENTS} clients at once: p50 {:.2?}, p99 {:.2?}, max {:.2?} ({} revocations)",
        percentile(&concurrent, 0.5),
        percentile(&concurrent, 0.99),
        concurrent[concurrent.len() - 1],
        concurrent.len()
    );
}
