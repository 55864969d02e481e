//! Helpers shared by the integration tests: real servers on 127.0.0.1.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::{future::Future, net::SocketAddr, time::Duration};

use axum::{Extension, Router, routing::get};
use tokio::net::TcpListener;
use tower_api_key::{ApiKeyLayer, KeyInfo, ReloadReport, Reloads};

/// Serves `app` on an ephemeral 127.0.0.1 port until the test's runtime ends.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The app most tests use: `/` echoes the key id, `/admin` requires the `admin` scope,
/// `/headers` echoes whether credential headers reached the handler.
pub fn app(layer: ApiKeyLayer) -> Router {
    let admin = Router::new()
        .route("/admin", get(whoami))
        .route_layer(layer.require_scope("admin"));
    Router::new()
        .route("/", get(whoami))
        .route(
            "/headers",
            get(|headers: axum::http::HeaderMap| async move {
                format!(
                    "authorization={} x-api-key={}",
                    headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("false"),
                    headers.contains_key("x-api-key")
                )
            }),
        )
        .route_layer(layer)
        .merge(admin)
}

async fn whoami(Extension(key): Extension<KeyInfo>) -> String {
    format!("{}@{}", key.id(), key.source())
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// GETs `path` with optional `x-api-key`, returning status and body.
pub async fn get_with(addr: SocketAddr, path: &str, key: Option<&str>) -> (u16, String) {
    let res = send(addr, path, key).await;
    let status = res.status().as_u16();
    (status, res.text().await.unwrap())
}

/// GETs `path` with optional `x-api-key`, returning the whole response.
pub async fn send(addr: SocketAddr, path: &str, key: Option<&str>) -> reqwest::Response {
    let mut req = client().get(format!("http://{addr}{path}"));
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    req.send().await.unwrap()
}

/// Waits (bounded) for the next reload attempt that satisfies `pred`.
pub async fn reload_where(
    reloads: &mut Reloads,
    what: &str,
    pred: impl Fn(&ReloadReport) -> bool,
) -> ReloadReport {
    within(Duration::from_secs(15), what, async {
        loop {
            let report = reloads.next().await.expect("store alive");
            if pred(&report) {
                return report;
            }
        }
    })
    .await
}

/// Runs `fut` with a deadline, failing the test with `what` if it passes.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
}

/// `t` as a TOML offset datetime in UTC, with milliseconds.
pub fn toml_datetime(t: std::time::SystemTime) -> String {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap();
    let (days, secs) = (since.as_secs() / 86_400, since.as_secs() % 86_400);
    // Count whole years and months forward from 1970: slow, obvious, test-only.
    let (mut year, mut day) = (1970u64, days);
    let leap = |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    while day >= if leap(year) { 366 } else { 365 } {
        day -= if leap(year) { 366 } else { 365 };
        year += 1;
    }
    let lengths = [
        31,
        if leap(year) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let mut month = 0;
    while day >= lengths[month] {
        day -= lengths[month];
        month += 1;
    }
    format!(
        "{year}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        month + 1,
        day + 1,
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        since.subsec_millis()
    )
}

/// An error and every error under it, as `a: b: c`.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

/// A `tracing` writer that keeps every line, for tests that read the logs.
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
