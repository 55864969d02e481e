//! A key as a fleet engine stores it: one JSON record per key id, holding its SHA-256
//! and its metadata, never a secret. The Redis engine keeps these in a hash; any other
//! engine keeps the same record, so a namespace moves between engines unchanged.

use std::{borrow::Cow, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    ApiKey, Error, clock,
    key::digest::KeyDigest,
    limit::{IpNet, Quota, RateLimit},
};

/// A key's record, as a fleet engine stores it. Instants in Unix milliseconds.
/// Strings are borrowed from the reply where they hold no escapes: a million records
/// are read at start-up.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    sha256: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    tenant: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    owner: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    description: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not_before: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    disabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    created_by: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    rotated_from: Option<Cow<'a, str>>,
    /// As in the key file: `[{"name":"burst","requests":100,"per":"1s"}]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rate_limits: Vec<RateRecord>,
    /// `{"requests":1000000,"per":"month"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quota: Option<QuotaRecord>,
    /// `["203.0.113.0/24"]`; absent for any address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allowed_ips: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateRecord {
    name: String,
    requests: u64,
    per: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaRecord {
    requests: u64,
    per: String,
}

/// The JSON record of `key`: the same key always gives the same bytes, which the
/// write script compares to detect a concurrent change.
pub(crate) fn encode(key: &ApiKey) -> String {
    let record = Record {
        id: key.id().into(),
        sha256: key.digest.to_hex().into(),
        scopes: key.scopes().map(str::to_owned).collect(),
        tenant: key.tenant().map(Cow::from),
        owner: key.owner().map(Cow::from),
        description: key.description().map(Cow::from),
        not_before: (key.valid_from != 0).then_some(key.valid_from),
        expires_at: (key.valid_until != u64::MAX).then_some(key.valid_until),
        disabled: key.disabled,
        created_at: key.meta.as_ref().and_then(|m| m.created_at),
        created_by: key.created_by().map(Cow::from),
        rotated_from: key.rotated_from().map(Cow::from),
        rate_limits: (key.rate_limits().iter())
            .map(|r| RateRecord {
                name: r.name().to_owned(),
                requests: r.requests(),
                per: RateLimit::format_per(r.per()),
            })
            .collect(),
        quota: key.quota().map(|q| QuotaRecord {
            requests: q.requests(),
            per: q.period().as_str().to_owned(),
        }),
        allowed_ips: key
            .allowed_ips()
            .map(|nets| nets.iter().map(ToString::to_string).collect()),
    };
    serde_json::to_string(&record).unwrap_or_default()
}

/// Whether the record stored under `id` (if any) is the key `read` (if any), as
/// its record is written: how a plan made from a read is checked against what is
/// stored when it is written. A record that cannot be read is not.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn unchanged(id: &str, stored: Option<&[u8]>, read: Option<&ApiKey>) -> bool {
    match (stored, read) {
        (None, None) => true,
        (Some(raw), Some(key)) => decode(id, raw).is_ok_and(|now| encode(&now) == encode(key)),
        _ => false,
    }
}

/// [`decode`], and the key checked as a key file's would be: what a store of record
/// holds is applied only when it would be accepted from a file.
pub(crate) fn decode_valid(id: &str, json: &[u8]) -> Result<ApiKey, Error> {
    decode(id, json).and_then(|key| key.validate().map(|()| key))
}

/// The key the record stored under `id` stands for (not yet checked as a key set
/// would check it: [`ApiKey::validate`] does that). Errors name the id and what is
/// wrong, never a value from the record (not even the JSON parser's message, which
/// can quote one).
pub(crate) fn decode(id: &str, json: &[u8]) -> Result<ApiKey, Error> {
    // Most records of a large namespace are a bare id and digest, as `encode` writes
    // them: read those without the general parser (a million are read at start-up).
    if let Some(key) = decode_plain(id, json) {
        return Ok(key);
    }
    let record: Record = serde_json::from_slice(json).map_err(|e| {
        Error::invalid(
            Some(id),
            match e.classify() {
                serde_json::error::Category::Data => {
                    "the stored record is not a key record (a field this crate does not \
                     know, a missing `id` or `sha256`, or a value of the wrong type)"
                }
                _ => "the stored record is not JSON",
            },
        )
    })?;
    if record.id != id {
        return Err(Error::invalid(
            Some(id),
            "the stored record names another id than the one it is stored under",
        ));
    }
    let digest = KeyDigest::from_hex(record.sha256.as_bytes())
        .ok_or_else(|| Error::invalid(Some(id), "`sha256` must be 64 hexadecimal digits"))?;
    let mut key =
        ApiKey::from_digest(Arc::from(&*record.id), digest).with_disabled(record.disabled);
    if !record.scopes.is_empty() {
        key = key.with_scopes(record.scopes);
    }
    if let Some(tenant) = record.tenant {
        key = key.with_tenant(&*tenant);
    }
    if let Some(owner) = record.owner {
        key = key.with_owner(&*owner);
    }
    if let Some(description) = record.description {
        key = key.with_description(&*description);
    }
    if let Some(at) = record.not_before {
        key = key.with_not_before(clock::from_unix_ms(at));
    }
    if let Some(at) = record.expires_at {
        key = key.with_expires_at(clock::from_unix_ms(at));
    }
    if let Some(at) = record.created_at {
        key = key.with_created_at(clock::from_unix_ms(at));
    }
    if let Some(by) = record.created_by {
        key = key.with_created_by(&*by);
    }
    if let Some(from) = record.rotated_from {
        key = key.with_rotated_from(&*from);
    }
    for (i, rate) in record.rate_limits.into_iter().enumerate() {
        // Named by place: the name is not checked yet.
        let per = RateLimit::parse_per(&rate.per).map_err(|e| {
            Error::invalid(
                Some(id),
                format!("`rate_limits` entry {}: `per`: {e}", i + 1),
            )
        })?;
        key = key.with_rate_limit(RateLimit::new(rate.name, rate.requests, per));
    }
    if let Some(quota) = record.quota {
        let period = quota.per.parse().map_err(|e| Error::invalid(Some(id), e))?;
        key = key.with_quota(Quota::new(quota.requests, period));
    }
    if let Some(nets) = record.allowed_ips {
        let nets = nets
            .iter()
            .map(|n| {
                n.parse::<IpNet>()
                    .map_err(|e| Error::invalid(Some(id), format!("`allowed_ips`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        key = key.with_allowed_ips(nets);
    }
    Ok(key)
}

/// The key of a record that is exactly `{"id":"<id>","sha256":"<64 hex digits>"}` (or
/// that with a space after each `:` and `,`, as `jsonb` prints it),
/// the id written without escapes and equal to `id`; `None` for anything else, which
/// the general parser then reads (and refuses with the right error).
fn decode_plain(id: &str, json: &[u8]) -> Option<ApiKey> {
    // As `encode` writes it, or as PostgreSQL's `jsonb` prints it back (a space after
    // each `:` and `,`).
    let (rest, separator) = match json.strip_prefix(br#"{"id":""#) {
        Some(rest) => (rest, &br#"","sha256":""#[..]),
        None => (
            json.strip_prefix(br#"{"id": ""#)?,
            &br#"", "sha256": ""#[..],
        ),
    };
    let named = rest.get(..id.len())?;
    if named != id.as_bytes() || id.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        return None;
    }
    let rest = rest[id.len()..].strip_prefix(separator)?;
    let (hex, end) = (rest.get(..64)?, rest.get(64..)?);
    if end != br#""}"# {
        return None;
    }
    Some(ApiKey::from_digest(
        Arc::from(id),
        KeyDigest::from_hex(hex)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_hold_no_secret() {
        let key = ApiKey::new("billing", "the-secret")
            .with_scopes(["read"])
            .with_tenant("t")
            .with_created_by("root")
            .with_expires_at(clock::from_unix_ms(1_800_000_000_123));
        let json = encode(&key);
        assert!(!json.contains("the-secret"), "{json}");
        let back = decode("billing", json.as_bytes()).unwrap();
        assert_eq!(encode(&back), json, "the same bytes again");
        assert!(back.digest == key.digest);
        let err = decode("x", br#"{"id":"x","sha256":"not-hex-secret"}"#)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("not-hex-secret"), "{err}");
    }

    #[test]
    fn limits_round_trip_and_old_records_still_read() {
        let key = ApiKey::new("partner", "s")
            .with_rate_limit(RateLimit::new(
                "burst",
                100,
                std::time::Duration::from_secs(1),
            ))
            .with_quota(Quota::new(1_000, crate::limit::QuotaPeriod::Day))
            .with_allowed_ips(["2001:db8::/32".parse().unwrap()]);
        let json = encode(&key);
        assert!(
            json.contains(r#""rate_limits":[{"name":"burst","requests":100,"per":"1s"}],"quota":{"requests":1000,"per":"day"},"allowed_ips":["2001:db8::/32"]"#),
            "{json}"
        );
        let back = decode("partner", json.as_bytes()).unwrap();
        assert_eq!(encode(&back), json);
        assert_eq!(back.rate_limits(), key.rate_limits());
        // A record written before limits existed.
        let old = format!(
            r#"{{"id":"old","sha256":"{}","tenant":"t"}}"#,
            key.digest.to_hex()
        );
        assert!(
            decode("old", old.as_bytes())
                .unwrap()
                .rate_limits()
                .is_empty()
        );
        // Unknown fields are still refused, inside the limits too.
        let odd = json.replace(r#""per":"1s""#, r#""per":"1s","burst":5"#);
        assert!(decode("partner", odd.as_bytes()).is_err());
        let bad = json.replace(r#""per":"day""#, r#""per":"week""#);
        assert!(
            decode("partner", bad.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("`quota`")
        );
    }

    #[test]
    fn a_plain_record_takes_the_fast_path() {
        let key = ApiKey::new("key-1", "s");
        let fast = decode_plain("key-1", encode(&key).as_bytes()).expect("plain");
        assert!(fast.digest == key.digest);
        let spaced = format!(r#"{{"id": "key-1", "sha256": "{}"}}"#, key.digest.to_hex());
        let fast = decode_plain("key-1", spaced.as_bytes()).expect("jsonb's spacing");
        assert!(fast.digest == key.digest);
        let scoped = key.with_scopes(["read"]);
        assert!(decode_plain("key-1", encode(&scoped).as_bytes()).is_none());
        assert!(decode("key-1", encode(&scoped).as_bytes()).is_ok());
    }

    #[test]
    fn a_record_must_name_the_id_it_is_stored_under() {
        let json = encode(&ApiKey::new("phantom", "s"));
        let err = decode("ghost", json.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("ghost") && err.contains("another id"), "{err}");
    }

    #[test]
    fn no_error_quotes_a_value_from_the_record() {
        for json in [
            &br#"{"id":"k","secret":"plain-secret-value"}"#[..],
            br#"{"id":"k","sha256":"00","plain-secret-value":1}"#,
            br#"{"id":"k","sha256":["plain-secret-value"]}"#,
            br#"plain-secret-value"#,
            br#"{"id":"k","sha256":"plain-secret-value"#,
        ] {
            let err = decode("k", json).unwrap_err();
            let text = crate::error::Chain(&err).to_string();
            assert!(!text.contains("plain-secret-value"), "{text}");
            assert!(text.contains("`k`"), "{text}");
        }
    }

    proptest::proptest! {
        /// The plain-record fast path reads what the general parser reads, and
        /// leaves anything else to it.
        #[test]
        fn the_fast_path_agrees_with_the_parser(
            stored in r#"[a-z"\\\u{1}é-]{0,8}"#,
            named in r#"[a-z"\\\u{1}é-]{0,8}"#,
            hex in "[0-9a-fA-FgG]{63,65}",
            tail in proptest::sample::select(vec![r#""}"#, r#"" }"#, r#"","disabled":true}"#, r#""}x"#, ""]),
            same in proptest::bool::weighted(0.8),
            spaced in proptest::bool::ANY,
        ) {
            let named = if same { stored.clone() } else { named };
            let json = if spaced {
                format!(r#"{{"id": "{named}", "sha256": "{hex}{tail}"#)
            } else {
                format!(r#"{{"id":"{named}","sha256":"{hex}{tail}"#)
            };
            let general = serde_json::from_slice::<Record>(json.as_bytes())
                .ok()
                .filter(|r| r.id == stored)
                .and_then(|r| Some((KeyDigest::from_hex(r.sha256.as_bytes())?, r.disabled, r.scopes.is_empty())));
            if let Some(fast) = decode_plain(&stored, json.as_bytes()) {
                let (digest, disabled, no_scopes) = general.expect("the parser reads it too");
                proptest::prop_assert!(fast.digest == digest && !disabled && no_scopes);
                proptest::prop_assert_eq!(fast.id(), stored.as_str());
            }
            proptest::prop_assert_eq!(decode(&stored, json.as_bytes()).is_ok(), general.is_some());
        }
    }
}
