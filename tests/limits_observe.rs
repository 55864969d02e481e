//! Refusals for a key's limits, as an operator sees them: a debug log line with the
//! key id and the limit's name, and the metrics' reasons.
#![allow(clippy::unwrap_used)]
#![cfg(all(feature = "metrics", feature = "tracing"))]

mod common;

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use http::{Request, Response};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{ServiceBuilder, ServiceExt};
use tower_api_key::{
    ApiKey, ApiKeyLayer, KeySet,
    limit::{Quota, QuotaPeriod, RateLimit},
};

async fn get(layer: &ApiKeyLayer, key: &str) -> u16 {
    let svc =
        ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(|_req: Request<String>| async {
                Ok::<_, Infallible>(Response::new(String::new()))
            });
    let mut req = Request::get("/")
        .header("x-api-key", key)
        .body(String::new())
        .unwrap();
    // The peer address a server would have put there.
    req.extensions_mut()
        .insert("198.51.100.1:5000".parse::<SocketAddr>().unwrap());
    svc.oneshot(req).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "current_thread")]
async fn refusals_are_logged_with_the_limit_and_counted_by_reason() {
    let layer = ApiKeyLayer::new(
        KeySet::from_keys([
            ApiKey::new("burst-key", "k-burst").with_rate_limit(RateLimit::new(
                "burst",
                1,
                Duration::from_secs(3_600),
            )),
            ApiKey::new("quota-key", "k-quota").with_quota(Quota::new(1, QuotaPeriod::Day)),
            ApiKey::new("ip-key", "k-ip").with_allowed_ips(["203.0.113.0/24".parse().unwrap()]),
        ])
        .unwrap(),
    );
    let captured = common::Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    {
        let _log = tracing::subscriber::set_default(subscriber);
        let _metrics = metrics::set_default_local_recorder(&recorder);
        assert_eq!(get(&layer, "k-burst").await, 200);
        assert_eq!(get(&layer, "k-burst").await, 429);
        assert_eq!(get(&layer, "k-quota").await, 200);
        assert_eq!(get(&layer, "k-quota").await, 429);
        assert_eq!(get(&layer, "k-ip").await, 403);
    }
    let logs = captured.text();
    let line = logs
        .lines()
        .find(|l| l.contains("burst-key") && l.contains("refused"))
        .unwrap_or_else(|| panic!("{logs}"));
    assert!(
        line.contains("DEBUG") && line.contains("limit `burst`"),
        "{line}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("quota-key") && l.contains("over its quota")),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("ip-key") && l.contains("not allowed from this address")),
        "{logs}"
    );
    assert!(
        !logs.contains("k-burst") && !logs.contains("k-quota"),
        "no secret in the logs"
    );
    let metrics = snapshotter.snapshot().into_vec();
    for reason in ["rate_limited", "quota_exceeded", "address_not_allowed"] {
        let count = metrics.iter().find_map(|(key, _, _, value)| {
            let labels: Vec<_> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.key().name() == "tower_api_key_requests_total"
                && labels.contains(&("reason".into(), reason.into()))
                && labels.contains(&("outcome".into(), "refused".into())))
            .then_some(value)
        });
        assert_eq!(count, Some(&DebugValue::Counter(1)), "{reason}");
    }
}
