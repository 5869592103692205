//! Reputation: a node's record of settled tasks, failures and distinct
//! paying requesters, how the book counts a success or a failure, and the
//! `reputation` request that reads any node's record.
//!
//! It must not decide whose fault a failure is (that is `lease`), nor move
//! money.

use crate::market::server::store::{self, args, Db, Engine, Row};
use serde_json::{json, Value};

use super::handler::{reject, Context, Fail};
use super::rules::BookRules;
use crate::market::protocol::{reputation, requester_score, Reason, RequesterStanding};

/// A node's record: settled tasks, failures, distinct paying requesters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Record {
    successes: i64,
    failures: i64,
    clients: i64,
}

impl Record {
    pub fn score(self) -> f64 {
        reputation(self.clients, self.failures)
    }

    pub fn view(self) -> Value {
        json!({ "successes": self.successes, "failures": self.failures, "clients": self.clients,
                "score": self.score() })
    }

    /// The record in columns `i..i + 3` of `r`: successes, failures,
    /// clients.
    pub fn at(r: &Row, i: usize) -> store::Result<Record> {
        Ok(Record {
            successes: r.get(i)?,
            failures: r.get(i + 1)?,
            clients: r.get(i + 2)?,
        })
    }
}

pub fn node_reputation(c: Db, node: &str) -> store::Result<Record> {
    Ok(c.first(
        "SELECT successes, failures, clients FROM nodes WHERE node_id = ?1",
        args![node],
        |r| Record::at(r, 0),
    )?
    .unwrap_or_default())
}

/// A settled task: one more success, and one more client if this is the
/// first paid task from this requester. Reputation counts clients, so two
/// identities trading with each other earn one client each, however often.
pub fn record_success(c: Db, provider: &str, requester: &str, paid: i64) -> store::Result<()> {
    c.write(
        "UPDATE nodes SET successes = successes + 1 WHERE node_id = ?1",
        args![provider],
    )?;
    if paid > 0 {
        let new = c.exec(
            "INSERT INTO paid_clients(provider, requester) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            args![provider, requester],
        )?;
        if new == 1 {
            c.write(
                "UPDATE nodes SET clients = clients + 1 WHERE node_id = ?1",
                args![provider],
            )?;
        }
    }
    Ok(())
}

/// A settled task's records: the provider's success (and client), as
/// [`record_success`], and the requester's verdict, as [`record_verdict`].
/// On PostgreSQL that is one statement, sent without waiting and joined to
/// the write queued before it, which must touch neither `nodes` nor
/// `paid_clients` ([`Db::write_beside`]): the client is counted only if
/// this transaction's insert of the pair is the one that stands (a replica
/// settling for the same pair at once waits on it).
pub fn record_settled(c: Db, provider: &str, requester: &str, paid: i64) -> store::Result<()> {
    if c.engine() != Engine::Postgres {
        record_success(c, provider, requester, paid)?;
        return record_verdict(c, requester, true);
    }
    c.write_beside(
        "WITH new AS (INSERT INTO paid_clients(provider, requester) SELECT ?1, ?2 WHERE CAST(?3 AS BIGINT) > 0
                      ON CONFLICT DO NOTHING RETURNING 1)
         UPDATE nodes SET
           successes = successes + CASE WHEN node_id = ?1 THEN 1 ELSE 0 END,
           clients = clients + CASE WHEN node_id = ?1 THEN (SELECT COUNT(*) FROM new) ELSE 0 END,
           req_settled = req_settled + CASE WHEN node_id = ?2 THEN 1 ELSE 0 END
         WHERE node_id IN (?1, ?2)",
        args![provider, requester, paid],
    )
}

/// A failure of the provider's own: counted, and no new lease for the
/// cool-down.
pub fn record_failure(c: Db, s: &BookRules, node: &str, now: i64) -> store::Result<()> {
    c.write("UPDATE nodes SET failures = failures + 1, cooldown_until = CASE WHEN COALESCE(cooldown_until, 0) > ?2 THEN cooldown_until ELSE ?2 END
         WHERE node_id = ?1", args![node, now + s.cooldown_ms])?;
    Ok(())
}

/// How `node` has judged the deliveries it received as a requester.
pub fn requester_standing(c: Db, node: &str) -> store::Result<RequesterStanding> {
    standing_from(&c.rows(STANDING, args![node])?)
}

/// The query behind [`requester_standing`] (one argument, the node), to
/// send with others; its rows go to [`standing_from`].
pub const STANDING: &str = "SELECT req_settled, req_rejected FROM nodes WHERE node_id = ?1";

/// A requester's standing from [`STANDING`]'s rows.
pub fn standing_from(rows: &[Row]) -> store::Result<RequesterStanding> {
    let (settled, rejected) = match rows.first() {
        Some(r) => (r.get::<i64>(0)?, r.get::<i64>(1)?),
        None => (0, 0),
    };
    Ok(RequesterStanding {
        settled,
        rejected,
        score: requester_score(settled, rejected),
    })
}

/// A requester's verdict on a delivery: one more settled or rejected.
pub fn record_verdict(c: Db, requester: &str, settled: bool) -> store::Result<()> {
    c.write(
        if settled {
            "UPDATE nodes SET req_settled = req_settled + 1 WHERE node_id = ?1"
        } else {
            "UPDATE nodes SET req_rejected = req_rejected + 1 WHERE node_id = ?1"
        },
        args![requester],
    )?;
    Ok(())
}

/// `reputation`: any known node's record and score.
pub fn apply(cx: Context, node_id: String) -> Result<Value, Fail> {
    let known: bool =
        cx.c.first("SELECT 1 FROM nodes WHERE node_id = ?1", args![&node_id], |_| Ok(true))?
            .unwrap_or(false);
    if !known {
        return reject(Reason::NotFound, format!("no node `{node_id}`"));
    }
    let mut v = node_reputation(cx.c, &node_id)?.view();
    v["node_id"] = json!(node_id);
    v["as_requester"] = json!(requester_standing(cx.c, &node_id)?);
    Ok(v)
}
