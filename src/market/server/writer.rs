//! The single writer: one thread owns the store's connection and applies
//! the requests of many nodes in one transaction (group commit), replying
//! only after that transaction is durable. A refused request changes
//! nothing while its neighbours in the batch still commit: a batch is
//! applied straight, and if one of its requests fails after it wrote,
//! the batch is rolled back and applied again with each request in its
//! own savepoint ([`Pass`]). Events for nodes leave through each session's
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

use super::book::{self, BookRules, Fail};
use super::ledger;
use super::metrics::{Book, Metrics};
use super::replica::{self, Replica, Wakeups, Whereabouts};
use super::store::{self, args, Arg, Db, DbError, Store};
use super::wire::{error_frame, Cmd, Outbound, Relayed};
use crate::market::protocol::{encode_event, Event, Reason, Rejection, Request};

/// The coordinator's clock, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Read the order book's and ledger's gauges for `/metrics`. They count
/// every task and account, so this runs when `/metrics` is scraped, not on
/// a timer: on a large book a timer would stall every batch behind it. If
/// the database fails, the last values stay.
pub fn refresh_gauges(db: Db, m: &Metrics) {
    let read = || -> Result<Book, DbError> {
        let offers_active = db.count("SELECT COUNT(*) FROM offers WHERE state = 'active'", args![])?;
        let tasks = db.map("SELECT state, COUNT(*) FROM tasks GROUP BY state", args![], |r| {
            Ok((r.get::<String>(0)?, r.get::<i64>(1)?))
        })?;
        let totals = ledger::totals(db)?;
        Ok(Book {
            offers_active,
            tasks,
            totals,
        })
    };
    if let Ok(b) = read() {
        m.set_book(b);
    }
}

const BATCH_MAX: usize = 512;
const TICK_EVERY: Duration = Duration::from_millis(100);
/// After reading the gauges, the writer waits this many times as long as
/// the reading took before it reads them again, so however often
/// `/metrics` is scraped they take at most a tenth of its time; a scrape
/// in between is shown the last values.
const GAUGES_SPACING: u32 = 9;
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
    /// How the batch being applied has moved sessions so far: a node that
    /// logged in (its new connection id) or whose session ended (`None`).
    /// [`Writer::sessions`] itself changes only once the batch's outcome is
    /// known, so a pass can be applied again from the same start.
    moved: HashMap<String, Option<u64>>,
    /// The batch being applied retires this replica: no session is here.
    retiring: bool,
    /// Sessions whose end the book has not heard of yet (the database
    /// could not be reached, or the batch that told it did not commit): it
    /// hears of them in the next batch that commits.
    lost: Vec<(String, u64)>,
}

/// How a batch's steps (each request, login and session end, the clock)
/// are applied inside its transaction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Each step straight in the transaction. A savepoint around every
    /// step costs statements, and on SQLite a copy of each page the step
    /// touches; most batches need none, since a step refused before it
    /// writes has nothing to undo.
    Straight,
    /// Each step in its own savepoint, so a step that fails after writing
    /// is undone alone while its neighbours commit: how a batch is applied
    /// again when its straight pass met such a step.
    Guarded,
}

/// A straight pass met a step that failed after writing, or a database
/// failure: the batch is rolled back, to be applied again guarded.
struct Spoiled;

/// What a batch did with one of its commands, kept in their order and
/// carried out once the batch's outcome is known.
enum Effect {
    /// The login (the batch's command at this index) was taken, with its
    /// answer: the session is registered if the batch commits.
    Arrived(usize, (i64, i64)),
    /// The login at this index was refused, with why.
    Refused(usize, String),
    /// A session ended: gone here whatever the batch's outcome.
    Left(String, u64),
    /// The request at this index, its answer and, if refused, why.
    Answered(usize, String, Option<Reason>),
}

/// What one pass over a batch leaves to do once its transaction ends.
#[derive(Default)]
struct Done {
    effects: Vec<Effect>,
    out: book::Outbox,
    /// Requests and logins that changed state.
    ops: u64,
    /// Sessions whose end this batch told the book: lost again if it does
    /// not commit.
    ended: Vec<(String, u64)>,
    /// Sessions whose end this batch could not tell the book.
    lost: Vec<(String, u64)>,
    /// The batch holds the writer's shutdown.
    stopping: bool,
    /// The batch ran the clock (counted once it commits).
    ticked: bool,
    /// The batch wrote this replica's heartbeat.
    beat: bool,
    /// The replicas that this batch left relay rows for: woken once it
    /// commits.
    woken: BTreeSet<i64>,
    /// The batch as a whole failed (its heartbeat, its relay rows): it is
    /// not committed.
    failed: Option<DbError>,
    /// A straight pass's applied requests, by (node, message id), with
    /// their results: recorded in `requests` together at the batch's end.
    remembered: HashMap<(String, String), String>,
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
        moved: HashMap::new(),
        retiring: false,
        lost: Vec::new(),
    };
    // Here, not in the caller: the blocking PostgreSQL client must not run
    // on an async runtime's thread.
    refresh_gauges(conn.store.db(), &w.metrics);
    let mut next_tick = Instant::now();
    let mut last_reconnect = Instant::now();
    let mut gauges_due = Instant::now();
    let mut stopping = false;
    let mut wakeups = Wakeups::default();
    while !stopping {
        let wake_at = wakeups.next_due().map_or(next_tick, |t| t.min(next_tick));
        let Some(batch) = next_batch(&rx, wake_at.saturating_duration_since(Instant::now())) else {
            break;
        };
        // Scrapes wait for the gauges, read once the batch is done. What
        // other replicas relayed is sent now: it needs no transaction (the
        // listener already took its rows), and held for this batch's commit
        // each event would wait a batch longer.
        let mut scrapes = Vec::new();
        let mut cmds = Vec::with_capacity(batch.len());
        for cmd in batch {
            match cmd {
                Cmd::Gauges(_) => scrapes.push(cmd),
                Cmd::Relay(events) => w.relayed(events),
                cmd => cmds.push(cmd),
            }
        }
        let batch = cmds;
        // Nothing left to apply and neither the clock nor a wake-up due.
        if batch.is_empty() && scrapes.is_empty() && Instant::now() < wake_at {
            continue;
        }
        if !w.reachable(&mut conn, &mut last_reconnect) {
            fail_batch(
                batch,
                Reason::Unavailable,
                "the market database cannot be reached; nothing was changed",
                &mut w,
                &mut stopping,
            );
            // The clock cannot run without its database: wait for the
            // next command (or the next try) instead of spinning. Nor can
            // a wake-up go out; the listeners look once a second anyway.
            next_tick = Instant::now() + TICK_EVERY;
            wakeups = Wakeups::default();
            continue;
        }
        let started = Instant::now();
        let now = now_ms();
        let tick_due = Instant::now() >= next_tick;
        let lost = std::mem::take(&mut w.lost);
        let mut pass = Pass::Straight;
        let outcome = loop {
            if let Err(e) = conn.store.begin() {
                break Err(e);
            }
            let Ok(mut done) = w.apply_batch(conn.store.db(), &batch, pass, now, tick_due, &lost) else {
                conn.store.rollback();
                w.metrics.batches_replayed.inc();
                pass = Pass::Guarded;
                continue;
            };
            let woken = wakeups.take(done.woken.iter().copied(), Instant::now());
            let channels: Vec<String> = woken.iter().map(|r| replica::channel(*r)).collect();
            let committed = match done.failed.take() {
                Some(e) => Err(e),
                None => conn.store.commit_and_notify(&channels),
            };
            if committed.is_err() {
                wakeups.retry(&woken);
            }
            match committed {
                // A statement that failed without its own savepoint failed
                // the whole batch (on PostgreSQL it may only show at the
                // commit): apply it again, guarded.
                Err(e) if pass == Pass::Straight && !e.is_unreachable() => {
                    conn.store.rollback();
                    w.metrics.batches_replayed.inc();
                    pass = Pass::Guarded;
                }
                r => break Ok((done, r)),
            }
        };
        let (done, committed) = match outcome {
            Ok(o) => o,
            Err(e) => {
                w.lost = lost;
                let (reason, why) = failure(&e);
                w.metrics.set_db_up(!e.is_unreachable());
                fail_batch(batch, reason, &why, &mut w, &mut stopping);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if tick_due {
            next_tick = Instant::now() + TICK_EVERY;
        }
        w.metrics.observe_db(started.elapsed());
        match &committed {
            Ok(()) => w.metrics.set_db_up(true),
            Err(e) => {
                conn.store.rollback();
                w.metrics.set_db_up(!e.is_unreachable());
            }
        }
        stopping |= done.stopping;
        w.finish(batch, done, committed);
        if !scrapes.is_empty() {
            if Instant::now() >= gauges_due {
                let read = Instant::now();
                refresh_gauges(conn.store.db(), &w.metrics);
                gauges_due = Instant::now() + read.elapsed() * GAUGES_SPACING;
            }
            for c in scrapes {
                if let Cmd::Gauges(tx) = c {
                    let _ = tx.send(());
                }
            }
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

/// Apply one step of a batch: `f` with the batch's outbox. Guarded, it
/// runs in its own savepoint and a failure undoes it. Straight, it runs
/// as is: a refusal that changed no row is the step's own answer, and
/// any other failure spoils the pass. Either way the events of a step
/// that failed are dropped.
fn step<T>(
    db: Db,
    pass: Pass,
    out: &mut book::Outbox,
    f: impl FnOnce(&mut book::Outbox) -> Result<T, Fail>,
) -> Result<Result<T, Fail>, Spoiled> {
    let mark = out.len();
    let r = match pass {
        Pass::Guarded => match db.savepoint() {
            Ok(sp) => f(out).and_then(|v| sp.commit().map(|()| v).map_err(Fail::Sql)),
            Err(e) => Err(Fail::Sql(e)),
        },
        Pass::Straight => {
            let before = db.changes();
            match f(out) {
                Err(Fail::Reject(r)) if db.changes() == before => Err(Fail::Reject(r)),
                Err(_) => return Err(Spoiled),
                ok => ok,
            }
        }
    };
    if r.is_err() {
        out.truncate(mark);
    }
    Ok(r)
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

    /// The connection id of `node`'s session here, as the batch being
    /// applied has left it so far.
    fn session_of(&self, node: &str) -> Option<u64> {
        if self.retiring {
            return None;
        }
        match self.moved.get(node) {
            Some(moved) => *moved,
            None => self.sessions.get(node).map(|(id, _)| *id),
        }
    }

    /// Is `node` online, here or on another live replica?
    fn online(&self, db: Db, node: &str, now: i64) -> bool {
        self.session_of(node).is_some() || (self.replica.is_some() && self.whereabouts.get(db, node, now).is_some())
    }

    /// One pass over `batch` inside the open transaction: the sessions
    /// whose end the book has not heard of (`lost`), each command, the
    /// clock if due, the retirement of a replica that is stopping, and the
    /// relay rows. It changes nothing outside the transaction, so a pass
    /// that is spoiled can be applied again.
    fn apply_batch(
        &mut self,
        db: Db,
        batch: &[Cmd],
        pass: Pass,
        now: i64,
        tick_due: bool,
        lost: &[(String, u64)],
    ) -> Result<Done, Spoiled> {
        self.moved.clear();
        self.retiring = false;
        self.whereabouts.new_batch(now);
        let mut done = Done::default();
        if let Some(r) = self.replica.as_ref().filter(|r| r.beat_due()) {
            match r.beat(db, now) {
                Ok(()) => done.beat = true,
                Err(e) => done.failed = Some(e),
            }
        }
        for (node, conn_id) in lost {
            self.session_ended(db, pass, node, *conn_id, now, &mut done)?;
        }
        for (i, cmd) in batch.iter().enumerate() {
            self.apply(db, pass, i, cmd, now, &mut done)?;
        }
        if tick_due {
            self.tick(db, pass, now, &mut done)?;
        }
        if done.stopping {
            self.retire(db, pass, now, &mut done)?;
        }
        // A message id already applied in an earlier batch fails this
        // statement: the batch is then applied again, guarded, and that
        // request answered as a duplicate.
        if remember_all(db, &done.remembered, now).is_err() {
            return Err(Spoiled);
        }
        let out = std::mem::take(&mut done.out);
        match self.route(db, now, out, &mut done.woken) {
            Ok(local) => done.out = local,
            Err(_) if pass == Pass::Straight => return Err(Spoiled),
            Err(e) => done.failed = Some(e),
        }
        Ok(done)
    }

    /// Apply the command at `i` of the batch inside its transaction.
    fn apply(&mut self, db: Db, pass: Pass, i: usize, cmd: &Cmd, now: i64, done: &mut Done) -> Result<(), Spoiled> {
        match cmd {
            Cmd::Shutdown => done.stopping = true,
            // Taken out of the batch before it is applied.
            Cmd::Gauges(_) => {}
            Cmd::Login {
                identity,
                proof,
                conn_id,
                ..
            } => {
                let node = &identity.node_id;
                // Here from now on in this batch (its open tasks are offered
                // with it online), unless the login is refused.
                let before = self.moved.insert(node.clone(), Some(*conn_id));
                self.whereabouts.forget(node);
                match self.login(db, pass, identity, proof, *conn_id, now, done)? {
                    Ok(r) => {
                        done.ops += 1;
                        done.effects.push(Effect::Arrived(i, r));
                    }
                    Err(f) => {
                        match before {
                            Some(b) => self.moved.insert(node.clone(), b),
                            None => self.moved.remove(node),
                        };
                        let why = match f {
                            Fail::Reject(r) => r.message,
                            Fail::Sql(e) => e.to_string(),
                        };
                        done.effects.push(Effect::Refused(i, why));
                    }
                }
            }
            Cmd::Gone { node, conn_id } => {
                if self.session_of(node) == Some(*conn_id) {
                    self.moved.insert(node.clone(), None);
                    done.effects.push(Effect::Left(node.clone(), *conn_id));
                    self.session_ended(db, pass, node, *conn_id, now, done)?;
                }
            }
            // Sent before the batch ([`writer`]).
            Cmd::Relay(_) => {}
            Cmd::Request { node, id, req, .. } => {
                let (frame, refused, changed) = self.apply_one(db, pass, node, id, req, now, done)?;
                if changed {
                    done.ops += 1;
                }
                done.effects.push(Effect::Answered(i, frame, refused));
            }
        }
        Ok(())
    }

    /// Tell the book that `node`'s session `conn_id` ended (unless a newer
    /// session of the node took its place). If that fails, or the batch
    /// does not commit, the session is kept in [`Writer::lost`] for the
    /// next batch.
    fn session_ended(
        &self,
        db: Db,
        pass: Pass,
        node: &str,
        conn_id: u64,
        now: i64,
        done: &mut Done,
    ) -> Result<(), Spoiled> {
        let told = step(db, pass, &mut done.out, |out| {
            // Not if the node has logged in again since (on a replica set,
            // here or on another replica).
            let still_its = match &self.replica {
                Some(r) => r.left(db, node, conn_id)?,
                None => self.session_of(node).is_none(),
            };
            if still_its {
                book::disconnected(db, node, now, out)?;
            }
            Ok(())
        })?;
        let ended = (node.to_string(), conn_id);
        match told {
            Ok(()) => done.ended.push(ended),
            Err(_) => done.lost.push(ended),
        }
        Ok(())
    }

    /// Register a login; on a replica, record where the session is and
    /// have a previous session on another replica closed. The node's
    /// requester side is back: its open tasks are offered again.
    #[allow(clippy::too_many_arguments)]
    fn login(
        &self,
        db: Db,
        pass: Pass,
        identity: &crate::crypto::keys::PublicIdentity,
        proof: &crate::market::protocol::IdentityProof,
        conn_id: u64,
        now: i64,
        done: &mut Done,
    ) -> Result<Result<(i64, i64), Fail>, Spoiled> {
        let woken = &mut done.woken;
        step(db, pass, &mut done.out, |out| {
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
                    woken.insert(elsewhere);
                }
            }
            let online = |n: &str| self.online(db, n, now);
            book::requester_back(db, &identity.node_id, now, &online, out)?;
            Ok(r)
        })
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

    /// Run the clock as one step: its events join the batch's only if it
    /// applied in full. On a replica set it runs on one replica per tick,
    /// which also takes over the sessions of dead replicas.
    fn tick(&self, db: Db, pass: Pass, now: i64, done: &mut Done) -> Result<(), Spoiled> {
        let ran = step(db, pass, &mut done.out, |out| {
            if self.replica.is_some() {
                if !Replica::clock_due(db, now, TICK_EVERY.as_millis() as i64)? {
                    return Ok(false);
                }
                for node in Replica::reap(db, now)? {
                    self.whereabouts.forget(&node);
                    book::disconnected(db, &node, now, out)?;
                }
            }
            let online = |n: &str| self.online(db, n, now);
            book::tick(db, &self.rules, now, &online, out)?;
            Ok(true)
        })?;
        done.ticked = ran.unwrap_or(false);
        Ok(())
    }

    /// The replica is stopping: its sessions end in the book now, so their
    /// leases and offers move on without waiting for the heartbeat to age.
    fn retire(&mut self, db: Db, pass: Pass, now: i64, done: &mut Done) -> Result<(), Spoiled> {
        let Some(replica) = &self.replica else {
            return Ok(());
        };
        // Best effort: if it fails, the heartbeat ages and another replica
        // takes the sessions over.
        let _ = step(db, pass, &mut done.out, |out| {
            for node in replica.retire(db)? {
                book::disconnected(db, &node, now, out)?;
            }
            Ok(())
        })?;
        self.retiring = true;
        Ok(())
    }

    /// Split the batch's events: those for sessions here are sent after
    /// the commit; those for nodes on other replicas become relay rows in
    /// this transaction, and their replicas (added to `woken`) are
    /// notified on commit.
    fn route(&self, db: Db, now: i64, out: book::Outbox, woken: &mut BTreeSet<i64>) -> Result<book::Outbox, DbError> {
        if self.replica.is_none() {
            return Ok(out);
        }
        let (local, others): (book::Outbox, book::Outbox) =
            out.into_iter().partition(|(node, _)| self.session_of(node).is_some());
        let mut away = Vec::new();
        for (node, ev) in &others {
            if let Some(r) = self.whereabouts.get(db, node, now) {
                away.push((r, node.as_str(), None, encode_event(ev)));
            }
        }
        Replica::relay_all(db, &away)?;
        woken.extend(away.iter().map(|a| a.0));
        Ok(local)
    }

    /// The batch's transaction ended, `committed` or not: answer everyone,
    /// carry out what it did to sessions, and send its events if it
    /// committed. If it did not, nothing of it happened: everyone waiting
    /// on it is told so, and sessions that logged in during it are not
    /// registered (they are closed, to log in again).
    fn finish(&mut self, batch: Vec<Cmd>, done: Done, committed: Result<(), DbError>) {
        let failed = committed.err().map(|e| failure(&e));
        self.lost.extend(done.lost);
        if failed.is_some() {
            self.lost.extend(done.ended);
        }
        let mut cmds: Vec<Option<Cmd>> = batch.into_iter().map(Some).collect();
        for effect in done.effects {
            match effect {
                Effect::Arrived(i, r) => {
                    if let Some(Cmd::Login {
                        identity,
                        conn_id,
                        tx,
                        reply,
                        ..
                    }) = cmds[i].take()
                    {
                        match &failed {
                            None => {
                                self.register(identity.node_id, conn_id, tx);
                                let _ = reply.send(Ok(r));
                            }
                            Some((_, why)) => {
                                let _ = reply.send(Err(format!("commit failed: {why}")));
                            }
                        }
                    }
                }
                Effect::Refused(i, why) => {
                    if let Some(Cmd::Login { reply, .. }) = cmds[i].take() {
                        let _ = reply.send(Err(why));
                    }
                }
                Effect::Left(node, conn_id) => {
                    if self.sessions.get(&node).is_some_and(|(id, _)| *id == conn_id) {
                        self.sessions.remove(&node);
                    }
                }
                Effect::Answered(i, frame, refused) => {
                    if let Some(Cmd::Request { id, reply, .. }) = cmds[i].take() {
                        let frame = match &failed {
                            None => {
                                if let Some(r) = refused {
                                    self.metrics.reject(r);
                                }
                                frame
                            }
                            // Under the request's id: a refusal the client
                            // cannot match leaves it waiting for an answer
                            // that never comes.
                            Some((reason, why)) => {
                                self.metrics.reject(*reason);
                                error_frame(Some(id), Rejection::new(*reason, format!("commit failed: {why}")))
                            }
                        };
                        let _ = reply.send(frame);
                    }
                }
            }
        }
        if self.retiring {
            self.sessions.clear();
        }
        if failed.is_some() {
            return;
        }
        self.metrics.commits.inc();
        if done.ticked {
            self.metrics.clock_ticks.inc();
        }
        self.metrics.ops_committed.inc_by(done.ops);
        if done.beat {
            if let Some(r) = self.replica.as_mut() {
                r.beaten();
            }
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

    /// `node`'s session is now `conn_id`: an older one here is replaced.
    fn register(&mut self, node: String, conn_id: u64, tx: Outbound) {
        if let Some((old_id, old)) = self.sessions.insert(node, (conn_id, tx)) {
            if old_id != conn_id {
                old.push(encode_event(&Event::Replaced {}));
                old.close();
            }
        }
    }

    /// Apply one request as a step. Returns the reply frame, the reason
    /// it was refused if it was, and whether state changed.
    #[allow(clippy::too_many_arguments)]
    fn apply_one(
        &self,
        db: Db,
        pass: Pass,
        node: &str,
        id: &str,
        req: &Request,
        now: i64,
        done: &mut Done,
    ) -> Result<(String, Option<Reason>, bool), Spoiled> {
        let refuse = |r: Rejection| {
            let reason = r.reason;
            Ok((error_frame(Some(id.to_string()), r), Some(reason), false))
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
        let duplicate = |original: &str| {
            let mut r = Rejection::new(Reason::DuplicateId, format!("message id `{id}` was already applied"));
            r.original = serde_json::from_str(original).ok();
            r
        };
        let seen = || -> Result<Option<Rejection>, Spoiled> {
            match db.value::<String>(
                "SELECT result FROM requests WHERE node_id = ?1 AND msg_id = ?2",
                args![node, id],
            ) {
                Ok(Some(original)) => Ok(Some(duplicate(&original))),
                Ok(None) => Ok(None),
                Err(_) if pass == Pass::Straight => Err(Spoiled),
                Err(e) => Ok(Some(db_rejection(&e))),
            }
        };
        if !remember {
            if let Some(r) = seen()? {
                return refuse(r);
            }
        }
        // Straight, a change's record waits for the batch's end.
        let key = (remember && pass == Pass::Straight).then(|| (node.to_string(), id.to_string()));
        if let Some(original) = key.as_ref().and_then(|k| done.remembered.get(k)) {
            // Sent twice in this batch: answered as the first was.
            return refuse(duplicate(original));
        }
        // Guarded, a request's record is written in its own step, so a
        // message id already applied undoes that step alone; straight, the
        // records wait for the batch's end ([`remember_all`]).
        let result = step(db, pass, &mut done.out, |out| {
            let online = |n: &str| self.online(db, n, now);
            let v = book::apply(db, &self.rules, node, req.clone(), now, &online, out)?;
            if remember && pass == Pass::Guarded {
                db.write(
                    "INSERT INTO requests(node_id, msg_id, result, ts) VALUES (?1, ?2, ?3, ?4)",
                    args![node, id, v.to_string(), now],
                )?;
            }
            Ok(v)
        })?;
        if let (Ok(v), Some(key)) = (&result, key) {
            done.remembered.insert(key, v.to_string());
        }
        match result {
            Ok(v) => Ok((
                encode_event(&Event::Ok {
                    re: id.to_string(),
                    result: v,
                }),
                None,
                remember,
            )),
            Err(f) => {
                if remember {
                    if let Some(r) = seen()? {
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

/// Rows of `requests` written by one statement.
const REMEMBER_ROWS: usize = 64;

/// Record a straight pass's applied requests, [`REMEMBER_ROWS`] to a
/// statement instead of one each.
fn remember_all(db: Db, remembered: &HashMap<(String, String), String>, now: i64) -> Result<(), DbError> {
    let rows: Vec<_> = remembered.iter().collect();
    for chunk in rows.chunks(REMEMBER_ROWS) {
        let params: Vec<_> = chunk
            .iter()
            .flat_map(|((node, id), result)| [node.arg(), id.arg(), result.arg(), now.arg()])
            .collect();
        db.write(
            &format!(
                "INSERT INTO requests(node_id, msg_id, result, ts) VALUES {}",
                store::value_rows("", 1, chunk.len(), 4)
            ),
            &params,
        )?;
    }
    Ok(())
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
            // Dropped: the scrape shows the last values.
            Cmd::Gauges(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// The same message id twice in one batch (two sessions of one node
    /// can do that) is applied once: the second is answered as a duplicate
    /// of the first, although the first's record is only written at the
    /// batch's end.
    #[test]
    fn a_message_id_sent_twice_in_one_batch_is_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("market.db");
        let conn = Conn {
            store: Store::Sqlite(store::sqlite::open(&path, true).unwrap()),
            reconnect: None,
        };
        let (tx, rx) = std_mpsc::channel();
        let mut replies = Vec::new();
        for _ in 0..2 {
            let (reply, answer) = oneshot::channel();
            let req = Request::Offer {
                slots: 1,
                price: 1,
                models: vec!["m".into()],
                ttl_secs: 60,
            };
            let (node, id) = ("n-1".to_string(), "m-1".to_string());
            tx.send(Cmd::Request { node, id, req, reply }).unwrap();
            replies.push(answer);
        }
        tx.send(Cmd::Shutdown).unwrap();
        // Everything is queued before the writer starts: one batch.
        writer(conn, BookRules::default(), None, rx, Arc::new(Metrics::new("test")));
        let frames: Vec<serde_json::Value> = replies
            .into_iter()
            .map(|a| serde_json::from_str(&a.blocking_recv().unwrap()).unwrap())
            .collect();
        assert_eq!(frames[0]["type"], "ok", "{frames:?}");
        assert_eq!(frames[1]["type"], "error", "{frames:?}");
        assert_eq!(frames[1]["reason"], "duplicate_id", "{frames:?}");
        assert_eq!(frames[1]["original"], frames[0]["result"]);
        let db = store::sqlite::open_read(&path).unwrap();
        let count = |sql: &str| db.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(count("SELECT COUNT(*) FROM offers"), 1, "applied once");
        assert_eq!(count("SELECT COUNT(*) FROM requests WHERE msg_id = 'm-1'"), 1);
    }
}
