//! A seeded fault-injection harness for the PostgreSQL fleet (issues 16 and 19).
//!
//! Each seed starts its own PostgreSQL cluster and three replicas following one
//! namespace: the writer `W` (a store, its snapshot file, and the key-management API
//! over `PostgresBackend` on 127.0.0.1), `B` (polling every 300 ms), `C` (polling
//! every 2.5 s: it learns of most changes from notifications and reconnections, and
//! of those whose notification is lost from the poll, within the bound), and `P`, a
//! replica in a separate process (this test binary run again as
//! `harness_replica_process`, serving HTTP on 127.0.0.1). A seeded
//! random mix of API calls (create, patch, rotate, revoke, and a rotation without
//! `If-Match` racing a conditional `disabled: true` of the same key) and imports
//! runs against
//! PostgreSQL's faults: the server restarted, the replicas' listening connections
//! terminated, every connection of the crate terminated (the API's too), a long
//! transaction holding the namespace's lock, the change table truncated, a record
//! that does not parse, and changes whose notification is lost.
//!
//! Invariants, checked during and after the faults:
//!
//! 1. a change answered 2xx or 202 is on every replica within [`BOUND`] once the
//!    server is up, and in PostgreSQL;
//! 2. a revocation answered 2xx/202 and seen by every replica is never undone: no
//!    replica accepts the key again, through outages and faults;
//! 3. while PostgreSQL is down, no replica refuses a key of its last good set;
//! 4. a call answered 503 wrote nothing; one answered 504 is resolved from
//!    PostgreSQL at rest;
//! 5. at rest, every replica holds exactly the readable keys of PostgreSQL;
//! 6. no secret, and not the database password, appears in any log line, of this
//!    process or of `P`.
//!
//! A failing seed prints the command that replays it. Under CI a fixed set of seeds
//! runs; `HARNESS_SEED=n` runs one, `HARNESS_SEEDS=n` runs n seeds from
//! `HARNESS_SEED` (or `HARNESS_SEED_BASE`, default 1000), `HARNESS_MINUTES=m` runs
//! seeds for m minutes.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "postgres")]

mod common;
mod postgres_support;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Read as _, Write as _},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use postgres_support::{PASSWORD, Postgres, sha256_hex};
use serde_json::{Value, json};
use tower_api_key::{
    ApiKeyLayer, KeyStore,
    admin::AdminApi,
    postgres::{PostgresBackend, PostgresSource},
};

/// How long a change may take to reach every replica once PostgreSQL is healthy.
const BOUND: Duration = Duration::from_secs(4);
/// The seeds CI runs (well inside a minute together): together they draw every kind
/// of step, 1024 three rotations racing a revocation that is answered 200.
const CI_SEEDS: &[u64] = &[1000, 1024, 1036];
/// Steps per seed.
const STEPS: usize = 24;
const NS: &str = "harness";
const ROOT: &str = "root-admin-secret-5e1d0b";

/// splitmix64: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Prints how to replay a seed whose run panicked.
struct Replay(u64);

impl Drop for Replay {
    fn drop(&mut self) {
        if thread::panicking() {
            let text = String::from_utf8_lossy(&log().0.lock().unwrap()).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- the last log lines:");
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
            eprintln!(
                "\nharness_postgres FAILED at seed {0}; replay it with:\n    HARNESS_SEED={0} cargo test --all-features --test harness_postgres -- --nocapture\n",
                self.0
            );
        }
    }
}

/// Which seeds to run, and until when.
fn plan() -> (Vec<u64>, Option<Instant>) {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    // As in the file harness: `HARNESS_SEED` is also where more seeds start.
    let base = var("HARNESS_SEED")
        .or_else(|| var("HARNESS_SEED_BASE"))
        .unwrap_or(1000);
    if let Some(minutes) = var("HARNESS_MINUTES") {
        let until = Instant::now() + Duration::from_secs(minutes * 60);
        return ((base..base + 1_000_000).collect(), Some(until));
    }
    if let Some(n) = var("HARNESS_SEEDS") {
        return ((base..base + n).collect(), None);
    }
    if let Some(seed) = var("HARNESS_SEED") {
        return (vec![seed], None);
    }
    (CI_SEEDS.to_vec(), None)
}

// ---------------------------------------------------------------------------------
// The log every line of this process goes to, searched for secrets.

#[derive(Clone)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log() -> &'static Log {
    static LOG: OnceLock<Log> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Log(Arc::default());
        let writer = log.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("tower_api_key=debug")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init();
        log
    })
}

// ---------------------------------------------------------------------------------
// The model: what the harness expects.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Kept: answered 2xx/202, or imported.
    Live,
    /// Revoked: answered 2xx/202.
    Revoked,
    /// Answered 503: nothing was written.
    NotWritten,
    /// Answered 504: resolved at rest.
    Maybe,
    /// Its record was made unreadable: every replica must refuse it.
    Corrupt,
}

#[derive(Clone, Debug)]
struct Key {
    secret: Option<String>,
    status: Status,
    /// For a revocation: every replica refused it once.
    confirmed: bool,
}

#[derive(Default)]
struct Model {
    keys: BTreeMap<String, Key>,
    next: u64,
    secrets: Vec<String>,
}

impl Model {
    fn id(&mut self) -> String {
        self.next += 1;
        format!("h{}", self.next)
    }

    fn set(&mut self, id: &str, secret: Option<String>, status: Status) {
        if let Some(s) = &secret {
            self.secrets.push(s.clone());
        }
        let secret = secret.or_else(|| self.keys.get(id).and_then(|k| k.secret.clone()));
        self.keys.insert(
            id.to_owned(),
            Key {
                secret,
                status,
                confirmed: false,
            },
        );
    }

    fn pick(&self, rng: &mut Rng, status: Status) -> Option<String> {
        let ids: Vec<&String> = self
            .keys
            .iter()
            .filter(|(_, k)| k.status == status && k.secret.is_some())
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            return None;
        }
        Some(ids[rng.below(ids.len() as u64) as usize].clone())
    }
}

// ---------------------------------------------------------------------------------
// The fleet.

struct Fleet {
    pg: Postgres,
    writer: SocketAddr,
    /// Each replica's name, address, and store (`None` for `P`, in its own process).
    replicas: Vec<(&'static str, SocketAddr, Option<KeyStore>)>,
    http: reqwest::Client,
    /// `P`: this binary again, as `harness_replica_process`, and what it logs.
    p: Child,
    p_logs: Arc<Mutex<Vec<u8>>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.p.kill();
        let _ = self.p.wait();
    }
}

/// Starts `P`: this binary again, as `harness_replica_process`.
async fn spawn_replica(url: &str) -> (Child, SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "harness_replica_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HARNESS_REPLICA_URL", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logs: Arc<Mutex<Vec<u8>>> = Arc::default();
    let mut stderr = child.stderr.take().unwrap();
    let sink = logs.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let stdout = child.stdout.take().unwrap();
    let addr = tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(at) = line.find("REPLICA ") {
                let addr: SocketAddr = line[at + 8..].trim().parse().unwrap();
                // Keep draining so the child never blocks on a full pipe.
                thread::spawn(move || for _ in lines {});
                return addr;
            }
        }
        panic!("the replica process never said where it listens");
    })
    .await
    .unwrap();
    (child, addr, logs)
}

/// `P`'s side: a replica in its own process, until its stdin closes.
#[tokio::test]
async fn harness_replica_process() {
    let Ok(url) = std::env::var("HARNESS_REPLICA_URL") else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter("tower_api_key=debug,info")
        .try_init();
    let store = KeyStore::new();
    let _ = store.add_source(
        PostgresSource::new(&url, NS)
            .unwrap()
            .with_version_check(Duration::from_millis(300))
            .with_max_backoff(Duration::from_millis(300))
            .with_connect_timeout(Duration::from_millis(800)),
    );
    let len = store.clone();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route_layer(ApiKeyLayer::from_store(store.clone()))
        .route(
            "/len",
            get(move || {
                let store = len.clone();
                async move { store.len().to_string() }
            }),
        );
    let addr = common::serve(app).await;
    println!("REPLICA {addr}");
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await;
}

fn source(pg: &Postgres, poll: Duration) -> PostgresSource {
    PostgresSource::new(&pg.url(), NS)
        .unwrap()
        .with_version_check(poll)
        .with_usage_flush(Duration::from_millis(300))
        .with_max_backoff(Duration::from_millis(300))
        .with_connect_timeout(Duration::from_millis(800))
}

async fn serve(store: KeyStore, api: Option<PostgresBackend>) -> SocketAddr {
    let mut app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route_layer(ApiKeyLayer::from_store(store.clone()));
    if let Some(backend) = api {
        app = app.merge(AdminApi::new(store, backend).router());
    }
    common::serve(app).await
}

impl Fleet {
    async fn start() -> Option<Self> {
        let pg = Postgres::start()?;
        let backend = PostgresBackend::new(&pg.url(), NS).unwrap();
        backend.migrate().await.unwrap();
        let seed = pg.dir.path().join("seed.toml");
        std::fs::write(
            &seed,
            format!(
                "[[keys]]\nid = \"root\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n",
                sha256_hex(ROOT)
            ),
        )
        .unwrap();
        backend.import_file(&seed).await.unwrap();
        let mut replicas = Vec::new();
        for (name, poll) in [
            ("W", Duration::from_millis(300)),
            ("B", Duration::from_millis(300)),
            ("C", Duration::from_millis(2500)),
        ] {
            let store = KeyStore::new();
            let mut s = source(&pg, poll);
            if name == "W" {
                s = s.with_snapshot(pg.dir.path().join("w.snapshot.toml"));
            }
            store.add_source(s).unwrap();
            let api = (name == "W").then(|| {
                PostgresBackend::new(&pg.url(), NS)
                    .unwrap()
                    .with_timeout(Duration::from_millis(1500))
            });
            let addr = serve(store.clone(), api).await;
            replicas.push((name, addr, Some(store)));
        }
        let (p, p_addr, p_logs) = spawn_replica(&pg.url()).await;
        replicas.push(("P", p_addr, None));
        Some(Self {
            writer: replicas[0].1,
            pg,
            replicas,
            p,
            p_logs,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let (code, body, _) = self.call_if(method, path, body, None).await;
        (code, body)
    }

    /// A call with `If-Match`; its answer and ETag.
    async fn call_if(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> (u16, Value, Option<String>) {
        let mut req = self
            .http
            .request(method, format!("http://{}{path}", self.writer))
            .header("authorization", format!("Bearer {ROOT}"));
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        if let Some(tag) = if_match {
            req = req.header("if-match", tag);
        }
        let res = req.send().await.expect("the writer's API answers");
        let status = res.status().as_u16();
        let etag = res
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = res.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            etag,
        )
    }

    async fn accepts(&self, addr: SocketAddr, secret: &str) -> bool {
        let res = self
            .http
            .get(format!("http://{addr}/"))
            .header("authorization", format!("Bearer {secret}"))
            .send()
            .await
            .expect("a replica answers");
        res.status().as_u16() == 200
    }

    /// How many keys a replica holds.
    async fn len(&self, addr: SocketAddr, store: Option<&KeyStore>) -> usize {
        if let Some(store) = store {
            return store.len();
        }
        let res = self
            .http
            .get(format!("http://{addr}/len"))
            .send()
            .await
            .expect("P answers");
        res.text().await.unwrap().parse().unwrap()
    }

    /// The readable keys' ids in PostgreSQL, sorted.
    fn stored(&self) -> Vec<String> {
        self.pg.ids(NS)
    }
}

/// What an API answer means for the model.
fn outcome(code: u16, body: &Value, what: &str) -> Status {
    match code {
        200..=299 => Status::Live,
        503 => Status::NotWritten,
        504 => Status::Maybe,
        _ => panic!("{what}: unexpected answer {code} {body}"),
    }
}

// ---------------------------------------------------------------------------------
// Steps.

async fn create(fleet: &Fleet, model: &mut Model) {
    let id = model.id();
    let (code, body) = fleet
        .call(
            reqwest::Method::POST,
            "/v1/api-keys",
            Some(json!({"id": id})),
        )
        .await;
    let status = outcome(code, &body, "create");
    let secret = body["key"].as_str().map(str::to_owned);
    if status == Status::Live {
        assert!(
            secret.is_some(),
            "a create answered {code} without its secret"
        );
    }
    model.set(&id, secret, status);
}

async fn revoke(fleet: &Fleet, model: &mut Model, rng: &mut Rng) {
    let Some(id) = model.pick(rng, Status::Live) else {
        return;
    };
    let (code, body) = fleet
        .call(reqwest::Method::DELETE, &format!("/v1/api-keys/{id}"), None)
        .await;
    match outcome(code, &body, "revoke") {
        Status::Live => model.set(&id, None, Status::Revoked),
        Status::Maybe => model.set(&id, None, Status::Maybe),
        _ => {}
    }
}

async fn patch(fleet: &Fleet, model: &mut Model, rng: &mut Rng) {
    let Some(id) = model.pick(rng, Status::Live) else {
        return;
    };
    let (code, body, etag) = fleet
        .call_if(
            reqwest::Method::GET,
            &format!("/v1/api-keys/{id}"),
            None,
            None,
        )
        .await;
    if code != 200 {
        assert!(code == 503 || code == 504, "get `{id}`: {code} {body}");
        return;
    }
    let (code, body, _) = fleet
        .call_if(
            reqwest::Method::PATCH,
            &format!("/v1/api-keys/{id}"),
            Some(json!({"description": format!("d{}", rng.below(1000))})),
            etag.as_deref(),
        )
        .await;
    // A patch keeps the key live whatever its outcome.
    if code != 412 {
        let _ = outcome(code, &body, "patch");
    }
}

async fn rotate(fleet: &Fleet, model: &mut Model, rng: &mut Rng) {
    let Some(old) = model.pick(rng, Status::Live) else {
        return;
    };
    let id = model.id();
    let (code, body) = fleet
        .call(
            reqwest::Method::POST,
            &format!("/v1/api-keys/{old}/rotate"),
            Some(json!({"id": id, "overlap_seconds": 86_400})),
        )
        .await;
    let status = outcome(code, &body, "rotate");
    model.set(&id, body["key"].as_str().map(str::to_owned), status);
}

/// A rotation without `If-Match` and a revocation of the same key (`disabled: true`,
/// conditional on the key as read just before), sent at once. A revocation answered
/// 2xx is never undone by the rotation's write of the old key (shortened): every
/// replica refuses the key within the bound. The key is then deleted, for the
/// model's sake.
async fn race(fleet: &Fleet, model: &mut Model, rng: &mut Rng) {
    let Some(old) = model.pick(rng, Status::Live) else {
        return;
    };
    let path = format!("/v1/api-keys/{old}");
    let (code, body, etag) = fleet.call_if(reqwest::Method::GET, &path, None, None).await;
    if code != 200 {
        assert!(code == 503 || code == 504, "get `{old}`: {code} {body}");
        return;
    }
    let id = model.id();
    let rotate_path = format!("{path}/rotate");
    let ((r_code, r_body), (p_code, p_body, _)) = tokio::join!(
        fleet.call(
            reqwest::Method::POST,
            &rotate_path,
            Some(json!({"id": id, "overlap_seconds": 86_400})),
        ),
        fleet.call_if(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"disabled": true})),
            etag.as_deref(),
        ),
    );
    let status = outcome(r_code, &r_body, "rotate (racing a revocation)");
    model.set(&id, r_body["key"].as_str().map(str::to_owned), status);
    println!("  rotate {r_code}, revoke {p_code}");
    let disabled = match p_code {
        // The rotation got in first.
        412 => return,
        _ => outcome(p_code, &p_body, "revoke (racing a rotation)"),
    };
    match disabled {
        Status::NotWritten => return,
        Status::Live => {
            let secret = model.keys[&old].secret.clone().unwrap();
            for (name, addr, _) in &fleet.replicas {
                let start = Instant::now();
                while fleet.accepts(*addr, &secret).await {
                    assert!(
                        start.elapsed() < BOUND,
                        "{name} still lets `{old}` in {BOUND:?} after its revocation answered \
                         {p_code} while a rotation raced it: the rotation undid it"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        _ => {}
    }
    // Revoked for good (also when the revocation's outcome is unknown).
    let (code, body) = fleet.call(reqwest::Method::DELETE, &path, None).await;
    match outcome(code, &body, "revoke after a racing rotation") {
        Status::Live => model.set(&old, None, Status::Revoked),
        Status::Maybe => model.set(&old, None, Status::Maybe),
        _ => panic!("revoke of `{old}` with PostgreSQL up: {code} {body}"),
    }
}

async fn import(fleet: &Fleet, model: &mut Model, rng: &mut Rng) {
    let mut text = String::new();
    let mut made = Vec::new();
    for _ in 0..1 + rng.below(20) {
        let id = model.id();
        let secret = format!("imp-{:016x}", rng.next());
        text.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n\n"
        ));
        made.push((id, secret));
    }
    let path = fleet.pg.dir.path().join("import.toml");
    std::fs::write(&path, text).unwrap();
    let written = PostgresBackend::new(&fleet.pg.url(), NS)
        .unwrap()
        .import_file(&path)
        .await;
    for (id, secret) in made {
        let status = if written.is_ok() {
            Status::Live
        } else {
            Status::Maybe
        };
        model.set(&id, Some(secret), status);
    }
}

/// A change made by another writer, committed without its `NOTIFY`: only the poll
/// or a reconnection brings it.
fn silent_create(fleet: &Fleet, model: &mut Model, rng: &mut Rng) {
    let id = model.id();
    let secret = format!("silent-{:016x}", rng.next());
    let record = format!(r#"{{"id": "{id}", "sha256": "{}"}}"#, sha256_hex(&secret));
    fleet.pg.raw_change(NS, &id, Some(&record), true, false);
    model.set(&id, Some(secret), Status::Live);
}

/// A live key's record made unreadable (a secret in place of its digest).
fn corrupt(fleet: &Fleet, model: &mut Model, rng: &mut Rng) {
    let Some(id) = model.pick(rng, Status::Live) else {
        return;
    };
    let record = format!(r#"{{"id": "{id}", "secret": "not-a-digest"}}"#);
    fleet.pg.raw_change(NS, &id, Some(&record), true, true);
    model.set(&id, None, Status::Corrupt);
}

/// Another program holds the namespace's row for a while; API calls meanwhile.
async fn long_lock(fleet: &Fleet, model: &mut Model, rng: &mut Rng) {
    let hold = 1 + rng.below(3);
    let holder: Child = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &fleet.pg.port.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-X", "-q", "-c"])
        .arg(format!(
            "BEGIN; SELECT 1 FROM tak_namespaces WHERE namespace = '{NS}' FOR UPDATE; \
             SELECT pg_sleep({hold}); COMMIT;"
        ))
        .env("PGPASSWORD", PASSWORD)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    create(fleet, model).await;
    revoke(fleet, model, rng).await;
    let _ = tokio::task::spawn_blocking(move || {
        let mut holder = holder;
        holder.wait()
    })
    .await;
}

/// PostgreSQL stopped: every replica serves its last good set; the API writes
/// nothing and says so.
async fn outage(fleet: &mut Fleet, model: &mut Model) {
    fleet.pg.stop();
    for (id, key) in &model.keys {
        let Some(secret) = &key.secret else { continue };
        for (name, addr, _) in &fleet.replicas {
            let ok = fleet.accepts(*addr, secret).await;
            match key.status {
                Status::Live => assert!(ok, "{name} refused live `{id}` while PostgreSQL was down"),
                Status::Revoked if key.confirmed => {
                    assert!(
                        !ok,
                        "{name} accepted revoked `{id}` while PostgreSQL was down"
                    );
                }
                Status::Corrupt => assert!(!ok, "{name} accepted corrupt `{id}`"),
                _ => {}
            }
        }
    }
    let id = model.id();
    let (code, body) = fleet
        .call(
            reqwest::Method::POST,
            "/v1/api-keys",
            Some(json!({"id": id})),
        )
        .await;
    assert_eq!(code, 503, "a write while PostgreSQL is down: {body}");
    model.set(&id, None, Status::NotWritten);
    fleet.pg.run();
}

// ---------------------------------------------------------------------------------
// Checks.

/// Invariants 1 and 2: every live key accepted by every replica, every revoked or
/// corrupt key refused, within the bound.
async fn converge(fleet: &Fleet, model: &mut Model, seed: u64, step: usize) {
    for (id, key) in model.keys.iter_mut() {
        let Some(secret) = &key.secret else { continue };
        let want = match key.status {
            Status::Live => true,
            Status::Revoked | Status::Corrupt => false,
            _ => continue,
        };
        for (name, addr, _) in &fleet.replicas {
            let start = Instant::now();
            loop {
                let ok = fleet.accepts(*addr, secret).await;
                if ok == want {
                    break;
                }
                assert!(
                    !(key.confirmed && ok),
                    "seed {seed} step {step}: {name} accepted `{id}` again after its revocation"
                );
                assert!(
                    start.elapsed() < BOUND,
                    "seed {seed} step {step}: {name} did not {} `{id}` ({:?}) within {BOUND:?}",
                    if want { "accept" } else { "refuse" },
                    key.status
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if key.status == Status::Revoked {
            key.confirmed = true;
        }
    }
}

/// Invariants 4 and 5, at rest: what PostgreSQL holds is what the model says, and
/// every replica holds exactly its readable keys.
async fn at_rest(fleet: &Fleet, model: &mut Model, seed: u64) {
    let stored = fleet.stored();
    for (id, key) in &model.keys {
        let there = stored.contains(id);
        match key.status {
            Status::Live | Status::Corrupt => {
                assert!(
                    there,
                    "seed {seed}: `{id}` answered as kept is not in PostgreSQL"
                );
            }
            Status::Revoked | Status::NotWritten => {
                assert!(
                    !there,
                    "seed {seed}: `{id}` ({:?}) is in PostgreSQL",
                    key.status
                );
            }
            Status::Maybe => {}
        }
    }
    let corrupt = model
        .keys
        .values()
        .filter(|k| k.status == Status::Corrupt)
        .count();
    let readable = stored.len() + 1 - corrupt - 1;
    for (name, addr, store) in &fleet.replicas {
        let start = Instant::now();
        loop {
            let len = fleet.len(*addr, store.as_ref()).await;
            if len == readable {
                break;
            }
            assert!(
                start.elapsed() < BOUND,
                "seed {seed}: {name} holds {len} keys where PostgreSQL has {readable} readable"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Invariant 6: no secret, and not the password, in any log line.
fn no_secret_logged(fleet: &Fleet, model: &Model, seed: u64) {
    let mut text = String::from_utf8_lossy(&log().0.lock().unwrap()).into_owned();
    text.push_str(&String::from_utf8_lossy(&fleet.p_logs.lock().unwrap()));
    for secret in model
        .secrets
        .iter()
        .chain([&ROOT.to_owned(), &PASSWORD.to_owned()])
    {
        assert!(
            !text.contains(secret.as_str()),
            "seed {seed}: a secret is in the log"
        );
    }
}

async fn run_seed(seed: u64) -> bool {
    let _replay = Replay(seed);
    let Some(mut fleet) = Fleet::start().await else {
        return false;
    };
    let mut rng = Rng(seed);
    let mut model = Model::default();
    for step in 0..STEPS {
        let roll = rng.below(100);
        let what = match roll {
            0..=29 => "create",
            30..=44 => "revoke",
            45..=51 => "patch",
            52..=54 => "rotate",
            55..=58 => "rotate racing a revocation",
            59..=62 => "import",
            63..=67 => "outage",
            68..=72 => "terminate listeners",
            73..=77 => "terminate all, create",
            78..=83 => "long lock",
            84..=88 => "create, truncate changes",
            89..=94 => "silent create",
            _ => "corrupt",
        };
        println!("seed {seed} step {step}: {what}");
        match roll {
            0..=29 => create(&fleet, &mut model).await,
            30..=44 => revoke(&fleet, &mut model, &mut rng).await,
            45..=51 => patch(&fleet, &mut model, &mut rng).await,
            52..=54 => rotate(&fleet, &mut model, &mut rng).await,
            55..=58 => race(&fleet, &mut model, &mut rng).await,
            59..=62 => import(&fleet, &mut model, &mut rng).await,
            63..=67 => outage(&mut fleet, &mut model).await,
            68..=72 => {
                fleet.pg.terminate_listeners();
            }
            73..=77 => {
                fleet.pg.terminate_connections();
                create(&fleet, &mut model).await;
            }
            78..=83 => long_lock(&fleet, &mut model, &mut rng).await,
            84..=88 => {
                create(&fleet, &mut model).await;
                fleet.pg.psql("TRUNCATE tak_changes");
            }
            89..=94 => silent_create(&fleet, &mut model, &mut rng),
            _ => corrupt(&fleet, &mut model, &mut rng),
        }
        converge(&fleet, &mut model, seed, step).await;
    }
    at_rest(&fleet, &mut model, seed).await;
    no_secret_logged(&fleet, &model, seed);
    let _ = writeln!(
        std::io::stdout(),
        "seed {seed}: {} keys, ok",
        model.keys.len()
    );
    true
}

#[test]
fn harness_postgres() {
    log();
    let (seeds, until) = plan();
    let mut ran = 0;
    for seed in seeds {
        if until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        if !runtime.block_on(run_seed(seed)) {
            return;
        }
        ran += 1;
    }
    println!("harness_postgres: {ran} seeds, no failure");
}
