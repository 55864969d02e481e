//! The file watcher shared by file-backed sources: a thread that waits for change
//! events (debounced) or a poll tick, re-reads the file, and publishes it if its
//! content changed.
//!
//! The poll is a safety net for file systems that send no events, and it must cost
//! next to nothing when nothing changed (a million-key file is ~90 MB): a poll looks
//! at the file's stamp (device, inode, size, modification and change times) and reads
//! the file only when the stamp differs from the one it read last. A stamp taken
//! within two seconds of the file's last modification is not trusted (a same-size
//! rewrite in the same clock tick would leave it unchanged), so the poll after such a
//! read reads once more. As a last net against a rewrite the stamp cannot show, the
//! file is read whole every 60th poll (every 5 minutes at the default interval):
//! rarely enough that a 90 MB file costs a fraction of a percent of one core, often
//! enough that such an edit is not missed for long.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, ModifyKind},
};

use super::{
    link::{Link, Member, Seen, WRITE_PATIENCE},
    read::{FileBytes, Fingerprint, Stamp, fingerprint_of_file},
};
use crate::{Error, KeySet, KeyUpdater};

/// Every how many polls the file is read whole even though its stamp is unchanged.
const FULL_READ_EVERY: u32 = 60;

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
    let link = Link::private(&path);
    let seen = loaded.map(|fingerprint| Seen {
        fingerprint,
        stamp: None,
        file: None,
    });
    spawn_linked(path, options, parse, updater, seen, link);
}

/// Watches `path` as a member of `link`, whose writers then publish what they write to
/// this store directly. `seen` is what was already loaded.
pub(crate) fn spawn_linked(
    path: PathBuf,
    options: Options,
    parse: Parser,
    updater: KeyUpdater,
    seen: Option<Seen>,
    link: Arc<Link>,
) {
    let name = updater.source_name().to_owned();
    let (tx, rx) = mpsc::channel();
    let updater = Arc::new(updater);
    let member = link.join(updater.clone(), seen);
    let mut watch = Watch {
        path,
        options,
        parse,
        updater,
        member,
        polls: 0,
        forget: false,
        last_error: None,
        writing: None,
        wrote: false,
        empty: None,
        tx,
        followed: None,
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
        let error = Error::custom(
            name,
            format!("cannot start the file watcher thread: {error}"),
        );
        #[cfg(feature = "tracing")]
        tracing::error!(target: "tower_api_key::reload", error = %crate::error::Chain(&error), "keys will not be reloaded");
        #[cfg(not(feature = "tracing"))]
        let _ = error;
    }
}

struct Watch {
    path: PathBuf,
    options: Options,
    parse: Parser,
    updater: Arc<KeyUpdater>,
    /// This store's place in the file's link, where the content last attempted
    /// (applied or refused) is kept, by this watcher or by a writer of the file:
    /// unchanged content is not parsed again.
    member: Member,
    /// Polls since the file was last read whole.
    polls: u32,
    /// A read failed: what the store was handed is to be forgotten, so the file is
    /// applied again when it returns.
    forget: bool,
    /// The last read error reported, so a missing file is reported once, not per poll.
    last_error: Option<io::ErrorKind>,
    /// When the file, written in place and not closed by its writer, was last
    /// written: its content is not read until the writer is done.
    writing: Option<Instant>,
    /// Whether data was written in place since the file was last complete: such a
    /// write is waited for longer ([`WRITE_PATIENCE`]).
    wrote: bool,
    /// Since when the file has been empty, and whether that has been reported.
    empty: Option<(Instant, bool)>,
    /// Where the file-system watcher sends its signals.
    tx: mpsc::Sender<Signal>,
    /// The file a symlinked key file names: its events are the key file's, and its
    /// directory, when not the link's, is watched too (an edit there makes no event
    /// in the link's directory).
    followed: Option<PathBuf>,
}

enum Signal {
    /// The file was replaced whole (renamed over, deleted, created through a symlink
    /// swap) or a writer closed it: its content is complete.
    Changed,
    /// The file was written in place (`data`), or created, and the writer may still
    /// be at it.
    Writing {
        data: bool,
    },
    WatcherFailed,
    /// The store is gone.
    Closed,
}

/// What a burst of signals came to.
#[derive(Default)]
struct Burst {
    closed: bool,
    watcher_failed: bool,
    /// Whether the file's last news is a write not yet closed.
    writing: bool,
    /// Whether data was written in place since the file was last complete.
    wrote: bool,
}

impl Watch {
    fn run(&mut self, rx: &mpsc::Receiver<Signal>, mut watcher: Option<RecommendedWatcher>) {
        // A change made between the load and the watch sent its events to nobody.
        self.check(true);
        loop {
            // While a write is open, look again soon: the writer may never say it is done.
            let wait = match self.writing {
                Some(_) => self.options.debounce.max(Duration::from_millis(50)),
                None => self.options.poll,
            };
            let burst = match rx.recv_timeout(wait) {
                Ok(signal) => Some(self.settle(rx, signal)),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
            };
            if burst.as_ref().is_some_and(|b| b.closed) || self.updater.is_closed() {
                return;
            }
            // A failed watcher (or one that could not start, say because the directory
            // did not exist yet) is rebuilt, as is one that watches the file a symlink
            // named before it was repointed; meanwhile the poll keeps us going.
            if self.options.events
                && (watcher.is_none()
                    || burst.as_ref().is_some_and(|b| b.watcher_failed)
                    // (looked at on news and polls, not each tick of an open write)
                    || ((burst.is_some() || self.writing.is_none())
                        && self.elsewhere() != self.followed))
            {
                watcher = self.watcher();
            }
            match burst {
                // Written in place, not closed yet: never read a prefix mid-write.
                Some(Burst {
                    writing: true,
                    wrote,
                    ..
                }) => {
                    self.writing = Some(Instant::now());
                    self.wrote |= wrote;
                }
                // Complete: replaced whole, or closed by its writer.
                Some(_) => {
                    (self.writing, self.wrote) = (None, false);
                    self.check(false);
                }
                // A write in place left open with nothing written for a long while
                // (a writer that never closes): read it once two reads a debounce
                // apart agree. A writer that pauses mid-file (a slow link, a script
                // between two `echo`s) closes well before that: reading the prefix
                // it left would drop the keys, or the `disabled = true`, still to come.
                // A name created with nothing written to it (a directory, a link, a
                // FIFO) is looked at after 2 s.
                None if self.writing.is_some() => match self.writing {
                    Some(since) if since.elapsed() < self.patience() => {}
                    _ => {
                        #[cfg(feature = "tracing")]
                        if self.wrote {
                            tracing::warn!(
                                target: "tower_api_key::reload",
                                source = %self.updater.source_name(),
                                "the key file was written in place and left open, unchanged, \
                                 for {} s; reading it as it is",
                                self.patience().as_secs()
                            );
                        }
                        (self.writing, self.wrote) = (None, false);
                        self.check(true);
                    }
                },
                // A poll: the file's stamp first, its content only if that moved.
                None => self.poll(),
            }
        }
    }

    /// Waits until signals stop arriving for the debounce period (at most ten
    /// periods), and sums them up.
    fn settle(&self, rx: &mpsc::Receiver<Signal>, first: Signal) -> Burst {
        let deadline = Instant::now() + self.options.debounce * 10;
        let mut burst = Burst::default();
        let mut next = Some(first);
        while let Some(signal) = next {
            match signal {
                Signal::Closed => {
                    burst.closed = true;
                    return burst;
                }
                Signal::WatcherFailed => burst.watcher_failed = true,
                Signal::Changed => (burst.writing, burst.wrote) = (false, false),
                Signal::Writing { data } => {
                    burst.writing = true;
                    burst.wrote |= data;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            next = rx.recv_timeout(self.options.debounce).ok();
        }
        burst
    }

    /// Watches the file's directory: renames over the file, Kubernetes `..data` swaps
    /// and delete-then-create all show up there, where a watch on the file would be
    /// lost with the old inode.
    ///
    /// A key file that is a symlink to a file in another directory (by hand, or a
    /// volume mounted elsewhere) has that directory watched too, for edits made
    /// to the file it names; the watch follows the link when it is repointed.
    fn watcher(&mut self) -> Option<RecommendedWatcher> {
        let dir = self.dir();
        let file_name = self.path.file_name().map(ToOwned::to_owned);
        self.followed = self.elsewhere();
        // The named file's directory, when it is not the link's (watched too), and
        // the name its events carry.
        let here = std::fs::canonicalize(&dir).ok();
        let other_dir = self
            .followed
            .as_deref()
            .and_then(Path::parent)
            .filter(|parent| Some(*parent) != here.as_deref())
            .map(Path::to_path_buf);
        let followed = self.followed.clone();
        let followed_name = followed
            .as_deref()
            .and_then(Path::file_name)
            .map(ToOwned::to_owned);
        let beside = other_dir.is_none();
        let tx = self.tx.clone();
        let link = self.member.link.clone();
        let patience = self.options.poll.max(WRITE_PATIENCE);
        let handler = move |event: notify::Result<notify::Event>| {
            let signal = match event {
                Ok(event) => {
                    let ours = event.paths.iter().any(|p| {
                        p.file_name() == file_name.as_deref()
                            || Some(p) == followed.as_ref()
                            // The named file beside the link: its events carry the
                            // directory as the link's watch spells it.
                            || (beside
                                && followed_name.is_some()
                                && p.file_name() == followed_name.as_deref())
                    });
                    let data = event
                        .paths
                        .iter()
                        .any(|p| p.file_name() == Some("..data".as_ref()));
                    if event.need_rescan()
                        || event.paths.is_empty()
                        || matches!(event.kind, EventKind::Other)
                    {
                        Signal::Changed
                    } else if !(ours || data) {
                        return;
                    } else {
                        match event.kind {
                            // The writer closed the file: what it wrote is complete.
                            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                                Signal::Changed
                            }
                            EventKind::Access(_) => return,
                            // Written in place, or created: more may follow.
                            EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) if ours => {
                                Signal::Writing { data: true }
                            }
                            EventKind::Create(_) if ours => Signal::Writing { data: false },
                            _ => Signal::Changed,
                        }
                    }
                }
                Err(_) => Signal::WatcherFailed,
            };
            // Told to the file's writers at once: a write in place is open, or done.
            match signal {
                Signal::Writing { data } => link.note_open_write(Some(data), patience),
                Signal::Changed => link.note_open_write(None, patience),
                _ => {}
            }
            let _ = tx.send(signal);
        };
        let mut watcher = notify::recommended_watcher(handler).ok()?;
        watcher.watch(&dir, RecursiveMode::NonRecursive).ok()?;
        if let Some(parent) = &other_dir {
            // Best effort: the link's directory and the poll still cover the file.
            let _ = watcher.watch(parent, RecursiveMode::NonRecursive);
        }
        Some(watcher)
    }

    /// The directory the key file's name is in.
    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        }
    }

    /// The file the key file's symlink names (followed to the end, as a read
    /// follows it), when the key file is a symlink.
    fn elsewhere(&self) -> Option<PathBuf> {
        if !std::fs::symlink_metadata(&self.path)
            .ok()?
            .file_type()
            .is_symlink()
        {
            return None;
        }
        std::fs::canonicalize(&self.path).ok()
    }

    /// How long a write in place left open is waited for, with nothing more written.
    fn patience(&self) -> Duration {
        let patience = match self.wrote {
            true => WRITE_PATIENCE,
            false => Duration::from_secs(2),
        };
        self.options.poll.max(patience)
    }

    /// A poll: reads the file only if its stamp moved since it was last read (or
    /// that stamp proved nothing), or every [`FULL_READ_EVERY`] polls.
    fn poll(&mut self) {
        self.polls += 1;
        if self.polls < FULL_READ_EVERY && self.empty.is_none() && self.last_error.is_none() {
            let seen = self.seen().and_then(|s| s.stamp);
            if seen.is_some() && Stamp::at(&self.path).ok() == seen {
                return;
            }
        }
        self.polls = 0;
        self.check(true);
    }

    /// Forgets what the store was handed, after a failed read.
    fn forget_seen(&mut self) {
        if std::mem::take(&mut self.forget) {
            let mut gate = self.member.link.read_gate();
            if let Some(me) = gate.watcher(self.member.id) {
                me.seen = None;
            }
        }
    }

    /// What this store was last handed.
    fn seen(&self) -> Option<Seen> {
        let mut gate = self.member.link.read_gate();
        gate.watcher(self.member.id).and_then(|w| w.seen)
    }

    /// Re-reads the file and publishes it if its content changed. With `twice`, new
    /// content is applied only if a second read a debounce later finds the same.
    ///
    /// The read that is published is made holding the link's gate, so that no writer
    /// of the file applies a newer file between this read and its publication.
    fn check(&mut self, twice: bool) {
        let mut first = None;
        if twice {
            // Most often the content the store has: fingerprinted a piece at a time.
            let path = self.path.clone();
            let max = self.options.max_size;
            let Some((fingerprint, stamp)) = self.attempt(|| fingerprint_of_file(&path, max))
            else {
                return self.forget_seen();
            };
            if fingerprint.0 == 0 {
                return self.empty();
            }
            if self.seen().is_some_and(|s| s.fingerprint == fingerprint) {
                return self.note_stamp(fingerprint, stamp);
            }
            std::thread::sleep(self.options.debounce);
            first = Some(fingerprint);
        }
        let link = self.member.link.clone();
        let mut gate = link.read_gate();
        let read = self.read();
        let Some(me) = gate.watcher(self.member.id) else {
            return;
        };
        if std::mem::take(&mut self.forget) {
            me.seen = None;
        }
        let Some(bytes) = read else {
            return;
        };
        if bytes.is_empty() {
            drop(gate);
            return self.empty();
        }
        self.empty = None;
        let fingerprint = bytes.fingerprint();
        let stamp = bytes.stamp().filter(|s| !s.racy(SystemTime::now()));
        let file = bytes.stamp().and_then(|s| s.file());
        if me.seen.is_some_and(|s| s.fingerprint == fingerprint) {
            me.seen = Some(Seen {
                fingerprint,
                stamp,
                file,
            });
            return;
        }
        // New content in the file the last content was in: written in place, and
        // perhaps still being written (the writer's own events may not have arrived
        // yet). Taken only once two reads a moment apart agree.
        if first.is_none() && file.is_some() && me.seen.and_then(|s| s.file) == file {
            drop((bytes, gate));
            return self.check(true);
        }
        // Still being written (two reads differ), or written in place by a writer
        // that has not closed the file, as the file events said meanwhile (a burst
        // that ended with the file complete can be followed by such a write before
        // this read): look again soon.
        if first.is_some_and(|f| f != fingerprint) || link.write_open() {
            self.writing.get_or_insert_with(Instant::now);
            return;
        }
        me.seen = Some(Seen {
            fingerprint,
            stamp,
            file,
        });
        // A parser that panics (a bug, on some content) must not end the watching:
        // the file is refused, and the next one is read as ever.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (self.parse)(&self.path, &bytes)
        }))
        .unwrap_or_else(|_| {
            Err(Error::custom(
                self.updater.source_name(),
                "the key file could not be read (the parser failed on it); the last \
                 good keys stay",
            ))
        });
        match parsed {
            // A refused publish (a conflict with another source) is recorded by the
            // store itself.
            Ok(set) => drop(self.updater.publish(set)),
            Err(error) => drop(self.updater.reject(error)),
        }
    }

    /// Records the stamp of content this store already has, so the next poll need
    /// not read it.
    fn note_stamp(&self, fingerprint: Fingerprint, stamp: Option<Stamp>) {
        let mut gate = self.member.link.read_gate();
        if let Some(me) = gate.watcher(self.member.id)
            && me.seen.is_some_and(|s| s.fingerprint == fingerprint)
        {
            me.seen = Some(Seen {
                fingerprint,
                stamp: stamp.filter(|s| !s.racy(SystemTime::now())),
                file: stamp.and_then(|s| s.file()),
            });
        }
    }

    /// The file is empty: a write in progress (truncate, then write). Waits for the
    /// content, and says so once if the file is still empty a poll interval later.
    fn empty(&mut self) {
        match self.empty {
            None => self.empty = Some((Instant::now(), false)),
            Some((since, false)) if since.elapsed() >= self.options.poll => {
                self.empty = Some((since, true));
                self.updater.reject(
                    Error::Parse {
                        reason: "the key file has been empty for a poll interval; \
                                 keeping the last good keys (write at least `keys = []`)"
                            .into(),
                    }
                    .in_file(&self.path, None),
                );
            }
            Some(_) => {}
        }
    }

    /// Reads the file; a failure is reported once per kind, and `None`.
    fn read(&mut self) -> Option<FileBytes> {
        let (path, max) = (self.path.clone(), self.options.max_size);
        self.attempt(|| FileBytes::read(&path, max))
    }

    /// Runs a read of the file, reporting a new kind of failure once.
    fn attempt<T>(&mut self, read: impl FnOnce() -> io::Result<T>) -> Option<T> {
        match read() {
            Ok(read) => {
                self.last_error = None;
                Some(read)
            }
            Err(error) => {
                if self.last_error != Some(error.kind()) {
                    self.last_error = Some(error.kind());
                    // Once it returns, the file is applied again even if unchanged, so
                    // the recovery shows up as a reload.
                    self.forget = true;
                    self.updater.reject(Error::io(&self.path, error));
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{FileSource, KeyStore, source::read::reads};

    /// The safety-net poll looks at the file's stamp and reads nothing while the file
    /// is unchanged (it read the whole file at every poll); a change is still seen.
    #[test]
    fn an_unchanged_file_is_not_read_at_every_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "[[keys]]\nid = \"a\"\nsecret = \"key-a\"\n").unwrap();
        // A stamp taken within two seconds of a change proves nothing yet.
        std::thread::sleep(Duration::from_millis(2100));
        let store = KeyStore::new();
        store
            .add_source(
                FileSource::new(&path)
                    .with_file_events(false)
                    .with_poll_interval(Duration::from_millis(20)),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let before = reads::of(&path);
        // About 40 polls.
        std::thread::sleep(Duration::from_millis(800));
        let polled = reads::of(&path) - before;
        assert!(polled <= 1, "{polled} reads of an unchanged file");
        // A change moves the stamp: read and applied.
        std::fs::write(&path, "[[keys]]\nid = \"b\"\nsecret = \"key-b\"\n").unwrap();
        let start = std::time::Instant::now();
        while store.get("b").is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the change was not seen"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
