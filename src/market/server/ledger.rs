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

use crate::market::server::store::{self, args, Arg, Db, Engine, NewId, V};
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
/// with the state change; an overdraft is refused and leaves nothing
/// changed.
///
/// A debit and its check are one statement; the journal row and all its
/// postings are two more, and the credits one each. On PostgreSQL a
/// movement with at most one checked debit is a single statement
/// ([`post_in_one`]).
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
    // Each account's net change: one account named twice moves once.
    let mut net: Vec<(&str, i64)> = Vec::with_capacity(postings.len());
    for &(account, amount) in postings.iter().filter(|p| p.1 != 0) {
        match net.iter_mut().find(|n| n.0 == account) {
            Some(n) => n.1 += amount,
            None => net.push((account, amount)),
        }
    }
    net.retain(|n| n.1 != 0);
    // A node's or a task's balance may not go below zero: each is debited
    // only if it covers its part, the check and the debit one statement
    // (on PostgreSQL the row stays locked until the transaction ends, and a
    // replica that waited for it checks the balance it finds then).
    let checked = |n: &(&str, i64)| n.0 != ISSUER && n.1 < 0;
    if tx.engine() == Engine::Postgres && net.iter().filter(|n| checked(n)).count() <= 1 {
        return post_in_one(tx, now, memo, task_id, postings, &net, checked);
    }
    let mut debited: Vec<(&str, i64)> = Vec::new();
    for &(account, amount) in net.iter().filter(|n| checked(n)) {
        let covered = tx
            .value::<i64>(
                "UPDATE accounts SET balance = balance + ?2 WHERE account = ?1 AND balance + ?2 >= 0 RETURNING balance",
                args![account, amount],
            )?
            .is_some();
        if !covered {
            // Nothing of a refused movement stays.
            for (done, amount) in debited {
                tx.write(
                    "UPDATE accounts SET balance = balance - ?2 WHERE account = ?1",
                    args![done, amount],
                )?;
            }
            return Ok(Err(Overdraft {
                account: account.to_string(),
                balance: balance(tx, account)?,
                needed: -amount,
            }));
        }
        debited.push((account, amount));
    }
    let lines: Vec<(&str, i64)> = postings.iter().copied().filter(|p| p.1 != 0).collect();
    if lines.is_empty() {
        return Ok(Ok(()));
    }
    // The journal row's id, as a parameter (`?1`) or as SQL naming it.
    let (jid, mut params) = match tx.insert_id(
        "journal",
        "INSERT INTO journal(ts, memo, task_id) VALUES (?1, ?2, ?3)",
        args![now, memo, task_id],
    )? {
        NewId::Value(id) => ("?1".to_string(), vec![V::Int(id)]),
        NewId::Sql(sql) => (sql, Vec::new()),
    };
    let rows = store::value_rows(&format!("{jid}, "), params.len() + 1, lines.len(), 2);
    params.extend(lines.iter().flat_map(|l| [l.0.arg(), l.1.arg()]));
    tx.write(
        &format!("INSERT INTO postings(journal_id, account, amount) VALUES {rows}"),
        &params,
    )?;
    for (account, amount) in net.iter().filter(|n| !checked(n)) {
        tx.write(
            "UPDATE accounts SET balance = balance + ?2 WHERE account = ?1",
            args![account, amount],
        )?;
    }
    Ok(Ok(()))
}

/// [`post`] as one statement, on PostgreSQL, for a movement with at most
/// one checked debit (every movement the book makes): the debit and its
/// check, then, only if it was covered, the credits, the journal row and
/// its postings, each a part of one `WITH`. Covered or not, it is all or
/// nothing, and one statement instead of one per account and two more.
fn post_in_one(
    tx: Db,
    now: i64,
    memo: &str,
    task_id: Option<&str>,
    postings: &[(&str, i64)],
    net: &[(&str, i64)],
    checked: impl Fn(&(&str, i64)) -> bool,
) -> store::Result<Result<(), Overdraft>> {
    let mut params: Vec<V> = vec![now.arg(), memo.arg(), task_id.arg()];
    fn next<'a>(params: &mut Vec<V<'a>>, v: V<'a>) -> usize {
        params.push(v);
        params.len()
    }
    let debit = net.iter().find(|n| checked(n));
    let mut sql = String::from("WITH ");
    match debit {
        Some(&(account, amount)) => {
            let (a, m) = (next(&mut params, account.arg()), next(&mut params, V::Int(amount)));
            sql += &format!(
                "d AS (UPDATE accounts SET balance = balance + CAST(?{m} AS BIGINT)
                   WHERE account = ?{a} AND balance + CAST(?{m} AS BIGINT) >= 0 RETURNING account),
                 ok AS (SELECT COUNT(*) = 1 AS ok FROM d),"
            );
        }
        None => sql += "ok AS (SELECT TRUE AS ok),",
    }
    // `(account, amount)` rows of a `VALUES` list, their values as parameters.
    fn values<'a>(params: &mut Vec<V<'a>>, rows: impl Iterator<Item = (&'a str, i64)>) -> Vec<String> {
        rows.map(|(account, amount)| {
            let a = next(params, account.arg());
            let m = next(params, V::Int(amount));
            format!("(?{a}, CAST(?{m} AS BIGINT))")
        })
        .collect()
    }
    let credits = values(&mut params, net.iter().filter(|n| !checked(n)).copied());
    if !credits.is_empty() {
        sql += &format!(
            " c AS (UPDATE accounts a SET balance = a.balance + m.amount
                 FROM (VALUES {}) AS m(account, amount), ok WHERE ok.ok AND a.account = m.account),",
            credits.join(", ")
        );
    }
    let lines = values(&mut params, postings.iter().filter(|p| p.1 != 0).copied());
    sql += &format!(
        " j AS (INSERT INTO journal(ts, memo, task_id) SELECT ?1, ?2, CAST(?3 AS TEXT) FROM ok WHERE ok.ok RETURNING id),
         p AS (INSERT INTO postings(journal_id, account, amount)
               SELECT j.id, l.account, l.amount FROM j, (VALUES {}) AS l(account, amount))
         SELECT id FROM j",
        lines.join(", ")
    );
    // A row back is the movement made; none, the debit refused and nothing
    // changed.
    if !tx.rows(&sql, &params)?.is_empty() {
        return Ok(Ok(()));
    }
    let (account, amount) = debit.copied().unwrap_or_default();
    Ok(Err(Overdraft {
        account: account.to_string(),
        balance: balance(tx, account)?,
        needed: -amount,
    }))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::server::store::sqlite;

    fn balances(db: Db) -> Vec<(String, i64)> {
        db.map("SELECT account, balance FROM accounts ORDER BY account", args![], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap()
    }

    /// A movement whose second debit cannot be covered changes no balance
    /// and writes no journal row, though its first debit could be.
    #[test]
    fn an_overdraft_on_any_debit_leaves_every_balance_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let c = sqlite::open(&dir.path().join("market.db"), true).unwrap();
        let db = Db::Sqlite(&c);
        for a in ["node:a", "node:b", "node:c"] {
            open_account(db, a, "node").unwrap();
        }
        post(db, 1, "grant", None, &[(ISSUER, -10), ("node:a", 7), ("node:b", 3)])
            .unwrap()
            .unwrap();
        let before = balances(db);
        let refused = post(db, 2, "pay", None, &[("node:a", -5), ("node:b", -4), ("node:c", 9)])
            .unwrap()
            .unwrap_err();
        assert_eq!(
            (refused.account.as_str(), refused.balance, refused.needed),
            ("node:b", 3, 4)
        );
        assert_eq!(balances(db), before);
        assert_eq!(db.count("SELECT COUNT(*) FROM journal", args![]).unwrap(), 1);
        let report = verify(db).unwrap();
        assert!(report.ok, "{:?}", report.problems);
    }

    /// An account named twice in one movement moves by its net amount, and
    /// every posting is kept as written.
    #[test]
    fn postings_to_one_account_net_out_in_its_balance_and_stay_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let c = sqlite::open(&dir.path().join("market.db"), true).unwrap();
        let db = Db::Sqlite(&c);
        for a in ["node:a", "node:b"] {
            open_account(db, a, "node").unwrap();
        }
        post(db, 1, "grant", None, &[(ISSUER, -10), ("node:a", 10)])
            .unwrap()
            .unwrap();
        post(db, 2, "pay", None, &[("node:a", -6), ("node:b", 4), ("node:a", 2)])
            .unwrap()
            .unwrap();
        assert_eq!(
            balances(db),
            vec![("issuer".into(), -10), ("node:a".into(), 6), ("node:b".into(), 4)]
        );
        assert_eq!(db.count("SELECT COUNT(*) FROM postings", args![]).unwrap(), 5);
        let report = verify(db).unwrap();
        assert!(report.ok, "{:?}", report.problems);
    }
}
