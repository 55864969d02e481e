//! Fleet-wide limits on Redis (issue 18's fleet targets), against a `redis-server`
//! started here on a free loopback port, 8 replicas in this process (each its own
//! store, `RedisSource` and axum server), each saturated by two loopback clients:
//!
//! - `rate`: one key limited to 1,000 per minute, for 3 minutes after a first minute
//!   that spends the initial burst: admitted per minute, and its ratio to the limit
//!   (target: within [0.95, 1.05]);
//! - `quota`: one key with a quota of 10,000 a day: admitted in all (target: at most
//!   10,000 plus the documented slack, none here, and at least 9,900).
//!
//! Run: `cargo bench --bench limits_fleet --features redis` (needs `redis-server`;
//! about 4½ minutes), or name a part: `... -- quota`. `FLEET_MINUTES=1` shortens
//! the rate part.
#![allow(clippy::unwrap_used)]

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use tower_api_key::{
    ApiKeyLayer, KeyStore,
    redis::{RedisBackend, RedisSource},
};

const REPLICAS: usize = 8;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Imports `file` into `ns` and starts the replicas: their addresses.
async fn fleet(url: &str, dir: &std::path::Path, ns: &str, file: &str) -> Vec<SocketAddr> {
    let path = dir.join(format!("{ns}.toml"));
    std::fs::write(&path, file).unwrap();
    RedisBackend::new(url, ns)
        .unwrap()
        .import_file(&path)
        .await
        .unwrap();
    let mut addrs = Vec::new();
    for _ in 0..REPLICAS {
        let store = KeyStore::new();
        store
            .add_source(RedisSource::new(url, ns).unwrap())
            .unwrap();
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route_layer(ApiKeyLayer::from_store(store));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }
    addrs
}

/// Two clients per replica send the key until `run` is over: the instants of the
/// `200`s, sorted.
async fn saturate(addrs: &[SocketAddr], run: Duration) -> Vec<Instant> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for &addr in addrs.iter().chain(addrs) {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut admitted = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let Ok(res) = client
                    .get(format!("http://{addr}/"))
                    .header("x-api-key", "fleet-secret")
                    .send()
                    .await
                else {
                    continue;
                };
                if res.status() == 200 {
                    admitted.push(Instant::now());
                }
            }
            admitted
        }));
    }
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    all
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
    let url = format!("redis://127.0.0.1:{port}/");
    if run("rate") {
        let minutes: u32 = std::env::var("FLEET_MINUTES")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(3);
        let file = "[[keys]]\nid = \"fleet\"\nsecret = \"fleet-secret\"\n\
            rate_limits = [ { name = \"minute\", requests = 1000, per = \"1m\" } ]\n";
        let addrs = fleet(&url, dir.path(), "rate", file).await;
        let start = Instant::now();
        let minute = Duration::from_secs(60);
        let admitted = saturate(&addrs, minute * (minutes + 1)).await;
        println!(
            "rate: {REPLICAS} replicas saturating 1,000/min (first minute: the initial burst, not counted)"
        );
        for m in 1..=minutes {
            let (from, to) = (start + minute * m, start + minute * (m + 1));
            let n = admitted.iter().filter(|t| **t >= from && **t < to).count();
            println!(
                "  minute {m}: {n} admitted, {:.3}x the limit",
                n as f64 / 1000.0
            );
        }
    }
    if run("quota") {
        let file = "[[keys]]\nid = \"fleet\"\nsecret = \"fleet-secret\"\n\
            quota = { requests = 10000, per = \"day\" }\n";
        let addrs = fleet(&url, dir.path(), "quota", file).await;
        let admitted = saturate(&addrs, Duration::from_secs(20)).await;
        println!(
            "quota: {REPLICAS} replicas saturating a quota of 10,000: {} admitted",
            admitted.len()
        );
    }
}
