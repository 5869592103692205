//! A task's row: the columns the book reads, its view on the wire, and how
//! a handler loads one (any task, or one leased to the calling node).
//!
//! It must not change a task: every state change belongs to a handler, the
//! lease rules or the clock.

use crate::market::server::store::{self, args, Db, Row};
use serde_json::Value;

use super::handler::{reject, Fail};
use crate::market::protocol::{Reason, TaskView};

#[derive(Debug, Clone)]
pub struct Task {
    pub task_id: String,
    pub requester: String,
    pub model: String,
    pub max_tokens: i64,
    pub max_price: i64,
    pub payload_hash: String,
    pub deadline: i64,
    pub max_attempts: u32,
    pub min_reputation: f64,
    pub state: String,
    pub attempt: u32,
    pub provider: Option<String>,
    pub ask: Option<i64>,
    pub lease_deadline: Option<i64>,
    pub payload_bytes: Option<i64>,
    pub payload_at: Option<i64>,
    pub accepted_at: Option<i64>,
    pub workspace_bytes: Option<i64>,
    pub permission_mode: Option<String>,
    /// The next payload part the lease holder expects (parts come in order).
    pub payload_next: i64,
}

pub const TASK_COLS: &str = "task_id, requester, model, max_tokens, max_price, payload_hash, deadline, max_attempts,
    min_reputation, state, attempt, provider, ask, lease_deadline, payload_bytes, payload_at, accepted_at,
    workspace_bytes, permission_mode, payload_next";

impl Task {
    pub fn from_row(r: &Row) -> store::Result<Task> {
        Ok(Task {
            task_id: r.get(0)?,
            requester: r.get(1)?,
            model: r.get(2)?,
            max_tokens: r.get(3)?,
            max_price: r.get(4)?,
            payload_hash: r.get(5)?,
            deadline: r.get(6)?,
            max_attempts: r.get(7)?,
            min_reputation: r.get(8)?,
            state: r.get(9)?,
            attempt: r.get(10)?,
            provider: r.get(11)?,
            ask: r.get(12)?,
            lease_deadline: r.get(13)?,
            payload_bytes: r.get(14)?,
            payload_at: r.get(15)?,
            accepted_at: r.get(16)?,
            workspace_bytes: r.get(17)?,
            permission_mode: r.get(18)?,
            payload_next: r.get(19)?,
        })
    }

    pub fn view(&self) -> Value {
        // A struct of strings, numbers and options: serialising cannot fail.
        serde_json::to_value(self.offered()).unwrap_or(Value::Null)
    }

    /// The task as providers and its requester see it.
    pub fn offered(&self) -> TaskView {
        TaskView {
            task_id: self.task_id.clone(),
            requester: self.requester.clone(),
            model: self.model.clone(),
            max_tokens: self.max_tokens as u64,
            max_price: self.max_price as u64,
            payload_hash: self.payload_hash.clone(),
            deadline: ms_to_rfc3339(self.deadline),
            max_attempts: self.max_attempts,
            min_reputation: self.min_reputation,
            state: self.state.clone(),
            attempt: self.attempt,
            provider: self.provider.clone(),
            ask: self.ask,
            lease_deadline: self.lease_deadline.map(ms_to_rfc3339),
            payload_bytes: self.payload_bytes.map(|b| b as u64),
            workspace_bytes: self.workspace_bytes.map(|b| b as u64),
            permission_mode: self.permission_mode.clone(),
            requester_standing: None,
        }
    }
}

pub fn ms_to_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The task, its row locked for the rest of the batch: what is decided on
/// it holds while another replica decides on the same task.
pub fn load_task(c: Db, task_id: &str) -> Result<Task, Fail> {
    let t = c.first(
        &format!("SELECT {TASK_COLS} FROM tasks WHERE task_id = ?1{}", c.for_update()),
        args![task_id],
        Task::from_row,
    )?;
    match t {
        Some(t) => Ok(t),
        None => reject(Reason::NotFound, format!("no task `{task_id}`")),
    }
}

/// The task in `rows` (of a statement that returns [`TASK_COLS`]), if any.
pub fn first_task(rows: &[Row]) -> Result<Option<Task>, Fail> {
    Ok(rows.first().map(Task::from_row).transpose()?)
}

/// The task as the caller's `change` left it: an `UPDATE ... RETURNING`
/// [`TASK_COLS`] that changes the row only when the sender may, `None`
/// otherwise. When it changed nothing, `checks` say why; if they find the
/// change allowed after all (it became so since, and the row is now
/// locked), it is made again, and refused if it still changes nothing.
pub fn changed_or_refused(
    change: impl Fn() -> Result<Option<Task>, Fail>,
    checks: impl FnOnce() -> Result<Task, Fail>,
) -> Result<Task, Fail> {
    if let Some(t) = change()? {
        return Ok(t);
    }
    let t = checks()?;
    match change()? {
        Some(t) => Ok(t),
        None => reject(
            Reason::WrongState,
            format!("task is {}; send the request again", t.state),
        ),
    }
}

/// The task, checked to be leased to `node` under `attempt`.
pub fn leased_to(c: Db, task_id: &str, node: &str, attempt: u32) -> Result<Task, Fail> {
    let t = load_task(c, task_id)?;
    if t.provider.as_deref() != Some(node) && attempt == t.attempt {
        return reject(Reason::NotOwner, "this task is leased to another node");
    }
    if attempt != t.attempt {
        return reject(
            Reason::StaleAttempt,
            format!("attempt {attempt} is fenced off: the task is on attempt {}", t.attempt),
        );
    }
    if t.provider.as_deref() != Some(node) {
        return reject(Reason::NotOwner, "this task is leased to another node");
    }
    Ok(t)
}
