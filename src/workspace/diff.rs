//! Comparing the tree a job left with the snapshot it started from
//! ([`diff`](fn@diff)), and the [`ChangeSet`] that says what changed.
//!
//! The stages: read the job's archive into a tree (as untrusted input,
//! within a byte bound), keep links inside, compare path by path, write the
//! patch. It must not write to the user's directory; that is `apply`'s.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::rc::Rc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::patch::{self, looks_binary, Side};
use super::rules::link_stays_inside;
use super::snapshot::{Entry, EntryKind, Snapshot};
use super::spool::{Slice, Spool};
use super::{archive_components, WorkspaceError};

/// Bounds on reading the job's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffRules {
    /// Refuse an archive longer than this (headers and padding included).
    pub max_bytes: u64,
    /// A binary file bigger than this is noted in the patch (`Binary files
    /// ... differ`) instead of carried; [`apply`](fn@super::apply) still has it.
    pub max_binary_patch_bytes: u64,
}

impl DiffRules {
    /// Read at most `max_bytes`; carry binary files of up to 8 MiB.
    pub fn new(max_bytes: u64) -> DiffRules {
        DiffRules {
            max_bytes,
            max_binary_patch_bytes: 8 * 1024 * 1024,
        }
    }
}

/// What happened to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
    /// Only the execute bit changed.
    ModeChanged,
    /// A file became a link or the other way round.
    TypeChanged,
}

/// One file or link that changed.
#[derive(Debug, Clone, Serialize)]
pub struct FileChange {
    pub path: String,
    pub change: ChangeKind,
    /// What the path is after the change (before it, for a deletion).
    pub kind: EntryKind,
    pub binary: bool,
    pub lines_added: u64,
    pub lines_removed: u64,
    pub old_size: Option<u64>,
    pub new_size: Option<u64>,
    /// Git modes: `100644`, `100755`, `120000`.
    pub old_mode: Option<String>,
    pub new_mode: Option<String>,
    /// False when the patch cannot carry this change (a binary file over
    /// [`DiffRules::max_binary_patch_bytes`], or a path inside `.git`,
    /// which `git apply` refuses); [`apply`](fn@super::apply) applies it all the same.
    pub in_patch: bool,
    #[serde(skip)]
    pub(crate) new: Option<NewSide>,
}

/// What [`apply`](fn@super::apply) writes for a path.
#[derive(Debug, Clone)]
pub(crate) struct NewSide {
    pub kind: EntryKind,
    /// The owner's execute bit.
    pub exec: bool,
    /// A file's bytes in the change set's spool (`None`: content unchanged).
    pub data: Option<Slice>,
    pub target: Option<String>,
}

/// The sums over [`ChangeSet::files`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub files_changed: usize,
    pub added: usize,
    pub modified: usize,
    pub deleted: usize,
    pub mode_changed: usize,
    pub type_changed: usize,
    pub binary: usize,
    pub lines_added: u64,
    pub lines_removed: u64,
}

/// Paths the selection rules exclude (a `target/` the job built): left out
/// of the change set. An excluded directory counts once.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ignored {
    pub count: usize,
    /// The first few, sorted.
    pub paths: Vec<String>,
}

/// A path the change set leaves out for a reason other than the rules.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// The patch's identity.
#[derive(Debug, Clone, Serialize)]
pub struct PatchInfo {
    pub sha256: String,
    pub bytes: u64,
    /// Whether the patch alone carries every change (see
    /// [`FileChange::in_patch`]).
    pub complete: bool,
}

/// Everything a job changed in its workspace: per-file entries, totals, the
/// git-style patch (kept in an unlinked temporary file) and the new
/// contents [`apply`](fn@super::apply) needs. Serialises as the `changes` document of
/// `execute --json` (without the patch text).
#[derive(Debug, Serialize)]
pub struct ChangeSet {
    pub summary: String,
    #[serde(flatten)]
    pub totals: Totals,
    pub files: Vec<FileChange>,
    /// Directories that appeared or went away (git's patch cannot say so).
    pub dirs_added: Vec<String>,
    pub dirs_removed: Vec<String>,
    pub ignored: Ignored,
    pub skipped: Vec<Skipped>,
    pub patch: PatchInfo,
    /// [`Snapshot::id`] of the snapshot this was compared with.
    pub base: String,
    #[serde(skip)]
    pub(crate) content: Spool,
    #[serde(skip)]
    patch_spool: Spool,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs_added.is_empty() && self.dirs_removed.is_empty()
    }

    /// The patch's SHA-256 (hex).
    pub fn patch_sha256(&self) -> &str {
        &self.patch.sha256
    }

    /// The patch's length in bytes.
    pub fn patch_bytes(&self) -> u64 {
        self.patch.bytes
    }

    /// Copy the patch to `w` (bytes: a file's lines need not be UTF-8).
    pub fn write_patch(&self, mut w: impl Write) -> io::Result<()> {
        io::copy(
            &mut self.patch_spool.reader(Slice {
                offset: 0,
                len: self.patch.bytes,
            }),
            &mut w,
        )?;
        w.flush()
    }

    /// The patch, in memory.
    pub fn patch_text(&self) -> io::Result<Vec<u8>> {
        self.patch_spool.read(Slice {
            offset: 0,
            len: self.patch.bytes,
        })
    }

    pub(crate) fn content_reader(&self, slice: Slice) -> impl Read + '_ {
        self.content.reader(slice)
    }
}

/// One entry of the returned tree.
#[derive(Debug, Clone)]
struct Returned {
    kind: EntryKind,
    mode: u32,
    size: u64,
    sha256: Option<[u8; 32]>,
    target: Option<String>,
    data: Option<Slice>,
    /// Not in the archive itself, only as the parent of something.
    implicit: bool,
}

/// Compare the tar `out_tar` (the job's workspace, as our pack mode wrote
/// it, but read as untrusted: absolute and `..` paths and entries below a
/// non-directory are refused, at most [`DiffRules::max_bytes`] are read)
/// with `snapshot`, and build the change set. Paths the snapshot's rules
/// exclude, and `.git` unless it was included, are counted and left out;
/// so are entries we would not write (devices, hard links, names that are
/// not UTF-8, links that lead outside the workspace), each listed in
/// [`ChangeSet::skipped`].
pub fn diff(snapshot: &Snapshot, out_tar: impl Read, rules: &DiffRules) -> Result<ChangeSet, WorkspaceError> {
    let mut job = read_tree(snapshot, out_tar, rules)?;
    job.keep_links_inside(snapshot);
    let Compared {
        mut files,
        dirs_added,
        dirs_removed,
    } = compare(snapshot, &job);
    let (patch, patch_spool) = write_patch(snapshot, &job, &mut files, rules)?;
    let totals = totals(&files);
    let ignored = Ignored {
        count: job.ignored.len(),
        paths: job.ignored.into_iter().take(20).collect(),
    };
    let mut set = ChangeSet {
        summary: String::new(),
        totals,
        files,
        dirs_added,
        dirs_removed,
        ignored,
        skipped: job.skipped,
        patch,
        base: snapshot.id().to_string(),
        content: job.content,
        patch_spool,
    };
    set.summary = summary(&set);
    Ok(set)
}

/// The job's tree as read from its archive, before it is compared.
struct JobTree {
    tree: BTreeMap<String, Returned>,
    /// Top paths the rules leave out.
    ignored: BTreeSet<String>,
    skipped: Vec<Skipped>,
    /// Paths whose change we will not carry: they keep what they had.
    keep_old: BTreeSet<String>,
    /// The bytes of every file that changed.
    content: Spool,
    /// Where a file's bytes are read to.
    buf: Vec<u8>,
}

/// Read the job's archive (bounded by [`DiffRules::max_bytes`]) into a
/// [`JobTree`], keeping the bytes only of files that changed.
fn read_tree(snapshot: &Snapshot, out_tar: impl Read, rules: &DiffRules) -> Result<JobTree, WorkspaceError> {
    let capped = Rc::new(Cell::new(false));
    let reader = Capped {
        inner: out_tar,
        left: rules.max_bytes,
        hit: capped.clone(),
    };
    let too_big = |e: io::Error| {
        if capped.get() {
            WorkspaceError::OutputTooBig { limit: rules.max_bytes }
        } else {
            WorkspaceError::Archive(e.to_string())
        }
    };
    let mut job = JobTree {
        tree: BTreeMap::new(),
        ignored: BTreeSet::new(),
        skipped: Vec::new(),
        keep_old: BTreeSet::new(),
        content: Spool::new().map_err(WorkspaceError::io(
            "cannot create a temporary file for the job's changes",
        ))?,
        buf: vec![0u8; 256 * 1024],
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(too_big)? {
        let mut entry = entry.map_err(too_big)?;
        job.add(snapshot, &mut entry, &too_big)?;
    }
    Ok(job)
}

impl JobTree {
    /// One entry of the archive: placed in the tree, or counted as
    /// ignored, or skipped with the reason.
    fn add<R: Read>(
        &mut self,
        snapshot: &Snapshot,
        entry: &mut tar::Entry<'_, R>,
        too_big: &dyn Fn(io::Error) -> WorkspaceError,
    ) -> Result<(), WorkspaceError> {
        let raw = entry.path_bytes().into_owned();
        let Some(comps) = archive_components(&raw).map_err(WorkspaceError::Archive)? else {
            return Ok(());
        };
        let Ok(path) = String::from_utf8(comps.join(&b'/')) else {
            self.skipped.push(Skipped {
                path: String::from_utf8_lossy(&raw).into_owned(),
                reason: "its name is not valid UTF-8".into(),
            });
            return Ok(());
        };
        let kind = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::XGlobalHeader => return Ok(()),
            other => {
                self.skip(path, format!("a {other:?} entry, not a file, directory or link"));
                return Ok(());
            }
        };
        if let Some(top) = snapshot.left_out_by_rules(&path, kind == EntryKind::Dir) {
            self.ignored.insert(top);
            return Ok(());
        }
        place(&mut self.tree, &path, kind)?;
        let mode = entry.header().mode().map_err(too_big)? & 0o7777;
        let mut r = Returned {
            kind,
            mode,
            size: 0,
            sha256: None,
            target: None,
            data: None,
            implicit: false,
        };
        match kind {
            EntryKind::Dir => {}
            EntryKind::Symlink => {
                let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                let Ok(target) = String::from_utf8(target) else {
                    self.skip(path, "its link target is not valid UTF-8".into());
                    return Ok(());
                };
                r.size = target.len() as u64;
                r.target = Some(target);
            }
            EntryKind::File => self.read_file(snapshot, &path, entry, &mut r, too_big)?,
        }
        self.tree.insert(path, r);
        Ok(())
    }

    /// Leave `path` out of the change set, keeping what it had.
    fn skip(&mut self, path: String, reason: String) {
        self.keep_old.insert(path.clone());
        self.skipped.push(Skipped { path, reason });
    }

    /// Hash a file's bytes, and keep them in the spool only if it changed.
    fn read_file<R: Read>(
        &mut self,
        snapshot: &Snapshot,
        path: &str,
        entry: &mut tar::Entry<'_, R>,
        r: &mut Returned,
        too_big: &dyn Fn(io::Error) -> WorkspaceError,
    ) -> Result<(), WorkspaceError> {
        let (content, buf) = (&mut self.content, &mut self.buf[..]);
        let start = content.len();
        let mut hasher = Sha256::new();
        // A file that fits the buffer is kept only if it changed; a
        // bigger one streams to the spool and is given back if not.
        let small = entry.size() <= buf.len() as u64;
        let mut filled = 0usize;
        loop {
            let at = if small { filled } else { 0 };
            if at == buf.len() {
                break;
            }
            let n = match entry.read(&mut buf[at..]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(too_big(e)),
            };
            hasher.update(&buf[at..at + n]);
            if small {
                filled += n;
            } else {
                content
                    .write(&buf[..n])
                    .map_err(WorkspaceError::io("cannot keep the job's changes"))?;
            }
            r.size += n as u64;
        }
        let sha: [u8; 32] = hasher.finalize().into();
        r.sha256 = Some(sha);
        let unchanged = snapshot
            .get(path)
            .is_some_and(|o| o.kind == EntryKind::File && o.sha256 == Some(sha) && o.size == r.size);
        let keep = WorkspaceError::io("cannot keep the job's changes");
        if unchanged {
            content.truncate(start).map_err(keep)?;
        } else {
            if small {
                content.write(&buf[..filled]).map_err(keep)?;
            }
            r.data = Some(Slice {
                offset: start,
                len: r.size,
            });
        }
        Ok(())
    }

    /// A link the job made or changed must stay inside, like the ones we
    /// sent in; if it does not, the path keeps what it had.
    fn keep_links_inside(&mut self, snapshot: &Snapshot) {
        let symlink_at = |p: &str| {
            self.tree
                .get(p)
                .filter(|e| e.kind == EntryKind::Symlink)
                .and_then(|e| e.target.as_deref())
        };
        let mut outside = Vec::new();
        for (path, r) in self.tree.iter().filter(|(_, r)| r.kind == EntryKind::Symlink) {
            let before = snapshot.get(path);
            let same = before.is_some_and(|o| o.kind == EntryKind::Symlink && o.link_target == r.target);
            let target = r.target.as_deref().unwrap_or_default();
            if !same && !link_stays_inside(path, target, symlink_at) {
                outside.push((
                    path.clone(),
                    format!("a symbolic link to `{target}`, outside the workspace"),
                ));
            }
        }
        for (path, reason) in outside {
            self.skipped.push(Skipped {
                path: path.clone(),
                reason,
            });
            self.keep_old.insert(path);
        }
    }

    /// Is `p` one of the paths that keep what they had, or below one?
    fn kept(&self, p: &str) -> bool {
        self.keep_old
            .iter()
            .any(|k| p == k || (p.starts_with(k.as_str()) && p.as_bytes().get(k.len()) == Some(&b'/')))
    }
}

/// What changed, path by path.
struct Compared {
    files: Vec<FileChange>,
    dirs_added: Vec<String>,
    dirs_removed: Vec<String>,
}

/// Every path of the snapshot and the job's tree, compared.
fn compare(snapshot: &Snapshot, job: &JobTree) -> Compared {
    let mut files = Vec::new();
    let mut dirs_added = Vec::new();
    let mut dirs_removed = Vec::new();
    let paths: BTreeSet<&str> = snapshot
        .entries()
        .map(|e| e.path.as_str())
        .chain(job.tree.keys().map(String::as_str))
        .collect();
    for path in paths {
        if job.kept(path) {
            continue;
        }
        let (old, new) = (snapshot.get(path), job.tree.get(path));
        match (old, new) {
            (Some(o), None) if o.kind == EntryKind::Dir => dirs_removed.push(path.to_string()),
            (Some(o), None) => files.push(change(path, ChangeKind::Deleted, Some(o), None)),
            (None, Some(n)) if n.kind == EntryKind::Dir => dirs_added.push(path.to_string()),
            (None, Some(n)) => files.push(change(path, ChangeKind::Added, None, Some(n))),
            (Some(o), Some(n)) => match (o.kind, n.kind) {
                (EntryKind::Dir, EntryKind::Dir) => {}
                (EntryKind::Dir, _) => {
                    dirs_removed.push(path.to_string());
                    files.push(change(path, ChangeKind::Added, Some(o), Some(n)));
                }
                (_, EntryKind::Dir) => {
                    files.push(change(path, ChangeKind::Deleted, Some(o), Some(n)));
                    dirs_added.push(path.to_string());
                }
                (EntryKind::File, EntryKind::File) => {
                    if o.sha256 != n.sha256 || o.size != n.size {
                        files.push(change(path, ChangeKind::Modified, Some(o), Some(n)));
                    } else if o.git_mode() != returned_git_mode(n) {
                        files.push(change(path, ChangeKind::ModeChanged, Some(o), Some(n)));
                    }
                }
                (EntryKind::Symlink, EntryKind::Symlink) => {
                    if o.link_target != n.target {
                        files.push(change(path, ChangeKind::Modified, Some(o), Some(n)));
                    }
                }
                _ => files.push(change(path, ChangeKind::TypeChanged, Some(o), Some(n))),
            },
            (None, None) => {}
        }
    }
    Compared {
        files,
        dirs_added,
        dirs_removed,
    }
}

/// The patch, one section per change, in path order, into its own spool;
/// counts each file's lines and whether the patch carries it.
fn write_patch(
    snapshot: &Snapshot,
    job: &JobTree,
    files: &mut [FileChange],
    rules: &DiffRules,
) -> Result<(PatchInfo, Spool), WorkspaceError> {
    let mut patch_spool = Spool::new().map_err(WorkspaceError::io("cannot create a temporary file for the patch"))?;
    let mut patch_hash = Sha256::new();
    let mut complete = true;
    for fc in files {
        // `git apply` refuses any path with a `.git` component.
        if fc.path.split('/').any(|c| c.eq_ignore_ascii_case(".git")) {
            fc.in_patch = false;
            complete = false;
            continue;
        }
        for s in sections(snapshot, job, fc, rules.max_binary_patch_bytes)? {
            fc.lines_added += s.lines_added;
            fc.lines_removed += s.lines_removed;
            fc.in_patch &= s.complete;
            patch_hash.update(&s.text);
            patch_spool
                .write(&s.text)
                .map_err(WorkspaceError::io("cannot write the patch"))?;
        }
        complete &= fc.in_patch;
    }
    let patch = PatchInfo {
        sha256: hex::encode(patch_hash.finalize()),
        bytes: patch_spool.len(),
        complete,
    };
    Ok((patch, patch_spool))
}

/// The patch sections of one change (two for a change of type: the old
/// path goes, the new one comes), and whether it is binary.
fn sections(
    snapshot: &Snapshot,
    job: &JobTree,
    fc: &mut FileChange,
    max_binary: u64,
) -> Result<Vec<patch::Section>, WorkspaceError> {
    let old = snapshot.get(&fc.path);
    let new = job.tree.get(&fc.path);
    let old_bytes = match old {
        Some(o) if o.kind == EntryKind::File => snapshot
            .content(o)
            .map_err(WorkspaceError::io("cannot read the snapshot"))?,
        Some(o) if o.kind == EntryKind::Symlink => o.link_target.clone().unwrap_or_default().into_bytes(),
        _ => Vec::new(),
    };
    let new_bytes = match new {
        Some(n) if n.kind == EntryKind::File => match n.data {
            Some(slice) => job
                .content
                .read(slice)
                .map_err(WorkspaceError::io("cannot read the job's changes"))?,
            None => old_bytes.clone(),
        },
        Some(n) if n.kind == EntryKind::Symlink => n.target.clone().unwrap_or_default().into_bytes(),
        _ => Vec::new(),
    };
    let old_side = old.filter(|o| o.kind != EntryKind::Dir).map(|o| Side {
        mode: o.git_mode(),
        data: &old_bytes,
    });
    let new_side = new.filter(|n| n.kind != EntryKind::Dir).map(|n| Side {
        mode: returned_git_mode(n),
        data: &new_bytes,
    });
    let old_binary = old.is_some_and(|o| o.kind == EntryKind::File) && looks_binary(&old_bytes);
    let new_binary = new.is_some_and(|n| n.kind == EntryKind::File) && looks_binary(&new_bytes);
    fc.binary = old_binary || new_binary;
    Ok(if fc.change == ChangeKind::TypeChanged {
        vec![
            patch::section(&fc.path, old_side, None, old_binary, max_binary),
            patch::section(&fc.path, None, new_side, new_binary, max_binary),
        ]
    } else {
        vec![patch::section(&fc.path, old_side, new_side, fc.binary, max_binary)]
    })
}

/// Record `path` in the returned tree, checking that everything above it
/// is a directory (made implicitly if the archive did not list it) and
/// that it does not replace anything already there.
fn place(tree: &mut BTreeMap<String, Returned>, path: &str, kind: EntryKind) -> Result<(), WorkspaceError> {
    if tree.get(path).is_some_and(|e| !e.implicit || kind != EntryKind::Dir) {
        return Err(WorkspaceError::Archive(format!("`{path}` is in the archive twice")));
    }
    for (i, _) in path.match_indices('/') {
        let parent = &path[..i];
        match tree.get(parent) {
            Some(e) if e.kind != EntryKind::Dir => {
                return Err(WorkspaceError::Archive(format!(
                    "`{path}` is inside `{parent}`, which is not a directory"
                )))
            }
            Some(_) => {}
            None => {
                tree.insert(
                    parent.to_string(),
                    Returned {
                        kind: EntryKind::Dir,
                        mode: 0o755,
                        size: 0,
                        sha256: None,
                        target: None,
                        data: None,
                        implicit: true,
                    },
                );
            }
        }
    }
    if kind != EntryKind::Dir {
        let below = format!("{path}/");
        if tree
            .range(below.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&below))
        {
            return Err(WorkspaceError::Archive(format!(
                "`{path}` is not a directory but the archive has entries inside it"
            )));
        }
    }
    Ok(())
}

fn returned_git_mode(r: &Returned) -> u32 {
    match r.kind {
        EntryKind::Dir => 0o040000,
        EntryKind::Symlink => 0o120000,
        EntryKind::File if r.mode & 0o100 != 0 => 0o100755,
        EntryKind::File => 0o100644,
    }
}

fn change(path: &str, kind: ChangeKind, old: Option<&Entry>, new: Option<&Returned>) -> FileChange {
    let old_file = old.filter(|o| o.kind != EntryKind::Dir);
    let new_file = new.filter(|n| n.kind != EntryKind::Dir);
    FileChange {
        path: path.to_string(),
        change: kind,
        kind: new_file
            .map(|n| n.kind)
            .or(old_file.map(|o| o.kind))
            .unwrap_or(EntryKind::File),
        binary: false,
        lines_added: 0,
        lines_removed: 0,
        old_size: old_file.map(|o| o.size),
        new_size: new_file.map(|n| n.size),
        old_mode: old_file.map(|o| format!("{:o}", o.git_mode())),
        new_mode: new_file.map(|n| format!("{:o}", returned_git_mode(n))),
        in_patch: true,
        new: new_file.map(|n| NewSide {
            kind: n.kind,
            exec: n.mode & 0o100 != 0,
            data: n.data,
            target: n.target.clone(),
        }),
    }
}

fn totals(files: &[FileChange]) -> Totals {
    let mut t = Totals {
        files_changed: files.len(),
        ..Totals::default()
    };
    for f in files {
        match f.change {
            ChangeKind::Added => t.added += 1,
            ChangeKind::Modified => t.modified += 1,
            ChangeKind::Deleted => t.deleted += 1,
            ChangeKind::ModeChanged => t.mode_changed += 1,
            ChangeKind::TypeChanged => t.type_changed += 1,
        }
        t.binary += usize::from(f.binary);
        t.lines_added += f.lines_added;
        t.lines_removed += f.lines_removed;
    }
    t
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `3 files changed: 1 added, 2 modified (+12 -3); 1 binary; 2 ignored
/// paths left out`.
fn summary(c: &ChangeSet) -> String {
    let t = &c.totals;
    let mut s = if t.files_changed == 0 {
        "no files changed".to_string()
    } else {
        let mut kinds = Vec::new();
        for (n, what) in [
            (t.added, "added"),
            (t.modified, "modified"),
            (t.deleted, "deleted"),
            (t.mode_changed, "mode changed"),
            (t.type_changed, "type changed"),
        ] {
            if n > 0 {
                kinds.push(format!("{n} {what}"));
            }
        }
        format!(
            "{} changed: {} (+{} -{})",
            plural(t.files_changed, "file", "files"),
            kinds.join(", "),
            t.lines_added,
            t.lines_removed
        )
    };
    if t.binary > 0 {
        s.push_str(&format!("; {} binary", t.binary));
    }
    let not_carried = c.files.iter().filter(|f| !f.in_patch).count();
    if not_carried > 0 {
        s.push_str(&format!(
            "; {} not in the patch (applied only by `--apply`)",
            plural(not_carried, "change", "changes")
        ));
    }
    if c.ignored.count > 0 {
        s.push_str(&format!(
            "; {} left out",
            plural(c.ignored.count, "ignored path", "ignored paths")
        ));
    }
    if !c.skipped.is_empty() {
        let first = &c.skipped[0];
        s.push_str(&format!(
            "; {} skipped (`{}`: {})",
            plural(c.skipped.len(), "path", "paths"),
            first.path,
            first.reason
        ));
    }
    s
}

/// A reader that fails once more than `left` bytes are asked of it, and
/// says so in `hit` (the tar crate wraps our error in its own). Every
/// reader of an archive we did not write goes through one.
pub(super) struct Capped<R> {
    pub(super) inner: R,
    pub(super) left: u64,
    pub(super) hit: Rc<Cell<bool>>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // Anything more is over the bound: a tar that ends exactly at
            // it reads no further.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.hit.set(true);
            return Err(io::Error::other("the archive is over its size bound"));
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}
