//! One hot key used from two cores at once, against two keys used one per core: the
//! throughput of the first over the second. A request that wrote a cache line the
//! other core also writes (a shared request counter, a shared reference count) would
//! make that line bounce between the cores on every request, and the one-key case
//! slow; the goal is at least 0.9×.
//!
//! Paired rounds: in each, both cases run back to back (in alternating order), each
//! as two threads making `CALLS` requests through the layer to a do-nothing service;
//! the figure is the median over rounds of the ratio of their wall times. The two keys
//! of the second case are far apart in a 100,000-key set (in different shards, their
//! counters in different cells). `track_usage(false)` is measured the same way, to
//! show what the counting itself costs; so are two keys with one rate limit each
//! (issue 18's target: one limited key from two cores at least 0.8× two keys), with
//! and without the `RateLimit` fields on the responses.
//!
//! Run: `cargo bench --bench contention` (about half a minute; needs two free cores
//! to mean anything, so run it on a quiet machine).
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    hint::black_box,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use common::{Floor, build, call, key, key_set, limited_key_set, request};
use tower::Layer;
use tower_api_key::ApiKeyLayer;

const ROUNDS: usize = 21;
const CALLS: usize = 200_000;
const KEYS: usize = 100_000;

/// Wall time for two threads to make `CALLS` requests each, thread `t` with key
/// `keys[t]`.
fn run(layer: &ApiKeyLayer, keys: [usize; 2]) -> Duration {
    let start = Arc::new(Barrier::new(3));
    let threads: Vec<_> = keys
        .into_iter()
        .map(|k| {
            let mut svc = layer.layer(Floor);
            let headers = request(Some(&key(k)));
            let start = start.clone();
            thread::spawn(move || {
                // Warm up, then wait for the other thread.
                for _ in 0..CALLS / 10 {
                    black_box(call(&mut svc, build(&headers)));
                }
                start.wait();
                let began = Instant::now();
                for _ in 0..CALLS {
                    black_box(call(&mut svc, build(&headers)));
                }
                began.elapsed()
            })
        })
        .collect();
    start.wait();
    threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .max()
        .unwrap()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let parallelism = thread::available_parallelism().map_or(1, |n| n.get());
    if parallelism < 2 {
        println!("one core only: nothing to measure");
        return;
    }
    let counted = ApiKeyLayer::new(key_set(KEYS));
    let uncounted = ApiKeyLayer::from_store(counted.store().clone()).track_usage(false);
    // Both keys with one rate limit each, never reached: one key from two cores
    // shares its limiter's word, two keys do not.
    let limited = ApiKeyLayer::new(limited_key_set(KEYS, &[0, KEYS / 2])).rate_limit_headers(false);
    let limited_headers = ApiKeyLayer::from_store(limited.store().clone());
    println!("{ROUNDS} paired rounds of 2 threads × {CALLS} requests; {KEYS} keys\n");
    println!(
        "| layer | one key, ns/request | two keys, ns/request | one key / two keys, throughput |"
    );
    println!("|---|---:|---:|---:|");
    for (name, layer) in [
        ("counting usage", &counted),
        ("track_usage(false)", &uncounted),
        ("one rate limit", &limited),
        ("one rate limit, RateLimit fields", &limited_headers),
    ] {
        let (mut one, mut two, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let cases = [[0, 0], [0, KEYS / 2]];
            let mut times = [Duration::ZERO; 2];
            for c in 0..2 {
                let c = (c + round) % 2;
                times[c] = run(layer, cases[c]);
            }
            let per = |d: Duration| d.as_nanos() as f64 / CALLS as f64;
            one.push(per(times[0]));
            two.push(per(times[1]));
            ratio.push(times[1].as_secs_f64() / times[0].as_secs_f64());
        }
        println!(
            "| {name} | {:.1} | {:.1} | {:.2}× |",
            median(one),
            median(two),
            median(ratio)
        );
    }
    // Every request was counted, whichever core made it.
    let made = (ROUNDS * 4 * (CALLS + CALLS / 10)) as u64;
    let counted_requests: u64 = counted.store().usage().iter().map(|u| u.requests()).sum();
    assert_eq!(counted_requests, made, "requests counted");
    let limited_requests: u64 = limited.store().usage().iter().map(|u| u.requests()).sum();
    assert_eq!(limited_requests, 2 * made, "none refused");
}
