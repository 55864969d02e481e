//! The layer inside a real axum `Router`, driven in-process (no network): the
//! router's own per-request work around the layer, without the kernel's network
//! path, whose cost (about 14 µs of CPU a request here) drowns a few hundred
//! nanoseconds in the end-to-end bench. Paired rounds: each variant against the
//! do-nothing layer of the same round.
//!
//! Run: `cargo bench --bench router` (about a minute; builds a 1M-key set).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use axum::{Router, body::Body, routing::get};
use common::{key, key_set};
use http::Request;
use tower::{Service, ServiceExt};
use tower_api_key::ApiKeyLayer;

const ROUNDS: usize = 31;
const CALLS: usize = 50_000;

fn app() -> Router {
    Router::new().route("/", get(|| async { "ok" }))
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let token = format!("Bearer {}", key(0));
    let variants: Vec<(&str, Router)> = vec![
        (
            "do-nothing layer",
            app().route_layer(tower::util::MapRequestLayer::new(|r| r)),
        ),
        (
            // What any layer that hands an identity on pays here: axum has already
            // put three values in the request's extensions, so a fourth grows the map.
            "do-nothing layer inserting an Arc into the extensions",
            app().route_layer(tower::util::MapRequestLayer::new(|mut r: Request<Body>| {
                r.extensions_mut().insert(std::sync::Arc::new(7_u64));
                r
            })),
        ),
        (
            "ApiKeyLayer, 1 key",
            app().route_layer(ApiKeyLayer::new(key_set(1))),
        ),
        (
            "ApiKeyLayer, 1M keys",
            app().route_layer(ApiKeyLayer::new(key_set(1_000_000))),
        ),
    ];
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    runtime.block_on(async {
        for round in 0..ROUNDS {
            for k in 0..variants.len() {
                let v = (k + round) % variants.len();
                let mut svc = variants[v].1.clone().into_service::<Body>();
                let start = Instant::now();
                for _ in 0..CALLS {
                    let req = Request::builder()
                        .uri("/")
                        .header("host", "api.example.com")
                        .header("user-agent", "bench/1.0")
                        .header("accept", "*/*")
                        .header("authorization", &token)
                        .body(Body::empty())
                        .unwrap();
                    let res = svc.ready().await.unwrap().call(req).await.unwrap();
                    assert!(res.status().is_success());
                }
                ns[v].push(start.elapsed().as_nanos() as f64 / CALLS as f64);
            }
        }
    });
    println!("{ROUNDS} paired rounds of {CALLS} requests through an axum Router, in-process\n");
    println!("| variant | ns/request | over the do-nothing layer (median of paired rounds) |");
    println!("|---|---:|---:|");
    for (v, (name, _)) in variants.iter().enumerate() {
        let over: Vec<f64> = (0..ROUNDS).map(|r| ns[v][r] - ns[0][r]).collect();
        println!(
            "| {name} | {:.0} | {:.0} ns |",
            median(ns[v].clone()),
            median(over)
        );
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
