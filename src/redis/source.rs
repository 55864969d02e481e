//! `RedisSource`: a replica's view of a namespace, loaded whole, then followed
//! version by version (the follower is in `follow.rs`).

use std::{fmt, path::PathBuf, thread, time::Duration};

use super::{
    follow::{Failure, Follower},
    log::Cursor,
    model::Keys,
    read::{self, Read, connect, read_all},
};
use crate::{Error, KeySet, KeySource, KeyUpdater, source::replica::Options};

/// A [`KeySource`] that follows a namespace in Redis, which
/// [`RedisBackend`](super::RedisBackend) (and so the key-management API of any
/// replica) writes: every replica of a fleet enforces the same keys.
///
/// It loads the whole set when added, then follows the namespace's change log,
/// applying each version by id once it holds all of it (a one-key change to a
/// million-key set copies a shard of about two thousand keys). Anything the log
/// cannot explain (a gap, a version trimmed or cut short, a version number used
/// twice, an operation it does not know, a new epoch) makes it read the namespace
/// whole again, and a check every few seconds catches a change whose log entries
/// never came.
///
/// When Redis misbehaves the replica keeps serving its last good keys: a stopped
/// server, a cut connection, a wiped or partly wiped namespace (its version counter
/// gone is never read as "no keys"; the replica waits for an operator to restore it
/// with [`RedisBackend::restore_file`](super::RedisBackend::restore_file) or
/// [`import_file`](super::RedisBackend::import_file), and follows the new epoch
/// then), a namespace gone back to an earlier version (Redis restarted from an older
/// save, having lost writes: it waits for a restore likewise). It says so once per new cause (a `warn` and
/// [`KeyStore::last_reload`](crate::KeyStore::last_reload)), retries with jittered
/// backoff, and catches up when Redis answers again. A record it cannot read (not a
/// key record, or stored under another id than its own) is that one key refused,
/// logged at `error` with its id. A replica that starts while Redis is unreachable,
/// or before the namespace exists, has no keys from it (it fails closed), unless
/// [`with_snapshot`](RedisSource::with_snapshot) gave it a file of its last keys.
///
/// Its work runs on one thread, which ends within a second of the store being
/// dropped. Each replica also adds the request counts of its keys to the namespace,
/// in batches, so the key-management API shows the fleet's usage.
///
/// Its keys' rate limits and quotas hold across the fleet: a second thread leases
/// each replica shares of them from Redis in the background, and a request spends
/// its replica's share, with no call to Redis (see the README's "Per-key limits").
/// A key is refused by a limit until its first share arrives, a tick (20 ms) or so
/// after it is loaded; while Redis is unreachable a replica spends the shares it
/// holds and then refuses, never letting a limited key through unlimited.
///
/// # Example
///
/// ```no_run
/// use tower_api_key::{KeyStore, redis::RedisSource};
///
/// let store = KeyStore::new();
/// // As with a missing key file, a failed first load is an Err while the source keeps
/// // trying; the store refuses everyone until it answers.
/// if let Err(e) = store.add_source(RedisSource::new("redis://127.0.0.1:6379/", "payments")?) {
///     eprintln!("keys not loaded yet, still trying: {e}");
/// }
/// # Ok::<(), tower_api_key::Error>(())
/// ```
pub struct RedisSource {
    client: redis::Client,
    namespace: String,
    keys: Keys,
    options: Options,
    /// Where the initial load left off, and how many keys it had, for the thread to
    /// follow from.
    loaded: Option<(Cursor, usize)>,
    /// What the initial load failed for (said already), when it served nothing.
    failed: Option<Failure>,
}

impl RedisSource {
    /// Follows namespace `namespace` of the Redis server at `url` (`redis://`, or
    /// `rediss://` for TLS; a password in the URL is used for `AUTH`). Checks the URL
    /// only: nothing is sent until the source is added to a store.
    ///
    /// # Errors
    ///
    /// [`Error::Source`] if `url` is not a Redis URL or `namespace` is empty.
    pub fn new(url: &str, namespace: impl Into<String>) -> Result<Self, Error> {
        let namespace = namespace.into();
        let client = super::client(url, &namespace)?;
        Ok(Self {
            keys: Keys::of(&namespace),
            client,
            namespace,
            options: Options::new(Duration::from_secs(5)),
            loaded: None,
            failed: None,
        })
    }

    /// How long to wait for Redis to answer a connection (default 2 s).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = timeout;
        self
    }

    /// The longest wait between two attempts to reach Redis (default 5 s; attempts
    /// start at 100 ms apart and double, with jitter).
    #[must_use]
    pub fn with_max_backoff(mut self, max: Duration) -> Self {
        self.options.max_backoff = max;
        self
    }

    /// How often the namespace's epoch and version are checked against what the
    /// replica applied: the safety net for log entries that never came, and how a
    /// wiped namespace is noticed when nothing else happens (default 5 s).
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
    /// serves them from the first request when the replica starts while Redis is
    /// unreachable or its namespace is missing. The file is also what an operator
    /// restores a wiped namespace from
    /// ([`RedisBackend::restore_file`](super::RedisBackend::restore_file)).
    ///
    /// It is written atomically by a thread of its own, at most once per
    /// [`with_snapshot_interval`](RedisSource::with_snapshot_interval) and always
    /// after the last change, so a change costs the replica nothing more. Give each
    /// replica its own path.
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
}

impl KeySource for RedisSource {
    fn name(&self) -> String {
        format!("redis:{}", self.namespace)
    }

    /// Yes: each replica spends shares of its keys' limits leased from Redis.
    fn fleet_limits(&self) -> bool {
        true
    }

    fn load(&mut self) -> Result<KeySet, Error> {
        let name = self.name();
        let read = connect(&self.client, self.options.connect_timeout)
            .and_then(|mut con| read_all(&mut con, &self.keys, &name));
        let (kind, failure) = match read {
            Ok(Read::Whole(set, cursor, clashed)) => {
                // Ids left out for a shared digest: the follower reads whole first,
                // to know them (a change of one of them is read whole).
                self.loaded = clashed.is_empty().then(|| (cursor, set.len()));
                return Ok(set);
            }
            Ok(Read::Missing) => (
                Failure::Missing,
                Error::custom(
                    name.clone(),
                    format!(
                        "namespace `{}` does not exist in Redis (no version counter: not created \
                     yet, or wiped)",
                        self.namespace
                    ),
                ),
            ),
            Ok(Read::Damaged) => (
                Failure::Damaged,
                Error::custom(name.clone(), super::DAMAGED),
            ),
            Err(e) => (
                if read::is_refusal(&e) {
                    Failure::Refused
                } else {
                    Failure::Unreachable
                },
                Error::custom(name.clone(), super::describe(&e)),
            ),
        };
        // Redis cannot give the keys: the ones saved last time, if any.
        if let Some(path) = &self.options.snapshot
            && let Ok(bytes) =
                crate::source::read::FileBytes::read(path, crate::source::read::DEFAULT_MAX_SIZE)
            && let Ok(set) = crate::FileSource::parse(path, &bytes)
        {
            #[cfg(feature = "tracing")]
            tracing::warn!(target: "tower_api_key::reload", source = %name, error = %crate::error::Chain(&failure), "serving the snapshot until Redis answers");
            return Ok(set);
        }
        // Said by the store, which records the failed load.
        self.failed = Some(kind);
        Err(failure)
    }

    fn watch(self: Box<Self>, updater: KeyUpdater) {
        let this = *self;
        let (cursor, loaded) = match this.loaded {
            Some((cursor, n)) => (Some(cursor), n),
            None => (None, 0),
        };
        super::lease::Lessor::spawn(
            this.client.clone(),
            this.keys.clone(),
            updater.clone(),
            this.options.connect_timeout,
        );
        let follower = Follower::new(
            this.client,
            this.keys,
            this.options,
            updater,
            cursor,
            loaded,
            this.failed,
        );
        let spawned = thread::Builder::new()
            .name("tower-api-key-redis".into())
            .spawn(move || follower.run());
        if let Err(error) = spawned {
            #[cfg(feature = "tracing")]
            tracing::error!(target: "tower_api_key::reload", %error, "cannot start the Redis follower; keys will not be updated");
            #[cfg(not(feature = "tracing"))]
            let _ = error;
        }
    }
}

impl fmt::Debug for RedisSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSource")
            .field("namespace", &self.namespace)
            .field("server", &super::server(&self.client))
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}
