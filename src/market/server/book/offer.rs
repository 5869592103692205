//! `offer`: a provider advertises slots, a price and models for a while,
//! and is told at once about open tasks it could take.
//!
//! It must not lease anything: a provider takes a task only by `accept`.

use crate::market::server::store::args;
use serde_json::{json, Value};

use super::fields::{check_name, check_range};
use super::handler::{new_id, reject, Context, Fail};
use super::lease::{cooling_until, held_before};
use super::reputation::{node_reputation, requester_standing};
use super::rules::{FANOUT, MAX_MODELS, MAX_PRICE};
use super::task::{ms_to_rfc3339, Task, TASK_COLS};
use crate::market::protocol::{Event, Reason};

pub fn apply(cx: Context, slots: u32, price: u64, models: Vec<String>, ttl_secs: u64) -> Result<Value, Fail> {
    let Context {
        c,
        node,
        now,
        online,
        out,
        ..
    } = cx;
    check_range("slots", slots as u64, 1, 64)?;
    check_range("price", price, 0, MAX_PRICE)?;
    check_range("ttl_secs", ttl_secs, 1, 30 * 86_400)?;
    if models.is_empty() || models.len() > MAX_MODELS {
        return reject(
            Reason::InvalidField,
            format!("`models` must list 1..={MAX_MODELS} models"),
        );
    }
    for m in &models {
        check_name("models", m)?;
    }
    let offer_id = new_id("o-");
    let expires = now + ttl_secs as i64 * 1000;
    c.write(
        "INSERT INTO offers(offer_id, node_id, slots, price, models, created_at, expires_at, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active')",
        args![
            offer_id,
            node,
            slots,
            price as i64,
            serde_json::to_string(&models).expect("strings serialise"),
            now,
            expires
        ],
    )?;
    for m in &models {
        c.write(
            "INSERT INTO offer_models(offer_id, model) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            args![offer_id, m],
        )?;
    }
    // Tell the new provider about open tasks it could take right now.
    let score = node_reputation(c, node)?.score();
    let open: Vec<Task> = if cooling_until(c, node, now)?.is_some() {
        Vec::new()
    } else {
        c.map(
            &format!(
                "SELECT {TASK_COLS} FROM tasks WHERE state = 'open' AND max_price >= ?1 AND requester != ?2
                 ORDER BY created_at LIMIT 256"
            ),
            args![price as i64, node],
            Task::from_row,
        )?
    };
    let mut fits = Vec::new();
    for t in open {
        if models.contains(&t.model)
            && score >= t.min_reputation
            && online(&t.requester)
            && !held_before(c, &t.task_id, node)?
        {
            fits.push(t);
            if fits.len() >= FANOUT {
                break;
            }
        }
    }
    for t in fits {
        let mut view = t.offered();
        view.requester_standing = Some(requester_standing(c, &t.requester)?);
        out.push((node.to_string(), Event::TaskOffered { task: Box::new(view) }));
    }
    Ok(json!({ "offer_id": offer_id, "expires": ms_to_rfc3339(expires) }))
}
