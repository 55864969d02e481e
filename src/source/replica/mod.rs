//! What the two fleet engines' replicas share: how a follower is tuned, the
//! snapshot file it keeps, how a record read from the store becomes a change, the
//! usage counts it adds to the namespace, and how a set read whole drops a digest
//! that two ids claim.
//!
//! [`RedisSource`](crate::redis::RedisSource) and
//! [`PostgresSource`](crate::postgres::PostgresSource) follow their store each in
//! its own way (a stream, or `LISTEN` and a change table); everything after the read
//! is the same, and lives here.

pub(crate) mod snapshot;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use crate::{Error, KeyChange, KeySet, key::record};

/// How a replica follows its namespace: the timeouts and the snapshot it keeps.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) connect_timeout: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) check: Duration,
    pub(crate) usage_flush: Duration,
    pub(crate) snapshot: Option<PathBuf>,
    pub(crate) snapshot_every: Duration,
}

impl Options {
    /// The defaults, with the engine's own safety-net interval.
    pub(crate) fn new(check: Duration) -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_secs(5),
            check,
            usage_flush: Duration::from_secs(10),
            snapshot: None,
            snapshot_every: Duration::from_secs(1),
        }
    }
}

/// The change a stored record `record` of key `id` brings: the key, or its
/// removal when the record cannot be applied (said at `error`, naming `engine`), so
/// that a damaged record never leaves an older version of the key in force.
pub(crate) fn change(source: &str, engine: &str, id: String, record: &[u8]) -> KeyChange {
    match record::decode_valid(&id, record) {
        Ok(key) => KeyChange::Upsert(key),
        Err(error) => {
            refused(source, engine, &id, &error);
            KeyChange::remove(id)
        }
    }
}

/// Says that the key with this id is refused because its record cannot be applied.
pub(crate) fn refused(source: &str, engine: &str, id: &str, error: &Error) {
    #[cfg(feature = "tracing")]
    tracing::error!(
        target: "tower_api_key::reload",
        source,
        key_id = id,
        error = %crate::error::Chain(error),
        "a key record in {engine} cannot be applied; the key is refused until it is fixed"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = (source, engine, id, error);
}

/// The ids a set read whole left out because two of them claim one digest (one
/// secret under two ids: which is meant?). A change of one of them may let the
/// other in, which only a whole read can tell: a follower reads the namespace whole
/// again, rather than apply it.
#[derive(Debug, Default)]
pub(crate) struct Clashed(Vec<String>);

impl Clashed {
    /// Whether no id was left out for a shared digest.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether one of `changes` is of an id left out for a shared digest.
    pub(crate) fn touched_by(&self, changes: &[KeyChange]) -> bool {
        !self.0.is_empty()
            && changes.iter().any(|c| {
                self.0
                    .binary_search_by(|id| id.as_str().cmp(c.id()))
                    .is_ok()
            })
    }
}

/// `set` without the ids in `shared`: the holders of a digest that another record
/// claimed too (rare), first and later ones, all refused, as the log's order is not
/// known. Returns the ids left out for it.
pub(crate) fn without_shared(set: KeySet, mut shared: Vec<String>) -> (KeySet, Clashed) {
    if shared.is_empty() {
        return (set, Clashed::default());
    }
    shared.sort();
    shared.dedup();
    let mut kept = KeySet::with_capacity(set.len());
    for key in set.iter() {
        if shared
            .binary_search_by(|id| id.as_str().cmp(key.id()))
            .is_ok()
        {
            continue;
        }
        let _ = kept.insert(key.clone());
    }
    (kept, Clashed(shared))
}

/// What to add to the fleet's counts: per key id, the requests since the last flush,
/// the last use (Unix seconds) and the total to remember once added. Ids no longer
/// loaded are forgotten.
pub(crate) fn usage_deltas(
    flushed: &mut HashMap<Arc<str>, u64>,
    usage: impl IntoIterator<Item = (Arc<str>, u64, u64)>,
) -> Vec<(Arc<str>, u64, u64, u64)> {
    let mut present = HashSet::new();
    let mut out = Vec::new();
    for (id, requests, last) in usage {
        let before = flushed.get(&id).copied().unwrap_or(0);
        // A key removed and added again starts counting from zero.
        let delta = if requests >= before {
            requests - before
        } else {
            requests
        };
        if delta > 0 {
            out.push((id.clone(), delta, last, requests));
        }
        present.insert(id);
    }
    flushed.retain(|id, _| present.contains(id));
    out
}

/// `d`, give or take half, at random: replicas do not retry in step.
pub(crate) fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    let half = d / 2;
    half + half.mul_f64((u64::from_le_bytes(b) % 1000) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 8: the map of counts already flushed kept every id ever seen.
    #[test]
    fn flushed_counts_of_keys_gone_are_forgotten() {
        let mut flushed = HashMap::new();
        let id = |s: &str| Arc::<str>::from(s);
        let deltas = usage_deltas(&mut flushed, [(id("a"), 5, 10), (id("b"), 0, 0)]);
        assert_eq!(deltas, vec![(id("a"), 5, 10, 5)]);
        flushed.extend(deltas.into_iter().map(|(id, _, _, total)| (id, total)));
        flushed.insert(id("gone"), 7);
        let deltas = usage_deltas(&mut flushed, [(id("a"), 8, 11), (id("b"), 1, 12)]);
        assert_eq!(deltas, vec![(id("a"), 3, 11, 8), (id("b"), 1, 12, 1)]);
        assert!(!flushed.contains_key("gone"), "{flushed:?}");
        // Removed and added again: counted from zero.
        flushed.insert(id("a"), 8);
        let deltas = usage_deltas(&mut flushed, [(id("a"), 2, 13)]);
        assert_eq!(deltas, vec![(id("a"), 2, 13, 2)]);
        assert!(!flushed.contains_key("b"));
    }

    #[test]
    fn a_record_that_cannot_be_applied_removes_its_key() {
        let record = record::encode(&crate::ApiKey::new("good", "s"));
        let good = change("t", "Redis", "good".into(), record.as_bytes());
        let bad = change("t", "Redis", "bad".into(), br#"{"id":"bad","secret":"x"}"#);
        assert!(
            matches!(&bad, KeyChange::Remove(id) if &**id == "bad"),
            "{bad:?}"
        );
        assert!(
            matches!(&good, KeyChange::Upsert(k) if k.id() == "good"),
            "{good:?}"
        );
    }

    #[test]
    fn a_digest_claimed_twice_drops_its_first_holder() {
        let mut set = KeySet::new();
        for id in ["a", "b"] {
            set.insert(crate::ApiKey::new(id, format!("secret-{id}")))
                .unwrap();
        }
        let (kept, clashed) = without_shared(set, vec!["a".into(), "a".into(), "zz".into()]);
        assert_eq!(kept.iter().map(|k| k.id()).collect::<Vec<_>>(), ["b"]);
        // A change of either holder is read whole; of another key, applied.
        assert!(clashed.touched_by(&[KeyChange::remove("zz")]));
        assert!(clashed.touched_by(&[KeyChange::remove("b"), KeyChange::remove("a")]));
        assert!(!clashed.touched_by(&[KeyChange::remove("b")]));
    }
}
