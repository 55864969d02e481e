//! The key-management API's file backend against the ways a key file is really
//! edited while it writes: emptied, half written, replaced by rename. A real axum
//! server on 127.0.0.1, a real key file, a real `FileSource`.
#![allow(clippy::unwrap_used)]
#![cfg(all(feature = "admin", unix))]

mod common;

use std::{
    fs,
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Extension, Router, routing::get};
use serde_json::{Value, json};
use tower_api_key::{
    ApiKeyLayer, FileSource, KeyInfo, KeyStore,
    admin::{AdminApi, FileBackend},
};

const ROOT: &str = "[[keys]]\nid = \"root\"\nsecret = \"root-secret\"\nscopes = [\"admin\"]\n\n";

fn hand_key(i: usize) -> String {
    format!("[[keys]]\nid = \"hand-{i}\"\nsecret = \"hand-secret-{i}\"\n\n")
}

struct Server {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    path: PathBuf,
    addr: SocketAddr,
    store: KeyStore,
}

async fn server(content: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, content).unwrap();
    let store = KeyStore::new();
    store.add_source(FileSource::new(&path)).unwrap();
    let app = Router::new()
        .route(
            "/",
            get(|Extension(k): Extension<KeyInfo>| async move { k.id().to_owned() }),
        )
        .route_layer(ApiKeyLayer::from_store(store.clone()))
        .merge(AdminApi::new(store.clone(), FileBackend::new(&path)).router());
    Server {
        dir: dir.path().to_owned(),
        _dir: dir,
        path,
        addr: common::serve(app).await,
        store,
    }
}

impl Server {
    async fn create(&self, id: &str) -> (u16, Value) {
        let res = common::client()
            .post(format!("http://{}/v1/api-keys", self.addr))
            .header("authorization", "Bearer root-secret")
            .header("content-type", "application/json")
            .body(json!({"id": id}).to_string())
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (
            status,
            serde_json::from_str(&res.text().await.unwrap()).unwrap(),
        )
    }

    async fn works(&self, key: &str) -> bool {
        common::get_with(self.addr, "/", Some(key)).await.0 == 200
    }
}

#[tokio::test]
async fn an_emptied_key_file_is_not_written_over() {
    let s = server(&(ROOT.to_owned() + &hand_key(1))).await;
    // `: > keys.toml`, as a careless script starts a rewrite.
    fs::File::create(&s.path).unwrap();
    let (status, body) = s.create("new").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:tower-api-key:problem:unavailable");
    assert!(body["detail"].as_str().unwrap().contains("empty"), "{body}");
    assert_eq!(fs::read_to_string(&s.path).unwrap(), "", "left alone");
    // The last good keys still work; the finished write is applied; then the API
    // writes on top of it.
    assert!(s.works("hand-secret-1").await);
    fs::write(&s.path, ROOT.to_owned() + &hand_key(1) + &hand_key(2)).unwrap();
    let start = Instant::now();
    while !s.works("hand-secret-2").await {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.create("new").await.0, 201);
    let file = fs::read_to_string(&s.path).unwrap();
    assert!(file.contains("hand-1") && file.contains("hand-2") && file.contains("\"new\""));
}

#[tokio::test]
async fn a_half_written_key_file_is_not_written_over() {
    let full = ROOT.to_owned() + &hand_key(1) + &hand_key(2);
    let s = server(&full).await;
    // An in-place writer: truncate, write a prefix that parses on its own (the root
    // key only), pause, write the rest.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&s.path)
        .unwrap();
    file.write_all(ROOT.as_bytes()).unwrap();
    file.flush().unwrap();
    let (status, body) = s.create("new").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:tower-api-key:problem:unavailable");
    file.write_all((hand_key(1) + &hand_key(2)).as_bytes())
        .unwrap();
    drop(file);
    // Nothing lost: the writer's keys and the next change alike.
    let start = Instant::now();
    loop {
        let (status, _) = s.create("after").await;
        if status == 201 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = fs::read_to_string(&s.path).unwrap();
    assert!(text.contains("hand-1") && text.contains("hand-2"), "{text}");
    assert!(s.works("hand-secret-2").await);
}

/// The same writer pausing longer, as a slow link or a person typing does: the
/// watcher's news of an open write in place was believed for two seconds from the
/// first write, after which the API took the prefix for the file and wrote over it
/// (the writer's later keys lost). It is believed as long as the watcher waits for
/// the writer.
#[tokio::test]
async fn a_write_in_place_that_pauses_for_seconds_is_not_written_over() {
    let full = ROOT.to_owned() + &hand_key(1) + &hand_key(2);
    let s = server(&full).await;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&s.path)
        .unwrap();
    file.write_all(ROOT.as_bytes()).unwrap();
    file.flush().unwrap();
    // Past the old two seconds, and past the watcher's own two-second look at a
    // name created with nothing written.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = s.create("new").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(fs::read_to_string(&s.path).unwrap(), ROOT, "left alone");
    // The keys of the last complete file still work meanwhile.
    assert!(s.works("hand-secret-2").await);
    file.write_all((hand_key(1) + &hand_key(2)).as_bytes())
        .unwrap();
    drop(file);
    let start = Instant::now();
    while s.create("after").await.0 != 201 {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = fs::read_to_string(&s.path).unwrap();
    assert!(text.contains("hand-1") && text.contains("hand-2"), "{text}");
}

/// An editor removes 300 keys one by one, each time writing the file elsewhere and
/// renaming it over, while the API creates keys as fast as it can: no key the editor
/// removed comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_removals_by_rename_are_never_reverted_by_the_api() {
    const HAND: usize = 300;
    let mut content = ROOT.to_owned();
    for i in 0..HAND {
        content.push_str(&hand_key(i));
    }
    let s = Arc::new(server(&content).await);
    let done = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (s, done) = (s.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !done.load(Ordering::SeqCst) {
                let _ = s.create(&format!("api-{w}-{n}")).await;
                n += 1;
            }
        }));
    }
    let editor = {
        let (path, dir) = (s.path.clone(), s.dir.clone());
        std::thread::spawn(move || {
            for i in 0..HAND {
                let text = fs::read_to_string(&path).unwrap();
                let without = text.replace(&hand_key(i), "");
                let tmp = dir.join(".keys.toml.swp");
                fs::write(&tmp, without).unwrap();
                fs::rename(&tmp, &path).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    tokio::task::spawn_blocking(move || editor.join().unwrap())
        .await
        .unwrap();
    done.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    // Settled: the file and the store agree, and no removed key is back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = fs::read_to_string(&s.path).unwrap();
    let back: Vec<usize> = (0..HAND)
        .filter(|i| text.contains(&format!("id = \"hand-{i}\"")))
        .collect();
    assert!(
        back.is_empty(),
        "{} removed keys came back: {back:?}",
        back.len()
    );
    for i in (0..HAND).step_by(10) {
        assert!(
            !s.works(&format!("hand-secret-{i}")).await,
            "hand-{i} works"
        );
    }
    assert!(s.store.get("hand-0").is_none());
}

/// Review of issue 16: a key file that is a symlink (to a file beside it, as a
/// deployment points at a versioned file, or in another directory) is written
/// through: the link stays a link, the file it names gets the change, with its
/// permissions, owner and group, and a store watching the file by another link
/// (its own watcher, not told by the API) sees the change.
#[tokio::test]
async fn a_symlinked_key_file_is_written_through_keeping_its_owner() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink};
    let root = fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    for elsewhere in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (config, data) = (dir.path().join("config"), dir.path().join("data"));
        fs::create_dir(&config).unwrap();
        fs::create_dir(&data).unwrap();
        let real = if elsewhere {
            data.join("keys-v1.toml")
        } else {
            config.join("keys-v1.toml")
        };
        fs::write(&real, ROOT.to_owned() + &hand_key(1)).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o640)).unwrap();
        if root {
            std::os::unix::fs::chown(&real, Some(4242), Some(4243)).unwrap();
        }
        let owner = fs::metadata(&real).map(|m| (m.uid(), m.gid())).unwrap();
        let link = config.join("keys.toml");
        let pointed = if elsewhere {
            real.clone()
        } else {
            PathBuf::from("keys-v1.toml")
        };
        symlink(&pointed, &link).unwrap();
        // Another link to the same file, watched by a store the API does not tell.
        let other_link = data.join("watched.toml");
        symlink(&real, &other_link).unwrap();
        let watcher = KeyStore::new();
        watcher
            .add_source(FileSource::new(&other_link).with_poll_interval(Duration::from_millis(50)))
            .unwrap();

        let store = KeyStore::new();
        store.add_source(FileSource::new(&link)).unwrap();
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route_layer(ApiKeyLayer::from_store(store.clone()))
            .merge(AdminApi::new(store.clone(), FileBackend::new(&link)).router());
        let addr = common::serve(app).await;
        for id in ["new-1", "new-2"] {
            let res = common::client()
                .post(format!("http://{addr}/v1/api-keys"))
                .header("authorization", "Bearer root-secret")
                .header("content-type", "application/json")
                .body(json!({"id": id}).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(res.status().as_u16(), 201, "{}", res.text().await.unwrap());
            let meta = fs::symlink_metadata(&link).unwrap();
            assert!(
                meta.file_type().is_symlink(),
                "elsewhere {elsewhere}: the link was replaced"
            );
            assert_eq!(fs::read_link(&link).unwrap(), pointed);
            let text = fs::read_to_string(&real).unwrap();
            assert!(
                text.contains(&format!("\"{id}\"")),
                "elsewhere {elsewhere}: {text}"
            );
            assert!(text.contains("hand-1"));
            let meta = fs::metadata(&real).unwrap();
            assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
            assert_eq!((meta.uid(), meta.gid()), owner, "owner and group kept");
            assert!(store.get(id).is_some());
            let start = Instant::now();
            while watcher.get(id).is_none() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "elsewhere {elsewhere}: the other watcher never saw `{id}`"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Nothing left behind in either directory.
        for d in [&config, &data] {
            let names: Vec<String> = fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        }
    }
}

/// A tester's finding: the watcher and the API given the key file's path spelled two
/// ways (`keys.toml` and `./keys.toml`) met at the file, but the API did not know the
/// store's source for its own: every create, patch and rotate waited the whole apply
/// timeout and answered 202, though enforced at once.
#[tokio::test]
async fn the_api_knows_its_file_however_the_path_is_spelled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, ROOT.to_owned() + &hand_key(1)).unwrap();
    let store = KeyStore::new();
    store.add_source(FileSource::new(&path)).unwrap();
    let spelled = dir.path().join(".").join("keys.toml");
    let app = AdminApi::new(store.clone(), FileBackend::new(&spelled))
        .with_apply_timeout(Duration::from_secs(30))
        .router();
    let s = Server {
        dir: dir.path().to_owned(),
        _dir: dir,
        path,
        addr: common::serve(app).await,
        store,
    };
    let start = Instant::now();
    let (status, body) = s.create("new").await;
    assert_eq!(status, 201, "{body}");
    assert!(start.elapsed() < Duration::from_secs(10));
    // An id the file holds is taken, not "another source's".
    let (status, body) = s.create("hand-1").await;
    assert_eq!(status, 409, "{body}");
    assert!(!body.to_string().contains("another key source"), "{body}");
    let _ = (&s.dir, &s.store);
}
