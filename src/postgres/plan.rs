//! What a write of `PostgresBackend` is to do, as its callers say it and its
//! transaction (`write.rs`) carries it out.

use std::collections::HashMap;

use crate::admin::BackendError;

/// One key's change: its new record, or `None` to remove it.
pub(super) struct Op {
    pub(super) id: String,
    pub(super) record: Option<String>,
}

/// How a change is decided from the current records of the ids it names.
pub(super) type Decide<'a> =
    dyn Fn(&HashMap<String, String>) -> Result<Vec<Op>, BackendError> + Sync + 'a;

/// What a write does, decided in its transaction.
pub(super) enum Plan<'a> {
    /// Changes decided from the current records of `ids` (locked).
    Change {
        ids: Vec<&'a str>,
        decide: &'a Decide<'a>,
    },
    /// Every record of a set, into the namespace (created if missing).
    Import(&'a [(String, String)]),
    /// The namespace replaced by these records, with a new epoch.
    Restore(&'a [(String, String)]),
}
