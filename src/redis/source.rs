//! `RedisSource`: a replica's view of a namespace, loaded whole, then followed change
//! by change.

use std::{
    collections::HashMap,
    fmt,
    path::PathBuf,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use redis::{Value, cmd};

use super::{
    model::{self, Keys},
    redis_error,
};
use crate::{Error, KeyChange, KeySet, KeySource, KeyUpdater};

/// A [`KeySource`] that follows a namespace in Redis, which
/// [`RedisBackend`](super::RedisBackend) (and so the key-management API of any
/// replica) writes: every replica of a fleet enforces the same keys.
///
/// It loads the whole set when added, then follows the namespace's change log, each
/// change applied by id (a one-key change to a million-key set copies a few hundred
/// keys); a gap in the log or a reconnection means a full resync, and a version check
/// every few seconds catches a lost signal. Its work runs on one thread, which ends
/// within a second of the store being dropped.
///
/// When Redis misbehaves the replica keeps serving its last good keys: a stopped
/// server, a cut connection, a wiped namespace (its version counter gone is never
/// read as "no keys"). It says so once per change of state (a `warn` and
/// [`KeyStore::last_reload`](crate::KeyStore::last_reload)), retries with jittered
/// backoff, and resyncs when Redis answers again. A replica that starts while Redis is
/// unreachable, or before the namespace exists, has no keys from it (it fails closed),
/// unless [`with_snapshot`](RedisSource::with_snapshot) gave it a file of its last
/// keys.
///
/// Each replica also adds the request counts of its keys to the namespace, in
/// batches, so the key-management API shows the fleet's usage.
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
    /// Where the initial load left off, for the thread to follow from.
    loaded: Option<Position>,
}

#[derive(Clone, Debug)]
struct Options {
    connect_timeout: Duration,
    max_backoff: Duration,
    check: Duration,
    usage_flush: Duration,
    snapshot: Option<PathBuf>,
}

/// A version of the namespace, and the log entry that made it.
#[derive(Clone, Debug)]
struct Position {
    version: u64,
    stream_id: String,
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
            options: Options {
                connect_timeout: Duration::from_secs(2),
                max_backoff: Duration::from_secs(5),
                check: Duration::from_secs(5),
                usage_flush: Duration::from_secs(10),
                snapshot: None,
            },
            loaded: None,
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

    /// How often the namespace's version is checked, the safety net for a lost
    /// change signal (default 5 s).
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

    /// Keeps the last keys applied in the key file at `path` (digests only, written
    /// atomically after changes), and serves them from the first request when the
    /// replica starts while Redis is unreachable.
    #[must_use]
    pub fn with_snapshot(mut self, path: impl Into<PathBuf>) -> Self {
        self.options.snapshot = Some(path.into());
        self
    }
}

impl KeySource for RedisSource {
    fn name(&self) -> String {
        format!("redis:{}", self.namespace)
    }

    fn load(&mut self) -> Result<KeySet, Error> {
        let name = self.name();
        let read = connect(&self.client, self.options.connect_timeout)
            .and_then(|mut con| read_all(&mut con, &self.keys));
        let failure = match read {
            Ok(Some((set, position))) => {
                self.loaded = Some(position);
                return Ok(set);
            }
            Ok(None) => Error::custom(
                name.clone(),
                format!("namespace `{}` does not exist in Redis yet", self.namespace),
            ),
            Err(e) => Error::custom(name.clone(), e),
        };
        // Redis does not answer: the keys saved last time, if any.
        if let Some(path) = &self.options.snapshot
            && let Ok(bytes) =
                crate::source::read::FileBytes::read(path, crate::source::read::DEFAULT_MAX_SIZE)
            && let Ok(set) = crate::FileSource::parse(path, &bytes)
        {
            #[cfg(feature = "tracing")]
            tracing::warn!(target: "tower_api_key::reload", source = %name, error = %crate::error::Chain(&failure), "serving the snapshot until Redis answers");
            return Ok(set);
        }
        Err(failure)
    }

    fn watch(self: Box<Self>, updater: KeyUpdater) {
        let follower = Follower {
            client: self.client,
            keys: self.keys,
            options: self.options,
            position: self.loaded,
            updater,
            down: false,
            flushed: HashMap::new(),
            mirror: None,
        };
        let mut follower = follower;
        if follower.options.snapshot.is_some() {
            follower.mirror = Some(HashMap::new());
        }
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

fn connect(
    client: &redis::Client,
    timeout: Duration,
) -> Result<redis::Connection, redis::RedisError> {
    let con = client.get_connection_with_timeout(timeout)?;
    // A whole namespace may take a while to read; a dead peer must not hang us.
    con.set_read_timeout(Some(timeout.max(Duration::from_secs(30))))?;
    con.set_write_timeout(Some(timeout.max(Duration::from_secs(5))))?;
    Ok(con)
}

/// The whole namespace, read atomically with its version and the last log entry;
/// `None` if the namespace does not exist.
fn read_all(
    con: &mut redis::Connection,
    keys: &Keys,
) -> Result<Option<(KeySet, Position)>, redis::RedisError> {
    let (version, records, last): (Option<u64>, Value, Value) = redis::pipe()
        .atomic()
        .get(&keys.version)
        .hgetall(&keys.records)
        .cmd("XREVRANGE")
        .arg(&keys.log)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(con)?;
    let Some(version) = version else {
        return Ok(None);
    };
    let pairs = super::pairs(records);
    let mut set = KeySet::with_capacity(pairs.len());
    for key in decode_all(&pairs) {
        key.and_then(|key| set.insert(key))
            .map_err(|e| redis_error(format!("{}", crate::error::Chain(&e))))?;
    }
    let stream_id = match last {
        Value::Array(entries) => entries
            .into_iter()
            .next()
            .and_then(|e| match e {
                Value::Array(mut parts) if !parts.is_empty() => super::text(parts.swap_remove(0)),
                _ => None,
            })
            .unwrap_or_else(|| "0-0".to_owned()),
        _ => "0-0".to_owned(),
    };
    Ok(Some((set, Position { version, stream_id })))
}

/// The keys of `(id, record)` pairs, in order. A large namespace (a million records
/// is most of a second of JSON) is decoded on every core: the initial load is what a
/// replica waits for before it can serve.
fn decode_all(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<Result<crate::ApiKey, Error>> {
    let decode = |chunk: &[(Vec<u8>, Vec<u8>)]| -> Vec<Result<crate::ApiKey, Error>> {
        chunk
            .iter()
            .map(|(id, json)| model::decode(&String::from_utf8_lossy(id), json))
            .collect()
    };
    let parts = thread::available_parallelism()
        .map_or(1, usize::from)
        .min(4);
    if pairs.len() < 50_000 || parts < 2 {
        return decode(pairs);
    }
    let size = pairs.len().div_ceil(parts);
    thread::scope(|scope| {
        let handles: Vec<_> = pairs
            .chunks(size)
            .skip(1)
            .map(|chunk| {
                (
                    chunk,
                    thread::Builder::new().spawn_scoped(scope, move || decode(chunk)),
                )
            })
            .collect();
        let mut keys = decode(&pairs[..size.min(pairs.len())]);
        for (chunk, handle) in handles {
            // A thread that could not start or failed: decode its part here.
            match handle.ok().and_then(|h| h.join().ok()) {
                Some(part) => keys.extend(part),
                None => keys.extend(decode(chunk)),
            }
        }
        keys
    })
}

/// The thread that follows the namespace.
struct Follower {
    client: redis::Client,
    keys: Keys,
    options: Options,
    /// Where the store is; `None` before the first full read.
    position: Option<Position>,
    updater: KeyUpdater,
    /// Whether the last attempt failed (so a failure is said once, not per retry).
    down: bool,
    /// The request counts already added to Redis, by key id.
    flushed: HashMap<Arc<str>, u64>,
    /// The keys applied, kept only to write the snapshot.
    mirror: Option<HashMap<String, crate::ApiKey>>,
}

/// One entry of the change log.
struct Entry {
    stream_id: String,
    version: u64,
    change: Result<KeyChange, Error>,
}

impl Follower {
    fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        // A store that loaded a snapshot starts with a resync; one that read Redis
        // starts following from where the load left off.
        // (A snapshot needs the whole set in hand: read it once more.)
        let mut resync = self.position.is_none() || self.mirror.is_some();
        while !self.updater.is_closed() {
            let mut con = match connect(&self.client, self.options.connect_timeout) {
                Ok(con) => con,
                Err(e) => {
                    self.failed(Error::custom(self.updater.source_name(), e));
                    thread::sleep(jittered(backoff));
                    backoff = (backoff * 2).min(self.options.max_backoff);
                    resync = true;
                    continue;
                }
            };
            if resync && let Err(e) = self.resync(&mut con) {
                self.failed(e);
                thread::sleep(jittered(backoff));
                backoff = (backoff * 2).min(self.options.max_backoff);
                continue;
            }
            backoff = Duration::from_millis(100);
            // A broken connection (or a wiped namespace) ends the loop: reconnect and
            // resync.
            let error = self.follow(&mut con);
            resync = true;
            if let Some(error) = error {
                self.failed(error);
            }
        }
        // The store is gone: a last usage flush is pointless without it.
    }

    /// Says once that Redis misbehaves; the keys stay.
    fn failed(&mut self, error: Error) {
        if !self.down {
            self.down = true;
            self.updater.reject(error);
        }
    }

    /// Reads the whole namespace and publishes it: the store applies what differs.
    fn resync(&mut self, con: &mut redis::Connection) -> Result<(), Error> {
        let name = self.updater.source_name().to_owned();
        // A whole namespace may take a while to arrive.
        let long = self.options.connect_timeout.max(Duration::from_secs(30));
        con.set_read_timeout(Some(long))
            .map_err(|e| Error::custom(name.clone(), e))?;
        match read_all(con, &self.keys) {
            Ok(Some((set, position))) => {
                if let Some(mirror) = &mut self.mirror {
                    mirror.clear();
                    mirror.extend(set.iter().map(|k| (k.id().to_owned(), k.clone())));
                }
                self.updater.publish(set)?;
                self.position = Some(position);
                self.down = false;
                self.save_snapshot();
                Ok(())
            }
            Ok(None) => Err(Error::custom(
                name,
                "the namespace has no version counter (wiped, or not created yet); keeping the last good keys",
            )),
            Err(e) => Err(Error::custom(name, e)),
        }
    }

    /// Applies the log as it grows, checks the version, flushes usage. Returns why it
    /// stopped (`None`: the store is gone).
    fn follow(&mut self, con: &mut redis::Connection) -> Option<Error> {
        let name = self.updater.source_name().to_owned();
        // A blocking read answers within its 500 ms: past that plus the connect
        // timeout, the peer is gone without a word (a half-open connection).
        let patience = Duration::from_millis(500) + self.options.connect_timeout;
        if let Err(e) = con.set_read_timeout(Some(patience)) {
            return Some(Error::custom(name, e));
        }
        let (mut next_check, mut next_flush) = (
            Instant::now() + self.options.check,
            Instant::now() + self.options.usage_flush,
        );
        while !self.updater.is_closed() {
            let from = self
                .position
                .as_ref()
                .map_or_else(|| "0-0".to_owned(), |p| p.stream_id.clone());
            let reply: Result<Value, _> = cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(500)
                .arg("STREAMS")
                .arg(&self.keys.log)
                .arg(&from)
                .query(con);
            let entries = match reply {
                Ok(reply) => entries(reply),
                Err(e) => return Some(Error::custom(name, e)),
            };
            if !entries.is_empty()
                && let Err(gap) = self.apply(entries)
            {
                return gap;
            }
            let now = Instant::now();
            if now >= next_check {
                next_check = now + self.options.check;
                match cmd("GET").arg(&self.keys.version).query::<Option<u64>>(con) {
                    Err(e) => return Some(Error::custom(name, e)),
                    Ok(None) => {
                        return Some(Error::custom(
                            name,
                            "the namespace has no version counter (wiped?); keeping the last good keys",
                        ));
                    }
                    Ok(Some(v)) if self.position.as_ref().is_none_or(|p| v > p.version) => {
                        // Ahead of what the log showed: a lost signal. Read it whole.
                        if let Err(e) = self.resync(con) {
                            return Some(e);
                        }
                        if let Err(e) = con.set_read_timeout(Some(patience)) {
                            return Some(Error::custom(name, e));
                        }
                    }
                    Ok(Some(_)) => {}
                }
            }
            if now >= next_flush {
                next_flush = now + self.options.usage_flush;
                if let Err(e) = self.flush_usage(con) {
                    return Some(Error::custom(name, e));
                }
            }
        }
        None
    }

    /// Applies log entries in order, a version's changes together. `Err` when the log
    /// has a gap (resync): `Err(None)` to resync quietly.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), Option<Error>> {
        let mut i = 0;
        while i < entries.len() {
            let version = entries[i].version;
            let end = entries[i..]
                .iter()
                .position(|e| e.version != version)
                .map_or(entries.len(), |n| i + n);
            let batch = &entries[i..end];
            let current = self.position.as_ref().map_or(0, |p| p.version);
            if version > current + 1 {
                // Entries were lost (trimmed while this replica was behind): whole.
                self.position = None;
                return Err(None);
            }
            if version == current + 1 {
                let changes: Result<Vec<KeyChange>, Error> =
                    batch.iter().map(|e| e.change.clone()).collect();
                match changes {
                    Ok(changes) => {
                        if let Some(mirror) = &mut self.mirror {
                            for change in &changes {
                                match change {
                                    KeyChange::Upsert(key) => {
                                        drop(mirror.insert(key.id().to_owned(), key.clone()))
                                    }
                                    KeyChange::Remove(id) => drop(mirror.remove(&**id)),
                                }
                            }
                        }
                        if self.updater.apply(changes).is_err() {
                            // Refused (recorded by the store): the next resync
                            // publishes the whole set, which waits until it fits.
                            self.position = None;
                            return Err(None);
                        }
                        self.save_snapshot();
                    }
                    Err(error) => {
                        // A record this replica cannot read: say so, and read the whole
                        // namespace again rather than skip the change.
                        self.updater.reject(error);
                        self.position = None;
                        return Err(None);
                    }
                }
            }
            self.position = Some(Position {
                version: version.max(current),
                stream_id: batch[batch.len() - 1].stream_id.clone(),
            });
            i = end;
        }
        Ok(())
    }

    /// Adds the requests counted since the last flush to the namespace's counters.
    fn flush_usage(&mut self, con: &mut redis::Connection) -> Result<(), redis::RedisError> {
        let usage = self.updater.usage();
        let script = redis::Script::new(model::ADD_USAGE);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&self.keys.requests)
            .key(&self.keys.last_used);
        let mut deltas = Vec::new();
        for usage in usage {
            let id: Arc<str> = usage.key().id().into();
            let requests = usage.requests();
            let last_used = usage
                .last_used()
                .map_or(0, |at| crate::clock::to_unix_ms(at) / 1000);
            let before = self.flushed.get(&id).copied().unwrap_or(0);
            // A key removed and added again starts counting from zero.
            let delta = if requests >= before {
                requests - before
            } else {
                requests
            };
            if delta > 0 {
                invocation.arg(&*id).arg(format!("{delta}:{last_used}"));
                deltas.push((id, requests));
            }
        }
        if deltas.is_empty() {
            return Ok(());
        }
        invocation.invoke::<i64>(con)?;
        self.flushed.extend(deltas);
        Ok(())
    }

    fn save_snapshot(&self) {
        if let (Some(path), Some(mirror)) = (&self.options.snapshot, &self.mirror) {
            let mut keys: Vec<&crate::ApiKey> = mirror.values().collect();
            keys.sort_by(|a, b| a.id().cmp(b.id()));
            let text = crate::source::key_file::write::file(keys);
            if let Err(error) = crate::source::key_file::write::replace(path, text.as_bytes()) {
                #[cfg(feature = "tracing")]
                tracing::warn!(target: "tower_api_key::reload", path = %path.display(), %error, "cannot write the Redis snapshot");
                #[cfg(not(feature = "tracing"))]
                let _ = error;
            }
        }
    }
}

/// The entries of an `XREAD` reply, in order.
fn entries(reply: Value) -> Vec<Entry> {
    let mut out = Vec::new();
    let streams = match reply {
        Value::Array(streams) => streams,
        Value::Map(streams) => streams.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => return out,
    };
    for stream in streams {
        let items = match stream {
            Value::Array(mut parts) if parts.len() == 2 => parts.swap_remove(1),
            other => other,
        };
        let Value::Array(items) = items else { continue };
        for item in items {
            let Value::Array(mut parts) = item else {
                continue;
            };
            if parts.len() != 2 {
                continue;
            }
            let fields = parts.swap_remove(1);
            let Some(stream_id) = super::text(parts.swap_remove(0)) else {
                continue;
            };
            let mut map: HashMap<String, Vec<u8>> = HashMap::new();
            for (k, v) in super::pairs(fields) {
                map.insert(String::from_utf8_lossy(&k).into_owned(), v);
            }
            let version = map
                .get("v")
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(0);
            let id = map
                .get("id")
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            let change = match map.get("op").map(Vec::as_slice) {
                Some(b"put") => match map.get("record") {
                    Some(record) => model::decode(&id, record).map(KeyChange::Upsert),
                    None => Err(Error::invalid(Some(&id), "a log entry without its record")),
                },
                _ => Ok(KeyChange::remove(id)),
            };
            out.push(Entry {
                stream_id,
                version,
                change,
            });
        }
    }
    out
}

/// `d`, give or take half, at random: replicas do not retry in step.
fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    let half = d / 2;
    half + half.mul_f64((u64::from_le_bytes(b) % 1000) as f64 / 1000.0)
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
