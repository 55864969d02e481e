//! Helpers shared by the Redis tests: a real `redis-server` of the test's own on a
//! free loopback port, replicas (a store following a namespace, served on 127.0.0.1,
//! with or without the key-management API), and raw access to what is stored.
//!
//! Where `redis-server` is missing the tests print `skipped: redis-server not found
//! (apt-get install redis-server)` and pass, except under CI (`CI=true`), where a
//! missing server fails them.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use axum::{Router, routing::get};
use serde_json::Value;
use tower_api_key::{
    ApiKeyLayer, KeyStore,
    admin::AdminApi,
    redis::{RedisBackend, RedisSource},
};

use super::common;

/// A `redis-server` of this test's own, on a free port of 127.0.0.1, in a temp dir.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// The password the server asks for (`--requirepass`), in [`url`](Self::url).
    password: Option<String>,
}

impl Redis {
    /// Starts one, persisting every write (AOF, fsync always), or says why not
    /// (`None`: skip the test).
    pub fn start() -> Option<Self> {
        Self::start_as(None)
    }

    /// Starts one that asks for `password` (`--requirepass`; [`url`](Self::url)
    /// gives it), or says why not.
    pub fn start_with_password(password: &str) -> Option<Self> {
        Self::start_as(Some(password.to_owned()))
    }

    fn start_as(password: Option<String>) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("CI").is_err(),
                "redis-server not found under CI: .ci/run installs it"
            );
            println!("skipped: redis-server not found (apt-get install redis-server)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            password,
        };
        redis.run();
        Some(redis)
    }

    /// Runs the server (again), persisting to its directory so a restart keeps data.
    pub fn run(&mut self) {
        self.run_with(&[]);
    }

    /// Runs the server (again) with extra arguments, persisting to its directory.
    pub fn run_with(&mut self, extra: &[&str]) {
        self.spawn(extra, true);
    }

    /// Runs the server (again) without persistence, its directory's files removed: it
    /// starts empty, as a Redis restarted without persistence does.
    pub fn run_empty(&mut self) {
        for entry in fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("appendonly") || name.ends_with(".rdb") {
                if path.is_dir() {
                    fs::remove_dir_all(&path).unwrap();
                } else {
                    fs::remove_file(&path).unwrap();
                }
            }
        }
        self.spawn(&[], false);
    }

    fn spawn(&mut self, extra: &[&str], persist: bool) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(extra)
            .args(["--save", ""]);
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        // `DEBUG` (the tests' `DEBUG SLEEP`) is off by default from Redis 7 on, and
        // the option unknown before.
        if major_version() >= 7 {
            cmd.args(["--enable-debug-command", "local"]);
        }
        if persist {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        // Ready when it answers a PING, or asks for the password first.
        while !matches!(self.cli(&["PING"]).as_str(), "PONG" | "NOAUTH") {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// A command through a fresh connection; its reply as text ("" on failure).
    pub fn cli(&self, args: &[&str]) -> String {
        match self.query(args) {
            Ok(redis::Value::SimpleString(s)) => s,
            Ok(redis::Value::Okay) => "OK".into(),
            Ok(redis::Value::Int(n)) => n.to_string(),
            Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            Ok(redis::Value::Nil) => String::new(),
            Ok(other) => format!("{other:?}"),
            Err(e) if e.code() == Some("NOAUTH") => "NOAUTH".into(),
            Err(_) => String::new(),
        }
    }

    /// A command through a fresh connection, its reply.
    pub fn query(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut con = client.get_connection_with_timeout(Duration::from_millis(500))?;
        con.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query::<redis::Value>(&mut con)
    }

    /// How many times the server has run `command` (from `INFO commandstats`).
    pub fn calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// The namespace's current epoch ("" if none, or if the model has none).
    pub fn epoch(&self, ns: &str) -> String {
        self.cli(&["HGET", &format!("tak:{{{ns}}}:version"), "epoch"])
    }

    /// The namespace's current version (0 if none).
    pub fn version(&self, ns: &str) -> u64 {
        let key = format!("tak:{{{ns}}}:version");
        let v = self.cli(&["HGET", &key, "version"]);
        let v = if v.is_empty() {
            self.cli(&["GET", &key])
        } else {
            v
        };
        v.parse().unwrap_or(0)
    }

    /// Appends one raw entry to the namespace's log, fields as given.
    pub fn xadd(&self, ns: &str, fields: &[(&str, &str)]) -> String {
        let log = format!("tak:{{{ns}}}:log");
        let mut args = vec!["XADD", log.as_str(), "*"];
        for (k, v) in fields {
            args.push(k);
            args.push(v);
        }
        self.cli(&args)
    }

    /// The version (`v`) of the last log entry of each id, in a Redis namespace.
    pub fn last_versions(&self, ns: &str) -> std::collections::HashMap<String, String> {
        let mut last = std::collections::HashMap::new();
        let log = format!("tak:{{{ns}}}:log");
        let Ok(redis::Value::Array(entries)) = self.query(&["XRANGE", &log, "-", "+"]) else {
            panic!("no log");
        };
        let text = |v: &redis::Value| match v {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        };
        for entry in entries {
            let redis::Value::Array(parts) = entry else {
                continue;
            };
            let Some(redis::Value::Array(fields)) = parts.get(1) else {
                continue;
            };
            let pairs: std::collections::HashMap<String, String> = fields
                .chunks(2)
                .map(|p| (text(&p[0]), text(&p[1])))
                .collect();
            if let (Some(id), Some(v)) = (pairs.get("id"), pairs.get("v")) {
                last.insert(id.clone(), v.clone());
            }
        }
        last
    }

    /// The ids in the namespace's hash.
    pub fn ids(&self, ns: &str) -> Vec<String> {
        match self.query(&["HKEYS", &format!("tak:{{{ns}}}:keys")]) {
            Ok(redis::Value::Array(items)) => {
                let mut ids: Vec<String> = items
                    .into_iter()
                    .filter_map(|v| match v {
                        redis::Value::BulkString(b) => String::from_utf8(b).ok(),
                        _ => None,
                    })
                    .collect();
                ids.sort();
                ids
            }
            _ => Vec::new(),
        }
    }
}

/// The major version of the installed `redis-server` (0 if unknown).
fn major_version() -> u32 {
    static VERSION: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        let out = Command::new("redis-server")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.split_whitespace()
            .find_map(|w| w.strip_prefix("v="))
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    })
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A key file holding `root` (admin) and `reader`.
pub const SEED: &str = "[[keys]]\nid = \"root\"\nsecret = \"root-secret\"\nscopes = [\"admin\", \"read\"]\n\n\
                        [[keys]]\nid = \"reader\"\nsecret = \"reader-secret\"\nscopes = [\"read\"]\n";

/// Seeds namespace `ns` from a key file holding `root` (admin) and `reader`.
pub async fn seed(redis: &Redis, ns: &str) -> PathBuf {
    let path = redis.dir.path().join(format!("{ns}-seed.toml"));
    fs::write(&path, SEED).unwrap();
    let backend = RedisBackend::new(&redis.url(), ns).unwrap();
    assert_eq!(backend.import_file(&path).await.unwrap(), 2);
    path
}

/// A source with short intervals, for tests.
pub fn source(redis: &Redis, ns: &str) -> RedisSource {
    RedisSource::new(&redis.url(), ns)
        .unwrap()
        .with_version_check(Duration::from_millis(200))
        .with_usage_flush(Duration::from_millis(100))
        .with_max_backoff(Duration::from_millis(500))
        .with_connect_timeout(Duration::from_millis(500))
}

pub struct Replica {
    pub addr: SocketAddr,
    pub store: KeyStore,
}

/// A replica: its own store following `ns`, its own server; with the admin API when
/// `admin`.
pub async fn replica(redis: &Redis, ns: &str, admin: bool) -> Replica {
    let store = KeyStore::new();
    let _ = store.add_source(source(redis, ns));
    replica_of(redis, ns, store, admin).await
}

/// Serves `store` (already fed) as a replica of `ns`.
pub async fn replica_of(redis: &Redis, ns: &str, store: KeyStore, admin: bool) -> Replica {
    let mut app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route_layer(ApiKeyLayer::from_store(store.clone()));
    if admin {
        let backend = RedisBackend::new(&redis.url(), ns).unwrap();
        app = app.merge(AdminApi::new(store.clone(), backend).router());
    }
    Replica {
        addr: common::serve(app).await,
        store,
    }
}

/// Serves `/` guarded by `store`, as a replica without the admin API.
pub async fn serve_store(store: KeyStore) -> SocketAddr {
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route_layer(ApiKeyLayer::from_store(store));
    common::serve(app).await
}

/// Writes `content` as a key file and imports it into namespace `ns`.
pub async fn import(redis: &Redis, ns: &str, content: &str) {
    let path = redis.dir.path().join(format!("{ns}-import.toml"));
    fs::write(&path, content).unwrap();
    RedisBackend::new(&redis.url(), ns)
        .unwrap()
        .import_file(&path)
        .await
        .unwrap();
}

/// A key file of `n` keys `{prefix}-{i}` with secrets `{prefix}-{i}-secret`.
pub fn keys_file(prefix: &str, n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        out.push_str(&format!(
            "[[keys]]\nid = \"{prefix}-{i}\"\nsecret = \"{prefix}-{i}-secret\"\n\n"
        ));
    }
    out
}

pub async fn status(addr: SocketAddr, key: &str) -> u16 {
    common::get_with(addr, "/", Some(key)).await.0
}

/// Waits (bounded) until `key` gets `want` at `addr`; returns how long it took.
pub async fn until(addr: SocketAddr, key: &str, want: u16, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if status(addr, key).await == want {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{addr}: `{key}` never got {want}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (bounded) until `done` holds.
pub async fn eventually(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A key-management API call as `root`.
pub async fn api(
    addr: SocketAddr,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    api_as(addr, "root-secret", method, path, body).await
}

/// A key-management API call presenting `key`.
pub async fn api_as(
    addr: SocketAddr,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = common::client()
        .request(method, format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {key}"));
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The problem type of an API answer (`store-missing`, ...), or "".
pub fn problem(body: &Value) -> &str {
    body["type"]
        .as_str()
        .and_then(|t| t.strip_prefix("urn:tower-api-key:problem:"))
        .unwrap_or("")
}

/// The SHA-256 of `secret`, in hex.
pub fn sha256_hex(secret: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `text` holds a run of `n` hexadecimal digits (a script hash, a digest).
pub fn has_hex_run(text: &str, n: usize) -> bool {
    let mut run = 0;
    for c in text.chars() {
        if c.is_ascii_hexdigit() {
            run += 1;
            if run >= n {
                return true;
            }
        } else {
            run = 0;
        }
    }
    false
}
