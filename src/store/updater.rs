//! How a source changes its keys in the store: one writer at a time, checked before
//! the swap, reported in order.

use std::{
    fmt,
    sync::{Arc, Weak, atomic::Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{
    Error, KeyChange, KeyInfo, KeySet, KeyUsage, ReloadReport, clock,
    store::change::{self, Source, Update},
    store::shared::{Shared, Writer},
    store::snapshot::{Carried, Snapshot},
};

/// Handle through which a [`KeySource`](crate::KeySource) changes its keys in its
/// store: a complete new set with [`publish`](KeyUpdater::publish), or changes by id
/// with [`apply`](KeyUpdater::apply).
///
/// Every update is checked whole before anything changes (no key under two ids, no
/// id from two sources) and then swapped in atomically: requests see the old keys or
/// the new ones, never a mix. Keys the update does not touch keep their entries and
/// usage counts. Each applied update is a new [`version`](crate::KeyStore::version),
/// reported in [`KeyStore::last_reload`](crate::KeyStore::last_reload) and logged.
///
/// It holds the store weakly: once every layer and store clone is gone,
/// [`KeyUpdater::is_closed`] turns true and updates return [`Error::StoreClosed`],
/// which tells a watching source to stop.
pub struct KeyUpdater {
    shared: Weak<Shared>,
    source: u16,
    name: Arc<str>,
}

/// How long a writer waits for requests still reading a replaced version before it
/// gives up on the few counts they might add. They hold it for one lookup.
const PATIENCE: Duration = Duration::from_secs(1);

impl KeyUpdater {
    pub(crate) fn new(shared: Weak<Shared>, source: u16, name: Arc<str>) -> Self {
        Self {
            shared,
            source,
            name,
        }
    }

    /// Replaces this source's keys with `set`: what `set` lacks is removed, what it
    /// adds or changes is applied, and what it leaves as it was keeps its entry and
    /// counters. Returns the report.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] if another source of the store has one of the ids or keys,
    /// or [`Error::StoreClosed`] if the store is gone. The store keeps its keys, and a
    /// refusal is recorded and logged as a rejected reload.
    pub fn publish(&self, set: KeySet) -> Result<ReloadReport, Error> {
        self.update(Update::Set(&set))
    }

    /// Applies `changes` to this source's keys, all or none: upserts by id and
    /// removals by id. Keys it does not name stay as they are; a one-key change to a
    /// million-key set copies a few hundred keys, not the set.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] for a key no [`KeySet`] would take, [`Error::DuplicateId`]
    /// for an id named twice, [`Error::DuplicateKey`] for one key under two ids,
    /// [`Error::Conflict`] for an id or key of another source, [`Error::StoreClosed`]
    /// if the store is gone. The store keeps its keys, and the refusal is recorded
    /// and logged.
    pub fn apply(
        &self,
        changes: impl IntoIterator<Item = KeyChange>,
    ) -> Result<ReloadReport, Error> {
        let changes: Vec<KeyChange> = changes.into_iter().collect();
        self.update(Update::Changes(&changes))
    }

    fn update(&self, update: Update<'_>) -> Result<ReloadReport, Error> {
        let shared = self.shared.upgrade().ok_or(Error::StoreClosed)?;
        let mut writer = shared.lock();
        let index = usize::from(self.source);
        let result = make(&shared, &mut writer, self.source, update);
        // Each report, with how many keys its source has after it.
        let mut reports = vec![(
            match &result {
                Ok(report) => report.clone(),
                Err(error) => ReloadReport::rejected(self.name.clone(), error.clone()),
            },
            writer.counts[index],
        )];
        match (&result, update) {
            (Ok(_), _) => {
                // A newer state of this source: what it had waiting is stale.
                writer.pending[index] = None;
                retry_pending(&shared, &mut writer, &mut reports);
            }
            // Refused for a key another source holds: tried again once that changes.
            (Err(Error::Conflict { .. }), Update::Set(set)) => {
                writer.pending[index] = Some(set.clone());
            }
            (Err(_), _) => {}
        }
        drop(writer);
        for (report, keys) in &reports {
            match report.is_applied() {
                true => crate::log::applied(report),
                false => crate::log::rejected(report),
            }
            crate::metrics::reloaded(report, *keys);
        }
        result
    }

    /// Records a failed reload attempt (a key file that does not parse, say) without
    /// touching the keys: it is logged at `warn`, and readable from
    /// [`KeyStore::last_reload`](crate::KeyStore::last_reload). Returns the report.
    pub fn reject(&self, error: Error) -> ReloadReport {
        let report = ReloadReport::rejected(self.name.clone(), error);
        if let Some(shared) = self.shared.upgrade() {
            let mut writer = shared.lock();
            // The source's newer state is this failure: a set it had waiting is stale.
            if let Some(pending) = writer.pending.get_mut(usize::from(self.source)) {
                *pending = None;
            }
            shared.reloads.send_replace(Some(report.clone()));
            drop(writer);
        }
        crate::log::rejected(&report);
        crate::metrics::reloaded(&report, 0);
        report
    }

    pub(crate) fn record_failure(&self, error: Error) -> Error {
        self.reject(error.clone());
        error
    }

    /// Whether the store is gone; a watching source should then stop.
    pub fn is_closed(&self) -> bool {
        self.shared.strong_count() == 0
    }

    /// Runs `callback` when the store is dropped (at once if it already is), so a
    /// source waiting for changes can stop without waiting for its next poll.
    #[cfg(feature = "file")]
    pub(crate) fn on_close(&self, callback: impl FnOnce() + Send + 'static) {
        match self.shared.upgrade() {
            Some(shared) => shared
                .on_drop
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(Box::new(callback)),
            None => callback(),
        }
    }

    /// The usage of this source's keys, in no particular order: what a source that
    /// reports usage back to its store of record (a fleet's shared counts) sends.
    pub fn usage(&self) -> Vec<KeyUsage> {
        let Some(shared) = self.shared.upgrade() else {
            return Vec::new();
        };
        let snapshot = shared.current.load();
        snapshot
            .iter()
            .filter(|(_, e, _)| e.source() == self.source)
            .map(|(_, e, usage)| KeyUsage::new(KeyInfo::detached(e.clone()), usage))
            .collect()
    }

    /// The name of the source this updater publishes for.
    pub fn source_name(&self) -> &str {
        &self.name
    }
}

/// Makes the next version from `update` of source `index`, while the writer is held:
/// plans it against the live version, swaps it in, and publishes the report (or the
/// refusal), so that reports go out in the order versions go live.
fn make(
    shared: &Shared,
    writer: &mut Writer,
    index: u16,
    update: Update<'_>,
) -> Result<ReloadReport, Error> {
    let old = shared.current.load_full();
    let at = usize::from(index);
    let name = writer.sources[at].clone();
    let source = Source {
        index,
        store: shared.id,
        name: &name,
        names: &writer.sources,
        count: writer.counts[at],
    };
    let now = clock::exact_now_ms();
    let notice = shared.expiry_notice.load(Ordering::Relaxed);
    let (edit, diff) = match change::plan(&old, &source, update, (now, now.saturating_add(notice)))
    {
        Ok(plan) => plan,
        Err(error) => {
            let report = ReloadReport::rejected(name, error.clone());
            shared.reloads.send_replace(Some(report));
            return Err(error);
        }
    };
    let (mut next, carried) = old.edited(edit);
    next.version = old.version + 1;
    writer.counts[at] = writer.counts[at]
        .saturating_add(diff.added.len())
        .saturating_sub(diff.removed.len());
    let next = Arc::new(next);
    drop(old);
    let replaced = shared.current.swap(next.clone());
    settle(replaced, &next, carried);
    let report = ReloadReport::applied(name, next.version, diff);
    shared.reloads.send_replace(Some(report.clone()));
    Ok(report)
}

/// Applies the sets other sources had refused for a conflict, now that the keys
/// changed: a store converges to what its sources hold without anyone editing a
/// file again. Each success can free another, so this runs until none moves.
fn retry_pending(shared: &Shared, writer: &mut Writer, reports: &mut Vec<(ReloadReport, usize)>) {
    loop {
        let mut moved = false;
        for at in 0..writer.pending.len() {
            let Some(set) = writer.pending[at].take() else {
                continue;
            };
            let index = u16::try_from(at).unwrap_or(u16::MAX);
            match make(shared, writer, index, Update::Set(&set)) {
                Ok(report) => {
                    reports.push((report, writer.counts[at]));
                    moved = true;
                }
                // Still held elsewhere: keep waiting, quietly (it was reported once).
                Err(_) => writer.pending[at] = Some(set),
            }
        }
        if !moved {
            return;
        }
    }
}

/// Waits until no request reads `replaced` any more, then adds what requests counted
/// in it after its counters were copied into `next`. The old version is then freed
/// here, by the writer, unless a request's [`KeyInfo`](crate::KeyInfo) still points
/// into one of its shards (which that request then frees: a few hundred keys).
fn settle(mut replaced: Arc<Snapshot>, next: &Snapshot, carried: Vec<Carried>) {
    // Requests read a version through an `arc_swap` guard, which the swap turned into
    // a reference count. `Arc::try_unwrap` succeeds once ours is the last one, and
    // synchronises with the readers' release of theirs, so every count they made
    // before letting go is visible here.
    let start = Instant::now();
    let old = loop {
        match Arc::try_unwrap(replaced) {
            Ok(old) => break old,
            Err(still_read) if start.elapsed() < PATIENCE => {
                replaced = still_read;
                thread::yield_now();
            }
            // A reader stuck for a second: its counts are lost, nothing else.
            Err(_) => return,
        }
    };
    for Carried {
        old: from,
        new,
        copied,
    } in carried
    {
        let (requests, last_used) = old.slot(from).usage();
        next.slot(new)
            .add_usage(requests.saturating_sub(copied), last_used);
    }
}

impl fmt::Debug for KeyUpdater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyUpdater")
            .field("source", &self.name)
            .field("closed", &self.is_closed())
            .finish()
    }
}
