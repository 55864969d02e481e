//! The thread that follows a namespace: one connection that `LISTEN`s, reads the
//! change table from the replica's version on every wake-up, poll and reconnection,
//! reads the namespace whole when it must, adds the replica's usage, and says what is
//! wrong once per new cause.

use std::{collections::HashMap, future::poll_fn, sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};
use tokio_postgres::{AsyncMessage, Client};

use super::{
    Connection, PgError, Target, model,
    read::{self, Change, Cursor, Since, Whole},
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

/// How often a wait looks whether the store is gone.
const TICK: Duration = Duration::from_millis(250);

/// What is wrong, as said once per change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// PostgreSQL does not answer, or the connection broke.
    Unreachable,
    /// PostgreSQL answers with an error (authentication, permissions, ...).
    Refused,
    /// The namespace has no row, or the tables are gone.
    Missing,
    /// The records do not match the namespace's row.
    Damaged,
}

pub(super) struct Follower {
    target: Target,
    namespace: String,
    options: Options,
    updater: KeyUpdater,
    /// Where the store is; `None`: read the namespace whole next.
    cursor: Option<Cursor>,
    /// The store keeps this source's last whole set pending (it clashed with another
    /// source): changes are then taken by reading the namespace whole again.
    pending: bool,
    loaded: usize,
    /// The ids the last whole read left out for a digest two of them claim.
    clashed: Clashed,
    failure: Option<Failure>,
    quiet_retry: bool,
    backoff: Duration,
    /// The request counts already added to PostgreSQL, by key id.
    flushed: HashMap<Arc<str>, u64>,
    snapshots: Option<Snapshots>,
}

/// Why a session ended.
enum Fault {
    Pg(PgError),
    Closed,
}

impl From<PgError> for Fault {
    fn from(e: PgError) -> Self {
        Self::Pg(e)
    }
}

impl From<tokio_postgres::Error> for Fault {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(PgError::Pg(e))
    }
}

impl Follower {
    pub(super) fn new(
        target: Target,
        namespace: String,
        options: Options,
        updater: KeyUpdater,
        cursor: Option<Cursor>,
        loaded: usize,
        failure: Option<Failure>,
    ) -> Self {
        let snapshots = options
            .snapshot
            .clone()
            .and_then(|path| Snapshots::start(path, options.snapshot_every));
        Self {
            target,
            namespace,
            cursor: if snapshots.is_some() { None } else { cursor },
            options,
            updater,
            pending: false,
            loaded,
            clashed: Clashed::default(),
            failure,
            quiet_retry: false,
            backoff: FIRST_BACKOFF,
            flushed: HashMap::new(),
            snapshots,
        }
    }

    fn name(&self) -> String {
        self.updater.source_name().to_owned()
    }

    pub(super) fn run(mut self) {
        self.pending = self.cursor.is_some() && self.loaded > 0 && self.updater.usage().is_empty();
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                #[cfg(feature = "tracing")]
                tracing::error!(target: "tower_api_key::reload", %error, "cannot start the PostgreSQL follower's runtime; keys will not be updated");
                #[cfg(not(feature = "tracing"))]
                let _ = error;
                return;
            }
        };
        runtime.block_on(self.follow());
    }

    async fn follow(&mut self) {
        while !self.updater.is_closed() {
            match self.session().await {
                Ok(()) | Err(Fault::Closed) => return,
                Err(Fault::Pg(e)) => {
                    #[cfg(feature = "tracing")]
                    tracing::debug!(target: "tower_api_key::postgres", source = %self.name(), error = ?e, "postgres session ended");
                    if std::mem::take(&mut self.quiet_retry) && !super::answered(&e) {
                        continue;
                    }
                    let failure = if super::answered(&e) {
                        Failure::Refused
                    } else {
                        Failure::Unreachable
                    };
                    self.failed(failure, super::describe(&e));
                    self.nap(jittered(self.backoff)).await;
                    self.backoff = (self.backoff * 2).min(self.options.max_backoff);
                }
            }
        }
    }

    /// Says what is wrong, once per new cause; the keys stay.
    fn failed(&mut self, failure: Failure, message: impl Into<String>) {
        if self.failure != Some(failure) {
            self.failure = Some(failure);
            self.updater
                .reject(Error::custom(self.name(), message.into()));
        }
    }

    /// PostgreSQL answered as it should: back to quick retries; if a failure was
    /// said, say that it is over.
    fn answered(&mut self) {
        self.quiet_retry = true;
        self.backoff = FIRST_BACKOFF;
        if self.failure.take().is_some() && self.cursor.is_some() {
            if self.pending {
                self.cursor = None;
            } else {
                let _ = self.updater.apply(Vec::new());
            }
        }
    }

    /// Sleeps, waking at least every [`TICK`] to see whether the store is gone.
    async fn nap(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.updater.is_closed() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(TICK)).await;
        }
    }

    /// How long one small statement may take before the connection is taken as dead.
    fn patience(&self) -> Duration {
        self.options.connect_timeout + Duration::from_secs(3)
    }

    /// Follows the namespace over one connection until it breaks or the store goes.
    async fn session(&mut self) -> Result<(), Fault> {
        let (mut client, connection) = self
            .target
            .connect(self.options.connect_timeout, super::Role::Replica)
            .await?;
        let (wake, mut woken) = mpsc::channel(1);
        let driver = tokio::spawn(drive(connection, self.namespace.clone(), wake));
        let result = self.listen(&mut client, &mut woken).await;
        driver.abort();
        result
    }

    async fn listen(
        &mut self,
        client: &mut Client,
        woken: &mut mpsc::Receiver<()>,
    ) -> Result<(), Fault> {
        // Listen first, then read: a change committed in between is both read and
        // announced, never neither.
        super::within(
            self.patience(),
            client.batch_execute(&format!("LISTEN {}", model::CHANNEL)),
        )
        .await?;
        let mut next_flush = Instant::now() + self.options.usage_flush;
        loop {
            if self.updater.is_closed() {
                return Err(Fault::Closed);
            }
            if self.cursor.is_some() {
                self.catch_up(client).await?;
            }
            // Never read, or the change table could not explain where the namespace
            // is: read it whole now, not at the next poll.
            if self.cursor.is_none() {
                self.resync(client).await?;
            }
            if Instant::now() >= next_flush {
                next_flush = Instant::now() + self.options.usage_flush;
                self.flush_usage(client).await?;
            }
            // Wait for a notification, the poll, or the store's end.
            let poll = Instant::now() + self.options.check;
            loop {
                if self.updater.is_closed() {
                    return Err(Fault::Closed);
                }
                let now = Instant::now();
                if now >= poll {
                    break;
                }
                match tokio::time::timeout((poll - now).min(TICK), woken.recv()).await {
                    Ok(Some(())) => break,
                    // The connection ended.
                    Ok(None) => return Err(Fault::Pg(PgError::Lost)),
                    Err(_) => {}
                }
            }
        }
    }

    /// Reads the namespace whole and publishes it: the store applies what differs.
    async fn resync(&mut self, client: &mut Client) -> Result<(), Fault> {
        let name = self.name();
        let long = self.options.connect_timeout.max(Duration::from_secs(30));
        let whole = super::within(long, read::whole(client, &self.namespace, &name)).await?;
        let (set, cursor) = match whole {
            Whole::Read(set, cursor, clashed) => {
                self.clashed = clashed;
                (set, cursor)
            }
            Whole::Missing(why) => {
                self.failed(Failure::Missing, missing(why));
                return Ok(());
            }
            Whole::Damaged(why) => {
                self.failed(Failure::Damaged, why);
                return Ok(());
            }
        };
        if let Some(snapshots) = &self.snapshots {
            snapshots.set(set.clone(), at_of(&cursor));
        }
        self.failure = None;
        match self.updater.publish(set) {
            Ok(_) => self.pending = false,
            Err(Error::StoreClosed) => return Err(Fault::Closed),
            Err(_) => self.pending = true,
        }
        self.cursor = Some(cursor);
        self.answered();
        Ok(())
    }

    /// Reads the changes since the replica's version and applies them, or finds that
    /// the namespace must be read whole.
    async fn catch_up(&mut self, client: &mut Client) -> Result<(), Fault> {
        let Some(cursor) = self.cursor.clone() else {
            return Ok(());
        };
        let long = self.options.connect_timeout.max(Duration::from_secs(30));
        let since = super::within(long, read::since(client, &self.namespace, &cursor)).await?;
        match since {
            Since::Nothing => self.answered(),
            Since::Missing(why) => self.failed(Failure::Missing, missing(why)),
            Since::Resync(why) => {
                self.resyncing(why);
                self.cursor = None;
                self.answered();
            }
            Since::Changes(changes, next) => {
                self.apply(changes, next)?;
                self.answered();
            }
        }
        Ok(())
    }

    fn apply(&mut self, changes: Vec<Change>, next: Cursor) -> Result<(), Fault> {
        if self.pending {
            // The store holds an older set than the log's: send the whole set again.
            self.cursor = None;
            return Ok(());
        }
        let name = self.name();
        let changes = into_changes(merge(changes), &name);
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
                    snapshots.changes(copy, at_of(&next));
                }
                self.cursor = Some(next);
            }
            Err(Error::StoreClosed) => return Err(Fault::Closed),
            Err(error) => {
                #[cfg(feature = "tracing")]
                tracing::info!(target: "tower_api_key::reload", source = %name, error = %crate::error::Chain(&error), "a change from PostgreSQL was refused; reading the namespace whole");
                #[cfg(not(feature = "tracing"))]
                let _ = error;
                self.cursor = None;
            }
        }
        Ok(())
    }

    fn resyncing(&self, why: &str) {
        #[cfg(feature = "tracing")]
        tracing::info!(target: "tower_api_key::reload", source = %self.name(), why, "reading the PostgreSQL namespace whole");
        #[cfg(not(feature = "tracing"))]
        let _ = why;
    }

    /// Adds the requests counted since the last flush to the fleet's counters.
    async fn flush_usage(&mut self, client: &Client) -> Result<(), Fault> {
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
        let ids: Vec<&str> = deltas.iter().map(|d| &*d.0).collect();
        let counts: Vec<i64> = deltas.iter().map(|d| d.1 as i64).collect();
        let lasts: Vec<i64> = deltas.iter().map(|d| d.2 as i64).collect();
        let added = super::within(
            self.patience(),
            client.execute(model::ADD_USAGE, &[&self.namespace, &ids, &counts, &lasts]),
        )
        .await;
        match added {
            Ok(_) => {}
            // The tables are gone: said by the reads; the counts wait.
            Err(e) if super::no_tables(&e) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        self.flushed
            .extend(deltas.into_iter().map(|(id, _, _, total)| (id, total)));
        Ok(())
    }
}

/// Drives the connection, passing on a wake-up for each notification about this
/// namespace; returns when the connection ends (dropping `wake` says so).
async fn drive(mut connection: Connection, namespace: String, wake: mpsc::Sender<()>) {
    while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
        match message {
            Ok(AsyncMessage::Notification(n)) if n.payload() == namespace => {
                // One pending wake-up is enough: the read takes everything since.
                let _ = wake.try_send(());
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// What a wiped namespace is said as.
fn missing(why: &str) -> String {
    format!("{why}; keeping the last good keys until it is restored")
}

/// The changes of one read, merged by id: the last change of an id wins.
fn merge(changes: Vec<Change>) -> Vec<Change> {
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<Change> = Vec::with_capacity(changes.len());
    for change in changes {
        let id = match &change {
            Change::Put { id, .. } | Change::Del(id) => id.clone(),
        };
        match at.get(&id) {
            Some(&i) => out[i] = change,
            None => {
                at.insert(id, out.len());
                out.push(change);
            }
        }
    }
    out
}

/// The store's changes. A record that cannot be applied is its key removed:
/// refused, and logged at `error` with its id.
fn into_changes(changes: Vec<Change>, source: &str) -> Vec<KeyChange> {
    changes
        .into_iter()
        .map(|change| match change {
            Change::Put { id, record } => {
                replica::change(source, "PostgreSQL", id, record.as_bytes())
            }
            Change::Del(id) => KeyChange::remove(id),
        })
        .collect()
}

/// The version a cursor stands at, as a snapshot says it.
fn at_of(cursor: &Cursor) -> At {
    At {
        epoch: cursor.epoch.clone(),
        version: u64::try_from(cursor.version).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_changes_keep_the_last_of_each_id_in_first_seen_order() {
        let put = |id: &str, r: &str| Change::Put {
            id: id.into(),
            record: r.into(),
        };
        let merged = merge(vec![
            put("a", "1"),
            put("b", "1"),
            Change::Del("a".into()),
            put("c", "1"),
            put("b", "2"),
        ]);
        assert_eq!(
            merged,
            vec![Change::Del("a".into()), put("b", "2"), put("c", "1")]
        );
    }

    #[test]
    fn an_unreadable_record_is_its_key_removed() {
        let good = crate::key::record::encode(&crate::ApiKey::new("good", "s"));
        let changes = into_changes(
            vec![
                Change::Put {
                    id: "good".into(),
                    record: good,
                },
                Change::Put {
                    id: "bad".into(),
                    record: r#"{"id":"bad","secret":"x"}"#.into(),
                },
            ],
            "postgres:t",
        );
        assert!(matches!(&changes[0], KeyChange::Upsert(k) if k.id() == "good"));
        assert!(matches!(&changes[1], KeyChange::Remove(id) if &**id == "bad"));
    }
}
