//! Per-request cost of `ApiKeyLayer`, side by side with the floor (a trivial service),
//! tower-http's static bearer check and the hand-written alternative users write
//! today. Every figure in the README is a ratio to the floor measured in the same run.
//!
//! Run: `cargo bench --bench layer` (add `-- <filter>` for a subset).
#![allow(clippy::unwrap_used)]

use std::{
    collections::HashMap,
    convert::Infallible,
    future::{Ready, ready},
    hint::black_box,
    pin::pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use arc_swap::ArcSwap;
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request, Response, header};
use sha2::{Digest, Sha256};
use tower::{Layer, Service, ServiceBuilder};
use tower_api_key::{ApiKey, ApiKeyLayer, KeySet};

type Req = Request<()>;
type Res = Response<()>;

/// The floor: answers an empty 200 at once.
#[derive(Clone, Copy)]
struct Floor;

impl Service<Req> for Floor {
    type Response = Res;
    type Error = Infallible;
    type Future = Ready<Result<Res, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        black_box(&req);
        ready(Ok(Response::new(())))
    }
}

/// What users are told to write by hand today: SHA-256 of the bearer token, looked up
/// in a std (SipHash) map held in an `ArcSwap`, identity into the extensions.
#[derive(Clone)]
struct HandWritten<S> {
    inner: S,
    keys: Arc<ArcSwap<HashMap<[u8; 32], Arc<Meta>>>>,
}

#[allow(dead_code)]
struct Meta {
    id: String,
    scopes: Vec<String>,
}

impl<S> Service<Req> for HandWritten<S>
where
    S: Service<Req, Response = Res, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Res;
    type Error = Infallible;
    type Future = futures_like::Either<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let meta = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .and_then(|token| {
                let digest: [u8; 32] = Sha256::digest(token).into();
                self.keys.load().get(&digest).cloned()
            });
        match meta {
            Some(meta) => {
                req.extensions_mut().insert(meta);
                futures_like::Either::Left(self.inner.call(req))
            }
            None => {
                let mut res = Response::new(());
                *res.status_mut() = http::StatusCode::UNAUTHORIZED;
                futures_like::Either::Right(Some(res))
            }
        }
    }
}

mod futures_like {
    use super::*;

    pub(crate) enum Either<F> {
        Left(F),
        Right(Option<Res>),
    }

    impl<F: Future<Output = Result<Res, Infallible>> + Unpin> Future for Either<F> {
        type Output = Result<Res, Infallible>;

        fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.get_mut() {
                Either::Left(f) => std::pin::Pin::new(f).poll(cx),
                Either::Right(res) => Poll::Ready(Ok(res.take().expect("polled once"))),
            }
        }
    }
}

/// 40-byte keys, the length `generate` makes.
fn key(i: usize) -> String {
    format!("tak_{i:0>36}")
}

/// A request with eight realistic headers, the key as a bearer token.
fn request(key: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::HOST, HeaderValue::from_static("api.example.com"));
    h.insert(header::USER_AGENT, HeaderValue::from_static("curl/8.5.0"));
    h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("gzip, br"),
    );
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        "x-request-id",
        HeaderValue::from_static("7f9c2ba4-e88f-11ee-a506-0242ac120002"),
    );
    h.insert(
        "traceparent",
        HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    );
    if let Some(key) = key {
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
    }
    h
}

fn build(headers: &HeaderMap) -> Req {
    let mut req = Request::new(());
    *req.headers_mut() = headers.clone();
    req
}

/// `ready().call()` and one poll: every service here answers without waiting.
fn call<S: Service<Req, Response = Res>>(svc: &mut S, req: Req) -> Res
where
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    match pin!(svc.call(req)).poll(&mut cx) {
        Poll::Ready(res) => res.unwrap(),
        Poll::Pending => unreachable!("every service here is immediate"),
    }
}

fn bench_one<S: Service<Req, Response = Res>>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    mut svc: S,
    headers: &HeaderMap,
) where
    S::Error: std::fmt::Debug,
{
    c.bench_function(id, |b| {
        b.iter_batched(
            || build(headers),
            |req| call(&mut svc, req),
            BatchSize::SmallInput,
        )
    });
}

fn key_set(n: usize) -> KeySet {
    KeySet::from_keys((0..n).map(|i| ApiKey::new(format!("key-{i}"), key(i)).with_scopes(["read"])))
        .unwrap()
}

fn hand_written(n: usize) -> HandWritten<Floor> {
    let map: HashMap<[u8; 32], Arc<Meta>> = (0..n)
        .map(|i| {
            let meta = Arc::new(Meta {
                id: format!("key-{i}"),
                scopes: vec!["read".into()],
            });
            (Sha256::digest(key(i).as_bytes()).into(), meta)
        })
        .collect();
    HandWritten {
        inner: Floor,
        keys: Arc::new(ArcSwap::from_pointee(map)),
    }
}

fn layers(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let valid = request(Some(&key(0)));
    let unknown = request(Some(&key(usize::MAX / 3)));
    let missing = request(None);

    bench_one(&mut g, BenchmarkId::new("floor", "-"), Floor, &valid);
    #[allow(deprecated)] // "too basic": exactly why it is the cheapest baseline
    let bearer = ServiceBuilder::new()
        .layer(tower_http::validate_request::ValidateRequestHeaderLayer::bearer(&key(0)))
        .service(Floor);
    bench_one(
        &mut g,
        BenchmarkId::new("tower_http_bearer", "valid"),
        bearer,
        &valid,
    );

    for n in [1, 1_000, 1_000_000] {
        bench_one(
            &mut g,
            BenchmarkId::new("hand_written", format!("{n}/valid")),
            hand_written(n),
            &valid,
        );
        let layer = ApiKeyLayer::new(key_set(n));
        for (case, headers) in [
            ("valid", &valid),
            ("unknown", &unknown),
            ("missing", &missing),
        ] {
            bench_one(
                &mut g,
                BenchmarkId::new("api_key_layer", format!("{n}/{case}")),
                layer.layer(Floor),
                headers,
            );
        }
        bench_one(
            &mut g,
            BenchmarkId::new("api_key_layer_bearer_only", format!("{n}/valid")),
            layer.clone().bearer_only().layer(Floor),
            &valid,
        );
        bench_one(
            &mut g,
            BenchmarkId::new("api_key_layer_no_usage", format!("{n}/valid")),
            layer.clone().track_usage(false).layer(Floor),
            &valid,
        );
    }

    // 1M keys, a different valid key on every request: the lookup misses the caches.
    let n = 1_000_000;
    let cold: Vec<HeaderMap> = (0..n).step_by(97).map(|i| request(Some(&key(i)))).collect();
    let mut next = 0;
    let mut cold_case = |name: &str, mut svc: Box<dyn FnMut(Req) -> Res>| {
        g.bench_function(BenchmarkId::new(name.to_owned(), "1000000/cold"), |b| {
            b.iter_batched(
                || {
                    next = (next + 1) % cold.len();
                    build(&cold[next])
                },
                &mut svc,
                BatchSize::SmallInput,
            )
        });
    };
    let mut hw = hand_written(n);
    cold_case("hand_written", Box::new(move |req| call(&mut hw, req)));
    let mut ours = ApiKeyLayer::new(key_set(n)).layer(Floor);
    cold_case("api_key_layer", Box::new(move |req| call(&mut ours, req)));
    g.finish();
}

/// The unavoidable pieces alone, so their sum can be checked against the whole.
fn pieces(c: &mut Criterion) {
    let mut g = c.benchmark_group("piece");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    let headers = request(Some(&key(7)));
    g.bench_function("header_lookup", |b| {
        b.iter(|| black_box(black_box(&headers).get(header::AUTHORIZATION)).is_some())
    });
    let token = key(7);
    g.bench_function("sha256_40B", |b| {
        b.iter(|| Sha256::digest(black_box(token.as_bytes())))
    });
    let swap = ArcSwap::from_pointee(7u64);
    g.bench_function("arc_swap_load", |b| b.iter(|| **black_box(&swap).load()));
    let siphash: HashMap<[u8; 32], u64> = (0..1_000_000u64)
        .map(|i| (Sha256::digest(key(i as usize)).into(), i))
        .collect();
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    g.bench_function("siphash_map_lookup_1M", |b| {
        b.iter(|| black_box(&siphash).get(black_box(&digest)).copied())
    });
    let meta = Arc::new(7u64);
    g.bench_function("extension_insert_arc", |b| {
        b.iter_batched(
            http::Extensions::new,
            |mut ext| {
                ext.insert(meta.clone());
                ext
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, layers, pieces);
criterion_main!(benches);
