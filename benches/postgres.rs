//! A fleet on PostgreSQL, against a cluster started here (see
//! `tests/postgres_support`: `initdb` in a temp dir, a free loopback port):
//!
//! - `convergence`: 200 changes made through the key-management API of one replica,
//!   from the call's return to enforcement on each of 8 replicas (p50, p99, max);
//! - `million`: the initial load of 1,000,000 keys, and a one-key change to that
//!   namespace from the API's return to enforcement on a replica holding them all.
//!
//! Run: `cargo bench --bench postgres --features postgres` (needs PostgreSQL's
//! binaries; a few minutes; ~2 GiB), or name the parts: `... -- convergence`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/postgres_support/mod.rs"]
mod postgres_support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use postgres_support::{Postgres, seed};
use tower_api_key::{
    ApiKey, KeySet, KeyStore,
    postgres::{PostgresBackend, PostgresSource},
};

const REPLICAS: usize = 8;
const CHANGES: usize = 200;
const MILLION: usize = 1_000_000;

fn source(pg: &Postgres, ns: &str) -> PostgresSource {
    PostgresSource::new(&pg.url(), ns)
        .unwrap()
        .with_connect_timeout(Duration::from_secs(10))
}

/// Creates key `id` through the API at `addr`.
async fn create(client: &reqwest::Client, addr: SocketAddr, id: &str) {
    let res = client
        .post(format!("http://{addr}/v1/api-keys"))
        .header("authorization", "Bearer root-secret")
        .header("content-type", "application/json")
        .body(format!(r#"{{"id": "{id}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at]
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{what}: n={} p50={:.2?} p99={:.2?} max={:.2?}",
        times.len(),
        percentile(&times, 0.50),
        percentile(&times, 0.99),
        times[times.len() - 1]
    );
}

/// Waits until every store holds `id`; each store's time from `start`.
async fn enforced(stores: &[&KeyStore], id: &str, start: Instant) -> Vec<Duration> {
    let mut times = vec![None; stores.len()];
    while times.iter().any(Option::is_none) {
        for (i, store) in stores.iter().enumerate() {
            if times[i].is_none() && store.get(id).is_some() {
                times[i] = Some(start.elapsed());
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "`{id}` never arrived"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    times.into_iter().flatten().collect()
}

async fn convergence(pg: &Postgres) {
    seed(pg, "conv").await;
    let mut stores = Vec::new();
    for _ in 0..REPLICAS {
        let store = KeyStore::new();
        store.add_source(source(pg, "conv")).unwrap();
        stores.push(store);
    }
    let writer = postgres_support::replica_of(pg, "conv", stores[0].clone(), true).await;
    let client = reqwest::Client::new();
    let all: Vec<&KeyStore> = stores.iter().collect();
    let mut times = Vec::new();
    for i in 0..CHANGES {
        let id = format!("c{i}");
        create(&client, writer.addr, &id).await;
        times.extend(enforced(&all, &id, Instant::now()).await);
    }
    report(
        &format!("convergence after an API call ({REPLICAS} replicas, {CHANGES} changes)"),
        times,
    );
}

async fn million(pg: &Postgres) {
    let backend = PostgresBackend::new(&pg.url(), "million")
        .unwrap()
        .with_timeout(Duration::from_secs(600));
    backend.migrate().await.unwrap();
    let mut set = KeySet::new();
    set.insert(ApiKey::new("root", "root-secret").with_scopes(["admin"]))
        .unwrap();
    for i in 0..MILLION {
        set.insert(ApiKey::new(format!("m{i}"), format!("m{i}-secret")))
            .unwrap();
    }
    let start = Instant::now();
    backend.restore(&set).await.unwrap();
    println!("restore of {MILLION} keys: {:.2?}", start.elapsed());
    drop(set);
    let mut loads = Vec::new();
    let mut store = KeyStore::new();
    for _ in 0..3 {
        store = KeyStore::new();
        let start = Instant::now();
        store.add_source(source(pg, "million")).unwrap();
        loads.push(start.elapsed());
        assert_eq!(store.len(), MILLION + 1);
    }
    report(&format!("initial load of {MILLION} keys"), loads);
    let writer = KeyStore::new();
    writer.add_source(source(pg, "million")).unwrap();
    let api = postgres_support::replica_of(pg, "million", writer, true).await;
    let client = reqwest::Client::new();
    let mut times = Vec::new();
    for i in 0..50 {
        let id = format!("one{i}");
        create(&client, api.addr, &id).await;
        times.extend(enforced(&[&store], &id, Instant::now()).await);
    }
    report(
        &format!("one-key change at {MILLION} keys, API return to enforcement"),
        times,
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |part: &str| args.is_empty() || args.iter().any(|a| a == part);
    let Some(pg) = Postgres::start() else { return };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if wants("convergence") {
            convergence(&pg).await;
        }
        if wants("million") {
            million(&pg).await;
        }
    });
}
