use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use crate::{Error, KeyChange, KeySet, KeySource, KeyUpdater, ReloadReport};

/// A [`KeySource`] fed from your own code: a database poller, an admin endpoint, a test.
///
/// [`ChannelSource::new`] returns the source and a cloneable [`KeyPublisher`]; each
/// [`KeyPublisher::publish`] replaces the source's keys with a complete new set and
/// tells the caller what happened.
///
/// # Example
///
/// ```
/// use tower_api_key::{ApiKey, ApiKeyLayer, ChannelSource, KeySet};
///
/// let (source, publisher) = ChannelSource::new(KeySet::from_keys([ApiKey::new("old", "k1")])?);
/// let layer = ApiKeyLayer::new(source);
///
/// // Dual-key overlap: add the new key, keep the old one...
/// let report = publisher.publish(KeySet::from_keys([
///     ApiKey::new("old", "k1"),
///     ApiKey::new("new", "k2"),
/// ])?)?;
/// assert_eq!(report.added(), ["new"]);
///
/// // ...then revoke the old one.
/// let report = publisher.publish(KeySet::from_keys([ApiKey::new("new", "k2")])?)?;
/// assert_eq!(report.removed(), ["old"]);
/// assert_eq!(layer.store().len(), 1);
/// # Ok::<(), tower_api_key::Error>(())
/// ```
pub struct ChannelSource {
    name: String,
    shared: Arc<Mutex<State>>,
}

/// Publishes key sets into a [`ChannelSource`]'s store. Cheap to clone.
#[derive(Clone)]
pub struct KeyPublisher {
    name: String,
    shared: Arc<Mutex<State>>,
}

struct State {
    /// The set the source loads when it is attached (emptied once it is).
    initial: KeySet,
    /// Bumped by every change to `initial`; `loaded` is its value at the load, so a
    /// change made between the load and the watch is not lost.
    generation: u64,
    loaded: u64,
    updater: Option<KeyUpdater>,
}

impl ChannelSource {
    /// A source whose keys start as `initial`, and its publisher.
    pub fn new(initial: KeySet) -> (Self, KeyPublisher) {
        let shared = Arc::new(Mutex::new(State {
            initial,
            generation: 0,
            loaded: 0,
            updater: None,
        }));
        let name = "channel".to_owned();
        (
            Self {
                name: name.clone(),
                shared: shared.clone(),
            },
            KeyPublisher { name, shared },
        )
    }

    /// Names the source (default `"channel"`), as seen in logs and
    /// [`KeyInfo::source`](crate::KeyInfo::source).
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl KeyPublisher {
    /// Whether the source has a set waiting for another source to let go of a key
    /// (see [`KeyUpdater::is_waiting`]); `false` before the source is added to a store.
    pub fn is_waiting(&self) -> bool {
        let state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        state.updater.as_ref().is_some_and(KeyUpdater::is_waiting)
    }

    /// Replaces the source's keys with `set`, atomically, and returns what changed.
    ///
    /// Before the source is added to a store, this replaces the set it will load
    /// (the report then has version 0).
    ///
    /// It blocks the calling thread while the store makes the update: about a second
    /// for a million keys. From async code, publish large sets from
    /// `tokio::task::spawn_blocking` (see [`KeyUpdater`'s notes on
    /// blocking](KeyUpdater#blocking)).
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] if another source of the store claims one of the keys or
    /// ids, [`Error::StoreClosed`] if the store is gone. The store keeps its previous
    /// keys.
    pub fn publish(&self, set: KeySet) -> Result<ReloadReport, Error> {
        let mut state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        match &state.updater {
            Some(updater) => updater.publish(set),
            None => {
                let report = ReloadReport::queued(self.name.clone().into(), &set);
                state.initial = set;
                state.generation += 1;
                Ok(report)
            }
        }
    }

    /// Applies changes by id to the source's keys, all or none (see
    /// [`KeyUpdater::apply`]): keys it does not name stay as they are.
    ///
    /// Before the source is added to a store, this changes the set it will load.
    ///
    /// It blocks the calling thread while the store makes the change: well under a
    /// millisecond for a change by id, a few at a million keys, but time in
    /// proportion to the waiting set while one waits (see [`KeyUpdater`'s notes on
    /// blocking](KeyUpdater#blocking)).
    ///
    /// # Errors
    ///
    /// As [`KeyUpdater::apply`]. The store keeps its previous keys.
    pub fn apply(
        &self,
        changes: impl IntoIterator<Item = KeyChange>,
    ) -> Result<ReloadReport, Error> {
        let mut state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        match &state.updater {
            Some(updater) => updater.apply(changes),
            None => {
                let set = with_changes(&state.initial, changes)?;
                let report = ReloadReport::queued(self.name.clone().into(), &set);
                state.initial = set;
                state.generation += 1;
                Ok(report)
            }
        }
    }
}

/// `set` with `changes` made: upserts replace a key with the same id, in place.
fn with_changes(
    set: &KeySet,
    changes: impl IntoIterator<Item = KeyChange>,
) -> Result<KeySet, Error> {
    let mut keys: Vec<_> = set.iter().cloned().collect();
    for change in changes {
        match change {
            KeyChange::Upsert(key) => match keys.iter_mut().find(|k| k.id == key.id) {
                Some(slot) => *slot = key,
                None => keys.push(key),
            },
            KeyChange::Remove(id) => keys.retain(|k| k.id != id),
        }
    }
    KeySet::from_keys(keys)
}

impl KeySource for ChannelSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn load(&mut self) -> Result<KeySet, Error> {
        let mut state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        state.loaded = state.generation;
        Ok(state.initial.clone())
    }

    fn watch(self: Box<Self>, updater: KeyUpdater) {
        let mut state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let set = std::mem::take(&mut state.initial);
        if state.generation != state.loaded {
            // Published after the load: apply it now (a refusal is recorded by the
            // store, as any other).
            let _ = updater.publish(set);
        }
        state.updater = Some(updater);
    }
}

impl fmt::Debug for ChannelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for KeyPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPublisher")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ApiKey, KeyStore};

    #[test]
    fn a_set_published_between_load_and_watch_is_applied() {
        let (mut source, publisher) = ChannelSource::new(KeySet::new());
        let store = KeyStore::new();
        // What `add_source` does, with a publish in between.
        let loaded = source.load().unwrap();
        assert!(loaded.is_empty());
        publisher
            .publish(KeySet::from_keys([ApiKey::new("late", "k-late")]).unwrap())
            .unwrap();
        store.add_source(KeySet::new()).unwrap();
        let updater = store.updater_for_tests(&source.name());
        Box::new(source).watch(updater);
        assert_eq!(store.verify("k-late").unwrap().id(), "late");
    }

    #[test]
    fn changes_before_attaching_shape_the_initial_set() {
        let (source, publisher) =
            ChannelSource::new(KeySet::from_keys([ApiKey::new("a", "ka")]).unwrap());
        publisher
            .apply([
                KeyChange::Upsert(ApiKey::new("b", "kb")),
                KeyChange::Upsert(ApiKey::new("a", "ka2")),
            ])
            .unwrap();
        let store = KeyStore::new();
        store.add_source(source).unwrap();
        assert_eq!(store.verify("ka2").unwrap().id(), "a");
        assert!(store.verify("ka").is_err());
        publisher.apply([KeyChange::remove("b")]).unwrap();
        assert_eq!(store.len(), 1);
    }
}
