use http::{HeaderMap, HeaderName, header::AUTHORIZATION};

use crate::Rejection;

/// Where [`ApiKeyService`](crate::ApiKeyService) looks for the key.
///
/// The default is both [`KeyLocation::Bearer`] and `KeyLocation::Header("x-api-key")`.
/// gRPC metadata travels as headers, so the same locations work for tonic.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyLocation {
    /// `Authorization: Bearer <key>` (the scheme is case-insensitive, RFC 7235).
    /// Other schemes (`Basic`, ...) are ignored.
    Bearer,
    /// The whole value of this header, e.g. `X-API-Key: <key>`.
    Header(HeaderName),
}

impl KeyLocation {
    /// `X-API-Key: <key>`.
    pub fn x_api_key() -> Self {
        Self::Header(HeaderName::from_static("x-api-key"))
    }

    fn header_name(&self) -> &HeaderName {
        match self {
            Self::Bearer => &AUTHORIZATION,
            Self::Header(name) => name,
        }
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
    headers: &'a HeaderMap,
    locations: &[KeyLocation],
) -> Result<&'a [u8], Rejection> {
    let mut found: Option<&[u8]> = None;
    for location in locations {
        for value in headers.get_all(location.header_name()) {
            let key = match location {
                KeyLocation::Bearer => match bearer_token(value.as_bytes()) {
                    Some(token) => token,
                    None => continue,
                },
                KeyLocation::Header(_) => trim(value.as_bytes()),
            };
            if key.is_empty() {
                return Err(Rejection::Malformed);
            }
            match found {
                Some(seen) if seen != key => return Err(Rejection::Conflicting),
                _ => found = Some(key),
            }
        }
    }
    found.ok_or(Rejection::Missing)
}

/// The token of a `Bearer` credential (possibly empty); `None` for another scheme.
#[inline]
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
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

/// Removes the credentials a key can be read from, and only those: a header location
/// loses its header; `Authorization` loses its `Bearer` values, and keeps any other
/// scheme's (`Basic`, ...) for a second auth layer downstream.
pub(crate) fn strip(headers: &mut HeaderMap, locations: &[KeyLocation]) {
    for location in locations {
        match location {
            KeyLocation::Header(name) => drop(headers.remove(name)),
            KeyLocation::Bearer => {
                if headers
                    .get_all(AUTHORIZATION)
                    .iter()
                    .any(|v| bearer_token(v.as_bytes()).is_some())
                {
                    let kept: Vec<_> = headers
                        .get_all(AUTHORIZATION)
                        .iter()
                        .filter(|v| bearer_token(v.as_bytes()).is_none())
                        .cloned()
                        .collect();
                    headers.remove(AUTHORIZATION);
                    for value in kept {
                        headers.append(AUTHORIZATION, value);
                    }
                }
            }
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
        presented_key(&headers(pairs), &default_locations())
            .map(<[u8]>::to_vec)
            .map_err(|r| format!("{r:?}"))
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
                    let _ = presented_key(&map, &default_locations());
                }
            }
        }
    }

    #[test]
    fn stripping_keeps_other_schemes() {
        let mut map = headers(&[
            ("authorization", b"Bearer abc"),
            ("authorization", b"Basic dXNlcjpwYXNz"),
            ("x-api-key", b"abc"),
            ("x-other", b"kept"),
        ]);
        strip(&mut map, &default_locations());
        let auth: Vec<_> = map.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(auth, ["Basic dXNlcjpwYXNz"]);
        assert!(!map.contains_key("x-api-key"));
        assert_eq!(map["x-other"], "kept");
        let mut basic_only = headers(&[("authorization", b"Basic dXNlcjpwYXNz")]);
        strip(&mut basic_only, &[KeyLocation::Bearer]);
        assert_eq!(basic_only[AUTHORIZATION], "Basic dXNlcjpwYXNz");
    }

    #[test]
    fn bearer_only_ignores_other_headers() {
        let map = headers(&[("x-api-key", b"abc")]);
        assert!(matches!(
            presented_key(&map, &[KeyLocation::Bearer]),
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
            if let Ok(key) = presented_key(&map, &default_locations()) {
                prop_assert!(!key.is_empty());
                prop_assert_eq!(key, key.trim_ascii());
                let found = map
                    .iter()
                    .filter(|(n, _)| *n == AUTHORIZATION || n.as_str() == "x-api-key")
                    .any(|(_, v)| v.as_bytes().windows(key.len()).any(|w| w == key));
                prop_assert!(found);
            }
            strip(&mut map, &default_locations());
            prop_assert!(!map.contains_key("x-api-key"));
            prop_assert!(map.get_all(AUTHORIZATION).iter().all(|v| bearer_token(v.as_bytes()).is_none()));
        }
    }
}
