//! The file watcher shared by file-backed sources: a thread that waits for change
//! events (debounced) or a poll tick, re-reads the file, and publishes it if its
//! content changed.

use std::{
    io,
    path::{Path, PathBuf},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};

use super::read::{FileBytes, Fingerprint};
use crate::{Error, KeySet, KeyUpdater};

#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    pub(crate) poll: Duration,
    pub(crate) debounce: Duration,
    pub(crate) events: bool,
    /// The largest file read, in bytes.
    pub(crate) max_size: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(5),
            debounce: Duration::from_millis(20),
            events: true,
            max_size: super::read::DEFAULT_MAX_SIZE,
        }
    }
}

pub(crate) type Parser = Box<dyn Fn(&Path, &[u8]) -> Result<KeySet, Error> + Send>;

/// Watches `path` from a new thread until the store is dropped. `loaded` is the hash of
/// the content already loaded, if any.
pub(crate) fn spawn_with(
    path: PathBuf,
    options: Options,
    parse: Parser,
    updater: KeyUpdater,
    loaded: Option<Fingerprint>,
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

struct Watch {
    path: PathBuf,
    options: Options,
    parse: Parser,
    updater: KeyUpdater,
    /// Hash of the content last attempted (applied or refused): unchanged content is
    /// not parsed again.
    last_seen: Option<Fingerprint>,
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
        let bytes = match FileBytes::read(&self.path, self.options.max_size) {
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
        let hash = bytes.fingerprint();
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
