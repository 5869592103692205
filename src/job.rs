//! The job pipeline (DESIGN.md section 6): consent -> caps -> approval ->
//! credentials -> image -> container -> stream -> record.
//!
//! One entry point, [`run`], used by `execute` and by the market provider,
//! so a market task passes exactly the checks a local job does. Nothing here
//! prints: everything the user sees goes through [`Progress`].

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Local, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::audit::{AuditError, AuditLog};
use crate::claude::credentials::{self, CredentialError};
use crate::claude::stream::{Event, RateLimit, Retry, StreamState, Usage};
use crate::config::Config;
use crate::consent::{Consent, JOB_LOCAL, JOB_MARKET};
use crate::docker::container::{self, Ending, KillReason, Verdict};
use crate::docker::egress::{self, EgressReport, Proxy};
use crate::docker::image::{self, ImageProgress, Provenance};
use crate::docker::{hardening, relay, DockerError};
use crate::exit::{Exit, Failure, HasExit};
use crate::fsutil;
use crate::paths::Paths;
use crate::usage::{Caps, Ledger, UsageError};

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
    /// Per-task token cap, compared with the running total while streaming.
    pub max_tokens: u64,
    pub timeout: Duration,
    pub image: String,
    pub source: JobSource,
    /// A cap reservation already held for this job (a market provider
    /// reserves when it takes an offer, before the lease): used instead of
    /// reserving again, and released if the job never starts.
    pub reservation: Option<String>,
}

impl JobSpec {
    /// A spec with every default from the config.
    pub fn from_config(cfg: &Config, prompt: Vec<u8>, source: JobSource) -> JobSpec {
        JobSpec {
            prompt,
            model: cfg.get_str("docker.model").unwrap_or("sonnet").to_string(),
            max_tokens: cfg.get_i64("limits.maxTokensPerTask").max(1) as u64,
            timeout: Duration::from_millis(cfg.get_i64("docker.timeout").max(1000) as u64),
            image: default_image(cfg),
            source,
            reservation: None,
        }
    }
}

pub fn default_image(cfg: &Config) -> String {
    cfg.get_str("docker.image")
        .unwrap_or("synaptic-mesh/claude-max:latest")
        .to_string()
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
    pub max_tokens: u64,
    pub timeout_s: u64,
    pub started_at: String,
    pub finished_at: String,
    /// Wall time from container start to exit.
    pub duration_ms: u64,
    /// Claude Code's own duration (`result.duration_ms`).
    pub claude_duration_ms: Option<u64>,
    pub num_turns: u64,
    pub usage: Usage,
    pub total_tokens: u64,
    pub cost_usd: Option<f64>,
    pub result: Option<String>,
    pub is_error: Option<bool>,
    pub subtype: Option<String>,
    pub terminal_reason: Option<String>,
    /// Why it did not succeed, in words (no result text).
    pub error: Option<String>,
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
}

impl JobRecord {
    /// A sentence for the user when the job did not complete.
    pub fn failure_message(&self) -> String {
        match self.status {
            Status::Completed => "completed".into(),
            Status::Cancelled => "cancelled; the container was removed".into(),
            Status::Killed => match self.kill_reason.as_deref() {
                Some("timeout") => format!("killed: it ran past the {} s timeout", self.timeout_s),
                _ => format!(
                    "killed: it used {} tokens, past the per-task cap of {}",
                    self.total_tokens, self.max_tokens
                ),
            },
            Status::Failed => {
                if let Some(r) = self.rate_limit.as_ref().filter(|r| r.rejected()) {
                    return format!(
                        "Claude's rate limit{} was reached{}",
                        r.kind.as_ref().map(|k| format!(" ({k})")).unwrap_or_default(),
                        r.resets_at_text()
                            .map(|t| format!("; it resets {t}"))
                            .unwrap_or_default()
                    );
                }
                match self.error.as_deref() {
                    Some("authentication_failed") => {
                        "Claude Code could not log in (authentication_failed): the credential was rejected; renew it (e.g. `claude setup-token`)".into()
                    }
                    Some(e) => e.to_string(),
                    None => "failed".into(),
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Refused(#[from] Failure),
    #[error(transparent)]
    Caps(#[from] UsageError),
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

pub fn prompt_sha256(prompt: &[u8]) -> String {
    hex::encode(Sha256::digest(prompt))
}

/// Run one job through the whole pipeline.
///
/// `Ok` carries the record of a job that started, whatever its status;
/// `Err` means it never started (refused, denied, no credential, no image,
/// cancelled early), and nothing was counted against the caps.
pub async fn run(
    paths: &Paths,
    cfg: &Config,
    mut spec: JobSpec,
    approval: Approval,
    progress: Arc<dyn Progress>,
    cancel: Cancel,
) -> Result<JobRecord, JobError> {
    // Guarded from the first line: any early return releases it.
    let held = spec.reservation.take().map(|id| Ledger::new(paths).held(id));
    let audit = AuditLog::new(paths);
    let job_id = new_job_id();
    let caps = Caps::from_config(cfg);
    if spec.max_tokens == 0 || spec.max_tokens > caps.max_tokens_per_task {
        return Err(JobError::Invalid(format!(
            "--max-tokens {} is outside 1..={} (limits.maxTokensPerTask, what each job reserves)",
            spec.max_tokens, caps.max_tokens_per_task
        )));
    }
    let profile = hardening::profile()?;
    let mut resources = hardening::Resources::from_config(cfg, profile)?;

    // 1. Consent.
    Consent::from_config(cfg).require(spec.source.consent_type())?;

    // Ask the engine (connect, is the image there?) while the caps are
    // reserved: both are waits, and reading engine state changes nothing.
    // Errors surface where they would in order, after the credentials.
    let engine = {
        let image = spec.image.clone();
        tokio::spawn(async move {
            let docker = crate::docker::connect().await?;
            let present = image::exists(&docker, &image).await?;
            Ok::<_, DockerError>((docker, present))
        })
    };
    let joined = |e: tokio::task::JoinError| JobError::Docker(DockerError::Unreachable(e.to_string()));

    // 2. Caps, reserved under the ledger lock.
    let ledger = Ledger::new(paths);
    let (mut guard, reclaimed) = match held {
        Some(g) => (g, Vec::new()),
        None => {
            let (reservation, reclaimed) = {
                let (ledger, caps, job_id) = (ledger.clone(), caps.clone(), job_id.clone());
                tokio::task::spawn_blocking(move || ledger.reserve(&caps, &job_id, Local::now()))
                    .await
                    .map_err(joined)??
            };
            (ledger.held(reservation.id), reclaimed)
        }
    };
    if !reclaimed.is_empty() {
        let ids: Vec<&str> = reclaimed.iter().map(|r| r.job_id.as_str()).collect();
        audit.append("usage.reclaimed", json!({ "job_ids": ids }))?;
    }

    // 3. Approval.
    let how = match approval {
        Approval::PreApproved(by) => by.how(),
        Approval::AskOnTty if !cfg.get_bool("compliance.requireApproval") => ApprovedBy::StandingRule.how(),
        Approval::AskOnTty => {
            let question = format!(
                "Run this {} job with model `{}` (prompt {} bytes, up to {} tokens, {} s)?",
                spec.source.name(),
                spec.model,
                spec.prompt.len(),
                spec.max_tokens,
                spec.timeout.as_secs()
            );
            let p = progress.clone();
            // Blocking read on the terminal, raced against Ctrl-C.
            let answer = tokio::task::spawn_blocking(move || p.ask(&question));
            let answer = tokio::select! {
                a = answer => a.map_err(|e| io::Error::other(e.to_string())).and_then(|r| r),
                _ = cancel.cancelled() => {
                    guard.release()?;
                    return Err(JobError::Cancelled);
                }
            };
            let denied = match answer {
                Ok(Some(true)) => None,
                Ok(Some(false)) => Some("declined at the prompt"),
                Ok(None) => Some("no terminal to ask and no standing approval"),
                Err(_) => Some("the approval prompt could not be read"),
            };
            if let Some(reason) = denied {
                guard.release()?;
                audit.append("job.denied", json!({ "job_id": job_id, "reason": reason }))?;
                return Err(JobError::Denied(reason.into()));
            }
            "tty"
        }
    };
    // The approval is audited together with the start (one lock, one
    // sync) on the common path; any path that stops before the start
    // audits it on its own first, so every decision is still recorded.
    let approved = json!({ "job_id": job_id, "how": how });
    progress.job_event(JobEvent::Approved { how });
    let prepared = async {
        // 4. Credentials (may run the user's tokenCommand).
        let mut notes = Vec::new();
        let credential = credentials::resolve(cfg, &mut notes)?;
        for n in &notes {
            progress.note(n);
        }
        // 5. The image: auto-managed when it is the configured default.
        let (docker, present) = engine.await.map_err(joined)??;
        if !present {
            let manage = (spec.image == default_image(cfg)).then(|| image::LocalBuild::from_config(cfg));
            let ensured = tokio::select! {
                r = image::ensure(&docker, &spec.image, manage.as_ref(), profile, progress.as_ref()) => r,
                _ = cancel.cancelled() => return Err(JobError::Cancelled),
            };
            let _: Provenance = ensured?;
        }
        // 5b. Restricted egress: this job's own proxy on a Unix socket,
        // allowing only what this credential kind needs, and the relay
        // that carries the container's HTTPS_PROXY to it.
        let egress = match &resources.proxy {
            Some(_) => {
                let e = egress::profile()?;
                let files = tokio::task::spawn_blocking(|| {
                    let base = relay::base_dir()?;
                    relay::RelayFiles::prepare(&base).map(|f| (base, f))
                });
                let (ep, files) = tokio::join!(image::entrypoint(&docker, &spec.image), files);
                let (base, files) = files
                    .map_err(joined)?
                    .map_err(|err| DockerError::Relay(err.to_string()))?;
                let socket = base.join(format!("egress-{job_id}.sock"));
                let policy = egress::Policy::new(e, credential.kind.name());
                let proxy = Proxy::start_unix(&socket, policy)
                    .await
                    .map_err(|err| DockerError::Relay(format!("cannot listen on {}: {err}", socket.display())))?;
                let setup = hardening::RelaySetup {
                    entrypoint: files.entrypoint(e.relay_listen, &ep?),
                    binds: files.binds(&socket),
                };
                Some((proxy, setup))
            }
            None => None,
        };
        if cancel.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        Ok((credential, docker, egress))
    }
    .await;
    let (credential, docker, egress) = match prepared {
        Ok(p) => p,
        Err(e) => {
            audit.append("job.approved", approved)?;
            guard.release()?;
            return Err(e);
        }
    };

    // 6. Started: from here exactly one terminal event follows.
    let prompt_sha = prompt_sha256(&spec.prompt);
    let timeout_s = spec.timeout.as_secs();
    let started = json!({
        "job_id": job_id,
        "model": spec.model,
        "image": spec.image,
        "prompt_sha256": prompt_sha,
        "max_tokens": spec.max_tokens,
        "timeout_s": timeout_s,
        "source": spec.source.name(),
    });
    // The container is created (not started) while the start is audited;
    // it starts only once the audit line is on disk.
    let proxy = egress.map(|(proxy, setup)| {
        resources.relay = Some(setup);
        proxy
    });
    let body = hardening::create_body(profile, &resources, &spec.image, &spec.model, &job_id);
    let append = {
        let paths = paths.clone();
        tokio::task::spawn_blocking(move || {
            AuditLog::new(&paths).append_many(&[("job.approved", approved), ("job.started", started)])
        })
    };
    let name = format!("cmm-job-{job_id}");
    let (created, appended) = tokio::join!(container::create(&docker, &name, body), append);
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
    drop(credential);
    stdin.extend_from_slice(&spec.prompt);
    let mut state = StreamState::default();
    let max_tokens = spec.max_tokens;
    let p = progress.clone();
    let run = container::run_created(
        &docker,
        created,
        stdin,
        spec.timeout,
        async {
            cancel.cancelled().await;
            p.job_event(JobEvent::Cancelling);
        },
        |line| {
            let event = state.feed(line);
            match &event {
                Event::Init { model } => progress.job_event(JobEvent::Init {
                    model: model.as_deref(),
                }),
                Event::Retry(r) => progress.job_event(JobEvent::Retry(r)),
                Event::RateLimit(r) => progress.job_event(JobEvent::RateLimit(r)),
                Event::Invalid(l) => progress.job_event(JobEvent::InvalidLine(l)),
                Event::Message {
                    tokens_so_far, turns, ..
                } => progress.job_event(JobEvent::Tokens {
                    so_far: *tokens_so_far,
                    turns: *turns,
                    max: max_tokens,
                }),
                Event::Result(_) | Event::Other => {}
            }
            if state.tokens_so_far() > max_tokens {
                progress.job_event(JobEvent::Killing(KillReason::TokenCap));
                return Verdict::Kill(KillReason::TokenCap);
            }
            Verdict::Continue
        },
    )
    .await;
    let duration_ms = t0.elapsed().as_millis() as u64;
    // The container has stopped: nothing can use the proxy any more.
    let egress = proxy.as_ref().map(Proxy::report).unwrap_or_else(EgressReport::open);
    drop(proxy);
    let exited = match run {
        Ok(r) => r,
        Err(e) => {
            // The engine failed mid-job: record it as failed, with what we saw.
            let usage = state.usage_so_far();
            guard.commit(usage.total())?;
            audit.append(
                Status::Failed.event(),
                terminal_fields(
                    &job_id,
                    &spec.model,
                    duration_ms,
                    &usage,
                    None,
                    state.turns,
                    None,
                    |m| {
                        m.insert("error".into(), json!("engine-error"));
                        egress_fields(m, &egress);
                    },
                ),
            )?;
            return Err(e.into());
        }
    };
    let run = &exited.run;
    if let Ending::Killed(r) = &run.ending {
        if *r == KillReason::Timeout {
            progress.job_event(JobEvent::Killing(*r));
        }
    }

    // 10-11. Decide, record, count, audit.
    let outcome = state.outcome.clone();
    let usage = state.usage_so_far();
    let (status, error, kill_reason, exit_code) = match &run.ending {
        Ending::Cancelled => (Status::Cancelled, Some("cancelled".to_string()), None, None),
        Ending::Killed(r) => (
            Status::Killed,
            Some(format!("killed ({})", r.name())),
            Some(r.name().to_string()),
            None,
        ),
        Ending::Exited(code) => match &outcome {
            Some(o) if !o.is_error => (Status::Completed, None, None, Some(*code)),
            Some(o) => {
                let why = if state.rate_limit.as_ref().is_some_and(|r| r.rejected()) {
                    "rate limit rejected".to_string()
                } else if let Some(e) = &state.message_error {
                    e.clone()
                } else if let Some(t) = &o.terminal_reason {
                    t.clone()
                } else {
                    format!(
                        "Claude Code reported an error (subtype {})",
                        o.subtype.as_deref().unwrap_or("none")
                    )
                };
                (Status::Failed, Some(why), None, Some(*code))
            }
            None if *code == container::EXIT_OOM => (
                Status::Failed,
                Some("the container ran out of memory (raise `docker.memory`)".into()),
                None,
                Some(*code),
            ),
            None if *code == container::EXIT_REMOVED => (
                Status::Failed,
                Some("the container was stopped from outside (opt-out or `clean --force`) before a result".into()),
                None,
                Some(*code),
            ),
            None => (
                Status::Failed,
                Some(format!("Claude Code exited with code {code} without a result")),
                None,
                Some(*code),
            ),
        },
    };
    let record = JobRecord {
        job_id: job_id.clone(),
        status,
        source: spec.source.clone(),
        model: spec.model.clone(),
        model_resolved: state.model.clone(),
        image: spec.image.clone(),
        prompt_sha256: prompt_sha,
        prompt_bytes: spec.prompt.len(),
        max_tokens: spec.max_tokens,
        timeout_s,
        started_at: started_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        finished_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        duration_ms,
        claude_duration_ms: outcome.as_ref().and_then(|o| o.duration_ms),
        num_turns: outcome.as_ref().and_then(|o| o.num_turns).unwrap_or(state.turns),
        usage,
        total_tokens: usage.total(),
        cost_usd: outcome.as_ref().and_then(|o| o.total_cost_usd),
        result: outcome.as_ref().and_then(|o| o.result.clone()),
        is_error: outcome.as_ref().map(|o| o.is_error),
        subtype: outcome.as_ref().and_then(|o| o.subtype.clone()),
        terminal_reason: outcome.as_ref().and_then(|o| o.terminal_reason.clone()),
        error: error.clone(),
        kill_reason: kill_reason.clone(),
        exit_code,
        exit: status.exit_code(),
        retries: state.retries.clone(),
        rate_limit: state.rate_limit.clone(),
        invalid_lines: state.invalid_lines.clone(),
        invalid_line_count: state.invalid_count,
        stderr_tail: run.stderr_tail.clone(),
        container_id: run.container_id.clone(),
        egress,
    };
    let fields = terminal_fields(
        &job_id,
        &spec.model,
        duration_ms,
        &usage,
        record.cost_usd,
        record.num_turns,
        exit_code,
        |m| {
            if let Some(r) = &kill_reason {
                m.insert("reason".into(), json!(r));
            }
            if let Some(t) = &record.terminal_reason {
                m.insert("terminal_reason".into(), json!(t));
            }
            if status == Status::Failed {
                m.insert("error".into(), json!(error));
            }
            if state.invalid_count > 0 {
                m.insert("invalid_lines".into(), json!(state.invalid_count));
            }
            egress_fields(m, &record.egress);
        },
    );
    // Bookkeeping (record, usage, audit: several fsyncs) runs on a blocking
    // thread while the engine removes the container, so it adds no latency.
    let book = {
        let paths = paths.clone();
        let record = record.clone();
        tokio::task::spawn_blocking(move || -> Result<(), JobError> {
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
                guard.commit(record.total_tokens)?;
            }
            AuditLog::new(&paths).append(record.status.event(), fields)?;
            Ok(())
        })
    };
    let ((), book) = tokio::join!(exited.remove(), book);
    book.map_err(|e| JobError::Record {
        path: record_path(paths, &job_id),
        source: io::Error::other(e.to_string()),
    })??;
    Ok(record)
}

/// Egress counts for the audit log: numbers only. The targets (which a job's
/// content chooses) stay in the job record, out of the hash chain.
fn egress_fields(m: &mut serde_json::Map<String, Value>, e: &EgressReport) {
    m.insert("egress".into(), json!(e.mode));
    m.insert("egress_allowed".into(), json!(e.allowed));
    m.insert("egress_refused".into(), json!(e.refused));
}

#[allow(clippy::too_many_arguments)]
fn terminal_fields(
    job_id: &str,
    model: &str,
    duration_ms: u64,
    usage: &Usage,
    cost_usd: Option<f64>,
    num_turns: u64,
    exit_code: Option<i64>,
    extra: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("job_id".into(), json!(job_id));
    m.insert("model".into(), json!(model));
    m.insert("duration_ms".into(), json!(duration_ms));
    m.insert("usage".into(), usage.to_json());
    m.insert("cost_usd".into(), json!(cost_usd));
    m.insert("num_turns".into(), json!(num_turns));
    m.insert("exit_code".into(), json!(exit_code));
    extra(&mut m);
    Value::Object(m)
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
