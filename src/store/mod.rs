//! The store's front: what layers and programs read.

pub(crate) mod change;
pub(crate) mod counters;
pub(crate) mod entry;
mod pending;
mod report;
pub(crate) mod shard;
pub(crate) mod shared;
pub(crate) mod snapshot;
mod updater;
mod usage;

pub use self::{change::KeyChange, report::ReloadReport, updater::KeyUpdater, usage::KeyUsage};

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use self::{
    counters::Counters,
    shared::{Shared, Writer},
    snapshot::Snapshot,
};
use crate::{
    ApiKey, Error, KeyInfo, KeySource, Rejection,
    clock::{self, duration_ms},
    key::digest::KeyDigest,
    limit,
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

/// A key accepted by [`KeyStore::check`].
pub(crate) struct Accepted {
    pub(crate) key: KeyInfo,
    /// The key's `expires_at` (Unix milliseconds), for a key with a validity window.
    pub(crate) expires_at: Option<u64>,
    /// Whether the key has limits (its `RateLimit` fields may be wanted).
    pub(crate) limited: bool,
}

/// The default [`KeyStore::set_expiry_notice`]: seven days.
const DEFAULT_EXPIRY_NOTICE: Duration = Duration::from_secs(7 * 24 * 3600);

impl KeyStore {
    /// An empty store, fed by no source yet: it refuses every request.
    #[must_use]
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                id: {
                    static NEXT: AtomicU64 = AtomicU64::new(1);
                    NEXT.fetch_add(1, Ordering::Relaxed)
                },
                current: ArcSwap::from_pointee(Snapshot::default()),
                counters: Arc::new(Counters::new()),
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
            writer.counts.push(0);
            writer.fleet.push(source.fleet_limits());
            writer.pending.push(None);
            u16::try_from(writer.sources.len() - 1).expect("at most 65,536 sources per store")
        };
        let updater = KeyUpdater::new(Arc::downgrade(&self.shared), index, name);
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
        self.shared.current.load().len()
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

    /// The key with this id, if loaded: a lookup in the id index.
    pub fn get(&self, id: &str) -> Option<KeyInfo> {
        let snapshot = self.shared.current.load();
        snapshot
            .by_id(id)
            .map(|(e, _)| KeyInfo::detached(e.clone()))
    }

    /// Every loaded key, sorted by id.
    pub fn keys(&self) -> Vec<KeyInfo> {
        let mut keys: Vec<_> = (self.shared.current.load().iter())
            .map(|(_, e, _)| KeyInfo::detached(e.clone()))
            .collect();
        keys.sort_by(|a, b| a.id().cmp(b.id()));
        keys
    }

    /// Request counts and last use of every loaded key, sorted by id: how an operator
    /// sees that an old key has gone idle before revoking it.
    ///
    /// Counts survive updates that keep a key's id.
    pub fn usage(&self) -> Vec<KeyUsage> {
        let snapshot = self.shared.current.load_full();
        let counts = (self.shared.counters).usage(snapshot.iter().map(|(_, _, c)| c));
        let mut usage: Vec<_> = (snapshot.iter().zip(counts))
            .map(|((_, e, _), u)| KeyUsage::new(KeyInfo::detached(e.clone()), u))
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
        let (entry, counter) = {
            let snapshot = self.shared.current.load();
            let (entry, counter) = snapshot.by_id(id)?;
            (entry.clone(), counter)
        };
        let usage = self
            .shared
            .counters
            .usage([counter])
            .pop()
            .unwrap_or_default();
        Some(KeyUsage::new(KeyInfo::detached(entry), usage))
    }

    /// Checks a key outside an HTTP request (a WebSocket message, a queue consumer, a
    /// command-line tool): the same lookup and checks the layer makes, counted in
    /// [`usage`](KeyStore::usage) like a request. A key's rate limits and quota count
    /// it too; a key with `allowed_ips` is refused, since no client address is known
    /// here.
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
        // No request, no address: a key with `allowed_ips` is refused here.
        self.check(key.as_ref(), None, true, || None)
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

    /// An updater for a new source named `name`, as [`KeyStore::add_source`] makes.
    #[cfg(test)]
    pub(crate) fn updater_for_tests(&self, name: &str) -> KeyUpdater {
        let mut writer = self.shared.lock();
        writer.sources.push(name.into());
        writer.counts.push(0);
        writer.fleet.push(false);
        writer.pending.push(None);
        let index = u16::try_from(writer.sources.len() - 1).unwrap_or(u16::MAX);
        KeyUpdater::new(Arc::downgrade(&self.shared), index, name.into())
    }

    /// Whether the store serves exactly `key`: its id, its secret, and every field as
    /// `key` has it (scopes, tenant, validity window, `disabled`, …). A program that
    /// changes keys through a store of record (a file, a database) can wait for this
    /// to hold before it tells anyone the change is in force.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_api_key::{ApiKey, KeySet, KeyStore};
    ///
    /// let store = KeyStore::new();
    /// let key = ApiKey::new("ci", "s3cr3t").with_scopes(["read"]);
    /// store.add_source(KeySet::from_keys([key.clone()])?)?;
    /// assert!(store.contains(&key));
    /// assert!(!store.contains(&key.clone().with_scopes(["write"])));
    /// assert!(!store.contains(&ApiKey::new("ci", "another-secret").with_scopes(["read"])));
    /// # Ok::<(), tower_api_key::Error>(())
    /// ```
    pub fn contains(&self, key: &ApiKey) -> bool {
        let snapshot = self.shared.current.load();
        snapshot.digest_of(&key.id) == Some(key.digest)
            && snapshot
                .by_id(&key.id)
                .is_some_and(|(e, _)| e.shared.describes(key))
    }

    /// Whether `key` was let in by this store.
    pub(crate) fn owns(&self, key: &KeyInfo) -> bool {
        key.entry().shared.store == self.shared.id
    }

    /// The expiry notice, in milliseconds.
    pub(crate) fn expiry_notice_ms(&self) -> u64 {
        self.shared.expiry_notice.load(Ordering::Relaxed)
    }

    /// Looks up a presented key: the request path. One load, one lookup, no lock;
    /// `client` is asked for the client's address only for a key with `allowed_ips`.
    #[inline]
    pub(crate) fn check(
        &self,
        presented: &[u8],
        required_scope: Option<&Arc<str>>,
        track_usage: bool,
        client: impl FnOnce() -> Option<std::net::IpAddr>,
    ) -> Result<Accepted, Rejection> {
        let digest = KeyDigest::of(presented);
        let snapshot = self.shared.current.load();
        let Some((shard, i, handle)) = snapshot.lookup(&digest, shard::group()) else {
            return Err(Rejection::Unknown);
        };
        let slot = shard.slot(i);
        let key = || KeyInfo::in_shard(handle.clone(), i);
        // The slot has the flags: the entry is read only for a key with a window or a
        // flag set, or when a scope is required.
        let mut expires_at = None;
        let mut limiter = None;
        if slot.is_disabled() || slot.is_windowed() {
            let Some(entry) = shard.entry_at(i) else {
                return Err(Rejection::Unknown);
            };
            if entry.disabled() {
                return Err(Rejection::Disabled(key()));
            }
            if entry.windowed() {
                let now = clock::exact_now_ms();
                if now < entry.valid_from() {
                    return Err(Rejection::NotYetValid(key()));
                }
                if now >= entry.valid_until() {
                    return Err(Rejection::Expired(key()));
                }
                expires_at = Some(entry.valid_until());
            }
            limiter = entry.limiter.as_deref();
        }
        if let Some(scope) = required_scope
            && !shard.entry_at(i).is_some_and(|e| e.has_scope(scope))
        {
            return Err(Rejection::InsufficientScope {
                key: key(),
                scope: scope.clone(),
            });
        }
        // Limits last: a request refused for another reason is counted by none.
        if let Some(limiter) = limiter {
            decide_limits(limiter, client).map_err(|refuse| refuse(key()))?;
        }
        if track_usage {
            self.shared
                .counters
                .record(slot.counter(), clock::now_secs());
        }
        Ok(Accepted {
            key: key(),
            expires_at,
            limited: limiter.is_some(),
        })
    }
}

/// Decides a limited key's request: its address, then its limits. Out of line, so
/// that the lookup of a key without limits stays small; on refusal, what makes the
/// rejection from the key.
#[inline(never)]
fn decide_limits(
    limiter: &limit::state::Limiter,
    client: impl FnOnce() -> Option<std::net::IpAddr>,
) -> Result<(), Box<dyn FnOnce(KeyInfo) -> Rejection>> {
    if let Err(address) = limiter.allows(client) {
        return Err(Box::new(move |key| Rejection::AddressNotAllowed {
            key,
            address,
        }));
    }
    if let Err(refusal) = limiter.admit(limit::state::now_ns(), clock::coarse_now_ms) {
        return Err(Box::new(move |key| Rejection::limited(key, refusal)));
    }
    Ok(())
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
            .field("keys", &snapshot.len())
            .field("version", &snapshot.version)
            .finish_non_exhaustive()
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
    use crate::{ApiKey, ChannelSource, KeyChange, KeySet};

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
        let report = publisher
            .publish(set(&[("new", "kn"), ("a", "ka"), ("b", "kb")]))
            .unwrap();
        assert_eq!(
            (report.added(), report.kept()),
            (vec!["new"], vec!["a", "b"])
        );
        assert!(before.same_entry(&store.get("b").unwrap()));
        // A changed definition gets a new entry, and is reported as changed.
        let report = publisher
            .publish(set(&[("a", "ka"), ("b", "kb2")]))
            .unwrap();
        assert_eq!(report.changed(), ["b"]);
        assert_eq!(report.removed(), ["new"]);
        assert_eq!(report.kept(), ["a"]);
        assert!(!before.same_entry(&store.get("b").unwrap()));
    }

    #[test]
    fn a_new_definition_of_the_same_secret_is_applied() {
        let (source, publisher) = ChannelSource::new(set(&[("a", "ka"), ("b", "kb")]));
        let store = KeyStore::new();
        store.add_source(source).unwrap();
        let report = publisher
            .publish(
                KeySet::from_keys([
                    ApiKey::new("a", "ka")
                        .with_scopes(["read", "write"])
                        .with_owner("o"),
                    ApiKey::new("b", "kb")
                        .with_scopes(["read"])
                        .with_disabled(true),
                ])
                .unwrap(),
            )
            .unwrap();
        assert_eq!(report.changed(), ["a", "b"]);
        let a = store.get("a").unwrap();
        assert_eq!(
            (a.scopes().collect::<Vec<_>>(), a.owner()),
            (vec!["read", "write"], Some("o"))
        );
        assert!(matches!(store.verify("kb"), Err(Rejection::Disabled(_))));
        // And back, by id.
        publisher
            .apply([KeyChange::Upsert(
                ApiKey::new("b", "kb").with_scopes(["read"]),
            )])
            .unwrap();
        assert_eq!(store.verify("kb").unwrap().id(), "b");
    }

    #[test]
    fn a_change_by_id_touches_nothing_else() {
        let keys: Vec<(String, String)> = (0..2_000)
            .map(|i| (format!("k{i}"), format!("s{i}")))
            .collect();
        let (source, publisher) = ChannelSource::new(
            KeySet::from_keys(keys.iter().map(|(id, s)| ApiKey::new(&**id, s))).unwrap(),
        );
        let store = KeyStore::new();
        store.add_source(source).unwrap();
        for (_, secret) in keys.iter().take(100) {
            store.verify(secret).unwrap();
        }
        let untouched = store.get("k50").unwrap();
        let report = publisher
            .apply([
                KeyChange::Upsert(ApiKey::new("k7", "s7-rotated")),
                KeyChange::remove("k8"),
                KeyChange::Upsert(ApiKey::new("fresh", "s-fresh")),
                KeyChange::remove("never-existed"),
            ])
            .unwrap();
        assert_eq!(report.added(), ["fresh"]);
        assert_eq!(report.changed(), ["k7"]);
        assert_eq!(report.removed(), ["k8"]);
        assert_eq!(store.len(), 2_000);
        assert!(untouched.same_entry(&store.get("k50").unwrap()));
        assert_eq!(store.usage_of("k50").unwrap().requests(), 1);
        assert_eq!(store.usage_of("k7").unwrap().requests(), 1, "carried over");
        assert!(store.verify("s7").is_err() && store.verify("s8").is_err());
        assert_eq!(store.verify("s7-rotated").unwrap().id(), "k7");
        assert_eq!(store.version(), 2);
    }

    #[test]
    fn a_refused_change_changes_nothing() {
        let store = KeyStore::new();
        store.add_source(set(&[("other", "ko")])).unwrap();
        let (source, publisher) = ChannelSource::new(set(&[("a", "ka")]));
        store.add_source(source).unwrap();
        let refusals = [
            vec![KeyChange::Upsert(ApiKey::new("other", "x"))],
            vec![KeyChange::Upsert(ApiKey::new("b", "ko"))],
            vec![KeyChange::remove("other")],
            vec![KeyChange::Upsert(ApiKey::new("b", "ka"))],
            vec![
                KeyChange::Upsert(ApiKey::new("b", "k1")),
                KeyChange::Upsert(ApiKey::new("c", "k1")),
            ],
            vec![
                KeyChange::Upsert(ApiKey::new("b", "k")),
                KeyChange::remove("b"),
            ],
            vec![KeyChange::Upsert(ApiKey::new("bad id", "k"))],
            vec![KeyChange::Upsert(ApiKey::new("b", " k"))],
        ];
        for changes in refusals {
            let err = publisher.apply(changes.clone()).unwrap_err();
            assert_eq!(store.version(), 2, "{changes:?}: {err}");
            assert!(!store.last_reload().unwrap().is_applied());
        }
        assert_eq!(store.len(), 2);
        // The same key moving from one id to another in one change is fine.
        publisher
            .apply([
                KeyChange::remove("a"),
                KeyChange::Upsert(ApiKey::new("b", "ka")),
            ])
            .unwrap();
        assert_eq!(store.verify("ka").unwrap().id(), "b");
    }

    #[test]
    fn a_clash_with_another_source_names_the_first_key_in_order() {
        let store = KeyStore::new();
        store
            .add_source(set(&[("x", "s1"), ("y", "s2"), ("z", "s3")]))
            .unwrap();
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

    #[test]
    fn a_set_refused_for_another_source_s_key_is_applied_once_that_key_goes() {
        let store = KeyStore::new();
        let (first, first_publisher) = ChannelSource::new(set(&[("shared", "k-1")]));
        store.add_source(first.with_name("first")).unwrap();
        let (second, second_publisher) = ChannelSource::new(set(&[("shared", "k-2")]));
        // At start-up: refused, and waiting.
        let err = store.add_source(second.with_name("second")).unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
        assert!(store.verify("k-2").is_err());
        // The first source lets go of the id: the second's set applies, unasked.
        first_publisher.publish(set(&[("other", "k-3")])).unwrap();
        assert_eq!(store.verify("k-2").unwrap().source(), "second");
        assert_eq!(store.last_reload().unwrap().source(), "second");
        // Refused again later, then superseded by a newer set of its own: the stale
        // one is never applied.
        first_publisher
            .publish(set(&[("other", "k-3"), ("late", "k-4")]))
            .unwrap();
        second_publisher
            .publish(set(&[("mine", "k-4")]))
            .unwrap_err();
        second_publisher.publish(set(&[("mine", "k-5")])).unwrap();
        first_publisher.publish(set(&[("other", "k-3")])).unwrap();
        assert_eq!(store.verify("k-5").unwrap().id(), "mine");
        assert!(store.verify("k-4").is_err());
    }

    #[test]
    fn counts_made_in_a_replaced_version_reach_the_next() {
        let (source, publisher) = ChannelSource::new(set(&[("a", "ka"), ("gone", "kg")]));
        let store = KeyStore::new();
        store.add_source(source).unwrap();
        store.verify("ka").unwrap();
        // A request that loaded the version before the swap, and counts after it (here
        // on the writer's own thread: a writer that waited for it would never return).
        let before = store.shared.current.load_full();
        publisher.publish(set(&[("a", "ka"), ("b", "kb")])).unwrap();
        let counter = |secret: &[u8]| {
            let (shard, i) = before.find(&KeyDigest::of(secret)).unwrap();
            shard.slot(i).counter()
        };
        store
            .shared
            .counters
            .record(counter(b"ka"), clock::now_secs());
        // A key the swap removed: its late count goes nowhere.
        store
            .shared
            .counters
            .record(counter(b"kg"), clock::now_secs());
        drop(before);
        assert_eq!(store.usage_of("a").unwrap().requests(), 2);
        assert_eq!(store.usage_of("b").unwrap().requests(), 0);
        // And then a new key takes the removed one's counter, from zero.
        publisher
            .publish(set(&[("a", "ka"), ("b", "kb"), ("c", "kc")]))
            .unwrap();
        assert_eq!(store.usage_of("c").unwrap().requests(), 0);
        assert!(store.usage_of("c").unwrap().last_used().is_none());
    }

    #[test]
    fn usage_counted_on_other_threads_is_read_exactly() {
        use std::sync::mpsc;
        let keys: Vec<(String, String)> = (0..300)
            .map(|i| (format!("k{i}"), format!("s{i}")))
            .collect();
        let store = KeyStore::new();
        store
            .add_source(
                KeySet::from_keys(keys.iter().map(|(id, s)| ApiKey::new(&**id, s))).unwrap(),
            )
            .unwrap();
        // Which keys thread `t` presents, and how often.
        let presented = |t: usize| (0..50).flat_map(move |round| (t..300).step_by(4 + round % 3));
        // Threads 0 and 1 count and exit; 2 and 3 count and stay, their last requests
        // still in their tallies.
        let (done, finished) = mpsc::channel();
        let mut stays = Vec::new();
        let mut threads = Vec::new();
        for t in 0..4 {
            let (store, keys, done) = (store.clone(), keys.clone(), done.clone());
            let (stay, until) = mpsc::channel::<()>();
            stays.push(stay);
            threads.push(std::thread::spawn(move || {
                for k in presented(t) {
                    store.verify(&keys[k].1).unwrap();
                }
                done.send(()).unwrap();
                if t >= 2 {
                    let _ = until.recv();
                }
            }));
        }
        for _ in 0..4 {
            finished
                .recv_timeout(Duration::from_secs(60))
                .expect("every thread counts its requests");
        }
        let mut expected = std::collections::HashMap::new();
        for k in (0..4).flat_map(presented) {
            *expected.entry(keys[k].0.clone()).or_insert(0u64) += 1;
        }
        let check = || {
            let usage = store.usage();
            assert_eq!(usage.len(), 300);
            for u in &usage {
                let want = expected.get(u.key().id()).copied().unwrap_or(0);
                assert_eq!(u.requests(), want, "{}", u.key().id());
                assert_eq!(u.last_used().is_some(), want > 0, "{}", u.key().id());
            }
            assert_eq!(store.usage_of("k0").unwrap().requests(), expected["k0"]);
        };
        check();
        drop(stays);
        for thread in threads {
            thread.join().unwrap();
        }
        check();
    }

    /// Invariant: once every request has returned, each key's count is exactly the
    /// requests let in under its id, while other threads count and a writer rotates
    /// secrets (counts carry over), replaces ids with new ones (their cells are
    /// taken back and handed to others) and grows or shrinks the set past a change
    /// of shard count. A request's `KeyInfo` names the key it was let in with,
    /// whatever version it came from. `TAK_SEED=<seed>` replays the writer's choices
    /// (the threads' timing is the machine's).
    #[test]
    fn usage_stays_exact_while_keys_rotate_leave_and_reshard_under_requests() {
        use std::collections::HashMap;
        use std::sync::{
            Mutex,
            atomic::{AtomicBool, Ordering},
        };
        let seed: u64 = std::env::var("TAK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_0017);
        let mut next = crate::testing::xorshift(seed);
        let replay = format!(
            "replay with TAK_SEED={seed} cargo test --lib usage_stays_exact_while_keys_rotate"
        );
        let stable: Vec<String> = (0..120).map(|i| format!("stable-{i}")).collect();
        let mut churn: Vec<String> = (0..60).map(|i| format!("churn-0-{i}")).collect();
        let secret = |id: &str, round: u64| format!("secret-{id}-{round}");
        // The secret each id has now: what the request threads present.
        let live: Arc<Mutex<Vec<(String, String)>>> = Arc::new(Mutex::new(
            stable
                .iter()
                .chain(&churn)
                .map(|id| (id.clone(), secret(id, 0)))
                .collect(),
        ));
        let (source, publisher) = ChannelSource::new(
            KeySet::from_keys(
                live.lock()
                    .unwrap()
                    .iter()
                    .map(|(id, s)| ApiKey::new(&**id, s)),
            )
            .unwrap(),
        );
        let store = KeyStore::new();
        store.add_source(source).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..3u64)
            .map(|t| {
                let (store, live, stop) = (store.clone(), live.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut counted: HashMap<String, u64> = HashMap::new();
                    let mut held = Vec::new();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        i = i
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let presented = {
                            let live = live.lock().unwrap();
                            live[(i >> 33) as usize % live.len()].clone()
                        };
                        // Refused when the key changed since it was read: not counted.
                        if let Ok(accepted) =
                            store.check(presented.1.as_bytes(), None, true, || None)
                        {
                            let key = accepted.key;
                            assert_eq!(key.id(), presented.0);
                            *counted.entry(presented.0).or_default() += 1;
                            // Some are held across versions, and read again later.
                            if i % 7 == 0 && held.len() < 500 {
                                held.push((key, presented.1));
                            }
                        }
                    }
                    for (key, presented) in held {
                        assert!(presented.starts_with(&format!("secret-{}-", key.id())));
                    }
                    counted
                })
            })
            .collect();
        let fillers = |from: usize| {
            (from..from + 3_000)
                .map(|i| ApiKey::new(format!("filler-{i}"), format!("filler-secret-{i}")))
        };
        let mut filled = false;
        for round in 1..=120u64 {
            let mut changes = Vec::new();
            let mut now = live.lock().unwrap().clone();
            for _ in 0..12 {
                let id = &stable[next() as usize % stable.len()];
                let s = secret(id, round);
                changes.push(KeyChange::Upsert(ApiKey::new(&**id, &s)));
                if let Some(entry) = now.iter_mut().find(|(i, _)| i == id) {
                    entry.1 = s;
                }
            }
            for _ in 0..4 {
                let at = next() as usize % churn.len();
                let new = format!("churn-{round}-{at}");
                changes.push(KeyChange::remove(churn[at].clone()));
                changes.push(KeyChange::Upsert(ApiKey::new(&*new, secret(&new, round))));
                now.retain(|(i, _)| *i != churn[at]);
                now.push((new.clone(), secret(&new, round)));
                churn[at] = new;
            }
            if round % 10 == 0 {
                match filled {
                    false => changes.extend(fillers(0).map(KeyChange::Upsert)),
                    true => changes.extend(fillers(0).map(|k| KeyChange::remove(k.id))),
                }
                filled = !filled;
            }
            // Changes to one id apply in order: a rotated id's last secret wins.
            let mut seen = std::collections::HashSet::new();
            let changes: Vec<KeyChange> = changes
                .into_iter()
                .rev()
                .filter(|c| seen.insert(c.id().to_owned()))
                .collect();
            publisher
                .apply(changes)
                .unwrap_or_else(|e| panic!("round {round}: {e}; {replay}"));
            *live.lock().unwrap() = now;
        }
        stop.store(true, Ordering::Relaxed);
        let mut expected: HashMap<String, u64> = HashMap::new();
        for thread in threads {
            for (id, n) in thread.join().unwrap() {
                *expected.entry(id).or_default() += n;
            }
        }
        let usage = store.usage();
        assert!(usage.len() >= stable.len() + churn.len());
        for u in &usage {
            let id = u.key().id();
            let want = match id.starts_with("filler-") {
                true => 0,
                false => expected.get(id).copied().unwrap_or(0),
            };
            assert_eq!(u.requests(), want, "{id}: {replay}");
        }
        let total: u64 = stable
            .iter()
            .map(|id| expected.get(id).copied().unwrap_or(0))
            .sum();
        assert!(total > 0, "the requests reached the stable keys");
    }

    #[test]
    fn an_updater_knows_its_source_and_when_its_store_is_gone() {
        let store = KeyStore::new();
        assert!(store.is_empty());
        store.add_source(set(&[("a", "ka")])).unwrap();
        assert!(!store.is_empty());
        let updater = store.updater_for_tests("mine");
        assert_eq!(updater.source_name(), "mine");
        assert!(format!("{updater:?}").contains("mine"));
        assert!(!updater.is_closed());
        drop(store);
        assert!(updater.is_closed());
        assert!(matches!(
            updater.publish(KeySet::new()),
            Err(Error::StoreClosed)
        ));
    }

    #[test]
    fn the_expiry_notice_is_seven_days_until_set() {
        let store = KeyStore::new();
        assert_eq!(store.expiry_notice(), Duration::from_secs(7 * 24 * 3600));
        store.set_expiry_notice(Duration::from_secs(90));
        assert_eq!(store.expiry_notice(), Duration::from_secs(90));
    }

    #[test]
    fn expiring_lists_exactly_the_enabled_keys_within_the_notice() {
        let now = std::time::SystemTime::now();
        let hour = Duration::from_secs(3600);
        let store = KeyStore::new();
        store.set_expiry_notice(24 * hour);
        let (source, publisher) = ChannelSource::new(KeySet::new());
        store.add_source(source).unwrap();
        let report = publisher
            .publish(
                KeySet::from_keys([
                    ApiKey::new("soon", "k1").with_expires_at(now + hour),
                    ApiKey::new("later", "k2").with_expires_at(now + 48 * hour),
                    ApiKey::new("gone", "k3").with_expires_at(now - hour),
                    ApiKey::new("never", "k4"),
                    ApiKey::new("off", "k5")
                        .with_expires_at(now + hour)
                        .with_disabled(true),
                    ApiKey::new("edge", "k6")
                        .with_expires_at(now + 24 * hour - Duration::from_secs(5)),
                ])
                .unwrap(),
            )
            .unwrap();
        assert_eq!(report.expiring(), ["soon", "edge"]);
        // A change by id reports the keys it names.
        let report = publisher
            .apply([KeyChange::Upsert(
                ApiKey::new("soon2", "k7").with_expires_at(now + hour),
            )])
            .unwrap();
        assert_eq!(report.expiring(), ["soon2"]);
    }

    #[test]
    fn usage_and_reports_serialize_as_documented() {
        let (source, publisher) = ChannelSource::new(set(&[("a", "ka")]));
        let store = KeyStore::new();
        store.add_source(source).unwrap();
        store.verify("ka").unwrap();
        let usage = serde_json::to_value(store.usage()).unwrap();
        assert_eq!(usage[0]["key"]["id"], "a");
        assert_eq!(usage[0]["requests"], 1);
        let last = usage[0]["last_used"].as_str().unwrap();
        assert!(last.len() == 20 && last.ends_with('Z'), "{last}");
        publisher.publish(set(&[("a", "ka2")])).unwrap();
        let report = serde_json::to_value(store.last_reload().unwrap()).unwrap();
        assert_eq!(report["applied"], true);
        assert_eq!(report["version"], 2);
        assert_eq!(report["changed"][0], "a");
        assert!(report["error"].is_null());
        publisher
            .apply([
                KeyChange::Upsert(ApiKey::new("b", "kx")),
                KeyChange::Upsert(ApiKey::new("c", "kx")),
            ])
            .unwrap_err();
        let refused = serde_json::to_value(store.last_reload().unwrap()).unwrap();
        assert_eq!(refused["applied"], false);
        assert!(refused["version"].is_null());
        assert!(refused["error"].as_str().unwrap().contains("same secret"));
    }

    #[test]
    fn a_kept_key_info_does_not_keep_a_replaced_shard() {
        let (source, publisher) = ChannelSource::new(set(&[("a", "ka")]));
        let store = KeyStore::new();
        store.add_source(source).unwrap();
        let in_request = store.check(b"ka", None, true, || None).unwrap().key;
        let shard = {
            let snapshot = store.shared.current.load();
            snapshot.find(&KeyDigest::of(b"ka")).unwrap().0.downgrade()
        };
        let kept = in_request.clone();
        publisher.publish(set(&[("b", "kb")])).unwrap();
        assert!(
            shard.upgrade().is_some(),
            "the request's own points into it"
        );
        drop(in_request);
        assert!(shard.upgrade().is_none(), "a clone holds its entry only");
        assert_eq!(kept.id(), "a");
        assert_eq!(kept.scopes().collect::<Vec<_>>(), ["read"]);
    }
}
