//! One write of the key file: read it settled, make the changes, swap the new file
//! in without reverting anyone's save, and hand it to the stores watching it.

use std::{
    path::Path,
    sync::{Arc, PoisonError},
    time::{Duration, Instant},
};

use super::{
    Failure, Op, Shared,
    edit::{Base, Batch, parse},
};
use crate::{
    KeyChange,
    admin::{BackendError, backend::Said},
    source::{
        key_file::write,
        link::{Gate, Seen},
        read::{DEFAULT_MAX_SIZE, FileBytes, Fingerprint, Stamp},
        writers,
    },
};

/// How long a change waits for a file that is being written by someone else.
const SETTLE_PATIENCE: Duration = Duration::from_secs(1);
/// How far apart two reads must agree for new content to count as written.
const SETTLE: Duration = Duration::from_millis(20);
/// How often a change is applied again on top of a hand edit that raced it.
const MAX_REDO: usize = 16;

/// Why a file is left alone while a writer may hold it open (these two failures
/// name that writer once the wait is over): it is empty, ...
const EMPTY: &str = "the key file is empty (a write in progress?), so it is left alone";
/// ... or this process's watchers saw it opened for writing and not closed.
const BEING_WRITTEN: &str = "the key file is being written by someone else, so it is left alone";

impl Shared {
    /// The file as it is now, settled: read, checked and parsed (or taken from the
    /// cache when it is the file this backend last saw). Waits a bounded time for a
    /// file someone is writing.
    pub(super) fn current(&self) -> Result<Arc<Base>, Failure> {
        let deadline = Instant::now() + SETTLE_PATIENCE;
        loop {
            match self.try_current()? {
                Ok(base) => return Ok(base),
                Err(mut not_yet) if Instant::now() >= deadline => {
                    // Who holds it, looked up once (a scan of `/proc`), for the log.
                    if not_yet.cause.is_none() && matches!(not_yet.said, EMPTY | BEING_WRITTEN) {
                        not_yet.cause =
                            Some(writers::describe(writers::open_for_writing(&self.path)));
                    }
                    return Err(not_yet);
                }
                Err(_) => std::thread::sleep(SETTLE),
            }
        }
    }

    /// One look at the file: `Ok(Ok)` settled, `Ok(Err)` not settled yet (empty,
    /// being written, or not parsing: perhaps half written), `Err` a failure waiting
    /// will not fix.
    fn try_current(&self) -> Result<Result<Arc<Base>, Failure>, Failure> {
        let bytes = read(&self.path)?;
        if bytes.is_empty() {
            return Ok(Err(Failure::said(EMPTY)));
        }
        // A write in place still open (as this process's watchers' file events
        // say): even content known from before may be a prefix of what is coming.
        if self.link.write_open() {
            return Ok(Err(Failure::said(BEING_WRITTEN)));
        }
        let fingerprint = bytes.fingerprint();
        if let Some(base) = self.cached(fingerprint) {
            self.saw(bytes.stamp(), &base);
            return Ok(Ok(base));
        }
        // New to this backend: written by someone else. Taken only once two reads a
        // moment apart agree and no write in place is open.
        drop(bytes);
        std::thread::sleep(SETTLE);
        let again = read(&self.path)?;
        if again.fingerprint() != fingerprint || self.link.write_open() {
            return Ok(Err(Failure::said(BEING_WRITTEN)));
        }
        // A writer that paused with the file open (a slow `cat > keys.toml`) leaves
        // a prefix that reads the same twice: where the kernel says who has the file
        // open for writing, that prefix is left alone until it closes.
        if let Some(pid) = writers::open_for_writing(&self.path) {
            return Ok(Err(Failure::unavailable(
                "the key file is open for writing in another process, so it is left alone",
                writers::describe(Some(pid)),
            )));
        }
        Ok(parse(&self.path, &again).map(|base| {
            let base = self.remember(base);
            self.saw(again.stamp(), &base);
            base
        }))
    }

    /// Notes that the file with this stamp holds `base`.
    fn saw(&self, stamp: Option<Stamp>, base: &Arc<Base>) {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) =
            stamp.map(|stamp| (stamp, base.clone()));
    }

    fn cached(&self, fingerprint: Fingerprint) -> Option<Arc<Base>> {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|b| b.fingerprint == fingerprint)
            .cloned()
    }

    /// Keeps `base` as the newest file seen.
    fn remember(&self, base: Base) -> Arc<Base> {
        let base = Arc::new(base);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.retain(|b| b.fingerprint != base.fingerprint);
        if cache.len() >= 2 {
            cache.remove(0);
        }
        cache.push(base.clone());
        base
    }

    /// The settled file, read holding the write gate.
    pub(super) fn gated(&self) -> Result<(Gate<'_>, Arc<Base>), Failure> {
        let gate = || {
            self.link
                .write_gate()
                .map_err(|e| Failure::unavailable("another process is writing the key file", e))
        };
        for _ in 0..3 {
            let held = gate()?;
            let now = read(&self.path)?;
            if !self.link.write_open()
                && let Some(base) = self.cached(now.fingerprint())
            {
                return Ok((held, base));
            }
            // Someone else's file: wait for it to settle without holding the gate
            // (the watchers read it meanwhile), then make sure it is still that file.
            drop((held, now));
            let base = self.current()?;
            let held = gate()?;
            if read(&self.path)?.fingerprint() == base.fingerprint {
                return Ok((held, base));
            }
        }
        Err(Failure::said(
            "the key file keeps changing under the API; nothing was written",
        ))
    }

    /// One write of `ops` (see [`FileBackend`]): each op's outcome, or `None` if the
    /// edited file would not parse and the ops must be written one by one. With
    /// `whole`, nothing is written unless every op can be.
    pub(super) fn write(
        &self,
        ops: &[Op],
        whole: bool,
    ) -> Result<Option<Vec<Result<(), BackendError>>>, Failure> {
        let (mut gate, mut base) = self.gated()?;
        for _ in 0..MAX_REDO {
            let mut batch = Batch::new(&base, whole);
            let mut outcomes: Vec<Result<(), BackendError>> =
                ops.iter().map(|op| batch.apply(op)).collect();
            if whole
                && outcomes.iter().all(Result::is_ok)
                && let Some((at, refused)) = batch.unique_at_end(ops)
            {
                outcomes[at] = Err(refused);
            }
            if batch.changed.is_empty() || (whole && outcomes.iter().any(Result::is_err)) {
                return Ok(Some(outcomes));
            }
            let Some(next) = batch.render(&self.path) else {
                return Ok(match ops.len() {
                    1 => Some(vec![Err(BackendError::Unavailable(Said::only(
                        "the key file would not parse with this change",
                    )))]),
                    _ => None,
                });
            };
            let changes = batch.changes();
            // Known before it is in place: a reader that finds it there need not
            // parse it.
            let next = self.remember(next);
            // A symlinked key file is written through: the file it names is the one
            // swapped (in its own directory), the link stays.
            let write::Target { path: target, meta } = write::target(&self.path)
                .map_err(|e| Failure::unavailable("the key file cannot be written", e))?;
            let staged = write::staged_like(&target, meta.as_ref(), next.text.as_bytes())
                .map_err(|e| Failure::unavailable("the key file cannot be written", e))?;
            match swap(&target, staged, next.fingerprint, base.fingerprint)? {
                Swapped::Done(stamp) => {
                    // Enforced as soon as the file is in place (a reader of the
                    // file would see it now); answered once the rename is durable.
                    self.written(&mut gate, &base, &next, &changes, stamp);
                    self.saw(stamp, &next);
                    if let Err(e) = write::sync_dir(&target) {
                        return Err(Failure {
                            outcome_unknown: true,
                            said: "the key file was replaced but its directory could not be \
                                   synced: the change may not survive a crash",
                            cause: Some(e.to_string()),
                        });
                    }
                    return Ok(Some(outcomes));
                }
                // An editor saved the file meanwhile: the change again, on top of
                // what they saved, once it has settled.
                Swapped::NotYet => {
                    drop(gate);
                    (gate, base) = self.gated()?;
                }
            }
        }
        Err(Failure::said(
            "the key file keeps changing under the API; nothing was written",
        ))
    }

    /// After a write: every watching store of the process gets the changes, by id
    /// if it holds `base`, else as the whole set.
    fn written(
        &self,
        gate: &mut Gate<'_>,
        base: &Base,
        next: &Base,
        changes: &[KeyChange],
        stamp: Option<Stamp>,
    ) {
        let seen = Seen {
            fingerprint: next.fingerprint,
            stamp: stamp.filter(|s| !s.racy(std::time::SystemTime::now())),
            file: stamp.and_then(|s| s.file()),
        };
        let mut whole = None;
        for watcher in gate.watchers() {
            let by_id = watcher
                .seen
                .is_some_and(|s| s.fingerprint == base.fingerprint)
                && watcher.updater.apply(changes.iter().cloned()).is_ok();
            if !by_id {
                let set = whole.get_or_insert_with(|| next.set());
                if let Ok(set) = set {
                    let _ = watcher.updater.publish(set.clone());
                }
            }
            watcher.seen = Some(seen);
        }
    }
}

/// How a swap went.
enum Swapped {
    /// The new file is in place; the stamp of the file written.
    Done(Option<Stamp>),
    /// Nothing is swapped: the file is not the one expected (an editor saved it
    /// meanwhile). The change is to be made again on top of it.
    NotYet,
}

/// Puts `staged` (whose content has fingerprint `ours`) at `path` if what `path`
/// holds is `expected` (see [`FileBackend`]).
///
/// The file is compared just before the exchange, and what the exchange hands back
/// is compared again: if an editor saved in the instant between, their file goes
/// straight back (our file was at the path only while its replacement was read),
/// and the caller makes the change again on top of it.
fn swap(
    path: &Path,
    staged: tempfile::NamedTempFile,
    ours: Fingerprint,
    expected: Fingerprint,
) -> Result<Swapped, Failure> {
    let cannot = |e: std::io::Error| Failure::unavailable("the key file cannot be replaced", e);
    let stamp = |file: &std::fs::File| file.metadata().ok().map(|m| Stamp::of(&m));
    if read(path)?.fingerprint() != expected {
        return Ok(Swapped::NotYet);
    }
    #[cfg(test)]
    tests::between();
    if write::exchange(staged.path(), path).map_err(cannot)? {
        // `staged` now names the file that was at `path`. Whatever it is, ours is
        // in place now: anything but the file expected (one that cannot even be
        // read included) goes back, so that a failure means nothing was written.
        let written = stamp(staged.as_file());
        let fingerprint = |p: &Path| read(p).ok().map(|b| b.fingerprint());
        if fingerprint(staged.path()) == Some(expected) {
            return Ok(Swapped::Done(written));
        }
        let lost = |e: std::io::Error| Failure {
            outcome_unknown: true,
            said: "the key file changed while the API wrote it, and could not be put back",
            cause: Some(e.to_string()),
        };
        write::exchange(staged.path(), path).map_err(lost)?;
        // Had yet another save replaced ours meanwhile, that one is the newest:
        // it goes back in place of the one before it.
        if fingerprint(staged.path()) != Some(ours) {
            write::exchange(staged.path(), path).map_err(lost)?;
        }
        return Ok(Swapped::NotYet);
    }
    // No exchange here: the comparison just before the rename is all there is.
    let file = staged.persist(path).map_err(|e| cannot(e.error))?;
    Ok(Swapped::Done(stamp(&file)))
}

pub(super) fn read(path: &Path) -> Result<FileBytes, Failure> {
    FileBytes::read(path, DEFAULT_MAX_SIZE)
        .map_err(|e| Failure::unavailable("the key file cannot be read", crate::Error::io(path, e)))
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, fs};

    use super::*;
    use crate::source::read::fingerprint;

    thread_local! {
        /// Run by `swap` between its last comparison and the exchange.
        static BETWEEN: RefCell<Option<Box<dyn FnOnce()>>> = RefCell::new(None);
    }

    pub(super) fn between() {
        if let Some(f) = BETWEEN.with(|b| b.borrow_mut().take()) {
            f();
        }
    }

    /// An editor's save that lands between the last comparison and the exchange is
    /// handed back by the exchange and put straight back: the API's file does not
    /// stay, and the caller is told to make its change again.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_save_in_the_last_instant_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        fs::write(&path, "keys = []\n").unwrap();
        let read_first = fingerprint(b"keys = []\n");
        let ours = "[[keys]]\nid = \"api\"\nsecret = \"s-api\"\n";
        let staged = write::staged(&path, ours.as_bytes()).unwrap();
        let editor = "[[keys]]\nid = \"hand\"\nsecret = \"s-hand\"\n";
        let (at, tmp) = (path.clone(), dir.path().join("swp"));
        BETWEEN.with(|b| {
            *b.borrow_mut() = Some(Box::new(move || {
                fs::write(&tmp, editor).unwrap();
                fs::rename(&tmp, &at).unwrap();
            }))
        });
        let swapped = swap(&path, staged, fingerprint(ours.as_bytes()), read_first);
        assert!(matches!(swapped, Ok(Swapped::NotYet)));
        assert_eq!(fs::read_to_string(&path).unwrap(), editor);
        // Nothing left beside it: the API's file went with the staged name.
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }

    /// A key file replaced by something that cannot be read (here a directory) in
    /// the instant before the exchange: the exchange hands it back, it is put back,
    /// and the write is made again (and then refused, the file being unreadable).
    /// Nothing of the API's stays at the path, so "not written" is the truth.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn an_unreadable_file_swapped_in_the_last_instant_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        fs::write(&path, "keys = []\n").unwrap();
        let read_first = fingerprint(b"keys = []\n");
        let ours = "[[keys]]\nid = \"api\"\nsecret = \"s-api\"\n";
        let staged = write::staged(&path, ours.as_bytes()).unwrap();
        let at = path.clone();
        BETWEEN.with(|b| {
            *b.borrow_mut() = Some(Box::new(move || {
                fs::remove_file(&at).unwrap();
                fs::create_dir(&at).unwrap();
            }))
        });
        let swapped = swap(&path, staged, fingerprint(ours.as_bytes()), read_first);
        assert!(
            matches!(swapped, Ok(Swapped::NotYet)),
            "{:?}",
            swapped.err().map(|f| (f.said, f.outcome_unknown))
        );
        assert!(path.is_dir(), "the API's file stayed in place");
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }
}
