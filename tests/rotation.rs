//! The rotation lifecycle over a real server: key metadata, validity windows, scopes,
//! usage, expiry notices and generated keys.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    fs,
    time::{Duration, SystemTime},
};

use axum::{Json, Router, routing::get};
use common::{client, get_with, reload_where, send, serve, toml_datetime};
use tower_api_key::{ApiKeyLayer, FileSource, KeyInfo, generate};

/// An app whose handler reports every `KeyInfo` field; `/admin` requires `admin`.
fn app(layer: ApiKeyLayer) -> Router {
    async fn info(key: axum::Extension<KeyInfo>) -> Json<serde_json::Value> {
        let ts = |t: Option<SystemTime>| t.map(toml_datetime);
        Json(serde_json::json!({
            "id": key.id(),
            "scopes": key.scopes().collect::<Vec<_>>(),
            "tenant": key.tenant(),
            "owner": key.owner(),
            "description": key.description(),
            "not_before": ts(key.not_before()),
            "expires_at": ts(key.expires_at()),
        }))
    }
    Router::new()
        .route("/", get(info))
        .route_layer(layer.clone())
        .merge(
            Router::new()
                .route("/admin", get(info))
                .route_layer(layer.require_scope("admin")),
        )
}

fn file_source(path: &std::path::Path) -> FileSource {
    FileSource::new(path).with_poll_interval(Duration::from_secs(60))
}

#[tokio::test]
async fn every_key_file_field_takes_effect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    let (past, future) = (toml_datetime(now - hour), toml_datetime(now + hour));
    fs::write(
        &path,
        format!(
            r#"
[[keys]]
id = "full"
secret = "full-key"
scopes = ["read", "admin"]
tenant = "team-a"
owner = "ops@example.com"
description = "everything set"
not_before = {past}
expires_at = {future}

[[keys]]
id = "reader"
secret = "reader-key"
scopes = ["read"]

[[keys]]
id = "early"
secret = "early-key"
not_before = {future}

[[keys]]
id = "late"
secret = "late-key"
expires_at = {past}

[[keys]]
id = "off"
secret = "off-key"
disabled = true
"#
        ),
    )
    .unwrap();
    let addr = serve(app(ApiKeyLayer::try_new(file_source(&path)).unwrap())).await;

    let (status, body) = get_with(addr, "/", Some("full-key")).await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["id"], "full");
    assert_eq!(body["scopes"], serde_json::json!(["read", "admin"]));
    assert_eq!(body["tenant"], "team-a");
    assert_eq!(body["owner"], "ops@example.com");
    assert_eq!(body["description"], "everything set");
    assert_eq!(body["not_before"], past.as_str());
    assert_eq!(body["expires_at"], future.as_str());

    assert_eq!(get_with(addr, "/admin", Some("full-key")).await.0, 200);
    assert_eq!(get_with(addr, "/admin", Some("reader-key")).await.0, 403);
    assert_eq!(get_with(addr, "/", Some("reader-key")).await.0, 200);
    for (key, why) in [
        ("early-key", "API key not yet valid"),
        ("late-key", "API key expired"),
        ("off-key", "API key disabled"),
    ] {
        let res = send(addr, "/", Some(key)).await;
        assert_eq!(res.status(), 401, "{key}");
        let challenge = res.headers()["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains(why), "{key}: {challenge}");
    }
}

/// The whole rotation is one edit: add the new key and give the old one an
/// `expires_at` shortly ahead. Clients on both keys see no refusal until the old key's
/// instant, and usage counts match the requests sent.
#[tokio::test]
async fn dual_key_rotation_through_one_file_edit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, "[[keys]]\nid = \"old\"\nsecret = \"old-key\"\n").unwrap();
    let layer = ApiKeyLayer::try_new(file_source(&path))
        .unwrap()
        .deprecation_headers(true);
    let store = layer.store().clone();
    let mut reloads = store.subscribe();
    let addr = serve(app(layer)).await;

    let mut old_ok = 0u64;
    for _ in 0..10 {
        assert_eq!(get_with(addr, "/", Some("old-key")).await.0, 200);
        old_ok += 1;
    }

    let expires = SystemTime::now() + Duration::from_millis(1500);
    let edit = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
    fs::write(
        edit.path(),
        format!(
            "[[keys]]\nid = \"old\"\nsecret = \"old-key\"\nexpires_at = {}\n\n[[keys]]\nid = \"new\"\nsecret = \"new-key\"\n",
            toml_datetime(expires)
        ),
    )
    .unwrap();
    edit.persist(&path).unwrap();
    let report = reload_where(&mut reloads, "the rotation edit", |r| r.is_applied()).await;
    // Giving the old key an expiry changes it: the audit trail says so.
    assert_eq!(
        (report.added(), report.changed()),
        (vec!["new"], vec!["old"])
    );
    assert!(report.kept().is_empty());
    assert_eq!(
        report.expiring(),
        ["old"],
        "the old key is inside the expiry notice"
    );
    // Millisecond precision survives the TOML round trip.
    let expires = store.get("old").unwrap().expires_at().unwrap();

    // Both clients keep calling until well past the old key's instant.
    let (mut new_ok, mut old_refused) = (0u64, 0u64);
    let deadline = expires + Duration::from_millis(400);
    while SystemTime::now() < deadline {
        for (key, is_old) in [("old-key", true), ("new-key", false)] {
            let sent = SystemTime::now();
            let res = send(addr, "/", Some(key)).await;
            let received = SystemTime::now();
            let status = res.status().as_u16();
            if !is_old {
                assert_eq!(status, 200, "the new key must never be refused");
                new_ok += 1;
            } else if received < expires {
                assert_eq!(status, 200, "old key refused before its expiry");
                assert_eq!(res.headers()["sunset"], httpdate(expires));
                old_ok += 1;
            } else if sent >= expires {
                assert_eq!(status, 401, "old key accepted after its expiry");
                old_refused += 1;
            } else if status == 200 {
                old_ok += 1; // in flight across the instant: either answer is right
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(old_refused > 0 && new_ok > 0);

    let count = |id: &str| store.usage_of(id).unwrap().requests();
    assert_eq!(count("old"), old_ok);
    assert_eq!(count("new"), new_ok);
    // The expired key never reloaded: no file change was needed.
    assert_eq!(store.version(), 2);
}

/// An IMF-fixdate, computed independently of the crate (via `toml_datetime`).
fn httpdate(t: SystemTime) -> String {
    let d = toml_datetime(t);
    let (date, time) = d.split_once('T').unwrap();
    let mut parts = date.split('-').map(|p| p.parse::<u64>().unwrap());
    let (y, m, day) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let days = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() / 86_400;
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!("{weekday}, {day:02} {month} {y} {} GMT", &time[..8])
}

#[tokio::test]
async fn generated_keys_and_checksums() {
    let key = generate("tak").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, key.toml_entry("generated").unwrap()).unwrap();
    assert!(!fs::read_to_string(&path).unwrap().contains(key.secret()));
    let layer = ApiKeyLayer::try_new(file_source(&path))
        .unwrap()
        .require_checksum(true);
    let addr = serve(app(layer)).await;
    assert_eq!(get_with(addr, "/", Some(key.secret())).await.0, 200);

    let mut typo = key.secret().to_owned();
    let last = typo.pop().unwrap();
    typo.push(if last == 'x' { 'y' } else { 'x' });
    let res = send(addr, "/", Some(&typo)).await;
    assert_eq!(res.status(), 401);
    assert!(
        res.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("bad checksum")
    );
}

#[tokio::test]
async fn no_deprecation_headers_far_from_expiry_or_when_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let soon = toml_datetime(SystemTime::now() + Duration::from_secs(3600));
    let later = toml_datetime(SystemTime::now() + Duration::from_secs(30 * 86_400));
    fs::write(
        &path,
        format!("[[keys]]\nid = \"soon\"\nsecret = \"soon-key\"\nexpires_at = {soon}\n[[keys]]\nid = \"later\"\nsecret = \"later-key\"\nexpires_at = {later}\n"),
    )
    .unwrap();
    let on = ApiKeyLayer::try_new(file_source(&path))
        .unwrap()
        .deprecation_headers(true);
    let off = on.clone().deprecation_headers(false);
    let (on, off) = (serve(app(on)).await, serve(app(off)).await);
    let headers = |addr, key: &'static str| async move {
        let res = client()
            .get(format!("http://{addr}/"))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap();
        (
            res.headers().get("sunset").is_some(),
            res.headers().get("deprecation").cloned(),
        )
    };
    let (sunset, deprecation) = headers(on, "soon-key").await;
    assert!(sunset);
    assert!(deprecation.unwrap().to_str().unwrap().starts_with('@'));
    assert_eq!(headers(on, "later-key").await, (false, None));
    assert_eq!(headers(off, "soon-key").await, (false, None));
}

#[tokio::test]
async fn a_key_expiring_past_year_9999_is_let_in_without_a_sunset() {
    use tower_api_key::{ApiKey, KeySet, KeyStore};
    // Year 10,000 and later: no HTTP date can say it, and writing one panicked.
    let far = SystemTime::UNIX_EPOCH + Duration::from_secs(9_000 * 366 * 86_400);
    let store = KeyStore::new();
    let keys = KeySet::from_keys([ApiKey::new("far", "far-key").with_expires_at(far)]).unwrap();
    store.add_source(keys).unwrap();
    store.set_expiry_notice(Duration::MAX);
    let layer = ApiKeyLayer::from_store(store).deprecation_headers(true);
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route_layer(layer);
    let addr = serve(app).await;
    for _ in 0..2 {
        let res = send(addr, "/", Some("far-key")).await;
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("sunset").is_none());
        assert!(res.headers().get("deprecation").is_none());
    }
}
