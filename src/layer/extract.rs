//! Where a request's key is read from, and how: every value of every configured
//! location is looked at, and a request that presents no key, an unusable one, or two
//! different ones is refused before any lookup.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//!
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_api_key::{ApiKey, ApiKeyLayer, KeyLocation, KeySet, Rejection};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = ApiKeyLayer::new(KeySet::from_keys([ApiKey::new("ws", "k-1")])?)
//!     .with_key_locations([KeyLocation::Bearer, KeyLocation::query("api_key")]);
//! let svc = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
//!
//! let by_query = Request::get("/socket?api_key=k-1").body(())?;
//! assert_eq!(svc.clone().oneshot(by_query).await?.status(), StatusCode::OK);
//!
//! // X-API-Key is no longer a location: the key there is not seen.
//! let by_header = Request::get("/").header("x-api-key", "k-1").body(())?;
//! let res = svc.clone().oneshot(by_header).await?;
//! assert!(matches!(res.extensions().get::<Rejection>(), Some(Rejection::Missing)));
//!
//! // Two different keys in one request are refused, whichever would match.
//! let two = Request::get("/?api_key=k-1").header("authorization", "Bearer other").body(())?;
//! let res = svc.oneshot(two).await?;
//! assert!(matches!(res.extensions().get::<Rejection>(), Some(Rejection::Conflicting)));
//! # Ok(()) }
//! ```

use std::borrow::Cow;

use http::{
    HeaderMap, HeaderName, HeaderValue, Uri,
    header::{AUTHORIZATION, COOKIE},
    uri::PathAndQuery,
};

use crate::Rejection;

/// Where [`ApiKeyService`](crate::ApiKeyService) looks for the key.
///
/// The default is both [`KeyLocation::Bearer`] and `KeyLocation::Header("x-api-key")`.
/// gRPC metadata travels as headers, so the same header locations work for tonic.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyLocation {
    /// `Authorization: Bearer <key>` (the scheme is case-insensitive, RFC 7235).
    /// Other schemes (`Basic`, ...) are ignored.
    Bearer,
    /// The whole value of this header, e.g. `X-API-Key: <key>`.
    Header(HeaderName),
    /// The query parameter with this name, e.g. `?api_key=<key>`, percent-decoded
    /// (`+` is taken as it is, and so is a `%` without two hex digits after it). Query strings end up in access logs, proxies and
    /// browser history: prefer a header where clients can send one.
    Query(Cow<'static, str>),
    /// The cookie with this name, e.g. `Cookie: api_key=<key>`.
    Cookie(Cow<'static, str>),
}

impl KeyLocation {
    /// `X-API-Key: <key>`.
    pub fn x_api_key() -> Self {
        Self::Header(HeaderName::from_static("x-api-key"))
    }

    /// The query parameter `name`.
    pub fn query(name: impl Into<Cow<'static, str>>) -> Self {
        Self::Query(name.into())
    }

    /// The cookie `name`.
    pub fn cookie(name: impl Into<Cow<'static, str>>) -> Self {
        Self::Cookie(name.into())
    }
}

/// Reads the one key a request presents, from any of `locations`.
///
/// Every value of every location is looked at: no key is [`Rejection::Missing`], an
/// unusable credential is [`Rejection::Malformed`], two different keys are
/// [`Rejection::Conflicting`]. The same key twice is fine. Never panics, whatever the
/// bytes.
#[inline]
pub(crate) fn presented_key<'a>(
    uri: &'a Uri,
    headers: &'a HeaderMap,
    locations: &[KeyLocation],
) -> Result<Cow<'a, [u8]>, Rejection> {
    match in_headers(headers, locations) {
        Some(key) => key.map(Cow::Borrowed),
        None => anywhere(uri, headers, locations),
    }
}

/// [`presented_key`] for any request and any locations: out of line, as the usual
/// request is answered by [`in_headers`].
#[inline(never)]
fn anywhere<'a>(
    uri: &'a Uri,
    headers: &'a HeaderMap,
    locations: &[KeyLocation],
) -> Result<Cow<'a, [u8]>, Rejection> {
    // Borrowed from the request, as every header location gives; a percent-decoded
    // query value is the only one that needs its own bytes.
    let mut found: Option<&'a [u8]> = None;
    let mut decoded: Option<Vec<u8>> = None;
    for location in locations {
        match location {
            KeyLocation::Bearer => {
                for value in headers.get_all(AUTHORIZATION) {
                    if let Some(token) = bearer_token(value.as_bytes()) {
                        offer(&mut found, token)?;
                    }
                }
            }
            KeyLocation::Header(name) => {
                if !may_hold(headers, name) {
                    continue;
                }
                for value in headers.get_all(name) {
                    offer(&mut found, trim(value.as_bytes()))?;
                }
            }
            KeyLocation::Query(name) => {
                for (param, value) in query_pairs(uri) {
                    if param == name.as_bytes() {
                        match Cow::from(percent_encoding::percent_decode(value)) {
                            Cow::Borrowed(value) => offer(&mut found, value)?,
                            Cow::Owned(value) => {
                                if value.is_empty() {
                                    return Err(Rejection::Malformed);
                                }
                                match &decoded {
                                    Some(seen) if *seen != value => {
                                        return Err(Rejection::Conflicting);
                                    }
                                    _ => decoded = Some(value),
                                }
                            }
                        }
                    }
                }
            }
            KeyLocation::Cookie(name) => {
                for value in headers.get_all(COOKIE) {
                    for (cookie, value) in cookies(value.as_bytes()) {
                        if cookie == name.as_bytes() {
                            offer(&mut found, value)?;
                        }
                    }
                }
            }
        }
    }
    match (found, decoded) {
        (Some(found), Some(decoded)) if found != decoded.as_slice() => Err(Rejection::Conflicting),
        (_, Some(decoded)) => Ok(Cow::Owned(decoded)),
        (Some(found), None) => Ok(Cow::Borrowed(found)),
        (None, None) => Err(Rejection::Missing),
    }
}

/// [`presented_key`]'s first step: when every location is a header (`Bearer` or
/// `Header`) and no header name of the request has a second value, each location is
/// read with one `HeaderMap::get` (no iterator over a name's values, no `Cow`), with
/// no query or cookie branch around it. `None` in any other case, which the rest of
/// [`presented_key`] answers: locations that include a query or a cookie, or a
/// request with any repeated header, such as two `Accept` fields, a proxy's second
/// `Via`, or HTTP/2 cookies sent as separate fields. Whenever it answers, it gives
/// what the rest would: the same locations in the same order, the same refusals.
#[inline]
fn in_headers<'a>(
    headers: &'a HeaderMap,
    locations: &[KeyLocation],
) -> Option<Result<&'a [u8], Rejection>> {
    let headers_only = (locations.iter())
        .all(|location| matches!(location, KeyLocation::Bearer | KeyLocation::Header(_)));
    // `len` counts values, `keys_len` names (http documents both): equal when each
    // name has one value. Whatever took a name out (`remove`, `insert` over it) took
    // its further values with it.
    if !headers_only || headers.len() != headers.keys_len() {
        return None;
    }
    let mut found: Option<&'a [u8]> = None;
    for location in locations {
        let value = match location {
            KeyLocation::Bearer => {
                (headers.get(AUTHORIZATION)).and_then(|value| bearer_token(value.as_bytes()))
            }
            KeyLocation::Header(name) => match may_hold(headers, name) {
                true => headers.get(name).map(|value| trim(value.as_bytes())),
                false => None,
            },
            // Not here: checked above.
            KeyLocation::Query(_) | KeyLocation::Cookie(_) => None,
        };
        if let Some(value) = value
            && let Err(refused) = offer(&mut found, value)
        {
            return Some(Err(refused));
        }
    }
    Some(found.ok_or(Rejection::Missing))
}

/// Whether `headers` may have `name`: false when they surely do not. Finding a custom
/// name absent by hashing it is a chain of multiplications, one byte after another
/// (about 15 ns for `X-API-Key`, a request's most common miss); comparing it with
/// each of a few names present is quicker, as each comparison stands alone and most
/// stop at the kind or the length.
#[inline]
fn may_hold(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.keys_len() > FEW_HEADERS || headers.keys().any(|present| present == name)
}

/// Up to how many distinct header names [`may_hold`] compares one by one.
const FEW_HEADERS: usize = 16;

/// One more credential: refused if empty, or if it differs from one seen before.
#[inline(always)]
fn offer<'a>(found: &mut Option<&'a [u8]>, key: &'a [u8]) -> Result<(), Rejection> {
    if key.is_empty() {
        return Err(Rejection::Malformed);
    }
    match found {
        Some(seen) if *seen != key => Err(Rejection::Conflicting),
        Some(_) => Ok(()),
        None => {
            *found = Some(key);
            Ok(())
        }
    }
}

/// The token of a `Bearer` credential (possibly empty); `None` for another scheme.
#[inline]
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    // The form nearly every client sends, `Bearer <token>`, read without a scan: the
    // same token as below, since neither end of the token is whitespace.
    if let Some(token) = value.strip_prefix(b"Bearer ")
        && let (Some(first), Some(last)) = (token.first(), token.last())
        && !first.is_ascii_whitespace()
        && !last.is_ascii_whitespace()
    {
        return Some(token);
    }
    bearer_token_in_general(value)
}

/// [`bearer_token`], for any spacing and case.
fn bearer_token_in_general(value: &[u8]) -> Option<&[u8]> {
    let value = trim(value);
    let split = value
        .iter()
        .position(|b| *b == b' ' || *b == b'\t')
        .unwrap_or(value.len());
    let (scheme, rest) = value.split_at(split);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| trim(rest))
}

#[inline]
fn trim(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// The `name=value` pairs of the query string, undecoded.
fn query_pairs(uri: &Uri) -> impl Iterator<Item = (&[u8], &[u8])> {
    uri.query()
        .unwrap_or("")
        .as_bytes()
        .split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &pair[pair.len()..]),
        })
}

/// The `name=value` pairs of one `Cookie` header (RFC 6265: `; `-separated, a value
/// possibly in double quotes).
fn cookies(header: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    header.split(|&b| b == b';').filter_map(|pair| {
        let at = pair.iter().position(|&b| b == b'=')?;
        let value = trim(&pair[at + 1..]);
        let value = value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(value);
        Some((trim(&pair[..at]), value))
    })
}

/// Removes the credentials a key can be read from, and only those: a header location
/// loses its header; `Authorization` loses its `Bearer` values and keeps any other
/// scheme's (`Basic`, ...) for a second auth layer downstream; a query parameter or a
/// cookie is taken out of the query string or the `Cookie` header, the rest kept.
#[inline(never)]
pub(crate) fn strip<B>(req: &mut http::Request<B>, locations: &[KeyLocation]) {
    for location in locations {
        let headers = req.headers_mut();
        match location {
            KeyLocation::Header(name) => drop(headers.remove(name)),
            KeyLocation::Bearer => {
                keep_values(headers, &AUTHORIZATION, |v| {
                    bearer_token(v).is_none().then(|| v.to_vec())
                });
            }
            KeyLocation::Cookie(name) => keep_values(headers, &COOKIE, |v| {
                let kept: Vec<&[u8]> = v
                    .split(|&b| b == b';')
                    .filter(|pair| {
                        let cookie = pair.split(|&b| b == b'=').next().unwrap_or(&[]);
                        trim(cookie) != name.as_bytes()
                    })
                    .map(trim)
                    .collect();
                (!kept.is_empty()).then(|| kept.join(&b"; "[..]))
            }),
            KeyLocation::Query(name) => {
                let uri = req.uri_mut();
                if query_pairs(uri).any(|(param, _)| param == name.as_bytes()) {
                    let kept: Vec<&str> = (uri.query().unwrap_or("").split('&'))
                        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some(name))
                        .collect();
                    let path_and_query = match kept.is_empty() {
                        true => uri.path().to_owned(),
                        false => format!("{}?{}", uri.path(), kept.join("&")),
                    };
                    let mut parts = uri.clone().into_parts();
                    if let Ok(pq) = PathAndQuery::try_from(path_and_query) {
                        parts.path_and_query = Some(pq);
                        if let Ok(stripped) = Uri::from_parts(parts) {
                            *uri = stripped;
                        }
                    }
                }
            }
        }
    }
}

/// Rewrites every value of header `name` with `keep` (`None` drops the value).
fn keep_values(
    headers: &mut HeaderMap,
    name: &HeaderName,
    keep: impl Fn(&[u8]) -> Option<Vec<u8>>,
) {
    let values: Vec<HeaderValue> = headers.get_all(name).iter().cloned().collect();
    let kept: Vec<HeaderValue> = values
        .iter()
        .filter_map(|v| keep(v.as_bytes()))
        .filter_map(|v| HeaderValue::from_bytes(&v).ok())
        .collect();
    if kept != values {
        headers.remove(name);
        for value in kept {
            headers.append(name, value);
        }
    }
}

pub(crate) fn default_locations() -> Vec<KeyLocation> {
    vec![KeyLocation::Bearer, KeyLocation::x_api_key()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    fn read(pairs: &[(&str, &[u8])]) -> Result<Vec<u8>, String> {
        presented_key(&Uri::default(), &headers(pairs), &default_locations())
            .map(|k| k.to_vec())
            .map_err(|r| format!("{r:?}"))
    }

    #[test]
    fn x_api_key_is_found_and_checked_among_few_headers_and_many() {
        for others in [0, 3, FEW_HEADERS - 2, FEW_HEADERS, FEW_HEADERS + 5] {
            let names: Vec<String> = (0..others).map(|i| format!("x-other-{i}")).collect();
            let mut pairs: Vec<(&str, &[u8])> =
                names.iter().map(|n| (n.as_str(), &b"v"[..])).collect();
            pairs.push(("x-api-key", b"k1"));
            assert_eq!(read(&pairs), Ok(b"k1".to_vec()), "{others} other headers");
            pairs.push(("authorization", b"Bearer k2"));
            assert_eq!(
                read(&pairs),
                Err("Conflicting".to_owned()),
                "{others} other headers"
            );
            pairs.pop();
            pairs.push(("X-Api-Key", b"k3"));
            assert_eq!(
                read(&pairs),
                Err("Conflicting".to_owned()),
                "a second value"
            );
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for value in [
            &b"Bearer abc"[..],
            b"bearer abc",
            b"BEARER   abc  ",
            b"bEaReR\tabc",
        ] {
            assert_eq!(read(&[("authorization", value)]), Ok(b"abc".to_vec()));
        }
    }

    #[test]
    fn x_api_key_and_agreeing_duplicates() {
        assert_eq!(read(&[("x-api-key", b" abc ")]), Ok(b"abc".to_vec()));
        assert_eq!(
            read(&[("x-api-key", b"abc"), ("authorization", b"Bearer abc")]),
            Ok(b"abc".to_vec())
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(read(&[]), Err("Missing".into()));
        assert_eq!(
            read(&[("authorization", b"Basic dXNlcjpwYXNz")]),
            Err("Missing".into())
        );
        assert_eq!(
            read(&[("authorization", b"Bearer")]),
            Err("Malformed".into())
        );
        assert_eq!(
            read(&[("authorization", b"Bearer   ")]),
            Err("Malformed".into())
        );
        assert_eq!(read(&[("x-api-key", b"")]), Err("Malformed".into()));
        assert_eq!(
            read(&[("x-api-key", b"a"), ("authorization", b"Bearer b")]),
            Err("Conflicting".into())
        );
        assert_eq!(
            read(&[("x-api-key", b"a"), ("x-api-key", b"b")]),
            Err("Conflicting".into())
        );
    }

    /// Requests of a few headers: each combination of an `Authorization`, an
    /// `X-API-Key` and an `X-Token` value (or none), after 0, 3 or more than
    /// [`FEW_HEADERS`] other names, each once and again with a name repeated.
    fn header_combinations() -> Vec<HeaderMap> {
        let bearers: [&[u8]; 6] = [
            b"Bearer k1",
            b"bearer   k1 ",
            b"Bearer k2",
            b"Bearer",
            b"Bearer  ",
            b"Basic dXNlcjpwYXNz",
        ];
        let x_api_keys: [&[u8]; 4] = [b"k1", b" k1\t", b"", b"k2"];
        let x_tokens: [&[u8]; 2] = [b"k1", b"k3"];
        let fillers: Vec<String> = (0..FEW_HEADERS + 3)
            .map(|i| format!("x-filler-{i}"))
            .collect();
        let none = std::iter::once(None);
        let mut maps = Vec::new();
        for bearer in none.clone().chain(bearers.map(Some)) {
            for x_api_key in none.clone().chain(x_api_keys.map(Some)) {
                for x_token in none.clone().chain(x_tokens.map(Some)) {
                    for (others, repeated) in [0, 3, FEW_HEADERS + 3]
                        .into_iter()
                        .flat_map(|n| [(n, false), (n, true)])
                    {
                        let mut pairs: Vec<(&str, &[u8])> = fillers[..others]
                            .iter()
                            .map(|n| (n.as_str(), &b"v"[..]))
                            .collect();
                        pairs.extend(bearer.map(|v| ("authorization", v)));
                        pairs.extend(x_api_key.map(|v| ("x-api-key", v)));
                        pairs.extend(x_token.map(|v| ("x-token", v)));
                        if repeated {
                            // The last name again (the key's own when there is one).
                            let again = pairs.last().copied().unwrap_or(("x-other", b"v"));
                            pairs.extend([again, ("x-other", b"w")]);
                        }
                        maps.push(headers(&pairs));
                    }
                }
            }
        }
        maps
    }

    #[test]
    fn the_quick_read_of_headers_answers_as_the_general_one() {
        let x_api_key = KeyLocation::x_api_key;
        let x_token = || KeyLocation::Header(HeaderName::from_static("x-token"));
        let location_sets = [
            default_locations(),
            vec![KeyLocation::Bearer],
            vec![x_api_key()],
            vec![x_api_key(), KeyLocation::Bearer],
            vec![x_token(), x_api_key()],
            vec![KeyLocation::Bearer, KeyLocation::query("api_key")],
            vec![KeyLocation::cookie("api_key"), x_api_key()],
        ];
        let shown =
            |key: Result<&[u8], Rejection>| key.map(<[u8]>::to_vec).map_err(|r| format!("{r:?}"));
        let maps = header_combinations();
        let mut answered = 0;
        for locations in &location_sets {
            let headers_only = (locations.iter())
                .all(|l| matches!(l, KeyLocation::Bearer | KeyLocation::Header(_)));
            for map in &maps {
                let general = anywhere(&Uri::default(), map, locations).map(Cow::into_owned);
                let case = format!("{locations:?} {map:?}");
                match in_headers(map, locations) {
                    Some(quick) => {
                        assert_eq!(
                            shown(quick),
                            shown(general.as_deref().map_err(Clone::clone)),
                            "{case}"
                        );
                        answered += 1;
                    }
                    None => assert!(
                        !headers_only || map.len() != map.keys_len(),
                        "declined {case}"
                    ),
                }
            }
        }
        // Five header-only sets, each with every request without a repeated name.
        assert_eq!(maps.len(), 7 * 5 * 3 * 6);
        assert_eq!(answered, 5 * 7 * 5 * 3 * 3);
    }

    #[test]
    fn the_quick_read_holds_after_values_are_replaced_or_removed() {
        let bearer = |key: &str| HeaderValue::try_from(format!("Bearer {key}")).unwrap();
        let quick = |map: &HeaderMap| {
            in_headers(map, &default_locations())
                .map(|key| key.map(<[u8]>::to_vec).map_err(|r| format!("{r:?}")))
        };
        let c = Some(Ok(b"c".to_vec()));
        // Two values, then one `insert` over both: one value again, read quickly.
        let mut map = HeaderMap::new();
        map.append(AUTHORIZATION, bearer("a"));
        map.append(AUTHORIZATION, bearer("b"));
        assert_eq!(quick(&map), None, "two values");
        map.insert(AUTHORIZATION, bearer("c"));
        assert_eq!(quick(&map), c);
        // Two `X-API-Key` values, removed: what is left is read quickly.
        map.append("x-api-key", HeaderValue::from_static("k1"));
        map.append("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(quick(&map), None, "two values");
        map.remove("x-api-key");
        assert_eq!(map.len(), map.keys_len());
        assert_eq!(quick(&map), c);
        let uri = Uri::default();
        let general = anywhere(&uri, &map, &default_locations()).map(Cow::into_owned);
        assert_eq!(general.ok(), Some(b"c".to_vec()));
    }

    #[test]
    fn never_panics_on_any_bytes() {
        // Every byte a HeaderValue can hold, alone and around a scheme.
        for b in 0u8..=255 {
            for value in [
                vec![b],
                b"Bearer ".iter().copied().chain([b]).collect(),
                vec![b; 3],
            ] {
                if let Ok(v) = HeaderValue::from_bytes(&value) {
                    let mut map = HeaderMap::new();
                    map.insert(AUTHORIZATION, v.clone());
                    map.insert("x-api-key", v);
                    let _ = presented_key(&Uri::default(), &map, &default_locations());
                }
            }
        }
    }

    #[test]
    fn stripping_keeps_other_schemes() {
        let map = headers(&[
            ("authorization", b"Bearer abc"),
            ("authorization", b"Basic dXNlcjpwYXNz"),
            ("x-api-key", b"abc"),
            ("x-other", b"kept"),
        ]);
        let mut req = http::Request::new(());
        *req.headers_mut() = map;
        strip(&mut req, &default_locations());
        let map = req.headers();
        let auth: Vec<_> = map.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(auth, ["Basic dXNlcjpwYXNz"]);
        assert!(!map.contains_key("x-api-key"));
        assert_eq!(map["x-other"], "kept");
        let mut req = http::Request::new(());
        *req.headers_mut() = headers(&[("authorization", b"Basic dXNlcjpwYXNz")]);
        strip(&mut req, &[KeyLocation::Bearer]);
        assert_eq!(req.headers()[AUTHORIZATION], "Basic dXNlcjpwYXNz");
    }

    #[test]
    fn query_and_cookie_locations() {
        let locations = [
            KeyLocation::query("api_key"),
            KeyLocation::cookie("api_key"),
        ];
        let read = |uri: &str, cookie: Option<&str>| {
            let uri: Uri = uri.parse().unwrap();
            let mut map = HeaderMap::new();
            if let Some(cookie) = cookie {
                map.insert(COOKIE, HeaderValue::from_str(cookie).unwrap());
            }
            presented_key(&uri, &map, &locations)
                .map(|k| k.to_vec())
                .map_err(|r| format!("{r:?}"))
        };
        assert_eq!(read("/x?a=1&api_key=abc&b=2", None), Ok(b"abc".to_vec()));
        assert_eq!(read("/x?api_key=a%2Bb%20c", None), Ok(b"a+b c".to_vec()));
        assert_eq!(read("/x?api_key=a+b", None), Ok(b"a+b".to_vec()));
        // A `%` without two hex digits is kept as written, as URL parsers do.
        assert_eq!(read("/x?api_key=%zz", None), Ok(b"%zz".to_vec()));
        assert_eq!(read("/x?api_key=%00", None), Ok(b"\0".to_vec()));
        assert_eq!(read("/x?api_key=", None), Err("Malformed".into()));
        assert_eq!(read("/x?other=abc", None), Err("Missing".into()));
        assert_eq!(
            read("/x", Some("theme=dark; api_key=abc")),
            Ok(b"abc".to_vec())
        );
        assert_eq!(read("/x", Some("api_key=\"abc\"")), Ok(b"abc".to_vec()));
        assert_eq!(
            read("/x?api_key=abc", Some("api_key=abc")),
            Ok(b"abc".to_vec())
        );
        assert_eq!(
            read("/x?api_key=abc", Some("api_key=xyz")),
            Err("Conflicting".into())
        );
    }

    #[test]
    fn stripping_a_query_parameter_or_a_cookie_keeps_the_rest() {
        let mut req = http::Request::get("/items?a=1&api_key=abc&b=2")
            .header(COOKIE, "theme=dark; api_key=abc; lang=en")
            .body(())
            .unwrap();
        strip(
            &mut req,
            &[
                KeyLocation::query("api_key"),
                KeyLocation::cookie("api_key"),
            ],
        );
        assert_eq!(req.uri(), "/items?a=1&b=2");
        assert_eq!(req.headers()[COOKIE], "theme=dark; lang=en");
        let mut req = http::Request::get("/items?api_key=abc")
            .header(COOKIE, "api_key=abc")
            .body(())
            .unwrap();
        strip(
            &mut req,
            &[
                KeyLocation::query("api_key"),
                KeyLocation::cookie("api_key"),
            ],
        );
        assert_eq!(req.uri(), "/items");
        assert!(!req.headers().contains_key(COOKIE));
    }

    #[test]
    fn bearer_only_ignores_other_headers() {
        let map = headers(&[("x-api-key", b"abc")]);
        assert!(matches!(
            presented_key(&Uri::default(), &map, &[KeyLocation::Bearer]),
            Err(Rejection::Missing)
        ));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// The fast read of `Bearer <token>` agrees with the general one on any value,
        /// most of them starting as the fast path expects.
        #[test]
        fn the_bearer_fast_path_agrees_with_the_general_one(
            prefix in prop::sample::select(vec![&b"Bearer "[..], b"Bearer", b"bearer ", b"", b"Bearer  "]),
            rest in prop::collection::vec(
                prop::sample::select(vec![b'a', b' ', b'\t', b'\x0c', b'B', 0xff, b'=']),
                0..12,
            ),
        ) {
            let value = [prefix, &rest[..]].concat();
            prop_assert_eq!(bearer_token(&value), bearer_token_in_general(&value));
        }

        /// The quick read of headers answers as the general reader, on any bytes in
        /// `Authorization`, `X-API-Key` and another header, each name once or more,
        /// for the default locations and for `X-API-Key` before `Bearer`.
        #[test]
        fn the_quick_read_of_headers_agrees_with_the_general_one(
            values in prop::collection::vec(
                (0..3u8, prop::collection::vec(
                    prop::sample::select(vec![b'k', b'1', b' ', b'\t', b'B', b'e', b'a', b'r', 0xff]),
                    0..12,
                )),
                0..5,
            ),
            prefixed in any::<bool>(),
            x_api_key_first in any::<bool>(),
        ) {
            let mut map = HeaderMap::new();
            for (which, bytes) in &values {
                let (name, bytes) = match which {
                    0 if prefixed => (AUTHORIZATION, [&b"Bearer "[..], bytes].concat()),
                    0 => (AUTHORIZATION, bytes.clone()),
                    1 => (HeaderName::from_static("x-api-key"), bytes.clone()),
                    _ => (HeaderName::from_static("x-other"), bytes.clone()),
                };
                if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                    map.append(name, value);
                }
            }
            let mut locations = default_locations();
            if x_api_key_first {
                locations.reverse();
            }
            let general = anywhere(&Uri::default(), &map, &locations)
                .map(Cow::into_owned)
                .map_err(|r| format!("{r:?}"));
            match in_headers(&map, &locations) {
                Some(quick) => prop_assert_eq!(
                    quick.map(<[u8]>::to_vec).map_err(|r| format!("{r:?}")),
                    general
                ),
                None => prop_assert!(map.len() != map.keys_len()),
            }
        }

        /// Any header bytes: an answer, never a panic; a key that is read is a trimmed,
        /// non-empty part of some value of a location.
        #[test]
        fn any_header_bytes(
            values in prop::collection::vec(
                (0..3u8, prop::collection::vec(any::<u8>(), 0..48)),
                0..4,
            )
        ) {
            let mut map = HeaderMap::new();
            for (which, bytes) in &values {
                let name = match which {
                    0 => AUTHORIZATION,
                    1 => HeaderName::from_static("x-api-key"),
                    _ => HeaderName::from_static("x-other"),
                };
                if let Ok(value) = HeaderValue::from_bytes(bytes) {
                    map.append(name, value);
                }
            }
            if let Ok(key) = presented_key(&Uri::default(), &map, &default_locations()) {
                prop_assert!(!key.is_empty());
                prop_assert_eq!(&*key, key.trim_ascii());
                let found = map
                    .iter()
                    .filter(|(n, _)| *n == AUTHORIZATION || n.as_str() == "x-api-key")
                    .any(|(_, v)| v.as_bytes().windows(key.len()).any(|w| w == &*key));
                prop_assert!(found);
            }
            let mut req = http::Request::new(());
            *req.headers_mut() = map;
            strip(&mut req, &default_locations());
            prop_assert!(!req.headers().contains_key("x-api-key"));
            prop_assert!(req.headers().get_all(AUTHORIZATION).iter().all(|v| bearer_token(v.as_bytes()).is_none()));
        }
    }
}
