//! Durable file primitives: private directories, atomic replace, advisory locks.
//!
//! Every rewrite of a state file goes through [`atomic_write`]: a temporary
//! file in the same directory, `fsync`, `rename`, then `fsync` of the
//! directory, so a reader (or a crash) sees either the old or the new bytes,
//! never a mix. Writers serialise on a [`FileLock`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
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
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(fs::Permissions::from_mode(FILE_MODE))
        .tempfile_in(&dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(&dir)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// An exclusive advisory lock on a lock file, released on drop.
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
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(FILE_MODE)
            .open(path)?;
        file.lock()?;
        Ok(FileLock { file })
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

/// Remove temporary files that [`atomic_write`] left behind when a writer
/// was killed before its rename. Only files older than `min_age` go, so a
/// write in progress under another lock is never disturbed.
pub fn sweep_stale_temps(dir: &Path, min_age: std::time::Duration) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().starts_with(".tmp-") {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= min_age);
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}
