//! The requester side of a federated job: post a task, send the payload
//! sealed to whichever provider wins the lease, and verify, open and settle
//! the result. Also reads a held result back later (`market result`).
//!
//! A result is printed only after the provider's signature over (task,
//! attempt, payload hash, status, ciphertext) verifies and the envelope
//! opens; a result that fails is rejected (refund, provider failure) and
//! reported, never shown.

use std::time::Duration;

use serde_json::{json, Value};

use crate::crypto::keys::{Identity, PublicIdentity};
use crate::exit::{Exit, HasExit};
use crate::market::client::{Client, ClientError};
use crate::market::protocol::{AbandonReason, Event, IdentityProof, Request};
use crate::market::sealed::{self, Binding, SealError};

#[derive(Debug, thiserror::Error)]
pub enum RequesterError {
    #[error(transparent)]
    Market(#[from] ClientError),
    #[error("the result for task {task_id} attempt {attempt} failed verification and was rejected: {source}")]
    Rejected {
        task_id: String,
        attempt: u32,
        source: SealError,
    },
    #[error("the identity the market gave for node {0} does not verify")]
    BadIdentity(String),
    #[error("task {task_id} was refunded: {why}")]
    Refunded { task_id: String, why: String },
    #[error("no result for task {task_id} within {secs} s")]
    TimedOut { task_id: String, secs: u64 },
    #[error("{0}")]
    Protocol(String),
}

impl HasExit for RequesterError {
    fn exit(&self) -> Exit {
        match self {
            RequesterError::Market(e) => e.exit(),
            RequesterError::Rejected { .. } | RequesterError::BadIdentity(_) => Exit::Integrity,
            RequesterError::Refunded { .. } | RequesterError::TimedOut { .. } | RequesterError::Protocol(_) => {
                Exit::Failed
            }
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            RequesterError::Market(e) => e.hint(),
            RequesterError::Rejected { .. } => {
                Some("nothing was decrypted or paid; post the task again, perhaps with `--min-reputation`".into())
            }
            RequesterError::TimedOut { task_id, .. } => Some(format!(
                "fetch it later with `claude-max-market market result {task_id}`"
            )),
            _ => None,
        }
    }
}

/// A verified, decrypted and settled result.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub task_id: String,
    pub attempt: u32,
    pub provider: String,
    /// `completed` (failed attempts are re-offered, not delivered).
    pub status: String,
    /// The provider's result document (status, result text, usage, ...).
    pub body: Value,
    /// The coordinator's settlement (`paid`, `refunded`).
    pub settlement: Value,
}

/// A node's identity from the market, checked against its login signature.
pub async fn peer_identity(client: &Client, node_id: &str) -> Result<PublicIdentity, RequesterError> {
    let v = client
        .request(&Request::Identity {
            node_id: node_id.to_string(),
        })
        .await?;
    let proof: IdentityProof =
        serde_json::from_value(v).map_err(|_| RequesterError::BadIdentity(node_id.to_string()))?;
    proof
        .verified(node_id)
        .cloned()
        .ok_or_else(|| RequesterError::BadIdentity(node_id.to_string()))
}

/// Verify and open a delivered result, then settle it; on a failed check,
/// reject it (refund) and return why.
pub async fn verify_and_settle(
    client: &Client,
    me: &Identity,
    provider: &PublicIdentity,
    binding: &Binding,
    data: &str,
) -> Result<Outcome, RequesterError> {
    let opened = sealed::open_result(me, provider, binding, data).and_then(|(status, body)| {
        let body: Value = serde_json::from_slice(&body).map_err(|e| SealError::Malformed(e.to_string()))?;
        Ok((status, body))
    });
    let (status, body) = match opened {
        Ok(x) => x,
        Err(source) => {
            let _ = client
                .request(&Request::Reject {
                    task_id: binding.task_id.clone(),
                    attempt: binding.attempt,
                })
                .await;
            return Err(RequesterError::Rejected {
                task_id: binding.task_id.clone(),
                attempt: binding.attempt,
                source,
            });
        }
    };
    let settlement = client
        .request(&Request::Settle {
            task_id: binding.task_id.clone(),
            attempt: binding.attempt,
        })
        .await?;
    Ok(Outcome {
        task_id: binding.task_id.clone(),
        attempt: binding.attempt,
        provider: provider.node_id.clone(),
        status,
        body,
        settlement,
    })
}

/// Post `post` (whose payload hash is `prompt`'s), then see it through:
/// send the sealed payload to each lease holder, and verify, print and
/// settle the result. `progress` receives one document per step.
pub async fn post_and_wait(
    endpoint: &str,
    me: &Identity,
    post: &Request,
    prompt: &[u8],
    wait: Duration,
    progress: &mut dyn FnMut(Value),
) -> Result<Outcome, RequesterError> {
    let mut client = Client::connect(endpoint, me).await?;
    let posted = client.request(post).await?;
    let task_id = posted["task"]["task_id"].as_str().unwrap_or_default().to_string();
    let payload_hash = posted["task"]["payload_hash"].as_str().unwrap_or_default().to_string();
    progress(json!({ "event": "posted", "task_id": task_id, "escrow": posted["escrow"] }));
    let deadline = tokio::time::Instant::now() + wait;
    let mut assigned: Option<(u32, PublicIdentity)> = None;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(ev) = client.next_event(left).await else {
            client.close();
            return Err(if left.is_zero() {
                RequesterError::TimedOut {
                    task_id,
                    secs: wait.as_secs(),
                }
            } else {
                RequesterError::Market(ClientError::Closed)
            });
        };
        match ev {
            Event::Assigned {
                task_id: t,
                attempt,
                provider,
            } if t == task_id => {
                progress(json!({ "event": "assigned", "task_id": task_id, "attempt": attempt, "provider": provider }));
                let peer = peer_identity(&client, &provider).await?;
                let binding = Binding {
                    task_id: task_id.clone(),
                    attempt,
                    payload_hash: payload_hash.clone(),
                };
                let data = sealed::seal_payload(me, &peer, &binding, prompt)
                    .map_err(|e| RequesterError::Protocol(format!("cannot seal the payload: {e}")))?;
                match client
                    .request(&Request::Payload {
                        task_id: task_id.clone(),
                        attempt,
                        data,
                    })
                    .await
                {
                    Ok(r) => progress(
                        json!({ "event": "running", "task_id": task_id, "attempt": attempt, "provider": provider, "bytes": r["bytes"] }),
                    ),
                    // The lease moved on meanwhile; the next assignment gets it.
                    Err(e) => progress(
                        json!({ "event": "payload_refused", "task_id": task_id, "attempt": attempt,
                                               "error": e.to_string() }),
                    ),
                }
                assigned = Some((attempt, peer));
            }
            Event::Delivered {
                task_id: t,
                attempt,
                data,
            } if t == task_id => {
                progress(json!({ "event": "delivered", "task_id": task_id, "attempt": attempt }));
                let Some((_, peer)) = assigned.as_ref().filter(|(a, _)| *a == attempt) else {
                    continue;
                };
                let binding = Binding {
                    task_id: task_id.clone(),
                    attempt,
                    payload_hash: payload_hash.clone(),
                };
                let r = verify_and_settle(&client, me, peer, &binding, &data).await;
                client.close();
                return r;
            }
            Event::Abandoned {
                task_id: t,
                attempt,
                provider,
                reason,
                data,
            } if t == task_id => {
                // A failure report is shown only if it verifies.
                let error = match (&assigned, &data) {
                    (Some((a, peer)), Some(d)) if *a == attempt && reason == AbandonReason::Failed => {
                        let b = Binding {
                            task_id: task_id.clone(),
                            attempt,
                            payload_hash: payload_hash.clone(),
                        };
                        match sealed::open_result(me, peer, &b, d) {
                            Ok((_, body)) => serde_json::from_slice::<Value>(&body)
                                .ok()
                                .and_then(|v| v["error"].as_str().map(str::to_string)),
                            Err(e) => Some(format!("(failure report did not verify: {e})")),
                        }
                    }
                    _ => None,
                };
                progress(
                    json!({ "event": "attempt_failed", "task_id": task_id, "attempt": attempt,
                                 "provider": provider, "reason": reason.as_str(), "error": error }),
                );
            }
            Event::Refunded {
                task_id: t,
                amount,
                why,
            } if t == task_id => {
                progress(json!({ "event": "refunded", "task_id": task_id, "amount": amount, "why": why }));
                client.close();
                return Err(RequesterError::Refunded { task_id, why });
            }
            _ => {}
        }
    }
}

/// Read a held result back, verify, open and settle it. `payload_hash` is
/// the hash this node posted (from its own audit log) when known; the
/// coordinator's copy is used otherwise.
pub async fn fetch_result(
    endpoint: &str,
    me: &Identity,
    task_id: &str,
    payload_hash: Option<String>,
) -> Result<Outcome, RequesterError> {
    let client = Client::connect(endpoint, me).await?;
    let v = client
        .request(&Request::Result {
            task_id: task_id.to_string(),
        })
        .await?;
    let attempt = v["attempt"].as_u64().unwrap_or(0) as u32;
    let provider = v["provider"].as_str().unwrap_or_default().to_string();
    let data = v["data"]
        .as_str()
        .ok_or_else(|| RequesterError::Protocol("the market holds no result bytes for this task".into()))?;
    let peer = peer_identity(&client, &provider).await?;
    let binding = Binding {
        task_id: task_id.to_string(),
        attempt,
        payload_hash: payload_hash.unwrap_or_else(|| v["payload_hash"].as_str().unwrap_or_default().to_string()),
    };
    let r = verify_and_settle(&client, me, &peer, &binding, data).await;
    client.close();
    r
}
