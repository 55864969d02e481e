//! End to end: axum servers on 127.0.0.1 — bare, behind a do-nothing layer, behind
//! tower-http's static bearer check, and behind `ApiKeyLayer` with a million keys —
//! driven by `wrk` in alternating rounds. Reports each variant's median throughput
//! ratio to bare, latency percentiles, and the server's CPU time per request.
//!
//! Needs `wrk` (Debian package `wrk`); prints a note and exits if it is missing.
//! Run: `cargo bench --bench e2e` (about three minutes: 31 rounds of five one-second
//! runs). Load goes to loopback only, for a bounded time.
#![allow(clippy::unwrap_used)]

mod common;

use std::{net::SocketAddr, process::Command, time::Duration};

use axum::{Router, routing::get};
use common::{key, key_set};
use tower_api_key::ApiKeyLayer;

/// Seconds per round: short rounds pair each variant with its neighbours closely,
/// which matters on a machine whose speed changes from one second to the next.
const SECONDS: u32 = 1;

struct Variant {
    name: &'static str,
    addr: SocketAddr,
    rps: Vec<f64>,
    cpu_ns_per_request: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn app() -> Router {
    Router::new().route("/", get(|| async { "ok" }))
}

/// CPU time of this process's threads so far, in nanoseconds, from the scheduler's
/// per-thread accounting (`/proc/self/task/*/schedstat`, nanosecond resolution;
/// `/proc/self/stat` counts 10 ms ticks, too coarse for one-second rounds).
fn cpu_ns() -> f64 {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

fn parse_duration_us(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap());
    let n: f64 = num.parse().unwrap();
    match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => panic!("unknown unit {unit}"),
    }
}

fn main() {
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("wrk not found: install it (Debian: apt-get install wrk) to run this bench");
        return;
    }
    // Server on core 1, wrk on core 0, where `taskset` is available: otherwise the two
    // fight over both cores and the figures mostly measure that fight.
    let pinned = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .output()
        .is_ok_and(|o| o.status.success());
    // More rounds give steadier medians on a noisy machine: E2E_ROUNDS=61.
    let rounds: usize = std::env::var("E2E_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(31);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let token = key(0);
    let layer = ApiKeyLayer::new(key_set(1_000_000));
    let small = ApiKeyLayer::new(key_set(1));
    #[allow(deprecated)] // "too basic": exactly why it is the cheapest baseline
    let bearer = tower_http::validate_request::ValidateRequestHeaderLayer::bearer(&token);
    let mut variants: Vec<Variant> = runtime.block_on(async {
        let routes = [
            ("bare", serve(app()).await),
            (
                "do-nothing layer",
                serve(app().route_layer(tower::util::MapRequestLayer::new(|r| r))).await,
            ),
            ("tower-http bearer", serve(app().route_layer(bearer)).await),
            (
                "ApiKeyLayer, 1M keys",
                serve(app().route_layer(layer)).await,
            ),
            ("ApiKeyLayer, 1 key", serve(app().route_layer(small)).await),
        ];
        routes
            .into_iter()
            .map(|(name, addr)| Variant {
                name,
                addr,
                rps: vec![],
                cpu_ns_per_request: vec![],
                p50_us: vec![],
                p99_us: vec![],
            })
            .collect()
    });

    for round in 0..rounds {
        let n = variants.len();
        for k in 0..n {
            let v = &mut variants[(k + round) % n];
            let cpu_before = cpu_ns();
            let mut wrk = if pinned {
                let mut c = Command::new("taskset");
                c.args(["-c", "0", "wrk"]);
                c
            } else {
                Command::new("wrk")
            };
            let out = wrk
                .args(["-t1", "-c16", &format!("-d{SECONDS}s"), "--latency", "-H"])
                .arg(format!("authorization: Bearer {token}"))
                .arg(format!("http://{}/", v.addr))
                .output()
                .unwrap();
            let cpu = cpu_ns() - cpu_before;
            let text = String::from_utf8_lossy(&out.stdout);
            let mut requests = 0.0;
            for line in text.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["Requests/sec:", rps] => v.rps.push(rps.parse().unwrap()),
                    ["50%", d] => v.p50_us.push(parse_duration_us(d)),
                    ["99%", d] => v.p99_us.push(parse_duration_us(d)),
                    [count, "requests", "in", ..] => requests = count.parse().unwrap(),
                    ["Non-2xx", ..] => panic!("{}: refused requests:\n{text}", v.name),
                    _ => {}
                }
            }
            v.cpu_ns_per_request.push(cpu / requests);
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    println!(
        "{rounds} alternating rounds of {SECONDS} s, wrk -t1 -c16, server on one tokio worker{}\n",
        if pinned {
            "; server and wrk pinned to separate cores"
        } else {
            ""
        }
    );
    println!("| variant | requests/s | ratio to bare | p50 | p99 | server CPU per request |");
    println!("|---|---:|---:|---:|---:|---:|");
    for i in 0..variants.len() {
        let v = &variants[i];
        let ratio: Vec<f64> = (0..rounds).map(|r| v.rps[r] / variants[0].rps[r]).collect();
        println!(
            "| {} | {:.0} | {:.3} | {:.0} µs | {:.0} µs | {:.0} ns |",
            v.name,
            median(v.rps.clone()),
            median(ratio),
            median(v.p50_us.clone()),
            median(v.p99_us.clone()),
            median(v.cpu_ns_per_request.clone())
        );
    }
    let over = |a: usize, b: usize| {
        let d: Vec<f64> = (0..rounds)
            .map(|r| variants[a].cpu_ns_per_request[r] - variants[b].cpu_ns_per_request[r])
            .collect();
        median(d)
    };
    let vs_bearer: Vec<f64> = (0..rounds)
        .map(|r| variants[3].rps[r] / variants[2].rps[r])
        .collect();
    println!(
        "\nApiKeyLayer throughput / tower-http bearer's (median of paired rounds): {:.3}",
        median(vs_bearer)
    );
    println!(
        "ApiKeyLayer server CPU per request over the do-nothing layer: {:.0} ns",
        over(3, 1)
    );
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
