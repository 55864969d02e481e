//! Does the time to refuse a guess depend on how close it is to a real key? A
//! dudect-style check: guesses that share a long prefix with a real key against
//! random guesses, through `KeyStore::verify` and through the layer, compared with
//! Welch's t-test. |t| under 4.5 finds no difference.
//!
//! Every guess is drawn fresh, and both classes live in one array of fixed-size keys,
//! interleaved at random, so that memory layout and reuse cannot tell them apart.
//!
//! Run: `cargo bench --bench timing` (about a minute).
#![allow(clippy::unwrap_used)]

mod common;

use std::{hint::black_box, time::Instant};

use common::{Floor, call};
use http::{HeaderValue, Request, header};
use tower::Layer;
use tower_api_key::{ApiKey, ApiKeyLayer, KeySet, KeyStore};

const LEN: usize = 40;
const SHARED: usize = 36;
const BATCH: usize = 100_000;
const BATCHES: usize = 20;
const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).unwrap();
        Self(u64::from_le_bytes(seed) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn char(&mut self) -> u8 {
        ALPHABET[(self.next() % ALPHABET.len() as u64) as usize]
    }
}

/// Welch's t over two classes, with measurements above a cut-off dropped.
#[derive(Default)]
struct Welch {
    n: [f64; 2],
    mean: [f64; 2],
    m2: [f64; 2],
}

impl Welch {
    fn push(&mut self, class: usize, x: f64) {
        self.n[class] += 1.0;
        let d = x - self.mean[class];
        self.mean[class] += d / self.n[class];
        self.m2[class] += d * (x - self.mean[class]);
    }

    fn t(&self) -> f64 {
        let var = |c: usize| self.m2[c] / (self.n[c] - 1.0);
        (self.mean[0] - self.mean[1]) / (var(0) / self.n[0] + var(1) / self.n[1]).sqrt()
    }
}

fn main() {
    let mut rng = Rng::new();
    let real: Vec<u8> = (0..LEN).map(|_| rng.char()).collect();
    let real_text = String::from_utf8(real.clone()).unwrap();
    let set = KeySet::from_keys(
        std::iter::once(ApiKey::new("real", &real_text))
            .chain((0..10_000).map(|i| ApiKey::new(format!("k{i}"), format!("other-key-{i:030}")))),
    )
    .unwrap();
    let store = KeyStore::new();
    store.add_source(set).unwrap();
    let mut layer = ApiKeyLayer::from_store(store.clone())
        .bearer_only()
        .layer(Floor);

    let (mut verify, mut through_layer) = (Welch::default(), Welch::default());
    let mut guesses = vec![[0u8; LEN]; BATCH];
    let mut classes = vec![0usize; BATCH];
    let mut times = vec![0f64; BATCH];
    for batch in 0..BATCHES * 2 {
        let layer_round = batch % 2 == 1;
        for (guess, class) in guesses.iter_mut().zip(&mut classes) {
            *class = (rng.next() & 1) as usize;
            for (i, b) in guess.iter_mut().enumerate() {
                // Class 0 shares the real key's first SHARED bytes; the rest is fresh.
                *b = if *class == 0 && i < SHARED {
                    real[i]
                } else {
                    rng.char()
                };
            }
            if guess[..] == real[..] {
                guess[LEN - 1] ^= 1;
            }
        }
        if layer_round {
            let requests: Vec<Request<()>> = guesses
                .iter()
                .map(|g| {
                    let mut req = Request::new(());
                    let value = format!("Bearer {}", std::str::from_utf8(g).unwrap());
                    req.headers_mut().insert(
                        header::AUTHORIZATION,
                        HeaderValue::from_str(&value).unwrap(),
                    );
                    req
                })
                .collect();
            for (req, time) in requests.into_iter().zip(&mut times) {
                let start = Instant::now();
                let res = call(&mut layer, req);
                *time = start.elapsed().as_nanos() as f64;
                black_box(res);
            }
        } else {
            for (guess, time) in guesses.iter().zip(&mut times) {
                let start = Instant::now();
                let res = store.verify(black_box(guess));
                *time = start.elapsed().as_nanos() as f64;
                black_box(res.is_err());
            }
        }
        // Drop the slowest tenth (interrupts, migrations), as dudect crops.
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let cut = sorted[BATCH * 9 / 10];
        let welch = if layer_round {
            &mut through_layer
        } else {
            &mut verify
        };
        for (&t, &class) in times.iter().zip(&classes) {
            if t <= cut {
                welch.push(class, t);
            }
        }
    }
    println!(
        "KeyStore::verify: |t| = {:.2} (means {:.1} / {:.1} ns, {} measurements)",
        verify.t().abs(),
        verify.mean[0],
        verify.mean[1],
        verify.n[0] + verify.n[1]
    );
    println!(
        "through the layer: |t| = {:.2} (means {:.1} / {:.1} ns, {} measurements)",
        through_layer.t().abs(),
        through_layer.mean[0],
        through_layer.mean[1],
        through_layer.n[0] + through_layer.n[1]
    );
}
