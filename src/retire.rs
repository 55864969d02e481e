//! Retiring replaced snapshots off the request path.
//!
//! After a swap, requests that loaded the old snapshot may still be using it. A
//! background thread waits for them to finish and adds the usage they counted in the
//! old table to the new one. The old table itself may outlive that: a
//! [`KeyInfo`](crate::KeyInfo) made from it, still in some request's extensions,
//! holds it. The thread keeps such tables and frees each one once no handle is left,
//! so that neither a request nor the reload's caller pays for freeing a large key
//! set.

use std::{
    sync::{
        Arc, OnceLock,
        mpsc::{self, RecvTimeoutError, Sender},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    KeySet,
    background::{Pacer, drop_paced},
    store::Snapshot,
    table::Table,
};

/// A key whose usage counters were copied into the next table.
pub(crate) struct Carried {
    /// Its slot in the old table.
    pub(crate) old: usize,
    /// Its slot in the new one.
    pub(crate) new: usize,
    /// The old slot's request count when it was copied.
    pub(crate) copied: u64,
}

pub(crate) struct Retired {
    pub(crate) snapshot: Arc<Snapshot>,
    /// The table that replaced the snapshot's.
    pub(crate) next: Arc<Table>,
    pub(crate) carried: Vec<Carried>,
    /// The set that was published, freed here rather than by the publisher.
    pub(crate) set: KeySet,
}

/// How long to wait for requests still reading an old snapshot; they hold it for the
/// length of a hash lookup, so this is only reached if something is badly wrong.
const PATIENCE: Duration = Duration::from_secs(10);

/// How often the reaper looks at tables still held by a `KeyInfo`.
const RECHECK: Duration = Duration::from_millis(100);

static REAPER: OnceLock<Option<Sender<Retired>>> = OnceLock::new();

/// Hands `retired` to the reaper thread (or, if it cannot run, settles it here).
pub(crate) fn retire(retired: Retired) {
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Retired>();
        thread::Builder::new()
            .name("tower-api-key-reaper".into())
            .spawn(move || {
                crate::background::enter();
                reap(&rx);
            })
            .ok()
            .map(|_| tx)
    });
    let sent = match reaper {
        Some(tx) => tx.send(retired).map_err(|e| e.0),
        None => Err(retired),
    };
    if let Err(retired) = sent {
        // No reaper: the table is freed by whoever lets go of it last.
        drop(settle(retired));
    }
}

fn reap(rx: &mpsc::Receiver<Retired>) {
    let mut held: Vec<Arc<Table>> = Vec::new();
    loop {
        let next = if held.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(RECHECK)
        };
        match next {
            Ok(retired) => held.push(settle(retired)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // Free every table no `KeyInfo` holds any more.
        let mut i = 0;
        while i < held.len() {
            if Arc::strong_count(&held[i]) == 1 {
                let table = held.swap_remove(i);
                if let Ok(table) = Arc::try_unwrap(table) {
                    free(table);
                }
            } else {
                i += 1;
            }
        }
    }
}

/// Waits for the readers of the old snapshot, settles their late counts, frees what
/// only the reload needed, and returns the old table for freeing.
fn settle(retired: Retired) -> Arc<Table> {
    let Retired {
        snapshot,
        next,
        carried,
        set,
    } = retired;
    let mut pacer = Pacer::new();
    if let Some(keys) = set.into_unshared_keys() {
        drop_paced(keys, &mut pacer);
    }
    let start = Instant::now();
    // `ArcSwap` turned every reader's borrow of the old snapshot into a reference
    // count when it was swapped out: once ours is the last, no request can count
    // into the old table any more.
    while Arc::strong_count(&snapshot) > 1 && start.elapsed() < PATIENCE {
        thread::sleep(Duration::from_millis(1));
    }
    let old = snapshot.table().clone();
    for Carried {
        old: i,
        new: j,
        copied,
    } in carried
    {
        pacer.step();
        let (requests, last_used) = old.slot(i).usage();
        next.slot(j)
            .add_usage(requests.saturating_sub(copied), last_used);
    }
    drop(snapshot);
    old
}

/// Frees a table a slice at a time.
fn free(table: Table) {
    table.drop_paced(&mut Pacer::new());
}
