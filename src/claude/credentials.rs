//! Where the Claude credential comes from, read at run time and never stored.
//!
//! Sources (config `credentials.source`): `oauth-env` (`CLAUDE_CODE_OAUTH_TOKEN`),
//! `api-key-env` (`ANTHROPIC_API_KEY`), `command` (`credentials.tokenCommand`'s
//! stdout), `file` (`credentials.tokenFile`, refused unless private), or `auto`:
//! `CLAUDE_CODE_OAUTH_TOKEN`, then the configured file / command, then
//! `ANTHROPIC_API_KEY`. A stray `ANTHROPIC_API_KEY` in the shell therefore never
//! overrides a subscription login the user chose; we say so when both exist.
//!
//! This is the only place that decides which source is used and what kind of
//! login it is ([`choose`], [`kind`]): the job, `compliance-check`, `health`
//! and `advertise` all ask here. Nothing here prints, logs or stores a
//! secret, and no check runs `tokenCommand`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::Config;
use crate::exit::{Exit, HasExit};

pub const OAUTH_ENV: &str = "CLAUDE_CODE_OAUTH_TOKEN";
pub const API_KEY_ENV: &str = "ANTHROPIC_API_KEY";

/// What kind of login a credential is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Claude subscription login (`claude setup-token`, `sk-ant-oat...`).
    OAuth,
    /// An Anthropic API key.
    ApiKey,
    /// Could not be told (the container's entrypoint treats it as an API key).
    Unknown,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::OAuth => "subscription",
            Kind::ApiKey => "api-key",
            Kind::Unknown => "unknown",
        }
    }

    /// Tell the kind from the token's documented prefix.
    pub fn sniff(token: &str) -> Kind {
        if token.starts_with("sk-ant-oat") {
            Kind::OAuth
        } else if token.starts_with("sk-ant-api") {
            Kind::ApiKey
        } else {
            Kind::Unknown
        }
    }
}

/// A resolved credential. `Debug` and `Display` never show the secret.
pub struct Credential {
    secret: String,
    pub kind: Kind,
    /// Which source produced it, for messages (`CLAUDE_CODE_OAUTH_TOKEN`, `tokenFile`, ...).
    pub source: &'static str,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Drop for Credential {
    fn drop(&mut self) {
        // Best effort: overwrite the bytes before the allocation is freed.
        let mut bytes = std::mem::take(&mut self.secret).into_bytes();
        bytes.fill(0);
        std::hint::black_box(&bytes);
    }
}

impl Credential {
    fn new(secret: String, kind: Kind, source: &'static str) -> Result<Credential, CredentialError> {
        let secret = secret.trim().to_string();
        if secret.is_empty() {
            return Err(CredentialError::Empty(source));
        }
        if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(CredentialError::Malformed(source));
        }
        let kind = if kind == Kind::Unknown {
            Kind::sniff(&secret)
        } else {
            kind
        };
        Ok(Credential { secret, kind, source })
    }

    /// Line 1 of the container's stdin (see `docker/entrypoint.sh`): the kind
    /// prefix `oauth:` / `api-key:` when known, then the token, then `\n`.
    pub fn stdin_line(&self) -> Vec<u8> {
        let prefix = match self.kind {
            Kind::OAuth => "oauth:",
            Kind::ApiKey => "api-key:",
            Kind::Unknown => "",
        };
        let mut line = Vec::with_capacity(prefix.len() + self.secret.len() + 1);
        line.extend_from_slice(prefix.as_bytes());
        line.extend_from_slice(self.secret.as_bytes());
        line.push(b'\n');
        line
    }

    /// The raw secret, for callers that must compare it (tests, leak checks).
    pub fn expose(&self) -> &str {
        &self.secret
    }
}

/// The longest credential read from `credentials.tokenFile` or printed by
/// `credentials.tokenCommand`: 64 KiB (tokens are a few hundred bytes).
pub const MAX_CREDENTIAL_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("no Claude credential found (tried: {})", .0.join("; "))]
    NotFound(Vec<String>),
    #[error("the credential from {0} is empty")]
    Empty(&'static str),
    #[error("the credential from {0} contains whitespace or control characters")]
    Malformed(&'static str),
    #[error("credentials.tokenFile {path} is mode {mode:04o}; it must be private (0600)")]
    FileMode { path: PathBuf, mode: u32 },
    #[error("cannot read credentials.tokenFile {path}: {source}")]
    FileRead { path: PathBuf, source: std::io::Error },
    #[error("credentials.tokenCommand failed: {0}")]
    Command(String),
    #[error("the credential from {0} is over {max} bytes; no credential is that long", max = MAX_CREDENTIAL_BYTES)]
    TooLarge(&'static str),
    #[error("credentials.source is `{0}` but {1} is not set")]
    Unconfigured(String, &'static str),
}

impl HasExit for CredentialError {
    fn exit(&self) -> Exit {
        match self {
            CredentialError::FileRead { .. } | CredentialError::Command(_) => Exit::Failed,
            _ => Exit::Usage,
        }
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            CredentialError::NotFound(_) => format!(
                "export {OAUTH_ENV} (from `claude setup-token`) or {API_KEY_ENV}, or set `credentials.tokenFile` / `credentials.tokenCommand` with `claude-max-market config --set`"
            ),
            CredentialError::FileMode { path, .. } => format!("run `chmod 600 {}`", path.display()),
            CredentialError::Unconfigured(..) => {
                "set it, or choose another source with `claude-max-market config --set credentials.source=auto`".into()
            }
            _ => "check the credential source in `claude-max-market config --list`".into(),
        })
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Which source [`resolve`] takes the credential from. Decided from the
/// config and the environment alone: nothing is read or run to decide it,
/// and it holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    OAuthEnv,
    ApiKeyEnv,
    File(PathBuf),
    Command(String),
}

/// The one order every caller follows: the configured source, or for
/// `auto` `CLAUDE_CODE_OAUTH_TOKEN`, then `credentials.tokenFile`, then
/// `credentials.tokenCommand`, then `ANTHROPIC_API_KEY`.
pub fn choose(cfg: &Config) -> Result<Choice, CredentialError> {
    let c = &cfg.settings().credentials;
    let source = c.source.as_str();
    let unconfigured = |what| CredentialError::Unconfigured(source.into(), what);
    match source {
        "oauth-env" => env(OAUTH_ENV).map(|_| Choice::OAuthEnv).ok_or(unconfigured(OAUTH_ENV)),
        "api-key-env" => env(API_KEY_ENV)
            .map(|_| Choice::ApiKeyEnv)
            .ok_or(unconfigured(API_KEY_ENV)),
        "file" => c
            .token_file
            .clone()
            .map(Choice::File)
            .ok_or(unconfigured("credentials.tokenFile")),
        "command" => c
            .token_command
            .clone()
            .map(Choice::Command)
            .ok_or(unconfigured("credentials.tokenCommand")),
        _ => {
            if env(OAUTH_ENV).is_some() {
                Ok(Choice::OAuthEnv)
            } else if let Some(p) = &c.token_file {
                Ok(Choice::File(p.clone()))
            } else if let Some(cmd) = &c.token_command {
                Ok(Choice::Command(cmd.clone()))
            } else if env(API_KEY_ENV).is_some() {
                Ok(Choice::ApiKeyEnv)
            } else {
                Err(CredentialError::NotFound(vec![
                    format!("{OAUTH_ENV} (not set)"),
                    "credentials.tokenFile (not configured)".into(),
                    "credentials.tokenCommand (not configured)".into(),
                    format!("{API_KEY_ENV} (not set)"),
                ]))
            }
        }
    }
}

fn from_env(name: &'static str, kind: Kind) -> Result<Credential, CredentialError> {
    Credential::new(env(name).unwrap_or_default(), kind, name)
}

/// Resolve the credential. `notes` receives things the user should know
/// (e.g. an ignored `ANTHROPIC_API_KEY`); they never contain the secret.
pub fn resolve(cfg: &Config, notes: &mut Vec<String>) -> Result<Credential, CredentialError> {
    let credential = match choose(cfg)? {
        Choice::OAuthEnv => from_env(OAUTH_ENV, Kind::OAuth),
        Choice::ApiKeyEnv => from_env(API_KEY_ENV, Kind::ApiKey),
        Choice::File(p) => read_file(&p),
        Choice::Command(c) => run_command(&c),
    }?;
    let auto = !matches!(
        cfg.settings().credentials.source.as_str(),
        "oauth-env" | "api-key-env" | "file" | "command"
    );
    if auto && credential.kind != Kind::ApiKey && env(API_KEY_ENV).is_some() {
        notes.push(format!(
            "{API_KEY_ENV} is set but was ignored in favour of your subscription login; set `credentials.source=api-key-env` to use it"
        ));
    }
    Ok(credential)
}

/// The kind of login [`resolve`] would return, decided in its order, for
/// checks (`compliance-check`, `health`, `advertise`). A token file is read
/// to tell its prefix and dropped (never shown or kept); `tokenCommand` is
/// never run for a check, so it is `Unknown`. `None`: no source at all.
pub fn kind(cfg: &Config) -> Option<Kind> {
    match choose(cfg) {
        Ok(Choice::OAuthEnv) => Some(Kind::OAuth),
        Ok(Choice::ApiKeyEnv) => Some(Kind::ApiKey),
        Ok(Choice::File(p)) => Some(read_file(&p).map_or(Kind::Unknown, |c| c.kind)),
        Ok(Choice::Command(_)) => Some(Kind::Unknown),
        Err(CredentialError::NotFound(_)) => None,
        // An explicit source that is not set: the kind it names.
        Err(_) => Some(match cfg.settings().credentials.source.as_str() {
            "oauth-env" => Kind::OAuth,
            "api-key-env" => Kind::ApiKey,
            _ => Kind::Unknown,
        }),
    }
}

/// A [`kind`] as checks and allowlists name it: `subscription`,
/// `api-key`, `unknown`, or `none`.
pub fn kind_name(kind: Option<Kind>) -> &'static str {
    kind.map_or("none", Kind::name)
}

/// Is a credential resolvable, without running `tokenCommand` or reading
/// any secret? For `health`: `Ok(description)` or `Err(what is missing)`.
pub fn describe(cfg: &Config) -> Result<String, String> {
    match choose(cfg) {
        Ok(Choice::OAuthEnv) => Ok(format!("{OAUTH_ENV} set")),
        Ok(Choice::ApiKeyEnv) => Ok(format!("{API_KEY_ENV} set")),
        Ok(Choice::File(p)) => match crate::fsutil::mode_of(&p) {
            None => Err(format!("credentials.tokenFile {} does not exist", p.display())),
            Some(m) if m & 0o077 != 0 => Err(format!(
                "credentials.tokenFile {} is mode {m:04o} (want 0600)",
                p.display()
            )),
            Some(_) => Ok(format!("credentials.tokenFile {} present", p.display())),
        },
        Ok(Choice::Command(_)) => Ok("credentials.tokenCommand configured".into()),
        Err(CredentialError::Unconfigured(source, what)) if what == OAUTH_ENV || what == API_KEY_ENV => {
            Err(format!("{what} is not set (credentials.source={source})"))
        }
        Err(CredentialError::Unconfigured(source, what)) => {
            Err(format!("credentials.source={source} but {what} is not set"))
        }
        Err(_) => Err(format!(
            "none found (tried {OAUTH_ENV}, credentials.tokenFile, credentials.tokenCommand, {API_KEY_ENV})"
        )),
    }
}

fn read_file(path: &Path) -> Result<Credential, CredentialError> {
    let meta = std::fs::metadata(path).map_err(|source| CredentialError::FileRead {
        path: path.to_path_buf(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CredentialError::FileMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let read_err = |source| CredentialError::FileRead {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let bytes = match crate::fsutil::read_capped(file, MAX_CREDENTIAL_BYTES) {
        Ok(b) => b,
        Err(crate::fsutil::ReadCapError::TooLarge { .. }) => {
            return Err(CredentialError::TooLarge("credentials.tokenFile"))
        }
        Err(crate::fsutil::ReadCapError::Io(e)) => return Err(read_err(e)),
    };
    let text = String::from_utf8(bytes).map_err(|_| CredentialError::Malformed("credentials.tokenFile"))?;
    Credential::new(text, Kind::Unknown, "credentials.tokenFile")
}

fn run_command(command: &str) -> Result<Credential, CredentialError> {
    // The user's own command, run through their shell; its stderr stays
    // visible so a password prompt or error reaches them.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CredentialError::Command(format!("cannot run `sh -c`: {e}")))?;
    // Read through a cap: a command that prints without end is stopped.
    let stdout = child.stdout.take().expect("stdout is piped");
    let read = crate::fsutil::read_capped(stdout, MAX_CREDENTIAL_BYTES);
    if read.is_err() {
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| CredentialError::Command(format!("cannot wait for `sh -c`: {e}")))?;
    let bytes = match read {
        Ok(b) => b,
        Err(crate::fsutil::ReadCapError::TooLarge { .. }) => {
            return Err(CredentialError::TooLarge("credentials.tokenCommand"))
        }
        Err(crate::fsutil::ReadCapError::Io(e)) => {
            return Err(CredentialError::Command(format!("cannot read its output: {e}")))
        }
    };
    if !status.success() {
        return Err(CredentialError::Command(format!("it exited with {status}")));
    }
    let text = String::from_utf8(bytes).map_err(|_| CredentialError::Command("its output is not UTF-8".into()))?;
    Credential::new(text, Kind::Unknown, "credentials.tokenCommand")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_line_carries_kind_and_debug_hides_secret() {
        let c = Credential::new("sk-ant-oat01-abc\n".into(), Kind::Unknown, "x").unwrap();
        assert_eq!(c.kind, Kind::OAuth);
        assert_eq!(c.stdin_line(), b"oauth:sk-ant-oat01-abc\n");
        assert!(!format!("{c:?}").contains("abc"));
        assert!(Credential::new("a b".into(), Kind::ApiKey, "x").is_err());
        assert!(Credential::new("  ".into(), Kind::ApiKey, "x").is_err());
    }
}
