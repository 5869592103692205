//! `task`: the requester looks up where one of its tasks stands (state,
//! attempt, lease holder, deadlines), e.g. after being offline.
//!
//! It must not show a task to any node but its requester.

use serde_json::Value;

use super::handler::{reject, Context, Fail};
use super::task::load_task;
use crate::market::protocol::Reason;

pub fn apply(cx: Context, task_id: String) -> Result<Value, Fail> {
    let t = load_task(cx.c, &task_id)?;
    if t.requester != cx.node {
        return reject(Reason::NotOwner, "only the requester looks up a task");
    }
    Ok(t.view())
}
