//! The order book: offers, tasks and their state machine, applied to SQLite
//! inside the caller's transaction together with the ledger postings.
//!
//! Task states: `open -> assigned -> delivered -> settled | refunded`, and
//! `open | assigned -> expired | refunded` by the clock. The attempt number
//! is a fencing token: a lapsed lease re-opens the task with `attempt + 1`,
//! and every message naming an older attempt is refused.

use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::{json, Value};

use super::ledger::{self, escrow_account, node_account, ISSUER};
use crate::crypto::keys::PublicIdentity;
use crate::market::protocol::{reputation, Event, IdentityProof, Reason, Rejection, Request, TaskView};

/// Tunables of the coordinator.
#[derive(Debug, Clone)]
pub struct Settings {
    /// RUV credited once to every new node. 0 by default: a free grant per
    /// identity is minted by anyone who makes keypairs, so an open market
    /// funds nodes with `market grant` instead (see PROTOCOL.md, "Money").
    pub initial_grant: i64,
    /// A lease lasts this long past the last accept or heartbeat.
    pub lease_ms: i64,
    /// A disconnected provider's offers survive this long.
    pub grace_ms: i64,
    /// Attempts a task gets when the requester does not say.
    pub default_attempts: u32,
    /// A delivered task the requester neither settles nor rejects within
    /// this long is settled for it (and its stored result dropped).
    pub settle_ttl_ms: i64,
    /// A provider that gave up or lost a lease through its own fault takes
    /// no new lease for this long.
    pub cooldown_ms: i64,
    /// A requester must relay the payload within this long of the accept;
    /// a lease that ends without one after it is not the provider's fault.
    pub payload_grace_ms: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            initial_grant: 0,
            lease_ms: 30_000,
            grace_ms: 30_000,
            default_attempts: 3,
            settle_ttl_ms: DEFAULT_SETTLE_TTL_MS,
            cooldown_ms: DEFAULT_COOLDOWN_MS,
            payload_grace_ms: DEFAULT_PAYLOAD_GRACE_MS,
        }
    }
}

/// Default settle deadline for delivered tasks: a day.
pub const DEFAULT_SETTLE_TTL_MS: i64 = 24 * 3600 * 1000;
/// Default cool-down after a provider's own failure: a minute.
pub const DEFAULT_COOLDOWN_MS: i64 = 60_000;
/// Default time a requester has to relay the payload after an accept.
pub const DEFAULT_PAYLOAD_GRACE_MS: i64 = 30_000;
/// A lapse at the task's deadline counts against the provider only if its
/// attempt had at least this long between the accept and the deadline.
pub const MIN_WORK_MS: i64 = 60_000;
/// Largest operator grant in one `market grant`.
pub const MAX_GRANT: i64 = 1_000_000_000;
/// How long an applied message id is remembered.
pub const ID_RETENTION_MS: i64 = 24 * 3600 * 1000;
/// Most attempts a requester may ask for.
pub const MAX_ATTEMPTS: u32 = 10;
const MAX_PRICE: u64 = 1_000_000_000;
const MAX_MODELS: usize = 16;
const MAX_NAME: usize = 64;
/// Providers told about one task at most (the first valid accept wins anyway).
const FANOUT: usize = 64;
/// Rows the clock handles per batch, so one batch stays short.
const TICK_ROWS: i64 = 256;

/// Why a request did not apply: refused, or the database failed.
#[derive(Debug)]
pub enum Fail {
    Reject(Rejection),
    Sql(rusqlite::Error),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

fn reject<T>(reason: Reason, message: impl Into<String>) -> Result<T, Fail> {
    Err(Fail::Reject(Rejection::new(reason, message)))
}

/// Messages to send once the transaction commits: (node id, event).
pub type Outbox = Vec<(String, Event)>;

pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

#[derive(Debug, Clone)]
struct Task {
    task_id: String,
    requester: String,
    model: String,
    max_tokens: i64,
    max_price: i64,
    payload_hash: String,
    deadline: i64,
    max_attempts: u32,
    min_reputation: f64,
    state: String,
    attempt: u32,
    provider: Option<String>,
    ask: Option<i64>,
    lease_deadline: Option<i64>,
    payload_bytes: Option<i64>,
    payload_at: Option<i64>,
    accepted_at: Option<i64>,
}

const TASK_COLS: &str = "task_id, requester, model, max_tokens, max_price, payload_hash, deadline, max_attempts,
    min_reputation, state, attempt, provider, ask, lease_deadline, payload_bytes, payload_at, accepted_at";

impl Task {
    fn from_row(r: &Row) -> rusqlite::Result<Task> {
        Ok(Task {
            task_id: r.get(0)?,
            requester: r.get(1)?,
            model: r.get(2)?,
            max_tokens: r.get(3)?,
            max_price: r.get(4)?,
            payload_hash: r.get(5)?,
            deadline: r.get(6)?,
            max_attempts: r.get(7)?,
            min_reputation: r.get(8)?,
            state: r.get(9)?,
            attempt: r.get(10)?,
            provider: r.get(11)?,
            ask: r.get(12)?,
            lease_deadline: r.get(13)?,
            payload_bytes: r.get(14)?,
            payload_at: r.get(15)?,
            accepted_at: r.get(16)?,
        })
    }

    fn view(&self) -> Value {
        // A struct of strings, numbers and options: serialising cannot fail.
        serde_json::to_value(self.offered()).unwrap_or(Value::Null)
    }

    fn offered(&self) -> TaskView {
        TaskView {
            task_id: self.task_id.clone(),
            requester: self.requester.clone(),
            model: self.model.clone(),
            max_tokens: self.max_tokens as u64,
            max_price: self.max_price as u64,
            payload_hash: self.payload_hash.clone(),
            deadline: ms_to_rfc3339(self.deadline),
            max_attempts: self.max_attempts,
            min_reputation: self.min_reputation,
            state: self.state.clone(),
            attempt: self.attempt,
            provider: self.provider.clone(),
            ask: self.ask,
            lease_deadline: self.lease_deadline.map(ms_to_rfc3339),
            payload_bytes: self.payload_bytes.map(|b| b as u64),
        }
    }
}

pub fn ms_to_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn load_task(c: &Connection, task_id: &str) -> Result<Task, Fail> {
    let t = c
        .prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE task_id = ?1"))?
        .query_row([task_id], Task::from_row)
        .optional()?;
    match t {
        Some(t) => Ok(t),
        None => reject(Reason::NotFound, format!("no task `{task_id}`")),
    }
}

/// A node's record: settled tasks, failures, distinct paying requesters.
#[derive(Debug, Clone, Copy, Default)]
struct Record {
    successes: i64,
    failures: i64,
    clients: i64,
}

impl Record {
    fn score(self) -> f64 {
        reputation(self.clients, self.failures)
    }

    fn view(self) -> Value {
        json!({ "successes": self.successes, "failures": self.failures, "clients": self.clients,
                "score": self.score() })
    }
}

fn node_reputation(c: &Connection, node: &str) -> rusqlite::Result<Record> {
    Ok(
        c.prepare_cached("SELECT successes, failures, clients FROM nodes WHERE node_id = ?1")?
            .query_row([node], |r| {
                Ok(Record {
                    successes: r.get(0)?,
                    failures: r.get(1)?,
                    clients: r.get(2)?,
                })
            })
            .optional()?
            .unwrap_or_default(),
    )
}

/// A settled task: one more success, and one more client if this is the
/// first paid task from this requester. Reputation counts clients, so two
/// identities trading with each other earn one client each, however often.
fn record_success(c: &Connection, provider: &str, requester: &str, paid: i64) -> rusqlite::Result<()> {
    c.prepare_cached("UPDATE nodes SET successes = successes + 1 WHERE node_id = ?1")?
        .execute([provider])?;
    if paid > 0 {
        let new = c
            .prepare_cached("INSERT OR IGNORE INTO paid_clients(provider, requester) VALUES (?1, ?2)")?
            .execute([provider, requester])?;
        if new == 1 {
            c.prepare_cached("UPDATE nodes SET clients = clients + 1 WHERE node_id = ?1")?
                .execute([provider])?;
        }
    }
    Ok(())
}

/// A failure of the provider's own: counted, and no new lease for the
/// cool-down.
fn record_failure(c: &Connection, s: &Settings, node: &str, now: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "UPDATE nodes SET failures = failures + 1, cooldown_until = MAX(COALESCE(cooldown_until, 0), ?2)
         WHERE node_id = ?1",
    )?
    .execute(params![node, now + s.cooldown_ms])?;
    Ok(())
}

/// Whether the end of `t`'s current lease (a lapse or an abandon at `now`)
/// is its provider's fault. Not when the requester caused it: it never
/// relayed the payload within the grace after the accept, or the task's
/// deadline left the attempt less than [`MIN_WORK_MS`] to work.
fn provider_at_fault(s: &Settings, t: &Task, now: i64) -> bool {
    let accepted = t.accepted_at.unwrap_or(now);
    if t.payload_at.is_none() && now - accepted >= s.payload_grace_ms {
        return false;
    }
    if t.deadline <= now && t.deadline - accepted < MIN_WORK_MS {
        return false;
    }
    true
}

/// The lease of `t` ended at `now`: the provider's own failure costs it a
/// failure, a cool-down and any further attempt of this task; a failure
/// the requester caused costs it nothing. Returns whether it counted.
fn lease_ended(c: &Connection, s: &Settings, t: &Task, now: i64) -> rusqlite::Result<bool> {
    let Some(p) = t.provider.as_deref() else {
        return Ok(false);
    };
    if provider_at_fault(s, t, now) {
        record_failure(c, s, p, now)?;
        Ok(true)
    } else {
        c.prepare_cached("DELETE FROM attempt_holders WHERE task_id = ?1 AND node_id = ?2")?
            .execute(params![t.task_id, p])?;
        Ok(false)
    }
}

/// The operator credits `node` with `amount` RUV from the issuer: one
/// journal entry (`operator_grant`), so `market ledger --verify` and the
/// totals account for it. The node must have logged in once (a mistyped
/// id is refused, not funded). Returns the journal id and the new balance.
pub fn operator_grant(c: &Connection, node: &str, amount: i64, now: i64) -> Result<(i64, i64), Fail> {
    if !(1..=MAX_GRANT).contains(&amount) {
        return reject(Reason::InvalidField, format!("a grant must be 1..={MAX_GRANT} RUV"));
    }
    let known = c
        .prepare_cached("SELECT 1 FROM nodes WHERE node_id = ?1")?
        .query_row([node], |_| Ok(()))
        .optional()?
        .is_some();
    if !known {
        return reject(
            Reason::NotFound,
            format!("no node `{node}` has logged in to this coordinator"),
        );
    }
    let account = node_account(node);
    ledger::open_account(c, &account, "node")?;
    // The issuer may go negative by design; post() never refuses here.
    let _ = ledger::post(c, now, "operator_grant", None, &[(ISSUER, -amount), (&account, amount)])?;
    let jid: i64 = c.query_row("SELECT MAX(id) FROM journal", [], |r| r.get(0))?;
    Ok((jid, ledger::balance(c, &account)?))
}

fn move_money(c: &Connection, now: i64, memo: &str, task: &str, postings: &[(&str, i64)]) -> Result<(), Fail> {
    match ledger::post(c, now, memo, Some(task), postings)? {
        Ok(()) => Ok(()),
        Err(o) => reject(
            Reason::InsufficientBalance,
            format!("balance {} cannot cover {} RUV", o.balance, o.needed),
        ),
    }
}

/// A node logged in: register it (granting the initial RUV once) and keep
/// its offers alive. Returns (balance, granted now).
pub fn login(
    c: &Connection,
    s: &Settings,
    id: &PublicIdentity,
    proof: &IdentityProof,
    now: i64,
) -> rusqlite::Result<(i64, i64)> {
    let new = c
        .prepare_cached(
            "INSERT INTO nodes(node_id, ed25519, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(node_id) DO NOTHING",
        )?
        .execute(params![id.node_id, id.ed25519, now])?
        == 1;
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
    c.prepare_cached("UPDATE nodes SET identity = ?2, proof = ?3, last_seen = ?4 WHERE node_id = ?1")?
        .execute(params![
            id.node_id,
            serde_json::to_string(id).expect("identities serialise"),
            serde_json::to_string(&json!({ "nonce": proof.nonce, "sig": proof.sig })).expect("json serialises"),
            now
        ])?;
    c.prepare_cached("UPDATE offers SET disconnected_at = NULL WHERE node_id = ?1 AND state = 'active'")?
        .execute([&id.node_id])?;
    // Message ids are remembered for a day: long enough for any retry, and
    // pruned per node (a primary-key prefix scan) so the table stays small.
    c.prepare_cached("DELETE FROM requests WHERE node_id = ?1 AND ts < ?2")?
        .execute(params![id.node_id, now - ID_RETENTION_MS])?;
    Ok((ledger::balance(c, &account)?, granted))
}

/// `node` has a session again: offer its open tasks, held back while it
/// was away, to the providers online now.
pub fn requester_back(
    c: &Connection,
    node: &str,
    now: i64,
    online: &dyn Fn(&str) -> bool,
    out: &mut Outbox,
) -> Result<(), Fail> {
    let open: Vec<Task> = c
        .prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE requester = ?1 AND state = 'open' AND deadline > ?2
             ORDER BY created_at LIMIT 256"
        ))?
        .query_map(params![node, now], Task::from_row)?
        .collect::<Result<_, _>>()?;
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
pub fn disconnected(c: &Connection, node: &str, now: i64, out: &mut Outbox) -> Result<(), Fail> {
    c.prepare_cached(
        "UPDATE offers SET disconnected_at = ?2 WHERE node_id = ?1 AND state = 'active' AND disconnected_at IS NULL",
    )?
    .execute(params![node, now])?;
    let waiting: Vec<Task> = c
        .prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE requester = ?1 AND state = 'assigned' AND payload_at IS NULL"
        ))?
        .query_map([node], Task::from_row)?
        .collect::<Result<_, _>>()?;
    for t in waiting {
        c.prepare_cached(
            "UPDATE tasks SET state = 'open', attempt = attempt + 1, max_attempts = max_attempts + 1, provider = NULL,
               offer_id = NULL, ask = NULL, lease_deadline = NULL, updated_at = ?2 WHERE task_id = ?1",
        )?
        .execute(params![t.task_id, now])?;
        if let Some(p) = t.provider {
            // Not its fault: it may take the task again.
            c.prepare_cached("DELETE FROM attempt_holders WHERE task_id = ?1 AND node_id = ?2")?
                .execute([&t.task_id, &p])?;
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
pub fn all_disconnected(c: &Connection, now: i64) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE offers SET disconnected_at = ?1 WHERE state = 'active' AND disconnected_at IS NULL",
        [now],
    )?;
    Ok(())
}

fn check_name(field: &str, s: &str) -> Result<(), Fail> {
    let ok =
        !s.is_empty() && s.len() <= MAX_NAME && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
    if ok {
        Ok(())
    } else {
        reject(
            Reason::InvalidField,
            format!("`{field}` must be 1..={MAX_NAME} characters of [A-Za-z0-9-_.:/]"),
        )
    }
}

fn check_range(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), Fail> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        reject(
            Reason::InvalidField,
            format!("`{field}` must be in {lo}..={hi}, got {v}"),
        )
    }
}

/// Online providers whose active offer fits `task`, cheapest first.
/// Not a provider cooling down, nor one that failed an earlier attempt of
/// this task.
fn matching_providers(
    c: &Connection,
    task: &Task,
    now: i64,
    online: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>, Fail> {
    let mut stmt = c.prepare_cached(
        "SELECT o.node_id, o.slots,
            (SELECT COUNT(*) FROM tasks t WHERE t.offer_id = o.offer_id AND t.state IN ('assigned','delivered')),
            COALESCE(n.clients, 0), COALESCE(n.failures, 0)
         FROM offer_models m JOIN offers o ON o.offer_id = m.offer_id LEFT JOIN nodes n ON n.node_id = o.node_id
         WHERE m.model = ?3 AND o.state = 'active' AND o.disconnected_at IS NULL AND o.price <= ?1 AND o.node_id != ?2
           AND COALESCE(n.cooldown_until, 0) <= ?4
           AND NOT EXISTS (SELECT 1 FROM attempt_holders h WHERE h.task_id = ?5 AND h.node_id = o.node_id)
         ORDER BY o.price LIMIT 1024",
    )?;
    let rows = stmt.query_map(
        params![task.max_price, task.requester, task.model, now, task.task_id],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        },
    )?;
    let mut out: Vec<String> = Vec::new();
    for row in rows {
        let (node, slots, used, s, f) = row?;
        if used < slots && reputation(s, f) >= task.min_reputation && online(&node) && !out.contains(&node) {
            out.push(node);
            if out.len() >= FANOUT {
                break;
            }
        }
    }
    Ok(out)
}

/// Offer `task` to matching online providers, if its requester is online:
/// only the requester can send a lease holder the payload, so a task whose
/// requester is away waits for its return ([`requester_back`]).
fn announce(
    c: &Connection,
    task: &Task,
    now: i64,
    online: &dyn Fn(&str) -> bool,
    out: &mut Outbox,
) -> Result<(), Fail> {
    if !online(&task.requester) {
        return Ok(());
    }
    for node in matching_providers(c, task, now, online)? {
        out.push((node, Event::TaskOffered { task: task.offered() }));
    }
    Ok(())
}

/// Apply one authenticated request. `Ok` carries the result document; the
/// caller commits (or rolls back to its savepoint on `Err`).
pub fn apply(
    c: &Connection,
    s: &Settings,
    node: &str,
    req: Request,
    now: i64,
    online: &dyn Fn(&str) -> bool,
    out: &mut Outbox,
) -> Result<Value, Fail> {
    match req {
        Request::Hello { .. } => reject(Reason::AlreadyAuthenticated, "this session is already authenticated"),
        Request::Status {} => status(c, node, now),
        Request::Reputation { node_id } => {
            let known: bool = c
                .prepare_cached("SELECT 1 FROM nodes WHERE node_id = ?1")?
                .query_row([&node_id], |_| Ok(true))
                .optional()?
                .unwrap_or(false);
            if !known {
                return reject(Reason::NotFound, format!("no node `{node_id}`"));
            }
            let mut v = node_reputation(c, &node_id)?.view();
            v["node_id"] = json!(node_id);
            Ok(v)
        }
        Request::Offer {
            slots,
            price,
            models,
            ttl_secs,
        } => {
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
            c.prepare_cached(
                "INSERT INTO offers(offer_id, node_id, slots, price, models, created_at, expires_at, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active')",
            )?
            .execute(params![
                offer_id,
                node,
                slots,
                price as i64,
                serde_json::to_string(&models).expect("strings serialise"),
                now,
                expires
            ])?;
            for m in &models {
                c.prepare_cached("INSERT OR IGNORE INTO offer_models(offer_id, model) VALUES (?1, ?2)")?
                    .execute(params![offer_id, m])?;
            }
            // Tell the new provider about open tasks it could take right now.
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE state = 'open' AND max_price >= ?1 AND requester != ?2
                 ORDER BY created_at LIMIT 256"
            ))?;
            let score = node_reputation(c, node)?.score();
            let open: Vec<Task> = if cooling_until(c, node, now)?.is_some() {
                Vec::new()
            } else {
                stmt.query_map(params![price as i64, node], Task::from_row)?
                    .collect::<Result<_, _>>()?
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
                out.push((node.to_string(), Event::TaskOffered { task: t.offered() }));
            }
            Ok(json!({ "offer_id": offer_id, "expires": ms_to_rfc3339(expires) }))
        }
        Request::Withdraw { offer_id } => {
            let owner: Option<(String, String)> = c
                .prepare_cached("SELECT node_id, state FROM offers WHERE offer_id = ?1")?
                .query_row([&offer_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            match owner {
                None => reject(Reason::NotFound, format!("no offer `{offer_id}`")),
                Some((o, _)) if o != node => reject(Reason::NotOwner, "this offer belongs to another node"),
                Some((_, st)) if st != "active" => reject(Reason::WrongState, "this offer is already withdrawn"),
                Some(_) => {
                    c.prepare_cached("UPDATE offers SET state = 'withdrawn' WHERE offer_id = ?1")?
                        .execute([&offer_id])?;
                    Ok(json!({ "offer_id": offer_id, "state": "withdrawn" }))
                }
            }
        }
        Request::Post {
            model,
            max_tokens,
            max_price,
            payload_hash,
            deadline_secs,
            max_attempts,
            min_reputation,
            payload_bytes,
        } => {
            check_name("model", &model)?;
            if let Some(b) = payload_bytes {
                check_range("payload_bytes", b, 1, 1 << 40)?;
            }
            check_range("max_tokens", max_tokens, 1, 10_000_000)?;
            check_range("max_price", max_price, 1, MAX_PRICE)?;
            check_range("deadline_secs", deadline_secs, 1, 7 * 86_400)?;
            let attempts = max_attempts.unwrap_or(s.default_attempts);
            check_range("max_attempts", attempts as u64, 1, MAX_ATTEMPTS as u64)?;
            let min_rep = min_reputation.unwrap_or(0.0);
            if !(0.0..=1.0).contains(&min_rep) {
                return reject(Reason::InvalidField, "`min_reputation` must be in 0..=1");
            }
            if payload_hash.len() != 64 || !payload_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return reject(Reason::InvalidField, "`payload_hash` must be 64 hex digits (SHA-256)");
            }
            let task_id = new_id("t-");
            let escrow = escrow_account(&task_id);
            ledger::open_account(c, &escrow, "escrow")?;
            let price = max_price as i64;
            let account = node_account(node);
            match ledger::post(
                c,
                now,
                "escrow",
                Some(&task_id),
                &[(&account, -price), (&escrow, price)],
            )? {
                Ok(()) => {}
                Err(o) => {
                    return reject(
                        Reason::InsufficientBalance,
                        format!(
                            "your balance of {} RUV is short of the {price} RUV max price to lock in escrow",
                            o.balance
                        ),
                    )
                }
            }
            let task = Task {
                task_id: task_id.clone(),
                requester: node.to_string(),
                model,
                max_tokens: max_tokens as i64,
                max_price: price,
                payload_hash: payload_hash.to_ascii_lowercase(),
                deadline: now + deadline_secs as i64 * 1000,
                max_attempts: attempts,
                min_reputation: min_rep,
                state: "open".into(),
                attempt: 1,
                provider: None,
                ask: None,
                lease_deadline: None,
                payload_bytes: payload_bytes.map(|b| b as i64),
                payload_at: None,
                accepted_at: None,
            };
            c.prepare_cached(
                "INSERT INTO tasks(task_id, requester, model, max_tokens, max_price, payload_hash, deadline,
                   max_attempts, min_reputation, state, attempt, created_at, updated_at, payload_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'open', 1, ?10, ?10, ?11)",
            )?
            .execute(params![
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
                task.payload_bytes
            ])?;
            announce(c, &task, now, online, out)?;
            Ok(json!({ "task": task.view(), "escrow": price }))
        }
        Request::Raise { task_id, max_price } => {
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
                c.prepare_cached("UPDATE tasks SET max_price = ?2, updated_at = ?3 WHERE task_id = ?1")?
                    .execute(params![task_id, new, now])?;
                if t.state == "open" {
                    let t2 = Task { max_price: new, ..t };
                    announce(c, &t2, now, online, out)?;
                }
            }
            Ok(json!({ "task_id": task_id, "max_price": new, "escrow_added": diff }))
        }
        Request::Accept { task_id, attempt } => {
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
            if let Some(until) = cooling_until(c, node, now)? {
                return reject(
                    Reason::CoolingDown,
                    format!(
                        "you gave up or lost a lease: no new lease until {}",
                        ms_to_rfc3339(until)
                    ),
                );
            }
            if held_before(c, &task_id, node)? {
                return reject(
                    Reason::AlreadyAttempted,
                    "you held an earlier attempt of this task; another node gets this one",
                );
            }
            let score = node_reputation(c, node)?.score();
            if score < t.min_reputation {
                return reject(
                    Reason::ReputationTooLow,
                    format!(
                        "your reputation {score:.3} is below the requester's minimum {}",
                        t.min_reputation
                    ),
                );
            }
            let offer: Option<(String, i64)> = c
                .prepare_cached(
                    "SELECT o.offer_id, o.price FROM offers o JOIN offer_models m ON m.offer_id = o.offer_id AND m.model = ?4
                     WHERE o.node_id = ?1 AND o.state = 'active' AND o.price <= ?2 AND o.expires_at > ?3
                       AND o.slots > (SELECT COUNT(*) FROM tasks t
                                      WHERE t.offer_id = o.offer_id AND t.state IN ('assigned','delivered'))
                     ORDER BY o.price LIMIT 1",
                )?
                .query_row(params![node, t.max_price, now, t.model], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((offer_id, ask)) = offer else {
                return reject(
                    Reason::NoMatchingOffer,
                    "you have no active offer with a free slot, this model and a price within the bid",
                );
            };
            let lease = now + s.lease_ms;
            c.prepare_cached(
                "UPDATE tasks SET state = 'assigned', provider = ?2, offer_id = ?3, ask = ?4, lease_deadline = ?5,
                   updated_at = ?6, payload_at = NULL, accepted_at = ?6 WHERE task_id = ?1",
            )?
            .execute(params![task_id, node, offer_id, ask, lease, now])?;
            c.prepare_cached("INSERT OR IGNORE INTO attempt_holders(task_id, node_id) VALUES (?1, ?2)")?
                .execute(params![task_id, node])?;
            out.push((
                t.requester.clone(),
                Event::Assigned {
                    task_id: task_id.clone(),
                    attempt,
                    provider: node.to_string(),
                },
            ));
            for other in matching_providers(c, &t, now, online)? {
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
        Request::Renew { task_id, attempt } => {
            let t = leased_to(c, &task_id, node, attempt)?;
            if t.state != "assigned" {
                return reject(Reason::WrongState, format!("task is {}", t.state));
            }
            let lease = now + s.lease_ms;
            c.prepare_cached("UPDATE tasks SET lease_deadline = ?2 WHERE task_id = ?1")?
                .execute(params![task_id, lease])?;
            Ok(json!({ "task_id": task_id, "attempt": attempt, "lease_deadline": ms_to_rfc3339(lease) }))
        }
        Request::Payload { task_id, attempt, data } => {
            let t = load_task(c, &task_id)?;
            if t.requester != node {
                return reject(Reason::NotOwner, "only the requester sends the payload");
            }
            if attempt != t.attempt {
                return reject(Reason::StaleAttempt, format!("current attempt is {}", t.attempt));
            }
            if t.state != "assigned" {
                return reject(Reason::WrongState, format!("task is {}", t.state));
            }
            let provider = t.provider.clone().unwrap_or_default();
            let bytes = data.len();
            // Once per attempt: the lease holder needs one copy, and a
            // requester repeating it would only fill the holder's queue.
            let first = c
                .prepare_cached("UPDATE tasks SET payload_at = ?2 WHERE task_id = ?1 AND payload_at IS NULL")?
                .execute(params![task_id, now])?;
            if first == 0 {
                return reject(
                    Reason::WrongState,
                    format!("the payload of attempt {attempt} was already relayed; it is sent once per attempt"),
                );
            }
            out.push((
                provider.clone(),
                Event::Payload {
                    task_id: task_id.clone(),
                    attempt,
                    data,
                },
            ));
            Ok(json!({ "task_id": task_id, "attempt": attempt, "relayed_to": provider, "bytes": bytes }))
        }
        Request::Deliver { task_id, attempt, data } => {
            let t = leased_to(c, &task_id, node, attempt)?;
            if t.state != "assigned" {
                return reject(Reason::WrongState, format!("task is {}", t.state));
            }
            let bytes = data.len();
            c.prepare_cached(
                "UPDATE tasks SET state = 'delivered', result = ?2, updated_at = ?3, delivered_at = ?3 WHERE task_id = ?1",
            )?
                .execute(params![task_id, data, now])?;
            out.push((
                t.requester.clone(),
                Event::Delivered {
                    task_id: task_id.clone(),
                    attempt,
                    data,
                },
            ));
            Ok(json!({ "task_id": task_id, "attempt": attempt, "state": "delivered", "bytes": bytes }))
        }
        Request::Identity { node_id } => {
            let row: Option<(Option<String>, Option<String>)> = c
                .prepare_cached("SELECT identity, proof FROM nodes WHERE node_id = ?1")?
                .query_row([&node_id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((Some(identity), Some(proof))) = row else {
                return reject(Reason::NotFound, format!("no identity known for node `{node_id}`"));
            };
            let identity: Value = serde_json::from_str(&identity).unwrap_or(Value::Null);
            let proof: Value = serde_json::from_str(&proof).unwrap_or(Value::Null);
            Ok(json!({ "identity": identity, "nonce": proof["nonce"], "sig": proof["sig"] }))
        }
        Request::Result { task_id } => {
            let t = load_task(c, &task_id)?;
            if t.requester != node {
                return reject(Reason::NotOwner, "only the requester reads a task's result");
            }
            if t.state != "delivered" {
                return reject(
                    Reason::WrongState,
                    format!("task is {}; a result is held only while it is delivered", t.state),
                );
            }
            let data: Option<String> = c
                .prepare_cached("SELECT result FROM tasks WHERE task_id = ?1")?
                .query_row([&task_id], |r| r.get(0))?;
            Ok(
                json!({ "task_id": task_id, "attempt": t.attempt, "provider": t.provider,
                       "payload_hash": t.payload_hash, "data": data }),
            )
        }
        Request::Task { task_id } => {
            let t = load_task(c, &task_id)?;
            if t.requester != node {
                return reject(Reason::NotOwner, "only the requester looks up a task");
            }
            Ok(t.view())
        }
        Request::Abandon {
            task_id,
            attempt,
            reason,
            data,
        } => {
            let t = leased_to(c, &task_id, node, attempt)?;
            if t.state != "assigned" {
                return reject(Reason::WrongState, format!("task is {}", t.state));
            }
            // Giving a lease back is the provider's failure whatever the
            // reason it gives (a price-0 offer could take and drop every
            // attempt of a task for free otherwise), unless the requester
            // caused it (see `provider_at_fault`).
            lease_ended(c, s, &t, now)?;
            out.push((
                t.requester.clone(),
                Event::Abandoned {
                    task_id: task_id.clone(),
                    attempt,
                    provider: node.to_string(),
                    reason,
                    data,
                },
            ));
            let why = format!("attempt {attempt} {}", reason.as_str());
            let state = reopen_or_refund(c, t, now, &why, online, out)?;
            Ok(json!({ "task_id": task_id, "attempt": attempt, "state": state }))
        }
        Request::Settle { task_id, attempt } => finish(c, node, &task_id, attempt, true, now, out),
        Request::Reject { task_id, attempt } => finish(c, node, &task_id, attempt, false, now, out),
    }
}

/// The task, checked to be leased to `node` under `attempt`.
fn leased_to(c: &Connection, task_id: &str, node: &str, attempt: u32) -> Result<Task, Fail> {
    let t = load_task(c, task_id)?;
    if t.provider.as_deref() != Some(node) && attempt == t.attempt {
        return reject(Reason::NotOwner, "this task is leased to another node");
    }
    if attempt != t.attempt {
        return reject(
            Reason::StaleAttempt,
            format!("attempt {attempt} is fenced off: the task is on attempt {}", t.attempt),
        );
    }
    if t.provider.as_deref() != Some(node) {
        return reject(Reason::NotOwner, "this task is leased to another node");
    }
    Ok(t)
}

/// When `node`'s cool-down ends, if it has not ended by `now`.
fn cooling_until(c: &Connection, node: &str, now: i64) -> rusqlite::Result<Option<i64>> {
    let until: Option<i64> = c
        .prepare_cached("SELECT cooldown_until FROM nodes WHERE node_id = ?1")?
        .query_row([node], |r| r.get(0))
        .optional()?
        .flatten();
    Ok(until.filter(|u| *u > now))
}

/// Did `node` hold an earlier attempt of `task_id` and fail it?
fn held_before(c: &Connection, task_id: &str, node: &str) -> rusqlite::Result<bool> {
    Ok(
        c.prepare_cached("SELECT 1 FROM attempt_holders WHERE task_id = ?1 AND node_id = ?2")?
            .query_row([task_id, node], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

/// Settle (pay the ask, refund the rest) or reject (refund all) a delivered task.
fn finish(
    c: &Connection,
    node: &str,
    task_id: &str,
    attempt: u32,
    pay: bool,
    now: i64,
    out: &mut Outbox,
) -> Result<Value, Fail> {
    let t = load_task(c, task_id)?;
    if t.requester != node {
        return reject(Reason::NotOwner, "only the requester settles a task");
    }
    if attempt != t.attempt {
        return reject(Reason::StaleAttempt, format!("current attempt is {}", t.attempt));
    }
    if t.state != "delivered" {
        return reject(
            Reason::WrongState,
            format!("task is {}; only a delivered task settles", t.state),
        );
    }
    let provider = t.provider.clone().unwrap_or_default();
    let ask = if pay { t.ask.unwrap_or(0).min(t.max_price) } else { 0 };
    let refund = t.max_price - ask;
    let escrow = escrow_account(task_id);
    let (pacc, racc) = (node_account(&provider), node_account(&t.requester));
    move_money(
        c,
        now,
        if pay { "settle" } else { "reject" },
        task_id,
        &[(&escrow, -t.max_price), (&pacc, ask), (&racc, refund)],
    )?;
    let state = if pay { "settled" } else { "refunded" };
    c.prepare_cached("UPDATE tasks SET state = ?2, result = NULL, updated_at = ?3 WHERE task_id = ?1")?
        .execute(params![task_id, state, now])?;
    if pay {
        record_success(c, &provider, &t.requester, ask)?;
    } else {
        // A failure, as before, but no cool-down: a requester's verdict
        // costs it nothing, so it must not be able to bench a provider.
        c.prepare_cached("UPDATE nodes SET failures = failures + 1 WHERE node_id = ?1")?
            .execute([&provider])?;
    }
    c.prepare_cached("DELETE FROM attempt_holders WHERE task_id = ?1")?
        .execute([task_id])?;
    let ev = if pay {
        Event::Settled {
            task_id: task_id.to_string(),
            attempt,
            paid: ask,
            refunded: refund,
        }
    } else {
        Event::Refunded {
            task_id: task_id.to_string(),
            amount: refund,
            why: "rejected by the requester".into(),
        }
    };
    out.push((provider, ev));
    Ok(json!({ "task_id": task_id, "attempt": attempt, "state": state, "paid": ask, "refunded": refund }))
}

/// What the clock did in one tick.
#[derive(Debug, Default)]
pub struct TickReport {
    pub lapsed: usize,
    pub refunded: usize,
    pub expired: usize,
    pub offers_withdrawn: usize,
    pub auto_settled: usize,
}

/// After a lapsed or abandoned lease: re-open the task under the next
/// attempt (fencing off the old one), or refund it after its last attempt
/// or past its deadline. Returns the task's new state.
fn reopen_or_refund(
    c: &Connection,
    t: Task,
    now: i64,
    last_why: &str,
    online: &dyn Fn(&str) -> bool,
    out: &mut Outbox,
) -> Result<&'static str, Fail> {
    if t.attempt < t.max_attempts && t.deadline > now {
        let next = t.attempt + 1;
        c.prepare_cached(
            "UPDATE tasks SET state = 'open', attempt = ?2, provider = NULL, offer_id = NULL, ask = NULL,
               lease_deadline = NULL, updated_at = ?3 WHERE task_id = ?1",
        )?
        .execute(params![t.task_id, next, now])?;
        let reopened = Task {
            attempt: next,
            state: "open".into(),
            provider: None,
            ask: None,
            lease_deadline: None,
            ..t
        };
        announce(c, &reopened, now, online, out)?;
        Ok("open")
    } else {
        let why = if t.deadline <= now { "deadline passed" } else { last_why };
        refund(c, &t, "refunded", why, now, out)?;
        Ok("refunded")
    }
}

/// Apply the clock: lapse leases (re-offer or refund), expire open tasks,
/// withdraw expired and abandoned offers.
pub fn tick(
    c: &Connection,
    s: &Settings,
    now: i64,
    online: &dyn Fn(&str) -> bool,
    out: &mut Outbox,
) -> Result<TickReport, Fail> {
    let mut rep = TickReport::default();
    let lapsed: Vec<Task> = c
        .prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE state = 'assigned' AND (lease_deadline < ?1 OR deadline < ?1) LIMIT ?2"
        ))?
        .query_map(params![now, TICK_ROWS], Task::from_row)?
        .collect::<Result<_, _>>()?;
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
    let stale: Vec<(String, String, u32)> = c
        .prepare_cached(
            "SELECT task_id, requester, attempt FROM tasks WHERE state = 'delivered' AND delivered_at < ?1 LIMIT ?2",
        )?
        .query_map(params![now - s.settle_ttl_ms, TICK_ROWS], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    for (task_id, requester, attempt) in stale {
        rep.auto_settled += 1;
        finish(c, &requester, &task_id, attempt, true, now, out)?;
    }
    let expired: Vec<Task> = c
        .prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE state = 'open' AND deadline < ?1 LIMIT ?2"
        ))?
        .query_map(params![now, TICK_ROWS], Task::from_row)?
        .collect::<Result<_, _>>()?;
    for t in expired {
        rep.expired += 1;
        refund(c, &t, "expired", "no provider took it before the deadline", now, out)?;
    }
    rep.offers_withdrawn = c
        .prepare_cached(
            "UPDATE offers SET state = 'withdrawn' WHERE state = 'active'
               AND (expires_at < ?1 OR (disconnected_at IS NOT NULL AND disconnected_at < ?2))",
        )?
        .execute(params![now, now - s.grace_ms])?;
    Ok(rep)
}

fn refund(c: &Connection, t: &Task, state: &str, why: &str, now: i64, out: &mut Outbox) -> Result<(), Fail> {
    let escrow = escrow_account(&t.task_id);
    move_money(
        c,
        now,
        state,
        &t.task_id,
        &[(&escrow, -t.max_price), (&node_account(&t.requester), t.max_price)],
    )?;
    c.prepare_cached(
        "UPDATE tasks SET state = ?2, provider = NULL, offer_id = NULL, ask = NULL, lease_deadline = NULL,
           result = NULL, updated_at = ?3 WHERE task_id = ?1",
    )?
    .execute(params![t.task_id, state, now])?;
    c.prepare_cached("DELETE FROM attempt_holders WHERE task_id = ?1")?
        .execute([&t.task_id])?;
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

/// A node's view: balance, escrow, offers, tasks, reputation, totals.
pub fn status(c: &Connection, node: &str, now: i64) -> Result<Value, Fail> {
    let balance = ledger::balance(c, &node_account(node))?;
    let escrow: i64 = c
        .prepare_cached(
            "SELECT COALESCE(SUM(max_price), 0) FROM tasks WHERE requester = ?1 AND state IN ('open','assigned','delivered')",
        )?
        .query_row([node], |r| r.get(0))?;
    let offers: Vec<Value> = c
        .prepare_cached(
            "SELECT offer_id, slots, price, models, expires_at, disconnected_at FROM offers
             WHERE node_id = ?1 AND state = 'active' ORDER BY created_at",
        )?
        .query_map([node], |r| {
            let models: String = r.get(3)?;
            Ok(json!({
                "offer_id": r.get::<_, String>(0)?, "slots": r.get::<_, i64>(1)?, "price": r.get::<_, i64>(2)?,
                "models": serde_json::from_str::<Value>(&models).unwrap_or(Value::Null),
                "expires": ms_to_rfc3339(r.get(4)?), "connected": r.get::<_, Option<i64>>(5)?.is_none(),
            }))
        })?
        .collect::<Result<_, _>>()?;
    let tasks: Vec<Value> = c
        .prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks WHERE requester = ?1 OR provider = ?1 ORDER BY created_at DESC LIMIT 100"
        ))?
        .query_map([node], Task::from_row)?
        .map(|t| t.map(|t| t.view()))
        .collect::<Result<_, _>>()?;
    let record = node_reputation(c, node)?;
    let cooldown = cooling_until(c, node, now)?.map(ms_to_rfc3339);
    let totals = ledger::totals(c)?;
    let mut by_state = serde_json::Map::new();
    let mut stmt = c.prepare_cached("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        let (k, n) = row?;
        by_state.insert(k, n.into());
    }
    let active_offers: i64 = c.query_row("SELECT COUNT(*) FROM offers WHERE state = 'active'", [], |r| r.get(0))?;
    let nodes: i64 = c.query_row("SELECT COUNT(*) FROM nodes", [], |r| r.get(0))?;
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
