//! Who else has the key file open for writing.
//!
//! A writer that saves in place (`cat > keys.toml`, `ssh host 'cat > keys.toml'`,
//! an editor that truncates and rewrites) may pause for as long as its input takes,
//! with half a file on disk. A watcher in this process hears that writer's file events
//! and waits for its close ([`Link::write_open`](super::link::Link::write_open)); a
//! process with no watcher (the cli's `apply`, an API without a `FileSource`) has no
//! such news. On Linux it can ask the kernel instead: whether any process it may look
//! at holds the file open for writing.

use std::path::Path;

/// The most `/proc` entries one look reads, and the longest it takes: bounded however
/// many processes and files the machine has open. Past either, the look gives up and
/// knows nothing (the caller's other checks stand).
#[cfg(target_os = "linux")]
const MAX_LOOKS: usize = 200_000;
#[cfg(target_os = "linux")]
const MAX_TIME: std::time::Duration = std::time::Duration::from_millis(200);

/// Another process that has the file at `path` open for writing, by id, if this
/// process can see one (its own user's processes, or all as root). `None` also when
/// nothing can be known (no `/proc`, not Linux, or a look that ran out of time).
///
/// Only `/proc` is read: each descriptor's link as text and its `fdinfo`. Nothing is
/// asked of the file system a descriptor names, so a process holding a file on a
/// mount that no longer answers (a stuck FUSE daemon, a dead NFS server) cannot make
/// the look hang.
#[cfg(target_os = "linux")]
pub(crate) fn open_for_writing(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::metadata(path).ok()?;
    if !file.is_file() {
        return None;
    }
    let ino = file.ino();
    // The name the kernel gives the open file in `/proc/<pid>/fd`.
    let name = std::fs::canonicalize(path).ok()?;
    let me = std::process::id();
    let start = std::time::Instant::now();
    let mut looks = 0usize;
    for process in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            looks += 1;
            if looks > MAX_LOOKS || (looks.is_multiple_of(256) && start.elapsed() > MAX_TIME) {
                return None;
            }
            // The link's text only: reading it asks nothing of the file's own file
            // system.
            if std::fs::read_link(fd.path()).ok().as_deref() != Some(name.as_path()) {
                continue;
            }
            let info = process.path().join("fdinfo").join(fd.file_name());
            // (Kernels before 5.14 give no `ino:`: the name alone then.)
            if let Some((flags, open_ino)) = fdinfo(&info)
                && open_ino.is_none_or(|open| open == ino)
                && flags & 0o3 != 0
            {
                return Some(pid);
            }
        }
    }
    None
}

/// Not knowable here.
#[cfg(not(target_os = "linux"))]
pub(crate) fn open_for_writing(_path: &Path) -> Option<u32> {
    None
}

/// Who holds the file open for writing, as a log line says it (never empty): the
/// process [`open_for_writing`] found (`writer`), by id and, where `/proc` tells it,
/// name: `process 4242 (cat)`; or what is known when none was found.
pub(crate) fn describe(writer: Option<u32>) -> String {
    describe_as(writer.map(|pid| (pid, process_name(pid))))
}

/// [`describe`], given the process's name (`None`: not known).
fn describe_as(writer: Option<(u32, Option<String>)>) -> String {
    match writer {
        Some((pid, Some(name))) => format!("process {pid} ({name})"),
        Some((pid, None)) => format!("process {pid}"),
        None if cfg!(target_os = "linux") => "no other process this one may look at in /proc \
             holds it open for writing (the writer may be this process, another user's, or \
             done since)"
            .to_owned(),
        None => "its writer is not known (only Linux names it)".to_owned(),
    }
}

/// The name the kernel gives process `pid` (`/proc/<pid>/comm`, at most 15 bytes),
/// printable characters only.
#[cfg(target_os = "linux")]
fn process_name(pid: u32) -> Option<String> {
    let comm = std::fs::read(format!("/proc/{pid}/comm")).ok()?;
    let name: String = String::from_utf8_lossy(comm.get(..64).unwrap_or(&comm))
        .trim_end_matches('\n')
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    (!name.is_empty()).then_some(name)
}

/// Not knowable here.
#[cfg(not(target_os = "linux"))]
fn process_name(_pid: u32) -> Option<String> {
    None
}

/// The open flags (octal) and inode of the descriptor `fdinfo` describes: its
/// `flags:` and `ino:` lines.
#[cfg(target_os = "linux")]
fn fdinfo(fdinfo: &Path) -> Option<(u32, Option<u64>)> {
    use std::io::Read;
    // A few hundred bytes; bounded all the same.
    let mut text = String::new();
    std::fs::File::open(fdinfo)
        .and_then(|file| file.take(64 * 1024).read_to_string(&mut text))
        .ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    let flags = u32::from_str_radix(field("flags:")?, 8).ok()?;
    let ino = field("ino:").and_then(|ino| ino.parse().ok());
    Some((flags, ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_is_described_by_id_and_name_and_never_by_nothing() {
        assert_eq!(
            describe_as(Some((4242, Some("cat".into())))),
            "process 4242 (cat)"
        );
        assert_eq!(describe_as(Some((4242, None))), "process 4242");
        let none = describe_as(None);
        assert!(
            none.contains("no other process") || none.contains("not known"),
            "{none}"
        );
        #[cfg(target_os = "linux")]
        assert_eq!(
            describe(Some(std::process::id())),
            format!(
                "process {} ({})",
                std::process::id(),
                process_name(std::process::id()).unwrap()
            )
        );
    }
}

#[cfg(all(test, target_os = "linux"))]
mod linux_tests {
    use super::*;

    #[test]
    fn a_child_writing_the_file_is_found_and_a_reader_is_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "keys = []\n").expect("write");
        assert_eq!(open_for_writing(&path), None);

        // A reader holding it open is no writer.
        let mut reader = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3<\"$1\"; echo ready; exec sleep 30")
            .arg("sh")
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        wait_ready(&mut reader);
        assert_eq!(open_for_writing(&path), None);
        let _ = reader.kill();
        let _ = reader.wait();

        // A writer that appends, then pauses with the file open.
        let mut writer = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3>>\"$1\"; echo ready; exec sleep 30")
            .arg("sh")
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        wait_ready(&mut writer);
        assert_eq!(open_for_writing(&path), Some(writer.id()));
        let _ = writer.kill();
        let _ = writer.wait();
        assert_eq!(open_for_writing(&path), None);
    }

    #[test]
    fn this_process_s_own_descriptors_are_not_counted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keys.toml");
        let _open = std::fs::File::create(&path).expect("create");
        assert_eq!(open_for_writing(&path), None);
    }

    fn wait_ready(child: &mut std::process::Child) {
        use std::io::BufRead;
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("ready line");
        assert_eq!(line.trim(), "ready");
    }
}
