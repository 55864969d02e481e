//! Limits through the key-management API over a real server: create, GET (with what
//! each limit allows now), PATCH, the key file written, and the OpenAPI document.
#![allow(clippy::unwrap_used)]

mod common;

use std::{net::SocketAddr, time::Duration};

use axum::{Extension, Router, routing::get};
use serde_json::{Value, json};
use tower_api_key::{
    ApiKeyLayer, FileSource, KeyInfo, KeyStore,
    admin::{AdminApi, FileBackend},
};

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, Value)>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = common::client()
        .request(method, format!("http://{addr}{path}"))
        .header("authorization", "Bearer root-secret")
        // Any version of the key: these tests make one change at a time.
        .header("if-match", "*");
    if let Some((content_type, body)) = body {
        req = req
            .header("content-type", content_type)
            .body(body.to_string());
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn limits_are_created_shown_with_their_allowance_patched_and_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let root = tower_api_key::ApiKey::new("root", "root-secret").with_scopes(["admin"]);
    tower_api_key::KeySet::from_keys([root])
        .unwrap()
        .write_file(&path)
        .unwrap();
    let store = KeyStore::new();
    store
        .add_source(FileSource::new(&path).with_poll_interval(Duration::from_secs(60)))
        .unwrap();
    let app = Router::new()
        .route(
            "/",
            get(|Extension(k): Extension<KeyInfo>| async move { k.id().to_owned() }),
        )
        .route_layer(ApiKeyLayer::from_store(store.clone()))
        .merge(AdminApi::new(store.clone(), FileBackend::new(&path)).router());
    let addr = common::serve(app).await;

    let (status, created) = call(
        addr,
        "POST",
        "/v1/api-keys",
        Some((
            "application/json",
            json!({
                "id": "partner",
                "rate_limits": [{"name": "burst", "requests": 2, "per": "1h"}],
                "quota": {"requests": 1000, "per": "month"},
                "allowed_ips": ["127.0.0.0/8"],
            }),
        )),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let secret = created["key"].as_str().unwrap().to_owned();
    assert_eq!(created["allowed_ips"], json!(["127.0.0.0/8"]));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains(r#"rate_limits = [{ name = "burst", requests = 2, per = "1h" }]"#)
            && text.contains(r#"quota = { requests = 1000, per = "month" }"#),
        "{text}"
    );

    // The peer address is unknown to this server (no ConnectInfo): refused.
    let use_key = || {
        common::client()
            .get(format!("http://{addr}/"))
            .bearer_auth(&secret)
            .send()
    };
    assert_eq!(use_key().await.unwrap().status(), 403);
    let (_, shown) = call(addr, "GET", "/v1/api-keys/partner", None).await;
    assert_eq!(shown["rate_limits"][0]["remaining"], 2, "{shown}");
    assert_eq!(shown["quota"]["used"], 0);

    // Without address rules, the key is counted.
    let (status, patched) = call(
        addr,
        "PATCH",
        "/v1/api-keys/partner",
        Some(("application/merge-patch+json", json!({"allowed_ips": null}))),
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert!(patched["allowed_ips"].is_null());
    for want in [200, 200, 429] {
        assert_eq!(use_key().await.unwrap().status(), want);
    }
    let (_, shown) = call(addr, "GET", "/v1/api-keys/partner", None).await;
    let limit = &shown["rate_limits"][0];
    assert_eq!(
        (
            limit["name"].as_str(),
            limit["requests"].as_u64(),
            limit["per"].as_str()
        ),
        (Some("burst"), Some(2), Some("1h"))
    );
    assert_eq!(limit["remaining"], 0, "{shown}");
    assert!(limit["reset_seconds"].as_u64().unwrap() > 3_500);
    assert_eq!(
        shown["quota"]["used"], 2,
        "the refused request is not counted"
    );
    assert_eq!(shown["quota"]["remaining"], 998);
    assert!(
        shown["quota"]["resets_at"]
            .as_str()
            .unwrap()
            .ends_with("-01T00:00:00Z")
    );

    // Bad limits are refused with what is wrong; nothing is written.
    for (patch, says) in [
        (
            json!({"rate_limits": [{"name": "b", "requests": 0, "per": "1s"}]}),
            "at least 1",
        ),
        (
            json!({"rate_limits": [{"name": "b", "requests": 1, "per": "0s"}]}),
            "`per`",
        ),
        (
            json!({"rate_limits": [{"name": "b", "requests": 1, "per": "1s", "x": 1}]}),
            "rate_limits",
        ),
        (
            json!({"quota": {"requests": 1, "per": "year"}}),
            "\"day\" or \"month\"",
        ),
        (json!({"allowed_ips": ["fe80::1%eth0"]}), "zone id"),
        (json!({"allowed_ips": []}), "empty"),
        (json!({"allowed_ips": "127.0.0.1"}), "allowed_ips"),
    ] {
        let (status, problem) = call(
            addr,
            "PATCH",
            "/v1/api-keys/partner",
            Some(("application/merge-patch+json", patch.clone())),
        )
        .await;
        assert_eq!(status, 422, "{patch} {problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains(says),
            "{patch} {problem}"
        );
    }
    // Removing the rate limit lets the key in again at once.
    let (status, _) = call(
        addr,
        "PATCH",
        "/v1/api-keys/partner",
        Some(("application/merge-patch+json", json!({"rate_limits": null}))),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(use_key().await.unwrap().status(), 200);

    let (_, spec) = call(addr, "GET", "/v1/openapi.json", None).await;
    let schemas = spec["components"]["schemas"].as_object().unwrap();
    for name in [
        "RateLimitSpec",
        "QuotaSpec",
        "RateLimitStatus",
        "QuotaStatus",
        "QuotaPer",
    ] {
        assert!(schemas.contains_key(name), "{name}");
    }
    let resource = &schemas["KeyResource"]["properties"];
    assert!(resource.get("rate_limits").is_some() && resource.get("quota").is_some());
}
