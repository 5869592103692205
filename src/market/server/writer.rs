//! The single writer: one thread owns the SQLite connection and applies
//! the requests of many nodes in one transaction (group commit), replying
//! only after that transaction is durable. A refused request rolls back to
//! its own savepoint, so it changes nothing while its neighbours in the
//! batch still commit. Events for nodes leave through each session's
//! bounded send queue ([`Outbound`]) once the transaction commits.
//!
//! The writer keeps which session each node has, reads the clock for every
//! batch and runs the order book's clock ([`book::tick`]). It must not
//! block on a session: it only pushes to bounded queues and answers on
//! one-shot channels.

use std::collections::HashMap;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use super::book::{self, BookRules, Fail};
use super::ledger;
use super::metrics::{Book, Metrics};
use super::savepoint::SavepointExt;
use super::wire::{error_frame, Cmd, LoginReply, Outbound};
use crate::market::protocol::{encode_event, Event, Reason, Rejection, Request};

/// The coordinator's clock, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
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

/// The writer's own state across batches.
struct Writer {
    rules: BookRules,
    metrics: Arc<Metrics>,
    /// Each online node's session: (connection id, send queue).
    sessions: HashMap<String, (u64, Outbound)>,
}

/// What one batch leaves to do once its transaction commits.
#[derive(Default)]
struct Done {
    replies: Vec<(oneshot::Sender<String>, String)>,
    logins: Vec<(LoginReply, (i64, i64))>,
    out: book::Outbox,
    /// Requests and logins that changed state.
    ops: u64,
}

/// The single writer: batches requests into one durable transaction.
pub fn writer(mut conn: Connection, rules: BookRules, rx: std_mpsc::Receiver<Cmd>, metrics: Arc<Metrics>) {
    let mut w = Writer {
        rules,
        metrics,
        sessions: HashMap::new(),
    };
    let mut next_tick = Instant::now();
    let mut next_gauges = Instant::now() + GAUGES_EVERY;
    let mut stopping = false;
    while !stopping {
        let Some(batch) = next_batch(&rx, next_tick.saturating_duration_since(Instant::now())) else {
            break;
        };
        let now = now_ms();
        let tick_due = Instant::now() >= next_tick;
        let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                fail_batch(batch, &e.to_string(), &w.metrics, &mut stopping);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let mut done = Done::default();
        for cmd in batch {
            stopping |= w.apply(&tx, cmd, now, &mut done);
        }
        if tick_due {
            next_tick = Instant::now() + TICK_EVERY;
            w.tick(&tx, now, &mut done.out);
        }
        match tx.commit() {
            Ok(()) => w.committed(done),
            Err(e) => w.commit_failed(done, &e),
        }
        if Instant::now() >= next_gauges {
            next_gauges = Instant::now() + GAUGES_EVERY;
            refresh_gauges(&conn, &w.metrics);
        }
    }
    refresh_gauges(&conn, &w.metrics);
}

/// The next batch: waits up to `wait` for a first command, then takes what
/// is already queued, up to [`BATCH_MAX`]. `None` once every sender is gone.
fn next_batch(rx: &std_mpsc::Receiver<Cmd>, wait: Duration) -> Option<Vec<Cmd>> {
    let mut batch = Vec::new();
    match rx.recv_timeout(wait) {
        Ok(c) => batch.push(c),
        Err(std_mpsc::RecvTimeoutError::Timeout) => {}
        Err(std_mpsc::RecvTimeoutError::Disconnected) => return None,
    }
    while batch.len() < BATCH_MAX {
        match rx.try_recv() {
            Ok(c) => batch.push(c),
            Err(_) => break,
        }
    }
    Some(batch)
}

impl Writer {
    /// Apply one command inside the batch's transaction. True for
    /// [`Cmd::Shutdown`]: the writer stops after this batch.
    fn apply(&mut self, tx: &Connection, cmd: Cmd, now: i64, done: &mut Done) -> bool {
        match cmd {
            Cmd::Shutdown => return true,
            Cmd::Login {
                identity,
                proof,
                conn_id,
                tx: out_tx,
                reply,
            } => match book::login(tx, &self.rules, &identity, &proof, now) {
                Ok(r) => {
                    if let Some((old_id, old)) = self.sessions.insert(identity.node_id.clone(), (conn_id, out_tx)) {
                        if old_id != conn_id {
                            old.push(encode_event(&Event::Replaced {}));
                            old.close();
                        }
                    }
                    // Its open tasks were held back while it was away.
                    let online = |n: &str| self.sessions.contains_key(n);
                    let _ = book::requester_back(tx, &identity.node_id, now, &online, &mut done.out);
                    done.ops += 1;
                    done.logins.push((reply, r));
                }
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                }
            },
            Cmd::Gone { node, conn_id } => {
                if self.sessions.get(&node).is_some_and(|(id, _)| *id == conn_id) {
                    self.sessions.remove(&node);
                    let _ = book::disconnected(tx, &node, now, &mut done.out);
                }
            }
            Cmd::Request { node, id, req, reply } => {
                let (frame, changed) = self.apply_one(tx, &node, &id, req, now, &mut done.out);
                if changed {
                    done.ops += 1;
                }
                done.replies.push((reply, frame));
            }
        }
        false
    }

    /// Run the clock in its own savepoint: its events join the batch's
    /// only if it applied in full.
    fn tick(&self, tx: &Connection, now: i64, out: &mut book::Outbox) {
        if let Ok(sp) = tx.unchecked_transaction_savepoint() {
            let online = |n: &str| self.sessions.contains_key(n);
            let mut tick_out = Vec::new();
            match book::tick(&sp, &self.rules, now, &online, &mut tick_out) {
                Ok(_) => {
                    if sp.commit().is_ok() {
                        out.extend(tick_out);
                    }
                }
                Err(_) => drop(sp),
            }
        }
    }

    /// The batch is durable: answer everyone and send the events.
    fn committed(&self, done: Done) {
        self.metrics.commits.inc();
        self.metrics.ops_committed.inc_by(done.ops);
        for (reply, frame) in done.replies {
            let _ = reply.send(frame);
        }
        for (reply, r) in done.logins {
            let _ = reply.send(Ok(r));
        }
        for (node, ev) in done.out {
            // A session whose queue is full is being closed; its
            // events are dropped (it is told what it missed by
            // `status` and `task` when it is back).
            if let Some((_, tx)) = self.sessions.get(&node) {
                tx.push(encode_event(&ev));
            }
        }
    }

    /// The batch did not commit: nothing of it happened, and everyone
    /// waiting on it is told so.
    fn commit_failed(&self, done: Done, e: &rusqlite::Error) {
        for (reply, _) in done.replies {
            self.metrics.reject(Reason::Internal);
            let _ = reply.send(error_frame(
                None,
                Rejection::new(Reason::Internal, format!("commit failed: {e}")),
            ));
        }
        for (reply, _) in done.logins {
            let _ = reply.send(Err(format!("commit failed: {e}")));
        }
    }

    /// Apply one request in its own savepoint. Returns the reply frame and
    /// whether state changed.
    fn apply_one(
        &self,
        tx: &Connection,
        node: &str,
        id: &str,
        req: Request,
        now: i64,
        out: &mut book::Outbox,
    ) -> (String, bool) {
        let metrics = &self.metrics;
        let refuse = |r: Rejection| {
            metrics.reject(r.reason);
            (error_frame(Some(id.to_string()), r), false)
        };
        let seen: rusqlite::Result<Option<String>> = tx
            .prepare_cached("SELECT result FROM requests WHERE node_id = ?1 AND msg_id = ?2")
            .and_then(|mut st| st.query_row([node, id], |r| r.get(0)).optional());
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
        let online = |n: &str| self.sessions.contains_key(n);
        let mark = out.len();
        let result = book::apply(&sp, &self.rules, node, req, now, &online, out).and_then(|v| {
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
