//! What a key's limits cost a request, one thread: the same request through the
//! layer with a key without limits and with one that has one rate limit (never
//! reached), a quota, two rate limits (which take the key's lock), and the
//! `RateLimit` fields on. Paired rounds: in each, every case runs back to back in a
//! rotating order; the figure is the median over rounds of each case's time minus
//! the key without limits' in the same round, so that a machine busy with other work
//! slows both alike.
//!
//! Run: `cargo bench --bench limits` (about twenty seconds).
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use common::{Floor, build, call, key, request};
use tower::Layer;
use tower_api_key::{
    ApiKey, ApiKeyLayer, KeySet,
    limit::{Quota, QuotaPeriod, RateLimit},
};

const ROUNDS: usize = 31;
const CALLS: usize = 50_000;

fn burst() -> RateLimit {
    RateLimit::new("burst", 1_000_000_000, Duration::from_secs(1))
}

fn main() {
    let plain = ApiKey::new("k", key(7)).with_scopes(["read"]);
    let cases: [(&str, ApiKey, bool); 5] = [
        ("no limits", plain.clone(), false),
        (
            "one rate limit",
            plain.clone().with_rate_limit(burst()),
            false,
        ),
        (
            "a quota",
            plain
                .clone()
                .with_quota(Quota::new((1 << 40) - 1, QuotaPeriod::Month)),
            false,
        ),
        (
            "two rate limits",
            plain
                .clone()
                .with_rate_limit(burst())
                .with_rate_limit(RateLimit::new(
                    "daily",
                    1_000_000_000_000,
                    Duration::from_secs(86_400),
                )),
            false,
        ),
        (
            "one rate limit, RateLimit fields",
            plain.clone().with_rate_limit(burst()),
            true,
        ),
    ];
    let headers = request(Some(&key(7)));
    let mut services: Vec<_> = cases
        .iter()
        .map(|(_, k, fields)| {
            // A thousand other keys, as in the other benches.
            let others = (0..1_000)
                .filter(|&i| i != 7)
                .map(|i| ApiKey::new(format!("key-{i}"), key(i)));
            let set = KeySet::from_keys(others.chain([k.clone()])).unwrap();
            ApiKeyLayer::new(set)
                .rate_limit_headers(*fields)
                .layer(Floor)
        })
        .collect();
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..ROUNDS {
        for c in 0..cases.len() {
            let c = (c + round) % cases.len();
            let svc = &mut services[c];
            let began = Instant::now();
            for _ in 0..CALLS {
                black_box(call(svc, build(&headers)));
            }
            per[c].push(began.elapsed().as_nanos() as f64 / CALLS as f64);
        }
    }
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    println!("{ROUNDS} paired rounds × {CALLS} requests, one thread\n");
    println!("| key | ns/request | over no limits, ns (median of paired differences) |");
    println!("|---|---:|---:|");
    for (c, (name, _, _)) in cases.iter().enumerate() {
        let over: Vec<f64> = per[c].iter().zip(&per[0]).map(|(a, b)| a - b).collect();
        println!(
            "| {name} | {:.1} | {:+.1} |",
            median(per[c].clone()),
            median(over)
        );
    }
}
