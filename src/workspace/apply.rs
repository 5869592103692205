//! Writing a change set into the user's directory ([`apply`](fn@apply)), only when
//! nothing there changed since the snapshot, and so that a failure midway
//! leaves every file either old or new.
//!
//! It must not write outside the directory nor follow a link on the way,
//! and it applies only a change set `diff` made from the same snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;

use serde::Serialize;

use super::diff::{ChangeKind, ChangeSet, FileChange, NewSide};
use super::fsat::{fchmod, is_not_a_dir, DirFd, Kind};
use super::snapshot::{scan, Entry, EntryKind, Snapshot};
use super::WorkspaceError;

/// What [`apply`](fn@apply) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// Files and links written (added, modified, or of a new kind).
    pub written: Vec<String>,
    pub deleted: Vec<String>,
    pub mode_changed: Vec<String>,
    pub dirs_created: Vec<String>,
    pub dirs_removed: Vec<String>,
    /// Directories the job removed that still hold ignored files here:
    /// left in place with those files.
    pub dirs_kept: Vec<String>,
}

impl Applied {
    /// `applied 3 changes: 2 written, 1 deleted`.
    pub fn summary(&self) -> String {
        let n = self.written.len() + self.deleted.len() + self.mode_changed.len();
        let mut parts = Vec::new();
        for (k, what) in [
            (self.written.len(), "written"),
            (self.deleted.len(), "deleted"),
            (self.mode_changed.len(), "mode changed"),
        ] {
            if k > 0 {
                parts.push(format!("{k} {what}"));
            }
        }
        let mut s = format!("applied {n} change{}", if n == 1 { "" } else { "s" });
        if !parts.is_empty() {
            s.push_str(&format!(": {}", parts.join(", ")));
        }
        if !self.dirs_kept.is_empty() {
            s.push_str(&format!(
                "; kept {} removed director{} that still hold ignored files",
                self.dirs_kept.len(),
                if self.dirs_kept.len() == 1 { "y" } else { "ies" }
            ));
        }
        s
    }
}

/// Apply `changes` (made by [`diff`](fn@super::diff) from `snapshot`) to `dir`.
///
/// Refuses, touching nothing, when `dir` no longer matches the snapshot
/// (selected again with the same rules; contents, modes and links
/// compared), or when a path the job added already exists in `dir` (an
/// ignored `.env` is never overwritten). Then every new file and link is
/// staged beside its destination and renamed into place, modes are set,
/// deletions done. Every path is reached from `dir` one component at a
/// time without following links, so nothing outside `dir` is written.
pub fn apply(changes: &ChangeSet, snapshot: &Snapshot, dir: &Path) -> Result<Applied, WorkspaceError> {
    if changes.base != snapshot.id() {
        return Err(WorkspaceError::WrongSnapshot);
    }
    unchanged_since(snapshot, dir)?;
    let root = DirFd::open(dir).map_err(WorkspaceError::io(format!("cannot open `{}`", dir.display())))?;
    let plan = Plan::new(changes, snapshot, dir, &root)?;
    plan.run(changes, dir, &root)
}

/// Refuse unless `dir` selects now exactly what the snapshot holds.
fn unchanged_since(snapshot: &Snapshot, dir: &Path) -> Result<(), WorkspaceError> {
    let changed = |changes: Vec<String>, more: usize| WorkspaceError::Changed {
        dir: dir.to_path_buf(),
        changes,
        more,
    };
    let now = match scan(snapshot, dir) {
        Ok(now) => now,
        Err(e @ WorkspaceError::Io { .. }) | Err(e @ WorkspaceError::NotADirectory { .. }) => return Err(e),
        // Something there now that could not even be selected.
        Err(e) => return Err(changed(vec![e.to_string()], 0)),
    };
    let then: BTreeMap<&str, &Entry> = snapshot.entries().map(|e| (e.path.as_str(), e)).collect();
    let paths: BTreeSet<&str> = then.keys().copied().chain(now.keys().map(String::as_str)).collect();
    let mut found = Vec::new();
    for p in paths {
        let what = match (then.get(p), now.get(p)) {
            (Some(a), Some(b)) if a.same_as(b) => continue,
            (Some(a), Some(b)) if a.kind != b.kind => format!("is now a {}", b.kind.name()),
            (Some(a), Some(b)) if a.sha256 != b.sha256 || a.size != b.size || a.link_target != b.link_target => {
                "modified".to_string()
            }
            (Some(_), Some(_)) => "mode changed".to_string(),
            (Some(_), None) => "deleted".to_string(),
            (None, Some(_)) => "added".to_string(),
            (None, None) => continue,
        };
        found.push(format!("`{p}` {what}"));
    }
    if found.is_empty() {
        return Ok(());
    }
    let more = found.len().saturating_sub(5);
    found.truncate(5);
    Err(changed(found, more))
}

/// A path split into its parent's components and its name.
#[derive(Debug, Clone)]
struct Place {
    path: String,
    parents: Vec<OsString>,
    name: OsString,
}

impl Place {
    fn new(path: &str) -> Result<Place, WorkspaceError> {
        let mut parts: Vec<OsString> = Vec::new();
        for c in path.split('/') {
            if c.is_empty() || c == "." || c == ".." {
                return Err(WorkspaceError::Archive(format!(
                    "unsafe path `{path}` in the change set"
                )));
            }
            parts.push(OsString::from(c));
        }
        let name = parts
            .pop()
            .ok_or_else(|| WorkspaceError::Archive("an empty path in the change set".into()))?;
        Ok(Place {
            path: path.to_string(),
            parents: parts,
            name,
        })
    }

    fn parent(&self, root: &DirFd) -> io::Result<DirFd> {
        root.descend(self.parents.iter().map(OsString::as_os_str))
    }

    fn parent_path(&self) -> String {
        match self.path.rfind('/') {
            Some(i) => self.path[..i].to_string(),
            None => String::new(),
        }
    }

    /// What is at this path now (`None`: nothing, or its parent is missing
    /// or not a directory; the parents are checked on their own).
    fn lstat(&self, root: &DirFd) -> io::Result<Option<Kind>> {
        match self.parent(root) {
            Ok(p) => Ok(p.lstat_opt(&self.name)?.map(|m| m.kind)),
            Err(e) if e.kind() == io::ErrorKind::NotFound || is_not_a_dir(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A new file or link to write at `place`.
struct Write<'c> {
    place: Place,
    side: &'c NewSide,
    /// The exact mode for a file that replaces one of the user's (its mode
    /// with the execute bits the job set); `None`: a new file, created
    /// 0666/0777 under the user's umask as any new file.
    mode: Option<u32>,
}

struct Plan<'c> {
    deletes: Vec<Place>,
    writes: Vec<Write<'c>>,
    modes: Vec<(Place, u32)>,
    dirs_added: Vec<Place>,
    dirs_removed: Vec<Place>,
}

fn with_exec(mode: u32, exec: bool) -> u32 {
    if exec {
        mode | ((mode & 0o444) >> 2)
    } else {
        mode & !0o111
    }
}

impl<'c> Plan<'c> {
    /// Decide every step and check every precondition; writes nothing.
    fn new(changes: &'c ChangeSet, snapshot: &Snapshot, dir: &Path, root: &DirFd) -> Result<Plan<'c>, WorkspaceError> {
        let checks = Checks {
            snapshot,
            dir,
            root,
            deleted: changes
                .files
                .iter()
                .filter(|f| f.change == ChangeKind::Deleted)
                .map(|f| f.path.as_str())
                .collect(),
            removed: changes.dirs_removed.iter().map(String::as_str).collect(),
        };
        let mut plan = Plan {
            deletes: Vec::new(),
            writes: Vec::new(),
            modes: Vec::new(),
            dirs_added: Vec::new(),
            dirs_removed: Vec::new(),
        };
        for d in &changes.dirs_added {
            let p = Place::new(d)?;
            checks.new_path(&p, snapshot.get(d))?;
            plan.dirs_added.push(p);
        }
        for d in &changes.dirs_removed {
            plan.dirs_removed.push(Place::new(d)?);
        }
        for f in &changes.files {
            plan.add_file(f, &checks)?;
        }
        plan.dirs_added.sort_by_key(|p| p.parents.len());
        plan.dirs_removed.sort_by_key(|p| std::cmp::Reverse(p.parents.len()));
        Ok(plan)
    }

    /// The step for one changed file or link, once its preconditions hold.
    fn add_file(&mut self, f: &'c FileChange, checks: &Checks<'_>) -> Result<(), WorkspaceError> {
        let p = Place::new(&f.path)?;
        let old = checks.snapshot.get(&f.path);
        match f.change {
            ChangeKind::Deleted => self.deletes.push(p),
            ChangeKind::ModeChanged => {
                let (Some(o), Some(n)) = (old, f.new.as_ref()) else {
                    return Err(bad(f));
                };
                self.modes.push((p, with_exec(o.mode, n.exec)));
            }
            ChangeKind::Added | ChangeKind::Modified | ChangeKind::TypeChanged => {
                let side = f.new.as_ref().ok_or_else(|| bad(f))?;
                checks.new_path(&p, old)?;
                if old.is_some_and(|o| o.kind == EntryKind::Dir) {
                    checks.dir_can_go(&p, side)?;
                }
                let mode = match old {
                    Some(o) if f.change == ChangeKind::Modified && o.kind == EntryKind::File => {
                        Some(with_exec(o.mode, side.exec))
                    }
                    _ => None,
                };
                self.writes.push(Write { place: p, side, mode });
            }
        }
        Ok(())
    }

    fn run(self, changes: &ChangeSet, dir: &Path, root: &DirFd) -> Result<Applied, WorkspaceError> {
        let mut applied = Applied::default();
        // Stage now whatever goes into a directory that exists and stays;
        // the rest waits for its directory.
        let stays = |parent: &str| {
            parent.is_empty() || {
                let removed = self.dirs_removed.iter().any(|d| d.path == parent);
                let added = self.dirs_added.iter().any(|d| d.path == parent);
                !removed && !added
            }
        };
        let (now, later): (Vec<&Write>, Vec<&Write>) = self.writes.iter().partition(|w| stays(&w.place.parent_path()));
        let mut steps = Steps {
            dir,
            root,
            staged: Vec::new(),
            done: 0,
            total: self.deletes.len()
                + self.dirs_removed.len()
                + self.dirs_added.len()
                + self.writes.len()
                + self.modes.len(),
            touched: BTreeSet::new(),
        };
        for w in now {
            match stage(changes, root, w) {
                Ok(tmp) => steps.staged.push((w, tmp)),
                Err(e) => {
                    unstage(root, &steps.staged);
                    return Err(WorkspaceError::Io {
                        context: format!("cannot stage `{}` (nothing was applied)", w.place.path),
                        source: e,
                    });
                }
            }
        }

        // From here on the user's files change, one atomic step at a time.
        for p in &self.deletes {
            steps.step(p, p.parent(root).and_then(|d| ignore_missing(d.remove_file(&p.name))))?;
            applied.deleted.push(p.path.clone());
        }
        for p in &self.dirs_removed {
            let r = p.parent(root).and_then(|d| d.remove_dir(&p.name));
            match r {
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) || e.raw_os_error() == Some(libc::EEXIST) => {
                    applied.dirs_kept.push(p.path.clone());
                    steps.done += 1;
                }
                r => {
                    steps.step(p, ignore_missing(r))?;
                    applied.dirs_removed.push(p.path.clone());
                }
            }
        }
        for p in &self.dirs_added {
            let made = p.parent(root).and_then(|d| match d.mkdir(&p.name, 0o777) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.lstat(&p.name)?.kind == Kind::Dir => Ok(()),
                r => r,
            });
            steps.step(p, made)?;
            applied.dirs_created.push(p.path.clone());
        }
        for w in later {
            match stage(changes, root, w) {
                Ok(tmp) => steps.staged.push((w, tmp)),
                Err(e) => return Err(steps.fail(&w.place.path, e)),
            }
        }
        applied.written = steps.rename_staged()?;
        for (p, mode) in &self.modes {
            steps.step(p, p.parent(root).and_then(|d| d.chmod(&p.name, *mode)))?;
            applied.mode_changed.push(p.path.clone());
        }
        for parents in steps.touched {
            if let Ok(d) = root.descend(parents.iter().map(OsString::as_os_str)) {
                let _ = d.sync();
            }
        }
        Ok(applied)
    }
}

/// Where [`Plan::run`] is once the user's files start to change.
struct Steps<'a, 'c> {
    dir: &'a Path,
    root: &'a DirFd,
    /// New files and links staged beside their destination, not yet moved.
    staged: Vec<(&'a Write<'c>, OsString)>,
    /// Steps done, of `total`.
    done: usize,
    total: usize,
    /// The directories written to, to be synced at the end.
    touched: BTreeSet<Vec<OsString>>,
}

impl Steps<'_, '_> {
    /// Count the step at `place`, or, should it have failed, remove what is
    /// staged and say how far it got.
    fn step(&mut self, place: &Place, r: io::Result<()>) -> Result<(), WorkspaceError> {
        if let Err(e) = r {
            return Err(self.fail(&place.path, e));
        }
        self.touched.insert(place.parents.clone());
        self.done += 1;
        Ok(())
    }

    /// Remove what is staged; the error names the failing path and the
    /// steps done.
    fn fail(&self, path: &str, source: io::Error) -> WorkspaceError {
        unstage(self.root, &self.staged);
        self.failure(path, source)
    }

    fn failure(&self, path: &str, source: io::Error) -> WorkspaceError {
        WorkspaceError::ApplyFailed {
            dir: self.dir.to_path_buf(),
            path: path.to_string(),
            done: self.done,
            total: self.total,
            source,
        }
    }

    /// Move every staged file or link into place; returns their paths.
    fn rename_staged(&mut self) -> Result<Vec<String>, WorkspaceError> {
        let mut written = Vec::new();
        for i in 0..self.staged.len() {
            let (w, tmp) = (self.staged[i].0, self.staged[i].1.clone());
            let p = &w.place;
            let moved = p.parent(self.root).and_then(|d| d.rename(&tmp, &p.name));
            if let Err(e) = moved {
                unstage(self.root, &self.staged[i..]);
                return Err(self.failure(&p.path, e));
            }
            self.touched.insert(p.parents.clone());
            self.done += 1;
            written.push(p.path.clone());
        }
        self.staged.clear();
        Ok(written)
    }
}

/// What must hold in `dir` before a path is written there.
struct Checks<'a> {
    snapshot: &'a Snapshot,
    dir: &'a Path,
    root: &'a DirFd,
    /// Files and links the change set deletes.
    deleted: BTreeSet<&'a str>,
    /// Directories the change set removes.
    removed: BTreeSet<&'a str>,
}

impl Checks<'_> {
    fn in_the_way(&self, path: &str, why: String) -> WorkspaceError {
        WorkspaceError::InTheWay {
            dir: self.dir.to_path_buf(),
            path: path.to_string(),
            why,
        }
    }

    fn look(&self, p: &Place) -> Result<Option<Kind>, WorkspaceError> {
        p.lstat(self.root)
            .map_err(WorkspaceError::io(format!("cannot look at `{}`", p.path)))
    }

    /// Every directory above a path we create must be one of the user's
    /// (unchanged, checked before) or one we make; anything else standing
    /// there is ignored here, and we never write into or over it.
    fn parents(&self, path: &str) -> Result<(), WorkspaceError> {
        for (i, _) in path.match_indices('/') {
            let parent = &path[..i];
            match self.snapshot.get(parent) {
                Some(e) if e.kind == EntryKind::Dir && !self.removed.contains(parent) => {}
                Some(e) if e.kind != EntryKind::Dir && self.deleted.contains(parent) => {}
                Some(_) => {
                    return Err(WorkspaceError::Archive(format!(
                        "the change set is inconsistent at `{parent}`"
                    )))
                }
                None => {
                    if self.look(&Place::new(parent)?)?.is_some() {
                        return Err(
                            self.in_the_way(parent, "it exists here but is ignored, so the job never saw it".into())
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// A path we create (`old`: what the snapshot had there): its parents
    /// are ours to write into, and nothing the job never saw stands there.
    fn new_path(&self, p: &Place, old: Option<&Entry>) -> Result<(), WorkspaceError> {
        self.parents(&p.path)?;
        if old.is_none() && self.look(p)?.is_some() {
            return Err(self.in_the_way(
                &p.path,
                "it exists here but is ignored, so the job never saw it; applying would overwrite it".into(),
            ));
        }
        Ok(())
    }

    /// A directory becomes a file or link: it must hold nothing but what
    /// the change set deletes.
    fn dir_can_go(&self, p: &Place, side: &NewSide) -> Result<(), WorkspaceError> {
        let dir_fd = p
            .parent(self.root)
            .and_then(|d| d.child(&p.name))
            .map_err(WorkspaceError::io(format!("cannot open `{}`", p.path)))?;
        match first_unknown(&dir_fd, &p.path, self.snapshot)? {
            Some(extra) => Err(self.in_the_way(
                &extra,
                format!("it is ignored, and `{}` must become a {}", p.path, side.kind.name()),
            )),
            None => Ok(()),
        }
    }
}

fn bad(f: &FileChange) -> WorkspaceError {
    WorkspaceError::Archive(format!("the change set is inconsistent at `{}`", f.path))
}

fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Write `w`'s content under a temporary name beside its destination;
/// returns that name.
fn stage(changes: &ChangeSet, root: &DirFd, w: &Write) -> io::Result<OsString> {
    let parent = w.place.parent(root)?;
    let name = w.place.name.to_string_lossy();
    for _ in 0..16 {
        let suffix: u32 = rand::random();
        let tmp = if name.len() > 200 {
            OsString::from(format!(".cmm-new-{suffix:08x}"))
        } else {
            OsString::from(format!(".{name}.cmm-new-{suffix:08x}"))
        };
        let made = match w.side.kind {
            EntryKind::Symlink => parent.symlink(OsStr::new(w.side.target.as_deref().unwrap_or_default()), &tmp),
            _ => write_file(changes, &parent, &tmp, w),
        };
        match made {
            Ok(()) => return Ok(tmp),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                let _ = parent.remove_file(&tmp);
                return Err(e);
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, "no free temporary name"))
}

fn write_file(changes: &ChangeSet, parent: &DirFd, tmp: &OsStr, w: &Write) -> io::Result<()> {
    let create_mode = if w.side.exec { 0o777 } else { 0o666 };
    let mut f = parent.create_new(tmp, create_mode)?;
    if let Some(slice) = w.side.data {
        io::copy(&mut changes.content_reader(slice), &mut f)?;
    }
    if let Some(mode) = w.mode {
        fchmod(&f, mode)?;
    }
    f.sync_all()
}

/// Remove staged files that will not be renamed in (best effort).
fn unstage(root: &DirFd, staged: &[(&Write, OsString)]) {
    for (w, tmp) in staged {
        if let Ok(d) = w.place.parent(root) {
            let _ = d.remove_file(tmp);
        }
    }
}

/// The first path inside the directory `fd` (at `rel`) that the snapshot
/// does not know: something ignored.
fn first_unknown(fd: &DirFd, rel: &str, snapshot: &Snapshot) -> Result<Option<String>, WorkspaceError> {
    let names = fd.names().map_err(WorkspaceError::io(format!("cannot list `{rel}`")))?;
    for name in names {
        let child = format!("{rel}/{}", name.to_string_lossy());
        match snapshot.get(&child) {
            None => return Ok(Some(child)),
            Some(e) if e.kind == EntryKind::Dir => {
                let sub = fd
                    .child(&name)
                    .map_err(WorkspaceError::io(format!("cannot open `{child}`")))?;
                if let Some(found) = first_unknown(&sub, &child, snapshot)? {
                    return Ok(Some(found));
                }
            }
            Some(_) => {}
        }
    }
    Ok(None)
}
