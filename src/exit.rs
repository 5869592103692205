//! Exit codes: one table, used by every command (DESIGN.md section 3).
//!
//! `health` and `compliance-check` speak the Nagios convention instead; they
//! map their own results and only fall back to this table for plumbing errors.

use std::fmt;

/// A process exit status with a documented meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything worked.
    Ok = 0,
    /// The operation ran and failed (a job failed, an I/O error, ...).
    Failed = 1,
    /// Usage error or invalid input: bad flag, bad value, corrupt config.
    Usage = 2,
    /// Refused by policy: not opted in, cap reached, approval denied.
    Refused = 3,
    /// A dependency is unavailable: Docker engine, market coordinator.
    Unavailable = 4,
    /// Integrity failure: audit chain, ciphertext, signature.
    Integrity = 5,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// Stable machine name used in `--json` error documents.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::Failed => "failed",
            Exit::Usage => "usage",
            Exit::Refused => "refused",
            Exit::Unavailable => "unavailable",
            Exit::Integrity => "integrity",
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.name())
    }
}

/// Errors that know which exit code they deserve.
pub trait HasExit {
    fn exit(&self) -> Exit;
    /// What the user can do about it, if there is something to say.
    fn hint(&self) -> Option<String> {
        None
    }
}

/// A user-facing failure raised at the CLI edge: message, exit code and a hint.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
    pub hint: Option<String>,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Exit::Usage, message)
    }

    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(Exit::Refused, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl HasExit for Failure {
    fn exit(&self) -> Exit {
        self.exit
    }
    fn hint(&self) -> Option<String> {
        self.hint.clone()
    }
}
