//! A key file against a target, decK-style: `diff`, `apply`, `restore`, `import`,
//! `export`, and `usage`.
//!
//! A key file target is written whole, atomically, under the same gate (and, on
//! Linux, directory lock) the key-management API's file backend takes, so neither
//! overwrites the other. A fleet's namespace is written by its engine's backend: on
//! PostgreSQL the keys added, changed and removed in one transaction, one version;
//! on Redis an import of the keys added and changed (one version per 1,000 keys),
//! or, when keys are removed, one swap of the whole namespace.

use std::{
    collections::HashMap,
    io::Write as _,
    path::Path,
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};

use super::{
    Done, Exit, Failure,
    args::TargetArgs,
    output::{self, Out},
    read_input, runtime,
    target::{Current, Fleet, Target},
};
use crate::{
    ApiKey, KeySet,
    admin::{BackendError, FileBackend},
    source::{key_file::write, link::Link},
};

/// What it takes to make the target hold a key file's keys.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Keys the target lacks.
    pub(crate) added: Vec<ApiKey>,
    /// Keys the target holds otherwise, and the fields that differ.
    pub(crate) changed: Vec<(ApiKey, Vec<&'static str>)>,
    /// Ids the target holds that the file does not name.
    pub(crate) removed: Vec<String>,
}

impl Plan {
    /// Compares `desired` with `current`, in id order.
    pub(crate) fn of(desired: &KeySet, current: &Current) -> Self {
        let index: HashMap<&str, &ApiKey, foldhash::fast::RandomState> = match current {
            Current::Set(_) => HashMap::default(),
            Current::List(keys) => keys.iter().map(|k| (k.id(), k)).collect(),
        };
        let find = |id: &str| match current {
            Current::Set(set) => set.get(id),
            Current::List(_) => index.get(id).copied(),
        };
        let mut plan = Self::default();
        for key in desired.iter() {
            match find(key.id()) {
                None => plan.added.push(key.clone()),
                Some(now) => {
                    let key = with_record_of(key, now);
                    let fields = differences(&key, now);
                    if !fields.is_empty() {
                        plan.changed.push((key, fields));
                    }
                }
            }
        }
        plan.removed = current
            .iter()
            .filter(|k| desired.get(k.id()).is_none())
            .map(|k| k.id().to_owned())
            .collect();
        plan.added.sort_unstable_by(|a, b| a.id().cmp(b.id()));
        plan.changed.sort_unstable_by(|a, b| a.0.id().cmp(b.0.id()));
        plan.removed.sort_unstable();
        plan
    }

    fn is_empty(&self, prune: bool) -> bool {
        self.added.is_empty() && self.changed.is_empty() && (!prune || self.removed.is_empty())
    }

    /// Prints the plan: one line a key (`+` added, `~` changed and which fields, `-`
    /// removed, or kept without `--prune`), then the counts; or one JSON document.
    fn print(&self, out: Out, prune: bool) {
        if out.json() {
            let changed: Vec<Value> = self
                .changed
                .iter()
                .map(|(k, f)| json!({ "id": k.id(), "fields": f }))
                .collect();
            fn ids(keys: &[ApiKey]) -> Vec<&str> {
                keys.iter().map(ApiKey::id).collect()
            }
            let (removed, kept): (&[String], &[String]) = if prune {
                (&self.removed, &[])
            } else {
                (&[], &self.removed)
            };
            out.print_json(&json!({
                "added": ids(&self.added),
                "changed": changed,
                "removed": removed,
                "kept": kept,
            }));
            return;
        }
        let mut text = String::new();
        for key in &self.added {
            text.push_str(&out.paint(32, &format!("+ {}", key.id())));
            text.push('\n');
        }
        for (key, fields) in &self.changed {
            text.push_str(&out.paint(33, &format!("~ {} ({})", key.id(), fields.join(", "))));
            text.push('\n');
        }
        for id in &self.removed {
            let line = if prune {
                out.paint(31, &format!("- {id}"))
            } else {
                out.paint(
                    2,
                    &format!("  {id} (not in the file: kept; --prune removes it)"),
                )
            };
            text.push_str(&line);
            text.push('\n');
        }
        let removed = if prune { self.removed.len() } else { 0 };
        text.push_str(&format!(
            "{} to add, {} to change, {} to remove\n",
            self.added.len(),
            self.changed.len(),
            removed
        ));
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(text.as_bytes());
    }

    /// What applying the plan writes: the keys added or changed, and the ids removed
    /// (only with `prune`).
    fn writes(&self, prune: bool) -> (Vec<ApiKey>, &[String]) {
        let keys = self
            .added
            .iter()
            .chain(self.changed.iter().map(|(k, _)| k))
            .cloned()
            .collect();
        (keys, if prune { &self.removed } else { &[] })
    }

    /// The keys the target holds once the plan is applied, in `current`'s order then
    /// the added ones.
    fn result(&self, desired: &KeySet, current: &Current, prune: bool) -> Vec<ApiKey> {
        if prune {
            return desired.iter().cloned().collect();
        }
        let mut keys: Vec<ApiKey> = current
            .iter()
            .map(|k| desired.get(k.id()).unwrap_or(k).clone())
            .collect();
        keys.extend(self.added.iter().cloned());
        keys
    }
}

/// `desired` with the record the target keeps of the key (`created_at`,
/// `created_by`, `rotated_from`) where it says nothing of it: a key file kept in
/// version control rarely holds them, and applying it must not erase what the API
/// recorded (nor `diff` report it). A value the file does give is applied.
fn with_record_of(desired: &ApiKey, now: &ApiKey) -> ApiKey {
    let mut key = desired.clone();
    if key.created_at().is_none()
        && let Some(at) = now.created_at()
    {
        key = key.with_created_at(at);
    }
    if key.created_by().is_none()
        && let Some(by) = now.created_by()
    {
        key = key.with_created_by(by);
    }
    if key.rotated_from().is_none()
        && let Some(from) = now.rotated_from()
    {
        key = key.with_rotated_from(from);
    }
    key
}

/// The names of the fields in which two keys with the same id differ.
pub(crate) fn differences(a: &ApiKey, b: &ApiKey) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let mut differ = |name: &'static str, same: bool| {
        if !same {
            fields.push(name);
        }
    };
    differ("sha256", a.digest == b.digest);
    differ("scopes", a.scopes().eq(b.scopes()));
    differ("tenant", a.tenant() == b.tenant());
    differ("owner", a.owner() == b.owner());
    differ("description", a.description() == b.description());
    differ("not_before", a.not_before() == b.not_before());
    differ("expires_at", a.expires_at() == b.expires_at());
    differ("disabled", a.is_disabled() == b.is_disabled());
    differ("created_at", a.created_at() == b.created_at());
    differ("created_by", a.created_by() == b.created_by());
    differ("rotated_from", a.rotated_from() == b.rotated_from());
    // Limits in any order: a key's rate limits are all-or-nothing and its networks
    // one set, so an engine that stores them in another order holds the same key.
    differ(
        "rate_limits",
        same_elements(a.rate_limits(), b.rate_limits()),
    );
    differ("quota", a.quota() == b.quota());
    differ(
        "allowed_ips",
        match (a.allowed_ips(), b.allowed_ips()) {
            (Some(a), Some(b)) => same_elements(a, b),
            (a, b) => a.is_none() && b.is_none(),
        },
    );
    fields
}

/// Whether two short lists hold the same elements, in any order, as often.
fn same_elements<T: PartialEq>(a: &[T], b: &[T]) -> bool {
    let count = |list: &[T], x: &T| list.iter().filter(|y| *y == x).count();
    a == b || (a.len() == b.len() && a.iter().all(|x| count(a, x) == count(b, x)))
}

/// Reads the input file (on a blocking thread) and the target's keys at once.
async fn both(file: &Path, target: &Target, max: u64) -> Result<(KeySet, Current), Failure> {
    let path = file.to_owned();
    let input = tokio::task::spawn_blocking(move || read_input(&path, max));
    // The input is read on its own thread meanwhile.
    let current = target.read(max).await;
    let desired = input
        .await
        .map_err(|_| Failure::new(Exit::Unavailable, "the key file could not be read"))??;
    Ok((desired, current?))
}

pub(crate) fn diff(file: &Path, args: &TargetArgs, max: u64, out: Out) -> Done {
    let target = Target::of(args)?;
    if matches!(target, Target::Api { .. }) {
        return Err(target.cannot("diff"));
    }
    runtime()?.block_on(async {
        let (desired, current) = both(file, &target, max).await?;
        let plan = Plan::of(&desired, &current);
        plan.print(out, true);
        // The process ends now: a million keys need not be freed one by one first.
        std::mem::forget((desired, current));
        Ok(if plan.is_empty(true) {
            Exit::Ok
        } else {
            Exit::Invalid
        })
    })
}

pub(crate) fn apply(
    file: &Path,
    args: &TargetArgs,
    max: u64,
    dry_run: bool,
    prune: bool,
    out: Out,
) -> Done {
    let target = Target::of(args)?;
    match &target {
        Target::Api { .. } => Err(target.cannot("apply")),
        Target::File(path) => {
            let desired = read_input(file, max)?;
            let rt = runtime()?;
            let current = rt.block_on(target.read(max))?;
            let plan = Plan::of(&desired, &current);
            plan.print(out, prune);
            if dry_run || plan.is_empty(prune) {
                return Ok(Exit::Ok);
            }
            checked(&plan.result(&desired, &current, prune))?;
            let (keys, removed) = plan.writes(prune);
            rt.block_on(edit_file(path, &keys, removed, &current, &target))?;
            Ok(Exit::Ok)
        }
        Target::Fleet(fleet) => runtime()?.block_on(async {
            let (desired, current) = both(file, &target, max).await?;
            let plan = Plan::of(&desired, &current);
            plan.print(out, prune);
            if dry_run || plan.is_empty(prune) {
                return Ok(Exit::Ok);
            }
            checked(&plan.result(&desired, &current, prune))?;
            let (keys, removed) = plan.writes(prune);
            // What the plan was made from: each id it touches must still hold it
            // when written, or nothing of it is (a key revoked meanwhile stays so).
            let read: HashMap<&str, &ApiKey> = current.iter().map(|k| (k.id(), k)).collect();
            let (keys, removed) = if fleet.splits_versions() {
                // Secrets that move between ids (swaps, renames), in one version first:
                // split across two, one secret would be under two ids in between.
                let (moving, rest) = Moving::of(keys, removed, current.iter())?;
                for batch in moving {
                    fleet
                        .change(&batch.keys, &batch.removed, Some(&read), true)
                        .await?;
                }
                (rest.keys, rest.removed)
            } else {
                (keys, removed.to_vec())
            };
            let total = keys.len() + removed.len();
            if total <= fleet.batch() {
                // One change (on PostgreSQL one version), whatever it holds.
                fleet.change(&keys, &removed, Some(&read), false).await?;
            } else {
                let bar = out.progress(total as u64, "applying");
                for chunk in keys.chunks(fleet.batch()) {
                    fleet.change(chunk, &[], Some(&read), false).await?;
                    bar.inc(chunk.len() as u64);
                }
                for chunk in removed.chunks(fleet.batch()) {
                    fleet.change(&[], chunk, Some(&read), false).await?;
                    bar.inc(chunk.len() as u64);
                }
                bar.finish_and_clear();
            }
            Ok(Exit::Ok)
        }),
    }
}

/// Writes `keys` into an existing namespace, in as few changes as its engine
/// allows (see [`Fleet::batch`]), with a progress bar. A namespace wiped meanwhile
/// is refused, never re-created holding only these keys.
async fn import_batches(fleet: &Fleet, keys: &[ApiKey], out: Out) -> Result<(), Failure> {
    let bar = out.progress(keys.len() as u64, "importing");
    for chunk in keys.chunks(fleet.batch()) {
        let set = KeySet::from_keys(chunk.iter().cloned())
            .map_err(|e| Failure::new(Exit::Invalid, e.to_string()))?;
        fleet.import_existing(&set, false).await?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Keys to write and ids to remove.
#[derive(Default)]
struct Moving {
    keys: Vec<ApiKey>,
    removed: Vec<String>,
}

impl Moving {
    /// The changes of a write that move secrets between ids, in batches of linked
    /// groups (see [`moving_batches`](crate::redis::moves::moving_batches)), each batch written as one
    /// version; and the rest. A linked group more than one version holds is refused.
    fn of<'a>(
        keys: Vec<ApiKey>,
        removed: &[String],
        stored: impl IntoIterator<Item = &'a ApiKey>,
    ) -> Result<(Vec<Self>, Self), Failure> {
        let max = crate::redis::MAX_VERSION_ENTRIES;
        let (batches, rest) = crate::redis::moves::moving_batches(
            &keys,
            removed,
            stored,
            crate::redis::CHUNK,
            max as usize,
        )
        .map_err(|n| {
            Failure::new(
                Exit::Invalid,
                format!(
                    "{n} changes move secrets between ids, linked (swaps, chains), \
                             more than one version of the namespace holds ({max}): nothing \
                             was written; apply them in smaller steps"
                ),
            )
        })?;
        let mut keys: Vec<Option<ApiKey>> = keys.into_iter().map(Some).collect();
        let mut pick = |m: &crate::redis::moves::Moves| Self {
            keys: m.keys.iter().filter_map(|&i| keys[i].take()).collect(),
            removed: m.removed.iter().map(|&j| removed[j].clone()).collect(),
        };
        let moving = batches.iter().map(&mut pick).collect();
        Ok((moving, pick(&rest)))
    }
}

/// Refuses a set of keys the file source would refuse (two ids for one secret).
fn checked(keys: &[ApiKey]) -> Result<(), Failure> {
    KeySet::from_keys(keys.iter().cloned())
        .map(drop)
        .map_err(|e| Failure::new(Exit::Invalid, format!("the result would be refused: {e}")))
}

/// The key file's write gate: writers in this process and, on Linux, in others.
fn gate<'a>(link: &'a Link, target: &Target) -> Result<crate::source::link::Gate<'a>, Failure> {
    link.write_gate().map_err(|e| {
        Failure::new(
            Exit::Unavailable,
            format!("{}: cannot take the write lock: {e}", target.describe()),
        )
    })
}

/// Writes a plan's `keys` and removes `removed` in the key file at `path`, all or
/// nothing, over the file as it is when written: each id touched must still hold
/// what `current` (what the plan was made from) holds, and every other entry, and
/// every comment, stays as it is then. A key revoked by hand while the plan was
/// made stays revoked; one the plan changes too refuses the write ([`Exit::Conflict`]).
async fn edit_file(
    path: &Path,
    keys: &[ApiKey],
    removed: &[String],
    current: &Current,
    target: &Target,
) -> Result<(), Failure> {
    let read: HashMap<&str, &ApiKey> = current.iter().map(|k| (k.id(), k)).collect();
    FileBackend::new(path)
        .change_many(keys, removed, &read)
        .await
        .map_err(|e| match e {
            BackendError::Conflict(id) => Failure::new(
                Exit::Conflict,
                format!(
                    "{}: the key file changed since it was read (key `{id}`): nothing was \
                     written; run `diff` and `apply` again",
                    target.describe()
                ),
            ),
            e => Target::backend_failure(&e),
        })
}

/// Replaces the key file, whole, atomically.
fn replace(path: &Path, keys: &[ApiKey], target: &Target) -> Result<(), Failure> {
    let text = write::file(keys);
    write::replace(path, text.as_bytes()).map_err(|e| {
        Failure::new(
            written_or_not(&e),
            format!("{}: cannot write: {e}", target.describe()),
        )
    })
}

/// How a failed whole-file write ends: nothing changed (3), or the new file in place
/// but not yet durable (7: it may be undone by a crash).
fn written_or_not(e: &std::io::Error) -> Exit {
    if write::not_synced(e) {
        Exit::OutcomeUnknown
    } else {
        Exit::Unavailable
    }
}
/// How a replica's snapshot opens (see `redis/snapshot.rs`).
const SNAPSHOT_HEADER: &str = "# tower-api-key replica snapshot:";

/// The first line of the file at `path`, if it can be read (at most 512 bytes).
fn first_line(path: &Path) -> Option<String> {
    use std::io::Read as _;
    let mut head = [0u8; 512];
    let n = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    let text = String::from_utf8_lossy(&head[..n]);
    text.lines().next().map(str::to_owned)
}

pub(crate) fn restore(file: &Path, args: &TargetArgs, max: u64, force: bool, out: Out) -> Done {
    let target = Target::of(args)?;
    let desired = read_input(file, max)?;
    // A replica's snapshot says which version it holds: said, so that an operator
    // sees whether it is the newest before the namespace is replaced by it.
    if let Some(line) = first_line(file).filter(|l| l.starts_with(SNAPSHOT_HEADER)) {
        eprintln!(
            "restoring from {}",
            output::one_line(line.trim_start_matches("# "))
        );
    }
    let exists_hint = |what: String| {
        Failure::new(
            Exit::Conflict,
            format!(
                "{what} exists: `restore` replaces it whole, changes made since the file was \
                 written included; add --force to replace it (or use `apply`)"
            ),
        )
    };
    match &target {
        Target::Api { .. } => return Err(target.cannot("restore")),
        Target::File(path) => {
            let link = Link::of(path);
            let _gate = gate(&link, &target)?;
            if std::fs::symlink_metadata(path).is_ok() && !force {
                return Err(exists_hint(target.describe()));
            }
            let keys: Vec<ApiKey> = desired.iter().cloned().collect();
            replace(path, &keys, &target)?;
        }
        Target::Fleet(fleet) => runtime()?.block_on(async {
            let exists = fleet
                .exists()
                .await
                .map_err(|e| fleet.failure(Exit::Unavailable, &e))?;
            if exists && !force {
                return Err(exists_hint(target.describe()));
            }
            let bar = out.spinner("restoring");
            if exists {
                fleet
                    .restore(&desired)
                    .await
                    .map_err(|e| fleet.failure(Exit::Unavailable, &e))?;
            } else {
                fleet.create(&desired, true).await?;
            }
            bar.finish_and_clear();
            Ok::<_, Failure>(())
        })?,
    }
    report(out, "restored", desired.len(), &target);
    Ok(Exit::Ok)
}

fn report(out: Out, what: &str, n: usize, target: &Target) {
    if out.json() {
        out.print_json(&json!({ what: n }));
    } else {
        output::line(&format!("{what} {n} keys into {}", target.describe()));
    }
}

pub(crate) fn import(file: &Path, args: &TargetArgs, max: u64, out: Out) -> Done {
    let target = Target::of(args)?;
    let desired = read_input(file, max)?;
    match &target {
        Target::Api { .. } => return Err(target.cannot("import")),
        Target::File(path) if std::fs::symlink_metadata(path).is_ok() => {
            let rt = runtime()?;
            let current = rt.block_on(target.read(max))?;
            let plan = Plan::of(&desired, &current);
            checked(&plan.result(&desired, &current, false))?;
            let (keys, _) = plan.writes(false);
            rt.block_on(edit_file(path, &keys, &[], &current, &target))?;
        }
        Target::File(path) => {
            let link = Link::of(path);
            let _gate = gate(&link, &target)?;
            let keys: Vec<ApiKey> = desired.iter().cloned().collect();
            checked(&keys)?;
            replace(path, &keys, &target)?;
        }
        Target::Fleet(fleet) => runtime()?.block_on(async {
            let exists = fleet
                .exists()
                .await
                .map_err(|e| fleet.failure(Exit::Unavailable, &e))?;
            if exists {
                // A key given the secret of a stored key it does not replace would
                // put one secret under two ids: replicas refuse both.
                let current = target.read(max).await?;
                desired.clashes_with(current.iter()).map_err(|e| {
                    Failure::new(
                        Exit::Invalid,
                        format!("the result would be refused: {e}; nothing was written"),
                    )
                })?;
                let keys: Vec<ApiKey> = desired.iter().cloned().collect();
                let keys = if fleet.splits_versions() {
                    // Secrets that move between ids, in one version first.
                    let (moving, rest) = Moving::of(keys, &[], current.iter())?;
                    for batch in moving {
                        let set = KeySet::from_keys(batch.keys)
                            .map_err(|e| Failure::new(Exit::Invalid, e.to_string()))?;
                        fleet.import_existing(&set, true).await?;
                    }
                    rest.keys
                } else {
                    keys
                };
                import_batches(fleet, &keys, out).await
            } else {
                // A namespace that does not exist is created with the file's keys,
                // whole, in one change.
                fleet.create(&desired, false).await
            }
        })?,
    }
    report(out, "imported", desired.len(), &target);
    Ok(Exit::Ok)
}

pub(crate) fn export(args: &TargetArgs, path: Option<&Path>, max: u64, out: Out) -> Done {
    let target = Target::of(args)?;
    if matches!(target, Target::Api { .. }) {
        return Err(target.cannot("export"));
    }
    let bar = out.spinner("exporting");
    let current = runtime()?.block_on(target.read(max));
    bar.finish_and_clear();
    let current = current?;
    let mut keys: Vec<&ApiKey> = current.iter().collect();
    keys.sort_unstable_by(|a, b| a.id().cmp(b.id()));
    if let Some(path) = path {
        write::replace(path, write::file(keys.iter().copied()).as_bytes()).map_err(|e| {
            Failure::new(
                written_or_not(&e),
                format!("cannot write {}: {e}", path.display()),
            )
        })?;
        if out.json() {
            out.print_json(&json!({ "exported": keys.len(), "file": path.display().to_string() }));
        } else {
            eprintln!("exported {} keys to {}", keys.len(), path.display());
        }
    } else if out.json() {
        let records: Vec<Value> = keys
            .iter()
            .map(|k| serde_json::from_str(&crate::key::record::encode(k)).unwrap_or(Value::Null))
            .collect();
        out.print_json(&Value::Array(records));
    } else {
        let text = write::file(keys.iter().copied());
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(text.as_bytes());
    }
    Ok(Exit::Ok)
}

/// One key's use.
struct Use {
    id: String,
    requests: u64,
    last_used: Option<SystemTime>,
    created_at: Option<SystemTime>,
}

impl Use {
    /// How long it has been idle: since its last use, or since its creation if never
    /// used (`None` if neither is known).
    fn idle(&self, now: SystemTime) -> Option<Duration> {
        self.last_used
            .or(self.created_at)
            .map(|t| now.duration_since(t).unwrap_or_default())
    }
}

pub(crate) fn usage(args: &TargetArgs, idle: Option<&str>, max: u64, out: Out) -> Done {
    let target = Target::of(args)?;
    let min_idle = idle.map(parse_duration).transpose()?;
    let mut uses = match &target {
        Target::File(_) => {
            return Err(Failure::new(
                Exit::Usage,
                "a key file keeps no usage: ask the fleet (--redis or --postgres) or a running \
                 API (--api)",
            ));
        }
        Target::Fleet(fleet) => runtime()?.block_on(async {
            let current = target.read(max).await?;
            let keys: Vec<&ApiKey> = current.iter().collect();
            let mut uses = Vec::with_capacity(keys.len());
            for chunk in keys.chunks(1000) {
                let ids: Vec<String> = chunk.iter().map(|k| k.id().to_owned()).collect();
                let counts = fleet
                    .usage(&ids)
                    .await
                    .map_err(|e| Target::backend_failure(&e))?
                    .unwrap_or_default();
                for (i, key) in chunk.iter().enumerate() {
                    let (requests, last_used) = counts.get(i).copied().unwrap_or((0, None));
                    uses.push(Use {
                        id: key.id().to_owned(),
                        requests,
                        last_used,
                        created_at: key.created_at(),
                    });
                }
            }
            Ok::<_, Failure>(uses)
        })?,
        Target::Api { .. } => runtime()?.block_on(async {
            let admin = target.admin(max, &[]).await?;
            let items = super::keys::list(&admin, None, None).await?;
            Ok::<_, Failure>(
                items
                    .iter()
                    .map(|item| {
                        let at = |v: Option<&Value>| v.and_then(Value::as_str).and_then(parse_time);
                        let usage = item.get("usage");
                        Use {
                            id: item
                                .get("id")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_owned(),
                            requests: usage
                                .and_then(|u| u.get("requests"))
                                .and_then(Value::as_u64)
                                .unwrap_or(0),
                            last_used: at(usage.and_then(|u| u.get("last_used"))),
                            created_at: at(item.get("created_at")),
                        }
                    })
                    .collect(),
            )
        })?,
    };
    let now = SystemTime::now();
    if let Some(min) = min_idle {
        uses.retain(|u| u.idle(now).is_none_or(|idle| idle >= min));
    }
    // Oldest use first; never used before used, by creation.
    uses.sort_by(|a, b| {
        (a.last_used.is_some(), a.last_used.or(a.created_at), &a.id).cmp(&(
            b.last_used.is_some(),
            b.last_used.or(b.created_at),
            &b.id,
        ))
    });
    let time = |t: Option<SystemTime>| t.map(crate::clock::rfc3339);
    if out.json() {
        let items: Vec<Value> = uses
            .iter()
            .map(|u| {
                json!({
                    "id": u.id,
                    "requests": u.requests,
                    "last_used": time(u.last_used),
                    "created_at": time(u.created_at),
                    "idle_seconds": u.idle(now).map(|d| d.as_secs()),
                })
            })
            .collect();
        out.print_json(&Value::Array(items));
    } else {
        let rows: Vec<Vec<String>> = uses
            .iter()
            .map(|u| {
                vec![
                    u.id.clone(),
                    u.requests.to_string(),
                    time(u.last_used).unwrap_or_else(|| "never".into()),
                    u.idle(now).map_or_else(|| "-".into(), days),
                ]
            })
            .collect();
        output::table(&["ID", "REQUESTS", "LAST USED", "IDLE"], &rows);
    }
    Ok(Exit::Ok)
}

fn days(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86_400 {
        format!("{}d", s / 86_400)
    } else if s >= 3600 {
        format!("{}h", s / 3600)
    } else {
        format!("{}m", s / 60)
    }
}

/// `30d`, `12h`, `15m`, `90s`, `2w`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, Failure> {
    let bad = || {
        Failure::new(
            Exit::Usage,
            format!("--idle {text}: a number and a unit: s, m, h, d or w (e.g. 30d)"),
        )
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(bad()),
    };
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

fn parse_time(text: &str) -> Option<SystemTime> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    let ns = t.unix_timestamp_nanos();
    let ns = u64::try_from(ns).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tester's finding: `apply` read the file, made its plan, and wrote the whole
    /// file from what it had read, so a revocation saved by hand in between was
    /// undone (and every comment dropped).
    #[tokio::test]
    async fn a_hand_edit_saved_while_apply_runs_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let original = "# the team's keys\n[[keys]]\nid = \"k7\"\nsecret = \"s3cr3t-k7-000\"\n\n\
                        [[keys]]\nid = \"other\"\nsecret = \"s3cr3t-other-000\"\n";
        std::fs::write(&path, original).unwrap();
        let target = Target::File(path.clone());
        let current = target.read(1 << 20).await.unwrap();
        let keys = |extra: ApiKey| {
            KeySet::from_keys([
                ApiKey::new("k7", "s3cr3t-k7-000"),
                ApiKey::new("other", "s3cr3t-other-000"),
                extra,
            ])
            .unwrap()
        };
        let desired = keys(ApiKey::new("added", "s3cr3t-added-000"));
        let plan = Plan::of(&desired, &current);
        let revoked = original.replace("id = \"k7\"\n", "id = \"k7\"\ndisabled = true\n");
        std::fs::write(&path, &revoked).unwrap();
        let (write, removed) = plan.writes(false);
        edit_file(&path, &write, removed, &current, &target)
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let set = crate::FileSource::parse(&path, text.as_bytes()).unwrap();
        assert!(set.get("k7").unwrap().is_disabled(), "{text}");
        assert!(set.get("added").is_some(), "{text}");
        assert!(text.starts_with("# the team's keys\n"), "{text}");
        assert!(text.contains("secret = \"s3cr3t-other-000\""), "{text}");

        // A plan that changes the key edited meanwhile writes nothing at all.
        let desired = keys(ApiKey::new("k7b", "s3cr3t-k7b-000"));
        let mut plan = Plan::of(&desired, &current);
        plan.changed.push((
            ApiKey::new("k7", "s3cr3t-k7-000").with_owner("x"),
            vec!["owner"],
        ));
        let before = std::fs::read(&path).unwrap();
        let (write, removed) = plan.writes(false);
        let err = edit_file(&path, &write, removed, &current, &target)
            .await
            .unwrap_err();
        assert_eq!(err.exit, Exit::Conflict, "{}", err.message);
        assert!(err.message.contains("`k7`"), "{}", err.message);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    /// A tester's finding: a key file without the record the API keeps of a key
    /// (as one kept in version control is) made `diff` report `created_at` and
    /// `created_by` as changes, and `apply` erase them.
    #[test]
    fn what_the_file_does_not_say_of_a_key_s_record_is_kept() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let recorded = ApiKey::new("k", "s")
            .with_created_at(at)
            .with_created_by("admin")
            .with_rotated_from("k0");
        let current = Current::List(vec![recorded.clone()]);
        let desired = KeySet::from_keys([ApiKey::new("k", "s")]).unwrap();
        assert!(Plan::of(&desired, &current).is_empty(true));
        let desired = KeySet::from_keys([ApiKey::new("k", "s").with_owner("o")]).unwrap();
        let plan = Plan::of(&desired, &current);
        assert_eq!(plan.changed[0].1, ["owner"]);
        let written = &plan.changed[0].0;
        assert_eq!(written.created_at(), Some(at));
        assert_eq!(written.created_by(), Some("admin"));
        assert_eq!(written.rotated_from(), Some("k0"));
        // Given in the file, it is applied.
        let desired =
            KeySet::from_keys([ApiKey::new("k", "s").with_created_by("someone")]).unwrap();
        assert_eq!(Plan::of(&desired, &current).changed[0].1, ["created_by"]);
    }

    /// A reviewer's findings: `apply --prune` refused a key renamed with its secret
    /// (the new id was checked against the old, not yet removed), and removing a
    /// key removed the file's header comment and the comment ending the key before.
    #[tokio::test]
    async fn prune_renames_a_key_and_keeps_what_is_not_the_removed_key_s() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let original = "# MANAGED BY TEAM X\n\n[[keys]]\nid = \"old\"\nsecret = \"old-secret-0001\"\n\
                        # the end of old's notes\n\n# old2, to go\n[[keys]]\nid = \"old2\"\n\
                        secret = \"old2-secret-0001\"\n\n[[keys]]\nid = \"keep\"\n\
                        secret = \"keep-secret-0002\"\n";
        std::fs::write(&path, original).unwrap();
        let target = Target::File(path.clone());
        let current = target.read(1 << 20).await.unwrap();
        let desired = KeySet::from_keys([
            ApiKey::new("keep", "keep-secret-0002"),
            ApiKey::new("renamed", "old-secret-0001"),
        ])
        .unwrap();
        let plan = Plan::of(&desired, &current);
        let (write, removed) = plan.writes(true);
        edit_file(&path, &write, removed, &current, &target)
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let set = crate::FileSource::parse(&path, text.as_bytes()).unwrap();
        let mut ids: Vec<&str> = set.iter().map(ApiKey::id).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["keep", "renamed"], "{text}");
        assert!(text.starts_with("# MANAGED BY TEAM X\n\n"), "{text}");
        assert!(text.contains("# the end of old's notes\n"), "{text}");
        assert!(!text.contains("# old2, to go"), "{text}");

        // Every key removed, then one added: the comments left stay through both.
        for desired in [
            KeySet::new(),
            KeySet::from_keys([ApiKey::new("n", "n-secret-0003")]).unwrap(),
        ] {
            let current = target.read(1 << 20).await.unwrap();
            let plan = Plan::of(&desired, &current);
            let (write, removed) = plan.writes(true);
            edit_file(&path, &write, removed, &current, &target)
                .await
                .unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.starts_with("# MANAGED BY TEAM X\n\n"), "{text}");
            assert!(text.contains("# the end of old's notes\n"), "{text}");
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let set = crate::FileSource::parse(&path, text.as_bytes()).unwrap();
        assert_eq!(
            set.iter().map(ApiKey::id).collect::<Vec<_>>(),
            ["n"],
            "{text}"
        );
    }

    #[test]
    fn a_plan_names_added_changed_fields_and_removed() {
        let current = Current::List(vec![
            ApiKey::new("same", "s1").with_scopes(["read"]),
            ApiKey::new("moved", "s2").with_owner("a"),
            ApiKey::new("gone", "s3"),
        ]);
        let desired = KeySet::from_keys([
            ApiKey::new("same", "s1").with_scopes(["read"]),
            ApiKey::new("moved", "s2b").with_owner("b"),
            ApiKey::new("new", "s4"),
        ])
        .unwrap();
        let plan = Plan::of(&desired, &current);
        assert_eq!(
            plan.added.iter().map(|k| k.id()).collect::<Vec<_>>(),
            ["new"]
        );
        assert_eq!(plan.changed.len(), 1);
        assert_eq!(plan.changed[0].0.id(), "moved");
        assert_eq!(plan.changed[0].1, ["sha256", "owner"]);
        assert_eq!(plan.removed, ["gone"]);
        let kept = plan.result(&desired, &current, false);
        assert_eq!(
            kept.iter().map(|k| k.id()).collect::<Vec<_>>(),
            ["same", "moved", "gone", "new"]
        );
        assert_eq!(plan.result(&desired, &current, true).len(), 3);
    }

    #[test]
    fn a_change_of_limits_alone_is_a_change_and_their_order_is_not() {
        use crate::limit::{Quota, QuotaPeriod, RateLimit};
        let burst = RateLimit::new("burst", 10, Duration::from_secs(1));
        let daily = RateLimit::new("daily", 1000, Duration::from_secs(86_400));
        let nets = [
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
        ];
        let plain = ApiKey::new("k", "s");
        let limited = plain
            .clone()
            .with_rate_limit(burst.clone())
            .with_rate_limit(daily.clone())
            .with_quota(Quota::new(5, QuotaPeriod::Day))
            .with_allowed_ips(nets);
        assert_eq!(
            differences(&limited, &plain),
            ["rate_limits", "quota", "allowed_ips"]
        );
        let reordered = plain
            .clone()
            .with_rate_limit(daily)
            .with_rate_limit(burst.clone())
            .with_quota(Quota::new(5, QuotaPeriod::Day))
            .with_allowed_ips(nets.into_iter().rev());
        assert!(differences(&limited, &reordered).is_empty());
        let fewer = plain.clone().with_rate_limit(burst);
        assert_eq!(
            differences(&limited, &fewer),
            ["rate_limits", "quota", "allowed_ips"]
        );
        // No networks listed is not "any network".
        let none: [crate::limit::IpNet; 0] = [];
        assert_eq!(
            differences(&plain.clone().with_allowed_ips(none), &plain),
            ["allowed_ips"]
        );
    }

    /// Keys from a small pool of ids, each with one of a few secrets, owners and
    /// limits, so that sets overlap, differ by field (limits alone included), and
    /// sometimes share a secret.
    fn keys() -> impl proptest::strategy::Strategy<Value = Vec<ApiKey>> {
        use crate::limit::{Quota, QuotaPeriod, RateLimit};
        use proptest::prelude::*;
        proptest::collection::vec((0..12u8, 0..3u8, 0..3u8, 0..5u8), 0..12).prop_map(|picks| {
            let mut seen = std::collections::HashSet::new();
            picks
                .into_iter()
                .filter(|(id, ..)| seen.insert(*id))
                .map(|(id, secret, owner, limits)| {
                    let mut key = ApiKey::new(format!("k{id}"), format!("s{id}-{secret}"));
                    if owner != 0 {
                        key = key.with_owner(format!("o{owner}"));
                    }
                    match limits {
                        1 => {
                            key.with_rate_limit(RateLimit::new("burst", 10, Duration::from_secs(1)))
                        }
                        2 => {
                            key.with_rate_limit(RateLimit::new("burst", 20, Duration::from_secs(1)))
                        }
                        3 => key.with_quota(Quota::new(100, QuotaPeriod::Month)),
                        4 => key.with_allowed_ips(["10.0.0.1/32".parse().unwrap()]),
                        _ => key,
                    }
                })
                .collect()
        })
    }

    proptest::proptest! {
        /// What `apply` writes, read back, differs from the file in nothing: with
        /// `--prune` the target then holds exactly the file's keys; without, the
        /// file's keys and every key it does not name, unchanged.
        #[test]
        fn applying_a_plan_leaves_nothing_to_apply(current in keys(), desired in keys()) {
            let Ok(desired) = KeySet::from_keys(desired) else { return Ok(()) };
            let current = Current::List(current);
            // `differences` names every field the key file holds: two keys it finds
            // the same are written the same.
            for now in current.iter() {
                if let Some(want) = desired.get(now.id()) {
                    proptest::prop_assert_eq!(
                        differences(want, now).is_empty(),
                        write::entry(want) == write::entry(now)
                    );
                }
            }
            for prune in [false, true] {
                let plan = Plan::of(&desired, &current);
                let after = Current::List(plan.result(&desired, &current, prune));
                let again = Plan::of(&desired, &after);
                proptest::prop_assert!(again.added.is_empty() && again.changed.is_empty());
                let kept: Vec<&str> = current
                    .iter()
                    .filter(|k| desired.get(k.id()).is_none())
                    .map(ApiKey::id)
                    .collect();
                if prune {
                    proptest::prop_assert!(again.removed.is_empty());
                } else {
                    let mut kept = kept.clone();
                    kept.sort_unstable();
                    proptest::prop_assert_eq!(&again.removed, &kept);
                    for id in kept {
                        let before = current.iter().find(|k| k.id() == id);
                        let now = after.iter().find(|k| k.id() == id);
                        proptest::prop_assert!(before.zip(now).is_some_and(|(a, b)| differences(a, b).is_empty()));
                    }
                }
            }
        }
    }

    #[test]
    fn durations_take_a_unit_and_refuse_anything_else() {
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        for bad in ["", "d", "30", "30x", "-1d", "99999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
