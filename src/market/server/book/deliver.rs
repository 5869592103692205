//! `deliver`: the lease holder hands in the encrypted, signed result; the
//! task is delivered, the result kept for the requester until it settles
//! or rejects, and relayed to it at once.
//!
//! It must not move money: payment waits for the requester's verdict
//! (`settle`) or the settle deadline (`tick`).

use crate::market::server::store::args;
use serde_json::{json, Value};

use super::handler::{reject, Context, Fail};
use super::task::leased_to;
use crate::market::protocol::{Event, Reason};

pub fn apply(cx: Context, task_id: String, attempt: u32, data: String) -> Result<Value, Fail> {
    let Context { c, node, now, out, .. } = cx;
    let t = leased_to(c, &task_id, node, attempt)?;
    if t.state != "assigned" {
        return reject(Reason::WrongState, format!("task is {}", t.state));
    }
    let bytes = data.len();
    c.write(
        "UPDATE tasks SET state = 'delivered', result = ?2, updated_at = ?3, delivered_at = ?3 WHERE task_id = ?1",
        args![task_id, data, now],
    )?;
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
