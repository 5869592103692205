//! `settle` and `reject`: the requester's verdict on a delivered task.
//! Settling pays the provider its ask and refunds the rest; rejecting
//! refunds everything and counts a failure for the provider, without a
//! cool-down. The clock settles a task whose requester stayed away.
//!
//! It must not accept a verdict on a task that is not delivered, or from
//! any node but the requester.

use crate::market::server::store::{args, Db};
use serde_json::{json, Value};

use super::handler::{reject, Context, Fail, Outbox};
use super::money::move_money;
use super::reputation::record_success;
use super::task::load_task;
use crate::market::protocol::{Event, Reason};
use crate::market::server::ledger::{escrow_account, node_account};

/// `settle`: pay the provider its ask, refund the rest.
pub fn settle(cx: Context, task_id: &str, attempt: u32) -> Result<Value, Fail> {
    finish(cx.c, cx.node, task_id, attempt, true, cx.now, cx.out)
}

/// `reject`: refund the requester everything.
pub fn refuse(cx: Context, task_id: &str, attempt: u32) -> Result<Value, Fail> {
    finish(cx.c, cx.node, task_id, attempt, false, cx.now, cx.out)
}

/// Settle (pay the ask, refund the rest) or reject (refund all) a delivered task.
pub fn finish(
    c: Db,
    node: &str,
    task_id: &str,
    attempt: u32,
    pay: bool,
    now: i64,
    out: &mut Outbox,
) -> Result<Value, Fail> {
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
    let provider = t.provider.clone().unwrap_or_default();
    let ask = if pay { t.ask.unwrap_or(0).min(t.max_price) } else { 0 };
    let refund = t.max_price - ask;
    let escrow = escrow_account(task_id);
    let (pacc, racc) = (node_account(&provider), node_account(&t.requester));
    move_money(
        c,
        now,
        if pay { "settle" } else { "reject" },
        task_id,
        &[(&escrow, -t.max_price), (&pacc, ask), (&racc, refund)],
    )?;
    let state = if pay { "settled" } else { "refunded" };
    c.exec(
        "UPDATE tasks SET state = ?2, result = NULL, updated_at = ?3 WHERE task_id = ?1",
        args![task_id, state, now],
    )?;
    if pay {
        record_success(c, &provider, &t.requester, ask)?;
    } else {
        // A failure, as before, but no cool-down: a requester's verdict
        // costs it nothing, so it must not be able to bench a provider.
        c.exec(
            "UPDATE nodes SET failures = failures + 1 WHERE node_id = ?1",
            args![&provider],
        )?;
    }
    c.exec("DELETE FROM attempt_holders WHERE task_id = ?1", args![task_id])?;
    let ev = if pay {
        Event::Settled {
            task_id: task_id.to_string(),
            attempt,
            paid: ask,
            refunded: refund,
        }
    } else {
        Event::Refunded {
            task_id: task_id.to_string(),
            amount: refund,
            why: "rejected by the requester".into(),
        }
    };
    out.push((provider, ev));
    Ok(json!({ "task_id": task_id, "attempt": attempt, "state": state, "paid": ask, "refunded": refund }))
}
