//! `post`: a requester posts a task (metadata and the payload's hash only),
//! its max price locked in escrow, and the task is offered to providers.
//!
//! It must not see the payload: the requester relays it to the lease
//! holder later (`payload`).

use crate::market::server::store::{args, Arg, Db, V};
use serde_json::{json, Value};

use super::announce::{matching_args, matching_from, offer_to, MATCHING};
use super::fields::{check_name, check_range};
use super::handler::{new_id, reject, Context, Fail};
use super::reputation::{standing_from, STANDING};
use super::rules::{MAX_ATTEMPTS, MAX_PRICE};
use super::task::Task;
use crate::market::protocol::{requester_suspended, Reason, SUSPEND_MIN_VERDICTS, SUSPEND_RATE};
use crate::market::server::ledger::{self, escrow_account, node_account};

/// The fields of a `post` request.
pub struct NewTask {
    pub model: String,
    pub max_tokens: u64,
    pub max_price: u64,
    pub payload_hash: String,
    pub deadline_secs: u64,
    pub max_attempts: Option<u32>,
    pub min_reputation: Option<f64>,
    pub payload_bytes: Option<u64>,
    pub workspace_bytes: Option<u64>,
    pub permission_mode: Option<String>,
}

pub fn apply(cx: Context, req: NewTask) -> Result<Value, Fail> {
    let Context {
        c,
        rules: s,
        node,
        now,
        online,
        out,
    } = cx;
    check_name("model", &req.model)?;
    if let Some(b) = req.payload_bytes {
        check_range("payload_bytes", b, 1, 1 << 40)?;
    }
    check_range("max_tokens", req.max_tokens, 1, 10_000_000)?;
    check_range("max_price", req.max_price, 1, MAX_PRICE)?;
    check_range("deadline_secs", req.deadline_secs, 1, 7 * 86_400)?;
    let attempts = req.max_attempts.unwrap_or(s.default_attempts);
    check_range("max_attempts", attempts as u64, 1, MAX_ATTEMPTS as u64)?;
    let min_rep = req.min_reputation.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_rep) {
        return reject(Reason::InvalidField, "`min_reputation` must be in 0..=1");
    }
    if let Some(b) = req.workspace_bytes {
        check_range("workspace_bytes", b, 1, 1 << 40)?;
    }
    if let Some(m) = &req.permission_mode {
        check_name("permission_mode", m)?;
    }
    if req.payload_hash.len() != 64 || !req.payload_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return reject(Reason::InvalidField, "`payload_hash` must be 64 hex digits (SHA-256)");
    }
    let task_id = new_id("t-");
    let price = req.max_price as i64;
    let task = Task {
        task_id: task_id.clone(),
        requester: node.to_string(),
        model: req.model,
        max_tokens: req.max_tokens as i64,
        max_price: price,
        payload_hash: req.payload_hash.to_ascii_lowercase(),
        deadline: now + req.deadline_secs as i64 * 1000,
        max_attempts: attempts,
        min_reputation: min_rep,
        state: "open".into(),
        attempt: 1,
        provider: None,
        ask: None,
        lease_deadline: None,
        payload_bytes: req.payload_bytes.map(|b| b as i64),
        payload_at: None,
        accepted_at: None,
        workspace_bytes: req.workspace_bytes.map(|b| b as i64),
        permission_mode: req.permission_mode,
        payload_next: 0,
    };
    // The requester's standing and the providers to offer the task to, in
    // one round trip: neither depends on the rows written below.
    // (Only the requester can send a lease holder the payload, so a task
    // is offered while its requester is online.)
    let (requester, matching) = ([node.arg()], matching_args(&task, now));
    let mut queries: Vec<(&str, &[V])> = vec![(STANDING, &requester)];
    if online(node) {
        queries.push((MATCHING, &matching));
    }
    let mut answers = c.rows_each(&queries)?.into_iter();
    let standing = standing_from(&answers.next().unwrap_or_default())?;
    if requester_suspended(standing.settled, standing.rejected) {
        return reject(
            Reason::Suspended,
            format!(
                "you rejected {} of the {} results you judged, more than {}% of at least {}: posting is suspended",
                standing.rejected,
                standing.settled + standing.rejected,
                (SUSPEND_RATE * 100.0) as u32,
                SUSPEND_MIN_VERDICTS
            ),
        );
    }
    let providers = match answers.next() {
        Some(rows) => matching_from(&rows, &task, online)?,
        None => Vec::new(),
    };
    // The task's row goes beside its escrow account's (one statement on
    // PostgreSQL), before the escrow is locked: a balance that cannot cover
    // it is a refusal after a write, which the batch applies again under a
    // savepoint, so the refusal leaves neither row.
    let escrow = escrow_account(&task_id);
    ledger::open_account(c, &escrow, "escrow")?;
    c.write_beside(
        "INSERT INTO tasks(task_id, requester, model, max_tokens, max_price, payload_hash, deadline,
           max_attempts, min_reputation, state, attempt, created_at, updated_at, payload_bytes,
           workspace_bytes, permission_mode)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'open', 1, ?10, ?10, ?11, ?12, ?13)",
        args![
            task.task_id,
            task.requester,
            task.model,
            task.max_tokens,
            task.max_price,
            task.payload_hash,
            task.deadline,
            task.max_attempts,
            task.min_reputation,
            now,
            task.payload_bytes,
            task.workspace_bytes,
            task.permission_mode
        ],
    )?;
    lock_escrow(c, node, &task_id, &escrow, price, now)?;
    offer_to(&task, standing, providers, out);
    Ok(json!({ "task": task.view(), "escrow": price }))
}

/// Move `task_id`'s max price from `node`'s balance into its (open)
/// escrow account `escrow`, refused if the balance cannot cover it.
fn lock_escrow(c: Db, node: &str, task_id: &str, escrow: &str, price: i64, now: i64) -> Result<(), Fail> {
    let account = node_account(node);
    match ledger::post(c, now, "escrow", Some(task_id), &[(&account, -price), (escrow, price)])? {
        Ok(()) => Ok(()),
        Err(o) => reject(
            Reason::InsufficientBalance,
            format!(
                "your balance of {} RUV is short of the {price} RUV max price to lock in escrow",
                o.balance
            ),
        ),
    }
}
