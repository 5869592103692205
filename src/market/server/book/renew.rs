//! `renew`: the lease holder's heartbeat extends its lease.
//!
//! It must not renew a lease for any node but its holder under the
//! current attempt.

use crate::market::server::store::args;
use serde_json::{json, Value};

use super::handler::{reject, Context, Fail};
use super::task::{leased_to, ms_to_rfc3339};
use crate::market::protocol::Reason;

pub fn apply(cx: Context, task_id: String, attempt: u32) -> Result<Value, Fail> {
    let Context {
        c, rules: s, node, now, ..
    } = cx;
    let t = leased_to(c, &task_id, node, attempt)?;
    if t.state != "assigned" {
        return reject(Reason::WrongState, format!("task is {}", t.state));
    }
    let lease = now + s.lease_ms;
    c.write(
        "UPDATE tasks SET lease_deadline = ?2 WHERE task_id = ?1",
        args![task_id, lease],
    )?;
    Ok(json!({ "task_id": task_id, "attempt": attempt, "lease_deadline": ms_to_rfc3339(lease) }))
}
