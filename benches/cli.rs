//! The command line's three targets, timed on the release binary as an operator runs
//! it (`cargo bench --bench cli --features cli`):
//!
//! - `check` of a 1,000,000-key file: ≤ 1.5 s;
//! - `diff` of two 1,000,000-key files (1,000 keys changed): ≤ 3 s;
//! - `apply` of a 100,000-key file to an empty Redis namespace: ≤ 5 s (against a
//!   `redis-server` started here on a free loopback port; skipped without one).
//!
//! Each is run three times; the best and the median are printed, with the target.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    fmt::Write as _,
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_tower-api-key");

/// A key file of `n` keys in the plain style, every `changed_every`th secret
/// different.
fn key_file(path: &Path, n: usize, changed_every: Option<usize>) {
    let mut text = String::with_capacity(n * 125);
    for i in 0..n {
        let secret = match changed_every {
            Some(every) if i % every == 0 => format!("key-{i}-secret-v2"),
            _ => format!("key-{i}-secret"),
        };
        let digest = Sha256::digest(secret.as_bytes());
        let _ = write!(text, "[[keys]]\nid = \"key-{i}\"\nsha256 = \"");
        for b in digest {
            let _ = write!(text, "{b:02x}");
        }
        text.push_str("\"\nscopes = [\"read\"]\n\n");
    }
    std::fs::write(path, text).unwrap();
}

/// The processor time (user and system) of this process's waited-for children so
/// far, from `/proc/self/stat` (Linux; zero elsewhere): what a run cost, apart from
/// the time it waited for a core on a shared machine.
fn children_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command's name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // cutime and cstime: fields 16 and 17 of the whole line, in clock ticks (100 a
    // second on Linux).
    let ticks: u64 = [13, 14]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

/// CPU times of the runs, beside their wall times.
static CPU: std::sync::Mutex<Vec<Duration>> = std::sync::Mutex::new(Vec::new());

/// Runs the binary, returns how long it took and its exit code.
fn time(args: &[&str]) -> (Duration, i32) {
    let cpu = children_cpu();
    let start = Instant::now();
    let status = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let elapsed = start.elapsed();
    CPU.lock().unwrap().push(children_cpu() - cpu);
    (elapsed, status.code().unwrap_or(-1))
}

fn report(what: &str, target: Duration, mut runs: Vec<Duration>) {
    let mut cpu = std::mem::take(&mut *CPU.lock().unwrap());
    cpu.sort();
    runs.sort();
    let best = runs[0];
    let median = runs[runs.len() / 2];
    let verdict = if median <= target { "met" } else { "NOT met" };
    println!(
        "{what}: best {:.2} s, median {:.2} s of {} runs (target {:.1} s: {verdict}); \
         processor time (user + system) {:.2}-{:.2} s",
        best.as_secs_f64(),
        median.as_secs_f64(),
        runs.len(),
        target.as_secs_f64(),
        cpu.first().copied().unwrap_or_default().as_secs_f64(),
        cpu.last().copied().unwrap_or_default().as_secs_f64(),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: nothing to
    // time then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.toml");
    key_file(&a, 1_000_000, None);
    key_file(&b, 1_000_000, Some(1000));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());

    let runs = (0..3)
        .map(|_| {
            let (t, code) = time(&["check", a]);
            assert_eq!(code, 0);
            t
        })
        .collect();
    report("check, 1,000,000 keys", Duration::from_millis(1500), runs);

    let runs = (0..3)
        .map(|_| {
            let (t, code) = time(&["diff", b, "--file", a]);
            assert_eq!(code, 1, "a diff that finds differences exits 1");
            t
        })
        .collect();
    report(
        "diff, two 1,000,000-key sets (1,000 changed)",
        Duration::from_secs(3),
        runs,
    );

    let Some(redis) = Redis::start(dir.path()) else {
        println!("apply to Redis: skipped (redis-server not found)");
        return;
    };
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let k100 = dir.path().join("k100.toml");
    key_file(&k100, 100_000, None);
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "keys = []\n").unwrap();
    let runs = (0..3)
        .map(|i| {
            let ns = format!("bench{i}");
            let target = ["--redis", url.as_str(), "--namespace", ns.as_str()];
            let restore = [&["restore", empty.to_str().unwrap()][..], &target[..]].concat();
            assert_eq!(time(&restore).1, 0, "the empty namespace is created");
            CPU.lock().unwrap().pop();
            let apply = [&["apply", k100.to_str().unwrap()][..], &target[..]].concat();
            let (t, code) = time(&apply);
            assert_eq!(code, 0);
            t
        })
        .collect();
    report(
        "apply, 100,000 keys to an empty Redis namespace",
        Duration::from_secs(5),
        runs,
    );
}

/// A `redis-server` of the bench's own on a free loopback port, no persistence.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start(dir: &Path) -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self { child, port })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
