//! A replica's snapshot file, written off the apply path: the follower hands each
//! change to a thread of its own, which keeps a copy of the keys and rewrites the
//! file at most once per interval, always after the last change.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{ApiKey, KeyChange, KeySet};

/// What the follower sends, with the namespace's version it brings the copy to.
enum Update {
    /// The whole set, after a resync.
    Set(KeySet, At),
    /// Changes by id, after a version applied.
    Changes(Vec<KeyChange>, At),
}

/// A version of a namespace: its epoch (a new one after each restore) and number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct At {
    pub(crate) epoch: String,
    pub(crate) version: u64,
}

/// How the writer thread writes a snapshot: at a path, the version, the keys.
type WriteFn = dyn Fn(&std::path::Path, &At, Vec<&ApiKey>) -> std::io::Result<()>;

/// The first line of every snapshot: what it is, and up to which version.
pub(crate) const HEADER: &str = "# tower-api-key replica snapshot:";

/// The lines a snapshot opens with: the version it holds and when it was written,
/// so that an operator restoring a wiped namespace picks the newest of the
/// replicas' snapshots (the highest version of the latest epoch), not just any.
fn header(at: &At) -> String {
    format!(
        "{HEADER} namespace version {} of epoch {}, written {}\n\
         # Restore from the newest replica's snapshot: changes after this version are \
         not in it.\n\n",
        at.version,
        at.epoch,
        crate::clock::rfc3339(std::time::SystemTime::now())
    )
}

/// The follower's end: sending costs a channel push, whatever the set's size.
pub(crate) struct Snapshots {
    tx: mpsc::Sender<Update>,
}

impl Snapshots {
    /// Starts the writer thread for `path`, writing at most once per `every`. `None`
    /// if the thread cannot start (said at `warn`).
    pub(crate) fn start(path: PathBuf, every: Duration) -> Option<Self> {
        Self::start_with(path, every, |path, at, keys| {
            let text = header(at) + &crate::source::key_file::write::file(keys);
            crate::source::key_file::write::replace(path, text.as_bytes())
        })
    }

    /// As [`start`](Self::start), writing with `write` (tests count the writes).
    fn start_with(
        path: PathBuf,
        every: Duration,
        write: impl Fn(&std::path::Path, &At, Vec<&ApiKey>) -> std::io::Result<()> + Send + 'static,
    ) -> Option<Self> {
        let (tx, rx) = mpsc::channel();
        let spawned = thread::Builder::new()
            .name("tower-api-key-redis-snapshot".into())
            .spawn(move || run(&rx, &path, every, &write));
        match spawned {
            Ok(_) => Some(Self { tx }),
            Err(error) => {
                #[cfg(feature = "tracing")]
                tracing::warn!(target: "tower_api_key::reload", %error, "cannot start the replica snapshot writer; no snapshot will be kept");
                #[cfg(not(feature = "tracing"))]
                let _ = error;
                None
            }
        }
    }

    pub(crate) fn set(&self, set: KeySet, at: At) {
        let _ = self.tx.send(Update::Set(set, at));
    }

    pub(crate) fn changes(&self, changes: Vec<KeyChange>, at: At) {
        let _ = self.tx.send(Update::Changes(changes, at));
    }
}

/// The writer thread: applies what arrives, writes when the interval allows, and
/// once more when the follower is gone if anything is left unwritten.
fn run(rx: &mpsc::Receiver<Update>, path: &std::path::Path, every: Duration, write: &WriteFn) {
    let mut keys: HashMap<Arc<str>, ApiKey> = HashMap::new();
    let mut at = At {
        epoch: String::new(),
        version: 0,
    };
    // Nothing to write until the first whole set: a snapshot is never a partial set.
    let mut known = false;
    let mut dirty = false;
    let mut last: Option<Instant> = None;
    loop {
        let wait = match (dirty, last) {
            (true, Some(at)) => (at + every).saturating_duration_since(Instant::now()),
            (true, None) => Duration::ZERO,
            (false, _) => Duration::from_secs(3600),
        };
        let closed = match rx.recv_timeout(wait) {
            Ok(update) => {
                apply(&mut keys, &mut at, &mut known, &mut dirty, update);
                // Take everything already queued before writing.
                while let Ok(update) = rx.try_recv() {
                    apply(&mut keys, &mut at, &mut known, &mut dirty, update);
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let due = last.is_none_or(|at| at.elapsed() >= every);
        if dirty && known && (due || closed) {
            let mut sorted: Vec<&ApiKey> = keys.values().collect();
            sorted.sort_by(|a, b| a.id().cmp(b.id()));
            if let Err(error) = write(path, &at, sorted) {
                #[cfg(feature = "tracing")]
                tracing::warn!(target: "tower_api_key::reload", path = %path.display(), %error, "cannot write the replica snapshot");
                #[cfg(not(feature = "tracing"))]
                let _ = error;
            }
            dirty = false;
            last = Some(Instant::now());
        }
        if closed {
            return;
        }
    }
}

fn apply(
    keys: &mut HashMap<Arc<str>, ApiKey>,
    at: &mut At,
    known: &mut bool,
    dirty: &mut bool,
    update: Update,
) {
    match update {
        Update::Set(set, version) => {
            keys.clear();
            keys.extend(set.iter().map(|k| (k.id.clone(), k.clone())));
            *known = true;
            *at = version;
        }
        Update::Changes(changes, version) => {
            *at = version;
            for change in changes {
                match change {
                    KeyChange::Upsert(key) => drop(keys.insert(key.id.clone(), key)),
                    KeyChange::Remove(id) => drop(keys.remove(&id)),
                }
            }
        }
    }
    *dirty = true;
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// The file opens with the version it holds, and is a key file.
    #[test]
    fn a_snapshot_says_which_version_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.toml");
        let snapshots = Snapshots::start(path.clone(), Duration::from_millis(10)).unwrap();
        let at = At {
            epoch: "e7".into(),
            version: 41,
        };
        snapshots.set(KeySet::from_keys([ApiKey::new("a", "1")]).unwrap(), at);
        drop(snapshots);
        let start = Instant::now();
        while !path.exists() {
            assert!(start.elapsed() < Duration::from_secs(5), "never written");
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(Duration::from_millis(50));
        let text = std::fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap();
        assert!(first.starts_with(HEADER), "{first}");
        assert!(first.contains("version 41 of epoch e7"), "{first}");
        let set = crate::FileSource::parse(&path, text.as_bytes()).unwrap();
        assert!(set.get("a").is_some());
    }

    /// The snapshot is written in the background, at most once per interval however
    /// many changes come, and always after the last one (finding 8: it was rewritten
    /// whole after every change, on the apply path).
    #[test]
    fn writes_are_coalesced_and_the_last_change_is_always_written() {
        let written: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let seen = written.clone();
        let snapshots = Snapshots::start_with(
            PathBuf::from("unused"),
            Duration::from_millis(200),
            move |_, _, keys| {
                seen.lock()
                    .unwrap()
                    .push(keys.iter().map(|k| k.id().to_owned()).collect());
                Ok(())
            },
        )
        .unwrap();
        // Changes before the first whole set are not a snapshot.
        let at = |version| At {
            epoch: "e1".into(),
            version,
        };
        snapshots.changes(vec![KeyChange::Upsert(ApiKey::new("early", "e"))], at(1));
        thread::sleep(Duration::from_millis(50));
        assert!(written.lock().unwrap().is_empty());
        snapshots.set(KeySet::from_keys([ApiKey::new("a", "1")]).unwrap(), at(2));
        let start = Instant::now();
        for i in 0..1000 {
            snapshots.changes(
                vec![KeyChange::Upsert(ApiKey::new(
                    format!("k{i}"),
                    format!("s{i}"),
                ))],
                at(3 + i),
            );
        }
        snapshots.changes(vec![KeyChange::remove("a")], at(1003));
        let burst = start.elapsed();
        thread::sleep(Duration::from_millis(500));
        let writes = written.lock().unwrap().clone();
        let allowed = 2 + (burst.as_millis() / 200) as usize;
        assert!(
            writes.len() <= allowed,
            "{} writes for 1,001 changes",
            writes.len()
        );
        let last = writes.last().unwrap();
        assert_eq!(last.len(), 1000);
        assert!(!last.contains(&"a".to_owned()) && last.contains(&"k999".to_owned()));
        // Dropping the follower's end writes what is left, then ends the thread.
        snapshots.changes(vec![KeyChange::remove("k0")], at(1004));
        drop(snapshots);
        thread::sleep(Duration::from_millis(100));
        assert_eq!(written.lock().unwrap().last().unwrap().len(), 999);
    }
}
