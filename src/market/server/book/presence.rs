//! Sessions coming and going, as the book sees them: a login registers the
//! node (and its one-time grant) and revives its offers; a requester that
//! is back has its waiting tasks offered; a session that ends starts its
//! offers' grace period and recalls leases that can get no payload now.
//!
//! It must not know about sockets or send queues: the writer keeps the
//! sessions and calls these with what happened.

use crate::market::server::store::{self, args, Db};
use serde_json::json;

use super::announce::announce;
use super::handler::{Fail, Outbox};
use super::rules::{BookRules, ID_RETENTION_MS};
use super::task::{Task, TASK_COLS};
use crate::crypto::keys::PublicIdentity;
use crate::market::protocol::{Event, IdentityProof};
use crate::market::server::ledger::{self, node_account, ISSUER};

/// A node logged in: register it (granting the initial RUV once) and keep
/// its offers alive. Returns (balance, granted now).
pub fn login(c: Db, s: &BookRules, id: &PublicIdentity, proof: &IdentityProof, now: i64) -> store::Result<(i64, i64)> {
    let new = c.exec(
        "INSERT INTO nodes(node_id, ed25519, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(node_id) DO NOTHING",
        args![id.node_id, id.ed25519, now],
    )? == 1;
    let account = node_account(&id.node_id);
    let mut granted = 0;
    if new {
        ledger::open_account(c, &account, "node")?;
        if s.initial_grant > 0 {
            // The issuer may go negative by design; post() never refuses here.
            let _ = ledger::post(
                c,
                now,
                "grant",
                None,
                &[(ISSUER, -s.initial_grant), (&account, s.initial_grant)],
            )?;
            granted = s.initial_grant;
        }
    }
    // The latest login's identity and signature: what peers encrypt to.
    c.write(
        "UPDATE nodes SET identity = ?2, proof = ?3, last_seen = ?4 WHERE node_id = ?1",
        args![
            id.node_id,
            serde_json::to_string(id).expect("identities serialise"),
            serde_json::to_string(&json!({ "nonce": proof.nonce, "sig": proof.sig })).expect("json serialises"),
            now
        ],
    )?;
    c.write(
        "UPDATE offers SET disconnected_at = NULL WHERE node_id = ?1 AND state = 'active'",
        args![&id.node_id],
    )?;
    // Message ids are remembered for a day: long enough for any retry, and
    // pruned per node (a primary-key prefix scan) so the table stays small.
    c.write(
        "DELETE FROM requests WHERE node_id = ?1 AND ts < ?2",
        args![id.node_id, now - ID_RETENTION_MS],
    )?;
    Ok((ledger::balance(c, &account)?, granted))
}

/// `node` has a session again: offer its open tasks, held back while it
/// was away, to the providers online now.
pub fn requester_back(
    c: Db,
    node: &str,
    now: i64,
    online: &dyn Fn(&str) -> bool,
    out: &mut Outbox,
) -> Result<(), Fail> {
    let open: Vec<Task> = c.map(
        &format!(
            "SELECT {TASK_COLS} FROM tasks WHERE requester = ?1 AND state = 'open' AND deadline > ?2
             ORDER BY created_at LIMIT 256"
        ),
        args![node, now],
        Task::from_row,
    )?;
    for t in &open {
        announce(c, t, now, online, out)?;
    }
    Ok(())
}

/// The session of `node` ended: its offers start their grace period.
///
/// A lease on one of its tasks whose payload it never sent is recalled: no
/// payload can come now. The lease holder is told (`lease_lapsed`) and the
/// task is open again under a new attempt that does not count against its
/// attempts, offered once the requester is back ([`requester_back`]).
pub fn disconnected(c: Db, node: &str, now: i64, out: &mut Outbox) -> Result<(), Fail> {
    c.write(
        "UPDATE offers SET disconnected_at = ?2 WHERE node_id = ?1 AND state = 'active' AND disconnected_at IS NULL",
        args![node, now],
    )?;
    let waiting: Vec<Task> = c.map(
        &format!(
            "SELECT {TASK_COLS} FROM tasks WHERE requester = ?1 AND state = 'assigned' AND payload_at IS NULL{}",
            c.for_update()
        ),
        args![node],
        Task::from_row,
    )?;
    for t in waiting {
        c.write(
            "UPDATE tasks SET state = 'open', attempt = attempt + 1, max_attempts = max_attempts + 1, provider = NULL,
               offer_id = NULL, ask = NULL, lease_deadline = NULL, updated_at = ?2 WHERE task_id = ?1",
            args![t.task_id, now],
        )?;
        if let Some(p) = t.provider {
            // Not its fault: it may take the task again.
            c.write(
                "DELETE FROM attempt_holders WHERE task_id = ?1 AND node_id = ?2",
                args![&t.task_id, &p],
            )?;
            out.push((
                p,
                Event::LeaseLapsed {
                    task_id: t.task_id.clone(),
                    attempt: t.attempt,
                },
            ));
        }
    }
    Ok(())
}

/// On start-up no node is connected: every offer starts its grace period.
pub fn all_disconnected(c: Db, now: i64) -> store::Result<()> {
    c.write(
        "UPDATE offers SET disconnected_at = ?1 WHERE state = 'active' AND disconnected_at IS NULL",
        args![now],
    )?;
    Ok(())
}
