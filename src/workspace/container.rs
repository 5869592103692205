//! Packing and unpacking workspace trees as tar: the two modes of our
//! binary that run inside a job container, as uid
//! [`super::CONTAINER_UID`], started by `docker exec` of the copy mounted at
//! `/.cmm` ([`UNPACK_MODE`] fills the workspace tmpfs from a tar on stdin,
//! [`PACK_MODE`] writes a tar of it to stdout when the job is done), and
//! [`unpack_untrusted`], which a provider runs on its own host over a
//! stranger's archive.
//!
//! The modes are single-threaded and speak only through their exit code (0
//! ok, 1 failed) and, on failure, one line on stderr. What the job leaves
//! behind is untrusted: neither mode follows a link, and extraction refuses
//! absolute paths, `..`, and any entry that would be written through a link
//! or a file, including one the same archive created a moment earlier. On
//! the host, extraction must also not let an archive decide how much it
//! writes, make links that lead out, or leave what the user cannot remove.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use serde::Serialize;

use super::diff::Capped;
use super::error::{Bound, Untrusted};
use super::fsat::{fchmod, is_not_a_dir, set_file_mtime, DirFd, Kind};
use super::rules::link_stays_inside;
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
/// outside `dir`. For our own archives; a stranger's goes through
/// [`unpack_untrusted`].
pub fn unpack_into(dir: &Path, r: impl Read) -> Result<Counts, WorkspaceError> {
    unpack_with(dir, r, &Policy::OWN)
}

/// Extract a tar someone else sent (a requester's workspace, on a
/// provider's host) into the existing, empty directory `dir`, as
/// [`unpack_into`] does and more strictly: at most `max_bytes` are read
/// (headers, long names and padding included; file contents count again
/// as they are written, so a sparse entry cannot expand past the bound)
/// and at most `max_entries` entries made (directories implied by a path
/// count too); names and link targets must be UTF-8; every link must
/// resolve inside `dir`, also through the other links; permission bits
/// lose setuid, setgid and sticky and gain the owner's read and write (and
/// search, for a directory), so whoever unpacked it can read and remove
/// it all. Absolute paths, `..`, entries below a link or a file, entries
/// twice, hard links, devices and fifos are refused, each by a
/// [`WorkspaceError::Refused`] naming the entry.
///
/// On an error `dir` holds what was extracted before it, never anything
/// outside: remove it.
pub fn unpack_untrusted(dir: &Path, r: impl Read, max_bytes: u64, max_entries: u64) -> Result<Counts, WorkspaceError> {
    let policy = Policy {
        input: Some(Untrusted::Workspace),
        owner_access: true,
        max_bytes,
        max_entries,
    };
    unpack_with(dir, r, &policy)
}

/// How far an extraction trusts its archive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Whose bytes these are; `None`: our own (the snapshot's tar), so
    /// refusals are [`WorkspaceError::Archive`] and no bound applies.
    pub input: Option<Untrusted>,
    /// Give the owner read and write on every file and directory (and
    /// search on directories), so the tree can be written to and removed.
    pub owner_access: bool,
    pub max_bytes: u64,
    pub max_entries: u64,
}

impl Policy {
    pub(crate) const OWN: Policy = Policy {
        input: None,
        owner_access: false,
        max_bytes: u64::MAX,
        max_entries: u64::MAX,
    };

    /// A refusal of the entry `path` (`why` follows its name).
    fn refuse(&self, path: &str, why: impl Into<String>) -> WorkspaceError {
        let why = why.into();
        match self.input {
            None => malformed(format!("`{path}` {why}")),
            Some(input) => WorkspaceError::Refused {
                input,
                path: Some(path.to_string()),
                why,
            },
        }
    }

    /// A refusal of the archive as a whole (it does not parse).
    fn unreadable(&self, why: String) -> WorkspaceError {
        match self.input {
            None => malformed(why),
            Some(input) => WorkspaceError::Refused { input, path: None, why },
        }
    }

    fn over(&self, what: Bound) -> WorkspaceError {
        let limit = match what {
            Bound::Bytes => self.max_bytes,
            Bound::Entries => self.max_entries,
        };
        match self.input {
            Some(input) => WorkspaceError::OverBound { input, what, limit },
            None => malformed(format!("over the bound of {limit} {what:?}")),
        }
    }

    fn file_mode(&self, mode: u32) -> u32 {
        if self.owner_access {
            (mode & 0o777) | 0o600
        } else {
            mode & 0o777
        }
    }

    fn dir_mode(&self, mode: u32) -> u32 {
        if self.owner_access {
            (mode & 0o777) | 0o700
        } else {
            mode & 0o777
        }
    }
}

/// [`unpack_into`] and [`unpack_untrusted`], as `policy` says.
pub(crate) fn unpack_with(dir: &Path, r: impl Read, policy: &Policy) -> Result<Counts, WorkspaceError> {
    let root = DirFd::open(dir).map_err(WorkspaceError::io(format!("cannot open `{}`", dir.display())))?;
    let hit = Rc::new(Cell::new(false));
    let reader = Capped {
        inner: r,
        left: policy.max_bytes,
        hit: hit.clone(),
    };
    let bad_archive = |e: io::Error| {
        if hit.get() {
            policy.over(Bound::Bytes)
        } else {
            policy.unreadable(e.to_string())
        }
    };
    let mut archive = tar::Archive::new(reader);
    let mut counts = Counts::default();
    let mut made = Made::default();
    let mut dirs: Vec<(Vec<Vec<u8>>, u32, i64)> = Vec::new();
    let mut links: Vec<(String, String)> = Vec::new();
    let mut cache: Option<(Vec<u8>, DirFd)> = None;
    let mut buf = vec![0u8; 256 * 1024];
    let untrusted = policy.input.is_some();
    let entries = archive.entries().map_err(bad_archive)?;
    for entry in entries {
        let mut entry = entry.map_err(bad_archive)?;
        made.entries += 1;
        if made.entries > policy.max_entries {
            return Err(policy.over(Bound::Entries));
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let comps = match archive_components(&raw) {
            Ok(Some(comps)) => comps,
            Ok(None) => continue, // the root itself
            Err(why) => {
                return Err(match policy.input {
                    None => malformed(why),
                    Some(_) => policy.refuse(&shown, format!("is not a relative path inside the workspace ({why})")),
                })
            }
        };
        if untrusted {
            if std::str::from_utf8(&raw).is_err() {
                return Err(policy.refuse(&shown, "has a name that is not valid UTF-8"));
            }
            if comps.len() > MAX_DEPTH {
                return Err(policy.refuse(&shown, format!("nests deeper than {MAX_DEPTH} directories")));
            }
        }
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644);
        let mtime = header.mtime().ok().and_then(|t| i64::try_from(t).ok()).unwrap_or(0);
        let kind = header.entry_type();
        let Some((last, parents)) = comps.split_last() else {
            continue;
        };
        let name = OsStr::from_bytes(last);
        let parent = parent_dir(&root, parents, &mut cache, &shown, policy, &mut made)?;
        let write_err = |e: io::Error| -> WorkspaceError {
            if e.kind() == io::ErrorKind::AlreadyExists {
                policy.refuse(&shown, "is in the archive twice, or over something already there")
            } else if is_not_a_dir(&e) {
                policy.refuse(&shown, "would be written through a symbolic link")
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
                let left = policy.max_bytes.saturating_sub(counts.bytes);
                let n = copy(&mut (&mut entry).take(left.saturating_add(1)), &mut f, &mut buf).map_err(|e| {
                    if hit.get() {
                        policy.over(Bound::Bytes)
                    } else if e.kind() == io::ErrorKind::UnexpectedEof || e.kind() == io::ErrorKind::InvalidData {
                        policy.refuse(&shown, format!("is cut short: {e}"))
                    } else {
                        write_err(e)
                    }
                })?;
                if n > left {
                    return Err(policy.over(Bound::Bytes));
                }
                fchmod(&f, policy.file_mode(mode)).map_err(write_err)?;
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
                dirs.push((comps.iter().map(|c| c.to_vec()).collect(), policy.dir_mode(mode), mtime));
                counts.dirs += 1;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| policy.refuse(&shown, "is a link without a target"))?;
                if untrusted {
                    let Ok(t) = std::str::from_utf8(&target) else {
                        return Err(policy.refuse(&shown, "is a link whose target is not valid UTF-8"));
                    };
                    links.push((String::from_utf8_lossy(&comps.join(&b'/')).into_owned(), t.to_string()));
                }
                parent.symlink(OsStr::from_bytes(&target), name).map_err(write_err)?;
                counts.links += 1;
            }
            tar::EntryType::XGlobalHeader => {}
            other => {
                return Err(policy.refuse(
                    &shown,
                    format!("is a {other:?} entry; a workspace holds only files, directories and links"),
                ))
            }
        }
    }
    drop(cache);
    if untrusted {
        links_stay_inside(&links, policy)?;
    }
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

/// Every link of an untrusted archive resolves inside it, expanding the
/// other links on the way as the kernel would; links are judged once all
/// are known, since a later one can redirect an earlier one.
fn links_stay_inside(links: &[(String, String)], policy: &Policy) -> Result<(), WorkspaceError> {
    let by_path: HashMap<&str, &str> = links.iter().map(|(p, t)| (p.as_str(), t.as_str())).collect();
    for (path, target) in links {
        if !link_stays_inside(path, target, |p| by_path.get(p).copied()) {
            return Err(policy.refuse(
                path,
                format!("is a symbolic link to `{target}`, which leads outside the workspace"),
            ));
        }
    }
    Ok(())
}

/// What an extraction made, against [`Policy::max_entries`].
#[derive(Debug, Default)]
struct Made {
    /// Archive entries, and directories made for their paths.
    entries: u64,
}

/// `io::copy` with a buffer big enough that a workspace is a few thousand
/// writes, not tens of thousands.
pub(crate) fn copy(r: &mut impl Read, w: &mut impl Write, buf: &mut [u8]) -> io::Result<u64> {
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
/// their own entry sets it), each counted in `made`. Consecutive entries
/// usually share a parent, so the last one is kept open.
fn parent_dir<'c>(
    root: &DirFd,
    parents: &[&[u8]],
    cache: &'c mut Option<(Vec<u8>, DirFd)>,
    shown: &str,
    policy: &Policy,
    made: &mut Made,
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
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    made.entries += 1;
                    if made.entries > policy.max_entries {
                        return Err(policy.over(Bound::Entries));
                    }
                    d.mkdir(name, 0o700)
                        .and_then(|()| d.child(name))
                        .map_err(WorkspaceError::io(format!("cannot make the directories for `{shown}`")))?
                }
                Err(e) if is_not_a_dir(&e) => {
                    return Err(policy.refuse(shown, "would be written through a symbolic link or a file"))
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
