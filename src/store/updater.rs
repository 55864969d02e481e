//! How a source changes its keys in the store: one writer at a time, checked before
//! the swap, reported in order.

use std::{
    fmt,
    sync::{Arc, Weak, atomic::Ordering},
};

use crate::{
    Error, KeyChange, KeyInfo, KeySet, KeyUsage, ReloadReport, clock,
    key::digest::KeyDigest,
    store::change::{self, Source, Update},
    store::counters::Counter,
    store::entry::KeyEntry,
    store::pending::Pending,
    store::shared::{Shared, Writer},
    store::snapshot::Snapshot,
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
/// A store makes one update at a time. A set another source's keys clash with waits,
/// and is applied once that source lets go of them (see [`publish`](Self::publish)).
///
/// # Blocking
///
/// [`publish`](Self::publish) and [`apply`](Self::apply) run on the calling thread and
/// block it until the update is made: they never wait for requests, but they do wait
/// for an update of another source of the same store to finish, and the work grows
/// with what they are given. A change by id takes well under a millisecond (a few at
/// a million keys); a complete set takes time in proportion to its size (about a
/// second for a million keys), and so does a change by id while the source has a set
/// waiting ([`is_waiting`](Self::is_waiting)), as it is made to that set too. From
/// async code, apply small changes directly, and publish large sets from
/// [`tokio::task::spawn_blocking`] or a thread of their own.
///
/// It holds the store weakly: once every layer and store clone is gone,
/// [`KeyUpdater::is_closed`] turns true and updates return [`Error::StoreClosed`],
/// which tells a watching source to stop.
///
/// [`tokio::task::spawn_blocking`]: https://docs.rs/tokio/latest/tokio/task/fn.spawn_blocking.html
pub struct KeyUpdater {
    shared: Weak<Shared>,
    source: u16,
    name: Arc<str>,
}

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
    /// A set refused because another source holds one of its ids or secrets waits:
    /// it is applied, unasked, once that source lets go of them, and changes by id this
    /// source [`apply`](Self::apply)s meanwhile are made to it too. A newer set, or a
    /// failure [`reject`](Self::reject)ed, replaces it.
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
    /// million-key set copies one shard of about two thousand keys, not the set.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidKey`] for a key no [`KeySet`] would take, [`Error::DuplicateId`]
    /// for an id named twice, [`Error::DuplicateKey`] for one key under two ids,
    /// [`Error::Conflict`] for an id or key of another source, [`Error::StoreClosed`]
    /// if the store is gone; [`Error::DuplicateKey`] too if this source has a set
    /// waiting (see [`publish`](Self::publish)) that the changes would leave with one
    /// secret under two ids. The store keeps its keys, and the refusal is recorded
    /// and logged.
    ///
    /// While this source has a set waiting, changes the live keys refuse with
    /// [`Error::Conflict`] are made to the waiting set alone, which is then tried
    /// whole: the removal of an id another source holds, say, lets the set in at once
    /// if that id was all it waited for (and returns its report). If the set is still
    /// refused, it waits on with the changes, as a set [`publish`](Self::publish)ed
    /// and refused for a conflict does, and the conflict is returned:
    /// [`is_waiting`](Self::is_waiting) tells the two outcomes of a conflict apart.
    /// Changes are all or none here too: a removal in a batch that waits stays live
    /// until the set comes in, so send a revocation in a batch of its own.
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
        // Each report, with how many keys its source has after it.
        let mut reports = Vec::new();
        let result = self.update_locked(&shared, &mut writer, update, &mut reports);
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

    /// Makes `update` with the writer held, then applies what it lets in of the sets
    /// that wait.
    fn update_locked(
        &self,
        shared: &Shared,
        writer: &mut Writer,
        update: Update<'_>,
        reports: &mut Vec<(ReloadReport, usize)>,
    ) -> Result<ReloadReport, Error> {
        let at = usize::from(self.source);
        // A change by id to a source whose set waits is made to that set too: it must
        // fit there as well, or it is refused whole.
        let waiting = match (update, &writer.pending[at]) {
            (Update::Changes(changes), Some(pending)) => match pending.with_changes(changes) {
                Ok(changed) => Some((changed, pending.clashes_with(changes))),
                Err(error) => {
                    let report = ReloadReport::rejected(self.name.clone(), error.clone());
                    shared.reloads.send_replace(Some(report.clone()));
                    reports.push((report, writer.counts[at]));
                    return Err(error);
                }
            },
            _ => None,
        };
        // With a set waiting, a change refused for a key another source holds is made
        // to that set alone: its refusal is not reported yet.
        let first = match waiting {
            Some(_) => Refusal::Quiet,
            None => Refusal::Reported,
        };
        let mut result = make(shared, writer, self.source, update, first);
        let mut due = None;
        let conflict = matches!(result, Err(Error::Conflict { .. }));
        match (result.is_ok(), conflict, update, waiting) {
            // A newer complete state of this source: what it had waiting is stale.
            (true, _, Update::Set(_), _) => writer.pending[at] = None,
            (true, _, Update::Changes(_), Some((changed, clashed))) => {
                writer.pending[at] = Some(changed);
                due = clashed.then_some(at);
            }
            (true, _, Update::Changes(_), None) => {}
            // Refused for a key another source holds: tried again once it is let go.
            (false, true, Update::Set(set), _) => {
                let live = shared.current.load();
                writer.pending[at] = Some(Pending::new(set.clone(), &live, self.source));
            }
            // The same, for changes by this source while its set waits: they are made
            // to the set, which is tried whole at once (a removal of the id it waited
            // for lets it in), and waits on with them if it is still refused, as a set
            // published and refused would, rather than come in later without them.
            (false, true, Update::Changes(_), Some((changed, _))) => {
                result = make(
                    shared,
                    writer,
                    self.source,
                    Update::Set(&changed.set),
                    Refusal::Reported,
                );
                writer.pending[at] = match result {
                    Ok(_) => None,
                    Err(_) => {
                        let live = shared.current.load();
                        Some(Pending::new(changed.set, &live, self.source))
                    }
                };
            }
            (false, _, _, _) => {
                if let (Refusal::Quiet, Err(error)) = (first, &result) {
                    let report = ReloadReport::rejected(self.name.clone(), error.clone());
                    shared.reloads.send_replace(Some(report));
                }
            }
        }
        reports.push((
            match &result {
                Ok(report) => report.clone(),
                Err(error) => ReloadReport::rejected(self.name.clone(), error.clone()),
            },
            writer.counts[at],
        ));
        if let Ok(report) = &result {
            retry_pending(shared, writer, reports, report, due);
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

    /// Whether this source has a set waiting: published and refused because another
    /// source holds one of its ids or secrets, to be applied once that source lets go
    /// (see [`publish`](Self::publish)). After [`apply`](Self::apply) returns
    /// [`Error::Conflict`], this tells whether the changes wait with that set (`true`)
    /// or were refused and dropped (`false`, unless the set came in meanwhile with
    /// them: the store then serves them).
    ///
    /// ```
    /// use tower_api_key::{ApiKey, ChannelSource, KeySet, KeyStore};
    ///
    /// let store = KeyStore::new();
    /// let (first, _) = ChannelSource::new(KeySet::from_keys([ApiKey::new("shared", "k-1")])?);
    /// store.add_source(first.with_name("first"))?;
    /// let (second, publisher) =
    ///     ChannelSource::new(KeySet::from_keys([ApiKey::new("shared", "k-2")])?);
    /// assert!(store.add_source(second.with_name("second")).is_err());
    /// assert!(publisher.is_waiting());
    /// # Ok::<(), tower_api_key::Error>(())
    /// ```
    pub fn is_waiting(&self) -> bool {
        self.shared.upgrade().is_some_and(|shared| {
            (shared.lock().pending)
                .get(usize::from(self.source))
                .is_some_and(Option::is_some)
        })
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
        let (Some(shared), Some(snapshot)) = (self.shared.upgrade(), self.live()) else {
            return Vec::new();
        };
        let own = || self.own(&snapshot);
        let counts = shared.counters.usage(own().map(|(_, _, c)| c));
        (own().zip(counts))
            .map(|((_, e, _), usage)| KeyUsage::new(KeyInfo::detached(e.clone()), usage))
            .collect()
    }

    /// The store's live version, if the store is still there.
    pub(crate) fn live(&self) -> Option<Arc<Snapshot>> {
        Some(self.shared.upgrade()?.current.load_full())
    }

    /// This source's keys in `snapshot`: digest, entry and usage counter.
    pub(crate) fn own<'s>(
        &self,
        snapshot: &'s Snapshot,
    ) -> impl Iterator<Item = (KeyDigest, &'s Arc<KeyEntry>, Counter)> + 's {
        let source = self.source;
        (snapshot.iter()).filter(move |(_, e, _)| e.source() == source)
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
    refusal: Refusal,
) -> Result<ReloadReport, Error> {
    #[cfg(test)]
    {
        writer.plans += 1;
    }
    let old = shared.current.load_full();
    let at = usize::from(index);
    let name = writer.sources[at].clone();
    let source = Source {
        index,
        store: shared.id,
        name: &name,
        names: &writer.sources,
        count: writer.counts[at],
        fleet: writer.fleet.get(at).copied().unwrap_or(false),
    };
    let now = clock::exact_now_ms();
    let notice = shared.expiry_notice.load(Ordering::Relaxed);
    let (edit, diff) = match change::plan(&old, &source, update, (now, now.saturating_add(notice)))
    {
        Ok(plan) => plan,
        Err(error) => {
            if let Refusal::Reported = refusal {
                let report = ReloadReport::rejected(name, error.clone());
                shared.reloads.send_replace(Some(report));
            }
            return Err(error);
        }
    };
    let mut next = old.edited(edit, &shared.counters);
    next.version = old.version + 1;
    writer.counts[at] = writer.counts[at]
        .saturating_add(diff.added.len())
        .saturating_sub(diff.removed.len());
    let next = Arc::new(next);
    // Requests still reading the old version count into the same counters: nothing
    // to wait for. The old version is freed by whoever lets go of it last.
    drop(old);
    shared.current.store(next.clone());
    let report = ReloadReport::applied(name, next.version, diff);
    shared.reloads.send_replace(Some(report.clone()));
    Ok(report)
}

/// Whether a refused update is reported (sent to subscribers and kept as the last
/// reload): a source's own update is, the quiet retry of a set that waits is not (it
/// was reported when it was refused).
#[derive(Clone, Copy)]
enum Refusal {
    Reported,
    Quiet,
}

/// Plans again the sets that wait for an id `applied` let go of (and the set of source
/// `due`, whose own change touched a clashing key), and applies those that now fit: a
/// store converges to what its sources hold without anyone editing a file again. Each
/// one applied can let another in, so this runs until none moves. A set whose ids are
/// all still held is not planned at all.
fn retry_pending(
    shared: &Shared,
    writer: &mut Writer,
    reports: &mut Vec<(ReloadReport, usize)>,
    applied: &ReloadReport,
    mut due: Option<usize>,
) {
    if writer.pending.iter().all(Option::is_none) {
        return;
    }
    let mut released: Vec<Arc<str>> = applied.released().cloned().collect();
    loop {
        let ready: Vec<usize> = (0..writer.pending.len())
            .filter(|&at| {
                due == Some(at)
                    || (writer.pending[at].as_ref())
                        .is_some_and(|p| p.waits_for_any(released.iter()))
            })
            .collect();
        if ready.is_empty() {
            return;
        }
        due = None;
        released.clear();
        for at in ready {
            let Some(pending) = writer.pending[at].take() else {
                continue;
            };
            let index = u16::try_from(at).unwrap_or(u16::MAX);
            match make(
                shared,
                writer,
                index,
                Update::Set(&pending.set),
                Refusal::Quiet,
            ) {
                Ok(report) => {
                    released.extend(report.released().cloned());
                    reports.push((report, writer.counts[at]));
                }
                // Still held elsewhere, perhaps by another id now: keep waiting, quietly.
                Err(_) => {
                    let live = shared.current.load();
                    writer.pending[at] = Some(Pending::new(pending.set, &live, index));
                }
            }
        }
    }
}

/// Another updater for the same source of the same store: for a source that updates
/// from more than one thread or task. Updates from clones are made one at a time, as
/// from one updater.
impl Clone for KeyUpdater {
    fn clone(&self) -> Self {
        Self::new(self.shared.clone(), self.source, self.name.clone())
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

#[cfg(test)]
mod tests {
    use crate::{ApiKey, ChannelSource, Error, KeyChange, KeyPublisher, KeySet, KeyStore};

    fn set(keys: &[(&str, &str)]) -> KeySet {
        KeySet::from_keys(keys.iter().map(|(id, secret)| ApiKey::new(*id, *secret))).unwrap()
    }

    /// A store with a source "first" holding `first`, and a source "second" whose
    /// initial set `second` is refused for a clash with it, and so waits.
    fn waiting(
        first: &[(&str, &str)],
        second: &[(&str, &str)],
    ) -> (KeyStore, KeyPublisher, KeyPublisher) {
        let store = KeyStore::new();
        let (source, first) = ChannelSource::new(set(first));
        store.add_source(source.with_name("first")).unwrap();
        let (source, second) = ChannelSource::new(set(second));
        let err = store.add_source(source.with_name("second")).unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
        (store, first, second)
    }

    fn plans(store: &KeyStore) -> usize {
        store.shared.lock().plans
    }

    fn id_of(store: &KeyStore, secret: &str) -> Option<String> {
        store.verify(secret).ok().map(|k| k.id().to_owned())
    }

    #[test]
    fn a_change_by_id_is_made_to_the_set_that_waits_too() {
        let (store, first, second) = waiting(
            &[("shared", "k-1")],
            &[("shared", "k-2"), ("a", "ka"), ("b", "kb")],
        );
        // Changes by id while the set waits: applied to the live keys at once...
        second
            .apply([
                KeyChange::Upsert(ApiKey::new("c", "kc")),
                KeyChange::remove("b"),
                KeyChange::Upsert(ApiKey::new("a", "ka2")),
            ])
            .unwrap();
        assert_eq!(id_of(&store, "kc").as_deref(), Some("c"));
        assert_eq!(id_of(&store, "k-2"), None, "still held by the first source");
        // ...and to the waiting set, which arrives whole once the id is let go.
        first.publish(set(&[("other", "k-3")])).unwrap();
        assert_eq!(id_of(&store, "k-2").as_deref(), Some("shared"));
        assert_eq!(id_of(&store, "ka2").as_deref(), Some("a"));
        assert_eq!(id_of(&store, "kc").as_deref(), Some("c"));
        assert_eq!(id_of(&store, "ka"), None, "the change to `a` came later");
        assert_eq!(id_of(&store, "kb"), None, "`b` was removed while it waited");
        assert_eq!(store.len(), 4);
    }

    #[test]
    fn a_set_that_waits_comes_in_once_its_source_removes_the_id_it_waited_for() {
        let (store, first, second) =
            waiting(&[("shared", "k-1")], &[("shared", "k-2"), ("a", "ka")]);
        // `shared` is the first source's: nothing to remove from the live keys, but
        // the waiting set drops it, and then fits.
        second.apply([KeyChange::remove("shared")]).unwrap();
        assert_eq!(id_of(&store, "ka").as_deref(), Some("a"));
        assert_eq!(
            id_of(&store, "k-1").as_deref(),
            Some("shared"),
            "not second's"
        );
        let last = store.last_reload().unwrap();
        assert_eq!((last.source(), last.is_applied()), ("second", true));
        // The removed key never comes in later.
        first.publish(KeySet::new()).unwrap();
        assert_eq!(id_of(&store, "k-2"), None);
        assert_eq!(id_of(&store, "k-1"), None);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_change_refused_for_another_source_s_key_waits_with_the_set() {
        let (store, first, second) =
            waiting(&[("shared", "k-1")], &[("shared", "k-2"), ("a", "ka")]);
        let version = store.version();
        // A new secret for the id the first source holds, and one more key: refused
        // now, as the set was...
        let err = second
            .apply([
                KeyChange::Upsert(ApiKey::new("shared", "k-2b")),
                KeyChange::Upsert(ApiKey::new("b", "kb")),
            ])
            .unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
        assert_eq!(store.version(), version);
        assert_eq!(id_of(&store, "kb"), None);
        // ...and made to the waiting set, which comes in with them once `shared` is
        // let go: the newer secret, not the one the set was refused with.
        first.publish(KeySet::new()).unwrap();
        assert_eq!(id_of(&store, "k-2b").as_deref(), Some("shared"));
        assert_eq!(id_of(&store, "k-2"), None);
        assert_eq!(id_of(&store, "kb").as_deref(), Some("b"));
        assert_eq!(id_of(&store, "ka").as_deref(), Some("a"));
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn a_change_that_clashes_anew_while_the_set_waits_waits_for_that_key_too() {
        let (store, first, second) = waiting(
            &[("shared", "k-1"), ("theirs", "k-t")],
            &[("shared", "k-2"), ("a", "ka")],
        );
        // `b`'s secret is the first source's `theirs`: the waiting set now waits for
        // `theirs` as well.
        let err = second
            .apply([KeyChange::Upsert(ApiKey::new("b", "k-t"))])
            .unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
        first.publish(set(&[("theirs", "k-t")])).unwrap();
        assert_eq!(id_of(&store, "k-2"), None, "still waits for `theirs`");
        assert_eq!(id_of(&store, "k-t").as_deref(), Some("theirs"));
        first.publish(KeySet::new()).unwrap();
        assert_eq!(id_of(&store, "k-2").as_deref(), Some("shared"));
        assert_eq!(id_of(&store, "k-t").as_deref(), Some("b"));
        assert_eq!(store.len(), 3);
    }

    /// Three sources publish sets and apply changes at random over six ids and six
    /// secrets, so that they often clash. After every step: a source with no set
    /// waiting serves exactly its newest state (each set published, with the changes
    /// the store kept on top: those it took, and those refused for a conflict while a
    /// set waited); a source whose set waits has exactly its newest state waiting, and
    /// it clashes with a key another source serves (else it would have been let in).
    /// At the end, the sources let go of everything, last first, checked after each:
    /// what waited comes in, and the first source's newest state is all that is
    /// served. `TAK_SEED=<seed>` replays one seed.
    #[test]
    fn sources_that_clash_at_random_converge_to_their_newest_states() {
        use std::collections::BTreeMap;
        type State = BTreeMap<String, String>;
        let seeds: Vec<u64> = match std::env::var("TAK_SEED").ok().and_then(|s| s.parse().ok()) {
            Some(seed) => vec![seed],
            None => (1..=40).map(|i| 0x5eed_2000 + i).collect(),
        };
        let ids: Vec<String> = (0..6).map(|i| format!("id{i}")).collect();
        let secrets: Vec<String> = (0..6).map(|i| format!("secret-{i}")).collect();
        let names = ["s0", "s1", "s2"];
        let as_set = |state: &State| {
            KeySet::from_keys(
                state
                    .iter()
                    .map(|(id, secret)| ApiKey::new(id.as_str(), secret.as_str())),
            )
            .unwrap()
        };
        for seed in seeds {
            let replay = format!(
                "replay with TAK_SEED={seed} cargo test --lib sources_that_clash_at_random"
            );
            let mut next = crate::testing::xorshift(seed);
            let store = KeyStore::new();
            let publishers: Vec<KeyPublisher> = names
                .iter()
                .map(|name| {
                    let (source, publisher) = ChannelSource::new(KeySet::new());
                    store.add_source(source.with_name(*name)).unwrap();
                    publisher
                })
                .collect();
            let mut newest: Vec<State> = vec![State::new(); names.len()];
            // What each source serves: each secret that lets a request in, by id.
            let serving = |at: usize| -> State {
                (secrets.iter())
                    .filter_map(|secret| {
                        let info = store.verify(secret).ok()?;
                        (info.source() == names[at]).then(|| (info.id().to_owned(), secret.clone()))
                    })
                    .collect()
            };
            // A set's keys as the model holds them: id to secret.
            let state_of = |set: &KeySet| -> State {
                (set.into_iter())
                    .map(|key| {
                        let secret = (secrets.iter())
                            .find(|s| ApiKey::new("x", s.as_str()).digest == key.digest)
                            .unwrap();
                        (key.id.to_string(), secret.clone())
                    })
                    .collect()
            };
            let check = |newest: &[State], step: usize| {
                for (at, state) in newest.iter().enumerate() {
                    let waiting =
                        (store.shared.lock().pending[at].as_ref()).map(|p| state_of(&p.set));
                    let Some(waiting) = waiting else {
                        assert_eq!(serving(at), *state, "source {at} at step {step}: {replay}");
                        continue;
                    };
                    assert_eq!(
                        waiting, *state,
                        "source {at}'s waiting set at step {step}: {replay}"
                    );
                    let clashes = (0..names.len()).filter(|&o| o != at).any(|o| {
                        serving(o).iter().any(|(id, secret)| {
                            state.contains_key(id) || state.values().any(|s| s == secret)
                        })
                    });
                    assert!(
                        clashes,
                        "source {at} waits for nothing at step {step}: {replay}"
                    );
                }
            };
            for step in 0..150 {
                let at = (next() % 3) as usize;
                let waited = store.shared.lock().pending[at].is_some();
                if next().is_multiple_of(3) {
                    // A complete set: some ids, each with a secret of its own.
                    let mut state = State::new();
                    let mut free: Vec<&String> = secrets.iter().collect();
                    for id in &ids {
                        if next().is_multiple_of(2) {
                            let secret = free.swap_remove((next() % free.len() as u64) as usize);
                            state.insert(id.clone(), secret.clone());
                        }
                    }
                    match publishers[at].publish(as_set(&state)) {
                        Ok(_) | Err(Error::Conflict { .. }) => newest[at] = state,
                        Err(error) => panic!("step {step}: {error}: {replay}"),
                    }
                } else {
                    // One or two changes by id.
                    let first = (next() % 6) as usize;
                    let mut changes = Vec::new();
                    for id in [first, (first + 1 + (next() % 5) as usize) % 6]
                        .iter()
                        .take(1 + (next() % 2) as usize)
                    {
                        changes.push(match next() % 3 {
                            0 => KeyChange::remove(ids[*id].as_str()),
                            _ => KeyChange::Upsert(ApiKey::new(
                                ids[*id].as_str(),
                                secrets[(next() % 6) as usize].as_str(),
                            )),
                        });
                    }
                    let mut changed = newest[at].clone();
                    for change in &changes {
                        match change {
                            KeyChange::Upsert(key) => {
                                let secret = secrets
                                    .iter()
                                    .find(|s| ApiKey::new("x", s.as_str()).digest == key.digest)
                                    .unwrap();
                                changed.insert(key.id.to_string(), secret.clone())
                            }
                            KeyChange::Remove(id) => changed.remove(&**id),
                        };
                    }
                    match publishers[at].apply(changes) {
                        Ok(_) => newest[at] = changed,
                        Err(Error::Conflict { .. }) if waited => newest[at] = changed,
                        Err(Error::Conflict { .. } | Error::DuplicateKey { .. }) => {}
                        Err(error) => panic!("step {step}: {error}: {replay}"),
                    }
                }
                check(&newest, step);
            }
            // The sources let go of everything, last first: what waits comes in, and
            // the first source's newest state is all the store serves.
            for (step, other) in (150..).zip((1..names.len()).rev()) {
                publishers[other].publish(KeySet::new()).unwrap();
                newest[other] = State::new();
                check(&newest, step);
            }
            assert!(store.shared.lock().pending[0].is_none(), "{replay}");
            assert_eq!(serving(0), newest[0], "at the end: {replay}");
            assert_eq!(store.len(), newest[0].len(), "at the end: {replay}");
        }
    }

    #[test]
    fn a_change_by_id_that_does_not_fit_the_set_that_waits_is_refused_whole() {
        let (store, _first, second) =
            waiting(&[("shared", "k-1")], &[("shared", "k-2"), ("a", "ka")]);
        let version = store.version();
        // `ka` is free in the live keys, but the waiting set has it under `a`.
        let err = second
            .apply([KeyChange::Upsert(ApiKey::new("b", "ka"))])
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateKey { .. }), "{err}");
        assert_eq!(store.version(), version);
        assert!(!store.last_reload().unwrap().is_applied());
        assert_eq!(id_of(&store, "ka"), None);
    }

    #[test]
    fn the_retry_of_a_set_that_waits_is_quiet() {
        let (store, first, _second) = waiting(&[("shared", "k-1")], &[("shared", "k-2")]);
        let mut reloads = store.subscribe();
        // Another update of the first source that does not let go of `shared`.
        let report = first
            .publish(set(&[("shared", "k-1"), ("more", "k-m")]))
            .unwrap();
        let last = store.last_reload().unwrap();
        assert_eq!((last.source(), last.version()), ("first", report.version()));
        let seen = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(reloads.next())
            .unwrap();
        assert_eq!((seen.source(), seen.is_applied()), ("first", true));
        // One that lets go of it but changes the secret of another id of it: the
        // retry is still refused, still quietly.
        first
            .publish(set(&[("shared", "k-1b"), ("more", "k-m")]))
            .unwrap();
        assert_eq!(store.last_reload().unwrap().source(), "first");
        assert_eq!(id_of(&store, "k-2"), None);
    }

    #[test]
    fn a_set_that_waits_is_planned_again_only_when_an_id_it_waits_for_is_let_go() {
        let (store, first, second) = waiting(
            &[("shared", "k-1"), ("holder", "k-held"), ("x", "kx")],
            // Waits for `shared` (its id) and `holder` (its secret).
            &[("shared", "k-2"), ("mine", "k-held"), ("free", "k-free")],
        );
        let mut expected = plans(&store);
        // Updates that let go of nothing it waits for: only their own plan.
        first
            .apply([KeyChange::Upsert(ApiKey::new("y", "ky"))])
            .unwrap();
        first.apply([KeyChange::remove("x")]).unwrap();
        first
            .publish(set(&[("shared", "k-1"), ("holder", "k-held"), ("z", "kz")]))
            .unwrap();
        expected += 3;
        assert_eq!(plans(&store), expected, "no retry for unrelated updates");
        // Its own change by id to a key that does not clash: no retry either.
        second
            .apply([KeyChange::Upsert(ApiKey::new("late", "k-late"))])
            .unwrap();
        expected += 1;
        assert_eq!(plans(&store), expected);
        // `shared` let go, `holder` still holds its secret: one quiet retry, refused.
        first
            .publish(set(&[("holder", "k-held"), ("z", "kz")]))
            .unwrap();
        expected += 2;
        assert_eq!(plans(&store), expected);
        assert_eq!(id_of(&store, "k-2"), None);
        // Now it waits for `holder` only: letting go of `z` plans nothing more.
        first.apply([KeyChange::remove("z")]).unwrap();
        expected += 1;
        assert_eq!(plans(&store), expected);
        // `holder` gets a new secret: the set is let in.
        first
            .apply([KeyChange::Upsert(ApiKey::new("holder", "k-new"))])
            .unwrap();
        expected += 2;
        assert_eq!(plans(&store), expected);
        assert_eq!(id_of(&store, "k-2").as_deref(), Some("shared"));
        assert_eq!(id_of(&store, "k-held").as_deref(), Some("mine"));
        assert_eq!(id_of(&store, "k-late").as_deref(), Some("late"));
        assert_eq!(store.last_reload().unwrap().source(), "second");
    }

    #[test]
    fn a_change_by_id_to_a_clashing_key_lets_the_set_that_waits_in() {
        let (store, _first, second) =
            waiting(&[("theirs", "k-1")], &[("mine", "k-1"), ("other", "k-o")]);
        let before = plans(&store);
        // The clashing key gets a secret of its own: the waiting set now fits.
        second
            .apply([KeyChange::Upsert(ApiKey::new("mine", "k-mine"))])
            .unwrap();
        assert_eq!(plans(&store), before + 2);
        assert_eq!(id_of(&store, "k-o").as_deref(), Some("other"));
        assert_eq!(id_of(&store, "k-mine").as_deref(), Some("mine"));
        assert_eq!(id_of(&store, "k-1").as_deref(), Some("theirs"));
    }
}
