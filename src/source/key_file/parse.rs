//! The key file's format: TOML, read by the general parser or, for files in the style
//! the crate's writer writes (and large files use), by a fast path that accepts
//! exactly the same. Files over 4 MiB are read by the fast path alone.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;
use zeroize::Zeroizing;

use crate::{Error, KeySet};

/// Parses key-file content; `path` is only used in errors.
pub(crate) fn parse(path: &Path, content: &[u8]) -> Result<KeySet, Error> {
    parse_with(path, content, GENERAL_MAX)
}

/// As [`parse`], with files over `general_max` bytes read by the fast path alone.
fn parse_with(path: &Path, content: &[u8], general_max: usize) -> Result<KeySet, Error> {
    parse_bytes(content, general_max).map_err(|(error, offset)| {
        let line = offset.map(|at| line_of(content, at));
        error.in_file(path, line)
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<Spanned<KeyEntry<String, Zeroizing<String>>>>,
}

/// Parses a key file; on error, the byte offset it points at, where known.
fn parse_bytes(content: &[u8], general_max: usize) -> Result<KeySet, (Error, Option<usize>)> {
    let text = std::str::from_utf8(content).map_err(|e| {
        let reason = "the file is not valid UTF-8".to_owned();
        (Error::Parse { reason }, Some(e.valid_up_to()))
    })?;
    // A byte-order mark, which TOML allows and the general parser skips.
    let (bom, body) = match text.strip_prefix('\u{feff}') {
        Some(body) => (text.len() - body.len(), body),
        None => (0, text),
    };
    match simple::parse_at(body) {
        Ok(parsed) => parsed.map_err(|(e, at)| (e, at.map(|at| at + bom))),
        // The general parser needs several times a file's size in memory, whatever
        // the file holds: only small files get it. The line is named and what in it
        // is not read, never its value (which may be a secret).
        Err(declined) if text.len() > general_max => {
            let reason = format!(
                "a key file over {} MiB is read by the fast reader only, which does not \
                 take {} (write the line as the crate's writer does: one `field = value` \
                 per line in `[[keys]]` tables)",
                GENERAL_MAX >> 20,
                declined.what
            );
            Err((Error::Parse { reason }, Some(declined.at + bom)))
        }
        Err(_) => general(text),
    }
}

/// The largest file handed to the general TOML parser, which takes about seven times
/// a file's size in memory. Larger files are read by the fast path alone, which
/// reads whatever the crate's writer writes.
const GENERAL_MAX: usize = 4 << 20;

/// Parses with the general TOML parser.
fn general(text: &str) -> Result<KeySet, (Error, Option<usize>)> {
    let file: KeyFile = toml::from_str(text).map_err(|e| {
        // Only the message (`Display` would quote the offending line), and not even
        // all of that: serde quotes a value of the wrong type, which may be a secret.
        let at = e.span().map(|s| s.start);
        let reason = without_values(e.message(), at.map(|at| line_at(text, at)));
        (Error::Parse { reason }, at)
    })?;
    let mut set = KeySet::new();
    for entry in file.keys {
        let at = entry.span().start;
        let entry = entry.into_inner();
        let key = entry.into_key().map_err(|e| (e, Some(at)))?;
        set.insert(key).map_err(|e| (e, Some(at)))?;
    }
    Ok(set)
}

mod entry;
mod simple;

use self::entry::KeyEntry;

/// The line of `text` that holds byte `at`.
fn line_at(text: &str, at: usize) -> &str {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    text.get(start..end).unwrap_or("")
}

/// A parser's message with every value from the file taken out: the field name
/// (from `line`) and what was expected stay.
fn without_values(message: &str, line: Option<&str>) -> String {
    let message = message.trim_end();
    let (field, value) = match line.and_then(|l| l.split_once('=')) {
        Some((name, value)) => (Some(name.trim()), Some(value.trim())),
        None => (None, None),
    };
    let field = field.filter(|f| {
        !f.is_empty()
            && f.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    });
    for what in ["invalid type", "invalid value", "invalid length"] {
        if let Some(rest) = message.strip_prefix(what) {
            let expected = rest.rsplit_once("expected ").map(|(_, e)| e);
            return match (field, expected) {
                (Some(f), Some(e)) => format!("{what} for `{f}`: expected {e}"),
                (None, Some(e)) => format!("{what}: expected {e}"),
                (Some(f), None) => format!("{what} for `{f}`"),
                (None, None) => what.to_owned(),
            };
        }
    }
    if let Some(cut) = crate::error::without_unknown_name(message) {
        return cut;
    }
    // Any other message should not quote a value; if it does, cut it out.
    match value.map(|v| v.trim_matches(['"', '\''])) {
        Some(v) if v.len() >= 4 && message.contains(v) => message.replace(v, "<redacted>"),
        _ => message.to_owned(),
    }
}

fn line_of(content: &[u8], offset: usize) -> usize {
    let offset = offset.min(content.len());
    content[..offset].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::{
        ApiKey,
        key::digest::KeyDigest,
        limit::{Quota, RateLimit},
    };

    fn err(content: &str) -> String {
        parse(Path::new("keys.toml"), content.as_bytes())
            .unwrap_err()
            .to_string()
    }

    const HASH: &str = "4e738ca5563c06cfd0018299933d58db1dd8bf97f6973dc99bf6cdc64b5550bd";

    #[test]
    fn parses_every_field() {
        let set = parse(
            Path::new("k.toml"),
            format!(
                r#"
[[keys]]
id = "a"
secret = "s3cr3t-a"
scopes = ["read", "admin"]
tenant = "team-a"
owner = "ops"
description = "first"
not_before = 2026-11-01T00:00:00Z
expires_at = 2026-12-01T01:00:00+01:00
disabled = true
created_at = 2026-10-01T12:00:00Z
created_by = "ops-admin"
rotated_from = "a-2026-10"

[[keys]]
id = "b"
sha256 = "{HASH}"
"#
            )
            .as_bytes(),
        )
        .unwrap();
        let a = set.get("a").unwrap();
        assert_eq!(a.scopes().collect::<Vec<_>>(), ["read", "admin"]);
        assert_eq!(a.tenant(), Some("team-a"));
        assert!(a.is_disabled());
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(a.not_before().unwrap()), 1_793_491_200);
        assert_eq!(secs(a.expires_at().unwrap()), 1_796_083_200);
        assert_eq!(secs(a.created_at().unwrap()), 1_790_856_000);
        assert_eq!(a.created_by(), Some("ops-admin"));
        assert_eq!(a.rotated_from(), Some("a-2026-10"));
        assert_eq!(set.get("b").unwrap().digest, KeyDigest::of(b"s3cr3t"));
    }

    /// The writer writes instants up to the year 9999; they are read back, not
    /// refused past 2554 (where a `u64` of nanoseconds ends).
    #[test]
    fn instants_up_to_the_year_9999_are_read() {
        for at in ["2554-07-21T23:34:34Z", "9999-12-31T23:59:59.999Z"] {
            let text = format!("[[keys]]\nid = \"a\"\nsecret = \"x\"\nexpires_at = {at}\n");
            let set = parse(Path::new("k"), text.as_bytes()).unwrap();
            let expires = set.get("a").unwrap().expires_at().unwrap();
            assert_eq!(crate::clock::rfc3339(expires), at);
        }
    }

    #[test]
    fn limits_are_read_and_bad_ones_refused_naming_file_line_field_and_key() {
        let set = parse(
            Path::new("k.toml"),
            br#"
[[keys]]
id = "partner"
secret = "s3cr3t"
rate_limits = [ { name = "burst", requests = 100, per = "1s" },
                { name = "daily", requests = 100000, per = "1d" } ]
quota = { requests = 1000000, per = "month" }
allowed_ips = ["203.0.113.0/24", "2001:db8::/32"]
"#,
        )
        .unwrap();
        let key = set.get("partner").unwrap();
        let names: Vec<_> = key
            .rate_limits()
            .iter()
            .map(|r| (r.name(), r.requests(), r.per().as_secs()))
            .collect();
        assert_eq!(names, [("burst", 100, 1), ("daily", 100_000, 86_400)]);
        assert_eq!(
            key.quota().map(|q| (q.requests(), q.period().as_str())),
            Some((1_000_000, "month"))
        );
        assert_eq!(key.allowed_ips().unwrap().len(), 2);
        let table = |fields: &str| {
            format!("# keys\n\n[[keys]]\nid = \"p\"\nsecret = \"top-secret-value\"\n{fields}\n")
        };
        for (fields, says) in [
            (
                r#"rate_limits = [{ name = "burst", requests = 0, per = "1s" }]"#,
                "`requests` must be at least 1",
            ),
            (
                r#"rate_limits = [{ name = "burst", requests = 10, per = "0s" }]"#,
                "`per`",
            ),
            (
                r#"rate_limits = [{ name = "burst", requests = 10, per = "1w" }]"#,
                "`per`",
            ),
            (
                r#"rate_limits = [{ name = "burst", requests = 10000000000, per = "1s" }]"#,
                "nanosecond",
            ),
            (
                r#"rate_limits = [{ name = "a", requests = 1, per = "1s" }, { name = "a", requests = 2, per = "1s" }]"#,
                "entry 2 (`a`): the same name as entry 1",
            ),
            (
                r#"rate_limits = [{ name = "b u", requests = 1, per = "1s" }]"#,
                "a name must be",
            ),
            (
                r#"rate_limits = [{ name = "b", requests = -1, per = "1s" }]"#,
                "rate_limits",
            ),
            (
                r#"rate_limits = [{ name = "b", requests = 1, per = "1s", burst = 3 }]"#,
                "burst",
            ),
            (r#"quota = { requests = 0, per = "day" }"#, "`quota`"),
            (
                r#"quota = { requests = 10, per = "week" }"#,
                "\"day\" or \"month\"",
            ),
            (r#"allowed_ips = ["203.0.113.5/24"]"#, "`allowed_ips`"),
            (r#"allowed_ips = ["fe80::1%eth0"]"#, "zone id"),
            (r#"allowed_ips = []"#, "`allowed_ips` is empty"),
            (r#"allowed_ips = "203.0.113.0/24""#, "allowed_ips"),
        ] {
            let err = err(&table(fields));
            // The table's line, or the field's for a value of the wrong shape.
            assert!(
                err.starts_with("keys.toml:3:") || err.starts_with("keys.toml:6:"),
                "{fields}: {err}"
            );
            assert!(err.contains(says), "{fields}: {err}");
            assert!(!err.contains("top-secret-value"), "{err}");
            if !fields.contains("-1")
                && !fields.contains("burst = 3")
                && !fields.contains("= \"203")
            {
                assert!(err.contains("`p`"), "{fields}: {err}");
            }
        }
    }

    /// The fast path and the general parser agree on every file the fast path takes.
    #[test]
    fn fast_path_matches_the_general_parser() {
        let files = [
            format!("[[keys]]\nid = \"b\"\nsha256 = \"{HASH}\"\n"),
            "# c\n[[keys]]\nid = \"a\"\nsecret = \"s3 c=r et\"\nscopes = [\"read\", \"admin\"]\n\
             tenant = \"t\"\nowner = \"o é\"\ndescription = \"d\"\ndisabled = true\n\
             not_before = 2026-11-01T00:00:00Z\nexpires_at = 2026-12-01T01:00:00.250+01:00\n\n\
             [[keys]]\nid = \"c\"\nsecret = \"x\"\nscopes = []\n"
                .to_owned(),
            // What the writer writes, and what hand-kept files hold besides.
            "[[ keys ]] # by hand\nid = \"the-\\\"partner\\\"\" # c\n\
             secret = \"p\\\\s\\u00e9\\U0001F600\\x41\"\ntenant = \"\\e\\b\\f\\n\\r\\t\"\n\
             description = 'C:\\docs \"q\"'\nscopes = [ \"a\\\"b\" , 'c' , ]\n\
             owner = \"\\u0000\\u007F\"\nexpires_at = 2600-01-01T00:00Z\n\
             rate_limits = [{ name = \"burst\", requests = 100, per = \"1s\" }, \
             { name = \"day\", requests = 86400000, per = \"1d\" }]\n\
             quota = {per = \"month\",requests = 1000000}\n\
             allowed_ips = [\"203.0.113.0/24\", \"2001:db8::/32\"]\n"
                .to_owned(),
            "keys = [ ] # none\n".to_owned(),
        ];
        for file in files {
            let fast = simple::parse(&file)
                .expect("in the fast path's subset")
                .unwrap();
            let slow = general(&file).map_err(|(e, _)| e).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{slow:?}"));
            for (a, b) in fast.iter().zip(slow.iter()) {
                assert_eq!(a.digest, b.digest);
                assert_eq!(format!("{a:?}"), format!("{b:?}"));
            }
        }
    }

    /// What the fast path does not read, and what it says of it: the construct, never
    /// anything from the line.
    #[test]
    fn fast_path_declines_what_it_does_not_know() {
        for (file, says) in [
            ("keys = [\"a\"]", "a `keys` list that is not empty"),
            ("keys = []\nkeys = []", "a field outside a `[[keys]]` table"),
            (
                "keys = []\n[[keys]]\nid = \"a\"",
                "a `[[keys]]` table after `keys = []`",
            ),
            (
                "[[keys]]\nid = \"a\"\nkeys = []",
                "a field a key does not have",
            ),
            ("id = \"a\"", "a field outside a `[[keys]]` table"),
            ("[keys]\nid = \"a\"", "a table other than `[[keys]]`"),
            ("[[keys.x]]\nid = \"a\"", "a table other than `[[keys]]`"),
            ("[[keys]] x", "something after the value"),
            (
                "[[keys]]\nid = \"a\"\nid = \"b\"\nsecret = \"x\"",
                "given twice",
            ),
            (
                "[[keys]]\nid = \"a\"\nsecret = \"x\"\nextra = \"y\"",
                "a field a key does not have",
            ),
            ("[[keys]]\nsecret = \"x\"", "without an `id`"),
            ("[[keys]]\n\"id\" = \"a\"", "quoted or dotted field name"),
            ("[[keys]]\nid.x = \"a\"", "a dotted field name"),
            ("[[keys]]\nid = \"a\" \"b\"", "something after the value"),
            ("[[keys]]\nid = \"\"\"a\"\"\"", "a multi-line string"),
            ("[[keys]]\nid = '''a'''", "a multi-line string"),
            ("[[keys]]\nid = \"a", "does not end on its line"),
            ("[[keys]]\nid = \"a\\", "does not end on its line"),
            ("[[keys]]\nid = 'a", "does not end on its line"),
            ("[[keys]]\nid = \"a\\q\"", "an escape TOML does not have"),
            ("[[keys]]\nid = \"a\\ \"", "an escape TOML does not have"),
            // A reviewer's finding: a multi-byte character after `\` panicked.
            ("[[keys]]\nid = \"a\\é\"", "an escape TOML does not have"),
            ("[[keys]]\nid = \"a\\😀\"", "an escape TOML does not have"),
            ("[[keys]]\nid = \"a\\u00\"", "too few hexadecimal digits"),
            ("[[keys]]\nid = \"a\\u+041\"", "too few hexadecimal digits"),
            ("[[keys]]\nid = \"a\\x4\"", "too few hexadecimal digits"),
            ("[[keys]]\nid = \"a\\uD800\"", "not a Unicode scalar value"),
            (
                "[[keys]]\nid = \"a\\U00110000\"",
                "not a Unicode scalar value",
            ),
            (
                "[[keys]]\nid = \"a\u{1}\"",
                "a control character in a string",
            ),
            (
                "[[keys]]\nid = \"a\u{7f}\"",
                "a control character in a string",
            ),
            (
                "[[keys]]\nid = 'a\u{7f}'",
                "a control character in a literal string",
            ),
            ("[[keys]]\nid = 7", "not a string"),
            (
                "[[keys]]\nid = \"a\" # bell\u{7}",
                "a control character in a comment",
            ),
            (
                "[[keys]]\nid = \"a\"\nscopes = [\"a\",",
                "an array over several lines",
            ),
            ("[[keys]]\nid = \"a\"\nscopes = [,]", "not a string"),
            (
                "[[keys]]\nid = \"a\"\nscopes = [\"a\" \"b\"]",
                "other than `,` or `]`",
            ),
            (
                "[[keys]]\nid = \"a\"\ndisabled = truly",
                "`true` or `false`",
            ),
            (
                "[[keys]]\nid = \"a\"\nexpires_at = 2026-12-01 00:00:00Z",
                "something after the value",
            ),
            (
                "[[keys]]\nid = \"a\"\nexpires_at = \"2026-12-01\"",
                "plain `2026-12-01T00:00:00Z` shape",
            ),
            (
                "[[keys]]\nid = \"a\"\nquota = { requests = 1_000, per = \"day\" }",
                "plain decimal digits",
            ),
            (
                "[[keys]]\nid = \"a\"\nquota = { requests = +1, per = \"day\" }",
                "plain decimal digits",
            ),
            (
                "[[keys]]\nid = \"a\"\nquota = { requests = 01, per = \"day\" }",
                "plain decimal digits",
            ),
            (
                "[[keys]]\nid = \"a\"\nquota = { requests = 0x1, per = \"day\" }",
                "plain decimal digits",
            ),
            (
                "[[keys]]\nid = \"a\"\nquota = { requests = 9223372036854775808, per = \"day\" }",
                "past TOML's range",
            ),
            (
                "[[keys]]\nid = \"a\"\nquota = { requests = 1, per = \"day\", }",
                "quoted or dotted field name",
            ),
            (
                "[[keys]]\nid = \"a\"\nquota = { requests = 1 }",
                "without its `requests` or `per`",
            ),
            (
                "[[keys]]\nid = \"a\"\nquota = { requests = 1, per = \"day\", burst = 2 }",
                "a field a quota does not have",
            ),
            (
                "[[keys]]\nid = \"a\"\nquota = { requests = 1,",
                "an inline table over several lines",
            ),
            (
                "[[keys]]\nid = \"a\"\nrate_limits = [{ name = \"b\", per = \"1s\" }]",
                "without its `name`",
            ),
            (
                "[[keys]]\nid = \"a\"\nrate_limits = [{ name = \"b\", requests = 1, per = \"1s\", burst = 3 }]",
                "a field a rate limit does not have",
            ),
            (
                "[[keys]]\nid = \"a\"\nrate_limits = [",
                "an array over several lines",
            ),
        ] {
            let declined = simple::parse_at(file).err();
            assert!(
                declined.is_some_and(|d| d.what.contains(says)),
                "{file:?}: {declined:?}"
            );
        }
    }

    #[test]
    fn fast_path_refuses_as_the_general_parser_does() {
        let files = [
            "[[keys]]\nid = \"a\"\nsecret = \"x\"\n[[keys]]\nid = \"a\"\nsecret = \"y\"\n",
            "[[keys]]\nid = \"a\"\nsecret = \"x\"\n\n[[keys]]\nid = \"b\"\nsecret = \"x\"\n",
            "[[keys]]\nid = \"a\"\nsha256 = \"zz\"\n",
            "[[keys]]\nid = \"a\"\nsecret = \" padded\"\n",
            "[[keys]]\nid = \"a\"\nsecret = \"x\"\nnot_before = 2026-12-01T00:00:00Z\nexpires_at = 2026-11-01T00:00:00Z\n",
            "# ok\n[[keys]]\nid = \"a\"\nsecret = \"x\"\n[[keys]]\nid = \"a\u{202e}b\"\nsecret = \"y\"\n",
        ];
        for file in files {
            let (fast, fast_at) = simple::parse(file).expect("in the subset").unwrap_err();
            let (slow, slow_at) = general(file).unwrap_err();
            assert_eq!(fast.to_string(), slow.to_string(), "{file:?}");
            let line = |at: Option<usize>| at.map(|at| line_of(file.as_bytes(), at));
            assert_eq!(line(fast_at), line(slow_at), "{file:?}");
        }
    }

    /// Above the limit, only the fast path reads: a line it declines is refused,
    /// naming the line and what in it is not read, never quoting the line.
    #[test]
    fn a_large_file_outside_the_fast_path_is_refused_naming_the_line_and_construct() {
        let mut text = String::new();
        while text.len() <= GENERAL_MAX {
            let i = text.len();
            text.push_str(&format!("[[keys]]\nid = \"k{i}\"\nsecret = \"s{i}\"\n"));
        }
        assert!(
            parse(Path::new("k"), text.as_bytes()).is_ok(),
            "plain style: read"
        );
        for (line, says) in [
            ("secret = \"\"\"p4ssw0rd-1\"\"\"", "a multi-line string"),
            ("secret = \"p4ssw0rd-2\\q\"", "an escape TOML does not have"),
            (
                "secret = \"p4ssw0rd-3\u{1}\"",
                "a control character in a string",
            ),
            ("p4ssw0rd-4 = \"x\"", "a field a key does not have"),
            (
                "secret = p4ssw0rd-5",
                "a value that is not a string where a string is expected",
            ),
        ] {
            let file = format!("{text}[[keys]]\nid = \"last\"\n{line}\n");
            let err = parse(Path::new("k"), file.as_bytes())
                .unwrap_err()
                .to_string();
            let n = file.lines().count();
            let want = format!(
                "k:{n}: a key file over 4 MiB is read by the fast reader only, which does \
                 not take {says}"
            );
            assert!(err.starts_with(&want), "{err}");
            assert!(!err.contains("p4ssw0rd"), "{err}");
        }
    }

    /// Above the limit, what the crate's writer writes is read back: escapes in any
    /// string field, the limits' inline tables; and what hand-kept files hold besides.
    /// A reviewer's finding: a byte-order mark, which the general parser skips, made
    /// the fast reader decline the file, so one over 4 MiB was refused.
    #[test]
    fn a_byte_order_mark_is_skipped_by_the_fast_reader_too() {
        let text = "\u{feff}[[keys]]\nid = \"a\"\nsecret = \"s3cr3t\"\n";
        let set = parse_with(Path::new("k"), text.as_bytes(), 0).unwrap();
        assert!(set.get("a").is_some());
        let bad = "\u{feff}[[keys]]\nid = \"a\"\nnope = 1\n";
        let err = parse_with(Path::new("k"), bad.as_bytes(), 0).unwrap_err();
        assert!(err.to_string().starts_with("k:3:"), "{err}");
    }

    #[test]
    fn a_large_file_the_writer_wrote_reads_back() {
        use super::super::write::{entry, file};
        let special = ApiKey::new("the-partner", "s3cr3t")
            .with_description(r#"the "partner" key, see C:\docs"#)
            .with_owner("o'brien\tand \u{1b}[31m red \u{7f} \u{0} ✓ 😀")
            .with_tenant("t\\n")
            .with_scopes(["read", r#"a"b"#, r"c\d"])
            .with_created_by("ops\r\nnewline\u{8}\u{c}")
            .with_rotated_from("r\"x")
            .with_created_at(crate::clock::from_unix_ms(1_796_083_200_250))
            .with_expires_at(crate::clock::from_unix_ms(1_896_083_200_000))
            .with_disabled(true)
            .with_rate_limit(RateLimit::new("burst", 100, Duration::from_secs(1)))
            .with_quota(Quota::new(1_000_000, crate::limit::QuotaPeriod::Month))
            .with_allowed_ips(["203.0.113.0/24".parse().unwrap()]);
        let mut keys = vec![special];
        let mut len = 0;
        while len <= GENERAL_MAX {
            let i = keys.len();
            let key = ApiKey::new(format!("key-{i:06}"), format!("secret-{i}"));
            len += entry(&key).len() + 1;
            keys.push(key);
        }
        let mut text = file(&keys);
        assert!(text.len() > GENERAL_MAX);
        // By hand: a comment, a literal string, a comment after a value, spaces in
        // the table header.
        text.push_str(
            "\n# by hand\n[[ keys ]]  # spaces\nid = 'c:\\literal' # a comment\n\
             secret = \"hand-secret\"\n",
        );
        let set = parse(Path::new("big.toml"), text.as_bytes()).unwrap();
        assert_eq!(set.len(), keys.len() + 1);
        for key in &keys {
            let back = set.get(key.id()).unwrap();
            assert!(back.digest == key.digest);
            assert_eq!(entry(back), entry(key));
        }
        let back = set.get("the-partner").unwrap();
        assert_eq!(
            back.description(),
            Some(r#"the "partner" key, see C:\docs"#)
        );
        let hand = set.get(r"c:\literal").unwrap();
        assert!(hand.digest == KeyDigest::of(b"hand-secret"));
    }

    #[test]
    fn what_toml_refuses_is_refused_not_read_as_comments() {
        for content in [
            "# note\r[[keys]]\rid = \"a\"\rsecret = \"x\"\r",
            "[[keys]]\nid = \"a\"\nsecret = \"x\"\n# note\rdisabled = true\n",
            "[[keys]]\nid = \"a\"\nsecret = \"x\"\n# bell\u{7}\n",
            "\u{c}[[keys]]\nid = \"a\"\nsecret = \"x\"\n",
        ] {
            assert!(simple::parse(content).is_none(), "{content:?}");
            assert!(
                parse(Path::new("k"), content.as_bytes()).is_err(),
                "{content:?}"
            );
        }
        // CRLF is a TOML line ending: read as LF is.
        let crlf = "[[keys]]\r\nid = \"a\"\r\nsecret = \"x\"\r\ndisabled = true\r\n";
        let set = simple::parse(crlf)
            .expect("in the fast path's subset")
            .unwrap();
        assert!(set.get("a").unwrap().is_disabled());
    }

    #[test]
    fn empty_lists_are_valid() {
        for content in ["keys = []", "# nothing yet\n"] {
            assert!(
                parse(Path::new("k"), content.as_bytes())
                    .unwrap()
                    .is_empty()
            );
        }
    }

    #[test]
    fn refusals_name_file_line_and_id_but_no_secret() {
        let cases = [
            ("[[keys]\nid = 'a'", "keys.toml:1:"),
            (
                "[[keys]]\nid = 'a'\nsecret = 'p4ss'\nsecrett = 'x'",
                "unknown field `secrett`",
            ),
            ("[[keys]]\nsecret = 'p4ss'", "missing field `id`"),
            (
                "[[keys]]\nid = 'a'\nsecret = 'p4ss'\n[[keys]]\nid = 'a'\nsecret = 'other'",
                "keys.toml:4: duplicate key id `a`",
            ),
            (
                "[[keys]]\nid = 'a'\nsecret = 'p4ss'\nsha256 = 'ab'",
                "keys.toml:1: key `a`: both `secret` and `sha256`",
            ),
            (
                "[[keys]]\nid = 'a'",
                "key `a`: neither `secret` nor `sha256`",
            ),
            (
                "[[keys]]\nid = 'a'\nsha256 = 'xyz'",
                "key `a`: `sha256` must be 64 hexadecimal digits",
            ),
            (
                "\n[[keys]]\nid = 'a'\nsecret = 'p4ss'\n[[keys]]\nid = 'b'\nsecret = 'p4ss'",
                "keys.toml:5: key `b` has the same secret as key `a`",
            ),
            (
                "[[keys]]\nid = 'a'\nsecret = 'p4ss'\nexpires_at = 2026-12-01T00:00:00",
                "`expires_at` needs a date, a time and a UTC offset",
            ),
            (
                "[[keys]]\nid = ''\nsecret = 'p4ss'",
                "`id` must not be empty",
            ),
            (
                "[[keys]]\nid = 'a'\nsecret = ''",
                "`secret` must not be empty",
            ),
        ];
        for (content, expected) in cases {
            let message = err(content);
            assert!(
                message.contains(expected),
                "{message:?} should contain {expected:?}"
            );
            assert!(!message.contains("p4ss"), "{message:?} leaks a secret");
        }
    }

    #[test]
    fn a_secret_in_a_wrongly_typed_field_is_never_quoted() {
        let cases = [
            (
                "[[keys]]\nid = 'a'\nsecret = 98765432101234\n",
                "98765432101234",
                "`secret`: expected a string",
            ),
            (
                "[[keys]]\nid = 'a'\nsecret = 9876.54321\n",
                "9876.54321",
                "`secret`: expected a string",
            ),
            (
                "[[keys]]\nid = 'a'\nsecret = 'x'\ndisabled = \"p4ssw0rd-secret\"\n",
                "p4ssw0rd",
                "`disabled`: expected a boolean",
            ),
            (
                "[[keys]]\nid = 'a'\nsecret = 'x'\nscopes = \"p4ssw0rd-secret\"\n",
                "p4ssw0rd",
                "`scopes`: expected a sequence",
            ),
            (
                "[[keys]]\nid = 'a'\nsecret = 'x'\nexpires_at = 'p4ssw0rd-secret'\n",
                "p4ssw0rd",
                "`expires_at`: expected a TOML datetime",
            ),
            (
                "[[keys]]\nid = 'a'\nsecret = 'x'\ndisabled = 12345678\n",
                "12345678",
                "`disabled`",
            ),
            // A secret written as a field's name.
            (
                "[[keys]]\nid = 'a'\nsecret = 'x'\ntak_P4SSW0RD = 1\n",
                "P4SSW0RD",
                "unknown field, expected one of `id`",
            ),
        ];
        for (content, secret, expected) in cases {
            let message = err(content);
            assert!(!message.contains(secret), "{message:?} leaks {secret}");
            assert!(
                message.contains(expected),
                "{message:?} should say {expected:?}"
            );
            assert!(
                message.starts_with("keys.toml:"),
                "{message:?} names the line"
            );
        }
    }

    #[test]
    fn toml_errors_do_not_quote_the_line() {
        let message = err("[[keys]]\nid = 'a'\nsecret = \"p4ss");
        assert!(message.starts_with("keys.toml:3:"), "{message}");
        assert!(!message.contains("p4ss"), "{message}");
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let alphabet = b"[]{}=\"'\n #keysidsecretsha256:-0123456789abcdefTZ.,\xff\x00";
        for _ in 0..2_000 {
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = parse(Path::new("fuzz"), &bytes);
        }
    }
}

#[cfg(test)]
mod properties {
    use std::time::{Duration, SystemTime};

    use proptest::prelude::*;

    use super::*;
    use crate::{
        ApiKey,
        limit::{Quota, RateLimit},
    };

    /// A value as a key file might hold it, plain or not.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9_-]{1,12}".prop_map(|s| format!("\"{s}\"")),
            "[a-z ]{0,6}".prop_map(|s| format!("\"{s}\"")),
            "[a-z]{1,6}".prop_map(|s| format!("'{s}'")),
            // Basic strings with escapes, good and bad, and what TOML refuses in one.
            escaped().prop_map(|s| format!("\"{s}\"")),
            // Literal strings, with what TOML refuses in one.
            "[a-z\"\\\\# \t\u{1}\u{7f}é]{0,6}".prop_map(|s| format!("'{s}'")),
            Just("\"a\\u0041\"".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            Just("truex".to_owned()),
            Just("[\"read\", \"admin\"]".to_owned()),
            Just("[ \"r\\\"ead\" ,'a,d]min', ]".to_owned()),
            Just("[\"a\" \"b\"]".to_owned()),
            Just("[,]".to_owned()),
            Just("[\"a\",".to_owned()),
            Just("[]".to_owned()),
            Just("[\"203.0.113.0/24\", \"2001:db8::/32\"]".to_owned()),
            Just("2026-11-01T00:00:00Z".to_owned()),
            Just("2026-12-01T01:00:00.250+01:00".to_owned()),
            Just("2026-12-01T00:00:00".to_owned()),
            Just("2026-12-01T00:00Z".to_owned()),
            Just("2026-12-01 00:00:00Z".to_owned()),
            Just("2026-12-01t00:00:00z".to_owned()),
            Just("12345678".to_owned()),
            Just("\"4e738ca5563c06cfd0018299933d58db1dd8bf97f6973dc99bf6cdc64b5550bd\"".to_owned()),
            Just("\"\"\"multi\"\"\"".to_owned()),
            Just("'''multi'''".to_owned()),
            (inline_table(), 0..3usize).prop_map(|(t, n)| match n {
                0 => t,
                n => format!("[{}]", vec![t; n].join(", ")),
            }),
            Just("[{ name = \"a\", requests = 1, per = \"1s\" }, { name = \"b\", requests = 2, per = \"1m\" },]".to_owned()),
        ]
    }

    /// The inside of a basic string: characters as they are, and escapes, some that
    /// TOML has and some it has not.
    fn escaped() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            "[a-z #=,'\\]\\[{}é😀\t]{1,3}",
            Just("\\\"".to_owned()),
            Just("\\\\".to_owned()),
            Just("\\b".to_owned()),
            Just("\\e".to_owned()),
            Just("\\f".to_owned()),
            Just("\\n".to_owned()),
            Just("\\r".to_owned()),
            Just("\\t".to_owned()),
            Just("\\x41".to_owned()),
            Just("\\xfF".to_owned()),
            Just("\\x4".to_owned()),
            Just("\\u00e9".to_owned()),
            Just("\\u0000".to_owned()),
            Just("\\u001B".to_owned()),
            Just("\\uD800".to_owned()),
            Just("\\u+041".to_owned()),
            Just("\\U0001F600".to_owned()),
            Just("\\U00110000".to_owned()),
            Just("\\é".to_owned()),
            Just("\\😀".to_owned()),
            Just("\\q".to_owned()),
            Just("\\ ".to_owned()),
            Just("\u{1}".to_owned()),
            Just("\u{7f}".to_owned()),
            Just("\"".to_owned()),
        ];
        prop::collection::vec(piece, 0..5).prop_map(|p| p.concat())
    }

    /// A rate limit's or a quota's inline table, as written or not quite.
    fn inline_table() -> impl Strategy<Value = String> {
        let field = prop_oneof![
            Just("name = \"burst\""),
            Just("name = 'b\\x'"),
            Just("requests = 100"),
            Just("requests = 0"),
            Just("requests = 1_000"),
            Just("requests = 9223372036854775808"),
            Just("requests = -1"),
            Just("per = \"1s\""),
            Just("per = \"month\""),
            Just("per = \"day\""),
            Just("burst = 3"),
        ];
        (prop::collection::vec(field, 0..4), any::<bool>()).prop_map(|(fields, comma)| {
            let comma = if comma && !fields.is_empty() { "," } else { "" };
            format!("{{ {}{comma} }}", fields.join(", "))
        })
    }

    /// Characters a key's strings may hold, the awkward ones often: what TOML escapes,
    /// what ends a value on the fast path, Unicode, and anything else now and then.
    fn any_text(visible: bool) -> impl Strategy<Value = String> {
        let mut awkward = vec![
            '"', '\\', '\'', '#', '=', ',', '[', ']', '{', '}', 'é', '日', '😀', 'a', 'z', '0', '-',
        ];
        if !visible {
            awkward.extend([
                ' ', '\t', '\n', '\r', '\u{0}', '\u{8}', '\u{c}', '\u{1b}', '\u{7f}', '\u{202e}',
            ]);
        }
        let c = prop_oneof![
            4 => prop::sample::select(awkward),
            1 => any::<char>(),
        ];
        prop::collection::vec(c, 0..12).prop_map(String::from_iter)
    }

    /// An instant the writer writes: to the millisecond, up to the year 9999.
    fn instant() -> impl Strategy<Value = Option<SystemTime>> {
        prop::option::of((0u64..253_402_300_800_000).prop_map(crate::clock::from_unix_ms))
    }

    /// A key with every field the writer writes, each chosen at random.
    fn any_key() -> impl Strategy<Value = ApiKey> {
        let text = || prop::option::of(any_text(false));
        let meta = (
            any_text(true),
            prop::collection::vec(any_text(true), 0..3),
            (text(), text(), text(), text(), text()),
            (instant(), instant(), instant(), any::<bool>()),
        );
        let limits = (
            prop::collection::vec(
                ("[a-z0-9_.-]{1,12}", 1u64..1_000_000_000, 1u64..86_400),
                0..3,
            ),
            prop::option::of((1u64..(1 << 40), any::<bool>())),
            prop::option::of(prop::sample::subsequence(
                vec!["203.0.113.0/24", "2001:db8::/32", "10.0.0.1/32", "::/0"],
                1..4,
            )),
        );
        (meta, limits).prop_map(|(meta, limits)| {
            let (id, scopes, (tenant, owner, description, created_by, rotated_from), times) = meta;
            let (not_before, expires_at, created_at, disabled) = times;
            let (rates, quota, nets) = limits;
            let mut key =
                ApiKey::new(format!("k{id}"), format!("s3cr3t-{id}")).with_disabled(disabled);
            if !scopes.is_empty() {
                key = key.with_scopes(scopes);
            }
            let texts = [tenant, owner, description, created_by, rotated_from];
            let [tenant, owner, description, created_by, rotated_from] = texts;
            if let Some(s) = tenant {
                key = key.with_tenant(s);
            }
            if let Some(s) = owner {
                key = key.with_owner(s);
            }
            if let Some(s) = description {
                key = key.with_description(s);
            }
            if let Some(s) = created_by {
                key = key.with_created_by(s);
            }
            if let Some(s) = rotated_from {
                key = key.with_rotated_from(s);
            }
            if let Some(at) = not_before {
                key = key.with_not_before(at);
            }
            if let Some(at) = expires_at {
                key = key.with_expires_at(at);
            }
            if let Some(at) = created_at {
                key = key.with_created_at(at);
            }
            for (name, requests, secs) in rates {
                let per = Duration::from_secs(secs);
                key = key.with_rate_limit(RateLimit::new(name.as_str(), requests, per));
            }
            if let Some((requests, monthly)) = quota {
                let period = match monthly {
                    true => crate::limit::QuotaPeriod::Month,
                    false => crate::limit::QuotaPeriod::Day,
                };
                key = key.with_quota(Quota::new(requests, period));
            }
            if let Some(nets) = nets {
                key = key.with_allowed_ips(nets.into_iter().filter_map(|n| n.parse().ok()));
            }
            key
        })
    }

    fn field() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("id"),
            Just("secret"),
            Just("sha256"),
            Just("scopes"),
            Just("tenant"),
            Just("owner"),
            Just("description"),
            Just("not_before"),
            Just("expires_at"),
            Just("disabled"),
            Just("created_at"),
            Just("created_by"),
            Just("rotated_from"),
            Just("rate_limits"),
            Just("quota"),
            Just("allowed_ips"),
            Just("extra"),
        ]
    }

    /// A line of a key file: mostly what the documented style writes, sometimes not.
    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (field(), value()).prop_map(|(f, v)| format!("{f} = {v}")),
            2 => Just("[[keys]]".to_owned()),
            1 => "[ \t]{0,2}# [a-z]{0,5}".prop_map(|s| s),
            1 => Just(String::new()),
            1 => (field(), value()).prop_map(|(f, v)| format!(" \t{f}={v}\t")),
            1 => Just("keys = []".to_owned()),
            1 => Just("[[keys]] # c".to_owned()),
            1 => Just("[[ keys ]]".to_owned()),
            1 => Just("[keys]".to_owned()),
            1 => (field(), value(), "[ \t]{0,2}#[a-z \"'\u{7}]{0,4}")
                .prop_map(|(f, v, c)| format!("{f} = {v}{c}")),
        ]
    }

    fn file() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(line(), 0..16),
            prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        )
            .prop_map(|(lines, end)| lines.join(end))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Whatever the fast path takes, it reads as the general parser does: the
        /// same keys, or the same refusal on the same line.
        #[test]
        fn the_fast_path_agrees_with_the_general_parser(text in file()) {
            if let Some(fast) = simple::parse(&text) {
                let slow = general(&text);
                match (fast, slow) {
                    (Ok(fast), Ok(slow)) => {
                        prop_assert_eq!(format!("{fast:?}"), format!("{slow:?}"));
                        for (a, b) in fast.iter().zip(slow.iter()) {
                            prop_assert!(a.digest == b.digest);
                            prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
                        }
                    }
                    (Err((fe, fa)), Err((se, sa))) => {
                        prop_assert_eq!(fe.to_string(), se.to_string());
                        let line = |at: Option<usize>| at.map(|at| line_of(text.as_bytes(), at));
                        prop_assert_eq!(line(fa), line(sa));
                    }
                    (fast, slow) => prop_assert!(false, "fast {:?} vs general {:?}", fast.map(|s| s.len()), slow.map(|s| s.len())),
                }
            }
        }

        /// Any keys the crate accepts, written by its writer, are read back as written
        /// by the fast path alone, as in a file over the general parser's limit; and
        /// the general parser reads them the same.
        #[test]
        fn what_the_writer_writes_the_fast_path_reads_back(
            keys in prop::collection::vec(any_key(), 1..4)
        ) {
            use super::super::write::{entry, file};
            // Each key the crate accepts, the first of each id.
            let mut ids = std::collections::HashSet::new();
            let keys: Vec<ApiKey> = keys
                .into_iter()
                .filter(|k| KeySet::from_keys([k.clone()]).is_ok())
                .filter(|k| ids.insert(k.id().to_owned()))
                .collect();
            prop_assume!(KeySet::from_keys(keys.clone()).is_ok());
            let text = file(&keys);
            let fast = parse_with(Path::new("k"), text.as_bytes(), 0)
                .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            let slow = general(&text).map_err(|(e, _)| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(fast.len(), keys.len());
            for key in &keys {
                let back = fast.get(key.id()).expect("the same id");
                prop_assert!(back.digest == key.digest);
                prop_assert_eq!(entry(back), entry(key));
                let general = slow.get(key.id()).expect("the same id");
                prop_assert_eq!(format!("{back:?}"), format!("{general:?}"));
            }
        }

        /// Any bytes: an answer, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(Path::new("k"), &bytes);
        }
    }
}
