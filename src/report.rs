use std::{fmt, sync::Arc, time::SystemTime};

use crate::{
    Error, KeyInfo,
    background::{Pacer, drop_paced},
};

/// The outcome of one reload attempt: when it happened, which source made it, and
/// either what changed or why it was refused.
///
/// Read the latest with [`KeyStore::last_reload`](crate::KeyStore::last_reload), or wait
/// for the next with [`KeyStore::subscribe`](crate::KeyStore::subscribe). This is the
/// audit trail of a rotation: which key ids were added, removed and kept.
#[derive(Clone)]
pub struct ReloadReport {
    source: Arc<str>,
    at: SystemTime,
    /// Shared: a report on a million keys is copied to every subscriber and kept as
    /// the store's last reload, and a copy must not mean a million reference counts.
    outcome: Result<Arc<Change>, Error>,
}

/// What a reload changes in one source's keys, worked out while merging.
#[derive(Default)]
pub(crate) struct Diff {
    pub(crate) added: Vec<Arc<str>>,
    pub(crate) removed: Vec<Arc<str>>,
    pub(crate) kept: Vec<Arc<str>>,
    pub(crate) expiring: Vec<Arc<str>>,
}

struct Change {
    version: u64,
    added: Vec<Arc<str>>,
    removed: Vec<Arc<str>>,
    kept: Vec<Arc<str>>,
    expiring: Vec<Arc<str>>,
}

impl ReloadReport {
    pub(crate) fn applied(source: Arc<str>, version: u64, diff: Diff) -> Self {
        Self {
            source,
            at: SystemTime::now(),
            outcome: Ok(Arc::new(Change {
                version,
                added: diff.added,
                removed: diff.removed,
                kept: diff.kept,
                expiring: diff.expiring,
            })),
        }
    }

    /// A set accepted by a source not yet attached to a store.
    pub(crate) fn queued(source: Arc<str>, set: &crate::KeySet) -> Self {
        let added: Vec<Arc<str>> = set.iter().map(|k| k.id.clone()).collect();
        Self {
            source,
            at: SystemTime::now(),
            outcome: Ok(Arc::new(Change {
                version: 0,
                added,
                removed: Vec::new(),
                kept: Vec::new(),
                expiring: Vec::new(),
            })),
        }
    }

    /// Drops the report; if this was its last copy, frees its id lists a slice at a
    /// time (a million ids is a million reference counts).
    pub(crate) fn drop_paced(self) {
        if let Ok(change) = self.outcome
            && let Ok(change) = Arc::try_unwrap(change)
        {
            let mut pacer = Pacer::new();
            for ids in [change.added, change.removed, change.kept, change.expiring] {
                drop_paced(ids, &mut pacer);
            }
        }
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

    /// Ids of this source's keys that the reload added, in the order of the new set.
    pub fn added(&self) -> Vec<&str> {
        self.outcome
            .as_ref()
            .map_or_else(|_| Vec::new(), |c| c.added.iter().map(|id| &**id).collect())
    }

    /// Ids of this source's keys that the reload removed, sorted.
    pub fn removed(&self) -> Vec<&str> {
        self.outcome.as_ref().map_or_else(
            |_| Vec::new(),
            |c| c.removed.iter().map(|id| &**id).collect(),
        )
    }

    /// Ids of this source's keys present before and after, in the order of the new set.
    pub fn kept(&self) -> Vec<&str> {
        self.outcome
            .as_ref()
            .map_or_else(|_| Vec::new(), |c| c.kept.iter().map(|id| &**id).collect())
    }
}

impl ReloadReport {
    /// Ids of this source's keys whose `expires_at` falls within the store's
    /// [expiry notice](crate::KeyStore::set_expiry_notice) at the time of the reload,
    /// in the order of the new set: clients still using them should move.
    pub fn expiring(&self) -> Vec<&str> {
        self.outcome.as_ref().map_or_else(
            |_| Vec::new(),
            |c| c.expiring.iter().map(|id| &**id).collect(),
        )
    }
}

impl fmt::Debug for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ReloadReport");
        d.field("source", &self.source).field("at", &self.at);
        match &self.outcome {
            Ok(c) => d
                .field("version", &c.version)
                .field("added", &c.added)
                .field("removed", &c.removed)
                .field("kept", &c.kept.len())
                .field("expiring", &c.expiring),
            Err(e) => d.field("error", &format_args!("{e}")),
        };
        d.finish()
    }
}

/// How much one key has been used: from [`KeyStore::usage`](crate::KeyStore::usage).
#[derive(Clone, Debug)]
pub struct KeyUsage {
    key: KeyInfo,
    requests: u64,
    last_used: Option<SystemTime>,
}

impl KeyUsage {
    /// `key`'s counters as read from its slot: requests, and the last use in Unix
    /// seconds (0 for never).
    pub(crate) fn new(key: KeyInfo, (requests, last_used): (u64, u32)) -> Self {
        let secs = u64::from(last_used);
        Self {
            key,
            requests,
            last_used: (secs != 0).then(|| crate::clock::from_unix_ms(secs * 1000)),
        }
    }

    /// The key.
    pub fn key(&self) -> &KeyInfo {
        &self.key
    }

    /// Requests let in with this key since it was first loaded (counts carry over
    /// reloads that keep its id).
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// When the key last let a request in, to the second; `None` if never.
    pub fn last_used(&self) -> Option<SystemTime> {
        self.last_used
    }
}
