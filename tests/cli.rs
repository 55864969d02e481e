//! The `tower-api-key` binary, run as an operator runs it: against temp key files, a
//! real `redis-server` and a real PostgreSQL (see `redis_support` and
//! `postgres_support`; under `CI=true` these tests never skip) and a real
//! key-management API on 127.0.0.1. Every subcommand, every exit code, and the bad
//! inputs an operator meets: a missing file, a FIFO, a file over the size limit, a
//! malformed URL, Redis or PostgreSQL down.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "cli")]

mod common;
mod postgres_support;
mod redis_support;

use std::{fs, path::Path, time::Duration};

use assert_cmd::Command;
use redis_support::{Redis, sha256_hex};
use serde_json::Value;

const ROOT: &str =
    "[[keys]]\nid = \"root\"\nsecret = \"root-secret\"\nscopes = [\"admin\", \"read\"]\n";

/// The binary, bounded in time, with no admin key in its environment.
fn cli() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tower-api-key"));
    cmd.timeout(Duration::from_secs(30))
        .env_remove("TOWER_API_KEY_ADMIN_KEY")
        .env_remove("RUST_LOG")
        .env("USER", "ops")
        .env("NO_COLOR", "1");
    cmd
}

/// What a run gave: exit code, standard output, standard error.
struct Run {
    code: i32,
    out: String,
    err: String,
}

fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    run_with(args, None, &[])
}

fn run_with<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> Run {
    let mut cmd = cli();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(input) = stdin {
        cmd.write_stdin(input);
    }
    outcome(&mut cmd)
}

/// As `run`, for a command given minutes, not seconds.
fn run_long<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let mut cmd = cli();
    cmd.args(args).timeout(Duration::from_secs(300));
    outcome(&mut cmd)
}

fn outcome(cmd: &mut Command) -> Run {
    let output = cmd.output().unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

impl Run {
    #[track_caller]
    fn code(self, want: i32) -> Self {
        assert_eq!(
            self.code, want,
            "exit {} (want {want})\nstdout: {}\nstderr: {}",
            self.code, self.out, self.err
        );
        self
    }

    /// The error is one line, and names neither a secret nor a password.
    #[track_caller]
    fn one_line_error(self) -> Self {
        // Audit and log events start with their time; the error is the rest.
        let errors: Vec<&str> = self
            .err
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with(|c: char| c.is_ascii_digit()))
            .collect();
        assert_eq!(errors.len(), 1, "stderr: {}", self.err);
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.out).unwrap_or_else(|e| panic!("{e}: {}", self.out))
    }

    /// The `id`s of a JSON list of keys.
    fn ids(&self) -> Vec<String> {
        self.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// `args` then a target's flags.
fn on(target: &[&str], args: &[&str]) -> Vec<String> {
    args.iter().chain(target).map(|s| (*s).to_owned()).collect()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Run as root, in a shared directory that keeps names to their owners (`/tmp`): a
/// destination another user prepared (a link to a file of root's) is refused, given
/// as an absolute path or as a relative one from inside that directory or below it,
/// and the file it leads to is untouched.
#[cfg(unix)]
#[test]
fn a_destination_another_user_prepared_is_refused_however_it_is_spelled() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let root = tempfile::tempdir().unwrap();
    let probe = root.path().join("probe");
    fs::write(&probe, "").unwrap();
    if fs::metadata(&probe).unwrap().uid() != 0 {
        eprintln!("not root: another user's directory cannot be made; skipped");
        return;
    }
    let source = root.path().join("keys.toml");
    fs::write(&source, ROOT).unwrap();
    let shared = root.path().join("tmp");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let victim = root.path().join("passwd");
    fs::write(&victim, "important\n").unwrap();
    std::os::unix::fs::symlink(&victim, shared.join("keys.toml")).unwrap();
    std::os::unix::fs::lchown(shared.join("keys.toml"), Some(65_534), Some(65_534)).unwrap();
    let inside = shared.join("sub");
    fs::create_dir(&inside).unwrap();
    for (cwd, out) in [
        (root.path(), shared.join("keys.toml")),
        (shared.as_path(), "keys.toml".into()),
        (inside.as_path(), "../keys.toml".into()),
    ] {
        let mut cmd = cli();
        cmd.current_dir(cwd)
            .args(["export", "--file", p(&source), "--out", p(&out)]);
        let ran = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&ran.stderr);
        assert_eq!(ran.status.code(), Some(3), "{}: {err}", out.display());
        assert!(err.contains("another user's"), "{}: {err}", out.display());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "important\n");
    }
}

#[test]
fn check_passes_a_good_file_and_names_file_line_and_id_of_a_bad_one_never_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    fs::write(&good, ROOT).unwrap();
    let r = run(&["check", p(&good)]).code(0);
    assert!(r.out.contains("1 keys"), "{}", r.out);

    // A secret pasted into the digest's field: refused, and never repeated.
    let bad = dir.path().join("bad.toml");
    fs::write(
        &bad,
        "[[keys]]\nid = \"ok\"\nsha256 = \"4e738ca5563c06cfd0018299933d58db1dd8bf97f6973dc99bf6cdc64b5550bd\"\n\n\
         [[keys]]\nid = \"billing\"\nsha256 = \"tak_SuperSecretValue123\"\n",
    )
    .unwrap();
    let r = run(&["check", p(&good), p(&bad)]).code(1);
    assert!(r.err.contains("bad.toml:5"), "{}", r.err);
    assert!(r.err.contains("billing"), "{}", r.err);
    assert!(r.err.contains("sha256"), "{}", r.err);
    assert!(!r.err.contains("SuperSecretValue") && !r.out.contains("SuperSecretValue"));

    let r = run(&["check", "-o", "json", p(&good), p(&bad)]).code(1);
    let doc = r.json();
    assert_eq!(doc["files"][0]["ok"], true);
    assert_eq!(doc["files"][1]["ok"], false);
    assert_eq!(doc["files"][1]["line"], 5);
    assert!(!r.out.contains("SuperSecretValue"));
}

#[test]
fn bad_inputs_get_one_line_and_the_right_code_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.toml");
    fs::write(&target, ROOT).unwrap();
    let fifo = dir.path().join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let big = dir.path().join("big.toml");
    fs::write(&big, ROOT).unwrap();
    let missing = dir.path().join("missing.toml");
    let directory = dir.path().to_path_buf();
    for input in [&missing, &fifo, &directory, &big] {
        let limit = if *input == big { "10" } else { "1000000" };
        run(&["check", "--max-size", limit, p(input)])
            .code(1)
            .one_line_error();
        // As the input of a write: refused, the target untouched.
        for command in [&["apply"][..], &["import"], &["restore", "--force"]] {
            let mut args = command.to_vec();
            args.extend(["--max-size", limit, p(input), "--file", p(&target)]);
            run(&args).code(1).one_line_error();
            assert_eq!(fs::read_to_string(&target).unwrap(), ROOT);
        }
    }
    // As the destination of a write (`export --out`, the `--file` of a restore): a
    // FIFO, a directory, a socket, a link to nothing or `/dev/stderr` (a link to
    // this process's standard error) is refused with exit 3 and stays what it was;
    // no key is written into or over it, and no temporary file is left.
    #[cfg(unix)]
    {
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let dangling = dir.path().join("dangling.toml");
        std::os::unix::fs::symlink(dir.path().join("nowhere.toml"), &dangling).unwrap();
        let kind = |p: &Path| fs::symlink_metadata(p).unwrap().file_type();
        let stderr = Path::new("/dev/stderr");
        let listing = || {
            let mut names: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        let before_all = listing();
        for destination in [&*fifo, &*directory, &*socket, &*dangling, stderr] {
            let before = kind(destination);
            let export = ["export", "--file", p(&target), "--out", p(destination)];
            let restore = ["restore", "--force", p(&big), "--file", p(destination)];
            for args in [&export[..], &restore[..]] {
                let r = run(args).code(3).one_line_error();
                assert!(r.err.contains("nothing was written"), "{}", r.err);
                assert_eq!(kind(destination), before, "{}", destination.display());
            }
        }
        assert!(!dir.path().join("nowhere.toml").exists());
        assert_eq!(listing(), before_all, "no temporary file left behind");
    }
    // A process's open file (`/dev/stdin`, `/dev/fd/0`: here a log on standard
    // input) is not replaced whole.
    #[cfg(target_os = "linux")]
    for out in ["/dev/stdin", "/dev/fd/0"] {
        let log = dir.path().join("app.log");
        fs::write(&log, "line 1\n").unwrap();
        let ran = std::process::Command::new(env!("CARGO_BIN_EXE_tower-api-key"))
            .args(["export", "--file", p(&target), "--out", out])
            .stdin(fs::File::open(&log).unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&ran.stderr);
        assert_eq!(ran.status.code(), Some(3), "{out}: {err}");
        assert!(err.contains("/proc"), "{out}: {err}");
        assert_eq!(fs::read_to_string(&log).unwrap(), "line 1\n", "{out}");
    }

    // Usage errors: no target, two targets, a malformed URL (never repeated: it may
    // hold a password).
    run(&["keys", "list"]).code(2);
    run(&[
        "keys",
        "list",
        "--file",
        p(&target),
        "--api",
        "http://127.0.0.1:1/",
    ])
    .code(2);
    let r = run(&["keys", "list", "--api", "ftp://user:hunter2@host/"])
        .code(2)
        .one_line_error();
    assert!(!r.err.contains("hunter2"));
    let r = run(&[
        "keys",
        "list",
        "--redis",
        "redis://:hunter2@[::1",
        "--namespace",
        "n",
    ])
    .code(2)
    .one_line_error();
    assert!(!r.err.contains("hunter2"));
    // A FIFO or a device as the CA file of a PostgreSQL URL: refused, not waited on.
    for ca in [p(&fifo), "/dev/zero"] {
        let url = format!("postgres://u:hunter2@127.0.0.1:1/db?sslmode=require&sslrootcert={ca}");
        let r = run(&["keys", "list", "--postgres", &url, "--namespace", "n"])
            .code(2)
            .one_line_error();
        assert!(
            r.err.contains("sslrootcert") && !r.err.contains("hunter2"),
            "{}",
            r.err
        );
    }
    run(&["generate", "no_underscores_allowed"])
        .code(2)
        .one_line_error();
    run(&["usage", "--file", p(&target)])
        .code(2)
        .one_line_error();
    run(&["usage", "--api", "http://127.0.0.1:1/", "--idle", "30x"]).code(2);
}

#[test]
fn generate_gives_the_secret_once_and_an_entry_with_only_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("ci.key");
    let r = run(&["generate", "acme", "ci", "--secret-file", p(&secret_file)]).code(0);
    let secret = fs::read_to_string(&secret_file).unwrap().trim().to_owned();
    assert!(secret.starts_with("acme_"));
    assert!(tower_api_key::has_valid_checksum(&secret));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&secret_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(r.out.contains(&sha256_hex(&secret)));
    assert!(!r.out.contains(&secret) && !r.err.contains(&secret));
    // The entry is a key file the file source takes.
    let file = dir.path().join("keys.toml");
    fs::write(&file, &r.out).unwrap();
    run(&["check", p(&file)]).code(0);
    // Appended (`>> keys.toml`) to a file whose last line has no newline, it starts
    // a line of its own.
    fs::write(&file, format!("{}{}", ROOT.trim_end(), r.out)).unwrap();
    run(&["check", p(&file)]).code(0);

    // Never over an existing file.
    run(&["generate", "acme", "ci", "--secret-file", p(&secret_file)])
        .code(4)
        .one_line_error();
    assert_eq!(fs::read_to_string(&secret_file).unwrap().trim(), secret);

    // Without a file: the secret alone on standard output, the entry apart.
    let r = run(&["generate", "acme", "web"]).code(0);
    let secret = r.out.trim();
    assert_eq!(r.out.lines().count(), 1);
    assert!(r.err.contains(&sha256_hex(secret)) && r.err.contains("id = \"web\""));
    let doc = run(&["generate", "acme", "web", "-o", "json"])
        .code(0)
        .json();
    assert_eq!(doc["sha256"], sha256_hex(doc["key"].as_str().unwrap()));
}

/// A key file over 4 MiB, as the crate writes one (the file backend's edits, an
/// export, a snapshot), with a key whose strings need escapes and one with limits:
/// `check` takes it. The general TOML parser never reads a file this large.
#[test]
fn check_takes_a_large_file_the_crate_wrote_with_escapes_and_limits() {
    use tower_api_key::{
        ApiKey, KeySet,
        limit::{Quota, QuotaPeriod, RateLimit},
    };
    let mut keys: Vec<ApiKey> = (0..45_000)
        .map(|i| ApiKey::new(format!("key-{i:05}"), format!("secret-{i:05}")))
        .collect();
    keys.push(
        ApiKey::new("partner", "partner-secret")
            .with_description(r#"the "partner" key, see C:\docs"#)
            .with_owner("ops\tteam ✓")
            .with_rate_limit(RateLimit::new("burst", 100, Duration::from_secs(1)))
            .with_quota(Quota::new(1_000_000, QuotaPeriod::Month)),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    KeySet::from_keys(keys).unwrap().write_file(&file).unwrap();
    assert!(fs::metadata(&file).unwrap().len() > 4 << 20);
    let r = run(&["check", p(&file)]).code(0);
    assert!(r.err.is_empty(), "{}", r.err);
    let set = tower_api_key::FileSource::parse(&file, &fs::read(&file).unwrap()).unwrap();
    let partner = set.get("partner").unwrap();
    assert_eq!(
        partner.description(),
        Some(r#"the "partner" key, see C:\docs"#)
    );
    assert_eq!(partner.rate_limits().len(), 1);

    // A line the fast reader does not take is named, and what in it, never a value.
    let mut text = fs::read_to_string(&file).unwrap();
    text.push_str("\n[[keys]]\nid = \"late\"\nsecret = \"\"\"p4ssw0rd\"\"\"\n");
    fs::write(&file, &text).unwrap();
    let r = run(&["check", p(&file)]).code(1);
    let line = text.lines().count();
    assert!(r.err.contains(&format!("keys.toml:{line}:")), "{}", r.err);
    assert!(r.err.contains("a multi-line string"), "{}", r.err);
    assert!(!r.err.contains("p4ssw0rd"), "{}", r.err);
}

#[test]
fn hash_reads_the_key_from_standard_input() {
    let r = run_with(&["hash", "legacy"], Some("old-secret\n"), &[]).code(0);
    assert!(r.out.contains(&sha256_hex("old-secret")));
    assert!(r.out.contains("id = \"legacy\""));
    assert!(!r.out.contains("old-secret\""));
    // The entry is a key file, line by line, that `check` takes.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    fs::write(&file, &r.out).unwrap();
    run(&["check", p(&file)]).code(0);
    let doc = run_with(&["hash", "-o", "json"], Some("old-secret\r\n"), &[])
        .code(0)
        .json();
    assert_eq!(doc["sha256"], sha256_hex("old-secret"));
    run_with(&["hash"], Some(""), &[]).code(2).one_line_error();
    run_with(&["hash"], Some("two\nlines\n"), &[]).code(2);
    // Longer than the first read buffer: read whole, through buffers it outgrows.
    let long = "k".repeat(4_000);
    let doc = run_with(&["hash", "-o", "json"], Some(&format!("{long}\n")), &[])
        .code(0)
        .json();
    assert_eq!(doc["sha256"], sha256_hex(&long));
    run_with(&["hash"], Some(&"k".repeat(100_000)), &[])
        .code(2)
        .one_line_error();
    // A key no request can present (headers are trimmed; no control characters):
    // refused as `check` refuses it, never a digest that cannot match; never echoed.
    for bad in ["  padded-secret  \n", "tab\tsecret\n"] {
        let r = run_with(&["hash"], Some(bad), &[]).code(2).one_line_error();
        assert!(r.err.contains("the secret"), "{}", r.err);
        assert!(
            !r.err.contains("padded-secret") && !r.err.contains("tab\t"),
            "{}",
            r.err
        );
        assert!(r.out.is_empty());
    }
}

#[test]
fn keys_on_a_file_follow_the_apis_rules_and_audit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    fs::write(&file, ROOT).unwrap();
    let f = p(&file);
    let secret_file = dir.path().join("billing.key");
    let r = run(&[
        "keys",
        "create",
        "--file",
        f,
        "--id",
        "billing",
        "--scope",
        "read",
        "--owner",
        "team",
        "--secret-file",
        p(&secret_file),
    ])
    .code(0);
    let secret = fs::read_to_string(&secret_file).unwrap().trim().to_owned();
    assert!(r.out.contains("billing"));
    // The API's audit, naming the operator.
    assert!(
        r.err.contains("tower_api_key::audit") && r.err.contains("cli:ops"),
        "{}",
        r.err
    );
    let text = fs::read_to_string(&file).unwrap();
    assert!(text.contains(&sha256_hex(&secret)) && !text.contains(&secret));

    let list = run(&["keys", "list", "--file", f, "-o", "json"])
        .code(0)
        .json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["billing", "root"]);
    let got = run(&["keys", "get", "billing", "--file", f, "-o", "json"])
        .code(0)
        .json();
    assert_eq!(got["owner"], "team");

    // The API's errors, as exit codes.
    run(&["keys", "get", "nope", "--file", f])
        .code(5)
        .one_line_error();
    run(&["keys", "create", "--file", f, "--id", "billing"])
        .code(4)
        .one_line_error();
    run(&["keys", "create", "--file", f, "--expires-at", "tomorrow"])
        .code(1)
        .one_line_error();
    run(&[
        "keys",
        "patch",
        "billing",
        "--file",
        f,
        "--owner",
        "x",
        "--if-match",
        "\"0000\"",
    ])
    .code(4)
    .one_line_error();
    run(&["keys", "patch", "billing", "--file", f]).code(2);

    run(&[
        "keys",
        "patch",
        "billing",
        "--file",
        f,
        "--description",
        "invoices",
        "--disabled",
        "true",
    ])
    .code(0);
    let got = run(&["keys", "get", "billing", "--file", f, "-o", "json"])
        .code(0)
        .json();
    assert_eq!(got["description"], "invoices");
    assert_eq!(got["status"], "disabled");

    let rotated = run(&[
        "keys",
        "rotate",
        "billing",
        "--file",
        f,
        "--overlap",
        "60",
        "-o",
        "json",
    ])
    .code(0)
    .json();
    assert_eq!(rotated["id"], "billing-r2");
    assert_eq!(rotated["rotated_from"], "billing");
    let new_secret = rotated["key"].as_str().unwrap();
    assert!(
        fs::read_to_string(&file)
            .unwrap()
            .contains(&sha256_hex(new_secret))
    );

    run(&["keys", "revoke", "billing", "--file", f]).code(0);
    run(&["keys", "get", "billing", "--file", f]).code(5);
    assert!(
        !fs::read_to_string(&file)
            .unwrap()
            .contains("id = \"billing\"")
    );

    // A file that does not parse is not written over; a missing one is "missing".
    let broken = dir.path().join("broken.toml");
    fs::write(&broken, "[[keys]]\nid = \n").unwrap();
    run(&["keys", "create", "--file", p(&broken)])
        .code(3)
        .one_line_error();
    assert_eq!(fs::read_to_string(&broken).unwrap(), "[[keys]]\nid = \n");
    run(&["keys", "list", "--file", p(&dir.path().join("none.toml"))])
        .code(8)
        .one_line_error();
}

#[test]
fn diff_apply_restore_import_and_export_on_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.toml");
    let desired = dir.path().join("desired.toml");
    let entry = |id: &str, secret: &str, extra: &str| {
        format!(
            "[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\n{extra}\n",
            sha256_hex(secret)
        )
    };
    let live_text = [
        entry("same", "s1", ""),
        entry("moved", "s2", "owner = \"a\""),
        entry("gone", "s3", ""),
    ]
    .concat();
    fs::write(&live, &live_text).unwrap();
    fs::write(
        &desired,
        [
            entry("same", "s1", ""),
            entry("moved", "s2", "owner = \"b\""),
            entry("new", "s4", ""),
        ]
        .concat(),
    )
    .unwrap();
    let (l, d) = (p(&live), p(&desired));

    let r = run(&["diff", d, "--file", l]).code(1);
    assert!(
        r.out.contains("+ new") && r.out.contains("~ moved (owner)") && r.out.contains("- gone"),
        "{}",
        r.out
    );
    let doc = run(&["diff", d, "--file", l, "-o", "json"]).code(1).json();
    assert_eq!(doc["added"], serde_json::json!(["new"]));
    assert_eq!(doc["changed"][0]["fields"], serde_json::json!(["owner"]));
    assert_eq!(doc["removed"], serde_json::json!(["gone"]));

    run(&["apply", d, "--file", l, "--dry-run", "--prune"]).code(0);
    assert_eq!(fs::read_to_string(&live).unwrap(), live_text);

    // Without --prune, keys the file does not name stay.
    run(&["apply", d, "--file", l]).code(0);
    let r = run(&["diff", d, "--file", l, "-o", "json"]).code(1);
    assert_eq!(r.json()["removed"], serde_json::json!(["gone"]));
    assert_eq!(r.json()["added"], serde_json::json!([]));
    run(&["apply", d, "--file", l, "--prune"]).code(0);
    run(&["diff", d, "--file", l]).code(0);

    // A result the file source would refuse (one secret under two ids) is not written.
    let clash = dir.path().join("clash.toml");
    fs::write(&clash, entry("other", "s1", "")).unwrap();
    let before = fs::read_to_string(&live).unwrap();
    run(&["apply", p(&clash), "--file", l])
        .code(1)
        .one_line_error();
    assert_eq!(fs::read_to_string(&live).unwrap(), before);

    // export → restore round trip; restore refuses to replace without --force.
    let export = dir.path().join("export.toml");
    run(&["export", "--file", l, "--out", p(&export)]).code(0);
    let exported = run(&["export", "--file", l]).code(0).out;
    assert_eq!(fs::read_to_string(&export).unwrap(), exported);
    let records = run(&["export", "--file", l, "-o", "json"]).code(0).json();
    assert_eq!(records.as_array().unwrap().len(), 3);
    run(&["restore", p(&export), "--file", l])
        .code(4)
        .one_line_error();
    let fresh = dir.path().join("fresh.toml");
    run(&["restore", p(&export), "--file", p(&fresh)]).code(0);
    run(&["diff", d, "--file", p(&fresh)]).code(0);

    // import adds and replaces, keeps the rest; creates a missing file.
    let more = dir.path().join("more.toml");
    fs::write(&more, entry("extra", "s9", "")).unwrap();
    run(&["import", p(&more), "--file", l]).code(0);
    let ids = run(&["keys", "list", "--file", l, "-o", "json"])
        .code(0)
        .ids();
    assert_eq!(ids, ["extra", "moved", "new", "same"]);
    run(&[
        "import",
        p(&more),
        "--file",
        p(&dir.path().join("created.toml")),
    ])
    .code(0);
    run(&[
        "diff",
        p(&more),
        "--file",
        p(&dir.path().join("created.toml")),
    ])
    .code(0);

    let r = run(&["completions", "bash"]).code(0);
    assert!(r.out.contains("tower-api-key"));
}

/// A running key-management API over a key file, on 127.0.0.1, with admin key
/// `root-secret`.
async fn serve_api(file: &Path) -> std::net::SocketAddr {
    let store = tower_api_key::KeyStore::new();
    store
        .add_source(tower_api_key::FileSource::new(file))
        .unwrap();
    let api: axum::Router =
        tower_api_key::admin::AdminApi::new(store, tower_api_key::admin::FileBackend::new(file))
            .router();
    common::serve(api).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_usage_against_a_running_api() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    fs::write(&file, ROOT).unwrap();
    let addr = serve_api(&file).await;
    let url = format!("http://{addr}/");
    let blocking = |f: Box<dyn FnOnce() + Send>| tokio::task::spawn_blocking(f);
    let u = url.clone();
    blocking(Box::new(move || {
        let admin = [("TOWER_API_KEY_ADMIN_KEY", "root-secret")];
        let r = run_with(
            &[
                "keys", "create", "--api", &u, "--id", "web", "--scope", "read", "-o", "json",
            ],
            None,
            &admin,
        )
        .code(0);
        let secret = r.json()["key"].as_str().unwrap().to_owned();
        assert!(!r.err.contains(&secret));
        let list = run_with(&["keys", "list", "--api", &u, "-o", "json"], None, &admin)
            .code(0)
            .json();
        assert_eq!(list.as_array().unwrap().len(), 2);
        // From standard input instead of the environment.
        run_with(
            &["keys", "get", "web", "--api", &u, "--admin-key-stdin"],
            Some("root-secret\n"),
            &[],
        )
        .code(0);
        let usage = run_with(&["usage", "--api", &u, "-o", "json"], None, &admin)
            .code(0)
            .json();
        assert_eq!(usage.as_array().unwrap().len(), 2);
        run_with(&["keys", "revoke", "web", "--api", &u], None, &admin).code(0);
        run_with(&["keys", "get", "web", "--api", &u], None, &admin).code(5);

        // No key, a wrong key, an operation the API cannot do.
        run(&["keys", "list", "--api", &u]).code(2).one_line_error();
        let r = run_with(
            &["keys", "list", "--api", &u],
            None,
            &[("TOWER_API_KEY_ADMIN_KEY", "wrong-secret")],
        )
        .code(6)
        .one_line_error();
        assert!(!r.err.contains("wrong-secret"));
        run_with(&["export", "--api", &u], None, &admin)
            .code(2)
            .one_line_error();
    }))
    .await
    .unwrap();

    // An API that is not there: unavailable, at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    blocking(Box::new(move || {
        let r = run_with(
            &["keys", "list", "--api", &dead],
            None,
            &[("TOWER_API_KEY_ADMIN_KEY", "k")],
        )
        .code(3)
        .one_line_error();
        assert!(r.err.contains("cannot connect"), "{}", r.err);
        // Credentials in the URL: refused, never repeated.
        let with_password = dead.replace("http://", "http://user:hunter2@");
        let r = run_with(
            &["keys", "list", "--api", &with_password],
            None,
            &[("TOWER_API_KEY_ADMIN_KEY", "k")],
        )
        .code(2)
        .one_line_error();
        assert!(!r.err.contains("hunter2"));
        // An API that takes the request and never answers: a write's outcome is
        // unknown (7), a read's is only unavailable (3); neither hangs.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", silent.local_addr().unwrap());
        let key = [("TOWER_API_KEY_ADMIN_KEY", "k")];
        let write = [
            "keys",
            "revoke",
            "web",
            "--if-match",
            "*",
            "--timeout",
            "1",
            "--api",
            &url,
        ];
        run_with(&write, None, &key).code(7).one_line_error();
        run_with(
            &["keys", "list", "--timeout", "1", "--api", &url],
            None,
            &key,
        )
        .code(3)
        .one_line_error();
        drop(silent);
        // https:// too: the TLS client is set up, and says it cannot connect.
        let tls = dead.replace("http://", "https://");
        run_with(
            &["keys", "list", "--api", &tls],
            None,
            &[("TOWER_API_KEY_ADMIN_KEY", "k")],
        )
        .code(3)
        .one_line_error();
    }))
    .await
    .unwrap();
}

/// A change of limits alone against a target (given by its flags): `diff` names the
/// fields, `apply` writes them, and the target then holds them.
fn limits_alone_are_diffed_and_applied(target: &[&str], dir: &Path) {
    let with = |args: &[&str]| on(target, args);
    let entry = |extra: &str| {
        format!(
            "[[keys]]\nid = \"lim\"\nsha256 = \"{}\"\n{extra}\n",
            sha256_hex("lim-secret")
        )
    };
    let seed = dir.join("limits-seed.toml");
    fs::write(&seed, entry("")).unwrap();
    run(&with(&["import", p(&seed)])).code(0);
    let desired = dir.join("limits-desired.toml");
    let limits = "rate_limits = [{ name = \"burst\", requests = 10, per = \"1s\" }]\n\
                  quota = { requests = 1000, per = \"month\" }\n\
                  allowed_ips = [\"10.0.0.0/8\"]";
    fs::write(&desired, entry(limits)).unwrap();
    let d = p(&desired);
    let r = run(&with(&["diff", d])).code(1);
    assert!(
        r.out.contains("~ lim (rate_limits, quota, allowed_ips)"),
        "{}",
        r.out
    );
    run(&with(&["apply", d, "--dry-run"])).code(0);
    run(&with(&["diff", d])).code(1);
    run(&with(&["apply", d])).code(0);
    run(&with(&["diff", d])).code(0);
    let exported = run(&with(&["export"])).code(0).out;
    assert!(
        exported.contains("name = \"burst\"")
            && exported.contains("requests = 1000")
            && exported.contains("10.0.0.0/8"),
        "{exported}"
    );
    // One limit changed: that one named, and written.
    let quota = limits.replace("1000", "2000");
    fs::write(&desired, entry(&quota)).unwrap();
    let doc = run(&with(&["diff", d, "-o", "json"])).code(1).json();
    assert_eq!(doc["changed"][0]["fields"], serde_json::json!(["quota"]));
    run(&with(&["apply", d])).code(0);
    run(&with(&["diff", d])).code(0);
    assert!(
        run(&with(&["export"]))
            .code(0)
            .out
            .contains("requests = 2000")
    );
}

/// Two keys that swap secrets in one `apply` (each gets the other's): the result
/// holds each secret once, so it is written, whole; each key then has the other's
/// digest. A secret given to two keys is still refused, with nothing written.
fn two_keys_swap_secrets_in_one_apply(target: &[&str], dir: &Path) {
    let with = |args: &[&str]| on(target, args);
    let entry = |id: &str, secret: &str| {
        format!(
            "[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\n\n",
            sha256_hex(secret)
        )
    };
    let seed = dir.join("swap-seed.toml");
    fs::write(&seed, entry("swap-a", "sw-1") + &entry("swap-b", "sw-2")).unwrap();
    run(&with(&["import", p(&seed)])).code(0);
    let desired = dir.join("swap-desired.toml");
    fs::write(&desired, entry("swap-a", "sw-2") + &entry("swap-b", "sw-1")).unwrap();
    let d = p(&desired);
    run(&with(&["apply", d])).code(0);
    run(&with(&["diff", d])).code(0);
    let exported = run(&with(&["export", "-o", "json"])).code(0).json();
    let digest = |id: &str| {
        exported
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .map(|k| k["sha256"].as_str().unwrap().to_owned())
    };
    assert_eq!(digest("swap-a"), Some(sha256_hex("sw-2")));
    assert_eq!(digest("swap-b"), Some(sha256_hex("sw-1")));
    // One secret for two keys in the result (`swap-b` given the secret `swap-a`
    // keeps, with a new key): refused whole.
    fs::write(&desired, entry("swap-b", "sw-2") + &entry("swap-c", "sw-3")).unwrap();
    run(&with(&["apply", d])).code(1).one_line_error();
    let after = run(&with(&["export", "-o", "json"])).code(0).json();
    assert_eq!(after, exported, "nothing written");
    // An import (which replaces the keys it names and keeps the others) that gives
    // a new key the secret a stored key keeps: refused whole, naming both, as
    // replicas would refuse both keys.
    fs::write(&desired, entry("swap-c", "sw-3") + &entry("swap-d", "sw-1")).unwrap();
    let refused = run(&with(&["import", d])).code(1).one_line_error();
    assert!(
        refused.err.contains("swap-b") && refused.err.contains("swap-d"),
        "{}",
        refused.err
    );
    let after = run(&with(&["export", "-o", "json"])).code(0).json();
    assert_eq!(after, exported, "nothing written");
    // The same file with `swap-b` given another secret: written.
    fs::write(
        &desired,
        entry("swap-c", "sw-3") + &entry("swap-d", "sw-1") + &entry("swap-b", "sw-4"),
    )
    .unwrap();
    run(&with(&["import", d])).code(0);
}

#[test]
fn two_keys_may_swap_secrets_in_one_apply_to_a_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    two_keys_swap_secrets_in_one_apply(&["--file", p(&file)], dir.path());
}

#[test]
fn a_change_of_limits_alone_is_applied_to_a_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    limits_alone_are_diffed_and_applied(&["--file", p(&file)], dir.path());
}

/// `keys create` and `keys rotate` with a secret file that cannot be made (it exists,
/// its directory does not): refused before the key is written, the target and the
/// existing file untouched. The target is given by its flags and holds `root`.
fn a_secret_file_that_cannot_be_made_costs_no_key(target: &[&str], dir: &Path) {
    let with = |args: &[&str]| on(target, args);
    let ids = || run(&with(&["keys", "list", "-o", "json"])).code(0).ids();
    let existing = dir.join("existing.key");
    fs::write(&existing, "keep me\n").unwrap();
    let missing_dir = dir.join("no-such-dir").join("new.key");
    for (path, code) in [(&existing, 4), (&missing_dir, 3)] {
        run(&with(&[
            "keys",
            "create",
            "--id",
            "lost",
            "--secret-file",
            p(path),
        ]))
        .code(code)
        .one_line_error();
        run(&with(&["keys", "rotate", "root", "--secret-file", p(path)]))
            .code(code)
            .one_line_error();
        assert_eq!(ids(), ["root"], "a key was written: {}", path.display());
    }
    assert_eq!(fs::read_to_string(&existing).unwrap(), "keep me\n");
    assert!(!missing_dir.parent().unwrap().exists());
    // A secret file that can be made: the key, and its secret in the file, 0600.
    let made = dir.join("made.key");
    run(&with(&[
        "keys",
        "create",
        "--id",
        "made",
        "--secret-file",
        p(&made),
    ]))
    .code(0);
    let secret = fs::read_to_string(&made).unwrap();
    assert!(secret.ends_with('\n') && secret.len() > 10, "{secret:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&made).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    assert_eq!(ids(), ["made", "root"]);
    // Nothing else is left beside it: the secret was written under a temporary name
    // and took its own only when whole.
    let left: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_secret_file_that_cannot_be_made_costs_no_key_in_a_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    fs::write(&file, ROOT).unwrap();
    a_secret_file_that_cannot_be_made_costs_no_key(&["--file", p(&file)], dir.path());
    // The key file itself: only the key made.
    let text = fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("lost") && !text.contains("root-r2"),
        "{text}"
    );
}

/// What the namespace tests need of an engine, beside the binary: its flags, a look
/// at what it stores, and the hand of the replicas and of a disaster.
struct Fleet<'a> {
    /// `--redis URL --namespace pay` or `--postgres URL --namespace pay`.
    target: [&'a str; 4],
    /// The ids the namespace `pay` holds, sorted, read from the engine itself.
    ids: &'a dyn Fn() -> Vec<String>,
    /// The replicas' count of `id`'s use: `requests`, last at 1970-01-01T00:16:40Z.
    record_use: &'a dyn Fn(&str, u64),
    /// The namespace's epoch and version, where the engine applies a whole plan as
    /// one change (one more version of the same epoch: replicas apply it, they do
    /// not reload the namespace).
    version: Option<&'a dyn Fn() -> (String, i64)>,
    /// The namespace `pay` wiped: its data lost.
    wipe: &'a dyn Fn(),
}

impl Fleet<'_> {
    fn with(&self, args: &[&str]) -> Vec<String> {
        on(&self.target, args)
    }
}

/// A namespace from its first import to its restore after a wipe, as an operator
/// drives it: missing before, `keys …`, `usage`, `diff` and `apply` (`--dry-run`,
/// `--prune`), `export` and `restore`. No password is ever printed.
fn a_namespace_from_import_to_restore(fleet: &Fleet<'_>, password: &str) {
    let with = |args: &[&str]| fleet.with(args);
    let ids = fleet.ids;
    let version = || fleet.version.map(|v| v());
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.toml");
    fs::write(&seed, ROOT).unwrap();
    let s = p(&seed);
    let no_password = |r: &Run| {
        assert!(
            !r.err.contains(password) && !r.out.contains(password),
            "{}",
            r.err
        );
    };

    // A namespace never created is "missing", not empty.
    for args in [
        with(&["keys", "list"]),
        with(&["diff", s]),
        with(&["apply", s]),
        with(&["export"]),
        with(&["usage"]),
    ] {
        no_password(&run(&args).code(8).one_line_error());
    }
    run(&with(&["import", s])).code(0);
    assert_eq!(ids(), ["root"]);
    run(&with(&["diff", s])).code(0);

    // keys: create, list, rotate, revoke, with the API's rules.
    let secret_file = dir.path().join("web.key");
    run(&with(&[
        "keys",
        "create",
        "--id",
        "web",
        "--scope",
        "read",
        "--secret-file",
        p(&secret_file),
    ]))
    .code(0);
    let secret = fs::read_to_string(&secret_file).unwrap().trim().to_owned();
    assert_eq!(ids(), ["root", "web"]);
    let list = run(&with(&["keys", "list", "-o", "json"])).code(0).json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    run(&with(&["keys", "create", "--id", "web"]))
        .code(4)
        .one_line_error();
    let rotated = run(&with(&["keys", "rotate", "web", "-o", "json"]))
        .code(0)
        .json();
    assert_eq!(rotated["id"], "web-r2");
    run(&with(&["keys", "revoke", "web"])).code(0);
    run(&with(&["keys", "get", "web"])).code(5).one_line_error();
    assert_eq!(ids(), ["root", "web-r2"]);

    // Usage, fleet-wide: what the replicas added up in the engine.
    (fleet.record_use)("root", 7);
    let usage = run(&with(&["usage", "-o", "json"])).code(0).json();
    let root = usage
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["id"] == "root")
        .unwrap();
    assert_eq!(root["requests"], 7);
    assert_eq!(root["last_used"], "1970-01-01T00:16:40Z");
    let idle = run(&with(&["usage", "--idle", "30d", "-o", "json"]))
        .code(0)
        .json();
    let idle: Vec<&str> = idle
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        idle,
        ["root"],
        "only the key unused since 1970 is idle 30 days"
    );

    // diff, then apply: --dry-run writes nothing; without --prune the keys the file
    // does not name stay (in one version, where the engine counts them); --prune
    // removes the rest.
    let desired = dir.path().join("desired.toml");
    let entry = |id: &str, secret: &str| {
        format!(
            "[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\n",
            sha256_hex(secret)
        )
    };
    fs::write(
        &desired,
        format!("{ROOT}owner = \"ops\"\n\n{}", entry("new", "new-secret")),
    )
    .unwrap();
    let d = p(&desired);
    let doc = run(&with(&["diff", d, "-o", "json"])).code(1).json();
    assert_eq!(doc["added"], serde_json::json!(["new"]));
    assert_eq!(doc["changed"][0]["id"], "root");
    assert_eq!(doc["changed"][0]["fields"], serde_json::json!(["owner"]));
    assert_eq!(doc["removed"], serde_json::json!(["web-r2"]));
    let before = version();
    run(&with(&["apply", d, "--dry-run", "--prune"])).code(0);
    assert_eq!(version(), before);
    assert_eq!(ids(), ["root", "web-r2"]);
    let next = |(epoch, v): (String, i64)| (epoch, v + 1);
    run(&with(&["apply", d])).code(0);
    assert_eq!(
        version(),
        before.clone().map(next),
        "one change, one version"
    );
    assert_eq!(ids(), ["new", "root", "web-r2"]);
    let r = run(&with(&["diff", d, "-o", "json"])).code(1);
    assert_eq!(r.json()["changed"], serde_json::json!([]));
    let before = version();
    run(&with(&["apply", d, "--prune"])).code(0);
    assert_eq!(version(), before.map(next), "a removal too: one change");
    assert_eq!(ids(), ["new", "root"]);
    run(&with(&["diff", d])).code(0);
    // A result the file source would refuse (one secret under two ids): nothing.
    let clash = dir.path().join("clash.toml");
    fs::write(&clash, entry("other", "new-secret")).unwrap();
    let before = version();
    run(&with(&["apply", p(&clash)])).code(1).one_line_error();
    assert_eq!(version(), before);
    assert_eq!(ids(), ["new", "root"]);

    // export, a wipe, restore.
    let backup = dir.path().join("backup.toml");
    run(&with(&["export", "--out", p(&backup)])).code(0);
    assert!(!fs::read_to_string(&backup).unwrap().contains(&secret));
    run(&with(&["restore", p(&backup)]))
        .code(4)
        .one_line_error();
    (fleet.wipe)();
    run(&with(&["keys", "create"])).code(8).one_line_error();
    run(&with(&["restore", p(&backup)])).code(0);
    assert_eq!(ids(), ["new", "root"]);
    run(&with(&["diff", d])).code(0);

    // A secret file that cannot be made, and limits, as on a key file.
    let sec = fleet.target[..3]
        .iter()
        .copied()
        .chain(["sec"])
        .collect::<Vec<_>>();
    run(&[&["import", s][..], &sec].concat()).code(0);
    a_secret_file_that_cannot_be_made_costs_no_key(&sec, dir.path());
    let lim = fleet.target[..3]
        .iter()
        .copied()
        .chain(["lim"])
        .collect::<Vec<_>>();
    limits_alone_are_diffed_and_applied(&lim, dir.path());
    let swap = fleet.target[..3]
        .iter()
        .copied()
        .chain(["swap"])
        .collect::<Vec<_>>();
    two_keys_swap_secrets_in_one_apply(&swap, dir.path());
}

/// The engine down: every command unavailable (3), one line, no password, at once.
fn down_is_unavailable(target: [&str; 4], password: &str) {
    let fleet = Fleet {
        target,
        ids: &Vec::new,
        record_use: &|_, _| {},
        version: None,
        wipe: &|| {},
    };
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.toml");
    fs::write(&seed, ROOT).unwrap();
    let s = p(&seed);
    for args in [
        fleet.with(&["keys", "list"]),
        fleet.with(&["keys", "create"]),
        fleet.with(&["diff", s]),
        fleet.with(&["apply", s]),
        fleet.with(&["import", s]),
        fleet.with(&["restore", s, "--force"]),
        fleet.with(&["export"]),
        fleet.with(&["usage"]),
    ] {
        let r = run(&args).code(3).one_line_error();
        assert!(!r.err.contains(password), "{}", r.err);
    }
}

#[test]
fn a_redis_namespace_from_import_to_restore() {
    let password = "redis-pass-5b1e";
    let Some(mut redis) = Redis::start_with_password(password) else {
        return;
    };
    let url = redis.url();
    {
        let fleet = Fleet {
            target: ["--redis", url.as_str(), "--namespace", "pay"],
            ids: &|| redis.ids("pay"),
            record_use: &|id, requests| {
                redis.cli(&["HSET", "tak:{pay}:requests", id, &requests.to_string()]);
                redis.cli(&["HSET", "tak:{pay}:last_used", id, "1000"]);
            },
            version: None,
            wipe: &|| {
                redis.cli(&["FLUSHALL"]);
            },
        };
        a_namespace_from_import_to_restore(&fleet, password);
    }
    redis.stop();
    down_is_unavailable(["--redis", url.as_str(), "--namespace", "pay"], password);
}

#[test]
fn a_postgres_namespace_from_import_to_restore() {
    let Some(mut pg) = postgres_support::Postgres::start() else {
        return;
    };
    let url = pg.url();
    let password = postgres_support::PASSWORD;
    {
        let fleet = Fleet {
            target: ["--postgres", url.as_str(), "--namespace", "pay"],
            ids: &|| pg.ids("pay"),
            record_use: &|id, requests| {
                pg.psql(&format!(
                    "INSERT INTO tak_usage VALUES ('pay', '{id}', {requests}, 1000)"
                ));
            },
            version: Some(&|| {
                let epoch = pg.psql("SELECT epoch FROM tak_namespaces WHERE namespace = 'pay'");
                (epoch, pg.version("pay"))
            }),
            wipe: &|| {
                pg.psql(
                    "DELETE FROM tak_keys WHERE namespace = 'pay'; \
                     DELETE FROM tak_namespaces WHERE namespace = 'pay'",
                );
            },
        };
        a_namespace_from_import_to_restore(&fleet, password);
        // The tables dropped too: missing, and restored with them.
        let backup = tempfile::NamedTempFile::new().unwrap();
        run(&fleet.with(&["export", "--out", p(backup.path())])).code(0);
        pg.psql("DROP TABLE tak_changes, tak_keys, tak_namespaces, tak_usage, tak_writes");
        run(&fleet.with(&["keys", "list"])).code(8).one_line_error();
        run(&fleet.with(&["restore", p(backup.path())])).code(0);
        assert_eq!(pg.ids("pay"), ["new", "root"]);

        // A user who may not create the tables, where there are none: said so, not
        // "missing" (which `import` would fix).
        pg.psql("CREATE ROLE low LOGIN PASSWORD 'low-pass-9d2e'");
        pg.psql("DROP TABLE tak_changes, tak_keys, tak_namespaces, tak_usage, tak_writes");
        let low = url.replace(&format!("postgres:{password}@"), "low:low-pass-9d2e@");
        for command in ["import", "restore"] {
            let r = run(&[
                command,
                p(backup.path()),
                "--postgres",
                &low,
                "--namespace",
                "pay",
            ])
            .code(3)
            .one_line_error();
            assert!(
                r.err.contains("cannot create the tables") && !r.err.contains("low-pass"),
                "{}",
                r.err
            );
        }
    }

    // Malformed URLs and flags: usage errors that never repeat the URL.
    for bad in [
        "postgres://user:hunter2@[::1",
        "host=127.0.0.1 password=hunter2 nonsense",
        "redis://:hunter2@127.0.0.1/",
    ] {
        let r = run(&["keys", "list", "--postgres", bad, "--namespace", "n"])
            .code(2)
            .one_line_error();
        assert!(!r.err.contains("hunter2"), "{}", r.err);
    }
    run(&["keys", "list", "--postgres", url.as_str()]).code(2);
    run(&[
        "keys",
        "list",
        "--postgres",
        url.as_str(),
        "--namespace",
        "",
    ])
    .code(2)
    .one_line_error();
    run(&[
        "keys",
        "list",
        "--postgres",
        url.as_str(),
        "--redis",
        "redis://127.0.0.1/",
        "--namespace",
        "pay",
    ])
    .code(2);

    pg.stop();
    down_is_unavailable(["--postgres", url.as_str(), "--namespace", "pay"], password);
}

/// A stored record that cannot be read (not JSON, not a key record): `keys get` and
/// `keys list`, `export` and `usage` exit 1 ("invalid": the stored data does not
/// check), not 3 ("unavailable", which says to retry once the engine answers: a
/// retry would meet the same record). The key is named, the record's content never.
fn a_corrupt_record_is_invalid_not_unavailable(target: [&str; 4], corrupt: &dyn Fn()) {
    let with = |args: &[&str]| on(&target, args);
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.toml");
    fs::write(&seed, ROOT).unwrap();
    run(&with(&["import", p(&seed)])).code(0);
    corrupt();
    for args in [
        with(&["keys", "get", "bad"]),
        with(&["keys", "list"]),
        with(&["export"]),
        with(&["usage"]),
    ] {
        let r = run(&args).code(1).one_line_error();
        assert!(
            r.err.contains("`bad`") && r.err.contains("cannot be read"),
            "{args:?}: {}",
            r.err
        );
        assert!(!r.err.contains("plain-secret"), "{}", r.err);
    }
    // The other keys are still there to be read.
    run(&with(&["keys", "get", "root"])).code(0);
}

#[test]
fn a_corrupt_record_in_redis_is_invalid_not_unavailable() {
    let Some(redis) = Redis::start() else { return };
    let url = redis.url();
    a_corrupt_record_is_invalid_not_unavailable(
        ["--redis", url.as_str(), "--namespace", "pay"],
        &|| {
            redis.cli(&[
                "HSET",
                "tak:{pay}:keys",
                "bad",
                r#"{"id":"bad","secret":"plain-secret"}"#,
            ]);
        },
    );
}

#[test]
fn a_corrupt_record_in_postgres_is_invalid_not_unavailable() {
    let Some(pg) = postgres_support::Postgres::start() else {
        return;
    };
    let url = pg.url();
    a_corrupt_record_is_invalid_not_unavailable(
        ["--postgres", url.as_str(), "--namespace", "pay"],
        &|| {
            pg.raw_change(
                "pay",
                "bad",
                Some(r#"{"id": "bad", "secret": "plain-secret"}"#),
                true,
                true,
            );
        },
    );
}

/// 60,000 keys written to PostgreSQL in one transaction each time (the import that
/// creates the namespace, an apply that changes every key, a restore): given time
/// in proportion, not the 2 s a single key's write gets. Each command may take its
/// time on a busy machine (the suite runs beside other work): the bound is generous.
#[test]
fn many_keys_are_one_change_on_postgres() {
    let Some(pg) = postgres_support::Postgres::start() else {
        return;
    };
    let url = pg.url();
    let t = ["--postgres", url.as_str(), "--namespace", "many"];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("many.toml");
    fs::write(&file, postgres_support::keys_file("k", 60_000)).unwrap();
    let f = p(&file);
    let count = || pg.psql("SELECT count(*) FROM tak_keys WHERE namespace = 'many'");
    run_long(&on(&t, &["import", f])).code(0);
    assert_eq!(count(), "60000");
    let owned = dir.path().join("owned.toml");
    let text = fs::read_to_string(&file).unwrap();
    fs::write(&owned, text.replace("\n\n", "\nowner = \"ops\"\n\n")).unwrap();
    let before = pg.version("many");
    run_long(&on(&t, &["apply", p(&owned)])).code(0);
    assert_eq!(pg.version("many"), before + 1);
    run_long(&on(&t, &["diff", p(&owned)])).code(0);
    run_long(&on(&t, &["restore", "--force", f])).code(0);
    run_long(&on(&t, &["diff", f])).code(0);
}

#[test]
fn a_password_in_a_misplaced_url_is_not_repeated_by_the_argument_parser() {
    for args in [
        &[
            "keys",
            "list",
            "--namespace",
            "n",
            "postgres://u:hunter2@h/db",
        ][..],
        &[
            "diff",
            "keys.toml",
            "--namespace",
            "n",
            "redis://:hunter2@h:6379/0",
        ][..],
    ] {
        let r = run(args).code(2);
        assert!(!r.err.contains("hunter2"), "{}", r.err);
        assert!(
            r.err.contains("***@h"),
            "the argument is still named: {}",
            r.err
        );
    }
}

/// A writer that pauses with the key file open (a slow `cat > keys.toml`, `ssh host
/// 'cat > keys.toml'` on a slow link) leaves on disk a prefix that parses and reads
/// the same twice. `apply` leaves it alone while the writer has the file open (exit
/// 3, nothing written), and once the writer is done writes on top of the whole file.
#[cfg(target_os = "linux")]
#[test]
fn apply_leaves_a_file_another_process_is_still_writing_alone() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.toml");
    let desired = dir.path().join("desired.toml");
    let first = "[[keys]]\nid = \"first\"\nsecret = \"s3cr3t-first-0000\"\n";
    let rest = "\n[[keys]]\nid = \"rest\"\nsecret = \"s3cr3t-rest-00000\"\n";
    fs::write(
        &desired,
        "[[keys]]\nid = \"added\"\nsecret = \"s3cr3t-added-0000\"\n",
    )
    .unwrap();
    let mut writer = std::process::Command::new("sh")
        .arg("-c")
        .arg(
            "exec 3>\"$1\"; printf '%s' \"$2\" >&3; echo ready; read go; \
             printf '%s' \"$3\" >&3; exec 3>&-; echo done",
        )
        .args(["sh", p(&live), first, rest])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(writer.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");

    let r = run(&["apply", p(&desired), "--file", p(&live)])
        .code(3)
        .one_line_error();
    assert!(r.err.contains("open for writing"), "{}", r.err);
    assert_eq!(fs::read_to_string(&live).unwrap(), first);

    writeln!(writer.stdin.take().unwrap(), "go").unwrap();
    line.clear();
    said.read_line(&mut line).unwrap();
    assert_eq!(line, "done\n");
    assert!(writer.wait().unwrap().success());

    run(&["apply", p(&desired), "--file", p(&live)]).code(0);
    let text = fs::read_to_string(&live).unwrap();
    for id in ["first", "rest", "added"] {
        assert!(text.contains(&format!("id = \"{id}\"")), "{id}: {text}");
    }
}

#[cfg(unix)]
#[test]
fn a_dangling_link_at_the_secret_files_name_is_never_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    fs::write(&file, ROOT).unwrap();
    let aim = dir.path().join("aim.key");
    let link = dir.path().join("link.key");
    std::os::unix::fs::symlink(&aim, &link).unwrap();
    run(&[
        "keys",
        "create",
        "--id",
        "x",
        "--file",
        p(&file),
        "--secret-file",
        p(&link),
    ])
    .code(4)
    .one_line_error();
    assert!(!aim.exists(), "the secret went through the link");
    assert!(!fs::read_to_string(&file).unwrap().contains("\"x\""));
}

// ---------------------------------------------------------------------------
// `apply` racing other writers: a plan made from a read is written only if what
// it touches is still what was read; a revoked key never comes back, a wiped
// namespace is never re-created.
// ---------------------------------------------------------------------------

const E1: &str = "[[keys]]\nid = \"e1\"\nsecret = \"e1-secret\"\n";
const E1_OWNED: &str = "[[keys]]\nid = \"e1\"\nsecret = \"e1-secret\"\nowner = \"ops\"\n";

/// `apply` started in the background; its run once it ended.
struct Background(std::process::Child);

impl Background {
    fn start(args: &[String]) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tower-api-key"))
            .args(args)
            .env_remove("TOWER_API_KEY_ADMIN_KEY")
            .env_remove("RUST_LOG")
            .env("USER", "ops")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Self(child)
    }

    fn finish(self) -> Run {
        let output = self.0.wait_with_output().unwrap();
        Run {
            code: output.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&output.stdout).into_owned(),
            err: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// Holds namespace `ns`'s row (as every write does) on a connection of its own,
/// starts `apply` with `args`, waits until the apply has read and waits for the row
/// (its write), does `meanwhile` in the holding transaction, commits, and gives the
/// apply's run.
async fn apply_while_held(
    pg: &postgres_support::Postgres,
    ns: &str,
    args: &[String],
    meanwhile: &str,
) -> Run {
    let (mut client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let tx = client.transaction().await.unwrap();
    tx.query_one(
        "SELECT namespace FROM tak_namespaces WHERE namespace = $1 FOR UPDATE",
        &[&ns],
    )
    .await
    .unwrap();
    let mut apply = Background::start(args);
    // The apply has read the namespace (a read takes no lock) and now waits for
    // the row to write its plan.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        // Activity is read once per transaction unless asked afresh.
        tx.execute("SELECT pg_stat_clear_snapshot()", &[])
            .await
            .unwrap();
        let waiting: i64 = tx
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        if apply.0.try_wait().unwrap().is_some() {
            let r = apply.finish();
            panic!(
                "apply ended without waiting: {}\n{}\n{}",
                r.code, r.out, r.err
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "apply never waited for the row"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tx.batch_execute(meanwhile).await.unwrap();
    tx.commit().await.unwrap();
    tokio::task::spawn_blocking(move || apply.finish())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_on_postgres_never_brings_back_a_key_revoked_or_a_namespace_wiped_meanwhile() {
    let Some(pg) = postgres_support::Postgres::start() else {
        return;
    };
    let url = pg.url();
    let t = ["--postgres", url.as_str(), "--namespace", "res"];
    let dir = tempfile::tempdir().unwrap();
    let (e1, owned) = (dir.path().join("e1.toml"), dir.path().join("owned.toml"));
    fs::write(&e1, E1).unwrap();
    fs::write(&owned, E1_OWNED).unwrap();
    run(&on(&t, &["import", p(&e1)])).code(0);
    let apply: Vec<String> = on(&t, &["apply", p(&owned)]);
    let disabled = || {
        pg.psql("SELECT coalesce(record->>'disabled', 'false') FROM tak_keys WHERE namespace = 'res' AND id = 'e1'")
    };

    // e1 revoked between apply's read and its write: refused as a conflict, e1
    // stays revoked, nothing of the plan written.
    let before = pg.version("res");
    let r = apply_while_held(
        &pg,
        "res",
        &apply,
        "UPDATE tak_keys SET record = record || '{\"disabled\": true}'::jsonb \
         WHERE namespace = 'res' AND id = 'e1'; \
         UPDATE tak_namespaces SET version = version + 1 WHERE namespace = 'res'",
    )
    .await
    .code(4)
    .one_line_error();
    assert!(
        r.err.contains("changed since it was read") && r.err.contains("e1"),
        "{}",
        r.err
    );
    assert_eq!(disabled(), "true");
    assert_eq!(pg.version("res"), before + 1, "the apply wrote a version");
    assert_eq!(
        pg.psql("SELECT coalesce(record->>'owner', '') FROM tak_keys WHERE namespace = 'res' AND id = 'e1'"),
        ""
    );

    // With --prune: the same.
    let mut prune = apply.clone();
    prune.push("--prune".into());
    apply_while_held(
        &pg,
        "res",
        &prune,
        "UPDATE tak_keys SET record = record - 'disabled' WHERE namespace = 'res' AND id = 'e1'",
    )
    .await
    .code(4)
    .one_line_error();
    assert_eq!(disabled(), "false");

    // The namespace deleted meanwhile: missing (8), nothing re-created.
    run(&on(&t, &["keys", "create", "--id", "gone"])).code(0);
    apply_while_held(
        &pg,
        "res",
        &prune,
        "DELETE FROM tak_keys WHERE namespace = 'res'; \
         DELETE FROM tak_namespaces WHERE namespace = 'res'",
    )
    .await
    .code(8)
    .one_line_error();
    assert_eq!(
        pg.psql("SELECT count(*) FROM tak_namespaces WHERE namespace = 'res'"),
        "0"
    );
    assert!(pg.ids("res").is_empty());
}

/// A TCP proxy to Redis on `upstream` that holds the first script a client sends
/// (a write: the read before it is plain commands) until released: the test then
/// changes the namespace between apply's read and its write.
struct HoldFirstScript {
    port: u16,
    reached: std::sync::mpsc::Receiver<()>,
    release: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl HoldFirstScript {
    fn start(upstream: u16) -> Self {
        use std::sync::{
            Arc, Condvar, Mutex,
            atomic::{AtomicBool, Ordering},
        };
        let (tell, reached) = std::sync::mpsc::channel();
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let held = AtomicBool::new(false);
        let gate = release.clone();
        let tell = Mutex::new(tell);
        let port = redis_proxy(upstream, move |sent| {
            let script = sent.windows(4).any(|w| w.eq_ignore_ascii_case(b"EVAL"));
            if script && !held.swap(true, Ordering::SeqCst) {
                let _ = tell.lock().unwrap().send(());
                let (lock, cv) = &*gate;
                let mut go = lock.lock().unwrap();
                while !*go {
                    go = cv.wait(go).unwrap();
                }
            }
        });
        Self {
            port,
            reached,
            release,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs `args` (through this proxy), does `meanwhile` once its first script is
    /// held, lets the script go, and gives the run.
    fn run(self, args: &[String], meanwhile: impl FnOnce()) -> Run {
        let apply = Background::start(args);
        self.reached
            .recv_timeout(Duration::from_secs(20))
            .expect("apply never wrote");
        meanwhile();
        let (lock, cv) = &*self.release;
        *lock.lock().unwrap() = true;
        cv.notify_all();
        apply.finish()
    }
}

#[test]
fn apply_on_redis_never_brings_back_a_key_revoked_nor_a_namespace_wiped_nor_drops_a_key_created_meanwhile()
 {
    let Some(redis) = Redis::start() else {
        return;
    };
    let url = redis.url();
    let direct = ["--redis", url.as_str(), "--namespace", "res"];
    let dir = tempfile::tempdir().unwrap();
    let (e1, owned) = (dir.path().join("e1.toml"), dir.path().join("owned.toml"));
    fs::write(&e1, E1).unwrap();
    fs::write(&owned, E1_OWNED).unwrap();
    let record = |id: &str| redis.cli(&["HGET", "tak:{res}:keys", id]);
    let apply = |proxy: &HoldFirstScript, prune: bool| {
        let mut args = on(
            &["--redis", &proxy.url(), "--namespace", "res"],
            &["apply", p(&owned)],
        );
        if prune {
            args.push("--prune".into());
        }
        args
    };
    run(&on(&direct, &["import", p(&e1)])).code(0);

    // e1 revoked (removed) between apply's read and its write: refused, e1 stays
    // revoked.
    for prune in [false, true] {
        let proxy = HoldFirstScript::start(redis.port);
        let args = apply(&proxy, prune);
        let r = proxy
            .run(&args, || {
                run(&on(&direct, &["keys", "revoke", "e1"])).code(0);
            })
            .code(4)
            .one_line_error();
        assert!(r.err.contains("changed since it was read"), "{}", r.err);
        // Revoked: gone, and not brought back.
        assert!(redis.ids("res").is_empty(), "{:?}", redis.ids("res"));
        run(&on(&direct, &["restore", "--force", p(&e1)])).code(0);
    }

    // A key created meanwhile, which the printed plan never named: kept (the plan's
    // own changes are made, the rest of the namespace left alone).
    run(&on(&direct, &["keys", "create", "--id", "old"])).code(0);
    let proxy = HoldFirstScript::start(redis.port);
    let args = apply(&proxy, true);
    let r = proxy.run(&args, || {
        run(&on(&direct, &["keys", "create", "--id", "concurrent"])).code(0);
    });
    assert!(
        r.out.contains("- old") && !r.out.contains("concurrent"),
        "{}",
        r.out
    );
    assert_eq!(redis.ids("res"), ["concurrent", "e1"]);
    assert!(record("e1").contains("owner"), "{}", record("e1"));

    // The namespace wiped meanwhile: missing (8), nothing re-created.
    run(&on(&direct, &["restore", "--force", p(&e1)])).code(0);
    run(&on(&direct, &["keys", "create", "--id", "old"])).code(0);
    let proxy = HoldFirstScript::start(redis.port);
    let args = apply(&proxy, true);
    proxy
        .run(&args, || {
            // The namespace's own keys lost (a restore's staging, if any, kept).
            redis.cli(&[
                "DEL",
                "tak:{res}:keys",
                "tak:{res}:version",
                "tak:{res}:log",
            ]);
        })
        .code(8)
        .one_line_error();
    assert!(redis.ids("res").is_empty());
    assert_eq!(redis.cli(&["EXISTS", "tak:{res}:version"]), "0");
}

/// An API that answers every request from `answer(path)`: status and body, each
/// connection closed after one answer. Runs until the test's process ends.
fn fake_api(answer: fn(&str) -> (u16, Vec<u8>)) -> String {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = first.split(' ').nth(1).unwrap_or("/").to_owned();
            let (status, body) = answer(&path);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
        }
    });
    url
}

#[test]
fn an_api_whose_pages_come_round_again_or_whose_answer_is_not_json_is_not_believed() {
    let key = [("TOWER_API_KEY_ADMIN_KEY", "k")];
    // Cursors a → b → a → …: once round, the listing stops, unavailable (3), where it
    // used to read for ever.
    let cycling = fake_api(|path| {
        let next = if path.ends_with("cursor=a") { "b" } else { "a" };
        let body = format!(r#"{{"items": [{{"id": "k-{next}"}}], "next_cursor": "{next}"}}"#);
        (200, body.into_bytes())
    });
    let r = run_with(&["keys", "list", "--api", &cycling], None, &key)
        .code(3)
        .one_line_error();
    assert!(r.err.contains("come round again"), "{}", r.err);
    run_with(&["usage", "--idle", "1d", "--api", &cycling], None, &key).code(3);
    // 200 with a body that is not JSON: not "no keys" with exit 0.
    let garbage = fake_api(|_| (200, b"\xff\xfe not json".to_vec()));
    for args in [
        &["keys", "list"][..],
        &["keys", "get", "web"],
        &["usage", "--idle", "1d"],
    ] {
        let mut args = args.to_vec();
        args.extend(["--api", &garbage]);
        let r = run_with(&args, None, &key).code(3).one_line_error();
        assert!(r.err.contains("not JSON"), "{args:?}: {}", r.err);
        assert!(r.out.is_empty(), "{args:?}: {}", r.out);
    }
    // A write answered so: it may have happened (7).
    run_with(
        &[
            "keys",
            "revoke",
            "web",
            "--if-match",
            "*",
            "--api",
            &garbage,
        ],
        None,
        &key,
    )
    .code(7)
    .one_line_error();
    // JSON without the list's `items`: not an empty list either.
    let empty = fake_api(|_| (200, b"{}".to_vec()));
    run_with(&["keys", "list", "--api", &empty], None, &key).code(3);
    // A refusal whose words would drive the terminal (clear it, retitle it): shown
    // spelled out, on one line.
    let hostile = fake_api(|_| {
        let body = "{\"type\": \"x\", \"title\": \"\\u001b[2J\\u001b]0;owned\\u0007\", \
                    \"status\": 409, \"detail\": \"a\\nb \\u001b[31mred\"}";
        (409, body.as_bytes().to_vec())
    });
    let r = run_with(&["keys", "get", "web", "--api", &hostile], None, &key)
        .code(4)
        .one_line_error();
    assert!(
        !r.err.contains('\u{1b}') && !r.err.contains('\u{7}'),
        "{:?}",
        r.err
    );
    assert!(r.err.contains("\\u{1b}[2J"), "{:?}", r.err);
    // A proxy's error page: its status decides, as before (502: unavailable).
    let proxy = fake_api(|_| (502, b"<html>bad gateway</html>".to_vec()));
    run_with(&["keys", "list", "--api", &proxy], None, &key).code(3);
}

/// A TCP proxy to Redis on `upstream`, on a port of its own: what a client sends is
/// shown to `before` (which may hold it up) and then passed on; the answers come
/// back as they are.
fn redis_proxy(upstream: u16, before: impl Fn(&[u8]) + Send + Sync + 'static) -> u16 {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        sync::Arc,
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let before = Arc::new(before);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            let (mut client_rx, mut server_rx) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server_rx, &mut client);
            });
            let before = before.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match client_rx.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    before(&buf[..n]);
                    if server.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A proxy to Redis on `upstream` that holds every `HGETALL` (a whole read) for
/// `delay`, as a namespace of a million records takes seconds to send.
fn slow_whole_reads(upstream: u16, delay: Duration) -> String {
    let port = redis_proxy(upstream, move |sent| {
        if sent.windows(7).any(|w| w.eq_ignore_ascii_case(b"HGETALL")) {
            std::thread::sleep(delay);
        }
    });
    format!("redis://127.0.0.1:{port}/")
}

#[test]
fn a_whole_read_of_a_large_namespace_is_given_time() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    fs::write(&file, ROOT).unwrap();
    let url = redis.url();
    run(&["import", p(&file), "--redis", &url, "--namespace", "big"]).code(0);
    // Its answer takes longer than a connection may (2 s): read all the same, where
    // `diff`, `export` and `keys list` used to give up as "did not answer in time".
    let slow = slow_whole_reads(redis.port, Duration::from_secs(3));
    run(&["diff", p(&file), "--redis", &slow, "--namespace", "big"]).code(0);
    let out = dir.path().join("out.toml");
    run(&[
        "export",
        "--redis",
        &slow,
        "--namespace",
        "big",
        "--out",
        p(&out),
    ])
    .code(0);
    assert!(fs::read_to_string(&out).unwrap().contains("id = \"root\""));
}

#[test]
fn restore_says_which_version_a_replicas_snapshot_holds() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("snapshot.toml");
    fs::write(
        &snapshot,
        format!(
            "# tower-api-key replica snapshot: namespace version 41 of epoch e7, written \
             2026-12-03T12:00:00Z\n# Restore from the newest replica's snapshot.\n\n{ROOT}"
        ),
    )
    .unwrap();
    let target = dir.path().join("restored.toml");
    let r = run(&["restore", p(&snapshot), "--file", p(&target)]).code(0);
    assert!(
        r.err.contains(
            "restoring from tower-api-key replica snapshot: namespace version 41 of epoch e7"
        ),
        "{}",
        r.err
    );
    // A key file that is no snapshot: nothing said about versions.
    let plain = dir.path().join("plain.toml");
    fs::write(&plain, ROOT).unwrap();
    let r = run(&[
        "restore",
        p(&plain),
        "--file",
        p(&dir.path().join("other.toml")),
    ])
    .code(0);
    assert!(!r.err.contains("restoring from"), "{}", r.err);
}

/// A reviewer's finding: Redis takes a large write as versions of 1,000 changes, each
/// applied by replicas whole, and two keys that swap secrets (or a secret handed to
/// a new id as its old id goes) landed in two versions when far apart in the file:
/// in between, one secret was under two ids, and every replica refused both keys
/// (for good, had the writer died there). `apply` and `import` now write the changes
/// that move secrets between ids in one version, first.
#[test]
fn secrets_that_move_between_ids_move_in_one_redis_version() {
    let Some(redis) = Redis::start() else { return };
    let url = redis.url();
    let target = ["--redis", url.as_str(), "--namespace", "moves"];
    let with = |args: &[&str]| on(&target, args);
    let dir = tempfile::tempdir().unwrap();
    let file = |swapped: bool, renamed: bool| {
        let mut text = String::new();
        for i in 0..1500 {
            let mut secret = format!("s-{i:04}");
            if swapped && i == 1 {
                secret = "s-1499".into();
            }
            if swapped && i == 1499 {
                secret = "s-0001".into();
            }
            // k0700 handed to a new id, last in the file, as k0700 goes.
            let id = match (renamed, i) {
                (true, 700) => continue,
                _ => format!("k{i:04}"),
            };
            text += &format!(
                "[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\n\n",
                sha256_hex(&secret)
            );
        }
        if renamed {
            text += &format!(
                "[[keys]]\nid = \"k9999\"\nsha256 = \"{}\"\n",
                sha256_hex("s-0700")
            );
        }
        let path = dir.path().join(format!("keys-{swapped}-{renamed}.toml"));
        fs::write(&path, text).unwrap();
        path
    };
    let base = file(false, false);
    run(&with(&["import", p(&base)])).code(0);
    let same = |last: &std::collections::HashMap<String, String>, a: &str, b: &str| {
        assert_eq!(last.get(a), last.get(b), "{a} and {b} in two versions");
        assert!(last.contains_key(a));
    };
    // A swap of the first and last keys, by `apply`, then back by `import`.
    run(&with(&["apply", p(&file(true, false))])).code(0);
    same(&redis.last_versions("moves"), "k0001", "k1499");
    run(&with(&["import", p(&base)])).code(0);
    same(&redis.last_versions("moves"), "k0001", "k1499");
    // A rename: k0700's secret to k9999, k0700 removed (`apply --prune`).
    run(&with(&["apply", "--prune", p(&file(false, true))])).code(0);
    same(&redis.last_versions("moves"), "k0700", "k9999");
    let ids = redis.ids("moves");
    assert!(ids.contains(&"k9999".to_owned()) && !ids.contains(&"k0700".to_owned()));
    run(&with(&["diff", p(&file(false, true))])).code(0);

    // 2,600 renames at once, each on its own (5,200 changes, more than one version
    // holds): each pair in one version, all written.
    let renames = |n: usize, linked: bool| {
        let mut text = String::new();
        for i in 0..1500 {
            // Each of the first n renamed; or, linked, keeping its id and taking
            // the next one's secret, in a ring: one group of n changes.
            let (id, secret) = match (i < n, linked) {
                (true, false) => (format!("r{i:04}"), format!("s-{i:04}")),
                (true, true) => (format!("k{i:04}"), format!("s-{:04}", (i + 1) % n)),
                (false, _) => (format!("k{i:04}"), format!("s-{i:04}")),
            };
            text += &format!(
                "[[keys]]\nid = \"{id}\"\nsha256 = \"{}\"\n\n",
                sha256_hex(&secret)
            );
        }
        text
    };
    run(&with(&["restore", "--force", p(&base)])).code(0);
    let many = dir.path().join("renames.toml");
    fs::write(&many, renames(1200, false)).unwrap();
    // 1,200 renames of 2,400 changes: more than one version's share of 1,000.
    run(&with(&["apply", "--prune", p(&many)])).code(0);
    let last = redis.last_versions("moves");
    for i in [0, 599, 1199] {
        same(&last, &format!("k{i:04}"), &format!("r{i:04}"));
    }
    run(&with(&["diff", p(&many)])).code(0);
    // A ring of 1,200 keys each taking the next one's secret: one version.
    run(&with(&["restore", "--force", p(&base)])).code(0);
    fs::write(&many, renames(1200, true)).unwrap();
    run(&with(&["apply", p(&many)])).code(0);
    let last = redis.last_versions("moves");
    same(&last, "k0000", "k1199");
    same(&last, "k0000", "k0600");
    run(&with(&["diff", p(&many)])).code(0);
}
