//! One replica among several on a shared PostgreSQL database: its
//! heartbeat, where each node's session is (`presence`), events for
//! sessions on other replicas (`relay` rows and a `NOTIFY` carrying the
//! target replica's id), the clock that runs once per tick across all of
//! them, and taking over the sessions of a replica that died.
//!
//! Every call here runs inside the writer's batch transaction; batches of
//! different replicas run at once, each locking the rows it decides on
//! (see `store::postgres`). [`listen`] is the exception: it runs on its own
//! connection, outside the writer, and only takes relay rows.
//!
//! It must not hold market rules: the book decides what happens to a node
//! that is gone; this only finds out who is gone and where a node is.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_postgres::AsyncMessage;

use super::store::{self, args, Arg, Db, V};
use super::wire::{Cmd, Relayed};

/// A replica whose heartbeat is older than this is taken for dead: its
/// sessions are gone and its nodes are offline.
pub const LIVE_MS: i64 = 3_000;
/// Relay rows written by one statement (four parameters each).
const RELAY_ROWS: usize = 64;
/// How often a replica writes its heartbeat.
const BEAT_EVERY: Duration = Duration::from_millis(500);
/// The relay table is vacuumed by a listener that took this many rows since
/// it last did, at most every [`VACUUM_EVERY`].
const VACUUM_AFTER_ROWS: usize = 2_000;
const VACUUM_EVERY: Duration = Duration::from_secs(2);
/// How long a dead replica's row is kept (for `/metrics` and inspection).
const FORGET_MS: i64 = 3_600_000;

/// The channel a replica listens on for relayed events.
pub fn channel(replica_id: i64) -> String {
    format!("cmm_relay_{replica_id}")
}

/// This process as a replica of the market.
pub struct Replica {
    pub id: i64,
    pub name: String,
    last_beat: Instant,
}

impl Replica {
    /// Join the market: a new replica row with a fresh id (a restarted
    /// process is a new replica; its old sessions are reaped as dead).
    pub fn register(db: Db, name: &str, now: i64) -> store::Result<Replica> {
        let id = db.count(
            "INSERT INTO replicas(name, started_at, beat_at) VALUES (?1, ?2, ?2) RETURNING replica_id",
            args![name, now],
        )?;
        Ok(Replica {
            id,
            name: name.to_string(),
            last_beat: Instant::now(),
        })
    }

    /// Whether the heartbeat is due: it is written by batches until one
    /// that wrote it commits ([`Replica::beaten`]).
    pub fn beat_due(&self) -> bool {
        self.last_beat.elapsed() >= BEAT_EVERY
    }

    /// Write the heartbeat, in the batch's transaction.
    pub fn beat(&self, db: Db, now: i64) -> store::Result<()> {
        db.write(
            "UPDATE replicas SET beat_at = ?2 WHERE replica_id = ?1",
            args![self.id, now],
        )
    }

    /// A batch that wrote the heartbeat committed.
    pub fn beaten(&mut self) {
        self.last_beat = Instant::now();
    }

    /// A session of `node` opened here. Returns where its previous
    /// session was, if on another live replica (that one must close it).
    pub fn arrived(&self, db: Db, node: &str, conn_id: u64, now: i64) -> store::Result<Option<(i64, i64)>> {
        let before = db.first(
            "SELECT p.replica_id, p.conn_id FROM presence p JOIN replicas r ON r.replica_id = p.replica_id
             WHERE p.node_id = ?1 AND r.beat_at > ?2",
            args![node, now - LIVE_MS],
            |r| Ok((r.get::<i64>(0)?, r.get::<i64>(1)?)),
        )?;
        db.write(
            "INSERT INTO presence(node_id, replica_id, conn_id, since) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (node_id) DO UPDATE SET replica_id = ?2, conn_id = ?3, since = ?4",
            args![node, self.id, conn_id, now],
        )?;
        Ok(before.filter(|(r, _)| *r != self.id))
    }

    /// A session of `node` here ended. True if it was still the node's
    /// session (not replaced by a newer one, here or elsewhere).
    pub fn left(&self, db: Db, node: &str, conn_id: u64) -> store::Result<bool> {
        Ok(db.exec(
            "DELETE FROM presence WHERE node_id = ?1 AND replica_id = ?2 AND conn_id = ?3",
            args![node, self.id, conn_id],
        )? == 1)
    }

    /// The live replica holding `node`'s session, if any.
    pub fn where_is(db: Db, node: &str, now: i64) -> store::Result<Option<i64>> {
        db.value(
            "SELECT p.replica_id FROM presence p JOIN replicas r ON r.replica_id = p.replica_id
             WHERE p.node_id = ?1 AND r.beat_at > ?2",
            args![node, now - LIVE_MS],
        )
    }

    /// Queue `frame` for `node` on `replica`; with `close`, that replica
    /// then closes the session `close` names (it was replaced).
    pub fn relay(db: Db, replica: i64, node: &str, close: Option<i64>, frame: &str) -> store::Result<()> {
        Self::relay_all(db, &[(replica, node, close, frame)])
    }

    /// [`Replica::relay`] for many events at once, [`RELAY_ROWS`] rows to
    /// a statement: a batch's events for other replicas cost a statement
    /// or two, not one each.
    pub fn relay_all<F: AsRef<str>>(db: Db, events: &[(i64, &str, Option<i64>, F)]) -> store::Result<()> {
        for chunk in events.chunks(RELAY_ROWS) {
            let params: Vec<V> = chunk
                .iter()
                .flat_map(|(replica, node, close, frame)| {
                    [replica.arg(), node.arg(), close.arg(), frame.as_ref().arg()]
                })
                .collect();
            db.write(
                &format!(
                    "INSERT INTO relay(replica_id, node_id, conn_id, frame) VALUES {}",
                    store::value_rows("", 1, chunk.len(), 4)
                ),
                &params,
            )?;
        }
        Ok(())
    }

    /// Whether the order book's clock is due: true on at most one replica
    /// per tick. The clock's row stays locked until the batch that moved it
    /// commits; another replica's batch passes over it instead of waiting
    /// (it is that replica's tick no longer), and one that comes after the
    /// commit finds the tick already taken.
    pub fn clock_due(db: Db, now: i64, every_ms: i64) -> store::Result<bool> {
        Ok(db.exec(
            "UPDATE clock SET last_tick = ?1
             WHERE id = (SELECT id FROM clock WHERE id = 1 AND last_tick <= ?2 FOR UPDATE SKIP LOCKED)",
            args![now, now - every_ms],
        )? == 1)
    }

    /// The nodes whose sessions were on a replica that stopped beating:
    /// their presence is removed (the caller tells the book they are gone),
    /// with the events queued for them there.
    pub fn reap(db: Db, now: i64) -> store::Result<Vec<String>> {
        let dead = now - LIVE_MS;
        let nodes = db.map(
            "DELETE FROM presence WHERE replica_id IN (SELECT replica_id FROM replicas WHERE beat_at <= ?1)
             RETURNING node_id",
            args![dead],
            |r| r.get::<String>(0),
        )?;
        db.write(
            "DELETE FROM relay WHERE replica_id IN (SELECT replica_id FROM replicas WHERE beat_at <= ?1)",
            args![dead],
        )?;
        db.write("DELETE FROM replicas WHERE beat_at <= ?1", args![now - FORGET_MS])?;
        Ok(nodes)
    }

    /// This replica is stopping: its sessions end now (returned, for the
    /// book), and it stops counting as live at once.
    pub fn retire(&self, db: Db) -> store::Result<Vec<String>> {
        let nodes = db.map(
            "DELETE FROM presence WHERE replica_id = ?1 RETURNING node_id",
            args![self.id],
            |r| r.get::<String>(0),
        )?;
        db.write("DELETE FROM relay WHERE replica_id = ?1", args![self.id])?;
        db.write("UPDATE replicas SET beat_at = 0 WHERE replica_id = ?1", args![self.id])?;
        Ok(nodes)
    }

    /// The live replicas and their session counts (for `/healthz`).
    pub fn live(db: Db, now: i64) -> store::Result<Vec<(i64, String, i64)>> {
        db.map(
            "SELECT r.replica_id, r.name, (SELECT COUNT(*) FROM presence p WHERE p.replica_id = r.replica_id)
             FROM replicas r WHERE r.beat_at > ?1 ORDER BY r.replica_id",
            args![now - LIVE_MS],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }
}

/// How long a node found on another replica is taken to be there without
/// asking again.
const REMEMBER_MS: i64 = 250;

/// Where the nodes of other replicas are: looked up once per batch, and a
/// node found on a live replica is remembered for [`REMEMBER_MS`] (the
/// lookup is a round trip, and nodes seldom move). One not found is asked
/// again in the next batch, so a node that arrives is seen at once. A node
/// that moves or leaves meanwhile may miss an event sent to its old
/// replica; it is told what it missed by `status` and `task`, which every
/// client reads again when it connects.
#[derive(Default)]
pub struct Whereabouts(std::cell::RefCell<HashMap<String, (Option<i64>, i64)>>);

impl Whereabouts {
    /// A new batch at `now`: forget the nodes not found, and those found
    /// too long ago.
    pub fn new_batch(&self, now: i64) {
        self.0
            .borrow_mut()
            .retain(|_, (r, at)| r.is_some() && now - *at < REMEMBER_MS);
    }

    pub fn get(&self, db: Db, node: &str, now: i64) -> Option<i64> {
        if let Some((r, _)) = self.0.borrow().get(node) {
            return *r;
        }
        // A failed lookup reads as offline: the node is told what it
        // missed by `status` and `task` when it is back.
        let r = Replica::where_is(db, node, now).ok().flatten();
        self.0.borrow_mut().insert(node.to_string(), (r, now));
        r
    }

    pub fn forget(&self, node: &str) {
        self.0.borrow_mut().remove(node);
    }
}

/// The least time between two wake-ups of one replica's listener.
pub const WAKE_SPACING: Duration = Duration::from_millis(50);

/// When each other replica's listener was last woken, and which ones have
/// relay rows waiting for a wake-up. A `NOTIFY` is dear: its transaction
/// takes PostgreSQL's one lock on the notification queue, and every
/// listening backend is signalled to read it. Under load the batches for a
/// replica come far closer together than [`WAKE_SPACING`], so one wake-up
/// then takes the rows of several batches, each event waiting at most that
/// long; a quiet replica is woken at once.
#[derive(Default)]
pub struct Wakeups {
    last: HashMap<i64, Instant>,
    waiting: std::collections::BTreeSet<i64>,
}

impl Wakeups {
    /// `woken` have new rows: the replicas to wake with this commit (the
    /// others wait for a later one, [`Wakeups::next_due`]).
    pub fn take(&mut self, woken: impl IntoIterator<Item = i64>, now: Instant) -> Vec<i64> {
        self.waiting.extend(woken);
        // A replica woken long enough ago is due: forget it (replicas that
        // stopped are not kept for ever).
        self.last.retain(|_, t| now.duration_since(*t) < WAKE_SPACING);
        let due: Vec<i64> = self
            .waiting
            .iter()
            .copied()
            .filter(|r| !self.last.contains_key(r))
            .collect();
        for r in &due {
            self.waiting.remove(r);
            self.last.insert(*r, now);
        }
        due
    }

    /// The commit that was to wake `replicas` failed: they wait again.
    pub fn retry(&mut self, replicas: &[i64]) {
        for r in replicas {
            self.waiting.insert(*r);
            self.last.remove(r);
        }
    }

    /// When the next waiting replica may be woken, if any waits.
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting
            .iter()
            .filter_map(|r| self.last.get(r).map(|t| *t + WAKE_SPACING))
            .min()
    }
}

/// Take the relay rows queued for `replica_id` whenever its channel is
/// notified (and once a second, in case a notification was missed while
/// reconnecting), and hand them to the writer to send. Runs until the
/// writer is gone; reconnects when the database goes away. `listening`
/// is told once the first `LISTEN` is in place.
pub async fn listen(
    url: String,
    replica_id: i64,
    engine: std::sync::mpsc::Sender<Cmd>,
    listening: tokio::sync::oneshot::Sender<()>,
) {
    let mut delay = Duration::from_millis(200);
    let mut listening = Some(listening);
    loop {
        match listen_once(&url, replica_id, &engine, &mut listening).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!("relay listener: {e}; reconnecting");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// One connection's worth of [`listen`]: `Ok` once the writer is gone.
async fn listen_once(
    url: &str,
    replica_id: i64,
    engine: &std::sync::mpsc::Sender<Cmd>,
    listening: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config: tokio_postgres::Config = url.parse()?;
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    let (wake_tx, mut wake) = tokio::sync::mpsc::unbounded_channel::<()>();
    let conn_task = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = wake_tx.send(());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let result = async {
        client.batch_execute(&format!("LISTEN {}", channel(replica_id))).await?;
        if let Some(tx) = listening.take() {
            let _ = tx.send(());
        }
        let take = client
            .prepare("DELETE FROM relay WHERE replica_id = $1 RETURNING id, node_id, conn_id, frame")
            .await?;
        let mut taken = 0usize;
        let mut vacuumed = Instant::now();
        let mut may_vacuum = true;
        loop {
            let mut rows = client.query(&take, &[&replica_id]).await?;
            taken += rows.len();
            if may_vacuum && taken >= VACUUM_AFTER_ROWS && vacuumed.elapsed() >= VACUUM_EVERY {
                // Every relay row lives a moment: its index fills with the
                // dead ones faster than autovacuum comes by (once a minute
                // by default), and each take would read through them.
                if let Err(e) = client.batch_execute("VACUUM (SKIP_LOCKED) relay").await {
                    tracing::info!("relay listener: cannot vacuum the relay table ({e}); leaving it to autovacuum");
                    may_vacuum = false;
                }
                taken = 0;
                vacuumed = Instant::now();
            }
            if !rows.is_empty() {
                rows.sort_by_key(|r| r.get::<_, i64>(0));
                let batch = rows
                    .iter()
                    .map(|r| Relayed {
                        node: r.get(1),
                        close: r.get::<_, Option<i64>>(2).map(|c| c as u64),
                        frame: r.get(3),
                    })
                    .collect();
                if engine.send(Cmd::Relay(batch)).is_err() {
                    return Ok(());
                }
            }
            tokio::select! {
                w = wake.recv() => if w.is_none() {
                    return Err("the database connection closed".into());
                },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            while wake.try_recv().is_ok() {}
        }
    }
    .await;
    conn_task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica not woken lately is woken with the first commit that has
    /// rows for it; rows for it soon after wait, and go with the first
    /// commit once [`WAKE_SPACING`] has passed (the writer wakes for it
    /// then, [`Wakeups::next_due`]); a failed commit's wake-ups wait again.
    #[test]
    fn wake_ups_are_spaced_and_none_is_dropped() {
        let t0 = Instant::now();
        let mut w = Wakeups::default();
        assert_eq!(w.take([2, 3], t0), vec![2, 3]);
        assert_eq!(w.next_due(), None, "nothing waits");
        let soon = t0 + WAKE_SPACING / 5;
        assert_eq!(w.take([2], soon), Vec::<i64>::new(), "woken a moment ago");
        assert_eq!(w.next_due(), Some(t0 + WAKE_SPACING));
        assert_eq!(w.take([], t0 + WAKE_SPACING / 2), Vec::<i64>::new());
        assert_eq!(w.take([], t0 + WAKE_SPACING), vec![2], "its rows are not left behind");
        assert_eq!(w.next_due(), None);
        let later = t0 + WAKE_SPACING * 3;
        assert_eq!(w.take([3], later), vec![3]);
        w.retry(&[3]);
        assert_eq!(
            w.take([], later),
            vec![3],
            "a failed commit's wake-up goes with the next"
        );
    }
}
