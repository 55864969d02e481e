//! Dropping the last layer stops the file watcher at once, not at its next poll.
//! (Alone in its own test binary: it counts this process's threads.)
#![allow(clippy::unwrap_used)]
#![cfg(target_os = "linux")]

use std::{
    fs,
    time::{Duration, Instant},
};

use tower_api_key::{ApiKeyLayer, FileSource};

fn watcher_threads() -> usize {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "tower-api-key-w")
        .count()
}

#[test]
fn dropping_the_layer_stops_its_watcher_promptly() {
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
