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
use crate::paths::Paths;

#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// The coordinator replicas, tried in order.
    pub endpoint: crate::market::client::Endpoints,
    pub task_id: String,
    /// `None`: one look. `Some(None)`: until the task's deadline + 30 s.
    pub wait: Option<Option<Duration>>,
}

/// What `market result` came to, short of an error.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Collected {
    /// Verified, opened and settled.
    Settled(Outcome),
    /// Not delivered, and not waited for.
    NotYet(NotYet),
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

/// The payload hash this node posted for `task_id`, from its own log.
fn posted_hash(audit: &AuditLog, task_id: &str) -> Result<Option<String>, RequesterError> {
    Ok(audit
        .entries()?
        .filter(|e| e.kind() == Some(Event::MarketBid) && e.raw.get("task_id").and_then(Value::as_str) == Some(task_id))
        .filter_map(|e| e.raw.get("payload_hash").and_then(Value::as_str).map(str::to_string))
        .last())
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
    let posted = posted_hash(&audit, &opts.task_id)?;
    let prompt = pending::load(paths, &id, &opts.task_id)?;
    match &prompt {
        Some(prompt) => check_kept(paths, &opts.task_id, prompt, posted.as_deref())?,
        None if posted.is_none() => progress(RequesterEvent::Warning {
            message: "this task is not in your audit log; checking the result against the market's payload hash".into(),
        }),
        None => {}
    }
    let spec = Resume {
        task_id: &opts.task_id,
        posted_hash: posted,
        prompt: prompt.as_deref(),
        wait: opts.wait,
    };
    let (task, payload_sent) = match requester::resume(&opts.endpoint, &id, &spec, progress).await {
        Ok(Resumed::Settled(o)) => return record_end(paths, Ok(o), progress).map(Collected::Settled),
        Ok(Resumed::NotYet { task, payload_sent }) => (task, payload_sent),
        Err(e) => return record_end(paths, Err(e), progress).map(Collected::Settled),
    };
    Ok(Collected::NotYet(not_yet(
        &opts.task_id,
        task,
        prompt.is_some(),
        payload_sent,
    )))
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
