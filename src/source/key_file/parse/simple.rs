//! A fast path for key files written in the plain style this crate documents (and
//! large generated files use): one `key = value` per line, basic strings without
//! escapes, booleans, string arrays, datetimes. It reads a million keys several
//! times faster than the general TOML parser. Anything outside that subset goes to
//! the general parser; a file inside it is accepted, or refused with the error and
//! line, exactly as the general parser would.

use super::{KeyEntry, KeySet};
use crate::Error;
use toml::value::Datetime;

/// Parses `text` if every line of it is in the subset; `None` otherwise. A file in
/// the subset that fails validation gets the error, and the offset of the
/// `[[keys]]` line, the general parser would give: no second parse of a large
/// refused file.
#[cfg(test)]
pub(super) fn parse(text: &str) -> Option<Result<KeySet, (Error, Option<usize>)>> {
    parse_at(text, &mut 0)
}

/// As [`parse`]; `at` is left at the offset of the line that was declined.
pub(super) fn parse_at(
    text: &str,
    declined_at: &mut usize,
) -> Option<Result<KeySet, (Error, Option<usize>)>> {
    // The keys, and where each starts, up to the first that does not make a key:
    // the set is built from them at the end, in one go.
    let mut keys = Vec::with_capacity(text.len() / 100);
    let mut starts = Vec::with_capacity(text.len() / 100);
    let mut first_error = None;
    let mut add = |entry: Partial, at: usize| -> Option<()> {
        let entry = entry.finish()?;
        if first_error.is_none() {
            match entry.into_key() {
                Ok(key) => {
                    keys.push(key);
                    starts.push(at);
                }
                // Keep reading: a line further down outside the subset means the
                // general parser, which reports a syntax error before any other.
                Err(error) => first_error = Some((error, Some(at))),
            }
        }
        Some(())
    };
    let mut current: Option<(Partial, usize)> = None;
    // `lines` ends a line at LF or CRLF, as TOML does; a CR anywhere else, or a
    // control character in a comment, is something TOML refuses: decline.
    for line in text.lines() {
        if line.contains('\r') {
            return None;
        }
        let at = line.as_ptr() as usize - text.as_ptr() as usize;
        *declined_at = at;
        let line = trim(line);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if comment
                .bytes()
                .any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
            {
                return None;
            }
            continue;
        }
        if line == "[[keys]]" {
            if let Some((done, started)) = current.take() {
                add(done, started)?;
            }
            current = Some((Partial::default(), at));
            continue;
        }
        let (name, value) = line.split_once('=')?;
        current.as_mut()?.0.set(trim(name), trim(value))?;
    }
    if let Some((done, started)) = current {
        add(done, started)?;
    }
    Some(match (KeySet::build(keys), first_error) {
        // Every key built comes before the entry that failed: its fault is first.
        (Err((error, i)), _) => Err((error, starts.get(i).copied())),
        (Ok(_), Some(error)) => Err(error),
        (Ok(set), None) => Ok(set),
    })
}

/// TOML's whitespace: space and tab, nothing else.
fn trim(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// The fields read so far, borrowed from the file's text (which the caller zeroes).
#[derive(Default)]
struct Partial<'a> {
    id: Option<&'a str>,
    secret: Option<&'a str>,
    sha256: Option<&'a str>,
    scopes: Option<Vec<&'a str>>,
    tenant: Option<&'a str>,
    owner: Option<&'a str>,
    description: Option<&'a str>,
    not_before: Option<Datetime>,
    expires_at: Option<Datetime>,
    disabled: Option<bool>,
    created_at: Option<Datetime>,
    created_by: Option<&'a str>,
    rotated_from: Option<&'a str>,
}

impl<'a> Partial<'a> {
    /// Sets one field; `None` if the line is outside the subset (an unknown or
    /// repeated field, a value of another shape).
    fn set(&mut self, name: &str, value: &'a str) -> Option<()> {
        fn put<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
            if slot.is_some() {
                return None;
            }
            *slot = Some(value?);
            Some(())
        }
        match name {
            "id" => put(&mut self.id, string(value)),
            "secret" => put(&mut self.secret, string(value)),
            "sha256" => put(&mut self.sha256, string(value)),
            "scopes" => put(&mut self.scopes, strings(value)),
            "tenant" => put(&mut self.tenant, string(value)),
            "owner" => put(&mut self.owner, string(value)),
            "description" => put(&mut self.description, string(value)),
            "created_at" => put(&mut self.created_at, datetime(value)),
            "created_by" => put(&mut self.created_by, string(value)),
            "rotated_from" => put(&mut self.rotated_from, string(value)),
            "not_before" => put(&mut self.not_before, datetime(value)),
            "expires_at" => put(&mut self.expires_at, datetime(value)),
            "disabled" => put(
                &mut self.disabled,
                match value {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                },
            ),
            _ => None,
        }
    }

    fn finish(self) -> Option<KeyEntry<&'a str, &'a str>> {
        Some(KeyEntry {
            id: self.id?,
            secret: self.secret,
            sha256: self.sha256,
            scopes: self.scopes.unwrap_or_default(),
            tenant: self.tenant,
            owner: self.owner,
            description: self.description,
            not_before: self.not_before,
            expires_at: self.expires_at,
            disabled: self.disabled.unwrap_or(false),
            created_at: self.created_at,
            created_by: self.created_by,
            rotated_from: self.rotated_from,
            // Limits are inline tables: the general parser reads them.
            rate_limits: Vec::new(),
            quota: None,
            allowed_ips: None,
        })
    }
}

/// A TOML basic string with no escapes and none of the control characters TOML
/// forbids in one.
fn string(value: &str) -> Option<&str> {
    let inner = value.strip_prefix('"')?.strip_suffix('"')?;
    // TOML forbids U+0000..=U+001F (but tab) and U+007F in basic strings; the
    // text is valid UTF-8 already, so bytes are enough.
    let plain = inner
        .bytes()
        .all(|b| b != b'"' && b != b'\\' && (b == b'\t' || (b >= 0x20 && b != 0x7f)));
    plain.then_some(inner)
}

/// An inline array of such strings.
fn strings(value: &str) -> Option<Vec<&str>> {
    let inner = trim(value.strip_prefix('[')?.strip_suffix(']')?);
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner.split(',').map(|s| string(trim(s))).collect()
}

/// A datetime, only in the plain `YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)` shape.
fn datetime(value: &str) -> Option<Datetime> {
    let plain = value
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b':' | b'T' | b'Z' | b'.' | b'+'));
    if !plain {
        return None;
    }
    value.parse().ok()
}
