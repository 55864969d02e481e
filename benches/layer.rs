//! Per-request cost of `ApiKeyLayer`, side by side with the floor (a trivial service),
//! tower-http's static bearer check and the hand-written alternative users write
//! today. Every figure in the README is a ratio to the floor measured in the same run.
//!
//! Run: `cargo bench --bench layer` (add `-- <filter>` for a subset).
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, hint::black_box, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use common::{Floor, Req, Res, build, call, hand_written, key, key_set, request};
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use tower::{Layer, Service, ServiceBuilder};
use tower_api_key::ApiKeyLayer;

fn bench_one<S: Service<Req, Response = Res>>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    mut svc: S,
    headers: &HeaderMap,
) where
    S::Error: std::fmt::Debug,
{
    c.bench_function(id, |b| {
        b.iter_batched(
            || build(headers),
            |req| call(&mut svc, req),
            BatchSize::SmallInput,
        )
    });
}

fn layers(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let valid = request(Some(&key(0)));
    let unknown = request(Some(&key(usize::MAX / 3)));
    let missing = request(None);

    bench_one(&mut g, BenchmarkId::new("floor", "-"), Floor, &valid);
    #[allow(deprecated)] // "too basic": exactly why it is the cheapest baseline
    let bearer = ServiceBuilder::new()
        .layer(tower_http::validate_request::ValidateRequestHeaderLayer::bearer(&key(0)))
        .service(Floor);
    bench_one(
        &mut g,
        BenchmarkId::new("tower_http_bearer", "valid"),
        bearer,
        &valid,
    );

    for n in [1, 1_000, 1_000_000] {
        bench_one(
            &mut g,
            BenchmarkId::new("hand_written", format!("{n}/valid")),
            hand_written(n),
            &valid,
        );
        let layer = ApiKeyLayer::new(key_set(n));
        for (case, headers) in [
            ("valid", &valid),
            ("unknown", &unknown),
            ("missing", &missing),
        ] {
            bench_one(
                &mut g,
                BenchmarkId::new("api_key_layer", format!("{n}/{case}")),
                layer.layer(Floor),
                headers,
            );
        }
        bench_one(
            &mut g,
            BenchmarkId::new("api_key_layer_bearer_only", format!("{n}/valid")),
            layer.clone().bearer_only().layer(Floor),
            &valid,
        );
        bench_one(
            &mut g,
            BenchmarkId::new("api_key_layer_no_usage", format!("{n}/valid")),
            layer.clone().track_usage(false).layer(Floor),
            &valid,
        );
    }

    // 1M keys, a different valid key on every request: the lookup misses the caches.
    let n = 1_000_000;
    let cold: Vec<HeaderMap> = (0..n).step_by(97).map(|i| request(Some(&key(i)))).collect();
    let mut next = 0;
    let mut cold_case = |name: &str, mut svc: Box<dyn FnMut(Req) -> Res>| {
        g.bench_function(BenchmarkId::new(name.to_owned(), "1000000/cold"), |b| {
            b.iter_batched(
                || {
                    next = (next + 1) % cold.len();
                    build(&cold[next])
                },
                &mut svc,
                BatchSize::SmallInput,
            )
        });
    };
    let mut hw = hand_written(n);
    cold_case("hand_written", Box::new(move |req| call(&mut hw, req)));
    let mut ours = ApiKeyLayer::new(key_set(n)).layer(Floor);
    cold_case("api_key_layer", Box::new(move |req| call(&mut ours, req)));
    g.finish();
}

/// The unavoidable pieces alone, so their sum can be checked against the whole.
fn pieces(c: &mut Criterion) {
    let mut g = c.benchmark_group("piece");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    let headers = request(Some(&key(7)));
    g.bench_function("header_lookup", |b| {
        b.iter(|| black_box(black_box(&headers).get(header::AUTHORIZATION)).is_some())
    });
    let x_api_key = http::HeaderName::from_static("x-api-key");
    g.bench_function("custom_header_lookup_absent", |b| {
        b.iter(|| black_box(black_box(&headers).get(&x_api_key)).is_some())
    });
    let token = key(7); // in every key set
    g.bench_function("sha256_40B", |b| {
        b.iter(|| Sha256::digest(black_box(token.as_bytes())))
    });
    let generated = tower_api_key::generate("tak").unwrap();
    g.bench_function("has_valid_checksum", |b| {
        b.iter(|| tower_api_key::has_valid_checksum(black_box(generated.secret())))
    });
    let swap = ArcSwap::from_pointee(7u64);
    g.bench_function("arc_swap_load", |b| b.iter(|| **black_box(&swap).load()));
    let siphash: HashMap<[u8; 32], u64> = (0..1_000_000u64)
        .map(|i| (Sha256::digest(key(i as usize)).into(), i))
        .collect();
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    g.bench_function("siphash_map_lookup_1M", |b| {
        b.iter(|| black_box(&siphash).get(black_box(&digest)).copied())
    });
    let store = tower_api_key::KeyStore::new();
    store.add_source(key_set(1_000_000)).unwrap();
    g.bench_function("store_verify_1M_40B_key", |b| {
        b.iter(|| store.verify(black_box(token.as_bytes())).is_ok())
    });
    let meta = Arc::new(7u64);
    g.bench_function("extension_insert_arc", |b| {
        b.iter_batched(
            http::Extensions::new,
            |mut ext| {
                ext.insert(meta.clone());
                ext
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, layers, pieces);
criterion_main!(benches);
