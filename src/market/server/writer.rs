//! The single writer: one thread owns the SQLite connection and applies
//! the requests of many nodes in one transaction (group commit), replying
//! only after that transaction is durable. A refused request rolls back to
//! its own savepoint, so it changes nothing while its neighbours in the
//! batch still commit. Events for nodes leave through each session's
//! bounded send queue ([`Outbound`]) once the transaction commits.

use std::collections::HashMap;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;

use super::book::{self, Fail, Settings};
use super::ledger;
use super::metrics::{Book, Metrics};
use super::now_ms;
use super::session::Outbound;
use crate::crypto::keys::PublicIdentity;
use crate::market::protocol::{encode_event, Event, IdentityProof, Reason, Rejection, Request};

/// Answer to a login: (balance, granted now) or why it failed.
pub type LoginReply = oneshot::Sender<Result<(i64, i64), String>>;

/// What connection tasks ask of the writer.
pub enum Cmd {
    Login {
        identity: PublicIdentity,
        proof: IdentityProof,
        conn_id: u64,
        tx: Outbound,
        reply: LoginReply,
    },
    Request {
        node: String,
        id: String,
        req: Request,
        reply: oneshot::Sender<String>,
    },
    Gone {
        node: String,
        conn_id: u64,
    },
    Shutdown,
}

/// Read the order book's and ledger's gauges for `/metrics`.
pub fn refresh_gauges(c: &Connection, m: &Metrics) {
    let offers = c
        .query_row("SELECT COUNT(*) FROM offers WHERE state = 'active'", [], |r| r.get(0))
        .unwrap_or(0);
    let tasks = c
        .prepare_cached("SELECT state, COUNT(*) FROM tasks GROUP BY state")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap_or_default();
    let totals = ledger::totals(c).unwrap_or_default();
    m.set_book(Book {
        offers_active: offers,
        tasks,
        totals,
    });
}

const BATCH_MAX: usize = 512;
const TICK_EVERY: Duration = Duration::from_millis(100);
const GAUGES_EVERY: Duration = Duration::from_secs(1);

pub fn error_frame(re: Option<String>, r: Rejection) -> String {
    encode_event(&Event::Error {
        re,
        reason: r.reason,
        message: r.message,
        original: r.original,
    })
}

/// The single writer: batches requests into one durable transaction.
pub fn writer(mut conn: Connection, s: Settings, rx: std_mpsc::Receiver<Cmd>, metrics: Arc<Metrics>) {
    let mut sessions: HashMap<String, (u64, Outbound)> = HashMap::new();
    let mut next_tick = Instant::now();
    let mut next_gauges = Instant::now() + GAUGES_EVERY;
    let mut stopping = false;
    while !stopping {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let mut batch = Vec::new();
        match rx.recv_timeout(wait) {
            Ok(c) => batch.push(c),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        }
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let now = now_ms();
        let tick_due = Instant::now() >= next_tick;
        let mut replies: Vec<(oneshot::Sender<String>, String)> = Vec::new();
        let mut logins: Vec<(LoginReply, (i64, i64))> = Vec::new();
        let mut out: book::Outbox = Vec::new();
        let mut ops = 0u64;
        let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                fail_batch(batch, &e.to_string(), &metrics, &mut stopping);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        for cmd in batch {
            match cmd {
                Cmd::Shutdown => stopping = true,
                Cmd::Login {
                    identity,
                    proof,
                    conn_id,
                    tx: out_tx,
                    reply,
                } => match book::login(&tx, &s, &identity, &proof, now) {
                    Ok(r) => {
                        if let Some((old_id, old)) = sessions.insert(identity.node_id.clone(), (conn_id, out_tx)) {
                            if old_id != conn_id {
                                old.push(encode_event(&Event::Replaced {}));
                                old.close();
                            }
                        }
                        // Its open tasks were held back while it was away.
                        let online = |n: &str| sessions.contains_key(n);
                        let _ = book::requester_back(&tx, &identity.node_id, now, &online, &mut out);
                        ops += 1;
                        logins.push((reply, r));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                },
                Cmd::Gone { node, conn_id } => {
                    if sessions.get(&node).is_some_and(|(id, _)| *id == conn_id) {
                        sessions.remove(&node);
                        let _ = book::disconnected(&tx, &node, now, &mut out);
                    }
                }
                Cmd::Request { node, id, req, reply } => {
                    let frame = apply_one(&tx, &s, &node, &id, req, now, &sessions, &mut out, &metrics);
                    if frame.1 {
                        ops += 1;
                    }
                    replies.push((reply, frame.0));
                }
            }
        }
        if tick_due {
            next_tick = Instant::now() + TICK_EVERY;
            if let Ok(sp) = tx.unchecked_transaction_savepoint() {
                let online = |n: &str| sessions.contains_key(n);
                let mut tick_out = Vec::new();
                match book::tick(&sp, &s, now, &online, &mut tick_out) {
                    Ok(_) => {
                        if sp.commit().is_ok() {
                            out.extend(tick_out);
                        }
                    }
                    Err(_) => drop(sp),
                }
            }
        }
        match tx.commit() {
            Ok(()) => {
                metrics.commits.inc();
                metrics.ops_committed.inc_by(ops);
                for (reply, frame) in replies {
                    let _ = reply.send(frame);
                }
                for (reply, r) in logins {
                    let _ = reply.send(Ok(r));
                }
                for (node, ev) in out {
                    // A session whose queue is full is being closed; its
                    // events are dropped (it is told what it missed by
                    // `status` and `task` when it is back).
                    if let Some((_, tx)) = sessions.get(&node) {
                        tx.push(encode_event(&ev));
                    }
                }
            }
            Err(e) => {
                for (reply, _) in replies {
                    metrics.reject(Reason::Internal);
                    let _ = reply.send(error_frame(
                        None,
                        Rejection::new(Reason::Internal, format!("commit failed: {e}")),
                    ));
                }
                for (reply, _) in logins {
                    let _ = reply.send(Err(format!("commit failed: {e}")));
                }
            }
        }
        if Instant::now() >= next_gauges {
            next_gauges = Instant::now() + GAUGES_EVERY;
            refresh_gauges(&conn, &metrics);
        }
    }
    refresh_gauges(&conn, &metrics);
}

fn fail_batch(batch: Vec<Cmd>, why: &str, metrics: &Metrics, stopping: &mut bool) {
    for cmd in batch {
        match cmd {
            Cmd::Request { id, reply, .. } => {
                metrics.reject(Reason::Internal);
                let _ = reply.send(error_frame(Some(id), Rejection::new(Reason::Internal, why)));
            }
            Cmd::Login { reply, .. } => {
                let _ = reply.send(Err(why.to_string()));
            }
            Cmd::Shutdown => *stopping = true,
            Cmd::Gone { .. } => {}
        }
    }
}

/// A savepoint on a shared transaction reference. rusqlite's `savepoint()`
/// wants `&mut`; the writer holds the transaction across the whole batch, so
/// it opens savepoints by hand.
trait SavepointExt {
    fn unchecked_transaction_savepoint(&self) -> rusqlite::Result<Savepoint<'_>>;
}

struct Savepoint<'a> {
    conn: &'a Connection,
    done: bool,
}

impl SavepointExt for Connection {
    fn unchecked_transaction_savepoint(&self) -> rusqlite::Result<Savepoint<'_>> {
        self.prepare_cached("SAVEPOINT op")?.execute([])?;
        Ok(Savepoint {
            conn: self,
            done: false,
        })
    }
}

impl Savepoint<'_> {
    fn commit(mut self) -> rusqlite::Result<()> {
        self.done = true;
        self.conn.prepare_cached("RELEASE op")?.execute([]).map(|_| ())
    }
}

impl std::ops::Deref for Savepoint<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self
                .conn
                .prepare_cached("ROLLBACK TO op")
                .and_then(|mut s| s.execute([]));
            let _ = self.conn.prepare_cached("RELEASE op").and_then(|mut s| s.execute([]));
        }
    }
}

/// Apply one request in its own savepoint. Returns the reply frame and
/// whether state changed.
#[allow(clippy::too_many_arguments)]
fn apply_one(
    tx: &Connection,
    s: &Settings,
    node: &str,
    id: &str,
    req: Request,
    now: i64,
    sessions: &HashMap<String, (u64, Outbound)>,
    out: &mut book::Outbox,
    metrics: &Metrics,
) -> (String, bool) {
    let refuse = |r: Rejection| {
        metrics.reject(r.reason);
        (error_frame(Some(id.to_string()), r), false)
    };
    let seen: rusqlite::Result<Option<String>> = tx
        .prepare_cached("SELECT result FROM requests WHERE node_id = ?1 AND msg_id = ?2")
        .and_then(|mut st| {
            use rusqlite::OptionalExtension;
            st.query_row([node, id], |r| r.get(0)).optional()
        });
    match seen {
        Ok(Some(original)) => {
            let mut r = Rejection::new(Reason::DuplicateId, format!("message id `{id}` was already applied"));
            r.original = serde_json::from_str(&original).ok();
            return refuse(r);
        }
        Ok(None) => {}
        Err(e) => return refuse(Rejection::new(Reason::Internal, e.to_string())),
    }
    // Read-only requests are not remembered: replaying them changes nothing.
    let remember = !matches!(
        req,
        Request::Status {}
            | Request::Reputation { .. }
            | Request::Identity { .. }
            | Request::Result { .. }
            | Request::Task { .. }
    );
    let sp = match tx.unchecked_transaction_savepoint() {
        Ok(sp) => sp,
        Err(e) => return refuse(Rejection::new(Reason::Internal, e.to_string())),
    };
    let online = |n: &str| sessions.contains_key(n);
    let mark = out.len();
    let result = book::apply(&sp, s, node, req, now, &online, out).and_then(|v| {
        if remember {
            sp.prepare_cached("INSERT INTO requests(node_id, msg_id, result, ts) VALUES (?1, ?2, ?3, ?4)")?
                .execute(rusqlite::params![node, id, v.to_string(), now])?;
        }
        Ok(v)
    });
    match result {
        Ok(v) => match sp.commit() {
            Ok(()) => (
                encode_event(&Event::Ok {
                    re: id.to_string(),
                    result: v,
                }),
                remember,
            ),
            Err(e) => {
                out.truncate(mark);
                refuse(Rejection::new(Reason::Internal, e.to_string()))
            }
        },
        Err(f) => {
            out.truncate(mark);
            drop(sp);
            match f {
                Fail::Reject(r) => refuse(r),
                Fail::Sql(e) => refuse(Rejection::new(Reason::Internal, e.to_string())),
            }
        }
    }
}
