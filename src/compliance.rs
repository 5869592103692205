//! `compliance-check`: the checklist in `compliance-config.json`, each id
//! run as one function over the live install (DESIGN.md section 8).
//!
//! These checks read real state: files, modes, config, the audit chain.
//! They never inspect source code and never claim legal certification.
//! Levels and the permission scan come from [`crate::checks`], the
//! credential kind from [`crate::claude::credentials`]; no check shows or
//! keeps a secret, runs `tokenCommand` or changes state.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audit::AuditLog;
use crate::caps::{Caps, Ledger};
use crate::checks::{loose_permissions, Level};
use crate::claude::credentials::{self, Kind};
use crate::config::Config;
use crate::consent::{Consent, JOB_MARKET};
use crate::fsutil::FileLock;
use crate::legal;
use crate::paths::Paths;

/// The embedded checklist.
pub const EMBEDDED_CHECKLIST: &str = include_str!("../compliance-config.json");

#[derive(Debug, Clone, Deserialize)]
pub struct Checklist {
    pub version: u32,
    pub checks: Vec<CheckDef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckDef {
    pub id: String,
    pub name: String,
    pub description: String,
    pub critical: bool,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub id: String,
    pub name: String,
    pub critical: bool,
    /// OK, WARNING (non-critical failure or advisory) or CRITICAL.
    pub level: Level,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ComplianceReport {
    pub level: Level,
    pub passed: usize,
    pub warnings: usize,
    pub critical: usize,
    pub results: Vec<CheckResult>,
    pub disclaimer: &'static str,
}

pub const DISCLAIMER: &str =
    "These checks describe this install's configuration and state. They are not legal advice and do not certify compliance with any law or provider terms.";

#[derive(Debug, thiserror::Error)]
pub enum ChecklistError {
    #[error("checklist {0} is not valid: {1}")]
    Invalid(String, String),
    #[error("checklist lists `{0}`, which has no implementation in this binary")]
    Unimplemented(String),
}

impl crate::exit::HasExit for ChecklistError {
    fn exit(&self) -> crate::exit::Exit {
        crate::exit::Exit::Usage
    }
    fn hint(&self) -> Option<String> {
        Some("use the embedded checklist (omit --checklist) or remove the unknown id".into())
    }
}

/// Outcome of one check function: level and message. `Fail` is mapped to
/// CRITICAL or WARNING by the check's `critical` flag.
enum Outcome {
    Pass(String),
    Warn(String),
    Fail(String),
}

type CheckFn = fn(&Inputs) -> Outcome;

/// Everything the checks read, loaded once.
struct Inputs<'a> {
    paths: &'a Paths,
    config: Result<Config, String>,
}

/// Every implemented check, by id.
fn registry() -> &'static [(&'static str, CheckFn)] {
    &[
        ("no-credentials-at-rest", no_credentials_at_rest),
        ("consent-current", consent_current),
        ("approval-policy", approval_policy),
        ("caps-enforced", caps_enforced),
        ("audit-chain", audit_chain),
        ("audit-settings", audit_settings),
        ("opt-out-path", opt_out_path),
        ("file-permissions", file_permissions),
        ("container-hardening", container_hardening),
        ("credential-kind-market", credential_kind_market),
        ("egress-restricted", egress_restricted),
    ]
}

pub fn parse_checklist(name: &str, text: &str) -> Result<Checklist, ChecklistError> {
    let list: Checklist =
        serde_json::from_str(text).map_err(|e| ChecklistError::Invalid(name.into(), e.to_string()))?;
    for c in &list.checks {
        if !registry().iter().any(|(id, _)| *id == c.id) {
            return Err(ChecklistError::Unimplemented(c.id.clone()));
        }
    }
    Ok(list)
}

/// Run every check in `list` against the install at `paths`.
pub fn run(paths: &Paths, list: &Checklist) -> Result<ComplianceReport, ChecklistError> {
    let inputs = Inputs {
        paths,
        config: Config::load(paths).map_err(|e| e.to_string()),
    };
    let mut results = Vec::new();
    for c in &list.checks {
        let f = registry()
            .iter()
            .find(|(id, _)| *id == c.id)
            .map(|(_, f)| *f)
            .ok_or_else(|| ChecklistError::Unimplemented(c.id.clone()))?;
        let (level, message) = match f(&inputs) {
            Outcome::Pass(m) => (Level::Ok, m),
            Outcome::Warn(m) => (Level::Warning, m),
            Outcome::Fail(m) if c.critical => (Level::Critical, m),
            Outcome::Fail(m) => (Level::Warning, m),
        };
        results.push(CheckResult {
            id: c.id.clone(),
            name: c.name.clone(),
            critical: c.critical,
            level,
            message,
        });
    }
    let count = |l| results.iter().filter(|r| r.level == l).count();
    Ok(ComplianceReport {
        level: results.iter().map(|r| r.level).max().unwrap_or(Level::Ok),
        passed: count(Level::Ok),
        warnings: count(Level::Warning),
        critical: count(Level::Critical),
        results,
        disclaimer: DISCLAIMER,
    })
}

macro_rules! need_config {
    ($i:expr) => {
        match &$i.config {
            Ok(c) => c,
            Err(e) => return Outcome::Fail(format!("config does not load: {e}")),
        }
    };
}

/// Files that must never hold a credential.
fn state_files(paths: &Paths) -> Vec<PathBuf> {
    let mut v = vec![
        paths.config_file(),
        paths.usage_file(),
        paths.audit_log(),
        paths.audit_head(),
    ];
    for dir in [paths.jobs_dir(), paths.keys_dir(), paths.data_dir.clone()] {
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let p = e.path();
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if p.is_file() && (dir != paths.data_dir || name.starts_with("audit.torn-")) {
                    v.push(p);
                }
            }
        }
    }
    v.retain(|p| p.exists());
    v
}

/// Needles: the generic Anthropic credential prefix plus the live values.
fn credential_needles() -> Vec<(String, Vec<u8>)> {
    let mut n = vec![("an `sk-ant-` credential".to_string(), b"sk-ant-".to_vec())];
    for var in ["CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_API_KEY"] {
        if let Some(v) = std::env::var_os(var) {
            let v = v.to_string_lossy().trim().to_string();
            if v.len() >= 8 {
                n.push((format!("the value of {var}"), v.into_bytes()));
            }
        }
    }
    n
}

fn file_contains(path: &Path, needles: &[(String, Vec<u8>)]) -> std::io::Result<Option<String>> {
    let finders: Vec<_> = needles.iter().map(|(_, n)| memchr::memmem::Finder::new(n)).collect();
    let longest = needles.iter().map(|(_, n)| n.len()).max().unwrap_or(1);
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        carry.extend_from_slice(&buf[..n]);
        for (i, fd) in finders.iter().enumerate() {
            if fd.find(&carry).is_some() {
                return Ok(Some(needles[i].0.clone()));
            }
        }
        // Keep a tail so a needle split across reads is still found.
        let keep = carry.len().min(longest.saturating_sub(1));
        carry.drain(..carry.len() - keep);
    }
}

fn no_credentials_at_rest(i: &Inputs) -> Outcome {
    let needles = credential_needles();
    let files = state_files(i.paths);
    for p in &files {
        match file_contains(p, &needles) {
            Ok(Some(what)) => {
                return Outcome::Fail(format!(
                    "{} contains {what}; remove it and rotate that credential",
                    p.display()
                ))
            }
            Ok(None) => {}
            Err(e) => return Outcome::Fail(format!("cannot read {}: {e}", p.display())),
        }
    }
    Outcome::Pass(format!("{} state files scanned, no credential found", files.len()))
}

fn consent_current(i: &Inputs) -> Outcome {
    let cfg = need_config!(i);
    let c = Consent::from_config(cfg);
    if !c.accepted {
        return Outcome::Pass("not opted in: no job can run until `opt-in`".into());
    }
    if c.terms_current() {
        return Outcome::Pass(format!(
            "accepted terms {} (sha256 {}…) at {}",
            legal::TERMS_VERSION,
            &legal::terms_sha256()[..12],
            c.accepted_at.as_deref().unwrap_or("unknown time")
        ));
    }
    if c.terms_version.as_deref() == Some(legal::TERMS_VERSION) {
        return Outcome::Fail(
            "consent names the current terms version but a different text hash: the record was altered; run `opt-in` again".into(),
        );
    }
    Outcome::Warn(format!(
        "accepted terms {} but current are {}: jobs are refused until you run `opt-in` again",
        c.terms_version.as_deref().unwrap_or("unknown"),
        legal::TERMS_VERSION
    ))
}

fn approval_policy(i: &Inputs) -> Outcome {
    let cfg = need_config!(i);
    if cfg.settings().compliance.require_approval {
        Outcome::Pass("every job needs approval (or explicit --approve-all for that job)".into())
    } else {
        Outcome::Fail("compliance.requireApproval is off: jobs run without asking".into())
    }
}

fn caps_enforced(i: &Inputs) -> Outcome {
    let cfg = need_config!(i);
    let caps = Caps::from_config(cfg);
    if caps.max_tokens_per_task > caps.daily_tokens {
        return Outcome::Fail(format!(
            "limits.maxTokensPerTask ({}) exceeds limits.dailyTokens ({}): no job can reserve its tokens",
            caps.max_tokens_per_task, caps.daily_tokens
        ));
    }
    if let (Some(per), Some(day)) = (caps.max_cost_per_task, caps.daily_cost_usd) {
        if per > day {
            return Outcome::Fail(format!(
                "limits.maxCostPerTask (${per}) exceeds limits.dailyCostUsd (${day}): no job can reserve its budget"
            ));
        }
    }
    if caps.max_tokens_per_task < crate::caps::MIN_USEFUL_TASK_TOKENS {
        return Outcome::Warn(format!(
            "limits.maxTokensPerTask ({}) is below what one Claude Code request uses (~12,000 fresh tokens): every job would be stopped",
            caps.max_tokens_per_task
        ));
    }
    let snap = match Ledger::new(i.paths).snapshot(&caps, chrono::Local::now()) {
        Ok(s) => s,
        Err(e) => return Outcome::Fail(format!("usage state unreadable: {e}")),
    };
    for w in &snap.windows {
        if let Some(cap) = w.task_cap {
            if w.tasks > cap {
                return Outcome::Warn(format!(
                    "{} usage {} tasks is over the cap of {cap} (the cap was lowered after use)",
                    w.window.name(),
                    w.tasks
                ));
            }
        }
        if let Some(cap) = w.token_cap {
            if w.tokens > cap {
                return Outcome::Warn(format!(
                    "{} usage {} tokens is over the cap of {cap}",
                    w.window.name(),
                    w.tokens
                ));
            }
        }
    }
    Outcome::Pass(format!(
        "{} jobs, {} fresh tokens and {} per day; {} tokens, {} turns and {} per job; {} at once; usage within caps",
        caps.daily_tasks,
        caps.daily_tokens,
        caps.daily_cost_usd
            .map(|c| format!("${c:.2}"))
            .unwrap_or_else(|| "no cost cap".into()),
        caps.max_tokens_per_task,
        caps.max_turns_per_task,
        caps.max_cost_per_task
            .map(|c| format!("${c:.2}"))
            .unwrap_or_else(|| "no cost cap".into()),
        caps.concurrent_jobs
    ))
}

fn audit_chain(i: &Inputs) -> Outcome {
    match AuditLog::new(i.paths).verify() {
        Ok(r) if r.ok => Outcome::Pass(format!("{} events verify", r.events)),
        Ok(r) => Outcome::Fail(r.problems.join("; ")),
        Err(e) => Outcome::Fail(e.to_string()),
    }
}

fn audit_settings(i: &Inputs) -> Outcome {
    let cfg = need_config!(i);
    let c = &cfg.settings().compliance;
    let off: Vec<&str> = [
        ("compliance.enableAuditTrail", c.enable_audit_trail),
        ("compliance.logAllActivity", c.log_all_activity),
    ]
    .into_iter()
    .filter(|(_, on)| !on)
    .map(|(k, _)| k)
    .collect();
    if off.is_empty() {
        Outcome::Pass("audit trail on".into())
    } else {
        Outcome::Fail(format!(
            "{} off; the log is still kept (state changes are always recorded), but the setting says otherwise",
            off.join(" and ")
        ))
    }
}

fn opt_out_path(i: &Inputs) -> Outcome {
    let dir = &i.paths.config_dir;
    if !dir.exists() {
        return Outcome::Pass("nothing recorded yet; opt-out has nothing to revoke".into());
    }
    if let Err(e) = tempfile::tempfile_in(dir) {
        return Outcome::Fail(format!(
            "{} is not writable ({e}): opt-out could not be recorded",
            dir.display()
        ));
    }
    match FileLock::exclusive(&i.paths.config_lock()) {
        Ok(_) => Outcome::Pass("config is writable and its lock is free".into()),
        Err(e) => Outcome::Fail(format!("cannot take the config lock: {e}")),
    }
}

fn file_permissions(i: &Inputs) -> Outcome {
    let loose = loose_permissions(i.paths);
    if loose.is_empty() {
        Outcome::Pass("directories 0700, files 0600".into())
    } else {
        Outcome::Fail(format!("{}; fix with chmod go-rwx", loose.join(", ")))
    }
}

/// Build the create request exactly as `execute` does for this config and
/// compare it with the hardening profile.
fn container_hardening(i: &Inputs) -> Outcome {
    use crate::docker::hardening;
    let cfg = need_config!(i);
    let profile = match hardening::profile() {
        Ok(p) => p,
        Err(e) => return Outcome::Fail(e.to_string()),
    };
    let resources = match hardening::Resources::from_config(cfg, profile) {
        Ok(r) => r,
        Err(e) => return Outcome::Fail(format!("{e}: execute would refuse to run")),
    };
    let image = crate::job::default_image(cfg);
    let body = hardening::create_body(profile, &resources, &hardening::Launch::example(&image));
    let bad = hardening::mismatches(profile, &body);
    if bad.is_empty() {
        Outcome::Pass(format!(
            "user {}, read-only rootfs, tmpfs {}, memory = memory-swap = {} MiB, pids {}, cap_drop ALL, no-new-privileges, network {}",
            profile.user,
            {
                let mut m: Vec<&str> = profile.tmpfs.keys().map(String::as_str).collect();
                m.sort();
                m.join(" + ")
            },
            resources.memory >> 20,
            profile.pids_limit,
            resources.network
        ))
    } else {
        Outcome::Fail(format!(
            "the job container request differs from security-config.json in: {}",
            bad.join(", ")
        ))
    }
}

fn credential_kind_market(i: &Inputs) -> Outcome {
    let cfg = need_config!(i);
    let market = Consent::from_config(cfg).allows(JOB_MARKET);
    let kind = credentials::kind(cfg);
    let name = credentials::kind_name(kind);
    if !market {
        return Outcome::Pass(format!("market jobs not enabled (credential kind: {name})"));
    }
    match kind {
        Some(Kind::ApiKey) => {
            Outcome::Pass("market jobs run on an API key, which is licensed for programmatic use".into())
        }
        Some(Kind::OAuth) => Outcome::Warn(format!(
            "market jobs are enabled with a consumer subscription login (OAuth token): Anthropic's terms license \
             Free/Pro/Max credentials for ordinary, individual use and do not let third-party tools route requests \
             through them on behalf of other users, so `advertise` serves only your own nodes ({} listed in \
             `market.ownNodes` or imported with `keys import --own`) and declines every other task; there is no \
             override. Use an API key (`credentials.source=api-key-env`) to serve others",
            crate::market::provider::own_nodes(i.paths, cfg).len()
        )),
        _ => Outcome::Warn(format!(
            "market jobs are enabled and the credential kind is {name}: if it turns out to be a consumer subscription \
             login, `advertise` serves only your own nodes (`market.ownNodes`, `keys import --own`)"
        )),
    }
}

/// Egress: the request `execute` would send gives the container no network
/// and no way out but the relay to its proxy, and the relay's directory is
/// usable.
fn egress_restricted(i: &Inputs) -> Outcome {
    use crate::docker::{egress, hardening};
    let cfg = need_config!(i);
    if !egress::restricted(cfg) {
        return Outcome::Warn(format!(
            "docker.egress is `open`: job containers use network `{}` and can reach any host, not only the Claude API; set `docker.egress=restricted`",
            cfg.settings().docker.network
        ));
    }
    let (profile, e) = match (hardening::profile(), egress::profile()) {
        (Ok(p), Ok(e)) => (p, e),
        (Err(err), _) | (_, Err(err)) => return Outcome::Fail(err.to_string()),
    };
    let mut resources = match hardening::Resources::from_config(cfg, profile) {
        Ok(r) => r,
        Err(err) => return Outcome::Fail(format!("{err}: execute would refuse to run")),
    };
    // The socket and copy paths are chosen when a job starts; placeholders
    // show the shape.
    resources.relay = Some(hardening::example_relay(e));
    let image = crate::job::default_image(cfg);
    let body = hardening::create_body(profile, &resources, &hardening::Launch::example(&image));
    let bad = hardening::egress_mismatches(e, &body);
    if !bad.is_empty() {
        return Outcome::Fail(format!(
            "the job container request is not restricted: {}",
            bad.join(", ")
        ));
    }
    let allow = e.allowlist(credentials::kind_name(credentials::kind(cfg))).join(", ");
    match crate::docker::relay::base_dir() {
        Ok(dir) => Outcome::Pass(format!(
            "no network (mode `none`, IPv6 off); the only way out is the relay on {} to the job's own proxy (socket under {}), which allows {allow}",
            e.relay_listen,
            dir.display()
        )),
        Err(err) => Outcome::Fail(format!("{err}: execute would refuse to run")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_checklist_is_fully_implemented() {
        let list = parse_checklist("embedded", EMBEDDED_CHECKLIST).unwrap();
        assert_eq!(list.checks.len(), registry().len());
    }
}
