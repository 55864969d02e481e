use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use crate::{Error, KeySet, KeySource, KeyUpdater, ReloadReport};

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
    /// The set loaded when the source is attached.
    initial: KeySet,
    updater: Option<KeyUpdater>,
}

impl ChannelSource {
    /// A source whose keys start as `initial`, and its publisher.
    pub fn new(initial: KeySet) -> (Self, KeyPublisher) {
        let shared = Arc::new(Mutex::new(State {
            initial,
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
    /// Replaces the source's keys with `set`, atomically, and returns what changed.
    ///
    /// Before the source is added to a store, this replaces the set it will load
    /// (the report then has version 0).
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
                Ok(report)
            }
        }
    }
}

impl KeySource for ChannelSource {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn load(&mut self) -> Result<KeySet, Error> {
        let state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(state.initial.clone())
    }

    fn watch(self: Box<Self>, updater: KeyUpdater) {
        let mut state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        state.initial = KeySet::new();
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
