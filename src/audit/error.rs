//! What can go wrong with the audit log, and the exit code and hint each
//! failure gets. A leaf: it must not depend on the log's implementation, so
//! that modules the log itself uses (the node's keys) can name its errors.

use std::io;
use std::path::PathBuf;

use crate::exit::{Exit, HasExit};

/// Errors from the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log integrity failure: {0}")]
    Integrity(String),
    #[error("audit log missing: {0}")]
    Missing(String),
    #[error("audit log I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl HasExit for AuditError {
    fn exit(&self) -> Exit {
        match self {
            AuditError::Integrity(_) | AuditError::Missing(_) => Exit::Integrity,
            AuditError::Io { .. } => Exit::Failed,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            AuditError::Integrity(_) => Some(
                "the log was edited, truncated or reordered; keep a copy for investigation and run `claude-max-market audit verify` for details".into(),
            ),
            AuditError::Missing(_) => Some(
                "restore audit.jsonl and audit.head from a backup; to start a new log on purpose (the loss is recorded in it), run `claude-max-market audit restart --yes`".into(),
            ),
            AuditError::Io { .. } => Some("check that the data directory exists and is writable".into()),
        }
    }
}
