//! What `health` and `compliance-check` share: the Nagios result levels and
//! the scan for state files and directories wider than private.
//!
//! Neutral ground for both commands, so neither depends on the other. It
//! only reads file modes; it must not decide any check's outcome or change
//! a file.

use crate::exit::{Check, Exit};
use std::fs;

use serde::Serialize;

use crate::fsutil;
use crate::paths::Paths;

/// Nagios result levels, ordered by severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl Level {
    /// The process exit status that reports this level.
    pub fn exit(self) -> Exit {
        Exit::Check(match self {
            Level::Ok => Check::Ok,
            Level::Warning => Check::Warning,
            Level::Critical => Check::Critical,
            Level::Unknown => Check::Unknown,
        })
    }

    pub fn code(self) -> i32 {
        self.exit().code()
    }
    pub fn name(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warning => "WARNING",
            Level::Critical => "CRITICAL",
            Level::Unknown => "UNKNOWN",
        }
    }
}

/// Files and directories wider than 0600 / 0700 (group or other bits set).
pub fn loose_permissions(paths: &Paths) -> Vec<String> {
    let mut loose = Vec::new();
    for (p, is_dir) in paths.private_entries() {
        if let Some(mode) = fsutil::mode_of(&p) {
            if mode & 0o077 != 0 {
                let want = if is_dir { "0700" } else { "0600" };
                loose.push(format!("{} is {:04o} (want {want})", p.display(), mode));
            }
        }
    }
    if let Ok(rd) = fs::read_dir(paths.keys_dir()) {
        for e in rd.flatten() {
            if let Some(mode) = fsutil::mode_of(&e.path()) {
                if mode & 0o077 != 0 && e.path().is_file() {
                    loose.push(format!("{} is {:04o} (want 0600)", e.path().display(), mode));
                }
            }
        }
    }
    loose
}
