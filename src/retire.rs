//! Retiring replaced snapshots off the request path.
//!
//! After a swap, requests that loaded the old snapshot may still be using it. A
//! background thread waits for them to finish, settles the usage counts they added to
//! entries that were replaced, then frees the old snapshot, so that neither a request
//! nor the reload's caller pays for freeing a large key set.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::Ordering,
        mpsc::{self, Sender},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{KeyInfo, KeySet, background::Pacer, store::Snapshot};

/// An entry replaced by a reload, whose usage moved to its successor.
pub(crate) struct Carried {
    pub(crate) old: KeyInfo,
    pub(crate) new: KeyInfo,
    /// The old entry's request count when it was copied into the new one.
    pub(crate) copied: u64,
}

pub(crate) struct Retired {
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) carried: Vec<Carried>,
    pub(crate) set: KeySet,
}

/// How long to wait for requests still reading an old snapshot; they hold it for the
/// length of a hash lookup, so this is only reached if something is badly wrong.
const PATIENCE: Duration = Duration::from_secs(10);

static REAPER: OnceLock<Option<Sender<Retired>>> = OnceLock::new();

/// Hands `retired` to the reaper thread (or, if it cannot run, settles it here).
pub(crate) fn retire(retired: Retired) {
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Retired>();
        thread::Builder::new()
            .name("tower-api-key-reaper".into())
            .spawn(move || {
                crate::background::enter();
                for retired in rx {
                    settle(retired);
                }
            })
            .ok()
            .map(|_| tx)
    });
    let sent = match reaper {
        Some(tx) => tx.send(retired).map_err(|e| e.0),
        None => Err(retired),
    };
    if let Err(retired) = sent {
        settle(retired);
    }
}

fn settle(retired: Retired) {
    let Retired {
        snapshot,
        carried,
        set,
    } = retired;
    let mut pacer = Pacer::new();
    if let Some(keys) = set.into_unshared_keys() {
        drop_paced(keys, &mut pacer);
    }
    let start = Instant::now();
    // `ArcSwap` turned every reader's borrow of the old snapshot into a reference
    // count when it was swapped out: once ours is the last, no request can touch
    // the old entries any more.
    while Arc::strong_count(&snapshot) > 1 && start.elapsed() < PATIENCE {
        thread::sleep(Duration::from_millis(1));
    }
    for Carried { old, new, copied } in carried {
        let (old, new) = (old.entry(), new.entry());
        let late = old.requests.load(Ordering::Relaxed).saturating_sub(copied);
        if late > 0 {
            new.requests.fetch_add(late, Ordering::Relaxed);
        }
        new.last_used
            .fetch_max(old.last_used.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    if let Ok(snapshot) = Arc::try_unwrap(snapshot) {
        drop_paced(snapshot.into_keys(), &mut pacer);
    }
}

/// Frees a large list a slice at a time, pausing in between, so that on a small
/// machine the freeing does not hold a core for long.
fn drop_paced<T>(mut items: Vec<T>, pacer: &mut Pacer) {
    while !items.is_empty() {
        let at = items.len().saturating_sub(256);
        drop(items.split_off(at));
        pacer.pause();
    }
}
