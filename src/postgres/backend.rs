//! `PostgresBackend`: the key-management API's backend on a PostgreSQL namespace,
//! the schema's migration, and the explicit ways a namespace is created, restored and
//! exported.

use std::{collections::HashMap, fmt, path::Path, sync::Arc, time::Duration};

use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::{
    PgError, Target, model,
    plan::{Op, Plan},
    read,
};
use crate::{
    ApiKey, Error, KeySet,
    admin::{AdminBackend, BackendError, UsageCounts, record_etag},
    key::record,
};

/// An [`AdminBackend`] on a PostgreSQL namespace: each call is one transaction that
/// locks the namespace's row, writes the key's record, bumps the namespace's version
/// and writes a change row per key, which every replica's
/// [`PostgresSource`](super::PostgresSource) reads; `NOTIFY` wakes them.
///
/// The schema is created by [`migrate`](PostgresBackend::migrate), explicitly. A
/// namespace is created, or re-created after it was lost, only explicitly too: by
/// [`import_file`](PostgresBackend::import_file) (the first seed) or
/// [`restore_file`](PostgresBackend::restore_file) (a replica's snapshot, or an
/// export). The API's writes into a namespace that does not exist are refused
/// ([`BackendError::StoreMissing`]).
///
/// What a call answers is what happened: [`BackendError::Unavailable`] only when
/// nothing was written (PostgreSQL refused or rolled back, or a lock held by another
/// transaction outlasted the timeout). A write whose answer was lost is settled on a
/// fresh connection: it either happened (the call succeeds) or is made certain never
/// to happen and is tried once more; only when PostgreSQL cannot be asked is the
/// answer [`BackendError::OutcomeUnknown`]. A connection that broke is made again by
/// the next call.
///
/// # Example
///
/// ```no_run
/// use tower_api_key::{KeyStore, admin::AdminApi, postgres::{PostgresBackend, PostgresSource}};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let url = "postgres://keys:password@127.0.0.1:5432/app";
/// let store = KeyStore::new();
/// let backend = PostgresBackend::new(url, "payments")?;
/// backend.migrate().await?;
/// if !backend.exists().await? {
///     // The first start of the fleet: seed the namespace and its first admin key.
///     backend.import_file("keys.toml").await?;
/// }
/// store.add_source(PostgresSource::new(url, "payments")?)?;
/// let api: axum::Router = AdminApi::new(store.clone(), backend).router();
/// # Ok(()) }
/// ```
pub struct PostgresBackend {
    pub(super) target: Target,
    pub(super) namespace: String,
    pub(super) timeout: Duration,
    /// The connection reads share (single statements, each its own snapshot).
    reader: Mutex<Option<Arc<Client>>>,
    /// The connection transactions take turns on.
    pub(super) writer: Mutex<Option<Client>>,
}

impl PostgresBackend {
    /// A backend on namespace `namespace` of the PostgreSQL database at `url` (see
    /// [the module](super) for URLs and TLS). Checks the URL only.
    ///
    /// # Errors
    ///
    /// [`Error::Source`] if `url` is not a PostgreSQL URL or `namespace` is empty.
    pub fn new(url: &str, namespace: impl Into<String>) -> Result<Self, Error> {
        let namespace = namespace.into();
        Ok(Self {
            target: Target::parse(url, &namespace)?,
            namespace,
            timeout: Duration::from_secs(2),
            reader: Mutex::new(None),
            writer: Mutex::new(None),
        })
    }

    /// How long a connection or a call may take before it gives up (default 2 s). A
    /// write waits at most about as long for the namespace's lock. A write whose
    /// answer was lost is then settled, which may take as long again.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Creates the fleet's tables if they do not exist: idempotent, safe from several
    /// processes at once, and it creates no namespace. The same SQL is in
    /// `src/postgres/schema.sql`, for those who migrate with their own tools.
    ///
    /// # Errors
    ///
    /// PostgreSQL does not answer, or refuses (the user may not create tables).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use tower_api_key::postgres::PostgresBackend;
    ///
    /// # async fn run() -> Result<(), tower_api_key::Error> {
    /// let backend = PostgresBackend::new("postgres://keys:pw@127.0.0.1/app", "payments")?;
    /// backend.migrate().await?;
    /// # Ok(()) }
    /// ```
    pub async fn migrate(&self) -> Result<(), Error> {
        let mut writer = self.writer.lock().await;
        let client = self
            .connected(&mut writer)
            .await
            .map_err(|e| self.error(e))?;
        // One simple query: one implicit transaction, under its advisory lock.
        let result = super::within(self.timeout * 5, client.batch_execute(model::SCHEMA)).await;
        if result.as_ref().is_err_and(|e| !super::answered(e)) {
            *writer = None;
        }
        result.map_err(|e| self.error(e))
    }

    /// Whether the namespace exists: it has its row, and a keys table that holds its
    /// keys. A wiped database, missing tables, a namespace never created, or one
    /// whose keys table was emptied under its row (`TRUNCATE`), does not.
    ///
    /// # Errors
    ///
    /// PostgreSQL does not answer.
    pub async fn exists(&self) -> Result<bool, Error> {
        let ns = &self.namespace;
        let head = self
            .read(|client| async move {
                let Some(head) = read::head(&*client, ns).await? else {
                    return Ok(false);
                };
                if head.keys <= 0 {
                    return Ok(true);
                }
                Ok(client.query_one(model::ANY_KEY, &[ns]).await?.try_get(0)?)
            })
            .await;
        match head {
            Ok(exists) => Ok(exists),
            Err(e) if super::no_tables(&e) => Ok(false),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Writes every key of the key file at `path` into the namespace, in one
    /// transaction (one version); keys already there are replaced, others stay.
    /// Returns how many keys were written.
    ///
    /// If the namespace does not exist, this **creates** it, holding the file's keys
    /// and nothing else: how a fleet's namespace gets its first admin key. Call it
    /// when you mean that, not on every start of a replica (after a wipe, it would
    /// bring back the file's keys, revoked ones included, and lose every other).
    ///
    /// # Errors
    ///
    /// The file cannot be read or does not parse; PostgreSQL does not answer or
    /// refuses (nothing is written); the answer was lost and could not be settled;
    /// the namespace's keys table was emptied under its row (`TRUNCATE`: restore it
    /// with [`restore_file`](PostgresBackend::restore_file)).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use tower_api_key::postgres::PostgresBackend;
    ///
    /// # async fn run() -> Result<(), tower_api_key::Error> {
    /// let backend = PostgresBackend::new("postgres://keys:pw@127.0.0.1/app", "payments")?;
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
    /// [`import_file`](PostgresBackend::import_file) does.
    ///
    /// # Errors
    ///
    /// As [`import_file`](PostgresBackend::import_file), the file aside;
    /// [`Error::DuplicateKey`], with nothing written, if a key of `set` holds the
    /// secret of a stored key of another id that `set` does not replace (replicas
    /// would refuse both). That is checked before the write's transaction, not in
    /// it: a key another writer stores meanwhile is not seen (the API's keys have
    /// fresh random secrets; two imports at once are for the operator to avoid).
    pub async fn import(&self, set: &KeySet) -> Result<usize, Error> {
        // A key given the secret of a stored key it does not replace: replicas
        // would refuse both.
        match self.all().await {
            Ok(stored) => set.clashes_with(&stored)?,
            Err(BackendError::StoreMissing(_)) => {}
            Err(e) => return Err(Error::custom(self.name(), e)),
        }
        let records = records_of(set);
        self.transact(&Plan::Import(&records))
            .await
            .map_err(|e| Error::custom(self.name(), e))?;
        Ok(records.len())
    }

    /// Replaces the namespace, whole, by the keys of the key file at `path`, and gives
    /// it a new epoch, in one transaction: how an operator brings back a namespace
    /// that was lost (its row deleted, its keys table emptied), from a replica's
    /// snapshot ([`PostgresSource::with_snapshot`](super::PostgresSource::with_snapshot))
    /// or an [`export_file`](PostgresBackend::export_file). Returns how many keys the
    /// namespace holds. Replicas go from their last good set to the restored one in
    /// one step. Whatever the namespace held is replaced.
    ///
    /// # Errors
    ///
    /// The file cannot be read or does not parse; otherwise as
    /// [`import_file`](PostgresBackend::import_file).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use tower_api_key::postgres::PostgresBackend;
    ///
    /// # async fn run() -> Result<(), tower_api_key::Error> {
    /// let backend = PostgresBackend::new("postgres://keys:pw@127.0.0.1/app", "payments")?;
    /// let n = backend.restore_file("/var/lib/replica-1/keys.snapshot.toml").await?;
    /// println!("restored {n} keys");
    /// # Ok(()) }
    /// ```
    pub async fn restore_file(&self, path: impl AsRef<Path>) -> Result<usize, Error> {
        self.restore(&read_key_file(path.as_ref())?).await
    }

    /// Replaces the namespace, whole, by `set`, as
    /// [`restore_file`](PostgresBackend::restore_file) does.
    ///
    /// # Errors
    ///
    /// As [`restore_file`](PostgresBackend::restore_file), the file aside.
    pub async fn restore(&self, set: &KeySet) -> Result<usize, Error> {
        let records = records_of(set);
        self.transact(&Plan::Restore(&records))
            .await
            .map_err(|e| Error::custom(self.name(), e))?;
        Ok(records.len())
    }

    /// Writes the namespace's keys to a key file at `path`, digests only, atomically.
    /// Returns how many keys were written.
    ///
    /// # Errors
    ///
    /// PostgreSQL does not answer; the namespace does not exist; a record cannot be
    /// read; or the file cannot be written ([`Error::Write`](crate::Error::Write), as
    /// when something other than a regular file is at `path`, which is left as it is).
    ///
    /// # Example
    ///
    /// ```no_run
    /// use tower_api_key::postgres::PostgresBackend;
    ///
    /// # async fn run() -> Result<(), tower_api_key::Error> {
    /// let backend = PostgresBackend::new("postgres://keys:pw@127.0.0.1/app", "payments")?;
    /// backend.export_file("payments-backup.toml").await?;
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

    /// Writes `keys` and removes the keys `removed` in one transaction, one
    /// version, as one change replicas apply whole (no new epoch, no reload of the
    /// namespace): how the command line's `apply` writes its plan. A namespace that
    /// does not exist is not created ([`BackendError::StoreMissing`]).
    ///
    /// With `read` (the keys the plan was made from, by id), every id the change
    /// touches must still hold what `read` holds for it (or be absent, as there):
    /// the first that does not refuses the whole change as
    /// [`BackendError::Conflict`] naming it, and nothing is written. The records are
    /// compared locked, in the writing transaction.
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    pub(crate) async fn change_many(
        &self,
        keys: &[ApiKey],
        removed: &[String],
        read: Option<&HashMap<&str, &ApiKey>>,
    ) -> Result<(), BackendError> {
        let records: Vec<(&str, String)> =
            keys.iter().map(|k| (k.id(), record::encode(k))).collect();
        let mut ids: Vec<&str> = records.iter().map(|(id, _)| *id).collect();
        ids.extend(removed.iter().map(String::as_str));
        let decide = |current: &HashMap<String, String>| -> Result<Vec<Op>, BackendError> {
            if let Some(read) = read
                && let Some(id) = ids.iter().find(|id| {
                    !record::unchanged(
                        id,
                        current.get(**id).map(String::as_bytes),
                        read.get(**id).copied(),
                    )
                })
            {
                return Err(BackendError::Conflict((*id).to_owned()));
            }
            let puts = records.iter().map(|(id, r)| Op {
                id: (*id).to_owned(),
                record: Some(r.clone()),
            });
            let dels = removed.iter().map(|id| Op {
                id: id.clone(),
                record: None,
            });
            Ok(puts.chain(dels).collect())
        };
        self.transact(&Plan::Change {
            ids: ids.clone(),
            decide: &decide,
        })
        .await
    }

    pub(super) fn name(&self) -> String {
        format!("postgres:{}", self.namespace)
    }

    pub(super) fn error(&self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::custom(self.name(), e)
    }

    pub(super) fn missing(&self) -> BackendError {
        BackendError::StoreMissing(format!("PostgreSQL namespace `{}`", self.namespace))
    }

    /// The connection in `slot`, made (again) if there is none or it closed.
    pub(super) async fn connected<'a>(
        &self,
        slot: &'a mut Option<Client>,
    ) -> Result<&'a mut Client, PgError> {
        if slot.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = self.target.connect(self.timeout, super::Role::Api).await?;
            tokio::spawn(connection);
            *slot = Some(client);
        }
        slot.as_mut().ok_or(PgError::Lost)
    }

    /// Runs a read on the shared connection; a connection found broken is made again
    /// and the read tried once more.
    async fn read<T, F>(&self, f: impl Fn(Arc<Client>) -> F) -> Result<T, PgError>
    where
        F: std::future::Future<Output = Result<T, PgError>>,
    {
        for attempt in 0..2 {
            let client = {
                let mut slot = self.reader.lock().await;
                match &*slot {
                    Some(c) if !c.is_closed() => c.clone(),
                    _ => {
                        let (client, connection) =
                            self.target.connect(self.timeout, super::Role::Api).await?;
                        tokio::spawn(connection);
                        let client = Arc::new(client);
                        *slot = Some(client.clone());
                        client
                    }
                }
            };
            match super::within(self.timeout, f(client)).await {
                Ok(out) => return Ok(out),
                Err(e) if super::answered(&e) => return Err(e),
                Err(e) => {
                    *self.reader.lock().await = None;
                    if matches!(e, PgError::Timeout) || attempt == 1 {
                        return Err(e);
                    }
                }
            }
        }
        Err(PgError::Lost)
    }

    /// A failure that changed nothing. PostgreSQL's own text is logged, not passed on.
    pub(super) fn unavailable(&self, e: &PgError) -> BackendError {
        self.log(e, "nothing was written");
        if super::no_tables(e) {
            return self.missing();
        }
        BackendError::Unavailable(Box::new(Error::custom(self.name(), super::describe(e))))
    }

    pub(super) fn log(&self, e: &PgError, what: &str) {
        #[cfg(feature = "tracing")]
        tracing::warn!(target: "tower_api_key::postgres", source = %self.name(), error = ?e, "a PostgreSQL call failed; {what}");
        #[cfg(not(feature = "tracing"))]
        let _ = (e, what);
    }

    /// Every key. A record that cannot be read is the store's fault, named.
    async fn all(&self) -> Result<Vec<ApiKey>, BackendError> {
        const LIST: &str = "SELECT n.keys, k.id, k.record::text FROM tak_namespaces n \
             LEFT JOIN tak_keys k ON k.namespace = n.namespace WHERE n.namespace = $1 \
             ORDER BY k.id";
        let rows = self
            .read(|client| async move { Ok(client.query(LIST, &[&self.namespace]).await?) })
            .await
            .map_err(|e| self.unavailable(&e))?;
        let Some(first) = rows.first() else {
            return Err(self.missing());
        };
        let counted: i64 = first.try_get(0).unwrap_or(-1);
        let mut keys = Vec::with_capacity(rows.len());
        for row in &rows {
            let (Ok(Some(id)), Ok(Some(json))) = (
                row.try_get::<_, Option<&str>>(1),
                row.try_get::<_, Option<&str>>(2),
            ) else {
                continue;
            };
            keys.push(BackendError::checked(id, json.as_bytes())?);
        }
        if keys.len() as i64 != counted {
            return Err(if keys.is_empty() {
                self.missing()
            } else {
                BackendError::Unavailable(Box::new(self.error(
                    "the keys table does not hold the records the namespace counts (changed \
                     by hand?): restore it",
                )))
            });
        }
        Ok(keys)
    }

    /// Replaces or removes the record with `id` (and adds `also`, which must be new),
    /// if its ETag is `if_match`. A record that cannot be read can be removed
    /// (without `If-Match`), nothing else.
    async fn change(
        &self,
        id: &str,
        if_match: Option<&str>,
        new: Option<String>,
        also: Option<&ApiKey>,
    ) -> Result<(), BackendError> {
        let also_id = also.map(ApiKey::id);
        let also_record = also.map(record::encode);
        let decide = |current: &HashMap<String, String>| -> Result<Vec<Op>, BackendError> {
            let raw = current.get(id).ok_or(BackendError::NotFound)?;
            let key = record::decode_valid(id, raw.as_bytes());
            match (&key, if_match) {
                (Ok(key), Some(tag)) if tag != record_etag(key) => {
                    return Err(BackendError::PreconditionFailed);
                }
                (Err(_), _) if new.is_some() || also.is_some() => {
                    return Err(BackendError::corrupt(id, key.err()));
                }
                (Err(_), Some(_)) => return Err(BackendError::PreconditionFailed),
                _ => {}
            }
            let mut ops = Vec::new();
            if let (Some(also_id), Some(r)) = (also_id, &also_record) {
                if current.contains_key(also_id) {
                    return Err(BackendError::Conflict(also_id.to_owned()));
                }
                ops.push(Op {
                    id: also_id.to_owned(),
                    record: Some(r.clone()),
                });
            }
            ops.push(Op {
                id: id.to_owned(),
                record: new.clone(),
            });
            Ok(ops)
        };
        let mut ids = vec![id];
        ids.extend(also_id);
        self.transact(&Plan::Change {
            ids,
            decide: &decide,
        })
        .await
    }
}

/// The records of a set, as stored.
fn records_of(set: &KeySet) -> Vec<(String, String)> {
    set.iter()
        .map(|k| (k.id().to_owned(), record::encode(k)))
        .collect()
}

/// Reads and parses a key file.
fn read_key_file(path: &Path) -> Result<KeySet, Error> {
    let bytes = crate::source::read::FileBytes::read(path, crate::source::read::DEFAULT_MAX_SIZE)
        .map_err(|e| Error::io(path, e))?;
    crate::FileSource::parse(path, &bytes)
}

impl AdminBackend for PostgresBackend {
    fn source_name(&self) -> String {
        self.name()
    }

    async fn list(&self) -> Result<Vec<ApiKey>, BackendError> {
        self.all().await
    }

    async fn get(&self, id: &str) -> Result<Option<ApiKey>, BackendError> {
        // The second column: no such record because the table was emptied under a
        // row that counts keys (`TRUNCATE`): wiped, not "not found".
        const GET: &str = "SELECT k.record::text, k.id IS NULL AND n.keys > 0 \
             AND NOT EXISTS (SELECT 1 FROM tak_keys e WHERE e.namespace = n.namespace) \
             FROM tak_namespaces n \
             LEFT JOIN tak_keys k ON k.namespace = n.namespace AND k.id = $2 \
             WHERE n.namespace = $1";
        let row = self
            .read(|client| async move { Ok(client.query_opt(GET, &[&self.namespace, &id]).await?) })
            .await
            .map_err(|e| self.unavailable(&e))?;
        let Some(row) = row else {
            return Err(self.missing());
        };
        if row.try_get::<_, bool>(1).unwrap_or(false) {
            return Err(self.missing());
        }
        match row.try_get::<_, Option<&str>>(0) {
            Ok(Some(json)) => BackendError::checked(id, json.as_bytes()).map(Some),
            Ok(None) => Ok(None),
            Err(_) => Err(BackendError::corrupt(id, None)),
        }
    }

    async fn create(&self, key: ApiKey) -> Result<(), BackendError> {
        let record = record::encode(&key);
        let id = key.id();
        let decide = |current: &HashMap<String, String>| {
            if current.contains_key(id) {
                return Err(BackendError::Conflict(id.to_owned()));
            }
            Ok(vec![Op {
                id: id.to_owned(),
                record: Some(record.clone()),
            }])
        };
        self.transact(&Plan::Change {
            ids: vec![id],
            decide: &decide,
        })
        .await
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

    async fn usage(&self, ids: &[String]) -> Result<Option<Vec<UsageCounts>>, BackendError> {
        if ids.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let rows = self
            .read(|client| async move {
                Ok(client.query(model::USAGE, &[&self.namespace, &ids]).await?)
            })
            .await
            .map_err(|e| self.unavailable(&e))?;
        let mut counts: HashMap<String, (i64, i64)> = HashMap::new();
        for row in rows {
            if let (Ok(id), Ok(n), Ok(at)) = (row.try_get(0), row.try_get(1), row.try_get(2)) {
                counts.insert(id, (n, at));
            }
        }
        Ok(Some(
            ids.iter()
                .map(|id| {
                    let (n, at) = counts.get(id).copied().unwrap_or((0, 0));
                    let at = (at > 0)
                        .then(|| crate::clock::from_unix_ms((at as u64).saturating_mul(1000)));
                    (n.max(0) as u64, at)
                })
                .collect(),
        ))
    }
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("namespace", &self.namespace)
            .field("server", &self.target.server())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}
