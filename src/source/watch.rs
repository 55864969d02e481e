//! The file watcher shared by file-backed sources: a thread that waits for change
//! events (debounced) or a poll tick, re-reads the file, and publishes it if its
//! content changed.

use std::{
    io::{self, Read as _},
    path::{Path, PathBuf},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroize as _;

use crate::{Error, KeySet, KeyUpdater, background::Pacer};

#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    pub(crate) poll: Duration,
    pub(crate) debounce: Duration,
    pub(crate) events: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(5),
            debounce: Duration::from_millis(20),
            events: true,
        }
    }
}

pub(crate) type Parser = Box<dyn Fn(&Path, &[u8]) -> Result<KeySet, Error> + Send>;

/// The SHA-256 of a file's content, taken a slice at a time so that a background
/// thread can pause in between (a 100 MB file takes tens of milliseconds).
pub(crate) fn content_hash(bytes: &[u8]) -> [u8; 32] {
    let mut pacer = Pacer::new();
    let mut hasher = Sha256::new();
    for chunk in bytes.chunks(CHUNK) {
        hasher.update(chunk);
        pacer.pause();
    }
    hasher.finalize().into()
}

/// How much of a file is read, hashed or wiped between two looks at the [`Pacer`].
const CHUNK: usize = 256 * 1024;

/// A file's content, wiped when dropped: it may hold secrets.
pub(crate) struct FileBytes(Vec<u8>);

impl FileBytes {
    /// Reads the file at `path` a slice at a time (pausing in between on a
    /// background thread), into a buffer sized from its metadata, so that no
    /// partial copy is left unwiped by a reallocation unless the file grows while
    /// it is read.
    pub(crate) fn read(path: &Path) -> io::Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let size = file
            .metadata()
            .ok()
            .and_then(|m| usize::try_from(m.len()).ok())
            .unwrap_or(0);
        let mut bytes = Self(Vec::with_capacity(size.saturating_add(1)));
        let mut pacer = Pacer::new();
        loop {
            let chunk = u64::try_from(CHUNK).unwrap_or(u64::MAX);
            if (&mut file).take(chunk).read_to_end(&mut bytes.0)? == 0 {
                return Ok(bytes);
            }
            pacer.pause();
        }
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for FileBytes {
    fn drop(&mut self) {
        let mut pacer = Pacer::new();
        for chunk in self.0.chunks_mut(CHUNK) {
            chunk.zeroize();
            pacer.pause();
        }
    }
}

/// Watches `path` from a new thread until the store is dropped. `loaded` is the hash of
/// the content already loaded, if any.
pub(crate) fn spawn_with(
    path: PathBuf,
    options: Options,
    parse: Parser,
    updater: KeyUpdater,
    loaded: Option<[u8; 32]>,
) {
    let name = updater.source_name().to_owned();
    let (tx, rx) = mpsc::channel();
    let mut watch = Watch {
        path,
        options,
        parse,
        updater,
        last_seen: loaded,
        last_error: None,
        tx,
    };
    // Watch before returning, so that a change made right after the source is added
    // is not missed.
    let watcher = options.events.then(|| watch.watcher()).flatten();
    let closed = watch.tx.clone();
    watch.updater.on_close(move || {
        let _ = closed.send(Signal::Closed);
    });
    let spawned = thread::Builder::new()
        .name("tower-api-key-watch".into())
        .spawn(move || {
            crate::background::enter();
            watch.run(&rx, watcher);
        });
    if let Err(error) = spawned {
        let error = Error::Source {
            source: name,
            message: format!("cannot start the file watcher thread: {error}"),
        };
        #[cfg(feature = "tracing")]
        tracing::error!(target: "tower_api_key::reload", %error, "keys will not be reloaded");
        #[cfg(not(feature = "tracing"))]
        let _ = error;
    }
}

/// Watches `path` with default settings; for sources with no content loaded yet.
pub(crate) fn spawn(path: PathBuf, options: Options, parse: Parser, updater: KeyUpdater) {
    let loaded = FileBytes::read(&path).ok().map(|b| content_hash(&b));
    spawn_with(path, options, parse, updater, loaded);
}

struct Watch {
    path: PathBuf,
    options: Options,
    parse: Parser,
    updater: KeyUpdater,
    /// Hash of the content last attempted (applied or refused): unchanged content is
    /// not parsed again.
    last_seen: Option<[u8; 32]>,
    /// The last read error reported, so a missing file is reported once, not per poll.
    last_error: Option<io::ErrorKind>,
    /// Where the file-system watcher sends its signals.
    tx: mpsc::Sender<Signal>,
}

enum Signal {
    Changed,
    WatcherFailed,
    /// The store is gone.
    Closed,
}

impl Watch {
    fn run(&mut self, rx: &mpsc::Receiver<Signal>, mut watcher: Option<RecommendedWatcher>) {
        loop {
            let signal = match rx.recv_timeout(self.options.poll) {
                Ok(signal) => Some(self.settle(rx, signal)),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
            };
            if matches!(signal, Some(Signal::Closed)) || self.updater.is_closed() {
                return;
            }
            // A failed watcher (or one that could not start, say because the directory
            // did not exist yet) is rebuilt; meanwhile the poll keeps us going.
            if self.options.events
                && (watcher.is_none() || matches!(signal, Some(Signal::WatcherFailed)))
            {
                watcher = self.watcher();
            }
            self.check();
        }
    }

    /// Waits until events stop arriving for the debounce period (at most ten periods).
    fn settle(&self, rx: &mpsc::Receiver<Signal>, first: Signal) -> Signal {
        if matches!(first, Signal::Closed) {
            return first;
        }
        let deadline = Instant::now() + self.options.debounce * 10;
        let mut signal = first;
        while let Ok(next) = rx.recv_timeout(self.options.debounce) {
            if matches!(next, Signal::Closed) {
                return next;
            }
            if matches!(next, Signal::WatcherFailed) {
                signal = next;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        signal
    }

    /// Watches the file's directory: renames over the file, Kubernetes `..data` swaps
    /// and delete-then-create all show up there, where a watch on the file would be
    /// lost with the old inode.
    fn watcher(&self) -> Option<RecommendedWatcher> {
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let file_name = self.path.file_name().map(ToOwned::to_owned);
        let tx = self.tx.clone();
        let handler = move |event: notify::Result<notify::Event>| {
            let signal = match event {
                Ok(event) => {
                    let relevant = event.need_rescan()
                        || event.paths.is_empty()
                        || matches!(event.kind, EventKind::Other)
                        || event.paths.iter().any(|p| {
                            let name = p.file_name();
                            name == file_name.as_deref() || name == Some("..data".as_ref())
                        });
                    if !relevant || matches!(event.kind, EventKind::Access(_)) {
                        return;
                    }
                    Signal::Changed
                }
                Err(_) => Signal::WatcherFailed,
            };
            let _ = tx.send(signal);
        };
        let mut watcher = notify::recommended_watcher(handler).ok()?;
        watcher.watch(&dir, RecursiveMode::NonRecursive).ok()?;
        Some(watcher)
    }

    /// Re-reads the file and publishes it if its content changed.
    fn check(&mut self) {
        let bytes = match FileBytes::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) => {
                if self.last_error != Some(error.kind()) {
                    self.last_error = Some(error.kind());
                    // Once it returns, the file is applied again even if unchanged, so
                    // the recovery shows up as a reload.
                    self.last_seen = None;
                    self.updater.reject(Error::io(&self.path, error));
                }
                return;
            }
        };
        self.last_error = None;
        if bytes.is_empty() {
            // A write in progress (truncate, then write): wait for the content.
            return;
        }
        let hash = content_hash(&bytes);
        if self.last_seen == Some(hash) {
            return;
        }
        self.last_seen = Some(hash);
        match (self.parse)(&self.path, &bytes) {
            // A refused publish (a conflict with another source) is recorded by the
            // store itself.
            Ok(set) => drop(self.updater.publish(set)),
            Err(error) => drop(self.updater.reject(error)),
        }
    }
}
