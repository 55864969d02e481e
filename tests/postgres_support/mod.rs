//! Helpers shared by the PostgreSQL tests: a PostgreSQL cluster of the test's own
//! (made with `initdb` in a temp dir, password authentication, on a free loopback
//! port, run as `nobody` when the tests run as root), replicas (a store following a
//! namespace, served on 127.0.0.1, with or without the key-management API), and raw
//! SQL through `psql`.
//!
//! Where PostgreSQL's binaries are missing the tests print `skipped: PostgreSQL not
//! found (apt-get install postgresql)` and pass, except under CI (`CI=true`), where
//! they fail.
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
    postgres::{PostgresBackend, PostgresSource},
};

use super::common;

/// The password of the cluster's `postgres` user: tests check it is never printed.
pub const PASSWORD: &str = "pg-pass-7f3a9c";

/// A PostgreSQL cluster of this test's own.
pub struct Postgres {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    /// Run the server as `nobody` (the tests run as root).
    as_nobody: bool,
}

/// Where PostgreSQL's server binaries are (the newest major version installed).
fn bindir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    bin.join("initdb").exists().then_some(bin)
}

impl Postgres {
    /// Makes a cluster and starts it, or says why not (`None`: skip the test).
    pub fn start() -> Option<Self> {
        let Some(bin) = bindir() else {
            assert!(
                std::env::var("CI").is_err(),
                "PostgreSQL not found under CI: .ci/run installs it"
            );
            println!("skipped: PostgreSQL not found (apt-get install postgresql)");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let as_nobody = unsafe_free_is_root();
        let pwfile = dir.path().join("pw");
        fs::write(&pwfile, PASSWORD).unwrap();
        if as_nobody {
            chown_nobody(dir.path());
        }
        let pg = Self {
            child: None,
            port,
            dir,
            bin,
            as_nobody,
        };
        let data = pg.data();
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = pg;
        pg.run();
        Some(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command of PostgreSQL's, run as `nobody` when we are root.
    fn command(&self, name: &str) -> Command {
        let exe = self.bin.join(name);
        if self.as_nobody {
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
                .arg(exe);
            cmd
        } else {
            Command::new(exe)
        }
    }

    /// Runs the server (again) on its port.
    pub fn run(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .args(["-c", "shared_buffers=64MB"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while self.psql("SELECT 1") != "1" {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                start.elapsed() < Duration::from_secs(60) && exited.is_none(),
                "postgres did not start ({exited:?}): {}",
                fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Turns TLS on with a certificate for 127.0.0.1 signed by a CA of the test's own
    /// (made with `openssl`), and restarts the server; the CA's file, or `None` if
    /// `openssl` is missing.
    pub fn enable_tls(&mut self) -> Option<PathBuf> {
        let dir = self.dir.path().to_path_buf();
        let dir = dir.as_path();
        let run = |args: &[&str]| {
            Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let made = run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]) && run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]) && {
            fs::write(
                dir.join("ext.cnf"),
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
            )
            .unwrap();
            run(&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                "server.pem",
                "-extfile",
                "ext.cnf",
            ])
        };
        if !made {
            return None;
        }
        let data = self.data();
        fs::copy(dir.join("server.pem"), data.join("server.crt")).unwrap();
        fs::copy(dir.join("server.key"), data.join("server.key")).unwrap();
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut conf, b"\nssl = on\n").unwrap();
        if self.as_nobody {
            chown_nobody(&data);
        }
        Command::new("chmod")
            .arg("600")
            .arg(data.join("server.key"))
            .status()
            .unwrap();
        self.stop();
        self.run();
        Some(dir.join("ca.pem"))
    }

    /// Stops the server (fast shutdown: clients are disconnected, nothing is lost).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The URL the crate is given (password included).
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Runs SQL through `psql` (unaligned, tuples only); its output trimmed, or ""
    /// on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_default()
    }

    /// Runs SQL through `psql`: its output, or its error.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-X", "-A", "-t", "-q"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "2")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The namespace's version (0 if none).
    pub fn version(&self, ns: &str) -> i64 {
        self.psql(&format!(
            "SELECT version FROM tak_namespaces WHERE namespace = '{ns}'"
        ))
        .parse()
        .unwrap_or(0)
    }

    /// The ids of the namespace's records, sorted.
    pub fn ids(&self, ns: &str) -> Vec<String> {
        let out = self.psql(&format!(
            "SELECT id FROM tak_keys WHERE namespace = '{ns}' ORDER BY id"
        ));
        out.lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Ends every connection of the crate's (by its `application_name`).
    pub fn terminate_connections(&self) -> usize {
        self.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name LIKE 'tower-api-key%'",
        )
        .parse()
        .unwrap_or(0)
    }

    /// Ends the replicas' listening connections, leaving the API's.
    pub fn terminate_listeners(&self) -> usize {
        self.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'tower-api-key-replica'",
        )
        .parse()
        .unwrap_or(0)
    }

    /// A change made by hand, as a writer of another program would: `record` put
    /// (JSON) or, if `None`, the key removed; the version bumped; a change row
    /// written unless `log` is false; a `NOTIFY` unless `notify` is false.
    pub fn raw_change(&self, ns: &str, id: &str, record: Option<&str>, log: bool, notify: bool) {
        let mut sql = String::from("BEGIN;");
        match record {
            Some(r) => sql.push_str(&format!(
                "UPDATE tak_namespaces SET version = version + 1, keys = keys + \
                 (SELECT CASE WHEN EXISTS (SELECT 1 FROM tak_keys WHERE namespace = '{ns}' \
                 AND id = '{id}') THEN 0 ELSE 1 END) WHERE namespace = '{ns}';\
                 INSERT INTO tak_keys VALUES ('{ns}', '{id}', '{r}') ON CONFLICT (namespace, id) \
                 DO UPDATE SET record = EXCLUDED.record;"
            )),
            None => sql.push_str(&format!(
                "UPDATE tak_namespaces SET version = version + 1, keys = keys - \
                 (SELECT count(*) FROM tak_keys WHERE namespace = '{ns}' AND id = '{id}') \
                 WHERE namespace = '{ns}';\
                 DELETE FROM tak_keys WHERE namespace = '{ns}' AND id = '{id}';"
            )),
        }
        if log {
            let (op, r) = match record {
                Some(r) => ("put", format!("'{r}'::jsonb")),
                None => ("del", "NULL".to_owned()),
            };
            sql.push_str(&format!(
                "INSERT INTO tak_changes SELECT namespace, version, 0, 1, epoch, '{op}', '{id}', {r} \
                 FROM tak_namespaces WHERE namespace = '{ns}';"
            ));
        }
        if notify {
            sql.push_str(&format!("NOTIFY tak_changes, '{ns}';"));
        }
        sql.push_str("COMMIT;");
        self.try_psql(&sql).unwrap();
    }
}

/// Whether this process runs as root (then the server runs as `nobody`).
fn unsafe_free_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chown_nobody(path: &std::path::Path) {
    let status = Command::new("chown")
        .args(["-R", "nobody:nogroup"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "chown failed");
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A key file holding `root` (admin) and `reader`.
pub const SEED: &str = "[[keys]]\nid = \"root\"\nsecret = \"root-secret\"\nscopes = [\"admin\", \"read\"]\n\n\
                        [[keys]]\nid = \"reader\"\nsecret = \"reader-secret\"\nscopes = [\"read\"]\n";

/// Migrates the schema and seeds namespace `ns` with `root` (admin) and `reader`.
pub async fn seed(pg: &Postgres, ns: &str) -> PathBuf {
    let path = pg.dir.path().join(format!("{ns}-seed.toml"));
    fs::write(&path, SEED).unwrap();
    let backend = PostgresBackend::new(&pg.url(), ns).unwrap();
    backend.migrate().await.unwrap();
    assert_eq!(backend.import_file(&path).await.unwrap(), 2);
    path
}

/// A source with short intervals, for tests.
pub fn source(pg: &Postgres, ns: &str) -> PostgresSource {
    PostgresSource::new(&pg.url(), ns)
        .unwrap()
        .with_version_check(Duration::from_millis(300))
        .with_usage_flush(Duration::from_millis(100))
        .with_max_backoff(Duration::from_millis(500))
        .with_connect_timeout(Duration::from_millis(1000))
}

pub struct Replica {
    pub addr: SocketAddr,
    pub store: KeyStore,
}

/// A replica: its own store following `ns`, its own server; with the admin API when
/// `admin`.
pub async fn replica(pg: &Postgres, ns: &str, admin: bool) -> Replica {
    let store = KeyStore::new();
    let _ = store.add_source(source(pg, ns));
    replica_of(pg, ns, store, admin).await
}

/// Serves `store` (already fed) as a replica of `ns`.
pub async fn replica_of(pg: &Postgres, ns: &str, store: KeyStore, admin: bool) -> Replica {
    let mut app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route_layer(ApiKeyLayer::from_store(store.clone()));
    if admin {
        let backend = PostgresBackend::new(&pg.url(), ns).unwrap();
        app = app.merge(AdminApi::new(store.clone(), backend).router());
    }
    Replica {
        addr: common::serve(app).await,
        store,
    }
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
    let mut req = common::client()
        .request(method, format!("http://{addr}{path}"))
        .header("authorization", "Bearer root-secret");
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
