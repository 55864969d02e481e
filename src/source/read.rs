//! Reading a key file, whatever is at its path.
//!
//! A key file's path is a place others write to: it may hold a FIFO that never ends,
//! a symlink to `/dev/zero`, a sparse file claiming 100 GiB, a directory. Only a
//! regular file is read, never more than the size limit, and without ever blocking
//! on the open.

use std::{fs::File, io, path::Path};

use std::{
    hash::{BuildHasher as _, Hasher as _},
    sync::OnceLock,
};

use zeroize::Zeroize as _;

/// The default size limit of a key file: a million keys fit in about 140 MB.
pub(crate) const DEFAULT_MAX_SIZE: u64 = 256 << 20;

/// What [`FileBytes::fingerprint`] gives: the length and a seeded 64-bit hash.
pub(crate) type Fingerprint = (usize, u64);

/// A file's content, wiped when dropped: it may hold secrets.
#[cfg_attr(not(feature = "file"), allow(dead_code))]
pub(crate) struct FileBytes(Vec<u8>, Option<Stamp>);

/// What a file's metadata says about its content: device, inode, size, and the
/// modification and change times (nanoseconds). A different stamp means the file may
/// have changed; the same stamp means it has not, unless it was rewritten in place to
/// the same size within one tick of the file system's clock (see [`Stamp::racy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "file"), allow(dead_code))]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: i128,
    changed: i128,
}

#[cfg_attr(not(feature = "file"), allow(dead_code))]
impl Stamp {
    /// The stamp of a file's metadata.
    pub(crate) fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
            Self {
                dev: meta.dev(),
                ino: meta.ino(),
                len: meta.len(),
                modified: ns(meta.mtime(), meta.mtime_nsec()),
                changed: ns(meta.ctime(), meta.ctime_nsec()),
            }
        }
        #[cfg(not(unix))]
        {
            let ns = |t: io::Result<std::time::SystemTime>| {
                t.ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos() as i128)
            };
            Self {
                dev: 0,
                ino: 0,
                len: meta.len(),
                modified: ns(meta.modified()),
                changed: ns(meta.created()),
            }
        }
    }

    /// The file: its device and inode (`None` where the platform has no inodes).
    pub(crate) fn file(&self) -> Option<(u64, u64)> {
        (self.ino != 0).then_some((self.dev, self.ino))
    }

    /// The stamp of whatever is at `path` now (following symlinks).
    pub(crate) fn at(path: &Path) -> io::Result<Self> {
        std::fs::metadata(path).map(|m| Self::of(&m))
    }

    /// Whether the file was modified so recently (within two seconds of `now`, the
    /// coarsest timestamp tick of common file systems) that a same-size rewrite could
    /// still leave this very stamp: such a stamp proves nothing yet, and the content
    /// is read again at the next look.
    pub(crate) fn racy(&self, now: std::time::SystemTime) -> bool {
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        now - self.modified.max(self.changed) < 2_000_000_000
    }
}

impl FileBytes {
    /// Reads the regular file at `path`, if it holds at most `limit` bytes.
    ///
    /// # Errors
    ///
    /// The open or read failed; the path is not a regular file
    /// ([`io::ErrorKind::InvalidInput`]); the file is larger than `limit`
    /// ([`io::ErrorKind::FileTooLarge`]).
    pub(crate) fn read(path: &Path, limit: u64) -> io::Result<Self> {
        #[cfg(test)]
        reads::note(path);
        let file = open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        if meta.len() > limit {
            return Err(too_large(limit));
        }
        let capacity = usize::try_from(meta.len()).unwrap_or(0);
        // One byte past the limit tells a file that grew while it was read.
        let bytes = Self(
            read_wiping(file, capacity.saturating_add(1), limit.saturating_add(1))?,
            Some(Stamp::of(&meta)),
        );
        if bytes.0.len() as u64 > limit {
            return Err(too_large(limit));
        }
        Ok(bytes)
    }

    /// The stamp of the file as it was opened, before its content was read: a writer
    /// that changes it during the read leaves a different stamp behind.
    #[cfg_attr(not(feature = "file"), allow(dead_code))]
    pub(crate) fn stamp(&self) -> Option<Stamp> {
        self.1
    }

    /// A fingerprint of the content: how a watcher tells new content from old. A
    /// 64-bit hash seeded once per process, and the length: gigabytes a second, where
    /// SHA-256 took a quarter of a second of a million-key file's load.
    pub(crate) fn fingerprint(&self) -> Fingerprint {
        fingerprint(&self.0)
    }
}

/// Reads `reader` to its end, or to `limit` bytes, into a buffer of `capacity`
/// bytes, grown by hand if the reader holds more (a file that grows while it is
/// read). `read_to_end` would free each outgrown buffer as it is, secrets and all;
/// here every buffer is wiped before it is freed, and so is the one read into when
/// the read fails.
///
/// # Errors
///
/// The reader's error, other than [`io::ErrorKind::Interrupted`] (retried).
pub(crate) fn read_wiping(
    mut reader: impl io::Read,
    capacity: usize,
    limit: u64,
) -> io::Result<Vec<u8>> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    // Zeroed memory from the allocator: a large buffer costs no writes until read into.
    let mut buffer = zeroize::Zeroizing::new(vec![0u8; capacity.clamp(1, limit.max(1))]);
    let mut filled = 0;
    while filled < limit {
        if filled == buffer.len() {
            let size = buffer.len().saturating_mul(2).min(limit);
            let mut grown = zeroize::Zeroizing::new(vec![0u8; size]);
            grown[..filled].copy_from_slice(&buffer[..filled]);
            // The outgrown buffer is wiped as it drops.
            buffer = grown;
        }
        filled += fill(&mut reader, &mut buffer[filled..])?;
        if filled < buffer.len() {
            break;
        }
    }
    buffer.truncate(filled);
    Ok(std::mem::take(&mut *buffer))
}

/// Reads into `into` until it is full or the reader ends, and says how much it read.
///
/// # Errors
///
/// The reader's error, other than [`io::ErrorKind::Interrupted`] (retried).
fn fill(reader: &mut impl io::Read, into: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < into.len() {
        match reader.read(&mut into[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The [`FileBytes::fingerprint`] of `bytes`: hashed in pieces of [`PIECE`] bytes, so
/// that [`fingerprint_of_file`] can give the same without holding the file whole.
pub(crate) fn fingerprint(bytes: &[u8]) -> Fingerprint {
    let mut hasher = hasher();
    bytes.chunks(PIECE).for_each(|piece| hasher.write(piece));
    (bytes.len(), hasher.finish())
}

/// How much of a file [`fingerprint_of_file`] reads at a time.
const PIECE: usize = 1 << 20;

fn hasher() -> impl std::hash::Hasher {
    static SEED: OnceLock<foldhash::quality::RandomState> = OnceLock::new();
    SEED.get_or_init(Default::default).build_hasher()
}

/// The fingerprint and stamp of the regular file at `path` (at most `limit` bytes),
/// read a piece at a time into one buffer: what a watcher's poll needs to tell
/// whether content it already has is still there. A million-key file read whole
/// costs 100 MB of fresh memory and tens of milliseconds of the core it shares with
/// requests; here the memory is one piece, and the thread yields between pieces,
/// so requests on the same core wait a piece's time at most.
///
/// # Errors
///
/// As [`FileBytes::read`].
#[cfg_attr(not(feature = "file"), allow(dead_code))]
pub(crate) fn fingerprint_of_file(
    path: &Path,
    limit: u64,
) -> io::Result<(Fingerprint, Option<Stamp>)> {
    #[cfg(test)]
    reads::note(path);
    let mut file = open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    if meta.len() > limit {
        return Err(too_large(limit));
    }
    let mut hasher = hasher();
    // Zeroed when dropped, as `FileBytes` is: the file holds secrets.
    let mut piece = zeroize::Zeroizing::new(vec![0u8; PIECE]);
    let mut len: u64 = 0;
    loop {
        // A whole piece (or the end), as `fingerprint` cuts them.
        let filled = fill(&mut file, &mut piece)?;
        len += filled as u64;
        if len > limit {
            return Err(too_large(limit));
        }
        if filled == 0 {
            break;
        }
        hasher.write(&piece[..filled]);
        if filled < PIECE {
            break;
        }
        std::thread::yield_now();
    }
    let len = usize::try_from(len).map_err(|_| too_large(limit))?;
    Ok(((len, hasher.finish()), Some(Stamp::of(&meta))))
}

fn not_regular() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "not a regular file (a directory, a FIFO or a device?); the key file is not read",
    )
}

fn too_large(limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!("larger than the key file size limit of {limit} bytes"),
    )
}

/// Opens without blocking: opening a FIFO for reading waits for a writer unless
/// `O_NONBLOCK` is given. Reads of a regular file ignore the flag.
#[cfg(unix)]
fn open(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits().cast_signed())
        .open(path)
}

#[cfg(not(unix))]
fn open(path: &Path) -> io::Result<File> {
    File::open(path)
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for FileBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// How often each path was read, for tests that check a file is not read in vain.
#[cfg(test)]
pub(crate) mod reads {
    use std::{
        collections::HashMap,
        path::{Path, PathBuf},
        sync::Mutex,
    };

    static READS: Mutex<Option<HashMap<PathBuf, usize>>> = Mutex::new(None);

    pub(crate) fn note(path: &Path) {
        let mut reads = READS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *reads
            .get_or_insert_with(HashMap::new)
            .entry(path.to_owned())
            .or_default() += 1;
    }

    /// How many times `path` was read so far.
    #[cfg_attr(not(feature = "file"), allow(dead_code))]
    pub(crate) fn of(path: &Path) -> usize {
        let reads = READS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reads
            .as_ref()
            .and_then(|r| r.get(path))
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_regular_file_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "keys = []\n").unwrap();
        assert_eq!(&*FileBytes::read(&path, 100).unwrap(), b"keys = []\n");
        let err = FileBytes::read(&path, 5).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
    }

    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileBytes::read(dir.path(), 100).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "a directory");
        #[cfg(unix)]
        {
            let err = FileBytes::read(Path::new("/dev/zero"), 100).err().unwrap();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "a device");
            let fifo = dir.path().join("fifo");
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            if made.is_ok_and(|s| s.success()) {
                // Returns at once: no writer is waited for.
                let err = FileBytes::read(&fifo, 100).err().unwrap();
                assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "a FIFO");
            }
        }
    }

    /// A reader that gives its bytes a few at a time, interrupted now and then, and
    /// then perhaps fails.
    struct Trickle<'a> {
        left: &'a [u8],
        calls: usize,
        fails: bool,
    }

    impl io::Read for Trickle<'_> {
        fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if self.left.is_empty() && self.fails {
                return Err(io::Error::other("gone"));
            }
            let n = into.len().min(self.left.len()).min(7);
            into[..n].copy_from_slice(&self.left[..n]);
            self.left = &self.left[n..];
            Ok(n)
        }
    }

    /// What grows past its first buffer is read whole, a read stops at the limit, an
    /// interruption is retried and an error is the caller's.
    #[test]
    fn reading_by_hand_grows_stops_at_the_limit_and_fails_as_the_reader() {
        let data: Vec<u8> = (0..1_000u32).map(|i| (i % 251) as u8).collect();
        let trickle = |fails| Trickle {
            left: &data,
            calls: 0,
            fails,
        };
        for capacity in [0, 1, 10, 999, 1_000, 1_001, 5_000] {
            let read = read_wiping(trickle(false), capacity, 10_000).unwrap();
            assert_eq!(read, data, "capacity {capacity}");
            let read = read_wiping(trickle(false), capacity, 501).unwrap();
            assert_eq!(read, data[..501], "capacity {capacity}");
            let failed = read_wiping(trickle(true), capacity, 10_000);
            assert_eq!(failed.map_err(|e| e.to_string()), Err("gone".to_owned()));
        }
        assert_eq!(read_wiping(trickle(false), 64, 0).unwrap(), b"");
    }

    #[test]
    fn a_file_fingerprinted_a_piece_at_a_time_matches_it_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        for len in [0, 1, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 17] {
            let content: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(&path, &content).unwrap();
            let whole = FileBytes::read(&path, DEFAULT_MAX_SIZE).unwrap();
            let (pieces, stamp) = fingerprint_of_file(&path, DEFAULT_MAX_SIZE).unwrap();
            assert_eq!(pieces, whole.fingerprint(), "{len} bytes");
            assert_eq!(stamp, whole.stamp());
        }
        let other = fingerprint_of_file(&path, DEFAULT_MAX_SIZE).unwrap().0;
        std::fs::write(&path, b"[[keys]]\n").unwrap();
        assert_ne!(
            fingerprint_of_file(&path, DEFAULT_MAX_SIZE).unwrap().0,
            other
        );
        let err = fingerprint_of_file(&path, 3).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        let err = fingerprint_of_file(dir.path(), 100).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "a directory");
    }

    #[test]
    fn a_sparse_huge_file_is_refused_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let file = File::create(&path).unwrap();
        file.set_len(100 << 30).unwrap();
        let err = FileBytes::read(&path, DEFAULT_MAX_SIZE).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
    }
}
