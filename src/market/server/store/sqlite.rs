//! The coordinator's SQLite file: open, tune for durability, migrate, and
//! run the store interface's statements on it.
//!
//! WAL with `synchronous=FULL`: a commit returns only after the WAL is on
//! disk, so an acknowledged operation survives `kill -9` and power loss. The
//! schema version is `PRAGMA user_version`; each migration runs in its own
//! transaction with the version bump, so a crash mid-migration leaves the
//! old schema intact.
//!
//! It must not hold market rules: it knows tables, not what they mean.

use std::path::Path;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::Connection;

use super::{Result, Row, Value, V};

impl rusqlite::ToSql for V<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            V::Null => ValueRef::Null,
            V::Int(i) => ValueRef::Integer(*i),
            V::Real(f) => ValueRef::Real(*f),
            V::Text(s) => ValueRef::Text(s.as_bytes()),
            V::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn value_of(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => V::Null,
        ValueRef::Integer(i) => V::Int(i),
        ValueRef::Real(f) => V::Real(f),
        ValueRef::Text(t) => V::Text(String::from_utf8_lossy(t).into_owned().into()),
        ValueRef::Blob(b) => V::Blob(b.to_vec().into()),
    }
}

pub(super) fn exec(c: &Connection, sql: &str, args: &[V]) -> Result<u64> {
    Ok(c.prepare_cached(sql)?.execute(rusqlite::params_from_iter(args))? as u64)
}

pub(super) fn rows(c: &Connection, sql: &str, args: &[V]) -> Result<Vec<Row>> {
    let mut st = c.prepare_cached(sql)?;
    let n = st.column_count();
    let mut q = st.query(rusqlite::params_from_iter(args))?;
    let mut out = Vec::new();
    while let Some(r) = q.next()? {
        out.push(Row((0..n)
            .map(|i| r.get_ref(i).map(value_of))
            .collect::<rusqlite::Result<_>>()?));
    }
    Ok(out)
}

/// Migrations in order; `MIGRATIONS[i]` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE nodes (
    node_id     TEXT PRIMARY KEY,
    ed25519     TEXT NOT NULL,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    successes   INTEGER NOT NULL DEFAULT 0,
    failures    INTEGER NOT NULL DEFAULT 0
);
-- Double-entry ledger. kind: 'issuer' (negative: tokens issued), 'node', 'escrow'.
CREATE TABLE accounts (
    account TEXT PRIMARY KEY,
    kind    TEXT NOT NULL,
    balance INTEGER NOT NULL
);
CREATE TABLE journal (
    id      INTEGER PRIMARY KEY,
    ts      INTEGER NOT NULL,
    memo    TEXT NOT NULL,
    task_id TEXT
);
CREATE TABLE postings (
    journal_id INTEGER NOT NULL REFERENCES journal(id),
    account    TEXT NOT NULL REFERENCES accounts(account),
    amount     INTEGER NOT NULL
);
CREATE INDEX postings_account ON postings(account);
CREATE TABLE offers (
    offer_id        TEXT PRIMARY KEY,
    node_id         TEXT NOT NULL,
    slots           INTEGER NOT NULL,
    price           INTEGER NOT NULL,
    models          TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    state           TEXT NOT NULL,
    disconnected_at INTEGER
);
CREATE INDEX offers_node ON offers(node_id, state);
CREATE INDEX offers_state ON offers(state);
CREATE TABLE tasks (
    task_id        TEXT PRIMARY KEY,
    requester      TEXT NOT NULL,
    model          TEXT NOT NULL,
    max_tokens     INTEGER NOT NULL,
    max_price      INTEGER NOT NULL,
    payload_hash   TEXT NOT NULL,
    deadline       INTEGER NOT NULL,
    max_attempts   INTEGER NOT NULL,
    min_reputation REAL NOT NULL,
    state          TEXT NOT NULL,
    attempt        INTEGER NOT NULL,
    provider       TEXT,
    offer_id       TEXT,
    ask            INTEGER,
    lease_deadline INTEGER,
    result         BLOB,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX tasks_state ON tasks(state);
CREATE INDEX tasks_requester ON tasks(requester);
CREATE INDEX tasks_provider ON tasks(provider, state);
CREATE INDEX tasks_offer ON tasks(offer_id, state);
-- Applied client message ids with their results (idempotency).
CREATE TABLE requests (
    node_id TEXT NOT NULL,
    msg_id  TEXT NOT NULL,
    result  TEXT NOT NULL,
    ts      INTEGER NOT NULL,
    PRIMARY KEY (node_id, msg_id)
) WITHOUT ROWID;
INSERT INTO accounts(account, kind, balance) VALUES ('issuer', 'issuer', 0);
"#,
    // v2: index offers by model, so matching a task to providers does not
    // parse every active offer's model list.
    r#"
CREATE TABLE offer_models (
    offer_id TEXT NOT NULL REFERENCES offers(offer_id),
    model    TEXT NOT NULL,
    PRIMARY KEY (model, offer_id)
) WITHOUT ROWID;
INSERT OR IGNORE INTO offer_models(offer_id, model)
    SELECT o.offer_id, j.value FROM offers o, json_each(o.models) j;
"#,
    // v3: nothing reads postings by account except the full-scan verify;
    // the index only cost every posting an extra B-tree insert.
    r#"
DROP INDEX IF EXISTS postings_account;
"#,
    // v4: federation. A node's full public identity and the login signature
    // that binds its RSA key (peers encrypt to it), when a task was
    // delivered (the settle deadline counts from there), and the payload
    // size the requester declared (shown to providers deciding on it).
    r#"
ALTER TABLE nodes ADD COLUMN identity TEXT;
ALTER TABLE nodes ADD COLUMN proof TEXT;
ALTER TABLE tasks ADD COLUMN delivered_at INTEGER;
ALTER TABLE tasks ADD COLUMN payload_bytes INTEGER;
CREATE INDEX tasks_delivered ON tasks(state, delivered_at);
"#,
    // v5: when the requester's payload was relayed for the current attempt.
    // A lease whose requester leaves before sending it is recalled without
    // using up an attempt.
    r#"
ALTER TABLE tasks ADD COLUMN payload_at INTEGER;
"#,
    // v6: market economics. When the current attempt was accepted (whether
    // a lapse is the provider's fault depends on it); a node's cool-down
    // after it gave up or lost a lease; which nodes held an attempt of an
    // open task (none gets a second one after its own failure); and the
    // distinct requesters that paid a provider (reputation counts those,
    // not self-trades repeated between two identities).
    r#"
ALTER TABLE tasks ADD COLUMN accepted_at INTEGER;
ALTER TABLE nodes ADD COLUMN cooldown_until INTEGER;
ALTER TABLE nodes ADD COLUMN clients INTEGER NOT NULL DEFAULT 0;
CREATE TABLE attempt_holders (
    task_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    PRIMARY KEY (task_id, node_id)
) WITHOUT ROWID;
INSERT OR IGNORE INTO attempt_holders(task_id, node_id)
    SELECT task_id, provider FROM tasks WHERE state IN ('open','assigned') AND provider IS NOT NULL;
CREATE TABLE paid_clients (
    provider  TEXT NOT NULL,
    requester TEXT NOT NULL,
    PRIMARY KEY (provider, requester)
) WITHOUT ROWID;
INSERT OR IGNORE INTO paid_clients(provider, requester)
    SELECT provider, requester FROM tasks WHERE state = 'settled' AND ask > 0 AND provider IS NOT NULL;
UPDATE nodes SET clients = (SELECT COUNT(*) FROM paid_clients p WHERE p.provider = nodes.node_id);
"#,
    // v7: tasks that carry a workspace (its size and the permission mode
    // they ask for), payloads in several frames, and how each requester
    // judges results (settled and rejected deliveries, each rejection's
    // reason by hash and size only).
    r#"
ALTER TABLE tasks ADD COLUMN workspace_bytes INTEGER;
ALTER TABLE tasks ADD COLUMN permission_mode TEXT;
ALTER TABLE tasks ADD COLUMN payload_next INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN req_settled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN req_rejected INTEGER NOT NULL DEFAULT 0;
CREATE TABLE rejections (
    task_id       TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    requester     TEXT NOT NULL,
    provider      TEXT NOT NULL,
    reason_sha256 TEXT,
    reason_bytes  INTEGER,
    at            INTEGER NOT NULL,
    PRIMARY KEY (task_id, attempt)
) WITHOUT ROWID;
"#,
    // v8 (every page a batch touches is written again at its commit).
    super::LEANER_TASK_INDEXES,
];

/// Open (creating if needed) and migrate. `sync_full` picks
/// `synchronous=FULL` (durable across power loss) over `NORMAL` (durable
/// across process crashes only).
pub fn open(path: &Path, sync_full: bool) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if sync_full { "FULL" } else { "NORMAL" })?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Each request runs in a savepoint; keep its statement journal in memory
    // instead of a temporary file (the WAL carries durability).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -32_000)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Every statement of the book stays prepared: a cycle alone uses about
    // 40, and an evicted one is parsed again on its next use.
    conn.set_prepared_statement_cache_capacity(256);
    migrate(&mut conn)?;
    Ok(conn)
}

/// Checkpoint the WAL into the database file from a second connection, so
/// the writer's commits never pay for it (the writer runs with automatic
/// checkpoints off). Passive: never blocks the writer.
pub fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}

/// Open read-only for inspection (`market ledger --verify`).
pub fn open_read(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

pub fn schema_version(conn: &Connection) -> rusqlite::Result<usize> {
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map(|v| v as usize)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let have = schema_version(conn)?;
    if have > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "market database schema version {have} is newer than this build ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v5 database (before the economics columns) opens, migrates and
    /// keeps what it knew: settled paid work becomes paying clients, and a
    /// lease held at the time bars its holder from the task's next attempt.
    #[test]
    fn a_v5_database_migrates_to_v6_with_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("market.db");
        {
            let mut c = Connection::open(&path).unwrap();
            for (i, sql) in MIGRATIONS.iter().take(5).enumerate() {
                let tx = c.transaction().unwrap();
                tx.execute_batch(sql).unwrap();
                tx.pragma_update(None, "user_version", (i + 1) as i64).unwrap();
                tx.commit().unwrap();
            }
            c.execute_batch(
                "INSERT INTO nodes(node_id, ed25519, first_seen, last_seen, successes) VALUES ('p', 'k', 0, 0, 3);
                 INSERT INTO nodes(node_id, ed25519, first_seen, last_seen) VALUES ('r', 'k', 0, 0);
                 INSERT INTO tasks(task_id, requester, model, max_tokens, max_price, payload_hash, deadline,
                   max_attempts, min_reputation, state, attempt, provider, ask, created_at, updated_at)
                 VALUES ('t1', 'r', 'm', 1, 5, 'h', 0, 3, 0, 'settled', 1, 'p', 5, 0, 0),
                        ('t2', 'r', 'm', 1, 5, 'h', 0, 3, 0, 'settled', 1, 'p', 5, 0, 0),
                        ('t3', 'r', 'm', 1, 5, 'h', 0, 3, 0, 'assigned', 1, 'p', 5, 0, 0);",
            )
            .unwrap();
        }
        let c = open(&path, true).unwrap();
        assert_eq!(schema_version(&c).unwrap(), MIGRATIONS.len());
        let (succ, clients): (i64, i64) = c
            .query_row("SELECT successes, clients FROM nodes WHERE node_id = 'p'", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(
            (succ, clients),
            (3, 1),
            "two settled tasks from one requester are one client"
        );
        let held: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM attempt_holders WHERE task_id = 't3' AND node_id = 'p'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(held, 1);
    }
}
