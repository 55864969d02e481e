//! The key file as text and keys, and a batch's changes to it: tables spliced as
//! text where the file allows, or edited as a TOML document.

use std::{collections::HashMap, path::Path, sync::Arc};

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table};

use super::{Failure, Op};
use crate::{
    ApiKey, FileSource, KeyChange, KeySet,
    admin::{BackendError, backend::Said, record_etag},
    key::digest::KeyDigest,
    source::{
        key_file::write,
        read::{Fingerprint, fingerprint},
    },
};

/// A parsed key file: its text, its keys by id, and where each key's table is.
pub(super) struct Base {
    pub(super) fingerprint: Fingerprint,
    pub(super) text: String,
    pub(super) keys: Keys,
    /// Each `[[keys]]` table's bytes (with the comments and blank lines before it),
    /// in file order, when the file can be edited as text: only `[[keys]]` tables,
    /// no multi-line strings. `None`: it is edited as a TOML document.
    pub(super) tables: Option<Vec<Span>>,
}

/// A file's keys by id, and which id each digest is under (a change must not give a
/// key a second id): the maps as parsed, shared from write to write, and the changes
/// made since, until there are enough of them to fold in.
#[derive(Clone)]
pub(super) struct Keys {
    pub(super) all: Arc<HashMap<Arc<str>, ApiKey>>,
    pub(super) digests: Arc<HashMap<KeyDigest, Arc<str>>>,
    /// Changed since `all` was made: the record now, `None` if removed.
    pub(super) delta: HashMap<Arc<str>, Option<ApiKey>>,
}

/// How many changes are kept aside before they are folded into the maps.
pub(super) const FOLD: usize = 512;

impl Keys {
    pub(super) fn of(set: &KeySet) -> Self {
        Self {
            all: Arc::new(set.iter().map(|k| (k.id.clone(), k.clone())).collect()),
            digests: Arc::new(set.iter().map(|k| (k.digest, k.id.clone())).collect()),
            delta: HashMap::new(),
        }
    }

    pub(super) fn get(&self, id: &str) -> Option<&ApiKey> {
        match self.delta.get(id) {
            Some(now) => now.as_ref(),
            None => self.all.get(id),
        }
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// The id the digest is under, if any.
    pub(super) fn owner(&self, digest: &KeyDigest) -> Option<&Arc<str>> {
        self.delta
            .iter()
            .find(|(_, k)| k.as_ref().is_some_and(|k| k.digest == *digest))
            .map(|(id, _)| id)
            .or_else(|| {
                self.digests
                    .get(digest)
                    .filter(|id| !self.delta.contains_key(*id))
            })
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &ApiKey> {
        self.all
            .values()
            .filter(|k| !self.delta.contains_key(&k.id))
            .chain(self.delta.values().flatten())
    }

    /// These keys with `changes` made.
    pub(super) fn with(&self, changes: &HashMap<Arc<str>, Option<ApiKey>>) -> Self {
        let mut next = self.clone();
        next.delta
            .extend(changes.iter().map(|(id, k)| (id.clone(), k.clone())));
        if next.delta.len() > FOLD {
            let (mut all, mut digests) = ((*next.all).clone(), (*next.digests).clone());
            for (id, key) in next.delta.drain() {
                if let Some(old) = all.remove(&id) {
                    digests.remove(&old.digest);
                }
                if let Some(key) = key {
                    digests.insert(key.digest, id.clone());
                    all.insert(id, key);
                }
            }
            next.all = Arc::new(all);
            next.digests = Arc::new(digests);
        }
        next
    }
}

/// Where a key's table is in the file.
#[derive(Clone)]
pub(super) struct Span {
    pub(super) id: Arc<str>,
    pub(super) start: usize,
    pub(super) end: usize,
}

/// A whole key file, checked as the file source reads it.
pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<Base, Failure> {
    let set = FileSource::parse(path, bytes).map_err(|e| {
        Failure::unavailable(
            "the key file does not parse, so it is left alone",
            crate::error::Chain(&e),
        )
    })?;
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Failure::unavailable("the key file does not parse, so it is left alone", e))?
        .to_owned();
    let tables = spans(&text, &set);
    Ok(Base {
        fingerprint: fingerprint(text.as_bytes()),
        text,
        keys: Keys::of(&set),
        tables,
    })
}

/// Where each key's `[[keys]]` table is in `text`, if the file can be edited as text:
/// nothing but comments, blank lines and `[[keys]]` tables, one per key of `set` in
/// order, and no multi-line string (whose lines could look like anything). A table
/// begins with the comments and blank lines just before its header (as a TOML
/// document attaches them) and ends where the next one begins.
pub(super) fn spans(text: &str, set: &KeySet) -> Option<Vec<Span>> {
    if text.contains("\"\"\"") || text.contains("'''") {
        return None;
    }
    let mut headers = Vec::new();
    // The start of the run of comment and blank lines the current line ends.
    let mut trivia: Option<usize> = Some(0);
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim();
        if bare.is_empty() || bare.starts_with('#') {
            trivia.get_or_insert(at);
        } else if is_header(bare) {
            headers.push(trivia.unwrap_or(at));
            trivia = None;
        } else if bare.starts_with('[') || headers.is_empty() {
            // Another table, or a value outside any table (`keys = []`).
            return None;
        } else {
            trivia = None;
        }
        at += line.len();
    }
    if headers.len() != set.len() {
        return None;
    }
    let ends = headers.iter().skip(1).copied().chain([text.len()]);
    Some(
        set.iter()
            .zip(headers.iter().copied().zip(ends))
            .map(|(key, (start, end))| Span {
                id: key.id.clone(),
                start,
                end,
            })
            .collect(),
    )
}

/// How many bytes at the start of a table's span (its leading comments and blank
/// lines, then its header) are not its own: everything up to the last blank line
/// before the header.
fn leading_trivia_to_keep(span: &str) -> usize {
    let mut at = 0;
    let mut keep = 0;
    for line in span.split_inclusive('\n') {
        let bare = line.trim();
        if is_header(bare) || !(bare.is_empty() || bare.starts_with('#')) {
            break;
        }
        at += line.len();
        if bare.is_empty() {
            keep = at;
        }
    }
    keep
}

/// Whether a trimmed line is a `[[keys]]` header (with an optional comment).
pub(super) fn is_header(bare: &str) -> bool {
    let Some(rest) = bare.strip_prefix("[[") else {
        return false;
    };
    let Some((name, after)) = rest.split_once("]]") else {
        return false;
    };
    name.trim() == "keys" && {
        let after = after.trim();
        after.is_empty() || after.starts_with('#')
    }
}

impl Base {
    /// The keys as a set (for a store that holds an older file).
    pub(super) fn set(&self) -> Result<KeySet, crate::Error> {
        let order: Vec<&ApiKey> = match &self.tables {
            Some(tables) => tables.iter().filter_map(|t| self.keys.get(&t.id)).collect(),
            None => self.keys.values().collect(),
        };
        KeySet::from_keys(order.into_iter().cloned())
    }
}

/// A batch's changes to one base file.
pub(super) struct Batch<'a> {
    pub(super) base: &'a Base,
    /// The ids changed so far, and each one's record now (`None`: removed).
    pub(super) changed: HashMap<Arc<str>, Option<ApiKey>>,
    /// Ids of new keys, in the order they were added.
    pub(super) added: Vec<Arc<str>>,
    /// The same ids, to look them up.
    new_ids: std::collections::HashSet<Arc<str>>,
    /// The digest of each key in `changed`, and its id: a batch of thousands of
    /// changes checks each against the others in one look, not a walk.
    digests: HashMap<KeyDigest, Arc<str>>,
    /// Secrets are checked once every op is in ([`Batch::unique_at_end`]), not op by
    /// op: an all-or-nothing write whose keys swap secrets holds each secret once in
    /// the end, though not after its first op.
    whole: bool,
}

impl<'a> Batch<'a> {
    /// A batch of independent ops (each op's secret checked as it comes) or, with
    /// `whole`, of one all-or-nothing write (secrets checked at the end).
    pub(super) fn new(base: &'a Base, whole: bool) -> Self {
        Self {
            base,
            changed: HashMap::new(),
            added: Vec::new(),
            new_ids: std::collections::HashSet::new(),
            digests: HashMap::new(),
            whole,
        }
    }

    /// The record with this id, as the batch has it so far.
    pub(super) fn get(&self, id: &str) -> Option<&ApiKey> {
        match self.changed.get(id) {
            Some(now) => now.as_ref(),
            None => self.base.keys.get(id),
        }
    }

    /// Checks `if_match` against the current record with this id.
    pub(super) fn check(&self, id: &str, if_match: Option<&str>) -> Result<&ApiKey, BackendError> {
        let current = self.get(id).ok_or(BackendError::NotFound)?;
        match if_match {
            Some(tag) if tag != record_etag(current) => Err(BackendError::PreconditionFailed),
            _ => Ok(current),
        }
    }

    /// Refuses `key` if its digest is another id's (for a batch of independent ops;
    /// a whole one is checked at its end).
    fn unique_now(&self, key: &ApiKey) -> Result<(), BackendError> {
        match self.whole {
            true => Ok(()),
            false => self.unique(key),
        }
    }

    /// For a whole batch, once every op is in: the index of the first op whose key
    /// shares its secret with another key of the result, and why.
    pub(super) fn unique_at_end(&self, ops: &[Op]) -> Option<(usize, BackendError)> {
        ops.iter().enumerate().find_map(|(at, op)| {
            let id = match op {
                Op::Create(key) | Op::Update(key, _) => key.id(),
                Op::Rotate { successor, .. } => successor.id(),
                Op::Delete(..) => return None,
            };
            // The key as the batch ends with it (a later op may have changed it).
            let key = self.changed.get(id)?.as_ref()?;
            self.unique(key).err().map(|e| (at, e))
        })
    }

    /// Refuses `key` if its digest is another id's.
    fn unique(&self, key: &ApiKey) -> Result<(), BackendError> {
        // Among the changed keys, and among the base's keys left as they were.
        let taken = self
            .digests
            .get(&key.digest)
            .is_some_and(|id| *id != key.id)
            || self
                .base
                .keys
                .owner(&key.digest)
                .is_some_and(|id| *id != key.id && !self.changed.contains_key(id));
        match taken {
            true => Err(BackendError::Invalid(crate::Error::invalid(
                Some(key.id()),
                "the same secret is another key's",
            ))),
            false => Ok(()),
        }
    }

    /// One op: checked whole, then applied.
    pub(super) fn apply(&mut self, op: &Op) -> Result<(), BackendError> {
        match op {
            Op::Create(key) => {
                if self.get(key.id()).is_some() {
                    return Err(BackendError::Conflict(key.id().to_owned()));
                }
                key.validate().map_err(BackendError::Invalid)?;
                self.unique_now(key)?;
                self.put(key.clone());
            }
            Op::Update(key, if_match) => {
                self.check(key.id(), if_match.as_deref())?;
                key.validate().map_err(BackendError::Invalid)?;
                self.unique_now(key)?;
                self.put(key.clone());
            }
            Op::Delete(id, if_match) => {
                self.check(id, if_match.as_deref())?;
                let id: Arc<str> = Arc::from(id.as_str());
                self.forget_digest(&id);
                self.changed.insert(id, None);
            }
            Op::Rotate {
                successor,
                old,
                if_match,
            } => {
                self.check(old.id(), if_match.as_deref())?;
                if self.get(successor.id()).is_some() {
                    return Err(BackendError::Conflict(successor.id().to_owned()));
                }
                successor.validate().map_err(BackendError::Invalid)?;
                old.validate().map_err(BackendError::Invalid)?;
                self.unique_now(successor)?;
                self.put(old.clone());
                self.put(successor.clone());
            }
        }
        Ok(())
    }

    pub(super) fn put(&mut self, key: ApiKey) {
        let id = key.id.clone();
        if !self.base.keys.contains(&id) && self.new_ids.insert(id.clone()) {
            self.added.push(id.clone());
        }
        self.forget_digest(&id);
        self.digests.insert(key.digest, id.clone());
        self.changed.insert(id, Some(key));
    }

    /// Forgets the digest the batch gave `id` so far, if any.
    fn forget_digest(&mut self, id: &Arc<str>) {
        if let Some(Some(old)) = self.changed.get(id)
            && self.digests.get(&old.digest) == Some(id)
        {
            self.digests.remove(&old.digest);
        }
    }

    /// The changes by id.
    pub(super) fn changes(&self) -> Vec<KeyChange> {
        self.changed
            .iter()
            .filter(|(id, key)| key.is_some() || self.base.keys.contains(id))
            .map(|(id, key)| match key {
                Some(key) => KeyChange::Upsert(key.clone()),
                None => KeyChange::Remove(id.clone()),
            })
            .collect()
    }

    /// The new file, or `None` if it would not read back as intended.
    pub(super) fn render(&self, path: &Path) -> Option<Base> {
        match &self.base.tables {
            Some(tables) => self.splice(path, tables),
            None => self.edit(path),
        }
    }

    /// The new file made from the old one's bytes: tables not changed copied as
    /// they are, changed ones edited alone, new ones appended. Each table written is
    /// read back and must give exactly its key.
    pub(super) fn splice(&self, path: &Path, tables: &[Span]) -> Option<Base> {
        let text = &self.base.text;
        let mut out = String::with_capacity(text.len() + 512 * self.added.len());
        let mut spans = Vec::with_capacity(tables.len() + self.added.len());
        // Text outside every table (a file of comments only, or the lines a removal
        // kept) is copied where it stands.
        let mut at = 0;
        for table in tables {
            out.push_str(text.get(at..table.start)?);
            at = table.end;
            let start = out.len();
            match self.changed.get(&table.id) {
                None => out.push_str(text.get(table.start..table.end)?),
                Some(None) => {
                    // A removed table takes with it only the comments right above its
                    // header; those before a blank line (the file's header, the end
                    // of the key before) are not its own, and stay.
                    let own = text.get(table.start..table.end)?;
                    out.push_str(&own[..leading_trivia_to_keep(own)]);
                    continue;
                }
                Some(Some(key)) => {
                    let mut doc: DocumentMut = text.get(table.start..table.end)?.parse().ok()?;
                    let one = doc.get_mut("keys")?.as_array_of_tables_mut()?.get_mut(0)?;
                    write_fields(one, key);
                    let edited = doc.to_string();
                    same(path, &edited, key)?;
                    out.push_str(&edited);
                }
            }
            if !out.ends_with('\n') {
                out.push('\n');
            }
            spans.push(Span {
                id: table.id.clone(),
                start,
                end: out.len(),
            });
        }
        out.push_str(text.get(at..)?);
        for id in &self.added {
            let Some(Some(key)) = self.changed.get(id) else {
                continue;
            };
            let start = out.len();
            if !out.is_empty() {
                out.push('\n');
            }
            let entry = write::entry(key);
            same(path, &entry, key)?;
            out.push_str(&entry);
            spans.push(Span {
                id: key.id.clone(),
                start,
                end: out.len(),
            });
        }
        let keys = self.base.keys.with(&self.changed);
        // Read back as a whole only when it is small enough to cost nothing.
        if out.len() <= 64 << 10 {
            let set = FileSource::parse(path, out.as_bytes()).ok()?;
            if set.len() != keys.values().count() {
                return None;
            }
        }
        Some(Base {
            fingerprint: fingerprint(out.as_bytes()),
            text: out,
            keys,
            tables: Some(spans),
        })
    }

    /// The new file made by editing the old one as a TOML document, then read back
    /// whole as the file source will.
    pub(super) fn edit(&self, path: &Path) -> Option<Base> {
        let mut doc: DocumentMut = self.base.text.parse().ok()?;
        let keys = keys_mut(&mut doc).ok()?;
        let mut gone = Vec::new();
        for (at, table) in keys.iter_mut().enumerate() {
            let Some(id) = table.get("id").and_then(Item::as_str) else {
                continue;
            };
            match self.changed.get(id) {
                Some(Some(key)) => write_fields(table, key),
                Some(None) => gone.push(at),
                None => {}
            }
        }
        for at in gone.into_iter().rev() {
            keys.remove(at);
        }
        for id in &self.added {
            if let Some(Some(key)) = self.changed.get(id) {
                keys.push(new_table(key));
            }
        }
        let text = doc.to_string();
        parse(path, text.as_bytes()).ok()
    }
}

/// Whether `text`, read as a key file alone, holds exactly `key`.
pub(super) fn same(path: &Path, text: &str, key: &ApiKey) -> Option<()> {
    let set = FileSource::parse(path, text.as_bytes()).ok()?;
    let back = set.iter().next()?;
    (set.len() == 1 && record_etag(back) == record_etag(key)).then_some(())
}

/// The document's `[[keys]]` tables; a file holding `keys = []` (or nothing) gets an
/// empty array of tables.
pub(super) fn keys_mut(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables, BackendError> {
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
            BackendError::Unavailable(Said::only(
                "the key file writes `keys` inline; use [[keys]] tables",
            ))
        })
}

/// Writes `key`'s fields into `table`, as the key file's writer renders them,
/// keeping the table's decor and the order of the fields it already has; fields `key`
/// lacks are removed. The key is a digest, unless the table holds a secret written by
/// hand that is still the key's.
pub(super) fn write_fields(table: &mut Table, key: &ApiKey) {
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
pub(super) fn put(table: &mut Table, name: &str, new: Option<toml_edit::Value>) {
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
pub(super) fn bare(v: &toml_edit::Value) -> String {
    let mut v = v.clone();
    v.decor_mut().clear();
    v.to_string()
}

/// Whether the table's `secret` is still `key`'s.
pub(super) fn secret_matches(table: &Table, key: &ApiKey) -> bool {
    table
        .get("secret")
        .and_then(Item::as_str)
        .is_some_and(|s| crate::key::digest::KeyDigest::of(s.as_bytes()) == key.digest)
}

pub(super) fn new_table(key: &ApiKey) -> Table {
    let mut table = Table::new();
    write_fields(&mut table, key);
    table
}
