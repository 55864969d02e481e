//! The TOML key file, rewritten the ways editors, `mv`, and Kubernetes volume updates
//! rewrite it, under a real axum server on 127.0.0.1.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use common::{app, get_with, reload_where, serve};
use tower_api_key::{ApiKeyLayer, FileSource, KeyStore, Reloads};

/// A key file with one entry per `(id, secret)`.
fn toml(keys: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (id, secret) in keys {
        out.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n\n"
        ));
    }
    if keys.is_empty() {
        out.push_str("keys = []\n");
    }
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    path: PathBuf,
    addr: SocketAddr,
    store: KeyStore,
    reloads: Reloads,
}

/// Serves keys from a file in a fresh directory. With `events`, the poll interval is a
/// minute, so only file-system events can explain a prompt reload.
async fn fixture(events: bool, layout: impl FnOnce(&Path) -> PathBuf) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = layout(dir.path());
    let source = FileSource::new(&path)
        .with_file_events(events)
        .with_poll_interval(if events {
            Duration::from_secs(60)
        } else {
            Duration::from_millis(100)
        });
    let layer = ApiKeyLayer::try_new(source).unwrap();
    let store = layer.store().clone();
    let reloads = store.subscribe();
    let addr = serve(app(layer)).await;
    Fixture {
        dir: dir.path().to_owned(),
        _dir: dir,
        path,
        addr,
        store,
        reloads,
    }
}

fn plain_file(dir: &Path) -> PathBuf {
    let path = dir.join("keys.toml");
    fs::write(&path, toml(&[("old", "old-key")])).unwrap();
    path
}

impl Fixture {
    async fn status(&self, key: &str) -> u16 {
        get_with(self.addr, "/", Some(key)).await.0
    }

    async fn applied(&mut self, what: &str) -> tower_api_key::ReloadReport {
        reload_where(&mut self.reloads, what, |r| r.is_applied()).await
    }

    async fn refused(&mut self, what: &str) -> tower_api_key::ReloadReport {
        reload_where(&mut self.reloads, what, |r| !r.is_applied()).await
    }
}

#[tokio::test]
async fn written_in_place() {
    let mut f = fixture(true, plain_file).await;
    assert_eq!(f.status("old-key").await, 200);
    fs::write(&f.path, toml(&[("old", "old-key"), ("new", "new-key")])).unwrap();
    let report = f.applied("in-place write").await;
    assert_eq!((report.added(), report.kept()), (vec!["new"], vec!["old"]));
    assert_eq!(f.status("new-key").await, 200);
    assert_eq!(f.status("old-key").await, 200);
}

#[tokio::test]
async fn written_elsewhere_and_renamed_over() {
    let mut f = fixture(true, plain_file).await;
    let tmp = f.dir.join(".keys.toml.swp");
    fs::write(&tmp, toml(&[("new", "new-key")])).unwrap();
    fs::rename(&tmp, &f.path).unwrap();
    let report = f.applied("rename over the file").await;
    assert_eq!(
        (report.added(), report.removed()),
        (vec!["new"], vec!["old"])
    );
    assert_eq!(f.status("new-key").await, 200);
    assert_eq!(f.status("old-key").await, 401);
}

#[tokio::test]
async fn deleted_and_created_again() {
    let mut f = fixture(true, plain_file).await;
    fs::remove_file(&f.path).unwrap();
    let report = f.refused("the file to disappear").await;
    assert!(
        report.error().unwrap().to_string().contains("keys.toml"),
        "{report:?}"
    );
    // Gone, but the last good keys stay in force.
    assert_eq!(f.status("old-key").await, 200);
    fs::write(&f.path, toml(&[("new", "new-key")])).unwrap();
    f.applied("the file to come back").await;
    assert_eq!(f.status("new-key").await, 200);
    assert_eq!(f.status("old-key").await, 401);
}

#[tokio::test]
async fn removed_and_restored_unchanged_is_applied_again() {
    let mut f = fixture(true, plain_file).await;
    let content = fs::read(&f.path).unwrap();
    fs::remove_file(&f.path).unwrap();
    f.refused("the file to disappear").await;
    assert_eq!(f.status("old-key").await, 200);
    fs::write(&f.path, content).unwrap();
    let report = f.applied("the same file to come back").await;
    assert_eq!(report.kept(), ["old"]);
    assert_eq!(f.status("old-key").await, 200);
}

/// A Kubernetes ConfigMap or Secret volume: `keys.toml -> ..data/keys.toml`, with
/// `..data` a symlink to a timestamped directory that is swapped atomically.
#[cfg(unix)]
#[tokio::test]
async fn kubernetes_volume_data_symlink_swap() {
    use std::os::unix::fs::symlink;
    let mut f = fixture(true, |dir| {
        let v1 = dir.join("..2026_11_25_10_00_00.000000001");
        fs::create_dir(&v1).unwrap();
        fs::write(v1.join("keys.toml"), toml(&[("old", "old-key")])).unwrap();
        symlink("..2026_11_25_10_00_00.000000001", dir.join("..data")).unwrap();
        symlink("..data/keys.toml", dir.join("keys.toml")).unwrap();
        dir.join("keys.toml")
    })
    .await;
    assert_eq!(f.status("old-key").await, 200);

    // What the kubelet does: write a new timestamped dir, point ..data_tmp at it,
    // rename ..data_tmp over ..data, then remove the old dir.
    let v2 = f.dir.join("..2026_11_25_10_05_00.000000002");
    fs::create_dir(&v2).unwrap();
    fs::write(
        v2.join("keys.toml"),
        toml(&[("old", "old-key"), ("new", "new-key")]),
    )
    .unwrap();
    symlink("..2026_11_25_10_05_00.000000002", f.dir.join("..data_tmp")).unwrap();
    fs::rename(f.dir.join("..data_tmp"), f.dir.join("..data")).unwrap();
    fs::remove_dir_all(f.dir.join("..2026_11_25_10_00_00.000000001")).unwrap();

    let report = f.applied("the ..data swap").await;
    assert_eq!(report.added(), ["new"]);
    assert_eq!(f.status("new-key").await, 200);
}

/// A key file that is a symlink to a file of another name beside it, edited in
/// place and replaced by `mv`: both seen at once (the poll is a minute here).
#[tokio::test]
async fn a_symlink_to_a_file_beside_it_is_followed() {
    use std::os::unix::fs::symlink;
    let mut f = fixture(true, |dir| {
        fs::write(dir.join("real.toml"), toml(&[("old", "old-key")])).unwrap();
        symlink("real.toml", dir.join("keys.toml")).unwrap();
        dir.join("keys.toml")
    })
    .await;
    let real = f.dir.join("real.toml");
    fs::write(&real, toml(&[("old", "old-key"), ("new", "new-key")])).unwrap();
    assert_eq!(f.applied("an edit in place").await.added(), ["new"]);
    let tmp = f.dir.join("real.toml.tmp");
    fs::write(&tmp, toml(&[("third", "third-key")])).unwrap();
    fs::rename(&tmp, &real).unwrap();
    assert_eq!(f.applied("a file moved over it").await.added(), ["third"]);
    assert_eq!(f.status("third-key").await, 200);
}

/// A key file that is a symlink to a file in another directory, edited there: the
/// edit is seen at once (the poll is a minute here), and so is one to the file the
/// link names after it is repointed.
#[tokio::test]
async fn a_symlink_to_a_file_in_another_directory_is_followed() {
    use std::os::unix::fs::symlink;
    let mut f = fixture(true, |dir| {
        for real in ["real", "other"] {
            fs::create_dir(dir.join(real)).unwrap();
            fs::write(dir.join(real).join("k.toml"), toml(&[("old", "old-key")])).unwrap();
        }
        fs::create_dir(dir.join("link")).unwrap();
        symlink("../real/k.toml", dir.join("link/keys.toml")).unwrap();
        dir.join("link/keys.toml")
    })
    .await;
    assert_eq!(f.status("old-key").await, 200);
    let real = f.dir.join("real/k.toml");
    fs::write(&real, toml(&[("old", "old-key"), ("new", "new-key")])).unwrap();
    assert_eq!(
        f.applied("an edit of the file the link names")
            .await
            .added(),
        ["new"]
    );

    // Repointed: the new file's directory is watched from the next event on.
    let tmp = f.dir.join("link/.keys.toml.tmp");
    symlink("../other/k.toml", &tmp).unwrap();
    fs::rename(&tmp, &f.path).unwrap();
    f.applied("the link repointed").await;
    assert_eq!(f.status("new-key").await, 401);
    let other = f.dir.join("other/k.toml");
    fs::write(&other, toml(&[("old", "old-key"), ("third", "third-key")])).unwrap();
    assert_eq!(
        f.applied("an edit of the new file").await.added(),
        ["third"]
    );
    // The old file is no longer read: after an edit of it and then one of the new
    // file, what comes in is the new file's content.
    fs::write(&real, toml(&[("stale", "stale-key")])).unwrap();
    fs::write(
        &other,
        toml(&[
            ("old", "old-key"),
            ("third", "third-key"),
            ("fourth", "fourth-key"),
        ]),
    )
    .unwrap();
    let report = f
        .applied("an edit of the new file after one of the old")
        .await;
    assert_eq!((report.added(), report.removed()), (vec!["fourth"], vec![]));
    assert_eq!(f.status("stale-key").await, 401);
    assert_eq!(f.status("third-key").await, 200);
}

#[tokio::test]
async fn an_invalid_file_is_kept_out_and_says_why() {
    let mut f = fixture(true, plain_file).await;
    let version = f.store.version();
    fs::write(
        &f.path,
        "[[keys]]\nid = \"new\"\nsecret = \"new-key\"\n\n[[keys]]\nid = \"new\"\nsecret = \"other-key\"\n",
    )
    .unwrap();
    let report = f.refused("the invalid file").await;
    let message = report.error().unwrap().to_string();
    assert!(
        message.ends_with("keys.toml:5: duplicate key id `new`"),
        "{message}"
    );
    assert!(!message.contains("other-key"));
    assert_eq!(f.store.version(), version);
    assert_eq!(f.status("old-key").await, 200);
    assert_eq!(f.status("new-key").await, 401);
    // Fixing the file applies it.
    fs::write(&f.path, toml(&[("new", "new-key")])).unwrap();
    f.applied("the fixed file").await;
    assert_eq!(f.status("new-key").await, 200);
}

/// A writer that pauses mid-file (a slow link, a script between two writes) with the
/// file still open: what it has written so far is a valid key file without the keys
/// still to come, and is never applied, even after the poll interval (5 s). A tester
/// saw 1,039 valid requests refused when the pause was 7 s.
#[tokio::test]
async fn a_write_in_place_that_pauses_is_waited_for() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, toml(&[("a", "a-key"), ("b", "b-key")])).unwrap();
    let layer = ApiKeyLayer::try_new(FileSource::new(&path)).unwrap();
    let addr = serve(app(layer)).await;
    let mut file = fs::File::create(&path).unwrap();
    file.write_all(toml(&[("a", "a-key")]).as_bytes()).unwrap();
    file.flush().unwrap();
    let paused = std::time::Instant::now();
    while paused.elapsed() < Duration::from_secs(7) {
        assert_eq!(
            get_with(addr, "/", Some("b-key")).await.0,
            200,
            "a half-written file was applied after {:?}",
            paused.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    file.write_all(toml(&[("c", "c-key")]).as_bytes()).unwrap();
    drop(file);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while get_with(addr, "/", Some("c-key")).await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the whole file was never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get_with(addr, "/", Some("b-key")).await.0, 401);
}

#[tokio::test]
async fn a_zero_byte_file_is_a_write_in_progress() {
    let mut f = fixture(false, plain_file).await;
    let before = f.store.last_reload().unwrap();
    let written = std::time::Instant::now();
    fs::write(&f.path, "").unwrap();
    // Within a poll period: a write in progress, nothing happens. Checked only when
    // this thread looks on time: a loaded machine may hold it past the poll.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = f.store.last_reload().unwrap();
    if written.elapsed() < Duration::from_millis(80) {
        assert_eq!(seen.at(), before.at(), "reported within a poll period");
    }
    // Still empty a poll interval later: said once, and the last good keys stay.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let report = f.store.last_reload().unwrap();
        if report.at() != before.at() {
            break report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "an empty file was never reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let error = after.error().expect("reported").to_string();
    assert!(error.contains("empty"), "{error}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        f.store.last_reload().unwrap().at(),
        after.at(),
        "once, not per poll"
    );
    assert_eq!(f.status("old-key").await, 200);
    fs::write(&f.path, toml(&[("new", "new-key")])).unwrap();
    f.applied("the content after the truncation").await;
    assert_eq!(f.status("new-key").await, 200);
}

#[tokio::test]
async fn an_empty_key_list_denies_everyone() {
    let mut f = fixture(true, plain_file).await;
    fs::write(&f.path, toml(&[])).unwrap();
    let report = f.applied("keys = []").await;
    assert_eq!(report.removed(), ["old"]);
    assert!(f.store.is_empty());
    assert_eq!(f.status("old-key").await, 401);
}

#[tokio::test]
async fn polling_alone_sees_changes() {
    let mut f = fixture(false, plain_file).await;
    let tmp = f.dir.join("keys.toml.new");
    fs::write(&tmp, toml(&[("new", "new-key")])).unwrap();
    fs::rename(&tmp, &f.path).unwrap();
    f.applied("the poll to see the new file").await;
    assert_eq!(f.status("new-key").await, 200);
}

#[tokio::test]
async fn unchanged_content_is_not_reloaded() {
    let mut f = fixture(false, plain_file).await;
    let version = f.store.version();
    // Same bytes, new inode and mtime.
    let tmp = f.dir.join("copy");
    fs::copy(&f.path, &tmp).unwrap();
    // Watched from here on: the store's polls reading the copy show as openings of
    // the key file after it is renamed there (nothing else opens it).
    let (events, seen) = std::sync::mpsc::channel();
    let mut watcher = notify::recommended_watcher(events).unwrap();
    use notify::Watcher as _;
    watcher
        .watch(&f.dir, notify::RecursiveMode::NonRecursive)
        .unwrap();
    fs::rename(&tmp, &f.path).unwrap();
    let read = tokio::task::spawn_blocking(move || read_by_two_polls(&seen, "keys.toml"));
    assert!(read.await.unwrap(), "no two polls read the renamed copy");
    // The first poll's check is over: had it reloaded the copy, it would show here,
    // and the first report after it would be the copy's.
    assert_eq!(f.store.version(), version);
    fs::write(&f.path, toml(&[("new", "new-key")])).unwrap();
    let report = f.applied("a real change").await;
    assert_eq!(
        (report.added(), report.version()),
        (vec!["new"], Some(version + 1))
    );
}

/// Waits (up to ten seconds) for a file to be renamed to `name` in a watched
/// directory and then opened by two polls. The watcher is one thread, so once a
/// later poll opens the file, what the first poll's check did (a reload included)
/// is done. Two opens at least 50 ms apart are two polls: within one, the reads are
/// a debounce (20 ms) apart. Each poll reads a file modified less than two seconds
/// before (its stamp proves nothing yet), and every 60th poll reads it anyway.
fn read_by_two_polls(
    events: &std::sync::mpsc::Receiver<notify::Result<notify::Event>>,
    name: &str,
) -> bool {
    use notify::{
        EventKind,
        event::{AccessKind, ModifyKind, RenameMode},
    };
    use std::time::Instant;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut renamed = false;
    let mut first_open: Option<Instant> = None;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(Ok(event)) = events.recv_timeout(left) else {
            return false;
        };
        if !event
            .paths
            .iter()
            .any(|p| p.file_name() == Some(name.as_ref()))
        {
            continue;
        }
        match event.kind {
            EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => {
                renamed = true
            }
            EventKind::Access(AccessKind::Open(_)) if renamed => match first_open {
                None => first_open = Some(Instant::now()),
                Some(at) if at.elapsed() >= Duration::from_millis(50) => return true,
                Some(_) => {}
            },
            _ => {}
        }
    }
    false
}

#[tokio::test]
async fn a_missing_file_at_start_fails_closed_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let source = FileSource::new(&path).with_poll_interval(Duration::from_secs(60));
    assert!(ApiKeyLayer::try_new(FileSource::new(&path)).is_err());
    let layer = ApiKeyLayer::new(source);
    let mut reloads = layer.store().subscribe();
    let addr = serve(app(layer)).await;
    assert_eq!(get_with(addr, "/", Some("new-key")).await.0, 401);
    fs::write(&path, toml(&[("new", "new-key")])).unwrap();
    reload_where(&mut reloads, "the file to appear", |r| r.is_applied()).await;
    assert_eq!(get_with(addr, "/", Some("new-key")).await.0, 200);
}

#[tokio::test]
async fn usage_survives_a_reload_for_ids_that_stay() {
    let mut f = fixture(true, plain_file).await;
    for _ in 0..3 {
        assert_eq!(f.status("old-key").await, 200);
    }
    fs::write(&f.path, toml(&[("old", "old-key"), ("new", "new-key")])).unwrap();
    f.applied("the new key").await;
    assert_eq!(f.status("new-key").await, 200);
    let count = |id: &str| f.store.usage_of(id).unwrap().requests();
    assert_eq!((count("old"), count("new")), (3, 1));
}

#[tokio::test]
async fn a_file_refused_for_a_channel_s_key_applies_once_the_channel_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(
        &path,
        toml(&[("from-file", "file-key"), ("both", "both-key")]),
    )
    .unwrap();
    let (channel, publisher) = tower_api_key::ChannelSource::new(
        tower_api_key::KeySet::from_keys([tower_api_key::ApiKey::new("both", "channel-key")])
            .unwrap(),
    );
    let store = KeyStore::new();
    store.add_source(channel).unwrap();
    // At start-up the file claims an id the channel holds: refused.
    assert!(
        store
            .add_source(FileSource::new(&path).with_poll_interval(Duration::from_secs(60)))
            .is_err()
    );
    let addr = serve(app(ApiKeyLayer::from_store(store.clone()))).await;
    assert_eq!(get_with(addr, "/", Some("file-key")).await.0, 401);
    // The channel drops the key: the file, unedited, is applied.
    publisher.publish(tower_api_key::KeySet::new()).unwrap();
    let (status, body) = get_with(addr, "/", Some("file-key")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, format!("from-file@file:{}", path.display()).as_str())
    );
    assert_eq!(get_with(addr, "/", Some("both-key")).await.0, 200);
}

/// A key file over 4 MiB, rewritten by the crate's writer with a key whose
/// description needs escapes, is applied; so is the next edit by hand (a key
/// revoked), which a refused file used to keep out.
#[tokio::test]
async fn a_large_file_the_crate_wrote_with_escapes_reloads() {
    use tower_api_key::{ApiKey, KeySet};
    let mut f = fixture(true, plain_file).await;
    let mut keys: Vec<ApiKey> = (0..45_000)
        .map(|i| ApiKey::new(format!("key-{i:05}"), format!("secret-{i:05}")))
        .collect();
    keys.push(ApiKey::new("old", "old-key"));
    keys.push(
        ApiKey::new("partner", "partner-key").with_description(r#"the "partner" key, see C:\docs"#),
    );
    KeySet::from_keys(keys)
        .unwrap()
        .write_file(&f.path)
        .unwrap();
    assert!(fs::metadata(&f.path).unwrap().len() > 4 << 20);
    f.applied("the large file").await;
    assert_eq!(f.status("partner-key").await, 200);
    assert_eq!(
        f.store.get("partner").unwrap().description(),
        Some(r#"the "partner" key, see C:\docs"#)
    );
    // Revoked by hand: the `old` table taken out of the file the crate wrote.
    let text = fs::read_to_string(&f.path).unwrap();
    let start = text.find("[[keys]]\nid = \"old\"").unwrap();
    let end = start + text[start + 1..].find("[[keys]]").unwrap() + 1;
    fs::write(&f.path, format!("{}{}", &text[..start], &text[end..])).unwrap();
    let report = f.applied("the revocation").await;
    assert_eq!(report.removed(), vec!["old"]);
    assert_eq!(f.status("old-key").await, 401);
}
