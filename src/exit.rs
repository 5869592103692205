//! Exit codes and the one error type every command returns (DESIGN.md
//! section 3).
//!
//! [`Exit`] is the table of documented codes; `health` and
//! `compliance-check` report [`Exit::Check`] (the Nagios convention) and
//! fall back to the table only for plumbing errors. [`Error`] carries the
//! exit code and hint of its cause, taken when the cause converts through
//! [`HasExit`]; this module must not know any other module's error types.

use std::fmt;

/// A process exit status with a documented meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything worked.
    Ok,
    /// The operation ran and failed (a job failed, an I/O error, ...).
    Failed,
    /// Usage error or invalid input: bad flag, bad value, corrupt config.
    Usage,
    /// Refused by policy: not opted in, cap reached, approval denied.
    Refused,
    /// A dependency is unavailable: Docker engine, market coordinator.
    Unavailable,
    /// Integrity failure: audit chain, ciphertext, signature.
    Integrity,
    /// Stopped by the user (Ctrl-C, SIGTERM) before the work was done.
    Interrupted,
    /// The result of a check command (`health`, `compliance-check`), in the
    /// Nagios convention that monitoring reads.
    Check(Check),
}

/// Nagios plugin states: what `health` and `compliance-check` exit with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl Check {
    pub fn code(self) -> i32 {
        match self {
            Check::Ok => 0,
            Check::Warning => 1,
            Check::Critical => 2,
            Check::Unknown => 3,
        }
    }
}

impl Exit {
    pub fn code(self) -> i32 {
        match self {
            Exit::Ok => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::Refused => 3,
            Exit::Unavailable => 4,
            Exit::Integrity => 5,
            Exit::Interrupted => 130,
            Exit::Check(c) => c.code(),
        }
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
            Exit::Interrupted => "interrupted",
            Exit::Check(Check::Ok) => "ok",
            Exit::Check(Check::Warning) => "warning",
            Exit::Check(Check::Critical) => "critical",
            Exit::Check(Check::Unknown) => "unknown",
        }
    }

    /// `Ok` when `ok`, else `otherwise`.
    pub fn unless(ok: bool, otherwise: Exit) -> Exit {
        if ok {
            Exit::Ok
        } else {
            otherwise
        }
    }
}

/// In JSON an exit status is its code, as the process exits with it.
impl serde::Serialize for Exit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_i32(self.code())
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

/// A failure with a documented exit code and an optional hint: the leaf
/// error for a refusal or bad input that has no error type of its own.
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

/// The one error every command returns. Any error that knows its exit code
/// ([`HasExit`]) converts with `?`, and the code and hint are taken at that
/// moment: there is no list of error types to keep in step by hand.
pub struct Error {
    exit: Exit,
    hint: Option<String>,
    inner: anyhow::Error,
}

/// What every command returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn exit(&self) -> Exit {
        self.exit
    }

    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// Put `message` in front of the error's own text; the exit code and
    /// hint stay those of the cause.
    pub fn context(self, message: impl fmt::Display + Send + Sync + 'static) -> Error {
        Error {
            inner: self.inner.context(message),
            ..self
        }
    }

    /// Replace the exit code, message and hint with `outer`'s, keeping this
    /// error as its cause (shown after it).
    pub fn within(self, outer: Failure) -> Error {
        Error {
            exit: outer.exit,
            hint: outer.hint.clone(),
            inner: self.inner.context(outer),
        }
    }
}

impl<E: HasExit + std::error::Error + Send + Sync + 'static> From<E> for Error {
    fn from(e: E) -> Self {
        Error {
            exit: e.exit(),
            hint: e.hint(),
            inner: anyhow::Error::new(e),
        }
    }
}

impl fmt::Display for Error {
    /// The whole chain, outermost first: `outer: cause: root`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.inner)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({})", self.inner, self.exit)
    }
}

/// Plain I/O at the edge (stdout, a terminal): the operation failed.
impl HasExit for std::io::Error {
    fn exit(&self) -> Exit {
        Exit::Failed
    }
}

impl HasExit for serde_json::Error {
    fn exit(&self) -> Exit {
        Exit::Failed
    }
}

impl HasExit for rusqlite::Error {
    fn exit(&self) -> Exit {
        Exit::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_keeps_the_exit_code_and_hint_of_its_cause() {
        let e: Error = Failure::refused("cap reached").hint("raise it").into();
        let e = e.context("cannot run the job");
        assert_eq!(e.exit(), Exit::Refused);
        assert_eq!(e.hint(), Some("raise it"));
        assert_eq!(e.to_string(), "cannot run the job: cap reached");
        let e = e.within(Failure::new(Exit::Unavailable, "engine gone"));
        assert_eq!(e.exit(), Exit::Unavailable);
        assert_eq!(e.hint(), None);
        assert_eq!(e.to_string(), "engine gone: cannot run the job: cap reached");
    }

    #[test]
    fn codes_are_the_documented_ones() {
        let all = [
            (Exit::Ok, 0),
            (Exit::Failed, 1),
            (Exit::Usage, 2),
            (Exit::Refused, 3),
            (Exit::Unavailable, 4),
            (Exit::Integrity, 5),
            (Exit::Interrupted, 130),
            (Exit::Check(Check::Unknown), 3),
        ];
        for (e, code) in all {
            assert_eq!(e.code(), code, "{e:?}");
        }
    }
}
