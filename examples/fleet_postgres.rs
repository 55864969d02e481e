//! A replica of a fleet on PostgreSQL: follows namespace `example`, serves a guarded
//! route and the key-management API, and keeps a snapshot of its last keys. Run
//! several, on different ports, against one database: a key created through one is
//! enforced by all within milliseconds.
//!
//! ```text
//! # The fleet's first start, once: create the tables and seed the namespace (sample
//! # admin key `ops-admin`, secret `ops-admin-key`). Ignored when it exists.
//! DATABASE_URL=postgres://keys:pw@127.0.0.1:5432/app SEED=examples/keys.toml PORT=3002 \
//!     cargo run --example fleet_postgres --features postgres
//! # More replicas: they only follow.
//! DATABASE_URL=... PORT=3003 cargo run --example fleet_postgres --features postgres
//! # The namespace was lost: put the last keys a replica kept back.
//! DATABASE_URL=... RESTORE=/tmp/tower-api-key-fleet-pg-3002.toml PORT=3002 \
//!     cargo run --example fleet_postgres --features postgres
//! ```
//!
//! `DATABASE_URL` defaults to `postgres://postgres@127.0.0.1:5432/postgres`; add
//! `?sslmode=require` (or `verify-full`, with `sslrootcert=<ca.pem>`) for TLS. The
//! URL is never printed. `SNAPSHOT` defaults to a file per port in the temp
//! directory. Restarting a replica never writes the sample keys again.

use std::{error::Error, net::SocketAddr, path::PathBuf, time::Duration};

use axum::{Router, routing::get};
use tower_api_key::{
    ApiKeyLayer, KeyStore,
    admin::AdminApi,
    postgres::{PostgresBackend, PostgresSource},
};

/// The namespace the example's replicas share.
const NAMESPACE: &str = "example";

/// How one replica starts.
pub(crate) struct Config {
    pub(crate) url: String,
    pub(crate) port: u16,
    /// A key file to create the namespace from, if it does not exist.
    pub(crate) seed: Option<PathBuf>,
    /// A key file (a replica's snapshot, an export) to replace the namespace with.
    pub(crate) restore: Option<PathBuf>,
    /// Where this replica keeps its last keys: one file per replica.
    pub(crate) snapshot: PathBuf,
}

impl Config {
    fn from_env() -> Result<Self, String> {
        let port = match std::env::var("PORT") {
            Ok(port) => port
                .parse()
                .map_err(|_| format!("PORT={port} is not a port number"))?,
            Err(_) => 3002,
        };
        let path = |var: &str| std::env::var_os(var).map(PathBuf::from);
        Ok(Self {
            url: std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
            port,
            seed: path("SEED"),
            restore: path("RESTORE"),
            snapshot: path("SNAPSHOT").unwrap_or_else(|| default_snapshot(port)),
        })
    }
}

/// The default snapshot of the replica on `port`: replicas on one machine never share
/// one.
pub(crate) fn default_snapshot(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("tower-api-key-fleet-pg-{port}.toml"))
}

/// Prepares the schema and the namespace as asked (restore, or a first seed), then
/// the replica: its store following the namespace, and its app (a guarded `/` and
/// the API).
pub(crate) async fn replica(config: &Config) -> Result<(Router, KeyStore), Box<dyn Error>> {
    let backend = PostgresBackend::new(&config.url, NAMESPACE)?;
    if config.seed.is_some() || config.restore.is_some() {
        // Idempotent; creates tables, never a namespace.
        backend.migrate().await?;
    }
    if let Some(path) = &config.restore {
        let n = backend.restore_file(path).await?;
        println!(
            "restored namespace `{NAMESPACE}` from {} ({n} keys)",
            path.display()
        );
    } else if !backend.exists().await? {
        match &config.seed {
            Some(path) => {
                let n = backend.import_file(path).await?;
                println!(
                    "created namespace `{NAMESPACE}` from {} ({n} keys)",
                    path.display()
                );
            }
            None => println!(
                "namespace `{NAMESPACE}` does not exist in PostgreSQL: every key is refused \
                 until it is created (SEED=examples/keys.toml on the fleet's first start) or \
                 restored (RESTORE=<a replica's snapshot>)"
            ),
        }
    } else if config.seed.is_some() {
        println!("namespace `{NAMESPACE}` exists: SEED ignored (it is for the first start)");
    }

    let store = KeyStore::new();
    let source = PostgresSource::new(&config.url, NAMESPACE)?
        .with_usage_flush(Duration::from_secs(2))
        .with_snapshot(&config.snapshot);
    if let Err(e) = store.add_source(source) {
        println!("no keys from PostgreSQL yet, still trying: {e}");
    }
    println!(
        "snapshot of this replica's keys: {}",
        config.snapshot.display()
    );
    let app = Router::new()
        .route("/", get(|| async { "hello from the fleet\n" }))
        .route_layer(ApiKeyLayer::from_store(store.clone()))
        .merge(AdminApi::new(store.clone(), backend).router());
    Ok((app, store))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_api_key=info".into()),
        )
        .init();
    let config = Config::from_env()?;
    let (app, _store) = replica(&config).await?;
    let addr = SocketAddr::from(([127, 0, 0, 1], config.port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e} (set PORT to use another port)"))?;
    println!("listening on http://{addr}; create a key on any replica:");
    println!(
        "curl -s -X POST http://{addr}/v1/api-keys -H 'authorization: Bearer ops-admin-key' -H 'content-type: application/json' -d '{{\"id\": \"billing\"}}'"
    );
    axum::serve(listener, app).await?;
    Ok(())
}
