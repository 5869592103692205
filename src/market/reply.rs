//! The typed result of each request, read on the node's side from the
//! same JSON the coordinator sends in an `ok` frame (docs/PROTOCOL.md shows
//! each one). One type per request type; [`Reply::ANSWERS`] names the
//! request it answers, and the client's `call` checks it.
//!
//! These are shapes only: this module must not decide anything and must not
//! touch the network. Every field the coordinator sends is kept, so a reply
//! printed with `--json` is the document the coordinator sent.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::market::protocol::{IdentityProof, RequesterStanding, TaskView};

/// A reply to one request type.
pub trait Reply: DeserializeOwned {
    /// The wire name of the request this answers (`Request::kind`).
    const ANSWERS: &'static str;
}

macro_rules! answers {
    ($($t:ty => $kind:literal),* $(,)?) => {$(
        impl Reply for $t {
            const ANSWERS: &'static str = $kind;
        }
    )*};
}

answers!(
    OfferRegistered => "offer",
    OfferWithdrawn => "withdraw",
    Posted => "post",
    Raised => "raise",
    LeaseGranted => "accept",
    Renewed => "renew",
    Relayed => "payload",
    DeliveryHeld => "deliver",
    Settlement => "settle",
    Rejected => "reject",
    StatusView => "status",
    ReputationView => "reputation",
    IdentityProof => "identity",
    HeldResult => "result",
    TaskView => "task",
    Abandoned => "abandon",
    ProgressRelayed => "progress",
);

/// `progress`: relayed to the requester (or dropped while it is away).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressRelayed {
    pub task_id: String,
    pub attempt: u32,
    pub relayed: bool,
}

/// `offer`: the registered offer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OfferRegistered {
    pub offer_id: String,
    /// RFC 3339.
    pub expires: String,
}

/// `withdraw`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OfferWithdrawn {
    pub offer_id: String,
    pub state: String,
}

/// `post`: the new task and what was locked in escrow for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Posted {
    pub task: TaskView,
    pub escrow: i64,
}

/// `raise`: the new bid and the escrow it added.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Raised {
    pub task_id: String,
    pub max_price: u64,
    pub escrow_added: i64,
}

/// `accept`: the lease won, with what the job needs to know.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseGranted {
    pub task_id: String,
    pub attempt: u32,
    pub ask: i64,
    /// RFC 3339; renew before it passes.
    pub lease_deadline: String,
    pub payload_hash: String,
    pub model: String,
    pub max_tokens: u64,
}

/// `renew`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Renewed {
    pub task_id: String,
    pub attempt: u32,
    pub lease_deadline: String,
}

/// `payload`: relayed to the lease holder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Relayed {
    pub task_id: String,
    pub attempt: u32,
    pub relayed_to: String,
    pub bytes: u64,
}

/// `deliver`: the result is held for the requester.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryHeld {
    pub task_id: String,
    pub attempt: u32,
    pub state: String,
    pub bytes: u64,
}

/// `settle` (and, as [`Rejected`], `reject`): what was paid and refunded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settlement {
    pub task_id: String,
    pub attempt: u32,
    /// `settled`, `refunded`, or (a rejection with attempts left) `open`.
    pub state: String,
    pub paid: i64,
    pub refunded: i64,
}

/// `reject` answers with the same shape as `settle`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rejected(pub Settlement);

/// `abandon`: where the task went next (`open` again, or `refunded`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Abandoned {
    pub task_id: String,
    pub attempt: u32,
    pub state: String,
}

/// `result`: a delivered result, still sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldResult {
    pub task_id: String,
    pub attempt: u32,
    pub provider: Option<String>,
    pub payload_hash: String,
    pub data: Option<String>,
}

/// `reputation` (and inside `status`): a node's settled record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReputationView {
    pub successes: i64,
    pub failures: i64,
    pub clients: i64,
    pub score: f64,
    /// Present when asked for one node (`reputation`), not inside `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// How the node judged results it received as a requester (`reputation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_requester: Option<RequesterStanding>,
}

/// One of this node's active offers, inside `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OfferStatus {
    pub offer_id: String,
    pub slots: i64,
    pub price: i64,
    pub models: serde_json::Value,
    pub expires: String,
    pub connected: bool,
}

/// The ledger's totals by account kind, inside `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerTotals {
    pub issued: i64,
    pub balances: i64,
    pub escrow: i64,
}

/// The market's totals, inside `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerTotals {
    pub nodes: i64,
    pub active_offers: i64,
    /// Number of tasks in each state.
    pub tasks: BTreeMap<String, i64>,
    pub ledger: LedgerTotals,
}

/// `status`: this node's balance, escrow, offers, tasks and reputation,
/// and the market's totals.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub node_id: String,
    pub balance: i64,
    pub escrow: i64,
    pub offers: Vec<OfferStatus>,
    pub tasks: Vec<TaskView>,
    pub reputation: ReputationView,
    pub cooldown_until: Option<String>,
    pub server: ServerTotals,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_reply_serialises_to_the_json_it_was_read_from() {
        let task = json!({
            "task_id": "t-1", "requester": "r", "model": "sonnet", "max_tokens": 10, "max_price": 5,
            "payload_hash": "ab", "deadline": "2030-01-01T00:00:00.000Z", "max_attempts": 3,
            "min_reputation": 0.0, "state": "open", "attempt": 1, "provider": null, "ask": null,
            "lease_deadline": null, "payload_bytes": 12, "workspace_bytes": 2048,
            "permission_mode": "acceptEdits", "requester_standing": { "settled": 1, "rejected": 0, "score": 0.6666666666666666 },
        });
        let posted = json!({ "task": task, "escrow": 5 });
        let back: Posted = serde_json::from_value(posted.clone()).unwrap();
        // (Printed through a `Value`, as every caller does, the keys are in
        // the same order too.)
        assert_eq!(serde_json::to_value(&back).unwrap().to_string(), posted.to_string());
        let rep = json!({ "successes": 1, "failures": 0, "clients": 1, "score": 0.5, "node_id": "n" });
        let back: ReputationView = serde_json::from_value(rep.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), rep);
        let settled = json!({ "task_id": "t-1", "attempt": 1, "state": "refunded", "paid": 0, "refunded": 5 });
        let back: Rejected = serde_json::from_value(settled.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), settled);
    }
}
