//! What is stored where, and the statements that read and change it, in one place.
//! (The tables themselves are in `schema.sql`, which [`SCHEMA`] holds.)

/// The schema: the fleet's tables, created if missing, under an advisory lock.
pub(crate) const SCHEMA: &str = include_str!("schema.sql");

/// The channel every change is announced on; the payload is the namespace.
pub(crate) const CHANNEL: &str = "tak_changes";

/// How many versions of changes are kept: a replica further behind reads the
/// namespace whole.
pub(crate) const KEEP_VERSIONS: i64 = 1000;

/// How many records one statement of an import or a restore sends.
pub(crate) const CHUNK: usize = 10_000;

/// The namespace's row.
pub(crate) const HEAD: &str =
    "SELECT epoch, version, keys FROM tak_namespaces WHERE namespace = $1";

/// The namespace's row, locked until the transaction ends: writers take turns.
pub(crate) const LOCK_HEAD: &str =
    "SELECT epoch, version, keys FROM tak_namespaces WHERE namespace = $1 FOR UPDATE";

/// Whether the namespace has a record at all: a row that counts keys over a table
/// that holds none of them is an emptied table (`TRUNCATE`), not zero keys.
pub(crate) const ANY_KEY: &str = "SELECT EXISTS (SELECT 1 FROM tak_keys WHERE namespace = $1)";

/// Every record of the namespace, as text.
pub(crate) const ALL: &str = "SELECT id, record::text FROM tak_keys WHERE namespace = $1";

/// Some records of the namespace, locked until the transaction ends.
pub(crate) const SOME_LOCKED: &str =
    "SELECT id, record::text FROM tak_keys WHERE namespace = $1 AND id = ANY($2) FOR UPDATE";

/// The changes after a version.
pub(crate) const CHANGES: &str = "SELECT version, seq, n, epoch, op, id, record::text \
     FROM tak_changes WHERE namespace = $1 AND version > $2 ORDER BY version, seq";

/// Puts records (ids, JSON texts); answers, per row, whether it was new.
pub(crate) const PUT: &str = "INSERT INTO tak_keys (namespace, id, record) \
     SELECT $1, i, r::jsonb FROM unnest($2::text[], $3::text[]) AS t(i, r) \
     ON CONFLICT (namespace, id) DO UPDATE SET record = EXCLUDED.record \
     RETURNING (xmax = 0)";

/// Removes records; answers one row per record removed.
pub(crate) const DEL: &str =
    "DELETE FROM tak_keys WHERE namespace = $1 AND id = ANY($2::text[]) RETURNING 1";

/// The change rows of one version: ops, ids, records (NULL for `del`), the first
/// row's `seq`.
pub(crate) const LOG: &str = "INSERT INTO tak_changes \
     (namespace, version, seq, n, epoch, op, id, record) \
     SELECT $1, $2, (o - 1)::integer + $8, $3, $4, op, i, r::jsonb \
     FROM unnest($5::text[], $6::text[], $7::text[]) WITH ORDINALITY AS t(op, i, r, o)";

/// Bumps the version and the record count.
pub(crate) const BUMP: &str =
    "UPDATE tak_namespaces SET version = $2, keys = keys + $3 WHERE namespace = $1";

/// Forgets changes older than [`KEEP_VERSIONS`].
pub(crate) const PRUNE: &str = "DELETE FROM tak_changes WHERE namespace = $1 AND version <= $2";

/// Wakes the replicas once the transaction commits.
pub(crate) const NOTIFY: &str = "SELECT pg_notify('tak_changes', $1)";

/// A write's marker, inserted first: `done` once it commits.
pub(crate) const MARK: &str = "INSERT INTO tak_writes (nonce, state) VALUES ($1, 'done')";

/// Settles a write whose answer was lost: inserts its marker as `fenced` (waiting for
/// the write's transaction, if it still runs), so the write never happens if it has
/// not; one row if so.
pub(crate) const FENCE: &str = "INSERT INTO tak_writes (nonce, state) VALUES ($1, 'fenced') \
     ON CONFLICT (nonce) DO NOTHING RETURNING 1";

/// Whether a marker is `done`.
pub(crate) const MARKED: &str = "SELECT state FROM tak_writes WHERE nonce = $1";

/// Forgets markers older than an hour (run now and then by writers).
pub(crate) const FORGET_MARKS: &str = "DELETE FROM tak_writes WHERE at < now() - interval '1 hour'";

/// Adds a replica's counts: ids, request deltas, last uses (Unix seconds).
pub(crate) const ADD_USAGE: &str = "INSERT INTO tak_usage (namespace, id, requests, last_used) \
     SELECT $1, i, n, at FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS t(i, n, at) \
     ON CONFLICT (namespace, id) DO UPDATE SET \
     requests = tak_usage.requests + EXCLUDED.requests, \
     last_used = GREATEST(tak_usage.last_used, EXCLUDED.last_used)";

/// Forgets the fleet's counts of removed keys.
pub(crate) const FORGET_USAGE: &str =
    "DELETE FROM tak_usage WHERE namespace = $1 AND id = ANY($2::text[])";

/// The fleet's counts of some keys.
pub(crate) const USAGE: &str = "SELECT id, requests, last_used FROM tak_usage \
     WHERE namespace = $1 AND id = ANY($2::text[])";

/// 16 random hexadecimal digits: an epoch, or a write's nonce.
pub(crate) fn random_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = (nanos as u64).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
