use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use crate::clock;

pin_project! {
    /// Response future for [`ApiKeyService`](crate::ApiKeyService).
    ///
    /// Either the inner service's future (the key was accepted) or the ready refusal.
    pub struct ResponseFuture<F>
    where
        F: Future,
    {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F>
    where
        F: Future,
    {
        Inner {
            #[pin]
            future: F,
            sunset: Option<Sunset>,
        },
        Rejected {
            output: Option<F::Output>,
        },
    }
}

impl<F: Future> ResponseFuture<F> {
    pub(crate) fn inner(future: F, sunset: Option<Sunset>) -> Self {
        Self {
            kind: Kind::Inner { future, sunset },
        }
    }

    pub(crate) fn rejected(output: F::Output) -> Self {
        Self {
            kind: Kind::Rejected {
                output: Some(output),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future, sunset } => {
                let mut output = std::task::ready!(future.poll(cx));
                if let (Some(sunset), Ok(res)) = (sunset.take(), &mut output) {
                    sunset.apply(res);
                }
                Poll::Ready(output)
            }
            KindProj::Rejected { output } => Poll::Ready(
                output
                    .take()
                    .expect("ResponseFuture polled after completion"),
            ),
        }
    }
}

/// RFC 8594 `Sunset` and RFC 9745 `Deprecation` headers for a key close to its
/// `expires_at`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sunset {
    /// `expires_at`, Unix milliseconds.
    expires_at: u64,
    /// When the key entered its expiry notice, Unix milliseconds.
    deprecated_at: u64,
}

impl Sunset {
    /// For a key expiring at `expires_at`, with an expiry notice of `notice`
    /// (both in milliseconds).
    pub(crate) fn new(expires_at: u64, notice: u64) -> Self {
        Self {
            expires_at,
            deprecated_at: expires_at.saturating_sub(notice),
        }
    }

    fn apply<B>(self, res: &mut Response<B>) {
        let headers = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&format!("@{}", self.deprecated_at / 1000)) {
            headers.insert("deprecation", v);
        }
        if let Ok(v) = HeaderValue::from_str(&clock::http_date(self.expires_at / 1000)) {
            headers.insert("sunset", v);
        }
    }
}

impl<F: Future> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Inner { .. } => "Inner",
            Kind::Rejected { .. } => "Rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}
