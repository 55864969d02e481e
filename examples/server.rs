//! An axum server on 127.0.0.1 (port 3000, or `PORT`) whose API keys live in a TOML
//! file that is reloaded while it runs. `/` accepts any valid key; `/admin` and
//! `/admin/usage` require the `admin` scope. Start it with `cargo run --example server`,
//! then follow the curl commands it prints: a key working, a second key added, the
//! first one revoked.
//!
//! It works on a copy of `examples/keys.toml` in a temporary directory, so the
//! checkout stays as it was and every run starts from the same keys; pass a path as
//! the first argument to use your own file instead. A break-glass key can be given in
//! `BREAK_GLASS_KEY` (`id=secret`); it is normally unset.

use std::{error::Error, fmt::Write as _, net::SocketAddr, path::PathBuf};

use axum::{Extension, Json, Router, routing::get};
use tower_api_key::{ApiKeyLayer, EnvSource, FileSource, KeyInfo, KeyStore, KeyUsage};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_api_key=debug".into()),
        )
        .init();

    let path = match std::env::args().nth(1) {
        Some(path) => PathBuf::from(path),
        None => {
            let dir =
                std::env::temp_dir().join(format!("tower-api-key-example-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let copy = dir.join("keys.toml");
            std::fs::copy(
                concat!(env!("CARGO_MANIFEST_DIR"), "/examples/keys.toml"),
                &copy,
            )?;
            copy
        }
    };
    // Refuse to start without a valid key file; once running, a bad edit is refused
    // and the last good keys stay.
    let store = KeyStore::new();
    store.add_source(FileSource::new(&path))?;
    // The break-glass key: absent unless the variable is set.
    store.add_source(EnvSource::optional("BREAK_GLASS_KEY"))?;
    let keys = ApiKeyLayer::from_store(store.clone());

    let app = Router::new()
        .route("/", get(hello))
        .route_layer(keys.clone())
        .merge(
            Router::new()
                .route("/admin", get(admin))
                .route("/admin/usage", get(usage))
                .route_layer(keys.require_scope("admin"))
                .layer(Extension(store)),
        );

    let port = match std::env::var("PORT") {
        Ok(port) => port
            .parse()
            .map_err(|_| format!("PORT={port} is not a port number"))?,
        Err(_) => 3000,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e} (set PORT to use another port)"))?;
    println!("{}", walkthrough(&path.display().to_string(), addr));
    axum::serve(listener, app).await?;
    Ok(())
}

async fn hello(Extension(key): Extension<KeyInfo>) -> String {
    format!("hello, {} (key from {})\n", key.id(), key.source())
}

async fn admin(Extension(key): Extension<KeyInfo>) -> String {
    format!(
        "admin area: hello, {} (scopes {:?})\n",
        key.id(),
        key.scopes().collect::<Vec<_>>()
    )
}

/// Per-key request counts and last use: how you see that an old key went idle.
async fn usage(Extension(store): Extension<KeyStore>) -> Json<Vec<KeyUsage>> {
    Json(store.usage())
}

fn walkthrough(path: &str, addr: SocketAddr) -> String {
    let url = format!("http://{addr}");
    let mut s = String::new();
    let _ = writeln!(s, "listening on {url}, keys from {path} (hot reload)\n");
    let _ = writeln!(s, "# 1. the current key works, a wrong one is refused:");
    let _ = writeln!(s, "curl -i {url}/ -H 'x-api-key: demo-key-2026-11'");
    let _ = writeln!(s, "curl -i {url}/ -H 'authorization: Bearer wrong'\n");
    let _ = writeln!(
        s,
        "# 2. add the new key next to the old one (dual-key overlap); the"
    );
    let _ = writeln!(s, "#    server applies the edit within milliseconds:");
    let _ = writeln!(
        s,
        "printf '\\n[[keys]]\\nid = \"demo-2026-12\"\\nsecret = \"demo-key-2026-12\"\\n' >> {path} && sleep 0.5"
    );
    let _ = writeln!(s, "curl -i {url}/ -H 'x-api-key: demo-key-2026-12'\n");
    let _ = writeln!(s, "# 3. check the old key has gone idle, then revoke it:");
    let _ = writeln!(s, "curl -s {url}/admin/usage -H 'x-api-key: ops-admin-key'");
    let _ = writeln!(
        s,
        "sed -i 's/^secret = \"demo-key-2026-11\"/disabled = true\\nsecret = \"demo-key-2026-11\"/' {path} && sleep 0.5"
    );
    let _ = writeln!(s, "curl -i {url}/ -H 'x-api-key: demo-key-2026-11'");
    s
}
