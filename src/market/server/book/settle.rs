//! `settle` and `reject`: the requester's verdict on a delivered task.
//! Settling pays the provider its ask and refunds the rest. Rejecting
//! counts a failure for the provider (without a cool-down) and a rejection
//! for the requester, keeps the reason's hash and size, and offers the task
//! again under the next attempt (to another provider) while attempts
//! remain, else refunds it. The clock settles a task whose requester stayed
//! away.
//!
//! It must not accept a verdict on a task that is not delivered, or from
//! any node but the requester, and must not keep a rejection's text: only
//! its hash and size (the text travels sealed to the provider).

use crate::market::server::store::{args, Db};
use serde_json::{json, Value};

use super::fields::check_range;
use super::handler::{reject, Context, Fail, Outbox};
use super::lease::reopen_or_refund;
use super::money::move_money;
use super::reputation::{record_settled, record_verdict};
use super::task::{changed_or_refused, first_task, load_task, Task, TASK_COLS};
use crate::market::protocol::{Event, Reason};
use crate::market::server::ledger::{escrow_account, node_account};

/// The requester's reason for a rejection, as the coordinator sees it: the
/// text's SHA-256 and size, and the text sealed to the provider.
#[derive(Debug, Default)]
pub struct Why {
    pub sha256: Option<String>,
    pub bytes: Option<u64>,
    pub data: Option<String>,
}

/// `settle`: pay the provider its ask, refund the rest.
pub fn settle(cx: Context, task_id: &str, attempt: u32) -> Result<Value, Fail> {
    finish(cx.c, cx.node, task_id, attempt, cx.now, cx.out)
}

/// The task, checked to be `node`'s, delivered, under `attempt`.
fn delivered(c: Db, node: &str, task_id: &str, attempt: u32) -> Result<Task, Fail> {
    let t = load_task(c, task_id)?;
    if t.requester != node {
        return reject(Reason::NotOwner, "only the requester settles a task");
    }
    if attempt != t.attempt {
        return reject(Reason::StaleAttempt, format!("current attempt is {}", t.attempt));
    }
    if t.state != "delivered" {
        return reject(
            Reason::WrongState,
            format!("task is {}; only a delivered task settles", t.state),
        );
    }
    Ok(t)
}

/// `reject`: the delivery failed the requester's checks. The provider is
/// not paid and counts a failure (no cool-down: a requester's verdict
/// costs it nothing, so it must not be able to bench a provider with it)
/// and may not take the task again; the requester counts a rejection.
pub fn refuse(cx: Context, task_id: &str, attempt: u32, why: Why) -> Result<Value, Fail> {
    let Context {
        c,
        node,
        now,
        online,
        out,
        ..
    } = cx;
    if let Some(h) = &why.sha256 {
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return reject(Reason::InvalidField, "`reason_sha256` must be 64 hex digits (SHA-256)");
        }
    }
    if let Some(b) = why.bytes {
        check_range("reason_bytes", b, 0, 1 << 20)?;
    }
    let t = delivered(c, node, task_id, attempt)?;
    let provider = t.provider.clone().unwrap_or_default();
    c.write(
        "UPDATE nodes SET failures = failures + 1 WHERE node_id = ?1",
        args![&provider],
    )?;
    record_verdict(c, node, false)?;
    c.write(
        "INSERT INTO rejections(task_id, attempt, requester, provider, reason_sha256, reason_bytes, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
        args![
            task_id,
            attempt,
            node,
            &provider,
            why.sha256.as_deref(),
            why.bytes.map(|b| b as i64),
            now
        ],
    )?;
    c.write(
        "UPDATE tasks SET result = NULL, updated_at = ?2 WHERE task_id = ?1",
        args![task_id, now],
    )?;
    let refunded = t.max_price;
    let state = reopen_or_refund(c, t, now, "the last attempt was rejected", online, out)?;
    out.push((
        provider,
        Event::Rejected {
            task_id: task_id.to_string(),
            attempt,
            state: state.to_string(),
            reason_sha256: why.sha256,
            reason_bytes: why.bytes,
            data: why.data,
        },
    ));
    let refunded = if state == "refunded" { refunded } else { 0 };
    Ok(json!({ "task_id": task_id, "attempt": attempt, "state": state, "paid": 0, "refunded": refunded }))
}

/// `node`'s task, delivered under `attempt`, marked settled in one round
/// trip (the row is locked as [`load_task`] locks it); `None`, changing
/// nothing, if it is not that. The conditions are in a `CASE` for the
/// reason [`super::deliver`]'s are: the row is found by its key.
fn mark_settled(c: Db, node: &str, task_id: &str, attempt: u32, now: i64) -> Result<Option<Task>, Fail> {
    first_task(&c.rows(
        &format!(
            "UPDATE tasks SET state = 'settled', result = NULL, updated_at = ?2
             WHERE task_id = ?1 AND CASE WHEN requester = ?3 AND attempt = ?4 AND state = 'delivered' THEN 1 ELSE 0 END = 1
             RETURNING {TASK_COLS}"
        ),
        args![task_id, now, node, attempt],
    )?)
}

/// Settle a delivered task: pay the provider its ask, refund the rest.
pub fn finish(c: Db, node: &str, task_id: &str, attempt: u32, now: i64, out: &mut Outbox) -> Result<Value, Fail> {
    let t = changed_or_refused(
        || mark_settled(c, node, task_id, attempt, now),
        || delivered(c, node, task_id, attempt),
    )?;
    let provider = t.provider.clone().unwrap_or_default();
    let ask = t.ask.unwrap_or(0).min(t.max_price);
    let refund = t.max_price - ask;
    let escrow = escrow_account(task_id);
    let (pacc, racc) = (node_account(&provider), node_account(&t.requester));
    move_money(
        c,
        now,
        "settle",
        task_id,
        &[(&escrow, -t.max_price), (&pacc, ask), (&racc, refund)],
    )?;
    c.write("DELETE FROM attempt_holders WHERE task_id = ?1", args![task_id])?;
    record_settled(c, &provider, &t.requester, ask)?;
    out.push((
        provider,
        Event::Settled {
            task_id: task_id.to_string(),
            attempt,
            paid: ask,
            refunded: refund,
        },
    ));
    Ok(json!({ "task_id": task_id, "attempt": attempt, "state": "settled", "paid": ask, "refunded": refund }))
}
