//! `audit` (no subcommand): the audit report, built from the log, its chain
//! walk and the compliance checks.
//!
//! Owns which events belong to which section and what the summary counts.
//! It reads the log and never writes to it; rendering (text, JSON, CSV)
//! is the command's.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::audit::{AuditLog, Entry, Event, VerifyReport};
use crate::compliance::{self, ComplianceReport};
use crate::exit::Result;
use crate::paths::Paths;

/// The report's sections, in display order: (key, title).
pub const SECTIONS: &[(&str, &str)] = &[
    ("consent", "Consent history"),
    ("approvals", "Approvals and denials"),
    ("jobs", "Jobs"),
    ("config", "Config changes"),
    ("keys", "Keys"),
    ("market", "Market"),
    ("log", "Log"),
];

/// Which section an event belongs to, if any.
fn section(event: Event) -> Option<&'static str> {
    use Event::*;
    Some(match event {
        ConsentGranted | ConsentRevoked | ConsentJobsStopped => "consent",
        JobApproved | JobDenied => "approvals",
        JobStarted | JobCompleted | JobFailed | JobKilled | JobCancelled => "jobs",
        ConfigChanged => "config",
        KeyCreated | KeyRotated | KeyRemoved | KeyImported => "keys",
        e if e.name().starts_with("market.") => "market",
        LogGenesis | LogRecovered => "log",
        _ => return None,
    })
}

/// The counts at the top of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub events: usize,
    pub consent_granted: usize,
    pub consent_revoked: usize,
    pub approvals: usize,
    pub denials: usize,
    pub jobs_started: usize,
    pub jobs_finished: usize,
    pub tokens: u64,
    pub config_changes: usize,
}

impl Summary {
    fn of(events: &[Entry]) -> Summary {
        let count = |ev: Event| events.iter().filter(|e| e.kind() == Some(ev)).count();
        let finished = |e: &&Entry| e.kind().is_some_and(Event::is_job_end);
        Summary {
            events: events.len(),
            consent_granted: count(Event::ConsentGranted),
            consent_revoked: count(Event::ConsentRevoked),
            approvals: count(Event::JobApproved),
            denials: count(Event::JobDenied),
            jobs_started: count(Event::JobStarted),
            jobs_finished: events.iter().filter(finished).count(),
            tokens: events.iter().map(tokens_of).sum(),
            config_changes: count(Event::ConfigChanged),
        }
    }
}

fn tokens_of(e: &Entry) -> u64 {
    e.raw
        .get("usage")
        .and_then(|u| u.get("total_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct Report {
    pub generated_at: DateTime<Utc>,
    pub since: Option<DateTime<Utc>>,
    pub summary: Summary,
    /// Section key -> its events, oldest first.
    pub sections: BTreeMap<&'static str, Vec<Entry>>,
    pub chain: VerifyReport,
    pub compliance: ComplianceReport,
}

/// Build the report over the events at or after `since`.
pub fn build(paths: &Paths, since: Option<DateTime<Utc>>) -> Result<Report> {
    let log = AuditLog::new(paths);
    let chain = log.verify()?;
    let checklist = compliance::parse_checklist("embedded", compliance::EMBEDDED_CHECKLIST)?;
    let compliance = compliance::run(paths, &checklist)?;
    let events: Vec<Entry> = log
        .entries()?
        .filter(|e| since.is_none_or(|s| DateTime::parse_from_rfc3339(&e.ts).is_ok_and(|t| t >= s)))
        .collect();
    let summary = Summary::of(&events);
    let mut sections: BTreeMap<&'static str, Vec<Entry>> = BTreeMap::new();
    for e in events {
        if let Some(s) = e.kind().and_then(section) {
            sections.entry(s).or_default().push(e);
        }
    }
    Ok(Report {
        generated_at: Utc::now(),
        since,
        summary,
        sections,
        chain,
        compliance,
    })
}
