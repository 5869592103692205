//! `status`: consent, caps against usage per window with reset times, open
//! reservations and the audit head. Reads a handful of small files; never
//! scans the audit log, so it costs the same with 10 events or 10 million.
//! It only reads: it must not reserve, reclaim or change any state.

use chrono::Local;
use serde::Serialize;

use crate::audit::{AuditLog, Head};
use crate::caps::{Caps, CapsError, Ledger, Snapshot};
use crate::config::Config;
use crate::consent::Consent;
use crate::legal;
use crate::paths::Paths;

/// Everything `status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub consent: ConsentStatus,
    pub caps: Caps,
    pub timeout_seconds: i64,
    pub usage: Snapshot,
    pub audit: AuditStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsentStatus {
    pub accepted: bool,
    pub terms_version: Option<String>,
    pub terms_current: bool,
    pub current_terms_version: &'static str,
    pub accepted_at: Option<String>,
    pub revoked_at: Option<String>,
    pub job_types: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditStatus {
    pub events: u64,
    pub head: Option<Head>,
    /// Set when `audit.head` is unreadable or missing for a non-empty log.
    pub problem: Option<String>,
}

/// Build the status report from the live files.
pub fn read(paths: &Paths, config: &Config) -> Result<StatusReport, CapsError> {
    let consent = Consent::from_config(config);
    let caps = Caps::from_config(config);
    let usage = Ledger::new(paths).snapshot(&caps, Local::now())?;
    let (head, problem) = match AuditLog::new(paths).read_head() {
        Ok(h) => (h, None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(StatusReport {
        consent: ConsentStatus {
            accepted: consent.accepted,
            terms_current: consent.terms_current(),
            terms_version: consent.terms_version.clone(),
            current_terms_version: legal::TERMS_VERSION,
            accepted_at: consent.accepted_at.clone(),
            revoked_at: consent.revoked_at.clone(),
            job_types: if consent.accepted {
                consent.job_types.clone()
            } else {
                vec![]
            },
        },
        timeout_seconds: config.settings().docker.timeout.as_secs() as i64,
        caps,
        usage,
        audit: AuditStatus {
            events: head.as_ref().map(|h| h.seq + 1).unwrap_or(0),
            head,
            problem,
        },
    })
}
