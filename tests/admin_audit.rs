//! The audit trail of the key-management API: one `tracing` event per change, naming
//! the caller. (Its own test binary: it sets the global `tracing` subscriber, which a
//! test running beside others cannot rely on.)
#![allow(clippy::unwrap_used)]
#![cfg(all(feature = "admin", unix))]

mod common;

use std::{fs, time::Duration};

use axum::Router;
use tower_api_key::{
    ApiKey, ApiKeyLayer, FileSource, KeyStore,
    admin::{AdminApi, AdminBackend, BackendError, FileBackend},
};

async fn call(
    addr: std::net::SocketAddr,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut req = common::client()
        .request(method, format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {key}"));
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

#[tokio::test]
async fn every_change_is_an_audit_event_naming_the_caller() {
    let captured = common::Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(
        &path,
        "[[keys]]\nid = \"root\"\nsecret = \"root-secret\"\nscopes = [\"admin\"]\n\n\
         [[keys]]\nid = \"acme-admin\"\nsecret = \"acme-secret\"\nscopes = [\"admin\"]\n\
         tenant = \"acme\"\n",
    )
    .unwrap();
    let store = KeyStore::new();
    store
        .add_source(FileSource::new(&path).with_poll_interval(Duration::from_secs(60)))
        .unwrap();
    let app = Router::new()
        .route("/", axum::routing::get(|| async { "ok" }))
        .route_layer(ApiKeyLayer::from_store(store.clone()))
        .merge(AdminApi::new(store, FileBackend::new(&path)).router());
    let addr = common::serve(app).await;
    let post = reqwest::Method::POST;
    let (status, created) = call(
        addr,
        post.clone(),
        "/v1/api-keys",
        "root-secret",
        Some(r#"{"id": "audited"}"#),
    )
    .await;
    assert_eq!(status, 201);
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let secret = created["key"].as_str().unwrap().to_owned();
    // Another tenant's admin cannot see the key: 404, and an event saying it was
    // refused.
    let (status, _) = call(
        addr,
        post,
        "/v1/api-keys/audited/rotate",
        "acme-secret",
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = call(
        addr,
        reqwest::Method::DELETE,
        "/v1/api-keys/audited",
        "root-secret",
        None,
    )
    .await;
    assert_eq!(status, 204);
    let logs = captured.text();
    let audit: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("tower_api_key::audit"))
        .collect();
    assert_eq!(audit.len(), 3, "{logs}");
    assert!(
        audit[0].contains("action=\"create\"")
            && audit[0].contains("key_id=\"audited\"")
            && audit[0].contains("caller=\"root\"")
            && audit[0].contains("outcome=\"enforced\""),
        "{}",
        audit[0]
    );
    assert!(
        audit[1].contains("WARN")
            && audit[1].contains("action=\"rotate\"")
            && audit[1].contains("caller=\"acme-admin\"")
            && audit[1].contains("outcome=\"refused\"")
            && audit[1].contains("another tenant"),
        "{}",
        audit[1]
    );
    assert!(
        audit[2].contains("action=\"delete\"") && audit[2].contains(" at="),
        "{}",
        audit[2]
    );
    assert!(!logs.contains(&secret), "no secret in any log line");

    // A change written but not enforced in time (202) is audited too, as `written`.
    let lagging = lagging_api(&dir.path().join("lagging")).await;
    let (status, body) = call(
        lagging,
        reqwest::Method::POST,
        "/v1/api-keys",
        "root-secret",
        Some(r#"{"id": "late"}"#),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let logs = captured.text();
    let late: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("tower_api_key::audit") && l.contains("key_id=\"late\""))
        .collect();
    assert_eq!(late.len(), 1, "{logs}");
    assert!(
        late[0].contains("action=\"create\"") && late[0].contains("outcome=\"written\""),
        "{}",
        late[0]
    );
}

/// An API whose store reads the key file through a symlink in another directory,
/// with no file events and polled once a minute: it does not see the API's writes
/// in time.
async fn lagging_api(dir: &std::path::Path) -> std::net::SocketAddr {
    fs::create_dir_all(dir.join("view")).unwrap();
    let path = dir.join("keys.toml");
    fs::write(
        &path,
        "[[keys]]\nid = \"root\"\nsecret = \"root-secret\"\nscopes = [\"admin\"]\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(&path, dir.join("view/keys.toml")).unwrap();
    let source = FileSource::new(dir.join("view/keys.toml"))
        .with_file_events(false)
        .with_poll_interval(Duration::from_secs(60));
    let name = tower_api_key::KeySource::name(&source);
    let store = KeyStore::new();
    store.add_source(source).unwrap();
    let api = AdminApi::new(store, Named(FileBackend::new(&path), name))
        .with_apply_timeout(Duration::from_millis(200))
        .router();
    common::serve(api).await
}

/// The file backend, saying its keys reach the store through the source `.1`.
struct Named(FileBackend, String);

impl AdminBackend for Named {
    fn source_name(&self) -> String {
        self.1.clone()
    }
    async fn list(&self) -> Result<Vec<ApiKey>, BackendError> {
        self.0.list().await
    }
    async fn get(&self, id: &str) -> Result<Option<ApiKey>, BackendError> {
        self.0.get(id).await
    }
    async fn create(&self, key: ApiKey) -> Result<(), BackendError> {
        self.0.create(key).await
    }
    async fn update(&self, key: ApiKey, if_match: Option<&str>) -> Result<(), BackendError> {
        self.0.update(key, if_match).await
    }
    async fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), BackendError> {
        self.0.delete(id, if_match).await
    }
    async fn rotate(
        &self,
        successor: ApiKey,
        old: ApiKey,
        if_match: Option<&str>,
    ) -> Result<(), BackendError> {
        self.0.rotate(successor, old, if_match).await
    }
}
