use std::{fmt, sync::Arc, time::SystemTime};

use crate::{Error, key::First};

/// The outcome of one reload attempt: when it happened, which source made it, and
/// either what changed or why it was refused.
///
/// Read the latest with [`KeyStore::last_reload`](crate::KeyStore::last_reload), or wait
/// for the next with [`KeyStore::subscribe`](crate::KeyStore::subscribe). This is the
/// audit trail of a rotation: which key ids were added, changed, removed and kept.
#[derive(Clone)]
pub struct ReloadReport {
    source: Arc<str>,
    at: SystemTime,
    /// Shared: a report on a million keys is copied to every subscriber and kept as
    /// the store's last reload, and a copy must not mean a million reference counts.
    outcome: Result<Arc<Change>, Error>,
}

/// What an update changes in one source's keys.
#[derive(Default)]
pub(crate) struct Diff {
    pub(crate) added: Vec<Arc<str>>,
    pub(crate) changed: Vec<Arc<str>>,
    pub(crate) removed: Vec<Arc<str>>,
    pub(crate) kept: Vec<Arc<str>>,
    pub(crate) expiring: Vec<Arc<str>>,
}

struct Change {
    version: u64,
    diff: Diff,
}

impl ReloadReport {
    pub(crate) fn applied(source: Arc<str>, version: u64, diff: Diff) -> Self {
        Self {
            source,
            at: SystemTime::now(),
            outcome: Ok(Arc::new(Change { version, diff })),
        }
    }

    /// A set accepted by a source not yet attached to a store.
    pub(crate) fn queued(source: Arc<str>, set: &crate::KeySet) -> Self {
        let diff = Diff {
            added: set.iter().map(|k| k.id.clone()).collect(),
            ..Diff::default()
        };
        Self::applied(source, 0, diff)
    }

    pub(crate) fn rejected(source: Arc<str>, error: Error) -> Self {
        Self {
            source,
            at: SystemTime::now(),
            outcome: Err(error),
        }
    }

    /// The name of the source that attempted the reload.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// When the attempt was made.
    pub fn at(&self) -> SystemTime {
        self.at
    }

    /// Whether the new keys were applied.
    pub fn is_applied(&self) -> bool {
        self.outcome.is_ok()
    }

    /// Why the attempt was refused; `None` if it was applied. The store kept its
    /// previous keys.
    pub fn error(&self) -> Option<&Error> {
        self.outcome.as_ref().err()
    }

    /// The store version the reload produced, if applied.
    pub fn version(&self) -> Option<u64> {
        self.outcome.as_ref().ok().map(|c| c.version)
    }

    fn ids(&self, list: impl Fn(&Diff) -> &[Arc<str>]) -> Vec<&str> {
        self.list(list).iter().map(|id| &**id).collect()
    }

    /// One list of ids as the report holds it: for a log line that prints twenty of a
    /// million, or a serializer, without a copy of the list.
    pub(crate) fn list(&self, list: impl Fn(&Diff) -> &[Arc<str>]) -> &[Arc<str>] {
        match &self.outcome {
            Ok(change) => list(&change.diff),
            Err(_) => &[],
        }
    }

    /// The ids the update let go of, which other sources' waiting sets may want: those
    /// it removed, and those whose key it changed (perhaps their secret).
    pub(crate) fn released(&self) -> impl Iterator<Item = &Arc<str>> {
        (self.list(|d| &d.removed).iter()).chain(self.list(|d| &d.changed))
    }

    /// Ids of this source's keys that the update added, in the order given.
    pub fn added(&self) -> Vec<&str> {
        self.ids(|d| &d.added)
    }

    /// Ids of this source's keys whose definition the update changed (secret, scopes,
    /// metadata, validity window, `disabled`), in the order given: a revocation by
    /// `disabled = true` shows here.
    pub fn changed(&self) -> Vec<&str> {
        self.ids(|d| &d.changed)
    }

    /// Ids of this source's keys that the update removed, sorted.
    pub fn removed(&self) -> Vec<&str> {
        self.ids(|d| &d.removed)
    }

    /// Ids of this source's keys that the update named and left as they were, in the
    /// order given. For a complete set ([`KeyUpdater::publish`](crate::KeyUpdater::publish)),
    /// every key present before and after, unchanged.
    pub fn kept(&self) -> Vec<&str> {
        self.ids(|d| &d.kept)
    }

    /// Ids of the keys the update named whose `expires_at` falls within the store's
    /// [expiry notice](crate::KeyStore::set_expiry_notice) at the time of the update,
    /// in the order given: clients still using them should move.
    pub fn expiring(&self) -> Vec<&str> {
        self.ids(|d| &d.expiring)
    }
}

/// As JSON: `source`, `at` (RFC 3339), `applied`, `version` (or null), `added`,
/// `changed`, `removed`, `kept`, `expiring` (key ids), `error` (the refusal with its
/// causes, or null).
impl serde::Serialize for ReloadReport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut s = serializer.serialize_struct("ReloadReport", 10)?;
        s.serialize_field("source", self.source())?;
        s.serialize_field("at", &crate::clock::rfc3339(self.at))?;
        s.serialize_field("applied", &self.is_applied())?;
        s.serialize_field("version", &self.version())?;
        s.serialize_field("added", &Ids(self.list(|d| &d.added)))?;
        s.serialize_field("changed", &Ids(self.list(|d| &d.changed)))?;
        s.serialize_field("removed", &Ids(self.list(|d| &d.removed)))?;
        s.serialize_field("kept", &Ids(self.list(|d| &d.kept)))?;
        s.serialize_field("expiring", &Ids(self.list(|d| &d.expiring)))?;
        let error = self.error().map(|e| crate::error::Chain(e).to_string());
        s.serialize_field("error", &error)?;
        s.end()
    }
}

/// A list of ids, serialized as it is held.
struct Ids<'a>(&'a [Arc<str>]);

impl serde::Serialize for Ids<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|id| &**id))
    }
}

impl fmt::Debug for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ReloadReport");
        d.field("source", &self.source).field("at", &self.at);
        match &self.outcome {
            Ok(c) => d
                .field("version", &c.version)
                .field("added", &First(c.diff.added.iter()))
                .field("changed", &First(c.diff.changed.iter()))
                .field("removed", &First(c.diff.removed.iter()))
                .field("kept", &c.diff.kept.len())
                .field("expiring", &First(c.diff.expiring.iter())),
            Err(e) => d.field("error", &format_args!("{}", crate::error::Chain(e))),
        };
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::{ApiKey, ChannelSource, KeySet, KeyStore};

    #[test]
    fn a_report_on_many_keys_prints_a_few_ids_and_counts_the_rest() {
        let keys = |prefix: &str| {
            KeySet::from_keys(
                (0..1000)
                    .map(|i| ApiKey::new(format!("{prefix}{i}"), format!("secret-{prefix}-{i}"))),
            )
            .unwrap()
        };
        let store = KeyStore::new();
        let (source, publisher) = ChannelSource::new(keys("a"));
        store.add_source(source).unwrap();
        let added = format!("{:?}", store.last_reload().unwrap());
        assert!(
            added.contains("\"a0\"") && added.contains("… 984 more"),
            "{added}"
        );
        let report = publisher.publish(keys("b")).unwrap();
        let both = format!("{report:?}");
        assert!(both.contains("\"b0\"") && both.contains("\"a0\""), "{both}");
        assert_eq!(both.matches("… 984 more").count(), 2, "{both}");
        assert!(
            added.len() < 600 && both.len() < 1000,
            "{} and {} bytes",
            added.len(),
            both.len()
        );
        assert!(!both.contains("secret"), "{both}");
    }
}
