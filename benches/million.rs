//! One million keys: how long the key file takes to load, how much memory each key
//! holds, and the worst request latency seen while a new million-key set is swapped
//! in under load.
//!
//! Run: `cargo bench --bench million` (about half a minute; writes two ~110 MB key
//! files to a temporary directory).
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    fmt::Write as _,
    fs,
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{Floor, build, call, request};
use sha2::{Digest, Sha256};
use tower::Layer;
use tower_api_key::{ApiKeyLayer, FileSource};

const N: usize = 1_000_000;

/// A key file of `N` digest-only entries; `generation` changes every secret.
fn key_file(generation: u32) -> String {
    let mut out = String::with_capacity(N * 110);
    for i in 0..N {
        let digest = Sha256::digest(secret(generation, i).as_bytes());
        let _ = write!(out, "[[keys]]\nid = \"key-{i:07}\"\nsha256 = \"");
        for b in digest {
            let _ = write!(out, "{b:02x}");
        }
        out.push_str("\"\n");
    }
    out
}

fn secret(generation: u32, i: usize) -> String {
    format!("tak_g{generation}_{i:0>32}")
}

fn rss_bytes() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let first = key_file(1);
    let second = key_file(2);
    fs::write(&path, &first).unwrap();
    println!("key file: {N} keys, {:.1} MB", first.len() as f64 / 1e6);
    drop(first);

    let before = rss_bytes();
    let start = Instant::now();
    let layer =
        ApiKeyLayer::try_new(FileSource::new(&path).with_poll_interval(Duration::from_secs(3600)))
            .unwrap();
    let load = start.elapsed();
    thread::sleep(Duration::from_millis(500)); // let the reaper free the parsed set
    let after = rss_bytes();
    println!(
        "load: {:.3} s for {} keys",
        load.as_secs_f64(),
        layer.store().len()
    );
    println!(
        "resident: {:.0} bytes per key ({} MB for the store, RSS delta)",
        (after - before) as f64 / N as f64,
        (after - before) / 1_000_000
    );

    // Load: one thread calls the service with valid keys of both generations as fast
    // as it can, recording each call's latency.
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let stop = stop.clone();
        let mut svc = layer.layer(Floor);
        thread::spawn(move || {
            let headers: Vec<_> = (0..1_000)
                .map(|i| request(Some(&secret(1 + (i % 2) as u32, i * 997))))
                .collect();
            let mut latencies = Vec::with_capacity(4_000_000);
            let mut slow = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let req = build(&headers[i % headers.len()]);
                let t = Instant::now();
                black_box(call(&mut svc, req));
                let took = t.elapsed();
                latencies.push(took);
                if took > Duration::from_micros(250) {
                    slow.push((t, took));
                }
                i += 1;
            }
            (latencies, slow)
        })
    };
    // Two baselines, to tell the machine's own hiccups from the reload's: the same
    // load with nothing else running, then with the other core busy with plain
    // arithmetic (no allocation, no I/O) for as long.
    thread::sleep(Duration::from_secs(3));
    let control_start = Instant::now();
    let mut x = 0u64;
    while control_start.elapsed() < Duration::from_secs(3) {
        for i in 0..100_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
    }
    black_box(x);
    // Writes `content` beside the key file, renames it into place and waits for the
    // reload: returns when the rename happened, how long until applied, and the report.
    let replace = |content: &str| {
        let mut reloads = layer.store().subscribe();
        let tmp = dir.path().join("keys.toml.new");
        fs::write(&tmp, content).unwrap();
        let start = Instant::now();
        fs::rename(&tmp, &path).unwrap();
        let report = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), reloads.next()).await })
            .unwrap()
            .unwrap();
        (start, start.elapsed(), report)
    };
    let (swap_start, reload, report) = replace(&second);
    thread::sleep(Duration::from_millis(1_000)); // keep the load on while the old set is freed
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, slow) = worker.join().unwrap();
    assert!(report.is_applied(), "{report:?}");

    // The everyday rotation on a large set: one key added to the million, the rest
    // unchanged (their entries and counters are kept, not rebuilt).
    let mut rotated = second.clone();
    rotated.push_str("[[keys]]\nid = \"rotated-in\"\nsecret = \"tak_rotated_in\"\n");
    let (_, rotate, report) = replace(&rotated);
    assert_eq!(report.added(), ["rotated-in"]);
    println!(
        "one key added to the 1M set (rename to applied, {} kept): {:.3} s",
        report.kept().len(),
        rotate.as_secs_f64()
    );
    for (at, took) in &slow {
        let offset = at
            .checked_duration_since(swap_start)
            .map_or_else(|| format!("-{:?}", swap_start - *at), |d| format!("+{d:?}"));
        println!("  slow request at rename {offset}: {took:?}");
    }
    let worst_between = |from: Option<Instant>, to: Instant| {
        let hits: Vec<Duration> = slow
            .iter()
            .filter(|(at, _)| from.is_none_or(|f| *at >= f) && *at < to)
            .map(|(_, d)| *d)
            .collect();
        (hits.len(), hits.iter().max().copied())
    };
    let (n, worst) = worst_between(None, control_start);
    println!("baseline, 3 s of the load alone: {n} requests over 250µs, worst {worst:?}");
    let (n, worst) = worst_between(Some(control_start), swap_start);
    println!(
        "baseline, 3 s of the load with the other core busy computing: {n} requests over 250µs, worst {worst:?}"
    );
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "reload of a new 1M set (rename to applied): {:.3} s",
        reload.as_secs_f64()
    );
    println!(
        "requests during the run: {}; latency p50 {:?}, p99.99 {:?}, worst {:?}",
        latencies.len(),
        pct(0.5),
        pct(0.9999),
        latencies[latencies.len() - 1]
    );
}
