//! Services and requests shared by the benches: the floor, the hand-written
//! alternative, and requests with realistic headers.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::{
    collections::HashMap,
    convert::Infallible,
    future::{Ready, ready},
    hint::black_box,
    pin::pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use sha2::{Digest, Sha256};
use tower::Service;
use tower_api_key::{ApiKey, KeySet};

pub type Req = Request<()>;
pub type Res = Response<()>;

/// The floor: answers an empty 200 at once.
#[derive(Clone, Copy)]
pub struct Floor;

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
pub struct HandWritten<S> {
    pub inner: S,
    pub keys: Arc<ArcSwap<HashMap<[u8; 32], Arc<Meta>>>>,
}

#[allow(dead_code)]
pub struct Meta {
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

pub mod futures_like {
    use super::*;

    pub enum Either<F> {
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
pub fn key(i: usize) -> String {
    format!("tak_{i:0>36}")
}

/// A request with eight realistic headers, the key as a bearer token.
pub fn request(key: Option<&str>) -> HeaderMap {
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

pub fn build(headers: &HeaderMap) -> Req {
    let mut req = Request::new(());
    *req.headers_mut() = headers.clone();
    req
}

/// `ready().call()` and one poll: every service here answers without waiting.
pub fn call<S: Service<Req, Response = Res>>(svc: &mut S, req: Req) -> Res
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

pub fn key_set(n: usize) -> KeySet {
    KeySet::from_keys((0..n).map(|i| ApiKey::new(format!("key-{i}"), key(i)).with_scopes(["read"])))
        .unwrap()
}

/// [`key_set`], with keys `limited` given one rate limit no benchmark reaches (a
/// billion a second): what deciding it costs, never a refusal.
pub fn limited_key_set(n: usize, limited: &[usize]) -> KeySet {
    KeySet::from_keys((0..n).map(|i| {
        let key = ApiKey::new(format!("key-{i}"), key(i)).with_scopes(["read"]);
        match limited.contains(&i) {
            true => key.with_rate_limit(tower_api_key::limit::RateLimit::new(
                "burst",
                1_000_000_000,
                std::time::Duration::from_secs(1),
            )),
            false => key,
        }
    }))
    .unwrap()
}

pub fn hand_written(n: usize) -> HandWritten<Floor> {
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
