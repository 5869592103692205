//! Consent: what the user accepted, when, and for which job types.
//!
//! Stored in the `consent` section of `config.json` (written only by
//! `opt-in` / `opt-out`, atomically under the config lock) and mirrored as
//! audit events, so the log carries the full history while the config holds
//! the current state.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{self, Config, ConfigError};
use crate::exit::{Exit, Failure};
use crate::legal;
use crate::paths::Paths;

/// Job types a user can consent to.
pub const JOB_LOCAL: &str = "local";
/// Claude-backed jobs from the market (`opt-in --claude-jobs`).
pub const JOB_MARKET: &str = "claude-market";

/// The stored consent record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Consent {
    pub accepted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<String>,
    #[serde(default)]
    pub job_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

impl Consent {
    /// Read from a loaded config (absent or malformed section = no consent).
    pub fn from_config(cfg: &Config) -> Consent {
        cfg.record("consent")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default()
    }

    /// Accepted the terms that this binary ships (same version and hash).
    pub fn terms_current(&self) -> bool {
        self.terms_version.as_deref() == Some(legal::TERMS_VERSION)
            && self.terms_sha256.as_deref() == Some(legal::terms_sha256().as_str())
    }

    pub fn allows(&self, job_type: &str) -> bool {
        self.accepted && self.job_types.iter().any(|t| t == job_type)
    }

    /// Refuse (exit 3) unless consent covers `job_type` under current terms.
    pub fn require(&self, job_type: &str) -> Result<(), Failure> {
        if !self.accepted {
            return Err(Failure::refused("not opted in: no job runs before you consent")
                .hint("read the terms with `claude-max-market terms`, then run `claude-max-market opt-in`"));
        }
        if !self.terms_current() {
            return Err(Failure::refused(format!(
                "the terms changed since you accepted them (you accepted version {}, current is {})",
                self.terms_version.as_deref().unwrap_or("unknown"),
                legal::TERMS_VERSION
            ))
            .hint("review them with `claude-max-market terms` and accept again with `claude-max-market opt-in`"));
        }
        if !self.allows(job_type) {
            let hint = if job_type == JOB_MARKET {
                "opt in to market jobs with `claude-max-market opt-in --claude-jobs`"
            } else {
                "run `claude-max-market opt-in` to allow this kind of job"
            };
            return Err(
                Failure::new(Exit::Refused, format!("your consent does not cover `{job_type}` jobs")).hint(hint),
            );
        }
        Ok(())
    }
}

/// Write the consent record (the caller audits it).
pub fn store(paths: &Paths, consent: &Consent) -> Result<(), ConfigError> {
    let value = serde_json::to_value(consent).expect("consent serialises");
    config::edit(paths, |file| {
        file.insert("consent".into(), value);
        Ok(())
    })
}

/// Put the consent record and cap values into a config file object;
/// returns the cap changes (for the caller's audit event).
pub fn set_with_caps(
    file: &mut serde_json::Map<String, Value>,
    consent: &Consent,
    caps: &[(&str, Value)],
) -> Vec<config::Change> {
    let mut changes = Vec::new();
    for (key, v) in caps {
        let old = config::set_in(file, key, Some(v.clone()));
        if old.as_ref() != Some(v) {
            changes.push((key.to_string(), old, Some(v.clone())));
        }
    }
    file.insert(
        "consent".into(),
        serde_json::to_value(consent).expect("consent serialises"),
    );
    changes
}
