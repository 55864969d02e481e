//! A fleet on PostgreSQL (feature `postgres`): every replica follows one namespace of
//! keys in the database most teams already run, which the key-management API of any
//! replica writes.
//!
//! - [`PostgresSource`] is each replica's [`KeySource`](crate::KeySource): it loads
//!   the namespace, then reads the change table from the last version it applied, on
//!   every `NOTIFY`, on every reconnection and on a safety poll, and reads the
//!   namespace whole again on anything the change table cannot explain. It keeps
//!   serving its last good keys while PostgreSQL is down or the namespace is missing.
//! - [`PostgresBackend`] is the [`AdminBackend`](crate::admin::AdminBackend) that
//!   writes the namespace, one transaction per call; it creates a namespace, or
//!   restores a wiped one, only when told to ([`PostgresBackend::import_file`],
//!   [`PostgresBackend::restore_file`]), and the schema only in
//!   [`PostgresBackend::migrate`].
//!
//! # What is stored
//!
//! Five tables, shared by every namespace (the SQL is in `src/postgres/schema.sql`):
//!
//! | table | one row per | holds |
//! |---|---|---|
//! | `tak_namespaces` | namespace | `epoch` (its identity, new at each explicit re-creation), `version` (one more at every change), `keys` (how many records it has) |
//! | `tak_keys` | key | `namespace`, `id`, `record` (`jsonb`: `id`, `sha256`, `scopes`, `tenant`, `owner`, `description`, `not_before`, `expires_at`, `created_at`, `disabled`, `created_by`, `rotated_from`; never a secret) |
//! | `tak_changes` | key changed by a version | `namespace`, `version`, `seq` and `n` (its place in the version, and the version's size), `epoch`, `op` (`put`, `del`, `reset`), `id`, `record` |
//! | `tak_usage` | key used | the fleet's `requests` and `last_used` (Unix seconds) |
//! | `tak_writes` | write, for an hour | `done` or `fenced`: how a write whose answer was lost is settled |
//!
//! A change is one transaction: it locks the namespace's row (so writers of one
//! namespace take turns and versions commit in order), writes the records, bumps the
//! version, writes one change row per key, prunes changes older than
//! 1,000 versions, and sends `NOTIFY tak_changes`
//! with the namespace's name: a wake-up, which carries nothing a replica needs. A
//! replica reads, in one snapshot, the namespace's row and the changes after its
//! version; it applies them when they are every version from its own to the row's,
//! each whole, of its epoch. Anything else (changes pruned or the table truncated, a
//! new epoch, a version that went back) makes it read the namespace whole, and a
//! whole read whose record count differs from the row's (the keys table emptied or
//! cut by hand) is refused: the replica keeps its keys and says why.
//!
//! # When the database is wiped
//!
//! A namespace without its row in `tak_namespaces`, whose tables are gone, or whose
//! row counts keys over a keys table that holds none of them (`TRUNCATE`), is
//! **not** "zero keys": replicas keep their last good keys and say so (a `warn`, and
//! [`KeyStore::last_reload`](crate::KeyStore::last_reload)); the API refuses writes
//! and lists ([`BackendError::StoreMissing`], HTTP 503 `store-missing`), and so does
//! [`PostgresBackend::import_file`] over an emptied table; an operator restores it
//! with [`PostgresBackend::restore_file`] (a replica's snapshot, or an export), or,
//! for a namespace without its row, [`PostgresBackend::import_file`].
//!
//! A record a replica cannot read (not a key record, or one naming another id than
//! the one it is stored under) is that one key refused, logged at `error` with its
//! id; the API answers `corrupt-record` for it, and can delete it.
//!
//! # URLs and TLS
//!
//! `postgres://user:password@host:port/database?sslmode=...`, or the key-value form
//! (`host=... user=... password=...`). `sslmode=disable` speaks plain TCP;
//! `prefer` (the default) uses TLS when the server offers it; `require`,
//! `verify-ca` and `verify-full` insist on it. With TLS the server's certificate is
//! always verified, with rustls (ring), against the Web PKI roots or the CA file
//! named by `sslrootcert=<path>`. A URL is never printed: it may hold a password.
//!
//! [`BackendError::StoreMissing`]: crate::admin::BackendError::StoreMissing

mod backend;
mod follow;
mod model;
mod plan;
mod read;
mod source;
mod tls;
mod write;

pub use self::{backend::PostgresBackend, source::PostgresSource};

use crate::Error;

/// A connection's settings, checked, and how it is secured.
#[derive(Clone)]
pub(crate) struct Target {
    config: tokio_postgres::Config,
    tls: tls::Mode,
    /// `host:port`, for logs and Debug: never the URL, which may hold a password.
    server: String,
    /// Whether the URL named an `application_name` (else each role names its own).
    named: bool,
}

/// Who a connection is for, as its `application_name` says (unless the URL names
/// one): an operator can tell the replicas' listening connections from the API's.
#[derive(Clone, Copy)]
pub(crate) enum Role {
    Replica,
    Api,
}

impl Target {
    /// Parses `url` and checks `namespace`; what is wrong is said without repeating
    /// the URL.
    pub(crate) fn parse(url: &str, namespace: &str) -> Result<Self, Error> {
        if namespace.is_empty() || namespace.len() > 200 || namespace.contains('\0') {
            return Err(Error::custom(
                "postgres",
                "the namespace must be non-empty, at most 200 bytes, without NUL",
            ));
        }
        let name = format!("postgres:{namespace}");
        let (url, tls) = tls::Mode::split(url).map_err(|e| Error::custom(name.clone(), e))?;
        let config: tokio_postgres::Config = url.parse().map_err(|_| {
            Error::custom(
                name.clone(),
                "not a PostgreSQL URL (postgres://user:password@host:port/database, or \
                 host=... user=... key-value pairs)",
            )
        })?;
        let named = config.get_application_name().is_some();
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        Ok(Self {
            config,
            tls,
            server: format!("{host}:{port}"),
            named,
        })
    }

    /// Connects within `timeout`: the client, and the connection to drive.
    pub(crate) async fn connect(
        &self,
        timeout: std::time::Duration,
        role: Role,
    ) -> Result<(tokio_postgres::Client, Connection), PgError> {
        let mut config = self.config.clone();
        if !self.named {
            config.application_name(match role {
                Role::Replica => "tower-api-key-replica",
                Role::Api => "tower-api-key-api",
            });
        }
        config.connect_timeout(timeout);
        config.keepalives_idle(std::time::Duration::from_secs(30));
        let connector = self.tls.connector();
        within(timeout, config.connect(connector)).await
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }
}

/// A connection to drive (on a task of its own).
pub(crate) type Connection =
    tokio_postgres::Connection<tokio_postgres::Socket, tls::MaybeTlsStream>;

/// A failure to talk with PostgreSQL: its error, or no answer in time.
#[derive(Debug)]
pub(crate) enum PgError {
    Pg(tokio_postgres::Error),
    Timeout,
    /// The connection ended.
    Lost,
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e)
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(self))
    }
}

impl std::error::Error for PgError {}

/// `f`, given at most `d`.
pub(crate) async fn within<T, E: Into<PgError>>(
    d: std::time::Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, PgError> {
    match tokio::time::timeout(d, f).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(PgError::Timeout),
    }
}

/// What went wrong with PostgreSQL, for callers and reports: the kind of failure
/// and its SQLSTATE, never the server's own text, which can quote what a statement
/// carried. (The whole error is logged at `debug`.)
pub(crate) fn describe(e: &PgError) -> String {
    use tokio_postgres::error::SqlState;
    let e = match e {
        PgError::Timeout => return "PostgreSQL did not answer in time".to_owned(),
        PgError::Lost => return "the connection to PostgreSQL was lost".to_owned(),
        PgError::Pg(e) => e,
    };
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        return if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            "PostgreSQL refused the credentials".to_owned()
        } else if *code == SqlState::LOCK_NOT_AVAILABLE || *code == SqlState::QUERY_CANCELED {
            format!(
                "PostgreSQL did not finish in time (SQLSTATE {}: the namespace is locked by \
                 another transaction?)",
                code.code()
            )
        } else if *code == SqlState::UNDEFINED_TABLE {
            "the fleet's tables do not exist (run PostgresBackend::migrate)".to_owned()
        } else {
            format!("PostgreSQL refused the command (SQLSTATE {})", code.code())
        };
    }
    if e.is_closed() {
        return "the connection to PostgreSQL was lost".to_owned();
    }
    let text = e.to_string();
    if text.contains("timed out") || text.contains("timeout") {
        "PostgreSQL did not answer in time".to_owned()
    } else if text.contains("refused") {
        "PostgreSQL refused the connection (not running?)".to_owned()
    } else {
        "the connection to PostgreSQL failed".to_owned()
    }
}

/// Whether PostgreSQL answered (with an error), as opposed to not at all. A server
/// that says it is shutting down or not yet up (`57P01`–`57P03`, sent as it hangs
/// up) has not answered: the connection is gone either way, and a follower that
/// took the farewell for a refusal would report the outage twice, once as each.
pub(crate) fn answered(e: &PgError) -> bool {
    use tokio_postgres::error::SqlState;
    let going_away = |code: &SqlState| {
        [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ]
        .contains(code)
    };
    matches!(e, PgError::Pg(e) if e.as_db_error().is_some_and(|db| !going_away(db.code())))
}

/// Whether the fleet's tables are missing (never migrated, or dropped).
pub(crate) fn no_tables(e: &PgError) -> bool {
    matches!(e, PgError::Pg(e) if undefined_table(e))
}

pub(crate) fn undefined_table(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
}
