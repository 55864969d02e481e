//! `oneshot` tests of every branch of `ApiKeyService`, with no network.
#![allow(clippy::unwrap_used)]

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use http::{Request, Response, StatusCode};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_api_key::{
    ApiKey, ApiKeyLayer, ApiKeyService, KeyInfo, KeyLocation, KeySet, Rejection, ResponseFuture,
};

type Body = String;

/// A service that counts its calls and answers with the key id it was given.
fn echo(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone {
    service_fn(move |req: Request<Body>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let id = req.extensions().get::<KeyInfo>().map(|k| k.id().to_owned());
        let auth =
            req.headers().contains_key("authorization") || req.headers().contains_key("x-api-key");
        async move { Ok::<_, Infallible>(Response::new(format!("{}|{auth}", id.unwrap_or_default()))) }
    })
}

fn keys() -> KeySet {
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    KeySet::from_keys([
        ApiKey::new("plain", "plain-key"),
        ApiKey::new("admin", "admin-key").with_scopes(["admin", "read"]),
        ApiKey::new("off", "disabled-key").with_disabled(true),
        ApiKey::new("old", "expired-key").with_expires_at(now - hour),
        ApiKey::new("future", "future-key").with_not_before(now + hour),
        ApiKey::new("current", "current-key")
            .with_not_before(now - hour)
            .with_expires_at(now + hour),
    ])
    .unwrap()
}

fn request(headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::get("/");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    // gRPC runs over HTTP/2; whatever else claims a gRPC content type is HTTP.
    let grpc = headers
        .iter()
        .any(|(n, v)| *n == "content-type" && v.starts_with("application/grpc"));
    if grpc {
        req = req.version(http::Version::HTTP_2);
    }
    req.body(Body::new()).unwrap()
}

async fn call(layer: &ApiKeyLayer, headers: &[(&str, &str)]) -> (Response<Body>, usize) {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(echo(calls.clone()));
    let res = svc.oneshot(request(headers)).await.unwrap();
    (res, calls.load(Ordering::SeqCst))
}

fn rejection(res: &Response<Body>) -> String {
    format!(
        "{:?}",
        res.extensions()
            .get::<Rejection>()
            .expect("a Rejection in the extensions")
    )
}

#[tokio::test]
async fn accepted_keys_reach_the_inner_service_with_key_info() {
    let layer = ApiKeyLayer::new(keys());
    for (headers, id) in [
        (&[("x-api-key", "plain-key")][..], "plain"),
        (&[("authorization", "Bearer admin-key")], "admin"),
        (&[("authorization", "Bearer current-key")], "current"),
        (
            &[
                ("authorization", "Bearer plain-key"),
                ("x-api-key", "plain-key"),
            ],
            "plain",
        ),
    ] {
        let (res, calls) = call(&layer, headers).await;
        assert_eq!(res.status(), StatusCode::OK, "{headers:?}");
        assert_eq!(res.into_body(), format!("{id}|true"));
        assert_eq!(calls, 1);
    }
}

/// A layer, the request's headers, the expected status and reason.
type Case<'a> = (&'a ApiKeyLayer, &'a [(&'a str, &'a str)], u16, &'a str);

#[tokio::test]
async fn every_refusal_has_its_status_reason_and_skips_the_inner_service() {
    let layer = ApiKeyLayer::new(keys());
    let admin = layer.require_scope("admin");
    let cases: [Case<'_>; 8] = [
        (&layer, &[], 401, "Missing"),
        (&layer, &[("authorization", "Bearer")], 401, "Malformed"),
        (
            &layer,
            &[
                ("x-api-key", "plain-key"),
                ("authorization", "Bearer admin-key"),
            ],
            401,
            "Conflicting",
        ),
        (&layer, &[("x-api-key", "nope")], 401, "Unknown"),
        (&layer, &[("x-api-key", "disabled-key")], 401, "Disabled"),
        (&layer, &[("x-api-key", "expired-key")], 401, "Expired"),
        (&layer, &[("x-api-key", "future-key")], 401, "NotYetValid"),
        (
            &admin,
            &[("x-api-key", "plain-key")],
            403,
            "InsufficientScope",
        ),
    ];
    for (layer, headers, status, reason) in cases {
        let (res, calls) = call(layer, headers).await;
        assert_eq!(res.status().as_u16(), status, "{headers:?}");
        assert!(
            rejection(&res).starts_with(reason),
            "{headers:?}: {}",
            rejection(&res)
        );
        assert!(
            res.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer realm=\"api\"")
        );
        assert_eq!(calls, 0, "the inner service must not run for {reason}");
    }
    let (res, _) = call(&admin, &[("x-api-key", "admin-key")]).await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn rejections_name_the_matched_key() {
    let layer = ApiKeyLayer::new(keys());
    let (res, _) = call(&layer, &[("x-api-key", "expired-key")]).await;
    let rejection = res.extensions().get::<Rejection>().unwrap();
    assert_eq!(rejection.key().unwrap().id(), "old");
    assert_eq!(rejection.to_string(), "API key expired (key `old`)");
}

#[tokio::test]
async fn grpc_requests_get_a_trailers_only_status() {
    let layer = ApiKeyLayer::new(keys());
    let admin = layer.require_scope("admin");
    let grpc = [("content-type", "application/grpc+proto")];
    let (res, _) = call(&layer, &grpc).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["grpc-status"], "16");
    assert_eq!(res.headers()["content-type"], "application/grpc");
    assert_eq!(res.headers()["grpc-message"], "API key required");
    assert!(res.headers().get("www-authenticate").is_none());
    assert!(res.body().is_empty());
    let (res, _) = call(&admin, &[grpc[0], ("x-api-key", "plain-key")]).await;
    assert_eq!(res.headers()["grpc-status"], "7");
}

#[tokio::test]
async fn only_real_grpc_calls_get_a_grpc_status() {
    let layer = ApiKeyLayer::new(keys());
    for content_type in [
        "application/grpcfoo",
        "application/grpc-web",
        "application/grpc-web+proto",
    ] {
        let (res, _) = call(&layer, &[("content-type", content_type)]).await;
        assert_eq!(res.status(), 401, "{content_type}");
        assert!(res.headers().get("grpc-status").is_none(), "{content_type}");
    }
    // The exact type, but over HTTP/1.1: not gRPC either.
    let mut req = request(&[("content-type", "application/grpc")]);
    *req.version_mut() = http::Version::HTTP_11;
    let res = ServiceBuilder::new()
        .layer(layer)
        .service(echo(Arc::default()))
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().get("grpc-status").is_none());
}

#[tokio::test]
async fn custom_rejection_for_http_but_grpc_keeps_its_status() {
    let layer = ApiKeyLayer::new(keys()).with_rejection(|r: &Rejection| {
        let mut res = Response::new(format!(r#"{{"error":"{r}"}}"#));
        *res.status_mut() = r.status();
        res
    });
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(echo(Arc::default()));
    let res = svc
        .clone()
        .oneshot(request(&[("x-api-key", "nope")]))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.extensions().get::<Rejection>().is_some());
    assert_eq!(res.into_body(), r#"{"error":"invalid API key"}"#);
    let res = svc
        .oneshot(request(&[("content-type", "application/grpc")]))
        .await
        .unwrap();
    assert_eq!(res.headers()["grpc-status"], "16");
    assert!(res.body().is_empty());
}

#[tokio::test]
async fn key_locations_and_hidden_credentials() {
    let bearer = ApiKeyLayer::new(keys()).bearer_only();
    assert_eq!(
        call(&bearer, &[("x-api-key", "plain-key")])
            .await
            .0
            .status(),
        401
    );
    assert_eq!(
        call(&bearer, &[("authorization", "Bearer plain-key")])
            .await
            .0
            .status(),
        200
    );

    let custom = ApiKeyLayer::new(keys()).header_only("X-Token");
    assert_eq!(
        call(&custom, &[("x-token", "plain-key")]).await.0.status(),
        200
    );
    assert_eq!(
        call(&custom, &[("authorization", "Bearer plain-key")])
            .await
            .0
            .status(),
        401
    );

    let both = ApiKeyLayer::new(keys())
        .with_key_locations([KeyLocation::x_api_key(), KeyLocation::Bearer])
        .hide_credentials(true);
    let (res, _) = call(&both, &[("x-api-key", "plain-key")]).await;
    assert_eq!(res.into_body(), "plain|false");
}

#[tokio::test]
async fn any_header_bytes_get_an_answer_not_a_panic() {
    let layer = ApiKeyLayer::new(keys());
    for b in 0u8..=255 {
        let Ok(value) =
            http::HeaderValue::from_bytes(&[b'B', b'e', b'a', b'r', b'e', b'r', b' ', b, b'x'])
        else {
            continue;
        };
        let mut req = request(&[]);
        req.headers_mut().insert("authorization", value.clone());
        req.headers_mut().insert("x-api-key", value);
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service(echo(Arc::default()));
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 401);
    }
}

#[tokio::test]
async fn an_empty_key_set_refuses_everything() {
    let layer = ApiKeyLayer::new(KeySet::new());
    assert_eq!(layer.store().version(), 1);
    assert_eq!(
        call(&layer, &[("x-api-key", "plain-key")]).await.0.status(),
        401
    );
}

#[tokio::test]
async fn a_key_switches_off_at_its_expiry_without_any_reload() {
    let expires = SystemTime::now() + Duration::from_millis(300);
    let layer = ApiKeyLayer::new(
        KeySet::from_keys([ApiKey::new("soon", "soon-key").with_expires_at(expires)]).unwrap(),
    );
    let before = call(&layer, &[("x-api-key", "soon-key")]).await.0.status();
    // On a loaded machine the call may end after the instant; one that ended before
    // it must have been let in.
    if SystemTime::now() < expires {
        assert_eq!(before, 200);
    }
    // Wait on the wall clock itself, not on a guess of how long sleeping takes.
    while SystemTime::now() <= expires {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (res, _) = call(&layer, &[("x-api-key", "soon-key")]).await;
    assert_eq!(res.status(), 401);
    assert!(rejection(&res).starts_with("Expired"));
    assert_eq!(layer.store().version(), 1);
}

#[tokio::test]
async fn usage_counts_the_requests_let_in() {
    let layer = ApiKeyLayer::new(keys());
    for _ in 0..5 {
        call(&layer, &[("x-api-key", "plain-key")]).await;
    }
    call(&layer, &[("x-api-key", "admin-key")]).await;
    call(&layer, &[("x-api-key", "expired-key")]).await;
    let count = |id: &str| layer.store().usage_of(id).unwrap().requests();
    assert_eq!(
        (count("plain"), count("admin"), count("old"), count("off")),
        (5, 1, 0, 0)
    );
    let store = layer.store();
    let plain = store.usage_of("plain").unwrap();
    let age = SystemTime::now()
        .duration_since(plain.last_used().unwrap())
        .unwrap();
    assert!(age < Duration::from_secs(5), "{age:?}");
    assert!(store.usage_of("off").unwrap().last_used().is_none());
    assert_eq!(store.usage().len(), 6);
}

#[test]
fn debug_output_holds_no_key_material() {
    let layer = ApiKeyLayer::new(
        KeySet::from_keys([ApiKey::new("visible-id", "hidden-secret-value")]).unwrap(),
    );
    let svc: ApiKeyService<()> = tower::Layer::layer(&layer, ());
    let store = layer.store();
    let text = format!(
        "{layer:?} {svc:?} {store:?} {:?} {:?}",
        store.keys(),
        store.usage()
    );
    assert!(!text.contains("hidden-secret-value"), "{text}");
    assert!(format!("{:?}", store.keys()).contains("visible-id"));
    assert!(format!("{store:?}").contains("keys: 1"));
}

#[test]
fn the_service_and_future_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}
    type Inner = tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;
    assert_send_sync::<ApiKeyLayer>();
    assert_send_sync::<ApiKeyService<Inner>>();
    assert_send::<ResponseFuture<<Inner as Service<Request<Body>>>::Future>>();
    assert_send_sync::<tower_api_key::KeyStore>();
    assert_send_sync::<KeyInfo>();
    assert_send_sync::<Rejection>();
    assert_send_sync::<tower_api_key::Error>();
}

#[test]
#[should_panic(expected = "a valid header name")]
fn header_only_panics_on_an_invalid_name() {
    let _ = ApiKeyLayer::new(keys()).header_only("not a header");
}

#[tokio::test]
async fn optional_lets_only_keyless_requests_through() {
    let layer = ApiKeyLayer::new(keys()).optional(true);
    let (res, calls) = call(&layer, &[]).await;
    assert_eq!((res.status().as_u16(), calls), (200, 1));
    assert_eq!(
        res.into_body(),
        "|false",
        "no KeyInfo for an anonymous caller"
    );
    let (res, _) = call(&layer, &[("x-api-key", "plain-key")]).await;
    assert_eq!(res.into_body(), "plain|true");
    for refused in [
        &[("x-api-key", "wrong")][..],
        &[("x-api-key", "disabled-key")],
        &[("authorization", "Bearer ")],
    ] {
        let (res, calls) = call(&layer, refused).await;
        assert_eq!((res.status().as_u16(), calls), (401, 0), "{refused:?}");
    }
    let (res, _) = call(&layer.require_scope("admin"), &[("x-api-key", "plain-key")]).await;
    assert_eq!(res.status(), 403);
    let (res, _) = call(&ApiKeyLayer::new(keys()), &[]).await;
    assert_eq!(res.status(), 401, "not optional by default");
}

#[tokio::test]
async fn preflight_passes_only_when_allowed() {
    let preflight = |method: &str, with_header: bool| {
        let mut req = Request::builder().method(method).uri("/");
        if with_header {
            req = req.header("access-control-request-method", "POST");
        }
        req.body(Body::new()).unwrap()
    };
    let svc = |layer: ApiKeyLayer| {
        ServiceBuilder::new()
            .layer(layer)
            .service(echo(Arc::default()))
    };
    let allowed = ApiKeyLayer::new(keys()).allow_preflight(true);
    let res = svc(allowed.clone())
        .oneshot(preflight("OPTIONS", true))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for (method, header) in [("OPTIONS", false), ("GET", true)] {
        let res = svc(allowed.clone())
            .oneshot(preflight(method, header))
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{method} {header}");
    }
    let res = svc(ApiKeyLayer::new(keys()))
        .oneshot(preflight("OPTIONS", true))
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "not allowed by default");
}

/// An inner service that is not ready: its back-pressure must reach the caller.
#[derive(Clone, Debug)]
struct NotReady;

impl Service<Request<Body>> for NotReady {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Pending
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        std::future::ready(Ok(Response::new(Body::new())))
    }
}

#[test]
fn back_pressure_from_the_inner_service_is_passed_on() {
    let mut svc = tower::Layer::layer(&ApiKeyLayer::new(keys()), NotReady);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_pending());
    assert_eq!(svc.store().len(), keys().len());
    let shown = format!("{svc:?}");
    assert!(
        shown.starts_with("ApiKeyService") && shown.contains("KeyStore"),
        "{shown}"
    );
    assert!(!shown.contains("plain-key"), "{shown}");
}

#[tokio::test]
async fn require_checksum_refuses_malformed_keys_before_any_lookup() {
    let generated = tower_api_key::generate("tak").unwrap();
    let set = KeySet::from_keys([
        generated.to_api_key("gen"),
        ApiKey::new("legacy", "legacy-key"),
    ])
    .unwrap();
    let layer = ApiKeyLayer::new(set).require_checksum(true);
    let (res, calls) = call(&layer, &[("x-api-key", generated.secret())]).await;
    assert_eq!((res.status().as_u16(), calls), (200, 1));
    let (res, calls) = call(&layer, &[("x-api-key", "legacy-key")]).await;
    assert_eq!((res.status().as_u16(), calls), (401, 0));
    assert!(matches!(
        res.extensions().get::<Rejection>(),
        Some(Rejection::InvalidChecksum)
    ));
}
