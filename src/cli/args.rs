//! The command line's grammar, as clap reads it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The exit codes, as `--help` shows them (kept in step with [`super::Exit`]).
const EXIT_CODES: &str = "\
Exit codes:
  0  done (a diff that found no difference; a dry run)
  1  invalid: a key file or a stored record that does not check, a change the
     target refused as invalid, or a diff that found differences
  2  usage: bad arguments, a malformed URL, an operation the target cannot do
  3  unavailable: the target cannot be reached, read or written (nothing was
     changed)
  4  conflict: an id taken, a version that changed, a file that exists
  5  not found: no such key
  6  denied: the admin key is not accepted or lacks a scope
  7  outcome unknown: a write may or may not have happened; read before retrying
  8  store missing: the namespace is wiped or was never created (see `restore`)
  9  secret not saved: a new key was written but not its --secret-file (the
     message says where the secret is, if it was kept; else revoke the key)

Secrets are never taken from the command line: `hash` and `--admin-key-stdin` read
standard input, and the API's admin key may come from TOWER_API_KEY_ADMIN_KEY.";

/// Check, generate and manage API keys in a key file, a Redis or PostgreSQL namespace
/// or a running key-management API.
#[derive(Debug, Parser)]
#[command(name = "tower-api-key", version, after_long_help = EXIT_CODES, after_help = EXIT_CODES)]
pub(crate) struct Cli {
    /// How to print results.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
    /// The largest key file read, in bytes.
    #[arg(long, global = true, default_value_t = 256 << 20, value_name = "BYTES")]
    pub(crate) max_size: u64,
    /// How long the key-management API may take to answer (`--api`), in seconds.
    #[arg(long, global = true, default_value_t = 30, value_name = "SECONDS")]
    pub(crate) timeout: u64,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON document for programs.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Validate key files exactly as the file source does (exit 1 if one fails).
    Check {
        /// The key files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// A new key and its key-file entry (SHA-256 only). The secret goes to standard
    /// output and the entry to standard error, or, with --secret-file, the secret to
    /// that file (created 0600) and the entry to standard output.
    Generate {
        /// The key's prefix, 1 to 16 ASCII letters and digits.
        prefix: String,
        /// The key's id in the file (default `<prefix>-<date>`).
        id: Option<String>,
        /// Write the secret to this new file (mode 0600; never overwritten).
        #[arg(long, value_name = "PATH")]
        secret_file: Option<PathBuf>,
    },
    /// The key-file entry (SHA-256) of a key read from standard input.
    Hash {
        /// The key's id in the file.
        #[arg(default_value = "key")]
        id: String,
    },
    /// Manage keys with the key-management API's own rules, errors and audit.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// How the target differs from the key file: keys to add, to change (which
    /// fields), and the keys it holds that the file does not name, which `apply
    /// --prune` removes and `apply` keeps (exit 1 if there is a difference).
    Diff {
        /// The key file that says what the target should hold.
        #[arg(value_name = "FILE")]
        input: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Make the target hold the key file's keys: add and change them, and with
    /// --prune remove the keys the file does not name.
    Apply {
        /// The key file that says what the target should hold.
        #[arg(value_name = "FILE")]
        input: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// Print the changes, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also remove the target's keys that the file does not name.
        #[arg(long)]
        prune: bool,
    },
    /// Recreate a wiped namespace (or key file), whole, from a key file or a
    /// replica's snapshot.
    Restore {
        /// The key file or snapshot.
        #[arg(value_name = "FILE")]
        input: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// Replace the target even if it exists (everything it holds is replaced).
        #[arg(long)]
        force: bool,
    },
    /// Write the target's keys as a key file (digests only).
    Export {
        #[command(flatten)]
        target: TargetArgs,
        /// Write to this file (atomically) rather than standard output.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
    /// Add the key file's keys to the target, replacing keys with the same id; a
    /// namespace that does not exist is created with them.
    Import {
        /// The key file.
        #[arg(value_name = "FILE")]
        input: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Keys by last use, oldest first (fleet-wide where the target keeps it).
    Usage {
        #[command(flatten)]
        target: TargetArgs,
        /// Only keys idle at least this long (`30d`, `12h`, `2w`, `90s`); a key never
        /// used counts from its creation.
        #[arg(long, value_name = "DURATION")]
        idle: Option<String>,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Every key, ordered by id.
    List {
        #[command(flatten)]
        target: TargetArgs,
        /// Only this tenant's keys.
        #[arg(long)]
        tenant: Option<String>,
        /// Only keys with this status (active, expired, not_yet_valid, disabled).
        #[arg(long)]
        status: Option<String>,
    },
    /// One key.
    Get {
        /// The key's id.
        id: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// A new key; its secret is shown once (standard output or --secret-file).
    Create {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        fields: Fields,
        /// The key's id (generated when absent).
        #[arg(long)]
        id: Option<String>,
        /// The secret's prefix (default `tak`).
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        secret: SecretOut,
    },
    /// Change a key's fields (a JSON merge patch, conditional on its version).
    Patch {
        /// The key's id.
        id: String,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        fields: Fields,
        /// Remove every scope.
        #[arg(long, conflicts_with = "scopes")]
        clear_scopes: bool,
        /// Remove these optional fields (tenant, owner, description, not_before,
        /// expires_at).
        #[arg(long, value_name = "FIELD")]
        unset: Vec<String>,
        /// Enable (false) or disable (true) the key.
        #[arg(long)]
        disabled: Option<bool>,
        #[command(flatten)]
        version: IfMatch,
    },
    /// A successor with the same scopes and owner; the old key keeps working for the
    /// overlap.
    Rotate {
        /// The id of the key to replace.
        id: String,
        #[command(flatten)]
        target: TargetArgs,
        /// The successor's id (default derived: `billing` -> `billing-r2`).
        #[arg(long)]
        new_id: Option<String>,
        /// How long the old key keeps working, in seconds (default a day).
        #[arg(long, value_name = "SECONDS")]
        overlap: Option<u64>,
        #[command(flatten)]
        version: IfMatch,
        #[command(flatten)]
        secret: SecretOut,
    },
    /// Revoke a key: the next request with it is refused.
    Revoke {
        /// The key's id.
        id: String,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        version: IfMatch,
    },
}

/// The fields a key is created or patched with.
#[derive(Debug, Args)]
pub(crate) struct Fields {
    /// A scope (repeat for several).
    #[arg(long = "scope", value_name = "SCOPE")]
    pub(crate) scopes: Vec<String>,
    /// The tenant.
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// Who owns it.
    #[arg(long)]
    pub(crate) owner: Option<String>,
    /// What it is for.
    #[arg(long)]
    pub(crate) description: Option<String>,
    /// Valid from (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    pub(crate) not_before: Option<String>,
    /// Valid until (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    pub(crate) expires_at: Option<String>,
}

/// The version a change is conditional on.
#[derive(Debug, Args)]
pub(crate) struct IfMatch {
    /// Only if the key's version (ETag) is this; by default the version read just
    /// before the change.
    #[arg(long, value_name = "ETAG")]
    pub(crate) if_match: Option<String>,
}

/// Where a new secret goes.
#[derive(Debug, Args)]
pub(crate) struct SecretOut {
    /// Write the new secret to this new file (mode 0600; never overwritten).
    #[arg(long, value_name = "PATH")]
    pub(crate) secret_file: Option<PathBuf>,
}

/// The one target a command works on.
#[derive(Debug, Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false).args(["file", "redis", "postgres", "api"])))]
pub(crate) struct TargetArgs {
    /// A key file.
    #[arg(long, value_name = "PATH")]
    pub(crate) file: Option<PathBuf>,
    /// A Redis server (redis:// or rediss://); with --namespace.
    #[arg(long, value_name = "URL", requires = "namespace")]
    pub(crate) redis: Option<String>,
    /// A PostgreSQL database (postgres://user:password@host/db?sslmode=..., or
    /// host=... key-value pairs); with --namespace.
    #[arg(long, value_name = "URL", requires = "namespace")]
    pub(crate) postgres: Option<String>,
    /// A running key-management API (http:// or https://); the admin key from
    /// TOWER_API_KEY_ADMIN_KEY or --admin-key-stdin.
    #[arg(long, value_name = "URL")]
    pub(crate) api: Option<String>,
    /// The namespace in Redis or PostgreSQL.
    #[arg(long, value_name = "NS")]
    pub(crate) namespace: Option<String>,
    /// Read the API's admin key from standard input.
    #[arg(long, requires = "api")]
    pub(crate) admin_key_stdin: bool,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
