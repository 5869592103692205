//! Durable file primitives: private directories, atomic replace, advisory locks.
//!
//! Every rewrite of a state file goes through [`atomic_write`]: a temporary
//! file in the same directory, `fsync`, `rename`, then `fsync` of the
//! directory, so a reader (or a crash) sees either the old or the new bytes,
//! never a mix. Writers serialise on a [`FileLock`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode for directories we create.
pub const DIR_MODE: u32 = 0o700;
/// Mode for files we create.
pub const FILE_MODE: u32 = 0o600;

/// Create `dir` (and parents) with mode 0700 if missing.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    // `recursive` applies the mode to every component it creates, but the
    // umask may have narrowed it; set it explicitly on the leaf.
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
}

/// Open (creating with 0600) a file for appending.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(FILE_MODE)
        .open(path)
}

/// `fsync` a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replace `path` with `bytes` atomically and durably (mode 0600).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent_dir(path);
    let mut tmp = temp_in(&dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(&dir)
}

/// Create `path` with `bytes` (mode 0600), durably, only if nothing is
/// there: not a file, not a directory, not a symlink (dangling or not; it is
/// never followed). The bytes go to a temporary first, so `path` appears
/// whole or not at all. An existing `path` is `ErrorKind::AlreadyExists`.
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent_dir(path);
    let mut tmp = temp_in(&dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist_noclobber(path).map_err(|e| e.error)?;
    sync_dir(&dir)
}

/// Prefix of our temporary files; the writer's pid follows, then `-`.
const TEMP_PREFIX: &str = ".tmp-";

/// A temporary file in `dir` named `.tmp-<pid>-<random>`, mode 0600, so a
/// sweep can tell whether its writer is still alive.
fn temp_in(dir: &Path) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
        .permissions(fs::Permissions::from_mode(FILE_MODE))
        .tempfile_in(dir)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// An advisory lock on a lock file (exclusive or shared), released on drop.
///
/// Uses `flock(2)` through std's `File::lock`, so a process that dies
/// (even by `kill -9`) releases its lock with its file descriptors.
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Block until the exclusive lock on `path` is ours.
    pub fn exclusive(path: &Path) -> io::Result<FileLock> {
        let file = Self::open(path)?;
        file.lock()?;
        Ok(FileLock { file })
    }

    /// Block until a shared lock on `path` is ours: no exclusive holder
    /// (a writer) can be in the middle of a change while we read.
    pub fn shared(path: &Path) -> io::Result<FileLock> {
        let file = Self::open(path)?;
        file.lock_shared()?;
        Ok(FileLock { file })
    }

    /// The lock file, created (private) if it is not there yet.
    fn open(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(FILE_MODE)
            .open(path)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the lock anyway; unlocking first
        // just makes the release explicit. Nothing useful to do on error.
        let _ = self.file.unlock();
    }
}

/// Permission bits of `path`, if it exists.
pub fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o7777)
}

/// How old a temporary file must be before a sweep removes it even though
/// its writer's pid is (still, or again) alive: no state file takes anywhere
/// near this long to write.
pub const STALE_TEMP_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Remove temporary files that [`atomic_write`] left behind when a writer
/// was killed before its rename: those whose writer pid is gone, and any
/// older than `min_age` (names without a pid, from older versions, go by age
/// only). A live writer's file is never removed: its pid is alive, and it is
/// younger than any write takes. Call it holding the lock that the writers
/// of `dir` take. Returns how many files went.
pub fn sweep_stale_temps(dir: &Path, min_age: std::time::Duration) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else {
            continue;
        };
        let writer_gone = rest
            .split_once('-')
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
            .is_some_and(|pid| !pid_alive(pid));
        let old = || {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= min_age)
        };
        let is_file = e.file_type().is_ok_and(|t| t.is_file());
        if is_file && (writer_gone || old()) && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Whether a process with this pid exists (signal 0 probes without sending).
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Why a bounded read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadCapError {
    /// The input has more than `limit` bytes (only `limit + 1` were read).
    #[error("it is larger than the limit of {}", human_bytes(*limit))]
    TooLarge { limit: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Read all of `r`, but never more than `limit + 1` bytes: a larger input
/// (`/dev/zero`, a runaway pipe) is refused after reading that much, in
/// bounded time and memory.
pub fn read_capped(r: impl Read, limit: u64) -> Result<Vec<u8>, ReadCapError> {
    let mut buf = Vec::new();
    r.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(ReadCapError::TooLarge { limit });
    }
    Ok(buf)
}

/// [`read_capped`] on the file at `path`.
pub fn read_file_capped(path: &Path, limit: u64) -> Result<Vec<u8>, ReadCapError> {
    read_capped(File::open(path)?, limit)
}

/// `1048576` -> `1 MiB`, `1536` -> `1536 bytes`: sizes in messages.
pub fn human_bytes(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_reads_stop_one_byte_past_the_limit() {
        assert_eq!(read_capped(&b"abc"[..], 3).unwrap(), b"abc");
        assert!(matches!(
            read_capped(io::repeat(0), 1 << 20),
            Err(ReadCapError::TooLarge { limit }) if limit == 1 << 20
        ));
    }

    #[test]
    fn sweep_keeps_live_writers_and_removes_dead_ones() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join(format!(".tmp-{}-live", std::process::id()));
        let legacy = dir.path().join(".tmp-abcdef");
        fs::write(&live, b"x").unwrap();
        fs::write(&legacy, b"x").unwrap();
        // A pid that is certainly gone: a child we waited for.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let dead = dir.path().join(format!(".tmp-{gone}-dead"));
        fs::write(&dead, b"x").unwrap();
        assert_eq!(sweep_stale_temps(dir.path(), STALE_TEMP_AGE), 1);
        assert!(live.exists() && legacy.exists() && !dead.exists());
        assert_eq!(sweep_stale_temps(dir.path(), std::time::Duration::ZERO), 2);
    }
}
