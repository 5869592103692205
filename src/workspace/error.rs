//! What can go wrong with a workspace, with the exit code and what to do.
//! Only the error type lives here; no workspace operation does.

use std::io;
use std::path::PathBuf;

use crate::exit::{Exit, HasExit};

use super::human_bytes;

/// Bytes that came from someone else, and so are checked before anything is
/// made of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untrusted {
    /// A requester's workspace archive, unpacked on a provider's host.
    Workspace,
    /// A provider's delta, rebuilt on the requester's host.
    Delta,
}

impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Untrusted::Workspace => "the workspace archive sent with the task",
            Untrusted::Delta => "the provider's delta",
        })
    }
}

/// What an untrusted input has too much of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Bytes,
    Entries,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("workspace `{}` is not a directory", path.display())]
    NotADirectory { path: PathBuf },

    #[error(
        "workspace `{}` is {} of files, over the limit of {}; biggest: {}",
        dir.display(),
        human_bytes(*size),
        human_bytes(*limit),
        biggest.iter().map(|(p, n)| format!("`{p}` {}", human_bytes(*n))).collect::<Vec<_>>().join(", ")
    )]
    TooBig {
        dir: PathBuf,
        size: u64,
        limit: u64,
        /// The largest top-level entries and files, largest first.
        biggest: Vec<(String, u64)>,
    },

    #[error("`{path}` in workspace `{}` is a symbolic link to `{target}`, which is outside the workspace", dir.display())]
    LinkOutside { dir: PathBuf, path: String, target: String },

    #[error("`{path}` in workspace `{}` is a {kind}; only files, directories and symbolic links can be copied", dir.display())]
    SpecialFile {
        dir: PathBuf,
        path: String,
        kind: &'static str,
    },

    #[error("cannot read `{path}` in workspace `{}`: {source}", dir.display())]
    Unreadable {
        dir: PathBuf,
        path: String,
        source: io::Error,
    },

    #[error("`{path}` in workspace `{}` has a name that is not valid UTF-8", dir.display())]
    BadName { dir: PathBuf, path: String },

    #[error("workspace `{}` nests directories deeper than {depth} levels at `{path}`", dir.display())]
    TooDeep { dir: PathBuf, path: String, depth: usize },

    #[error("the job's workspace archive is malformed: {0}")]
    Archive(String),

    #[error("the job's workspace archive is larger than {}", human_bytes(*limit))]
    OutputTooBig { limit: u64 },

    #[error("{input} is refused{}: {why}", path.as_ref().map(|p| format!(" at `{p}`")).unwrap_or_default())]
    Refused {
        input: Untrusted,
        /// The entry refused, when the refusal is about one.
        path: Option<String>,
        why: String,
    },

    #[error(
        "{input} holds more than {}",
        match what { Bound::Bytes => human_bytes(*limit), Bound::Entries => format!("{limit} entries") }
    )]
    OverBound { input: Untrusted, what: Bound, limit: u64 },

    #[error("the job's changes cannot be packed from `{}`: {why}", dir.display())]
    ChangesUnusable { dir: PathBuf, why: String },

    #[error("the job's changes come to more than {}, the bound on a delta", human_bytes(*limit))]
    DeltaTooBig { limit: u64 },

    #[error("`{}` is inside the git work tree `{}`, whose ignore rules would hide files that were sent", dir.display(), top.display())]
    InsideWorkTree { dir: PathBuf, top: PathBuf },

    #[error("this change set was not made from this snapshot")]
    WrongSnapshot,

    #[error(
        "`{}` changed since the job started ({}{}); nothing was applied",
        dir.display(),
        changes.join(", "),
        if *more > 0 { format!(" and {more} more") } else { String::new() }
    )]
    Changed {
        dir: PathBuf,
        /// The first changes, each as "`path` what".
        changes: Vec<String>,
        more: usize,
    },

    #[error("`{path}` is in the way in `{}`: {why}; nothing was applied", dir.display())]
    InTheWay { dir: PathBuf, path: String, why: String },

    #[error("applying to `{}` stopped at `{path}` after {done} of {total} changes: {source}", dir.display())]
    ApplyFailed {
        dir: PathBuf,
        path: String,
        done: usize,
        total: usize,
        source: io::Error,
    },

    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

impl WorkspaceError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> WorkspaceError {
        let context = context.into();
        move |source| WorkspaceError::Io { context, source }
    }
}

impl HasExit for WorkspaceError {
    fn exit(&self) -> Exit {
        use WorkspaceError::*;
        match self {
            // The user's input cannot be copied as it is: they must change it.
            NotADirectory { .. }
            | TooBig { .. }
            | LinkOutside { .. }
            | SpecialFile { .. }
            | Unreadable { .. }
            | BadName { .. }
            | TooDeep { .. } => Exit::Usage,
            // Nothing failed: we declined to write over the user's newer
            // work. That is a refusal by policy, like a cap, and scripts can
            // tell it from a broken apply (1).
            Changed { .. } | InTheWay { .. } => Exit::Refused,
            Archive(_)
            | OutputTooBig { .. }
            | Refused { .. }
            | OverBound { .. }
            | ChangesUnusable { .. }
            | DeltaTooBig { .. }
            | InsideWorkTree { .. }
            | WrongSnapshot
            | ApplyFailed { .. }
            | Io { .. } => Exit::Failed,
        }
    }

    fn hint(&self) -> Option<String> {
        use WorkspaceError::*;
        match self {
            NotADirectory { .. } => Some("pass the project directory to `--workspace`".into()),
            TooBig { dir, biggest, .. } => {
                let first = biggest.first().map(|(p, _)| p.as_str()).unwrap_or("build/");
                Some(format!(
                    "add what the job does not need to `{}` (e.g. a line `/{first}`), or raise `docker.workspaceLimit`",
                    dir.join(".gitignore").display()
                ))
            }
            LinkOutside { path, .. } => Some(format!(
                "replace `{path}` with a copy of what it points to, or add `{path}` to `.gitignore`"
            )),
            SpecialFile { path, .. } => Some(format!("remove `{path}`, or add it to `.gitignore`")),
            Unreadable { path, .. } => Some(format!(
                "make `{path}` readable (`chmod u+r`), or add it to `.gitignore`"
            )),
            BadName { .. } => Some("rename it, or add it to `.gitignore`".into()),
            TooDeep { path, .. } => Some(format!("add `{path}` to `.gitignore`")),
            Archive(_) | OutputTooBig { .. } => {
                Some("the job's changes cannot be trusted and were not applied; run the job again".into())
            }
            Refused { input, .. } | OverBound { input, .. } => Some(match input {
                Untrusted::Workspace => {
                    "decline the task: its workspace cannot be unpacked safely; nothing was written outside the \
                     directory it was unpacked into, which can be removed"
                        .into()
                }
                Untrusted::Delta => {
                    "the provider's result cannot be used and nothing was applied; post the task again, \
                     or to another provider"
                        .into()
                }
            }),
            ChangesUnusable { .. } => {
                Some("the job's record or its directory was changed after the job; run the job again".into())
            }
            DeltaTooBig { .. } => {
                Some("the job changed more than can be sent back; ask for a smaller change, or raise the bound".into())
            }
            InsideWorkTree { .. } => Some("unpack the workspace into a directory outside any git repository".into()),
            Changed { .. } | InTheWay { .. } => Some(
                "the job's patch is saved with the job: review it and apply it yourself with `git apply` \
                 (`--3way` merges), or run the job again on the current files"
                    .into(),
            ),
            ApplyFailed { .. } => Some(
                "each file is either its old or its new version; fix the cause, then finish from the job's saved \
                 patch (`git apply --reject` applies what still fits)"
                    .into(),
            ),
            WrongSnapshot | Io { .. } => None,
        }
    }
}
