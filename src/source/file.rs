use std::{
    fmt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;
use toml::{Spanned, value::Datetime};
use zeroize::Zeroizing;

use super::watch::{self, Options};
use crate::{ApiKey, Error, KeySet, KeySource, KeyUpdater, key::KeyDigest};

/// A [`KeySource`] that reads a TOML key file and reloads it whenever it changes,
/// with no restart.
///
/// # The key file
///
/// ```toml
/// [[keys]]
/// id = "billing-prod-2026-11"   # required, unique, not secret: appears in logs
/// secret = "…"                   # the key itself, or instead:
/// # sha256 = "<64 hex digits>"   # its SHA-256, so the file holds no secret
/// scopes = ["read", "admin"]     # optional
/// tenant = "team-a"              # optional
/// owner = "billing@example.com"  # optional, free text
/// description = "…"              # optional, free text
/// not_before = 2026-11-01T00:00:00Z   # optional: refused before this instant
/// expires_at = 2026-12-01T00:00:00Z   # optional: refused from this instant on
/// disabled = false               # optional: refused, but kept for the record
/// ```
///
/// A file is refused as a whole, naming the file, the line and the key id (never a
/// secret), for: bad TOML, an unknown field, a missing, empty or duplicate `id`, both
/// or neither of `secret` and `sha256`, a malformed hash, the same key under two ids,
/// a datetime without a UTC offset. `keys = []` (or no `[[keys]]` at all) is valid
/// and lets nobody in.
///
/// # Reloading
///
/// The file's directory is watched (inotify and the like), with a debounce, and the
/// file is also polled as a safety net for file systems that send no events. Every
/// way a file really gets replaced is picked up: written in place, written elsewhere
/// and renamed over (editors, `mv`), deleted and created again, and Kubernetes
/// ConfigMap and Secret volumes (a symlink through `..data`, swapped atomically).
/// A reload happens only when the content changed.
///
/// - A file that fails validation is not applied: the last good keys stay, the error
///   is logged at `warn` and readable from
///   [`KeyStore::last_reload`](crate::KeyStore::last_reload).
/// - An empty (zero-byte) file is a write in progress, and is ignored.
/// - A file that disappears leaves the last good keys in place until it returns.
///
/// Watching runs on its own thread (no async runtime needed) and stops once the store
/// is dropped.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_api_key::{ApiKeyLayer, FileSource};
///
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("keys.toml");
/// std::fs::write(&path, r#"
/// [[keys]]
/// id = "ci"
/// sha256 = "4e738ca5563c06cfd0018299933d58db1dd8bf97f6973dc99bf6cdc64b5550bd"
/// "#)?;
///
/// let layer = ApiKeyLayer::try_new(
///     FileSource::new(&path).with_poll_interval(Duration::from_secs(30)),
/// )?;
/// assert_eq!(layer.store().len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct FileSource {
    path: PathBuf,
    options: Options,
    loaded: Option<[u8; 32]>,
}

impl FileSource {
    /// Reads keys from the TOML file at `path`, and reloads it on change.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            options: Options::default(),
            loaded: None,
        }
    }

    /// How often the file is re-read even without a change event (default 5 s). This
    /// bounds how late a change is seen where the file system sends no events.
    ///
    /// # Panics
    ///
    /// If `interval` is zero.
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        assert!(!interval.is_zero(), "poll interval must not be zero");
        self.options.poll = interval;
        self
    }

    /// How long to wait after a change event for the burst to settle before reading
    /// (default 20 ms).
    #[must_use]
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.options.debounce = debounce;
        self
    }

    /// Whether to watch the file system for change events (default `true`). Without
    /// them, only polling sees changes.
    #[must_use]
    pub fn with_file_events(mut self, enabled: bool) -> Self {
        self.options.events = enabled;
        self
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parses key-file content; `path` is only used in errors.
    ///
    /// # Errors
    ///
    /// See [the key file](FileSource#the-key-file) for what is refused.
    pub fn parse(path: &Path, content: &[u8]) -> Result<KeySet, Error> {
        parse(content).map_err(|(error, offset)| {
            let line = offset.map(|at| line_of(content, at));
            error.in_file(path, line)
        })
    }
}

impl KeySource for FileSource {
    fn name(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn load(&mut self) -> Result<KeySet, Error> {
        let bytes = watch::FileBytes::read(&self.path).map_err(|e| Error::io(&self.path, e))?;
        if bytes.is_empty() {
            return Err(Error::Parse {
                reason:
                    "the file is empty (a write in progress?); it must at least say `keys = []`"
                        .into(),
            }
            .in_file(&self.path, None));
        }
        // Hash the content (for change detection) beside the parse: for a large file
        // that is tens of milliseconds off the layer's start-up.
        let (set, hash) = std::thread::scope(|scope| {
            let hash = scope.spawn(|| watch::content_hash(&bytes));
            let set = Self::parse(&self.path, &bytes);
            (set, hash.join().ok())
        });
        self.loaded = hash;
        set
    }

    fn watch(self: Box<Self>, updater: KeyUpdater) {
        watch::spawn_with(
            self.path,
            self.options,
            Box::new(|path: &Path, bytes: &[u8]| Self::parse(path, bytes)),
            updater,
            self.loaded,
        );
    }
}

impl fmt::Debug for FileSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .field("poll_interval", &self.options.poll)
            .field("debounce", &self.options.debounce)
            .field("file_events", &self.options.events)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<Spanned<KeyEntry<String, Zeroizing<String>>>>,
}

/// One `[[keys]]` table. `S` is the string type (owned from the TOML parser,
/// borrowed from the file on the fast path), `T` the secret's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry<S, T> {
    id: S,
    secret: Option<T>,
    sha256: Option<S>,
    #[serde(default = "Vec::new")]
    scopes: Vec<S>,
    tenant: Option<S>,
    owner: Option<S>,
    description: Option<S>,
    not_before: Option<Datetime>,
    expires_at: Option<Datetime>,
    #[serde(default)]
    disabled: bool,
}

/// Parses a key file; on error, the byte offset it points at, where known.
fn parse(content: &[u8]) -> Result<KeySet, (Error, Option<usize>)> {
    let text = std::str::from_utf8(content).map_err(|e| {
        let reason = "the file is not valid UTF-8".to_owned();
        (Error::Parse { reason }, Some(e.valid_up_to()))
    })?;
    match simple::parse(text) {
        Some(set) => Ok(set),
        None => general(text),
    }
}

/// Parses with the general TOML parser.
fn general(text: &str) -> Result<KeySet, (Error, Option<usize>)> {
    let file: KeyFile = toml::from_str(text).map_err(|e| {
        // Only the message: `Display` would quote the offending line, which may hold a
        // secret.
        let reason = e.message().trim_end().to_owned();
        (Error::Parse { reason }, e.span().map(|s| s.start))
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

/// A fast path for key files written in the plain style this crate documents (and
/// large generated files use): one `key = value` per line, basic strings without
/// escapes, booleans, string arrays, datetimes. It reads a million keys several
/// times faster than the general TOML parser. Anything outside that subset, and any
/// file that fails validation, goes to the general parser, so what is accepted and
/// every error message are the general parser's.
mod simple {
    use super::{KeyEntry, KeySet};
    use crate::background::Pacer;
    use toml::value::Datetime;

    /// Below this size a file is read on one thread.
    const PARALLEL_FROM: usize = 8 << 20;

    pub(super) fn parse(text: &str) -> Option<KeySet> {
        // A large file loaded at start-up (nothing is served yet) is read on every
        // core; a reload on the watcher thread stays on one, beside live traffic.
        let keys = if text.len() >= PARALLEL_FROM && !crate::background::is_background() {
            keys_in_parallel(text)?
        } else {
            keys(text)?
        };
        KeySet::from_keys(keys).ok()
    }

    /// The keys of `text`, read in parts cut at `[[keys]]` lines, one per core.
    /// The fast path reads line by line, so a part starting at such a line reads
    /// exactly as the whole file would from there.
    pub(super) fn keys_in_parallel(text: &str) -> Option<Vec<super::ApiKey>> {
        let parts = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(4);
        let mut bounds = vec![0];
        for i in 1..parts {
            let from = (text.len() / parts * i).max(bounds[bounds.len() - 1]);
            let found = text.as_bytes()[from..]
                .windows(9)
                .position(|w| w == b"\n[[keys]]");
            if let Some(at) = found {
                bounds.push(from + at + 1);
            }
        }
        bounds.push(text.len());
        std::thread::scope(|scope| {
            let mut others = Vec::new();
            for w in bounds.windows(2).skip(1) {
                let part = &text[w[0]..w[1]];
                let spawned = std::thread::Builder::new().spawn_scoped(scope, move || keys(part));
                others.push((part, spawned));
            }
            let mut all = keys(&text[..bounds[1]])?;
            for (part, spawned) in others {
                // A thread that could not start: read its part here.
                let part_keys = match spawned {
                    Ok(handle) => handle.join().ok()?,
                    Err(_) => keys(part),
                };
                all.extend(part_keys?);
            }
            Some(all)
        })
    }

    pub(super) fn keys(text: &str) -> Option<Vec<super::ApiKey>> {
        let mut keys = Vec::with_capacity(text.len() / 100);
        let mut add = |entry: Partial| {
            keys.push(entry.finish()?.into_key().ok()?);
            Some(())
        };
        let mut current: Option<Partial> = None;
        let mut pacer = Pacer::new();
        for line in text.lines() {
            pacer.step();
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line == "[[keys]]" {
                if let Some(done) = current.take() {
                    add(done)?;
                }
                current = Some(Partial::default());
                continue;
            }
            let (name, value) = line.split_once('=')?;
            current.as_mut()?.set(name.trim(), value.trim())?;
        }
        if let Some(done) = current {
            add(done)?;
        }
        Some(keys)
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
        let inner = value.strip_prefix('[')?.strip_suffix(']')?.trim();
        if inner.is_empty() {
            return Some(Vec::new());
        }
        inner.split(',').map(|s| string(s.trim())).collect()
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
}

impl<S, T> KeyEntry<S, T>
where
    S: AsRef<str> + Into<Box<str>>,
    T: AsRef<str>,
{
    fn into_key(self) -> Result<ApiKey, Error> {
        let id = self.id.as_ref();
        let digest = match (&self.secret, &self.sha256) {
            (Some(secret), None) if secret.as_ref().is_empty() => {
                return Err(Error::invalid(Some(id), "`secret` must not be empty"));
            }
            (Some(secret), None) => KeyDigest::of(secret.as_ref().as_bytes()),
            (None, Some(hex)) => KeyDigest::from_hex(hex.as_ref().trim()).ok_or_else(|| {
                Error::invalid(Some(id), "`sha256` must be 64 hexadecimal digits")
            })?,
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    Some(id),
                    "both `secret` and `sha256` are set; give exactly one",
                ));
            }
            (None, None) => {
                return Err(Error::invalid(
                    Some(id),
                    "neither `secret` nor `sha256` is set; give exactly one",
                ));
            }
        };
        let mut key = ApiKey::from_digest(id.into(), digest).with_disabled(self.disabled);
        if !self.scopes.is_empty() {
            key = key.with_scopes(self.scopes);
        }
        if let Some(tenant) = self.tenant {
            key = key.with_tenant(tenant);
        }
        if let Some(owner) = self.owner {
            key = key.with_owner(owner);
        }
        if let Some(description) = self.description {
            key = key.with_description(description);
        }
        if let Some(at) = self.not_before {
            key = key.with_not_before(instant(id, "not_before", &at)?);
        }
        if let Some(at) = self.expires_at {
            key = key.with_expires_at(instant(id, "expires_at", &at)?);
        }
        Ok(key)
    }
}

/// Converts a TOML offset datetime to a `SystemTime`.
fn instant(id: &str, field: &str, dt: &Datetime) -> Result<SystemTime, Error> {
    use toml::value::Offset;
    let (Some(date), Some(time), Some(offset)) = (dt.date, dt.time, dt.offset) else {
        return Err(Error::invalid(
            Some(id),
            format!("`{field}` needs a date, a time and a UTC offset, e.g. 2026-12-01T00:00:00Z"),
        ));
    };
    let days = days_from_civil(i64::from(date.year), date.month.into(), date.day.into());
    let offset_minutes = match offset {
        Offset::Z => 0,
        Offset::Custom { minutes } => i64::from(minutes),
    };
    let secs = days * 86_400
        + i64::from(time.hour) * 3_600
        + i64::from(time.minute) * 60
        + i64::from(time.second.unwrap_or(0))
        - offset_minutes * 60;
    let since_epoch = Duration::new(secs.unsigned_abs(), time.nanosecond.unwrap_or(0));
    let at = if secs >= 0 {
        UNIX_EPOCH.checked_add(since_epoch)
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    at.ok_or_else(|| Error::invalid(Some(id), format!("`{field}` is out of range")))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn line_of(content: &[u8], offset: usize) -> usize {
    let offset = offset.min(content.len());
    content[..offset].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(content: &str) -> String {
        FileSource::parse(Path::new("keys.toml"), content.as_bytes())
            .unwrap_err()
            .to_string()
    }

    const HASH: &str = "4e738ca5563c06cfd0018299933d58db1dd8bf97f6973dc99bf6cdc64b5550bd";

    #[test]
    fn reading_in_parts_gives_what_one_pass_gives() {
        let mut text = String::from("# generated\n\n");
        for i in 0..20_000 {
            text.push_str(&format!(
                "[[keys]]\nid = \"k{i}\"\nsecret = \"s{i}\"\nscopes = [\"read\"]\n\n"
            ));
        }
        let ids = |keys: Vec<ApiKey>| -> Vec<(String, [u8; 32])> {
            keys.into_iter()
                .map(|k| (k.id.to_string(), k.digest.0))
                .collect()
        };
        let whole = ids(simple::keys(&text).unwrap());
        assert_eq!(whole.len(), 20_000);
        assert_eq!(ids(simple::keys_in_parallel(&text).unwrap()), whole);
        // Anything the fast path refuses, in any part, sends the file to the general
        // parser as before.
        let bad = text.replacen("id = \"k19000\"", "id = k19000", 1);
        assert!(simple::keys_in_parallel(&bad).is_none());
        let bad = text.replacen("id = \"k3\"", "id = \"k3\" # note", 1);
        assert!(simple::keys(&bad).is_none());
        assert!(simple::keys_in_parallel(&bad).is_none());
    }

    #[test]
    fn parses_every_field() {
        let set = FileSource::parse(
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
        assert_eq!(set.get("b").unwrap().digest, KeyDigest::of(b"s3cr3t"));
    }

    /// The fast path and the general parser agree on every file the fast path takes.
    #[test]
    fn fast_path_matches_the_general_parser() {
        let files = [
            format!("[[keys]]\nid = \"b\"\nsha256 = \"{HASH}\"\n"),
            "# c\n[[keys]]\nid = \"a\"\nsecret = \"s3 c=r\tet\"\nscopes = [\"read\", \"admin\"]\n\
             tenant = \"t\"\nowner = \"o é\"\ndescription = \"d\"\ndisabled = true\n\
             not_before = 2026-11-01T00:00:00Z\nexpires_at = 2026-12-01T01:00:00.250+01:00\n\n\
             [[keys]]\nid = \"c\"\nsecret = \"x\"\nscopes = []\n"
                .to_owned(),
        ];
        for file in files {
            let fast = simple::parse(&file).expect("in the fast path's subset");
            let slow = general(&file).map_err(|(e, _)| e).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{slow:?}"));
            for (a, b) in fast.iter().zip(slow.iter()) {
                assert_eq!(a.digest, b.digest);
                assert_eq!(format!("{a:?}"), format!("{b:?}"));
            }
        }
    }

    #[test]
    fn fast_path_declines_what_it_does_not_know() {
        for file in [
            "keys = []",
            "[[keys]]\nid = \"a\" # comment\nsecret = \"x\"",
            "[[keys]]\nid = 'a'\nsecret = \"x\"",
            "[[keys]]\nid = \"a\\u0041\"\nsecret = \"x\"",
            "[[keys]]\nid = \"a\"\nid = \"b\"\nsecret = \"x\"",
            "[[keys]]\nid = \"a\"\nsecret = \"x\"\nextra = \"y\"",
            "[[keys]]\nid = \"a\"\nsecret = \"x\"\n[[keys]]\nid = \"a\"\nsecret = \"y\"",
            "[[keys]]\nid = \"a\"\nsecret = \"x\"\nexpires_at = 2026-12-01T00:00:00",
            "[[keys]]\nsecret = \"x\"",
            "id = \"a\"",
        ] {
            assert!(simple::parse(file).is_none(), "{file:?}");
        }
    }

    #[test]
    fn empty_lists_are_valid() {
        for content in ["keys = []", "# nothing yet\n"] {
            assert!(
                FileSource::parse(Path::new("k"), content.as_bytes())
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
            let _ = FileSource::parse(Path::new("fuzz"), &bytes);
        }
    }
}
