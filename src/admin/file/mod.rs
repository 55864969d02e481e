//! The key-file backend: changes written into the same TOML file a
//! [`FileSource`](crate::FileSource) watches, comments and untouched entries kept.

mod commit;
mod edit;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::oneshot;

use self::edit::Base;
use super::{AdminBackend, BackendError, backend::Said};
use crate::{
    ApiKey, FileSource, KeySource as _,
    source::{link::Link, read::Stamp},
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

/// The most changes written at once.
const MAX_BATCH: usize = 1024;

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
        let (outcome, start) = self.shared.enqueue(op);
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

    /// Writes `keys` (each a new key, or the new version of the key `read` holds
    /// under its id) and removes `removed`, in one write of the file as it is now,
    /// all or nothing: each id must still hold what `read` (the keys a plan was made
    /// from) says, else nothing is written and the error names the first id that
    /// moved ([`BackendError::Conflict`]). Entries and comments the change does not
    /// touch stay byte for byte, so a hand edit saved meanwhile to another key is
    /// kept, never written over with what was read.
    #[cfg(feature = "cli")]
    pub(crate) async fn change_many(
        &self,
        keys: &[ApiKey],
        removed: &[String],
        read: &std::collections::HashMap<&str, &ApiKey>,
    ) -> Result<(), BackendError> {
        use super::record_etag;
        let etag = |id: &str| read.get(id).map(|old| record_etag(old));
        // Removals first: a key renamed (its old id removed, a new one with its
        // secret added) is then no second holder of its secret.
        let ops: Vec<Op> = removed
            .iter()
            .map(|id| Op::Delete(id.clone(), etag(id)))
            .chain(keys.iter().map(|key| match etag(key.id()) {
                Some(etag) => Op::Update(key.clone(), Some(etag)),
                None => Op::Create(key.clone()),
            }))
            .collect();
        let shared = self.shared.clone();
        let written = tokio::task::spawn_blocking(move || {
            let written = shared.write(&ops, true);
            (written, ops)
        })
        .await;
        let (written, ops) = written.map_err(|e| BackendError::Unavailable(Box::new(e)))?;
        let outcomes = match written {
            Ok(Some(outcomes)) => outcomes,
            Ok(None) => {
                return Err(BackendError::Unavailable(Said::only(
                    "the key file would not parse with these changes; nothing was written",
                )));
            }
            Err(failure) => return Err(self.shared.failed(&failure)),
        };
        for (op, outcome) in ops.iter().zip(outcomes) {
            let id = match op {
                Op::Create(key) | Op::Update(key, _) => key.id(),
                Op::Delete(id, _) => id,
                Op::Rotate { old, .. } => old.id(),
            };
            match outcome {
                Ok(()) => {}
                Err(BackendError::PreconditionFailed | BackendError::NotFound) => {
                    return Err(BackendError::Conflict(id.to_owned()));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
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

/// Resets `running` if the writer panics, so that the next call starts a writer.
///
/// Only on a panic: a writer that stops normally has already said so under the
/// queue's lock, and a call queued since then has started a writer of its own,
/// whose calls and `running` this must not touch.
struct Running<'a>(&'a Shared);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut queue = self.0.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.running = false;
        // Calls left waiting are answered by their dropped reply: outcome unknown.
        queue.pending.clear();
    }
}

impl Shared {
    /// Queues `op` for the next write: its outcome to come, and whether the caller
    /// must start a writer (none is running).
    fn enqueue(&self, op: Op) -> (oneshot::Receiver<Result<(), BackendError>>, bool) {
        let (reply, outcome) = oneshot::channel();
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.pending.push(Pending { op, reply });
        (outcome, !std::mem::replace(&mut queue.running, true))
    }

    /// Writes batch after batch until no call is waiting.
    fn drain(&self) {
        let _running = Running(self);
        loop {
            let batch: Vec<Pending> = {
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                if queue.pending.is_empty() {
                    queue.running = false;
                    drop(queue);
                    #[cfg(test)]
                    tests::finished();
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
        let outcomes = match self.write(ops, false) {
            Ok(Some(outcomes)) => Ok(outcomes),
            Ok(None) => Ok(ops
                .iter()
                .map(|op| match self.write(std::slice::from_ref(op), false) {
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

    /// Logs a failed write, with its cause (which may name the path, or the process
    /// holding the file) where it has one.
    fn failed(&self, failure: &Failure) -> BackendError {
        #[cfg(feature = "tracing")]
        // A failure without a cause logs no `cause` field (an `Option` field is
        // recorded only when it holds something).
        tracing::warn!(
            target: "tower_api_key::admin",
            path = %self.path.display(),
            cause = failure.cause.as_deref(),
            "key file not written: {}", failure.said
        );
        failure.error()
    }
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
        /// Run by `drain` once it has found the queue empty and let go of it.
        static FINISHED: RefCell<Option<Box<dyn FnOnce()>>> = const { RefCell::new(None) };
    }

    pub(super) fn finished() {
        if let Some(f) = FINISHED.with(|b| b.borrow_mut().take()) {
            f();
        }
    }

    /// A call queued in the instant a writer finds the queue empty and stops starts
    /// a writer of its own, and is written by it: the stopping writer neither drops
    /// it (an "outcome unknown" for a change never written) nor marks the new writer
    /// as stopped.
    #[test]
    fn a_call_queued_as_the_writer_stops_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        fs::write(&path, "[[keys]]\nid = \"a\"\nsecret = \"s-a\"\n").unwrap();
        let backend = FileBackend::new(&path);
        let shared = backend.shared.clone();
        let late: Arc<Mutex<Option<(oneshot::Receiver<_>, bool)>>> = Arc::default();
        let (queue_it, slot) = (shared.clone(), late.clone());
        FINISHED.with(|f| {
            *f.borrow_mut() = Some(Box::new(move || {
                let op = Op::Create(ApiKey::new("late", "s-late"));
                *slot.lock().unwrap() = Some(queue_it.enqueue(op));
            }))
        });
        // The first writer: one call, then the queue is empty and it stops.
        let (first, start) = shared.enqueue(Op::Create(ApiKey::new("b", "s-b")));
        assert!(start);
        shared.drain();
        assert!(matches!(first.blocking_recv(), Ok(Ok(()))));
        let (mut outcome, start) = late.lock().unwrap().take().unwrap();
        assert!(start, "no writer was running: the late call starts one");
        assert!(
            shared.queue.lock().unwrap().running,
            "the late call's writer is running"
        );
        // Its writer (as `submit` would spawn it) writes it.
        assert!(
            outcome
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        shared.drain();
        assert!(matches!(outcome.blocking_recv(), Ok(Ok(()))));
        assert!(fs::read_to_string(&path).unwrap().contains("id = \"late\""));
    }

    /// An attacker's report: the warning for a write refused because the key file
    /// is held open by a writer said `cause=""`, where the README says it names the
    /// process. It names the process holding the file, and says what is known when
    /// none is found; never an empty cause.
    #[cfg(all(target_os = "linux", feature = "tracing"))]
    #[test]
    fn a_write_refused_for_a_file_held_open_names_the_process_holding_it() {
        use std::io::BufRead as _;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        fs::write(&path, "[[keys]]\nid = \"a\"\nsecret = \"s-a\"\n").unwrap();
        let backend = FileBackend::new(&path);
        let shared = backend.shared.clone();
        // What a watcher of this process notes when a writer opens the file in place.
        shared
            .link
            .note_open_write(Some(true), std::time::Duration::from_secs(30));
        let logged = || {
            let captured = Arc::new(Mutex::new(Vec::<u8>::new()));
            let sink = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || Sink(sink.clone()))
                .finish();
            let outcomes = tracing::subscriber::with_default(subscriber, || {
                shared.commit(&[Op::Create(ApiKey::new("b", "s-b"))])
            });
            assert!(matches!(outcomes[..], [Err(BackendError::Unavailable(_))]));
            let text = String::from_utf8(captured.lock().unwrap().clone()).unwrap();
            assert!(text.contains("key file not written"), "{text}");
            assert!(!text.contains("cause=\"\""), "{text}");
            text
        };

        // A writer holding it open, paused.
        let mut writer = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3>>\"$1\"; echo ready; read go")
            .arg("sh")
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufReader::new(writer.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready, "ready\n");
        let text = logged();
        let _ = writer.kill();
        let _ = writer.wait();
        assert!(
            text.contains(&format!("process {} (sh)", writer.id())),
            "{text}"
        );

        // None found (this process's own write, another user's): said so.
        let text = logged();
        assert!(text.contains("no other process"), "{text}");
    }

    /// A `tracing` writer into a shared buffer.
    #[cfg(all(target_os = "linux", feature = "tracing"))]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    #[cfg(all(target_os = "linux", feature = "tracing"))]
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
