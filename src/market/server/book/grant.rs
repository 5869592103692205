//! The operator's grant (`market grant`): RUV from the issuer to a node
//! that has logged in, as one journal entry.
//!
//! It must not run inside the coordinator's writer: `market grant` calls
//! it in its own transaction beside a running coordinator.

use crate::market::server::store::{args, Db};

use super::handler::{reject, Fail};
use super::rules::MAX_GRANT;
use crate::market::protocol::Reason;
use crate::market::server::ledger::{self, node_account, ISSUER};

/// The operator credits `node` with `amount` RUV from the issuer: one
/// journal entry (`operator_grant`), so `market ledger --verify` and the
/// totals account for it. The node must have logged in once (a mistyped
/// id is refused, not funded). Returns the journal id and the new balance.
pub fn operator_grant(c: Db, node: &str, amount: i64, now: i64) -> Result<(i64, i64), Fail> {
    if !(1..=MAX_GRANT).contains(&amount) {
        return reject(Reason::InvalidField, format!("a grant must be 1..={MAX_GRANT} RUV"));
    }
    let known = c
        .first("SELECT 1 FROM nodes WHERE node_id = ?1", args![node], |_| Ok(()))?
        .is_some();
    if !known {
        return reject(
            Reason::NotFound,
            format!("no node `{node}` has logged in to this coordinator"),
        );
    }
    let account = node_account(node);
    ledger::open_account(c, &account, "node")?;
    // The issuer may go negative by design; post() never refuses here.
    let _ = ledger::post(c, now, "operator_grant", None, &[(ISSUER, -amount), (&account, amount)])?;
    let jid = c.count("SELECT MAX(id) FROM journal", args![])?;
    Ok((jid, ledger::balance(c, &account)?))
}
