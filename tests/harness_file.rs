//! Fault-injection harness for the key file: replicas following one key file, the
//! key-management API writing it from two processes, and the faults a key file
//! meets, under a seeded random schedule.
//!
//! Three replicas, each a `KeyStore` fed by a `FileSource` on the same file and
//! served over HTTP on 127.0.0.1: two in this process (each with its own `AdminApi`
//! over a `FileBackend`) and one in a child process (this binary run again with
//! `HARNESS_REPLICA` set), with an `AdminApi` of its own. Workers send a random mix
//! of API calls to any of the three: create, patch, rotate, revoke, import (a burst
//! of creates at once), and a rotation without `If-Match` sent at the same moment as
//! a conditional patch of the same key (`disabled: true`, or a new description). Meanwhile one fault at a time: a hand edit renamed over
//! the file (ignoring every lock, racing the API), a hand edit written in place, the
//! file emptied for a while, the file left half written for a while, and `kill -9`
//! of the child while calls are in flight (then it is started again).
//!
//! Invariants, checked during the run and once the faults stop:
//!
//! 1. every change answered 2xx or 202 is in the file, and on every replica, within
//!    `BOUND` (3 s) once the faults stop;
//! 2. a key revoked with a 2xx or 202 (deleted, or patched `disabled: true`: then
//!    kept in the file, disabled) is never accepted by any replica once `BOUND` has
//!    passed since the answer, whatever rotation raced it; nor is a key removed by
//!    hand;
//! 3. no replica refuses a key of its last good set while the file is broken (the
//!    `sentinel` key, and every key created more than `BOUND` ago and not revoked);
//! 4. at rest, every replica holds exactly the file's keys;
//! 5. no secret appears in any log line of either process.
//!
//! A hand edit that ignores the locks and renames a file it read earlier can itself
//! revert changes the API made between its read and its rename (the stale-buffer
//! problem the README describes): calls whose time in flight overlaps such an edit's
//! read-to-rename window are not held to 1 and 2. Calls whose outcome is unknown
//! (a killed child, a 504, a dropped connection) are not either; 4 holds regardless.
//!
//! A change answered just before the file is emptied or left half written (within
//! `READ_WINDOW`, 1 s) may never reach the replicas of the other process while the
//! file stays broken: the file that held it was truncated while their watchers were
//! still letting the writes' events settle, so they keep their last good keys,
//! without it, until the writer closes the file. Such a change is held to 2 and 3
//! from `BOUND` after the close. (Counting it from its answer failed about one seed
//! in ten once pauses last longer than `BOUND`; the check run before the seeds pins
//! this down against a real replica.)
//!
//! On failure it prints the seed and the command that replays it:
//! `HARNESS_SEED=<seed> cargo test --all-features --test harness_file -- --nocapture`.
//! `HARNESS_SEEDS=<n>` runs n seeds from `HARNESS_SEED` (default: 1, 2, 3),
//! `HARNESS_SECONDS=<s>` sets each seed's time under faults (default 10),
//! `HARNESS_MINUTES=<m>` keeps running new seeds for that long.
//! The schedule follows the seed; the timing of threads does not, so a replay is
//! the same mix of calls and faults, not the same interleaving.
//!
//! One half-written pause in four lasts 2 to 4 s, the file held open for writing all
//! along, as a slow link's or a typist's does (before the fix for writers that pause
//! with the file open, such pauses lost keys from the file itself);
//! `HARNESS_LONG_PAUSES=0` keeps every pause under half a second.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, Read as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Extension, Json, Router, routing::get};
use serde_json::{Value, json};
use tower_api_key::{
    ApiKeyLayer, FileSource, KeyInfo, KeyStore,
    admin::{AdminApi, FileBackend},
};

/// How long after the faults stop every replica must hold every answered change.
const BOUND: Duration = Duration::from_secs(3);
/// How soon after a change a replica in the other process is sure to have read the
/// file: its watcher lets a burst of file events settle for up to ten debounce
/// periods (200 ms here) before it reads; the rest is room for a loaded machine.
const READ_WINDOW: Duration = Duration::from_secs(1);
const REPLICA: &str = "HARNESS_REPLICA";
const WORKERS: usize = 6;

fn main() {
    if let Ok(path) = std::env::var(REPLICA) {
        return replica_process(PathBuf::from(path));
    }
    let first: u64 = env("HARNESS_SEED").unwrap_or(1);
    let count: u64 = env("HARNESS_SEEDS").unwrap_or(if env::<u64>("HARNESS_SEED").is_some() {
        1
    } else {
        3
    });
    let seconds: u64 = env("HARNESS_SECONDS").unwrap_or(10);
    let minutes: Option<u64> = env("HARNESS_MINUTES");
    let captured = common::Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("tower_api_key=debug")
        .init();
    a_change_broken_before_a_replica_read_it_is_not_held_against_it();
    let start = Instant::now();
    let (mut passed, mut seed) = (0u64, first);
    loop {
        let outcome = std::panic::catch_unwind(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(run(seed, Duration::from_secs(seconds), captured.clone()))
        });
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            eprintln!(
                "\nharness_file: seed {seed} FAILED: {message}\nreplay: HARNESS_SEED={seed} \
                 HARNESS_SECONDS={seconds} cargo test --all-features --test harness_file -- --nocapture\n"
            );
            println!("{passed} passed, 1 failed");
            std::process::exit(1);
        }
        passed += 1;
        seed += 1;
        let more = match minutes {
            Some(m) => start.elapsed() < Duration::from_secs(m * 60),
            None => seed < first + count,
        };
        if !more {
            break;
        }
    }
    println!(
        "harness_file: {passed} seeds from {first} in {:.0?}, every invariant held",
        start.elapsed()
    );
    println!("{passed} passed, 0 failed");
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

/// A small seeded generator (SplitMix64): the schedule of a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn hex(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn initial_file() -> String {
    format!(
        "# The harness's key file.\n\n[[keys]]\nid = \"root\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n\n\
         [[keys]]\nid = \"sentinel\"\nsha256 = \"{}\"\n",
        hex("root-secret"),
        hex("sentinel-secret")
    )
}

// ---- The model's timing, against a real replica ----

/// Run before any seed, and deterministic: a change written to the file (here
/// renamed over it, as another process's API does: nothing applies it to this store
/// directly) and broken in place at once, the writer holding the file open, is not
/// on a replica until the writer closes the file; the replica keeps its last good
/// keys meanwhile. The model must not hold that change against the replica during
/// the break, long as it lasts, and must once `BOUND` has passed since the close.
/// (The model used to, and failed about one seed in ten once pauses lasted seconds.)
fn a_change_broken_before_a_replica_read_it_is_not_held_against_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, path) = (tmp.path().to_owned(), tmp.path().join("keys.toml"));
    let entry = |id: &str| {
        let hash = hex(&format!("{id}-secret"));
        format!("\n[[keys]]\nid = \"{id}\"\nsha256 = \"{hash}\"\n")
    };
    fs::write(&path, initial_file() + &entry("old")).unwrap();
    let store = new_store(&path);
    assert!(store.get("old").is_some(), "the file was not loaded");
    let made = |id: &str, at: Instant, revoked: Option<Instant>| Made {
        secret: format!("{id}-secret"),
        at,
        revoked: revoked.map(|r| (r, r)),
        disabled: false,
        description: None,
        calls: [Some(at), revoked]
            .into_iter()
            .flatten()
            .map(|t| (t, t))
            .collect(),
        unsure: false,
        in_flight: 0,
    };
    let mut model = Model::default();
    // Made long before.
    let before = Instant::now().checked_sub(BOUND * 2).unwrap();
    model.made.insert("old".into(), made("old", before, None));

    // The change, "old" revoked and "new" made, renamed over the file and answered;
    // then the file truncated and half written. In the harness the two are a few
    // milliseconds apart; here the directory lock is held across both, so that the
    // watcher (which reads at the same gate) cannot read between them.
    let lock = lock_dir(&dir);
    let text = initial_file() + &entry("new");
    fs::write(dir.join(".keys.toml.new"), &text).unwrap();
    fs::rename(dir.join(".keys.toml.new"), &path).unwrap();
    let answered = Instant::now();
    model
        .made
        .insert("old".into(), made("old", before, Some(answered)));
    model.made.insert("new".into(), made("new", answered, None));
    model.breaks.push((Instant::now(), None));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all(&text.as_bytes()[..text.len() / 2]).unwrap();
    drop(lock);

    // While the file is open, the replica keeps what it had, however long it waits.
    while answered.elapsed() < READ_WINDOW {
        assert!(store.get("sentinel").is_some() && store.get("old").is_some());
        assert!(
            store.get("new").is_none(),
            "a half-written file was applied"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // ... and the model, asked as if the break had lasted past `BOUND`, agrees.
    let agrees = |model: &Model, now: Instant| {
        let (live, revoked) = model.due(now);
        for (id, _) in live {
            assert!(
                store.get(&id).is_some(),
                "the model holds the replica to key {id}, which it had no file to read from"
            );
        }
        for (id, _) in revoked {
            assert!(
                store.get(&id).is_none(),
                "the model holds the replica to the revoke of key {id}, which it had no \
                 file to read from"
            );
        }
    };
    agrees(&model, answered + BOUND + Duration::from_millis(1));

    // The writer finishes and closes: the change is applied, and due.
    file.write_all(&text.as_bytes()[text.len() / 2..]).unwrap();
    drop(file);
    let closed = Instant::now();
    model.breaks[0].1 = Some(closed);
    while store.get("new").is_none() || store.get("old").is_some() {
        assert!(
            closed.elapsed() < Duration::from_secs(10),
            "the change was not applied once the file was closed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (live, revoked) = model.due(closed + BOUND + Duration::from_millis(1));
    assert_eq!(
        (live.len(), revoked.len()),
        (1, 1),
        "the change is due once the file is whole again"
    );
    agrees(&model, closed + BOUND + Duration::from_millis(1));
}

// ---- A replica: a store on the file, its layer, an API, and its state ----

/// What a replica serves: `/` (any valid key), the API, `/state`.
fn replica_app(path: &Path, store: &KeyStore) -> Router {
    let state = {
        let (store, path) = (store.clone(), path.to_owned());
        move || {
            let (store, path) = (store.clone(), path.clone());
            async move { Json(state_of(&store, &path)) }
        }
    };
    Router::new()
        .route(
            "/",
            get(|Extension(k): Extension<KeyInfo>| async move { k.id().to_owned() }),
        )
        .route_layer(ApiKeyLayer::from_store(store.clone()))
        .route("/state", get(state))
        .merge(AdminApi::new(store.clone(), FileBackend::new(path)).router())
}

/// The store's ids, and whether it holds exactly the file's keys now.
fn state_of(store: &KeyStore, path: &Path) -> Value {
    let mut ids: Vec<String> = store.keys().iter().map(|k| k.id().to_owned()).collect();
    ids.sort();
    let equal = fs::read(path)
        .ok()
        .and_then(|bytes| FileSource::parse(path, &bytes).ok())
        .is_some_and(|set| set.len() == store.len() && set.iter().all(|k| store.contains(k)));
    json!({"ids": ids, "equal": equal})
}

fn new_store(path: &Path) -> KeyStore {
    let store = KeyStore::new();
    let _ = store.add_source(
        FileSource::new(path)
            .with_poll_interval(Duration::from_millis(250))
            .with_debounce(Duration::from_millis(20)),
    );
    store
}

/// The child process: a replica with its API, until its standard input closes.
fn replica_process(path: PathBuf) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter("tower_api_key=debug")
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = new_store(&path);
        let app = replica_app(&path, &store);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", listener.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        // The parent holds our standard input: when it goes, so do we.
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await
        .unwrap();
    });
    std::process::exit(0);
}

/// The child replica, as the parent sees it.
struct ChildReplica {
    child: Child,
    addr: SocketAddr,
}

fn spawn_child(path: &Path, logs: &Arc<Mutex<String>>) -> ChildReplica {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(REPLICA, path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("LISTENING ")
        .unwrap_or_else(|| panic!("the child replica said {line:?}"))
        .parse()
        .unwrap();
    let (logs, mut stderr) = (logs.clone(), child.stderr.take().unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            logs.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    ChildReplica { child, addr }
}

// ---- What the workers did, and what must follow ----

/// One key the workers made, and what happened to it.
#[derive(Clone, Debug)]
struct Made {
    secret: String,
    /// When the create was answered.
    at: Instant,
    /// Revoked (answered 2xx/202): when the revoke was sent and answered.
    revoked: Option<(Instant, Instant)>,
    /// Revoked by `disabled: true`: kept in the file, refused everywhere.
    disabled: bool,
    /// The description of the last patch answered 2xx/202.
    description: Option<String>,
    /// Every call's time in flight.
    calls: Vec<(Instant, Instant)>,
    /// A call on it had an unknown outcome.
    unsure: bool,
    /// Calls on it sent and not answered yet.
    in_flight: u32,
}

/// Keys to try: (id, secret) each.
type Keys = Vec<(String, String)>;

#[derive(Default)]
struct Model {
    made: HashMap<String, Made>,
    /// Hand keys: id → (secret, present).
    hand: HashMap<String, (String, bool)>,
    /// Read-to-rename windows of hand edits that ignored the locks; an open one has
    /// no end yet.
    windows: Vec<(Instant, Option<Instant>)>,
    /// When the file was emptied or left half written (the writer holding it open),
    /// and when that writer closed it; an open one has no end yet.
    breaks: Vec<(Instant, Option<Instant>)>,
    secrets: Vec<String>,
}

impl Model {
    /// Whether a change answered at `answered` may still be missing from a replica
    /// at `now` with nothing wrong: the file was broken in place within
    /// [`READ_WINDOW`] of the answer, so a replica in the other process may never
    /// have read the file that held the change (its watcher was still settling the
    /// writes' events when the file was truncated). Such a replica keeps its last
    /// good keys, without the change, until the writer closes the file; the change
    /// is due `BOUND` after that.
    fn excused(&self, answered: Instant, now: Instant) -> bool {
        self.breaks.iter().any(|&(from, to)| {
            from < answered + READ_WINDOW && to.is_none_or(|to| to > answered && now < to + BOUND)
        })
    }

    /// The keys every replica must accept at `now` (the sentinel aside), and those
    /// none may.
    fn due(&self, now: Instant) -> (Keys, Keys) {
        let mut live = Vec::new();
        let mut revoked = Vec::new();
        for (id, made) in &self.made {
            if !self.sure(made) {
                continue;
            }
            match made.revoked {
                Some((_, answered))
                    if now.duration_since(answered) > BOUND && !self.excused(answered, now) =>
                {
                    revoked.push((id.clone(), made.secret.clone()))
                }
                None if now.duration_since(made.at) > BOUND
                    && made.in_flight == 0
                    && !made.calls.iter().any(|c| c.1 > now - BOUND)
                    && !self.excused(made.at, now) =>
                {
                    live.push((id.clone(), made.secret.clone()))
                }
                _ => {}
            }
        }
        (live, revoked)
    }

    /// Whether a call's time in flight overlaps a lock-ignoring hand edit.
    fn overlaps(&self, (sent, answered): (Instant, Instant)) -> bool {
        self.windows
            .iter()
            .any(|&(read, renamed)| read <= answered && renamed.is_none_or(|r| r >= sent))
    }

    /// Whether `key`'s fate is known: no unknown outcome, no call a stale hand edit
    /// could have undone.
    fn sure(&self, key: &Made) -> bool {
        !key.unsure && !key.calls.iter().any(|&c| self.overlaps(c))
    }
}

struct World {
    path: PathBuf,
    dir: PathBuf,
    /// Replica addresses: two here, and the child (None while it is down).
    replicas: Mutex<Vec<Option<SocketAddr>>>,
    model: Mutex<Model>,
    stop: AtomicBool,
    next: AtomicU64,
    client: reqwest::Client,
    failures: Mutex<Vec<String>>,
    /// Half-written pauses of seconds too (unless `HARNESS_LONG_PAUSES=0`).
    long_pauses: bool,
}

impl World {
    fn fail(&self, what: String) {
        eprintln!("harness_file: {what}");
        self.failures.lock().unwrap().push(what);
    }

    /// A replica's name in messages.
    fn name(&self, addr: SocketAddr) -> String {
        let replicas = self.replicas.lock().unwrap();
        match replicas.iter().position(|r| *r == Some(addr)) {
            Some(2) => format!("the child replica ({addr})"),
            Some(i) => format!("in-process replica {i} ({addr})"),
            None => format!("replica {addr}"),
        }
    }

    fn endpoints(&self) -> Vec<SocketAddr> {
        self.replicas
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .copied()
            .collect()
    }

    async fn call(
        &self,
        addr: SocketAddr,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> Option<(u16, Value, Option<String>)> {
        let mut req = self
            .client
            .request(method, format!("http://{addr}{path}"))
            .header("authorization", "Bearer root-secret");
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        if let Some(tag) = if_match {
            req = req.header("if-match", tag);
        }
        let res = req.send().await.ok()?;
        let status = res.status().as_u16();
        let etag = res
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = res.text().await.ok()?;
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(Value::Null),
            etag,
        ))
    }

    async fn accepts(&self, addr: SocketAddr, secret: &str) -> Option<bool> {
        let res = self
            .client
            .get(format!("http://{addr}/"))
            .header("x-api-key", secret)
            .send()
            .await
            .ok()?;
        Some(res.status().as_u16() == 200)
    }
}

fn ok(status: u16) -> bool {
    (200..300).contains(&status)
}

/// A worker: random calls on keys it made itself.
async fn worker(world: Arc<World>, mut rng: Rng, me: usize) {
    let mut mine: Vec<String> = Vec::new();
    while !world.stop.load(Ordering::SeqCst) {
        let endpoints = world.endpoints();
        let addr = endpoints[rng.below(endpoints.len() as u64) as usize];
        let choice = rng.below(100);
        if choice < 35 || mine.is_empty() {
            let n = if choice < 5 { 2 + rng.below(12) } else { 1 };
            // "import": a burst of creates at once, batched by the backend.
            let calls: Vec<_> = (0..n)
                .map(|_| {
                    let id = format!("w{me}-{}", world.next.fetch_add(1, Ordering::SeqCst));
                    let world = world.clone();
                    tokio::spawn(async move {
                        let sent = Instant::now();
                        let reply = world
                            .call(
                                addr,
                                reqwest::Method::POST,
                                "/v1/api-keys",
                                Some(json!({"id": id})),
                                None,
                            )
                            .await;
                        (id, sent, Instant::now(), reply)
                    })
                })
                .collect();
            for call in calls {
                let (id, sent, answered, reply) = call.await.unwrap();
                let mut model = world.model.lock().unwrap();
                match reply {
                    Some((status, body, _)) if ok(status) => {
                        let secret = body["key"].as_str().unwrap().to_owned();
                        model.secrets.push(secret.clone());
                        model.made.insert(
                            id.clone(),
                            Made {
                                secret,
                                at: answered,
                                revoked: None,
                                disabled: false,
                                description: None,
                                calls: vec![(sent, answered)],
                                unsure: false,
                                in_flight: 0,
                            },
                        );
                        mine.push(id);
                    }
                    // Nothing written: fine.
                    Some((503, _, _)) => {}
                    Some((status, body, _)) if status != 504 => {
                        drop(model);
                        world.fail(format!("create {id}: unexpected {status} {body}"));
                    }
                    // Unknown: it may exist, with a secret no one knows; never used.
                    _ => {}
                }
            }
        } else {
            let id = mine[rng.below(mine.len() as u64) as usize].clone();
            let path = format!("/v1/api-keys/{id}");
            let sent = Instant::now();
            // In flight from now: what the key is may change before the answer.
            if let Some(made) = world.model.lock().unwrap().made.get_mut(&id) {
                made.in_flight += 1;
            }
            if choice < 65 {
                // Patch the description, conditionally.
                let Some((200, _, Some(etag))) = world
                    .call(addr, reqwest::Method::GET, &path, None, None)
                    .await
                else {
                    if let Some(made) = world.model.lock().unwrap().made.get_mut(&id) {
                        made.in_flight -= 1;
                    }
                    continue;
                };
                let description = format!("d{}", rng.next());
                let reply = world
                    .call(
                        addr,
                        reqwest::Method::PATCH,
                        &path,
                        Some(json!({"description": description})),
                        Some(&etag),
                    )
                    .await;
                note(&world, &id, sent, reply.as_ref().map(|r| r.0), |made| {
                    made.description = Some(description.clone());
                });
            } else if choice < 75 {
                let reply = world
                    .call(
                        addr,
                        reqwest::Method::POST,
                        &format!("{path}/rotate"),
                        Some(json!({"overlap_seconds": 3600})),
                        None,
                    )
                    .await;
                rotated(&world, &id, sent, reply, &mut mine);
            } else if choice < 88 {
                let reply = world
                    .call(addr, reqwest::Method::DELETE, &path, None, None)
                    .await;
                let answered = Instant::now();
                let status = reply.as_ref().map(|r| r.0);
                note(&world, &id, sent, status, |made| {
                    made.revoked = Some((sent, answered));
                });
                if status.is_some_and(ok) {
                    mine.retain(|m| *m != id);
                }
            } else {
                // A rotation without `If-Match` racing a revocation (`disabled:
                // true`) or a patch of the same key, each conditional on the key as
                // read just before: neither may undo the other.
                let Some((200, _, Some(etag))) = world
                    .call(addr, reqwest::Method::GET, &path, None, None)
                    .await
                else {
                    if let Some(made) = world.model.lock().unwrap().made.get_mut(&id) {
                        made.in_flight -= 1;
                    }
                    continue;
                };
                let revoking = rng.below(2) == 0;
                let description = format!("d{}", rng.next());
                let change = match revoking {
                    true => json!({"disabled": true}),
                    false => json!({"description": description}),
                };
                if let Some(made) = world.model.lock().unwrap().made.get_mut(&id) {
                    made.in_flight += 1;
                }
                let rotate_path = format!("{path}/rotate");
                let (reply, other) = tokio::join!(
                    world.call(
                        addr,
                        reqwest::Method::POST,
                        &rotate_path,
                        Some(json!({"overlap_seconds": 3600})),
                        None,
                    ),
                    world.call(
                        addr,
                        reqwest::Method::PATCH,
                        &path,
                        Some(change),
                        Some(&etag)
                    ),
                );
                let answered = Instant::now();
                let status = other.as_ref().map(|r| r.0);
                note(&world, &id, sent, status, |made| match revoking {
                    true => (made.revoked, made.disabled) = (Some((sent, answered)), true),
                    false => made.description = Some(description.clone()),
                });
                if revoking && status.is_some_and(ok) {
                    mine.retain(|m| *m != id);
                }
                rotated(&world, &id, sent, reply, &mut mine);
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
    }
}

/// Records a rotation of `id` sent at `sent`: its successor if it was answered
/// 2xx/202, doubt over every id it may have made if its outcome is unknown.
fn rotated(
    world: &World,
    id: &str,
    sent: Instant,
    reply: Option<(u16, Value, Option<String>)>,
    mine: &mut Vec<String>,
) {
    let answered = Instant::now();
    let status = reply.as_ref().map(|r| r.0);
    note(world, id, sent, status, |_| {});
    if !matches!(status, Some(200..=299 | 400..=499 | 503)) {
        // It may have made a successor, under the id derived from this
        // key's, which may be the id of one revoked before (the API
        // skips only the ids it revoked itself): none of those ids has a
        // known fate any more.
        let base = id.rsplit_once("-r").map_or(id, |(b, _)| b);
        let derived = format!("{base}-r");
        for (other, made) in &mut world.model.lock().unwrap().made {
            if other.starts_with(&derived) {
                made.unsure = true;
            }
        }
    }
    if let Some((status, body, _)) = reply
        && ok(status)
    {
        let successor = body["id"].as_str().unwrap().to_owned();
        let secret = body["key"].as_str().unwrap().to_owned();
        let mut model = world.model.lock().unwrap();
        model.secrets.push(secret.clone());
        model.made.insert(
            successor.clone(),
            Made {
                secret,
                at: answered,
                revoked: None,
                disabled: false,
                description: None,
                calls: vec![(sent, answered)],
                unsure: false,
                in_flight: 0,
            },
        );
        mine.push(successor);
    }
}

/// Records a call on key `id`: `done` if it was answered 2xx/202.
fn note(world: &World, id: &str, sent: Instant, status: Option<u16>, done: impl FnOnce(&mut Made)) {
    let mut model = world.model.lock().unwrap();
    let Some(made) = model.made.get_mut(id) else {
        return;
    };
    made.calls.push((sent, Instant::now()));
    made.in_flight -= 1;
    match status {
        Some(status) if ok(status) => done(made),
        // Refused, with nothing written (a stale ETag, gone by hand-race, 503).
        Some(400..=499 | 503) => {}
        _ => made.unsure = true,
    }
}

// ---- Faults ----

/// Holds the key file's directory lock, as a careful hand does (`flock DIR …`).
struct DirLock {
    _file: fs::File,
}

fn lock_dir(dir: &Path) -> DirLock {
    let file = fs::File::open(dir).unwrap();
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).unwrap();
    DirLock { _file: file }
}

fn hand_entry(id: &str, secret: &str) -> String {
    format!("\n# by hand\n[[keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n")
}

/// Removes a hand key's entry from the file's text.
fn without(text: &str, id: &str, secret: &str) -> String {
    text.replace(&hand_entry(id, secret), "")
}

async fn faults(
    world: Arc<World>,
    mut rng: Rng,
    child_logs: Arc<Mutex<String>>,
    child: Arc<Mutex<Option<ChildReplica>>>,
) {
    let mut hand_n = 0;
    while !world.stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50 + rng.below(250))).await;
        let (path, dir) = (world.path.clone(), world.dir.clone());
        match rng.below(5) {
            // A hand edit renamed over the file, ignoring every lock.
            0 => {
                let (add, id, secret) = pick_hand(&world, &mut rng, &mut hand_n);
                let key = id.clone();
                let window = {
                    let mut model = world.model.lock().unwrap();
                    model.windows.push((Instant::now(), None));
                    model.windows.len() - 1
                };
                let done = tokio::task::spawn_blocking(move || {
                    let text = fs::read_to_string(&path).unwrap();
                    if text.is_empty() {
                        return false;
                    }
                    let edited = match add {
                        true => text.clone() + &hand_entry(&id, &secret),
                        false => without(&text, &id, &secret),
                    };
                    if edited == text {
                        return false;
                    }
                    let tmp = dir.join(".keys.toml.swp");
                    fs::write(&tmp, edited).unwrap();
                    fs::rename(&tmp, &path).unwrap();
                    true
                })
                .await
                .unwrap();
                let mut model = world.model.lock().unwrap();
                model.windows[window].1 = Some(Instant::now());
                if done && let Some(hand) = model.hand.get_mut(&key) {
                    hand.1 = add;
                }
            }
            // A hand edit written in place, holding the directory lock.
            1 => {
                let (add, id, secret) = pick_hand(&world, &mut rng, &mut hand_n);
                let key = id.clone();
                let done = tokio::task::spawn_blocking(move || {
                    let _lock = lock_dir(&dir);
                    let text = fs::read_to_string(&path).unwrap();
                    let edited = match add {
                        true => text.clone() + &hand_entry(&id, &secret),
                        false => without(&text, &id, &secret),
                    };
                    if edited == text || text.is_empty() {
                        return false;
                    }
                    fs::write(&path, edited).unwrap();
                    true
                })
                .await
                .unwrap();
                let mut model = world.model.lock().unwrap();
                if done && let Some(hand) = model.hand.get_mut(&key) {
                    hand.1 = add;
                }
            }
            // Emptied, or left half written, for a while; then finished. One pause
            // in four is seconds long, as a slow link's or a typist's is (see the
            // module docs).
            2 | 3 => {
                let pause = match world.long_pauses && rng.chance(25) {
                    true => Duration::from_millis(2_000 + rng.below(2_000)),
                    false => Duration::from_millis(50 + rng.below(400)),
                };
                let cut = rng.next();
                let empty = rng.chance(50);
                let world = world.clone();
                tokio::task::spawn_blocking(move || {
                    let lock = lock_dir(&dir);
                    let text = fs::read(&path).unwrap();
                    let broken = {
                        let mut model = world.model.lock().unwrap();
                        model.breaks.push((Instant::now(), None));
                        model.breaks.len() - 1
                    };
                    let mut file = fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(&path)
                        .unwrap();
                    let at = if empty {
                        0
                    } else {
                        (cut as usize) % text.len().max(1)
                    };
                    file.write_all(&text[..at]).unwrap();
                    file.flush().unwrap();
                    drop(lock);
                    std::thread::sleep(pause);
                    let lock = lock_dir(&dir);
                    file.write_all(&text[at..]).unwrap();
                    drop((file, lock));
                    world.model.lock().unwrap().breaks[broken].1 = Some(Instant::now());
                })
                .await
                .unwrap();
            }
            // kill -9 of the child replica while calls are in flight, and a restart.
            _ => {
                let taken = child.lock().unwrap().take();
                if let Some(mut old) = taken {
                    world.replicas.lock().unwrap()[2] = None;
                    old.child.kill().unwrap();
                    old.child.wait().unwrap();
                    // Calls to it that were in flight have unknown outcomes: the
                    // workers saw a dropped connection.
                    tokio::time::sleep(Duration::from_millis(rng.below(200))).await;
                    let (path, logs) = (world.path.clone(), child_logs.clone());
                    let new = tokio::task::spawn_blocking(move || spawn_child(&path, &logs))
                        .await
                        .unwrap();
                    // Serving again once it has loaded the file.
                    let start = Instant::now();
                    loop {
                        if let Some((200, state, _)) = world
                            .call(new.addr, reqwest::Method::GET, "/state", None, None)
                            .await
                            && state["ids"].as_array().is_some_and(|ids| !ids.is_empty())
                        {
                            break;
                        }
                        assert!(
                            start.elapsed() < Duration::from_secs(10),
                            "the child never loaded"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    world.replicas.lock().unwrap()[2] = Some(new.addr);
                    *child.lock().unwrap() = Some(new);
                }
            }
        }
    }
}

/// A hand key to add (a new one) or remove (one added before): (add, id, secret).
fn pick_hand(world: &World, rng: &mut Rng, n: &mut u64) -> (bool, String, String) {
    let model = world.model.lock().unwrap();
    let present: Vec<(&String, &(String, bool))> = model.hand.iter().filter(|(_, h)| h.1).collect();
    if !present.is_empty() && rng.chance(50) {
        let (id, (secret, _)) = present[rng.below(present.len() as u64) as usize];
        return (false, id.clone(), secret.clone());
    }
    drop(model);
    *n += 1;
    let (id, secret) = (
        format!("hand-{n}"),
        format!("hand-secret-{n}-{}", rng.next()),
    );
    let mut model = world.model.lock().unwrap();
    model.secrets.push(secret.clone());
    model.hand.insert(id.clone(), (secret.clone(), false));
    (true, id, secret)
}

// ---- The run ----

async fn run(seed: u64, seconds: Duration, captured: common::Captured) {
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let path = dir.join("keys.toml");
    fs::write(&path, initial_file()).unwrap();
    let stores = [new_store(&path), new_store(&path)];
    let mut replicas = Vec::new();
    for store in &stores {
        replicas.push(Some(common::serve(replica_app(&path, store)).await));
    }
    let child_logs = Arc::new(Mutex::new(String::new()));
    let child = {
        let (path, logs) = (path.clone(), child_logs.clone());
        tokio::task::spawn_blocking(move || spawn_child(&path, &logs))
            .await
            .unwrap()
    };
    replicas.push(Some(child.addr));
    let child = Arc::new(Mutex::new(Some(child)));
    let world = Arc::new(World {
        path: path.clone(),
        dir: dir.clone(),
        replicas: Mutex::new(replicas),
        model: Mutex::new(Model::default()),
        stop: AtomicBool::new(false),
        next: AtomicU64::new(0),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        failures: Mutex::new(Vec::new()),
        long_pauses: env::<u8>("HARNESS_LONG_PAUSES") != Some(0),
    });

    let workers: Vec<_> = (0..WORKERS)
        .map(|w| tokio::spawn(worker(world.clone(), Rng(rng.next()), w)))
        .collect();
    let faulter = tokio::spawn(faults(
        world.clone(),
        Rng(rng.next()),
        child_logs.clone(),
        child.clone(),
    ));
    let prober = tokio::spawn(probe(world.clone()));
    tokio::time::sleep(seconds).await;
    world.stop.store(true, Ordering::SeqCst);
    faulter.await.unwrap();
    for w in workers {
        w.await.unwrap();
    }
    prober.await.unwrap();

    // Faults stopped: within BOUND, everything answered is everywhere.
    tokio::time::sleep(BOUND).await;
    at_rest(&world, &stores).await;

    // No secret in any log line.
    let logs = captured.text() + &child_logs.lock().unwrap();
    for secret in &world.model.lock().unwrap().secrets {
        if logs.contains(secret.as_str()) {
            world.fail("a secret appears in the logs".into());
            break;
        }
    }
    let model = world.model.lock().unwrap();
    let made = model.made.len();
    let revoked = model.made.values().filter(|m| m.revoked.is_some()).count();
    let sure = model.made.values().filter(|m| model.sure(m)).count();
    drop(model);
    if let Some(mut child) = child.lock().unwrap().take() {
        let _ = child.child.kill();
        let _ = child.child.wait();
    }
    let failures = world.failures.lock().unwrap().clone();
    eprintln!(
        "harness_file: seed {seed}: {made} keys made ({sure} of known fate), {revoked} revoked, {} failures",
        failures.len()
    );
    if !failures.is_empty() {
        // The last words of both processes, to tell a stuck watcher from a lost write.
        print_tail("the child replica", &child_logs.lock().unwrap(), 40);
        print_tail("this process", &captured.text(), 80);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Prints the last `n` log lines of `logs` but the request lines.
fn print_tail(whose: &str, logs: &str, n: usize) {
    let tail: Vec<&str> = logs
        .lines()
        .rev()
        .filter(|line| !line.contains("tower_api_key::request"))
        .take(n)
        .collect();
    eprintln!("{whose}'s last log lines:");
    for line in tail.iter().rev() {
        eprintln!("  {line}");
    }
}

/// During the run: the sentinel and every settled live key are accepted by every
/// replica, and no settled revoked key is.
async fn probe(world: Arc<World>) {
    let mut round = 0u64;
    while !world.stop.load(Ordering::SeqCst) {
        round += 1;
        let now = Instant::now();
        let (live, revoked) = world.model.lock().unwrap().due(now);
        for addr in world.endpoints() {
            if world.accepts(addr, "sentinel-secret").await == Some(false) {
                world.fail(format!("{} refused the sentinel key", world.name(addr)));
            }
            for (id, secret) in live.iter().skip((round as usize) % 7).step_by(7) {
                // Revoked meanwhile by its worker? Then it is no longer live.
                if world.accepts(addr, secret).await == Some(false) {
                    let still_live =
                        world.model.lock().unwrap().made.get(id).is_some_and(|m| {
                            m.revoked.is_none() && m.calls.iter().all(|c| c.1 < now)
                        });
                    if still_live {
                        world.fail(format!("{} refused live key {id}", world.name(addr)));
                    }
                }
            }
            for (id, secret) in &revoked {
                if world.accepts(addr, secret).await == Some(true) {
                    world.fail(format!("{} accepted revoked key {id}", world.name(addr)));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Once the faults have stopped and `BOUND` has passed: the file holds every
/// answered change, every replica accepts exactly what it should and holds exactly
/// the file's keys.
async fn at_rest(world: &World, stores: &[KeyStore]) {
    let text = fs::read_to_string(&world.path).unwrap();
    let set = match FileSource::parse(&world.path, text.as_bytes()) {
        Ok(set) => set,
        Err(e) => return world.fail(format!("at rest the file does not parse: {e}")),
    };
    let endpoints = world.endpoints();
    let checks = expected(world, &set);
    for addr in &endpoints {
        for (id, secret, live) in &checks {
            if world.accepts(*addr, secret).await != Some(*live) {
                world.fail(format!(
                    "replica {addr}: key {id} accepted={} expected {live}",
                    !live
                ));
            }
        }
        match world
            .call(*addr, reqwest::Method::GET, "/state", None, None)
            .await
        {
            Some((200, state, _)) if state["equal"] == true => {}
            other => world.fail(format!(
                "replica {addr} does not hold the file's keys: {other:?}"
            )),
        }
    }
    for (i, store) in stores.iter().enumerate() {
        if !(set.len() == store.len() && set.iter().all(|k| store.contains(k))) {
            world.fail(format!(
                "in-process replica {i} does not hold the file's keys"
            ));
        }
    }
}

/// What the file must hold, checked against it: every key of known fate, and every
/// hand key, with whether it must be accepted.
fn expected(world: &World, set: &tower_api_key::KeySet) -> Vec<(String, String, bool)> {
    let model = world.model.lock().unwrap();
    let mut checks = Vec::new();
    for (id, made) in &model.made {
        if !model.sure(made) {
            continue;
        }
        let in_file = set.get(id);
        match (made.revoked, in_file) {
            (Some(_), Some(key)) if made.disabled && key.is_disabled() => {}
            (Some(_), Some(_)) if made.disabled => world.fail(format!(
                "key {id}, disabled with a 2xx, is enabled in the file"
            )),
            (Some(_), None) if made.disabled => {
                world.fail(format!("key {id}, disabled with a 2xx, is not in the file"))
            }
            (Some(_), Some(_)) => world.fail(format!("revoked key {id} is in the file")),
            (None, None) => world.fail(format!("key {id} (answered 2xx) is not in the file")),
            (None, Some(key))
                if made.description.is_some()
                    && key.description() != made.description.as_deref() =>
            {
                world.fail(format!(
                    "key {id}: the file says {:?}, the last answered patch {:?}",
                    key.description(),
                    made.description
                ));
            }
            _ => {}
        }
        checks.push((id.clone(), made.secret.clone(), made.revoked.is_none()));
    }
    for (id, (secret, present)) in &model.hand {
        if *present != set.get(id).is_some() {
            world.fail(format!(
                "hand key {id}: expected present={present} in the file"
            ));
        }
        checks.push((id.clone(), secret.clone(), *present));
    }
    checks
}
