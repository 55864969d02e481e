//! Tower middleware that checks API keys, with keys you can add, rotate and revoke
//! while the server keeps running.
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

mod clock;
mod error;
mod extract;
mod future;
mod key;
mod key_set;
mod layer;
mod log;
mod rejection;
mod report;
mod service;
mod source;
mod store;

pub use crate::{
    error::Error,
    extract::KeyLocation,
    future::ResponseFuture,
    key::{ApiKey, KeyInfo},
    key_set::KeySet,
    layer::ApiKeyLayer,
    rejection::{DefaultRejection, Rejection, RejectionResponse},
    report::{KeyUsage, ReloadReport},
    service::ApiKeyService,
    source::{ChannelSource, EnvSource, KeyPublisher, KeySource},
    store::{KeyStore, KeyUpdater, Reloads},
};

#[cfg(feature = "file")]
pub use crate::source::FileSource;
