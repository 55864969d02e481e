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

/// A call that took over 250 µs.
struct Slow {
    at: Instant,
    took: Duration,
    /// How long the thread waited for a core (runnable, another thread on it) in the
    /// window of calls around this one; `None` where the scheduler does not say.
    waited: Option<Duration>,
}

/// How long this thread has been runnable but waiting for a core, in all, from the
/// scheduler's per-thread accounting (Linux).
fn run_delay() -> Option<Duration> {
    let stat = fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos = stat.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
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

    // Both replacement files are written now, before the load starts, so that the
    // bench's own writing does not compete with the load it measures.
    let second_path = dir.path().join("keys.toml.second");
    fs::write(&second_path, &second).unwrap();
    let mut rotated = second;
    rotated.push_str("[[keys]]\nid = \"rotated-in\"\nsecret = \"tak_rotated_in\"\n");
    let rotated_path = dir.path().join("keys.toml.rotated");
    fs::write(&rotated_path, &rotated).unwrap();
    drop(rotated);

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
            // Every 256 calls (about 0.1 ms) the thread's run-queue wait is read, and
            // given to the slow calls of that window: it tells a call held off its
            // core by another thread from one stalled with the thread on the core.
            let mut window = run_delay();
            let mut settled = 0;
            while !stop.load(Ordering::Relaxed) {
                if i % 256 == 0 {
                    let now = run_delay();
                    let waited = now.zip(window).map(|(n, w)| n.saturating_sub(w));
                    for call in &mut slow[settled..] {
                        let call: &mut Slow = call;
                        call.waited = waited;
                    }
                    settled = slow.len();
                    window = now;
                }
                let req = build(&headers[i % headers.len()]);
                let t = Instant::now();
                black_box(call(&mut svc, req));
                let took = t.elapsed();
                latencies.push(took);
                if took > Duration::from_micros(250) {
                    slow.push(Slow {
                        at: t,
                        took,
                        waited: None,
                    });
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
    let replace = |tmp: &std::path::Path| {
        let mut reloads = layer.store().subscribe();
        let start = Instant::now();
        fs::rename(tmp, &path).unwrap();
        let report = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), reloads.next()).await })
            .unwrap()
            .unwrap();
        (start, start.elapsed(), report)
    };
    let (swap_start, reload, report) = replace(&second_path);
    thread::sleep(Duration::from_millis(1_000)); // keep the load on while the old set is freed
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, slow) = worker.join().unwrap();
    assert!(report.is_applied(), "{report:?}");

    // The everyday rotation on a large set: one key added to the million, the rest
    // unchanged (their entries and counters are kept, not rebuilt).
    let (_, rotate, report) = replace(&rotated_path);
    assert_eq!(report.added(), ["rotated-in"]);
    println!(
        "one key added to the 1M set (rename to applied, {} kept): {:.3} s",
        report.kept().len(),
        rotate.as_secs_f64()
    );
    for call in &slow {
        let offset = call.at.checked_duration_since(swap_start).map_or_else(
            || format!("-{:?}", swap_start - call.at),
            |d| format!("+{d:?}"),
        );
        let waited = call
            .waited
            .map_or_else(|| "not known".to_owned(), |w| format!("{w:?}"));
        println!(
            "  slow request at rename {offset}: {:?} (the thread waited for a core {waited} around it)",
            call.took
        );
    }
    // For each phase: how many calls were slow, the slowest, and the longest part of
    // a slow call spent waiting for a core (another thread on it) and on the core
    // without progress (the virtual CPU or the kernel stalling).
    let phase = |name: &str, from: Option<Instant>, to: Option<Instant>| {
        let calls: Vec<&Slow> = slow
            .iter()
            .filter(|c| from.is_none_or(|f| c.at >= f) && to.is_none_or(|t| c.at < t))
            .collect();
        let worst = calls.iter().map(|c| c.took).max();
        let held_off = |c: &Slow| c.waited.unwrap_or_default().min(c.took);
        let waiting = calls.iter().map(|c| held_off(c)).max();
        let stalled = calls.iter().map(|c| c.took - held_off(c)).max();
        println!(
            "{name}: {} requests over 250µs, worst {worst:?}; longest wait for a core {waiting:?}, longest stall on the core {stalled:?}",
            calls.len()
        );
    };
    phase("baseline, 3 s of the load alone", None, Some(control_start));
    phase(
        "baseline, 3 s of the load with the other core busy computing",
        Some(control_start),
        Some(swap_start),
    );
    phase(
        "from the rename of a new 1M set to 1 s after it applied",
        Some(swap_start),
        None,
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
