//! `raise`: a requester raises the max price of an open or assigned task
//! (never lowers it), the difference added to escrow; an open task is
//! offered again at its new price.
//!
//! It must not change the ask of a lease already taken.

use crate::market::server::store::args;
use serde_json::{json, Value};

use super::announce::announce;
use super::fields::check_range;
use super::handler::{reject, Context, Fail};
use super::money::move_money;
use super::rules::MAX_PRICE;
use super::task::{load_task, Task};
use crate::market::protocol::Reason;
use crate::market::server::ledger::{escrow_account, node_account};

pub fn apply(cx: Context, task_id: String, max_price: u64) -> Result<Value, Fail> {
    let Context {
        c,
        node,
        now,
        online,
        out,
        ..
    } = cx;
    let t = load_task(c, &task_id)?;
    if t.requester != node {
        return reject(Reason::NotOwner, "only the requester may change a task's bid");
    }
    if !matches!(t.state.as_str(), "open" | "assigned") {
        return reject(
            Reason::WrongState,
            format!("task is {}; only open or assigned bids change", t.state),
        );
    }
    check_range("max_price", max_price, 1, MAX_PRICE)?;
    let new = max_price as i64;
    if new < t.max_price {
        return reject(
            Reason::PriceTooLow,
            format!("a bid only goes up: current max price is {} RUV", t.max_price),
        );
    }
    let diff = new - t.max_price;
    if diff > 0 {
        move_money(
            c,
            now,
            "raise",
            &task_id,
            &[(&node_account(node), -diff), (&escrow_account(&task_id), diff)],
        )?;
        c.write(
            "UPDATE tasks SET max_price = ?2, updated_at = ?3 WHERE task_id = ?1",
            args![task_id, new, now],
        )?;
        if t.state == "open" {
            let t2 = Task { max_price: new, ..t };
            announce(c, &t2, now, online, out)?;
        }
    }
    Ok(json!({ "task_id": task_id, "max_price": new, "escrow_added": diff }))
}
