//! `EnvSource` with a real environment. Setting variables is `unsafe` in a running
//! process (and this crate forbids unsafe code), so the test runs itself again as a
//! child process with the environment it needs.
#![allow(clippy::unwrap_used)]

use std::{fs, process::Command, time::Duration};

use tower_api_key::{ApiKeyLayer, EnvSource};

const VAR: &str = "TOWER_API_KEY_TEST_KEYS";
const CASE: &str = "TOWER_API_KEY_TEST_CASE";

/// Runs this test binary again, only `test`, with `env` set; asserts it passed.
fn child(test: &str, env: &[(&str, &str)]) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture"]).env(CASE, "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{test} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_child() -> bool {
    std::env::var_os(CASE).is_some()
}

#[test]
fn keys_from_the_variable() {
    if !in_child() {
        // sha256("key-b"), so the variable holds no secret for b.
        let b = "sha256:a30534a53b23547377ddccbd1ac85a8a84c13db43493c16e55a6abc7b0eba634";
        let value = format!("a=key-a, {b}");
        return child("keys_from_the_variable", &[(VAR, &value)]);
    }
    let layer = ApiKeyLayer::try_new(EnvSource::new(VAR)).unwrap();
    let store = layer.store();
    assert_eq!(store.verify("key-a").unwrap().id(), "a");
    assert_eq!(
        store.verify("key-a").unwrap().source(),
        format!("env:{VAR}")
    );
    assert_eq!(store.len(), 2);
    assert!(store.verify("key-b").is_ok());
}

#[test]
fn keys_from_the_file_named_by_name_file_and_reloaded() {
    if !in_child() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys");
        fs::write(&path, "a=key-a\n").unwrap();
        let file_var = format!("{VAR}_FILE");
        return child(
            "keys_from_the_file_named_by_name_file_and_reloaded",
            &[(&file_var, path.to_str().unwrap())],
        );
    }
    assert!(std::env::var_os(VAR).is_none());
    let path = std::env::var(format!("{VAR}_FILE")).unwrap();
    let layer = ApiKeyLayer::try_new(EnvSource::new(VAR)).unwrap();
    let store = layer.store().clone();
    assert_eq!(store.verify("key-a").unwrap().id(), "a");

    // A Docker or Kubernetes secret file is watched like a key file.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut reloads = store.subscribe();
    fs::write(format!("{path}.tmp"), "b=key-b\n").unwrap();
    fs::rename(format!("{path}.tmp"), &path).unwrap();
    let report = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(15), reloads.next()).await })
        .unwrap()
        .unwrap();
    assert_eq!((report.added(), report.removed()), (vec!["b"], vec!["a"]));
    assert!(store.verify("key-a").is_err());
}

#[test]
fn an_unset_variable_is_an_error_naming_it() {
    if !in_child() {
        return child("an_unset_variable_is_an_error_naming_it", &[]);
    }
    let err = ApiKeyLayer::try_new(EnvSource::new(VAR))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("environment variable {VAR}: is not set (nor is {VAR}_FILE)")
    );
    // `new` fails closed instead.
    let layer = ApiKeyLayer::new(EnvSource::new(VAR));
    assert!(layer.store().is_empty());
}

/// An `EnvSource` whose `NAME_FILE` is rewritten after its load and before its
/// watcher starts: the rewrite must not count as already loaded.
struct ChangedBeforeWatch {
    inner: EnvSource,
    path: std::path::PathBuf,
}

impl tower_api_key::KeySource for ChangedBeforeWatch {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn load(&mut self) -> Result<tower_api_key::KeySet, tower_api_key::Error> {
        self.inner.load()
    }

    fn watch(self: Box<Self>, updater: tower_api_key::KeyUpdater) {
        fs::write(&self.path, "second=k-second").unwrap();
        Box::new(self.inner).watch(updater);
    }
}

#[test]
fn a_name_file_changed_between_load_and_watch_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys");
    if !in_child() {
        fs::write(&path, "first=k-first").unwrap();
        let file_var = format!("{VAR}_FILE");
        return child(
            "a_name_file_changed_between_load_and_watch_is_applied",
            &[(&file_var, path.to_str().unwrap())],
        );
    }
    let path = std::path::PathBuf::from(std::env::var_os(format!("{VAR}_FILE")).unwrap());
    let layer = ApiKeyLayer::try_new(ChangedBeforeWatch {
        inner: EnvSource::new(VAR),
        path,
    })
    .unwrap();
    let store = layer.store();
    let start = std::time::Instant::now();
    while store.verify("k-second").is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the change made before the watch was never applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(store.verify("k-first").is_err());
}
