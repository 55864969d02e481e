//! Refusing a large bad key file costs about what accepting a good one does: time and
//! peak memory of a 1M-key file accepted, the same file with one duplicate id at the
//! end refused, and 50 MB of printable junk refused. Each case runs in a process of its
//! own (this binary, run again), so that its peak resident memory is its own.
//!
//! Run: `cargo bench --bench refusal` (about half a minute; writes ~150 MB to a
//! temporary directory).
#![allow(clippy::unwrap_used)]

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Instant};

use sha2::{Digest, Sha256};
use tower_api_key::FileSource;

const N: usize = 1_000_000;

fn key_file(duplicate_at_end: bool) -> String {
    let mut out = String::with_capacity(N * 110);
    for i in 0..N {
        let digest = Sha256::digest(format!("tak_{i:0>36}").as_bytes());
        let id = if duplicate_at_end && i == N - 1 { 0 } else { i };
        let _ = write!(out, "[[keys]]\nid = \"key-{id:07}\"\nsha256 = \"");
        for b in digest {
            let _ = write!(out, "{b:02x}");
        }
        out.push_str("\"\n");
    }
    out
}

fn junk(len: usize) -> String {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|i| {
            if i % 80 == 79 {
                return '\n';
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b' ' + (x % 95) as u8)
        })
        .collect()
}

fn peak_rss_bytes() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// In the child: read and parse the file the way the source does, print the figures.
fn child(path: &Path) {
    let before = peak_rss_bytes();
    let start = Instant::now();
    let bytes = fs::read(path).unwrap();
    let outcome = match FileSource::parse(path, &bytes) {
        Ok(set) => format!("accepted {} keys", set.len()),
        Err(error) => format!(
            "refused: {}",
            error.to_string().chars().take(60).collect::<String>()
        ),
    };
    let took = start.elapsed();
    drop(bytes);
    println!(
        "{:.3} s, peak {:.0} MB over the start ({outcome})",
        took.as_secs_f64(),
        (peak_rss_bytes().saturating_sub(before)) as f64 / 1e6
    );
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    if let Some(path) = args.next() {
        return child(Path::new(&path));
    }
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("valid 1M-key file", key_file(false)),
        ("the same, one duplicate id at the end", key_file(true)),
        ("50 MB of printable junk", junk(50_000_000)),
    ];
    for (name, content) in cases {
        let path = dir.path().join("keys.toml");
        fs::write(&path, &content).unwrap();
        let size = content.len() as f64 / 1e6;
        drop(content);
        let out = Command::new(std::env::current_exe().unwrap())
            .arg(&path)
            .output()
            .unwrap();
        println!(
            "{name} ({size:.0} MB): {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
}
