//! Whatever careless or hostile hands put at the key file's path, the server keeps
//! serving its last good keys, says why it refused the file, and takes the next good
//! file: a sparse 100 GiB file, a symlink to `/dev/zero`, a FIFO, a directory, a
//! half-written file, an empty one, keys no request could present. A real axum server
//! on 127.0.0.1 with a real key file.
#![allow(clippy::unwrap_used)]
#![cfg(unix)]

mod common;

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{app, get_with, reload_where, serve};
use tower_api_key::{ApiKeyLayer, FileSource, KeyStore, ReloadReport, Reloads};

struct Server {
    dir: tempfile::TempDir,
    path: PathBuf,
    addr: SocketAddr,
    store: KeyStore,
    reloads: Reloads,
}

fn entry(id: &str, secret: &str) -> String {
    format!("[[keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n\n")
}

async fn server(poll: Duration) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, entry("good", "good-key")).unwrap();
    let layer = ApiKeyLayer::try_new(FileSource::new(&path).with_poll_interval(poll)).unwrap();
    let store = layer.store().clone();
    let reloads = store.subscribe();
    let addr = serve(app(layer)).await;
    Server {
        dir,
        path,
        addr,
        store,
        reloads,
    }
}

impl Server {
    async fn status(&self, key: &str) -> u16 {
        get_with(self.addr, "/", Some(key)).await.0
    }

    /// Puts `make`'s result in place of the key file the way `mv` does.
    fn replace_with(&self, make: impl FnOnce(&Path)) {
        let tmp = self.dir.path().join("incoming");
        make(&tmp);
        fs::rename(&tmp, &self.path).unwrap();
    }

    async fn refused(&mut self, what: &str) -> ReloadReport {
        reload_where(&mut self.reloads, what, |r| !r.is_applied()).await
    }

    /// A good file comes back (renamed over whatever is there) and is applied.
    async fn recovers(&mut self) {
        let _ = fs::remove_dir(&self.path);
        self.replace_with(|tmp| {
            fs::write(tmp, entry("good", "good-key") + &entry("next", "next-key")).unwrap()
        });
        reload_where(&mut self.reloads, "the good file to be applied", |r| {
            r.is_applied() && r.added() == ["next"]
        })
        .await;
        assert_eq!(self.status("next-key").await, 200);
        assert_eq!(self.status("good-key").await, 200);
    }
}

#[tokio::test]
async fn a_sparse_100_gib_file_is_refused_without_reading_it() {
    let mut s = server(Duration::from_secs(60)).await;
    s.replace_with(|tmp| {
        fs::File::create(tmp).unwrap().set_len(100 << 30).unwrap();
    });
    let report = s.refused("the huge file").await;
    let error = common::chain(report.error().unwrap());
    assert!(error.contains("size limit"), "{error}");
    assert_eq!(s.status("good-key").await, 200);
    s.recovers().await;
}

#[tokio::test]
async fn a_symlink_to_dev_zero_is_refused_and_memory_stays_put() {
    let mut s = server(Duration::from_secs(60)).await;
    s.replace_with(|tmp| std::os::unix::fs::symlink("/dev/zero", tmp).unwrap());
    let report = s.refused("the symlink to /dev/zero").await;
    let error = common::chain(report.error().unwrap());
    assert!(error.contains("not a regular file"), "{error}");
    assert_eq!(s.status("good-key").await, 200);
    s.recovers().await;
}

#[tokio::test]
async fn a_fifo_never_hangs_the_watcher() {
    let mut s = server(Duration::from_secs(60)).await;
    s.replace_with(|tmp| {
        let made = std::process::Command::new("mkfifo")
            .arg(tmp)
            .status()
            .unwrap();
        assert!(made.success());
    });
    let report = s.refused("the FIFO").await;
    assert!(common::chain(report.error().unwrap()).contains("not a regular file"));
    assert_eq!(s.status("good-key").await, 200);
    // The watcher is still alive: a good file renamed over the FIFO is applied.
    s.recovers().await;
}

#[tokio::test]
async fn a_directory_at_the_path_is_refused() {
    let mut s = server(Duration::from_millis(200)).await;
    fs::remove_file(&s.path).unwrap();
    fs::create_dir(&s.path).unwrap();
    reload_where(&mut s.reloads, "the directory", |r| {
        r.error()
            .is_some_and(|e| common::chain(e).contains("not a regular file"))
    })
    .await;
    assert_eq!(s.status("good-key").await, 200);
    s.recovers().await;
}

#[tokio::test]
async fn a_half_written_file_is_not_applied_mid_write() {
    let mut s = server(Duration::from_secs(60)).await;
    let revoked = entry("revoked", "revoked-key").replace("\n\n", "\ndisabled = true\n\n");
    fs::write(&s.path, entry("good", "good-key") + &revoked).unwrap();
    reload_where(&mut s.reloads, "the revocation", |r| r.is_applied()).await;
    assert_eq!(s.status("revoked-key").await, 401);

    // An in-place writer: truncate, write a valid prefix that lacks the last line
    // (`disabled = true`), pause, write the rest.
    let full = entry("good", "good-key") + &entry("newcomer", "newcomer-key") + &revoked;
    let cut = full.rfind("disabled = true").unwrap();
    let (prefix, rest) = full.split_at(cut);
    let writing = Arc::new(AtomicBool::new(true));
    let (got_in, tried) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let hammer = {
        let (writing, got_in, tried, addr) =
            (writing.clone(), got_in.clone(), tried.clone(), s.addr);
        tokio::spawn(async move {
            while writing.load(Ordering::SeqCst) {
                if get_with(addr, "/", Some("revoked-key")).await.0 == 200 {
                    got_in.fetch_add(1, Ordering::SeqCst);
                }
                tried.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&s.path)
        .unwrap();
    file.write_all(prefix.as_bytes()).unwrap();
    file.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    file.write_all(rest.as_bytes()).unwrap();
    drop(file);
    let report = reload_where(&mut s.reloads, "the finished write", |r| r.is_applied()).await;
    writing.store(false, Ordering::SeqCst);
    hammer.await.unwrap();
    assert_eq!(report.added(), ["newcomer"]);
    assert!(tried.load(Ordering::SeqCst) > 20, "the window was probed");
    assert_eq!(
        got_in.load(Ordering::SeqCst),
        0,
        "a revoked key got in mid-write"
    );
    assert_eq!(s.status("revoked-key").await, 401);
    assert_eq!(s.status("newcomer-key").await, 200);
}

#[tokio::test]
async fn an_empty_file_is_reported_once_a_poll_interval_later() {
    let mut s = server(Duration::from_millis(200)).await;
    fs::File::create(&s.path).unwrap();
    let report = s.refused("the empty file to be reported").await;
    assert!(
        common::chain(report.error().unwrap()).contains("empty"),
        "{report:?}"
    );
    assert!(s.store.last_reload().unwrap().error().is_some());
    assert_eq!(s.status("good-key").await, 200, "the last good keys stay");
    s.recovers().await;
}

#[tokio::test]
async fn keys_no_request_could_present_are_refused_with_a_clear_error() {
    let mut s = server(Duration::from_secs(60)).await;
    let cases = [
        (
            entry("spaced", " padded-secret"),
            "leading or trailing whitespace",
        ),
        (entry("huge", &"x".repeat(5000)), "longer than 4096 bytes"),
        (
            entry("window", "w-secret").replace(
                "\n\n",
                "\nnot_before = 2026-12-01T00:00:00Z\nexpires_at = 2026-11-01T00:00:00Z\n\n",
            ),
            "`not_before` must be earlier than `expires_at`",
        ),
        (entry("evil\u{202e}gnp", "e-secret"), "must not contain"),
    ];
    for (bad, expected) in cases {
        s.replace_with(|tmp| fs::write(tmp, entry("good", "good-key") + &bad).unwrap());
        let report = s.refused(expected).await;
        let error = common::chain(report.error().unwrap());
        assert!(error.contains(expected), "{error}");
        assert!(
            error.contains("keys.toml:"),
            "{error} names the file and line"
        );
        assert!(
            !error.contains("padded-secret") && !error.contains('\u{202e}'),
            "{error}"
        );
        assert_eq!(s.status("good-key").await, 200);
    }
    s.recovers().await;
}

/// `sha256` values a script made up, alike but for their last four bytes (the 56 hex
/// digits of `base`, then `i`), under the ids `{prefix}{i}`.
fn made_up(prefix: &str, base: &str, from: u32, to: u32) -> String {
    let mut text = String::new();
    for i in from..to {
        writeln!(
            text,
            "[[keys]]\nid = \"{prefix}{i}\"\nsha256 = \"{base}{i:08x}\"\n"
        )
        .unwrap();
    }
    text
}

/// A key file of 100,000 made-up `sha256` values that share every byte but their
/// last four: loaded well within the reload deadline (in a debug build), every key
/// found by its id (a lookup of its digest in the store), the real key let in; then
/// a file that changes half of them is planned and applied as quickly. Placed by the
/// digests' own bits, they all went to one shard and one slot: loading compared each
/// with every key before it (billions of compares), and so did a lookup.
#[tokio::test]
async fn made_up_digests_alike_but_for_their_last_bytes_load_and_are_each_found() {
    const N: u32 = 100_000;
    let first = "4e738ca5563c06cfd0018299933d58db1dd8bf97f6973dc99bf6cdc6";
    let second = "00000000000000000000000000000000000000000000000000000000";
    let mut s = server(Duration::from_secs(60)).await;
    s.replace_with(|tmp| {
        fs::write(tmp, entry("good", "good-key") + &made_up("m", first, 0, N)).unwrap()
    });
    let loaded = reload_where(&mut s.reloads, "the made-up digests", |r| {
        r.is_applied() && r.added().len() == N as usize
    })
    .await;
    assert_eq!(loaded.kept(), ["good"]);
    assert_eq!(s.store.len(), N as usize + 1);
    for i in 0..N {
        let id = format!("m{i}");
        assert!(s.store.get(&id).is_some_and(|k| k.id() == id), "{id}");
    }
    assert!(s.store.get(&format!("m{N}")).is_none());
    assert_eq!(s.status("good-key").await, 200);
    assert_eq!(s.status(&format!("{first}00000007")).await, 401);
    // Half of them get other made-up digests, and as many new ones come.
    s.replace_with(|tmp| {
        let text = entry("good", "good-key")
            + &made_up("m", first, 0, N / 2)
            + &made_up("m", second, N / 2, N)
            + &made_up("n", second, N, N + N / 2);
        fs::write(tmp, text).unwrap();
    });
    let changed = reload_where(&mut s.reloads, "half of them changed", |r| {
        r.is_applied() && !r.changed().is_empty()
    })
    .await;
    assert_eq!(changed.changed().len(), N as usize / 2);
    assert_eq!(changed.added().len(), N as usize / 2);
    assert_eq!(s.store.len(), N as usize * 3 / 2 + 1);
    for i in (0..N + N / 2).step_by(7) {
        let id = format!("{}{i}", if i < N { 'm' } else { 'n' });
        assert!(s.store.get(&id).is_some_and(|k| k.id() == id), "{id}");
    }
    assert_eq!(s.status("good-key").await, 200);
}
