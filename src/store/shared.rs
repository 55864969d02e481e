//! What a store's clones and its sources' updaters share.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::AtomicU64};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::{
    ReloadReport,
    store::{counters::Counters, pending::Pending, snapshot::Snapshot},
};

pub(crate) struct Shared {
    /// Unique in the process: tells this store's keys from another's.
    pub(crate) id: u64,
    /// The live version, loaded once per request.
    pub(crate) current: ArcSwap<Snapshot>,
    /// The keys' usage counts, which every version shares.
    pub(crate) counters: Arc<Counters>,
    /// Held by whoever makes the next version: one at a time.
    pub(crate) writer: Mutex<Writer>,
    /// The latest reload attempt, sent while the writer is held, so that it always
    /// describes the live version or a later refusal.
    pub(crate) reloads: watch::Sender<Option<ReloadReport>>,
    /// How long before its `expires_at` a key counts as expiring, in milliseconds.
    pub(crate) expiry_notice: AtomicU64,
    /// Run when the store is dropped: how watching sources learn to stop at once.
    pub(crate) on_drop: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
}

/// The writer's own state.
#[derive(Default)]
pub(crate) struct Writer {
    /// The store's sources, by index: their names and how many keys each has.
    pub(crate) sources: Vec<Arc<str>>,
    pub(crate) counts: Vec<usize>,
    /// Whether each source's limits are its fleet's ([`KeySource::fleet_limits`](crate::KeySource::fleet_limits)).
    pub(crate) fleet: Vec<bool>,
    /// A complete set each source published that was refused for a key or id another
    /// source held: tried again once one of those is let go.
    pub(crate) pending: Vec<Option<Pending>>,
    /// How many updates have been planned, for the tests that check a waiting set is
    /// not planned again for nothing.
    #[cfg(test)]
    pub(crate) plans: usize,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Writer> {
        // The writer's state stays consistent even if a publisher panicked mid-way:
        // the snapshot is only ever replaced whole, and counts after the swap.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let callbacks = std::mem::take(
            self.on_drop
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for callback in callbacks {
            callback();
        }
    }
}
