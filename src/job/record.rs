//! Stage 13 of a job: the bookkeeping once the container has ended. The
//! job record is written (a market job's output is not kept), the real
//! usage counted against the reservation, and the terminal event audited
//! with the workspace's events; or, when the engine failed mid-job, the
//! job is recorded as failed with what was seen. What the ending means is
//! [`super::outcome`]'s to decide; this stage must not decide it.

use std::io;
use std::sync::Arc;

use super::admit::Admitted;
use super::running::Ran;
use super::workspace::{self, WorkspaceSpec};
use super::{outcome, record_path, JobError, JobRecord, JobSource, Status};
use crate::audit::AuditLog;
use crate::caps::HeldReservation;
use crate::docker::DockerError;
use crate::fsutil;
use crate::paths::Paths;

/// Record, count and audit a job that ran.
pub(super) async fn finish(paths: &Paths, admitted: Admitted, ran: Ran) -> Result<JobRecord, JobError> {
    let Ran {
        run,
        state,
        prompt_sha,
        credential_kind,
        started_at,
        duration_ms,
        egress,
    } = ran;
    let facts = outcome::Facts {
        job_id: &admitted.job_id,
        spec: &admitted.spec,
        prompt_sha,
        credential_kind,
        started_at,
        duration_ms,
        egress,
    };
    let mut exited = match run {
        Ok(r) => r,
        Err(e) => {
            return Err(engine_failed(
                paths,
                admitted.guard,
                &outcome::engine_failed(&facts, &state),
                e,
            ))
        }
    };
    let record = outcome::record(&facts, &state, &exited.run);
    let workspace_out = exited.run.workspace_out.take();
    let job_id = admitted.job_id.clone();
    // Bookkeeping (workspace diff, record, usage, audit: several fsyncs)
    // runs on a blocking thread while the engine removes the container, so
    // it adds no latency.
    let book = {
        let paths = paths.clone();
        let books = Books {
            guard: admitted.guard,
            workspace: admitted.spec.workspace.clone().zip(admitted.snapshot.clone()),
            limit: admitted.workspace_limit,
            workspace_out,
        };
        tokio::task::spawn_blocking(move || books.keep(&paths, record))
    };
    let ((), book) = tokio::join!(exited.remove(), book);
    tracing::debug!(job = %job_id, "recorded and removed");
    book.map_err(|e| JobError::Record {
        path: record_path(paths, &job_id),
        source: io::Error::other(e.to_string()),
    })?
}

/// The engine failed mid-job: what was seen is counted (tokens spent are
/// spent) and audited as `job.failed`, and the engine's error returned.
fn engine_failed(paths: &Paths, mut guard: HeldReservation, record: &JobRecord, e: DockerError) -> JobError {
    let kept = guard.commit(&record.spent()).map_err(JobError::from).and_then(|()| {
        AuditLog::new(paths)
            .append(Status::Failed.event(), outcome::terminal_fields(record))
            .map_err(JobError::from)
    });
    match kept {
        Ok(_) => e.into(),
        Err(err) => err,
    }
}

/// What the bookkeeping needs besides the record.
struct Books {
    guard: HeldReservation,
    workspace: Option<(WorkspaceSpec, Arc<crate::workspace::Snapshot>)>,
    limit: u64,
    workspace_out: Option<Result<std::fs::File, String>>,
}

impl Books {
    fn keep(mut self, paths: &Paths, mut record: JobRecord) -> Result<JobRecord, JobError> {
        let events = match &self.workspace {
            Some((spec, snapshot)) => workspace::finish(
                paths,
                &mut record,
                spec,
                snapshot,
                self.workspace_out.take(),
                self.limit,
            )?,
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
        write_record(paths, &kept)?;
        // Real usage counts, whatever the ending: tokens spent are spent.
        if record.total_tokens == 0 && record.status == Status::Cancelled {
            self.guard.release()?;
        } else {
            self.guard.commit(&record.spent())?;
        }
        let mut all = vec![(record.status.event(), fields)];
        all.extend(events);
        AuditLog::new(paths).append_many(&all)?;
        Ok(record)
    }
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
