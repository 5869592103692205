//! A job's workspace, around the pipeline: DIR selected before anything
//! runs, packed for the container, and when the job ends (whatever its
//! status) diffed on the host into a patch that is saved with the job,
//! audited by hash, and applied to DIR only when asked and only if DIR is
//! unchanged since the copy. The copy in and out itself is the container's
//! [`Hold`](crate::docker::container::Hold). This module must not run or
//! stop a container, and never writes to DIR unless asked to apply.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};

use super::{JobError, JobRecord, Status};
use crate::audit::Event;
use crate::config::Config;
use crate::fsutil;
use crate::paths::Paths;
use crate::workspace::{self, Applied, ChangeSet, DiffRules, Rules, Snapshot};

/// What a job's workspace is.
#[derive(Debug, Clone)]
pub struct WorkspaceSpec {
    pub dir: PathBuf,
    /// Copy `.git` too (it is left out by default).
    pub include_git: bool,
    /// Apply the patch to `dir` once the job has completed.
    pub apply: bool,
    /// Select exactly what is in `dir` (its own `.gitignore` files still
    /// apply, but not this user's global excludes): for a workspace another
    /// node selected and sent (a market task), which must run as it came.
    pub exact: bool,
}

/// The workspace part of a job record.
#[derive(Debug, Clone, Serialize)]
pub struct WorkspaceReport {
    pub dir: PathBuf,
    pub files_in: usize,
    pub bytes_in: u64,
    /// Where the patch was saved (`jobs/<id>.patch`), when there is one.
    pub patch: Option<PathBuf>,
    /// Why the workspace could not be brought back or compared.
    pub error: Option<String>,
    /// `--apply`: what was written to `dir`, or why nothing was.
    pub applied: Option<Applied>,
    pub apply_error: Option<String>,
}

/// The limit from `docker.workspaceLimit`.
pub(super) fn limit(cfg: &Config) -> Result<u64, JobError> {
    Ok(cfg.settings().docker.workspace_limit)
}

/// How many bytes the copy-out may bring back: the tmpfs holds at most
/// `limit` of content and a bounded number of files; tar headers and
/// padding come on top.
pub(super) fn out_limit(limit: u64) -> u64 {
    crate::docker::hardening::WorkspaceMount::archive_bound(limit)
}

/// Select DIR under the rules, before anything runs.
pub(super) async fn select(spec: &WorkspaceSpec, limit: u64) -> Result<Arc<Snapshot>, JobError> {
    let rules = Rules {
        include_git: spec.include_git,
        ..Rules::new(limit)
    };
    let (dir, exact, git) = (spec.dir.clone(), spec.exact, spec.include_git);
    tokio::task::spawn_blocking(move || {
        if exact {
            workspace::select_received(&dir, limit, git).map(Arc::new)
        } else {
            workspace::select(&dir, &rules).map(Arc::new)
        }
    })
    .await
    .map_err(super::joined)?
    .map_err(JobError::Workspace)
}

/// The snapshot as a tar in an unlinked temporary file, at its start.
pub(super) async fn pack(snapshot: Arc<Snapshot>) -> Result<std::fs::File, JobError> {
    tokio::task::spawn_blocking(move || {
        use std::io::{Seek, Write};
        let io = |e: std::io::Error| JobError::Workspace(workspace::WorkspaceError::io("cannot pack the workspace")(e));
        let file = tempfile::tempfile().map_err(io)?;
        let mut w = std::io::BufWriter::with_capacity(256 << 10, file);
        snapshot.write_tar(&mut w).map_err(JobError::Workspace)?;
        w.flush().map_err(io)?;
        let mut file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        Ok(file)
    })
    .await
    .map_err(super::joined)?
}

/// Where a job's patch lives.
pub fn patch_path(paths: &Paths, job_id: &str) -> PathBuf {
    paths.jobs_dir().join(format!("{job_id}.patch"))
}

/// After the job: compare what came back, save the patch, apply it when
/// asked; fill the record in. Runs on a blocking thread. Returns the
/// audit events it owes (`workspace.applied`).
pub(super) fn finish(
    paths: &Paths,
    record: &mut JobRecord,
    spec: &WorkspaceSpec,
    snapshot: &Snapshot,
    out: Option<Result<std::fs::File, String>>,
    limit: u64,
) -> Result<Vec<(Event, Value)>, JobError> {
    let mut report = WorkspaceReport {
        dir: spec.dir.clone(),
        files_in: snapshot.file_count(),
        bytes_in: snapshot.total_bytes(),
        patch: None,
        error: None,
        applied: None,
        apply_error: None,
    };
    let mut events = Vec::new();
    let changes = match out {
        Some(Ok(tar)) => match workspace::diff(
            snapshot,
            std::io::BufReader::with_capacity(256 << 10, tar),
            &DiffRules::new(out_limit(limit)),
        ) {
            Ok(c) => Some(c),
            Err(e) => {
                report.error = Some(e.to_string());
                None
            }
        },
        Some(Err(e)) => {
            report.error = Some(e);
            None
        }
        None => {
            report.error = Some("the workspace was not copied out".into());
            None
        }
    };
    if let Some(c) = &changes {
        if !c.is_empty() {
            let path = patch_path(paths, &record.job_id);
            let err = |source| JobError::Record {
                path: path.clone(),
                source,
            };
            fsutil::ensure_private_dir(&paths.jobs_dir()).map_err(err)?;
            fsutil::atomic_write(&path, &c.patch_text().map_err(err)?).map_err(err)?;
            report.patch = Some(path);
        }
        record.changes = Some(serde_json::to_value(c).unwrap_or(Value::Null));
        if spec.apply {
            apply(record, &mut report, &mut events, c, snapshot, spec);
        }
    } else if spec.apply {
        report.apply_error = Some("nothing to apply: the workspace could not be compared".into());
        if record.exit == crate::exit::Exit::Ok {
            record.exit = crate::exit::Exit::Failed;
        }
    }
    record.workspace = Some(report);
    Ok(events)
}

fn apply(
    record: &mut JobRecord,
    report: &mut WorkspaceReport,
    events: &mut Vec<(Event, Value)>,
    c: &ChangeSet,
    snapshot: &Snapshot,
    spec: &WorkspaceSpec,
) {
    use crate::exit::HasExit;
    if record.status != Status::Completed {
        report.apply_error = Some(format!(
            "not applied: the job {}; the patch is kept",
            match record.status {
                Status::Cancelled => "was cancelled",
                Status::Killed => "was killed",
                _ => "did not complete",
            }
        ));
        return;
    }
    if c.is_empty() {
        return;
    }
    match workspace::apply(c, snapshot, &spec.dir) {
        Ok(a) => {
            events.push((
                Event::WorkspaceApplied,
                json!({
                    "job_id": record.job_id,
                    "patch_sha256": c.patch_sha256(),
                    "written": a.written.len(),
                    "deleted": a.deleted.len(),
                    "mode_changed": a.mode_changed.len(),
                }),
            ));
            report.applied = Some(a);
        }
        Err(e) => {
            report.apply_error = Some(e.to_string());
            // The job completed; the patch is kept, and the command says
            // it could not be applied.
            record.exit = e.exit();
        }
    }
}

/// Numbers and the patch's hash for the terminal audit event.
pub(super) fn audit_fields(m: &mut serde_json::Map<String, Value>, record: &JobRecord) {
    let Some(w) = &record.workspace else { return };
    m.insert("workspace_files".into(), json!(w.files_in));
    m.insert("workspace_bytes".into(), json!(w.bytes_in));
    match &record.changes {
        Some(c) => {
            m.insert(
                "files_changed".into(),
                json!(c["files"].as_array().map_or(0, |f| f.len())),
            );
            m.insert("patch_sha256".into(), c["patch"]["sha256"].clone());
            m.insert("patch_bytes".into(), c["patch"]["bytes"].clone());
        }
        None => {
            m.insert("workspace_error".into(), json!(w.error));
        }
    }
}
