use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::{
    ApiKey, Error, KeyInfo, KeySet, KeySource, Rejection,
    background::Pacer,
    clock,
    future::Sunset,
    key::{KeyDigest, KeyEntry, Meta, SharedMeta},
    report::{Diff, KeyUsage, ReloadReport},
    retire::{self, Carried, Retired},
    table::{self, Table, TableHandle},
};

/// The shared, swappable set of keys that [`ApiKeyService`](crate::ApiKeyService) checks
/// requests against.
///
/// Every request does one lock-free load of the current snapshot and one hash-map lookup
/// by the SHA-256 digest of the presented key; a reload builds a complete new snapshot
/// and swaps it in atomically, so a request sees the old set or the new one, never a mix.
///
/// A store is fed by one or more [`KeySource`]s. Cloning it is cheap and every clone
/// shares the same keys. A store with no keys refuses every request: it never fails open.
///
/// # Example
///
/// ```
/// use tower_api_key::{ApiKey, ApiKeyLayer, KeySet, KeyStore};
///
/// let store = KeyStore::new();
/// assert_eq!((store.len(), store.version()), (0, 0));
///
/// store.add_source(KeySet::from_keys([ApiKey::new("ci", "s3cr3t")])?)?;
/// assert_eq!((store.len(), store.version()), (1, 1));
///
/// let layer = ApiKeyLayer::from_store(store.clone());
/// assert_eq!(layer.store().version(), 1);
/// # Ok::<(), tower_api_key::Error>(())
/// ```
#[derive(Clone)]
pub struct KeyStore {
    shared: Arc<Shared>,
}

struct Shared {
    current: ArcSwap<Snapshot>,
    writer: Mutex<Writer>,
    reloads: watch::Sender<Option<ReloadReport>>,
    /// How long before its `expires_at` a key counts as expiring, in milliseconds.
    expiry_notice: AtomicU64,
    /// Run when the store is dropped: how watching sources learn to stop at once.
    on_drop: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
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

/// A key accepted by [`KeyStore::check`].
pub(crate) struct Accepted {
    pub(crate) key: KeyInfo,
    /// The headers announcing the key's expiry, if it falls within the notice.
    pub(crate) sunset: Option<Sunset>,
}

/// The default [`KeyStore::set_expiry_notice`]: seven days.
const DEFAULT_EXPIRY_NOTICE: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Default)]
struct Writer {
    sources: Vec<Arc<str>>,
}

/// One immutable generation of the key set.
pub(crate) struct Snapshot {
    version: u64,
    table: Arc<Table>,
    /// The handles [`KeyInfo`]s made from this snapshot hold (see
    /// [`table::this_threads`]).
    handles: Box<[Arc<TableHandle>]>,
}

impl Snapshot {
    fn new(table: Table) -> Self {
        let table = Arc::new(table);
        Self {
            version: 0,
            handles: table::handles(&table),
            table,
        }
    }

    /// The table, for the reaper (which frees it once no [`KeyInfo`] points into it).
    pub(crate) fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// The key in slot `i`, as a [`KeyInfo`] that does not hold the table.
    fn detached(&self, i: usize) -> KeyInfo {
        KeyInfo::detached(self.table.entry_at(i).clone())
    }

    /// The slot of the key with this id.
    fn find_id(&self, id: &str) -> Option<usize> {
        self.table
            .iter()
            .find(|(_, _, e)| &*e.id == id)
            .map(|(i, _, _)| i)
    }
}

impl Default for Snapshot {
    fn default() -> Self {
        Self::new(Table::default())
    }
}

impl KeyEntry {
    /// Whether the key may be used now: not disabled, and inside its window.
    #[inline]
    fn check(&self, now_ms: u64, key: impl FnOnce() -> KeyInfo) -> Result<(), Rejection> {
        if self.disabled() {
            return Err(Rejection::Disabled(key()));
        }
        if self.windowed() {
            let (from, until) = (self.valid_from(), self.valid_until());
            // Trust the coarse clock only well inside the window.
            let now = if now_ms >= from.saturating_add(clock::MARGIN_MS)
                && now_ms.saturating_add(clock::MARGIN_MS) < until
            {
                now_ms
            } else {
                clock::exact_now_ms()
            };
            if now < from {
                return Err(Rejection::NotYetValid(key()));
            }
            if now >= until {
                return Err(Rejection::Expired(key()));
            }
        }
        Ok(())
    }
}

impl KeyStore {
    /// An empty store, fed by no source yet: it refuses every request.
    #[must_use]
    pub fn new() -> Self {
        clock::start();
        Self {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(Snapshot::default()),
                writer: Mutex::new(Writer::default()),
                reloads: watch::Sender::new(None),
                expiry_notice: AtomicU64::new(duration_ms(DEFAULT_EXPIRY_NOTICE)),
                on_drop: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Attaches a source: loads its initial key set into the store, then lets it keep
    /// the store up to date (see [`KeySource::watch`]).
    ///
    /// Returns after the initial load. Keys from several sources are merged; see
    /// [`KeyUpdater::publish`] for how conflicts between them are handled.
    ///
    /// # Errors
    ///
    /// The source's initial load failed, or its keys clash with another source's. The
    /// store keeps what it had (refusing everything if it had nothing), the failure is
    /// recorded in [`KeyStore::last_reload`] and logged, and the source is still
    /// watched, so a key file that is fixed later is picked up.
    ///
    /// # Panics
    ///
    /// If more than 65,536 sources are added to one store.
    pub fn add_source<S: KeySource>(&self, mut source: S) -> Result<(), Error> {
        let name: Arc<str> = source.name().into();
        let index = {
            let mut writer = self.shared.lock();
            writer.sources.push(name.clone());
            u16::try_from(writer.sources.len() - 1).expect("at most 65,536 sources per store")
        };
        let updater = KeyUpdater {
            shared: Arc::downgrade(&self.shared),
            source: index,
            name,
        };
        let result = match source.load() {
            Ok(set) => updater.publish(set).map(drop),
            Err(error) => Err(updater.record_failure(error)),
        };
        Box::new(source).watch(updater);
        result
    }

    /// Sets how long before its `expires_at` a key counts as expiring (default seven
    /// days). Reloads then report such keys ([`ReloadReport::expiring`], logged at
    /// `warn`), and a layer with
    /// [`deprecation_headers`](crate::ApiKeyLayer::deprecation_headers) announces the
    /// coming expiry to the clients using them.
    pub fn set_expiry_notice(&self, notice: Duration) {
        self.shared
            .expiry_notice
            .store(duration_ms(notice), Ordering::Relaxed);
    }

    /// How long before its `expires_at` a key counts as expiring.
    pub fn expiry_notice(&self) -> Duration {
        Duration::from_millis(self.shared.expiry_notice.load(Ordering::Relaxed))
    }

    /// The number of keys currently loaded (over all sources).
    pub fn len(&self) -> usize {
        self.shared.current.load().table.len()
    }

    /// Whether no key is loaded, in which case every request is refused.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The version of the current key set: 0 before the first load, then one more at
    /// every applied reload.
    pub fn version(&self) -> u64 {
        self.shared.current.load().version
    }

    /// The key with this id, if loaded.
    pub fn get(&self, id: &str) -> Option<KeyInfo> {
        let snapshot = self.shared.current.load();
        snapshot.find_id(id).map(|i| snapshot.detached(i))
    }

    /// Every loaded key, sorted by id.
    pub fn keys(&self) -> Vec<KeyInfo> {
        let snapshot = self.shared.current.load();
        let mut keys: Vec<_> = snapshot
            .table
            .iter()
            .map(|(_, _, e)| KeyInfo::detached(e.clone()))
            .collect();
        keys.sort_by(|a, b| a.id().cmp(b.id()));
        keys
    }

    /// Request counts and last use of every loaded key, sorted by id: how an operator
    /// sees that an old key has gone idle before revoking it.
    ///
    /// Counts survive reloads for ids that stay in the set.
    pub fn usage(&self) -> Vec<KeyUsage> {
        let snapshot = self.shared.current.load();
        let mut usage: Vec<_> = snapshot
            .table
            .iter()
            .map(|(_, slot, e)| KeyUsage::new(KeyInfo::detached(e.clone()), slot.usage()))
            .collect();
        usage.sort_by(|a, b| a.key().id().cmp(b.key().id()));
        usage
    }

    /// Request count and last use of the key with this id, if loaded.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_api_key::{ApiKey, ApiKeyLayer, KeySet};
    ///
    /// let layer = ApiKeyLayer::new(KeySet::from_keys([ApiKey::new("old", "k1")])?);
    /// let usage = layer.store().usage_of("old").expect("loaded");
    /// assert_eq!((usage.requests(), usage.last_used()), (0, None));
    /// # Ok::<(), tower_api_key::Error>(())
    /// ```
    pub fn usage_of(&self, id: &str) -> Option<KeyUsage> {
        let snapshot = self.shared.current.load();
        let i = snapshot.find_id(id)?;
        Some(KeyUsage::new(
            snapshot.detached(i),
            snapshot.table.slot(i).usage(),
        ))
    }

    /// Checks a key outside an HTTP request (a WebSocket message, a queue consumer, a
    /// command-line tool): the same lookup and checks the layer makes, counted in
    /// [`usage`](KeyStore::usage) like a request.
    ///
    /// # Errors
    ///
    /// Why the key is refused: [`Rejection::Unknown`], `Disabled`, `Expired` or
    /// `NotYetValid`.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_api_key::{ApiKey, KeySet, KeyStore, Rejection};
    ///
    /// let store = KeyStore::new();
    /// store.add_source(KeySet::from_keys([ApiKey::new("worker", "s3cr3t")])?)?;
    /// assert_eq!(store.verify("s3cr3t").unwrap().id(), "worker");
    /// assert!(matches!(store.verify("guess"), Err(Rejection::Unknown)));
    /// # Ok::<(), tower_api_key::Error>(())
    /// ```
    pub fn verify(&self, key: impl AsRef<[u8]>) -> Result<KeyInfo, Rejection> {
        // A clone does not hold the key set: the caller may keep it as long as it likes.
        self.check(key.as_ref(), None, true)
            .map(|accepted| accepted.key.clone())
    }

    /// The outcome of the most recent reload attempt of any source, applied or refused.
    pub fn last_reload(&self) -> Option<ReloadReport> {
        self.shared.reloads.borrow().clone()
    }

    /// Subscribes to reload attempts, so a program (or a test) can wait for one instead
    /// of sleeping.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_api_key::{ApiKey, ChannelSource, KeySet, KeyStore};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_api_key::Error> {
    /// let (source, publisher) = ChannelSource::new(KeySet::new());
    /// let store = KeyStore::new();
    /// store.add_source(source)?;
    /// let mut reloads = store.subscribe();
    ///
    /// publisher.publish(KeySet::from_keys([ApiKey::new("new", "k")])?)?;
    /// let report = reloads.next().await.expect("store alive");
    /// assert!(report.is_applied());
    /// assert_eq!(report.added(), ["new"]);
    /// # Ok(()) }
    /// ```
    pub fn subscribe(&self) -> Reloads {
        let mut rx = self.shared.reloads.subscribe();
        rx.mark_unchanged();
        Reloads { rx }
    }

    /// Looks up a presented key: the request path. One load, one lookup, no lock.
    #[inline]
    pub(crate) fn check(
        &self,
        presented: &[u8],
        required_scope: Option<&Arc<str>>,
        track_usage: bool,
    ) -> Result<Accepted, Rejection> {
        let digest = KeyDigest::of(presented);
        let snapshot = self.shared.current.load();
        let table = &snapshot.table;
        let Some(i) = table.find(&digest) else {
            return Err(Rejection::Unknown);
        };
        let slot = table.slot(i);
        let now = clock::coarse_now_ms();
        // The slot has the flags: the entry is read only for a key with a window or a
        // flag set, or when a scope is required.
        if slot.is_disabled() || slot.is_windowed() {
            table.entry_at(i).check(now, || snapshot.detached(i))?;
        }
        if let Some(scope) = required_scope
            && !table.entry_at(i).has_scope(scope)
        {
            return Err(Rejection::InsufficientScope {
                key: snapshot.detached(i),
                scope: scope.clone(),
            });
        }
        if track_usage {
            slot.touch(now);
        }
        let sunset = if slot.is_windowed() {
            let until = table.entry_at(i).valid_until();
            let notice = self.shared.expiry_notice.load(Ordering::Relaxed);
            (until != u64::MAX && now.saturating_add(notice) >= until)
                .then(|| Sunset::new(until, notice))
        } else {
            None
        };
        let handle = table::this_threads(&snapshot.handles).clone();
        Ok(Accepted {
            key: KeyInfo::in_table(handle, i),
            sunset,
        })
    }
}

impl Default for KeyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snapshot = self.shared.current.load();
        f.debug_struct("KeyStore")
            .field("keys", &snapshot.table.len())
            .field("version", &snapshot.version)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Writer> {
        // The writer's state stays consistent even if a publisher panicked mid-way:
        // the snapshot is only ever replaced whole.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn report(&self, report: ReloadReport) {
        if let Some(previous) = self.reloads.send_replace(Some(report)) {
            previous.drop_paced();
        }
    }
}

/// Handle through which a [`KeySource`] publishes new key sets into its store.
///
/// It holds the store weakly: once every layer and store clone is gone,
/// [`KeyUpdater::is_closed`] turns true and publishing returns [`Error::StoreClosed`],
/// which tells a watching source to stop.
#[derive(Clone)]
pub struct KeyUpdater {
    shared: Weak<Shared>,
    source: u16,
    name: Arc<str>,
}

impl KeyUpdater {
    /// Replaces this source's keys with `set`, atomically, and returns what changed.
    ///
    /// The store serves the union of all its sources' keys. A set in which a key (or
    /// a key id) is also claimed by another source is refused as a whole with
    /// [`Error::Conflict`]; the store then keeps its previous keys.
    ///
    /// Every attempt, applied or refused, is recorded in [`KeyStore::last_reload`] and
    /// sent to [`KeyStore::subscribe`]rs. An applied set is logged at `info` with the
    /// ids added, removed and kept; a refused one at `warn` with the reason.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`], or [`Error::StoreClosed`] if the store is gone.
    pub fn publish(&self, set: KeySet) -> Result<ReloadReport, Error> {
        let shared = self.shared.upgrade().ok_or(Error::StoreClosed)?;
        let writer = shared.lock();
        let old = shared.current.load_full();
        let notice = shared.expiry_notice.load(Ordering::Relaxed);
        match self.merge(&old, &set, &writer, notice) {
            Ok((mut next, carried, diff)) => {
                next.version = old.version + 1;
                let report = ReloadReport::applied(self.name.clone(), next.version, diff);
                let next_table = next.table.clone();
                shared.current.store(Arc::new(next));
                drop(writer);
                retire::retire(Retired {
                    snapshot: old,
                    next: next_table,
                    carried,
                    set,
                });
                crate::log::applied(&report);
                shared.report(report.clone());
                Ok(report)
            }
            Err(error) => {
                drop(writer);
                Err(self.record_failure(error))
            }
        }
    }

    /// Records a failed reload attempt (a key file that does not parse, say) without
    /// touching the keys: it is logged at `warn`, and readable from
    /// [`KeyStore::last_reload`]. Returns the report.
    pub fn reject(&self, error: Error) -> ReloadReport {
        let report = ReloadReport::rejected(self.name.clone(), error);
        crate::log::rejected(&report);
        if let Some(shared) = self.shared.upgrade() {
            shared.report(report.clone());
        }
        report
    }

    fn record_failure(&self, error: Error) -> Error {
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
                .unwrap_or_else(PoisonError::into_inner)
                .push(Box::new(callback)),
            None => callback(),
        }
    }

    /// The name of the source this updater publishes for.
    pub fn source_name(&self) -> &str {
        &self.name
    }

    /// Builds the next snapshot: the other sources' keys, plus `set` as this
    /// source's. Entries that did not change are shared with the old snapshot; a key
    /// whose definition changed gets a new entry. Every key whose id stays carries
    /// its usage counts over (and the reaper adds what requests still reading the old
    /// snapshot count after the copy).
    fn merge(
        &self,
        old: &Snapshot,
        set: &KeySet,
        writer: &Writer,
        notice: u64,
    ) -> Result<(Snapshot, Vec<Carried>, Diff), Error> {
        let source = self.source;
        let ours = old
            .table
            .iter()
            .filter(|(_, _, e)| e.source() == source)
            .count();
        let others = old.table.len() - ours;
        let mut table = Table::with_capacity(others + set.len());
        let mut carried = Vec::with_capacity(old.table.len().min(others + set.len()));
        let mut other_ids: HashMap<&str, u16> = HashMap::with_capacity(others);
        let mut pacer = Pacer::new();
        for (i, slot, entry) in old.table.iter().filter(|(_, _, e)| e.source() != source) {
            pacer.step();
            other_ids.insert(&entry.id, entry.source());
            let usage = slot.usage();
            // Digests are unique within a snapshot, so this cannot clash.
            if let Ok(j) = table.insert(slot.digest(), entry.clone(), usage) {
                carried.push(Carried {
                    old: i,
                    new: j,
                    copied: usage.0,
                });
            }
        }
        // This source's old keys by id, built only if some key changed.
        let mut old_by_id: Option<HashMap<&str, usize>> = None;
        let mut metas: HashMap<(Option<&Meta>, u64, u64, bool), Arc<SharedMeta>> = HashMap::new();
        let no_meta = Meta::default();
        let mut diff = Diff::default();
        diff.kept.reserve(ours.min(set.len()));
        let now = clock::exact_now_ms();
        for key in set {
            pacer.step();
            if !other_ids.is_empty()
                && let Some(&other) = other_ids.get(&*key.id)
            {
                return Err(self.conflict(key, key.id.to_string(), other, writer));
            }
            let key_meta = key.meta.as_deref().unwrap_or(&no_meta);
            let shared_key = (
                key.meta.as_deref(),
                key.valid_from,
                key.valid_until,
                key.disabled,
            );
            // One lookup in the old table per key: for a large reload each is a trip to
            // memory.
            let hit = old.table.find(&key.digest);
            let meta = metas.entry(shared_key).or_insert_with(|| {
                let fresh = SharedMeta {
                    source: self.name.clone(),
                    index: source,
                    meta: key_meta.clone(),
                    valid_from: key.valid_from,
                    valid_until: key.valid_until,
                    disabled: key.disabled,
                };
                // Share the previous snapshot's copy when it is the same, so unchanged
                // keys usually compare equal by pointer.
                hit.map(|i| &old.table.entry_at(i).shared)
                    .filter(|m| ***m == fresh)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(fresh))
            });
            let previous = hit.filter(|&i| {
                let e = old.table.entry_at(i);
                e.source() == source && *e.id == *key.id
            });
            let (entry, from) = match previous {
                Some(i) if old.table.entry_at(i).same_as(key, meta) => {
                    diff.kept.push(key.id.clone());
                    (old.table.entry_at(i).clone(), Some(i))
                }
                _ => {
                    let new = Arc::new(KeyEntry::new(key, meta.clone()));
                    let previous = previous.or_else(|| {
                        let by_id = old_by_id.get_or_insert_with(|| {
                            let mut by_id = HashMap::with_capacity(ours);
                            for (i, _, e) in
                                old.table.iter().filter(|(_, _, e)| e.source() == source)
                            {
                                pacer.step();
                                by_id.insert(&*e.id, i);
                            }
                            by_id
                        });
                        by_id.get(&*key.id).copied()
                    });
                    match previous {
                        Some(_) => diff.kept.push(key.id.clone()),
                        None => diff.added.push(key.id.clone()),
                    }
                    (new, previous)
                }
            };
            let until = key.valid_until;
            if !key.disabled
                && until != u64::MAX
                && until > now
                && until <= now.saturating_add(notice)
            {
                diff.expiring.push(key.id.clone());
            }
            let usage = from.map_or((0, 0), |i| old.table.slot(i).usage());
            match table.insert(key.digest, entry, usage) {
                Ok(j) => {
                    if let Some(i) = from {
                        carried.push(Carried {
                            old: i,
                            new: j,
                            copied: usage.0,
                        });
                    }
                }
                Err(j) => {
                    let clash = table.entry_at(j);
                    let (other_id, other) = (clash.id.to_string(), clash.source());
                    return Err(self.conflict(key, other_id, other, writer));
                }
            }
        }
        if diff.kept.len() < ours {
            diff.removed = old
                .table
                .iter()
                .filter(|(_, _, e)| {
                    pacer.step();
                    e.source() == source && set.get(&e.id).is_none()
                })
                .map(|(_, _, e)| e.id.clone())
                .collect();
            diff.removed.sort();
        }
        Ok((Snapshot::new(table), carried, diff))
    }

    fn conflict(&self, key: &ApiKey, other_id: String, other: u16, writer: &Writer) -> Error {
        Error::Conflict {
            id: key.id.to_string(),
            other_id,
            other_source: writer
                .sources
                .get(usize::from(other))
                .map(|s| s.to_string())
                .unwrap_or_default(),
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl fmt::Debug for KeyUpdater {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyUpdater")
            .field("source", &self.name)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// A stream of reload attempts, from [`KeyStore::subscribe`].
///
/// It always yields the most recent attempt: a subscriber that falls behind skips
/// intermediate ones rather than queueing them.
#[derive(Debug)]
pub struct Reloads {
    rx: watch::Receiver<Option<ReloadReport>>,
}

impl Reloads {
    /// Waits for the next reload attempt after the last one seen. Returns `None` once
    /// the store is gone.
    pub async fn next(&mut self) -> Option<ReloadReport> {
        loop {
            self.rx.changed().await.ok()?;
            if let Some(report) = self.rx.borrow_and_update().clone() {
                return Some(report);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ApiKey, ChannelSource};

    fn set(keys: &[(&str, &str)]) -> KeySet {
        KeySet::from_keys(
            keys.iter()
                .map(|(id, secret)| ApiKey::new(*id, *secret).with_scopes(["read"])),
        )
        .unwrap()
    }

    #[test]
    fn unchanged_keys_keep_their_entry_across_reloads() {
        let (source, publisher) = ChannelSource::new(set(&[("a", "ka"), ("b", "kb")]));
        let store = KeyStore::new();
        store.add_source(source).unwrap();
        let before = store.get("b").unwrap();
        // A new key first, with the same metadata: the unchanged ones must still be
        // recognised as unchanged, and keep their entry (and counters).
        publisher
            .publish(set(&[("new", "kn"), ("a", "ka"), ("b", "kb")]))
            .unwrap();
        let after = store.get("b").unwrap();
        assert!(before.same_entry(&after));
        // A changed definition gets a new entry.
        publisher
            .publish(set(&[("a", "ka"), ("b", "kb2")]))
            .unwrap();
        assert!(!after.same_entry(&store.get("b").unwrap()));
    }

    /// Waits (bounded) until `done`.
    fn eventually(what: &str, done: impl Fn() -> bool) {
        let start = std::time::Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_request_s_key_info_holds_its_table_until_dropped() {
        let (source, publisher) = ChannelSource::new(set(&[("a", "ka")]));
        let store = KeyStore::new();
        store.add_source(source).unwrap();
        let old = Arc::downgrade(store.shared.current.load().table());
        // What the layer puts in a request: a handle on the table it was checked in.
        let in_request = store.check(b"ka", None, true).unwrap().key;
        publisher.publish(set(&[("b", "kb")])).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(old.upgrade().is_some(), "still read through the handle");
        assert_eq!(in_request.id(), "a");
        // Dropping it lets the reaper free the replaced table (not the request).
        drop(in_request);
        eventually("the old table to be freed", || old.upgrade().is_none());
    }

    #[test]
    fn a_cloned_key_info_does_not_hold_the_table() {
        let (source, publisher) = ChannelSource::new(set(&[("a", "ka")]));
        let store = KeyStore::new();
        store.add_source(source).unwrap();
        let old = Arc::downgrade(store.shared.current.load().table());
        let in_request = store.check(b"ka", None, true).unwrap().key;
        let kept = in_request.clone();
        let verified = store.verify("ka").unwrap();
        drop(in_request);
        publisher.publish(set(&[("b", "kb")])).unwrap();
        eventually("the old table to be freed", || old.upgrade().is_none());
        assert_eq!((kept.id(), verified.id()), ("a", "a"));
        assert_eq!(kept.scopes().collect::<Vec<_>>(), ["read"]);
    }

    #[test]
    fn usage_counted_in_a_replaced_table_reaches_the_new_one() {
        let (source, publisher) = ChannelSource::new(set(&[("a", "ka")]));
        let store = KeyStore::new();
        store.add_source(source).unwrap();
        // A request that loaded the table before the swap and counts after the copy.
        let before = store.shared.current.load_full();
        store.verify("ka").unwrap();
        publisher.publish(set(&[("a", "ka"), ("b", "kb")])).unwrap();
        let slot = before.table.find(&KeyDigest::of(b"ka")).unwrap();
        before.table.slot(slot).touch(clock::exact_now_ms());
        drop(before);
        eventually("the late request to be counted", || {
            store.usage_of("a").unwrap().requests() == 2
        });
    }
    #[test]
    fn a_clash_with_another_source_names_the_first_key_in_order() {
        let store = KeyStore::new();
        store
            .add_source(set(&[("x", "s1"), ("y", "s2"), ("z", "s3")]))
            .unwrap();
        // However the table is built, the error follows the set's order.
        for (first, second) in [("p", "q"), ("q", "p")] {
            let err = store
                .add_source(set(&[(first, "s2"), ("ok", "fresh"), (second, "s1")]))
                .unwrap_err();
            let Error::Conflict { id, other_id, .. } = err else {
                panic!("{err:?}");
            };
            assert_eq!((id.as_str(), other_id.as_str()), (first, "y"));
        }
        assert_eq!(store.len(), 3, "nothing of the refused sets was applied");
    }
}
