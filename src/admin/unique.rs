//! A request body's JSON, refused where an object names one member twice.
//!
//! JSON leaves a repeated member's meaning open: `serde_json` keeps the last, other
//! parsers the first. A proxy in front of the API that checks the first of two
//! `scopes` and an API that grants the second would disagree about what was asked,
//! so a body that repeats a member, at any depth, is not taken at all.

use std::{collections::HashSet, fmt};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// The longest member name an error repeats, in characters.
const SHOWN: usize = 64;

/// Whether `body`, JSON that parsed, repeats a member in one of its objects: the
/// error says which. A second walk over the body, beside `serde_json`'s own reading
/// of it into a value, so that numbers are read exactly as that reading reads them
/// (whatever `serde_json`'s features a program enables).
pub(super) fn check(body: &[u8]) -> Result<(), serde_json::Error> {
    serde_json::from_slice::<Checked>(body).map(|_| ())
}

/// A value walked through, none of whose objects repeats a member.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Walk).map(|()| Checked)
    }
}

struct Walk;

impl<'de> Visitor<'de> for Walk {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        Checked::deserialize(deserializer).map(|_| ())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut names = HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            let Checked = map.next_value()?;
            if let Some(name) = names.replace(name) {
                return Err(match crate::error::may_quote_name(&name) {
                    true => de::Error::custom(format_args!(
                        "the member {} appears twice in one object",
                        shown(&name)
                    )),
                    false => de::Error::custom("a member appears twice in one object"),
                });
            }
        }
        Ok(())
    }
}

/// `name` as JSON, cut to [`SHOWN`] characters.
fn shown(name: &str) -> String {
    match name.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}…", serde_json::Value::from(&name[..end])),
        None => serde_json::Value::from(name).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(text: &str) -> Result<(), String> {
        check(text.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_repeated_member_is_refused_at_any_depth() {
        for text in [
            r#"{"scopes": ["read"], "scopes": ["admin"]}"#,
            r#"{"quota": {"requests": 1, "requests": 2, "per": "day"}}"#,
            r#"{"rate_limits": [{"name": "a", "name": "b"}]}"#,
            r#"{"s\u0063opes": 1, "scopes": 2}"#,
        ] {
            let err = checked(text).unwrap_err();
            assert!(err.contains("appears twice"), "{text}: {err}");
        }
        let long = "n".repeat(10_000);
        let err = checked(&format!(r#"{{"{long}": 1, "{long}": 2}}"#)).unwrap_err();
        assert!(err.len() < 200, "{err}");
    }

    #[test]
    fn anything_else_passes() {
        for text in [
            r#"{"id": "a", "scopes": ["read", "read"], "n": -1, "m": 18446744073709551615}"#,
            r#"[1, 2.5e300, null, true, "x", {"a": {"a": {}}}, {"a": 1}]"#,
            r#""plain""#,
            "{}",
        ] {
            assert_eq!(checked(text), Ok(()), "{text}");
        }
        // serde_json's own depth limit still holds: no stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(checked(&deep).unwrap_err().contains("recursion limit"));
    }
}
