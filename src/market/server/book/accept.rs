//! `accept`: a provider takes an open task; the first valid accept wins
//! the lease (under one of its offers with a free slot), the requester is
//! told who holds it and the other providers that it is gone.
//!
//! It must not let a node lease its own task, a stale attempt, a task whose
//! requester is away, or a provider the lease rules bar.

use crate::market::server::store::{args, Row};
use serde_json::{json, Value};

use super::announce::{offered_args, offered_from, OFFERED_TO};
use super::handler::{reject, Context, Fail};
use super::reputation::Record;
use super::task::{load_task, ms_to_rfc3339, Task};
use crate::market::protocol::{Event, Reason};

pub fn apply(cx: Context, task_id: String, attempt: u32) -> Result<Value, Fail> {
    let Context {
        c,
        rules: s,
        node,
        now,
        online,
        out,
    } = cx;
    let t = load_task(c, &task_id)?;
    if t.requester == node {
        return reject(Reason::NotOwner, "a node cannot accept its own task");
    }
    if attempt != t.attempt {
        return reject(
            Reason::StaleAttempt,
            format!("attempt {attempt} is not the task's current attempt {}", t.attempt),
        );
    }
    match t.state.as_str() {
        "open" => {}
        "assigned" | "delivered" => return reject(Reason::AlreadyTaken, "another provider holds the lease"),
        other => return reject(Reason::WrongState, format!("task is {other}")),
    }
    if t.deadline <= now {
        return reject(Reason::WrongState, "task deadline has passed");
    }
    if !online(&t.requester) {
        return reject(
            Reason::RequesterOffline,
            "the requester is not connected; the task is offered again when it returns",
        );
    }
    // The lease rules, a free offer and who else was offered the task are
    // read in one round trip.
    let offer_sql = format!("{FREE_OFFER}{}", c.for_update());
    let answers = c.rows_each(&[
        (MAY_LEASE, args![node, &t.task_id]),
        (&offer_sql, args![node, t.max_price, now, t.model]),
        (OFFERED_TO, &offered_args(&t)),
    ])?;
    let [rules, offer, others] = <[Vec<Row>; 3]>::try_from(answers).unwrap_or_default();
    may_lease(&rules, &t, now)?;
    let (offer_id, ask) = free_offer(&offer)?;
    let lease = now + s.lease_ms;
    c.write(
        "UPDATE tasks SET state = 'assigned', provider = ?2, offer_id = ?3, ask = ?4, lease_deadline = ?5,
           updated_at = ?6, payload_at = NULL, payload_next = 0, accepted_at = ?6 WHERE task_id = ?1",
        args![task_id, node, offer_id, ask, lease, now],
    )?;
    c.write_beside(
        "INSERT INTO attempt_holders(task_id, node_id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        args![task_id, node],
    )?;
    out.push((
        t.requester.clone(),
        Event::Assigned {
            task_id: task_id.clone(),
            attempt,
            provider: node.to_string(),
        },
    ));
    for other in offered_from(&others, online)? {
        if other != node {
            out.push((
                other,
                Event::TaskClosed {
                    task_id: task_id.clone(),
                },
            ));
        }
    }
    Ok(
        json!({ "task_id": task_id, "attempt": attempt, "ask": ask, "lease_deadline": ms_to_rfc3339(lease),
               "payload_hash": t.payload_hash, "model": t.model, "max_tokens": t.max_tokens }),
    )
}

/// The lease rules for a node taking `t`, from [`MAY_LEASE`]'s rows: not
/// while cooling down, not after holding an earlier attempt, not below the
/// requester's minimum reputation.
fn may_lease(rows: &[Row], t: &Task, now: i64) -> Result<(), Fail> {
    let (until, record, held) = match rows.first() {
        Some(r) => (r.get::<Option<i64>>(0)?, Record::at(r, 1)?, r.get::<bool>(4)?),
        None => Default::default(),
    };
    if let Some(until) = until.filter(|u| *u > now) {
        return reject(
            Reason::CoolingDown,
            format!(
                "you gave up or lost a lease: no new lease until {}",
                ms_to_rfc3339(until)
            ),
        );
    }
    if held {
        return reject(
            Reason::AlreadyAttempted,
            "you held an earlier attempt of this task; another node gets this one",
        );
    }
    let score = record.score();
    if score < t.min_reputation {
        return reject(
            Reason::ReputationTooLow,
            format!(
                "your reputation {score:.3} is below the requester's minimum {}",
                t.min_reputation
            ),
        );
    }
    Ok(())
}

/// The node's record and whether it held an earlier attempt of the task
/// (arguments: the node, the task).
const MAY_LEASE: &str = "SELECT n.cooldown_until, n.successes, n.failures, n.clients,
    EXISTS (SELECT 1 FROM attempt_holders h WHERE h.task_id = ?2 AND h.node_id = n.node_id)
 FROM nodes n WHERE n.node_id = ?1";

/// The node's cheapest active offer for the model with a free slot and a
/// price within the bid (arguments: the node, the bid, now, the model),
/// followed by [`Db::for_update`]: the offer's row stays locked, so its
/// free slot is this lease's alone.
const FREE_OFFER: &str =
    "SELECT o.offer_id, o.price FROM offers o JOIN offer_models m ON m.offer_id = o.offer_id AND m.model = ?4
 WHERE o.node_id = ?1 AND o.state = 'active' AND o.price <= ?2 AND o.expires_at > ?3
   AND o.slots > (SELECT COUNT(*) FROM tasks t
                  WHERE t.offer_id = o.offer_id AND t.state IN ('assigned','delivered'))
 ORDER BY o.price LIMIT 1";

/// [`FREE_OFFER`]'s answer: (offer id, ask).
fn free_offer(rows: &[Row]) -> Result<(String, i64), Fail> {
    match rows.first() {
        Some(r) => Ok((r.get(0)?, r.get(1)?)),
        None => reject(
            Reason::NoMatchingOffer,
            "you have no active offer with a free slot, this model and a price within the bid",
        ),
    }
}
