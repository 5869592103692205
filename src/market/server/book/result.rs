//! `result`: the requester reads back a delivered task's (opaque,
//! encrypted) result.
//!
//! It must not hand the result to anyone but the requester, nor after the
//! task has left the delivered state.

use serde_json::{json, Value};

use super::handler::{reject, Context, Fail};
use super::task::load_task;
use crate::market::protocol::Reason;
use crate::market::server::store::args;

pub fn apply(cx: Context, task_id: String) -> Result<Value, Fail> {
    let Context { c, node, .. } = cx;
    let t = load_task(c, &task_id)?;
    if t.requester != node {
        return reject(Reason::NotOwner, "only the requester reads a task's result");
    }
    if t.state != "delivered" {
        return reject(
            Reason::WrongState,
            format!("task is {}; a result is held only while it is delivered", t.state),
        );
    }
    let data: Option<String> = c
        .value::<Option<String>>("SELECT result FROM tasks WHERE task_id = ?1", args![&task_id])?
        .flatten();
    Ok(
        json!({ "task_id": task_id, "attempt": t.attempt, "provider": t.provider,
               "payload_hash": t.payload_hash, "data": data }),
    )
}
