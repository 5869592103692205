//! Lease rules: whose fault the end of a lease is, what that costs the
//! provider, who may not take a lease (cooling down, or held an earlier
//! attempt), and what becomes of a task once its lease ends.
//!
//! It must not load or answer requests itself; the handlers and the clock
//! call it with the task they hold.

use crate::market::server::store::{self, args, Db};

use super::announce::announce;
use super::handler::{Fail, Outbox};
use super::money::refund;
use super::reputation::record_failure;
use super::rules::{BookRules, MIN_WORK_MS};
use super::task::Task;

/// Whether the end of `t`'s current lease (a lapse or an abandon at `now`)
/// is its provider's fault. Not when the requester caused it: it never
/// relayed the payload within the grace after the accept, or the task's
/// deadline left the attempt less than [`MIN_WORK_MS`] to work.
fn provider_at_fault(s: &BookRules, t: &Task, now: i64) -> bool {
    let accepted = t.accepted_at.unwrap_or(now);
    if t.payload_at.is_none() && now - accepted >= s.payload_grace_ms {
        return false;
    }
    if t.deadline <= now && t.deadline - accepted < MIN_WORK_MS {
        return false;
    }
    true
}

/// The lease of `t` ended at `now`: the provider's own failure costs it a
/// failure, a cool-down and any further attempt of this task; a failure
/// the requester caused costs it nothing. Returns whether it counted.
pub fn lease_ended(c: Db, s: &BookRules, t: &Task, now: i64) -> store::Result<bool> {
    let Some(p) = t.provider.as_deref() else {
        return Ok(false);
    };
    if provider_at_fault(s, t, now) {
        record_failure(c, s, p, now)?;
        Ok(true)
    } else {
        c.write(
            "DELETE FROM attempt_holders WHERE task_id = ?1 AND node_id = ?2",
            args![t.task_id, p],
        )?;
        Ok(false)
    }
}

/// When `node`'s cool-down ends, if it has not ended by `now`.
pub fn cooling_until(c: Db, node: &str, now: i64) -> store::Result<Option<i64>> {
    let until: Option<i64> = c
        .value("SELECT cooldown_until FROM nodes WHERE node_id = ?1", args![node])?
        .flatten();
    Ok(until.filter(|u| *u > now))
}

/// Did `node` hold an earlier attempt of `task_id` and fail it?
pub fn held_before(c: Db, task_id: &str, node: &str) -> store::Result<bool> {
    Ok(c.first(
        "SELECT 1 FROM attempt_holders WHERE task_id = ?1 AND node_id = ?2",
        args![task_id, node],
        |_| Ok(()),
    )?
    .is_some())
}

/// After a lapsed or abandoned lease: re-open the task under the next
/// attempt (fencing off the old one), or refund it after its last attempt
/// or past its deadline. Returns the task's new state.
pub fn reopen_or_refund(
    c: Db,
    t: Task,
    now: i64,
    last_why: &str,
    online: &dyn Fn(&str) -> bool,
    out: &mut Outbox,
) -> Result<&'static str, Fail> {
    if t.attempt < t.max_attempts && t.deadline > now {
        let next = t.attempt + 1;
        c.write(
            "UPDATE tasks SET state = 'open', attempt = ?2, provider = NULL, offer_id = NULL, ask = NULL,
               lease_deadline = NULL, updated_at = ?3 WHERE task_id = ?1",
            args![t.task_id, next, now],
        )?;
        let reopened = Task {
            attempt: next,
            state: "open".into(),
            provider: None,
            ask: None,
            lease_deadline: None,
            ..t
        };
        announce(c, &reopened, now, online, out)?;
        Ok("open")
    } else {
        let why = if t.deadline <= now { "deadline passed" } else { last_why };
        refund(c, &t, "refunded", why, now, out)?;
        Ok("refunded")
    }
}
