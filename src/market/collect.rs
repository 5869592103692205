//! The `market result` operation: pick one of this node's tasks up where it
//! stands. It owns the check that nothing but the prompt this node posted
//! is ever sent: the kept prompt must hash to the `market.bid` record in
//! this node's own audit log, and a result is checked against that record
//! too, whatever the coordinator says. The end is recorded as `bid --wait`
//! records it ([`crate::market::bid::record_end`]).
//!
//! It must not print: steps and warnings go to the caller as
//! [`RequesterEvent`]s, and the answer is a [`Collected`].

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::audit::{AuditLog, Event};
use crate::crypto::keys::Identity;
use crate::market::bid::record_end;
use crate::market::pending;
use crate::market::protocol::TaskView;
use crate::market::requester::{self, Outcome, Report, RequesterError, RequesterEvent, Resume, Resumed};
use crate::market::workspace_task::{self, Check};
use crate::paths::Paths;

#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// The coordinator replicas, tried in order.
    pub endpoint: crate::market::client::Endpoints,
    pub task_id: String,
    /// `None`: one look. `Some(None)`: until the task's deadline + 30 s.
    pub wait: Option<Option<Duration>>,
    /// A workspace task: apply the accepted changes to its DIR (only if DIR
    /// is unchanged since the bid).
    pub apply: bool,
}

/// What `market result` came to, short of an error.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Collected {
    /// Verified, opened and settled.
    Settled(Outcome),
    /// Not delivered, and not waited for.
    NotYet(Box<NotYet>),
}

/// A task with no result yet, and what to do about it.
#[derive(Debug, Clone, Serialize)]
pub struct NotYet {
    pub task_id: String,
    pub state: String,
    pub task: TaskView,
    /// Whether this node keeps the task's prompt.
    pub pending: bool,
    /// Whether this look sent the payload to the current lease holder.
    pub payload_sent: bool,
    pub message: String,
    pub hint: String,
}

/// The `market.bid` line this node wrote for `task_id`, from its own log.
fn bid_line(audit: &AuditLog, task_id: &str) -> Result<Option<Value>, RequesterError> {
    Ok(audit
        .entries()?
        .filter(|e| e.kind() == Some(Event::MarketBid) && e.raw.get("task_id").and_then(Value::as_str) == Some(task_id))
        .map(|e| Value::Object(e.raw.clone()))
        .last())
}

/// How a workspace task's result is checked when it is collected later:
/// against DIR if it is still what was sent, else against the sent
/// workspace kept in the bundle (and then `--apply` refuses, DIR having
/// changed).
async fn workspace_check(
    paths: &Paths,
    line: &Value,
    kept: Option<&[u8]>,
    apply: bool,
) -> Result<Option<Check>, RequesterError> {
    let w = &line["workspace"];
    let Some(dir) = w["dir"].as_str().map(std::path::PathBuf::from) else {
        return Ok(None);
    };
    let want = w["snapshot"].as_str().unwrap_or_default().to_string();
    let limit = crate::config::Config::load(paths)
        .map_err(|e| RequesterError::Workspace(e.to_string()))?
        .settings()
        .docker
        .workspace_limit;
    let tar = kept
        .map(|b| workspace_task::unbundle(b).map(|(_, t)| t.to_vec()))
        .transpose();
    let tar = tar.map_err(RequesterError::Workspace)?;
    let d = dir.clone();
    let snapshot = tokio::task::spawn_blocking(move || -> Result<_, String> {
        if let Ok(s) = workspace_task::select(&d, limit) {
            if s.id() == want {
                return Ok((s, None));
            }
        }
        let tar = tar.ok_or_else(|| {
            format!(
                "{} has changed since the bid and the workspace that was sent is not kept here",
                d.display()
            )
        })?;
        let base = workspace_task::scratch_dir("cmm-sent-", tar.len() as u64).map_err(|e| e.to_string())?;
        let bound = crate::docker::hardening::WorkspaceMount::archive_bound(limit);
        crate::workspace::unpack_untrusted(base.path(), &tar[..], bound, workspace_task::MAX_FILES)
            .map_err(|e| e.to_string())?;
        let s = crate::workspace::select(base.path(), &crate::workspace::Rules::exact(limit, false))
            .map_err(|e| e.to_string())?;
        Ok((s, Some(base)))
    })
    .await
    .map_err(|e| RequesterError::Workspace(e.to_string()))?
    .map_err(RequesterError::Workspace)?;
    let (snapshot, base) = snapshot;
    // The snapshot keeps its own copy of the sent bytes, so the unpacked
    // tree can go now.
    drop(base);
    Ok(Some(Check {
        paths: paths.clone(),
        dir,
        snapshot: std::sync::Arc::new(snapshot),
        accept_cmd: w["accept_cmd"].as_str().map(str::to_string),
        accept_image: w["accept_image"].as_str().map(str::to_string),
        accept_timeout: None,
        apply,
    }))
}

/// Send nothing but the prompt this node posted under this task.
fn check_kept(paths: &Paths, task_id: &str, prompt: &[u8], posted: Option<&str>) -> Result<(), RequesterError> {
    let have = hex::encode(Sha256::digest(prompt));
    match posted {
        Some(h) if h == have => Ok(()),
        Some(h) => Err(RequesterError::PromptMismatch {
            task_id: task_id.to_string(),
            have,
            posted: h.to_string(),
            kept: pending::path(paths, task_id)?,
        }),
        None => Err(RequesterError::PromptUnrecorded(task_id.to_string())),
    }
}

/// Run `market result`.
pub async fn collect(paths: &Paths, opts: CollectOptions, progress: Report<'_>) -> Result<Collected, RequesterError> {
    // A task id becomes a file name below: refuse anything else first.
    pending::path(paths, &opts.task_id)?;
    let audit = AuditLog::new(paths);
    let id = Identity::load_or_generate(paths)?;
    // The result must be bound to the hash this node posted.
    let line = bid_line(&audit, &opts.task_id)?;
    let posted = line
        .as_ref()
        .and_then(|l| l.get("payload_hash").and_then(Value::as_str).map(str::to_string));
    let prompt = pending::load(paths, &id, &opts.task_id)?;
    match &prompt {
        Some(prompt) => check_kept(paths, &opts.task_id, prompt, posted.as_deref())?,
        None if posted.is_none() => progress(RequesterEvent::Warning {
            message: "this task is not in your audit log; checking the result against the market's payload hash".into(),
        }),
        None => {}
    }
    let check = match &line {
        Some(l) => workspace_check(paths, l, prompt.as_deref(), opts.apply).await?,
        None => None,
    };
    let spec = Resume {
        task_id: &opts.task_id,
        posted_hash: posted,
        prompt: prompt.as_deref(),
        wait: opts.wait,
        check: check.as_ref(),
    };
    let (task, payload_sent) = match requester::resume(&opts.endpoint, &id, &spec, progress).await {
        Ok(Resumed::Settled(o)) => return record_end(paths, Ok(o), progress).map(Collected::Settled),
        Ok(Resumed::NotYet { task, payload_sent }) => (task, payload_sent),
        Err(e) => return record_end(paths, Err(e), progress).map(Collected::Settled),
    };
    Ok(Collected::NotYet(Box::new(not_yet(
        &opts.task_id,
        task,
        prompt.is_some(),
        payload_sent,
    ))))
}

/// Where an undelivered task stands, said for people.
fn not_yet(task_id: &str, task: TaskView, pending: bool, payload_sent: bool) -> NotYet {
    let state = task.state.clone();
    let (message, hint) = if !pending {
        (
            format!("task {task_id} is {state}, and its prompt is not kept on this node"),
            "the payload goes out from the node that keeps the prompt: the machine that posted the task with \
             `bid` (without `--wait`), or a `bid --wait` still running; this node can fetch the result \
             once it is delivered"
                .to_string(),
        )
    } else {
        let holder = match &task.provider {
            Some(prov) if payload_sent => format!("; payload sent to node {}", &prov[..prov.len().min(16)]),
            _ => "; no provider holds it yet".to_string(),
        };
        (
            format!(
                "task {task_id} is {state} (attempt {} of {}){holder}; no result yet",
                task.attempt, task.max_attempts
            ),
            format!(
                "run `claude-max-market market result {task_id}` without `--no-wait` to send the payload when a \
                 provider takes it and wait for the result"
            ),
        )
    };
    NotYet {
        task_id: task_id.to_string(),
        state,
        task,
        pending,
        payload_sent,
        message,
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{Exit, HasExit};

    fn exit_of(e: RequesterError) -> Exit {
        e.exit()
    }

    #[test]
    fn only_the_posted_prompt_may_be_sent() {
        let paths = Paths::in_one_dir(std::path::PathBuf::from("/nonexistent"));
        let prompt = b"the prompt";
        let hash = hex::encode(Sha256::digest(prompt));
        assert!(check_kept(&paths, "t-1", prompt, Some(&hash)).is_ok());
        let other = hex::encode(Sha256::digest(b"another"));
        let e = check_kept(&paths, "t-1", prompt, Some(&other)).unwrap_err();
        assert!(e.to_string().contains("nothing was sent"), "{e}");
        assert_eq!(exit_of(e), Exit::Integrity);
        // A kept prompt with no record of what was posted is not sent either.
        let e = check_kept(&paths, "t-1", prompt, None).unwrap_err();
        assert_eq!(exit_of(e), Exit::Integrity);
    }
}
