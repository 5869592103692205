//! `payload`: the requester relays the encrypted, signed payload to the
//! lease holder, once per attempt, in one frame or in `parts` frames sent
//! in order (a payload that carries a workspace is larger than a frame).
//!
//! It must not read or keep the payload: it is opaque and only relayed.

use crate::market::server::store::args;
use serde_json::{json, Value};

use super::fields::check_range;
use super::handler::{reject, Context, Fail};
use super::task::load_task;
use crate::market::protocol::{Event, Reason};

/// Most frames one payload may be cut into.
pub const MAX_PARTS: u32 = 4096;

pub fn apply(cx: Context, task_id: String, attempt: u32, data: String, part: u32, parts: u32) -> Result<Value, Fail> {
    let Context { c, node, now, out, .. } = cx;
    check_range("parts", parts as u64, 1, MAX_PARTS as u64)?;
    if part >= parts {
        return reject(
            Reason::InvalidField,
            format!("`part` {part} is not below `parts` {parts}"),
        );
    }
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
    // Once per attempt, each part once and in order: the lease holder
    // needs one copy, and a requester repeating it would only fill the
    // holder's queue. The first part starts the payload (and the grace).
    let next = part as i64 + 1;
    let applied = c.exec(
        "UPDATE tasks SET payload_at = COALESCE(payload_at, ?2), payload_next = ?4
         WHERE task_id = ?1 AND payload_next = ?3 AND (payload_at IS NULL OR ?3 > 0)",
        args![task_id, now, part as i64, next],
    )?;
    if applied == 0 {
        return reject(
            Reason::WrongState,
            if part == 0 || t.payload_next >= parts as i64 {
                format!("the payload of attempt {attempt} was already relayed; it is sent once per attempt")
            } else {
                format!(
                    "part {part} is out of order: the lease holder expects part {}",
                    t.payload_next
                )
            },
        );
    }
    let multi = parts > 1;
    out.push((
        provider.clone(),
        Event::Payload {
            task_id: task_id.clone(),
            attempt,
            data,
            part: multi.then_some(part),
            parts: multi.then_some(parts),
        },
    ));
    Ok(json!({ "task_id": task_id, "attempt": attempt, "relayed_to": provider, "bytes": bytes }))
}
