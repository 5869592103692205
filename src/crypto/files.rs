//! Envelopes to and from files or the standard streams.
//!
//! Output files are written to a temporary file in the target directory and
//! renamed into place only when the operation succeeded (for `decrypt`: the
//! final chunk and the sender's signature verified), so a failure never
//! leaves a partial file, plaintext or ciphertext, under the target name.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};

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

/// A temporary file next to `target`, renamed over it by `commit`.
struct Pending {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
}

impl Pending {
    fn new(source: &Source, target: &Path, force: bool) -> Result<Pending, CryptoError> {
        if let Source::File(input) = source {
            if same_file(input, target) {
                return Err(CryptoError::Target(format!(
                    "the output {} is the input file; refusing to overwrite it",
                    target.display()
                )));
            }
        }
        if target.symlink_metadata().is_ok() && !force {
            return Err(CryptoError::Target(format!(
                "{} already exists; not overwriting it",
                target.display()
            )));
        }
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-"))
            .permissions(fs::Permissions::from_mode(fsutil::FILE_MODE))
            .tempfile_in(&dir)
            .map_err(|e| CryptoError::Target(format!("cannot create a file in {}: {e}", dir.display())))?;
        Ok(Pending {
            tmp,
            target: target.to_path_buf(),
        })
    }

    /// Rename into place. The rename is what keeps a *failed* run from
    /// leaving output under the target name. Unlike our state files, user
    /// outputs are not fsynced first: flushing a gigabyte to disk would cost
    /// more than the encryption, and `cp`, `age` and `gpg` do not either.
    fn commit(self) -> Result<(), CryptoError> {
        self.tmp.persist(&self.target).map_err(|e| e.error)?;
        Ok(())
    }
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
    through_sink(source, sink, force, |input, out| {
        envelope::encrypt_stream(recipients, sign_with, input, out)
    })
}

/// Decrypt `source` to `sink`. A file is committed only after everything
/// verified. On stdout, plaintext is streamed as each chunk verifies; a
/// failure after that is still an error (non-zero exit) for the consumer.
pub fn decrypt_file(
    me: &Identity,
    source: &Source,
    sink: &Sink,
    force: bool,
    require_signer: Option<&PublicIdentity>,
) -> Result<StreamReport, CryptoError> {
    through_sink(source, sink, force, |input, out| {
        envelope::decrypt_stream(me, input, out, require_signer)
    })
}

/// Run `work` from `source` into `sink`: a file sink gets a temporary file
/// next to it, renamed into place only when `work` succeeded; stdout is
/// written directly.
fn through_sink<T>(
    source: &Source,
    sink: &Sink,
    force: bool,
    work: impl FnOnce(Box<dyn Read>, &mut File) -> Result<T, CryptoError>,
) -> Result<T, CryptoError> {
    let pending = match sink {
        Sink::File(p) => Some(Pending::new(source, p, force)?),
        Sink::Stdout => None,
    };
    let input = open_source(source)?;
    match pending {
        Some(mut pending) => {
            let out = work(input, pending.tmp.as_file_mut())?;
            pending.commit()?;
            Ok(out)
        }
        None => {
            let mut stdout = raw_stdout();
            let r = work(input, &mut stdout);
            stdout.flush()?;
            r
        }
    }
}
