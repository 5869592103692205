//! Money the book moves for a task: a posting that must not overdraw, and
//! the full refund of a task's escrow to its requester.
//!
//! It must not open accounts or read balances for display; the ledger
//! (`server::ledger`) owns the journal and its invariants.

use crate::market::server::store::{args, Db};

use super::handler::{reject, Fail, Outbox};
use super::task::Task;
use crate::market::protocol::{Event, Reason};
use crate::market::server::ledger::{self, escrow_account, node_account};

/// Post `postings` for `task`, refused (not an error) when a balance cannot
/// cover its part.
pub fn move_money(c: Db, now: i64, memo: &str, task: &str, postings: &[(&str, i64)]) -> Result<(), Fail> {
    match ledger::post(c, now, memo, Some(task), postings)? {
        Ok(()) => Ok(()),
        Err(o) => reject(
            Reason::InsufficientBalance,
            format!("balance {} cannot cover {} RUV", o.balance, o.needed),
        ),
    }
}

/// Give `t`'s whole escrow back to its requester and end the task in
/// `state`, telling the requester `why`.
pub fn refund(c: Db, t: &Task, state: &str, why: &str, now: i64, out: &mut Outbox) -> Result<(), Fail> {
    let escrow = escrow_account(&t.task_id);
    move_money(
        c,
        now,
        state,
        &t.task_id,
        &[(&escrow, -t.max_price), (&node_account(&t.requester), t.max_price)],
    )?;
    c.write(
        "UPDATE tasks SET state = ?2, provider = NULL, offer_id = NULL, ask = NULL, lease_deadline = NULL,
           result = NULL, updated_at = ?3 WHERE task_id = ?1",
        args![t.task_id, state, now],
    )?;
    c.write_beside("DELETE FROM attempt_holders WHERE task_id = ?1", args![&t.task_id])?;
    out.push((
        t.requester.clone(),
        Event::Refunded {
            task_id: t.task_id.clone(),
            amount: t.max_price,
            why: why.into(),
        },
    ));
    Ok(())
}
