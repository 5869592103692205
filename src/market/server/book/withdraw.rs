//! `withdraw`: a provider ends one of its active offers.
//!
//! It must not touch tasks already leased under the offer: they run to
//! their end.

use crate::market::server::store::args;
use serde_json::{json, Value};

use super::handler::{reject, Context, Fail};
use crate::market::protocol::Reason;

pub fn apply(cx: Context, offer_id: String) -> Result<Value, Fail> {
    let Context { c, node, .. } = cx;
    let owner: Option<(String, String)> = c.first(
        "SELECT node_id, state FROM offers WHERE offer_id = ?1",
        args![&offer_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    match owner {
        None => reject(Reason::NotFound, format!("no offer `{offer_id}`")),
        Some((o, _)) if o != node => reject(Reason::NotOwner, "this offer belongs to another node"),
        Some((_, st)) if st != "active" => reject(Reason::WrongState, "this offer is already withdrawn"),
        Some(_) => {
            c.write(
                "UPDATE offers SET state = 'withdrawn' WHERE offer_id = ?1",
                args![&offer_id],
            )?;
            Ok(json!({ "offer_id": offer_id, "state": "withdrawn" }))
        }
    }
}
