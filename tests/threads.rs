//! The crate's threads: none without a watched source, and the file watcher stops as
//! soon as its store is dropped, not at its next poll. (Alone in its own test binary:
//! it counts this process's threads.)
#![allow(clippy::unwrap_used)]
#![cfg(target_os = "linux")]

use std::{
    fs,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use tower_api_key::{ApiKey, ApiKeyLayer, ChannelSource, FileSource, KeySet, KeyStore};

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

/// Threads other than the test harness's (which names a test's thread after it; the
/// kernel keeps 15 bytes of a name) and the process's main thread.
fn crate_threads() -> Vec<String> {
    const TESTS: [&str; 3] = [
        "a_store_without_a_watched_source_starts_no_thread",
        "dropping_every_store_leaves_no_crate_thread_running",
        "dropping_the_layer_stops_its_watcher_promptly",
    ];
    // A thread the harness has just spawned for another test carries the process's
    // name until it names itself; the crate names every thread it starts.
    let process = fs::read_to_string("/proc/self/comm").unwrap_or_default();
    threads()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| {
            name != "main"
                && name != process.trim_end()
                && !TESTS.iter().any(|t| t.starts_with(name.as_str()))
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
fn a_store_without_a_watched_source_starts_no_thread() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    previous_test_done();
    let before = crate_threads();
    let (source, publisher) = ChannelSource::new(KeySet::new());
    let store = KeyStore::new();
    store.add_source(source).unwrap();
    store
        .add_source(KeySet::from_keys([ApiKey::new("static", "s1")]).unwrap())
        .unwrap();
    let layer = ApiKeyLayer::from_store(store.clone());
    for i in 0..50 {
        publisher
            .publish(KeySet::from_keys([ApiKey::new(format!("k{i}"), format!("s-{i}"))]).unwrap())
            .unwrap();
        assert!(store.verify(format!("s-{i}")).is_ok());
    }
    assert_eq!(crate_threads(), before);
    drop((layer, store));
    assert_eq!(crate_threads(), before);
}

#[test]
fn dropping_every_store_leaves_no_crate_thread_running() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    previous_test_done();
    let before = crate_threads();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, "keys = []\n").unwrap();
    let stores: Vec<KeyStore> = (0..3)
        .map(|_| {
            let store = KeyStore::new();
            store.add_source(FileSource::new(&path)).unwrap();
            store
        })
        .collect();
    wait_until("the watchers to start", || watcher_threads() == 3);
    drop(stores);
    let start = Instant::now();
    while crate_threads() != before {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still running: {:?}, before: {before:?}",
            crate_threads()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
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

/// Waits for the watcher threads of the test before (they end soon after its stores
/// are dropped, not at once) so that they are not counted as this test's.
fn previous_test_done() {
    wait_until("the previous test's watcher threads to end", || {
        !threads()
            .iter()
            .any(|(name, _)| name == "tower-api-key-w" || name.starts_with("notify-rs"))
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
