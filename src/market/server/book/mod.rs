//! The order book: offers, tasks and their state machine, applied to SQLite
//! inside the caller's transaction together with the ledger postings.
//!
//! Task states: `open -> assigned -> delivered -> settled | refunded`, and
//! `open | assigned -> expired | refunded` by the clock. The attempt number
//! is a fencing token: a lapsed lease re-opens the task with `attempt + 1`,
//! and every message naming an older attempt is refused.
//!
//! This module owns the dispatch of one authenticated request to its
//! handler, one file per request (`post`, `accept`, `payload`, `deliver`,
//! `settle`, ...). What every handler is given and how it fails is
//! `handler`; the market's rules and bounds are `rules` ([`BookRules`]).
//! What several handlers share lives in files by topic: the task row
//! (`task`), money (`money`), reputation (`reputation`), lease rules
//! (`lease`), offering a task to providers (`announce`) and field checks
//! (`fields`). Sessions coming and going are `presence`, the clock is
//! `tick`, the operator's grant is `grant`.
//!
//! It must not commit, roll back or send anything: the caller owns the
//! transaction (and its savepoints), and events only leave through the
//! [`Outbox`] once the caller has committed.

mod abandon;
mod accept;
mod announce;
mod deliver;
mod fields;
mod grant;
mod handler;
mod identity;
mod lease;
mod lookup;
mod money;
mod offer;
mod payload;
mod post;
mod presence;
mod progress;
mod raise;
mod renew;
mod reputation;
mod result;
mod rules;
mod settle;
mod status;
mod task;
mod tick;
mod withdraw;

use crate::market::server::store::Db;
use serde_json::Value;

use crate::market::protocol::{Reason, Request};
use handler::{reject, Context};

pub use grant::operator_grant;
pub use handler::{new_id, Fail, Outbox};
pub use presence::{all_disconnected, disconnected, login, requester_back};
pub use rules::{
    BookRules, DEFAULT_COOLDOWN_MS, DEFAULT_PAYLOAD_GRACE_MS, DEFAULT_SETTLE_TTL_MS, ID_RETENTION_MS, MAX_ATTEMPTS,
    MAX_GRANT, MIN_WORK_MS,
};
pub use status::status;
pub use task::ms_to_rfc3339;
pub use tick::{tick, TickReport};

/// Apply one authenticated request. `Ok` carries the result document; the
/// caller commits (or rolls back to its savepoint on `Err`).
pub fn apply(
    c: Db,
    rules: &BookRules,
    node: &str,
    req: Request,
    now: i64,
    online: &dyn Fn(&str) -> bool,
    out: &mut Outbox,
) -> Result<Value, Fail> {
    let cx = Context {
        c,
        rules,
        node,
        now,
        online,
        out,
    };
    match req {
        Request::Hello { .. } => reject(Reason::AlreadyAuthenticated, "this session is already authenticated"),
        Request::Status {} => status(c, node, now),
        Request::Reputation { node_id } => reputation::apply(cx, node_id),
        Request::Offer {
            slots,
            price,
            models,
            ttl_secs,
        } => offer::apply(cx, slots, price, models, ttl_secs),
        Request::Withdraw { offer_id } => withdraw::apply(cx, offer_id),
        Request::Post {
            model,
            max_tokens,
            max_price,
            payload_hash,
            deadline_secs,
            max_attempts,
            min_reputation,
            payload_bytes,
            workspace_bytes,
            permission_mode,
        } => post::apply(
            cx,
            post::NewTask {
                model,
                max_tokens,
                max_price,
                payload_hash,
                deadline_secs,
                max_attempts,
                min_reputation,
                payload_bytes,
                workspace_bytes,
                permission_mode,
            },
        ),
        Request::Raise { task_id, max_price } => raise::apply(cx, task_id, max_price),
        Request::Accept { task_id, attempt } => accept::apply(cx, task_id, attempt),
        Request::Renew { task_id, attempt } => renew::apply(cx, task_id, attempt),
        Request::Payload {
            task_id,
            attempt,
            data,
            part,
            parts,
        } => payload::apply(cx, task_id, attempt, data, part.unwrap_or(0), parts.unwrap_or(1)),
        Request::Progress { task_id, attempt, data } => progress::apply(cx, task_id, attempt, data),
        Request::Deliver { task_id, attempt, data } => deliver::apply(cx, task_id, attempt, data),
        Request::Identity { node_id } => identity::apply(cx, node_id),
        Request::Result { task_id } => result::apply(cx, task_id),
        Request::Task { task_id } => lookup::apply(cx, task_id),
        Request::Abandon {
            task_id,
            attempt,
            reason,
            data,
        } => abandon::apply(cx, task_id, attempt, reason, data),
        Request::Settle { task_id, attempt } => settle::settle(cx, &task_id, attempt),
        Request::Reject {
            task_id,
            attempt,
            reason_sha256,
            reason_bytes,
            data,
        } => settle::refuse(
            cx,
            &task_id,
            attempt,
            settle::Why {
                sha256: reason_sha256,
                bytes: reason_bytes,
                data,
            },
        ),
    }
}
