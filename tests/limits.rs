//! Per-key limits over real axum and tonic servers on 127.0.0.1: each answer, header
//! field and address rule, and hostile input.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{Extension, Router, routing};
use common::client;
use tokio::net::TcpListener;
use tower_api_key::{
    ApiKey, ApiKeyLayer, ChannelSource, ClientIp, KeyInfo, KeySet,
    limit::{IpNet, Quota, QuotaPeriod, RateLimit},
};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn rate(name: &str, requests: u64, secs: u64) -> RateLimit {
    RateLimit::new(name, requests, Duration::from_secs(secs))
}

/// `/` answers with the key's id and, in `x-remaining`, the first limit's allowance.
fn app(layer: ApiKeyLayer) -> Router {
    Router::new()
        .route(
            "/",
            routing::get(|Extension(key): Extension<KeyInfo>| async move {
                let remaining = key.limits().first().map_or(u64::MAX, |l| l.remaining());
                (
                    [("x-remaining", remaining.to_string())],
                    key.id().to_owned(),
                )
            }),
        )
        .layer(layer)
}

/// Serves with the peer address in `ConnectInfo`, as a server that checks addresses must.
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

async fn get(addr: SocketAddr, key: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client()
        .get(format!("http://{addr}/"))
        .header("x-api-key", key);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.unwrap()
}

fn header(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_rate_limit_answers_429_with_an_exact_retry_after_and_ratelimit_fields() {
    // 3 per 30 s: one request every 10 s, a burst of 3.
    let keys = KeySet::from_keys([
        ApiKey::new("partner", "k-partner").with_rate_limit(rate("burst", 3, 30))
    ])
    .unwrap();
    let addr = serve(app(ApiKeyLayer::new(keys))).await;
    for left in [2, 1, 0] {
        let res = get(addr, "k-partner", &[]).await;
        assert_eq!(res.status(), 200);
        assert_eq!(
            header(&res, "ratelimit-policy").unwrap(),
            r#""burst";q=3;w=30"#
        );
        let state = header(&res, "ratelimit").unwrap();
        assert!(
            state.starts_with(&format!(r#""burst";r={left};t="#)),
            "{state}"
        );
        assert_eq!(
            header(&res, "x-remaining").unwrap(),
            left.to_string(),
            "KeyInfo tells the handler"
        );
    }
    let refused = get(addr, "k-partner", &[]).await;
    assert_eq!(refused.status(), 429);
    // The next request is due 10 s after the first: a little less is left, rounded up.
    assert_eq!(header(&refused, "retry-after").unwrap(), "10");
    assert_eq!(
        header(&refused, "ratelimit-policy").unwrap(),
        r#""burst";q=3;w=30"#
    );
    assert_eq!(
        header(&refused, "ratelimit").unwrap(),
        r#""burst";r=0;t=30"#
    );
    assert!(
        header(&refused, "www-authenticate").is_none(),
        "the key itself is fine"
    );
    let rejection = refused.text().await.unwrap();
    assert!(rejection.is_empty());
}

#[tokio::test]
async fn several_limits_are_all_or_nothing_and_headers_can_be_turned_off() {
    let key = ApiKey::new("partner", "k-partner")
        .with_rate_limit(rate("burst", 5, 1))
        .with_rate_limit(rate("hourly", 2, 3_600));
    let layer = ApiKeyLayer::new(KeySet::from_keys([key]).unwrap()).rate_limit_headers(false);
    let store = layer.store().clone();
    let addr = serve(app(layer)).await;
    for _ in 0..2 {
        let res = get(addr, "k-partner", &[]).await;
        assert_eq!(res.status(), 200);
        assert!(header(&res, "ratelimit").is_none());
    }
    let refused = get(addr, "k-partner", &[]).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after").unwrap(), "1800");
    assert_eq!(
        header(&refused, "ratelimit-policy").unwrap(),
        r#""burst";q=5;w=1, "hourly";q=2;w=3600"#
    );
    // Refused by `hourly`: `burst` counted it neither.
    let state = header(&refused, "ratelimit").unwrap();
    assert!(
        state.starts_with(r#""burst";r=3;t=1, "hourly";r=0;t="#),
        "{state}"
    );
    let info = store.get("partner").unwrap();
    assert_eq!(info.refused(), 1);
    let usage = store.usage_of("partner").unwrap();
    assert_eq!(
        (usage.requests(), usage.refused()),
        (2, 1),
        "admitted and refused apart"
    );
}

#[tokio::test]
async fn a_quota_answers_429_until_the_next_utc_day() {
    let keys =
        KeySet::from_keys([ApiKey::new("q", "k-q").with_quota(Quota::new(2, QuotaPeriod::Day))])
            .unwrap();
    let addr = serve(app(ApiKeyLayer::new(keys))).await;
    assert_eq!(get(addr, "k-q", &[]).await.status(), 200);
    let second = get(addr, "k-q", &[]).await;
    assert_eq!(
        header(&second, "ratelimit-policy").unwrap(),
        r#""quota";q=2;w=86400"#
    );
    assert!(
        header(&second, "ratelimit")
            .unwrap()
            .starts_with(r#""quota";r=0;t="#)
    );
    let refused = get(addr, "k-q", &[]).await;
    assert_eq!(refused.status(), 429);
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    let midnight = UNIX_EPOCH + Duration::from_secs((today + 1) * 86_400);
    assert_eq!(
        header(&refused, "retry-after").unwrap(),
        httpdate::fmt_http_date(midnight)
    );
}

#[tokio::test]
async fn counters_carry_over_a_reload_that_keeps_the_limits_and_restart_when_they_change() {
    let key = || ApiKey::new("p", "k-p").with_rate_limit(rate("burst", 2, 3_600));
    let (source, publisher) = ChannelSource::new(KeySet::from_keys([key()]).unwrap());
    let layer = ApiKeyLayer::new(source);
    let addr = serve(app(layer)).await;
    assert_eq!(get(addr, "k-p", &[]).await.status(), 200);
    assert_eq!(get(addr, "k-p", &[]).await.status(), 200);
    assert_eq!(get(addr, "k-p", &[]).await.status(), 429);
    // Another description, the same limits: still spent.
    publisher
        .publish(KeySet::from_keys([key().with_description("edited")]).unwrap())
        .unwrap();
    assert_eq!(get(addr, "k-p", &[]).await.status(), 429);
    // A changed limit takes effect at once, and what was counted stays counted: one
    // more request, not a fresh burst of three.
    let wider = ApiKey::new("p", "k-p").with_rate_limit(rate("burst", 3, 3_600));
    publisher
        .publish(KeySet::from_keys([wider]).unwrap())
        .unwrap();
    for want in [200, 429] {
        assert_eq!(get(addr, "k-p", &[]).await.status(), want);
    }
    // No limits any more: no fields either.
    publisher
        .publish(KeySet::from_keys([ApiKey::new("p", "k-p")]).unwrap())
        .unwrap();
    let res = get(addr, "k-p", &[]).await;
    assert_eq!(res.status(), 200);
    assert!(header(&res, "ratelimit").is_none());
}

#[tokio::test]
async fn allowed_ips_check_the_peer_and_refuse_an_unknown_one() {
    let keys = || {
        KeySet::from_keys([
            ApiKey::new("local", "k-local").with_allowed_ips([net("127.0.0.0/8")]),
            ApiKey::new("far", "k-far")
                .with_allowed_ips([net("203.0.113.0/24"), net("2001:db8::/32")]),
            ApiKey::new("open", "k-open"),
        ])
        .unwrap()
    };
    let addr = serve(app(ApiKeyLayer::new(keys()))).await;
    assert_eq!(get(addr, "k-local", &[]).await.status(), 200);
    let far = get(addr, "k-far", &[("x-forwarded-for", "203.0.113.9")]).await;
    assert_eq!(far.status(), 403, "the peer counts, not a header");
    assert!(header(&far, "www-authenticate").is_none());
    assert_eq!(get(addr, "k-open", &[]).await.status(), 200);
    // Served without ConnectInfo: no address is known, and the key is refused.
    let blind = common::serve(app(ApiKeyLayer::new(keys()))).await;
    assert_eq!(get(blind, "k-local", &[]).await.status(), 403);
    assert_eq!(get(blind, "k-open", &[]).await.status(), 200);
}

#[tokio::test]
async fn x_forwarded_for_takes_the_rightmost_untrusted_hop() {
    let keys =
        KeySet::from_keys([ApiKey::new("far", "k-far").with_allowed_ips([net("203.0.113.0/24")])])
            .unwrap();
    // The test's client is the trusted proxy.
    let layer = ApiKeyLayer::new(keys).client_ip(ClientIp::x_forwarded_for([net("127.0.0.0/8")]));
    let addr = serve(app(layer)).await;
    for (xff, want) in [
        ("203.0.113.9", 200),
        ("::ffff:203.0.113.9", 200),
        ("198.51.100.1, 203.0.113.9", 200),
        ("203.0.113.9, 127.0.0.5", 200),
        // A client that writes the allowed address first is still itself.
        ("203.0.113.9, 198.51.100.1", 403),
        ("203.0.113.9, garbage", 403),
        ("fe80::1%eth0", 403),
        ("[fe80::1%25eth0]:80", 403),
        ("unknown", 403),
        ("", 403),
        ("127.0.0.9", 403),
    ] {
        let res = get(addr, "k-far", &[("x-forwarded-for", xff)]).await;
        assert_eq!(res.status(), want, "{xff:?}");
    }
    let split = client()
        .get(format!("http://{addr}/"))
        .header("x-api-key", "k-far")
        .header("x-forwarded-for", "198.51.100.1")
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(split.status(), 200, "several fields are one list");
}

#[tokio::test]
async fn forwarded_and_a_cdn_header_are_read_and_garbage_refused() {
    let keys = || {
        KeySet::from_keys([ApiKey::new("v6", "k-v6").with_allowed_ips([net("2001:db8::/32")])])
            .unwrap()
    };
    let fwd = serve(app(
        ApiKeyLayer::new(keys()).client_ip(ClientIp::forwarded([net("127.0.0.1")]))
    ))
    .await;
    for (value, want) in [
        (r#"for="[2001:db8::1]:4711";proto=https"#, 200),
        (r#"for=198.51.100.1, for="[2001:db8::1]""#, 200),
        (r#"for="[2001:db8::1]", for=198.51.100.1"#, 403),
        ("for=unknown", 403),
        ("for=_hidden", 403),
        ("garbage;;==,,", 403),
        (r#"for="[2001:db8::1"#, 403),
    ] {
        assert_eq!(
            get(fwd, "k-v6", &[("forwarded", value)]).await.status(),
            want,
            "{value:?}"
        );
    }
    let cdn = serve(app(
        ApiKeyLayer::new(keys()).client_ip(ClientIp::header("cf-connecting-ip"))
    ))
    .await;
    assert_eq!(
        get(cdn, "k-v6", &[("cf-connecting-ip", "2001:db8::42")])
            .await
            .status(),
        200
    );
    assert_eq!(
        get(
            cdn,
            "k-v6",
            &[("cf-connecting-ip", "2001:db8::42, 1.1.1.1")]
        )
        .await
        .status(),
        403
    );
    assert_eq!(get(cdn, "k-v6", &[]).await.status(), 403);
}

#[test]
fn limits_no_one_could_mean_are_refused_with_the_key_id() {
    let s = Duration::from_secs(1);
    for (key, says) in [
        (
            ApiKey::new("k", "s").with_rate_limit(RateLimit::new("r", 0, s)),
            "at least 1",
        ),
        (
            ApiKey::new("k", "s").with_rate_limit(RateLimit::new("r", 1, Duration::ZERO)),
            "zero",
        ),
        (
            ApiKey::new("k", "s").with_rate_limit(RateLimit::new("r", u64::MAX, s)),
            "nanosecond",
        ),
        (
            ApiKey::new("k", "s").with_quota(Quota::new(u64::MAX, QuotaPeriod::Day)),
            "at most",
        ),
        (ApiKey::new("k", "s").with_allowed_ips([]), "empty"),
    ] {
        let err = KeySet::from_keys([key]).unwrap_err().to_string();
        assert!(err.contains("key `k`") && err.contains(says), "{err}");
    }
    // A huge but possible limit is kept, and lets a burst that size through.
    let huge = ApiKey::new("k", "s").with_rate_limit(RateLimit::new("r", 1_000_000_000, s));
    assert!(KeySet::from_keys([huge]).is_ok());
}

mod grpc {
    use std::net::SocketAddr;

    use tokio::net::TcpListener;
    use tonic::{Code, Request, Response, Status, codegen::tokio_stream, transport::Server};
    use tonic_health::pb::{
        HealthCheckRequest, HealthCheckResponse,
        health_client::HealthClient,
        health_server::{Health, HealthServer},
    };
    use tower_api_key::{ApiKey, ApiKeyLayer, KeySet};

    use super::{net, rate};

    struct Ok200;

    #[tonic::async_trait]
    impl Health for Ok200 {
        async fn check(
            &self,
            _: Request<HealthCheckRequest>,
        ) -> Result<Response<HealthCheckResponse>, Status> {
            Ok(Response::new(HealthCheckResponse { status: 1 }))
        }

        type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, Status>>;

        async fn watch(
            &self,
            _: Request<HealthCheckRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            Err(Status::unimplemented("watch"))
        }
    }

    async fn serve(layer: ApiKeyLayer) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            Server::builder()
                .layer(layer)
                .add_service(HealthServer::new(Ok200))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        addr
    }

    async fn check(addr: SocketAddr, key: &str) -> Code {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let mut req = Request::new(HealthCheckRequest {
            service: String::new(),
        });
        req.metadata_mut().insert("x-api-key", key.parse().unwrap());
        match client.check(req).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        }
    }

    #[tokio::test]
    async fn limits_answer_resource_exhausted_and_permission_denied() {
        let keys = KeySet::from_keys([
            ApiKey::new("limited", "k-limited").with_rate_limit(rate("burst", 1, 3_600)),
            ApiKey::new("local", "k-local").with_allowed_ips([net("127.0.0.1")]),
            ApiKey::new("far", "k-far").with_allowed_ips([net("203.0.113.0/24")]),
        ])
        .unwrap();
        let addr = serve(ApiKeyLayer::new(keys)).await;
        assert_eq!(check(addr, "k-limited").await, Code::Ok);
        assert_eq!(check(addr, "k-limited").await, Code::ResourceExhausted);
        assert_eq!(
            check(addr, "k-local").await,
            Code::Ok,
            "tonic's peer address"
        );
        assert_eq!(check(addr, "k-far").await, Code::PermissionDenied);
    }
}

/// `n` requests with `key` sent at once, each on a connection of its own: the
/// statuses, and the `Retry-After` of each refusal in seconds (not a date).
async fn at_once(addr: SocketAddr, key: &str, n: usize) -> (Vec<u16>, Vec<u64>) {
    let requests = (0..n).map(|_| {
        let key = key.to_owned();
        tokio::spawn(async move {
            // A client each: no pooled connection serialises them.
            let res = client()
                .get(format!("http://{addr}/"))
                .header("x-api-key", key)
                .send()
                .await
                .unwrap();
            let retry = header(&res, "retry-after").and_then(|v| v.parse::<u64>().ok());
            (res.status().as_u16(), retry)
        })
    });
    let mut statuses = Vec::new();
    let mut retries = Vec::new();
    for request in requests.collect::<Vec<_>>() {
        let (status, retry) = request.await.unwrap();
        statuses.push(status);
        retries.extend(retry);
    }
    (statuses, retries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_clients_at_the_boundary_get_exactly_the_limit_all_or_nothing() {
    let keys = KeySet::from_keys([
        ApiKey::new("one", "k-one").with_rate_limit(rate("burst", 40, 3_600)),
        // The quota refuses first: the burst counts only what the quota let in.
        ApiKey::new("two", "k-two")
            .with_rate_limit(rate("burst", 30, 3_600))
            .with_quota(Quota::new(20, QuotaPeriod::Day)),
    ])
    .unwrap();
    let layer = ApiKeyLayer::new(keys);
    let store = layer.store().clone();
    let addr = serve(app(layer)).await;
    let (statuses, retries) = at_once(addr, "k-one", 80).await;
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    assert_eq!(admitted, 40, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 429).count(), 40);
    // One request every 90 s: each refusal says a little less, rounded up, never 0.
    assert!(
        retries.iter().all(|&r| (89..=90).contains(&r)),
        "{retries:?}"
    );
    let (statuses, _) = at_once(addr, "k-two", 60).await;
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 20);
    let limits = store.get("two").unwrap().limits();
    let used: Vec<u64> = limits.iter().map(|l| l.used()).collect();
    assert_eq!(used, [20, 20], "a refused request is counted by no limit");
    assert_eq!(store.get("two").unwrap().refused(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_mid_burst_that_keeps_the_limits_lets_in_no_more() {
    let key = |n: usize| {
        ApiKey::new("p", "k-p")
            .with_rate_limit(rate("burst", 50, 3_600))
            .with_description(format!("version {n}"))
    };
    let (source, publisher) = ChannelSource::new(KeySet::from_keys([key(0)]).unwrap());
    let addr = serve(app(ApiKeyLayer::new(source))).await;
    let reloads = tokio::spawn(async move {
        for n in 1..=40 {
            publisher
                .publish(KeySet::from_keys([key(n)]).unwrap())
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        publisher
    });
    let (statuses, _) = at_once(addr, "k-p", 120).await;
    let _publisher = reloads.await.unwrap();
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 50);
    assert_eq!(get(addr, "k-p", &[]).await.status(), 429);
}

#[tokio::test]
async fn a_change_of_one_limit_or_of_the_address_rules_forgets_nothing_counted() {
    let burst = |n| rate("burst", n, 3_600);
    let key = || ApiKey::new("p", "k-p");
    let (source, publisher) = ChannelSource::new(
        KeySet::from_keys([key()
            .with_rate_limit(burst(2))
            .with_quota(Quota::new(5, QuotaPeriod::Day))])
        .unwrap(),
    );
    let addr = serve(app(ApiKeyLayer::new(source))).await;
    let publish = |k: ApiKey| publisher.publish(KeySet::from_keys([k]).unwrap()).unwrap();
    let statuses = |n| async move {
        let mut all = Vec::new();
        for _ in 0..n {
            all.push(get(addr, "k-p", &[]).await.status().as_u16());
        }
        all
    };
    assert_eq!(statuses(3).await, [200, 200, 429]);
    // An address rule added (the test's client is allowed): the burst stays spent.
    publish(
        key()
            .with_rate_limit(burst(2))
            .with_quota(Quota::new(5, QuotaPeriod::Day))
            .with_allowed_ips([net("127.0.0.0/8")]),
    );
    assert_eq!(statuses(1).await, [429], "not a fresh burst");
    // The burst raised by one: one more request.
    publish(
        key()
            .with_rate_limit(burst(3))
            .with_quota(Quota::new(5, QuotaPeriod::Day)),
    );
    assert_eq!(statuses(2).await, [200, 429]);
    // The rate limit removed: the quota still counts the 3 let in today.
    publish(key().with_quota(Quota::new(5, QuotaPeriod::Day)));
    assert_eq!(statuses(3).await, [200, 200, 429]);
    // The quota lowered under what was used: refused at once.
    publish(key().with_quota(Quota::new(2, QuotaPeriod::Day)));
    assert_eq!(statuses(1).await, [429]);
    // A new limit starts afresh; the quota's period changed, so does its count.
    publish(
        key()
            .with_rate_limit(rate("hourly", 1, 3_600))
            .with_quota(Quota::new(2, QuotaPeriod::Month)),
    );
    assert_eq!(statuses(2).await, [200, 429]);
}

#[tokio::test]
async fn waiting_what_retry_after_says_is_always_enough() {
    // One request every 2 s.
    let keys =
        KeySet::from_keys([ApiKey::new("p", "k-p").with_rate_limit(rate("burst", 1, 2))]).unwrap();
    let addr = serve(app(ApiKeyLayer::new(keys))).await;
    for _ in 0..2 {
        assert_eq!(get(addr, "k-p", &[]).await.status(), 200);
        let refused = get(addr, "k-p", &[]).await;
        assert_eq!(refused.status(), 429);
        let wait: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
        assert!((1..=2).contains(&wait), "{wait}");
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
}

/// A `RateLimit-Policy` or `RateLimit` field as a structured-field parser reads it: a
/// List of Items, each a String with integer parameters.
fn structured(value: &str) -> Vec<(String, Vec<(String, i64)>)> {
    let list: sfv::List = sfv::Parser::new(value)
        .parse()
        .unwrap_or_else(|e| panic!("{value:?}: {e}"));
    list.into_iter()
        .map(|entry| {
            let sfv::ListEntry::Item(item) = entry else {
                panic!("an inner list in {value:?}")
            };
            let name = item.bare_item.as_string().expect("a String");
            let params = (item.params.iter())
                .map(|(k, v)| {
                    let n = v.as_integer().unwrap_or_else(|| panic!("{value:?}"));
                    (k.as_str().to_owned(), i64::from(n))
                })
                .collect();
            (name.as_str().to_owned(), params)
        })
        .collect()
}

#[tokio::test]
async fn ratelimit_fields_are_structured_fields_whatever_the_limits() {
    let year = Duration::from_secs(366 * 86_400);
    let keys = KeySet::from_keys([
        ApiKey::new("huge", "k-huge").with_rate_limit(RateLimit::new(
            "all",
            999_999_999_999_999,
            year,
        )),
        ApiKey::new("many", "k-many")
            .with_rate_limit(rate("burst", 2, 1))
            .with_rate_limit(rate("hourly", 100, 3_600))
            .with_quota(Quota::new((1 << 40) - 1, QuotaPeriod::Month)),
    ])
    .unwrap();
    let addr = serve(app(ApiKeyLayer::new(keys))).await;
    let fields = |res: &reqwest::Response| {
        (
            structured(&header(res, "ratelimit-policy").unwrap()),
            structured(&header(res, "ratelimit").unwrap()),
        )
    };
    let (policy, state) = fields(&get(addr, "k-huge", &[]).await);
    assert_eq!(
        policy,
        [(
            "all".into(),
            vec![("q".into(), 999_999_999_999_999), ("w".into(), 31_622_400)]
        )]
    );
    // One request every 32 ns: the one let in may be refilled by the time it is said.
    let remaining = state[0].1[0].1;
    assert!((999_999_999_999_998..=999_999_999_999_999).contains(&remaining));
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(get(addr, "k-many", &[]).await);
    }
    assert_eq!(answers[2].status(), 429);
    for res in &answers {
        let (policy, state) = fields(res);
        let names: Vec<&str> = policy.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["burst", "hourly", "quota"]);
        for ((name, p), (same, s)) in policy.iter().zip(&state) {
            assert_eq!(name, same);
            let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, ["q", "w"], "{name}");
            let keys: Vec<&str> = s.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, ["r", "t"], "{name}");
            let ((q, w), (r, t)) = ((p[0].1, p[1].1), (s[0].1, s[1].1));
            assert!(
                (0..=q).contains(&r) && (0..=w).contains(&t),
                "{name}: {p:?} {s:?}"
            );
        }
    }
    // One more request a year than a field can say: refused with the key and the field.
    let over = ApiKey::new("over", "s").with_rate_limit(RateLimit::new(
        "all",
        1_000_000_000_000_000,
        year,
    ));
    let err = KeySet::from_keys([over]).unwrap_err().to_string();
    assert!(
        err.contains("key `over`") && err.contains("at most"),
        "{err}"
    );
}
