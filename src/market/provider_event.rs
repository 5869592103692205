//! What a provider reports as it advertises and serves leases: one
//! [`ProviderEvent`] per step, printed by `advertise` (one JSON line each
//! with `--json`: the field names are part of that output), and the audit
//! line each step worth a record is written as.
//!
//! Shapes and their mapping only: this module must not print, write the
//! audit log itself or decide anything.

use serde::Serialize;
use serde_json::{json, Value};

use crate::audit::Event as AuditEvent;
use crate::market::protocol::{AbandonReason, Event, TaskView};
use crate::market::reply::{LeaseGranted, OfferRegistered};

/// One step of advertising, as it happens. `--json` prints each as one
/// line; the field names are part of that output.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProviderEvent {
    /// This node's login serves only its owner's own nodes (how many are known).
    OwnNodesOnly {
        own_nodes: usize,
    },
    Connected {
        node_id: String,
        balance: i64,
        granted: i64,
        /// The coordinator replica this session is on.
        endpoint: String,
    },
    /// The session on `from` was lost and this one is on `endpoint`; held
    /// leases carry on here.
    Failover {
        endpoint: String,
        from: String,
    },
    Reconnecting {
        in_ms: u64,
        error: String,
    },
    Offer {
        offer: OfferRegistered,
    },
    /// A decision on a task offer, with its reason.
    TaskOffered {
        task: Box<TaskView>,
        accept: bool,
        approved_by: Option<&'static str>,
        declined: Option<String>,
    },
    LeaseWon {
        lease: LeaseGranted,
    },
    AcceptRefused {
        task_id: String,
        reason: Option<&'static str>,
        error: String,
    },
    PayloadUnexpected {
        task_id: String,
        attempt: u32,
    },
    LeaseLapsed {
        task_id: String,
        attempt: u32,
    },
    Running {
        task_id: String,
        attempt: u32,
    },
    LeaseLost {
        task_id: String,
        attempt: u32,
    },
    Delivered {
        task_id: String,
        attempt: u32,
        job_id: Option<String>,
    },
    DeliverRefused {
        task_id: String,
        attempt: u32,
        reason: Option<&'static str>,
        error: String,
    },
    Abandoned {
        task_id: String,
        attempt: u32,
        reason: AbandonReason,
        why: String,
    },
    /// The requester rejected our delivery; `reason` is its text, opened
    /// (`verified`: sealed by the requester and matching the hash the
    /// coordinator keeps). The task is `state` now.
    Rejected {
        task_id: String,
        attempt: u32,
        state: String,
        reason: String,
        reason_sha256: Option<String>,
        verified: bool,
    },
    Warning {
        message: String,
    },
    Disconnected {
        reconnect_in_ms: u64,
    },
    Withdrawn {
        offer_id: String,
    },
    /// Anything else the coordinator pushed (a settlement, a refund, ...).
    #[serde(untagged)]
    Pushed(Pushed),
}

/// A coordinator event passed on as it came: `event` is its type.
#[derive(Debug, Clone, Serialize)]
pub struct Pushed {
    pub event: String,
    pub detail: Event,
}

impl ProviderEvent {
    /// Pass on an event the coordinator pushed.
    pub fn pushed(ev: Event) -> ProviderEvent {
        let v = serde_json::to_value(&ev).unwrap_or(Value::Null);
        ProviderEvent::Pushed(Pushed {
            event: v["type"].as_str().unwrap_or_default().to_string(),
            detail: ev,
        })
    }

    /// The audit line this step is recorded as, if it is one worth a
    /// record (ids and numbers only).
    pub fn audit_record(&self) -> Option<(AuditEvent, Value)> {
        Some(match self {
            ProviderEvent::Offer { offer } => (AuditEvent::MarketOffer, json!({ "offer_id": offer.offer_id })),
            ProviderEvent::TaskOffered {
                task,
                accept,
                approved_by,
                declined,
            } => (
                if *accept {
                    AuditEvent::MarketApproved
                } else {
                    AuditEvent::MarketDeclined
                },
                json!({ "task_id": task.task_id, "attempt": task.attempt, "requester": task.requester,
                        "max_price": task.max_price, "model": task.model, "max_tokens": task.max_tokens,
                        "approved_by": approved_by, "reason": declined }),
            ),
            ProviderEvent::LeaseWon { lease } => (
                AuditEvent::MarketAccept,
                json!({ "task_id": lease.task_id, "attempt": lease.attempt, "ask": lease.ask }),
            ),
            ProviderEvent::Pushed(Pushed {
                detail: ev @ Event::Settled { .. },
                ..
            }) => (
                AuditEvent::MarketSettled,
                serde_json::to_value(ev).unwrap_or(Value::Null),
            ),
            ProviderEvent::Pushed(Pushed {
                detail: Event::Refunded { task_id, why, .. },
                ..
            }) => (AuditEvent::MarketRefunded, json!({ "task_id": task_id, "why": why })),
            ProviderEvent::LeaseLapsed { task_id, attempt } => (
                AuditEvent::MarketLapsed,
                json!({ "task_id": task_id, "attempt": attempt }),
            ),
            ProviderEvent::Withdrawn { offer_id } => (AuditEvent::MarketWithdraw, json!({ "offer_id": offer_id })),
            ProviderEvent::Rejected {
                task_id,
                attempt,
                state,
                reason,
                reason_sha256,
                verified,
            } => (
                AuditEvent::MarketRejectionReceived,
                json!({ "task_id": task_id, "attempt": attempt, "state": state, "reason": reason,
                        "reason_sha256": reason_sha256, "verified": verified }),
            ),
            _ => return None,
        })
    }
}

/// Where provider progress goes.
pub type Report<'a> = &'a mut dyn FnMut(&ProviderEvent);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pushed_event_prints_as_its_type_and_detail() {
        let ev = ProviderEvent::pushed(Event::Settled {
            task_id: "t-1".into(),
            attempt: 2,
            paid: 5,
            refunded: 1,
        });
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            json!({ "event": "settled",
                    "detail": { "type": "settled", "task_id": "t-1", "attempt": 2, "paid": 5, "refunded": 1 } })
        );
        let (event, fields) = ev.audit_record().unwrap();
        assert_eq!(event, AuditEvent::MarketSettled);
        assert_eq!(fields["paid"], 5);
        let ev = ProviderEvent::Disconnected { reconnect_in_ms: 7 };
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            json!({ "event": "disconnected", "reconnect_in_ms": 7 })
        );
        assert!(ev.audit_record().is_none());
    }
}
