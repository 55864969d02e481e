use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use crate::layer::sunset::Sunset;

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
            ratelimit: Option<Box<(HeaderValue, HeaderValue)>>,
        },
        Rejected {
            output: Option<F::Output>,
        },
    }
}

impl<F: Future> ResponseFuture<F> {
    pub(crate) fn inner(future: F, sunset: Option<Sunset>) -> Self {
        Self::limited(future, sunset, None)
    }

    /// The inner future, whose response gets the key's `RateLimit` fields.
    pub(crate) fn limited(
        future: F,
        sunset: Option<Sunset>,
        ratelimit: Option<Box<(HeaderValue, HeaderValue)>>,
    ) -> Self {
        Self {
            kind: Kind::Inner {
                future,
                sunset,
                ratelimit,
            },
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

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner {
                future,
                sunset,
                ratelimit,
            } => {
                let mut output = std::task::ready!(future.poll(cx));
                if let (Some(sunset), Ok(res)) = (sunset.take(), &mut output) {
                    sunset.apply(res);
                }
                if let (Some(fields), Ok(res)) = (ratelimit.take(), &mut output) {
                    add_fields(res, *fields);
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

/// Adds a limited key's `RateLimit` fields to the response, unless the handler set
/// its own.
#[cold]
#[inline(never)]
fn add_fields<B>(res: &mut Response<B>, (policy, state): (HeaderValue, HeaderValue)) {
    let headers = res.headers_mut();
    if !headers.contains_key(crate::layer::ratelimit::STATE) {
        headers.insert(crate::layer::ratelimit::POLICY, policy);
        headers.insert(crate::layer::ratelimit::STATE, state);
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
