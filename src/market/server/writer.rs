//! The single writer: one thread owns the store's connection and applies
//! the requests of many nodes in one transaction (group commit), replying
//! only after that transaction is durable. A refused request rolls back to
//! its own savepoint, so it changes nothing while its neighbours in the
//! batch still commit. Events for nodes leave through each session's
//! bounded send queue ([`Outbound`]) once the transaction commits.
//!
//! The writer keeps which session each node has here, reads the clock for
//! every batch and runs the order book's clock ([`book::tick`]). On a
//! shared PostgreSQL database it is also this process's part of the
//! replica set ([`Replica`]): its batches run beside other replicas',
//! locking the rows they decide on, an event for a node on another replica
//! becomes a relay row in the same transaction, and the clock runs on one
//! replica per tick. When the
//! database cannot be reached it refuses every request with `unavailable`
//! and acknowledges nothing, and reconnects by itself.
//!
//! It must not block on a session: it only pushes to bounded queues and
//! answers on one-shot channels.

use std::collections::{BTreeSet, HashMap};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::book::{self, BookRules, Fail};
use super::ledger;
use super::metrics::{Book, Metrics};
use super::replica::{self, Replica, Whereabouts};
use super::store::{args, Db, DbError, Store};
use super::wire::{error_frame, Cmd, LoginReply, Outbound, Relayed};
use crate::market::protocol::{encode_event, Event, Reason, Rejection, Request};

/// The coordinator's clock, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Read the order book's and ledger's gauges for `/metrics`.
pub fn refresh_gauges(db: Db, m: &Metrics) {
    let offers = db
        .count("SELECT COUNT(*) FROM offers WHERE state = 'active'", args![])
        .unwrap_or(0);
    let tasks = db
        .map("SELECT state, COUNT(*) FROM tasks GROUP BY state", args![], |r| {
            Ok((r.get::<String>(0)?, r.get::<i64>(1)?))
        })
        .unwrap_or_default();
    let totals = ledger::totals(db).unwrap_or_default();
    m.set_book(Book {
        offers_active: offers,
        tasks,
        totals,
    });
}

const BATCH_MAX: usize = 512;
const TICK_EVERY: Duration = Duration::from_millis(100);
const GAUGES_EVERY: Duration = Duration::from_secs(1);
/// Between attempts to reach a database that went away.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);

/// The writer's own state across batches.
struct Writer {
    rules: BookRules,
    metrics: Arc<Metrics>,
    /// Each node with a session here: (connection id, send queue).
    sessions: HashMap<String, (u64, Outbound)>,
    /// This process's place among replicas, on PostgreSQL.
    replica: Option<Replica>,
    /// Where other replicas' nodes are, for the batch being applied.
    whereabouts: Whereabouts,
    /// Whether this batch ran the clock (counted once it commits).
    ticked: std::cell::Cell<bool>,
    /// The replicas that this batch left relay rows for: woken once it
    /// commits.
    woken: std::cell::RefCell<BTreeSet<i64>>,
    /// Sessions whose end the book has not heard of yet (the database
    /// could not be reached, or the batch that told it did not commit): it
    /// hears of them in the next batch that commits.
    lost: Vec<(String, u64)>,
}

/// What one batch leaves to do once its transaction commits.
#[derive(Default)]
struct Done {
    /// Each request's reply channel, message id and answer.
    replies: Vec<(oneshot::Sender<String>, String, String)>,
    logins: Vec<(LoginReply, (i64, i64))>,
    out: book::Outbox,
    /// Requests and logins that changed state.
    ops: u64,
    /// Sessions whose end this batch told the book: lost again if it does
    /// not commit.
    ended: Vec<(String, u64)>,
}

/// How the writer reaches its database: the open store, and on PostgreSQL
/// the URL to reconnect to when the connection is lost.
pub struct Conn {
    pub store: Store,
    pub reconnect: Option<String>,
}

/// The single writer: batches requests into one durable transaction.
pub fn writer(
    mut conn: Conn,
    rules: BookRules,
    replica: Option<Replica>,
    rx: std_mpsc::Receiver<Cmd>,
    metrics: Arc<Metrics>,
) {
    let mut w = Writer {
        rules,
        metrics,
        sessions: HashMap::new(),
        replica,
        whereabouts: Whereabouts::default(),
        ticked: std::cell::Cell::new(false),
        woken: Default::default(),
        lost: Vec::new(),
    };
    // Here, not in the caller: the blocking PostgreSQL client must not run
    // on an async runtime's thread.
    refresh_gauges(conn.store.db(), &w.metrics);
    let mut next_tick = Instant::now();
    let mut next_gauges = Instant::now() + GAUGES_EVERY;
    let mut last_reconnect = Instant::now();
    let mut stopping = false;
    while !stopping {
        let Some(batch) = next_batch(&rx, next_tick.saturating_duration_since(Instant::now())) else {
            break;
        };
        if !w.reachable(&mut conn, &mut last_reconnect) {
            fail_batch(
                batch,
                Reason::Unavailable,
                "the market database cannot be reached; nothing was changed",
                &mut w,
                &mut stopping,
            );
            // The clock cannot run without its database: wait for the
            // next command (or the next try) instead of spinning.
            next_tick = Instant::now() + TICK_EVERY;
            continue;
        }
        let started = Instant::now();
        let now = now_ms();
        let tick_due = Instant::now() >= next_tick;
        if let Err(e) = conn.store.begin() {
            let (reason, why) = failure(&e);
            w.metrics.set_db_up(!e.is_unreachable());
            fail_batch(batch, reason, &why, &mut w, &mut stopping);
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let db = conn.store.db();
        w.whereabouts.new_batch(now);
        let mut done = Done::default();
        let beat = match w.replica.as_mut() {
            Some(r) => r.beat(db, now),
            None => Ok(()),
        };
        w.gone_while_down(db, now, &mut done);
        for cmd in batch {
            stopping |= w.apply(db, cmd, now, &mut done);
        }
        if tick_due {
            next_tick = Instant::now() + TICK_EVERY;
            w.tick(db, now, &mut done.out);
        }
        if stopping {
            w.retire(db, now, &mut done.out);
        }
        let routed = beat.and_then(|()| w.route(db, now, std::mem::take(&mut done.out)));
        let woken: Vec<String> = std::mem::take(&mut *w.woken.borrow_mut())
            .into_iter()
            .map(replica::channel)
            .collect();
        let committed = routed.and_then(|local| conn.store.commit_and_notify(&woken).map(|()| local));
        w.metrics.observe_db(started.elapsed());
        match committed {
            Ok(local) => {
                w.metrics.set_db_up(true);
                done.out = local;
                w.committed(done);
            }
            Err(e) => {
                w.ticked.set(false);
                conn.store.rollback();
                w.lost.append(&mut done.ended);
                w.metrics.set_db_up(!e.is_unreachable());
                w.commit_failed(done, &e);
            }
        }
        if Instant::now() >= next_gauges {
            next_gauges = Instant::now() + GAUGES_EVERY;
            refresh_gauges(conn.store.db(), &w.metrics);
        }
    }
    refresh_gauges(conn.store.db(), &w.metrics);
}

/// The reason and message for a batch the database refused.
fn failure(e: &DbError) -> (Reason, String) {
    if e.is_unreachable() {
        (
            Reason::Unavailable,
            format!("the market database cannot be reached ({e}); nothing was changed"),
        )
    } else if e.is_contention() {
        (
            Reason::Unavailable,
            format!("another replica held what this request needed ({e}); nothing was changed, send it again"),
        )
    } else {
        (Reason::Internal, format!("the market database failed: {e}"))
    }
}

/// A request refused because the database failed it.
fn db_rejection(e: &DbError) -> Rejection {
    let (reason, why) = failure(e);
    Rejection::new(reason, why)
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
    /// Whether the database can take a batch now. A PostgreSQL connection
    /// that was lost is opened again, at most every [`RECONNECT_EVERY`];
    /// until then the replica reports itself down.
    fn reachable(&mut self, conn: &mut Conn, last: &mut Instant) -> bool {
        let Store::Postgres(pg) = &conn.store else {
            return true;
        };
        if !pg.is_closed() {
            return true;
        }
        self.metrics.set_db_up(false);
        let Some(url) = conn.reconnect.as_deref() else {
            return false;
        };
        if last.elapsed() < RECONNECT_EVERY {
            return false;
        }
        *last = Instant::now();
        match super::store::postgres::PgConn::connect(url) {
            Ok(fresh) => {
                conn.store = Store::Postgres(Box::new(fresh));
                tracing::info!("the market database is reachable again");
                true
            }
            Err(_) => false,
        }
    }

    /// Is `node` online, here or on another live replica?
    fn online(&self, db: Db, node: &str, now: i64) -> bool {
        self.sessions.contains_key(node) || (self.replica.is_some() && self.whereabouts.get(db, node, now).is_some())
    }

    /// Apply one command inside the batch's transaction. True for
    /// [`Cmd::Shutdown`]: the writer stops after this batch.
    fn apply(&mut self, db: Db, cmd: Cmd, now: i64, done: &mut Done) -> bool {
        match cmd {
            Cmd::Shutdown => return true,
            Cmd::Login {
                identity,
                proof,
                conn_id,
                tx: out_tx,
                reply,
            } => match self.login(db, &identity, &proof, conn_id, now) {
                Ok(r) => {
                    if let Some((old_id, old)) = self.sessions.insert(identity.node_id.clone(), (conn_id, out_tx)) {
                        if old_id != conn_id {
                            old.push(encode_event(&Event::Replaced {}));
                            old.close();
                        }
                    }
                    self.whereabouts.forget(&identity.node_id);
                    // Its open tasks were held back while it was away.
                    let online = |n: &str| self.online(db, n, now);
                    let _ = book::requester_back(db, &identity.node_id, now, &online, &mut done.out);
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
                    self.session_ended(db, node, conn_id, now, done);
                }
            }
            Cmd::Relay(events) => self.relayed(events),
            Cmd::Request { node, id, req, reply } => {
                let (frame, changed) = self.apply_one(db, &node, &id, req, now, &mut done.out);
                if changed {
                    done.ops += 1;
                }
                done.replies.push((reply, id, frame));
            }
        }
        false
    }

    /// Tell the book of the sessions whose end it has not heard of yet.
    fn gone_while_down(&mut self, db: Db, now: i64, done: &mut Done) {
        for (node, conn_id) in std::mem::take(&mut self.lost) {
            self.session_ended(db, node, conn_id, now, done);
        }
    }

    /// Tell the book that `node`'s session `conn_id` ended, in its own
    /// savepoint (unless a newer session of the node took its place). If
    /// that fails, or the batch does not commit, the session is kept in
    /// [`Writer::lost`] for the next batch.
    fn session_ended(&mut self, db: Db, node: String, conn_id: u64, now: i64, done: &mut Done) {
        let Ok(sp) = db.savepoint() else {
            self.lost.push((node, conn_id));
            return;
        };
        let mut gone_out = Vec::new();
        let r = (|| -> Result<(), Fail> {
            // Not if the node has logged in again since (on a replica set,
            // here or on another replica).
            let still_its = match &self.replica {
                Some(r) => r.left(db, &node, conn_id)?,
                None => !self.sessions.contains_key(&node),
            };
            if still_its {
                book::disconnected(db, &node, now, &mut gone_out)?;
            }
            Ok(())
        })();
        if r.is_ok() && sp.commit().is_ok() {
            done.out.extend(gone_out);
            done.ended.push((node, conn_id));
        } else {
            self.lost.push((node, conn_id));
        }
    }

    /// Register a login in its own savepoint; on a replica, record where
    /// the session is and have a previous session on another replica
    /// closed.
    fn login(
        &self,
        db: Db,
        identity: &crate::crypto::keys::PublicIdentity,
        proof: &crate::market::protocol::IdentityProof,
        conn_id: u64,
        now: i64,
    ) -> Result<(i64, i64), DbError> {
        let sp = db.savepoint()?;
        let r = book::login(db, &self.rules, identity, proof, now)?;
        if let Some(replica) = &self.replica {
            if let Some((elsewhere, old_conn)) = replica.arrived(db, &identity.node_id, conn_id, now)? {
                Replica::relay(
                    db,
                    elsewhere,
                    &identity.node_id,
                    Some(old_conn),
                    &encode_event(&Event::Replaced {}),
                )?;
                self.woken.borrow_mut().insert(elsewhere);
            }
        }
        sp.commit()?;
        Ok(r)
    }

    /// Send what another replica queued for sessions here.
    fn relayed(&mut self, events: Vec<Relayed>) {
        for ev in events {
            let Some((id, q)) = self.sessions.get(&ev.node) else {
                continue;
            };
            match ev.close {
                None => {
                    q.push(ev.frame);
                }
                Some(c) if c == *id => {
                    q.push(ev.frame);
                    q.close();
                    self.sessions.remove(&ev.node);
                }
                Some(_) => {}
            }
        }
    }

    /// Run the clock in its own savepoint: its events join the batch's
    /// only if it applied in full. On a replica set it runs on one replica
    /// per tick, which also takes over the sessions of dead replicas.
    fn tick(&self, db: Db, now: i64, out: &mut book::Outbox) {
        let Ok(sp) = db.savepoint() else {
            return;
        };
        let mut tick_out = Vec::new();
        let ran = (|| -> Result<bool, Fail> {
            if self.replica.is_some() {
                if !Replica::clock_due(db, now, TICK_EVERY.as_millis() as i64)? {
                    return Ok(false);
                }
                for node in Replica::reap(db, now)? {
                    self.whereabouts.forget(&node);
                    book::disconnected(db, &node, now, &mut tick_out)?;
                }
            }
            let online = |n: &str| self.online(db, n, now);
            book::tick(db, &self.rules, now, &online, &mut tick_out)?;
            Ok(true)
        })();
        if let Ok(ran) = ran {
            if sp.commit().is_ok() {
                out.extend(tick_out);
                self.ticked.set(ran);
            }
        }
    }

    /// The replica is stopping: its sessions end in the book now, so their
    /// leases and offers move on without waiting for the heartbeat to age.
    fn retire(&mut self, db: Db, now: i64, out: &mut book::Outbox) {
        let Some(replica) = &self.replica else {
            return;
        };
        let Ok(sp) = db.savepoint() else {
            return;
        };
        let mut gone_out = Vec::new();
        let ok = replica.retire(db).map_err(Fail::from).and_then(|nodes| {
            self.sessions.clear();
            for node in nodes {
                book::disconnected(db, &node, now, &mut gone_out)?;
            }
            Ok(())
        });
        if ok.is_ok() && sp.commit().is_ok() {
            out.extend(gone_out);
        }
    }

    /// Split the batch's events: those for sessions here are sent after
    /// the commit; those for nodes on other replicas become relay rows in
    /// this transaction, and their replicas are notified on commit.
    fn route(&self, db: Db, now: i64, out: book::Outbox) -> Result<book::Outbox, DbError> {
        if self.replica.is_none() {
            return Ok(out);
        }
        let (local, others): (book::Outbox, book::Outbox) =
            out.into_iter().partition(|(node, _)| self.sessions.contains_key(node));
        let mut away = Vec::new();
        for (node, ev) in &others {
            if let Some(r) = self.whereabouts.get(db, node, now) {
                away.push((r, node.as_str(), None, encode_event(ev)));
            }
        }
        Replica::relay_all(db, &away)?;
        self.woken.borrow_mut().extend(away.iter().map(|a| a.0));
        Ok(local)
    }

    /// The batch is durable: answer everyone and send the events.
    fn committed(&self, done: Done) {
        self.metrics.commits.inc();
        if self.ticked.take() {
            self.metrics.clock_ticks.inc();
        }
        self.metrics.ops_committed.inc_by(done.ops);
        for (reply, _, frame) in done.replies {
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
    /// waiting on it is told so. Sessions that logged in during it are
    /// not registered: they are closed, to log in again.
    fn commit_failed(&mut self, done: Done, e: &DbError) {
        let (reason, why) = failure(e);
        for (reply, id, _) in done.replies {
            self.metrics.reject(reason);
            // Under the request's id: a refusal the client cannot match
            // leaves it waiting for an answer that never comes.
            let _ = reply.send(error_frame(
                Some(id),
                Rejection::new(reason, format!("commit failed: {why}")),
            ));
        }
        for (reply, _) in done.logins {
            let _ = reply.send(Err(format!("commit failed: {why}")));
        }
    }

    /// Apply one request in its own savepoint. Returns the reply frame and
    /// whether state changed.
    fn apply_one(
        &self,
        db: Db,
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
        // Read-only requests are not remembered: replaying them changes nothing.
        let remember = !matches!(
            req,
            Request::Status {}
                | Request::Reputation { .. }
                | Request::Identity { .. }
                | Request::Result { .. }
                | Request::Task { .. }
                | Request::Progress { .. }
        );
        // An id already applied is answered with what it answered then. A
        // read-only request is checked first. A change is applied and its
        // id recorded; only if that fails (the id's row is there, or the
        // request was refused) is the record looked up, so on the usual
        // path the check costs no statement of its own.
        let seen = || match db.value::<String>(
            "SELECT result FROM requests WHERE node_id = ?1 AND msg_id = ?2",
            args![node, id],
        ) {
            Ok(Some(original)) => {
                let mut r = Rejection::new(Reason::DuplicateId, format!("message id `{id}` was already applied"));
                r.original = serde_json::from_str(&original).ok();
                Some(r)
            }
            Ok(None) => None,
            Err(e) => Some(db_rejection(&e)),
        };
        if !remember {
            if let Some(r) = seen() {
                return refuse(r);
            }
        }
        let sp = match db.savepoint() {
            Ok(sp) => sp,
            Err(e) => return refuse(db_rejection(&e)),
        };
        let online = |n: &str| self.online(db, n, now);
        let mark = out.len();
        let result = book::apply(db, &self.rules, node, req, now, &online, out)
            .and_then(|v| {
                if remember {
                    db.write(
                        "INSERT INTO requests(node_id, msg_id, result, ts) VALUES (?1, ?2, ?3, ?4)",
                        args![node, id, v.to_string(), now],
                    )?;
                }
                Ok(v)
            })
            .and_then(|v| sp.commit().map(|()| v).map_err(Fail::Sql));
        match result {
            Ok(v) => (
                encode_event(&Event::Ok {
                    re: id.to_string(),
                    result: v,
                }),
                remember,
            ),
            Err(f) => {
                // Rolled back to the savepoint by now (dropped uncommitted).
                out.truncate(mark);
                if remember {
                    if let Some(r) = seen() {
                        return refuse(r);
                    }
                }
                match f {
                    Fail::Reject(r) => refuse(r),
                    Fail::Sql(e) => refuse(db_rejection(&e)),
                }
            }
        }
    }
}

/// Refuse a whole batch without touching the database. Relayed events
/// need no database and are still sent.
fn fail_batch(batch: Vec<Cmd>, reason: Reason, why: &str, w: &mut Writer, stopping: &mut bool) {
    for cmd in batch {
        match cmd {
            Cmd::Request { id, reply, .. } => {
                w.metrics.reject(reason);
                let _ = reply.send(error_frame(Some(id), Rejection::new(reason, why)));
            }
            Cmd::Login { reply, .. } => {
                let _ = reply.send(Err(why.to_string()));
            }
            Cmd::Shutdown => *stopping = true,
            Cmd::Relay(events) => w.relayed(events),
            Cmd::Gone { node, conn_id } => {
                // Gone here at once; the book hears of it once the
                // database answers again.
                if w.sessions.get(&node).is_some_and(|(id, _)| *id == conn_id) {
                    w.sessions.remove(&node);
                    w.lost.push((node, conn_id));
                }
            }
        }
    }
}
