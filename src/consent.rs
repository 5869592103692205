//! Consent: what the user accepted, when, and for which job types.
//!
//! Stored in the `consent` section of `config.json` (written only by
//! `opt-in` / `opt-out`, atomically under the config lock) and mirrored as
//! audit events, so the log carries the full history while the config holds
//! the current state.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::audit::Event;
use crate::config::{self, Config, ConfigError};
use crate::exit::{Exit, Failure, HasExit};
use crate::legal;
use crate::paths::Paths;
use crate::txn::TxnError;

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

/// What `opt-in` asks for: the job types beyond local ones, and caps to set
/// in the same write.
#[derive(Debug, Clone, Default)]
pub struct GrantOptions {
    /// Also allow Claude-backed market jobs.
    pub market_jobs: bool,
    /// Cap keys and their (validated) values.
    pub caps: Vec<(&'static str, Value)>,
    /// The terms were shown and accepted on a terminal (not `--accept-terms`).
    pub interactive: bool,
}

/// The caps in force after a grant.
#[derive(Debug, Clone, Serialize)]
pub struct CapsNow {
    #[serde(rename = "dailyTasks")]
    pub daily_tasks: u64,
    #[serde(rename = "maxTokensPerTask")]
    pub max_tokens_per_task: u64,
}

impl CapsNow {
    fn of(cfg: &Config) -> CapsNow {
        let l = &cfg.settings().limits;
        CapsNow {
            daily_tasks: l.daily_tasks,
            max_tokens_per_task: l.max_tokens_per_task,
        }
    }
}

/// The outcome of [`grant`].
#[derive(Debug, Clone, Serialize)]
pub struct Granted {
    pub consent: Consent,
    pub caps: CapsNow,
}

/// Record consent to the current terms (and the caps given), audited
/// write-ahead as `consent.granted`: a crash cannot leave consent stored but
/// unrecorded.
pub fn grant(paths: &Paths, opts: GrantOptions) -> Result<Granted, TxnError> {
    let mut job_types = vec![JOB_LOCAL.to_string()];
    if opts.market_jobs {
        job_types.push(JOB_MARKET.to_string());
    }
    let record = Consent {
        accepted: true,
        terms_version: Some(legal::TERMS_VERSION.into()),
        terms_sha256: Some(legal::terms_sha256()),
        accepted_at: Some(now_rfc3339()),
        job_types: job_types.clone(),
        revoked_at: None,
    };
    crate::audit::AuditLog::new(paths).recover()?;
    crate::txn::edit_audited(
        paths,
        |file| Ok(set_with_caps(file, &record, &opts.caps)),
        |p| {
            let cfg = Config::from_file_object(paths, p.file.clone())?;
            Ok(vec![(
                Event::ConsentGranted,
                json!({
                    "terms_version": legal::TERMS_VERSION,
                    "terms_sha256": legal::terms_sha256(),
                    "job_types": job_types,
                    "caps": CapsNow::of(&cfg),
                    "interactive": opts.interactive,
                    "changes": p.out.iter().map(|(k, o, n)| json!({"key": k, "old": o, "new": n})).collect::<Vec<_>>(),
                }),
            )])
        },
    )?;
    let cfg = Config::load(paths)?;
    Ok(Granted {
        consent: record,
        caps: CapsNow::of(&cfg),
    })
}

/// The outcome of [`revoke`].
#[derive(Debug)]
pub enum Revocation {
    /// There was no consent to revoke.
    NotOptedIn(Consent),
    /// Consent is revoked; this install's job containers were stopped
    /// (how many), or could not be checked (why).
    Revoked {
        consent: Consent,
        stopped: Result<usize, String>,
    },
}

/// Consent was revoked and containers stopped, but the audit log could not
/// record it.
#[derive(Debug, thiserror::Error)]
#[error("consent was revoked, but the audit log could not record it: {0}")]
pub struct Unrecorded(#[source] pub TxnError);

impl HasExit for Unrecorded {
    fn exit(&self) -> Exit {
        self.0.exit()
    }
    fn hint(&self) -> Option<String> {
        self.0.hint()
    }
}

/// Why [`revoke`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// Nothing changed: the config could not be read or written.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Consent is revoked all the same (invariant 2), but not recorded.
    #[error(transparent)]
    Unrecorded(#[from] Unrecorded),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

impl HasExit for RevokeError {
    fn exit(&self) -> Exit {
        match self {
            RevokeError::Config(e) => e.exit(),
            RevokeError::Unrecorded(e) => e.exit(),
            RevokeError::Audit(e) => e.exit(),
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            RevokeError::Config(e) => e.hint(),
            RevokeError::Unrecorded(e) => e.hint(),
            RevokeError::Audit(e) => e.hint(),
        }
    }
}

/// Revoke consent at once (DESIGN.md invariant 2): no new job starts, then
/// this install's running job containers are stopped and removed. Logged
/// write-ahead as `consent.revoked`; a broken audit log does not keep
/// consent alive: the revocation is stored and containers are stopped
/// anyway, and the failure to record it is the error returned.
pub fn revoke(paths: &Paths) -> Result<Revocation, RevokeError> {
    let current = Consent::from_config(&Config::load(paths)?);
    if !current.accepted {
        return Ok(Revocation::NotOptedIn(current));
    }
    let scope = crate::docker::container::Scope::this_install(paths);
    let revoked = Consent {
        accepted: false,
        job_types: vec![],
        revoked_at: Some(now_rfc3339()),
        ..current.clone()
    };
    let event = json!({
        "terms_version": current.terms_version,
        "job_types": current.job_types,
    });
    let recorded = crate::txn::edit_audited(
        paths,
        |file| {
            file.insert(
                "consent".into(),
                serde_json::to_value(&revoked).expect("consent serialises"),
            );
            Ok(())
        },
        |_| Ok(vec![(Event::ConsentRevoked, event.clone())]),
    );
    match recorded {
        Err(TxnError::Config(e)) => return Err(e.into()),
        Err(_) => store(paths, &revoked)?,
        Ok(()) => {}
    }
    // Consent is revoked first, so no new job starts; stopping is always
    // allowed, even when the log is broken.
    let stopped = crate::docker::clean::stop_jobs_blocking(&scope).map_err(|e| e.to_string());
    recorded.map_err(Unrecorded)?;
    if let Ok(n) = stopped {
        if n > 0 {
            crate::audit::AuditLog::new(paths).append(Event::ConsentJobsStopped, json!({ "containers_stopped": n }))?;
        }
    }
    Ok(Revocation::Revoked {
        consent: revoked,
        stopped,
    })
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
