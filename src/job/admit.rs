//! Stages 1-3 of a job: consent, caps (reserved under the ledger lock) and
//! approval, after the job's own limits and workspace are checked. Nothing
//! has started when this returns; every way out before the start releases
//! the reservation (it is a [`HeldReservation`]), and the two that end in a
//! decision (denied here, abandoned before the start) audit it in one place
//! each. This stage must not read the credential or touch a container.

use std::io;
use std::sync::Arc;

use chrono::Local;
use serde_json::{json, Value};

use super::{joined, new_job_id, Approval, ApprovedBy, Cancel, JobError, JobEvent, JobSource, JobSpec, Progress};
use crate::audit::{AuditLog, Event};
use crate::caps::{usd_to_micros, Budget, Caps, HeldReservation, Ledger};
use crate::config::{Config, PERMISSION_MODES};
use crate::consent::Consent;
use crate::docker::hardening::{self, Profile, Resources};
use crate::docker::{image, DockerError};
use crate::paths::Paths;
use crate::workspace::Snapshot;

/// The engine connection and whether the image is there, asked for while
/// the caps are reserved.
pub(super) type EngineProbe = tokio::task::JoinHandle<Result<(bollard::Docker, bool), DockerError>>;

/// A job that may start.
pub(super) struct Admitted {
    pub spec: JobSpec,
    pub job_id: String,
    pub guard: HeldReservation,
    /// The `job.approved` fields, audited together with the start.
    pub approved: Value,
    /// This install's id (the audit log's id), for the container's label.
    pub install_id: String,
    pub profile: &'static Profile,
    pub resources: Resources,
    pub engine: Option<EngineProbe>,
    /// The workspace as selected before anything ran.
    pub snapshot: Option<Arc<Snapshot>>,
    /// `docker.workspaceLimit`: the selection's limit and the tmpfs size.
    pub workspace_limit: u64,
}

/// The job's own limits, checked against the caps before anything runs.
fn validate(spec: &JobSpec, caps: &Caps) -> Result<(), JobError> {
    let bad = |m: String| Err(JobError::Invalid(m));
    if spec.prompt.len() > super::MAX_PROMPT_BYTES {
        return bad(format!(
            "the prompt is {} bytes; a job takes at most {} bytes ({})",
            spec.prompt.len(),
            super::MAX_PROMPT_BYTES,
            crate::fsutil::human_bytes(super::MAX_PROMPT_BYTES as u64)
        ));
    }
    if spec.max_tokens == 0 || spec.max_tokens > caps.max_tokens_per_task {
        return bad(format!(
            "--max-tokens {} is outside 1..={} (limits.maxTokensPerTask, what each job may use in fresh tokens)",
            spec.max_tokens, caps.max_tokens_per_task
        ));
    }
    if spec.max_turns == 0 || spec.max_turns > caps.max_turns_per_task {
        return bad(format!(
            "--max-turns {} is outside 1..={} (limits.maxTurnsPerTask)",
            spec.max_turns, caps.max_turns_per_task
        ));
    }
    if let Some(b) = spec.max_budget_usd {
        if !b.is_finite() || b <= 0.0 {
            return bad(format!("--max-budget-usd {b} must be an amount above 0"));
        }
        if let Some(cap) = caps.max_cost_per_task.filter(|cap| b > *cap) {
            return bad(format!("--max-budget-usd {b} is above limits.maxCostPerTask (${cap})"));
        }
    }
    let mode = spec.effective_permission_mode();
    if !PERMISSION_MODES.contains(&mode) {
        return bad(format!(
            "permission mode `{mode}` is not one of {}",
            PERMISSION_MODES.join(", ")
        ));
    }
    // Someone else's task never skips Claude Code's permission checks on
    // this node's login without a standing rule saying so.
    if mode == "bypassPermissions" && matches!(spec.source, JobSource::Market { .. }) {
        return bad("a market job may not run with `bypassPermissions`".into());
    }
    for tools in [&spec.allowed_tools, &spec.disallowed_tools].into_iter().flatten() {
        if tools.trim().is_empty() || tools.chars().any(|c| c.is_control()) {
            return bad(format!(
                "`{tools}` is not a list of tool names (e.g. \"Read,Edit,Bash(git *)\")"
            ));
        }
    }
    Ok(())
}

pub(super) async fn admit(
    paths: &Paths,
    cfg: &Config,
    mut spec: JobSpec,
    approval: Approval,
    progress: &Arc<dyn Progress>,
    cancel: &Cancel,
) -> Result<Admitted, JobError> {
    // Guarded from the first line: any early return releases it.
    let held = spec.reservation.take().map(|id| Ledger::new(paths).held(id));
    let audit = AuditLog::new(paths);
    let job_id = new_job_id();
    let caps = Caps::from_config(cfg);
    validate(&spec, &caps)?;
    let profile = hardening::profile()?;
    let resources = hardening::Resources::from_config(cfg, profile)?;
    // The workspace is checked before anything runs: over its limit, a link
    // out of it, a special file: refused with nothing reserved or started.
    let workspace_limit = super::workspace::limit(cfg)?;
    let snapshot = match &spec.workspace {
        Some(w) => Some(super::workspace::select(w, workspace_limit).await?),
        None => None,
    };

    // 1. Consent.
    Consent::from_config(cfg).require(spec.source.consent_type())?;

    // Ask the engine (connect, is the image there?) while the caps are
    // reserved: both are waits, and reading engine state changes nothing.
    // Errors surface where they would in order, after the credentials.
    let engine = probe_engine(&spec.image);

    // 2. Caps, reserved under the ledger lock.
    let mut guard = match held {
        Some(g) => g,
        None => reserve(paths, &audit, &caps, &spec, &job_id).await?,
    };
    let install_id = audit.read_head()?.map(|h| h.log_id).unwrap_or_default();

    // 3. Approval.
    let how = match approval {
        Approval::PreApproved(by) => by.how(),
        Approval::AskOnTty if !cfg.settings().compliance.require_approval => ApprovedBy::StandingRule.how(),
        Approval::AskOnTty => {
            let question = question(&spec, snapshot.as_deref());
            match ask(question, progress, cancel).await {
                Answer::Yes => ApprovedBy::Interactive.how(),
                Answer::Cancelled => {
                    guard.release()?;
                    return Err(JobError::Cancelled);
                }
                Answer::Denied(reason) => return Err(deny(&audit, guard, &job_id, reason)),
            }
        }
    };
    let approved = approved_fields(&job_id, how, &spec, snapshot.as_deref());
    progress.job_event(JobEvent::Approved { how });
    Ok(Admitted {
        spec,
        job_id,
        guard,
        approved,
        install_id,
        profile,
        resources,
        engine: Some(engine),
        snapshot,
        workspace_limit,
    })
}

impl Admitted {
    /// The job stops before its start (no credential, no image, cancelled):
    /// its approval is audited on its own, so every decision is recorded,
    /// and the reservation released. Returns why it stopped, or the error
    /// that kept this from being done.
    pub(super) fn abandon(mut self, paths: &Paths, why: JobError) -> JobError {
        let done = AuditLog::new(paths)
            .append(Event::JobApproved, self.approved.clone())
            .map_err(JobError::from)
            .and_then(|_| self.guard.release().map_err(JobError::from));
        match done {
            Ok(()) => why,
            Err(e) => e,
        }
    }
}

fn probe_engine(image: &str) -> EngineProbe {
    let image = image.to_string();
    tokio::spawn(async move {
        let docker = crate::docker::connect().await?;
        let present = image::exists(&docker, &image).await?;
        Ok::<_, DockerError>((docker, present))
    })
}

/// One task plus this job's own token and cost budget, reserved under the
/// ledger lock; reservations of dead processes reclaimed on the way are
/// audited.
async fn reserve(
    paths: &Paths,
    audit: &AuditLog,
    caps: &Caps,
    spec: &JobSpec,
    job_id: &str,
) -> Result<HeldReservation, JobError> {
    let ledger = Ledger::new(paths);
    let budget = Budget {
        tokens: spec.max_tokens,
        cost_micros: spec.max_budget_usd.map(usd_to_micros).unwrap_or(0),
    };
    let (reservation, reclaimed) = {
        let (ledger, caps, job_id) = (ledger.clone(), caps.clone(), job_id.to_string());
        tokio::task::spawn_blocking(move || ledger.reserve(&caps, &job_id, budget, Local::now()))
            .await
            .map_err(joined)??
    };
    let guard = ledger.held(reservation.id);
    if !reclaimed.is_empty() {
        let ids: Vec<&str> = reclaimed.iter().map(|r| r.job_id.as_str()).collect();
        audit.append(Event::UsageReclaimed, json!({ "job_ids": ids }))?;
    }
    Ok(guard)
}

/// What the person at the terminal is asked.
fn question(spec: &JobSpec, snapshot: Option<&Snapshot>) -> String {
    format!(
        "Run this {} job with model `{}` (prompt {} bytes, up to {} fresh tokens{}, {} turns, {} s, permission mode {}{})?",
        spec.source.name(),
        spec.model,
        spec.prompt.len(),
        spec.max_tokens,
        spec.max_budget_usd.map(|b| format!(", ${b}")).unwrap_or_default(),
        spec.max_turns,
        spec.timeout.as_secs(),
        spec.effective_permission_mode(),
        snapshot
            .map(|s| format!("; a copy of {}", s.summary()))
            .unwrap_or_default(),
    )
}

enum Answer {
    Yes,
    Denied(&'static str),
    Cancelled,
}

/// Ask at the terminal: a blocking read, raced against Ctrl-C.
async fn ask(question: String, progress: &Arc<dyn Progress>, cancel: &Cancel) -> Answer {
    let p = progress.clone();
    let answer = tokio::task::spawn_blocking(move || p.ask(&question));
    let answer = tokio::select! {
        a = answer => a.map_err(|e| io::Error::other(e.to_string())).and_then(|r| r),
        _ = cancel.cancelled() => return Answer::Cancelled,
    };
    match answer {
        Ok(Some(true)) => Answer::Yes,
        Ok(Some(false)) => Answer::Denied("declined at the prompt"),
        Ok(None) => Answer::Denied("no terminal to ask and no standing approval"),
        Err(_) => Answer::Denied("the approval prompt could not be read"),
    }
}

/// A denied job: the reservation released and `job.denied` audited.
fn deny(audit: &AuditLog, mut guard: HeldReservation, job_id: &str, reason: &'static str) -> JobError {
    let done = guard.release().map_err(JobError::from).and_then(|()| {
        audit
            .append(Event::JobDenied, json!({ "job_id": job_id, "reason": reason }))
            .map_err(JobError::from)
    });
    match done {
        Ok(_) => JobError::Denied(reason.into()),
        Err(e) => e,
    }
}

/// The `job.approved` fields. The approval is audited together with the
/// start (one lock, one sync) on the common path; any path that stops
/// before the start audits it on its own first ([`Admitted::abandon`]).
fn approved_fields(job_id: &str, how: &str, spec: &JobSpec, snapshot: Option<&Snapshot>) -> Value {
    let mut approved = json!({
        "job_id": job_id,
        "how": how,
        "permission_mode": spec.effective_permission_mode(),
    });
    if let Some(s) = snapshot {
        approved["workspace"] = json!({ "files": s.file_count(), "bytes": s.total_bytes() });
    }
    approved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::load(&Paths::in_one_dir(dir.path().into())).unwrap();
        JobSpec::from_config(&cfg, b"hi".to_vec(), JobSource::Local)
    }

    #[test]
    fn a_job_asks_for_no_more_than_the_caps_allow() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::load(&Paths::in_one_dir(dir.path().into())).unwrap();
        let caps = Caps::from_config(&cfg);
        assert!(validate(&spec(), &caps).is_ok());
        let over = |f: fn(&mut JobSpec)| {
            let mut s = spec();
            f(&mut s);
            validate(&s, &caps).unwrap_err().to_string()
        };
        assert!(over(|s| s.max_turns = 100_000).contains("limits.maxTurnsPerTask"));
        assert!(over(|s| s.max_budget_usd = Some(1e6)).contains("limits.maxCostPerTask"));
        assert!(over(|s| s.max_budget_usd = Some(0.0)).contains("above 0"));
        assert!(over(|s| s.permission_mode = Some("yolo".into())).contains("not one of"));
        assert!(over(|s| {
            s.permission_mode = Some("bypassPermissions".into());
            s.source = JobSource::Market {
                task_id: "t".into(),
                requester: None,
                attempt: None,
            };
        })
        .contains("market job"));
    }
}
