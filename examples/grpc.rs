//! A tonic gRPC server guarded by the same `ApiKeyLayer` as an axum app, and a tonic
//! client calling it with and without a key.
//!
//! ```sh
//! cargo run --example grpc
//! ```
//!
//! The server is tonic-health's standard health service; the client sends the key as
//! `authorization: Bearer <key>` metadata.

use std::error::Error;

use tokio::net::TcpListener;
use tonic::{Request, codegen::tokio_stream::wrappers::TcpListenerStream, transport::Server};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower_api_key::{ApiKey, ApiKeyLayer, KeySet};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let keys = KeySet::from_keys([ApiKey::new("grpc-client", "demo-grpc-key")])?;
    let layer = ApiKeyLayer::try_new(keys)?;

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:50051").await?;
    println!("gRPC health service on 127.0.0.1:50051, guarded by ApiKeyLayer");
    tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let channel = tonic::transport::Channel::from_static("http://127.0.0.1:50051")
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    for key in [Some("demo-grpc-key"), Some("wrong-key"), None] {
        let mut request = Request::new(HealthCheckRequest::default());
        if let Some(key) = key {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse()?);
        }
        match client.check(request).await {
            Ok(response) => println!("key {key:?}: {:?}", response.into_inner().status()),
            Err(status) => println!("key {key:?}: {:?} ({})", status.code(), status.message()),
        }
    }
    Ok(())
}
