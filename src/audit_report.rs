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

use crate::audit::{AuditLog, Entry, VerifyReport};
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
fn section(event: &str) -> Option<&'static str> {
    match event {
        e if e.starts_with("consent.") => Some("consent"),
        "job.approved" | "job.denied" => Some("approvals"),
        e if e.starts_with("job.") => Some("jobs"),
        e if e.starts_with("config.") => Some("config"),
        e if e.starts_with("key.") => Some("keys"),
        e if e.starts_with("market.") => Some("market"),
        e if e.starts_with("log.") => Some("log"),
        _ => None,
    }
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
        let count = |ev: &str| events.iter().filter(|e| e.event == ev).count();
        let finished = |e: &&Entry| {
            e.event.starts_with("job.") && !matches!(e.event.as_str(), "job.approved" | "job.denied" | "job.started")
        };
        Summary {
            events: events.len(),
            consent_granted: count("consent.granted"),
            consent_revoked: count("consent.revoked"),
            approvals: count("job.approved"),
            denials: count("job.denied"),
            jobs_started: count("job.started"),
            jobs_finished: events.iter().filter(finished).count(),
            tokens: events.iter().map(tokens_of).sum(),
            config_changes: count("config.changed"),
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
        if let Some(s) = section(&e.event) {
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
