//! The `market grant` operation: an operator credits a node with RUV from
//! the issuer, as one `operator_grant` journal entry in its own durable
//! transaction beside running coordinators (SQLite serialises it with the
//! coordinator's writer; on PostgreSQL it locks the rows it changes, as a
//! replica's batch does),
//! then the operator's `market.granted` audit line.
//!
//! It must not print; the caller renders the [`Granted`] it returns.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::json;

use crate::audit::{AuditLog, Event};
use crate::exit::{Exit, HasExit};
use crate::market::server;
use crate::market::server::book::{self, Fail};
use crate::market::server::store::{DbSpec, Store};
use crate::paths::Paths;

#[derive(Debug, Clone)]
pub struct GrantOptions {
    /// The node to credit (64 hex digits, any case).
    pub node_id: String,
    pub amount: u64,
    /// The coordinator's store.
    pub db: DbSpec,
}

/// A grant made and recorded.
#[derive(Debug, Clone, Serialize)]
pub struct Granted {
    pub node_id: String,
    pub granted: i64,
    pub balance: i64,
    pub journal_id: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("`{}` is not a node id: a node id is 64 hex digits", .0.escape_debug())]
    NotANodeId(String),
    #[error("no market database at {}", .0.display())]
    NoDatabase(PathBuf),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Store(String),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

impl HasExit for GrantError {
    fn exit(&self) -> Exit {
        match self {
            GrantError::NotANodeId(_) | GrantError::NoDatabase(_) | GrantError::Refused(_) => Exit::Usage,
            GrantError::Store(_) => Exit::Unavailable,
            GrantError::Audit(e) => e.exit(),
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            GrantError::NotANodeId(_) => Some("the node prints its id with `claude-max-market keys show`".into()),
            GrantError::NoDatabase(_) => Some("pass the coordinator's `--db FILE` or `--db postgres://...`".into()),
            GrantError::Refused(_) => {
                Some("the node must connect to this coordinator once (e.g. `market status`) before it is funded".into())
            }
            GrantError::Store(_) => None,
            GrantError::Audit(e) => e.hint(),
        }
    }
}

/// Credit the node and record it.
pub fn grant(paths: &Paths, opts: GrantOptions) -> Result<Granted, GrantError> {
    let node = opts.node_id.to_ascii_lowercase();
    if node.len() != 64 || !node.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(GrantError::NotANodeId(opts.node_id));
    }
    let db = opts.db;
    if let DbSpec::Sqlite(path) = &db {
        if !path.exists() {
            return Err(GrantError::NoDatabase(path.clone()));
        }
    }
    let store_err = |what: &str, e: &dyn std::fmt::Display| GrantError::Store(format!("{what}{db}: {e}"));
    let mut conn = Store::open(&db).map_err(|e| store_err("cannot open ", &e))?;
    conn.begin().map_err(|e| store_err("cannot write ", &e))?;
    let amount = opts.amount as i64;
    let (journal_id, balance) = match book::operator_grant(conn.db(), &node, amount, server::now_ms()) {
        Ok(r) => r,
        Err(Fail::Reject(r)) => {
            conn.rollback();
            return Err(GrantError::Refused(r.message));
        }
        Err(Fail::Sql(e)) => {
            conn.rollback();
            return Err(store_err("", &e));
        }
    };
    conn.commit().map_err(|e| store_err("cannot commit to ", &e))?;
    AuditLog::new(paths).append(
        Event::MarketGranted,
        json!({ "node_id": node, "amount": amount, "journal_id": journal_id, "db": db.to_string() }),
    )?;
    Ok(Granted {
        node_id: node,
        granted: amount,
        balance,
        journal_id,
    })
}
