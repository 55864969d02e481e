//! `RedisBackend`: the key-management API's backend on a Redis namespace.

use std::{fmt, path::Path, time::Duration};

use redis::{AsyncCommands as _, Value, aio::MultiplexedConnection};
use tokio::sync::Mutex;

use super::model::{self, Keys, LOG_LEN};
use crate::{
    ApiKey, Error,
    admin::{AdminBackend, BackendError, UsageCounts, record_etag},
};

/// An [`AdminBackend`] on a Redis namespace: each call is one atomic Lua script that
/// writes the key's record, bumps the namespace's version and appends to its change
/// log, which every replica's [`RedisSource`](super::RedisSource) follows. A namespace
/// comes into being with its first write.
///
/// # Example
///
/// ```no_run
/// use tower_api_key::{KeyStore, admin::AdminApi, redis::{RedisBackend, RedisSource}};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let store = KeyStore::new();
/// let backend = RedisBackend::new("redis://127.0.0.1:6379/", "payments")?;
/// backend.import_file("keys.toml").await?; // seed the namespace and its first admin key
/// store.add_source(RedisSource::new("redis://127.0.0.1:6379/", "payments")?)?;
/// let api: axum::Router = AdminApi::new(store.clone(), backend).router();
/// # Ok(()) }
/// ```
pub struct RedisBackend {
    client: redis::Client,
    namespace: String,
    keys: Keys,
    timeout: Duration,
    con: Mutex<Option<MultiplexedConnection>>,
}

/// What a script's condition on one key is.
enum Expect<'a> {
    /// The id must be free.
    Absent,
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

/// How a script run went.
enum Outcome {
    Done,
    Exists,
    Absent,
    Changed,
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
        Ok(Self {
            client: super::client(url, &namespace)?,
            keys: Keys::of(&namespace),
            namespace,
            timeout: Duration::from_secs(2),
            con: Mutex::new(None),
        })
    }

    /// How long a connection or a command may take before the call fails with
    /// 503 (default 2 s).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Writes every key of the key file at `path` into the namespace (creating it), as
    /// one atomic step per 1,000 keys; keys already there are replaced. How a fleet's
    /// namespace gets its first admin key. Returns how many keys were written.
    ///
    /// # Errors
    ///
    /// The file cannot be read or does not parse; Redis does not answer.
    pub async fn import_file(&self, path: impl AsRef<Path>) -> Result<usize, Error> {
        let path = path.as_ref();
        let bytes =
            crate::source::read::FileBytes::read(path, crate::source::read::DEFAULT_MAX_SIZE)
                .map_err(|e| Error::io(path, e))?;
        let set = crate::FileSource::parse(path, &bytes)?;
        let keys: Vec<&ApiKey> = set.iter().collect();
        if keys.is_empty() {
            // An empty namespace still exists: it denies everyone.
            let mut con = self.connection().await.map_err(|e| self.error(e))?;
            let _: () = con
                .incr(&self.keys.version, 0)
                .await
                .map_err(|e| self.error(e))?;
        }
        for chunk in keys.chunks(1000) {
            let mut con = self.connection().await.map_err(|e| self.error(e))?;
            let apply = redis::Script::new(model::APPLY);
            let mut script = apply.prepare_invoke();
            script
                .key(&self.keys.records)
                .key(&self.keys.version)
                .key(&self.keys.log)
                .arg(LOG_LEN);
            for key in chunk {
                script
                    .arg("put")
                    .arg(key.id())
                    .arg("*")
                    .arg(model::encode(key));
            }
            let _: Value = script
                .invoke_async(&mut con)
                .await
                .map_err(|e| self.error(e))?;
        }
        Ok(keys.len())
    }

    /// Writes the namespace's keys to a key file at `path`, digests only, atomically:
    /// to inspect a namespace, or keep a copy. Returns how many keys were written.
    ///
    /// # Errors
    ///
    /// Redis does not answer, or the file cannot be written.
    pub async fn export_file(&self, path: impl AsRef<Path>) -> Result<usize, Error> {
        let keys = self
            .all()
            .await
            .map_err(|e| Error::custom(self.name(), e))?;
        let text = crate::source::key_file::write::file(&keys);
        crate::source::key_file::write::replace(path.as_ref(), text.as_bytes())
            .map_err(|e| Error::io(path.as_ref(), e))?;
        Ok(keys.len())
    }

    fn name(&self) -> String {
        format!("redis:{}", self.namespace)
    }

    fn error(&self, e: redis::RedisError) -> Error {
        Error::custom(self.name(), e)
    }

    /// The shared connection, made (or made again after a failure) on demand.
    async fn connection(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let mut slot = self.con.lock().await;
        if let Some(con) = &*slot {
            return Ok(con.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let con = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *slot = Some(con.clone());
        Ok(con)
    }

    /// Runs a command; a failure drops the connection so the next call makes a new one.
    async fn run<T>(
        &self,
        f: impl AsyncFnOnce(&mut MultiplexedConnection) -> Result<T, redis::RedisError>,
    ) -> Result<T, BackendError> {
        let mut con = self.connection().await.map_err(|e| self.unavailable(e))?;
        match f(&mut con).await {
            Ok(out) => Ok(out),
            Err(e) => {
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    *self.con.lock().await = None;
                }
                Err(self.unavailable(e))
            }
        }
    }

    fn unavailable(&self, e: redis::RedisError) -> BackendError {
        BackendError::Unavailable(Box::new(self.error(e)))
    }

    async fn all(&self) -> Result<Vec<ApiKey>, BackendError> {
        let records: Value = self
            .run(async |con| con.hgetall(&self.keys.records).await)
            .await?;
        let mut keys = Vec::new();
        for (id, json) in super::pairs(records) {
            let id = String::from_utf8_lossy(&id);
            keys.push(model::decode(&id, &json).map_err(BackendError::Invalid)?);
        }
        Ok(keys)
    }

    /// The record with this id, as stored (bytes) and as a key.
    async fn current(&self, id: &str) -> Result<Option<(Vec<u8>, ApiKey)>, BackendError> {
        let raw: Option<Vec<u8>> = self
            .run(async |con| con.hget(&self.keys.records, id).await)
            .await?;
        match raw {
            None => Ok(None),
            Some(raw) => {
                let key = model::decode(id, &raw).map_err(BackendError::Invalid)?;
                Ok(Some((raw, key)))
            }
        }
    }

    async fn script(&self, puts: &[Put<'_>]) -> Result<Outcome, BackendError> {
        let reply: Vec<i64> = self
            .run(async |con| {
                let script = redis::Script::new(model::APPLY);
                let mut invocation = script.prepare_invoke();
                invocation
                    .key(&self.keys.records)
                    .key(&self.keys.version)
                    .key(&self.keys.log)
                    .arg(LOG_LEN);
                for put in puts {
                    invocation.arg(if put.record.is_some() { "put" } else { "del" });
                    invocation.arg(put.id);
                    match put.expect {
                        Expect::Absent => invocation.arg("-"),
                        Expect::Exactly(raw) => invocation.arg(raw),
                    };
                    invocation.arg(put.record.as_deref().unwrap_or(""));
                }
                invocation.invoke_async(con).await
            })
            .await?;
        Ok(match reply.first() {
            Some(-1) => Outcome::Exists,
            Some(-2) => Outcome::Absent,
            Some(-3) => Outcome::Changed,
            _ => Outcome::Done,
        })
    }

    /// Replaces or removes the record with `id` (and adds `also`, which must be new),
    /// if its ETag is `if_match`: read, check, and write if nothing changed in between
    /// (a few tries, then the change wins or loses on the ETag).
    async fn change(
        &self,
        id: &str,
        if_match: Option<&str>,
        record: Option<String>,
        also: Option<&ApiKey>,
    ) -> Result<(), BackendError> {
        for _ in 0..5 {
            let (raw, key) = self.current(id).await?.ok_or(BackendError::NotFound)?;
            if if_match.is_some_and(|tag| tag != record_etag(&key)) {
                return Err(BackendError::PreconditionFailed);
            }
            let mut puts = Vec::new();
            if let Some(new) = also {
                puts.push(Put {
                    id: new.id(),
                    expect: Expect::Absent,
                    record: Some(model::encode(new)),
                });
            }
            puts.push(Put {
                id,
                expect: Expect::Exactly(&raw),
                record: record.clone(),
            });
            match self.script(&puts).await? {
                Outcome::Done => return Ok(()),
                Outcome::Exists => {
                    let taken = also.map_or(id, ApiKey::id);
                    return Err(BackendError::Conflict(taken.to_owned()));
                }
                Outcome::Absent => return Err(BackendError::NotFound),
                // Changed under us: look again.
                Outcome::Changed => {}
            }
        }
        Err(BackendError::PreconditionFailed)
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
        Ok(self.current(id).await?.map(|(_, key)| key))
    }

    async fn create(&self, key: ApiKey) -> Result<(), BackendError> {
        let put = Put {
            id: key.id(),
            expect: Expect::Absent,
            record: Some(model::encode(&key)),
        };
        match self.script(&[put]).await? {
            Outcome::Exists => Err(BackendError::Conflict(key.id().to_owned())),
            _ => Ok(()),
        }
    }

    async fn update(&self, key: ApiKey, if_match: Option<&str>) -> Result<(), BackendError> {
        self.change(key.id(), if_match, Some(model::encode(&key)), None)
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
            Some(model::encode(&old)),
            Some(&successor),
        )
        .await
    }

    async fn usage(&self, ids: &[String]) -> Result<Option<Vec<UsageCounts>>, BackendError> {
        if ids.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let (requests, last_used): (Vec<Option<u64>>, Vec<Option<u64>>) = self
            .run(async |con| {
                redis::pipe()
                    .cmd("HMGET")
                    .arg(&self.keys.requests)
                    .arg(ids)
                    .cmd("HMGET")
                    .arg(&self.keys.last_used)
                    .arg(ids)
                    .query_async(con)
                    .await
            })
            .await?;
        Ok(Some(
            requests
                .into_iter()
                .zip(last_used)
                .map(|(n, at)| {
                    let at = at
                        .filter(|&s| s > 0)
                        .map(|s| crate::clock::from_unix_ms(s * 1000));
                    (n.unwrap_or(0), at)
                })
                .collect(),
        ))
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("namespace", &self.namespace)
            .field("server", &super::server(&self.client))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}
