//! The job pipeline (DESIGN.md section 6): consent -> caps -> approval ->
//! credentials -> image -> container -> stream -> record.
//!
//! One entry point, [`run`], used by `execute` and by the market provider,
//! so a market task passes exactly the checks a local job does. Nothing here
//! prints: everything the user sees goes through [`Progress`].
//!
//! The stages live in their own files: [`admit`] (consent, caps, approval),
//! [`prepare`] (credentials, image, egress), [`start`] (the container
//! created while the start is audited), [`running`] (the container and its
//! stream), [`outcome`] (what the stream and the container's ending mean)
//! and [`record`] (the record written, usage counted, the end audited).
//! This file holds the types and the order the stages run in; it must not
//! do a stage's work itself.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::audit::{AuditError, Event};
use crate::caps::CapsError;
use crate::claude::credentials::CredentialError;
use crate::claude::stream::{RateLimit, Retry, Usage};
use crate::config::Config;
use crate::consent::{JOB_LOCAL, JOB_MARKET};
use crate::docker::container::KillReason;
use crate::docker::egress::EgressReport;
use crate::docker::image::{self, ImageProgress};
use crate::docker::DockerError;
use crate::exit::{Exit, Failure, HasExit};
use crate::paths::Paths;

pub mod acceptance;
mod admit;
mod outcome;
mod prepare;
mod record;
mod running;
mod start;
mod workspace;

pub use workspace::{patch_path, WorkspaceReport, WorkspaceSpec};

/// Where a job came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum JobSource {
    Local,
    Market {
        task_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        requester: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
    },
}

impl JobSource {
    /// The consent job type this source needs.
    pub fn consent_type(&self) -> &'static str {
        match self {
            JobSource::Local => JOB_LOCAL,
            JobSource::Market { .. } => JOB_MARKET,
        }
    }

    /// Short name for audit events: `local` or `market`.
    pub fn name(&self) -> &'static str {
        match self {
            JobSource::Local => "local",
            JobSource::Market { .. } => "market",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub prompt: Vec<u8>,
    /// Claude Code model alias or id (`sonnet` by default).
    pub model: String,
    /// Per-task cap on fresh tokens (input + cache creation + output),
    /// compared with the running total while streaming.
    pub max_tokens: u64,
    /// Claude Code's own `--max-turns`.
    pub max_turns: u64,
    /// Claude Code's own `--max-budget-usd`; also what the job reserves
    /// against the cost caps.
    pub max_budget_usd: Option<f64>,
    /// Claude Code's `--permission-mode`; `None`: `acceptEdits` with a
    /// workspace, `default` without.
    pub permission_mode: Option<String>,
    /// Claude Code's `--allowed-tools` / `--disallowed-tools`.
    pub allowed_tools: Option<String>,
    pub disallowed_tools: Option<String>,
    pub timeout: Duration,
    pub image: String,
    pub source: JobSource,
    /// A cap reservation already held for this job (a market provider
    /// reserves when it takes an offer, before the lease): used instead of
    /// reserving again, and released if the job never starts.
    pub reservation: Option<String>,
    /// A directory copied in as the job's working directory, its changes
    /// brought back as a patch.
    pub workspace: Option<WorkspaceSpec>,
}

impl JobSpec {
    /// A spec with every default from the config.
    pub fn from_config(cfg: &Config, prompt: Vec<u8>, source: JobSource) -> JobSpec {
        let s = cfg.settings();
        JobSpec {
            prompt,
            model: s.docker.model.clone(),
            max_tokens: s.limits.max_tokens_per_task,
            max_turns: s.limits.max_turns_per_task,
            max_budget_usd: s.limits.max_cost_per_task,
            permission_mode: s.docker.permission_mode.clone(),
            allowed_tools: None,
            disallowed_tools: None,
            timeout: s.docker.timeout.max(Duration::from_secs(1)),
            image: default_image(cfg),
            source,
            reservation: None,
            workspace: None,
        }
    }

    /// The permission mode this job runs in: as asked, else `acceptEdits`
    /// with a workspace (the container is what makes edits safe) and
    /// `default` without.
    pub fn effective_permission_mode(&self) -> &str {
        match (&self.permission_mode, &self.workspace) {
            (Some(m), _) => m,
            (None, Some(_)) => "acceptEdits",
            (None, None) => "default",
        }
    }

    /// What the entrypoint passes on to `claude` after the model. The raw
    /// API events (`--include-partial-messages`) carry usage while an
    /// answer streams, so a job stopped mid-answer still counts it.
    pub fn claude_args(&self) -> Vec<String> {
        let mut a = vec![
            "--include-partial-messages".to_string(),
            "--max-turns".to_string(),
            self.max_turns.to_string(),
            "--permission-mode".to_string(),
            self.effective_permission_mode().to_string(),
        ];
        if let Some(b) = self.max_budget_usd {
            a.push("--max-budget-usd".into());
            a.push(format!("{b}"));
        }
        if let Some(t) = &self.allowed_tools {
            a.push("--allowed-tools".into());
            a.push(t.clone());
        }
        if let Some(t) = &self.disallowed_tools {
            a.push("--disallowed-tools".into());
            a.push(t.clone());
        }
        a
    }
}

pub fn default_image(cfg: &Config) -> String {
    cfg.settings().docker.image.clone()
}

/// How a job is approved (invariant 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// Approved before `run` was called.
    PreApproved(ApprovedBy),
    /// Ask the person at the terminal, unless `compliance.requireApproval`
    /// is off (a standing rule). No terminal means denied, never a hang.
    AskOnTty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovedBy {
    /// `--approve-all` for this job.
    ApproveAll,
    /// A standing rule (`compliance.requireApproval=false`, `market.autoAcceptBids`).
    StandingRule,
    /// Answered yes at the terminal before the job was handed over (a
    /// market task is approved when it is offered, before the lease).
    Interactive,
}

impl ApprovedBy {
    pub fn how(self) -> &'static str {
        match self {
            ApprovedBy::ApproveAll => "approve-all",
            ApprovedBy::StandingRule => "standing-rule",
            ApprovedBy::Interactive => "tty",
        }
    }
}

/// What happens while a job runs, for display.
#[derive(Debug, Clone)]
pub enum JobEvent<'a> {
    Approved {
        how: &'static str,
    },
    /// The container is about to start.
    Starting {
        image: &'a str,
        model: &'a str,
    },
    Init {
        model: Option<&'a str>,
    },
    Tokens {
        so_far: u64,
        turns: u64,
        max: u64,
    },
    Retry(&'a Retry),
    RateLimit(&'a RateLimit),
    /// A stdout line that is not a JSON event (kept in the record).
    InvalidLine(&'a str),
    /// One line of Claude Code's own event stream, as it printed it (the
    /// raw API events `--include-partial-messages` adds for our own
    /// accounting are not passed on).
    StreamLine(&'a str),
    Killing(KillReason),
    Cancelling,
}

/// The display side of a job. `ask` returns `None` when nobody can answer.
pub trait Progress: ImageProgress + Send + Sync {
    fn job_event(&self, event: JobEvent<'_>);
    /// A note the user should see (e.g. an ignored `ANTHROPIC_API_KEY`).
    fn note(&self, text: &str);
    fn ask(&self, question: &str) -> io::Result<Option<bool>>;
}

/// Shows nothing and has nobody to ask (so `Approval::AskOnTty` is denied
/// unless a standing rule applies): for unattended callers.
pub struct Unattended;

impl ImageProgress for Unattended {
    fn image_event(&self, _: image::ImageEvent<'_>) {}
}

impl Progress for Unattended {
    fn job_event(&self, _: JobEvent<'_>) {}
    fn note(&self, _: &str) {}
    fn ask(&self, _: &str) -> io::Result<Option<bool>> {
        Ok(None)
    }
}

/// A cancellation signal (Ctrl-C in `execute`, shutdown in the provider).
#[derive(Debug, Clone)]
pub struct Cancel(tokio::sync::watch::Receiver<bool>);

/// The sending side of [`Cancel`].
#[derive(Debug)]
pub struct CancelHandle(tokio::sync::watch::Sender<bool>);

impl CancelHandle {
    pub fn cancel(&self) {
        let _ = self.0.send(true);
    }
}

impl Cancel {
    pub fn new() -> (CancelHandle, Cancel) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (CancelHandle(tx), Cancel(rx))
    }

    /// Never cancelled.
    pub fn never() -> Cancel {
        let (tx, rx) = tokio::sync::watch::channel(false);
        // Keep the sender alive forever so `cancelled` never resolves.
        std::mem::forget(tx);
        Cancel(rx)
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once cancelled.
    pub async fn cancelled(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            // Sender gone without cancelling: never resolve.
            std::future::pending::<()>().await;
        }
    }
}

/// How a started job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Completed,
    Failed,
    Killed,
    Cancelled,
}

impl Status {
    /// The terminal audit event.
    pub fn event(self) -> Event {
        match self {
            Status::Completed => Event::JobCompleted,
            Status::Failed => Event::JobFailed,
            Status::Killed => Event::JobKilled,
            Status::Cancelled => Event::JobCancelled,
        }
    }

    /// Our process's exit status for this outcome.
    pub fn exit(self) -> Exit {
        match self {
            Status::Completed => Exit::Ok,
            Status::Failed | Status::Killed => Exit::Failed,
            Status::Cancelled => Exit::Interrupted,
        }
    }
}

/// The job record (`jobs/<id>.json`, 0600). Holds the result text but never
/// the prompt (only its SHA-256) and never the credential.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub job_id: String,
    pub status: Status,
    pub source: JobSource,
    pub model: String,
    /// The model id Claude Code reported (`system` init).
    pub model_resolved: Option<String>,
    pub image: String,
    pub prompt_sha256: String,
    pub prompt_bytes: usize,
    /// The per-task cap on fresh tokens.
    pub max_tokens: u64,
    pub max_turns: u64,
    pub max_budget_usd: Option<f64>,
    pub permission_mode: String,
    /// `subscription` or `api-key`: which hint fits a refused login.
    pub credential_kind: &'static str,
    pub timeout_s: u64,
    pub started_at: String,
    pub finished_at: String,
    /// Wall time from container start to exit.
    pub duration_ms: u64,
    /// Claude Code's own duration (`result.duration_ms`).
    pub claude_duration_ms: Option<u64>,
    pub num_turns: u64,
    pub usage: Usage,
    /// Input + cache creation + output: what the token caps count.
    pub fresh_tokens: u64,
    /// Every token, cache reads included.
    pub total_tokens: u64,
    /// What Claude Code reported, or (`cost_estimated`) our estimate from
    /// the usage when it ended before reporting.
    pub cost_usd: Option<f64>,
    pub cost_estimated: bool,
    pub result: Option<String>,
    pub is_error: Option<bool>,
    pub subtype: Option<String>,
    pub terminal_reason: Option<String>,
    /// Why it did not succeed, in words (no result text).
    pub error: Option<String>,
    /// Claude Code's own error text (the result of an error, else the last
    /// retry's error), on one line, credentials redacted.
    pub claude_error: Option<String>,
    /// Killed: `timeout` or `token-cap`.
    pub kill_reason: Option<String>,
    /// The container's exit code, when it exited by itself.
    pub exit_code: Option<i64>,
    /// Our process's exit status for this job (its code in JSON).
    pub exit: Exit,
    pub retries: Vec<Retry>,
    pub rate_limit: Option<RateLimit>,
    pub invalid_lines: Vec<String>,
    pub invalid_line_count: u64,
    pub stderr_tail: String,
    pub container_id: String,
    /// What the job's network traffic was allowed and refused, by target.
    pub egress: EgressReport,
    /// What the job changed in its workspace (files, totals, the patch's
    /// hash), when it had one.
    pub changes: Option<Value>,
    pub workspace: Option<WorkspaceReport>,
}

impl JobRecord {
    /// A sentence for the user when the job did not complete.
    pub fn failure_message(&self) -> String {
        outcome::failure_message(self)
    }

    /// What the user can do about a failure, when there is something to say.
    pub fn failure_hint(&self) -> Option<String> {
        outcome::failure_hint(self)
    }

    /// What the caps count for this job.
    pub fn spent(&self) -> crate::caps::Spent {
        crate::caps::Spent {
            tokens: self.fresh_tokens,
            cache_read_tokens: self.usage.cache_read_input_tokens,
            cost_micros: self.cost_usd.map(crate::caps::usd_to_micros).unwrap_or(0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Refused(#[from] Failure),
    #[error(transparent)]
    Caps(#[from] CapsError),
    #[error("job denied: {0}")]
    Denied(String),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot write the job record {path}: {source}")]
    Record {
        path: std::path::PathBuf,
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Workspace(#[from] crate::workspace::WorkspaceError),
    /// Cancelled before the container started (nothing ran).
    #[error("cancelled before the job started")]
    Cancelled,
}

impl HasExit for JobError {
    fn exit(&self) -> Exit {
        match self {
            JobError::Refused(e) => e.exit(),
            JobError::Caps(e) => e.exit(),
            JobError::Denied(_) => Exit::Refused,
            JobError::Credentials(e) => e.exit(),
            JobError::Docker(e) => e.exit(),
            JobError::Audit(e) => e.exit(),
            JobError::Record { .. } => Exit::Failed,
            JobError::Invalid(_) => Exit::Usage,
            JobError::Workspace(e) => e.exit(),
            JobError::Cancelled => Exit::Failed,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            JobError::Refused(e) => e.hint(),
            JobError::Caps(e) => e.hint(),
            JobError::Denied(_) => Some(
                "approve it at the prompt, pass `--approve-all` for this job, or set a standing rule with `claude-max-market config --set compliance.requireApproval=false`".into(),
            ),
            JobError::Credentials(e) => e.hint(),
            JobError::Docker(e) => e.hint(),
            JobError::Audit(e) => e.hint(),
            JobError::Workspace(e) => e.hint(),
            _ => None,
        }
    }
}

/// A new job id: sortable by time, unique across processes.
pub fn new_job_id() -> String {
    format!(
        "{}-{}",
        Utc::now().format("%Y%m%dT%H%M%SZ"),
        hex::encode(rand::random::<[u8; 4]>())
    )
}

/// The largest prompt a job takes, in bytes (1 MiB), from `--prompt`,
/// `--file`, stdin or the market: several times Claude Code's context
/// window, so no real prompt is refused, and a runaway input (`--file
/// /dev/zero`) is refused after reading one byte more than this.
pub const MAX_PROMPT_BYTES: usize = 1 << 20;

pub fn prompt_sha256(prompt: &[u8]) -> String {
    hex::encode(Sha256::digest(prompt))
}

fn joined(e: tokio::task::JoinError) -> JobError {
    JobError::Docker(DockerError::Unreachable(e.to_string()))
}

/// Run one job through the whole pipeline.
///
/// `Ok` carries the record of a job that started, whatever its status;
/// `Err` means it never started (refused, denied, no credential, no image,
/// cancelled early), and nothing was counted against the caps.
pub async fn run(
    paths: &Paths,
    cfg: &Config,
    spec: JobSpec,
    approval: Approval,
    progress: Arc<dyn Progress>,
    cancel: Cancel,
) -> Result<JobRecord, JobError> {
    // 1-3. Consent, caps, approval.
    let mut admitted = admit::admit(paths, cfg, spec, approval, &progress, &cancel).await?;

    // 4-5b. Credentials, image, egress.
    let engine = admitted.engine.take().expect("admit hands over the engine probe");
    let mut prepared = match prepare::prepare(cfg, &admitted, engine, &progress, &cancel).await {
        Ok(p) => p,
        Err(e) => return Err(admitted.abandon(paths, e)),
    };

    // 6. Started: from here exactly one terminal event follows.
    let started = start::start(paths, &admitted, &mut prepared, progress.as_ref()).await?;

    // 7-9. The container runs.
    let ran = running::run(prepared, &admitted.spec, started, &progress, &cancel).await;

    // 10-13. Decide, record, count, audit.
    record::finish(paths, admitted, ran).await
}

/// Where a job's record lives.
pub fn record_path(paths: &Paths, job_id: &str) -> std::path::PathBuf {
    paths.jobs_dir().join(format!("{job_id}.json"))
}

/// Read a job record (for `logs --job`). Job ids are checked so a crafted id
/// cannot read outside the jobs directory.
pub fn read_record(paths: &Paths, job_id: &str) -> Result<Value, Failure> {
    if job_id.is_empty() || !job_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(
            Failure::usage(format!("`{job_id}` is not a job id")).hint("job ids look like 20260101T120000Z-1a2b3c4d")
        );
    }
    let path = record_path(paths, job_id);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Failure::usage(format!("no job `{job_id}`")).hint("see job ids with `claude-max-market logs`")
        } else {
            Failure::new(Exit::Failed, format!("cannot read {}: {e}", path.display()))
        }
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Failure::new(Exit::Integrity, format!("{} is corrupt: {e}", path.display())))
}
