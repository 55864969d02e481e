//! A tonic server on 127.0.0.1 guarded by the same layer type, with a real tonic client.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tonic::{
    Code, Request, Response, Status, codegen::tokio_stream, metadata::MetadataValue,
    transport::Server,
};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_client::HealthClient,
    health_server::{Health, HealthServer},
};
use tower_api_key::{ApiKey, ApiKeyLayer, ChannelSource, KeyInfo, KeySet};

/// A health service whose handler reports which key let the call in, through the
/// `x-key-id` response metadata.
struct WhoAmI;

#[tonic::async_trait]
impl Health for WhoAmI {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let key = request
            .extensions()
            .get::<KeyInfo>()
            .ok_or_else(|| Status::internal("no KeyInfo"))?;
        let mut response = Response::new(HealthCheckResponse { status: 1 });
        response
            .metadata_mut()
            .insert("x-key-id", key.id().parse().unwrap());
        Ok(response)
    }

    type WatchStream = tokio_stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("watch"))
    }
}

async fn serve<R>(layer: ApiKeyLayer<R>) -> SocketAddr
where
    R: tower_api_key::RejectionResponse<tonic::body::Body> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        Server::builder()
            .layer(layer)
            .add_service(HealthServer::new(WhoAmI))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

/// Serves an axum router on 127.0.0.1, beside the tonic server.
async fn serve_http(app: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Calls `Check` with the given metadata; returns the key id the server saw, or the
/// status code.
async fn check(addr: SocketAddr, metadata: &[(&'static str, &str)]) -> Result<String, Code> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let mut request = Request::new(HealthCheckRequest {
        service: String::new(),
    });
    for (name, value) in metadata {
        request
            .metadata_mut()
            .insert(*name, MetadataValue::try_from(*value).unwrap());
    }
    match client.check(request).await {
        Ok(response) => Ok(response
            .metadata()
            .get("x-key-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()),
        Err(status) => Err(status.code()),
    }
}

fn keys() -> KeySet {
    KeySet::from_keys([
        ApiKey::new("grpc-reader", "grpc-key-1"),
        ApiKey::new("grpc-admin", "grpc-key-2").with_scopes(["admin"]),
    ])
    .unwrap()
}

#[tokio::test]
async fn valid_keys_reach_the_handler_with_key_info() {
    let addr = serve(ApiKeyLayer::new(keys())).await;
    assert_eq!(
        check(addr, &[("x-api-key", "grpc-key-1")]).await,
        Ok("grpc-reader".into())
    );
    assert_eq!(
        check(addr, &[("authorization", "Bearer grpc-key-2")]).await,
        Ok("grpc-admin".into())
    );
}

#[tokio::test]
async fn refusals_are_unauthenticated_not_a_mapped_http_status() {
    let addr = serve(ApiKeyLayer::new(keys())).await;
    assert_eq!(check(addr, &[]).await, Err(Code::Unauthenticated));
    assert_eq!(
        check(addr, &[("x-api-key", "wrong")]).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        check(
            addr,
            &[
                ("x-api-key", "grpc-key-1"),
                ("authorization", "Bearer grpc-key-2")
            ]
        )
        .await,
        Err(Code::Unauthenticated)
    );
}

#[tokio::test]
async fn missing_scope_is_permission_denied() {
    let addr = serve(ApiKeyLayer::new(keys()).require_scope("admin")).await;
    assert_eq!(
        check(addr, &[("x-api-key", "grpc-key-1")]).await,
        Err(Code::PermissionDenied)
    );
    assert_eq!(
        check(addr, &[("x-api-key", "grpc-key-2")]).await,
        Ok("grpc-admin".into())
    );
}

#[tokio::test]
async fn one_layer_guards_axum_and_tonic_and_a_swap_reaches_both() {
    let (source, publisher) = ChannelSource::new(keys());
    let layer = ApiKeyLayer::new(source);
    let grpc = serve(layer.clone()).await;
    let http = serve_http(
        axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route_layer(layer.clone()),
    )
    .await;
    let http_status = |key: &'static str| async move {
        reqwest::Client::new()
            .get(format!("http://{http}/"))
            .header("x-api-key", key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(http_status("grpc-key-1").await, 200);
    assert_eq!(
        check(grpc, &[("x-api-key", "grpc-key-1")]).await,
        Ok("grpc-reader".into())
    );

    publisher
        .publish(KeySet::from_keys([ApiKey::new("rotated", "grpc-key-3")]).unwrap())
        .unwrap();
    assert_eq!(http_status("grpc-key-1").await, 401);
    assert_eq!(http_status("grpc-key-3").await, 200);
    assert_eq!(
        check(grpc, &[("x-api-key", "grpc-key-1")]).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        check(grpc, &[("x-api-key", "grpc-key-3")]).await,
        Ok("rotated".into())
    );
}

/// One layer value with a custom HTTP refusal still fits a tonic server, whose gRPC
/// callers get their gRPC status, and an axum router, whose callers get the custom
/// body.
#[cfg(all(feature = "tonic", feature = "axum"))]
#[tokio::test]
async fn a_custom_refusal_costs_the_grpc_side_nothing() {
    let layer = ApiKeyLayer::new(keys()).with_rejection(|r: &tower_api_key::Rejection| {
        let mut res = http::Response::new(format!(r#"{{"error":"{r}"}}"#));
        *res.status_mut() = r.status();
        res
    });
    let grpc = serve(layer.clone()).await;
    let http = serve_http(
        axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route_layer(layer),
    )
    .await;
    assert_eq!(
        check(grpc, &[("x-api-key", "wrong")]).await,
        Err(Code::Unauthenticated)
    );
    assert_eq!(
        check(grpc, &[("x-api-key", "grpc-key-1")]).await,
        Ok("grpc-reader".into())
    );
    let res = reqwest::Client::new()
        .get(format!("http://{http}/"))
        .header("x-api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.text().await.unwrap(), r#"{"error":"invalid API key"}"#);
}

/// A scope on one service of a tonic server, the others (health checks) open.
#[cfg(feature = "tonic")]
#[tokio::test]
async fn a_scope_on_one_tonic_service() {
    use tower::Layer as _;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let keys = ApiKeyLayer::new(keys());
    tokio::spawn(async move {
        Server::builder()
            .add_service(keys.require_scope("admin").layer(HealthServer::new(WhoAmI)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    assert_eq!(check(addr, &[]).await, Err(Code::Unauthenticated));
    assert_eq!(
        check(addr, &[("x-api-key", "grpc-key-1")]).await,
        Err(Code::PermissionDenied)
    );
    assert_eq!(
        check(addr, &[("x-api-key", "grpc-key-2")]).await,
        Ok("grpc-admin".into())
    );
}
