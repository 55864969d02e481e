//! Paired rounds: every variant is timed in every round, in rotating order, and each
//! figure is taken against the floor *of the same round*. On a shared or virtual
//! machine whose speed drifts between runs (ours does, by up to 40%), this gives
//! stable ratios where separate criterion runs do not.
//!
//! Run: `cargo bench --bench paired` (about a minute and a half; needs ~1.5 GiB for
//! the two 1M-key sets).
#![allow(clippy::unwrap_used)]

mod common;

use std::{hint::black_box, time::Instant};

use common::{Floor, Req, build, call, hand_written, key, key_set, request};
use http::{HeaderMap, HeaderValue, header};
use tower::{Layer, ServiceBuilder};
use tower_api_key::ApiKeyLayer;

const ROUNDS: usize = 31;
const CALLS: usize = 20_000;
const COLD_KEYS: usize = 1_000_000;

struct Variant {
    name: String,
    /// The floor this variant is measured against (index into the variants).
    floor: usize,
    /// The variant whose overhead this one is compared with, if any.
    versus: Option<usize>,
    run: Box<dyn FnMut()>,
    ns: Vec<f64>,
}

fn variant(name: &str, floor: usize, versus: Option<usize>, run: Box<dyn FnMut()>) -> Variant {
    Variant {
        name: name.to_owned(),
        floor,
        versus,
        run,
        ns: Vec::new(),
    }
}

/// A request builder for the cold case: a different valid key every call, in an order
/// that defeats the prefetcher.
struct Cold {
    base: HeaderMap,
    values: Vec<HeaderValue>,
    next: usize,
}

impl Cold {
    fn new() -> Self {
        Self {
            base: request(None),
            values: (0..COLD_KEYS)
                .map(|i| HeaderValue::from_str(&format!("Bearer {}", key(i))).unwrap())
                .collect(),
            next: 0,
        }
    }

    fn request(&mut self) -> Req {
        // A stride coprime with the key count visits every key once per cycle.
        self.next = (self.next + 618_034) % self.values.len();
        let mut req = build(&self.base);
        req.headers_mut()
            .insert(header::AUTHORIZATION, self.values[self.next].clone());
        req
    }
}

fn main() {
    let valid = request(Some(&key(0)));
    let unknown = request(Some("tak_not-a-key-not-a-key-not-a-key-00000"));
    let missing = request(None);
    let mut v: Vec<Variant> = Vec::new();

    let h = valid.clone();
    v.push(variant(
        "floor",
        0,
        None,
        Box::new(move || drop(black_box(call(&mut Floor, build(&h))))),
    ));
    #[allow(deprecated)] // "too basic": exactly why it is the cheapest baseline
    let mut bearer = ServiceBuilder::new()
        .layer(tower_http::validate_request::ValidateRequestHeaderLayer::bearer(&key(0)))
        .service(Floor);
    let h = valid.clone();
    v.push(variant(
        "tower-http bearer",
        0,
        None,
        Box::new(move || drop(black_box(call(&mut bearer, build(&h))))),
    ));

    for n in [1, 1_000, COLD_KEYS] {
        let alt = v.len();
        let mut hw = hand_written(n);
        let h = valid.clone();
        v.push(variant(
            &format!("hand-written {n} keys, valid"),
            0,
            None,
            Box::new(move || drop(black_box(call(&mut hw, build(&h))))),
        ));
        let layer = ApiKeyLayer::new(key_set(n));
        let cases: [(&str, &HeaderMap, Option<usize>); 3] = [
            ("valid", &valid, Some(alt)),
            ("unknown", &unknown, None),
            ("missing", &missing, None),
        ];
        for (case, headers, versus) in cases {
            let mut svc = layer.layer(Floor);
            let h = headers.clone();
            v.push(variant(
                &format!("ApiKeyLayer {n} keys, {case}"),
                0,
                versus,
                Box::new(move || drop(black_box(call(&mut svc, build(&h))))),
            ));
        }
        let mut svc = layer.clone().bearer_only().layer(Floor);
        let h = valid.clone();
        v.push(variant(
            &format!("ApiKeyLayer {n} keys, valid, bearer only"),
            0,
            Some(alt),
            Box::new(move || drop(black_box(call(&mut svc, build(&h))))),
        ));
        let with_usage = v.len() - 4;
        let mut svc = layer.clone().track_usage(false).layer(Floor);
        let h = valid.clone();
        v.push(variant(
            &format!("ApiKeyLayer {n} keys, valid, no usage tracking"),
            0,
            Some(with_usage),
            Box::new(move || drop(black_box(call(&mut svc, build(&h))))),
        ));
    }

    // The cold case: its own floor, since building its requests costs a little more.
    let cold_floor = v.len();
    let mut cold = Cold::new();
    v.push(variant(
        "floor, cold requests",
        cold_floor,
        None,
        Box::new(move || drop(black_box(call(&mut Floor, cold.request())))),
    ));
    let alt = v.len();
    let mut cold = Cold::new();
    let mut hw = hand_written(COLD_KEYS);
    v.push(variant(
        "hand-written 1M keys, cold",
        cold_floor,
        None,
        Box::new(move || drop(black_box(call(&mut hw, cold.request())))),
    ));
    let mut cold = Cold::new();
    let mut ours = ApiKeyLayer::new(key_set(COLD_KEYS)).layer(Floor);
    v.push(variant(
        "ApiKeyLayer 1M keys, cold",
        cold_floor,
        Some(alt),
        Box::new(move || drop(black_box(call(&mut ours, cold.request())))),
    ));

    for round in 0..ROUNDS {
        let len = v.len();
        for k in 0..len {
            let variant = &mut v[(k + round) % len];
            for _ in 0..CALLS / 10 {
                (variant.run)(); // warm up
            }
            let start = Instant::now();
            for _ in 0..CALLS {
                (variant.run)();
            }
            variant
                .ns
                .push(start.elapsed().as_nanos() as f64 / CALLS as f64);
        }
    }

    println!("{ROUNDS} paired rounds of {CALLS} calls; medians over rounds\n");
    println!("| variant | ns/request | overhead over floor (ns) | overhead ratio |");
    println!("|---|---:|---:|---|");
    for x in &v {
        let overhead: Vec<f64> = (0..ROUNDS).map(|r| x.ns[r] - v[x.floor].ns[r]).collect();
        let ratio = x.versus.map(|o| {
            let r: Vec<f64> = (0..ROUNDS)
                .map(|r| (x.ns[r] - v[x.floor].ns[r]) / (v[o].ns[r] - v[v[o].floor].ns[r]))
                .collect();
            format!("{:.2}× {}", median(r), v[o].name)
        });
        println!(
            "| {} | {:.1} | {:.1} | {} |",
            x.name,
            median(x.ns.clone()),
            median(overhead),
            ratio.unwrap_or_default()
        );
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
