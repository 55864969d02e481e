//! The key-management API over a real axum server on 127.0.0.1 with a real HTTP
//! client, backed by a real key file that a `FileSource` watches.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "admin")]

mod common;

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use axum::{Extension, Router, routing::get};
use serde_json::{Value, json};
use tower_api_key::{
    ApiKey, ApiKeyLayer, ChannelSource, FileSource, KeyInfo, KeySet, KeyStore,
    admin::{AdminApi, FileBackend},
};

/// sha256("root-secret"), sha256("acme-secret"), sha256("reader-secret").
fn digest(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn initial_file() -> String {
    format!(
        "# Keys for the admin tests. This comment must survive every API call.\n\n\
         [[keys]]\nid = \"root\"\nsha256 = \"{}\"\nscopes = [\"admin\", \"read\", \"write\"]\n\n\
         # The acme tenant's admin.\n[[keys]]\nid = \"acme-admin\"\nsha256 = \"{}\"\n\
         scopes = [\"admin\", \"read\"]\ntenant = \"acme\"\n\n\
         [[keys]]\nid = \"reader\"\nsha256 = \"{}\"   # inline comment\nscopes = [\"read\"]\n",
        digest("root-secret"),
        digest("acme-secret"),
        digest("reader-secret")
    )
}

struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    addr: SocketAddr,
    store: KeyStore,
}

async fn server_on(path: &Path) -> (SocketAddr, KeyStore) {
    let store = KeyStore::new();
    store
        .add_source(FileSource::new(path).with_poll_interval(Duration::from_secs(60)))
        .unwrap();
    let (channel, _publisher) =
        ChannelSource::new(KeySet::from_keys([ApiKey::new("chan-key", "chan-secret")]).unwrap());
    store.add_source(channel).unwrap();
    let addr = guarded(
        &store,
        AdminApi::new(store.clone(), FileBackend::new(path)).router(),
    )
    .await;
    (addr, store)
}

/// Serves `admin` beside `/`, a route guarded by `store` that answers its key's id.
async fn guarded(store: &KeyStore, admin: Router) -> SocketAddr {
    let app = Router::new()
        .route(
            "/",
            get(|Extension(k): Extension<KeyInfo>| async move { k.id().to_owned() }),
        )
        .route_layer(ApiKeyLayer::from_store(store.clone()))
        .merge(admin);
    common::serve(app).await
}

async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, initial_file()).unwrap();
    let (addr, store) = server_on(&path).await;
    Server {
        _dir: dir,
        path,
        addr,
        store,
    }
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Server {
    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<(&str, String)>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = common::client().request(method, format!("http://{}{path}", self.addr));
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        if let Some((content_type, body)) = body {
            req = req.header("content-type", content_type).body(body);
        }
        for (name, value) in extra {
            req = req.header(*name, *value);
        }
        let res = req.send().await.unwrap();
        let (status, headers) = (res.status().as_u16(), res.headers().clone());
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn post(&self, path: &str, key: &str, body: Value) -> Reply {
        self.call(
            "POST",
            path,
            Some(key),
            Some(("application/json", body.to_string())),
            &[],
        )
        .await
    }

    async fn get(&self, path: &str, key: &str) -> Reply {
        self.call("GET", path, Some(key), None, &[]).await
    }

    async fn patch(&self, id: &str, key: &str, etag: Option<&str>, body: Value) -> Reply {
        let extra: Vec<(&str, &str)> = etag.map(|e| ("if-match", e)).into_iter().collect();
        let body = Some(("application/merge-patch+json", body.to_string()));
        self.call(
            "PATCH",
            &format!("/v1/api-keys/{id}"),
            Some(key),
            body,
            &extra,
        )
        .await
    }

    async fn delete(&self, id: &str, key: &str, etag: Option<&str>) -> Reply {
        let extra: Vec<(&str, &str)> = etag.map(|e| ("if-match", e)).into_iter().collect();
        let path = format!("/v1/api-keys/{id}");
        self.call("DELETE", &path, Some(key), None, &extra).await
    }

    /// The status of `GET /` with `key`: whether the key works right now.
    async fn works(&self, key: &str) -> u16 {
        common::get_with(self.addr, "/", Some(key)).await.0
    }

    /// Waits until a request with `key` is answered `status` (the store reloaded).
    async fn until_works(&self, key: &str, status: u16) {
        let start = std::time::Instant::now();
        while self.works(key).await != status {
            assert!(start.elapsed() < Duration::from_secs(10), "never reloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn etag(reply: &Reply) -> String {
    reply.headers["etag"].to_str().unwrap().to_owned()
}

fn problem(reply: &Reply, status: u16, kind: &str) {
    assert_eq!(reply.status, status, "{:?}", reply.body);
    assert_eq!(reply.headers["content-type"], "application/problem+json");
    assert_eq!(
        reply.body["type"],
        format!("urn:tower-api-key:problem:{kind}"),
        "{:?}",
        reply.body
    );
    assert_eq!(reply.body["status"], status);
    assert!(reply.body["title"].is_string());
}

#[tokio::test]
async fn create_get_list_patch_delete() {
    let s = server().await;
    let created = s
        .post("/v1/api-keys", "root-secret", json!({"id": "billing", "scopes": ["read"], "owner": "team-b", "description": "billing service"}))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.headers["location"], "/v1/api-keys/billing");
    let secret = created.body["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("tak_") && tower_api_key::has_valid_checksum(&secret));
    assert_eq!(created.body["status"], "active");
    assert_eq!(created.body["created_by"], "root");
    assert!(created.body["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(created.body["usage"]["requests"], 0);
    assert!(created.body.get("sha256").is_none() && created.body.get("digest").is_none());
    // Enforced when the call returns; only the digest is in the file.
    assert_eq!(s.works(&secret).await, 200);
    let file = fs::read_to_string(&s.path).unwrap();
    assert!(
        !file.contains(&secret) && file.contains(&digest(&secret)),
        "{file}"
    );

    let got = s.get("/v1/api-keys/billing", "root-secret").await;
    assert_eq!(got.status, 200);
    assert_eq!(etag(&got), etag(&created));
    assert_eq!(got.body["usage"]["requests"], 1);
    assert!(got.body.get("key").is_none(), "the secret is shown once");
    // Usage moves; the ETag does not.
    assert_eq!(s.works(&secret).await, 200);
    assert_eq!(
        etag(&s.get("/v1/api-keys/billing", "root-secret").await),
        etag(&created)
    );

    let list = s.get("/v1/api-keys", "root-secret").await;
    let ids: Vec<&str> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["acme-admin", "billing", "reader", "root"],
        "ordered, file keys only"
    );
    assert!(list.body["next_cursor"].is_null());

    // PATCH needs the current ETag.
    problem(
        &s.patch("billing", "root-secret", None, json!({"owner": "x"}))
            .await,
        428,
        "precondition-required",
    );
    // Whatever the body: a client without the ETag must read the key first.
    problem(
        &s.patch("billing", "root-secret", None, json!({"allowed_ips": []}))
            .await,
        428,
        "precondition-required",
    );
    problem(
        &s.patch(
            "billing",
            "root-secret",
            Some("\"stale\""),
            json!({"owner": "x"}),
        )
        .await,
        412,
        "precondition-failed",
    );
    let patched = s
        .patch(
            "billing",
            "root-secret",
            Some(&etag(&created)),
            json!({"owner": null, "scopes": ["read", "write"], "description": "renamed"}),
        )
        .await;
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    assert_ne!(etag(&patched), etag(&created));
    assert!(patched.body["owner"].is_null());
    assert_eq!(patched.body["scopes"], json!(["read", "write"]));
    assert_eq!(
        s.store.get("billing").unwrap().description(),
        Some("renamed")
    );
    // Revoke by disabling: the very next request is refused.
    let disabled = s
        .patch(
            "billing",
            "root-secret",
            Some(&etag(&patched)),
            json!({"disabled": true}),
        )
        .await;
    assert_eq!(
        (disabled.status, &disabled.body["status"]),
        (200, &json!("disabled"))
    );
    assert_eq!(s.works(&secret).await, 401);

    // DELETE: 204, refused at once, then 404.
    let stale = s
        .call(
            "DELETE",
            "/v1/api-keys/billing",
            Some("root-secret"),
            None,
            &[("if-match", &etag(&patched))],
        )
        .await;
    problem(&stale, 412, "precondition-failed");
    let deleted = s
        .call(
            "DELETE",
            "/v1/api-keys/billing",
            Some("root-secret"),
            None,
            &[],
        )
        .await;
    assert_eq!(deleted.status, 204);
    assert_eq!(s.works(&secret).await, 401);
    problem(
        &s.call(
            "DELETE",
            "/v1/api-keys/billing",
            Some("root-secret"),
            None,
            &[],
        )
        .await,
        404,
        "not-found",
    );
}

#[tokio::test]
async fn a_revoked_key_is_refused_by_the_very_next_request() {
    let s = server().await;
    let created = s.post("/v1/api-keys", "root-secret", json!({})).await;
    let (id, secret) = (
        created.body["id"].as_str().unwrap(),
        created.body["key"].as_str().unwrap(),
    );
    assert!(id.starts_with("key_"), "{id}");
    for _ in 0..3 {
        assert_eq!(s.works(secret).await, 200);
    }
    let deleted = s
        .call(
            "DELETE",
            &format!("/v1/api-keys/{id}"),
            Some("root-secret"),
            None,
            &[],
        )
        .await;
    assert_eq!(deleted.status, 204);
    assert_eq!(s.works(secret).await, 401);
}

#[tokio::test]
async fn rotation_gives_two_working_keys_until_the_overlap_ends() {
    let s = server().await;
    let old = s.post("/v1/api-keys", "root-secret", json!({"id": "svc-2026-11", "scopes": ["read"], "tenant": "t1", "owner": "o", "description": "d"})).await;
    let old_secret = old.body["key"].as_str().unwrap().to_owned();
    let rotated = s
        .post(
            "/v1/api-keys/svc-2026-11/rotate",
            "root-secret",
            json!({"overlap_seconds": 2, "id": "svc-2026-12"}),
        )
        .await;
    assert_eq!(rotated.status, 201, "{:?}", rotated.body);
    assert_eq!(rotated.headers["location"], "/v1/api-keys/svc-2026-12");
    let new_secret = rotated.body["key"].as_str().unwrap().to_owned();
    assert_eq!(rotated.body["rotated_from"], "svc-2026-11");
    assert_eq!(rotated.body["scopes"], json!(["read"]));
    assert_eq!(
        (
            &rotated.body["tenant"],
            &rotated.body["owner"],
            &rotated.body["description"]
        ),
        (&json!("t1"), &json!("o"), &json!("d"))
    );
    assert!(rotated.body["expires_at"].is_null(), "no window of its own");
    assert_eq!(s.works(&old_secret).await, 200);
    assert_eq!(s.works(&new_secret).await, 200);
    let shortened = s.get("/v1/api-keys/svc-2026-11", "root-secret").await;
    assert!(shortened.body["expires_at"].is_string());
    // The overlap ends at the old key's new expiry, and not before it.
    let ends = time::OffsetDateTime::parse(
        shortened.body["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while s.works(&old_secret).await == 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the overlap never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        time::OffsetDateTime::now_utc() >= ends,
        "refused before its expiry"
    );
    assert_eq!(s.works(&new_secret).await, 200);
    assert_eq!(
        s.get("/v1/api-keys/svc-2026-11", "root-secret").await.body["status"],
        "expired"
    );
    // Never later than the expiry the old key had: a long overlap keeps it.
    let again = s
        .post(
            "/v1/api-keys/svc-2026-11/rotate",
            "root-secret",
            json!({"overlap_seconds": 999_999}),
        )
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(
        s.get("/v1/api-keys/svc-2026-11", "root-secret").await.body["expires_at"],
        shortened.body["expires_at"]
    );
    // An If-Match that is stale refuses the rotation.
    let stale = s
        .call(
            "POST",
            "/v1/api-keys/svc-2026-12/rotate",
            Some("root-secret"),
            None,
            &[("if-match", "\"stale\"")],
        )
        .await;
    problem(&stale, 412, "precondition-failed");
}

#[tokio::test]
async fn each_error_is_a_problem_document() {
    let s = server().await;
    let unauthenticated = s.call("GET", "/v1/api-keys", None, None, &[]).await;
    problem(&unauthenticated, 401, "unauthenticated");
    assert!(unauthenticated.headers.contains_key("www-authenticate"));
    problem(
        &s.get("/v1/api-keys", "wrong").await,
        401,
        "unauthenticated",
    );
    problem(
        &s.get("/v1/api-keys", "reader-secret").await,
        403,
        "forbidden",
    );
    problem(
        &s.get("/v1/api-keys/nope", "root-secret").await,
        404,
        "not-found",
    );
    problem(
        &s.get("/v1/api-keys/chan-key", "root-secret").await,
        404,
        "not-found",
    );
    problem(
        &s.get("/v1/api-keys/root/extra/path", "root-secret").await,
        404,
        "not-found",
    );
    problem(
        &s.call("PUT", "/v1/api-keys", Some("root-secret"), None, &[])
            .await,
        405,
        "method-not-allowed",
    );
    problem(
        &s.call(
            "POST",
            "/v1/api-keys",
            Some("root-secret"),
            Some(("text/plain", "{}".into())),
            &[],
        )
        .await,
        415,
        "unsupported-media-type",
    );
    problem(
        &s.call(
            "POST",
            "/v1/api-keys",
            Some("root-secret"),
            Some(("application/json", "{not json".into())),
            &[],
        )
        .await,
        400,
        "bad-request",
    );
    // Create bodies that are JSON but not acceptable.
    for body in [
        json!({"color": "red"}),
        json!({"expires_at": "next tuesday"}),
        json!({"not_before": "2026-12-02T00:00:00Z", "expires_at": "2026-12-01T00:00:00Z"}),
        json!({"id": "bad id"}),
        json!({"prefix": "no_underscores"}),
    ] {
        problem(
            &s.post("/v1/api-keys", "root-secret", body).await,
            422,
            "validation",
        );
    }
    problem(
        &s.post("/v1/api-keys", "root-secret", json!({"id": "reader"}))
            .await,
        409,
        "conflict",
    );
    problem(
        &s.post("/v1/api-keys", "root-secret", json!({"id": "chan-key"}))
            .await,
        409,
        "conflict",
    );
    let etag = etag(&s.get("/v1/api-keys/reader", "root-secret").await);
    // Patches that name what cannot change, an unknown field, or a wrong type.
    for patch in [
        json!({"id": "renamed"}),
        json!({"key": "x"}),
        json!({"shoe_size": 9}),
        json!({"disabled": "yes"}),
    ] {
        let reply = s.patch("reader", "root-secret", Some(&etag), patch).await;
        problem(&reply, 422, "validation");
    }
    // A member named twice, in a create, a patch or a rotation, is refused whole:
    // JSON leaves open which of the two counts, and a proxy in front may have
    // checked the other one.
    let twice = |body: &str| Some(("application/json", body.to_owned()));
    for (method, path, body, extra) in [
        (
            "POST",
            "/v1/api-keys",
            r#"{"id": "twice", "scopes": ["read"], "scopes": ["admin"]}"#,
            &[][..],
        ),
        (
            "POST",
            "/v1/api-keys",
            r#"{"id": "twice", "quota": {"requests": 1, "per": "day", "requests": 9}}"#,
            &[][..],
        ),
        (
            "PATCH",
            "/v1/api-keys/reader",
            r#"{"owner": "first", "owner": "second"}"#,
            &[("if-match", etag.as_str())][..],
        ),
        (
            "POST",
            "/v1/api-keys/reader/rotate",
            r#"{"id": "reader-2", "id": "reader-3"}"#,
            &[][..],
        ),
    ] {
        let reply = s
            .call(method, path, Some("root-secret"), twice(body), extra)
            .await;
        problem(&reply, 422, "validation");
        let detail = reply.body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("appears twice"), "{}", reply.body);
    }
    for id in ["twice", "reader-2", "reader-3"] {
        let reply = s.get(&format!("/v1/api-keys/{id}"), "root-secret").await;
        assert_eq!(reply.status, 404, "{id} was not created");
    }
    let reader = s.get("/v1/api-keys/reader", "root-secret").await;
    assert_eq!(
        reader.headers["etag"].to_str().unwrap(),
        etag,
        "reader was not changed"
    );
    let plain_json = s
        .call(
            "PATCH",
            "/v1/api-keys/reader",
            Some("root-secret"),
            Some(("application/json", json!({"owner": "o"}).to_string())),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(plain_json.status, 200, "application/json is accepted too");
    for limit in ["0", "1001", "ten"] {
        problem(
            &s.get(&format!("/v1/api-keys?limit={limit}"), "root-secret")
                .await,
            422,
            "validation",
        );
    }
    problem(
        &s.get("/v1/api-keys?status=sleepy", "root-secret").await,
        422,
        "validation",
    );
    problem(
        &s.get("/v1/api-keys?cursor=zz", "root-secret").await,
        422,
        "validation",
    );
}

#[tokio::test]
async fn pages_follow_the_cursor_and_filters_apply() {
    let s = server().await;
    for i in 0..5 {
        let tenant = if i % 2 == 0 { "even" } else { "odd" };
        assert_eq!(
            s.post(
                "/v1/api-keys",
                "root-secret",
                json!({"id": format!("k{i}"), "tenant": tenant})
            )
            .await
            .status,
            201
        );
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/api-keys?limit=3&cursor={c}"),
            None => "/v1/api-keys?limit=3".to_owned(),
        };
        let page = s.get(&path, "root-secret").await;
        seen.extend(
            page.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["id"].as_str().unwrap().to_owned()),
        );
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["acme-admin", "k0", "k1", "k2", "k3", "k4", "reader", "root"]
    );
    let odd = s.get("/v1/api-keys?tenant=odd", "root-secret").await;
    assert_eq!(odd.body["items"].as_array().unwrap().len(), 2);
    let etag = etag(&s.get("/v1/api-keys/k0", "root-secret").await);
    s.patch("k0", "root-secret", Some(&etag), json!({"disabled": true}))
        .await;
    let disabled = s.get("/v1/api-keys?status=disabled", "root-secret").await;
    assert_eq!(disabled.body["items"][0]["id"], "k0");
    assert_eq!(disabled.body["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_tenant_admin_manages_only_its_tenant() {
    let s = server().await;
    let mine = s
        .post(
            "/v1/api-keys",
            "acme-secret",
            json!({"id": "acme-svc", "scopes": ["read"]}),
        )
        .await;
    assert_eq!(
        (mine.status, &mine.body["tenant"]),
        (201, &json!("acme")),
        "the caller's tenant"
    );
    problem(
        &s.post("/v1/api-keys", "acme-secret", json!({"tenant": "other"}))
            .await,
        403,
        "forbidden",
    );
    s.post(
        "/v1/api-keys",
        "root-secret",
        json!({"id": "other-svc", "tenant": "other"}),
    )
    .await;
    let list = s.get("/v1/api-keys", "acme-secret").await;
    let ids: Vec<&str> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme-admin", "acme-svc"]);
    problem(
        &s.get("/v1/api-keys/other-svc", "acme-secret").await,
        404,
        "not-found",
    );
    problem(
        &s.call(
            "DELETE",
            "/v1/api-keys/other-svc",
            Some("acme-secret"),
            None,
            &[],
        )
        .await,
        404,
        "not-found",
    );
    let etag = etag(&mine);
    problem(
        &s.patch(
            "acme-svc",
            "acme-secret",
            Some(&etag),
            json!({"tenant": "other"}),
        )
        .await,
        403,
        "forbidden",
    );
    problem(
        &s.patch(
            "acme-svc",
            "acme-secret",
            Some(&etag),
            json!({"tenant": null}),
        )
        .await,
        403,
        "forbidden",
    );
}

#[tokio::test]
async fn no_caller_gives_a_scope_it_lacks() {
    let s = server().await;
    // acme-admin holds admin and read, not write.
    problem(
        &s.post("/v1/api-keys", "acme-secret", json!({"scopes": ["write"]}))
            .await,
        403,
        "forbidden",
    );
    let made = s
        .post(
            "/v1/api-keys",
            "root-secret",
            json!({"id": "writer", "scopes": ["write"], "tenant": "acme"}),
        )
        .await;
    problem(
        &s.patch(
            "writer",
            "acme-secret",
            Some(&etag(&made)),
            json!({"owner": "o"}),
        )
        .await,
        403,
        "forbidden",
    );
    problem(
        &s.post("/v1/api-keys/writer/rotate", "acme-secret", json!({}))
            .await,
        403,
        "forbidden",
    );
    let ok = s
        .post("/v1/api-keys", "acme-secret", json!({"scopes": ["read"]}))
        .await;
    assert_eq!(ok.status, 201);
}

/// A scope sent in a body (or stored) may be a secret pasted into the wrong field: a
/// 403 names a scope the caller lacks only when it looks like a name, and never
/// repeats anything else.
#[tokio::test]
async fn a_refused_scope_is_named_only_when_it_looks_like_a_name() {
    let s = server().await;
    // acme-admin holds admin and read, not write.
    let named = s
        .post("/v1/api-keys", "acme-secret", json!({"scopes": ["write"]}))
        .await;
    problem(&named, 403, "forbidden");
    let detail = named.body["detail"].as_str().unwrap();
    assert!(detail.contains("`write`"), "{detail}");
    for pasted in [
        "sk_live_Pasted9",
        "s3cr3t-in-a-scope",
        "x".repeat(40).as_str(),
    ] {
        let refused = s
            .post(
                "/v1/api-keys",
                "acme-secret",
                json!({"scopes": ["read", pasted]}),
            )
            .await;
        problem(&refused, 403, "forbidden");
        let text = refused.body.to_string();
        assert!(!text.contains(pasted), "{text}");
        assert!(text.contains("scope"), "{text}");
    }
}

#[tokio::test]
async fn every_change_survives_a_restart_and_the_file_keeps_its_comments() {
    let s = server().await;
    let created = s
        .post(
            "/v1/api-keys",
            "root-secret",
            json!({"id": "kept", "scopes": ["read"], "expires_at": "2099-01-01T00:00:00Z"}),
        )
        .await;
    let secret = created.body["key"].as_str().unwrap().to_owned();
    let rotated = s
        .post(
            "/v1/api-keys/kept/rotate",
            "root-secret",
            json!({"id": "kept-2"}),
        )
        .await;
    let secret2 = rotated.body["key"].as_str().unwrap().to_owned();
    let reader = s.get("/v1/api-keys/reader", "root-secret").await;
    s.patch(
        "reader",
        "root-secret",
        Some(&etag(&reader)),
        json!({"description": "patched"}),
    )
    .await;
    let file = fs::read_to_string(&s.path).unwrap();
    // Everything the calls did not touch stays byte for byte.
    assert!(file.starts_with("# Keys for the admin tests. This comment must survive every API call.\n\n[[keys]]\nid = \"root\""), "{file}");
    assert!(
        file.contains("# The acme tenant's admin.\n[[keys]]\nid = \"acme-admin\""),
        "{file}"
    );
    assert!(
        file.contains(&format!(
            "sha256 = \"{}\"   # inline comment",
            digest("reader-secret")
        )),
        "{file}"
    );
    assert!(
        file.contains("rotated_from = \"kept\"") && file.contains("created_by = \"root\""),
        "{file}"
    );
    // A new server on the same file: every change is there.
    let (addr, store) = server_on(&s.path).await;
    assert_eq!(common::get_with(addr, "/", Some(&secret)).await.0, 200);
    assert_eq!(common::get_with(addr, "/", Some(&secret2)).await.0, 200);
    let kept2 = store.get("kept-2").unwrap();
    assert_eq!(
        (kept2.rotated_from(), kept2.created_by()),
        (Some("kept"), Some("root"))
    );
    assert_eq!(store.get("reader").unwrap().description(), Some("patched"));
}

#[tokio::test]
async fn fifty_concurrent_creates_lose_none() {
    let s = std::sync::Arc::new(server().await);
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.post(
                    "/v1/api-keys",
                    "root-secret",
                    json!({"id": format!("c{i:02}")}),
                )
                .await
            })
        })
        .collect();
    let mut secrets = Vec::new();
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, 201, "{:?}", reply.body);
        secrets.push(reply.body["key"].as_str().unwrap().to_owned());
    }
    let list = s.get("/v1/api-keys?limit=1000", "root-secret").await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 53);
    for secret in secrets.iter().step_by(7) {
        assert_eq!(s.works(secret).await, 200);
    }
}

#[tokio::test]
async fn a_hand_edit_between_two_calls_survives_both() {
    let s = server().await;
    assert_eq!(
        s.post("/v1/api-keys", "root-secret", json!({"id": "api-1"}))
            .await
            .status,
        201
    );
    // An operator appends a key by hand, with a comment, and saves.
    let mut file = fs::read_to_string(&s.path).unwrap();
    file.push_str("\n# added by hand\n[[keys]]\nid = \"hand\"\nsecret = \"hand-made-secret\"\n");
    fs::write(&s.path, &file).unwrap();
    s.until_works("hand-made-secret", 200).await;
    assert_eq!(
        s.post("/v1/api-keys", "root-secret", json!({"id": "api-2"}))
            .await
            .status,
        201
    );
    let after = fs::read_to_string(&s.path).unwrap();
    assert!(
        after.contains("# added by hand\n[[keys]]\nid = \"hand\"\nsecret = \"hand-made-secret\"\n"),
        "{after}"
    );
    assert!(after.contains("id = \"api-1\"") && after.contains("id = \"api-2\""));
    assert_eq!(s.works("hand-made-secret").await, 200);
    // A file that does not parse is left alone, and the call says why.
    fs::write(&s.path, format!("{after}\n[[keys]\nbroken")).unwrap();
    let refused = s
        .post("/v1/api-keys", "root-secret", json!({"id": "api-3"}))
        .await;
    problem(&refused, 503, "unavailable");
    assert!(
        refused.body["detail"]
            .as_str()
            .unwrap()
            .contains("does not parse"),
        "{:?}",
        refused.body
    );
    assert!(
        fs::read_to_string(&s.path)
            .unwrap()
            .ends_with("[[keys]\nbroken")
    );
}

#[tokio::test]
async fn the_openapi_description_is_served_and_matches_the_router() {
    let s = server().await;
    let spec = s.call("GET", "/v1/openapi.json", None, None, &[]).await;
    assert_eq!(spec.status, 200);
    assert!(spec.body["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = spec.body["paths"].as_object().unwrap();
    let mut routes = Vec::new();
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            routes.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    routes.sort();
    assert_eq!(
        routes,
        [
            "DELETE /v1/api-keys/{id}",
            "GET /v1/api-keys",
            "GET /v1/api-keys/{id}",
            "PATCH /v1/api-keys/{id}",
            "POST /v1/api-keys",
            "POST /v1/api-keys/{id}/rotate",
        ]
    );
    // Every operation it describes is routed: none answers the router's own 404 or
    // 405 (an existing key stands in for `{id}`).
    // DELETE last: it removes the key standing in for `{id}`.
    let mut ordered = routes.clone();
    ordered.rotate_left(1);
    for route in &ordered {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path.replace("{id}", "reader");
        let reply = s.call(method, &path, Some("root-secret"), None, &[]).await;
        assert!(
            ![404, 405].contains(&reply.status),
            "{route}: {}",
            reply.status
        );
    }
    // Its schemas name the resource's fields.
    let resource = &spec.body["components"]["schemas"]["KeyResource"]["properties"];
    for field in [
        "id",
        "scopes",
        "tenant",
        "owner",
        "description",
        "not_before",
        "expires_at",
        "disabled",
        "status",
        "created_at",
        "created_by",
        "rotated_from",
        "usage",
    ] {
        assert!(resource.get(field).is_some(), "KeyResource lacks {field}");
    }
}

// ---- Issue 16: nothing lost, nothing resurrected (the API's contract) ----

/// A server whose store reads the key file through a symlink in another directory,
/// with no file events and polled once a minute: it sees the file as it was at the
/// start, and no change the API writes until its next poll.
#[cfg(unix)]
async fn lagging_server(timeout: Duration) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, initial_file()).unwrap();
    let view = dir.path().join("view");
    fs::create_dir(&view).unwrap();
    std::os::unix::fs::symlink(&path, view.join("keys.toml")).unwrap();
    let store = KeyStore::new();
    let source = FileSource::new(view.join("keys.toml"))
        .with_file_events(false)
        .with_poll_interval(Duration::from_secs(60));
    let name = tower_api_key::KeySource::name(&source);
    store.add_source(source).unwrap();
    let admin = AdminApi::new(store.clone(), Named(FileBackend::new(&path), name))
        .with_apply_timeout(timeout)
        .router();
    let addr = guarded(&store, admin).await;
    Server {
        _dir: dir,
        path,
        addr,
        store,
    }
}

#[tokio::test]
#[cfg(unix)]
async fn a_change_written_but_not_yet_enforced_is_202_with_the_whole_body() {
    let s = lagging_server(Duration::from_millis(300)).await;
    let created = s
        .post(
            "/v1/api-keys",
            "root-secret",
            json!({"id": "late", "scopes": ["read"]}),
        )
        .await;
    assert_eq!(created.status, 202, "{:?}", created.body);
    let secret = created.body["key"]
        .as_str()
        .expect("the secret is not lost");
    assert_eq!(created.body["id"], "late");
    assert_eq!(created.headers["location"], "/v1/api-keys/late");
    let file = fs::read_to_string(&s.path).unwrap();
    assert!(file.contains(&digest(secret)), "written: {file}");
    // Rotation, patch and delete alike: written, answered 202.
    let rotated = s
        .post("/v1/api-keys/late/rotate", "root-secret", json!({}))
        .await;
    assert_eq!(rotated.status, 202, "{:?}", rotated.body);
    assert!(rotated.body["key"].is_string());
    let got = s.get("/v1/api-keys/reader", "root-secret").await;
    let patched = s
        .patch(
            "reader",
            "root-secret",
            Some(&etag(&got)),
            json!({"owner": "o"}),
        )
        .await;
    assert_eq!(patched.status, 202, "{:?}", patched.body);
    assert_eq!(patched.body["owner"], "o");
    // The store still serves `reader` when the DELETE answers.
    let deleted = s.delete("reader", "root-secret", None).await;
    assert_eq!(deleted.status, 202);
    assert!(s.store.get("reader").is_some());
    assert!(
        !fs::read_to_string(&s.path)
            .unwrap()
            .contains("id = \"reader\"")
    );
    // Revoked by this API, not yet applied: gone to the API (404), not a record lost
    // from the store of record (503), though the store still serves it.
    for method in ["GET", "DELETE"] {
        let again = s
            .call(
                method,
                "/v1/api-keys/reader",
                Some("root-secret"),
                None,
                &[],
            )
            .await;
        problem(&again, 404, "not-found");
    }
    assert!(s.store.get("reader").is_some());
}

/// The file backend, saying its keys reach the store through the source `.1`.
struct Named(FileBackend, String);

impl tower_api_key::admin::AdminBackend for Named {
    fn source_name(&self) -> String {
        self.1.clone()
    }
    async fn list(&self) -> Result<Vec<ApiKey>, tower_api_key::admin::BackendError> {
        self.0.list().await
    }
    async fn get(&self, id: &str) -> Result<Option<ApiKey>, tower_api_key::admin::BackendError> {
        self.0.get(id).await
    }
    async fn create(&self, key: ApiKey) -> Result<(), tower_api_key::admin::BackendError> {
        self.0.create(key).await
    }
    async fn update(
        &self,
        key: ApiKey,
        if_match: Option<&str>,
    ) -> Result<(), tower_api_key::admin::BackendError> {
        self.0.update(key, if_match).await
    }
    async fn delete(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(), tower_api_key::admin::BackendError> {
        self.0.delete(id, if_match).await
    }
    async fn rotate(
        &self,
        successor: ApiKey,
        old: ApiKey,
        if_match: Option<&str>,
    ) -> Result<(), tower_api_key::admin::BackendError> {
        self.0.rotate(successor, old, if_match).await
    }
}

/// A backend that writes through the file backend, then reports the outcome as
/// unknown (as a store of record that timed out after the write went out would).
#[derive(Clone)]
struct Unsure(FileBackend);

impl tower_api_key::admin::AdminBackend for Unsure {
    fn source_name(&self) -> String {
        self.0.source_name()
    }
    async fn list(&self) -> Result<Vec<ApiKey>, tower_api_key::admin::BackendError> {
        self.0.list().await
    }
    async fn get(&self, id: &str) -> Result<Option<ApiKey>, tower_api_key::admin::BackendError> {
        self.0.get(id).await
    }
    async fn create(&self, key: ApiKey) -> Result<(), tower_api_key::admin::BackendError> {
        self.0.create(key).await?;
        Err(tower_api_key::admin::BackendError::OutcomeUnknown(
            "timed out after EVALSHA 0123abcd at /secret/path".into(),
        ))
    }
    async fn update(
        &self,
        key: ApiKey,
        if_match: Option<&str>,
    ) -> Result<(), tower_api_key::admin::BackendError> {
        self.0.update(key, if_match).await
    }
    async fn delete(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(), tower_api_key::admin::BackendError> {
        self.0.delete(id, if_match).await?;
        Err(tower_api_key::admin::BackendError::Unavailable(
            "broken pipe at /secret/path".into(),
        ))
    }
    async fn rotate(
        &self,
        successor: ApiKey,
        old: ApiKey,
        if_match: Option<&str>,
    ) -> Result<(), tower_api_key::admin::BackendError> {
        self.0.rotate(successor, old, if_match).await
    }
}

#[tokio::test]
async fn an_unknown_outcome_is_504_naming_the_key_to_look_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, initial_file()).unwrap();
    let store = KeyStore::new();
    store.add_source(FileSource::new(&path)).unwrap();
    let app = AdminApi::new(store.clone(), Unsure(FileBackend::new(&path))).router();
    let s = Server {
        _dir: dir,
        path,
        addr: common::serve(app).await,
        store,
    };
    let reply = s.post("/v1/api-keys", "root-secret", json!({})).await;
    problem(&reply, 504, "outcome-unknown");
    let id = reply.body["key_id"].as_str().expect("the id to look up");
    let detail = reply.body["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("/v1/api-keys/{id}")), "{detail}");
    // What the backend said (a path, a script hash) is logged, never sent.
    assert!(
        !detail.contains("/secret/path") && !detail.contains("0123abcd"),
        "{detail}"
    );
    let unavailable = s
        .call(
            "DELETE",
            "/v1/api-keys/reader",
            Some("root-secret"),
            None,
            &[],
        )
        .await;
    problem(&unavailable, 503, "unavailable");
    let detail = unavailable.body["detail"].as_str().unwrap();
    assert!(!detail.contains("/secret/path"), "{detail}");
}

#[tokio::test]
async fn a_tenant_admin_cannot_delete_or_rotate_a_key_with_scopes_it_lacks() {
    let s = server().await;
    // acme-admin holds admin and read; this acme key holds write.
    let made = s
        .post(
            "/v1/api-keys",
            "root-secret",
            json!({"id": "acme-writer", "scopes": ["write"], "tenant": "acme"}),
        )
        .await;
    assert_eq!(made.status, 201);
    problem(
        &s.call(
            "DELETE",
            "/v1/api-keys/acme-writer",
            Some("acme-secret"),
            None,
            &[],
        )
        .await,
        403,
        "forbidden",
    );
    problem(
        &s.post("/v1/api-keys/acme-writer/rotate", "acme-secret", json!({}))
            .await,
        403,
        "forbidden",
    );
    assert!(s.store.get("acme-writer").is_some(), "still there");
    assert_eq!(
        s.get("/v1/api-keys/acme-writer", "root-secret")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn problem_details_name_no_file_path() {
    let s = server().await;
    fs::write(&s.path, "[[keys]\nbroken").unwrap();
    let refused = s.post("/v1/api-keys", "root-secret", json!({})).await;
    problem(&refused, 503, "unavailable");
    let detail = refused.body["detail"].as_str().unwrap();
    let dir = s.path.parent().unwrap().to_str().unwrap();
    assert!(!detail.contains(dir), "{detail}");
    assert!(detail.contains("does not parse"), "{detail}");
}

#[tokio::test]
async fn odd_paths_answer_problem_documents() {
    let s = server().await;
    for path in [
        "/v1/api-keys/%FF",
        "/v1/api-keys/%FF/rotate",
        "/v1/api-keys//rotate",
        "/v1/api-keys/",
        "/v1/api-keys//",
    ] {
        for method in ["GET", "DELETE", "PATCH", "POST"] {
            let reply = s.call(method, path, Some("root-secret"), None, &[]).await;
            assert!(
                [400, 404, 405, 415].contains(&reply.status),
                "{method} {path}: {}",
                reply.status
            );
            assert_eq!(
                reply.headers["content-type"], "application/problem+json",
                "{method} {path}: {:?}",
                reply.body
            );
        }
    }
}

#[tokio::test]
async fn if_match_follows_rfc_9110() {
    let s = server().await;
    let current = etag(&s.get("/v1/api-keys/reader", "root-secret").await);
    // `*` matches any current representation.
    let star = s
        .patch("reader", "root-secret", Some("*"), json!({"owner": "a"}))
        .await;
    assert_eq!(star.status, 200, "{:?}", star.body);
    let current = {
        assert_ne!(etag(&star), current);
        etag(&star)
    };
    // A weak tag never matches under strong comparison.
    let weak = format!("W/{current}");
    problem(
        &s.patch("reader", "root-secret", Some(&weak), json!({"owner": "b"}))
            .await,
        412,
        "precondition-failed",
    );
    // A list matches if any member does.
    let list = format!("\"nope\", {current}");
    let listed = s
        .patch("reader", "root-secret", Some(&list), json!({"owner": "c"}))
        .await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    problem(
        &s.patch(
            "reader",
            "root-secret",
            Some("\"a\", \"b\""),
            json!({"owner": "d"}),
        )
        .await,
        412,
        "precondition-failed",
    );
    // Delete and rotate take the same header.
    let now = etag(&s.get("/v1/api-keys/reader", "root-secret").await);
    let rotated = s
        .call(
            "POST",
            "/v1/api-keys/reader/rotate",
            Some("root-secret"),
            None,
            &[("if-match", &format!("W/\"x\", {now}"))],
        )
        .await;
    assert_eq!(rotated.status, 201, "{:?}", rotated.body);
    let deleted = s
        .call(
            "DELETE",
            "/v1/api-keys/reader",
            Some("root-secret"),
            None,
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(deleted.status, 204);
    // `*` with no current representation fails.
    problem(
        &s.call(
            "DELETE",
            "/v1/api-keys/reader",
            Some("root-secret"),
            None,
            &[("if-match", "*")],
        )
        .await,
        404,
        "not-found",
    );
}

#[tokio::test]
async fn rotation_names_the_successor_after_the_old_key() {
    let s = server().await;
    s.post("/v1/api-keys", "root-secret", json!({"id": "billing"}))
        .await;
    let first = s
        .post("/v1/api-keys/billing/rotate", "root-secret", json!({}))
        .await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.body["id"], "billing-r2");
    let second = s
        .post("/v1/api-keys/billing-r2/rotate", "root-secret", json!({}))
        .await;
    assert_eq!(second.body["id"], "billing-r3");
    // Taken: the next free one.
    s.post("/v1/api-keys", "root-secret", json!({"id": "reader-r2"}))
        .await;
    let taken = s
        .post("/v1/api-keys/reader/rotate", "root-secret", json!({}))
        .await;
    assert_eq!(taken.body["id"], "reader-r3");
    // A revoked id does not come back naming another key: derived ids skip it, a
    // given one is refused.
    let deleted = s
        .call(
            "DELETE",
            "/v1/api-keys/billing-r3",
            Some("root-secret"),
            None,
            &[],
        )
        .await;
    assert_eq!(deleted.status, 204);
    let after = s
        .post("/v1/api-keys/billing-r2/rotate", "root-secret", json!({}))
        .await;
    assert_eq!(after.body["id"], "billing-r4");
    problem(
        &s.post("/v1/api-keys", "root-secret", json!({"id": "billing-r3"}))
            .await,
        409,
        "conflict",
    );
    // An explicit id is used as it is.
    let named = s
        .post(
            "/v1/api-keys/reader-r3/rotate",
            "root-secret",
            json!({"id": "reader-2027"}),
        )
        .await;
    assert_eq!(named.body["id"], "reader-2027");
}

#[tokio::test]
async fn the_openapi_document_says_what_the_server_does() {
    let s = server().await;
    let spec = s
        .call("GET", "/v1/openapi.json", None, None, &[])
        .await
        .body;
    // Every error is a problem document, and every operation may answer the guard's
    // 429 (an admin key over its rate limit).
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let limited = &op["responses"]["429"];
            assert!(
                limited["headers"]["Retry-After"].is_object(),
                "{method} {path}: no 429 with Retry-After"
            );
            for (status, response) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    let content = response["content"].as_object().unwrap();
                    assert_eq!(
                        content.keys().collect::<Vec<_>>(),
                        ["application/problem+json"],
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
    let list = &spec["paths"]["/v1/api-keys"]["get"]["parameters"];
    let resolve = |schema: &Value| match schema["$ref"].as_str() {
        Some(at) => spec["components"]["schemas"][at.rsplit('/').next().unwrap()].clone(),
        None => schema.clone(),
    };
    let param = |name: &str| {
        let schema = &list
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["schema"];
        // An optional parameter's schema may be `oneOf: [null, $ref]`.
        match schema["oneOf"].as_array() {
            Some(options) => resolve(options.iter().find(|o| o.get("$ref").is_some()).unwrap()),
            None => resolve(schema),
        }
    };
    assert_eq!(param("limit")["minimum"], 1);
    assert_eq!(param("limit")["maximum"], 1000);
    assert_eq!(
        param("status")["enum"],
        json!(["active", "expired", "not_yet_valid", "disabled"])
    );
    let create = &spec["components"]["schemas"]["CreateRequest"]["properties"];
    assert!(create["prefix"]["pattern"].is_string(), "{create}");
    assert!(create["id"]["maxLength"].is_number(), "{create}");
    assert_eq!(create["expires_at"]["format"], "date-time");
    // The ETag of a created key leads to the PATCH that needs it.
    let links = &spec["paths"]["/v1/api-keys"]["post"]["responses"]["201"]["links"];
    let patch = links
        .as_object()
        .unwrap()
        .values()
        .find(|l| l["operationId"] == "patch_key")
        .expect("a link to patch_key");
    assert_eq!(patch["parameters"]["If-Match"], "$response.header.ETag");
}

/// The file backend, with what another writer does around the API's writes: its
/// change to a key saved between the API's read of that key and its first write of
/// it (`before`: a revocation or an edit made through another replica at that
/// moment), or saved right after the API's write or delete of it (`after`); and a
/// delete slow on the wire before it writes (`late_delete`, once) or once written
/// (`slow_delete`).
#[derive(Default)]
struct Interposed {
    inner: Option<FileBackend>,
    before: Option<fn(ApiKey) -> ApiKey>,
    done: std::sync::atomic::AtomicBool,
    after: Option<fn(&str) -> ApiKey>,
    slow_delete: Duration,
    late_delete: std::sync::Arc<std::sync::Mutex<Option<Duration>>>,
    /// Every delete refused, nothing written (the store of record down).
    refuse_delete: bool,
    /// Every delete written, its answer lost (504).
    unsure_delete: bool,
}

use tower_api_key::admin::AdminBackend as _;

impl Interposed {
    fn inner(&self) -> &FileBackend {
        self.inner.as_ref().unwrap()
    }

    async fn meanwhile(&self, id: &str) {
        if let Some(change) = self.before
            && !self.done.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let now = self.inner().get(id).await.unwrap().unwrap();
            self.inner().update(change(now), None).await.unwrap();
        }
    }

    async fn after(&self, id: &str) {
        if let Some(change) = self.after {
            let key = change(id);
            match self.inner().get(id).await.unwrap() {
                Some(_) => self.inner().update(key, None).await.unwrap(),
                None => self.inner().create(key).await.unwrap(),
            }
        }
    }
}

impl tower_api_key::admin::AdminBackend for Interposed {
    fn source_name(&self) -> String {
        self.inner().source_name()
    }
    async fn list(&self) -> Result<Vec<ApiKey>, tower_api_key::admin::BackendError> {
        self.inner().list().await
    }
    async fn get(&self, id: &str) -> Result<Option<ApiKey>, tower_api_key::admin::BackendError> {
        self.inner().get(id).await
    }
    async fn create(&self, key: ApiKey) -> Result<(), tower_api_key::admin::BackendError> {
        self.inner().create(key).await
    }
    async fn update(
        &self,
        key: ApiKey,
        if_match: Option<&str>,
    ) -> Result<(), tower_api_key::admin::BackendError> {
        let id = key.id().to_owned();
        self.meanwhile(&id).await;
        self.inner().update(key, if_match).await?;
        self.after(&id).await;
        Ok(())
    }
    async fn delete(
        &self,
        id: &str,
        if_match: Option<&str>,
    ) -> Result<(), tower_api_key::admin::BackendError> {
        self.meanwhile(id).await;
        if self.refuse_delete {
            let down = std::io::Error::other("the store of record is down");
            return Err(tower_api_key::admin::BackendError::Unavailable(Box::new(
                down,
            )));
        }
        let late = self.late_delete.lock().unwrap().take();
        if let Some(late) = late {
            tokio::time::sleep(late).await;
        }
        self.inner().delete(id, if_match).await?;
        if self.unsure_delete {
            let lost = std::io::Error::other("the answer was lost");
            return Err(tower_api_key::admin::BackendError::OutcomeUnknown(
                Box::new(lost),
            ));
        }
        self.after(id).await;
        tokio::time::sleep(self.slow_delete).await;
        Ok(())
    }
    async fn rotate(
        &self,
        successor: ApiKey,
        old: ApiKey,
        if_match: Option<&str>,
    ) -> Result<(), tower_api_key::admin::BackendError> {
        self.meanwhile(old.id()).await;
        self.inner().rotate(successor, old, if_match).await
    }
}

/// A server whose API writes through `backend` (`inner` set here).
async fn interposed_with(mut backend: Interposed) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    fs::write(&path, initial_file()).unwrap();
    let store = KeyStore::new();
    store.add_source(FileSource::new(&path)).unwrap();
    backend.inner = Some(FileBackend::new(&path));
    let addr = guarded(&store, AdminApi::new(store.clone(), backend).router()).await;
    Server {
        _dir: dir,
        path,
        addr,
        store,
    }
}

async fn interposed(change: fn(ApiKey) -> ApiKey) -> Server {
    interposed_with(Interposed {
        before: Some(change),
        ..Interposed::default()
    })
    .await
}

/// A tester's finding: a rotation without `If-Match` wrote the old key back,
/// shortened, from its own read, so a revocation saved between that read and the
/// write was undone: both calls answered 2xx and the revoked secret worked again
/// (on the file, PostgreSQL and Redis backends alike). The old key is now written
/// only if it is still the record read; otherwise the rotation is made again on top.
#[tokio::test]
async fn a_rotation_never_undoes_a_revocation_saved_meanwhile() {
    let s = interposed(|key| key.with_disabled(true)).await;
    let reply = s
        .post("/v1/api-keys/reader/rotate", "root-secret", json!({}))
        .await;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    let successor = reply.body["key"].as_str().unwrap().to_owned();
    assert_eq!(s.works("reader-secret").await, 401, "the revocation stands");
    let now = s.get("/v1/api-keys/reader", "root-secret").await;
    assert_eq!(now.body["disabled"], true, "{:?}", now.body);
    assert_eq!(s.works(&successor).await, 200);
    let text = fs::read_to_string(&s.path).unwrap();
    let set = FileSource::parse(&s.path, text.as_bytes()).unwrap();
    assert!(set.get("reader").unwrap().is_disabled(), "{text}");

    // Naming the version read makes the caller's condition: 412, nothing written.
    let s = interposed(|key| key.with_disabled(true)).await;
    let tag = etag(&s.get("/v1/api-keys/reader", "root-secret").await);
    let reply = s
        .call(
            "POST",
            "/v1/api-keys/reader/rotate",
            Some("root-secret"),
            None,
            &[("if-match", &tag)],
        )
        .await;
    problem(&reply, 412, "precondition-failed");
    assert_eq!(s.works("reader-secret").await, 401);
}

/// `If-Match: *` holds while the key exists (RFC 9110): another writer's change
/// saved meanwhile is kept, and the patch applied on top of it, not answered 412.
#[tokio::test]
async fn if_match_any_is_applied_on_top_of_a_change_saved_meanwhile() {
    let s = interposed(|key| key.with_owner("someone")).await;
    let reply = s
        .patch(
            "reader",
            "root-secret",
            Some("*"),
            json!({"description": "reads"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let now = s.get("/v1/api-keys/reader", "root-secret").await;
    assert_eq!(now.body["owner"], "someone", "{:?}", now.body);
    assert_eq!(now.body["description"], "reads", "{:?}", now.body);

    let s = interposed(|key| key.with_owner("someone")).await;
    let reply = s
        .call(
            "DELETE",
            "/v1/api-keys/reader",
            Some("root-secret"),
            None,
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert_eq!(s.works("reader-secret").await, 401);
}

/// A tester's finding: a value sent in a field of the wrong type was quoted back in
/// the 422 (`invalid type: string "tak_…", expected a sequence`), so a secret pasted
/// into the wrong field reached the caller's logs. The kind of value is named, never
/// the value.
#[tokio::test]
async fn a_value_of_the_wrong_type_is_not_quoted_back() {
    let s = server().await;
    let secret = "tak_PASTEDSECRET0123456789";
    let etag = etag(&s.get("/v1/api-keys/reader", "root-secret").await);
    let mut replies = Vec::new();
    for body in [
        json!({"id": "x", "scopes": secret}),
        json!({"id": "x", "owner": {"k": "v"}, "tenant": secret}),
        json!({"id": "x", "rate_limits": [{"name": "r", "requests": secret, "per": "1s"}]}),
        json!({"id": "x", "expires_at": secret}),
        // A name that is not checked yet, beside a `per` that does not parse.
        json!({"id": "x", "rate_limits": [{"name": secret, "requests": 1, "per": "soon"}]}),
        // A secret sent as a member's name.
        json!({"id": "x", secret: true}),
    ] {
        replies.push(s.post("/v1/api-keys", "root-secret", body).await);
    }
    replies.push(
        s.post(
            "/v1/api-keys/reader/rotate",
            "root-secret",
            json!({"overlap_seconds": secret}),
        )
        .await,
    );
    replies.push(
        s.patch(
            "reader",
            "root-secret",
            Some(&etag),
            json!({"scopes": secret}),
        )
        .await,
    );
    replies.push(
        s.patch(
            "reader",
            "root-secret",
            Some(&etag),
            json!({"description": [secret]}),
        )
        .await,
    );
    // The same member twice (parsed before serde sees it).
    replies.push(
        s.call(
            "POST",
            "/v1/api-keys",
            Some("root-secret"),
            Some((
                "application/json",
                format!(r#"{{"id": "x", "{secret}": 1, "{secret}": 2}}"#),
            )),
            &[],
        )
        .await,
    );
    // A misspelt field is still named.
    let misspelt = s
        .post(
            "/v1/api-keys",
            "root-secret",
            json!({"id": "x", "scope": ["read"]}),
        )
        .await;
    assert_eq!(misspelt.status, 422);
    assert!(
        misspelt.body.to_string().contains("`scope`"),
        "{:?}",
        misspelt.body
    );
    for reply in replies {
        assert!(
            reply.status == 422 || reply.status == 400,
            "{} {:?}",
            reply.status,
            reply.body
        );
        let text = reply.body.to_string();
        assert!(!text.contains("PASTEDSECRET"), "{text}");
    }
}

/// An attacker's finding: a rotation that picked its successor's id while a delete
/// of that id was written but not yet answered took the id again (`reader-r2`,
/// revoked a moment before, back in use under a new secret), and the delete then
/// waited its whole timeout for the id to go and answered 202. The id is now kept
/// from reuse from the moment the delete is sent.
#[tokio::test]
async fn a_rotation_never_takes_the_id_a_delete_under_way_revokes() {
    let s = interposed_with(Interposed {
        slow_delete: Duration::from_millis(600),
        ..Interposed::default()
    })
    .await;
    let first = s
        .post("/v1/api-keys/reader/rotate", "root-secret", json!({}))
        .await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.body["id"], "reader-r2");
    let delete = s.delete("reader-r2", "root-secret", Some("*"));
    let rotate = async {
        // The delete is written by now, its answer held back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.post("/v1/api-keys/reader/rotate", "root-secret", json!({}))
            .await
    };
    let (deleted, rotated) = tokio::join!(delete, rotate);
    assert_eq!(rotated.status, 201, "{:?}", rotated.body);
    assert_ne!(rotated.body["id"], "reader-r2", "a revoked id taken again");
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    let gone = s.get("/v1/api-keys/reader-r2", "root-secret").await;
    assert_eq!(gone.status, 404, "{:?}", gone.body);
}

/// An attacker's finding: a change written and then, before this server's store
/// read it, overtaken by another writer's (a patch with `If-Match: *` and another
/// patch; a delete and a create of the same id) was never seen served as written,
/// so the call waited its whole timeout and answered 202 ("not yet enforced")
/// though the store was past it. It now answers as enforced once the store serves
/// what the backend holds.
#[tokio::test]
async fn a_change_overtaken_before_the_store_read_it_is_answered_as_enforced() {
    fn theirs(id: &str) -> ApiKey {
        ApiKey::new(id, format!("{id}-theirs"))
            .with_scopes(["read"])
            .with_description("theirs")
    }
    let s = interposed_with(Interposed {
        after: Some(theirs),
        ..Interposed::default()
    })
    .await;
    let patched = s
        .patch(
            "reader",
            "root-secret",
            Some("*"),
            json!({"description": "ours"}),
        )
        .await;
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    assert_eq!(s.works("reader-theirs").await, 200);
    let deleted = s.delete("reader", "root-secret", None).await;
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    assert_eq!(s.works("reader-theirs").await, 200, "created again after");
}

/// A reviewer's finding on the fix above: two deletes of one id at once (a client's
/// retry), the first slow on the wire, the second overtaking it. The first then found
/// nothing to delete, took back the note the second relied on, and the id was free
/// again for a rotation's successor. A note is never taken back now.
#[tokio::test]
async fn a_retried_delete_keeps_the_id_from_reuse() {
    let late_delete = std::sync::Arc::default();
    let s = interposed_with(Interposed {
        late_delete: std::sync::Arc::clone(&late_delete),
        ..Interposed::default()
    })
    .await;
    let first = s
        .post("/v1/api-keys/reader/rotate", "root-secret", json!({}))
        .await;
    assert_eq!(first.body["id"], "reader-r2", "{:?}", first.body);
    *late_delete.lock().unwrap() = Some(Duration::from_millis(500));
    let delete = || s.delete("reader-r2", "root-secret", Some("*"));
    let retry = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        delete().await
    };
    let (slow, retried) = tokio::join!(delete(), retry);
    assert_eq!(retried.status, 204, "{:?}", retried.body);
    assert_eq!(slow.status, 404, "{:?}", slow.body);
    let again = s
        .post("/v1/api-keys/reader/rotate", "root-secret", json!({}))
        .await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert_ne!(again.body["id"], "reader-r2", "a revoked id taken again");
}

/// A reviewer's finding on the fix above: a delete refused with nothing written (503)
/// noted its id as revoked all the same, so the API then took the key for revoked:
/// a `POST` naming that id, once the key was gone by other means, was refused as "a
/// key revoked lately" (409), and a key lost from the store of record while the
/// store still served it was "not found" rather than `store-missing`. Only a delete
/// written counts as a revocation now; one under way only keeps the id from
/// rotations.
#[tokio::test]
async fn a_delete_refused_is_no_revocation() {
    let s = interposed_with(Interposed {
        refuse_delete: true,
        ..Interposed::default()
    })
    .await;
    let refused = s.delete("reader", "root-secret", None).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert_eq!(s.works("reader-secret").await, 200);
    // The key taken out of the file by hand.
    let text = fs::read_to_string(&s.path).unwrap();
    let at = text.find("[[keys]]\nid = \"reader\"").unwrap();
    fs::write(&s.path, &text[..at]).unwrap();
    s.until_works("reader-secret", 401).await;
    let created = s
        .post("/v1/api-keys", "root-secret", json!({"id": "reader"}))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
}

/// A reviewer's finding on the fix above: a delete written whose answer was lost
/// (504) was not taken for a revocation; retried, it found nothing (404), and a
/// `POST` naming the id then made a new key under it (201). A delete whose outcome
/// is unknown counts as one.
#[tokio::test]
async fn a_delete_whose_answer_was_lost_is_a_revocation() {
    let s = interposed_with(Interposed {
        unsure_delete: true,
        ..Interposed::default()
    })
    .await;
    let lost = s.delete("reader", "root-secret", None).await;
    assert_eq!(lost.status, 504, "{:?}", lost.body);
    s.until_works("reader-secret", 401).await;
    let retried = s.delete("reader", "root-secret", None).await;
    assert_eq!(retried.status, 404, "{:?}", retried.body);
    let created = s
        .post("/v1/api-keys", "root-secret", json!({"id": "reader"}))
        .await;
    assert_eq!(created.status, 409, "{:?}", created.body);
}
