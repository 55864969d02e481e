//! An axum server on 127.0.0.1 with a real HTTP client.
#![allow(clippy::unwrap_used)]

mod common;

use axum::{Router, routing::get};
use common::{app, client, get_with, serve};
use tower_api_key::{ApiKey, ApiKeyLayer, ChannelSource, KeySet};

fn keys() -> KeySet {
    KeySet::from_keys([
        ApiKey::new("reader", "reader-key-1"),
        ApiKey::new("root", "root-key-1").with_scopes(["admin"]),
    ])
    .unwrap()
}

#[tokio::test]
async fn valid_key_passes_and_the_handler_sees_key_info() {
    let addr = serve(app(ApiKeyLayer::new(keys()))).await;
    assert_eq!(
        get_with(addr, "/", Some("reader-key-1")).await,
        (200, "reader@static".into())
    );

    let res = client()
        .get(format!("http://{addr}/"))
        .header("authorization", "bEaReR root-key-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "root@static");
}

#[tokio::test]
async fn missing_wrong_and_conflicting_keys_get_401_with_a_challenge() {
    let addr = serve(app(ApiKeyLayer::new(keys()).with_realm("tests"))).await;
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[], r#"Bearer realm="tests""#),
        (
            &[("x-api-key", "nope")],
            r#"Bearer realm="tests", error="invalid_token", error_description="invalid API key""#,
        ),
        (
            &[
                ("authorization", "Bearer reader-key-1"),
                ("x-api-key", "root-key-1"),
            ],
            r#"Bearer realm="tests", error="invalid_request", error_description="more than one API key presented""#,
        ),
        (
            &[("authorization", "Bearer ")],
            r#"Bearer realm="tests", error="invalid_request", error_description="malformed API key credential""#,
        ),
    ];
    for (headers, challenge) in cases {
        let mut req = client().get(format!("http://{addr}/"));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "{headers:?}");
        assert_eq!(res.headers()["www-authenticate"], challenge, "{headers:?}");
    }
}

#[tokio::test]
async fn required_scope_is_403_insufficient_scope() {
    let addr = serve(app(ApiKeyLayer::new(keys()))).await;
    let res = client()
        .get(format!("http://{addr}/admin"))
        .header("x-api-key", "reader-key-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let challenge = res.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains(r#"error="insufficient_scope""#),
        "{challenge}"
    );
    assert!(challenge.contains(r#"scope="admin""#), "{challenge}");
    assert_eq!(
        get_with(addr, "/admin", Some("root-key-1")).await,
        (200, "root@static".into())
    );
    assert_eq!(get_with(addr, "/admin", None).await.0, 401);
}

#[tokio::test]
async fn route_layer_keeps_unknown_paths_404() {
    let addr = serve(app(ApiKeyLayer::new(keys()))).await;
    assert_eq!(get_with(addr, "/no-such-path", None).await.0, 404);
    assert_eq!(get_with(addr, "/no-such-path", Some("wrong")).await.0, 404);
}

#[tokio::test]
async fn hidden_credentials_never_reach_the_handler() {
    let layer = ApiKeyLayer::new(keys());
    let shown = serve(app(layer.clone())).await;
    let hidden = serve(app(layer.hide_credentials(true))).await;
    let (status, body) = get_with(shown, "/headers", Some("reader-key-1")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "authorization=false x-api-key=true")
    );
    let (status, body) = get_with(hidden, "/headers", Some("reader-key-1")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "authorization=false x-api-key=false")
    );
    // Another scheme's credential is not the layer's to remove: a second auth layer
    // downstream still sees it.
    let res = common::client()
        .get(format!("http://{hidden}/headers"))
        .header("x-api-key", "reader-key-1")
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.text().await.unwrap(),
        "authorization=Basic dXNlcjpwYXNz x-api-key=false"
    );
}

#[tokio::test]
async fn a_grpc_content_type_over_http_1_gets_the_http_refusal() {
    let addr = serve(app(ApiKeyLayer::new(keys()))).await;
    for content_type in [
        "application/grpc",
        "application/grpc+proto",
        "application/grpcfoo",
        "application/grpc-web",
    ] {
        let res = common::client()
            .get(format!("http://{addr}/"))
            .header("content-type", content_type)
            .header("x-api-key", "wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{content_type}");
        assert!(res.headers().get("grpc-status").is_none(), "{content_type}");
        assert!(
            res.headers().contains_key("www-authenticate"),
            "{content_type}"
        );
    }
}

#[tokio::test]
async fn a_swap_while_serving_applies_to_the_next_request() {
    let (source, publisher) = ChannelSource::new(keys());
    let layer = ApiKeyLayer::new(source);
    let store = layer.store().clone();
    let addr = serve(app(layer)).await;
    assert_eq!(get_with(addr, "/", Some("reader-key-1")).await.0, 200);
    assert_eq!(get_with(addr, "/", Some("new-key")).await.0, 401);

    let report = publisher
        .publish(KeySet::from_keys([ApiKey::new("new", "new-key")]).unwrap())
        .unwrap();
    assert_eq!(report.added(), ["new"]);
    assert_eq!(report.removed(), ["reader", "root"]);
    assert_eq!(store.version(), 2);

    assert_eq!(
        get_with(addr, "/", Some("new-key")).await,
        (200, "new@channel".into())
    );
    assert_eq!(get_with(addr, "/", Some("reader-key-1")).await.0, 401);
}

#[tokio::test]
async fn a_failed_initial_load_fails_closed() {
    let layer = ApiKeyLayer::new(tower_api_key::EnvSource::new(
        "TOWER_API_KEY_TEST_UNSET_VAR",
    ));
    assert!(layer.store().is_empty());
    let report = layer.store().last_reload().unwrap();
    assert!(!report.is_applied());
    assert!(
        report
            .error()
            .unwrap()
            .to_string()
            .contains("TOWER_API_KEY_TEST_UNSET_VAR")
    );
    let addr = serve(
        Router::new()
            .route("/", get(|| async { "open" }))
            .layer(layer),
    )
    .await;
    assert_eq!(get_with(addr, "/", None).await.0, 401);
    assert_eq!(get_with(addr, "/", Some("anything")).await.0, 401);

    assert!(
        ApiKeyLayer::try_new(tower_api_key::EnvSource::new(
            "TOWER_API_KEY_TEST_UNSET_VAR"
        ))
        .is_err()
    );
}

#[tokio::test]
async fn keys_from_several_sources_are_merged_and_conflicts_refused() {
    let store = tower_api_key::KeyStore::new();
    store.add_source(keys()).unwrap();
    let (channel, publisher) =
        ChannelSource::new(KeySet::from_keys([ApiKey::new("break-glass", "bg-key")]).unwrap());
    store.add_source(channel).unwrap();
    assert_eq!(store.len(), 3);
    let addr = serve(app(ApiKeyLayer::from_store(store.clone()))).await;
    assert_eq!(
        get_with(addr, "/", Some("bg-key")).await,
        (200, "break-glass@channel".into())
    );
    assert_eq!(
        get_with(addr, "/", Some("reader-key-1")).await,
        (200, "reader@static".into())
    );

    // The same secret as another source's key, under another id: refused, nothing lost.
    let err = publisher
        .publish(KeySet::from_keys([ApiKey::new("sneaky", "reader-key-1")]).unwrap())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "key `sneaky` has the same secret as key `reader` from source `static`"
    );
    // An id another source defines: refused too.
    let err = publisher
        .publish(KeySet::from_keys([ApiKey::new("root", "other")]).unwrap())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "key id `root` is already defined by source `static`"
    );
    assert_eq!(store.len(), 3);
    assert!(!store.last_reload().unwrap().is_applied());
    assert_eq!(get_with(addr, "/", Some("bg-key")).await.0, 200);
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn key_info_is_an_axum_extractor() {
    async fn whoami(key: tower_api_key::KeyInfo) -> String {
        format!("{} {:?}", key.id(), key.tenant())
    }
    async fn maybe(key: Option<tower_api_key::KeyInfo>) -> String {
        format!("{:?}", key.map(|k| k.id().to_owned()))
    }
    let keys = KeySet::from_keys([ApiKey::new("ci", "ci-key").with_tenant("team-a")]).unwrap();
    let app = Router::new()
        .route("/whoami", get(whoami))
        .route_layer(ApiKeyLayer::new(keys))
        .route("/open", get(maybe))
        .route("/unguarded", get(whoami));
    let addr = serve(app).await;
    assert_eq!(
        get_with(addr, "/whoami", Some("ci-key")).await,
        (200, "ci Some(\"team-a\")".into())
    );
    assert_eq!(get_with(addr, "/open", None).await, (200, "None".into()));
    let (status, body) = get_with(addr, "/unguarded", Some("ci-key")).await;
    assert_eq!(status, 500);
    assert!(body.contains("ApiKeyLayer"), "{body}");
}

#[tokio::test]
async fn keys_in_the_query_or_a_cookie_and_hidden_from_the_handler() {
    use tower_api_key::KeyLocation;
    let layer = ApiKeyLayer::new(keys())
        .with_key_locations([
            KeyLocation::query("api_key"),
            KeyLocation::cookie("api_key"),
        ])
        .hide_credentials(true);
    let app = axum::Router::new()
        .route(
            "/echo",
            axum::routing::get(
                |uri: axum::http::Uri, headers: axum::http::HeaderMap| async move {
                    let cookie = headers
                        .get("cookie")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    format!("{uri} {cookie}")
                },
            ),
        )
        .route_layer(layer);
    let addr = serve(app).await;
    let get = |path: &str, cookie: Option<&str>| {
        let mut req = common::client().get(format!("http://{addr}{path}"));
        if let Some(cookie) = cookie {
            req = req.header("cookie", cookie);
        }
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    assert_eq!(
        get("/echo?page=2&api_key=reader-key-1", None).await,
        (200, "/echo?page=2 -".to_owned())
    );
    assert_eq!(
        get("/echo", Some("theme=dark; api_key=reader-key-1")).await,
        (200, "/echo theme=dark".to_owned())
    );
    assert_eq!(get("/echo?api_key=wrong", None).await.0, 401);
    assert_eq!(get("/echo", None).await.0, 401);
}

#[tokio::test]
async fn a_global_layer_and_a_route_scope_count_a_request_once() {
    let keys_layer = ApiKeyLayer::new(keys());
    let app = axum::Router::new()
        .route("/admin", axum::routing::get(|| async { "admin" }))
        .route_layer(keys_layer.require_scope("admin"))
        .route("/", axum::routing::get(|| async { "hello" }))
        .layer(keys_layer.clone());
    let addr = serve(app).await;
    assert_eq!(get_with(addr, "/admin", Some("root-key-1")).await.0, 200);
    assert_eq!(get_with(addr, "/admin", Some("root-key-1")).await.0, 200);
    assert_eq!(get_with(addr, "/", Some("root-key-1")).await.0, 200);
    assert_eq!(get_with(addr, "/admin", Some("reader-key-1")).await.0, 403);
    assert_eq!(get_with(addr, "/admin", Some("nope")).await.0, 401);
    let store = keys_layer.store();
    assert_eq!(
        store.usage_of("root").unwrap().requests(),
        3,
        "once per request"
    );
    assert_eq!(store.usage_of("reader").unwrap().requests(), 1);

    // A KeyInfo from another store proves nothing here: the key is checked afresh.
    let other =
        ApiKeyLayer::new(KeySet::from_keys([ApiKey::new("elsewhere", "other-key")]).unwrap());
    let app = axum::Router::new()
        .route("/admin", axum::routing::get(|| async { "admin" }))
        .route_layer(keys_layer.require_scope("admin"))
        .layer(other);
    let addr = serve(app).await;
    assert_eq!(get_with(addr, "/admin", Some("other-key")).await.0, 401);
}
