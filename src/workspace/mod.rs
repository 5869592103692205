//! A job's workspace: what of the user's directory goes into the container,
//! and what comes back.
//!
//! `execute --workspace DIR` never mounts DIR. It [`select`]s what to copy
//! (a [`Snapshot`]: a manifest plus the original bytes, kept in an unlinked
//! temporary file so a later edit of DIR cannot change what the job saw),
//! packs it as a tar ([`Snapshot::write_tar`]) that our own binary unpacks
//! inside the container ([`UNPACK_MODE`]), and, when the job ends, reads the
//! tar our binary packs there ([`PACK_MODE`]) and [`diff`](fn@diff)s it **on the
//! host** against the snapshot. The result, a [`ChangeSet`], carries a
//! git-style patch that `git apply` accepts and the new contents, so that
//! [`apply`](fn@apply) can write them into DIR, but only if DIR has not changed since.
//!
//! A market task takes the same workspace to another host: the requester
//! sends the snapshot's tar, the provider unpacks it as a stranger's
//! ([`unpack_untrusted`]), selects it as sent ([`select_received`]), runs
//! the job and sends back a delta ([`pack_delta`]); the requester
//! [`rebuild`]s the job's tree from its own snapshot and that delta and
//! makes its own change set from the result, never from the provider's.
//!
//! Each stage lives in its own submodule, and of them all only `apply`
//! writes to DIR; this file holds what they share (the selection `Rules`,
//! the bounds, and how an archive path is split and checked).
//!
//! # What is selected
//!
//! The aim is what `git status` would show: the files git would track or
//! offer to track. Concretely:
//!
//! - `.gitignore` files in DIR and in every selected directory below it
//!   apply, with git's precedence: a deeper file overrides a shallower one,
//!   within a file the last matching line wins, `!` re-includes, and nothing
//!   below an excluded directory can be re-included. They apply whether or not
//!   DIR is in a git repository.
//! - `.gitignore` files of DIR's *parents* apply only when DIR is inside a
//!   git work tree, from its top down to DIR's parent, as git reads them.
//!   Outside a repository no parent rule applies: a dotfiles setup that puts
//!   `*` in `~/.gitignore` must not silently empty every project below `~`.
//! - `$GIT_DIR/info/exclude` of that work tree applies (the common directory
//!   for a linked worktree), below the `.gitignore` files.
//! - The global excludes file (`core.excludesFile`, else
//!   `$XDG_CONFIG_HOME/git/ignore`) applies last, as in git, and also outside
//!   a repository: personal clutter and secrets listed there stay home.
//!   [`Rules::new`] resolves its path once; tests and callers may replace it.
//! - `.ignore` and `.rgignore` files do not apply: git does not read them.
//! - `.git` (directory or file, at any depth) is left out unless
//!   [`Rules::include_git`]; when included it is copied whole, with no rule
//!   applied inside it.
//! - DIR itself is never ignored, even if a parent rule ignores it: you
//!   named it. A nested repository's files are selected like any directory's
//!   (its own `info/exclude` is not read). A `.gitignore` that is a symbolic
//!   link is not followed (git 2.32 and later do the same).
//! - Hidden files are included; links are never followed. A symbolic link
//!   is copied as a link, and only if it resolves inside DIR (absolute
//!   targets, and relative ones that leave DIR, also through other links in
//!   it, are refused). Fifos, sockets and devices are refused, as are
//!   unreadable files and names that are not UTF-8: each with the path and
//!   what to do, before anything runs.
//!
//! The walk is ours, over directory file descriptors (a path component is
//! never resolved through a link, even if one is swapped in while we read),
//! but every ignore decision is made by the `ignore` crate's gitignore
//! matcher (ripgrep's). We do not use its `WalkBuilder` because the same
//! rules must later judge paths that exist only in the returned archive (a
//! `target/` the job built), and because with `require_git(false)` it
//! applies every parent's `.gitignore` up to `/`; one matcher stack, kept in
//! the snapshot, answers both questions the same way.
//!
//! # Modes and owners
//!
//! Permission bits travel in the tar (setuid, setgid and sticky bits are
//! dropped); owners do not: the container's files belong to uid
//! [`CONTAINER_UID`], and [`apply`](fn@apply) writes files as the user. A change of the
//! owner's execute bit is a mode change (git's rule); other permission
//! changes made in the container are not carried back.

mod apply;
mod container;
mod delta;
#[cfg(test)]
mod delta_tests;
mod diff;
mod error;
mod fsat;
mod patch;
mod rules;
mod snapshot;
mod spool;
#[cfg(test)]
mod tests;

pub use apply::{apply, Applied};
pub use container::{pack_dir, pack_main, unpack_into, unpack_main, unpack_untrusted, Counts, PACK_MODE, UNPACK_MODE};
pub use delta::{pack_delta, rebuild, select_received};
pub use diff::{diff, ChangeKind, ChangeSet, DiffRules, FileChange, Ignored, PatchInfo, Skipped, Totals};
pub use error::{Bound, Untrusted, WorkspaceError};
pub use snapshot::{select, Entry, EntryKind, Snapshot};

use std::path::PathBuf;

/// The uid and gid the job runs as inside the container; our tar headers
/// carry it.
pub const CONTAINER_UID: u64 = 10001;

/// The workspace size limit when `docker.workspaceLimit` is not set.
pub const DEFAULT_LIMIT_BYTES: u64 = 100 * 1024 * 1024;

/// Directories nested deeper than this are refused (each level holds a file
/// descriptor while we walk).
const MAX_DEPTH: usize = 256;

/// How a workspace is selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Refuse a selection whose files add up to more than this.
    pub limit_bytes: u64,
    /// Copy `.git` too (whole), instead of leaving it out.
    pub include_git: bool,
    /// The global excludes file (may not exist); `None`: no global rules.
    pub global_excludes: Option<PathBuf>,
}

impl Rules {
    /// The rules git would use for this user, with the given size limit.
    pub fn new(limit_bytes: u64) -> Rules {
        Rules {
            limit_bytes,
            include_git: false,
            global_excludes: ignore::gitignore::gitconfig_excludes_path(),
        }
    }
}

impl Rules {
    /// The rules a provider selects a workspace it was sent with: the
    /// archive's own `.gitignore` files and nothing of this host's (no
    /// global excludes file), `.git` as the requester chose, so the job
    /// sees exactly what was sent. See [`select_received`], which also
    /// makes sure no parent directory's rules apply.
    pub fn exact(limit_bytes: u64, include_git: bool) -> Rules {
        Rules {
            limit_bytes,
            include_git,
            global_excludes: None,
        }
    }
}

impl Default for Rules {
    fn default() -> Self {
        Rules::new(DEFAULT_LIMIT_BYTES)
    }
}

/// `1.5 MiB`: sizes for people.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Split an archive path into its components, refusing absolute paths and
/// `..`; `.` and empty components are dropped. `Ok(None)` is the root itself.
pub(crate) fn archive_components(path: &[u8]) -> Result<Option<Vec<&[u8]>>, String> {
    if path.first() == Some(&b'/') {
        return Err(format!("absolute path `{}`", String::from_utf8_lossy(path)));
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(format!("path with `..`: `{}`", String::from_utf8_lossy(path))),
            c if c.contains(&0) => return Err("path with a NUL byte".into()),
            c => out.push(c),
        }
    }
    Ok(if out.is_empty() { None } else { Some(out) })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn archive_paths_are_relative_and_never_climb() {
        let ok = |p: &str| archive_components(p.as_bytes()).unwrap().map(|v| v.concat());
        assert_eq!(ok("a/b"), Some(b"ab".to_vec()));
        assert_eq!(ok("./a//b/"), Some(b"ab".to_vec()));
        assert_eq!(ok("./"), None);
        assert!(archive_components(b"/etc/passwd").is_err());
        assert!(archive_components(b"a/../../b").is_err());
        assert!(archive_components(b"..").is_err());
    }

    #[test]
    fn sizes_read_like_sizes() {
        assert_eq!(human_bytes(10), "10 bytes");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(100 * 1024 * 1024), "100.0 MiB");
    }
}
