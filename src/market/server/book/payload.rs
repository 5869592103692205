//! `payload`: the requester relays the encrypted, signed payload to the
//! lease holder, once per attempt.
//!
//! It must not read or keep the payload: it is opaque and only relayed.

use crate::market::server::store::args;
use serde_json::{json, Value};

use super::handler::{reject, Context, Fail};
use super::task::load_task;
use crate::market::protocol::{Event, Reason};

pub fn apply(cx: Context, task_id: String, attempt: u32, data: String) -> Result<Value, Fail> {
    let Context { c, node, now, out, .. } = cx;
    let t = load_task(c, &task_id)?;
    if t.requester != node {
        return reject(Reason::NotOwner, "only the requester sends the payload");
    }
    if attempt != t.attempt {
        return reject(Reason::StaleAttempt, format!("current attempt is {}", t.attempt));
    }
    if t.state != "assigned" {
        return reject(Reason::WrongState, format!("task is {}", t.state));
    }
    let provider = t.provider.clone().unwrap_or_default();
    let bytes = data.len();
    // Once per attempt: the lease holder needs one copy, and a
    // requester repeating it would only fill the holder's queue.
    let first = c.exec(
        "UPDATE tasks SET payload_at = ?2 WHERE task_id = ?1 AND payload_at IS NULL",
        args![task_id, now],
    )?;
    if first == 0 {
        return reject(
            Reason::WrongState,
            format!("the payload of attempt {attempt} was already relayed; it is sent once per attempt"),
        );
    }
    out.push((
        provider.clone(),
        Event::Payload {
            task_id: task_id.clone(),
            attempt,
            data,
        },
    ));
    Ok(json!({ "task_id": task_id, "attempt": attempt, "relayed_to": provider, "bytes": bytes }))
}
