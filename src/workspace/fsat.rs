//! File operations relative to an open directory that never follow a
//! symbolic link.
//!
//! Every path we read or write below a workspace root is reached one
//! component at a time with `O_NOFOLLOW | O_DIRECTORY`, so a link, whether it
//! was there before, arrived earlier in the same archive, or was swapped in
//! while we work, makes the operation fail instead of leading outside.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    /// A fifo, socket or device, by name.
    Special(&'static str),
}

/// The parts of `lstat` we use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub kind: Kind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub size: u64,
    pub mtime: i64,
}

impl Meta {
    fn from_stat(st: &rfs::Stat) -> Meta {
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Special("fifo"),
            FileType::Socket => Kind::Special("socket"),
            FileType::CharacterDevice => Kind::Special("character device"),
            FileType::BlockDevice => Kind::Special("block device"),
            _ => Kind::Special("file of unknown type"),
        };
        Meta {
            kind,
            mode: st.st_mode & 0o7777,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: st.st_mtime,
        }
    }
}

/// An open directory.
#[derive(Debug)]
pub(crate) struct DirFd(OwnedFd);

const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC);

impl DirFd {
    /// Open the directory a caller named (a link to it is fine: they named it).
    pub fn open(path: &Path) -> io::Result<DirFd> {
        Ok(DirFd(rfs::openat(rfs::CWD, path, DIR_FLAGS, Mode::empty())?))
    }

    /// Open the subdirectory `name`; fails (`ELOOP`/`ENOTDIR`) on a link.
    pub fn child(&self, name: &OsStr) -> io::Result<DirFd> {
        Ok(DirFd(rfs::openat(
            &self.0,
            name,
            DIR_FLAGS | OFlags::NOFOLLOW,
            Mode::empty(),
        )?))
    }

    /// `lstat` of `name` in this directory.
    pub fn lstat(&self, name: &OsStr) -> io::Result<Meta> {
        Ok(Meta::from_stat(&rfs::statat(&self.0, name, AtFlags::SYMLINK_NOFOLLOW)?))
    }

    /// `lstat` of `name`, `None` when nothing is there.
    pub fn lstat_opt(&self, name: &OsStr) -> io::Result<Option<Meta>> {
        match self.lstat(name) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The entry names, sorted by their bytes, without `.` and `..`.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut names = Vec::new();
        for entry in rfs::Dir::read_from(&self.0)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name.to_vec()));
            }
        }
        names.sort();
        Ok(names)
    }

    /// Open `name` for reading, refusing links; the metadata is the open
    /// file's own (`fstat`), so what we read is what we describe.
    pub fn open_file(&self, name: &OsStr) -> io::Result<(File, Meta)> {
        // O_NONBLOCK: a fifo swapped in after we looked must not hang us.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = rfs::openat(&self.0, name, flags, Mode::empty())?;
        let meta = Meta::from_stat(&rfs::fstat(&fd)?);
        Ok((File::from(fd), meta))
    }

    /// The target of the link `name`.
    pub fn read_link(&self, name: &OsStr) -> io::Result<OsString> {
        let target = rfs::readlinkat(&self.0, name, Vec::new())?;
        Ok(OsString::from_vec(target.into_bytes()))
    }

    /// Create `name`, which must not exist, for writing with `mode` (the
    /// umask applies, as for any file the user creates).
    pub fn create_new(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(&self.0, name, flags, Mode::from_raw_mode(mode))?;
        Ok(File::from(fd))
    }

    pub fn mkdir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        Ok(rfs::mkdirat(&self.0, name, Mode::from_raw_mode(mode))?)
    }

    pub fn symlink(&self, target: &OsStr, name: &OsStr) -> io::Result<()> {
        Ok(rfs::symlinkat(target, &self.0, name)?)
    }

    /// Rename `from` to `to`, both in this directory (atomic; replaces `to`).
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        Ok(rfs::renameat(&self.0, from, &self.0, to)?)
    }

    pub fn remove_file(&self, name: &OsStr) -> io::Result<()> {
        Ok(rfs::unlinkat(&self.0, name, AtFlags::empty())?)
    }

    pub fn remove_dir(&self, name: &OsStr) -> io::Result<()> {
        Ok(rfs::unlinkat(&self.0, name, AtFlags::REMOVEDIR)?)
    }

    /// Set the permission bits of the file or directory `name` (never of a
    /// link's target: a link is refused).
    pub fn chmod(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        match rfs::openat(&self.0, name, flags, Mode::empty()) {
            Ok(fd) => Ok(rfs::fchmod(&fd, Mode::from_raw_mode(mode))?),
            // Not readable by its owner: chmod by name, after making sure the
            // name is not a link (Linux cannot chmod a link itself).
            Err(rustix::io::Errno::ACCESS) => {
                if self.lstat(name)?.kind == Kind::Symlink {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                Ok(rfs::chmodat(
                    &self.0,
                    name,
                    Mode::from_raw_mode(mode),
                    AtFlags::empty(),
                )?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Set the modification time of `name` (not following a link).
    pub fn set_mtime(&self, name: &OsStr, mtime: i64) -> io::Result<()> {
        let times = times(mtime);
        Ok(rfs::utimensat(&self.0, name, &times, AtFlags::SYMLINK_NOFOLLOW)?)
    }

    /// `fsync` the directory, so renames and removals in it are durable.
    pub fn sync(&self) -> io::Result<()> {
        Ok(rfs::fsync(&self.0)?)
    }

    /// Walk down `components` from here, one `O_NOFOLLOW` step at a time.
    pub fn descend<'a>(&self, components: impl IntoIterator<Item = &'a OsStr>) -> io::Result<DirFd> {
        let mut dir = self.try_clone()?;
        for c in components {
            dir = dir.child(c)?;
        }
        Ok(dir)
    }

    pub fn try_clone(&self) -> io::Result<DirFd> {
        Ok(DirFd(self.0.try_clone()?))
    }
}

impl AsFd for DirFd {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Set an open file's permission bits exactly (the umask does not apply).
pub(crate) fn fchmod(file: &File, mode: u32) -> io::Result<()> {
    Ok(rfs::fchmod(file, Mode::from_raw_mode(mode))?)
}

/// Set an open file's modification time.
pub(crate) fn set_file_mtime(file: &File, mtime: i64) -> io::Result<()> {
    Ok(rfs::futimens(file, &times(mtime))?)
}

fn times(mtime: i64) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
    }
}

/// Whether an I/O error means "a link (or a file) stood where a directory
/// was expected".
pub(crate) fn is_not_a_dir(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR))
}
