//! `identity`: a node's public identity with the login signature that
//! binds its keys, as peers need it to encrypt to that node.
//!
//! It must not change anything: it is read-only and not remembered.

use crate::market::server::store::args;
use serde_json::{json, Value};

use super::handler::{reject, Context, Fail};
use crate::market::protocol::Reason;

pub fn apply(cx: Context, node_id: String) -> Result<Value, Fail> {
    let row: Option<(Option<String>, Option<String>)> = cx.c.first(
        "SELECT identity, proof FROM nodes WHERE node_id = ?1",
        args![&node_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let Some((Some(identity), Some(proof))) = row else {
        return reject(Reason::NotFound, format!("no identity known for node `{node_id}`"));
    };
    let identity: Value = serde_json::from_str(&identity).unwrap_or(Value::Null);
    let proof: Value = serde_json::from_str(&proof).unwrap_or(Value::Null);
    Ok(json!({ "identity": identity, "nonce": proof["nonce"], "sig": proof["sig"] }))
}
