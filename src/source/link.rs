//! What the watchers and the writers of one key file share in a process: a gate and
//! what each watching store holds.
//!
//! A [`FileSource`](crate::FileSource) watching a path and a key-management
//! `FileBackend` writing it meet here, found by the path (its directory made canonical,
//! and the file name). The link holds:
//!
//! - **a gate**: a watcher holds it while it reads the file and publishes what it
//!   read; a writer holds it while it reads, writes and applies. So a watcher never
//!   publishes a read older than a file a writer has already applied. On Linux the
//!   gate also takes an advisory lock (`flock`) on the file's directory, shared for a
//!   watcher and exclusive for a writer, so that writers and watchers in other
//!   processes on the same machine meet at the same gate;
//! - **the watchers' updaters**, so that a writer applies the file it wrote to every
//!   store of the process watching it before it answers;
//! - **what each watching store holds** (the content's fingerprint and the file's
//!   stamp), so that a watcher need not read again, or parse again, a file it was
//!   handed;
//! - **whether a write in place is open** (a writer opened the file and has not
//!   closed it), as the watcher's file events tell it: a writer does not take a
//!   half-written file for the current one.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak},
    time::{Duration, Instant},
};

use super::read::{Fingerprint, Stamp};
use crate::KeyUpdater;

/// The link of one key file.
pub(crate) struct Link {
    path: PathBuf,
    /// Registered in the process-wide table: shared by every source and writer of
    /// the path. A private link (a source of another format) locks nothing else.
    shared: bool,
    gate: Mutex<State>,
    /// A write in place the watchers heard: when they last heard of it, whether it
    /// has written anything, and how long the watchers wait for such a write.
    open_write: Mutex<Option<(Instant, bool, Duration)>>,
}

/// What the gate guards.
#[derive(Default)]
pub(crate) struct State {
    next: u64,
    watchers: Vec<Watcher>,
}

/// A watching store, as the link knows it.
pub(crate) struct Watcher {
    id: u64,
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) updater: Arc<KeyUpdater>,
    /// The content its store was last handed (applied, or refused), if any.
    pub(crate) seen: Option<Seen>,
}

/// Content a store was handed: its fingerprint, and the file's stamp when it was
/// read or written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) fingerprint: Fingerprint,
    /// The file's stamp, if it proves anything (see [`Stamp::racy`]).
    pub(crate) stamp: Option<Stamp>,
    /// The file (device and inode) the content was in: new content in the same
    /// file was written in place.
    pub(crate) file: Option<(u64, u64)>,
}

/// The gate, held: the state, and the lock on the directory.
pub(crate) struct Gate<'a> {
    state: MutexGuard<'a, State>,
    #[cfg(any(target_os = "linux", target_os = "android"))]
    _dir: Option<std::fs::File>,
}

/// How long a writer waits for the directory lock another process holds.
const WRITER_PATIENCE: Duration = Duration::from_secs(5);
/// How long a watcher waits for it before it reads without it.
const WATCHER_PATIENCE: Duration = Duration::from_secs(1);
/// How long an open write in place that has written nothing yet (a name created, a
/// file truncated) is believed without news.
const OPEN_WRITE_TRUST: Duration = Duration::from_secs(2);

/// How long a write in place may stay open with nothing more written before the
/// file is taken as it is. Only where writers' closes are reported (inotify):
/// elsewhere no write is ever seen closed, and every one would wait this long.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) const WRITE_PATIENCE: Duration = Duration::from_secs(30);
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) const WRITE_PATIENCE: Duration = Duration::from_secs(2);

type Table = Mutex<HashMap<PathBuf, Weak<Link>>>;

fn table() -> &'static Table {
    static LINKS: OnceLock<Table> = OnceLock::new();
    LINKS.get_or_init(Table::default)
}

/// The name the link of `path` is found by: its directory made canonical (so that
/// `keys.toml` and `./keys.toml` meet), and the file name.
pub(crate) fn canonical(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
    }
}

impl Link {
    /// The link of the key file at `path`, shared by everyone in the process who asks
    /// for the same file.
    pub(crate) fn of(path: &Path) -> Arc<Self> {
        let key = canonical(path);
        let mut links = table().lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(link) = links.get(&key).and_then(Weak::upgrade) {
            return link;
        }
        links.retain(|_, link| link.strong_count() > 0);
        let link = Arc::new(Self::new(key.clone(), true));
        links.insert(key, Arc::downgrade(&link));
        link
    }

    /// A link no one else shares: for a watcher of a file that is not a key file.
    pub(crate) fn private(path: &Path) -> Arc<Self> {
        Arc::new(Self::new(path.to_owned(), false))
    }

    fn new(path: PathBuf, shared: bool) -> Self {
        Self {
            path,
            shared,
            gate: Mutex::new(State::default()),
            open_write: Mutex::new(None),
        }
    }

    /// Takes the gate as a watcher: other readers in other processes may hold the
    /// directory lock too. Waits at most a second for another process's writer, then
    /// goes ahead without the lock.
    pub(crate) fn read_gate(&self) -> Gate<'_> {
        let state = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        Gate {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            _dir: self.lock_dir(false).ok().flatten(),
            state,
        }
    }

    /// Takes the gate as a writer: alone in the process, and (on Linux) alone among
    /// the processes that use this crate on the same directory.
    ///
    /// # Errors
    ///
    /// Another process held the directory lock for five seconds.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn write_gate(&self) -> std::io::Result<Gate<'_>> {
        let state = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(Gate {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            _dir: self.lock_dir(true)?,
            state,
        })
    }

    /// Locks the file's directory (`flock`), shared or exclusive, waiting a bounded
    /// time. `Ok(None)` where locks are not supported, or for a private link.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn lock_dir(&self, exclusive: bool) -> std::io::Result<Option<std::fs::File>> {
        use rustix::fs::{FlockOperation, flock};
        if !self.shared {
            return Ok(None);
        }
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let Ok(file) = std::fs::File::open(dir) else {
            return Ok(None);
        };
        let (operation, patience) = match exclusive {
            true => (FlockOperation::NonBlockingLockExclusive, WRITER_PATIENCE),
            false => (FlockOperation::NonBlockingLockShared, WATCHER_PATIENCE),
        };
        let start = Instant::now();
        loop {
            match flock(&file, operation) {
                Ok(()) => return Ok(Some(file)),
                Err(rustix::io::Errno::WOULDBLOCK | rustix::io::Errno::INTR) => {}
                // A file system without locks: nothing to meet at.
                Err(_) => return Ok(None),
            }
            if start.elapsed() >= patience {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "another process holds the key file's directory lock",
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Registers a watching store; it is forgotten when the returned handle drops.
    pub(crate) fn join(self: &Arc<Self>, updater: Arc<KeyUpdater>, seen: Option<Seen>) -> Member {
        let mut state = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        state.next += 1;
        let id = state.next;
        state.watchers.push(Watcher { id, updater, seen });
        Member {
            link: self.clone(),
            id,
        }
    }

    /// Notes that a writer opened the file in place and may still be writing
    /// (`Some`: whether it wrote data), or that it closed it or the file was replaced
    /// whole (`None`). Each note is news: the write is believed open for a while
    /// after the last one. `patience` is how long the noting watcher waits for a
    /// write that wrote data (its poll interval, if longer than [`WRITE_PATIENCE`]).
    pub(crate) fn note_open_write(&self, open: Option<bool>, patience: Duration) {
        let mut slot = self
            .open_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *slot = open.map(|data| {
            let (wrote, longest) = slot.map_or((false, patience), |(_, wrote, longest)| {
                (wrote, longest.max(patience))
            });
            (Instant::now(), data || wrote, longest)
        });
    }

    /// Whether the watchers' file events say a write in place is open: as long after
    /// the last data it wrote as the watcher waits for it, or two seconds after a
    /// write that has written nothing.
    pub(crate) fn write_open(&self) -> bool {
        self.open_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|(news, wrote, patience)| {
                news.elapsed()
                    < match wrote {
                        true => patience,
                        false => OPEN_WRITE_TRUST,
                    }
            })
    }
}

impl Gate<'_> {
    /// The watching stores.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn watchers(&mut self) -> &mut [Watcher] {
        &mut self.state.watchers
    }

    /// The watcher with this id.
    pub(crate) fn watcher(&mut self, id: u64) -> Option<&mut Watcher> {
        self.state.watchers.iter_mut().find(|w| w.id == id)
    }
}

/// A watcher's membership of a link.
pub(crate) struct Member {
    pub(crate) link: Arc<Link>,
    pub(crate) id: u64,
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut state = self
            .link
            .gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.watchers.retain(|w| w.id != self.id);
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}
