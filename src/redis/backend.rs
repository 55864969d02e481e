//! `RedisBackend`: the key-management API's backend on a Redis namespace, and the
//! explicit ways a namespace is created, restored and exported.

use std::{fmt, path::Path, time::Duration};

use redis::Value;

use super::{
    link::{Link, Sent},
    model::{self, CHUNK, Keys, LOG_LEN, MAX_VERSION_ENTRIES, STAGING_TTL, refused},
};
use crate::key::record;
use crate::{
    ApiKey, Error, KeySet,
    admin::{AdminBackend, BackendError, UsageCounts, record_etag},
};

/// How long the answer to a whole read of a namespace may take: as long as a
/// replica's whole read (`RedisSource`) waits for one.
const WHOLE_READ: Duration = Duration::from_secs(30);

/// An [`AdminBackend`] on a Redis namespace: each call is one atomic Lua script that
/// writes the key's record, bumps the namespace's version and appends to its change
/// log, which every replica's [`RedisSource`](super::RedisSource) follows.
///
/// A namespace is created, or re-created after Redis lost it, only explicitly: by
/// [`import_file`](RedisBackend::import_file) (the first seed) or
/// [`restore_file`](RedisBackend::restore_file) (a replica's snapshot, or an export).
/// The API's writes into a namespace that does not exist are refused
/// ([`BackendError::StoreMissing`]), so a wiped Redis plus one create never becomes a
/// fleet that knows one key.
///
/// What a call answers is what happened: [`BackendError::Unavailable`] only when
/// nothing was written. A write whose answer was lost (a time-out, a dropped
/// connection) is settled on a fresh connection: it either happened (the call
/// succeeds) or is made certain never to happen and is tried once more; only when
/// Redis cannot be asked is the answer [`BackendError::OutcomeUnknown`]. A connection
/// Redis dropped is made again by the next call.
///
/// # Example
///
/// ```no_run
/// use tower_api_key::{KeyStore, admin::AdminApi, redis::{RedisBackend, RedisSource}};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = KeyStore::new();
/// let backend = RedisBackend::new("redis://127.0.0.1:6379/", "payments")?;
/// if !backend.exists().await? {
///     // The first start of the fleet: seed the namespace and its first admin key.
///     backend.import_file("keys.toml").await?;
/// }
/// store.add_source(RedisSource::new("redis://127.0.0.1:6379/", "payments")?)?;
/// let api: axum::Router = AdminApi::new(store.clone(), backend).router();
/// # Ok(()) }
/// ```
pub struct RedisBackend {
    client: redis::Client,
    namespace: String,
    keys: Keys,
    link: Link,
    scripts: Scripts,
    /// The highest version this backend saw the namespace at, and its epoch: within
    /// an epoch versions only grow, so a namespace found below it went back (Redis
    /// came back from an older save and lost writes) and is not written.
    seen: std::sync::Mutex<Option<(String, u64)>>,
}

struct Scripts {
    apply: redis::Script,
    head: redis::Script,
    swap: redis::Script,
}

/// What a script's condition on one key is.
enum Expect<'a> {
    /// The id must be free.
    Absent,
    /// Whatever it holds.
    Any,
    /// The record must be exactly this (read just before).
    Exactly(&'a [u8]),
}

/// One change of a script run.
struct Put<'a> {
    id: &'a str,
    expect: Expect<'a>,
    /// The new record; `None` removes the key.
    record: Option<String>,
}

/// How a write went: done, or refused with a code of [`refused`].
enum Written {
    Done,
    Refused(i64),
}

/// A record as stored, and the key it stands for (or why it stands for none).
type Stored = (Vec<u8>, Result<ApiKey, Error>);

/// The namespace's epoch, version and record count, as `HMGET` gives them.
type Meta = (Option<String>, Option<String>, Option<String>);

/// Whether the namespace is missing: no epoch or version, or its records gone
/// (`held`: whether the hash exists) while the count says there are some.
fn absent(meta: &Meta, held: bool) -> bool {
    let count = meta.2.as_deref().and_then(|n| n.parse::<u64>().ok());
    meta.0.is_none() || meta.1.is_none() || (!held && count.is_some_and(|n| n > 0))
}

impl RedisBackend {
    /// A backend on namespace `namespace` of the Redis server at `url` (`redis://` or
    /// `rediss://`, a password in the URL for `AUTH`). Checks the URL only.
    ///
    /// # Errors
    ///
    /// [`Error::Source`] if `url` is not a Redis URL or `namespace` is empty.
    pub fn new(url: &str, namespace: impl Into<String>) -> Result<Self, Error> {
        let namespace = namespace.into();
        let client = super::client(url, &namespace)?;
        Ok(Self {
            link: Link::new(client.clone(), format!("redis:{namespace}")),
            client,
            keys: Keys::of(&namespace),
            namespace,
            seen: std::sync::Mutex::new(None),
            scripts: Scripts {
                apply: redis::Script::new(model::APPLY),
                head: redis::Script::new(model::HEAD),
                swap: redis::Script::new(model::SWAP),
            },
        })
    }

    /// How long a connection or a command may take before the call gives up
    /// (default 2 s). A write that times out is then settled, which may take as long
    /// again.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.link.set_timeout(timeout);
        self
    }

    /// Whether the namespace exists: it has an epoch and a version. A wiped Redis, or
    /// a namespace never created, does not.
    ///
    /// # Errors
    ///
    /// Redis does not answer.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use tower_api_key::redis::RedisBackend;
    ///
    /// # async fn run() -> Result<(), tower_api_key::Error> {
    /// let backend = RedisBackend::new("redis://127.0.0.1:6379/", "payments")?;
    /// if !backend.exists().await? {
    ///     eprintln!("the namespace is missing: restore it from a replica's snapshot");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn exists(&self) -> Result<bool, Error> {
        Ok(self.head().await.map_err(|e| self.error(e))? == 0)
    }

    /// Writes every key of the key file at `path` into the namespace; keys already
    /// there are replaced, others stay. Returns how many keys were written.
    ///
    /// If the namespace does not exist, this **creates** it, holding the file's keys
    /// and nothing else, as [`restore_file`](RedisBackend::restore_file) does: how a
    /// fleet's namespace gets its first admin key. Call it when you mean that (not on
    /// every start of a replica: after a wipe, it would bring back the file's keys,
    /// revoked ones included, and lose every other). Into an existing namespace, it
    /// writes one version per 1,000 keys, each applied by replicas whole.
    ///
    /// # Errors
    ///
    /// The file cannot be read or does not parse; otherwise as
    /// [`import`](RedisBackend::import).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use tower_api_key::redis::RedisBackend;
    ///
    /// # async fn run() -> Result<(), tower_api_key::Error> {
    /// let backend = RedisBackend::new("redis://127.0.0.1:6379/", "payments")?;
    /// if !backend.exists().await? {
    ///     let n = backend.import_file("keys.toml").await?;
    ///     println!("created the namespace with {n} keys");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn import_file(&self, path: impl AsRef<Path>) -> Result<usize, Error> {
        self.import(&read_key_file(path.as_ref())?).await
    }

    /// Writes every key of `set` into the namespace, as
    /// [`import_file`](RedisBackend::import_file) does (creating the namespace, with
    /// these keys only, if it does not exist). Returns how many keys were written.
    ///
    /// # Errors
    ///
    /// Redis does not answer; the namespace went missing during the import; one of
    /// its keys has the wrong type (only [`restore`](RedisBackend::restore) replaces
    /// such a namespace); [`Error::DuplicateKey`], with nothing written, if a key of
    /// `set` holds the secret of a stored key of another id that `set` does not
    /// replace (replicas would refuse both). That is checked before the write, not
    /// under it: a key another writer stores meanwhile is not seen (the API's keys
    /// have fresh random secrets; two imports at once are for the operator to avoid).
    pub async fn import(&self, set: &KeySet) -> Result<usize, Error> {
        self.import_into(set, Import::Checked).await
    }

    /// Writes every key of `set` into the namespace, which must exist: one that
    /// does not, or that goes missing during the import, is
    /// [`BackendError::StoreMissing`], never re-created (with only these keys):
    /// how the command line's `import` writes a file. `together`: in one version
    /// (the keys that move secrets between ids, which the caller writes first).
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    pub(crate) async fn import_existing(
        &self,
        set: &KeySet,
        together: bool,
    ) -> Result<usize, Error> {
        let how = match together {
            true => Import::Together,
            false => Import::Existing,
        };
        self.import_into(set, how).await
    }

    async fn import_into(&self, set: &KeySet, how: Import) -> Result<usize, Error> {
        let create = matches!(how, Import::Checked);
        let keys: Vec<&ApiKey> = set.iter().collect();
        // The versions written: what the caller gives in one, or the linked groups
        // of secrets that move between ids first, each whole, then the rest.
        let mut versions: Vec<Vec<&ApiKey>> = Vec::new();
        let mut rest = keys.as_slice();
        if let Import::Together = how {
            versions.push(keys.clone());
            rest = &[];
        }
        let ordered: Vec<&ApiKey>;
        match self.head().await.map_err(|e| self.error(e))? {
            // What the command line imports it has checked and ordered, once, for the
            // whole file.
            0 if create => {
                let stored = self.stored_keys().await?;
                set.clashes_with(&stored)?;
                let owned: Vec<ApiKey> = keys.iter().map(|k| (*k).clone()).collect();
                let max = MAX_VERSION_ENTRIES as usize;
                let (batches, others) =
                    crate::redis::moves::moving_batches(&owned, &[], &stored, CHUNK, max)
                        .map_err(|n| Error::custom(self.name(), too_many_moving(n)))?;
                let pick = |at: &[usize]| at.iter().map(|&i| keys[i]).collect();
                versions.extend(batches.iter().map(|b| pick(&b.keys)));
                ordered = pick(&others.keys);
                rest = &ordered;
            }
            0 => {}
            1 if create => return self.restore(set).await,
            1 => return Err(Error::custom(self.name(), self.missing())),
            // Keys of the wrong type: not created by an import over them.
            _ => return Err(self.error(refusal(refused::DAMAGED))),
        }
        if let Some(big) = versions
            .iter()
            .find(|v| v.len() as u64 > MAX_VERSION_ENTRIES)
        {
            return Err(Error::custom(self.name(), too_many_moving(big.len())));
        }
        for chunk in versions.iter().map(Vec::as_slice).chain(rest.chunks(CHUNK)) {
            let records: Vec<String> = chunk.iter().map(|k| record::encode(k)).collect();
            let puts: Vec<Put<'_>> = chunk
                .iter()
                .zip(records)
                .map(|(key, record)| Put {
                    id: key.id(),
                    expect: Expect::Any,
                    record: Some(record),
                })
                .collect();
            match self.write(&puts).await {
                Ok(Written::Done) => {}
                Ok(Written::Refused(refused::MISSING)) if !create => {
                    return Err(Error::custom(self.name(), self.missing()));
                }
                Ok(Written::Refused(code)) => {
                    return Err(Error::custom(self.name(), refusal(code)));
                }
                Err(e) => return Err(Error::custom(self.name(), e)),
            }
        }
        Ok(keys.len())
    }

    /// The stored keys that can be read (a record that cannot be read holds no
    /// secret to compare).
    async fn stored_keys(&self) -> Result<Vec<ApiKey>, Error> {
        let stored = self
            .all_raw()
            .await
            .map_err(|e| Error::custom(self.name(), e))?;
        Ok(stored
            .iter()
            .filter_map(|(id, json)| record::decode(&String::from_utf8_lossy(id), json).ok())
            .collect())
    }

    /// Writes `keys` and removes the keys `removed`, in the namespace, which must
    /// exist: one version per 1,000 changes, each applied by replicas whole: how the
    /// command line's `apply` writes its plan.
    ///
    /// With `read` (the keys the plan was made from, by id), every id a change
    /// touches must still hold what `read` holds for it (or be absent, as there):
    /// each version is written by the write script only if the records it touches
    /// are those just read and found unchanged, so a key revoked, removed or created
    /// meanwhile is never overwritten. The first id found changed refuses the rest
    /// as [`BackendError::Conflict`] naming it; versions written before it stay. A
    /// namespace wiped meanwhile is [`BackendError::StoreMissing`], never re-created.
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    pub(crate) async fn change_many(
        &self,
        keys: &[ApiKey],
        removed: &[String],
        read: Option<&std::collections::HashMap<&str, &ApiKey>>,
        together: bool,
    ) -> Result<(), BackendError> {
        let changes: Vec<(&str, Option<String>)> = keys
            .iter()
            .map(|k| (k.id(), Some(record::encode(k))))
            .chain(removed.iter().map(|id| (id.as_str(), None)))
            .collect();
        if together && changes.len() as u64 > MAX_VERSION_ENTRIES {
            return Err(BackendError::Invalid(Error::custom(
                self.name(),
                too_many_moving(changes.len()),
            )));
        }
        let size = if together {
            changes.len().max(1)
        } else {
            CHUNK
        };
        for chunk in changes.chunks(size) {
            // A record changed between the check and the script (which refuses it)
            // is looked at again: the check then names it.
            let mut tries = 0;
            loop {
                let ids: Vec<&str> = chunk.iter().map(|(id, _)| *id).collect();
                let stored = match read {
                    Some(_) => self.current_many(&ids).await?,
                    None => Vec::new(),
                };
                let mut puts = Vec::with_capacity(chunk.len());
                for (i, (id, record)) in chunk.iter().enumerate() {
                    let expect = match read {
                        None => Expect::Any,
                        Some(read) => {
                            let now = stored.get(i).and_then(Option::as_deref);
                            if !record::unchanged(id, now, read.get(id).copied()) {
                                return Err(BackendError::Conflict((*id).to_owned()));
                            }
                            now.map_or(Expect::Absent, Expect::Exactly)
                        }
                    };
                    puts.push(Put {
                        id,
                        expect,
                        record: record.clone(),
                    });
                }
                match self.write(&puts).await? {
                    Written::Done => break,
                    Written::Refused(refused::EXISTS | refused::ABSENT | refused::CHANGED)
                        if tries < 3 =>
                    {
                        tries += 1;
                    }
                    Written::Refused(refused::EXISTS | refused::ABSENT | refused::CHANGED) => {
                        return Err(BackendError::Conflict(ids[0].to_owned()));
                    }
                    Written::Refused(code) => return Err(self.refused(code)),
                }
            }
        }
        Ok(())
    }

    /// The records with these ids, as stored, in their order. The namespace must
    /// exist.
    async fn current_many(&self, ids: &[&str]) -> Result<Vec<Option<Vec<u8>>>, BackendError> {
        let (meta, held, raw): (Meta, bool, Vec<Option<Vec<u8>>>) = self
            .link
            .read(|mut con| async move {
                self.meta_pipe()
                    .exists(&self.keys.records)
                    .cmd("HMGET")
                    .arg(&self.keys.records)
                    .arg(ids)
                    .query_async(&mut con)
                    .await
            })
            .await?;
        if absent(&meta, held) {
            return Err(self.missing());
        }
        self.saw(&meta);
        Ok(raw)
    }

    /// Replaces the namespace, whole, by the keys of the key file at `path`, and gives
    /// it a new epoch: how an operator brings back a namespace Redis lost (flushed,
    /// restarted without persistence, its version evicted), from a replica's
    /// snapshot ([`RedisSource::with_snapshot`](super::RedisSource::with_snapshot)) or
    /// an [`export_file`](RedisBackend::export_file). Returns how many keys the
    /// namespace holds.
    ///
    /// The keys are staged beside the namespace and swapped in by one script, so
    /// replicas go from the old set (their last good one, for a wiped namespace) to
    /// the restored one in one step, and read it whole. Whatever the namespace held
    /// is replaced, changes made since the file was written included.
    ///
    /// # Errors
    ///
    /// The file cannot be read or does not parse; Redis does not answer (nothing is
    /// restored); Redis lost the staged keys meanwhile; or the swap's answer was lost
    /// and could not be settled (see [`exists`](RedisBackend::exists)).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use tower_api_key::redis::RedisBackend;
    ///
    /// # async fn run() -> Result<(), tower_api_key::Error> {
    /// let backend = RedisBackend::new("redis://127.0.0.1:6379/", "payments")?;
    /// // Redis restarted empty: every replica still serves its last good keys, the
    /// // API refuses writes with 503 `store-missing`. Put the keys back:
    /// let n = backend.restore_file("/var/lib/replica-1/keys.snapshot.toml").await?;
    /// println!("restored {n} keys");
    /// # Ok(()) }
    /// ```
    pub async fn restore_file(&self, path: impl AsRef<Path>) -> Result<usize, Error> {
        self.restore(&read_key_file(path.as_ref())?).await
    }

    /// Replaces the namespace, whole, by `set`, as
    /// [`restore_file`](RedisBackend::restore_file) does. Returns how many keys the
    /// namespace holds.
    ///
    /// # Errors
    ///
    /// As [`restore_file`](RedisBackend::restore_file), the file aside.
    pub async fn restore(&self, set: &KeySet) -> Result<usize, Error> {
        let epoch = model::random_id();
        let staging = self.keys.staging(&epoch);
        let keys: Vec<&ApiKey> = set.iter().collect();
        for chunk in keys.chunks(CHUNK) {
            let mut pipe = redis::pipe();
            pipe.cmd("HSET").arg(&staging);
            for key in chunk {
                pipe.arg(key.id()).arg(record::encode(key));
            }
            pipe.ignore()
                .cmd("PEXPIRE")
                .arg(&staging)
                .arg(STAGING_TTL.as_millis() as u64)
                .ignore();
            // Staging is written again as it is: safe to retry.
            let pipe = &pipe;
            self.link
                .read(|mut con| async move { pipe.query_async::<()>(&mut con).await })
                .await
                .map_err(|e| Error::custom(self.name(), e))?;
        }
        let swapped = self
            .link
            .write(&self.keys, |mut con, marker| {
                let (epoch, staging, n) = (&epoch, &staging, keys.len());
                async move {
                    self.scripts
                        .swap
                        .key(&self.keys.records)
                        .key(&self.keys.version)
                        .key(&self.keys.log)
                        .key(staging)
                        .key(&marker)
                        .arg(epoch)
                        .arg(n)
                        .arg(LOG_LEN)
                        .arg(self.link.marker_ttl())
                        .invoke_async::<i64>(&mut con)
                        .await
                }
            })
            .await
            .map_err(|e| self.error(e))?;
        match swapped {
            Sent::Answered(v) if v > 0 => Ok(keys.len()),
            Sent::Happened => Ok(keys.len()),
            Sent::Answered(_) => Err(self.error(
                "Redis lost the staged keys during the restore (wiped meanwhile?); nothing \
                 was restored",
            )),
        }
    }

    /// Writes the namespace's keys to a key file at `path`, digests only, atomically:
    /// to inspect a namespace, or keep a copy to restore from. Returns how many keys
    /// were written.
    ///
    /// # Errors
    ///
    /// Redis does not answer; the namespace does not exist; a record cannot be read;
    /// or the file cannot be written ([`Error::Write`](crate::Error::Write), as
    /// when something other than a regular file is at `path`, which is left as it is).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use tower_api_key::redis::RedisBackend;
    ///
    /// # async fn run() -> Result<(), tower_api_key::Error> {
    /// let backend = RedisBackend::new("redis://127.0.0.1:6379/", "payments")?;
    /// backend.export_file("payments-backup.toml").await?;
    /// // ...and later, if Redis loses it:
    /// backend.restore_file("payments-backup.toml").await?;
    /// # Ok(()) }
    /// ```
    pub async fn export_file(&self, path: impl AsRef<Path>) -> Result<usize, Error> {
        let mut keys = self.all().await.map_err(|e| self.error(e))?;
        keys.sort_by(|a, b| a.id().cmp(b.id()));
        let text = crate::source::key_file::write::file(&keys);
        crate::source::key_file::write::replace(path.as_ref(), text.as_bytes())
            .map_err(|e| Error::write(path.as_ref(), e))?;
        Ok(keys.len())
    }

    fn name(&self) -> String {
        format!("redis:{}", self.namespace)
    }

    fn error(&self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::custom(self.name(), e)
    }

    fn missing(&self) -> BackendError {
        BackendError::StoreMissing(format!("Redis namespace `{}`", self.namespace))
    }

    /// Where the namespace is: 0 it exists, 1 it is missing, 2 a key has the wrong
    /// type.
    async fn head(&self) -> Result<i64, BackendError> {
        let reply: Vec<Value> = self
            .link
            .read(|mut con| async move {
                self.scripts
                    .head
                    .key(&self.keys.version)
                    .key(&self.keys.records)
                    .key(&self.keys.log)
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        Ok(match reply.first() {
            Some(Value::Int(n)) => *n,
            _ => 2,
        })
    }

    /// Every record, as stored. The namespace must exist.
    async fn all_raw(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, BackendError> {
        let (meta, records): (Meta, Value) = self
            .link
            .read(|mut con| async move {
                // A whole namespace takes a while to send (a million records are
                // about 150 MB): its answer gets what a replica's whole read gets,
                // while a connection still fails within the link's timeout.
                con.set_response_timeout(self.link.timeout().max(WHOLE_READ));
                self.meta_pipe()
                    .hgetall(&self.keys.records)
                    .query_async(&mut con)
                    .await
            })
            .await?;
        let records = super::pairs(records);
        if absent(&meta, !records.is_empty()) {
            return Err(self.missing());
        }
        self.saw(&meta);
        Ok(records)
    }

    /// Every key. A record that cannot be read is the store's fault, named.
    async fn all(&self) -> Result<Vec<ApiKey>, BackendError> {
        let mut records = self.all_raw().await?;
        records.sort_by(|a, b| a.0.cmp(&b.0));
        records
            .into_iter()
            .map(|(id, json)| {
                let id = String::from_utf8_lossy(&id);
                BackendError::checked(&id, &json)
            })
            .collect()
    }

    /// An atomic pipeline that first reads the namespace's epoch, version and record
    /// count (a [`Meta`]): what every read of records starts with.
    fn meta_pipe(&self) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HMGET")
            .arg(&self.keys.version)
            .arg("epoch")
            .arg("version")
            .arg("records");
        pipe
    }

    /// The record with this id, as stored, if any. The namespace must exist.
    async fn current(&self, id: &str) -> Result<Option<Stored>, BackendError> {
        let raw = self.current_many(&[id]).await?.into_iter().next().flatten();
        Ok(raw.map(|raw| {
            let key = record::decode_valid(id, &raw);
            (raw, key)
        }))
    }

    /// Notes the epoch and version a read found (the highest one is kept: replies
    /// of calls made at the same time may be noted in any order). Whether the
    /// namespace went back below it is decided by the write script, atomically.
    fn saw(&self, meta: &Meta) {
        if let (Some(epoch), Some(version)) =
            (&meta.0, meta.1.as_deref().and_then(|v| v.parse().ok()))
        {
            self.note(epoch, version);
        }
    }

    fn note(&self, epoch: &str, version: u64) {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &mut *seen {
            Some((e, v)) if e == epoch => *v = (*v).max(version),
            _ => *seen = Some((epoch.to_owned(), version)),
        }
    }

    fn went_back(&self) -> BackendError {
        BackendError::StoreMissing(format!(
            "Redis namespace `{}`, gone back to an older save (Redis lost writes),",
            self.namespace
        ))
    }

    /// Runs the write script for `puts` (see [`Link::write`] for a lost answer).
    async fn write(&self, puts: &[Put<'_>]) -> Result<Written, BackendError> {
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        let seen = &seen;
        let sent = self
            .link
            .write(&self.keys, |mut con, marker| async move {
                let mut invocation = self.scripts.apply.prepare_invoke();
                invocation
                    .key(&self.keys.records)
                    .key(&self.keys.version)
                    .key(&self.keys.log)
                    .key(&marker)
                    .key(&self.keys.requests)
                    .key(&self.keys.last_used)
                    .arg(LOG_LEN)
                    .arg(self.link.marker_ttl())
                    .arg(&seen.0)
                    .arg(seen.1);
                for put in puts {
                    invocation.arg(if put.record.is_some() { "put" } else { "del" });
                    invocation.arg(put.id);
                    match put.expect {
                        Expect::Absent => invocation.arg("-"),
                        Expect::Any => invocation.arg("*"),
                        Expect::Exactly(raw) => invocation.arg(raw),
                    };
                    invocation.arg(put.record.as_deref().unwrap_or(""));
                }
                invocation.invoke_async::<Value>(&mut con).await
            })
            .await?;
        Ok(match sent {
            Sent::Answered(reply) => {
                if let Value::Array(items) = &reply
                    && let [Value::Int(v), _, epoch] = items.as_slice()
                    && let (Some(epoch), Ok(v)) = (super::text(epoch.clone()), u64::try_from(*v))
                {
                    self.note(&epoch, v);
                }
                written(reply)
            }
            Sent::Happened => Written::Done,
        })
    }

    /// Replaces or removes the record with `id` (and adds `also`, which must be new),
    /// if its ETag is `if_match`: read, check, and write if nothing changed in between.
    /// A record that cannot be read can be removed (without `If-Match`), nothing else.
    ///
    /// Changed by someone else in between, it is read and tried again (after a short,
    /// random pause), for as long as the backend's timeout: a changed ETag then
    /// answers [`BackendError::PreconditionFailed`], and only that (a caller that
    /// gave no `If-Match` never gets it). A record that still keeps changing when the
    /// time is up is [`BackendError::Unavailable`]: every try was refused whole, so
    /// nothing was written.
    async fn change(
        &self,
        id: &str,
        if_match: Option<&str>,
        record: Option<String>,
        also: Option<&ApiKey>,
    ) -> Result<(), BackendError> {
        let deadline = tokio::time::Instant::now() + self.link.timeout();
        let mut pause = Duration::from_millis(1);
        loop {
            let (raw, key) = self.current(id).await?.ok_or(BackendError::NotFound)?;
            match (&key, if_match) {
                (Ok(key), Some(tag)) if tag != record_etag(key) => {
                    return Err(BackendError::PreconditionFailed);
                }
                (Err(_), _) if record.is_some() || also.is_some() => {
                    return Err(BackendError::corrupt(id, key.err()));
                }
                (Err(_), Some(_)) => return Err(BackendError::PreconditionFailed),
                _ => {}
            }
            let mut puts = Vec::new();
            if let Some(new) = also {
                puts.push(Put {
                    id: new.id(),
                    expect: Expect::Absent,
                    record: Some(record::encode(new)),
                });
            }
            puts.push(Put {
                id,
                expect: Expect::Exactly(&raw),
                record: record.clone(),
            });
            match self.write(&puts).await? {
                Written::Done => return Ok(()),
                Written::Refused(refused::EXISTS) => {
                    let taken = also.map_or(id, ApiKey::id);
                    return Err(BackendError::Conflict(taken.to_owned()));
                }
                Written::Refused(refused::ABSENT) => return Err(BackendError::NotFound),
                // Changed under us: look again, a little later.
                Written::Refused(refused::CHANGED) => {}
                Written::Refused(code) => return Err(self.refused(code)),
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(BackendError::Unavailable(Box::new(self.error(
                    "the key kept changing under the API (other writers): nothing was written",
                ))));
            }
            tokio::time::sleep(jitter(pause)).await;
            pause = (pause * 2).min(Duration::from_millis(64));
        }
    }

    /// The error of a write refused for the namespace itself.
    fn refused(&self, code: i64) -> BackendError {
        match code {
            refused::MISSING => self.missing(),
            refused::WENT_BACK => self.went_back(),
            _ => BackendError::Unavailable(Box::new(self.error(refusal(code)))),
        }
    }
}

/// Reads and parses a key file.
fn read_key_file(path: &Path) -> Result<KeySet, Error> {
    let bytes = crate::source::read::FileBytes::read(path, crate::source::read::DEFAULT_MAX_SIZE)
        .map_err(|e| Error::io(path, e))?;
    crate::FileSource::parse(path, &bytes)
}

/// What a refusal code of a write means, for a person.
fn refusal(code: i64) -> &'static str {
    match code {
        refused::MISSING => {
            "the namespace does not exist in Redis (wiped, or never created): nothing was \
             written; restore it first"
        }
        refused::DAMAGED => {
            "a key of the namespace has the wrong type in Redis, or its version is not a \
             whole number (written by something else than this crate?): nothing was written"
        }
        refused::FENCED => "the write was given up on: nothing was written",
        refused::WENT_BACK => {
            "the namespace went back to an older save in Redis (it lost writes): nothing was \
             written; restore it first"
        }
        _ => "Redis refused the write: nothing was written",
    }
}

/// A random pause of up to `most`, so that writers racing for one key drift apart.
fn jitter(most: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    most.mul_f64(f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX))
}

/// A script's reply as a write's outcome.
fn written(reply: Value) -> Written {
    let code = match reply {
        Value::Array(items) => match items.first() {
            Some(Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    };
    if code < 0 {
        Written::Refused(code)
    } else {
        Written::Done
    }
}

impl AdminBackend for RedisBackend {
    fn source_name(&self) -> String {
        self.name()
    }

    async fn list(&self) -> Result<Vec<ApiKey>, BackendError> {
        self.all().await
    }

    async fn get(&self, id: &str) -> Result<Option<ApiKey>, BackendError> {
        match self.current(id).await? {
            None => Ok(None),
            Some((_, Ok(key))) => Ok(Some(key)),
            Some((_, Err(e))) => Err(BackendError::corrupt(id, Some(e))),
        }
    }

    async fn create(&self, key: ApiKey) -> Result<(), BackendError> {
        let put = Put {
            id: key.id(),
            expect: Expect::Absent,
            record: Some(record::encode(&key)),
        };
        match self.write(&[put]).await? {
            Written::Done => Ok(()),
            Written::Refused(refused::EXISTS) => Err(BackendError::Conflict(key.id().to_owned())),
            Written::Refused(code) => Err(self.refused(code)),
        }
    }

    async fn update(&self, key: ApiKey, if_match: Option<&str>) -> Result<(), BackendError> {
        self.change(key.id(), if_match, Some(record::encode(&key)), None)
            .await
    }

    async fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), BackendError> {
        self.change(id, if_match, None, None).await
    }

    async fn rotate(
        &self,
        successor: ApiKey,
        old: ApiKey,
        if_match: Option<&str>,
    ) -> Result<(), BackendError> {
        self.change(
            old.id(),
            if_match,
            Some(record::encode(&old)),
            Some(&successor),
        )
        .await
    }

    async fn quota_used(&self, key: &ApiKey) -> Result<Option<u64>, BackendError> {
        let Some(quota) = key.quota() else {
            return Ok(None);
        };
        let period = quota.period.index(crate::clock::exact_now_ms());
        let counter = &super::lease::quota_key(&self.keys, key.id(), quota, period);
        let taken: Value = self
            .link
            .read(
                |mut con| async move { redis::cmd("GET").arg(counter).query_async(&mut con).await },
            )
            .await?;
        // No counter yet (or one that is not a count): nothing leased this period.
        Ok(Some(count(&taken).unwrap_or(0)))
    }

    async fn usage(&self, ids: &[String]) -> Result<Option<Vec<UsageCounts>>, BackendError> {
        if ids.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let (requests, last_used): (Vec<Value>, Vec<Value>) = self
            .link
            .read(|mut con| async move {
                redis::pipe()
                    .cmd("HMGET")
                    .arg(&self.keys.requests)
                    .arg(ids)
                    .cmd("HMGET")
                    .arg(&self.keys.last_used)
                    .arg(ids)
                    .query_async(&mut con)
                    .await
            })
            .await?;
        Ok(Some(
            requests
                .into_iter()
                .zip(last_used)
                .map(|(n, at)| {
                    let at = count(&at)
                        .filter(|&s| s > 0)
                        .map(|s| crate::clock::from_unix_ms(s.saturating_mul(1000)));
                    (count(&n).unwrap_or(0), at)
                })
                .collect(),
        ))
    }
}

/// How [`RedisBackend::import_into`] writes a set.
#[derive(Clone, Copy)]
enum Import {
    /// [`RedisBackend::import`]: checked against the stored keys, the secrets that
    /// move between ids written first; a namespace that does not exist is created.
    Checked,
    /// Into a namespace that must exist, as the caller checked and ordered it, in
    /// versions of [`CHUNK`].
    Existing,
    /// The same, all in one version.
    Together,
}

/// Why a write whose changes moving secrets between ids, linked (a swap, a chain),
/// are more than one version holds is refused.
fn too_many_moving(n: usize) -> String {
    format!(
        "{n} changes move secrets between ids, linked (swaps, chains): more than one \
         version holds ({MAX_VERSION_ENTRIES}); write them in smaller steps"
    )
}

/// A count or a time stored in a hash field: a number, or `None` for a field that is
/// missing or holds anything else (a value written by hand). One such field must not
/// fail the reading of all the others.
fn count(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("namespace", &self.namespace)
            .field("server", &super::server(&self.client))
            .field("timeout", &self.link.timeout())
            .finish_non_exhaustive()
    }
}
