//! Selecting a workspace ([`select`]) and packing it ([`Snapshot::write_tar`]).
//!
//! It reads the user's directory, never through a link, and keeps what it
//! read; it must not write to that directory.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::fsat::{DirFd, Kind, Meta};
use super::rules::{link_stays_inside, IgnoreRules};
use super::spool::{Slice, Spool};
use super::{Rules, WorkspaceError, CONTAINER_UID, MAX_DEPTH};

/// What a manifest entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

impl EntryKind {
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "directory",
            EntryKind::Symlink => "symbolic link",
        }
    }
}

/// One selected path.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Relative to the workspace, `/`-separated.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Bytes of a file; of the target, for a link; 0 for a directory.
    pub size: u64,
    /// SHA-256 of a file's bytes.
    #[serde(serialize_with = "hex_opt")]
    pub sha256: Option<[u8; 32]>,
    pub link_target: Option<String>,
    /// Modification time (seconds), carried in the tar; not compared.
    #[serde(skip)]
    pub mtime: i64,
    #[serde(skip)]
    pub(crate) data: Option<Slice>,
}

impl Entry {
    /// The mode git records: 100644 or 100755 (the owner's execute bit
    /// decides), 120000 for a link, 040000 for a directory.
    pub fn git_mode(&self) -> u32 {
        match self.kind {
            EntryKind::Dir => 0o040000,
            EntryKind::Symlink => 0o120000,
            EntryKind::File if self.mode & 0o100 != 0 => 0o100755,
            EntryKind::File => 0o100644,
        }
    }

    /// Same kind, permission bits, size, content and target (not mtime).
    pub(crate) fn same_as(&self, other: &Entry) -> bool {
        self.kind == other.kind
            && self.mode == other.mode
            && self.size == other.size
            && self.sha256 == other.sha256
            && self.link_target == other.link_target
    }
}

fn hex_opt<S: serde::Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(h) => s.serialize_str(&hex::encode(h)),
        None => s.serialize_none(),
    }
}

/// A selected workspace: the manifest, the rules that chose it, and the
/// original bytes (in an unlinked temporary file).
#[derive(Debug)]
pub struct Snapshot {
    dir: PathBuf,
    rules: Rules,
    ignore: IgnoreRules,
    entries: BTreeMap<String, Entry>,
    spool: Spool,
    total_bytes: u64,
    left_out: usize,
    id: String,
}

/// Select the workspace in `dir`: walk it under `rules` (see the module doc
/// for what is selected and what is refused), hash every file, and keep the
/// bytes. Fails before anything runs, naming the path and what to do.
pub fn select(dir: &Path, rules: &Rules) -> Result<Snapshot, WorkspaceError> {
    let mut spool = Spool::new().map_err(WorkspaceError::io("cannot create a temporary file for the workspace"))?;
    let walk = Walker::run(dir, rules, Some(&mut spool), rules.limit_bytes, None)?;
    let (abs, ignore, entries, total, left_out) = (walk.abs, walk.ignore, walk.entries, walk.total, walk.left_out);
    let id = manifest_id(&entries);
    Ok(Snapshot {
        dir: abs,
        rules: rules.clone(),
        ignore,
        entries,
        spool,
        total_bytes: total,
        left_out,
        id,
    })
}

/// The manifest `dir` has now under the snapshot's rules, without keeping
/// bytes or applying the size limit (to see whether it changed). The rules
/// from outside the directory are the ones compiled at selection, so an
/// edit of the global excludes cannot hide a change; the `.gitignore` files
/// inside are selected files, so an edit of one is itself a change.
pub(crate) fn scan(snapshot: &Snapshot, dir: &Path) -> Result<BTreeMap<String, Entry>, WorkspaceError> {
    let outside = snapshot.ignore.outside_only();
    Ok(Walker::run(dir, &snapshot.rules, None, u64::MAX, Some(outside))?.entries)
}

impl Snapshot {
    /// The workspace directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Every selected path, sorted (a directory before what it holds).
    pub fn entries(&self) -> impl ExactSizeIterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Regular files and links selected.
    pub fn file_count(&self) -> usize {
        self.entries.values().filter(|e| e.kind != EntryKind::Dir).count()
    }

    /// Bytes of all selected files.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Paths the rules left out (an excluded directory counts once).
    pub fn left_out(&self) -> usize {
        self.left_out
    }

    /// SHA-256 over the manifest (paths, kinds, modes, sizes, hashes,
    /// targets): two snapshots with the same id selected the same tree.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// If the selection rules leave `rel` out (or a directory above it),
    /// the topmost such path: for paths that only exist in an archive.
    pub fn left_out_by_rules(&self, rel: &str, is_dir: bool) -> Option<String> {
        self.ignore.excludes_path(rel, is_dir, self.rules.include_git)
    }

    /// `12 files, 3 directories, 1.5 MiB; 2 ignored paths left out`.
    pub fn summary(&self) -> String {
        let dirs = self.entries.len() - self.file_count();
        let mut s = format!(
            "{} file{}, {} director{}, {}",
            self.file_count(),
            if self.file_count() == 1 { "" } else { "s" },
            dirs,
            if dirs == 1 { "y" } else { "ies" },
            super::human_bytes(self.total_bytes)
        );
        if self.left_out > 0 {
            s.push_str(&format!(
                "; {} ignored path{} left out",
                self.left_out,
                if self.left_out == 1 { "" } else { "s" }
            ));
        }
        s
    }

    /// The original bytes of a selected file.
    pub(crate) fn content(&self, e: &Entry) -> io::Result<Vec<u8>> {
        match e.data {
            Some(slice) => self.spool.read(slice),
            None => Ok(Vec::new()),
        }
    }

    /// Write the selection as an uncompressed tar: relative paths, sorted,
    /// directories, regular files and links, permission bits kept (without
    /// setuid/setgid/sticky), owner [`CONTAINER_UID`], no user or group
    /// names. The same snapshot always writes the same bytes.
    pub fn write_tar(&self, w: impl Write) -> Result<(), WorkspaceError> {
        let err = WorkspaceError::io("cannot write the workspace archive");
        let mut b = tar::Builder::new(BufWriter::with_capacity(256 * 1024, w));
        let mut inner = || -> io::Result<()> {
            for e in self.entries.values() {
                let mut h = tar::Header::new_gnu();
                h.set_uid(CONTAINER_UID);
                h.set_gid(CONTAINER_UID);
                h.set_mode(e.mode & 0o777);
                h.set_mtime(u64::try_from(e.mtime).unwrap_or(0));
                match e.kind {
                    EntryKind::Dir => {
                        h.set_entry_type(tar::EntryType::Directory);
                        h.set_size(0);
                        b.append_data(&mut h, format!("{}/", e.path), io::empty())?;
                    }
                    EntryKind::File => {
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_size(e.size);
                        let slice = e.data.unwrap_or(Slice { offset: 0, len: 0 });
                        b.append_data(&mut h, &e.path, self.spool.reader(slice))?;
                    }
                    EntryKind::Symlink => {
                        h.set_entry_type(tar::EntryType::Symlink);
                        h.set_size(0);
                        b.append_link(&mut h, &e.path, e.link_target.as_deref().unwrap_or_default())?;
                    }
                }
            }
            b.finish()?;
            b.get_mut().flush()
        };
        inner().map_err(err)
    }
}

fn manifest_id(entries: &BTreeMap<String, Entry>) -> String {
    let mut h = Sha256::new();
    for e in entries.values() {
        h.update(e.path.as_bytes());
        h.update([0]);
        h.update(format!("{:?} {:o} {} ", e.kind, e.mode, e.size));
        h.update(e.sha256.unwrap_or_default());
        h.update(e.link_target.as_deref().unwrap_or_default().as_bytes());
        h.update([b'\n']);
    }
    hex::encode(h.finalize())
}

/// One walk of a workspace.
struct Walker<'a> {
    /// As the caller named it (for messages).
    named: &'a Path,
    abs: PathBuf,
    include_git: bool,
    limit: u64,
    ignore: IgnoreRules,
    entries: BTreeMap<String, Entry>,
    /// Where file bytes go; `None`: only hash them.
    spool: Option<&'a mut Spool>,
    total: u64,
    left_out: usize,
    buf: Vec<u8>,
}

impl<'a> Walker<'a> {
    fn run(
        dir: &'a Path,
        rules: &Rules,
        spool: Option<&'a mut Spool>,
        limit: u64,
        outside: Option<IgnoreRules>,
    ) -> Result<Walker<'a>, WorkspaceError> {
        let not_dir = || WorkspaceError::NotADirectory {
            path: dir.to_path_buf(),
        };
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(not_dir()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_dir()),
            Err(e) => return Err(unreadable(dir, ".", e)),
        }
        let abs = dir.canonicalize().map_err(|e| unreadable(dir, ".", e))?;
        let root = DirFd::open(&abs).map_err(|e| unreadable(dir, ".", e))?;
        let mut w = Walker {
            named: dir,
            ignore: outside.unwrap_or_else(|| IgnoreRules::discover(&abs, rules.global_excludes.as_deref())),
            abs,
            include_git: rules.include_git,
            limit,
            entries: BTreeMap::new(),
            spool,
            total: 0,
            left_out: 0,
            buf: vec![0; 256 * 1024],
        };
        w.visit(&root, "", false, 0)?;
        if w.total > w.limit {
            return Err(WorkspaceError::TooBig {
                dir: dir.to_path_buf(),
                size: w.total,
                limit: w.limit,
                biggest: biggest(&w.entries),
            });
        }
        w.check_links()?;
        Ok(w)
    }

    fn visit(&mut self, fd: &DirFd, rel: &str, in_git: bool, depth: usize) -> Result<(), WorkspaceError> {
        if depth > MAX_DEPTH {
            return Err(WorkspaceError::TooDeep {
                dir: self.named.to_path_buf(),
                path: rel.to_string(),
                depth: MAX_DEPTH,
            });
        }
        let names = fd.names().map_err(|e| unreadable(self.named, or_dot(rel), e))?;
        if !in_git && names.iter().any(|n| n.as_os_str() == ".gitignore") {
            self.read_gitignore(fd, rel);
        }
        for name in names {
            let lossy = name.to_string_lossy();
            let child = if rel.is_empty() {
                lossy.to_string()
            } else {
                format!("{rel}/{lossy}")
            };
            let meta = fd.lstat(&name).map_err(|e| unreadable(self.named, &child, e))?;
            let is_dir = meta.kind == Kind::Dir;
            let mut child_in_git = in_git;
            if in_git {
                // Inside an included `.git`: everything, no rules.
            } else if name == ".git" {
                if !self.include_git {
                    self.left_out += 1;
                    continue;
                }
                child_in_git = true;
            } else if self.ignore.excludes(&child, is_dir) {
                self.left_out += 1;
                continue;
            }
            if name.to_str().is_none() {
                return Err(WorkspaceError::BadName {
                    dir: self.named.to_path_buf(),
                    path: child,
                });
            }
            match meta.kind {
                Kind::Dir => {
                    self.entries
                        .insert(child.clone(), entry(&child, EntryKind::Dir, &meta, 0));
                    let sub = fd.child(&name).map_err(|e| unreadable(self.named, &child, e))?;
                    self.visit(&sub, &child, child_in_git, depth + 1)?;
                }
                Kind::File => self.file(fd, &name, child)?,
                Kind::Symlink => {
                    let target = fd.read_link(&name).map_err(|e| unreadable(self.named, &child, e))?;
                    let Some(target) = target.to_str() else {
                        return Err(WorkspaceError::BadName {
                            dir: self.named.to_path_buf(),
                            path: format!("{child} (its target)"),
                        });
                    };
                    let mut e = entry(&child, EntryKind::Symlink, &meta, target.len() as u64);
                    e.link_target = Some(target.to_string());
                    self.entries.insert(child, e);
                }
                Kind::Special(kind) => {
                    return Err(WorkspaceError::SpecialFile {
                        dir: self.named.to_path_buf(),
                        path: child,
                        kind,
                    })
                }
            }
        }
        Ok(())
    }

    fn read_gitignore(&mut self, fd: &DirFd, rel: &str) {
        // Like git: an unreadable or linked `.gitignore` is no rule at all.
        let Ok((f, meta)) = fd.open_file(OsStr::new(".gitignore")) else {
            return;
        };
        if meta.kind != Kind::File {
            return;
        }
        let mut content = Vec::new();
        if f.take(16 * 1024 * 1024).read_to_end(&mut content).is_ok() {
            let abs_dir = self.abs.join(rel);
            self.ignore.add_gitignore(rel, &abs_dir, &content);
        }
    }

    fn file(&mut self, fd: &DirFd, name: &OsStr, child: String) -> Result<(), WorkspaceError> {
        let (mut f, meta) = fd.open_file(name).map_err(|e| unreadable(self.named, &child, e))?;
        if let Kind::Special(kind) = meta.kind {
            return Err(WorkspaceError::SpecialFile {
                dir: self.named.to_path_buf(),
                path: child,
                kind,
            });
        }
        // Over the limit already: only count, so the refusal can say what
        // is big, without copying any more of it.
        if self.total.saturating_add(meta.size) > self.limit {
            self.total = self.total.saturating_add(meta.size);
            self.entries
                .insert(child.clone(), entry(&child, EntryKind::File, &meta, meta.size));
            return Ok(());
        }
        let start = self.spool.as_ref().map(|s| s.len()).unwrap_or(0);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let n = match f.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(unreadable(self.named, &child, e)),
            };
            hasher.update(&self.buf[..n]);
            if let Some(spool) = self.spool.as_mut() {
                spool
                    .write(&self.buf[..n])
                    .map_err(WorkspaceError::io("cannot keep a copy of the workspace"))?;
            }
            size += n as u64;
        }
        self.total = self.total.saturating_add(size);
        let mut e = entry(&child, EntryKind::File, &meta, size);
        e.sha256 = Some(hasher.finalize().into());
        if self.spool.is_some() {
            e.data = Some(Slice {
                offset: start,
                len: size,
            });
        }
        self.entries.insert(child, e);
        Ok(())
    }

    fn check_links(&self) -> Result<(), WorkspaceError> {
        let symlink_at = |p: &str| {
            self.entries
                .get(p)
                .filter(|e| e.kind == EntryKind::Symlink)
                .and_then(|e| e.link_target.as_deref())
        };
        for e in self.entries.values().filter(|e| e.kind == EntryKind::Symlink) {
            let target = e.link_target.as_deref().unwrap_or_default();
            if !link_stays_inside(&e.path, target, symlink_at) {
                return Err(WorkspaceError::LinkOutside {
                    dir: self.named.to_path_buf(),
                    path: e.path.clone(),
                    target: target.to_string(),
                });
            }
        }
        Ok(())
    }
}

fn entry(path: &str, kind: EntryKind, meta: &Meta, size: u64) -> Entry {
    Entry {
        path: path.to_string(),
        kind,
        mode: meta.mode,
        size,
        sha256: None,
        link_target: None,
        mtime: meta.mtime,
        data: None,
    }
}

fn or_dot(rel: &str) -> &str {
    if rel.is_empty() {
        "."
    } else {
        rel
    }
}

fn unreadable(dir: &Path, path: &str, source: io::Error) -> WorkspaceError {
    WorkspaceError::Unreadable {
        dir: dir.to_path_buf(),
        path: path.to_string(),
        source,
    }
}

/// The biggest top-level entries and files, largest first: what to add to
/// `.gitignore`.
fn biggest(entries: &BTreeMap<String, Entry>) -> Vec<(String, u64)> {
    let mut top: BTreeMap<String, u64> = BTreeMap::new();
    let mut files: Vec<(String, u64)> = Vec::new();
    for e in entries.values().filter(|e| e.kind == EntryKind::File) {
        let key = match e.path.split_once('/') {
            Some((first, _)) => format!("{first}/"),
            None => e.path.clone(),
        };
        *top.entry(key).or_default() += e.size;
        files.push((e.path.clone(), e.size));
    }
    let mut top: Vec<(String, u64)> = top.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(5);
    files.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for f in files.into_iter().take(5) {
        if !top.iter().any(|(p, _)| *p == f.0) {
            top.push(f);
        }
    }
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top
}
