-- tower-api-key: the schema of a fleet on PostgreSQL (feature `postgres`).
--
-- The same statements `PostgresBackend::migrate()` runs: idempotent, safe to run
-- again and from several processes at once (under an advisory lock), and creating
-- no namespace (`PostgresBackend::import_file` or `restore_file` does that).
-- Records are JSON key records (id, sha256, metadata): never a secret.

SELECT pg_advisory_xact_lock(7357001);

-- One row per namespace: its identity (epoch, new at each explicit re-creation), its
-- version (one more at every change) and how many records `tak_keys` holds for it.
-- Writers lock this row (SELECT ... FOR UPDATE), so the versions of a namespace
-- commit in order. A namespace without its row does not exist: never "zero keys".
CREATE TABLE IF NOT EXISTS tak_namespaces (
    namespace text   PRIMARY KEY,
    epoch     text   NOT NULL,
    version   bigint NOT NULL,
    keys      bigint NOT NULL
);

-- The keys: one JSON record per key id.
CREATE TABLE IF NOT EXISTS tak_keys (
    namespace text  NOT NULL,
    id        text  NOT NULL,
    record    jsonb NOT NULL,
    PRIMARY KEY (namespace, id)
);

-- The change log, written in the same transaction as each change: version `version`
-- of the namespace changed `n` keys, row `seq` (0 to n - 1) being one of them: `put`
-- (with its record), `del`, or `reset` (a re-creation: read the namespace whole).
-- Pruned to the last few thousand versions.
CREATE TABLE IF NOT EXISTS tak_changes (
    namespace text    NOT NULL,
    version   bigint  NOT NULL,
    seq       integer NOT NULL,
    n         integer NOT NULL,
    epoch     text    NOT NULL,
    op        text    NOT NULL,
    id        text,
    record    jsonb,
    PRIMARY KEY (namespace, version, seq)
);

-- The fleet's usage: replicas add their request counts in batches.
CREATE TABLE IF NOT EXISTS tak_usage (
    namespace text   NOT NULL,
    id        text   NOT NULL,
    requests  bigint NOT NULL DEFAULT 0,
    last_used bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, id)
);

-- How a write whose answer was lost is settled: each write inserts its nonce as
-- `done` first; a writer that lost the answer inserts it as `fenced`, which waits for
-- the write's transaction to end, and either finds `done` (it happened) or makes
-- sure it never will. Rows older than an hour are pruned.
CREATE TABLE IF NOT EXISTS tak_writes (
    nonce text        PRIMARY KEY,
    state text        NOT NULL,
    at    timestamptz NOT NULL DEFAULT now()
);
