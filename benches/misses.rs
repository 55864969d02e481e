//! Instructions and cache misses per request, counted by valgrind rather than timed
//! (valgrind counts the same on a busy machine as on a quiet one): the cache-cold case
//! (a different valid key of a million on every request) and the hot one (one key of
//! a thousand, over and over), for the layer, the hand-written alternative and the
//! floor. Only what runs inside `common::call` is counted, so setting up a million
//! keys costs nothing in the figures. Valgrind does not model prefetching: every
//! cache line a request reads that is not in the simulated caches counts as a miss.
//!
//! Run (a few minutes per cold variant: each builds a 1M-key set under valgrind):
//!
//! ```text
//! cargo bench --bench misses --no-run
//! B=$(ls -t target/release/deps/misses-* | grep -v '\.d$' | head -1)
//! for v in floor hand-written api-key-layer floor-hot hand-written-hot api-key-layer-hot \
//!          hand-written-hot16 api-key-layer-hot16 \
//!          api-key-layer-hot-limited api-key-layer-hot-limited-headers; do
//!   valgrind --tool=callgrind --cache-sim=yes --LL=33554432,16,64 \
//!     --toggle-collect='misses::common::call*' --callgrind-out-file=cg.$v $B $v 20000
//! done
//! ```
//!
//! Each prints `Collected :` with the events `Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw`:
//! divide by 20,000 for a request. `Ir` is instructions; `DLmr`, last-level read
//! misses (a 32 MiB last level: a share of a server's, and far less than the million
//! keys' 150 MB). `callgrind_annotate --show=Ir,DLmr cg.<variant>` says where.
//! Under valgrind, SHA-256 runs without the SHA instructions (about 3,400 of a
//! request's instructions, the same for every variant). Run without arguments (as
//! `cargo bench` does), it only prints this.
#![allow(clippy::unwrap_used)]

mod common;

use std::hint::black_box;

use common::{Floor, build, call, hand_written, key, key_set, limited_key_set, request};
use http::{HeaderValue, header};
use tower::Layer;
use tower_api_key::ApiKeyLayer;

const KEYS: usize = 1_000_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(variant), Some(n)) = (args.first(), args.get(1).and_then(|n| n.parse().ok())) else {
        println!("run under valgrind, with a variant and a request count: see benches/misses.rs");
        return;
    };
    let n: usize = n;
    let base = request(None);
    // The hot variants need none of the million requests.
    let keys = if variant.ends_with("-hot") { 1 } else { KEYS };
    let values: Vec<HeaderValue> = (0..keys)
        .map(|i| HeaderValue::from_str(&format!("Bearer {}", key(i))).unwrap())
        .collect();
    let mut next = 0;
    // A stride coprime with the key count: every request a key not seen lately.
    let mut cold = move || {
        next = (next + 618_034) % values.len();
        let mut req = build(&base);
        req.headers_mut()
            .insert(header::AUTHORIZATION, values[next].clone());
        req
    };
    let hot_headers = request(Some(&key(7)));
    let hot = || build(&hot_headers);
    // Sixteen keys spread over the thousand, taken in turn (as perf-anchor's hot case
    // does): what a few keys in use at once cost over one.
    let sixteen: Vec<_> = (0..16)
        .map(|j| request(Some(&key(j * 1_000 / 16))))
        .collect();
    let mut turn = 0;
    let mut hot16 = move || {
        turn = (turn + 1) % sixteen.len();
        build(&sixteen[turn])
    };
    match variant.as_str() {
        "floor" => (0..n).for_each(|_| drop(black_box(call(&mut Floor, cold())))),
        "floor-hot" => (0..n).for_each(|_| drop(black_box(call(&mut Floor, hot())))),
        "hand-written-hot" => {
            let mut svc = hand_written(1_000);
            (0..n).for_each(|_| drop(black_box(call(&mut svc, hot()))));
        }
        "hand-written-hot16" => {
            let mut svc = hand_written(1_000);
            (0..n).for_each(|_| drop(black_box(call(&mut svc, hot16()))));
        }
        "api-key-layer-hot16" => {
            let mut svc = ApiKeyLayer::new(key_set(1_000)).layer(Floor);
            (0..n).for_each(|_| drop(black_box(call(&mut svc, hot16()))));
        }
        "api-key-layer-hot" => {
            let mut svc = ApiKeyLayer::new(key_set(1_000)).layer(Floor);
            (0..n).for_each(|_| drop(black_box(call(&mut svc, hot()))));
        }
        // The same key with one rate limit: what deciding it costs (no `RateLimit`
        // fields), and with them.
        "api-key-layer-hot-limited" => {
            let layer = ApiKeyLayer::new(limited_key_set(1_000, &[7])).rate_limit_headers(false);
            let mut svc = layer.layer(Floor);
            (0..n).for_each(|_| drop(black_box(call(&mut svc, hot()))));
        }
        "api-key-layer-hot-limited-headers" => {
            let mut svc = ApiKeyLayer::new(limited_key_set(1_000, &[7])).layer(Floor);
            (0..n).for_each(|_| drop(black_box(call(&mut svc, hot()))));
        }
        "hand-written" => {
            let mut svc = hand_written(KEYS);
            (0..n).for_each(|_| drop(black_box(call(&mut svc, cold()))));
        }
        "api-key-layer" => {
            let mut svc = ApiKeyLayer::new(key_set(KEYS)).layer(Floor);
            (0..n).for_each(|_| drop(black_box(call(&mut svc, cold()))));
        }
        other => println!(
            "unknown variant {other}: floor, hand-written or api-key-layer, each also with -hot (and the last two with -hot16)"
        ),
    }
}
