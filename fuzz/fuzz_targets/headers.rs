//! Any request header bytes through the layer: never a panic, and a request is let in
//! only with the one valid key.
#![no_main]

use std::{
    convert::Infallible,
    future::{Future, Ready, ready},
    pin::pin,
    sync::OnceLock,
    task::{Context, Poll, Waker},
};

use http::{HeaderName, HeaderValue, Request, Response};
use libfuzzer_sys::fuzz_target;
use tower_api_key::{ApiKey, ApiKeyLayer, KeyLocation, KeySet};
use tower_layer::Layer;
use tower_service::Service;

#[derive(Clone)]
struct Ok200;

impl Service<Request<()>> for Ok200 {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        ready(Ok(Response::new(())))
    }
}

fn layer() -> &'static ApiKeyLayer {
    static LAYER: OnceLock<ApiKeyLayer> = OnceLock::new();
    LAYER.get_or_init(|| {
        let keys = KeySet::from_keys([ApiKey::new("k", "the-one-key")]).expect("valid");
        ApiKeyLayer::new(keys)
            .with_key_locations([
                KeyLocation::Bearer,
                KeyLocation::x_api_key(),
            ])
            .hide_credentials(true)
    })
}

fuzz_target!(|data: &[u8]| {
    // Pairs of (name, value) cut at 0xff bytes; names that http refuses are skipped.
    let mut req = Request::new(());
    let mut parts = data.split(|&b| b == 0xff);
    while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
        let name = match name.first() {
            Some(0) => HeaderName::from_static("authorization"),
            Some(1) => HeaderName::from_static("x-api-key"),
            Some(2) => HeaderName::from_static("content-type"),
            _ => match HeaderName::from_bytes(name) {
                Ok(name) => name,
                Err(_) => continue,
            },
        };
        if let Ok(value) = HeaderValue::from_bytes(value) {
            req.headers_mut().append(name, value);
        }
    }
    let presented: Vec<Vec<u8>> = req
        .headers()
        .get_all("x-api-key")
        .iter()
        .map(|v| v.as_bytes().trim_ascii().to_vec())
        .collect();
    let mut svc = layer().layer(Ok200);
    let mut cx = Context::from_waker(Waker::noop());
    let res = match pin!(svc.call(req)).poll(&mut cx) {
        Poll::Ready(Ok(res)) => res,
        _ => panic!("the layer answers at once"),
    };
    if res.status() == 200 {
        // Let in: some location carried exactly the one key (x-api-key values, if
        // any, all agree with it).
        assert!(presented.iter().all(|k| k == b"the-one-key"));
    }
});
