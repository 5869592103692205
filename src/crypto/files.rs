//! Envelopes to and from files or the standard streams.
//!
//! Nothing reaches a destination before the operation succeeded (for
//! `decrypt`: every chunk, the final chunk and the sender's signature
//! verified), so a failure, a Ctrl-C or a kill releases nothing:
//!
//! - `--output FILE` is written as an anonymous file (`O_TMPFILE`, 0600) in
//!   the target's directory and linked in under the target name at the end.
//!   Until then it has no name: nobody can open it, and a killed run leaves
//!   nothing behind. A file system without anonymous files gets a hidden
//!   `.NAME.tmp-*` file (0600) instead, renamed into place on success and
//!   removed on failure.
//! - `decrypt --output -` holds the plaintext in an anonymous file (0600) in
//!   `$TMPDIR` and copies it to stdout only once it verified: a pipe reader
//!   must never act on bytes that later turn out forged or cut. The spool
//!   needs as much free space there as the plaintext; memory stays constant.
//! - `encrypt --output -` streams: a cut-off envelope never decrypts (its
//!   final chunk is missing), so there is nothing to hold back.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::mem::ManuallyDrop;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

use rand::RngCore;

use super::envelope::{self, CryptoError, StreamReport};
use super::keys::{Identity, PublicIdentity};
use crate::fsutil;

/// Where bytes come from: `-` is standard input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Stdin,
    File(PathBuf),
}

/// Where bytes go: `-` is standard output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Source {
    pub fn parse(s: &str) -> Source {
        if s == "-" {
            Source::Stdin
        } else {
            Source::File(PathBuf::from(s))
        }
    }
}

impl Sink {
    pub fn parse(s: &str) -> Sink {
        if s == "-" {
            Sink::Stdout
        } else {
            Sink::File(PathBuf::from(s))
        }
    }
}

/// The default `encrypt` output: `F.cmm` for a file, stdout for stdin.
pub fn encrypted_name(source: &Source) -> Sink {
    match source {
        Source::Stdin => Sink::Stdout,
        Source::File(p) => {
            let mut s = p.clone().into_os_string();
            s.push(".cmm");
            Sink::File(PathBuf::from(s))
        }
    }
}

/// The default `decrypt` output: `F` for `F.cmm`, stdout for stdin; other
/// names need an explicit `--output`.
pub fn decrypted_name(source: &Source) -> Result<Sink, CryptoError> {
    match source {
        Source::Stdin => Ok(Sink::Stdout),
        Source::File(p) => match p
            .to_str()
            .and_then(|s| s.strip_suffix(".cmm"))
            .filter(|s| !s.is_empty())
        {
            Some(stem) => Ok(Sink::File(PathBuf::from(stem))),
            None => Err(CryptoError::Target(format!(
                "{} does not end in `.cmm`; name the output with `--output FILE` (or `-` for stdout)",
                p.display()
            ))),
        },
    }
}

fn open_source(source: &Source) -> Result<Box<dyn Read>, CryptoError> {
    match source {
        Source::Stdin => Ok(Box::new(io::stdin().lock())),
        Source::File(p) => {
            let f = File::open(p).map_err(|e| CryptoError::Input {
                path: p.clone(),
                source: e,
            })?;
            if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
                return Err(CryptoError::Input {
                    path: p.clone(),
                    source: io::Error::other("is a directory"),
                });
            }
            Ok(Box::new(f))
        }
    }
}

/// Standard output as an unbuffered `File`: std's `Stdout` is line-buffered,
/// which would split binary data at every newline byte into extra writes.
fn raw_stdout() -> ManuallyDrop<File> {
    // SAFETY: fd 1 is open for the life of the process; `ManuallyDrop`
    // keeps this `File` from closing it.
    ManuallyDrop::new(unsafe { File::from_raw_fd(1) })
}

/// A file being written for `target` that no one can see until `commit`.
struct Staged {
    file: File,
    /// The fallback's temporary name; `None` for an anonymous file.
    named: Option<tempfile::TempPath>,
    dir: PathBuf,
    target: PathBuf,
    force: bool,
}

impl Staged {
    fn new(source: &Source, target: &Path, force: bool) -> Result<Staged, CryptoError> {
        if let Source::File(input) = source {
            if same_file(input, target) {
                return Err(CryptoError::Target(format!(
                    "the output {} is the input file; refusing to overwrite it",
                    target.display()
                )));
            }
        }
        if target.symlink_metadata().is_ok() && !force {
            return Err(exists(target));
        }
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let cannot = |error: io::Error| CryptoError::OutputDir {
            dir: dir.clone(),
            error,
        };
        let (file, named) = match anonymous_in(&dir) {
            Ok(file) => (file, None),
            Err(e) if no_anonymous_files(&e) => {
                let (file, path) = hidden_temp(&dir, target).map_err(cannot)?.into_parts();
                (file, Some(path))
            }
            Err(e) => return Err(cannot(e)),
        };
        Ok(Staged {
            file,
            named,
            dir,
            target: target.to_path_buf(),
            force,
        })
    }

    /// Give the file its name. Without `--force` an existing target is never
    /// replaced, even one that appeared while we worked. Unlike our state
    /// files, user outputs are not fsynced first: flushing a gigabyte to disk
    /// would cost more than the encryption, and `cp`, `age` and `gpg` do not
    /// either.
    fn commit(mut self) -> Result<(), CryptoError> {
        match self.named.take() {
            Some(path) => persist(path, &self.target, self.force),
            None if !self.force => match link_anonymous(&self.file, &self.target) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(exists(&self.target)),
                Err(_) => self.commit_by_copy(),
            },
            None => {
                // Link under a fresh hidden name, then rename over the target.
                for _ in 0..16 {
                    let tmp = self.dir.join(format!(
                        ".{}.tmp-{:016x}",
                        file_name(&self.target),
                        rand::rngs::OsRng.next_u64()
                    ));
                    match link_anonymous(&self.file, &tmp) {
                        Ok(()) => {
                            return fs::rename(&tmp, &self.target).map_err(|e| {
                                let _ = fs::remove_file(&tmp);
                                CryptoError::Io(e)
                            })
                        }
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                        Err(_) => break,
                    }
                }
                self.commit_by_copy()
            }
        }
    }

    /// Last resort where an anonymous file cannot be linked (no `/proc`):
    /// copy it into a hidden named file and rename that into place.
    fn commit_by_copy(mut self) -> Result<(), CryptoError> {
        let mut tmp = hidden_temp(&self.dir, &self.target)?;
        self.file.seek(SeekFrom::Start(0))?;
        io::copy(&mut self.file, tmp.as_file_mut())?;
        persist(tmp.into_temp_path(), &self.target, self.force)
    }
}

fn exists(target: &Path) -> CryptoError {
    CryptoError::Exists(target.to_path_buf())
}

fn file_name(target: &Path) -> String {
    target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// An unnamed file in `dir` (`O_TMPFILE`), mode 0600.
fn anonymous_in(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(fsutil::FILE_MODE)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
}

/// The errors by which a kernel or file system says it has no `O_TMPFILE`.
fn no_anonymous_files(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOSYS)
    )
}

fn hidden_temp(dir: &Path, target: &Path) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&format!(".{}.tmp-", file_name(target)))
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(fsutil::FILE_MODE))
        .tempfile_in(dir)
}

fn persist(path: tempfile::TempPath, target: &Path, force: bool) -> Result<(), CryptoError> {
    let done = if force {
        path.persist(target)
    } else {
        path.persist_noclobber(target)
    };
    done.map_err(|e| match e.error.kind() {
        io::ErrorKind::AlreadyExists => exists(target),
        _ => CryptoError::Io(e.error),
    })
}

/// Give the anonymous file `file` the name `dest` (`linkat` through
/// `/proc/self/fd`, which needs no privilege, unlike `AT_EMPTY_PATH`).
fn link_anonymous(file: &File, dest: &Path) -> io::Result<()> {
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let to = CString::new(dest.as_os_str().as_bytes())?;
    // SAFETY: both arguments are NUL-terminated strings that outlive the
    // call; `linkat` only reads them.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Copy the rest of `from` to `to`, in the kernel where it can (`sendfile`
/// to a pipe, file or socket), else through a 1 MiB buffer (a terminal).
/// Not `io::copy`: into a pipe it writes 8 KiB at a time, which took longer
/// than decrypting the same bytes.
fn copy_out(from: &mut File, to: &mut File) -> io::Result<()> {
    loop {
        // SAFETY: two open descriptors; a null offset makes `sendfile` read
        // from (and advance) `from`'s own file offset.
        let n = unsafe { libc::sendfile(to.as_raw_fd(), from.as_raw_fd(), std::ptr::null_mut(), 1 << 30) };
        match n {
            0 => return Ok(()),
            n if n > 0 => {}
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // Someone made our stdout non-blocking: wait, don't spin.
                    Some(libc::EAGAIN) => wait_writable(to)?,
                    Some(libc::EINVAL | libc::ENOSYS) => break,
                    _ => return Err(e),
                }
            }
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return to.flush(),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn wait_writable(f: &File) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `p` is one valid `pollfd` for the duration of the call.
    if unsafe { libc::poll(&mut p, 1, -1) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Encrypt `source` to `sink`. Returns the plaintext byte count.
pub fn encrypt_file(
    recipients: &[PublicIdentity],
    sign_with: Option<&Identity>,
    source: &Source,
    sink: &Sink,
    force: bool,
) -> Result<u64, CryptoError> {
    let encrypt = |input, out: &mut File| envelope::encrypt_stream(recipients, sign_with, input, out);
    match sink {
        Sink::File(target) => {
            let mut staged = Staged::new(source, target, force)?;
            let bytes = encrypt(open_source(source)?, &mut staged.file)?;
            staged.commit()?;
            Ok(bytes)
        }
        Sink::Stdout => {
            let mut stdout = raw_stdout();
            let r = encrypt(open_source(source)?, &mut stdout);
            stdout.flush()?;
            r
        }
    }
}

/// Decrypt `source` to `sink`. Nothing is released, to a file or to stdout,
/// before every chunk and the sender's signature verified (module doc).
pub fn decrypt_file(
    me: &Identity,
    source: &Source,
    sink: &Sink,
    force: bool,
    require_signer: Option<&PublicIdentity>,
) -> Result<StreamReport, CryptoError> {
    match sink {
        Sink::File(target) => {
            let mut staged = Staged::new(source, target, force)?;
            let report = envelope::decrypt_stream(me, open_source(source)?, &mut staged.file, require_signer)?;
            staged.commit()?;
            Ok(report)
        }
        Sink::Stdout => {
            let input = open_source(source)?;
            let dir = std::env::temp_dir();
            let spool_err = |source| CryptoError::Spool {
                dir: dir.clone(),
                source,
            };
            // Unnamed (O_TMPFILE, or unlinked at once), mode 0600: it goes
            // away with the process, however that ends.
            let mut spool = tempfile::tempfile_in(&dir).map_err(spool_err)?;
            let report = envelope::decrypt_stream(me, input, &mut spool, require_signer).map_err(|e| match e {
                CryptoError::Io(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => spool_err(e),
                e => e,
            })?;
            spool.seek(SeekFrom::Start(0))?;
            copy_out(&mut spool, &mut raw_stdout())?;
            Ok(report)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn staged(dir: &Path, name: &str, force: bool) -> Staged {
        Staged::new(&Source::Stdin, &dir.join(name), force).unwrap()
    }

    /// The same staged file, but with the fallback's hidden name.
    fn staged_named(dir: &Path, name: &str, force: bool) -> Staged {
        let target = dir.join(name);
        let (file, path) = hidden_temp(dir, &target).unwrap().into_parts();
        Staged {
            file,
            named: Some(path),
            dir: dir.to_path_buf(),
            target,
            force,
        }
    }

    #[test]
    fn a_staged_file_has_no_name_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = staged(dir.path(), "out", false);
        assert!(s.named.is_none(), "this file system has O_TMPFILE");
        s.file.write_all(b"verified").unwrap();
        assert!(names(dir.path()).is_empty(), "nothing visible while writing");
        s.commit().unwrap();
        assert_eq!(names(dir.path()), ["out"]);
        assert_eq!(fs::read(dir.path().join("out")).unwrap(), b"verified");
        let mode = fs::metadata(dir.path().join("out")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Dropped without commit: gone without a trace.
        let mut s = staged(dir.path(), "other", false);
        s.file.write_all(b"unverified").unwrap();
        drop(s);
        assert_eq!(names(dir.path()), ["out"]);
    }

    #[test]
    fn commit_never_replaces_a_file_that_appeared_meanwhile_without_force() {
        for named in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("out");
            let mut s = if named {
                staged_named(dir.path(), "out", false)
            } else {
                staged(dir.path(), "out", false)
            };
            s.file.write_all(b"new").unwrap();
            fs::write(&target, b"theirs").unwrap();
            let e = s.commit().unwrap_err();
            assert!(e.to_string().contains("already exists"), "{e}");
            assert_eq!(fs::read(&target).unwrap(), b"theirs");
            assert_eq!(names(dir.path()), ["out"], "named {named}");

            let mut s = if named {
                staged_named(dir.path(), "out", true)
            } else {
                staged(dir.path(), "out", true)
            };
            s.file.write_all(b"new").unwrap();
            s.commit().unwrap();
            assert_eq!(fs::read(&target).unwrap(), b"new");
            assert_eq!(names(dir.path()), ["out"], "named {named}");
        }
    }

    #[test]
    fn the_copy_fallback_gives_the_same_result() {
        let dir = tempfile::tempdir().unwrap();
        for force in [false, true] {
            let mut s = staged(dir.path(), "out", force);
            s.file.write_all(&[7u8; 100_000]).unwrap();
            s.commit_by_copy().unwrap();
            assert_eq!(fs::read(dir.path().join("out")).unwrap(), vec![7u8; 100_000]);
            assert_eq!(names(dir.path()), ["out"]);
        }
    }

    #[test]
    fn copy_out_copies_everything_in_the_kernel_or_through_the_buffer() {
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut spool = tempfile::tempfile().unwrap();
        spool.write_all(&body).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // A plain file takes `sendfile`; one opened for appending refuses
        // it (EINVAL), which exercises the buffered path.
        for append in [false, true] {
            let path = dir.path().join(format!("out-{append}"));
            let mut out = OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .open(&path)
                .unwrap();
            spool.seek(SeekFrom::Start(0)).unwrap();
            copy_out(&mut spool, &mut out).unwrap();
            assert!(fs::read(&path).unwrap() == body, "append {append}");
        }
    }
}
