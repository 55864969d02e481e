//! The one target a command works on, and how the key-management API is reached
//! over it: in this process for a key file or a fleet's namespace (Redis or
//! PostgreSQL), over HTTP for a running API.
//!
//! A fleet's engines share one contract (an [`AdminBackend`] that also creates,
//! restores and lists a namespace whole), so a namespace is one [`Target::Fleet`]
//! whatever its engine: a new engine is one more [`Engine`] variant, its backend and
//! its replica's source.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use http::{HeaderValue, Method, StatusCode, header};
use zeroize::Zeroizing;

use super::{Exit, Failure, args::TargetArgs, chain};
use crate::{
    ApiKey, ChannelSource, FileSource, KeySet, KeySource, KeyStore,
    admin::{AdminApi, AdminBackend, BackendError, FileBackend, UsageCounts},
    postgres::{PostgresBackend, PostgresSource},
    redis::{RedisBackend, RedisSource},
};

/// Where keys are.
pub(crate) enum Target {
    /// A key file.
    File(PathBuf),
    /// A fleet's namespace, on Redis or PostgreSQL.
    Fleet(Fleet),
    /// A running key-management API.
    Api {
        base: http::Uri,
        key_from_stdin: bool,
    },
}

/// A fleet's namespace: its engine's backend, and the URL, kept only to open a
/// replica's source (it may hold a password: never printed).
pub(crate) struct Fleet {
    url: Zeroizing<String>,
    namespace: String,
    engine: Engine,
}

/// The engine a fleet's namespace is on.
pub(crate) enum Engine {
    Redis(Box<RedisBackend>),
    Postgres(Box<PostgresBackend>),
}

/// `$call` on the engine's backend, named `$backend`, whichever engine it is.
macro_rules! on_engine {
    ($engine:expr, $backend:ident => $call:expr) => {
        match $engine {
            Engine::Redis($backend) => $call,
            Engine::Postgres($backend) => $call,
        }
    };
}

impl Engine {
    /// The engine's name, for messages and flags.
    fn name(&self) -> &'static str {
        match self {
            Self::Redis(_) => "Redis",
            Self::Postgres(_) => "PostgreSQL",
        }
    }
}

impl Fleet {
    /// The namespace `namespace` on the engine at `url` (`postgres` for PostgreSQL,
    /// else Redis). A malformed URL is a usage error said without the URL.
    fn open(url: &str, namespace: &str, postgres: bool) -> Result<Self, Failure> {
        let flag = if postgres { "--postgres" } else { "--redis" };
        let usage = |e: crate::Error| Failure::new(Exit::Usage, format!("{flag}: {}", chain(&e)));
        let timeout = Duration::from_secs(2);
        let engine = if postgres {
            Engine::Postgres(Box::new(
                PostgresBackend::new(url, namespace)
                    .map_err(usage)?
                    .with_timeout(timeout),
            ))
        } else {
            Engine::Redis(Box::new(
                RedisBackend::new(url, namespace)
                    .map_err(usage)?
                    .with_timeout(timeout),
            ))
        };
        Ok(Self {
            url: Zeroizing::new(url.to_owned()),
            namespace: namespace.to_owned(),
            engine,
        })
    }

    /// The engine and the namespace, for messages (never the URL).
    pub(crate) fn describe(&self) -> String {
        format!("{} namespace `{}`", self.engine.name(), self.namespace)
    }

    /// Whether the namespace exists.
    pub(crate) async fn exists(&self) -> Result<bool, crate::Error> {
        on_engine!(&self.engine, b => b.exists().await)
    }

    /// Writes `set`'s keys into the namespace (creating it, with them only, if it
    /// does not exist).
    pub(crate) async fn import(&self, set: &KeySet) -> Result<usize, crate::Error> {
        let sized = self.sized(set.len())?;
        let fleet = sized.as_ref().unwrap_or(self);
        on_engine!(&fleet.engine, b => b.import(set).await)
    }

    /// Writes `set`'s keys into the namespace, which must exist: one wiped
    /// meanwhile is missing ([`Exit::StoreMissing`]), never re-created holding
    /// only these keys.
    ///
    /// `together`: in one version on Redis too (as [`change`](Self::change)).
    pub(crate) async fn import_existing(
        &self,
        set: &KeySet,
        together: bool,
    ) -> Result<(), Failure> {
        match &self.engine {
            Engine::Redis(b) => b
                .import_existing(set, together)
                .await
                .map(drop)
                .map_err(|e| self.failure(Exit::Unavailable, &e)),
            Engine::Postgres(_) => {
                let keys: Vec<ApiKey> = set.iter().cloned().collect();
                self.change(&keys, &[], None, together).await
            }
        }
    }

    /// Replaces the namespace, whole, by `set`, in one step.
    pub(crate) async fn restore(&self, set: &KeySet) -> Result<usize, crate::Error> {
        let sized = self.sized(set.len())?;
        let fleet = sized.as_ref().unwrap_or(self);
        on_engine!(&fleet.engine, b => b.restore(set).await)
    }

    /// Writes `keys` and removes `removed`, in a namespace that must exist: as one
    /// change on PostgreSQL (one transaction, one version), one version per 1,000
    /// changes on Redis. With `read` (the keys a plan was made from, by id), each id
    /// touched must still hold what it held then, else the write is refused
    /// ([`Exit::Conflict`]): PostgreSQL writes nothing; Redis nothing from the
    /// version that found it on.
    ///
    /// `together`: in one version on Redis too (the changes that move secrets
    /// between ids, written first: see [`moving_batches`](crate::redis::moves::moving_batches)).
    pub(crate) async fn change(
        &self,
        keys: &[ApiKey],
        removed: &[String],
        read: Option<&HashMap<&str, &ApiKey>>,
        together: bool,
    ) -> Result<(), Failure> {
        let sized = self
            .sized(keys.len() + removed.len())
            .map_err(|e| self.failure(Exit::Usage, &e))?;
        let fleet = sized.as_ref().unwrap_or(self);
        let done = match &fleet.engine {
            Engine::Redis(b) => b.change_many(keys, removed, read, together).await,
            Engine::Postgres(b) => b.change_many(keys, removed, read).await,
        };
        done.map_err(|e| match e {
            BackendError::Conflict(id) if read.is_some() => {
                let written = match self.engine {
                    Engine::Postgres(_) => "nothing was written",
                    Engine::Redis(_) => "nothing from its version on was written",
                };
                Failure::new(
                    Exit::Conflict,
                    format!(
                        "{}: the namespace changed since it was read (key `{id}`): {written}; \
                         run `diff` and `apply` again",
                        self.describe()
                    ),
                )
            }
            e => Target::backend_failure(&e),
        })
    }

    /// For a write of `keys` keys in one transaction (PostgreSQL), the namespace on
    /// a backend given time in proportion (2 s, and 1 ms a key: a 200,000-key
    /// import takes about 5 s on a laptop, and several times that on a busy
    /// server, which is no reason to give up on it); `None` where the backend's own
    /// time does (Redis writes 1,000 keys a call; a small write).
    fn sized(&self, keys: usize) -> Result<Option<Self>, crate::Error> {
        let Engine::Postgres(_) = self.engine else {
            return Ok(None);
        };
        if keys <= 10_000 {
            return Ok(None);
        }
        let timeout = Duration::from_secs(2) + Duration::from_millis(keys as u64);
        Ok(Some(Self {
            url: self.url.clone(),
            namespace: self.namespace.clone(),
            engine: Engine::Postgres(Box::new(
                PostgresBackend::new(&self.url, self.namespace.as_str())?.with_timeout(timeout),
            )),
        }))
    }

    /// Every key of the namespace, as stored.
    pub(crate) async fn list(&self) -> Result<Vec<ApiKey>, BackendError> {
        on_engine!(&self.engine, b => b.list().await)
    }

    /// The fleet's use of these keys.
    pub(crate) async fn usage(
        &self,
        ids: &[String],
    ) -> Result<Option<Vec<UsageCounts>>, BackendError> {
        on_engine!(&self.engine, b => b.usage(ids).await)
    }

    /// Whether a write of many keys is split into versions replicas apply one by
    /// one (Redis: 1,000 changes each), so that the changes moving secrets between
    /// ids must be written first, together.
    pub(crate) fn splits_versions(&self) -> bool {
        matches!(self.engine, Engine::Redis(_))
    }

    /// How many keys one import writes: PostgreSQL writes any number in one
    /// transaction, one version; Redis one version per 1,000 keys, so an import into
    /// an existing namespace goes 10,000 at a time, with progress shown.
    pub(crate) fn batch(&self) -> usize {
        match self.engine {
            Engine::Redis(_) => 10_000,
            Engine::Postgres(_) => usize::MAX,
        }
    }

    /// Creates the namespace, which does not exist, holding `set`: by a restore
    /// (a new epoch) or an import. The engine's schema is made first where it has
    /// one (PostgreSQL's tables, if missing; idempotent). Making it may fail where
    /// the write need not (the tables exist, made by a user who may create tables
    /// when this one may not); when both fail, the schema's failure is the one said.
    pub(crate) async fn create(&self, set: &KeySet, restore: bool) -> Result<(), Failure> {
        let schema = match &self.engine {
            Engine::Postgres(b) => b.migrate().await.err(),
            Engine::Redis(_) => None,
        };
        let written = if restore {
            self.restore(set).await
        } else {
            self.import(set).await
        };
        written.map(drop).map_err(|e| match schema {
            Some(schema) => Failure::new(
                Exit::Unavailable,
                format!(
                    "{}: cannot create the tables: {}",
                    self.describe(),
                    chain(&schema)
                ),
            ),
            None => self.failure(Exit::Unavailable, &e),
        })
    }

    /// The key-management API's backend and a replica's store over the namespace,
    /// each on connections of its own.
    async fn admin(&self, scopes: &[String]) -> Result<Admin, Failure> {
        match self.exists().await {
            Ok(true) => {}
            Ok(false) => {
                return Err(Target::backend_failure(&BackendError::StoreMissing(
                    self.describe(),
                )));
            }
            Err(e) => return Err(self.failure(Exit::Unavailable, &e)),
        }
        let fresh = Self::open(
            &self.url,
            &self.namespace,
            matches!(self.engine, Engine::Postgres(_)),
        )?;
        match fresh.engine {
            Engine::Redis(backend) => {
                let source = RedisSource::new(&self.url, self.namespace.as_str())
                    .map_err(|e| Failure::new(Exit::Usage, chain(&e)))?
                    .with_connect_timeout(TIMEOUT);
                Admin::local(self.follow(source).await?, *backend, scopes)
            }
            Engine::Postgres(backend) => {
                let source = PostgresSource::new(&self.url, self.namespace.as_str())
                    .map_err(|e| Failure::new(Exit::Usage, chain(&e)))?
                    .with_connect_timeout(TIMEOUT);
                Admin::local(self.follow(source).await?, *backend, scopes)
            }
        }
    }

    /// A store that follows the namespace through `source`, loaded.
    async fn follow(&self, source: impl KeySource) -> Result<KeyStore, Failure> {
        let describe = self.describe();
        let engine = self.engine.name();
        tokio::task::spawn_blocking(move || {
            let store = KeyStore::new();
            store.add_source(source).map_err(|e| {
                Failure::new(Exit::Unavailable, format!("{describe}: {}", chain(&e)))
            })?;
            Ok::<_, Failure>(store)
        })
        .await
        .map_err(|_| Failure::new(Exit::Unavailable, format!("{engine} could not be read")))?
    }

    /// A crate error from a write or read of the namespace as a failure: `exit`,
    /// or what the engine's error says happened (the outcome of a write unknown, the
    /// namespace missing).
    pub(crate) fn failure(&self, exit: Exit, e: &crate::Error) -> Failure {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(b @ (BackendError::OutcomeUnknown(_) | BackendError::StoreMissing(_))) =
                s.downcast_ref::<BackendError>()
            {
                let mut f = Target::backend_failure(b);
                f.message = format!("{}: {}", self.describe(), chain(e));
                return f;
            }
            source = s.source();
        }
        Failure::new(exit, format!("{}: {}", self.describe(), chain(e)))
    }
}

/// The environment variable the API's admin key is read from.
pub(crate) const ADMIN_KEY_VAR: &str = "TOWER_API_KEY_ADMIN_KEY";

/// How long the API may take to answer (`--timeout`).
pub(crate) static API_TIMEOUT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// How long a connection to Redis, PostgreSQL or the API, or one of their answers,
/// may take.
const TIMEOUT: Duration = Duration::from_secs(5);

impl Target {
    /// The target the arguments name. A malformed URL is a usage error, said
    /// without repeating the URL (it may hold a password).
    pub(crate) fn of(args: &TargetArgs) -> Result<Self, Failure> {
        if let Some(path) = &args.file {
            return Ok(Self::File(path.clone()));
        }
        for (url, postgres) in [(&args.redis, false), (&args.postgres, true)] {
            if let Some(url) = url {
                let namespace = args.namespace.as_deref().unwrap_or_default();
                return Fleet::open(url, namespace, postgres).map(Self::Fleet);
            }
        }
        if let Some(url) = &args.api {
            let base = http::Uri::try_from(url.as_str())
                .ok()
                .filter(|u| {
                    matches!(u.scheme_str(), Some("http" | "https"))
                        && u.authority().is_some_and(|a| !a.as_str().contains('@'))
                })
                .ok_or_else(|| {
                    Failure::new(
                        Exit::Usage,
                        "--api is not an http:// or https:// URL (http://host:port/, no \
                         credentials in it: the admin key is given apart)",
                    )
                })?;
            return Ok(Self::Api {
                base,
                key_from_stdin: args.admin_key_stdin,
            });
        }
        Err(Failure::new(
            Exit::Usage,
            "give a target: --file, --redis or --postgres with --namespace, or --api",
        ))
    }

    /// What the target is, for messages: a path or a namespace, never a URL.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::File(path) => format!("key file {}", path.display()),
            Self::Fleet(fleet) => fleet.describe(),
            Self::Api { .. } => "the key-management API".to_owned(),
        }
    }

    /// A usage failure for an operation this target cannot do.
    pub(crate) fn cannot(&self, what: &str) -> Failure {
        Failure::new(
            Exit::Usage,
            format!(
                "{what} needs --file, --redis or --postgres: the key-management API neither \
                 shows nor takes digests"
            ),
        )
    }

    /// Every key the target holds, digests included. A key file or namespace that
    /// does not exist is [`Exit::StoreMissing`].
    pub(crate) async fn read(&self, max: u64) -> Result<Current, Failure> {
        match self {
            Self::File(path) => {
                if std::fs::symlink_metadata(path)
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
                {
                    return Err(Failure::new(
                        Exit::StoreMissing,
                        format!(
                            "{} does not exist (`import` or `restore` creates it)",
                            self.describe()
                        ),
                    ));
                }
                let set = FileSource::new(path)
                    .with_max_size(max)
                    .load()
                    .map_err(|e| Failure::new(Exit::Unavailable, chain(&e)))?;
                Ok(Current::Set(set))
            }
            Self::Fleet(fleet) => fleet
                .list()
                .await
                .map(Current::List)
                .map_err(|e| Self::backend_failure(&e)),
            Self::Api { .. } => Err(self.cannot("reading every key with its digest")),
        }
    }

    /// A backend error as a failure.
    pub(crate) fn backend_failure(e: &BackendError) -> Failure {
        let exit = match e {
            BackendError::NotFound => Exit::NotFound,
            BackendError::Conflict(_) | BackendError::PreconditionFailed => Exit::Conflict,
            // A stored record that does not check is the store's data, not the
            // engine out of reach: a retry would meet it again.
            BackendError::Invalid(_) | BackendError::Corrupt { .. } => Exit::Invalid,
            BackendError::OutcomeUnknown(_) => Exit::OutcomeUnknown,
            BackendError::StoreMissing(_) => Exit::StoreMissing,
            _ => Exit::Unavailable,
        };
        let hint = match e {
            BackendError::StoreMissing(_) => {
                " (`restore` brings it back from a snapshot or export)"
            }
            _ => "",
        };
        Failure::new(exit, format!("{}{hint}", chain(e)))
    }

    /// The key-management API over this target: in this process for a file or a
    /// fleet's namespace, authenticated by an operator key held only in memory, that holds the
    /// scope `admin` and every scope in `scopes` and the target's keys; or the
    /// running API over HTTP.
    pub(crate) async fn admin(&self, max: u64, scopes: &[String]) -> Result<Admin, Failure> {
        match self {
            Self::File(path) => {
                let source = FileSource::new(path)
                    .with_max_size(max)
                    .with_poll_interval(Duration::from_secs(3600));
                let backend = FileBackend::new(path);
                let path = path.clone();
                let describe = self.describe();
                tokio::task::spawn_blocking(move || {
                    let store = KeyStore::new();
                    if std::fs::symlink_metadata(&path)
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
                    {
                        return Err(Failure::new(
                            Exit::StoreMissing,
                            format!("{describe} does not exist (`import` or `restore` creates it)"),
                        ));
                    }
                    store
                        .add_source(source)
                        .map_err(|e| Failure::new(Exit::Unavailable, chain(&e)))?;
                    Ok(store)
                })
                .await
                .map_err(|_| Failure::new(Exit::Unavailable, "the key file could not be read"))?
                .and_then(|store| Admin::local(store, backend, scopes))
            }
            Self::Fleet(fleet) => fleet.admin(scopes).await,
            Self::Api {
                base,
                key_from_stdin,
            } => {
                let key = if *key_from_stdin {
                    super::read_secret_stdin("the admin key")?
                } else {
                    match std::env::var(ADMIN_KEY_VAR) {
                        Ok(key) if !key.is_empty() => Zeroizing::new(key),
                        _ => {
                            return Err(Failure::new(
                                Exit::Usage,
                                format!(
                                    "--api needs the admin key: set {ADMIN_KEY_VAR}, or pass \
                                     --admin-key-stdin and write it to standard input"
                                ),
                            ));
                        }
                    }
                };
                let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
                http.set_connect_timeout(Some(TIMEOUT));
                http.enforce_http(false);
                // rustls with its `ring` provider, the one this crate builds (no C
                // toolchain for aws-lc-rs), and the system's roots.
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
                    .map_err(|_| {
                        Failure::new(
                            Exit::Unavailable,
                            "no TLS root certificates found on this system",
                        )
                    })?
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http);
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build(https);
                Ok(Admin::Remote {
                    client: Box::new(client),
                    base: base.clone(),
                    key,
                })
            }
        }
    }
}

/// The keys a target holds: a key file's set (which has an index by id), or a
/// store's records as they are (which may break a rule of a key set, and must still
/// be shown).
pub(crate) enum Current {
    Set(KeySet),
    List(Vec<ApiKey>),
}

impl Current {
    pub(crate) fn iter(&self) -> Box<dyn ExactSizeIterator<Item = &ApiKey> + '_> {
        match self {
            Self::Set(set) => Box::new(set.iter()),
            Self::List(keys) => Box::new(keys.iter()),
        }
    }
}

/// The key-management API, reached in process or over HTTP.
pub(crate) enum Admin {
    /// The crate's own router over a backend, in this process.
    Local {
        router: axum::Router,
        operator: Zeroizing<String>,
        /// Kept alive while the router serves: the store and the operator's source.
        _store: KeyStore,
        _publisher: crate::KeyPublisher,
    },
    /// A running API.
    Remote {
        client: Box<HttpClient>,
        base: http::Uri,
        key: Zeroizing<String>,
    },
}

/// An answer of the API.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) etag: Option<String>,
    pub(crate) body: serde_json::Value,
}

/// An answer's JSON body: `null` when empty, or when a refusal's body is not JSON (a
/// proxy's error page: its status says enough). A success whose body cannot be read
/// is a failure, never taken for an empty answer; after a write, one whose outcome
/// is unknown.
fn json_of(status: StatusCode, body: &[u8], writes: bool) -> Result<serde_json::Value, Failure> {
    if body.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    match serde_json::from_slice(body) {
        Ok(value) => Ok(value),
        Err(_) if !status.is_success() => Ok(serde_json::Value::Null),
        Err(_) if writes => Err(Failure::new(
            Exit::OutcomeUnknown,
            format!(
                "the key-management API answered {status} with a body that is not JSON: the \
                 change may have happened; read the key before retrying"
            ),
        )),
        Err(_) => Err(Failure::new(
            Exit::Unavailable,
            format!(
                "the key-management API answered {status} with a body that is not JSON: is the \
                 URL the API's?"
            ),
        )),
    }
}

/// The largest answer read from the API.
const MAX_REPLY: usize = 64 << 20;

impl Admin {
    fn local<B: AdminBackend>(
        store: KeyStore,
        backend: B,
        scopes: &[String],
    ) -> Result<Self, Failure> {
        let generated =
            crate::generate("cli").map_err(|e| Failure::new(Exit::Unavailable, e.to_string()))?;
        let mut all: Vec<String> = vec!["admin".to_owned()];
        all.extend(scopes.iter().cloned());
        for key in store.keys() {
            all.extend(key.scopes().map(str::to_owned));
        }
        all.sort();
        all.dedup();
        let operator = ApiKey::new(operator_id(), generated.secret()).with_scopes(all);
        let set = KeySet::from_keys([operator])
            .map_err(|e| Failure::new(Exit::Unavailable, e.to_string()))?;
        let (source, publisher) = ChannelSource::new(set);
        store
            .add_source(source.with_name("cli-operator"))
            .map_err(|e| {
                Failure::new(Exit::Conflict, format!("the operator key: {}", chain(&e)))
            })?;
        let router = AdminApi::new(store.clone(), backend)
            .with_apply_timeout(Duration::from_secs(10))
            .router();
        Ok(Self::Local {
            router,
            operator: Zeroizing::new(generated.secret().to_owned()),
            _store: store,
            _publisher: publisher,
        })
    }

    /// Sends one request: `path` under `/v1/`, a JSON body, an `If-Match`.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        if_match: Option<&str>,
        content_type: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply, Failure> {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        // Anything but a read may have changed the keys when its answer is lost.
        let writes = !matches!(method, Method::GET | Method::HEAD);
        match self {
            Self::Local {
                router, operator, ..
            } => {
                let mut request = http::Request::builder()
                    .method(method)
                    .uri(path)
                    .header(header::CONTENT_TYPE, content_type);
                if let Some(tag) = if_match {
                    request = request.header(header::IF_MATCH, tag);
                }
                let mut auth = HeaderValue::try_from(format!("Bearer {}", operator.as_str()))
                    .map_err(|_| {
                        Failure::new(Exit::Unavailable, "the operator key is not a header")
                    })?;
                auth.set_sensitive(true);
                let request = request
                    .header(header::AUTHORIZATION, auth)
                    .body(axum::body::Body::from(bytes.unwrap_or_default()))
                    .map_err(|_| {
                        Failure::new(Exit::Usage, "the request cannot be built (a bad key id?)")
                    })?;
                let mut service = router.clone();
                let response = tower_service::Service::call(&mut service, request)
                    .await
                    .map_err(|_| Failure::new(Exit::Unavailable, "the API failed"))?;
                let status = response.status();
                let etag = etag_of(response.headers());
                let body = axum::body::to_bytes(response.into_body(), MAX_REPLY)
                    .await
                    .map_err(|_| {
                        Failure::new(Exit::Unavailable, "the API's answer could not be read")
                    })?;
                Ok(Reply {
                    status,
                    etag,
                    body: json_of(status, &body, writes)?,
                })
            }
            Self::Remote { client, base, key } => {
                let mut request = http::Request::builder()
                    .method(method)
                    .uri(join(base, path)?)
                    .header(header::CONTENT_TYPE, content_type);
                if let Some(tag) = if_match {
                    request = request.header(header::IF_MATCH, tag);
                }
                let mut auth =
                    HeaderValue::try_from(format!("Bearer {}", key.as_str())).map_err(|_| {
                        Failure::new(Exit::Usage, "the admin key is not valid in a header")
                    })?;
                auth.set_sensitive(true);
                let request = request
                    .header(header::AUTHORIZATION, auth)
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        bytes.unwrap_or_default(),
                    )))
                    .map_err(|_| {
                        Failure::new(Exit::Usage, "the request cannot be built (a bad key id?)")
                    })?;
                let limit = API_TIMEOUT
                    .get()
                    .copied()
                    .unwrap_or(Duration::from_secs(30));
                let exchange = async {
                    let response = client
                        .request(request)
                        .await
                        .map_err(|e| http_failure(e.is_connect(), writes))?;
                    let status = response.status();
                    let etag = etag_of(response.headers());
                    let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(
                        response.into_body(),
                        MAX_REPLY,
                    ))
                    .await
                    .map_err(|_| http_failure(false, writes))?
                    .to_bytes();
                    Ok(Reply {
                        status,
                        etag,
                        body: json_of(status, &body, writes)?,
                    })
                };
                match tokio::time::timeout(limit, exchange).await {
                    Ok(reply) => reply,
                    Err(_) if writes => Err(Failure::new(
                        Exit::OutcomeUnknown,
                        "the key-management API did not answer in time: the change may or may \
                         not have happened; read the key before retrying",
                    )),
                    Err(_) => Err(Failure::new(
                        Exit::Unavailable,
                        "the key-management API did not answer in time",
                    )),
                }
            }
        }
    }
}

fn etag_of(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `path` (from `/v1/…`) under the API's base URL, which may have a path of its own.
fn join(base: &http::Uri, path: &str) -> Result<http::Uri, Failure> {
    let prefix = base.path().trim_end_matches('/');
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map_or("", |a| a.as_str());
    http::Uri::try_from(format!("{scheme}://{authority}{prefix}{path}"))
        .map_err(|_| Failure::new(Exit::Usage, "the request's URL cannot be built"))
}

/// The client of a running API.
type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// An HTTP failure, said without the URL (it may hold a password).
fn http_failure(connect: bool, writes: bool) -> Failure {
    let (exit, said) = if connect {
        (
            Exit::Unavailable,
            "cannot connect to the key-management API",
        )
    } else if writes {
        (
            Exit::OutcomeUnknown,
            "the connection to the key-management API was lost: the change may or may not \
             have happened; read the key before retrying",
        )
    } else {
        (
            Exit::Unavailable,
            "the connection to the key-management API was lost",
        )
    };
    Failure::new(exit, said)
}

/// The operator key's id: `cli:` and the user's name (letters, digits, `.`, `_`,
/// `-`), as the audit names the caller.
fn operator_id() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default();
    let user: String = user
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if user.is_empty() {
        "cli:operator".to_owned()
    } else {
        format!("cli:{user}")
    }
}

/// A problem document (RFC 9457) or an unexpected status as a failure.
pub(crate) fn problem(reply: &Reply) -> Failure {
    let kind = reply
        .body
        .get("type")
        .and_then(|t| t.as_str())
        .and_then(|t| t.strip_prefix("urn:tower-api-key:problem:"))
        .unwrap_or("");
    let exit = match reply.status.as_u16() {
        400 | 413 | 415 | 422 => Exit::Invalid,
        500 if kind == "corrupt-record" => Exit::Invalid,
        401 | 403 => Exit::Denied,
        404 => Exit::NotFound,
        409 | 412 | 428 => Exit::Conflict,
        503 if kind == "store-missing" => Exit::StoreMissing,
        504 => Exit::OutcomeUnknown,
        _ => Exit::Unavailable,
    };
    let title = reply.body.get("title").and_then(|t| t.as_str());
    let detail = reply.body.get("detail").and_then(|t| t.as_str());
    let message = match (title, detail) {
        (Some(t), Some(d)) => format!("{t}: {d}"),
        (Some(t), None) => t.to_owned(),
        (None, Some(d)) => d.to_owned(),
        (None, None) => format!("the key-management API answered {}", reply.status),
    };
    let hint = if exit == Exit::StoreMissing {
        " (`restore` brings it back from a snapshot or export)"
    } else {
        ""
    };
    Failure::new(exit, format!("{message}{hint}"))
}
