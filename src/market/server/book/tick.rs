//! The clock: once per tick the writer lapses leases (re-offering or
//! refunding their tasks), settles delivered tasks past their settle
//! deadline, expires open tasks past their deadline and withdraws expired
//! and long-disconnected offers, at most [`TICK_ROWS`] rows of each.
//!
//! It must not answer requests; it runs in its own savepoint of the
//! writer's batch. The rows it changes it locks as it finds them, passing
//! over those another replica's batch holds (they come up next tick).

use crate::market::server::store::{args, Db};

use super::handler::{Fail, Outbox};
use super::lease::{lease_ended, reopen_or_refund};
use super::money::refund;
use super::rules::{BookRules, TICK_ROWS};
use super::settle::finish;
use super::task::{Task, TASK_COLS};
use crate::market::protocol::Event;

/// What the clock did in one tick.
#[derive(Debug, Default)]
pub struct TickReport {
    pub lapsed: usize,
    pub refunded: usize,
    pub expired: usize,
    pub offers_withdrawn: usize,
    pub auto_settled: usize,
}

/// Apply the clock: lapse leases (re-offer or refund), expire open tasks,
/// withdraw expired and abandoned offers.
pub fn tick(
    c: Db,
    s: &BookRules,
    now: i64,
    online: &dyn Fn(&str) -> bool,
    out: &mut Outbox,
) -> Result<TickReport, Fail> {
    let mut rep = TickReport::default();
    let lapsed: Vec<Task> = c.map(
        &format!(
            "SELECT {TASK_COLS} FROM tasks WHERE state = 'assigned' AND (lease_deadline < ?1 OR deadline < ?1) LIMIT ?2{}",
            c.skip_locked()
        ),
        args![now, TICK_ROWS],
        Task::from_row,
    )?;
    for t in lapsed {
        rep.lapsed += 1;
        let provider = t.provider.clone().unwrap_or_default();
        lease_ended(c, s, &t, now)?;
        out.push((
            provider,
            Event::LeaseLapsed {
                task_id: t.task_id.clone(),
                attempt: t.attempt,
            },
        ));
        if reopen_or_refund(c, t, now, "last attempt lapsed", online, out)? == "refunded" {
            rep.refunded += 1;
        }
    }
    // Delivered but neither settled nor rejected within the TTL: settle.
    // The provider did the work and delivered a result signed to this
    // task; the requester had the whole TTL to reject it. Refunding here
    // instead would let a requester get work for free by staying away.
    let stale: Vec<(String, String, u32)> = c.map(
        &format!(
            "SELECT task_id, requester, attempt FROM tasks WHERE state = 'delivered' AND delivered_at < ?1 LIMIT ?2{}",
            c.skip_locked()
        ),
        args![now - s.settle_ttl_ms, TICK_ROWS],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    for (task_id, requester, attempt) in stale {
        rep.auto_settled += 1;
        finish(c, &requester, &task_id, attempt, now, out)?;
    }
    let expired: Vec<Task> = c.map(
        &format!(
            "SELECT {TASK_COLS} FROM tasks WHERE state = 'open' AND deadline < ?1 LIMIT ?2{}",
            c.skip_locked()
        ),
        args![now, TICK_ROWS],
        Task::from_row,
    )?;
    for t in expired {
        rep.expired += 1;
        refund(c, &t, "expired", "no provider took it before the deadline", now, out)?;
    }
    rep.offers_withdrawn = c.exec(
        "UPDATE offers SET state = 'withdrawn' WHERE state = 'active'
               AND (expires_at < ?1 OR (disconnected_at IS NOT NULL AND disconnected_at < ?2))",
        args![now, now - s.grace_ms],
    )? as usize;
    Ok(rep)
}
