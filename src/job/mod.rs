//! The job pipeline (DESIGN.md section 6): consent -> caps -> approval ->
//! credentials -> image -> container -> stream -> record.
//!
//! One entry point, [`run`], used by `execute` and by the market provider,
//! so a market task passes exactly the checks a local job does. Nothing here
//! prints: everything the user sees goes through [`Progress`].
//!
//! The stages live in their own files: [`admit`] (consent, caps, approval),
//! [`prepare`] (credentials, image, egress), [`outcome`] (what the stream and
//! the container's ending mean, and the record). This file holds the types
//! and the order the stages run in.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::audit::{AuditError, AuditLog};
use crate::caps::CapsError;
use crate::claude::credentials::CredentialError;
use crate::claude::stream::{Event, PartialUsage, RateLimit, Retry, StreamState, Usage};
use crate::config::Config;
use crate::consent::{JOB_LOCAL, JOB_MARKET};
use crate::docker::container::{self, KillReason, Verdict};
use crate::docker::egress::{EgressReport, Proxy};
use crate::docker::image::{self, ImageProgress};
use crate::docker::{hardening, DockerError};
use crate::exit::{Exit, Failure, HasExit};
use crate::fsutil;
use crate::paths::Paths;

mod admit;
mod outcome;
mod prepare;
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
    pub fn event(self) -> &'static str {
        match self {
            Status::Completed => "job.completed",
            Status::Failed => "job.failed",
            Status::Killed => "job.killed",
            Status::Cancelled => "job.cancelled",
        }
    }

    /// Our process's exit code for this outcome.
    pub fn exit_code(self) -> i32 {
        match self {
            Status::Completed => 0,
            Status::Failed | Status::Killed => Exit::Failed.code(),
            Status::Cancelled => 130,
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
    /// Our process's exit code for this job.
    pub exit: i32,
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
    let job_id = admitted.job_id.clone();
    let audit = AuditLog::new(paths);

    // 4-5b. Credentials, image, egress.
    let engine = admitted.engine.take().expect("admit hands over the engine probe");
    let prepared = prepare::prepare(cfg, &admitted, engine, &progress, &cancel).await;
    let prepare::Prepared {
        credential,
        docker,
        proxy,
        relay,
        hold,
    } = match prepared {
        Ok(p) => p,
        Err(e) => {
            // Every decision is recorded even when the job never starts.
            audit.append("job.approved", admitted.approved.clone())?;
            admitted.guard.release()?;
            return Err(e);
        }
    };
    let spec = &admitted.spec;
    let mut resources = admitted.resources.clone();
    resources.relay = relay;
    if admitted.snapshot.is_some() {
        resources.workspace = Some(admitted.workspace_limit);
    }

    // 6. Started: from here exactly one terminal event follows.
    let prompt_sha = prompt_sha256(&spec.prompt);
    let timeout_s = spec.timeout.as_secs();
    let mode = spec.effective_permission_mode().to_string();
    let mut started = json!({
        "job_id": job_id,
        "model": spec.model,
        "image": spec.image,
        "prompt_sha256": prompt_sha,
        "max_tokens": spec.max_tokens,
        "max_turns": spec.max_turns,
        "max_budget_usd": spec.max_budget_usd,
        "permission_mode": mode,
        "timeout_s": timeout_s,
        "source": spec.source.name(),
    });
    if let Some(s) = &admitted.snapshot {
        started["workspace_files"] = json!(s.file_count());
        started["workspace_bytes"] = json!(s.total_bytes());
    }
    // The container is created (not started) while the start is audited;
    // it starts only once the audit line is on disk.
    let claude_args = spec.claude_args();
    let body = hardening::create_body(
        admitted.profile,
        &resources,
        &hardening::Launch {
            image: &spec.image,
            model: &spec.model,
            claude_args: &claude_args,
            job_id: &job_id,
            install_id: &admitted.install_id,
        },
    );
    let append = {
        let paths = paths.clone();
        let approved = admitted.approved.clone();
        tokio::task::spawn_blocking(move || {
            AuditLog::new(&paths).append_many(&[("job.approved", approved), ("job.started", started)])
        })
    };
    let name = format!("cmm-job-{job_id}");
    tracing::debug!(job = %job_id, "admitted and prepared");
    let (created, appended) = tokio::join!(container::create(&docker, &name, body), append);
    tracing::debug!(job = %job_id, "created and audited");
    if let Err(e) = appended.map_err(joined).and_then(|r| r.map_err(JobError::from)) {
        if let Ok(id) = &created {
            container::remove(&docker, id).await;
        }
        return Err(e);
    }
    progress.job_event(JobEvent::Starting {
        image: &spec.image,
        model: &spec.model,
    });
    let started_at = Utc::now();
    let t0 = Instant::now();

    // 7-9. Container: stdin line 1 = credential, rest = prompt.
    let mut stdin = credential.stdin_line();
    let credential_kind = credential.kind.name();
    drop(credential);
    stdin.extend_from_slice(&spec.prompt);
    let mut state = StreamState::default();
    let max_tokens = spec.max_tokens;
    let p = progress.clone();
    let run = container::run_created(
        &docker,
        created,
        stdin,
        hold,
        spec.timeout,
        async {
            cancel.cancelled().await;
            p.job_event(JobEvent::Cancelling);
        },
        |line| on_line(&mut state, line, max_tokens, progress.as_ref()),
    )
    .await;
    let duration_ms = t0.elapsed().as_millis() as u64;
    // The container has stopped: nothing can use the proxy any more.
    let egress = proxy.as_ref().map(Proxy::report).unwrap_or_else(EgressReport::open);
    drop(proxy);
    let facts = outcome::Facts {
        job_id: &job_id,
        spec,
        prompt_sha,
        credential_kind,
        started_at,
        duration_ms,
        egress,
    };
    let mut exited = match run {
        Ok(r) => r,
        Err(e) => {
            // The engine failed mid-job: record it as failed, with what we saw.
            let record = outcome::engine_failed(&facts, &state);
            admitted.guard.commit(&record.spent())?;
            audit.append(Status::Failed.event(), outcome::terminal_fields(&record))?;
            return Err(e.into());
        }
    };
    if let container::Ending::Killed(KillReason::Timeout) = &exited.run.ending {
        progress.job_event(JobEvent::Killing(KillReason::Timeout));
    }

    // 10-13. Decide, record, count, audit.
    let mut record = outcome::record(&facts, &state, &exited.run);
    let workspace_out = exited.run.workspace_out.take();
    // Bookkeeping (workspace diff, record, usage, audit: several fsyncs)
    // runs on a blocking thread while the engine removes the container, so
    // it adds no latency.
    let mut guard = admitted.guard;
    let ws = admitted.spec.workspace.clone().zip(admitted.snapshot.clone());
    let limit = admitted.workspace_limit;
    let book = {
        let paths = paths.clone();
        tokio::task::spawn_blocking(move || -> Result<JobRecord, JobError> {
            let events = match &ws {
                Some((spec, snapshot)) => workspace::finish(&paths, &mut record, spec, snapshot, workspace_out, limit)?,
                None => Vec::new(),
            };
            let fields = outcome::terminal_fields(&record);
            // A market job's output belongs to the requester: it leaves this
            // node only sealed to them, and the provider keeps no copy.
            let mut kept = record.clone();
            if matches!(kept.source, JobSource::Market { .. }) {
                kept.result = None;
                kept.invalid_lines.clear();
            }
            write_record(&paths, &kept)?;
            // Real usage counts, whatever the ending: tokens spent are spent.
            if record.total_tokens == 0 && record.status == Status::Cancelled {
                guard.release()?;
            } else {
                guard.commit(&record.spent())?;
            }
            let mut all = vec![(record.status.event(), fields)];
            all.extend(events);
            AuditLog::new(&paths).append_many(&all)?;
            Ok(record)
        })
    };
    let ((), book) = tokio::join!(exited.remove(), book);
    tracing::debug!(job = %job_id, "recorded and removed");
    book.map_err(|e| JobError::Record {
        path: record_path(paths, &job_id),
        source: io::Error::other(e.to_string()),
    })?
}

/// One stdout line: update the state, show progress, and decide whether the
/// job goes on.
fn on_line(state: &mut StreamState, line: &str, max_tokens: u64, progress: &dyn Progress) -> Verdict {
    let event = state.feed(line);
    if matches!(event, Event::Init { .. } | Event::Result(_)) {
        tracing::debug!(
            event = if matches!(event, Event::Result(_)) {
                "result"
            } else {
                "init"
            },
            "stream"
        );
    }
    match &event {
        Event::Init { model } => progress.job_event(JobEvent::Init {
            model: model.as_deref(),
        }),
        Event::Retry(r) => progress.job_event(JobEvent::Retry(r)),
        Event::RateLimit(r) => progress.job_event(JobEvent::RateLimit(r)),
        Event::Invalid(l) => progress.job_event(JobEvent::InvalidLine(l)),
        Event::Message {
            tokens_so_far, turns, ..
        }
        | Event::Partial(Some(PartialUsage {
            tokens_so_far, turns, ..
        })) => progress.job_event(JobEvent::Tokens {
            so_far: *tokens_so_far,
            turns: *turns,
            max: max_tokens,
        }),
        Event::Result(_) | Event::Other | Event::Partial(None) => {}
    }
    if !event.is_raw_api_event() {
        progress.job_event(JobEvent::StreamLine(line));
    }
    // A refused credential stays refused: end the job now instead of
    // after Claude Code's ten retries.
    if let Event::Retry(r) = &event {
        if r.is_auth_failure() {
            progress.job_event(JobEvent::Killing(KillReason::AuthFailed));
            return Verdict::Kill(KillReason::AuthFailed);
        }
    }
    if state.tokens_so_far() > max_tokens {
        progress.job_event(JobEvent::Killing(KillReason::TokenCap));
        return Verdict::Kill(KillReason::TokenCap);
    }
    // Success or failure is the result's to say; nothing after it counts.
    if matches!(event, Event::Result(_)) {
        return Verdict::Done;
    }
    Verdict::Continue
}

/// Where a job's record lives.
pub fn record_path(paths: &Paths, job_id: &str) -> std::path::PathBuf {
    paths.jobs_dir().join(format!("{job_id}.json"))
}

fn write_record(paths: &Paths, record: &JobRecord) -> Result<(), JobError> {
    let path = record_path(paths, &record.job_id);
    let err = |source| JobError::Record {
        path: path.clone(),
        source,
    };
    fsutil::ensure_private_dir(&paths.jobs_dir()).map_err(err)?;
    let bytes = serde_json::to_vec_pretty(record).expect("records serialise");
    fsutil::atomic_write(&path, &bytes).map_err(err)
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
