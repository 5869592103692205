//! The two modes of our binary that run inside a job container, as uid
//! [`super::CONTAINER_UID`], started by `docker exec` of the copy mounted at
//! `/.cmm`: [`UNPACK_MODE`] fills the workspace tmpfs from a tar on stdin,
//! [`PACK_MODE`] writes a tar of it to stdout when the job is done.
//!
//! Both are single-threaded and speak only through their exit code (0 ok,
//! 1 failed) and, on failure, one line on stderr. What the job leaves behind
//! is untrusted: neither mode follows a link, and extraction refuses absolute
//! paths, `..`, and any entry that would be written through a link or a
//! file, including one the same archive created a moment earlier.

use std::ffi::OsStr;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::Serialize;

use super::fsat::{fchmod, is_not_a_dir, set_file_mtime, DirFd, Kind};
use super::{archive_components, WorkspaceError, MAX_DEPTH};

/// `claude-max-market __workspace-unpack DIR < tar`.
pub const UNPACK_MODE: &str = "__workspace-unpack";
/// `claude-max-market __workspace-pack DIR > tar`.
pub const PACK_MODE: &str = "__workspace-pack";

/// What an extraction or a pack wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    /// Fifos, sockets and devices left out (pack only).
    pub skipped: u64,
}

/// The unpack mode: `args` are what follows the mode name.
pub fn unpack_main(args: &[String]) -> i32 {
    let [dir] = args else {
        return fail(format!("usage: {UNPACK_MODE} DIR (reads a tar on stdin)"));
    };
    match unpack_into(Path::new(dir), io::stdin().lock()) {
        Ok(_) => 0,
        Err(e) => fail(e.to_string()),
    }
}

/// The pack mode: `args` are what follows the mode name.
pub fn pack_main(args: &[String]) -> i32 {
    let [dir] = args else {
        return fail(format!("usage: {PACK_MODE} DIR (writes a tar on stdout)"));
    };
    match pack_dir(Path::new(dir), io::stdout().lock()) {
        Ok(_) => 0,
        Err(e) => fail(e.to_string()),
    }
}

fn fail(msg: String) -> i32 {
    // One line, whatever the message held.
    eprintln!("claude-max-market workspace: {}", msg.replace('\n', " "));
    1
}

fn malformed(msg: String) -> WorkspaceError {
    WorkspaceError::Archive(msg)
}

/// Extract the tar `r` into the existing directory `dir`: directories,
/// regular files and links only, permission bits and modification times
/// kept (directories' last, so a read-only one does not block its
/// contents). Stops at the first entry it refuses; nothing is ever written
/// outside `dir`.
pub fn unpack_into(dir: &Path, r: impl Read) -> Result<Counts, WorkspaceError> {
    let root = DirFd::open(dir).map_err(WorkspaceError::io(format!("cannot open `{}`", dir.display())))?;
    let mut archive = tar::Archive::new(r);
    let mut counts = Counts::default();
    let mut dirs: Vec<(Vec<Vec<u8>>, u32, i64)> = Vec::new();
    let mut cache: Option<(Vec<u8>, DirFd)> = None;
    let mut buf = vec![0u8; 256 * 1024];
    let entries = archive.entries().map_err(|e| malformed(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| malformed(e.to_string()))?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let Some(comps) = archive_components(&raw).map_err(malformed)? else {
            continue; // the root itself
        };
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644) & 0o777;
        let mtime = header.mtime().ok().and_then(|t| i64::try_from(t).ok()).unwrap_or(0);
        let kind = header.entry_type();
        let Some((last, parents)) = comps.split_last() else {
            continue;
        };
        let name = OsStr::from_bytes(last);
        let parent = parent_dir(&root, parents, &mut cache, &shown)?;
        let write_err = |e: io::Error| -> WorkspaceError {
            if e.kind() == io::ErrorKind::AlreadyExists {
                malformed(format!(
                    "`{shown}` is in the archive twice, or over something already there"
                ))
            } else if is_not_a_dir(&e) {
                malformed(format!("`{shown}` would be written through a symbolic link"))
            } else {
                WorkspaceError::Io {
                    context: format!("cannot write `{shown}`"),
                    source: e,
                }
            }
        };
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut f = parent.create_new(name, 0o600).map_err(write_err)?;
                let n = copy(&mut entry, &mut f, &mut buf).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof || e.kind() == io::ErrorKind::InvalidData {
                        malformed(format!("`{shown}` is cut short: {e}"))
                    } else {
                        write_err(e)
                    }
                })?;
                fchmod(&f, mode).map_err(write_err)?;
                set_file_mtime(&f, mtime).map_err(write_err)?;
                counts.files += 1;
                counts.bytes += n;
            }
            tar::EntryType::Directory => {
                match parent.mkdir(name, 0o700) {
                    Ok(()) => {}
                    // Made already, as the parent of an earlier entry.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && is_dir(parent, name) => {}
                    Err(e) => return Err(write_err(e)),
                }
                dirs.push((comps.iter().map(|c| c.to_vec()).collect(), mode, mtime));
                counts.dirs += 1;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| malformed(format!("link `{shown}` has no target")))?;
                parent.symlink(OsStr::from_bytes(&target), name).map_err(write_err)?;
                counts.links += 1;
            }
            tar::EntryType::XGlobalHeader => {}
            other => {
                return Err(malformed(format!(
                    "`{shown}` is a {other:?} entry; a workspace holds only files, directories and links"
                )))
            }
        }
    }
    drop(cache);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0.len()));
    for (comps, mode, mtime) in dirs {
        let Some((last, parents)) = comps.split_last() else {
            continue;
        };
        let shown = String::from_utf8_lossy(&comps.join(&b'/')).into_owned();
        let name = OsStr::from_bytes(last);
        let set = root
            .descend(parents.iter().map(|c| OsStr::from_bytes(c)))
            .and_then(|p| p.chmod(name, mode).and_then(|()| p.set_mtime(name, mtime)));
        set.map_err(WorkspaceError::io(format!("cannot set the mode of `{shown}`")))?;
    }
    Ok(counts)
}

/// `io::copy` with a buffer big enough that a workspace is a few thousand
/// writes, not tens of thousands.
fn copy(r: &mut impl Read, w: &mut impl Write, buf: &mut [u8]) -> io::Result<u64> {
    let mut n = 0u64;
    loop {
        let k = match r.read(buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..k])?;
        n += k as u64;
    }
}

fn is_dir(parent: &DirFd, name: &OsStr) -> bool {
    matches!(parent.lstat(name), Ok(m) if m.kind == Kind::Dir)
}

/// The directory that holds an entry: reached from the root one
/// `O_NOFOLLOW` step at a time, missing directories made (mode 0700 until
/// their own entry sets it). Consecutive entries usually share a parent, so
/// the last one is kept open.
fn parent_dir<'c>(
    root: &DirFd,
    parents: &[&[u8]],
    cache: &'c mut Option<(Vec<u8>, DirFd)>,
    shown: &str,
) -> Result<&'c DirFd, WorkspaceError> {
    let key = parents.join(&b'/');
    let hit = matches!(cache, Some((k, _)) if *k == key);
    if !hit {
        let open_err = WorkspaceError::io(format!("cannot make the directories for `{shown}`"));
        let mut d = root.try_clone().map_err(open_err)?;
        for c in parents {
            let name = OsStr::from_bytes(c);
            d = match d.child(name) {
                Ok(next) => next,
                Err(e) if e.kind() == io::ErrorKind::NotFound => d
                    .mkdir(name, 0o700)
                    .and_then(|()| d.child(name))
                    .map_err(WorkspaceError::io(format!("cannot make the directories for `{shown}`")))?,
                Err(e) if is_not_a_dir(&e) => {
                    return Err(malformed(format!(
                        "`{shown}` would be written through a symbolic link or a file"
                    )))
                }
                Err(e) => {
                    return Err(WorkspaceError::Io {
                        context: format!("cannot open the directories for `{shown}`"),
                        source: e,
                    })
                }
            };
        }
        *cache = Some((key, d));
    }
    match cache {
        Some((_, d)) => Ok(d),
        None => Err(malformed("internal: no parent directory".into())),
    }
}

/// Write a tar of `dir` to `w`: directories, regular files and links (never
/// followed), sorted by name, permission bits and modification times kept;
/// fifos, sockets and devices left out. A file's size is what `fstat` said
/// when we opened it: if it grows meanwhile the rest is cut, if it shrinks
/// the entry is padded with zeros, so the archive is always well formed.
/// Files and directories their owner cannot read are made readable first
/// (this runs as that owner, on a copy about to be thrown away).
pub fn pack_dir(dir: &Path, w: impl Write) -> Result<Counts, WorkspaceError> {
    let root = DirFd::open(dir).map_err(WorkspaceError::io(format!("cannot open `{}`", dir.display())))?;
    let mut b = tar::Builder::new(BufWriter::with_capacity(256 * 1024, w));
    let mut counts = Counts::default();
    let mut rel = Vec::new();
    pack_level(&root, &mut rel, &mut b, &mut counts, 0)?;
    b.finish().map_err(WorkspaceError::io("cannot write the archive"))?;
    b.get_mut()
        .flush()
        .map_err(WorkspaceError::io("cannot write the archive"))?;
    Ok(counts)
}

fn pack_level<W: Write>(
    fd: &DirFd,
    rel: &mut Vec<u8>,
    b: &mut tar::Builder<W>,
    counts: &mut Counts,
    depth: usize,
) -> Result<(), WorkspaceError> {
    let shown = |rel: &[u8]| String::from_utf8_lossy(rel).into_owned();
    if depth > MAX_DEPTH {
        return Err(malformed(format!(
            "`{}` nests deeper than {MAX_DEPTH} directories",
            shown(rel)
        )));
    }
    let names = fd
        .names()
        .map_err(WorkspaceError::io(format!("cannot list `{}`", shown(rel))))?;
    for name in names {
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let read_err = |rel: &[u8]| WorkspaceError::io(format!("cannot read `{}`", shown(rel)));
        let meta = fd.lstat(&name).map_err(read_err(rel))?;
        let mut h = tar::Header::new_gnu();
        h.set_uid(super::CONTAINER_UID);
        h.set_gid(super::CONTAINER_UID);
        h.set_mode(meta.mode & 0o777);
        h.set_mtime(u64::try_from(meta.mtime).unwrap_or(0));
        let write_err = WorkspaceError::io("cannot write the archive");
        match meta.kind {
            Kind::Dir => {
                if meta.mode & 0o500 != 0o500 {
                    fd.chmod(&name, meta.mode | 0o700).map_err(read_err(rel))?;
                }
                let sub = fd.child(&name).map_err(read_err(rel))?;
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                let mut path = rel.clone();
                path.push(b'/');
                b.append_data(&mut h, OsStr::from_bytes(&path), io::empty())
                    .map_err(write_err)?;
                counts.dirs += 1;
                pack_level(&sub, rel, b, counts, depth + 1)?;
            }
            Kind::File => {
                if meta.mode & 0o400 == 0 {
                    fd.chmod(&name, meta.mode | 0o400).map_err(read_err(rel))?;
                }
                let (f, now) = fd.open_file(&name).map_err(read_err(rel))?;
                if now.kind == Kind::File {
                    let size = now.size;
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(size);
                    let data = f.take(size).chain(io::repeat(0)).take(size);
                    b.append_data(&mut h, OsStr::from_bytes(rel), data).map_err(write_err)?;
                    counts.files += 1;
                    counts.bytes += size;
                } else {
                    counts.skipped += 1;
                }
            }
            Kind::Symlink => {
                let target = fd.read_link(&name).map_err(read_err(rel))?;
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, OsStr::from_bytes(rel), &target)
                    .map_err(write_err)?;
                counts.links += 1;
            }
            Kind::Special(_) => counts.skipped += 1,
        }
        rel.truncate(len);
    }
    Ok(())
}
