//! `PostgresSource`: a replica's view of a namespace, loaded whole, then followed
//! through the change table (the follower is in `follow.rs`).

use std::{fmt, path::PathBuf, thread, time::Duration};

use super::{
    Target,
    follow::{Failure, Follower},
    read::{self, Cursor, Whole},
};
use crate::{Error, KeySet, KeySource, KeyUpdater, source::replica::Options};

/// A [`KeySource`] that follows a namespace in PostgreSQL, which
/// [`PostgresBackend`](super::PostgresBackend) (and so the key-management API of any
/// replica) writes: every replica of a fleet enforces the same keys.
///
/// It loads the whole set when added, then reads the namespace's change table from
/// the last version it applied: at once when PostgreSQL's `NOTIFY` says something
/// changed, after every reconnection, and on a safety poll
/// ([`with_version_check`](PostgresSource::with_version_check)) that catches
/// notifications lost. Changes are applied by id, every version whole (a one-key
/// change to a million-key set copies a shard of about two thousand keys). Anything
/// the change table cannot explain (changes pruned or truncated, a new epoch, a
/// version gone back) makes it read the namespace whole.
///
/// When PostgreSQL misbehaves the replica keeps serving its last good keys: a
/// stopped or restarted server, a terminated connection, a wiped namespace or
/// emptied keys table (never read as "no keys": the replica waits for an operator
/// to restore it with
/// [`PostgresBackend::restore_file`](super::PostgresBackend::restore_file)). It says
/// so once per new cause (a `warn` and
/// [`KeyStore::last_reload`](crate::KeyStore::last_reload)), retries with jittered
/// backoff, and catches up when PostgreSQL answers again. A record it cannot read is
/// that one key refused, logged at `error` with its id. A replica that starts while
/// PostgreSQL is unreachable, or before the namespace exists, has no keys from it
/// (it fails closed), unless [`with_snapshot`](PostgresSource::with_snapshot) gave
/// it a file of its last keys.
///
/// Its work runs on one thread (with a small runtime of its own, and one connection
/// that is not pooled: it holds the `LISTEN`), which ends within a second of the
/// store being dropped. Each replica also adds the request counts of its keys to the
/// namespace, in batches, so the key-management API shows the fleet's usage.
///
/// # Example
///
/// ```no_run
/// use tower_api_key::{KeyStore, postgres::PostgresSource};
///
/// let store = KeyStore::new();
/// // As with a missing key file, a failed first load is an Err while the source keeps
/// // trying; the store refuses everyone until it answers.
/// let url = "postgres://keys:password@127.0.0.1:5432/app?sslmode=disable";
/// if let Err(e) = store.add_source(PostgresSource::new(url, "payments")?) {
///     eprintln!("keys not loaded yet, still trying: {e}");
/// }
/// # Ok::<(), tower_api_key::Error>(())
/// ```
pub struct PostgresSource {
    target: Target,
    namespace: String,
    options: Options,
    /// Where the initial load left off, and how many keys it had.
    loaded: Option<(Cursor, usize)>,
    /// What the initial load failed for (said already), when it served nothing.
    failed: Option<Failure>,
}

impl PostgresSource {
    /// Follows namespace `namespace` of the PostgreSQL database at `url`
    /// (`postgres://user:password@host:port/database`, with `sslmode` and
    /// `sslrootcert` as libpq reads them; see [the module](super)). Checks the URL
    /// only: nothing is sent until the source is added to a store.
    ///
    /// # Errors
    ///
    /// [`Error::Source`] if `url` is not a PostgreSQL URL, its `sslrootcert` cannot
    /// be read, or `namespace` is empty. The error never quotes the URL.
    pub fn new(url: &str, namespace: impl Into<String>) -> Result<Self, Error> {
        let namespace = namespace.into();
        let target = Target::parse(url, &namespace)?;
        Ok(Self {
            target,
            namespace,
            options: Options::new(Duration::from_secs(2)),
            loaded: None,
            failed: None,
        })
    }

    /// How long to wait for PostgreSQL to answer a connection (default 2 s).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = timeout;
        self
    }

    /// The longest wait between two attempts to reach PostgreSQL (default 5 s;
    /// attempts start at 100 ms apart and double, with jitter).
    #[must_use]
    pub fn with_max_backoff(mut self, max: Duration) -> Self {
        self.options.max_backoff = max;
        self
    }

    /// How often the change table is read without a notification: the safety net
    /// for notifications lost, and how a wiped namespace is noticed when nothing
    /// else happens (default 2 s). It is one indexed read of one row when nothing
    /// changed.
    #[must_use]
    pub fn with_version_check(mut self, every: Duration) -> Self {
        self.options.check = every;
        self
    }

    /// How often this replica adds its keys' request counts to the namespace
    /// (default 10 s).
    #[must_use]
    pub fn with_usage_flush(mut self, every: Duration) -> Self {
        self.options.usage_flush = every;
        self
    }

    /// Keeps the last keys applied in the key file at `path` (digests only), and
    /// serves them from the first request when the replica starts while PostgreSQL
    /// is unreachable or its namespace is missing. The file is also what an operator
    /// restores a wiped namespace from
    /// ([`PostgresBackend::restore_file`](super::PostgresBackend::restore_file)).
    ///
    /// It is written atomically by a thread of its own, at most once per
    /// [`with_snapshot_interval`](PostgresSource::with_snapshot_interval) and always
    /// after the last change. Give each replica its own path.
    #[must_use]
    pub fn with_snapshot(mut self, path: impl Into<PathBuf>) -> Self {
        self.options.snapshot = Some(path.into());
        self
    }

    /// The shortest time between two writes of the snapshot file (default 1 s).
    #[must_use]
    pub fn with_snapshot_interval(mut self, every: Duration) -> Self {
        self.options.snapshot_every = every;
        self
    }

    /// Reads the namespace whole, on a thread of its own with a runtime of its own
    /// (`load` may be called from inside another runtime, which must not block on
    /// one).
    fn read_whole(&self) -> Result<Whole, super::PgError> {
        let target = self.target.clone();
        let namespace = self.namespace.clone();
        let name = self.name();
        let timeout = self.options.connect_timeout;
        let read = move || -> Result<Whole, super::PgError> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|_| super::PgError::Timeout)?;
            runtime.block_on(async move {
                let (mut client, connection) =
                    target.connect(timeout, super::Role::Replica).await?;
                let driver = tokio::spawn(connection);
                let whole = super::within(
                    timeout.max(Duration::from_secs(30)),
                    read::whole(&mut client, &namespace, &name),
                )
                .await;
                drop(client);
                let _ = driver.await;
                whole
            })
        };
        thread::Builder::new()
            .name("tower-api-key-postgres-load".into())
            .spawn(read)
            .map_err(|_| super::PgError::Timeout)?
            .join()
            .unwrap_or(Err(super::PgError::Timeout))
    }
}

impl KeySource for PostgresSource {
    fn name(&self) -> String {
        format!("postgres:{}", self.namespace)
    }

    fn load(&mut self) -> Result<KeySet, Error> {
        let name = self.name();
        let (kind, failure) = match self.read_whole() {
            Ok(Whole::Read(set, cursor, clashed)) => {
                // Ids left out for a shared digest: the follower reads whole first,
                // to know them (a change of one of them is read whole).
                self.loaded = clashed.is_empty().then(|| (cursor, set.len()));
                return Ok(set);
            }
            Ok(Whole::Missing(why)) => (
                Failure::Missing,
                Error::custom(
                    name.clone(),
                    format!("namespace `{}` cannot be read: {why}", self.namespace),
                ),
            ),
            Ok(Whole::Damaged(why)) => (Failure::Damaged, Error::custom(name.clone(), why)),
            Err(e) => (
                if super::answered(&e) {
                    Failure::Refused
                } else {
                    Failure::Unreachable
                },
                Error::custom(name.clone(), super::describe(&e)),
            ),
        };
        // PostgreSQL cannot give the keys: the ones saved last time, if any.
        if let Some(path) = &self.options.snapshot
            && let Ok(bytes) =
                crate::source::read::FileBytes::read(path, crate::source::read::DEFAULT_MAX_SIZE)
            && let Ok(set) = crate::FileSource::parse(path, &bytes)
        {
            #[cfg(feature = "tracing")]
            tracing::warn!(target: "tower_api_key::reload", source = %name, error = %crate::error::Chain(&failure), "serving the snapshot until PostgreSQL answers");
            return Ok(set);
        }
        self.failed = Some(kind);
        Err(failure)
    }

    fn watch(self: Box<Self>, updater: KeyUpdater) {
        let this = *self;
        let (cursor, loaded) = match this.loaded {
            Some((cursor, n)) => (Some(cursor), n),
            None => (None, 0),
        };
        let follower = Follower::new(
            this.target,
            this.namespace,
            this.options,
            updater,
            cursor,
            loaded,
            this.failed,
        );
        let spawned = thread::Builder::new()
            .name("tower-api-key-postgres".into())
            .spawn(move || follower.run());
        if let Err(error) = spawned {
            #[cfg(feature = "tracing")]
            tracing::error!(target: "tower_api_key::reload", %error, "cannot start the PostgreSQL follower; keys will not be updated");
            #[cfg(not(feature = "tracing"))]
            let _ = error;
        }
    }
}

impl fmt::Debug for PostgresSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSource")
            .field("namespace", &self.namespace)
            .field("server", &self.target.server())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}
