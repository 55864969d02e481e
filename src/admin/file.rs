//! The key-file backend: changes written into the same TOML file a
//! [`FileSource`](crate::FileSource) watches, comments and untouched entries kept.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table};

use super::{AdminBackend, BackendError, record_etag};
use crate::{
    ApiKey, FileSource, KeySet, KeySource as _,
    source::{
        key_file::write,
        read::{DEFAULT_MAX_SIZE, FileBytes},
    },
};

/// An [`AdminBackend`] over a TOML key file: each change is a read-modify-write of
/// the file's current content under one lock, edited with `toml_edit` so that
/// comments, order and every entry the change does not touch stay byte for byte,
/// then written to a temporary file, synced, renamed over the key file and the
/// directory synced: a crash at any point leaves the old file or the new one.
///
/// Operators can keep editing the same file by hand: a change made by the API never
/// overwrites a hand edit saved before it. (An editor holding a stale buffer can
/// still overwrite the API's changes when it saves: reload the file first.) A file
/// that does not parse is left alone, and the call fails saying why.
///
/// New keys are written as `sha256` entries: the file never holds a secret the API
/// made.
///
/// Give it the path the store's [`FileSource`] watches, written the same way.
#[derive(Clone)]
pub struct FileBackend {
    path: PathBuf,
    lock: Arc<Mutex<()>>,
}

impl FileBackend {
    /// A backend over the key file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            lock: Arc::new(Mutex::new(())),
        }
    }

    /// Reads and checks the current file, lets `edit` change it, checks the result as
    /// the file source will, and writes it atomically. All under the lock, off the
    /// async runtime's threads.
    async fn change<T: Send + 'static>(
        &self,
        edit: impl FnOnce(&KeySet, &mut DocumentMut) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let (path, lock) = (self.path.clone(), self.lock.clone());
        let task = tokio::task::spawn_blocking(move || {
            let _held = lock.lock().unwrap_or_else(PoisonError::into_inner);
            let (set, mut doc) = read(&path)?;
            let out = edit(&set, &mut doc)?;
            let text = doc.to_string();
            // What the file source will make of it: a change it would refuse is
            // never written.
            FileSource::parse(&path, text.as_bytes()).map_err(BackendError::Invalid)?;
            write::replace(&path, text.as_bytes()).map_err(unavailable)?;
            Ok(out)
        });
        task.await.map_err(unavailable)?
    }

    async fn read_set(&self) -> Result<KeySet, BackendError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || read(&path).map(|(set, _)| set))
            .await
            .map_err(unavailable)?
    }
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> BackendError {
    BackendError::Unavailable(Box::new(e))
}

/// The file's keys and its editable document; the file must parse as a key file.
fn read(path: &Path) -> Result<(KeySet, DocumentMut), BackendError> {
    let bytes = FileBytes::read(path, DEFAULT_MAX_SIZE)
        .map_err(|e| BackendError::Unavailable(Box::new(crate::Error::io(path, e))))?;
    let set = FileSource::parse(path, &bytes).map_err(|e| {
        BackendError::Unavailable(
            format!(
                "the key file does not parse, so it is left alone: {}",
                crate::error::Chain(&e)
            )
            .into(),
        )
    })?;
    let text = std::str::from_utf8(&bytes).map_err(unavailable)?;
    let doc: DocumentMut = text
        .parse()
        .map_err(|_| BackendError::Unavailable("the key file cannot be edited as TOML".into()))?;
    Ok((set, doc))
}

/// The document's `[[keys]]` tables; a file holding `keys = []` (or nothing) gets an
/// empty array of tables.
fn keys_mut(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables, BackendError> {
    let empty = match doc.get("keys") {
        None => true,
        Some(item) => item.as_array().is_some_and(|a| a.is_empty()),
    };
    if empty {
        doc.insert("keys", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    doc.get_mut("keys")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or_else(|| {
            BackendError::Unavailable(
                "the key file writes `keys` inline; use [[keys]] tables".into(),
            )
        })
}

fn position(keys: &ArrayOfTables, id: &str) -> Option<usize> {
    keys.iter()
        .position(|t| t.get("id").and_then(Item::as_str) == Some(id))
}

/// Writes `key`'s fields into `table`, as the key file's writer renders them,
/// keeping the table's decor and the order of the fields it already has; fields `key`
/// lacks are removed. The key is a digest, unless the table holds a secret written by
/// hand that is still the key's.
fn write_fields(table: &mut Table, key: &ApiKey) {
    let keeps_secret = secret_matches(table, key);
    if !keeps_secret {
        table.remove("secret");
    }
    for (name, text) in write::fields(key) {
        let text = text.filter(|_| !(name == "sha256" && keeps_secret));
        put(
            table,
            name,
            text.and_then(|t| t.parse::<toml_edit::Value>().ok()),
        );
    }
}

/// Sets field `name` to `item`, or removes it for `None`. An unchanged value keeps
/// its formatting and its comments.
fn put(table: &mut Table, name: &str, new: Option<toml_edit::Value>) {
    let Some(mut new) = new else {
        table.remove(name);
        return;
    };
    match table.get_mut(name).and_then(Item::as_value_mut) {
        Some(old) if bare(old) == bare(&new) => {}
        // A changed value keeps the old one's surroundings (an inline comment).
        Some(old) => {
            *new.decor_mut() = old.decor().clone();
            *old = new;
        }
        None => {
            table.insert(name, Item::Value(new));
        }
    }
}

/// A value as written, without the spaces and comments around it.
fn bare(v: &toml_edit::Value) -> String {
    let mut v = v.clone();
    v.decor_mut().clear();
    v.to_string()
}

/// Whether the table's `secret` is still `key`'s.
fn secret_matches(table: &Table, key: &ApiKey) -> bool {
    table
        .get("secret")
        .and_then(Item::as_str)
        .is_some_and(|s| crate::key::digest::KeyDigest::of(s.as_bytes()) == key.digest)
}

fn new_table(key: &ApiKey) -> Table {
    let mut table = Table::new();
    write_fields(&mut table, key);
    table
}

/// Checks `if_match` against the current record with this id.
fn check(set: &KeySet, id: &str, if_match: Option<&str>) -> Result<(), BackendError> {
    let current = set.get(id).ok_or(BackendError::NotFound)?;
    match if_match {
        Some(tag) if tag != record_etag(current) => Err(BackendError::PreconditionFailed),
        _ => Ok(()),
    }
}

impl AdminBackend for FileBackend {
    fn source_name(&self) -> String {
        FileSource::new(&self.path).name()
    }

    async fn list(&self) -> Result<Vec<ApiKey>, BackendError> {
        Ok(self.read_set().await?.iter().cloned().collect())
    }

    async fn get(&self, id: &str) -> Result<Option<ApiKey>, BackendError> {
        Ok(self.read_set().await?.get(id).cloned())
    }

    async fn create(&self, key: ApiKey) -> Result<(), BackendError> {
        self.change(move |set, doc| {
            if set.get(key.id()).is_some() {
                return Err(BackendError::Conflict(key.id().to_owned()));
            }
            keys_mut(doc)?.push(new_table(&key));
            Ok(())
        })
        .await
    }

    async fn update(&self, key: ApiKey, if_match: Option<&str>) -> Result<(), BackendError> {
        let if_match = if_match.map(str::to_owned);
        self.change(move |set, doc| {
            check(set, key.id(), if_match.as_deref())?;
            let keys = keys_mut(doc)?;
            let at = position(keys, key.id()).ok_or(BackendError::NotFound)?;
            if let Some(table) = keys.get_mut(at) {
                write_fields(table, &key);
            }
            Ok(())
        })
        .await
    }

    async fn delete(&self, id: &str, if_match: Option<&str>) -> Result<(), BackendError> {
        let (id, if_match) = (id.to_owned(), if_match.map(str::to_owned));
        self.change(move |set, doc| {
            check(set, &id, if_match.as_deref())?;
            let keys = keys_mut(doc)?;
            let at = position(keys, &id).ok_or(BackendError::NotFound)?;
            keys.remove(at);
            Ok(())
        })
        .await
    }

    async fn rotate(
        &self,
        successor: ApiKey,
        old: ApiKey,
        if_match: Option<&str>,
    ) -> Result<(), BackendError> {
        let if_match = if_match.map(str::to_owned);
        self.change(move |set, doc| {
            check(set, old.id(), if_match.as_deref())?;
            if set.get(successor.id()).is_some() {
                return Err(BackendError::Conflict(successor.id().to_owned()));
            }
            let keys = keys_mut(doc)?;
            let at = position(keys, old.id()).ok_or(BackendError::NotFound)?;
            if let Some(table) = keys.get_mut(at) {
                write_fields(table, &old);
            }
            keys.push(new_table(&successor));
            Ok(())
        })
        .await
    }
}

impl std::fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBackend")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}
