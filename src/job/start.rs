//! Stage 6 of a job: the start. The container is created (not started)
//! while `job.approved` and `job.started` are audited; it may start only
//! once those lines are on disk, and from then on exactly one terminal
//! event follows. This stage must not start the container or touch the
//! credential.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::admit::Admitted;
use super::prepare::Prepared;
use super::{joined, prompt_sha256, JobError, JobEvent, Progress};
use crate::audit::{AuditLog, Event};
use crate::docker::container;
use crate::docker::hardening;
use crate::docker::DockerError;
use crate::paths::Paths;

/// A job whose start is audited.
pub(super) struct Started {
    /// The created container, or why it could not be created (reported
    /// where running it would fail).
    pub created: Result<String, DockerError>,
    pub prompt_sha: String,
    pub started_at: DateTime<Utc>,
    pub t0: Instant,
}

/// The `job.started` fields.
fn started_fields(admitted: &Admitted, prompt_sha: &str) -> Value {
    let spec = &admitted.spec;
    let mut started = json!({
        "job_id": admitted.job_id,
        "model": spec.model,
        "image": spec.image,
        "prompt_sha256": prompt_sha,
        "max_tokens": spec.max_tokens,
        "max_turns": spec.max_turns,
        "max_budget_usd": spec.max_budget_usd,
        "permission_mode": spec.effective_permission_mode(),
        "timeout_s": spec.timeout.as_secs(),
        "source": spec.source.name(),
    });
    if let Some(s) = &admitted.snapshot {
        started["workspace_files"] = json!(s.file_count());
        started["workspace_bytes"] = json!(s.total_bytes());
    }
    started
}

/// The container's create request: the hardening profile, this job's
/// resources, its relay and workspace.
fn create_body(admitted: &Admitted, relay: Option<hardening::RelaySetup>) -> bollard::models::ContainerCreateBody {
    let spec = &admitted.spec;
    let mut resources = admitted.resources.clone();
    resources.relay = relay;
    if admitted.snapshot.is_some() {
        resources.workspace = Some(admitted.workspace_limit);
    }
    let claude_args = spec.claude_args();
    hardening::create_body(
        admitted.profile,
        &resources,
        &hardening::Launch {
            image: &spec.image,
            model: &spec.model,
            claude_args: &claude_args,
            job_id: &admitted.job_id,
            install_id: &admitted.install_id,
        },
    )
}

/// Create the container and audit the start, both at once. If the audit
/// fails the container is removed and nothing runs.
pub(super) async fn start(
    paths: &Paths,
    admitted: &Admitted,
    prepared: &mut Prepared,
    progress: &dyn Progress,
) -> Result<Started, JobError> {
    let (spec, job_id) = (&admitted.spec, &admitted.job_id);
    let prompt_sha = prompt_sha256(&spec.prompt);
    let started = started_fields(admitted, &prompt_sha);
    let body = create_body(admitted, prepared.relay.take());
    let append = {
        let paths = paths.clone();
        let approved = admitted.approved.clone();
        tokio::task::spawn_blocking(move || {
            AuditLog::new(&paths).append_many(&[(Event::JobApproved, approved), (Event::JobStarted, started)])
        })
    };
    let name = format!("cmm-job-{job_id}");
    tracing::debug!(job = %job_id, "admitted and prepared");
    let (created, appended) = tokio::join!(container::create(&prepared.docker, &name, body), append);
    tracing::debug!(job = %job_id, "created and audited");
    if let Err(e) = appended.map_err(joined).and_then(|r| r.map_err(JobError::from)) {
        if let Ok(id) = &created {
            container::remove(&prepared.docker, id).await;
        }
        return Err(e);
    }
    progress.job_event(JobEvent::Starting {
        image: &spec.image,
        model: &spec.model,
    });
    Ok(Started {
        created,
        prompt_sha,
        started_at: Utc::now(),
        t0: Instant::now(),
    })
}
