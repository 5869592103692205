//! Offering a task to providers: which online providers' offers fit it,
//! and telling them (`task_offered`) while its requester is online.
//!
//! It must not change any row: it only reads offers and queues events.

use crate::market::server::store::{Arg, Db, Row, V};

use super::handler::{Fail, Outbox};
use super::reputation::requester_standing;
use super::rules::FANOUT;
use super::task::Task;
use crate::market::protocol::{reputation, Event, RequesterStanding};

/// The query behind [`matching_providers`], to send with others (its
/// rows go to [`matching_from`]).
pub const MATCHING: &str = "SELECT o.node_id, o.slots,
    (SELECT COUNT(*) FROM tasks t WHERE t.offer_id = o.offer_id AND t.state IN ('assigned','delivered')),
    COALESCE(n.clients, 0), COALESCE(n.failures, 0)
 FROM offer_models m JOIN offers o ON o.offer_id = m.offer_id LEFT JOIN nodes n ON n.node_id = o.node_id
 WHERE m.model = ?3 AND o.state = 'active' AND o.disconnected_at IS NULL AND o.price <= ?1 AND o.node_id != ?2
   AND COALESCE(n.cooldown_until, 0) <= ?4
   AND NOT EXISTS (SELECT 1 FROM attempt_holders h WHERE h.task_id = ?5 AND h.node_id = o.node_id)
 ORDER BY o.price LIMIT 1024";

/// [`MATCHING`]'s arguments for `task` at `now`.
pub fn matching_args(task: &Task, now: i64) -> [V<'_>; 5] {
    [
        V::Int(task.max_price),
        task.requester.arg(),
        task.model.arg(),
        V::Int(now),
        task.task_id.arg(),
    ]
}

/// Online providers whose active offer fits `task`, cheapest first.
/// Not a provider cooling down, nor one that failed an earlier attempt of
/// this task.
pub fn matching_providers(c: Db, task: &Task, now: i64, online: &dyn Fn(&str) -> bool) -> Result<Vec<String>, Fail> {
    matching_from(&c.rows(MATCHING, &matching_args(task, now))?, task, online)
}

/// [`matching_providers`] from [`MATCHING`]'s rows.
pub fn matching_from(rows: &[Row], task: &Task, online: &dyn Fn(&str) -> bool) -> Result<Vec<String>, Fail> {
    let mut out: Vec<String> = Vec::new();
    for r in rows {
        let (node, slots, used, s, f) = (
            r.get::<String>(0)?,
            r.get::<i64>(1)?,
            r.get::<i64>(2)?,
            r.get::<i64>(3)?,
            r.get::<i64>(4)?,
        );
        if used < slots && reputation(s, f) >= task.min_reputation && online(&node) && !out.contains(&node) {
            out.push(node);
            if out.len() >= FANOUT {
                break;
            }
        }
    }
    Ok(out)
}

/// The query behind [`offered_to`]: online providers with an active offer
/// for a task's model within its price, every provider
/// [`matching_providers`] may have offered it to, and maybe a few more,
/// found without counting slots or records (for telling them it is gone,
/// which a provider that never saw it ignores). Its rows go to
/// [`offered_from`].
pub const OFFERED_TO: &str = "SELECT DISTINCT o.node_id FROM offer_models m JOIN offers o ON o.offer_id = m.offer_id
 WHERE m.model = ?1 AND o.state = 'active' AND o.disconnected_at IS NULL AND o.price <= ?2
   AND o.node_id != ?3
 LIMIT 1024";

/// [`OFFERED_TO`]'s arguments for `task`.
pub fn offered_args(task: &Task) -> [V<'_>; 3] {
    [task.model.arg(), V::Int(task.max_price), task.requester.arg()]
}

/// The online providers of [`OFFERED_TO`]'s rows.
pub fn offered_from(rows: &[Row], online: &dyn Fn(&str) -> bool) -> Result<Vec<String>, Fail> {
    let mut out = Vec::new();
    for r in rows {
        let n = r.get::<String>(0)?;
        if online(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

/// Offer `task` to matching online providers, if its requester is online:
/// only the requester can send a lease holder the payload, so a task whose
/// requester is away waits for its return ([`super::presence::requester_back`]).
pub fn announce(c: Db, task: &Task, now: i64, online: &dyn Fn(&str) -> bool, out: &mut Outbox) -> Result<(), Fail> {
    if !online(&task.requester) {
        return Ok(());
    }
    let providers = matching_providers(c, task, now, online)?;
    if providers.is_empty() {
        return Ok(());
    }
    // Providers decide on the requester too: how it judged results so far.
    offer_to(task, requester_standing(c, &task.requester)?, providers, out);
    Ok(())
}

/// Tell `providers` of `task`, posted by a requester of `standing`.
pub fn offer_to(task: &Task, standing: RequesterStanding, providers: Vec<String>, out: &mut Outbox) {
    if providers.is_empty() {
        return;
    }
    let mut view = task.offered();
    view.requester_standing = Some(standing);
    for node in providers {
        out.push((
            node,
            Event::TaskOffered {
                task: Box::new(view.clone()),
            },
        ));
    }
}
