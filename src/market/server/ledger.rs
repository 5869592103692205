//! Double-entry ledger, in the market's store (SQLite or PostgreSQL).
//!
//! Accounts: `issuer` (goes negative by what was issued), `node:<id>` (a
//! node's spendable balance) and `escrow:<task>` (a task's locked bid).
//! Every movement is one journal row whose postings sum to zero, written in
//! the same transaction as the state change that caused it. Hence the
//! invariant checked by [`verify`]: balances + escrow = issued.
//!
//! It must not decide why money moves: the order book (`book`) does, and
//! calls [`post`] inside its own transaction.

use crate::market::server::store::{self, args, Db, Engine};
use serde::Serialize;

pub const ISSUER: &str = "issuer";

pub fn node_account(node_id: &str) -> String {
    format!("node:{node_id}")
}

pub fn escrow_account(task_id: &str) -> String {
    format!("escrow:{task_id}")
}

/// A posting would take a node or escrow account below zero.
#[derive(Debug)]
pub struct Overdraft {
    pub account: String,
    pub balance: i64,
    pub needed: i64,
}

pub fn balance(conn: Db, account: &str) -> store::Result<i64> {
    Ok(conn
        .value("SELECT balance FROM accounts WHERE account = ?1", args![account])?
        .unwrap_or(0))
}

pub fn open_account(tx: Db, account: &str, kind: &str) -> store::Result<()> {
    tx.write(
        "INSERT INTO accounts(account, kind, balance) VALUES (?1, ?2, 0) ON CONFLICT DO NOTHING",
        args![account, kind],
    )?;
    Ok(())
}

/// Record one balanced movement. The caller's transaction makes it atomic
/// with the state change; an overdraft is refused before anything is written.
pub fn post(
    tx: Db,
    now: i64,
    memo: &str,
    task_id: Option<&str>,
    postings: &[(&str, i64)],
) -> store::Result<Result<(), Overdraft>> {
    debug_assert_eq!(
        postings.iter().map(|p| p.1).sum::<i64>(),
        0,
        "unbalanced journal {memo}"
    );
    for (account, amount) in postings {
        if *account != ISSUER && *amount < 0 {
            // Locked until the transaction ends: no other replica spends
            // what this check found.
            let have = tx
                .value(
                    &format!("SELECT balance FROM accounts WHERE account = ?1{}", tx.for_update()),
                    args![account],
                )?
                .unwrap_or(0);
            if have + amount < 0 {
                return Ok(Err(Overdraft {
                    account: account.to_string(),
                    balance: have,
                    needed: -amount,
                }));
            }
        }
    }
    let jid = tx.count(
        "INSERT INTO journal(ts, memo, task_id) VALUES (?1, ?2, ?3) RETURNING id",
        args![now, memo, task_id],
    )?;
    for (account, amount) in postings {
        if *amount == 0 {
            continue;
        }
        tx.write(
            "INSERT INTO postings(journal_id, account, amount) VALUES (?1, ?2, ?3)",
            args![jid, account, amount],
        )?;
        tx.write(
            "UPDATE accounts SET balance = balance + ?2 WHERE account = ?1",
            args![account, amount],
        )?;
    }
    Ok(Ok(()))
}

/// Totals by account kind.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub issued: i64,
    pub balances: i64,
    pub escrow: i64,
}

pub fn totals(conn: Db) -> store::Result<Totals> {
    let mut t = Totals::default();
    let rows = conn.map(
        "SELECT kind, CAST(SUM(balance) AS BIGINT) FROM accounts GROUP BY kind",
        args![],
        |r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)),
    )?;
    for (kind, sum) in rows {
        match kind.as_str() {
            "issuer" => t.issued = -sum,
            "node" => t.balances = sum,
            "escrow" => t.escrow = sum,
            _ => {}
        }
    }
    Ok(t)
}

/// What `market ledger --verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub totals: Totals,
    pub nodes: i64,
    pub tasks: i64,
    pub journal_entries: i64,
    pub problems: Vec<String>,
}

/// Check every ledger and order-book invariant over the whole file.
pub fn verify(conn: Db) -> store::Result<VerifyReport> {
    let mut problems = Vec::new();
    let totals = totals(conn)?;
    if totals.balances + totals.escrow != totals.issued {
        problems.push(format!(
            "balances ({}) + escrow ({}) != issued ({})",
            totals.balances, totals.escrow, totals.issued
        ));
    }
    let mut q = |sql: &str, what: &str| -> store::Result<()> {
        let rows = conn.map(sql, args![], |r| r.get::<String>(0))?;
        for (i, row) in rows.into_iter().enumerate() {
            if i >= 20 {
                problems.push(format!("{what}: more not shown"));
                break;
            }
            problems.push(format!("{what}: {row}"));
        }
        Ok(())
    };
    q(
        "SELECT journal_id || ' sums to ' || SUM(amount) FROM postings GROUP BY journal_id HAVING SUM(amount) != 0",
        "unbalanced journal entry",
    )?;
    q(
        "SELECT a.account || ' balance ' || a.balance || ' but postings sum to ' || COALESCE(p.s, 0)
         FROM accounts a LEFT JOIN (SELECT account, SUM(amount) s FROM postings GROUP BY account) p
         ON p.account = a.account WHERE a.balance != COALESCE(p.s, 0)",
        "account out of step with its postings",
    )?;
    q(
        "SELECT account || ' = ' || balance FROM accounts WHERE kind != 'issuer' AND balance < 0",
        "negative balance",
    )?;
    q(
        "SELECT p.account || ' granted ' || COUNT(*) || ' times' FROM postings p JOIN journal j ON j.id = p.journal_id
         WHERE j.memo = 'grant' AND p.account != 'issuer' GROUP BY p.account HAVING COUNT(*) > 1",
        "repeated grant",
    )?;
    q(
        "SELECT t.task_id || ' (' || t.state || ') escrow ' || COALESCE(a.balance, 0) || ' expected ' ||
           CASE WHEN t.state IN ('open','assigned','delivered') THEN t.max_price ELSE 0 END
         FROM tasks t LEFT JOIN accounts a ON a.account = 'escrow:' || t.task_id
         WHERE COALESCE(a.balance, 0) != CASE WHEN t.state IN ('open','assigned','delivered') THEN t.max_price ELSE 0 END",
        "escrow does not match task state",
    )?;
    q(
        "SELECT task_id || ' is assigned without a lease' FROM tasks
         WHERE state IN ('assigned','delivered') AND (provider IS NULL OR lease_deadline IS NULL OR ask IS NULL)",
        "task without a lease",
    )?;
    q(
        "SELECT task_id || ' is open with a provider' FROM tasks WHERE state = 'open' AND provider IS NOT NULL",
        "open task still leased",
    )?;
    q(
        "SELECT task_id || ' has unknown state ' || state FROM tasks
         WHERE state NOT IN ('open','assigned','delivered','settled','refunded','expired')",
        "bad task state",
    )?;
    q(
        "SELECT task_id || ' attempt ' || attempt || ' of ' || max_attempts FROM tasks
         WHERE attempt < 1 OR attempt > max_attempts",
        "attempt out of range",
    )?;
    // Only from schema v6 (a database not yet opened by this build has no
    // record of clients; `market ledger` reads without migrating).
    let has_clients = match conn.engine() {
        Engine::Sqlite => conn.exists(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'paid_clients'",
            args![],
        )?,
        Engine::Postgres => true,
    };
    let clients_check = if has_clients {
        "SELECT n.node_id || ' counts ' || n.clients || ' paying clients but ' || COUNT(p.requester) || ' are recorded'
         FROM nodes n LEFT JOIN paid_clients p ON p.provider = n.node_id
         GROUP BY n.node_id HAVING n.clients != COUNT(p.requester)"
    } else {
        "SELECT '' WHERE 1 = 0"
    };
    q(clients_check, "reputation out of step with its clients")?;
    let count = |sql: &str| conn.count(sql, args![]);
    Ok(VerifyReport {
        ok: problems.is_empty(),
        totals,
        nodes: count("SELECT COUNT(*) FROM nodes")?,
        tasks: count("SELECT COUNT(*) FROM tasks")?,
        journal_entries: count("SELECT COUNT(*) FROM journal")?,
        problems,
    })
}
