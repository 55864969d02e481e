//! The thread that follows a namespace: reads it whole when it must, applies the log
//! version by version, checks where the namespace is, adds the replica's usage, and
//! says what is wrong once per new cause.

use std::{
    collections::HashMap,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use redis::Value;

use super::{
    log::{self, Change, Cursor, StreamId},
    model::{self, Keys},
    read::{self, Head, Read, is_refusal},
};
use crate::{
    Error, KeyChange, KeyUpdater,
    source::replica::{
        self, Clashed, Options, jittered,
        snapshot::{At, Snapshots},
        usage_deltas,
    },
};

/// The first wait after a failure; it doubles up to the source's maximum.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// How long a blocking log read waits for an entry.
const BLOCK: Duration = Duration::from_millis(500);

/// What is wrong, as said once per change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// Redis does not answer, or the connection broke.
    Unreachable,
    /// Redis answers with an error (authentication, memory, ...).
    Refused,
    /// The namespace has no epoch or version: wiped, partly wiped, never created.
    Missing,
    /// One of the namespace's keys has the wrong type.
    Damaged,
    /// The namespace's version went back within its epoch: Redis lost writes.
    WentBack,
}

pub(super) struct Follower {
    client: redis::Client,
    keys: Keys,
    options: Options,
    updater: KeyUpdater,
    /// Where the store is in the log; `None`: read the namespace whole next.
    cursor: Option<Cursor>,
    /// The store keeps this source's last whole set pending (it clashed with another
    /// source): changes are then taken by reading the namespace whole again, never
    /// applied by id over a set the store does not hold.
    pending: bool,
    /// How many keys the initial load read (to tell whether the store took them).
    loaded: usize,
    /// The ids the last whole read left out for a digest two of them claim.
    clashed: Clashed,
    /// What was said last; `None` while all is well.
    failure: Option<Failure>,
    /// The highest version the namespace's counter was seen at, and its epoch.
    /// Within an epoch the counter only grows: seen lower, Redis lost writes (it
    /// came back from an older save), and its keys are not taken.
    seen: Option<(String, u64)>,
    /// The highest version the store took from the namespace, its epoch, and the
    /// log entry it was taken at. Redis below it, with that entry gone from the log,
    /// lost writes too (a log entry reusing the next version, which Redis's counter
    /// never reached, is still in the log).
    applied: Option<(String, u64, StreamId)>,
    /// The epoch found gone back: not followed until the namespace is created
    /// again (a restore gives it a new epoch).
    gone_back: Option<String>,
    /// A failure right after things went well is retried at once, quietly: a cut
    /// connection is made again without a word.
    quiet_retry: bool,
    backoff: Duration,
    /// The request counts already added to Redis, by key id (ids still loaded only).
    flushed: HashMap<Arc<str>, u64>,
    snapshots: Option<Snapshots>,
    head: redis::Script,
    add_usage: redis::Script,
}

/// Why a session with Redis ended.
enum Fault {
    Redis(redis::RedisError),
    Closed,
}

impl From<redis::RedisError> for Fault {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(e)
    }
}

impl Follower {
    pub(super) fn new(
        client: redis::Client,
        keys: Keys,
        options: Options,
        updater: KeyUpdater,
        cursor: Option<Cursor>,
        loaded: usize,
        failure: Option<Failure>,
    ) -> Self {
        let seen = cursor.as_ref().map(|c| (c.epoch.clone(), c.version));
        let applied = cursor.as_ref().map(|c| (c.epoch.clone(), c.version, c.at));
        let snapshots = options
            .snapshot
            .clone()
            .and_then(|path| Snapshots::start(path, options.snapshot_every));
        Self {
            client,
            keys,
            // With a snapshot to keep, the set must be in hand once: read it again.
            cursor: if snapshots.is_some() { None } else { cursor },
            options,
            updater,
            pending: false,
            loaded,
            clashed: Clashed::default(),
            failure,
            seen,
            applied,
            gone_back: None,
            quiet_retry: false,
            backoff: FIRST_BACKOFF,
            flushed: HashMap::new(),
            snapshots,
            head: redis::Script::new(model::HEAD),
            add_usage: redis::Script::new(model::ADD_USAGE),
        }
    }

    fn name(&self) -> String {
        self.updater.source_name().to_owned()
    }

    pub(super) fn run(mut self) {
        // A whole set refused at the load (it clashed with another source) is kept
        // pending by the store: follow by whole sets until it is applied. (Looked at
        // here, not in `watch`, which the store's `add_source` waits for.)
        self.pending = self.cursor.is_some() && self.loaded > 0 && self.updater.usage().is_empty();
        while !self.updater.is_closed() {
            let result = read::connect(&self.client, self.options.connect_timeout)
                .map_err(Fault::Redis)
                .and_then(|mut con| self.session(&mut con));
            match result {
                Ok(()) | Err(Fault::Closed) => return,
                Err(Fault::Redis(e)) => {
                    #[cfg(feature = "tracing")]
                    tracing::debug!(target: "tower_api_key::redis", source = %self.name(), error = %e, "redis session ended");
                    if std::mem::take(&mut self.quiet_retry) && !is_refusal(&e) {
                        continue;
                    }
                    let failure = if is_refusal(&e) {
                        Failure::Refused
                    } else {
                        Failure::Unreachable
                    };
                    self.failed(failure, super::describe(&e));
                    self.nap(jittered(self.backoff));
                    self.backoff = (self.backoff * 2).min(self.options.max_backoff);
                }
            }
        }
        // The store is gone: a last usage flush is pointless without it.
    }

    /// Says what is wrong, once per new cause; the keys stay.
    fn failed(&mut self, failure: Failure, message: impl Into<String>) {
        if self.failure != Some(failure) {
            self.failure = Some(failure);
            self.updater
                .reject(Error::custom(self.name(), message.into()));
        }
    }

    /// Redis answered as it should: back to quick retries; if a failure was said,
    /// say that it is over with an update (unless a whole read does it anyway).
    fn answered(&mut self) {
        self.quiet_retry = true;
        self.backoff = FIRST_BACKOFF;
        if self.failure.take().is_some() && self.cursor.is_some() {
            if self.pending {
                // Saying a failure dropped the set the store kept pending: send it
                // again.
                self.cursor = None;
            } else {
                let _ = self.updater.apply(Vec::new());
            }
        }
    }

    /// Sleeps, waking at least twice a second to see whether the store is gone.
    fn nap(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.updater.is_closed() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(Duration::from_millis(250)));
        }
    }

    /// Follows the namespace over one connection until it breaks or the store goes.
    fn session(&mut self, con: &mut redis::Connection) -> Result<(), Fault> {
        let patience = BLOCK + self.options.connect_timeout;
        con.set_read_timeout(Some(patience))?;
        if self.cursor.is_some() {
            // Back after a reconnection: carry on from the log if nothing was lost.
            self.check(con)?;
        }
        let mut next_check = Instant::now() + self.options.check;
        let mut next_flush = Instant::now() + self.options.usage_flush;
        while !self.updater.is_closed() {
            if self.gone_back.is_some() {
                // Nothing of this epoch is taken: look again at the next check.
                self.nap(next_check.saturating_duration_since(Instant::now()));
                next_check = Instant::now() + self.options.check;
                self.check(con)?;
                continue;
            }
            if self.cursor.is_none() && !self.resync(con)? {
                // Missing or damaged: said; look again at the next check.
                self.nap(next_check.saturating_duration_since(Instant::now()));
                next_check = Instant::now() + self.options.check;
                continue;
            }
            self.read_log(con)?;
            let now = Instant::now();
            if now >= next_check {
                next_check = now + self.options.check;
                self.check(con)?;
            }
            if now >= next_flush {
                next_flush = now + self.options.usage_flush;
                self.flush_usage(con)?;
            }
        }
        Err(Fault::Closed)
    }

    /// Reads the namespace whole and publishes it: the store applies what differs.
    /// `false` if it is missing or damaged (said).
    fn resync(&mut self, con: &mut redis::Connection) -> Result<bool, Fault> {
        let name = self.name();
        let long = self.options.connect_timeout.max(Duration::from_secs(30));
        con.set_read_timeout(Some(long))?;
        let read = read::read_all(con, &self.keys, &name);
        con.set_read_timeout(Some(BLOCK + self.options.connect_timeout))?;
        let (set, cursor) = match read? {
            Read::Whole(set, cursor, clashed) => {
                self.clashed = clashed;
                (set, cursor)
            }
            Read::Missing => {
                self.failed(Failure::Missing, missing(&self.keys));
                return Ok(false);
            }
            Read::Damaged => {
                self.failed(Failure::Damaged, super::DAMAGED);
                return Ok(false);
            }
        };
        if self.went_back(con, &cursor.epoch, cursor.version)? {
            return Ok(false);
        }
        self.seen = Some((cursor.epoch.clone(), cursor.version));
        self.applied = Some((cursor.epoch.clone(), cursor.version, cursor.at));
        if let Some(snapshots) = &self.snapshots {
            let at = At {
                epoch: cursor.epoch.clone(),
                version: cursor.version,
            };
            snapshots.set(set.clone(), at);
        }
        self.failure = None;
        match self.updater.publish(set) {
            Ok(_) => self.pending = false,
            Err(Error::StoreClosed) => return Err(Fault::Closed),
            // Refused for a clash with another source (recorded and logged by the
            // store, which keeps the set and applies it once the clash is gone), or
            // for a rule no whole set read from here breaks: carry on from the log.
            Err(_) => self.pending = true,
        }
        self.cursor = Some(cursor);
        self.answered();
        Ok(true)
    }

    /// Where the namespace is, against what the store applied: a new epoch, a
    /// version below ours, or a version ahead of ours that the log does not hold
    /// (its entries were lost) means reading it whole.
    fn check(&mut self, con: &mut redis::Connection) -> Result<(), Fault> {
        match read::head(con, &self.keys, &self.head)? {
            Head::Missing => self.failed(Failure::Missing, missing(&self.keys)),
            Head::Damaged => self.failed(Failure::Damaged, super::DAMAGED),
            Head::At {
                epoch,
                version,
                last,
            } => {
                if let Some(gone) = &self.gone_back {
                    if *gone == epoch {
                        return Ok(());
                    }
                    // Created again: read it whole.
                    self.resyncing("the namespace was created again (a new epoch)");
                    self.gone_back = None;
                    self.cursor = None;
                }
                if self.went_back(con, &epoch, version)? {
                    return Ok(());
                }
                if let Some((seen, at)) = &mut self.seen
                    && *seen == epoch
                {
                    *at = (*at).max(version);
                }
                if let Some(cursor) = &self.cursor {
                    let behind = version > cursor.version || cursor.holds_part();
                    let why = if epoch != cursor.epoch {
                        Some("the namespace was created again (a new epoch)")
                    } else if version < cursor.version {
                        Some("the namespace's version went back")
                    } else if behind && last <= cursor.at {
                        Some("the namespace is ahead of what its log holds")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        self.resyncing(why);
                        self.cursor = None;
                    }
                }
                self.answered();
            }
        }
        Ok(())
    }

    /// Whether the namespace went back to an earlier version within the epoch it
    /// was seen at (said, and remembered until a new epoch).
    fn went_back(
        &mut self,
        con: &mut redis::Connection,
        epoch: &str,
        version: u64,
    ) -> Result<bool, Fault> {
        let mut at = 0;
        if let Some((seen, v)) = &self.seen
            && seen == epoch
            && version < *v
        {
            at = *v;
        }
        if let Some((applied, v, entry)) = &self.applied
            && applied == epoch
            && version < *v
            && *v > at
        {
            let still: Value = redis::cmd("XRANGE")
                .arg(&self.keys.log)
                .arg(entry.to_string())
                .arg(entry.to_string())
                .query(con)?;
            if !matches!(&still, Value::Array(entries) if !entries.is_empty()) {
                at = *v;
            }
        }
        if at == 0 {
            return Ok(false);
        }
        let message = format!(
            "the namespace went back from version {at} to {version} (Redis came back from \
             an older save and lost writes: revocations among them); keeping the last good \
             keys until it is restored (`restore_file` from a replica's snapshot)"
        );
        self.gone_back = Some(epoch.to_owned());
        self.failed(Failure::WentBack, message);
        Ok(true)
    }

    fn resyncing(&self, why: &str) {
        #[cfg(feature = "tracing")]
        tracing::info!(target: "tower_api_key::reload", source = %self.name(), why, "reading the Redis namespace whole");
        #[cfg(not(feature = "tracing"))]
        let _ = why;
    }

    /// Reads the log as it grows (blocking a moment when there is nothing), and
    /// applies the versions it completes, together.
    fn read_log(&mut self, con: &mut redis::Connection) -> Result<(), Fault> {
        let Some(cursor) = &mut self.cursor else {
            return Ok(());
        };
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.keys.log)
            .arg(cursor.at.to_string())
            .query(con)?;
        let mut batch = Batch::default();
        for entry in log::entries(reply) {
            match cursor.feed(entry) {
                Ok(Some(changes)) => batch.add(changes),
                Ok(None) => {}
                Err(anomaly) => {
                    self.resyncing(&anomaly.to_string());
                    self.cursor = None;
                    return Ok(());
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mark = (cursor.epoch.clone(), cursor.version, cursor.at);
        if self.pending {
            // The store holds an older set than the log's: send the whole set again.
            self.cursor = None;
            return Ok(());
        }
        let name = self.name();
        let changes = batch.into_changes(&name);
        if self.clashed.touched_by(&changes) {
            // A key left out for a shared digest, or the one it shared it with,
            // changed: which of them now stands only a whole read can tell.
            self.resyncing("a key that shared its secret with another changed");
            self.cursor = None;
            return Ok(());
        }
        let copy = self.snapshots.as_ref().map(|_| changes.clone());
        match self.updater.apply(changes) {
            Ok(_) => {
                if let (Some(snapshots), Some(copy)) = (&self.snapshots, copy) {
                    let (epoch, version, _) = &mark;
                    let at = At {
                        epoch: epoch.clone(),
                        version: *version,
                    };
                    snapshots.changes(copy, at);
                }
                self.applied = Some(mark);
            }
            Err(Error::StoreClosed) => return Err(Fault::Closed),
            Err(error) => {
                // Refused whole (a clash with another source, or one secret under two
                // ids): read the namespace whole, which sorts out which keys to refuse.
                #[cfg(feature = "tracing")]
                tracing::info!(target: "tower_api_key::reload", source = %name, error = %crate::error::Chain(&error), "a change from Redis was refused; reading the namespace whole");
                #[cfg(not(feature = "tracing"))]
                let _ = error;
                self.cursor = None;
            }
        }
        Ok(())
    }

    /// Adds the requests counted since the last flush to the namespace's counters.
    fn flush_usage(&mut self, con: &mut redis::Connection) -> Result<(), Fault> {
        let usage = self.updater.usage().into_iter().map(|u| {
            let last = u
                .last_used()
                .map_or(0, |at| crate::clock::to_unix_ms(at) / 1000);
            (Arc::from(u.key().id()), u.requests(), last)
        });
        let deltas = usage_deltas(&mut self.flushed, usage);
        if deltas.is_empty() {
            return Ok(());
        }
        let mut invocation = self.add_usage.prepare_invoke();
        invocation
            .key(&self.keys.records)
            .key(&self.keys.requests)
            .key(&self.keys.last_used);
        for (id, delta, last, _) in &deltas {
            invocation.arg(&**id).arg(format!("{delta}:{last}"));
        }
        invocation.invoke::<i64>(con)?;
        self.flushed
            .extend(deltas.into_iter().map(|(id, _, _, total)| (id, total)));
        Ok(())
    }
}

/// What a wiped namespace is said as.
fn missing(keys: &Keys) -> String {
    format!(
        "the namespace has no version counter (`{}`: wiped, partly wiped, or never \
         created); keeping the last good keys until it is restored",
        keys.version
    )
}

/// The complete versions of one read, merged by id: the last change of an id wins.
#[derive(Default)]
struct Batch {
    changes: Vec<Change>,
    at: HashMap<String, usize>,
}

impl Batch {
    fn add(&mut self, changes: Vec<Change>) {
        for change in changes {
            let id = match &change {
                Change::Put { id, .. } | Change::Del(id) => id.clone(),
            };
            match self.at.get(&id) {
                Some(&i) => self.changes[i] = change,
                None => {
                    self.at.insert(id, self.changes.len());
                    self.changes.push(change);
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The store's changes. A record that cannot be applied is its key removed:
    /// refused, and logged at `error` with its id.
    fn into_changes(self, source: &str) -> Vec<KeyChange> {
        self.changes
            .into_iter()
            .map(|change| match change {
                Change::Put { id, record } => replica::change(source, "Redis", id, &record),
                Change::Del(id) => KeyChange::remove(id),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_keeps_the_last_change_of_each_id_in_first_seen_order() {
        let put = |id: &str, r: &str| Change::Put {
            id: id.into(),
            record: r.as_bytes().to_vec(),
        };
        let mut batch = Batch::default();
        batch.add(vec![put("a", "1"), put("b", "1")]);
        batch.add(vec![Change::Del("a".into())]);
        batch.add(vec![put("c", "1"), put("b", "2")]);
        assert_eq!(
            batch.changes,
            vec![Change::Del("a".into()), put("b", "2"), put("c", "1")]
        );
    }

    #[test]
    fn an_unreadable_record_in_a_batch_is_its_key_removed() {
        let good = crate::key::record::encode(&crate::ApiKey::new("good", "s"));
        let mut batch = Batch::default();
        batch.add(vec![
            Change::Put {
                id: "good".into(),
                record: good.into_bytes(),
            },
            Change::Put {
                id: "bad".into(),
                record: b"not json".to_vec(),
            },
        ]);
        let changes = batch.into_changes("redis:t");
        assert!(matches!(&changes[0], KeyChange::Upsert(k) if k.id() == "good"));
        assert!(matches!(&changes[1], KeyChange::Remove(id) if &**id == "bad"));
    }
}
