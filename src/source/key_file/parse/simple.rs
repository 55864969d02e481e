//! A fast path for key files in the style the crate's writer writes (and large
//! generated or hand-kept files use): `[[keys]]` tables of one `field = value` per
//! line, strings basic (every TOML escape) or literal, string arrays, the limits'
//! one-line inline tables, integers, booleans, datetimes, comments and blank lines.
//! It reads a million keys several times faster than the general TOML parser, and it
//! is the only reader of files over [`GENERAL_MAX`](super::GENERAL_MAX): whatever the
//! writer writes, it reads back. A line outside that subset is declined, saying what
//! construct it holds (never a value); a file inside it is accepted, or refused with
//! the error and line, exactly as the general parser would.

use std::borrow::Cow;

use toml::value::Datetime;
use zeroize::Zeroizing;

use super::entry::{KeyEntry, QuotaEntry, RateLimitEntry};
use crate::{Error, KeySet};

/// A line the fast path does not read: where it starts, and what in it is outside the
/// subset, said without quoting anything from the line (a value may be a secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Declined {
    /// The byte offset of the line's start.
    pub(super) at: usize,
    /// The construct, e.g. "a string over several lines".
    pub(super) what: &'static str,
}

/// What a fast parse gives: the keys or the general parser's refusal (`Ok`), or the
/// line that made it decline (`Err`).
pub(super) type Parsed = Result<Result<KeySet, (Error, Option<usize>)>, Declined>;

/// Parses `text` if every line of it is in the subset; `None` otherwise.
#[cfg(test)]
pub(super) fn parse(text: &str) -> Option<Result<KeySet, (Error, Option<usize>)>> {
    parse_at(text).ok()
}

/// Parses `text` if every line of it is in the subset, or names the first line that
/// is not. A file in the subset that fails validation gets the error, and the offset
/// of the `[[keys]]` line, the general parser would give: no second parse of a large
/// refused file.
pub(super) fn parse_at(text: &str) -> Parsed {
    // The keys, and where each starts, up to the first that does not make a key:
    // the set is built from them at the end, in one go.
    let mut keys = Vec::with_capacity(text.len() / 100);
    let mut starts = Vec::with_capacity(text.len() / 100);
    let mut first_error = None;
    let mut add = |entry: Partial<'_>, at: usize| -> Result<(), Declined> {
        let entry = entry.finish().map_err(|what| Declined { at, what })?;
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
        Ok(())
    };
    let mut current: Option<(Partial<'_>, usize)> = None;
    // Whether the file said `keys = []`, as the writer writes a file of no keys.
    let mut no_keys = false;
    // `lines` ends a line at LF or CRLF, as TOML does; a CR anywhere else is
    // something TOML refuses: decline.
    for line in text.lines() {
        let at = line.as_ptr() as usize - text.as_ptr() as usize;
        let declined = |what| Declined { at, what };
        if line.contains('\r') {
            return Err(declined("a carriage return that does not end the line"));
        }
        let body = ws(line);
        match body.as_bytes().first() {
            None => {}
            Some(b'#') => end(body).map_err(declined)?,
            Some(b'[') => {
                header(body).map_err(declined)?;
                if no_keys {
                    return Err(declined("a `[[keys]]` table after `keys = []`"));
                }
                if let Some((done, started)) = current.take() {
                    add(done, started)?;
                }
                current = Some((Partial::default(), at));
            }
            Some(_) => {
                let (name, value) = key(body).map_err(declined)?;
                let rest = match current.as_mut() {
                    Some((entry, _)) => entry.set(name, value),
                    None if name == "keys" && !no_keys => {
                        no_keys = true;
                        empty_list(value)
                    }
                    None => Err("a field outside a `[[keys]]` table"),
                };
                end(rest.map_err(declined)?).map_err(declined)?;
            }
        }
    }
    if let Some((done, started)) = current {
        add(done, started)?;
    }
    Ok(match (KeySet::build(keys), first_error) {
        // Every key built comes before the entry that failed: its fault is first.
        (Err((error, i)), _) => Err((error, starts.get(i).copied())),
        (Ok(_), Some(error)) => Err(error),
        (Ok(set), None) => Ok(set),
    })
}

/// What a step of the reader gives: a value and the rest of the line, or what
/// construct it does not take.
type Step<'a, T> = Result<(T, &'a str), &'static str>;

/// `s` without TOML's whitespace (space and tab, nothing else) in front.
fn ws(s: &str) -> &str {
    s.trim_start_matches([' ', '\t'])
}

/// The end of a line: whitespace, then nothing or a comment of characters TOML
/// allows in one (no control character but tab, no DEL).
fn end(rest: &str) -> Result<(), &'static str> {
    let rest = ws(rest);
    match rest.strip_prefix('#') {
        None if rest.is_empty() => Ok(()),
        None => Err("something after the value (a second value, or an unclosed one)"),
        Some(comment) => {
            let bad = comment
                .bytes()
                .any(|b| (b < 0x20 && b != b'\t') || b == 0x7f);
            if bad {
                Err("a control character in a comment")
            } else {
                Ok(())
            }
        }
    }
}

/// A table header: `[[keys]]`, spaces allowed inside the brackets, a comment after.
fn header(line: &str) -> Result<(), &'static str> {
    const OTHER: &str = "a table other than `[[keys]]`";
    let inner = line.strip_prefix("[[").ok_or(OTHER)?;
    let inner = ws(inner).strip_prefix("keys").ok_or(OTHER)?;
    let rest = ws(inner).strip_prefix("]]").ok_or(OTHER)?;
    end(rest)
}

/// A bare key, then `=`: the key's name and the rest of the line after the `=` and
/// its whitespace.
fn key(line: &str) -> Step<'_, &str> {
    let len = line
        .bytes()
        .take_while(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        .count();
    let (name, rest) = line.split_at(len);
    if name.is_empty() {
        return Err("a quoted or dotted field name, or a line that is not `field = value`");
    }
    let rest = ws(rest);
    match rest.strip_prefix('=') {
        Some(value) => Ok((name, ws(value))),
        None if rest.starts_with('.') => Err("a dotted field name"),
        None => Err("a line that is not `field = value`"),
    }
}

/// A string value: basic (`"…"`, with TOML's escapes) or literal (`'…'`). Borrowed
/// from the text where it holds no escape; decoded otherwise, into a buffer that
/// zeroes itself if dropped before it is handed on (it may hold a secret).
fn string(s: &str) -> Step<'_, Decoded<'_>> {
    if s.starts_with("\"\"\"") || s.starts_with("'''") {
        return Err("a multi-line string");
    }
    match s.as_bytes().first() {
        Some(b'"') => basic(&s[1..]),
        Some(b'\'') => literal(&s[1..]),
        _ => Err("a value that is not a string where a string is expected"),
    }
}

/// A string as read: borrowed from the text, or decoded from its escapes.
enum Decoded<'a> {
    Plain(&'a str),
    Escaped(Zeroizing<String>),
}

impl<'a> Decoded<'a> {
    /// The string, for a field that holds no secret.
    fn text(self) -> Cow<'a, str> {
        match self {
            Decoded::Plain(s) => Cow::Borrowed(s),
            Decoded::Escaped(mut s) => Cow::Owned(std::mem::take(&mut *s)),
        }
    }

    /// The string, for the `secret` field: decoded, it stays in a zeroing buffer.
    fn secret(self) -> Secret<'a> {
        match self {
            Decoded::Plain(s) => Secret::Borrowed(s),
            Decoded::Escaped(s) => Secret::Owned(s),
        }
    }
}

/// A key's secret as read: borrowed from the text (which the caller zeroes), or
/// decoded into a buffer zeroed when dropped.
pub(super) enum Secret<'a> {
    Borrowed(&'a str),
    Owned(Zeroizing<String>),
}

impl AsRef<str> for Secret<'_> {
    fn as_ref(&self) -> &str {
        match self {
            Secret::Borrowed(s) => s,
            Secret::Owned(s) => s,
        }
    }
}

/// Whether TOML takes byte `b` unescaped in a basic string: tab, and any but a
/// control character, DEL, `"` and `\` (the text is UTF-8 already, so non-ASCII
/// bytes are whole characters).
fn basic_unescaped(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != b'"' && b != b'\\' && b != 0x7f)
}

/// The rest of a basic string after its opening `"`.
fn basic(s: &str) -> Step<'_, Decoded<'_>> {
    let bytes = s.as_bytes();
    let plain = bytes
        .iter()
        .position(|&b| !basic_unescaped(b))
        .unwrap_or(bytes.len());
    match bytes.get(plain) {
        Some(b'"') => return Ok((Decoded::Plain(&s[..plain]), &s[plain + 1..])),
        Some(b'\\') => {}
        Some(_) => return Err("a control character in a string (write it as an escape)"),
        None => return Err("a string that does not end on its line"),
    }
    // Escapes only shorten what they stand for: the buffer never grows, so no copy
    // of a secret is left behind in a freed one.
    let mut out = Zeroizing::new(String::with_capacity(s.len()));
    out.push_str(&s[..plain]);
    let mut rest = &s[plain..];
    loop {
        let bytes = rest.as_bytes();
        let run = bytes
            .iter()
            .position(|&b| !basic_unescaped(b))
            .unwrap_or(bytes.len());
        out.push_str(&rest[..run]);
        rest = &rest[run..];
        match rest.as_bytes().first() {
            Some(b'"') => return Ok((Decoded::Escaped(out), &rest[1..])),
            Some(b'\\') => {
                let (c, after) = escape(&rest[1..])?;
                out.push(c);
                rest = after;
            }
            Some(_) => return Err("a control character in a string (write it as an escape)"),
            None => return Err("a string that does not end on its line"),
        }
    }
}

/// One escape, after its `\`: TOML's `\" \\ \b \e \f \n \r \t`, `\xHH`, `\uHHHH` and
/// `\UHHHHHHHH` (a Unicode scalar value: no surrogate, nothing past U+10FFFF).
fn escape(s: &str) -> Step<'_, char> {
    let Some(&first) = s.as_bytes().first() else {
        return Err("a string that does not end on its line");
    };
    // Not `&s[1..]`: after a `\` a hand may have typed any character, and a
    // multi-byte one has no boundary at 1.
    let Some(rest) = s.get(1..) else {
        return Err("an escape TOML does not have");
    };
    let c = match first {
        b'"' => '"',
        b'\\' => '\\',
        b'b' => '\u{8}',
        b'e' => '\u{1b}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'x' => return hex(rest, 2),
        b'u' => return hex(rest, 4),
        b'U' => return hex(rest, 8),
        _ => return Err("an escape TOML does not have"),
    };
    Ok((c, rest))
}

/// `digits` hexadecimal digits naming a Unicode scalar value.
fn hex(s: &str, digits: usize) -> Step<'_, char> {
    let code = s
        .get(..digits)
        .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or("an escape with too few hexadecimal digits")?;
    // `from_str_radix` alone would take a sign: the digits are checked above.
    u32::from_str_radix(code, 16)
        .ok()
        .and_then(char::from_u32)
        .map(|c| (c, &s[digits..]))
        .ok_or("an escape that is not a Unicode scalar value (a surrogate, or past U+10FFFF)")
}

/// The rest of a literal string after its opening `'`: tab and any but a control
/// character or DEL, up to the next `'`.
fn literal(s: &str) -> Step<'_, Decoded<'_>> {
    let bytes = s.as_bytes();
    let len = bytes
        .iter()
        .position(|&b| b == b'\'' || (b < 0x20 && b != b'\t') || b == 0x7f)
        .unwrap_or(bytes.len());
    match bytes.get(len) {
        Some(b'\'') => Ok((Decoded::Plain(&s[..len]), &s[len + 1..])),
        Some(_) => Err("a control character in a literal string"),
        None => Err("a string that does not end on its line"),
    }
}

/// An array of strings on one line (a trailing comma allowed, as TOML allows it).
fn strings(s: &str) -> Step<'_, Vec<Cow<'_, str>>> {
    array(s, |s| {
        let (value, rest) = string(s)?;
        Ok((value.text(), rest))
    })
}

/// An array on one line of items read by `item`.
fn array<'a, T>(s: &'a str, mut item: impl FnMut(&'a str) -> Step<'a, T>) -> Step<'a, Vec<T>> {
    let mut s = ws(s
        .strip_prefix('[')
        .ok_or("a value that is not an array where an array is expected")?);
    let mut out = Vec::new();
    if let Some(rest) = s.strip_prefix(']') {
        return Ok((out, rest));
    }
    if s.is_empty() || s.starts_with('#') {
        return Err("an array over several lines");
    }
    loop {
        let (value, rest) = item(s)?;
        out.push(value);
        s = ws(rest);
        if let Some(rest) = s.strip_prefix(',') {
            s = ws(rest);
            if let Some(rest) = s.strip_prefix(']') {
                return Ok((out, rest));
            }
            if s.is_empty() || s.starts_with('#') {
                return Err("an array over several lines");
            }
        } else if let Some(rest) = s.strip_prefix(']') {
            return Ok((out, rest));
        } else if s.is_empty() || s.starts_with('#') {
            return Err("an array over several lines");
        } else {
            return Err("an array item followed by something other than `,` or `]`");
        }
    }
}

/// An inline table on one line, `{ name = value, … }`, each field read by `field`
/// (given its name and the text after `=`, it gives the rest after the value).
fn table<'a>(
    s: &'a str,
    mut field: impl FnMut(&'a str, &'a str) -> Result<&'a str, &'static str>,
) -> Result<&'a str, &'static str> {
    let mut s = ws(s
        .strip_prefix('{')
        .ok_or("a value that is not an inline table where one is expected")?);
    if let Some(rest) = s.strip_prefix('}') {
        return Ok(rest);
    }
    loop {
        let (name, value) = key(s)?;
        s = ws(field(name, value)?);
        if let Some(rest) = s.strip_prefix(',') {
            s = ws(rest);
            if s.is_empty() || s.starts_with('#') {
                return Err("an inline table over several lines");
            }
        } else if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        } else if s.is_empty() || s.starts_with('#') {
            return Err("an inline table over several lines");
        } else {
            return Err("an inline table field followed by something other than `,` or `}`");
        }
    }
}

/// `[]`, the value of `keys = []`; the rest of the line after it.
fn empty_list(s: &str) -> Result<&str, &'static str> {
    const FULL: &str = "a `keys` list that is not empty (write `[[keys]]` tables)";
    let (_, rest) = array::<()>(s, |_| Err(FULL))?;
    Ok(rest)
}

/// A decimal integer as TOML writes one plainly (no sign, `_` or leading zero), that
/// fits TOML's 64-bit signed integers.
fn integer(s: &str) -> Step<'_, u64> {
    const OTHER: &str = "a number not written as plain decimal digits";
    let len = s.bytes().take_while(u8::is_ascii_digit).count();
    let (digits, rest) = s.split_at(len);
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return Err(OTHER);
    }
    if rest
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'+' | b'-' | b':'))
    {
        return Err(OTHER);
    }
    let n = digits
        .parse::<i64>()
        .ok()
        .and_then(|n| u64::try_from(n).ok())
        .ok_or("an integer past TOML's range")?;
    Ok((n, rest))
}

/// A boolean.
fn boolean(s: &str) -> Step<'_, bool> {
    let (value, rest) = if let Some(rest) = s.strip_prefix("true") {
        (true, rest)
    } else if let Some(rest) = s.strip_prefix("false") {
        (false, rest)
    } else {
        return Err("a value that is not `true` or `false` where a boolean is expected");
    };
    match rest.bytes().next() {
        Some(b) if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' => {
            Err("a value that is not `true` or `false` where a boolean is expected")
        }
        _ => Ok((value, rest)),
    }
}

/// A datetime, only in the plain `YYYY-MM-DDTHH:MM[:SS[.fff]](Z|±HH:MM)` shape (no
/// space for `T`, no lowercase): read by TOML's own datetime parser.
fn datetime(s: &str) -> Step<'_, Datetime> {
    const OTHER: &str = "a datetime not in the plain `2026-12-01T00:00:00Z` shape";
    let len = s
        .bytes()
        .take_while(|&b| b.is_ascii_digit() || matches!(b, b'-' | b':' | b'T' | b'Z' | b'.' | b'+'))
        .count();
    let (value, rest) = s.split_at(len);
    let value = value.parse().map_err(|_| OTHER)?;
    Ok((value, rest))
}

/// The fields read so far, borrowed from the file's text (which the caller zeroes)
/// or decoded from their escapes.
#[derive(Default)]
struct Partial<'a> {
    id: Option<Cow<'a, str>>,
    secret: Option<Secret<'a>>,
    sha256: Option<Cow<'a, str>>,
    scopes: Option<Vec<Cow<'a, str>>>,
    tenant: Option<Cow<'a, str>>,
    owner: Option<Cow<'a, str>>,
    description: Option<Cow<'a, str>>,
    not_before: Option<Datetime>,
    expires_at: Option<Datetime>,
    disabled: Option<bool>,
    created_at: Option<Datetime>,
    created_by: Option<Cow<'a, str>>,
    rotated_from: Option<Cow<'a, str>>,
    rate_limits: Option<Vec<RateLimitEntry<Cow<'a, str>>>>,
    quota: Option<QuotaEntry<Cow<'a, str>>>,
    allowed_ips: Option<Vec<Cow<'a, str>>>,
}

/// Puts a field's value in its slot, unless it was given before; the rest of the
/// line after the value.
fn put<'a, T>(slot: &mut Option<T>, step: Step<'a, T>) -> Result<&'a str, &'static str> {
    if slot.is_some() {
        return Err("a field given twice in one table");
    }
    let (value, rest) = step?;
    *slot = Some(value);
    Ok(rest)
}

/// A text field's value.
fn text(s: &str) -> Step<'_, Cow<'_, str>> {
    let (value, rest) = string(s)?;
    Ok((value.text(), rest))
}

impl<'a> Partial<'a> {
    /// Sets one field from the text after its `=`; the rest of the line after the
    /// value, or what in it is outside the subset (an unknown or repeated field, a
    /// value of another shape).
    fn set(&mut self, name: &str, value: &'a str) -> Result<&'a str, &'static str> {
        match name {
            "id" => put(&mut self.id, text(value)),
            "secret" => put(
                &mut self.secret,
                string(value).map(|(s, rest)| (s.secret(), rest)),
            ),
            "sha256" => put(&mut self.sha256, text(value)),
            "scopes" => put(&mut self.scopes, strings(value)),
            "tenant" => put(&mut self.tenant, text(value)),
            "owner" => put(&mut self.owner, text(value)),
            "description" => put(&mut self.description, text(value)),
            "created_at" => put(&mut self.created_at, datetime(value)),
            "created_by" => put(&mut self.created_by, text(value)),
            "rotated_from" => put(&mut self.rotated_from, text(value)),
            "not_before" => put(&mut self.not_before, datetime(value)),
            "expires_at" => put(&mut self.expires_at, datetime(value)),
            "disabled" => put(&mut self.disabled, boolean(value)),
            "rate_limits" => put(&mut self.rate_limits, array(value, rate_limit)),
            "quota" => put(&mut self.quota, quota(value)),
            "allowed_ips" => put(&mut self.allowed_ips, strings(value)),
            _ => Err("a field a key does not have"),
        }
    }

    /// The entry, or what is missing for the general parser to read it as one.
    fn finish(self) -> Result<KeyEntry<Cow<'a, str>, Secret<'a>>, &'static str> {
        Ok(KeyEntry {
            id: self.id.ok_or("a `[[keys]]` table without an `id`")?,
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
            rate_limits: self.rate_limits.unwrap_or_default(),
            quota: self.quota,
            allowed_ips: self.allowed_ips,
        })
    }
}

/// One of `rate_limits`: `{ name = "burst", requests = 100, per = "1s" }`.
fn rate_limit(s: &str) -> Step<'_, RateLimitEntry<Cow<'_, str>>> {
    let (mut name, mut requests, mut per) = (None, None, None);
    let rest = table(s, |field, value| match field {
        "name" => put(&mut name, text(value)),
        "requests" => put(&mut requests, integer(value)),
        "per" => put(&mut per, text(value)),
        _ => Err("a field a rate limit does not have"),
    })?;
    let (Some(name), Some(requests), Some(per)) = (name, requests, per) else {
        return Err("a rate limit without its `name`, `requests` or `per`");
    };
    Ok((
        RateLimitEntry {
            name,
            requests,
            per,
        },
        rest,
    ))
}

/// `quota = { requests = 1000000, per = "month" }`.
fn quota(s: &str) -> Step<'_, QuotaEntry<Cow<'_, str>>> {
    let (mut requests, mut per) = (None, None);
    let rest = table(s, |field, value| match field {
        "requests" => put(&mut requests, integer(value)),
        "per" => put(&mut per, text(value)),
        _ => Err("a field a quota does not have"),
    })?;
    let (Some(requests), Some(per)) = (requests, per) else {
        return Err("a quota without its `requests` or `per`");
    };
    Ok((QuotaEntry { requests, per }, rest))
}
