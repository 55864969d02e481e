//! What is stored under which Redis key, and the scripts that change it, in one place.
//!
//! A namespace `ns` is these keys, all with `{ns}` as the cluster hash tag:
//!
//! - `tak:{ns}:keys`, a hash: key id → the key's record, as JSON (its SHA-256 and its
//!   metadata; never a secret). A record names its own id: one stored under another
//!   id is refused.
//! - `tak:{ns}:version`, a hash: `epoch` → the namespace's identity, new at every
//!   explicit (re)creation ([`RedisBackend::import_file`] into a missing namespace,
//!   [`RedisBackend::restore_file`]); `version` → one more at every change, a whole
//!   number (anything else is a damaged namespace, see [`HEAD`]);
//!   `records` → how many records the hash held after the last change. The
//!   namespace exists while `epoch` and `version` do, and while the hash does if
//!   `records` says it holds any: a Redis without them is wiped, partly wiped (the
//!   hash deleted or evicted alone) or new, never "no keys", and nothing but an
//!   explicit re-creation writes to it again.
//! - `tak:{ns}:log`, a stream capped at about [`LOG_LEN`] entries: one per key
//!   changed, each naming what it belongs to: `e` (the epoch), `v` (the version),
//!   `i` and `n` (its index in the version, and how many entries the version has),
//!   `op` (`put`, `del`, or `reset` for a re-creation), `id`, and for `put` the
//!   `record`. A follower applies a version when it holds all `n` of its entries.
//! - `tak:{ns}:requests` and `tak:{ns}:last_used`, hashes: key id → requests, added to
//!   by each replica, and the Unix second of the fleet's latest use; for ids the
//!   records hash holds only, removed with the key ([`APPLY`], [`ADD_USAGE`]).
//! - `tak:{ns}:write:<nonce>`, a short-lived string per write: `done` once the write
//!   happened, `fenced` once a writer that lost its answer has made sure it never
//!   will. This is how a write whose answer was lost is settled (see
//!   [`CHECK_WRITE`]).
//! - `tak:{ns}:staging:<epoch>`, a hash: a re-creation being written, swapped in
//!   whole by [`SWAP`]; it expires if abandoned.
//! - `tak:{ns}:lease:<id>:<limit>`, the fleet-wide state of a key's limits (a rate
//!   limit's bucket, a quota period's count of tokens leased), kept by the lessor's
//!   scripts (see `lease.rs`).
//! - `tak:{ns}:starved`, a sorted set: the quota counts (by their Redis key) of which
//!   a replica was lately granted less than it asked for, scored by the Redis time
//!   (ms) of the last such lease. Entries older than a few seconds are trimmed by
//!   each write, and the set expires when none come: replicas holding idle tokens of
//!   a quota listed here give them back (see `lease.rs`).
//!
//! [`RedisBackend::import_file`]: super::RedisBackend::import_file
//! [`RedisBackend::restore_file`]: super::RedisBackend::restore_file

use std::time::Duration;

/// How many log entries are kept: a replica further behind than this resyncs whole.
pub(crate) const LOG_LEN: usize = 10_000;

/// How many keys one version of an import holds (one script run each).
pub(crate) const CHUNK: usize = 1000;

/// The most entries a version may have. One claiming more could not be held whole in
/// a log this long; a follower resyncs instead of waiting for it.
pub(crate) const MAX_VERSION_ENTRIES: u64 = (LOG_LEN / 2) as u64;

/// How long an abandoned re-creation's staging hash is kept.
pub(crate) const STAGING_TTL: Duration = Duration::from_secs(3600);

/// How long a `fenced` write marker is kept: longer than any request can wait in
/// Redis before it runs.
pub(crate) const FENCE_TTL: Duration = Duration::from_secs(3600);

/// The Redis keys of one namespace.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    pub(crate) records: String,
    pub(crate) version: String,
    pub(crate) log: String,
    pub(crate) requests: String,
    pub(crate) last_used: String,
    /// The quotas lately starved (see the module's docs).
    pub(crate) starved: String,
    prefix: String,
}

impl Keys {
    pub(crate) fn of(namespace: &str) -> Self {
        let prefix = format!("tak:{{{namespace}}}:");
        let key = |part: &str| format!("{prefix}{part}");
        Self {
            records: key("keys"),
            version: key("version"),
            log: key("log"),
            requests: key("requests"),
            last_used: key("last_used"),
            starved: key("starved"),
            prefix,
        }
    }

    /// Where the fleet-wide state of one of a key's limits is (see `lease.rs`): under
    /// the key's id and the limit's name (the quota's period), so that a changed
    /// limit goes on from what the fleet counted.
    pub(crate) fn lease(&self, id: &str, limit: &str) -> String {
        format!("{}lease:{id}:{limit}", self.prefix)
    }

    /// The marker of the write with this nonce.
    pub(crate) fn marker(&self, nonce: &str) -> String {
        format!("{}write:{nonce}", self.prefix)
    }

    /// The staging hash of a re-creation as `epoch`.
    pub(crate) fn staging(&self, epoch: &str) -> String {
        format!("{}staging:{epoch}", self.prefix)
    }
}

/// 16 random hexadecimal digits: an epoch, or a write's nonce.
pub(crate) fn random_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No system randomness: the clock's nanoseconds are unique enough for a
        // name that only has to differ from the last few.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b = (nanos as u64).to_le_bytes();
    }
    faster_hex::hex_string(&b)
}

/// What [`APPLY`] answers in its first element when it wrote nothing.
pub(crate) mod refused {
    /// Change `i`'s id exists (it had to be free).
    pub(crate) const EXISTS: i64 = -1;
    /// Change `i`'s id is absent.
    pub(crate) const ABSENT: i64 = -2;
    /// Change `i`'s record changed since it was read.
    pub(crate) const CHANGED: i64 = -3;
    /// The namespace does not exist (no epoch or version), or its records are gone.
    pub(crate) const MISSING: i64 = -4;
    /// This write's marker is `fenced`: its writer gave up on it.
    pub(crate) const FENCED: i64 = -5;
    /// A key of the namespace has the wrong type (not written by this crate).
    pub(crate) const DAMAGED: i64 = -6;
    /// The namespace is at a version below one the writer saw in the same epoch:
    /// Redis came back from an older save and lost writes.
    pub(crate) const WENT_BACK: i64 = -7;
}

/// Applies a batch of changes atomically, if the namespace exists and every
/// condition holds: one version for the batch, one log entry per key, each naming
/// the epoch, the version, its index and the batch's size.
///
/// Everything that could fail is checked before the first write (the marker), so a
/// run that answers an error wrote nothing: Redis keeps what a script wrote before an
/// error. That includes a log that cannot grow (an entry at the largest
/// millisecond a stream id has, where `XADD *` fails): the namespace is then damaged.
///
/// A key's usage counts go with it: a removal deletes them, and so does the
/// creation of an id (one that must be free), so a key created again under an old id
/// starts unused.
///
/// The version counter must be a whole number of at most 13 digits (what the
/// follower reads, and what Lua writes back without an exponent): anything else
/// (`1.5`, `-1`, `0x10`, ` 7`) is a damaged namespace, as [`HEAD`] says too.
///
/// KEYS: records, version, log, this write's marker, requests, last_used. ARGV: the
/// log's length, the marker's lifetime (ms), the epoch and version the writer last
/// saw (empty and 0 for none: a namespace of that epoch below that version went
/// back, and is not written), then per change: `put` or `del`, the id, the
/// condition (`-` absent, `*` anything, else the exact current record), the new
/// record (empty for `del`).
///
/// Returns `{version, n, epoch}`, or `{code, i}` with a code of [`refused`].
pub(crate) const APPLY: &str = r"
if redis.call('TYPE', KEYS[2]).ok ~= 'hash' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return {-6, 2} end
  return {-4, 0}
end
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local v = redis.call('HGET', KEYS[2], 'version')
if not epoch or not v then return {-4, 0} end
if not string.match(v, '^%d+$') or #v > 13 then return {-6, 2} end
v = tonumber(v)
if epoch == ARGV[3] and v < tonumber(ARGV[4]) then return {-7, 0} end
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'hash' and t ~= 'none' then return {-6, 1} end
local held = tonumber(redis.call('HGET', KEYS[2], 'records'))
if t == 'none' and held and held > 0 then return {-4, 1} end
t = redis.call('TYPE', KEYS[3]).ok
if t ~= 'stream' and t ~= 'none' then return {-6, 3} end
if t == 'stream' then
  local top = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
  if top and string.sub(top[1], 1, 21) == '18446744073709551615-' then return {-6, 3} end
end
local n = (#ARGV - 4) / 4
for i = 0, n - 1 do
  local id, expect = ARGV[6 + i * 4], ARGV[7 + i * 4]
  local cur = redis.call('HGET', KEYS[1], id)
  if expect == '-' then
    if cur then return {-1, i} end
  elseif expect ~= '*' then
    if not cur then return {-2, i} end
    if cur ~= expect then return {-3, i} end
  end
end
-- Counts in a key of another type are left alone rather than fail the write.
local counts = redis.call('TYPE', KEYS[5]).ok == 'hash'
local stamps = redis.call('TYPE', KEYS[6]).ok == 'hash'
if not redis.call('SET', KEYS[4], 'done', 'NX', 'PX', ARGV[2]) then return {-5, 0} end
v = v + 1
redis.call('HSET', KEYS[2], 'version', v)
for i = 0, n - 1 do
  local kind, id, record = ARGV[5 + i * 4], ARGV[6 + i * 4], ARGV[8 + i * 4]
  if kind == 'del' or ARGV[7 + i * 4] == '-' then
    if counts then redis.call('HDEL', KEYS[5], id) end
    if stamps then redis.call('HDEL', KEYS[6], id) end
  end
  if kind == 'put' then
    redis.call('HSET', KEYS[1], id, record)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*',
      'e', epoch, 'v', v, 'i', i, 'n', n, 'op', 'put', 'id', id, 'record', record)
  else
    redis.call('HDEL', KEYS[1], id)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*',
      'e', epoch, 'v', v, 'i', i, 'n', n, 'op', 'del', 'id', id)
  end
end
redis.call('HSET', KEYS[2], 'records', redis.call('HLEN', KEYS[1]))
return {v, n, epoch}
";

/// Settles a write whose answer was lost: marks it `fenced` if it has not run (it
/// then never will: [`APPLY`] refuses a fenced marker), and says whether it ran.
///
/// Redis runs scripts one at a time, so exactly one of the write and this check
/// finds the marker free: the answer is final.
///
/// KEYS: the write's marker. ARGV: how long a fence is kept (ms). Returns 1 if the
/// write happened, 0 if it did not and never will.
pub(crate) const CHECK_WRITE: &str = r"
if redis.call('SET', KEYS[1], 'fenced', 'NX', 'PX', ARGV[1]) then return 0 end
if redis.call('GET', KEYS[1]) == 'done' then return 1 end
return 0
";

/// Where a namespace is, read atomically and without failing on keys of the wrong
/// type.
///
/// KEYS: version, records, log. Returns `{state, epoch, version, last log id}`:
/// state 0 the namespace exists, 1 it is missing (no epoch or version, or its
/// records gone while `records` says it holds some), 2 one of its keys has the
/// wrong type or its version is not a whole number (as [`APPLY`] checks it).
pub(crate) const HEAD: &str = r"
local state, epoch, v, last = 1, false, false, false
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'hash' then
  epoch = redis.call('HGET', KEYS[1], 'epoch')
  v = redis.call('HGET', KEYS[1], 'version')
  if epoch and v then
    if string.match(v, '^%d+$') and #v <= 13 then state = 0 else state = 2 end
  end
elseif t ~= 'none' then
  state = 2
end
t = redis.call('TYPE', KEYS[2]).ok
if t ~= 'hash' and t ~= 'none' then state = 2 end
if t == 'none' and state == 0 then
  local held = tonumber(redis.call('HGET', KEYS[1], 'records'))
  if held and held > 0 then state = 1 end
end
t = redis.call('TYPE', KEYS[3]).ok
if t == 'stream' then
  local e = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
  if e[1] then last = e[1][1] end
elseif t ~= 'none' then
  state = 2
end
return {state, epoch, v, last}
";

/// Swaps a staged re-creation in whole: the staging hash becomes the namespace's
/// records, with a new epoch and one more version, and a `reset` entry tells
/// followers to read it whole. Whatever the namespace held before is replaced, a log
/// that cannot grow (see [`APPLY`]) included.
///
/// KEYS: records, version, log, staging, this write's marker. ARGV: the new epoch,
/// how many records were staged, the log's length, the marker's lifetime (ms).
/// Returns the new version, -1 if the staging hash does not hold as many records as
/// were staged (it expired, or was wiped meanwhile), or -5 if the marker is fenced.
pub(crate) const SWAP: &str = r"
local staged = 0
if redis.call('TYPE', KEYS[4]).ok == 'hash' then staged = redis.call('HLEN', KEYS[4]) end
if staged ~= tonumber(ARGV[2]) then return -1 end
if not redis.call('SET', KEYS[5], 'done', 'NX', 'PX', ARGV[4]) then return -5 end
local v = 0
if redis.call('TYPE', KEYS[2]).ok == 'hash' then
  local old = redis.call('HGET', KEYS[2], 'version')
  if old and string.match(old, '^%d+$') and #old <= 13 then v = tonumber(old) end
end
redis.call('UNLINK', KEYS[1], KEYS[2])
if staged > 0 then
  redis.call('RENAME', KEYS[4], KEYS[1])
  redis.call('PERSIST', KEYS[1])
end
v = v + 1
redis.call('HSET', KEYS[2], 'epoch', ARGV[1], 'version', v, 'records', staged)
local t = redis.call('TYPE', KEYS[3]).ok
if t ~= 'stream' and t ~= 'none' then redis.call('UNLINK', KEYS[3]) end
if t == 'stream' then
  local top = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
  if top and string.sub(top[1], 1, 21) == '18446744073709551615-' then
    redis.call('UNLINK', KEYS[3])
  end
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*',
  'e', ARGV[1], 'v', v, 'i', 0, 'n', 1, 'op', 'reset')
return v
";

/// Adds a replica's counts: KEYS: records, requests, last_used; ARGV: pairs of id
/// and `requests:last_used`. The count is added, the later stamp kept, for ids the
/// namespace holds only: a replica's late counts for a removed key do not bring its
/// counts back (nor give them to a key created later under its id). A stored value
/// that is not a count is replaced, never a reason to stop.
pub(crate) const ADD_USAGE: &str = r"
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then return 0 end
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    local sep = string.find(ARGV[i + 1], ':')
    local n = tonumber(string.sub(ARGV[i + 1], 1, sep - 1))
    local at = tonumber(string.sub(ARGV[i + 1], sep + 1))
    if n > 0 then
      -- A count that is not an integer (written by hand) starts again from this
      -- one: an error here would end the script with the ids before it added and
      -- the rest not, and the replica's retry would add the first ones twice.
      local r = redis.pcall('HINCRBY', KEYS[2], id, n)
      if type(r) == 'table' and r.err then redis.call('HSET', KEYS[2], id, n) end
    end
    local cur = tonumber(redis.call('HGET', KEYS[3], id) or '0') or 0
    if at > cur then redis.call('HSET', KEYS[3], id, at) end
  end
end
return 1
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_s_keys_share_its_hash_tag() {
        assert_eq!(Keys::of("payments").records, "tak:{payments}:keys");
        assert_eq!(Keys::of("payments").marker("n1"), "tak:{payments}:write:n1");
    }

    #[test]
    fn markers_and_staging_share_the_namespace_hash_tag() {
        let keys = Keys::of("ns");
        assert!(keys.marker("ab").starts_with("tak:{ns}:"));
        assert!(keys.staging("cd").starts_with("tak:{ns}:"));
        assert_eq!(keys.starved, "tak:{ns}:starved");
        let (a, b) = (random_id(), random_id());
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }
}
