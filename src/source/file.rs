use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    key_file,
    link::{Link, Seen},
    read::FileBytes,
    watch::{self, Options},
};
use crate::{Error, KeySet, KeySource, KeyUpdater};

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
/// and renamed over (editors, `mv`), deleted and created again, Kubernetes
/// ConfigMap and Secret volumes (a symlink through `..data`, swapped atomically),
/// and a symlink to a file in another directory, edited there or repointed (that
/// directory is watched too).
/// A reload happens only when the content changed.
///
/// - A file that fails validation is not applied: the last good keys stay, the error
///   is logged at `warn` and readable from
///   [`KeyStore::last_reload`](crate::KeyStore::last_reload).
/// - An empty (zero-byte) file is a write in progress, and is ignored.
/// - A file written in place is read once its writer closes it, never while it is
///   still open: a writer that pauses mid-file must not have its prefix applied. One
///   that leaves it open with nothing more written for 30 s (or the poll interval,
///   if longer) is read as it is then; a writer that keeps writing is waited for.
///   That is on Linux, whose file events say when a writer closes; elsewhere a file
///   written in place is read once two reads agree after the poll interval (or 2 s).
///   A version renamed over the file, then opened for writing in place before its
///   events settled (the debounce, 20 ms by default, and the read), may never be
///   read on its own: the watcher waits for that writer's close and reads what it
///   left, the last good keys serving meanwhile.
/// - A file that disappears leaves the last good keys in place until it returns.
///
/// Watching runs on its own thread (no async runtime needed) and stops once the store
/// is dropped. The poll looks at the file's metadata (device, inode, size, times)
/// and reads the file only when they moved (and whole every 60th poll, as a last
/// net), so an unchanged million-key file costs a `stat` per poll, not a 90 MB read.
///
/// A key-management `FileBackend` (feature `admin`) writing the same path in the same
/// process applies each change it writes to this store directly, before it answers;
/// the watcher and the writer take turns at a gate, so the watcher never publishes a
/// read older than a change already applied.
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
    loaded: Option<Seen>,
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

    /// The largest key file read, in bytes (default 256 MiB, which fits a million
    /// keys). A larger file, or anything at the path that is not a regular file (a
    /// directory, a FIFO, a device), is refused with an error and the last good keys
    /// stay; reading never needs more memory than about this much.
    #[must_use]
    pub fn with_max_size(mut self, bytes: u64) -> Self {
        self.options.max_size = bytes;
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
        key_file::parse(path, content)
    }
}

impl KeySource for FileSource {
    fn name(&self) -> String {
        format!("file:{}", self.path.display())
    }

    fn load(&mut self) -> Result<KeySet, Error> {
        let bytes = FileBytes::read(&self.path, self.options.max_size)
            .map_err(|e| Error::io(&self.path, e))?;
        if bytes.is_empty() {
            return Err(Error::Parse {
                reason:
                    "the file is empty (a write in progress?); it must at least say `keys = []`"
                        .into(),
            }
            .in_file(&self.path, None));
        }
        self.loaded = Some(Seen {
            fingerprint: bytes.fingerprint(),
            stamp: bytes
                .stamp()
                .filter(|s| !s.racy(std::time::SystemTime::now())),
            file: bytes.stamp().and_then(|s| s.file()),
        });
        Self::parse(&self.path, &bytes)
    }

    fn watch(self: Box<Self>, updater: KeyUpdater) {
        // Writers of the same file in this process (the key-management API's
        // `FileBackend`) find this store through the link, and apply what they write
        // to it before they answer.
        let link = Link::of(&self.path);
        watch::spawn_linked(
            self.path,
            self.options,
            Box::new(|path: &Path, bytes: &[u8]| Self::parse(path, bytes)),
            updater,
            self.loaded,
            link,
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
            .field("max_size", &self.options.max_size)
            .finish()
    }
}
