//! Cache misses per lookup in the cache-cold case (a different valid key of a
//! million on every request), counted by valgrind's cache simulation rather than
//! timed: run the same requests twice, with and without the lookups, and divide
//! the difference. Valgrind does not model prefetching, so this counts every cache
//! line a request reads that is not in the simulated caches.
//!
//! Run (about five minutes: each run builds a 1M-key set under valgrind):
//!
//! ```text
//! cargo bench --bench misses --no-run
//! B=$(ls -t target/release/deps/misses-* | grep -v '\.d$' | head -1)
//! for v in floor hand-written api-key-layer; do for n in 0 100000; do
//!   valgrind --tool=cachegrind --cache-sim=yes --cachegrind-out-file=cg.$v.$n $B $v $n
//! done; done
//! ```
//!
//! then compare the `DLmr` (last-level read misses) totals: (n=100000 − n=0) /
//! 100000, each variant's less the floor's. Run without arguments (as `cargo
//! bench` does), it only prints this.
#![allow(clippy::unwrap_used)]

mod common;

use std::hint::black_box;

use common::{Floor, build, call, hand_written, key, key_set, request};
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
    let values: Vec<HeaderValue> = (0..KEYS)
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
    match variant.as_str() {
        "floor" => (0..n).for_each(|_| drop(black_box(call(&mut Floor, cold())))),
        "hand-written" => {
            let mut svc = hand_written(KEYS);
            (0..n).for_each(|_| drop(black_box(call(&mut svc, cold()))));
        }
        "api-key-layer" => {
            let mut svc = ApiKeyLayer::new(key_set(KEYS)).layer(Floor);
            (0..n).for_each(|_| drop(black_box(call(&mut svc, cold()))));
        }
        other => println!("unknown variant {other}: floor, hand-written or api-key-layer"),
    }
}
