//! `abandon`: the lease holder gives a task back before its lease lapses
//! (its job failed, or it is stopping); the requester is told, and the
//! task is re-offered under the next attempt or refunded.
//!
//! It must not let a provider give back a lease for free: the lease rules
//! (`lease`) decide what it costs.

use serde_json::{json, Value};

use super::handler::{reject, Context, Fail};
use super::lease::{lease_ended, reopen_or_refund};
use super::task::leased_to;
use crate::market::protocol::{AbandonReason, Event, Reason};

pub fn apply(
    cx: Context,
    task_id: String,
    attempt: u32,
    reason: AbandonReason,
    data: Option<String>,
) -> Result<Value, Fail> {
    let Context {
        c,
        rules: s,
        node,
        now,
        online,
        out,
    } = cx;
    let t = leased_to(c, &task_id, node, attempt)?;
    if t.state != "assigned" {
        return reject(Reason::WrongState, format!("task is {}", t.state));
    }
    // Giving a lease back is the provider's failure whatever the
    // reason it gives (a price-0 offer could take and drop every
    // attempt of a task for free otherwise), unless the requester
    // caused it (see `lease::provider_at_fault`).
    lease_ended(c, s, &t, now)?;
    out.push((
        t.requester.clone(),
        Event::Abandoned {
            task_id: task_id.clone(),
            attempt,
            provider: node.to_string(),
            reason,
            data,
        },
    ));
    let why = format!("attempt {attempt} {}", reason.as_str());
    let state = reopen_or_refund(c, t, now, &why, online, out)?;
    Ok(json!({ "task_id": task_id, "attempt": attempt, "state": state }))
}
