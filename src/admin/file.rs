//! The key-file backend: changes written into the same TOML file a
//! [`FileSource`](crate::FileSource) watches, comments and untouched entries kept.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table};

use super::{AdminBackend, BackendError, backend::Said, record_etag};
use crate::{
    ApiKey, FileSource, KeyChange, KeySet, KeySource as _,
    key::digest::KeyDigest,
    source::{
        key_file::write,
        link::{Gate, Link, Seen},
        read::{DEFAULT_MAX_SIZE, FileBytes, Fingerprint, Stamp, fingerprint},
    },
};

/// An [`AdminBackend`] over a TOML key file, edited with `toml_edit` so that comments,
/// order and every entry a change does not touch stay byte for byte. New keys are
/// written as `sha256` entries: the file never holds a secret the API made.
///
/// Give it the path the store's [`FileSource`] watches.
///
/// # How a change is written
///
/// Calls that arrive while a write is under way are **batched into the next write**
/// (group commit): one read, one edit, one check, one write for all of them, each
/// call answered for its own change. A write:
///
/// 1. reads the file as it is. A file that is empty, still being written in place
///    (its watcher saw it opened for writing and not closed), changing between two
///    reads a moment apart, or that does not parse, is not written over: the calls
///    wait for it to settle (about a second), then fail with
///    [`BackendError::Unavailable`], having written nothing;
/// 2. applies the changes to it, and checks the result as the file source will;
/// 3. writes it to a new file beside the key file, synced, compares the key file
///    with the one read in step 1 once more, and swaps the new one in. On Linux the
///    swap is an exchange (`renameat2` with `RENAME_EXCHANGE`), which hands back the
///    file it replaced: if that is not the file read in step 1 (an editor saved in the
///    instant between), the editor's file is swapped straight back and the changes
///    are made again on top of it, so **no hand edit is ever reverted**. Elsewhere
///    (a portable fallback) the comparison just before a plain rename is all there
///    is: an editor's save in the instant between it and the rename is lost;
/// 4. applies the changes to every store in the process whose [`FileSource`] watches
///    the file (by id when the store holds the file that was read, as a whole set
///    when it holds something older), syncs the directory, and only then answers. A
///    store with no watcher in this process learns of the change from its own watcher
///    (the API then answers 202 if that takes longer than its timeout).
///
/// Writers and watchers of the same file meet at a gate (in the process, and on
/// Linux across processes through an advisory `flock` on the file's directory): no
/// watcher publishes a read older than a file a writer has applied, and two
/// processes writing the same file take turns. A person editing the file by hand can
/// take the same lock, `flock /path/to/dir vi keys.toml`, to keep the API from
/// writing meanwhile; an editor holding a stale buffer without it can still overwrite
/// the API's changes when it saves: reload the file before editing it.
///
/// A crash leaves the old file or the new one. A crash in the instant between an
/// exchange that handed back an editor's file and the exchange that puts it back
/// leaves the editor's file in a `.tower-api-key-*.tmp` beside the key file. A
/// reader that takes neither the gate nor the lock (an editor loading the file) can
/// see the API's file during that instant.
#[derive(Clone)]
pub struct FileBackend {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    link: Arc<Link>,
    queue: Mutex<Queue>,
    /// The files this backend last read or wrote (the newest last, two at most), so
    /// that they are not parsed again: a reader that finds the file just written, or
    /// the one it replaces, takes it from here.
    cache: Mutex<Vec<Arc<Base>>>,
    /// The file at the path as last seen, by its stamp: a read (`get`, `list`) that
    /// finds the same stamp takes it without reading the file. (A write always reads
    /// the file: a same-size rewrite within one tick of the file system's clock keeps
    /// the stamp, and a read may miss it for that long; a write may not.)
    seen: Mutex<Option<(Stamp, Arc<Base>)>>,
}

/// Calls waiting for the next write.
#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// Whether a writer is draining the queue.
    running: bool,
}

struct Pending {
    op: Op,
    reply: oneshot::Sender<Result<(), BackendError>>,
}

/// One call's change.
enum Op {
    Create(ApiKey),
    Update(ApiKey, Option<String>),
    Delete(String, Option<String>),
    Rotate {
        successor: ApiKey,
        old: ApiKey,
        if_match: Option<String>,
    },
}

/// A parsed key file: its text, its keys by id, and where each key's table is.
struct Base {
    fingerprint: Fingerprint,
    text: String,
    keys: Keys,
    /// Each `[[keys]]` table's bytes (with the comments and blank lines before it),
    /// in file order, when the file can be edited as text: only `[[keys]]` tables,
    /// no multi-line strings. `None`: it is edited as a TOML document.
    tables: Option<Vec<Span>>,
}

/// A file's keys by id, and which id each digest is under (a change must not give a
/// key a second id): the maps as parsed, shared from write to write, and the changes
/// made since, until there are enough of them to fold in.
#[derive(Clone)]
struct Keys {
    all: Arc<HashMap<Arc<str>, ApiKey>>,
    digests: Arc<HashMap<KeyDigest, Arc<str>>>,
    /// Changed since `all` was made: the record now, `None` if removed.
    delta: HashMap<Arc<str>, Option<ApiKey>>,
}

/// How many changes are kept aside before they are folded into the maps.
const FOLD: usize = 512;

impl Keys {
    fn of(set: &KeySet) -> Self {
        Self {
            all: Arc::new(set.iter().map(|k| (k.id.clone(), k.clone())).collect()),
            digests: Arc::new(set.iter().map(|k| (k.digest, k.id.clone())).collect()),
            delta: HashMap::new(),
        }
    }

    fn get(&self, id: &str) -> Option<&ApiKey> {
        match self.delta.get(id) {
            Some(now) => now.as_ref(),
            None => self.all.get(id),
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// The id the digest is under, if any.
    fn owner(&self, digest: &KeyDigest) -> Option<&Arc<str>> {
        self.delta
            .iter()
            .find(|(_, k)| k.as_ref().is_some_and(|k| k.digest == *digest))
            .map(|(id, _)| id)
            .or_else(|| {
                self.digests
                    .get(digest)
                    .filter(|id| !self.delta.contains_key(*id))
            })
    }

    fn values(&self) -> impl Iterator<Item = &ApiKey> {
        self.all
            .values()
            .filter(|k| !self.delta.contains_key(&k.id))
            .chain(self.delta.values().flatten())
    }

    /// These keys with `changes` made.
    fn with(&self, changes: &HashMap<Arc<str>, Option<ApiKey>>) -> Self {
        let mut next = self.clone();
        next.delta
            .extend(changes.iter().map(|(id, k)| (id.clone(), k.clone())));
        if next.delta.len() > FOLD {
            let (mut all, mut digests) = ((*next.all).clone(), (*next.digests).clone());
            for (id, key) in next.delta.drain() {
                if let Some(old) = all.remove(&id) {
                    digests.remove(&old.digest);
                }
                if let Some(key) = key {
                    digests.insert(key.digest, id.clone());
                    all.insert(id, key);
                }
            }
            next.all = Arc::new(all);
            next.digests = Arc::new(digests);
        }
        next
    }
}

/// Where a key's table is in the file.
#[derive(Clone)]
struct Span {
    id: Arc<str>,
    start: usize,
    end: usize,
}

/// How long a change waits for a file that is being written by someone else.
const SETTLE_PATIENCE: Duration = Duration::from_secs(1);
/// How far apart two reads must agree for new content to count as written.
const SETTLE: Duration = Duration::from_millis(20);
/// The most changes written at once.
const MAX_BATCH: usize = 1024;
/// How often a change is applied again on top of a hand edit that raced it.
const MAX_REDO: usize = 16;

/// Why a whole write failed: what to tell every call in it.
struct Failure {
    outcome_unknown: bool,
    said: &'static str,
    cause: Option<String>,
}

impl Failure {
    fn unavailable(said: &'static str, cause: impl std::fmt::Display) -> Self {
        Self {
            outcome_unknown: false,
            said,
            cause: Some(cause.to_string()),
        }
    }

    fn said(said: &'static str) -> Self {
        Self {
            outcome_unknown: false,
            said,
            cause: None,
        }
    }

    fn error(&self) -> BackendError {
        let said = match &self.cause {
            Some(cause) => Said::new(self.said, cause.clone()),
            None => Said::only(self.said),
        };
        match self.outcome_unknown {
            true => BackendError::OutcomeUnknown(said),
            false => BackendError::Unavailable(said),
        }
    }
}

impl FileBackend {
    /// A backend over the key file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            shared: Arc::new(Shared {
                link: Link::of(&path),
                path,
                queue: Mutex::new(Queue::default()),
                cache: Mutex::new(Vec::new()),
                seen: Mutex::new(None),
            }),
        }
    }

    /// Queues `op` for the next write and waits for its outcome. The first call to
    /// find no writer running starts one, off the async runtime's threads; it writes
    /// batch after batch until the queue is empty.
    async fn submit(&self, op: Op) -> Result<(), BackendError> {
        let (reply, outcome) = oneshot::channel();
        let start = {
            let mut queue = self
                .shared
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            queue.pending.push(Pending { op, reply });
            !std::mem::replace(&mut queue.running, true)
        };
        if start {
            let shared = self.shared.clone();
            tokio::task::spawn_blocking(move || shared.drain());
        }
        outcome.await.unwrap_or_else(|_| {
            Err(BackendError::OutcomeUnknown(Said::only(
                "the key file's writer stopped mid-way; the change may or may not be written",
            )))
        })
    }

    /// Reads the file (settled, as a write would) and looks at its keys.
    async fn read<T: Send + 'static>(
        &self,
        look: impl FnOnce(&Base) -> T + Send + 'static,
    ) -> Result<T, BackendError> {
        let shared = self.shared.clone();
        let now = Stamp::at(&shared.path).ok();
        let known = shared
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|(stamp, _)| Some(*stamp) == now)
            .map(|(_, base)| base.clone());
        if let Some(base) = known {
            return Ok(look(&base));
        }
        tokio::task::spawn_blocking(move || shared.current().map(|base| look(&base)))
            .await
            .map_err(|e| BackendError::Unavailable(Box::new(e)))?
            .map_err(|f| f.error())
    }
}

/// Resets `running` even if a write panics, so that the next call starts a writer.
struct Running<'a>(&'a Shared);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.running = false;
        // Calls left waiting are answered by their dropped reply: outcome unknown.
        queue.pending.clear();
    }
}

impl Shared {
    /// Writes batch after batch until no call is waiting.
    fn drain(&self) {
        let _running = Running(self);
        loop {
            let batch: Vec<Pending> = {
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                if queue.pending.is_empty() {
                    queue.running = false;
                    return;
                }
                let n = queue.pending.len().min(MAX_BATCH);
                queue.pending.drain(..n).collect()
            };
            let (ops, replies): (Vec<Op>, Vec<_>) =
                batch.into_iter().map(|p| (p.op, p.reply)).unzip();
            // A write that panics answers its calls "outcome unknown" (the panic may
            // have come after the swap) and leaves the writer to the next batch.
            let outcomes =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.commit(&ops)));
            let Ok(outcomes) = outcomes else {
                self.cache
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
                continue;
            };
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
    }

    /// Writes `ops` in one write, or, if their file would not parse together, one by
    /// one (so that only the faulty one fails).
    fn commit(&self, ops: &[Op]) -> Vec<Result<(), BackendError>> {
        let outcomes = match self.write(ops) {
            Ok(Some(outcomes)) => Ok(outcomes),
            Ok(None) => Ok(ops
                .iter()
                .map(|op| match self.write(std::slice::from_ref(op)) {
                    Ok(Some(mut one)) => one.pop().unwrap_or(Ok(())),
                    Ok(None) => Err(BackendError::Unavailable(Said::only(
                        "the key file would not parse with this change",
                    ))),
                    Err(failure) => Err(self.failed(&failure)),
                })
                .collect()),
            Err(failure) => Err(failure),
        };
        match outcomes {
            Ok(outcomes) => outcomes,
            Err(failure) => {
                let _ = self.failed(&failure);
                ops.iter().map(|_| Err(failure.error())).collect()
            }
        }
    }

    /// Logs a failed write, with its cause (which may name the path).
    fn failed(&self, failure: &Failure) -> BackendError {
        #[cfg(feature = "tracing")]
        tracing::warn!(
            target: "tower_api_key::admin",
            path = %self.path.display(),
            cause = failure.cause.as_deref().unwrap_or(""),
            "key file not written: {}", failure.said
        );
        failure.error()
    }

    /// The file as it is now, settled: read, checked and parsed (or taken from the
    /// cache when it is the file this backend last saw). Waits a bounded time for a
    /// file someone is writing.
    fn current(&self) -> Result<Arc<Base>, Failure> {
        let deadline = Instant::now() + SETTLE_PATIENCE;
        loop {
            match self.try_current()? {
                Ok(base) => return Ok(base),
                Err(not_yet) if Instant::now() >= deadline => return Err(not_yet),
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
            return Ok(Err(Failure::said(
                "the key file is empty (a write in progress?), so it is left alone",
            )));
        }
        // A write in place still open (as this process's watchers' file events
        // say): even content known from before may be a prefix of what is coming.
        if self.link.write_open() {
            return Ok(Err(Failure::said(
                "the key file is being written by someone else, so it is left alone",
            )));
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
            return Ok(Err(Failure::said(
                "the key file is being written by someone else, so it is left alone",
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
    fn gated(&self) -> Result<(Gate<'_>, Arc<Base>), Failure> {
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
    /// edited file would not parse and the ops must be written one by one.
    fn write(&self, ops: &[Op]) -> Result<Option<Vec<Result<(), BackendError>>>, Failure> {
        let (mut gate, mut base) = self.gated()?;
        for _ in 0..MAX_REDO {
            let mut batch = Batch::new(&base);
            let outcomes: Vec<Result<(), BackendError>> =
                ops.iter().map(|op| batch.apply(op)).collect();
            if batch.changed.is_empty() {
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
            let staged = write::staged(&self.path, next.text.as_bytes())
                .map_err(|e| Failure::unavailable("the key file cannot be written", e))?;
            match swap(&self.path, staged, next.fingerprint, base.fingerprint)? {
                Swapped::Done(stamp) => {
                    // Enforced as soon as the file is in place (a reader of the
                    // file would see it now); answered once the rename is durable.
                    self.written(&mut gate, &base, &next, &changes, stamp);
                    self.saw(stamp, &next);
                    if let Err(e) = write::sync_dir(&self.path) {
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
        // `staged` now names the file that was at `path`.
        let written = stamp(staged.as_file());
        if read(staged.path())?.fingerprint() == expected {
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
        if read(staged.path())?.fingerprint() != ours {
            write::exchange(staged.path(), path).map_err(lost)?;
        }
        return Ok(Swapped::NotYet);
    }
    // No exchange here: the comparison just before the rename is all there is.
    let file = staged.persist(path).map_err(|e| cannot(e.error))?;
    Ok(Swapped::Done(stamp(&file)))
}

fn read(path: &Path) -> Result<FileBytes, Failure> {
    FileBytes::read(path, DEFAULT_MAX_SIZE)
        .map_err(|e| Failure::unavailable("the key file cannot be read", crate::Error::io(path, e)))
}

/// A whole key file, checked as the file source reads it.
fn parse(path: &Path, bytes: &[u8]) -> Result<Base, Failure> {
    let set = FileSource::parse(path, bytes).map_err(|e| {
        Failure::unavailable(
            "the key file does not parse, so it is left alone",
            crate::error::Chain(&e),
        )
    })?;
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Failure::unavailable("the key file does not parse, so it is left alone", e))?
        .to_owned();
    let tables = spans(&text, &set);
    Ok(Base {
        fingerprint: fingerprint(text.as_bytes()),
        text,
        keys: Keys::of(&set),
        tables,
    })
}

/// Where each key's `[[keys]]` table is in `text`, if the file can be edited as text:
/// nothing but comments, blank lines and `[[keys]]` tables, one per key of `set` in
/// order, and no multi-line string (whose lines could look like anything). A table
/// begins with the comments and blank lines just before its header (as a TOML
/// document attaches them) and ends where the next one begins.
fn spans(text: &str, set: &KeySet) -> Option<Vec<Span>> {
    if text.contains("\"\"\"") || text.contains("'''") {
        return None;
    }
    let mut headers = Vec::new();
    // The start of the run of comment and blank lines the current line ends.
    let mut trivia: Option<usize> = Some(0);
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim();
        if bare.is_empty() || bare.starts_with('#') {
            trivia.get_or_insert(at);
        } else if is_header(bare) {
            headers.push(trivia.unwrap_or(at));
            trivia = None;
        } else if bare.starts_with('[') || headers.is_empty() {
            // Another table, or a value outside any table (`keys = []`).
            return None;
        } else {
            trivia = None;
        }
        at += line.len();
    }
    if headers.len() != set.len() {
        return None;
    }
    let ends = headers.iter().skip(1).copied().chain([text.len()]);
    Some(
        set.iter()
            .zip(headers.iter().copied().zip(ends))
            .map(|(key, (start, end))| Span {
                id: key.id.clone(),
                start,
                end,
            })
            .collect(),
    )
}

/// Whether a trimmed line is a `[[keys]]` header (with an optional comment).
fn is_header(bare: &str) -> bool {
    let Some(rest) = bare.strip_prefix("[[") else {
        return false;
    };
    let Some((name, after)) = rest.split_once("]]") else {
        return false;
    };
    name.trim() == "keys" && {
        let after = after.trim();
        after.is_empty() || after.starts_with('#')
    }
}

impl Base {
    /// The keys as a set (for a store that holds an older file).
    fn set(&self) -> Result<KeySet, crate::Error> {
        let order: Vec<&ApiKey> = match &self.tables {
            Some(tables) => tables.iter().filter_map(|t| self.keys.get(&t.id)).collect(),
            None => self.keys.values().collect(),
        };
        KeySet::from_keys(order.into_iter().cloned())
    }
}

/// A batch's changes to one base file.
struct Batch<'a> {
    base: &'a Base,
    /// The ids changed so far, and each one's record now (`None`: removed).
    changed: HashMap<Arc<str>, Option<ApiKey>>,
    /// Ids of new keys, in the order they were added.
    added: Vec<Arc<str>>,
}

impl<'a> Batch<'a> {
    fn new(base: &'a Base) -> Self {
        Self {
            base,
            changed: HashMap::new(),
            added: Vec::new(),
        }
    }

    /// The record with this id, as the batch has it so far.
    fn get(&self, id: &str) -> Option<&ApiKey> {
        match self.changed.get(id) {
            Some(now) => now.as_ref(),
            None => self.base.keys.get(id),
        }
    }

    /// Checks `if_match` against the current record with this id.
    fn check(&self, id: &str, if_match: Option<&str>) -> Result<&ApiKey, BackendError> {
        let current = self.get(id).ok_or(BackendError::NotFound)?;
        match if_match {
            Some(tag) if tag != record_etag(current) => Err(BackendError::PreconditionFailed),
            _ => Ok(current),
        }
    }

    /// Refuses `key` if its digest is another id's.
    fn unique(&self, key: &ApiKey) -> Result<(), BackendError> {
        // Among the changed keys, and among the base's keys left as they were.
        let taken = self
            .changed
            .iter()
            .any(|(id, k)| *id != key.id && k.as_ref().is_some_and(|k| k.digest == key.digest))
            || self
                .base
                .keys
                .owner(&key.digest)
                .is_some_and(|id| *id != key.id && !self.changed.contains_key(id));
        match taken {
            true => Err(BackendError::Invalid(crate::Error::invalid(
                Some(key.id()),
                "the same secret is another key's",
            ))),
            false => Ok(()),
        }
    }

    /// One op: checked whole, then applied.
    fn apply(&mut self, op: &Op) -> Result<(), BackendError> {
        match op {
            Op::Create(key) => {
                if self.get(key.id()).is_some() {
                    return Err(BackendError::Conflict(key.id().to_owned()));
                }
                key.validate().map_err(BackendError::Invalid)?;
                self.unique(key)?;
                self.put(key.clone());
            }
            Op::Update(key, if_match) => {
                self.check(key.id(), if_match.as_deref())?;
                key.validate().map_err(BackendError::Invalid)?;
                self.unique(key)?;
                self.put(key.clone());
            }
            Op::Delete(id, if_match) => {
                self.check(id, if_match.as_deref())?;
                self.changed.insert(Arc::from(id.as_str()), None);
            }
            Op::Rotate {
                successor,
                old,
                if_match,
            } => {
                self.check(old.id(), if_match.as_deref())?;
                if self.get(successor.id()).is_some() {
                    return Err(BackendError::Conflict(successor.id().to_owned()));
                }
                successor.validate().map_err(BackendError::Invalid)?;
                old.validate().map_err(BackendError::Invalid)?;
                self.unique(successor)?;
                self.put(old.clone());
                self.put(successor.clone());
            }
        }
        Ok(())
    }

    fn put(&mut self, key: ApiKey) {
        let id = key.id.clone();
        if !self.base.keys.contains(&id) && !self.added.contains(&id) {
            self.added.push(id.clone());
        }
        self.changed.insert(id, Some(key));
    }

    /// The changes by id.
    fn changes(&self) -> Vec<KeyChange> {
        self.changed
            .iter()
            .filter(|(id, key)| key.is_some() || self.base.keys.contains(id))
            .map(|(id, key)| match key {
                Some(key) => KeyChange::Upsert(key.clone()),
                None => KeyChange::Remove(id.clone()),
            })
            .collect()
    }

    /// The new file, or `None` if it would not read back as intended.
    fn render(&self, path: &Path) -> Option<Base> {
        match &self.base.tables {
            Some(tables) => self.splice(path, tables),
            None => self.edit(path),
        }
    }

    /// The new file made from the old one's bytes: tables not changed copied as
    /// they are, changed ones edited alone, new ones appended. Each table written is
    /// read back and must give exactly its key.
    fn splice(&self, path: &Path, tables: &[Span]) -> Option<Base> {
        let text = &self.base.text;
        let mut out = String::with_capacity(text.len() + 512 * self.added.len());
        let mut spans = Vec::with_capacity(tables.len() + self.added.len());
        for table in tables {
            let start = out.len();
            match self.changed.get(&table.id) {
                None => out.push_str(text.get(table.start..table.end)?),
                Some(None) => continue,
                Some(Some(key)) => {
                    let mut doc: DocumentMut = text.get(table.start..table.end)?.parse().ok()?;
                    let one = doc.get_mut("keys")?.as_array_of_tables_mut()?.get_mut(0)?;
                    write_fields(one, key);
                    let edited = doc.to_string();
                    same(path, &edited, key)?;
                    out.push_str(&edited);
                }
            }
            if !out.ends_with('\n') {
                out.push('\n');
            }
            spans.push(Span {
                id: table.id.clone(),
                start,
                end: out.len(),
            });
        }
        for id in &self.added {
            let Some(Some(key)) = self.changed.get(id) else {
                continue;
            };
            let start = out.len();
            if !out.is_empty() {
                out.push('\n');
            }
            let entry = write::entry(key);
            same(path, &entry, key)?;
            out.push_str(&entry);
            spans.push(Span {
                id: key.id.clone(),
                start,
                end: out.len(),
            });
        }
        let keys = self.base.keys.with(&self.changed);
        // Read back as a whole only when it is small enough to cost nothing.
        if out.len() <= 64 << 10 {
            let set = FileSource::parse(path, out.as_bytes()).ok()?;
            if set.len() != keys.values().count() {
                return None;
            }
        }
        Some(Base {
            fingerprint: fingerprint(out.as_bytes()),
            text: out,
            keys,
            tables: Some(spans),
        })
    }

    /// The new file made by editing the old one as a TOML document, then read back
    /// whole as the file source will.
    fn edit(&self, path: &Path) -> Option<Base> {
        let mut doc: DocumentMut = self.base.text.parse().ok()?;
        let keys = keys_mut(&mut doc).ok()?;
        let mut gone = Vec::new();
        for (at, table) in keys.iter_mut().enumerate() {
            let Some(id) = table.get("id").and_then(Item::as_str) else {
                continue;
            };
            match self.changed.get(id) {
                Some(Some(key)) => write_fields(table, key),
                Some(None) => gone.push(at),
                None => {}
            }
        }
        for at in gone.into_iter().rev() {
            keys.remove(at);
        }
        for id in &self.added {
            if let Some(Some(key)) = self.changed.get(id) {
                keys.push(new_table(key));
            }
        }
        let text = doc.to_string();
        parse(path, text.as_bytes()).ok()
    }
}

/// Whether `text`, read as a key file alone, holds exactly `key`.
fn same(path: &Path, text: &str, key: &ApiKey) -> Option<()> {
    let set = FileSource::parse(path, text.as_bytes()).ok()?;
    let back = set.iter().next()?;
    (set.len() == 1 && record_etag(back) == record_etag(key)).then_some(())
}

/// The document's `[[keys]]` tables; a file holding `keys = []` (or nothing) gets an
/// empty array of tables.
fn keys_mut(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables, BackendError> {
    let empty = match doc.get("keys") {
        None => true,
        Some(item) => item.as_array().is_some_and(|a| a.is_empty()),
    };
    if empty {
        doc.insert("keys", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    doc.get_mut("keys")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or_else(|| {
            BackendError::Unavailable(Said::only(
                "the key file writes `keys` inline; use [[keys]] tables",
            ))
        })
}

/// Writes `key`'s fields into `table`, as the key file's writer renders them,
/// keeping the table's decor and the order of the fields it already has; fields `key`
/// lacks are removed. The key is a digest, unless the table holds a secret written by
/// hand that is still the key's.
fn write_fields(table: &mut Table, key: &ApiKey) {
    let keeps_secret = secret_matches(table, key);
    if !keeps_secret {
        table.remove("secret");
    }
    for (name, text) in write::fields(key) {
        let text = text.filter(|_| !(name == "sha256" && keeps_secret));
        put(
            table,
            name,
            text.and_then(|t| t.parse::<toml_edit::Value>().ok()),
        );
    }
}

/// Sets field `name` to `item`, or removes it for `None`. An unchanged value keeps
/// its formatting and its comments.
fn put(table: &mut Table, name: &str, new: Option<toml_edit::Value>) {
    let Some(mut new) = new else {
        table.remove(name);
        return;
    };
    match table.get_mut(name).and_then(Item::as_value_mut) {
        Some(old) if bare(old) == bare(&new) => {}
        // A changed value keeps the old one's surroundings (an inline comment).
        Some(old) => {
            *new.decor_mut() = old.decor().clone();
            *old = new;
        }
        None => {
            table.insert(name, Item::Value(new));
        }
    }
}

/// A value as written, without the spaces and comments around it.
fn bare(v: &toml_edit::Value) -> String {
    let mut v = v.clone();
    v.decor_mut().clear();
    v.to_string()
}

/// Whether the table's `secret` is still `key`'s.
fn secret_matches(table: &Table, key: &ApiKey) -> bool {
    table
        .get("secret")
        .and_then(Item::as_str)
        .is_some_and(|s| crate::key::digest::KeyDigest::of(s.as_bytes()) == key.digest)
}

fn new_table(key: &ApiKey) -> Table {
    let mut table = Table::new();
    write_fields(&mut table, key);
    table
}

impl AdminBackend for FileBackend {
    fn source_name(&self) -> String {
        FileSource::new(&self.shared.path).name()
    }

    async fn list(&self) -> Result<Vec<ApiKey>, BackendError> {
        self.read(|base| base.keys.values().cloned().collect())
            .await
    }

    async fn get(&self, id: &str) -> Result<Option<ApiKey>, BackendError> {
        let id = id.to_owned();
        self.read(move |base| base.keys.get(&id).cloned()).await
    }

    async fn create(&self, key: ApiKey) -> Result<(), BackendError> {
        self.submit(Op::Create(key)).await
    }

    async fn update(&self, key: ApiKey, if_match: Option<&str>) -> Result<(), BackendError> {
        self.submit(Op::Update(key, if_match.map(str::to_owned)))
            .await
    }

    async fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), BackendError> {
        self.submit(Op::Delete(id.to_owned(), if_match.map(str::to_owned)))
            .await
    }

    async fn rotate(
        &self,
        successor: ApiKey,
        old: ApiKey,
        if_match: Option<&str>,
    ) -> Result<(), BackendError> {
        self.submit(Op::Rotate {
            successor,
            old,
            if_match: if_match.map(str::to_owned),
        })
        .await
    }
}

impl std::fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBackend")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, fs};

    use super::*;

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
}
