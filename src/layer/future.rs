//! [`ResponseFuture`], what [`ApiKeyService`](crate::ApiKeyService) returns: the
//! inner service's future for an accepted request, or the refusal, ready at once. For
//! a key close to its expiry (with
//! [`deprecation_headers(true)`](crate::ApiKeyLayer::deprecation_headers)) or with
//! limits, it adds the `Sunset`/`Deprecation` or `RateLimit` headers to the inner
//! service's response when that is ready; any other request pays for none of it.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//!
//! use http::{Request, Response, StatusCode};
//! use tower::{Layer, Service};
//! use tower_api_key::{ApiKey, ApiKeyLayer, KeySet, ResponseFuture};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = ApiKeyLayer::new(KeySet::from_keys([ApiKey::new("ci", "k-ci")])?);
//! let mut svc = layer.layer(tower::service_fn(|_req: Request<String>| async {
//!     Ok::<_, Infallible>(Response::new("from the handler".to_owned()))
//! }));
//!
//! // Refused: the future holds the response already; the handler never runs.
//! let refused: ResponseFuture<_> = svc.call(Request::get("/").body(String::new())?);
//! assert_eq!(refused.await?.status(), StatusCode::UNAUTHORIZED);
//!
//! let req = Request::get("/").header("x-api-key", "k-ci").body(String::new())?;
//! assert_eq!(svc.call(req).await?.into_body(), "from the handler");
//! # Ok(()) }
//! ```

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
            extra: Option<Box<Extra>>,
        },
        Rejected {
            output: Option<F::Output>,
        },
    }
}

/// What the response to an accepted request gets besides the inner service's
/// answer, made only for a key close to its expiry or with limits: boxed, so that
/// the future of any other key carries one empty pointer.
pub(crate) struct Extra {
    pub(crate) sunset: Option<Sunset>,
    pub(crate) ratelimit: Option<(HeaderValue, HeaderValue)>,
}

impl<F: Future> ResponseFuture<F> {
    pub(crate) fn inner(future: F) -> Self {
        Self::with(future, None)
    }

    /// The inner future, whose response gets `extra`.
    pub(crate) fn with(future: F, extra: Option<Box<Extra>>) -> Self {
        Self {
            kind: Kind::Inner { future, extra },
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
            KindProj::Inner { future, extra } => {
                let mut output = std::task::ready!(future.poll(cx));
                if let (Some(extra), Ok(res)) = (extra.take(), &mut output) {
                    add_extra(res, *extra);
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

/// Adds the `Sunset` headers and a limited key's `RateLimit` fields to the response,
/// each unless the handler set its own.
#[cold]
#[inline(never)]
fn add_extra<B>(res: &mut Response<B>, Extra { sunset, ratelimit }: Extra) {
    if let Some(sunset) = sunset {
        sunset.apply(res);
    }
    let headers = res.headers_mut();
    if let Some((policy, state)) = ratelimit
        && !headers.contains_key(crate::layer::ratelimit::STATE)
    {
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

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        future::{Ready, ready},
        task::Waker,
    };

    use http::header::HeaderName;

    use super::*;
    use crate::layer::ratelimit::{POLICY, STATE};

    type Answer = Result<Response<()>, Infallible>;

    /// Polls a future whose inner answer is `res` once, with `extra`.
    fn answered(res: Response<()>, extra: Option<Extra>) -> Response<()> {
        let mut future = std::pin::pin!(ResponseFuture::<Ready<Answer>>::with(
            ready(Ok(res)),
            extra.map(Box::new)
        ));
        let mut cx = Context::from_waker(Waker::noop());
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(res)) => res,
            Poll::Pending => panic!("a ready inner future"),
        }
    }

    fn fields() -> (HeaderValue, HeaderValue) {
        (
            HeaderValue::from_static("\"key\";q=10;w=60"),
            HeaderValue::from_static("\"key\";r=9;t=60"),
        )
    }

    fn names(res: &Response<()>) -> Vec<&HeaderName> {
        let mut names: Vec<_> = res.headers().keys().collect();
        names.sort_by_key(|name| name.as_str());
        names
    }

    #[test]
    fn the_usual_answer_passes_untouched() {
        let res = answered(Response::new(()), None);
        assert!(res.headers().is_empty());
    }

    #[test]
    fn a_key_close_to_expiry_with_limits_gets_both_sets_of_headers() {
        let day = 86_400_000;
        let expires = 1_796_083_200_000;
        let extra = Extra {
            sunset: Sunset::within(expires, 7 * day, expires - day),
            ratelimit: Some(fields()),
        };
        let res = answered(Response::new(()), Some(extra));
        assert_eq!(
            names(&res),
            ["deprecation", "ratelimit", "ratelimit-policy", "sunset"]
        );
        assert_eq!(res.headers()[&POLICY], fields().0);
        assert_eq!(res.headers()[&STATE], fields().1);
    }

    #[test]
    fn each_addition_comes_alone_and_a_handler_s_own_sunset_is_kept() {
        let day = 86_400_000;
        let expires = 1_796_083_200_000;
        let sunset = || Sunset::within(expires, 7 * day, expires - day);
        let limits_only = Extra {
            sunset: None,
            ratelimit: Some(fields()),
        };
        let res = answered(Response::new(()), Some(limits_only));
        assert_eq!(names(&res), ["ratelimit", "ratelimit-policy"]);
        let sunset_only = Extra {
            sunset: sunset(),
            ratelimit: None,
        };
        let res = answered(Response::new(()), Some(sunset_only));
        assert_eq!(names(&res), ["deprecation", "sunset"]);
        // An endpoint's own retirement outranks the key's, and the pair is not mixed
        // (a key's `Deprecation` after the handler's `Sunset` would break RFC 9745).
        for (name, value) in [
            ("sunset", "Wed, 01 Jan 2025 00:00:00 GMT"),
            ("deprecation", "@1735689600"),
        ] {
            let mut own = Response::new(());
            own.headers_mut()
                .insert(name, HeaderValue::from_static(value));
            let extra = Extra {
                sunset: sunset(),
                ratelimit: None,
            };
            let res = answered(own, Some(extra));
            assert_eq!(names(&res), [name], "the handler's {name} alone");
            assert_eq!(res.headers()[name], value);
        }
    }

    #[test]
    fn a_handler_s_own_ratelimit_fields_are_kept() {
        let mut own = Response::new(());
        own.headers_mut()
            .insert(STATE, HeaderValue::from_static("\"own\";r=1;t=1"));
        let extra = Extra {
            sunset: None,
            ratelimit: Some(fields()),
        };
        let res = answered(own, Some(extra));
        assert_eq!(res.headers()[&STATE], "\"own\";r=1;t=1");
        assert!(res.headers().get(&POLICY).is_none());
    }
}
