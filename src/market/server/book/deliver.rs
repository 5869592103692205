//! `deliver`: the lease holder hands in the encrypted, signed result; the
//! task is delivered, the result kept for the requester until it settles
//! or rejects, and relayed to it at once.
//!
//! It must not move money: payment waits for the requester's verdict
//! (`settle`) or the settle deadline (`tick`).

use crate::market::server::store::{args, Db};
use serde_json::{json, Value};

use super::handler::{reject, Context, Fail};
use super::task::{changed_or_refused, first_task, leased_to, Task, TASK_COLS};
use crate::market::protocol::{Event, Reason};

pub fn apply(cx: Context, task_id: String, attempt: u32, data: String) -> Result<Value, Fail> {
    let Context { c, node, now, out, .. } = cx;
    let t = changed_or_refused(
        || mark_delivered(c, &task_id, node, attempt, &data, now),
        || {
            let t = leased_to(c, &task_id, node, attempt)?;
            if t.state != "assigned" {
                return reject(Reason::WrongState, format!("task is {}", t.state));
            }
            Ok(t)
        },
    )?;
    let bytes = data.len();
    out.push((
        t.requester.clone(),
        Event::Delivered {
            task_id: task_id.clone(),
            attempt,
            data,
        },
    ));
    Ok(json!({ "task_id": task_id, "attempt": attempt, "state": "delivered", "bytes": bytes }))
}

/// The task leased to `node` under `attempt`, still assigned, marked
/// delivered with `data`, in one round trip (the row is locked as
/// [`super::task::load_task`] locks it); `None`, changing nothing, if it is
/// not that. The conditions are in a `CASE` so that the row is found by
/// its key: a bare `state = 'assigned'` lets PostgreSQL's generic plan walk
/// every assigned task's entry in `tasks_delivered` instead.
fn mark_delivered(c: Db, task_id: &str, node: &str, attempt: u32, data: &str, now: i64) -> Result<Option<Task>, Fail> {
    first_task(&c.rows(
        &format!(
            "UPDATE tasks SET state = 'delivered', result = ?2, updated_at = ?3, delivered_at = ?3
             WHERE task_id = ?1 AND CASE WHEN provider = ?4 AND attempt = ?5 AND state = 'assigned' THEN 1 ELSE 0 END = 1
             RETURNING {TASK_COLS}"
        ),
        args![task_id, data, now, node, attempt],
    )?)
}
