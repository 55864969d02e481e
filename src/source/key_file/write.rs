//! Writing key files: the one place that turns a key into the text the reader takes
//! back. The generator's entry, a whole file (an export, a replica's snapshot) and the
//! key-management API's edits all use these fields, so whatever id or metadata the
//! crate accepts round-trips through write then read.

use std::fmt::Write as _;
#[cfg(feature = "file")]
use std::{io::Write as _, path::Path};

use crate::{ApiKey, clock};

/// The fields of `key`'s `[[keys]]` table, in the order the key file documents them,
/// each as a TOML value (a string quoted and escaped, an array, a boolean, a
/// datetime). Fields the key does not have are `None`; the key is written as its
/// digest (`sha256`), never a secret.
pub(crate) fn fields(key: &ApiKey) -> [(&'static str, Option<String>); 15] {
    let text = |s: Option<&str>| s.map(basic_string);
    let at = |t: Option<std::time::SystemTime>| t.map(clock::rfc3339);
    let scopes: Vec<String> = key.scopes().map(basic_string).collect();
    [
        ("id", Some(basic_string(key.id()))),
        ("sha256", Some(basic_string(&key.digest.to_hex()))),
        (
            "scopes",
            (!scopes.is_empty()).then(|| format!("[{}]", scopes.join(", "))),
        ),
        ("tenant", text(key.tenant())),
        ("owner", text(key.owner())),
        ("description", text(key.description())),
        ("not_before", at(key.not_before())),
        ("expires_at", at(key.expires_at())),
        ("disabled", key.is_disabled().then(|| "true".to_owned())),
        ("created_at", at(key.created_at())),
        ("created_by", text(key.created_by())),
        ("rotated_from", text(key.rotated_from())),
        ("rate_limits", rate_limits(key)),
        (
            "quota",
            key.quota().map(|q| {
                format!(
                    "{{ requests = {}, per = {} }}",
                    q.requests(),
                    basic_string(q.period().as_str())
                )
            }),
        ),
        (
            "allowed_ips",
            key.allowed_ips().map(|nets| {
                let nets: Vec<String> = nets.iter().map(|n| basic_string(&n.to_string())).collect();
                format!("[{}]", nets.join(", "))
            }),
        ),
    ]
}

/// `rate_limits = [{ name = "burst", requests = 100, per = "1s" }, …]`, if any.
fn rate_limits(key: &ApiKey) -> Option<String> {
    let limits: Vec<String> = key
        .rate_limits()
        .iter()
        .map(|r| {
            format!(
                "{{ name = {}, requests = {}, per = {} }}",
                basic_string(r.name()),
                r.requests(),
                basic_string(&crate::limit::RateLimit::format_per(r.per()))
            )
        })
        .collect();
    (!limits.is_empty()).then(|| format!("[{}]", limits.join(", ")))
}

/// `key` as one `[[keys]]` table.
pub(crate) fn entry(key: &ApiKey) -> String {
    let mut out = String::from("[[keys]]\n");
    for (name, value) in fields(key) {
        if let Some(value) = value {
            let _ = writeln!(out, "{name} = {value}");
        }
    }
    out
}

/// A whole key file holding `keys`, digests only. An empty list is `keys = []`, a
/// file that says "no keys" rather than one that is being written.
pub(crate) fn file<'a>(keys: impl IntoIterator<Item = &'a ApiKey>) -> String {
    let mut out = String::new();
    for key in keys {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&entry(key));
    }
    if out.is_empty() {
        out.push_str("keys = []\n");
    }
    out
}

/// `s` as a TOML basic string: quoted, with `"` and `\` escaped, and every control
/// character TOML forbids written as an escape. Other characters, Unicode included,
/// are written as they are.
pub(crate) fn basic_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Replaces the file at `path` with `bytes` so that a crash at any point leaves the old
/// file or the new one: a new file beside it, created exclusively under a unique name
/// and readable by its owner only (or with the old file's permissions, owner and
/// group), written, synced, renamed over `path`, and the directory synced. Where
/// `path` is a symlink, the file it names is replaced (see [`target`]); where
/// something other than a regular file is there, nothing is (see [`only_a_file`]).
///
/// # Errors
///
/// Nothing was changed, unless the error is a [`NotSynced`] (see [`not_synced`]): the
/// new file is in place, but the rename may not survive a crash.
#[cfg(feature = "file")]
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let Target { path, meta } = target(path)?;
    only_a_file(meta.as_ref())?;
    // Opened before anything changes: a directory that cannot be opened fails the
    // write while the old file is still in place, not after the rename.
    let dir = open_dir(&path)?;
    // The owner and permissions given are those of the file checked, not of one put
    // there since.
    let file = staged_like(&path, meta.as_ref(), bytes)?;
    file.persist(&path).map_err(|e| e.error)?;
    sync(dir).map_err(|e| std::io::Error::other(NotSynced(e)))
}

/// The error of a write whose new file is in place, but whose directory could not be
/// synced: the rename may not survive a crash (the old file may then come back).
#[cfg(feature = "file")]
#[derive(Debug)]
pub(crate) struct NotSynced(std::io::Error);

#[cfg(feature = "file")]
impl std::fmt::Display for NotSynced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the new file is in place, but its directory could not be synced ({}): it \
             may not survive a crash",
            self.0
        )
    }
}

#[cfg(feature = "file")]
impl std::error::Error for NotSynced {}

/// Whether `error`, from [`replace`], came after the new file was put in place.
#[cfg(feature = "file")]
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn not_synced(error: &std::io::Error) -> bool {
    error.get_ref().is_some_and(|e| e.is::<NotSynced>())
}

/// How many links a path may lead through, as Linux allows.
#[cfg(feature = "file")]
const MAX_LINKS: usize = 40;

/// Where a whole-file write goes, as [`target`] found it.
#[cfg(feature = "file")]
pub(crate) struct Target {
    /// The file replaced, or created: no link in it.
    pub(crate) path: std::path::PathBuf,
    /// What is there now (`None`: nothing).
    pub(crate) meta: Option<std::fs::Metadata>,
}

/// The file a write to `path` replaces: `path`, or where a symlink is on the way (a
/// deployment's link to a versioned file, a file kept in another directory), the
/// file it leads to, each link followed as the system follows it. Renaming a new
/// file over a link would leave its target behind, never updated again. Resolved
/// once per write, one name at a time, so that every link on the way is checked
/// (see [`planted`]) and the new file is staged beside the file it replaces.
///
/// # Errors
///
/// A link that leads nowhere, through more than 40 links, or into `/proc` (where
/// `/dev/stdout` and `/dev/fd/N` lead: a process's open file, which a write would
/// replace whole); a name on the way that another user may have planted (see
/// [`planted`]); a path that ends in `/`; or the error met on the way.
#[cfg(feature = "file")]
pub(crate) fn target(path: &Path) -> std::io::Result<Target> {
    use std::{
        io::{Error, ErrorKind},
        path::{Component, PathBuf},
    };
    let nothing = |what: String| Error::new(ErrorKind::NotFound, what);
    let a_directory = || {
        Error::new(
            ErrorKind::IsADirectory,
            "it names a directory (it is empty, or ends in `/`, `.` or `..`); nothing was \
             written",
        )
    };
    if names_a_directory(path) {
        return Err(a_directory());
    }
    // What is resolved so far (no link in it), and the names still to go, last first.
    // A relative path starts from the current directory's physical path, so that the
    // names above it are checked too.
    let mut out = PathBuf::new();
    let mut rest: Vec<PathBuf> = Vec::new();
    let push = |rest: &mut Vec<PathBuf>, path: &Path| {
        let start = rest.len();
        rest.extend(path.components().map(|c| PathBuf::from(c.as_os_str())));
        rest[start..].reverse();
    };
    push(&mut rest, path);
    if path.is_relative() {
        push(&mut rest, &std::env::current_dir()?);
    }
    let mut links = 0;
    // Whether the last name came from a link: then nothing there is a link to nothing.
    let mut through_link = false;
    while let Some(piece) = rest.pop() {
        let last = rest.is_empty();
        let name = match piece.components().next() {
            Some(Component::Normal(name)) => name.to_owned(),
            Some(Component::ParentDir) => {
                if out.as_os_str().is_empty() || out.ends_with("..") {
                    out.push("..");
                } else {
                    out.pop();
                }
                continue;
            }
            Some(Component::RootDir | Component::Prefix(_)) => {
                out = piece;
                continue;
            }
            Some(Component::CurDir) | None => continue,
        };
        let dir = if out.as_os_str().is_empty() {
            Path::new(".")
        } else {
            out.as_path()
        };
        let at = out.join(&name);
        let meta = match std::fs::symlink_metadata(&at) {
            Ok(meta) => meta,
            Err(e) if e.kind() == ErrorKind::NotFound && !last => {
                return Err(nothing(format!(
                    "{} does not exist; nothing was written",
                    at.display()
                )));
            }
            Err(e) if e.kind() == ErrorKind::NotFound && through_link => {
                return Err(nothing(format!(
                    "it is a symbolic link to {}, which does not exist; nothing was \
                     written",
                    at.display()
                )));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Ok(Target {
                    path: at,
                    meta: None,
                });
            }
            Err(e) => return Err(e),
        };
        #[cfg(unix)]
        if last || meta.file_type().is_symlink() {
            planted(dir, &at, &meta)?;
        }
        if last && !meta.file_type().is_symlink() {
            return Ok(Target {
                path: at,
                meta: Some(meta),
            });
        }
        if meta.file_type().is_symlink() {
            if on_proc(dir, &at)? {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "it leads to a process's open file (/proc), which is not replaced; \
                     nothing was written",
                ));
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "it leads through more than 40 symbolic links (a loop?); nothing was \
                     written",
                ));
            }
            let next = std::fs::read_link(&at)?;
            if last && names_a_directory(&next) {
                return Err(a_directory());
            }
            through_link = last || through_link;
            push(&mut rest, &next);
            continue;
        }
        if !meta.is_dir() {
            return Err(Error::new(
                ErrorKind::NotADirectory,
                format!("{} is not a directory; nothing was written", at.display()),
            ));
        }
        out = at;
    }
    // Only `.`, `..` and `/` were left at the end: a directory (refused above, but a
    // link may lead to one).
    Err(a_directory())
}

/// Whether `path`, by its spelling, can only name a directory: empty, `/` at the end,
/// or a last name of `.` or `..` (which `Path::components` would drop or resolve).
#[cfg(feature = "file")]
fn names_a_directory(path: &Path) -> bool {
    #[cfg(unix)]
    {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        bytes.is_empty()
            || bytes.ends_with(b"/")
            || bytes == b"."
            || bytes == b".."
            || bytes.ends_with(b"/.")
            || bytes.ends_with(b"/..")
    }
    #[cfg(not(unix))]
    matches!(
        path.components().next_back(),
        None | Some(std::path::Component::CurDir | std::path::Component::ParentDir)
    )
}

/// Whether the link `at`, in `dir`, is in `/proc` (a process's open file, such as
/// `/proc/self/fd/1`), told by the file system, however the path spells it.
#[cfg(feature = "file")]
fn on_proc(dir: &Path, at: &Path) -> std::io::Result<bool> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let _ = at;
        Ok(rustix::fs::statfs(dir)?.f_type == rustix::fs::PROC_SUPER_MAGIC)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = dir;
        Ok(at.starts_with("/proc"))
    }
}

/// Refuses a name another user may have planted: in a directory that others may
/// write to but that keeps names to their owners (sticky, as `/tmp`), a link (at any
/// place in the path) or the file replaced, owned by neither this process's user nor
/// the directory's owner. Following such a link would let that user choose which
/// file a process run as root replaces; replacing such a file would give the keys
/// its owner and permissions. It is the rule Linux's `fs.protected_symlinks` and
/// `fs.protected_regular` apply to opening a file (to the last name only), which a
/// rename does not go through. As with those, a directory of another user's on the
/// way is theirs to fill: writing into it, their links in it are followed.
#[cfg(all(feature = "file", unix))]
fn planted(dir: &Path, at: &Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = std::fs::metadata(dir)?;
    let shared = dir.mode() & 0o1000 != 0 && dir.mode() & 0o022 != 0;
    let me = rustix::process::geteuid().as_raw();
    if shared && meta.uid() != me && meta.uid() != dir.uid() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is another user's, in a directory anyone may write to; nothing was \
                 written",
                at.display()
            ),
        ));
    }
    Ok(())
}

/// Whether a write may rename a new file to where [`target`] found `meta`: where a
/// regular file is, or nothing. Anything else there is refused, not replaced: a
/// device (`/dev/null` given as a destination by a process that runs as root would
/// become a file of keys), a FIFO, a socket or a directory.
#[cfg(feature = "file")]
fn only_a_file(meta: Option<&std::fs::Metadata>) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    match meta {
        None => Ok(()),
        Some(meta) if meta.is_file() => Ok(()),
        Some(meta) if meta.is_dir() => Err(Error::new(
            ErrorKind::IsADirectory,
            "it is a directory; nothing was written",
        )),
        Some(_) => Err(Error::new(
            ErrorKind::InvalidInput,
            "it is not a regular file (a device, FIFO or socket) and is not replaced by \
             one; nothing was written",
        )),
    }
}

/// A new file beside `path` holding `bytes`, as [`staged_like`] makes it, with the
/// permissions, owner and group of the file at `path` now.
#[cfg(all(test, feature = "admin"))]
pub(crate) fn staged(path: &Path, bytes: &[u8]) -> std::io::Result<tempfile::NamedTempFile> {
    staged_like(path, std::fs::metadata(path).ok().as_ref(), bytes)
}

/// How a staged file's name begins and ends (`.tower-api-key-XXXXXX.tmp`).
#[cfg(feature = "file")]
const STAGED_PREFIX: &str = ".tower-api-key-";
#[cfg(feature = "file")]
const STAGED_SUFFIX: &str = ".tmp";

/// How old a staged file is before a write in its directory takes it for one a
/// killed writer left behind (`kill -9`, a power cut): no write stages a file for
/// this long.
#[cfg(feature = "file")]
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the staged files a killed writer left in `dir` (they hold digests, never
/// secrets, but pile up): regular files named as [`staged_like`] names them and not
/// modified for [`STALE_AFTER`]. At most once per [`STALE_AFTER`] per directory in a
/// process, through at most 100,000 names and 1,000 staged files; best effort,
/// silent.
#[cfg(feature = "file")]
fn sweep_stale(dir: &Path) {
    use std::{
        collections::HashMap,
        sync::{Mutex, PoisonError},
        time::{Instant, SystemTime},
    };
    static SWEPT: Mutex<Option<HashMap<std::path::PathBuf, Instant>>> = Mutex::new(None);
    {
        let mut swept = SWEPT.lock().unwrap_or_else(PoisonError::into_inner);
        let swept = swept.get_or_insert_with(HashMap::new);
        if swept.get(dir).is_some_and(|at| at.elapsed() < STALE_AFTER) {
            return;
        }
        if swept.len() >= 64 {
            swept.clear();
        }
        swept.insert(dir.to_owned(), Instant::now());
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    // In a directory anyone may write to that keeps names to their owners (`/tmp`),
    // only this process's user's files: run as root, another user's are theirs.
    #[cfg(unix)]
    let sticky = std::fs::metadata(dir)
        .is_ok_and(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o1000 != 0);
    let now = SystemTime::now();
    let mut looked = 0;
    for entry in entries.take(100_000).flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name
            .strip_prefix(STAGED_PREFIX)
            .and_then(|rest| rest.strip_suffix(STAGED_SUFFIX))
            .is_some_and(|middle| {
                !middle.is_empty() && middle.bytes().all(|b| b.is_ascii_alphanumeric())
            });
        if !ours {
            continue;
        }
        looked += 1;
        if looked > 1_000 {
            break;
        }
        // `file_type` does not follow a link: a link by that name is left alone.
        let Ok(meta) = entry.metadata() else { continue };
        #[cfg(unix)]
        if sticky
            && std::os::unix::fs::MetadataExt::uid(&meta) != rustix::process::geteuid().as_raw()
        {
            continue;
        }
        let stale = entry.file_type().is_ok_and(|t| t.is_file())
            && meta
                .modified()
                .is_ok_and(|at| now.duration_since(at).is_ok_and(|age| age > STALE_AFTER));
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A new file beside `path` holding `bytes`, created exclusively under a unique name,
/// readable by its owner only (or with the permissions, owner and group of `like`,
/// the file found at `path` when it was checked, as far as the process may give
/// them), written and synced: ready to be renamed over `path` or exchanged with it.
/// It is removed when dropped, unless persisted.
#[cfg(feature = "file")]
pub(crate) fn staged_like(
    path: &Path,
    like: Option<&std::fs::Metadata>,
    bytes: &[u8],
) -> std::io::Result<tempfile::NamedTempFile> {
    sweep_stale(dir_of(path));
    let mut file = tempfile::Builder::new()
        .prefix(STAGED_PREFIX)
        .suffix(STAGED_SUFFIX)
        .tempfile_in(dir_of(path))?;
    if let Some(meta) = like {
        // Owner first: a change of owner may clear mode bits.
        #[cfg(unix)]
        keep_owner(file.as_file(), meta)?;
        file.as_file().set_permissions(meta.permissions())?;
    }
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    Ok(file)
}

/// Gives `file` the owner and group `old` has, where the process may: root may give
/// both, an owner may give a group they belong to, anyone else keeps their own (the
/// file system refusing is not a reason to fail the write).
#[cfg(all(feature = "file", unix))]
fn keep_owner(file: &std::fs::File, old: &std::fs::Metadata) -> std::io::Result<()> {
    use std::{io::ErrorKind, os::unix::fs::MetadataExt as _};
    let new = file.metadata()?;
    if (new.uid(), new.gid()) == (old.uid(), old.gid()) {
        return Ok(());
    }
    let ignored = |e: &std::io::Error| {
        matches!(
            e.kind(),
            ErrorKind::PermissionDenied | ErrorKind::InvalidInput | ErrorKind::Unsupported
        )
    };
    match std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid())) {
        Ok(()) => Ok(()),
        Err(e) if ignored(&e) => match std::os::unix::fs::fchown(file, None, Some(old.gid())) {
            Err(e) if !ignored(&e) => Err(e),
            _ => Ok(()),
        },
        Err(e) => Err(e),
    }
}

/// Syncs the directory of `path`, so that a rename in it survives a crash.
#[cfg(feature = "file")]
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) fn sync_dir(path: &Path) -> std::io::Result<()> {
    sync(open_dir(path)?)
}

/// The directory of `path`, opened to be synced (`None` where a directory cannot be).
#[cfg(feature = "file")]
fn open_dir(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    #[cfg(unix)]
    return std::fs::File::open(dir_of(path)).map(Some);
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(None)
    }
}

#[cfg(feature = "file")]
fn sync(dir: Option<std::fs::File>) -> std::io::Result<()> {
    dir.map_or(Ok(()), |dir| dir.sync_all())
}

#[cfg(feature = "file")]
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Swaps the files at `a` and `b` in one step (`renameat2` with `RENAME_EXCHANGE`):
/// each name then holds what the other held, and no reader ever finds either name
/// missing. `Ok(false)` where the platform or the file system cannot (then nothing
/// changed).
///
/// # Errors
///
/// The exchange failed for another reason (one of the names is missing, say);
/// nothing changed.
#[cfg(feature = "file")]
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::{
            fs::{CWD, RenameFlags, renameat_with},
            io::Errno,
        };
        match renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
            Ok(()) => Ok(true),
            Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

#[cfg(all(test, feature = "file"))]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;

    use std::time::Duration;

    use super::*;
    use crate::{
        KeySet,
        limit::{IpNet, Quota, QuotaPeriod, RateLimit},
    };

    fn read_back(text: &str) -> KeySet {
        crate::source::key_file::parse(Path::new("keys.toml"), text.as_bytes())
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn ids_with_quotes_backslashes_and_accents_round_trip() {
        for id in ["o'brien", "clé", r#"say"hi""#, r"back\slash", "日本"] {
            let owner = format!("{id}\twith a tab");
            let key = ApiKey::new(id, "s3cr3t")
                .with_owner(owner.as_str())
                .with_scopes([id]);
            let set = read_back(&entry(&key));
            let back = set.get(id).expect("the same id");
            assert!(back.digest == key.digest);
            assert_eq!(back.owner(), Some(owner.as_str()));
            assert_eq!(back.scopes().collect::<Vec<_>>(), [id]);
        }
    }

    #[test]
    fn every_field_round_trips_and_no_secret_is_written() {
        let at = clock::from_unix_ms(1_796_083_200_250);
        let key = ApiKey::new("k", "the-secret")
            .with_scopes(["read", "write"])
            .with_tenant("t")
            .with_owner("o")
            .with_description("d")
            .with_not_before(at)
            .with_expires_at(clock::from_unix_ms(1_796_083_201_000))
            .with_disabled(true)
            .with_created_at(at)
            .with_created_by("root")
            .with_rotated_from("old")
            .with_rate_limit(RateLimit::new("burst", 100, Duration::from_secs(1)))
            .with_rate_limit(RateLimit::new(
                "daily",
                100_000,
                Duration::from_secs(86_400),
            ))
            .with_quota(Quota::new(1_000_000, QuotaPeriod::Month))
            .with_allowed_ips([
                "203.0.113.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ]);
        let text = entry(&key);
        assert!(
            text.contains(r#"rate_limits = [{ name = "burst", requests = 100, per = "1s" }, { name = "daily", requests = 100000, per = "1d" }]"#)
                && text.contains(r#"quota = { requests = 1000000, per = "month" }"#)
                && text.contains(r#"allowed_ips = ["203.0.113.0/24", "2001:db8::/32"]"#),
            "{text}"
        );
        assert!(!text.contains("the-secret"), "{text}");
        let back = read_back(&text);
        assert_eq!(file(back.iter()), file([&key]));
    }

    #[test]
    fn the_generator_s_entry_reads_back() {
        let generated = crate::generate("tak").unwrap();
        for id in ["o'brien", "clé"] {
            let set = read_back(&generated.toml_entry(id).unwrap());
            assert!(set.get(id).unwrap().digest == generated.to_api_key(id).digest);
        }
        // An id the file would refuse gets no entry.
        for id in ["", "a\tb", "a b", "new\nline", &"x".repeat(257)] {
            let err = generated.toml_entry(id).unwrap_err();
            assert!(matches!(err, crate::Error::InvalidKey { .. }), "{err}");
            assert!(!err.to_string().contains(generated.secret()));
        }
    }

    /// A generated entry appended (`>>`) to a file whose last line has no newline
    /// starts a line of its own.
    #[test]
    fn a_generated_entry_appended_to_a_file_without_a_last_newline_reads() {
        let generated = crate::generate("tak").unwrap();
        let mut text = "[[keys]]\nid = \"a\"\nsecret = \"x\"".to_owned();
        text.push_str(&generated.toml_entry("b").unwrap());
        let set = read_back(&text);
        assert!(set.get("b").unwrap().digest == generated.to_api_key("b").digest);
        assert!(set.get("a").is_some());
    }

    #[test]
    fn a_written_file_is_its_owner_s_alone_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let set = KeySet::from_keys([ApiKey::new("a", "ka")]).unwrap();
        set.write_file(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        KeySet::new().write_file(&path).unwrap();
        assert!(read_back(&std::fs::read_to_string(&path).unwrap()).is_empty());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }

    /// A key file kept behind a symlink is written through: the link stays, the
    /// file it names is replaced in its own directory.
    #[cfg(unix)]
    #[test]
    fn a_symlinked_file_is_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let (links, data) = (dir.path().join("links"), dir.path().join("data"));
        std::fs::create_dir(&links).unwrap();
        std::fs::create_dir(&data).unwrap();
        let real = data.join("keys.toml");
        std::fs::write(&real, "keys = []\n").unwrap();
        let link = links.join("keys.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let set = KeySet::from_keys([ApiKey::new("a", "ka")]).unwrap();
        set.write_file(&link).unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            read_back(&std::fs::read_to_string(&real).unwrap())
                .get("a")
                .is_some()
        );
        assert_eq!(std::fs::read_dir(&links).unwrap().count(), 1);
        assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1);
    }

    /// Only a regular file is replaced: a directory, a FIFO, a socket or a link to
    /// nothing at the destination stays what it was, and the error says what it is.
    #[cfg(unix)]
    #[test]
    fn what_is_not_a_regular_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let set = KeySet::from_keys([ApiKey::new("a", "ka")]).unwrap();
        let directory = dir.path().join("directory");
        std::fs::create_dir(&directory).unwrap();
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere/keys.toml"), &dangling).unwrap();
        let looped = dir.path().join("looped");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let to_directory = dir.path().join("to-directory");
        std::os::unix::fs::symlink(&directory, &to_directory).unwrap();
        let slash = dir.path().join("nothere/");
        let file = dir.path().join("file.toml");
        std::fs::write(&file, "").unwrap();
        let file_dot = std::path::PathBuf::from(format!("{}/.", file.display()));
        let to_file_slash = dir.path().join("to-file-slash");
        std::os::unix::fs::symlink(format!("{}/", file.display()), &to_file_slash).unwrap();
        let mut cases = vec![
            (&slash, "names a directory"),
            (&file_dot, "names a directory"),
            (&to_file_slash, "names a directory"),
            (&directory, "directory"),
            (&to_directory, "directory"),
            (&socket, "not a regular file"),
            (&dangling, "does not exist"),
            (&looped, "more than 40"),
        ];
        if made.is_ok_and(|s| s.success()) {
            cases.push((&fifo, "not a regular file"));
        }
        let kind = |p: &Path| std::fs::symlink_metadata(p).ok().map(|m| m.file_type());
        for (path, says) in cases {
            let before = kind(path);
            let err = set.write_file(path).unwrap_err();
            assert!(matches!(err, crate::Error::Write { .. }), "{err:?}");
            assert_eq!(err.to_string(), format!("cannot write {}", path.display()));
            let err = std::error::Error::source(&err).unwrap().to_string();
            assert!(err.contains(says), "{}: {err}", path.display());
            assert!(err.contains("nothing was written"), "{err}");
            assert_eq!(kind(path), before, "{}", path.display());
        }
        assert!(!dir.path().join("nowhere").exists());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        let made = 7 + usize::from(std::fs::symlink_metadata(&fifo).is_ok());
        assert_eq!(left.len(), made, "no temporary file left behind: {left:?}");
    }

    /// `/dev/stdout`, `/dev/stderr` and `/proc/self/fd/N` lead to whatever a process
    /// has open there: a log its output is appended to would be replaced whole.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_process_s_open_file_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        std::fs::write(&log, "line 1\n").unwrap();
        let open = std::fs::File::open(&log).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&open);
        let set = KeySet::from_keys([ApiKey::new("a", "ka")]).unwrap();
        let through_dev = dir.path().join("stdout");
        std::os::unix::fs::symlink(format!("/proc/self/fd/{fd}"), &through_dev).unwrap();
        // `/proc` as a directory on the way, however it is spelled or reached.
        let proc_link = dir.path().join("p");
        std::os::unix::fs::symlink("/proc", &proc_link).unwrap();
        let paths = [
            format!("/proc/self/fd/{fd}"),
            format!("/dev/fd/{fd}"),
            format!("/dev/../proc/self/fd/{fd}"),
            format!("{}/self/fd/{fd}", proc_link.display()),
            through_dev.display().to_string(),
        ];
        for path in paths.iter().map(Path::new) {
            let err = set.write_file(path).unwrap_err();
            let err = std::error::Error::source(&err).unwrap().to_string();
            assert!(err.contains("/proc"), "{}: {err}", path.display());
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "line 1\n");
    }

    /// A staged file a killed writer left an hour ago or more is removed by the next
    /// write in its directory; one just made (another writer's, in flight), a link by
    /// such a name, and other names are left alone.
    #[test]
    fn a_write_removes_the_staged_files_a_killed_writer_left() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        let make = |name: &str, at: Option<std::time::SystemTime>| {
            let path = dir.path().join(name);
            let file = std::fs::File::create(&path).unwrap();
            if let Some(at) = at {
                file.set_modified(at).unwrap();
            }
            path
        };
        let left = make(".tower-api-key-a1B2c3.tmp", Some(old));
        let in_flight = make(".tower-api-key-d4E5f6.tmp", None);
        let other = make(".tower-api-key-a1B2c3.tmp.bak", Some(old));
        let mine = make("notes.tmp", Some(old));
        let target = make("elsewhere", Some(old));
        let link = dir.path().join(".tower-api-key-g7H8i9.tmp");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let set = KeySet::from_keys([ApiKey::new("a", "ka")]).unwrap();
        set.write_file(dir.path().join("keys.toml")).unwrap();
        assert!(!left.exists(), "the killed writer's file stays");
        for kept in [&in_flight, &other, &mine, &target] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        #[cfg(unix)]
        assert!(link.symlink_metadata().is_ok(), "the link was removed");
    }

    /// In a directory anyone may write to that keeps names to their owners (`/tmp`),
    /// a link or file another user left there is neither followed nor replaced: run
    /// as root, a link planted at the name a backup is written to would choose which
    /// file is replaced, and a file planted there would give the keys its owner and
    /// permissions. Our own link there is followed.
    #[cfg(unix)]
    #[test]
    fn what_another_user_left_in_a_shared_directory_is_not_followed_or_replaced() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let root = tempfile::tempdir().unwrap();
        let shared = root.path().join("shared");
        let private = root.path().join("private");
        std::fs::create_dir(&shared).unwrap();
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let victim = private.join("passwd");
        std::fs::write(&victim, "important\n").unwrap();
        let set = KeySet::from_keys([ApiKey::new("a", "ka")]).unwrap();

        // Ours: followed, the link kept.
        let ours = shared.join("ours.toml");
        std::os::unix::fs::symlink(&victim, &ours).unwrap();
        set.write_file(&ours).unwrap();
        assert!(
            read_back(&std::fs::read_to_string(&victim).unwrap())
                .get("a")
                .is_some()
        );
        std::fs::write(&victim, "important\n").unwrap();

        // Another user's: only root can make one here (`lchown`).
        if rustix::process::geteuid().as_raw() != 0 {
            eprintln!("not root: another user's link and file cannot be made; skipped");
            return;
        }
        let nobody = Some(65_534);
        let link = shared.join("keys.toml");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        std::os::unix::fs::lchown(&link, nobody, nobody).unwrap();
        let planted = shared.join("backup.toml");
        std::fs::write(&planted, "attacker's\n").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::os::unix::fs::chown(&planted, nobody, nobody).unwrap();
        // Theirs on the way, not only at the end: a link planted as a directory.
        let as_directory = shared.join("backup");
        std::os::unix::fs::symlink(&private, &as_directory).unwrap();
        std::os::unix::fs::lchown(&as_directory, nobody, nobody).unwrap();
        for path in [link.clone(), planted.clone(), as_directory.join("passwd")] {
            let err = set.write_file(&path).unwrap_err();
            let err = std::error::Error::source(&err).unwrap().to_string();
            assert!(err.contains("another user's"), "{}: {err}", path.display());
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "important\n");
        assert_eq!(std::fs::read_to_string(&planted).unwrap(), "attacker's\n");
        assert_eq!(std::fs::metadata(&planted).unwrap().uid(), 65_534);
        // A directory of theirs in it is theirs to fill: root writes a new file there
        // (as a test's server run as another user has its files written).
        let theirs = shared.join("bk");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, nobody, nobody).unwrap();
        set.write_file(theirs.join("keys.toml")).unwrap();
        // Outside such a directory, root replaces whoever's file it is told to.
        let elsewhere = private.join("theirs.toml");
        std::fs::write(&elsewhere, "").unwrap();
        std::os::unix::fs::chown(&elsewhere, nobody, nobody).unwrap();
        set.write_file(&elsewhere).unwrap();
        assert!(
            read_back(&std::fs::read_to_string(&elsewhere).unwrap())
                .get("a")
                .is_some()
        );
    }

    #[test]
    fn an_empty_file_says_no_keys() {
        assert!(read_back(&file([])).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        /// Any id and metadata the crate accepts is read back as written.
        #[test]
        fn what_the_crate_accepts_round_trips(id in "\\PC{1,24}", owner in "\\PC{0,24}") {
            let key = ApiKey::new(id.as_str(), "s3cr3t").with_owner(owner.as_str());
            prop_assume!(KeySet::from_keys([key.clone()]).is_ok());
            let set = read_back(&file([&key]));
            let back = set.get(&id).expect("the same id");
            prop_assert_eq!(back.owner(), Some(owner.as_str()));
            prop_assert!(back.digest == key.digest);
        }

        /// Any limits the crate accepts are read back as written.
        #[test]
        fn limits_round_trip(
            rates in proptest::collection::vec(("[a-z0-9_.-]{1,12}", 1u64..1_000_000_000, 1u64..86_400), 0..4),
            quota in proptest::option::of((1u64..(1 << 40), any::<bool>())),
            nets in proptest::option::of(proptest::collection::vec((any::<u32>(), 0u8..=32, any::<u128>(), 0u8..=128, any::<bool>()), 1..4)),
        ) {
            let mut key = ApiKey::new("k", "s3cr3t");
            for (name, requests, secs) in rates {
                key = key.with_rate_limit(RateLimit::new(name.as_str(), requests, Duration::from_secs(secs)));
            }
            if let Some((requests, monthly)) = quota {
                let period = if monthly { QuotaPeriod::Month } else { QuotaPeriod::Day };
                key = key.with_quota(Quota::new(requests, period));
            }
            if let Some(nets) = nets {
                key = key.with_allowed_ips(nets.into_iter().map(|(v4, p4, v6, p6, six)| {
                    let (addr, prefix) = match six {
                        false => (std::net::IpAddr::from(std::net::Ipv4Addr::from(v4 & u32::MAX.checked_shl(32 - u32::from(p4)).unwrap_or(0))), p4),
                        true => (std::net::IpAddr::from(std::net::Ipv6Addr::from(v6 & u128::MAX.checked_shl(128 - u32::from(p6)).unwrap_or(0))), p6),
                    };
                    IpNet::new(addr, prefix).unwrap()
                }));
            }
            prop_assume!(KeySet::from_keys([key.clone()]).is_ok());
            let set = read_back(&file([&key]));
            let back = set.get("k").expect("the same id");
            prop_assert_eq!(back.rate_limits(), key.rate_limits());
            prop_assert_eq!(back.quota(), key.quota());
            prop_assert_eq!(back.allowed_ips(), key.allowed_ips());
        }
    }
}
