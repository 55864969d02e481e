//! The operator's command line (feature `cli`): the `tower-api-key` binary.
//!
//! ```sh
//! cargo install tower-api-key --features cli
//! tower-api-key check keys.toml                       # exit 1 if it would be refused
//! tower-api-key generate acme ci-2026-12 --secret-file ci.key >> entry.toml
//! tower-api-key keys list --redis "$REDIS_URL" --namespace payments
//! tower-api-key diff keys.toml --redis "$REDIS_URL" --namespace payments
//! tower-api-key apply keys.toml --postgres "$DATABASE_URL" --namespace payments
//! tower-api-key usage --api https://admin.internal --idle 30d
//! ```
//!
//! Every command works on one target: a key file (`--file PATH`), a Redis namespace
//! (`--redis URL --namespace NS`), a PostgreSQL namespace (`--postgres URL
//! --namespace NS`) or a running key-management API (`--api URL`, its admin key from
//! `TOWER_API_KEY_ADMIN_KEY` or `--admin-key-stdin`). `keys …` against a file or a
//! namespace runs the crate's own [`AdminApi`](crate::admin::AdminApi) in the
//! process, authenticated by an operator key (`cli:$USER`, scope `admin`) that lives
//! only in memory: every rule, error and audit event (printed on standard error) is
//! the API's own.
//!
//! # Exit codes
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done (a diff that found no difference; a dry run) |
//! | 1 | invalid: a key file that does not check, a change refused as invalid, or a diff that found differences |
//! | 2 | usage: bad arguments, a malformed URL, an operation the target cannot do |
//! | 3 | unavailable: the target cannot be reached or read; nothing was changed |
//! | 4 | conflict: an id taken, a version that changed, a file that exists |
//! | 5 | not found: no such key |
//! | 6 | denied: the admin key is not accepted or lacks a scope |
//! | 7 | outcome unknown: a write may or may not have happened; read before retrying |
//! | 8 | store missing: the namespace (or key file) is wiped or was never created |
//!
//! Secrets never come from the command line (other users can read it in `/proc`)
//! and are never printed in errors; URLs, which may hold passwords, are never printed.

mod args;
mod keys;
mod output;
mod sync;
mod target;

use std::{
    io::{Read as _, Write as _},
    path::Path,
    process::ExitCode,
};

use clap::{CommandFactory as _, Parser as _};

use self::{
    args::{Cli, Command},
    output::Out,
};
use crate::{ApiKey, KeySource as _};

/// A documented exit status of the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// 0: done.
    Ok,
    /// 1: a key file that does not check, a change refused as invalid, or a diff
    /// that found differences.
    Invalid,
    /// 2: bad arguments, a malformed URL, an operation the target cannot do.
    Usage,
    /// 3: the target cannot be reached or read; nothing was changed.
    Unavailable,
    /// 4: an id taken, a version that changed, a file that exists.
    Conflict,
    /// 5: no such key.
    NotFound,
    /// 6: the admin key is not accepted or lacks a scope.
    Denied,
    /// 7: a write may or may not have happened.
    OutcomeUnknown,
    /// 8: the namespace (or key file) is wiped or was never created.
    StoreMissing,
}

impl Exit {
    /// The process exit status.
    ///
    /// ```
    /// use tower_api_key::cli::Exit;
    ///
    /// assert_eq!(Exit::Ok.code(), 0);
    /// assert_eq!(Exit::StoreMissing.code(), 8);
    /// ```
    pub fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::Invalid => 1,
            Self::Usage => 2,
            Self::Unavailable => 3,
            Self::Conflict => 4,
            Self::NotFound => 5,
            Self::Denied => 6,
            Self::OutcomeUnknown => 7,
            Self::StoreMissing => 8,
        }
    }
}

/// Why a command failed: the exit status and a one-line message that names files,
/// lines and key ids, never a secret or a URL.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) exit: Exit,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
        }
    }
}

/// What a command ends with.
pub(crate) type Done = Result<Exit, Failure>;

/// Runs the command line with the process's arguments, and returns its exit status:
/// the whole `tower-api-key` binary.
///
/// ```no_run
/// // src/bin/tower-api-key.rs, whole:
/// fn main() -> std::process::ExitCode {
///     tower_api_key::cli::main()
/// }
/// ```
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_tracing();
    let out = Out::new(cli.output);
    let exit = match run(cli, out) {
        Ok(exit) => exit,
        Err(failure) => {
            // One line: a message never spans more.
            let message = failure.message.replace(['\n', '\r'], " ");
            eprintln!("tower-api-key: {message}");
            failure.exit
        }
    };
    ExitCode::from(exit.code())
}

/// Audit events (target `tower_api_key::audit`) and warnings on standard error;
/// `RUST_LOG` overrides.
fn init_tracing() {
    {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("error,tower_api_key::audit=info")
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    }
}

fn run(cli: Cli, out: Out) -> Done {
    let max = cli.max_size;
    let _ = target::API_TIMEOUT.set(std::time::Duration::from_secs(cli.timeout.max(1)));
    match cli.command {
        Command::Check { files } => check(&files, max, out),
        Command::Generate {
            prefix,
            id,
            secret_file,
        } => generate(&prefix, id, secret_file.as_deref(), out),
        Command::Hash { id } => hash(&id, out),
        Command::Keys { command } => keys::run(command, max, out),
        Command::Diff { input, target } => sync::diff(&input, &target, max, out),
        Command::Apply {
            input,
            target,
            dry_run,
            prune,
        } => sync::apply(&input, &target, max, dry_run, prune, out),
        Command::Restore {
            input,
            target,
            force,
        } => sync::restore(&input, &target, max, force, out),
        Command::Export { target, out: path } => sync::export(&target, path.as_deref(), max, out),
        Command::Import { input, target } => sync::import(&input, &target, max, out),
        Command::Usage { target, idle } => sync::usage(&target, idle.as_deref(), max, out),
        Command::Completions { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "tower-api-key", &mut std::io::stdout());
            Ok(Exit::Ok)
        }
    }
}

/// Reads a key file given as input, exactly as the file source does: a missing
/// file, a FIFO, a file over the limit or one that does not parse is
/// [`Exit::Invalid`].
pub(crate) fn read_input(path: &Path, max: u64) -> Result<crate::KeySet, Failure> {
    crate::FileSource::new(path)
        .with_max_size(max)
        .load()
        .map_err(|e| Failure::new(Exit::Invalid, chain(&e)))
}

/// An error and every error under it, on one line.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::error::Chain(e).to_string()
}

fn check(files: &[std::path::PathBuf], max: u64, out: Out) -> Done {
    let mut failed = false;
    let mut report = Vec::new();
    for path in files {
        match read_input(path, max) {
            Ok(set) => {
                if !out.json() {
                    output::line(&format!("{}: ok, {} keys", path.display(), set.len()));
                }
                report.push(serde_json::json!({
                    "file": path.display().to_string(), "ok": true, "keys": set.len(),
                }));
                // The process ends soon: a million keys need not be freed one by one.
                std::mem::forget(set);
            }
            Err(failure) => {
                failed = true;
                if !out.json() {
                    eprintln!("{}", failure.message.replace(['\n', '\r'], " "));
                }
                let line = crate::FileSource::new(path)
                    .with_max_size(max)
                    .load()
                    .err()
                    .and_then(|e| e.line());
                report.push(serde_json::json!({
                    "file": path.display().to_string(), "ok": false,
                    "line": line, "error": failure.message,
                }));
            }
        }
    }
    if out.json() {
        out.print_json(&serde_json::json!({ "files": report }));
    }
    Ok(if failed { Exit::Invalid } else { Exit::Ok })
}

/// A new secret's file: created (exclusively, readable by its owner only, never over
/// an existing file or through a link) *before* the key is written, so that a file
/// that cannot be made costs no key; the secret is written into it once the key
/// exists. Dropped unwritten (the key's write failed or never happened), the empty
/// file is removed.
#[derive(Debug)]
pub(crate) struct SecretFile {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
}

impl SecretFile {
    /// Creates the empty file. One that exists is [`Exit::Conflict`].
    pub(crate) fn create(path: &Path) -> Result<Self, Failure> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(|e| {
            let exit = if e.kind() == std::io::ErrorKind::AlreadyExists {
                Exit::Conflict
            } else {
                Exit::Unavailable
            };
            Failure::new(
                exit,
                format!(
                    "cannot create the secret file {} (it is never overwritten): {e}",
                    path.display()
                ),
            )
        })?;
        Ok(Self {
            path: path.to_owned(),
            file: Some(file),
        })
    }

    /// Writes the secret and a newline, and syncs them to disk. If that fails the
    /// file is removed and the failure says so (never the secret).
    pub(crate) fn write(mut self, secret: &str) -> Result<(), Failure> {
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        let written = file
            .write_all(secret.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all());
        match written {
            Ok(()) => Ok(()),
            Err(e) => {
                self.remove(&file);
                Err(Failure::new(
                    Exit::Unavailable,
                    format!("cannot write the secret file {}: {e}", self.path.display()),
                ))
            }
        }
    }

    /// Removes the file this created, if the path still names it.
    fn remove(&self, file: &std::fs::File) {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            let same = file
                .metadata()
                .ok()
                .zip(std::fs::symlink_metadata(&self.path).ok())
                .is_some_and(|(a, b)| a.dev() == b.dev() && a.ino() == b.ino());
            if !same {
                return;
            }
        }
        #[cfg(not(unix))]
        let _ = file;
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            self.remove(&file);
        }
    }
}

fn generate(prefix: &str, id: Option<String>, secret_file: Option<&Path>, out: Out) -> Done {
    let key = crate::generate(prefix).map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
    let id = id.unwrap_or_else(|| {
        let today = crate::clock::rfc3339(std::time::SystemTime::now());
        format!("{prefix}-{}", today.get(..10).unwrap_or("new"))
    });
    crate::key::validate_id(&id).map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
    let entry = key.toml_entry(&id);
    if let Some(path) = secret_file {
        SecretFile::create(path)?.write(key.secret())?;
    }
    if out.json() {
        let mut doc = serde_json::json!({
            "id": id, "sha256": key.sha256_hex(), "entry": entry,
        });
        if secret_file.is_none() {
            doc["key"] = key.secret().into();
        }
        out.print_json(&doc);
    } else if secret_file.is_some() {
        output::line(entry.trim_end());
    } else {
        output::line(key.secret());
        eprint!("{entry}");
    }
    Ok(Exit::Ok)
}

/// The most bytes read from standard input for one key.
const MAX_SECRET: u64 = 4096;

/// Reads one secret from standard input: one line, its line ending dropped.
pub(crate) fn read_secret_stdin(what: &str) -> Result<zeroize::Zeroizing<String>, Failure> {
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    std::io::stdin()
        .take(MAX_SECRET + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::new(Exit::Usage, format!("cannot read {what}: {e}")))?;
    if bytes.len() as u64 > MAX_SECRET {
        return Err(Failure::new(
            Exit::Usage,
            format!("{what} on standard input is longer than {MAX_SECRET} bytes"),
        ));
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Failure::new(Exit::Usage, format!("{what} is not UTF-8")))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() || text.contains(['\n', '\r']) {
        return Err(Failure::new(
            Exit::Usage,
            format!("standard input must hold {what} on one line"),
        ));
    }
    Ok(zeroize::Zeroizing::new(text.to_owned()))
}

fn hash(id: &str, out: Out) -> Done {
    crate::key::validate_id(id).map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
    let secret = read_secret_stdin("the key")?;
    let key = ApiKey::new(id, secret.as_bytes());
    let entry = crate::source::key_file::write::entry(&key);
    if out.json() {
        out.print_json(&serde_json::json!({
            "id": id, "sha256": key.digest.to_hex(), "entry": entry,
        }));
    } else {
        output::line(entry.trim_end());
    }
    Ok(Exit::Ok)
}
