//! Reload latency: from the moment a new key file is renamed into place to the first
//! request (over loopback HTTP) that gets in with the key it adds, over 200
//! rotations, with file-system events and with polling alone.
//!
//! Run: `cargo bench --bench reload` (about a minute).
#![allow(clippy::unwrap_used)]

use std::{
    fs,
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use tower_api_key::{ApiKeyLayer, FileSource};

const ROTATIONS: usize = 200;

fn key_file(generation: usize) -> String {
    format!("[[keys]]\nid = \"gen-{generation}\"\nsecret = \"key-{generation}\"\n")
}

async fn run(events: bool, poll: Duration) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, key_file(0)).unwrap();
    let source = FileSource::new(&path)
        .with_file_events(events)
        .with_poll_interval(poll);
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route_layer(ApiKeyLayer::try_new(source).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::Client::new();
    let mut latencies = Vec::with_capacity(ROTATIONS);
    for generation in 1..=ROTATIONS {
        let tmp = dir.path().join("keys.toml.tmp");
        fs::write(&tmp, key_file(generation)).unwrap();
        let start = Instant::now();
        fs::rename(&tmp, &path).unwrap();
        loop {
            let status = client
                .get(format!("http://{addr}/"))
                .header("x-api-key", format!("key-{generation}"))
                .send()
                .await
                .unwrap()
                .status();
            if status == 200 {
                break;
            }
            assert!(
                start.elapsed() < poll + Duration::from_secs(5),
                "rotation {generation} never applied"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    latencies
}

fn report(name: &str, latencies: &[Duration]) {
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!(
        "{name}: {} rotations, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() {
    let events = run(true, Duration::from_secs(5)).await;
    report("file events (inotify), 20 ms debounce", &events);
    let poll = Duration::from_millis(250);
    let polled = run(false, poll).await;
    report("polling only, 250 ms interval", &polled);
}
