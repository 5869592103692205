//! `progress`: the lease holder tells the requester how its job is going
//! (turns, tokens, files changed), sealed to the requester.
//!
//! It must not read or keep the report, nor change the task: it is opaque,
//! relayed while the requester is online and dropped otherwise.

use serde_json::{json, Value};

use super::handler::{reject, Context, Fail};
use super::task::leased_to;
use crate::market::protocol::{Event, Reason};

pub fn apply(cx: Context, task_id: String, attempt: u32, data: String) -> Result<Value, Fail> {
    let Context {
        c, node, online, out, ..
    } = cx;
    let t = leased_to(c, &task_id, node, attempt)?;
    if t.state != "assigned" {
        return reject(Reason::WrongState, format!("task is {}", t.state));
    }
    let relayed = online(&t.requester);
    if relayed {
        out.push((
            t.requester,
            Event::Progress {
                task_id: task_id.clone(),
                attempt,
                data,
            },
        ));
    }
    Ok(json!({ "task_id": task_id, "attempt": attempt, "relayed": relayed }))
}
