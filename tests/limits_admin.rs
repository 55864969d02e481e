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
        // Named by its place, never quoted: it may be a secret in the wrong field.
        (
            json!({"allowed_ips": ["10.0.0.0/8", "sk_live_pasted"]}),
            "entry 2",
        ),
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
        assert!(!problem.to_string().contains("sk_live"), "{problem}");
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

/// A rate limit's name that may be a secret pasted into the wrong field is never
/// quoted back in a 422: the limit is named by its place; a name-like one still is.
#[tokio::test]
async fn a_limit_name_that_may_be_a_secret_is_not_quoted_back() {
    let (addr, _store, _dir) = admin_server().await;
    let (status, created) = call(
        addr,
        "POST",
        "/v1/api-keys",
        Some(("application/json", json!({"id": "partner"}))),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let pasted = "sk_live_Pasted9";
    for (limits, says) in [
        (
            json!([{"name": "burst", "requests": 0, "per": "1s"}]),
            "`burst`",
        ),
        (
            json!([{"name": pasted, "requests": 0, "per": "1s"}]),
            "entry 1",
        ),
        (
            json!([{"name": "burst", "requests": 1, "per": "1s"}, {"name": pasted, "requests": 2_000_000_000u64, "per": "1s"}]),
            "entry 2",
        ),
        (
            json!([{"name": pasted, "requests": 1, "per": "1s"}, {"name": pasted, "requests": 2, "per": "1s"}]),
            "entry 2",
        ),
        (
            json!([{"name": pasted, "requests": 1, "per": "1s"}, {"name": "x", "requests": 1, "per": "1s"}, {"name": pasted, "requests": 1, "per": "1s"}]),
            "entry 3",
        ),
    ] {
        let patch = json!({ "rate_limits": limits });
        let (status, problem) = call(
            addr,
            "PATCH",
            "/v1/api-keys/partner",
            Some(("application/merge-patch+json", patch.clone())),
        )
        .await;
        assert_eq!(status, 422, "{patch} {problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(says), "{patch} {detail}");
        assert!(!problem.to_string().contains(pasted), "{problem}");
    }
}

/// A server with the API and one admin key, over a key file in a temporary folder.
async fn admin_server() -> (SocketAddr, KeyStore, tempfile::TempDir) {
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
    (common::serve(app).await, store, dir)
}

/// The limits as the API shows them, without where they stand.
fn limits_of(resource: &Value) -> Value {
    let rates: Vec<Value> = resource["rate_limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| json!([r["name"], r["requests"], r["per"]]))
        .collect();
    json!({
        "rate_limits": rates,
        "quota": [resource["quota"]["requests"], resource["quota"]["per"]],
        "allowed_ips": resource["allowed_ips"],
    })
}

#[tokio::test]
async fn a_rotated_key_keeps_its_limits_and_its_address_rules() {
    let (addr, _store, dir) = admin_server().await;
    let (status, created) = call(
        addr,
        "POST",
        "/v1/api-keys",
        Some((
            "application/json",
            json!({
                "id": "partner",
                "rate_limits": [{"name": "burst", "requests": 5, "per": "1m"}],
                "quota": {"requests": 1000, "per": "day"},
                "allowed_ips": ["203.0.113.0/24"],
            }),
        )),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let (status, successor) = call(addr, "POST", "/v1/api-keys/partner/rotate", None).await;
    assert_eq!(status, 201, "{successor}");
    // A routine rotation must not lift the partner's limits, nor its address rules.
    assert_eq!(limits_of(&successor), limits_of(&created), "{successor}");
    let id = successor["id"].as_str().unwrap();
    let (_, shown) = call(addr, "GET", &format!("/v1/api-keys/{id}"), None).await;
    assert_eq!(limits_of(&shown), limits_of(&created), "{shown}");
    let text = std::fs::read_to_string(dir.path().join("keys.toml")).unwrap();
    assert_eq!(
        text.matches(r#"allowed_ips = ["203.0.113.0/24"]"#).count(),
        2,
        "{text}"
    );
    // This server knows no client address: the successor is refused, as the old key is.
    let secret = successor["key"].as_str().unwrap();
    let res = common::client()
        .get(format!("http://{addr}/"))
        .bearer_auth(secret)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
}

#[tokio::test]
async fn a_change_of_limits_changes_the_etag_so_a_stale_if_match_is_refused() {
    let (addr, _store, _dir) = admin_server().await;
    let (status, _) = call(
        addr,
        "POST",
        "/v1/api-keys",
        Some((
            "application/json",
            json!({"id": "partner", "quota": {"requests": 1000, "per": "day"}}),
        )),
    )
    .await;
    assert_eq!(status, 201);
    let patch = |etag: String, body: Value| async move {
        let res = common::client()
            .patch(format!("http://{addr}/v1/api-keys/partner"))
            .header("authorization", "Bearer root-secret")
            .header("if-match", etag)
            .header("content-type", "application/merge-patch+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let etag = res
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_owned());
        (res.status().as_u16(), etag)
    };
    let first = common::client()
        .get(format!("http://{addr}/v1/api-keys/partner"))
        .header("authorization", "Bearer root-secret")
        .send()
        .await
        .unwrap();
    let seen = first.headers()["etag"].to_str().unwrap().to_owned();
    // Two operators read the same version; the first lowers the quota...
    let (status, after) = patch(
        seen.clone(),
        json!({"quota": {"requests": 10, "per": "day"}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_ne!(
        after.as_deref(),
        Some(&*seen),
        "the record changed: so does its ETag"
    );
    // ...and the second, from the version it read, must not silently undo it.
    let (status, _) = patch(seen, json!({"allowed_ips": ["203.0.113.0/24"]})).await;
    assert_eq!(status, 412, "a stale If-Match");
    let mut current = after.unwrap();
    for (change, body) in [
        (
            "a rate limit",
            json!({"rate_limits": [{"name": "b", "requests": 1, "per": "1s"}]}),
        ),
        ("address rules", json!({"allowed_ips": ["203.0.113.0/24"]})),
        ("the quota removed", json!({"quota": null})),
    ] {
        let (status, next) = patch(current.clone(), body).await;
        assert_eq!(status, 200, "{change}");
        let next = next.unwrap();
        assert_ne!(next, current, "{change}");
        let (status, _) = patch(current, json!({"owner": "x"})).await;
        assert_eq!(status, 412, "{change}: the old ETag is stale");
        current = next;
    }
}

/// Behind a load balancer, an admin key with `allowed_ips` is checked against the
/// client's address as `with_client_ip` finds it, not the balancer's.
#[tokio::test]
async fn an_admin_key_s_allowed_ips_can_be_checked_behind_a_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let root = tower_api_key::ApiKey::new("root", "root-secret")
        .with_scopes(["admin"])
        .with_allowed_ips(["203.0.113.0/24".parse().unwrap()]);
    tower_api_key::KeySet::from_keys([root])
        .unwrap()
        .write_file(&path)
        .unwrap();
    let store = KeyStore::new();
    store
        .add_source(FileSource::new(&path).with_poll_interval(Duration::from_secs(60)))
        .unwrap();
    let mut addrs = Vec::new();
    for client_ip in [
        None,
        Some(tower_api_key::ClientIp::x_forwarded_for(["127.0.0.0/8"
            .parse()
            .unwrap()])),
    ] {
        let mut api = AdminApi::new(store.clone(), FileBackend::new(&path));
        if let Some(client_ip) = client_ip {
            api = api.with_client_ip(client_ip);
        }
        let app: Router = api.router();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap();
        });
    }
    let list = |addr: SocketAddr, from: &'static str| async move {
        common::client()
            .get(format!("http://{addr}/v1/api-keys"))
            .header("authorization", "Bearer root-secret")
            .header("x-forwarded-for", from)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    // The peer (loopback) by default: the header is not trusted. The problem
    // document says the response's own status (a tester saw `"status": 401`).
    assert_eq!(list(addrs[0], "203.0.113.9").await, 403);
    let body: serde_json::Value = common::client()
        .get(format!("http://{}/v1/api-keys", addrs[0]))
        .header("authorization", "Bearer root-secret")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap();
    assert_eq!(body["status"], 403, "{body}");
    assert_eq!(
        body["type"], "urn:tower-api-key:problem:forbidden",
        "{body}"
    );
    // The balancer named: the client it forwards for.
    assert_eq!(list(addrs[1], "203.0.113.9").await, 200);
    assert_eq!(list(addrs[1], "198.51.100.9").await, 403);
}

/// An admin key over its rate limit is refused 429, and the problem document says
/// 429 too (it said 401 `unauthenticated`).
#[tokio::test]
async fn an_admin_key_over_its_limit_gets_a_429_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let root = tower_api_key::ApiKey::new("root", "root-secret")
        .with_scopes(["admin"])
        .with_rate_limit(tower_api_key::limit::RateLimit::new(
            "admin",
            1,
            Duration::from_secs(3600),
        ));
    tower_api_key::KeySet::from_keys([root])
        .unwrap()
        .write_file(&path)
        .unwrap();
    let store = KeyStore::new();
    store
        .add_source(FileSource::new(&path).with_poll_interval(Duration::from_secs(60)))
        .unwrap();
    let app: Router = AdminApi::new(store.clone(), FileBackend::new(&path)).router();
    let addr = common::serve(app).await;
    let list = || {
        common::client()
            .get(format!("http://{addr}/v1/api-keys"))
            .header("authorization", "Bearer root-secret")
            .send()
    };
    assert_eq!(list().await.unwrap().status(), 200);
    let refused = list().await.unwrap();
    assert_eq!(refused.status(), 429);
    let body: serde_json::Value = serde_json::from_str(&refused.text().await.unwrap()).unwrap();
    assert_eq!(body["status"], 429, "{body}");
    assert_eq!(
        body["type"], "urn:tower-api-key:problem:rate-limited",
        "{body}"
    );
    assert_eq!(body["title"], "Too many requests", "{body}");
}
