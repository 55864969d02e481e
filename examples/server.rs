//! An axum server on 127.0.0.1:3000 whose API keys live in a TOML file that is reloaded
//! while it runs. `/` accepts any valid key; `/admin` and `/admin/usage` require the
//! `admin` scope. Start it with `cargo run --example server`, then follow the curl
//! commands it prints: a key working, a second key added, the first one revoked.
//!
//! The key file defaults to `examples/keys.toml`; pass another path as the first
//! argument.

use std::{error::Error, fmt::Write as _};

use axum::{Extension, Json, Router, routing::get};
use tower_api_key::{ApiKeyLayer, FileSource, KeyInfo, KeyStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_api_key=debug".into()),
        )
        .init();

    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "examples/keys.toml".into());
    // Refuse to start without a valid key file; once running, a bad edit is refused
    // and the last good keys stay.
    let keys = ApiKeyLayer::try_new(FileSource::new(&path))?;
    let store = keys.store().clone();

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

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("{}", walkthrough(&path));
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
async fn usage(Extension(store): Extension<KeyStore>) -> Json<serde_json::Value> {
    let keys: Vec<_> = store
        .usage()
        .into_iter()
        .map(|u| {
            serde_json::json!({
                "id": u.key().id(),
                "requests": u.requests(),
                "last_used_unix": u.last_used()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
            })
        })
        .collect();
    Json(serde_json::json!({ "version": store.version(), "keys": keys }))
}

fn walkthrough(path: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "listening on http://127.0.0.1:3000, keys from {path} (hot reload)\n"
    );
    let _ = writeln!(s, "# 1. the current key works, a wrong one is refused:");
    let _ = writeln!(
        s,
        "curl -i http://127.0.0.1:3000/ -H 'x-api-key: demo-key-2026-11'"
    );
    let _ = writeln!(
        s,
        "curl -i http://127.0.0.1:3000/ -H 'authorization: Bearer wrong'\n"
    );
    let _ = writeln!(
        s,
        "# 2. add the new key next to the old one (dual-key overlap):"
    );
    let _ = writeln!(
        s,
        "printf '\\n[[keys]]\\nid = \"demo-2026-12\"\\nsecret = \"demo-key-2026-12\"\\n' >> {path}"
    );
    let _ = writeln!(
        s,
        "curl -i http://127.0.0.1:3000/ -H 'x-api-key: demo-key-2026-12'\n"
    );
    let _ = writeln!(s, "# 3. check the old key has gone idle, then revoke it:");
    let _ = writeln!(
        s,
        "curl -s http://127.0.0.1:3000/admin/usage -H 'x-api-key: ops-admin-key'"
    );
    let _ = writeln!(
        s,
        "sed -i 's/^secret = \"demo-key-2026-11\"/disabled = true\\nsecret = \"demo-key-2026-11\"/' {path}"
    );
    let _ = writeln!(
        s,
        "curl -i http://127.0.0.1:3000/ -H 'x-api-key: demo-key-2026-11'"
    );
    s
}
