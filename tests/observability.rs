//! Metrics through the `metrics` facade and the key id on the request's `tracing` span.
#![allow(clippy::unwrap_used)]
#![cfg(all(feature = "metrics", feature = "tracing"))]

mod common;

use std::convert::Infallible;

use http::{Request, Response};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{ServiceBuilder, ServiceExt};
use tower_api_key::{ApiKey, ApiKeyLayer, ChannelSource, KeySet, KeyStore};
use tracing::Instrument as _;

fn keys() -> KeySet {
    KeySet::from_keys([ApiKey::new("ci", "k-ci"), ApiKey::new("ops", "k-ops")]).unwrap()
}

async fn get(layer: &ApiKeyLayer, key: Option<&str>) -> u16 {
    let svc =
        ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(|_req: Request<String>| async {
                tracing::info!("handled");
                Ok::<_, Infallible>(Response::new(String::new()))
            });
    let mut req = Request::builder().uri("/");
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    let span = tracing::info_span!("request", key_id = tracing::field::Empty);
    svc.oneshot(req.body(String::new()).unwrap())
        .instrument(span)
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Name, labels and value of a recorded metric.
type Metric = (String, Vec<(String, String)>, DebugValue);

/// One test, run in order: the span check sets a thread-local `tracing` subscriber,
/// which another test in the same binary could race on the callsites' cached interest.
#[tokio::test(flavor = "current_thread")]
async fn metrics_and_the_request_span() {
    the_key_id_is_recorded_on_the_request_span().await;
    requests_and_reloads_are_counted().await;
}

async fn requests_and_reloads_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let store = KeyStore::new();
    let (source, publisher) = ChannelSource::new(keys());
    metrics::with_local_recorder(&recorder, || {
        store.add_source(source.with_name("chan")).unwrap();
        publisher
            .publish(KeySet::from_keys([ApiKey::new("ci", "k-ci")]).unwrap())
            .unwrap();
        publisher
            .apply([tower_api_key::KeyChange::Upsert(ApiKey::new("x", "k-ci"))])
            .unwrap_err();
    });
    let layer = ApiKeyLayer::from_store(store).per_key_metrics(true);
    let local = async {
        assert_eq!(get(&layer, Some("k-ci")).await, 200);
        assert_eq!(get(&layer, Some("k-ci")).await, 200);
        assert_eq!(get(&layer, Some("wrong")).await, 401);
        assert_eq!(get(&layer, None).await, 401);
    };
    // The recorder is thread-local: drive the requests on this thread.
    let _guard = metrics::set_default_local_recorder(&recorder);
    local.await;
    drop(_guard);

    let metrics: Vec<Metric> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.key().name().to_owned(), labels, value)
        })
        .collect();
    let find = |name: &str, labels: &[(&str, &str)]| {
        metrics
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in {metrics:?}"))
    };
    assert_eq!(
        find(
            "tower_api_key_requests_total",
            &[("outcome", "accepted"), ("reason", "valid")]
        ),
        &DebugValue::Counter(2)
    );
    assert_eq!(
        find(
            "tower_api_key_requests_total",
            &[("outcome", "refused"), ("reason", "unknown")]
        ),
        &DebugValue::Counter(1)
    );
    assert_eq!(
        find(
            "tower_api_key_requests_total",
            &[("outcome", "refused"), ("reason", "missing")]
        ),
        &DebugValue::Counter(1)
    );
    assert_eq!(
        find("tower_api_key_key_requests_total", &[("key_id", "ci")]),
        &DebugValue::Counter(2)
    );
    assert_eq!(
        find(
            "tower_api_key_reloads_total",
            &[("source", "chan"), ("result", "applied")]
        ),
        &DebugValue::Counter(2)
    );
    assert_eq!(
        find(
            "tower_api_key_reloads_total",
            &[("source", "chan"), ("result", "refused")]
        ),
        &DebugValue::Counter(1)
    );
    let keys = find("tower_api_key_keys", &[("source", "chan")]);
    assert!(
        matches!(keys, &DebugValue::Gauge(g) if g.into_inner() == 1.0),
        "{keys:?}"
    );
    let at = find(
        "tower_api_key_last_reload_timestamp_seconds",
        &[("source", "chan")],
    );
    assert!(
        matches!(at, &DebugValue::Gauge(g) if g.into_inner() > 1.7e9),
        "{at:?}"
    );
}

async fn the_key_id_is_recorded_on_the_request_span() {
    let captured = common::Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let layer = ApiKeyLayer::new(keys());
    assert_eq!(get(&layer, Some("k-ops")).await, 200);
    let logs = captured.text();
    assert!(logs.contains("request{key_id=\"ops\"}"), "{logs}");
    assert!(!logs.contains("k-ops"), "{logs}");
}
