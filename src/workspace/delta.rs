//! A job's changes, sent back from the provider that ran it to the
//! requester that owns the workspace: [`pack_delta`] on the provider,
//! [`rebuild`] on the requester, and [`select_received`], how the provider
//! selects the workspace it was sent.
//!
//! The provider sends only what changed: the new bytes of every file and
//! link the job added, modified or turned into the other kind, and the
//! names of what went. The requester rebuilds the job's tree from its own
//! snapshot and that delta in a directory of its own, and compares the
//! result with its snapshot through [`diff`](fn@super::diff), as if a
//! local job had left it. So the patch it shows, and the change set it
//! later [`apply`](fn@super::apply)s, come from bytes it holds; the
//! provider's own patch text and counts never cross.
//!
//! # Format
//!
//! ```text
//! "CMMDELTA"            8 bytes
//! manifest length       u32, big-endian
//! manifest              JSON, that many bytes
//! tar                   to the end
//! ```
//!
//! The manifest is
//! `{"v":1,"deleted":[..],"exec":{"path":true},"dirs_added":[..],"dirs_removed":[..],"tar_bytes":N,"tar_sha256":"hex"}`:
//! files and links removed, files whose only change is the owner's
//! execute bit (and what it became), directories made and removed, and the
//! length and SHA-256 of the tar, so a delta cut at an entry boundary (a
//! tar reader takes that for the end) is refused. The tar holds regular
//! files, with their permission bits, and symbolic links, nothing else.
//! Paths are relative, `/`-separated, UTF-8.
//!
//! # What it must not do
//!
//! The delta is a stranger's: [`rebuild`] takes no path, size or kind from
//! it on trust. It must not write outside the directory it rebuilds into,
//! follow a link there, leave a link that leads out of it, write a path
//! the snapshot's rules leave out (a `.git` the requester did not send
//! could make the next `git` command in that tree run the provider's
//! code), or read more than [`DiffRules::max_bytes`] of delta.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::{self, Read, Seek, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::container::{copy, pack_dir, unpack_with, Policy};
use super::diff::{diff, ChangeSet, DiffRules};
use super::error::{Bound, Untrusted};
use super::fsat::{fchmod, is_not_a_dir, DirFd, Kind};
use super::rules::link_stays_inside;
use super::snapshot::{select, EntryKind, Snapshot};
use super::{archive_components, Rules, WorkspaceError, MAX_DEPTH};

const MAGIC: &[u8; 8] = b"CMMDELTA";
const VERSION: u32 = 1;
/// Magic and manifest length.
const HEAD: usize = MAGIC.len() + 4;

/// What a delta says besides the bytes in its tar.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    v: u32,
    deleted: Vec<String>,
    /// Files whose only change is the owner's execute bit: set or not.
    exec: BTreeMap<String, bool>,
    dirs_added: Vec<String>,
    dirs_removed: Vec<String>,
    tar_bytes: u64,
    tar_sha256: String,
}

/// The parts of a job record's `changes` document a delta is made from.
#[derive(Debug, Deserialize)]
struct ChangesDoc {
    files: Vec<FileDoc>,
    #[serde(default)]
    dirs_added: Vec<String>,
    #[serde(default)]
    dirs_removed: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct FileDoc {
    path: String,
    change: String,
    kind: String,
    new_mode: Option<String>,
}

/// Select the workspace a provider was sent and unpacked into `dir`
/// ([`unpack_untrusted`](fn@super::unpack_untrusted)) exactly as sent: under
/// [`Rules::exact`], and only if no directory above `dir` is a git work
/// tree, whose `.gitignore` files and `info/exclude` would otherwise hide
/// sent files from the job.
pub fn select_received(dir: &Path, limit_bytes: u64, include_git: bool) -> Result<Snapshot, WorkspaceError> {
    let abs = dir.canonicalize().map_err(|_| WorkspaceError::NotADirectory {
        path: dir.to_path_buf(),
    })?;
    if let Some(top) = abs
        .ancestors()
        .skip(1)
        .find(|a| std::fs::symlink_metadata(a.join(".git")).is_ok())
    {
        return Err(WorkspaceError::InsideWorkTree {
            dir: dir.to_path_buf(),
            top: top.to_path_buf(),
        });
    }
    select(dir, &Rules::exact(limit_bytes, include_git))
}

/// Provider side: the delta of the job whose changes were applied to `dir`
/// (the directory the workspace was unpacked into), from the job record's
/// `changes` document (a serialised [`ChangeSet`]). The bytes are read from
/// `dir`, never through a link, and must be of the kind the document says.
/// Refused when it would be longer than `max_bytes`.
pub fn pack_delta(dir: &Path, changes: &serde_json::Value, max_bytes: u64) -> Result<Vec<u8>, WorkspaceError> {
    let unusable = |why: String| WorkspaceError::ChangesUnusable {
        dir: dir.to_path_buf(),
        why,
    };
    let doc = ChangesDoc::deserialize(changes).map_err(|e| unusable(format!("not a `changes` document: {e}")))?;
    let root = DirFd::open(dir).map_err(WorkspaceError::io(format!("cannot open `{}`", dir.display())))?;
    let mut manifest = Manifest {
        v: VERSION,
        ..Manifest::default()
    };
    let mut carried: BTreeMap<String, EntryKind> = BTreeMap::new();
    for f in &doc.files {
        let path = normal_path(&f.path).map_err(|why| unusable(format!("`{}` {why}", f.path)))?;
        let kind = match f.kind.as_str() {
            "file" => EntryKind::File,
            "symlink" => EntryKind::Symlink,
            other => return Err(unusable(format!("`{path}` is of an unknown kind `{other}`"))),
        };
        match f.change.as_str() {
            "deleted" => manifest.deleted.push(path),
            "mode_changed" => {
                let exec = match f.new_mode.as_deref() {
                    Some("100755") => true,
                    Some("100644") => false,
                    other => return Err(unusable(format!("`{path}` has the new mode {other:?}"))),
                };
                let meta = lstat(&root, &path).map_err(|e| unusable(format!("`{path}` {}", fs_why(&e))))?;
                if meta.map(|m| (m.kind, m.mode & 0o100 != 0)) != Some((Kind::File, exec)) {
                    return Err(unusable(format!("`{path}` is not the file the changes say")));
                }
                manifest.exec.insert(path, exec);
            }
            "added" | "modified" | "type_changed" => {
                if carried.insert(path.clone(), kind).is_some() {
                    return Err(unusable(format!("`{path}` is in the changes twice")));
                }
            }
            other => return Err(unusable(format!("`{path}` has an unknown change `{other}`"))),
        }
    }
    for d in &doc.dirs_added {
        let path = normal_path(d).map_err(|why| unusable(format!("`{d}` {why}")))?;
        let meta = lstat(&root, &path).map_err(|e| unusable(format!("`{path}` {}", fs_why(&e))))?;
        if meta.map(|m| m.kind) != Some(Kind::Dir) {
            return Err(unusable(format!("`{path}` is not the directory the changes say")));
        }
        manifest.dirs_added.push(path);
    }
    for d in &doc.dirs_removed {
        let path = normal_path(d).map_err(|why| unusable(format!("`{d}` {why}")))?;
        manifest.dirs_removed.push(path);
    }

    let mut tar = BoundedVec {
        bytes: Vec::new(),
        // The manifest comes on top; it is checked once it is known.
        max: max_bytes,
        hit: false,
    };
    let written = write_carried(&root, &carried, &mut tar, &unusable);
    if tar.hit {
        return Err(WorkspaceError::DeltaTooBig { limit: max_bytes });
    }
    written?;
    manifest.tar_bytes = tar.bytes.len() as u64;
    manifest.tar_sha256 = hex::encode(Sha256::digest(&tar.bytes));
    let json = serde_json::to_vec(&manifest).map_err(|e| unusable(format!("cannot write the manifest: {e}")))?;
    let len = u32::try_from(json.len()).map_err(|_| WorkspaceError::DeltaTooBig { limit: max_bytes })?;
    let total = (HEAD + json.len()) as u64 + manifest.tar_bytes;
    if total > max_bytes {
        return Err(WorkspaceError::DeltaTooBig { limit: max_bytes });
    }
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&tar.bytes);
    Ok(out)
}

/// The tar of the files and links that carry new bytes, read from `root`.
fn write_carried(
    root: &DirFd,
    carried: &BTreeMap<String, EntryKind>,
    out: &mut BoundedVec,
    unusable: &dyn Fn(String) -> WorkspaceError,
) -> Result<(), WorkspaceError> {
    let mut b = tar::Builder::new(out);
    let write_err = WorkspaceError::io("cannot write the delta");
    for (path, kind) in carried {
        let (parent, name) = parent_of(root, path).map_err(|e| unusable(format!("`{path}` {}", fs_why(&e))))?;
        let meta = parent
            .lstat(OsStr::new(name))
            .map_err(|e| unusable(format!("`{path}` {}", fs_why(&e))))?;
        let mut h = tar::Header::new_gnu();
        h.set_uid(super::CONTAINER_UID);
        h.set_gid(super::CONTAINER_UID);
        h.set_mode(meta.mode & 0o777);
        h.set_mtime(u64::try_from(meta.mtime).unwrap_or(0));
        match (kind, meta.kind) {
            (EntryKind::File, Kind::File) => {
                let (f, now) = parent
                    .open_file(OsStr::new(name))
                    .map_err(|e| unusable(format!("`{path}` {}", fs_why(&e))))?;
                if now.kind != Kind::File {
                    return Err(unusable(format!("`{path}` is no longer a file")));
                }
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(now.size);
                // The size `fstat` gave: cut or padded, the entry stays well formed.
                let data = f.take(now.size).chain(io::repeat(0)).take(now.size);
                b.append_data(&mut h, path, data)
                    .map_err(WorkspaceError::io("cannot write the delta"))?;
            }
            (EntryKind::Symlink, Kind::Symlink) => {
                let target = parent
                    .read_link(OsStr::new(name))
                    .map_err(|e| unusable(format!("`{path}` {}", fs_why(&e))))?;
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, &target)
                    .map_err(WorkspaceError::io("cannot write the delta"))?;
            }
            (want, _) => return Err(unusable(format!("`{path}` is not the {} the changes say", want.name()))),
        }
    }
    b.finish().map_err(write_err)
}

/// Requester side: rebuild the job's tree from `snapshot` and the
/// provider's `delta` in the empty directory `into`, and compare it with
/// the snapshot ([`diff`](fn@super::diff) under `rules`). The change set
/// is the requester's own and [`apply`](fn@super::apply)s to the snapshot's
/// directory; `into` is left holding the job's tree (to test before
/// applying).
///
/// The delta is checked first as a whole (length within
/// [`DiffRules::max_bytes`], magic, manifest, the tar's length and hash),
/// then entry by entry as it is applied: a path that is absolute, climbs
/// with `..`, lies below a link or a file, or names something that is not
/// there (or is, for an addition) is refused, naming it, as is a link that
/// leads outside once all links are known. Paths the snapshot's rules leave
/// out are not written. On an error `into` holds a partial tree: remove it.
pub fn rebuild(snapshot: &Snapshot, delta: &[u8], into: &Path, rules: &DiffRules) -> Result<ChangeSet, WorkspaceError> {
    if delta.len() as u64 > rules.max_bytes {
        return Err(WorkspaceError::OverBound {
            input: Untrusted::Delta,
            what: Bound::Bytes,
            limit: rules.max_bytes,
        });
    }
    let (manifest, tar) = parse(delta)?;
    let root = DirFd::open(into).map_err(WorkspaceError::io(format!("cannot open `{}`", into.display())))?;
    let names = root
        .names()
        .map_err(WorkspaceError::io(format!("cannot list `{}`", into.display())))?;
    if let Some(first) = names.first() {
        return Err(WorkspaceError::InTheWay {
            dir: into.to_path_buf(),
            path: first.to_string_lossy().into_owned(),
            why: "a delta is rebuilt only into an empty directory".into(),
        });
    }

    // The snapshot is the requester's own: trusted, but unpacked writable,
    // since the delta may change what a read-only directory holds.
    let spool_err = WorkspaceError::io("cannot keep a copy of the workspace to rebuild from");
    let mut own = tempfile::tempfile().map_err(spool_err)?;
    snapshot.write_tar(&mut own)?;
    own.rewind()
        .map_err(WorkspaceError::io("cannot read the copy of the workspace"))?;
    let policy = Policy {
        owner_access: true,
        ..Policy::OWN
    };
    unpack_with(into, io::BufReader::new(own), &policy)?;

    let mut tree = Rebuilt {
        root,
        snapshot,
        links: snapshot
            .entries()
            .filter(|e| e.kind == EntryKind::Symlink)
            .map(|e| (e.path.clone(), e.link_target.clone().unwrap_or_default()))
            .collect(),
    };
    tree.apply(&manifest, tar)?;
    tree.links_stay_inside()?;

    let packed_err = WorkspaceError::io("cannot keep the rebuilt tree");
    let mut packed = tempfile::tempfile().map_err(packed_err)?;
    pack_dir(into, &mut packed)?;
    packed
        .rewind()
        .map_err(WorkspaceError::io("cannot read the rebuilt tree"))?;
    diff(snapshot, io::BufReader::new(packed), rules)
}

/// The manifest and the tar of a delta, once the magic, the manifest and
/// the tar's length and hash check out.
fn parse(delta: &[u8]) -> Result<(Manifest, &[u8]), WorkspaceError> {
    if delta.len() < HEAD || &delta[..MAGIC.len()] != MAGIC {
        return Err(refused(
            None,
            "it does not start with `CMMDELTA`: it is not a delta".into(),
        ));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&delta[MAGIC.len()..HEAD]);
    let len = u32::from_be_bytes(len) as usize;
    let Some(json) = HEAD.checked_add(len).and_then(|end| delta.get(HEAD..end)) else {
        return Err(refused(None, "its manifest is cut short".into()));
    };
    let manifest: Manifest =
        serde_json::from_slice(json).map_err(|e| refused(None, format!("its manifest is not valid: {e}")))?;
    if manifest.v != VERSION {
        return Err(refused(
            None,
            format!("it is of version {}; this build reads version {VERSION}", manifest.v),
        ));
    }
    let tar = &delta[HEAD + len..];
    if tar.len() as u64 != manifest.tar_bytes {
        return Err(refused(
            None,
            format!(
                "its tar is {} bytes where its manifest says {}: it was cut short or added to",
                tar.len(),
                manifest.tar_bytes
            ),
        ));
    }
    if hex::encode(Sha256::digest(tar)) != manifest.tar_sha256.to_ascii_lowercase() {
        return Err(refused(
            None,
            "its tar does not match the SHA-256 its manifest gives".into(),
        ));
    }
    Ok((manifest, tar))
}

/// The tree being rebuilt in `into`.
struct Rebuilt<'s> {
    root: DirFd,
    snapshot: &'s Snapshot,
    /// Every link in the tree now, by path: to judge where links lead once
    /// the delta has changed them.
    links: BTreeMap<String, String>,
}

impl Rebuilt<'_> {
    /// Deletions, then removed directories (deepest first), new directories
    /// (shallowest first), the tar's files and links, execute bits: the
    /// order in which each step finds what it needs.
    fn apply(&mut self, m: &Manifest, tar: &[u8]) -> Result<(), WorkspaceError> {
        for p in &m.deleted {
            self.delete(&delta_path(p)?)?;
        }
        let mut removed = m
            .dirs_removed
            .iter()
            .map(|d| delta_path(d))
            .collect::<Result<Vec<_>, _>>()?;
        removed.sort_by(|a, b| depth(b).cmp(&depth(a)).then_with(|| b.cmp(a)));
        for d in &removed {
            self.remove_dir(d)?;
        }
        let mut added = m
            .dirs_added
            .iter()
            .map(|d| delta_path(d))
            .collect::<Result<Vec<_>, _>>()?;
        added.sort_by(|a, b| depth(a).cmp(&depth(b)).then_with(|| a.cmp(b)));
        for d in &added {
            if self.left_out(d, true) {
                continue;
            }
            let (parent, name) = self.parent(d)?;
            parent.mkdir(OsStr::new(name), 0o777).map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => refused(Some(d), "is added by the delta but is already there".into()),
                _ => io_err(d, e),
            })?;
        }
        self.write_tar(tar)?;
        for (p, exec) in &m.exec {
            let p = delta_path(p)?;
            if self.left_out(&p, false) {
                continue;
            }
            let (parent, name) = self.parent(&p)?;
            let name = OsStr::new(name);
            let meta = parent.lstat_opt(name).map_err(|e| io_err(&p, e))?;
            let Some(meta) = meta.filter(|m| m.kind == Kind::File) else {
                return Err(refused(
                    Some(&p),
                    "has its execute bit changed by the delta but is not a file".into(),
                ));
            };
            let mode = if *exec {
                meta.mode | ((meta.mode & 0o444) >> 2)
            } else {
                meta.mode & !0o111
            };
            parent.chmod(name, mode & 0o777).map_err(|e| io_err(&p, e))?;
        }
        Ok(())
    }

    fn delete(&mut self, p: &str) -> Result<(), WorkspaceError> {
        let (parent, name) = self.parent(p)?;
        let name = OsStr::new(name);
        match parent.lstat_opt(name).map_err(|e| io_err(p, e))?.map(|m| m.kind) {
            Some(Kind::File) | Some(Kind::Symlink) => {
                parent.remove_file(name).map_err(|e| io_err(p, e))?;
                self.links.remove(p);
                Ok(())
            }
            Some(Kind::Dir) => Err(refused(
                Some(p),
                "is a directory; a delta removes directories in `dirs_removed`".into(),
            )),
            _ => Err(refused(
                Some(p),
                "is deleted by the delta but is not in the workspace".into(),
            )),
        }
    }

    fn remove_dir(&mut self, d: &str) -> Result<(), WorkspaceError> {
        let (parent, name) = self.parent(d)?;
        let name = OsStr::new(name);
        match parent.lstat_opt(name).map_err(|e| io_err(d, e))?.map(|m| m.kind) {
            Some(Kind::Dir) => parent.remove_dir(name).map_err(|e| {
                if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) {
                    refused(
                        Some(d),
                        "is removed by the delta, which does not delete all it holds".into(),
                    )
                } else {
                    io_err(d, e)
                }
            }),
            Some(_) => Err(refused(Some(d), "is removed as a directory but is not one".into())),
            None => Err(refused(
                Some(d),
                "is removed by the delta but is not in the workspace".into(),
            )),
        }
    }

    /// The tar's files and links, each written over the file or link of
    /// the snapshot at its path, if there was one.
    fn write_tar(&mut self, tar: &[u8]) -> Result<(), WorkspaceError> {
        let malformed = |e: io::Error| refused(None, format!("its tar is malformed: {e}"));
        let mut archive = tar::Archive::new(tar);
        let mut seen = BTreeSet::new();
        let mut buf = vec![0u8; 256 * 1024];
        for entry in archive.entries().map_err(malformed)? {
            let mut entry = entry.map_err(malformed)?;
            let raw = entry.path_bytes().into_owned();
            let Ok(raw) = String::from_utf8(raw) else {
                return Err(refused(None, "its tar has a name that is not valid UTF-8".into()));
            };
            let p = delta_path(&raw)?;
            if !seen.insert(p.clone()) {
                return Err(refused(Some(&p), "is in the delta twice".into()));
            }
            let kind = entry.header().entry_type();
            let mode = entry.header().mode().map_err(malformed)?;
            if !matches!(kind, tar::EntryType::Regular | tar::EntryType::Symlink) {
                return Err(refused(
                    Some(&p),
                    format!("is a {kind:?} entry; a delta carries only files and links"),
                ));
            }
            if self.left_out(&p, false) {
                continue;
            }
            let (parent, name) = self.parent(&p)?;
            let name = OsStr::new(name);
            match parent.lstat_opt(name).map_err(|e| io_err(&p, e))?.map(|m| m.kind) {
                None => {}
                Some(Kind::File) | Some(Kind::Symlink) => {
                    parent.remove_file(name).map_err(|e| io_err(&p, e))?;
                    self.links.remove(&p);
                }
                Some(_) => {
                    return Err(refused(
                        Some(&p),
                        "is a directory in the workspace, which the delta does not remove".into(),
                    ))
                }
            }
            if kind == tar::EntryType::Symlink {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                let Ok(target) = String::from_utf8(target) else {
                    return Err(refused(Some(&p), "is a link whose target is not valid UTF-8".into()));
                };
                if target.is_empty() || target.contains('\0') {
                    return Err(refused(Some(&p), "is a link without a target".into()));
                }
                parent.symlink(OsStr::new(&target), name).map_err(|e| io_err(&p, e))?;
                self.links.insert(p, target);
            } else {
                let mut f = parent.create_new(name, 0o600).map_err(|e| io_err(&p, e))?;
                copy(&mut entry, &mut f, &mut buf).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        refused(Some(&p), "is cut short".into())
                    } else {
                        io_err(&p, e)
                    }
                })?;
                fchmod(&f, (mode & 0o777) | 0o600).map_err(|e| io_err(&p, e))?;
            }
        }
        Ok(())
    }

    /// Every link in the tree still resolves inside it, through the others
    /// (a changed link can send an unchanged one out).
    fn links_stay_inside(&self) -> Result<(), WorkspaceError> {
        for (p, target) in &self.links {
            if !link_stays_inside(p, target, |q| self.links.get(q).map(String::as_str)) {
                return Err(refused(
                    Some(p),
                    format!("is a symbolic link to `{target}`, which leads outside the workspace"),
                ));
            }
        }
        Ok(())
    }

    fn left_out(&self, p: &str, is_dir: bool) -> bool {
        self.snapshot.left_out_by_rules(p, is_dir).is_some()
    }

    /// The directory that holds `p` (reached without following a link; it
    /// must exist) and `p`'s name in it.
    fn parent<'p>(&self, p: &'p str) -> Result<(DirFd, &'p str), WorkspaceError> {
        parent_of(&self.root, p).map_err(|e| {
            if is_not_a_dir(&e) {
                refused(Some(p), "is below a symbolic link or a file".into())
            } else if e.kind() == io::ErrorKind::NotFound {
                refused(
                    Some(p),
                    "is in a directory that is neither in the workspace nor added by the delta".into(),
                )
            } else {
                io_err(p, e)
            }
        })
    }
}

/// The parent directory of the relative path `p`, opened one `O_NOFOLLOW`
/// step at a time, and the last component.
fn parent_of<'p>(root: &DirFd, p: &'p str) -> io::Result<(DirFd, &'p str)> {
    let (parents, name) = match p.rsplit_once('/') {
        Some((parents, name)) => (Some(parents), name),
        None => (None, p),
    };
    let dir = match parents {
        Some(parents) => root.descend(parents.split('/').map(OsStr::new))?,
        None => root.try_clone()?,
    };
    Ok((dir, name))
}

fn lstat(root: &DirFd, p: &str) -> io::Result<Option<super::fsat::Meta>> {
    let (parent, name) = parent_of(root, p)?;
    parent.lstat_opt(OsStr::new(name))
}

/// Why a path of the job's directory cannot be read, after its name.
fn fs_why(e: &io::Error) -> String {
    if is_not_a_dir(e) {
        "is below a symbolic link or a file".into()
    } else if e.kind() == io::ErrorKind::NotFound {
        "is not there".into()
    } else {
        format!("cannot be read: {e}")
    }
}

/// `p` as a path below the root, `a/b` (no `.`, empty components or
/// trailing `/`), or why it is not one.
fn normal_path(p: &str) -> Result<String, String> {
    match archive_components(p.as_bytes()) {
        Err(why) => Err(format!("is not a relative path inside the workspace ({why})")),
        Ok(None) => Err("names the workspace itself".into()),
        Ok(Some(comps)) if comps.len() > MAX_DEPTH => Err(format!("nests deeper than {MAX_DEPTH} directories")),
        Ok(Some(comps)) => String::from_utf8(comps.join(&b'/')).map_err(|_| "is not valid UTF-8".to_string()),
    }
}

/// A path of the delta, checked and made normal.
fn delta_path(p: &str) -> Result<String, WorkspaceError> {
    normal_path(p).map_err(|why| refused(Some(p), why))
}

fn depth(p: &str) -> usize {
    p.matches('/').count()
}

fn refused(path: Option<&str>, why: String) -> WorkspaceError {
    WorkspaceError::Refused {
        input: Untrusted::Delta,
        path: path.map(str::to_string),
        why,
    }
}

fn io_err(p: &str, source: io::Error) -> WorkspaceError {
    WorkspaceError::Io {
        context: format!("cannot rebuild `{p}`"),
        source,
    }
}

/// A `Vec` that refuses to grow past `max`, and says so in `hit` (the tar
/// builder wraps our error in its own).
struct BoundedVec {
    bytes: Vec<u8>,
    max: u64,
    hit: bool,
}

impl Write for BoundedVec {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if (self.bytes.len() + buf.len()) as u64 > self.max {
            self.hit = true;
            return Err(io::Error::other("the delta is over its bound"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
