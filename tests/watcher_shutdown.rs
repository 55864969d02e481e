//! The file watcher thread: dropping the last layer stops it at once, not at its next
//! poll, and it runs at a lower priority than the threads serving requests. (Alone in
//! its own test binary: it counts this process's threads.)
#![allow(clippy::unwrap_used)]
#![cfg(target_os = "linux")]

use std::{
    fs,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use tower_api_key::{ApiKeyLayer, FileSource};

/// This process's threads: (name, nice value).
fn threads() -> Vec<(String, i64)> {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let stat = fs::read_to_string(t.ok()?.path().join("stat")).ok()?;
            // `pid (comm) state ...`: the name may hold spaces, so split at the last
            // parenthesis; nice is the 19th field, the 17th after it.
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            let nice = rest.split_whitespace().nth(16)?.parse().ok()?;
            Some((name, nice))
        })
        .collect()
}

fn watcher_threads() -> usize {
    threads()
        .iter()
        .filter(|(name, _)| name == "tower-api-key-w")
        .count()
}

/// The tests count threads: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn the_watcher_runs_below_the_request_threads_priority() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, "keys = []\n").unwrap();
    let before = watcher_threads();
    let layer = ApiKeyLayer::try_new(FileSource::new(&path)).unwrap();
    let ours = threads()
        .into_iter()
        .find(|(name, _)| name != "tower-api-key-w")
        .map(|(_, nice)| nice)
        .unwrap();
    if ours < 19 {
        // (At 19 the process already runs at the lowest priority there is.)
        wait_until("the watcher thread to lower its priority", || {
            threads()
                .iter()
                .any(|(name, nice)| name == "tower-api-key-w" && *nice > ours)
        });
    }
    drop(layer);
    wait_until("the watcher to stop", || watcher_threads() == before);
}

#[test]
fn dropping_the_layer_stops_its_watcher_promptly() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, "keys = []\n").unwrap();
    let before = watcher_threads();
    let layer =
        ApiKeyLayer::try_new(FileSource::new(&path).with_poll_interval(Duration::from_secs(3600)))
            .unwrap();
    let clone = layer.clone();
    // A new thread names itself once it runs: wait for that.
    wait_until("the watcher thread to start", || {
        watcher_threads() == before + 1
    });
    drop(layer);
    assert_eq!(
        watcher_threads(),
        before + 1,
        "a clone still holds the store"
    );
    drop(clone);
    wait_until("the watcher to stop with its store", || {
        watcher_threads() == before
    });
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
