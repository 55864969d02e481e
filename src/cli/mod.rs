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
//! | 1 | invalid: a key file or a stored record that does not check, a change refused as invalid, or a diff that found differences |
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

use std::{io::Write as _, path::Path, process::ExitCode};

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
    /// 1: a key file or a stored record that does not check (a corrupt record in
    /// Redis or PostgreSQL), a change refused as invalid, or a diff that found
    /// differences.
    Invalid,
    /// 2: bad arguments, a malformed URL, an operation the target cannot do.
    Usage,
    /// 3: the target cannot be reached, read or written; nothing was changed.
    Unavailable,
    /// 4: an id taken, a version that changed, a file that exists.
    Conflict,
    /// 5: no such key.
    NotFound,
    /// 6: the admin key is not accepted or lacks a scope.
    Denied,
    /// 7: a write may or may not have happened (or happened but may not survive
    /// a crash).
    OutcomeUnknown,
    /// 8: the namespace (or key file) is wiped or was never created.
    StoreMissing,
    /// 9: a new key was written, but its secret file could not be: the message
    /// says where the secret is if it was kept, else revoke the key.
    SecretNotSaved,
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
            Self::SecretNotSaved => 9,
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
        Err(e) if e.use_stderr() => {
            // clap repeats what it could not place, and that may be a URL with a
            // password in it.
            eprint!(
                "{}",
                output::visible(&without_credentials(&e.render().to_string()))
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    init_tracing();
    let out = Out::new(cli.output);
    let exit = match run(cli, out) {
        Ok(exit) => exit,
        Err(failure) => {
            // One line: a message never spans more, nor drives the terminal, nor
            // repeats a password (a URL given where a file was expected).
            let message = without_credentials(&failure.message);
            eprintln!("tower-api-key: {}", output::one_line(&message));
            failure.exit
        }
    };
    ExitCode::from(exit.code())
}

/// `text` with the user and password of every `scheme://user:password@host` in it,
/// and the value of every libpq `password=…`, replaced by `***`.
fn without_credentials(text: &str) -> String {
    without_keyword_password(&without_url_credentials(text))
}

/// `text` with the value of every `password = …` (libpq's keyword form, quoted or
/// not, any case, spaces around `=`) replaced by `***`.
fn without_keyword_password(text: &str) -> String {
    const KEYWORD: &[u8] = b"password";
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut at = 0;
    while at + KEYWORD.len() <= bytes.len() {
        if !bytes[at..at + KEYWORD.len()].eq_ignore_ascii_case(KEYWORD) {
            at += 1;
            continue;
        }
        let mut i = at + KEYWORD.len();
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if bytes.get(i) != Some(&b'=') {
            at += 1;
            continue;
        }
        i += 1;
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        // The value: quoted, to its closing quote; bare, to the next whitespace. A
        // backslash takes the character after it into the value, in both.
        let quoted = bytes.get(i) == Some(&b'\'');
        let mut end = i + usize::from(quoted);
        while let Some(&b) = bytes.get(end) {
            match b {
                b'\\' => end += 2,
                b'\'' if quoted => {
                    end += 1;
                    break;
                }
                b if !quoted && b.is_ascii_whitespace() => break,
                _ => end += 1,
            }
        }
        // Past a backslash that ends the text, or in the middle of a character it
        // took: on to the next boundary.
        let mut end = end.min(bytes.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push_str(&text[copied..i]);
        out.push_str("***");
        copied = end;
        at = end.max(at + 1);
    }
    out.push_str(&text[copied..]);
    out
}

/// `text` with the user and password of every `scheme://user:password@host` in it
/// replaced by `***`.
fn without_url_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // Credentials end at the last `@` before the next space: a password may hold
        // a quote, `#` or `/` as typed (unencoded), and masking a path that holds a
        // `@` as well costs nothing but a few characters of a message.
        let end = tail.find(char::is_whitespace).unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(user_end) => {
                out.push_str("***");
                rest = &tail[user_end..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
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

/// The runtime the commands run on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::new(Exit::Unavailable, format!("cannot start a runtime: {e}")))
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
                    let message = without_credentials(&failure.message);
                    eprintln!("{}", output::one_line(&message));
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

/// A new key's secret file (`--secret-file`). The secret is written to a temporary
/// file (0600) beside it, made before the key is, and linked under the asked name
/// only once it holds the whole secret, synced: a command killed on the way leaves
/// no empty file in the way of its retry, and the name is never overwritten (a link
/// fails where anything is there).
#[derive(Debug)]
pub(crate) struct SecretFile {
    path: std::path::PathBuf,
    temp: Option<tempfile::NamedTempFile>,
}

impl SecretFile {
    /// Makes the temporary file. A name that is taken (a file, a link, anything) is
    /// [`Exit::Conflict`]; a directory that cannot take a file, [`Exit::Unavailable`].
    pub(crate) fn create(path: &Path) -> Result<Self, Failure> {
        let refuse = |exit, why: &dyn std::fmt::Display| {
            Failure::new(
                exit,
                format!("cannot create the secret file {}: {why}", path.display()),
            )
        };
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(refuse(
                Exit::Conflict,
                &"something is there already, and it is never overwritten",
            ));
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // tempfile makes it exclusively, readable by its owner only.
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| refuse(Exit::Unavailable, &e))?;
        Ok(Self {
            path: path.to_owned(),
            temp: Some(temp),
        })
    }

    /// Writes the secret and a newline, syncs them, and links the file under its
    /// name. On failure the temporary file is removed, unless it holds the secret
    /// and only the link failed: then the failure names where the secret is.
    pub(crate) fn write(mut self, secret: &str) -> Result<(), Failure> {
        let Some(mut temp) = self.temp.take() else {
            return Ok(());
        };
        let written = temp
            .write_all(secret.as_bytes())
            .and_then(|()| temp.write_all(b"\n"))
            .and_then(|()| temp.as_file().sync_all());
        if let Err(e) = written {
            return Err(Failure::new(
                Exit::Unavailable,
                format!("cannot write the secret file {}: {e}", self.path.display()),
            ));
        }
        match std::fs::hard_link(temp.path(), &self.path) {
            Ok(()) => {
                // The temporary name goes; the file stays under its own.
                drop(temp);
                if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
                }
                Ok(())
            }
            Err(e) => {
                let kept = temp.into_temp_path().keep().ok();
                let exit = match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Exit::Conflict,
                    _ => Exit::Unavailable,
                };
                Err(Failure::new(
                    exit,
                    match kept {
                        Some(kept) => format!(
                            "cannot name the secret file {}: {e}; the secret is in {}",
                            self.path.display(),
                            kept.display()
                        ),
                        None => format!("cannot name the secret file {}: {e}", self.path.display()),
                    },
                ))
            }
        }
    }
}

fn generate(prefix: &str, id: Option<String>, secret_file: Option<&Path>, out: Out) -> Done {
    let key = crate::generate(prefix).map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
    let id = id.unwrap_or_else(|| {
        let today = crate::clock::rfc3339(std::time::SystemTime::now());
        format!("{prefix}-{}", today.get(..10).unwrap_or("new"))
    });
    let entry = key
        .toml_entry(&id)
        .map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
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
    // Read into buffers wiped as they are outgrown: a secret piped in is longer than
    // a first guess.
    let bytes = crate::source::read::read_wiping(std::io::stdin(), 256, MAX_SECRET + 1)
        .map(zeroize::Zeroizing::new)
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
    // A key no request can present (padded with spaces, a control character) would
    // give a digest that never matches: refused as `check` refuses it in a file.
    key.validate()
        .map_err(|e| Failure::new(Exit::Usage, chain(&e)))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_a_message_are_masked() {
        let message = "error: unexpected argument 'postgres://u:hunter2@h/db' found; \
                       also rediss://:p%40ss@cache:6380/0, redis://pw@h and http://host/x@y";
        let masked = without_credentials(message);
        for secret in ["hunter2", "p%40ss", "pw@"] {
            assert!(!masked.contains(secret), "{masked}");
        }
        assert!(masked.contains("'postgres://***@h/db'"), "{masked}");
        assert!(masked.contains("rediss://***@cache:6380/0"), "{masked}");
        assert!(masked.contains("http://***@y"), "{masked}");
        // Quotes, `#` and `/` typed unencoded in a password.
        for url in [
            "postgres://app:pa'ss@db/keys",
            "'postgres://app:pa'ss@db/keys'",
            "postgres://app:s3cr#t@db/keys",
            "postgres://app:s3/cr@db/keys",
        ] {
            let masked = without_credentials(&format!("cannot read {url}: no such file"));
            assert!(
                !masked.contains("pa'ss") && !masked.contains("s3"),
                "{masked}"
            );
            assert!(masked.contains("***@db/keys"), "{masked}");
        }
        assert_eq!(without_credentials("no url here"), "no url here");
        // libpq's keyword form, bare or quoted, wherever it is repeated.
        let masked = without_credentials(
            "error: unexpected argument 'host=127.0.0.1 password=secretpw user=u' found; \
             dbname=x password='it\\'s hidden' port=1; password=",
        );
        assert!(
            !masked.contains("secretpw") && !masked.contains("hidden"),
            "{masked}"
        );
        assert!(
            masked.contains("'host=127.0.0.1 password=*** user=u'"),
            "{masked}"
        );
        assert!(
            masked.contains("dbname=x password=*** port=1; password=***"),
            "{masked}"
        );
        // Any case, spaces or tabs around `=`, escapes and quotes inside a bare value.
        for form in [
            "PASSWORD=s3cret",
            "Password = s3cret",
            "password\t=s3cret",
            "password=ab\\ s3cret",
            "password=ab\\'s3cret",
            "password=ab\"s3cret",
            "x password='s3cret", // unterminated: to the end
        ] {
            let masked = without_credentials(&format!("cannot read {form} here"));
            assert!(!masked.contains("s3cret"), "{form}: {masked}");
        }
        // Multi-byte text around it stays whole; a backslash at the very end too.
        assert_eq!(
            without_credentials("clé password=é x"),
            "clé password=*** x"
        );
        assert_eq!(without_credentials("password=x\\"), "password=***");
        assert_eq!(without_credentials("password=ab\\é x"), "password=*** x");
    }

    #[test]
    fn a_name_taken_while_the_key_was_written_keeps_the_secret_and_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.key");
        let file = SecretFile::create(&path).unwrap();
        std::fs::write(&path, "someone else's\n").unwrap();
        let failure = file.write("tak_secret").unwrap_err();
        assert_eq!(failure.exit.code(), Exit::Conflict.code());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "someone else's\n");
        let kept = failure.message.rsplit("the secret is in ").next().unwrap();
        assert_eq!(std::fs::read_to_string(kept).unwrap(), "tak_secret\n");
        assert!(!failure.message.contains("tak_secret"));
    }

    #[test]
    fn an_unwritten_secret_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        drop(SecretFile::create(&dir.path().join("new.key")).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
