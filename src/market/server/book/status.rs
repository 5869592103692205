//! `status`: a node's own view (balance, escrow, offers, tasks, reputation,
//! cool-down) and the coordinator's totals.
//!
//! It must not change anything: a status is read-only and not remembered.

use crate::market::server::store::{args, Db};
use serde_json::{json, Value};

use super::handler::Fail;
use super::lease::cooling_until;
use super::reputation::node_reputation;
use super::task::{ms_to_rfc3339, Task, TASK_COLS};
use crate::market::server::ledger::{self, node_account};

/// A node's view: balance, escrow, offers, tasks, reputation, totals.
pub fn status(c: Db, node: &str, now: i64) -> Result<Value, Fail> {
    let balance = ledger::balance(c, &node_account(node))?;
    let escrow: i64 = c
        .count("SELECT CAST(COALESCE(SUM(max_price), 0) AS BIGINT) FROM tasks WHERE requester = ?1 AND state IN ('open','assigned','delivered')", args![node])?;
    let offers: Vec<Value> = c.map(
        "SELECT offer_id, slots, price, models, expires_at, disconnected_at FROM offers
             WHERE node_id = ?1 AND state = 'active' ORDER BY created_at",
        args![node],
        |r| {
            let models: String = r.get(3)?;
            Ok(json!({
                "offer_id": r.get::<String>(0)?, "slots": r.get::<i64>(1)?, "price": r.get::<i64>(2)?,
                "models": serde_json::from_str::<Value>(&models).unwrap_or(Value::Null),
                "expires": ms_to_rfc3339(r.get(4)?), "connected": r.get::<Option<i64>>(5)?.is_none(),
            }))
        },
    )?;
    let tasks: Vec<Value> = c.map(
        &format!(
            "SELECT {TASK_COLS} FROM tasks WHERE requester = ?1 OR provider = ?1 ORDER BY created_at DESC LIMIT 100"
        ),
        args![node],
        |r| Task::from_row(r).map(|t| t.view()),
    )?;
    let record = node_reputation(c, node)?;
    let cooldown = cooling_until(c, node, now)?.map(ms_to_rfc3339);
    let totals = ledger::totals(c)?;
    let mut by_state = serde_json::Map::new();
    for (k, n) in c.map("SELECT state, COUNT(*) FROM tasks GROUP BY state", args![], |r| {
        Ok((r.get::<String>(0)?, r.get::<i64>(1)?))
    })? {
        by_state.insert(k, n.into());
    }
    let active_offers = c.count("SELECT COUNT(*) FROM offers WHERE state = 'active'", args![])?;
    let nodes = c.count("SELECT COUNT(*) FROM nodes", args![])?;
    Ok(json!({
        "node_id": node,
        "balance": balance,
        "escrow": escrow,
        "offers": offers,
        "tasks": tasks,
        "reputation": record.view(),
        "cooldown_until": cooldown,
        "server": { "nodes": nodes, "active_offers": active_offers, "tasks": by_state, "ledger": totals },
    }))
}
