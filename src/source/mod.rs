//! Where keys come from.

mod channel;
mod env;
#[cfg(feature = "file")]
mod file;
pub(crate) mod key_file;
#[cfg(feature = "file")]
pub(crate) mod link;
pub(crate) mod read;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) mod replica;
#[cfg(feature = "file")]
mod watch;
#[cfg(feature = "admin")]
pub(crate) mod writers;

pub use channel::{ChannelSource, KeyPublisher};
pub use env::EnvSource;
#[cfg(feature = "file")]
pub use file::FileSource;

use crate::{ApiKey, Error, KeySet, KeyUpdater};

/// A supplier of complete key sets: initially, and then whenever they change.
///
/// Implement it to feed keys from your own backend (Vault, a database, a control
/// plane). The store calls [`load`](KeySource::load) once, synchronously, when the
/// source is added, then hands the source a [`KeyUpdater`] through
/// [`watch`](KeySource::watch), through which it publishes every later set.
///
/// A source publishes a complete set with [`KeyUpdater::publish`] (the store works
/// out what changed), or changes by id with [`KeyUpdater::apply`]; either way the
/// store checks the update whole, swaps it in atomically, and keeps the entries and
/// usage counters of the keys it does not change.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_api_key::{ApiKey, ApiKeyLayer, Error, KeySet, KeySource, KeyUpdater};
///
/// /// Polls a (pretend) database every minute.
/// struct DbSource;
///
/// fn fetch_keys() -> Result<KeySet, Error> {
///     KeySet::from_keys([ApiKey::new("db-key", "from-the-database")])
/// }
///
/// impl KeySource for DbSource {
///     fn name(&self) -> String {
///         "database".into()
///     }
///
///     fn load(&mut self) -> Result<KeySet, Error> {
///         fetch_keys()
///     }
///
///     fn watch(self: Box<Self>, updater: KeyUpdater) {
///         std::thread::spawn(move || {
///             while !updater.is_closed() {
///                 std::thread::sleep(Duration::from_secs(60));
///                 match fetch_keys() {
///                     Ok(set) => { let _ = updater.publish(set); }
///                     Err(error) => { updater.reject(error); }
///                 }
///             }
///         });
///     }
/// }
///
/// let layer = ApiKeyLayer::new(DbSource);
/// assert_eq!(layer.store().get("db-key").unwrap().source(), "database");
/// ```
///
/// # A source that needs async I/O
///
/// A database client or an HTTP call is async; the trait is not, and need not be.
/// Start with nothing (the store fails closed), and let [`watch`](KeySource::watch)
/// spawn a task that fetches and publishes; wait for its first set with
/// [`KeyStore::subscribe`](crate::KeyStore::subscribe) before serving, if you like:
///
/// ```
/// use std::time::Duration;
/// use tower_api_key::{ApiKey, Error, KeySet, KeySource, KeyStore, KeyUpdater};
///
/// /// Stands for an async client: `async fn keys(&self) -> Result<Vec<(String, String)>, E>`.
/// struct Db;
///
/// impl Db {
///     async fn keys(&self) -> Result<Vec<(String, String)>, std::io::Error> {
///         tokio::time::sleep(Duration::from_millis(5)).await;
///         Ok(vec![("db-key".into(), "from-the-database".into())])
///     }
/// }
///
/// struct DbSource(Db);
///
/// impl KeySource for DbSource {
///     fn name(&self) -> String {
///         "database".into()
///     }
///
///     fn load(&mut self) -> Result<KeySet, Error> {
///         Ok(KeySet::new()) // the first fetch happens in `watch`
///     }
///
///     fn watch(self: Box<Self>, updater: KeyUpdater) {
///         tokio::spawn(async move {
///             while !updater.is_closed() {
///                 match self.0.keys().await {
///                     Ok(rows) => {
///                         let keys = rows.iter().map(|(id, secret)| ApiKey::new(&**id, secret));
///                         match KeySet::from_keys(keys) {
///                             Ok(set) => drop(updater.publish(set)),
///                             Err(error) => drop(updater.reject(error)),
///                         }
///                     }
///                     Err(error) => drop(updater.reject(Error::custom("database", error))),
///                 }
///                 tokio::time::sleep(Duration::from_secs(30)).await;
///             }
///         });
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
/// let store = KeyStore::new();
/// store.add_source(DbSource(Db))?; // from inside the runtime: `watch` spawns a task
/// let mut reloads = store.subscribe();
/// reloads.next().await;            // the first fetch is in
/// assert_eq!(store.get("db-key").unwrap().source(), "database");
/// # Ok(()) }
/// ```
pub trait KeySource: Send + 'static {
    /// A short name for logs, reload reports and [`KeyInfo::source`](crate::KeyInfo::source).
    fn name(&self) -> String;

    /// Loads the current complete key set. Called once, when the source is added to a
    /// store; blocking here delays the layer's construction, by design, so the first
    /// request sees the keys.
    ///
    /// # Errors
    ///
    /// Whatever keeps the source from producing a valid set; the store then refuses
    /// every request until a later [`KeyUpdater::publish`].
    fn load(&mut self) -> Result<KeySet, Error>;

    /// Keeps the store up to date: publish each new complete set through `updater`, and
    /// report failed attempts with [`KeyUpdater::reject`]. Stop once
    /// [`KeyUpdater::is_closed`] (the store is gone).
    ///
    /// Called right after [`load`](KeySource::load), even if it failed, so a source can
    /// recover. The default does nothing: a static source.
    fn watch(self: Box<Self>, updater: KeyUpdater) {
        let _ = updater;
    }

    /// Whether the limits of this source's keys are shared by a fleet of replicas, so
    /// that each replica spends only shares of them that the source leases in the
    /// background (as the `redis` feature's `RedisSource` does). A key of
    /// such a source is refused by a limit until the source gives it a share.
    /// The default, `false`: each replica enforces its keys' limits by itself.
    fn fleet_limits(&self) -> bool {
        false
    }
}

/// A fixed set of keys.
impl KeySource for KeySet {
    fn name(&self) -> String {
        "static".into()
    }

    fn load(&mut self) -> Result<KeySet, Error> {
        Ok(self.clone())
    }
}

/// A fixed list of keys, validated as a [`KeySet`] when loaded.
impl KeySource for Vec<ApiKey> {
    fn name(&self) -> String {
        "static".into()
    }

    fn load(&mut self) -> Result<KeySet, Error> {
        KeySet::from_keys(self.iter().cloned())
    }
}
