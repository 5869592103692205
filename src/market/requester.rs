//! The requester side of a federated job: post a task, send the payload
//! sealed to whichever provider wins the lease, and verify, open and settle
//! the result. `market result` picks a task up later: it reads a held
//! result back, or sends a kept prompt to the current lease holder and
//! follows the task with the same loop as `bid --wait`.
//!
//! A result is printed only after the provider's signature over (task,
//! attempt, payload hash, status, ciphertext) verifies and the envelope
//! opens; a result that fails is rejected (refund, provider failure) and
//! reported, never shown.
//!
//! A lost connection does not end the wait: the session moves to the next
//! coordinator replica ([`Conn`]), re-reads where the task stands, sends the
//! payload again if the current lease has none from this node, and keeps
//! following; the task is posted once (the post is retried under its
//! message id).
//!
//! This module owns the conversation with the coordinator and the checks on
//! what comes back. Each step is reported as a [`RequesterEvent`]; it must
//! not print, write the audit log or keep prompts on disk (the `bid` and
//! `collect` operations around it do).

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::crypto::keys::{Identity, PublicIdentity};
use crate::exit::{Exit, HasExit};
use crate::market::client::{Backoff, Client, ClientError, Endpoints, Failover};
use crate::market::protocol::{AbandonReason, Event, IdentityProof, Reason, Request, TaskView};
use crate::market::reply::{HeldResult, Posted, Rejected, Relayed, Settlement};
use crate::market::sealed::{self, Binding, SealError};
use crate::market::workspace_task::{Check, Checked, Verdict, WorkspaceOutcome};

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
    #[error("task {task_id} is {state}: the market holds no result for it")]
    Finished { task_id: String, state: String },
    #[error("task {task_id}: the market's payload hash {market} is not the {posted} this node posted")]
    HashMismatch {
        task_id: String,
        posted: String,
        market: String,
    },
    #[error("the kept prompt of task {task_id} hashes to {have}, not to the {posted} you posted; nothing was sent")]
    PromptMismatch {
        task_id: String,
        have: String,
        posted: String,
        /// The kept prompt's file.
        kept: std::path::PathBuf,
    },
    #[error(
        "a prompt is kept for task {0} but your audit log has no `market.bid` for it, so it cannot be checked; \
         nothing was sent"
    )]
    PromptUnrecorded(String),
    #[error("--max-price {max_price} is above your `market.maxBidPrice` of {cap} RUV")]
    AboveMaxBid { max_price: u64, cap: u64 },
    #[error("{0}")]
    Protocol(String),
    /// DIR could not be selected or sent (`bid --workspace`).
    #[error("the workspace cannot go with the task: {0}")]
    Workspace(String),
    /// A delivered workspace result could not be checked on this machine;
    /// it is neither paid nor rejected.
    #[error("task {task_id}: {why}; the result was neither paid nor rejected")]
    Unchecked { task_id: String, why: String },
    /// This node's own records (audit log, keys, kept prompts) failed.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Keys(#[from] crate::crypto::KeyError),
    #[error(transparent)]
    Pending(#[from] crate::market::pending::PendingError),
}

impl HasExit for RequesterError {
    fn exit(&self) -> Exit {
        match self {
            RequesterError::Market(e) => e.exit(),
            RequesterError::Audit(e) => e.exit(),
            RequesterError::Keys(e) => e.exit(),
            RequesterError::Pending(e) => e.exit(),
            RequesterError::Rejected { .. }
            | RequesterError::BadIdentity(_)
            | RequesterError::HashMismatch { .. }
            | RequesterError::PromptMismatch { .. }
            | RequesterError::PromptUnrecorded(_) => Exit::Integrity,
            RequesterError::AboveMaxBid { .. } => Exit::Refused,
            RequesterError::Refunded { .. }
            | RequesterError::TimedOut { .. }
            | RequesterError::Finished { .. }
            | RequesterError::Protocol(_) => Exit::Failed,
            RequesterError::Workspace(_) => Exit::Usage,
            RequesterError::Unchecked { .. } => Exit::Failed,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            RequesterError::Market(e) => e.hint(),
            RequesterError::Audit(e) => e.hint(),
            RequesterError::Keys(e) => e.hint(),
            RequesterError::Pending(e) => e.hint(),
            RequesterError::Rejected { .. } => {
                Some("nothing was decrypted or paid; post the task again, perhaps with `--min-reputation`".into())
            }
            RequesterError::TimedOut { task_id, .. } => Some(format!(
                "fetch it later with `claude-max-market market result {task_id}`"
            )),
            RequesterError::Finished { state, .. } if state == "settled" => Some(
                "a settled task's result is dropped by the coordinator; it was fetched before, or settled after the settle deadline".into(),
            ),
            RequesterError::Finished { .. } => Some("its escrow was refunded; post the task again with `bid`".into()),
            RequesterError::HashMismatch { .. } => {
                Some("nothing was sent; the coordinator describes a different prompt than the one you posted".into())
            }
            RequesterError::PromptMismatch { kept, .. } => {
                Some(format!("remove {} and post the task again", kept.display()))
            }
            RequesterError::Unchecked { task_id, .. } => Some(format!(
                "the coordinator holds it until the settle deadline (then it is paid): fix the cause (a Docker \
                 engine, the `--accept-image`) and run `claude-max-market market result {task_id}`"
            )),
            RequesterError::AboveMaxBid { .. } => {
                Some("raise it with `claude-max-market config --set market.maxBidPrice=N`".into())
            }
            _ => None,
        }
    }
}

/// A verified, decrypted and settled result.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub task_id: String,
    pub attempt: u32,
    pub provider: String,
    /// `completed` (failed attempts are re-offered, not delivered).
    pub status: String,
    /// The provider's result document (status, result text, usage, ...).
    #[serde(rename = "result")]
    pub body: Value,
    /// The coordinator's settlement (`paid`, `refunded`).
    pub settlement: Settlement,
    /// A workspace task: the changes as computed here, the acceptance
    /// command's result, and what `--apply` did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<Box<WorkspaceOutcome>>,
}

impl Outcome {
    /// The result text the provider's job produced.
    pub fn text(&self) -> &str {
        self.body["result"].as_str().unwrap_or_default()
    }
}

/// One step of seeing a task through, as it happens.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RequesterEvent {
    /// The task is posted; its id is known from here on.
    Posted { task_id: String, escrow: i64 },
    /// A provider holds the lease for `attempt`.
    Assigned {
        task_id: String,
        attempt: u32,
        provider: String,
    },
    /// The sealed payload reached the lease holder.
    Running {
        task_id: String,
        attempt: u32,
        provider: String,
        bytes: u64,
    },
    /// The payload was not relayed (the lease moved on meanwhile).
    PayloadRefused {
        task_id: String,
        attempt: u32,
        error: String,
    },
    /// A result arrived and is being verified.
    Delivered { task_id: String, attempt: u32 },
    /// The lease holder's job, as it reported (verified): turns and tokens
    /// so far, and the number of files changed once it is done.
    Progress {
        task_id: String,
        attempt: u32,
        turns: u64,
        tokens: u64,
        files_changed: Option<u64>,
    },
    /// A workspace task's changes are being rebuilt and tested here.
    Checking {
        task_id: String,
        attempt: u32,
        accept_cmd: Option<String>,
    },
    /// The delivery failed this node's check and was rejected: the task is
    /// `open` again for another provider, or `refunded`.
    ResultRejected {
        task_id: String,
        attempt: u32,
        provider: String,
        reason: String,
        state: String,
    },
    /// The lease holder gave the task back; `error` is its verified report.
    AttemptFailed {
        task_id: String,
        attempt: u32,
        provider: String,
        reason: AbandonReason,
        error: Option<String>,
    },
    /// The escrow came back: the task is over without a result.
    Refunded { task_id: String, amount: i64, why: String },
    /// The connection to `from` was lost; the work carries on through
    /// `endpoint`.
    Failover { endpoint: String, from: String },
    /// Something went wrong beside the task (a record not written) and the
    /// work carries on.
    Warning { message: String },
}

/// Where requester progress goes.
pub type Report<'a> = &'a mut dyn FnMut(RequesterEvent);

/// A node's identity from the market, checked against its login signature.
pub async fn peer_identity(client: &Client, node_id: &str) -> Result<PublicIdentity, RequesterError> {
    let proof: IdentityProof = client
        .call(&Request::Identity {
            node_id: node_id.to_string(),
        })
        .await
        .map_err(|e| match e {
            ClientError::Protocol(_) => RequesterError::BadIdentity(node_id.to_string()),
            e => e.into(),
        })?;
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
    check: Option<&Check>,
    progress: Report<'_>,
) -> Result<Outcome, RequesterError> {
    let mut opened = open_or_reject(client, me, provider, binding, data).await?;
    if let Some(check) = check {
        if let Some(state) = judge(client, me, provider, check, &mut opened, progress).await? {
            return Err(RequesterError::Refunded {
                task_id: binding.task_id.clone(),
                why: format!("the result failed this node's check; the task is {state}"),
            });
        }
    }
    settle(client, &opened, check).await
}

/// A delivered result that verified and opened, to be settled under one
/// message id (sent again on the next session if the reply is lost).
struct Opened {
    binding: Binding,
    provider: String,
    status: String,
    body: Value,
    settle_id: String,
    /// A workspace task's changes, rebuilt and accepted here.
    checked: Option<Checked>,
}

/// Check a workspace task's opened result; a failure is rejected with its
/// reason sealed to the provider. `Some(state)`: rejected, and the task is
/// now `state` (`open` for another attempt, or `refunded`).
async fn judge(
    client: &Client,
    me: &Identity,
    provider: &PublicIdentity,
    check: &Check,
    opened: &mut Opened,
    progress: Report<'_>,
) -> Result<Option<String>, RequesterError> {
    let b = opened.binding.clone();
    progress(RequesterEvent::Checking {
        task_id: b.task_id.clone(),
        attempt: b.attempt,
        accept_cmd: check.accept_cmd.clone(),
    });
    let cfg = crate::config::Config::load(&check.paths).map_err(|e| RequesterError::Protocol(e.to_string()))?;
    let verdict = check.judge(&cfg, &opened.body, crate::job::Cancel::never()).await;
    let audit = crate::audit::AuditLog::new(&check.paths);
    let (acceptance, files) = match &verdict {
        Verdict::Accept(c) | Verdict::Reject { checked: Some(c), .. } => {
            (c.acceptance.clone(), Some(c.changes.files.len()))
        }
        Verdict::Reject { checked: None, .. } | Verdict::Unchecked { .. } => (None, None),
    };
    if let Err(e) = audit.append(
        crate::audit::Event::MarketAcceptance,
        serde_json::json!({
            "task_id": b.task_id, "attempt": b.attempt, "provider": provider.node_id,
            "accept_cmd": check.accept_cmd, "files_changed": files, "acceptance": acceptance,
            "passed": matches!(verdict, Verdict::Accept(_)),
            "error": match &verdict { Verdict::Unchecked { why } => Some(why.as_str()), _ => None },
        }),
    ) {
        progress(RequesterEvent::Warning {
            message: format!("cannot write the audit log: {e}"),
        });
    }
    let (reason, checked) = match verdict {
        Verdict::Accept(c) => {
            opened.checked = Some(c);
            return Ok(None);
        }
        Verdict::Reject { reason, checked } => (reason, checked),
        Verdict::Unchecked { why } => {
            return Err(RequesterError::Unchecked {
                task_id: b.task_id.clone(),
                why,
            })
        }
    };
    let r = reject_with(client, me, provider, &b, &reason).await;
    let state = match &r {
        Ok(s) => s.0.state.clone(),
        Err(e) => format!("not rejected ({e})"),
    };
    progress(RequesterEvent::ResultRejected {
        task_id: b.task_id.clone(),
        attempt: b.attempt,
        provider: provider.node_id.clone(),
        reason: reason.clone(),
        state: state.clone(),
    });
    if let Err(e) = audit.append(
        crate::audit::Event::MarketRejected,
        serde_json::json!({
            "task_id": b.task_id, "attempt": b.attempt, "provider": provider.node_id,
            "reason": reason, "reason_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(reason.as_bytes())),
            "acceptance": checked.as_ref().and_then(|c| c.acceptance.clone()),
            "files_changed": checked.as_ref().map(|c| c.changes.files.len()),
            "state": state,
        }),
    ) {
        progress(RequesterEvent::Warning {
            message: format!("cannot write the audit log: {e}"),
        });
    }
    r?;
    Ok(Some(state))
}

/// Reject a delivery, its reason sealed to the provider (the coordinator
/// keeps only its hash and size).
async fn reject_with(
    client: &Client,
    me: &Identity,
    provider: &PublicIdentity,
    b: &Binding,
    reason: &str,
) -> Result<Rejected, RequesterError> {
    use sha2::Digest as _;
    let data = sealed::seal_rejection(me, provider, b, reason.as_bytes())
        .map_err(|e| RequesterError::Protocol(format!("cannot seal the reason: {e}")))?;
    Ok(client
        .call::<Rejected>(&Request::Reject {
            task_id: b.task_id.clone(),
            attempt: b.attempt,
            reason_sha256: Some(hex::encode(sha2::Sha256::digest(reason.as_bytes()))),
            reason_bytes: Some(reason.len() as u64),
            data: Some(data),
        })
        .await?)
}

/// Verify and open a delivered result; on a failed check, reject it
/// (refund) and return why.
async fn open_or_reject(
    client: &Client,
    me: &Identity,
    provider: &PublicIdentity,
    binding: &Binding,
    data: &str,
) -> Result<Opened, RequesterError> {
    let opened = sealed::open_result(me, provider, binding, data).and_then(|(status, body)| {
        let body: Value = serde_json::from_slice(&body).map_err(|e| SealError::Malformed(e.to_string()))?;
        Ok((status, body))
    });
    match opened {
        Ok((status, body)) => Ok(Opened {
            binding: binding.clone(),
            provider: provider.node_id.clone(),
            status,
            body,
            settle_id: client.next_id(),
            checked: None,
        }),
        Err(source) => {
            let _ = reject_with(
                client,
                me,
                provider,
                binding,
                &format!("the result failed verification: {source}"),
            )
            .await;
            Err(RequesterError::Rejected {
                task_id: binding.task_id.clone(),
                attempt: binding.attempt,
                source,
            })
        }
    }
}

async fn settle(client: &Client, o: &Opened, check: Option<&Check>) -> Result<Outcome, RequesterError> {
    let b = &o.binding;
    let settlement: Settlement = client
        .call_with_id(
            &o.settle_id,
            &Request::Settle {
                task_id: b.task_id.clone(),
                attempt: b.attempt,
            },
        )
        .await?;
    Ok(Outcome {
        task_id: b.task_id.clone(),
        attempt: b.attempt,
        provider: o.provider.clone(),
        status: o.status.clone(),
        body: o.body.clone(),
        settlement,
        workspace: check
            .zip(o.checked.as_ref())
            .map(|(c, k)| Box::new(c.finish(&b.task_id, k))),
    })
}

/// A requester's session, moved to the next coordinator replica when it
/// is lost.
pub struct Conn {
    failover: Failover,
    pub client: Client,
}

impl Conn {
    /// A session on the first of `endpoints` that answers (one round: none
    /// answering is an error).
    pub async fn open(endpoints: &Endpoints, me: &Identity) -> Result<Conn, ClientError> {
        let mut failover = Failover::new(endpoints.clone());
        let client = failover.connect(me).await?;
        Ok(Conn { failover, client })
    }

    /// The session was lost: connect again, the next replica first, in
    /// rounds with backoff until `until`, and report the move.
    async fn reconnect(
        &mut self,
        me: &Identity,
        until: tokio::time::Instant,
        progress: Report<'_>,
    ) -> Result<(), RequesterError> {
        let from = self.client.endpoint.clone();
        self.client.close();
        self.failover.lost();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match self.failover.connect(me).await {
                Ok(c) => {
                    self.client = c;
                    progress(RequesterEvent::Failover {
                        endpoint: self.client.endpoint.clone(),
                        from,
                    });
                    return Ok(());
                }
                Err(e) if e.is_transient() => {
                    let d = backoff.next_delay();
                    if tokio::time::Instant::now() + d >= until {
                        return Err(e.into());
                    }
                    tokio::time::sleep(d).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn close(&self) {
        self.client.close();
    }
}

/// Whether `e` says the session is gone (not that the request was refused).
fn connection_lost(e: &RequesterError) -> bool {
    matches!(e, RequesterError::Market(e) if e.is_transient() && e.reason().is_none())
}

/// Post `post` (whose payload hash is `prompt`'s), then see it through
/// with [`follow`]. `progress` hears of every step, the first being
/// [`RequesterEvent::Posted`] (the task id is known from then on). A post
/// whose connection is lost is sent again on the next replica under the
/// same message id, so the task is posted once.
pub async fn post_and_wait(
    endpoints: &Endpoints,
    me: &Identity,
    post: &Request,
    prompt: &[u8],
    check: Option<&Check>,
    wait: Duration,
    progress: Report<'_>,
) -> Result<Outcome, RequesterError> {
    let mut conn = Conn::open(endpoints, me).await?;
    let until = tokio::time::Instant::now() + wait;
    let msg_id = conn.client.next_id();
    let posted: Posted = loop {
        let r = conn
            .client
            .call_with_id(&msg_id, post)
            .await
            .map_err(RequesterError::from);
        match r {
            Ok(p) => break p,
            Err(e) if connection_lost(&e) => {
                if let Err(e) = conn.reconnect(me, until, progress).await {
                    conn.close();
                    return Err(e);
                }
            }
            Err(e) => {
                conn.close();
                return Err(e);
            }
        }
    };
    let Posted { task, escrow } = posted;
    progress(RequesterEvent::Posted {
        task_id: task.task_id.clone(),
        escrow,
    });
    let followed = Followed {
        task_id: &task.task_id,
        payload_hash: &task.payload_hash,
        prompt,
        check,
    };
    follow(&mut conn, me, &followed, None, wait, progress).await
}

/// A posted task this node is seeing through.
pub struct Followed<'a> {
    pub task_id: &'a str,
    /// The hash this node posted: payloads and results are bound to it.
    pub payload_hash: &'a str,
    /// The payload's plaintext: the prompt, or a workspace task's bundle.
    pub prompt: &'a [u8],
    /// A workspace task: how its result is checked before it is paid.
    pub check: Option<&'a Check>,
}

impl Followed<'_> {
    fn binding(&self, attempt: u32) -> Binding {
        Binding {
            task_id: self.task_id.to_string(),
            attempt,
            payload_hash: self.payload_hash.to_string(),
        }
    }
}

/// Seal the prompt to `provider` for `attempt` and send it; returns the
/// provider's verified identity (results of that attempt must be its) and
/// whether the coordinator relayed the payload. A lost connection is an
/// error (the caller resumes on the next session); a refusal is reported.
async fn send_payload(
    client: &Client,
    me: &Identity,
    task: &Followed<'_>,
    attempt: u32,
    provider: &str,
    progress: Report<'_>,
) -> Result<(PublicIdentity, bool), RequesterError> {
    let task_id = task.task_id.to_string();
    progress(RequesterEvent::Assigned {
        task_id: task_id.clone(),
        attempt,
        provider: provider.to_string(),
    });
    let peer = peer_identity(client, provider).await?;
    let data = sealed::seal_payload(me, &peer, &task.binding(attempt), task.prompt)
        .map_err(|e| RequesterError::Protocol(format!("cannot seal the payload: {e}")))?;
    let sent = send_parts(client, &task_id, attempt, data).await;
    let relayed = sent.is_ok();
    progress(match sent {
        Ok(r) => RequesterEvent::Running {
            task_id,
            attempt,
            provider: provider.to_string(),
            bytes: r.bytes,
        },
        Err(e) if e.is_transient() && e.reason().is_none() => return Err(e.into()),
        // The lease moved on meanwhile; the next assignment gets it.
        Err(e) => RequesterEvent::PayloadRefused {
            task_id,
            attempt,
            error: e.to_string(),
        },
    });
    Ok((peer, relayed))
}

/// Room in a payload frame for the fields around `data`.
const FRAME_SLACK: usize = 64 * 1024;

/// Send a sealed payload in as many frames as the coordinator's payload cap
/// needs, in order (base64 text splits anywhere: the receiver joins the
/// parts before decoding). The reply to the last part is the answer.
async fn send_parts(client: &Client, task_id: &str, attempt: u32, data: String) -> Result<Relayed, ClientError> {
    let size = client.payload_cap.saturating_sub(FRAME_SLACK).max(FRAME_SLACK);
    if data.len() <= size {
        return client
            .call::<Relayed>(&Request::Payload {
                task_id: task_id.to_string(),
                attempt,
                data,
                part: None,
                parts: None,
            })
            .await;
    }
    let parts = data.len().div_ceil(size) as u32;
    let mut total = 0;
    let mut last = None;
    for (i, chunk) in data.as_bytes().chunks(size).enumerate() {
        // Base64 is ASCII, so every chunk is valid UTF-8.
        let chunk = String::from_utf8_lossy(chunk).into_owned();
        let r = client
            .call::<Relayed>(&Request::Payload {
                task_id: task_id.to_string(),
                attempt,
                data: chunk,
                part: Some(i as u32),
                parts: Some(parts),
            })
            .await?;
        total += r.bytes;
        last = Some(r);
    }
    let mut r = last.expect("at least two parts");
    r.bytes = total;
    Ok(r)
}

/// What following a task has seen so far, kept across sessions.
#[derive(Default)]
struct Seen {
    /// The lease holder of the attempt being served, verified.
    assigned: Option<(u32, PublicIdentity)>,
    /// The attempt whose payload the coordinator confirmed relaying.
    sent: Option<u32>,
    /// A result opened and being settled.
    opened: Option<Opened>,
}

/// See a posted task through on `conn`: send the sealed payload to each
/// lease holder, report failed attempts, and verify, open and settle the
/// result, until it settles, is refunded, or `wait` ends. `current` is a
/// lease already held when following starts (attempt, provider): its
/// `assigned` event went to a session that is gone, so the payload is sent
/// at once. A lost session moves to the next replica and picks the task up
/// where it stands there. Closes the session.
pub async fn follow(
    conn: &mut Conn,
    me: &Identity,
    task: &Followed<'_>,
    current: Option<(u32, String)>,
    wait: Duration,
    progress: Report<'_>,
) -> Result<Outcome, RequesterError> {
    let r = follow_on(conn, me, task, current, wait, progress).await;
    conn.close();
    r
}

async fn follow_on(
    conn: &mut Conn,
    me: &Identity,
    task: &Followed<'_>,
    mut current: Option<(u32, String)>,
    wait: Duration,
    progress: Report<'_>,
) -> Result<Outcome, RequesterError> {
    let until = tokio::time::Instant::now() + wait;
    let mut seen = Seen::default();
    loop {
        let r = follow_inner(
            &mut conn.client,
            me,
            task,
            current.take(),
            &mut seen,
            until,
            wait,
            progress,
        )
        .await;
        match r {
            Err(e) if connection_lost(&e) && tokio::time::Instant::now() < until => {}
            other => return other,
        }
        // Where the task stands now, on the next replica that answers.
        let view = loop {
            conn.reconnect(me, until, progress).await?;
            // A result already opened is settled again under its message
            // id: if the first settle applied, this returns its answer.
            if let Some(o) = &seen.opened {
                match settle(&conn.client, o, task.check).await {
                    Err(e) if connection_lost(&e) => continue,
                    r => return r,
                }
            }
            match look_up(&conn.client, task.task_id).await {
                Ok(v) => break v,
                Err(e) if connection_lost(&e) => continue,
                Err(e) => return Err(e),
            }
        };
        match view.state.as_str() {
            "delivered" => {
                return fetch_held(
                    &conn.client,
                    me,
                    task.task_id,
                    Some(task.payload_hash.to_string()),
                    task.check,
                    progress,
                )
                .await;
            }
            "assigned" => {
                // Send the payload unless this attempt's lease has it from us.
                if seen.sent != Some(view.attempt) {
                    current = view.provider.map(|p| (view.attempt, p));
                }
            }
            "open" => {}
            "refunded" => {
                return Err(RequesterError::Refunded {
                    task_id: task.task_id.to_string(),
                    why: "the task was refunded while the connection was lost".into(),
                })
            }
            state => {
                return Err(RequesterError::Finished {
                    task_id: task.task_id.to_string(),
                    state: state.to_string(),
                })
            }
        }
    }
}

/// What a failed attempt's report says, shown only if it verifies.
fn failure_report(me: &Identity, peer: &PublicIdentity, binding: &Binding, data: &str) -> Option<String> {
    match sealed::open_result(me, peer, binding, data) {
        Ok((_, body)) => serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string)),
        Err(e) => Some(format!("(failure report did not verify: {e})")),
    }
}

#[allow(clippy::too_many_arguments)]
async fn follow_inner(
    client: &mut Client,
    me: &Identity,
    task: &Followed<'_>,
    current: Option<(u32, String)>,
    seen: &mut Seen,
    deadline: tokio::time::Instant,
    wait: Duration,
    progress: Report<'_>,
) -> Result<Outcome, RequesterError> {
    let task_id = task.task_id.to_string();
    if let Some((attempt, provider)) = current {
        let (peer, relayed) = send_payload(client, me, task, attempt, &provider, progress).await?;
        seen.assigned = Some((attempt, peer));
        seen.sent = relayed.then_some(attempt).or(seen.sent);
    }
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(ev) = client.next_event(left).await else {
            // (`left` was measured before waiting: ask the clock again.)
            return Err(if tokio::time::Instant::now() >= deadline {
                RequesterError::TimedOut {
                    task_id,
                    secs: wait.as_secs(),
                }
            } else {
                RequesterError::Market(ClientError::Closed)
            });
        };
        match ev {
            // (The lease this follow started with may also arrive as an event.)
            Event::Assigned {
                task_id: t,
                attempt,
                provider,
            } if t == task_id && seen.assigned.as_ref().is_none_or(|(a, _)| *a != attempt) => {
                let (peer, relayed) = send_payload(client, me, task, attempt, &provider, progress).await?;
                seen.assigned = Some((attempt, peer));
                seen.sent = relayed.then_some(attempt).or(seen.sent);
            }
            Event::Delivered {
                task_id: t,
                attempt,
                data,
            } if t == task_id => {
                progress(RequesterEvent::Delivered {
                    task_id: task_id.clone(),
                    attempt,
                });
                let Some((_, peer)) = seen.assigned.as_ref().filter(|(a, _)| *a == attempt) else {
                    continue;
                };
                let mut opened = open_or_reject(client, me, peer, &task.binding(attempt), &data).await?;
                if let Some(check) = task.check {
                    let peer = peer.clone();
                    // Rejected: the task is offered again (its `assigned`
                    // comes next) or refunded (so is that).
                    if judge(client, me, &peer, check, &mut opened, progress).await?.is_some() {
                        continue;
                    }
                }
                return settle(client, seen.opened.insert(opened), task.check).await;
            }
            Event::Progress {
                task_id: t,
                attempt,
                data,
            } if t == task_id => {
                let Some((_, peer)) = seen.assigned.as_ref().filter(|(a, _)| *a == attempt) else {
                    continue;
                };
                // A report that does not verify is not shown (it changes nothing).
                if let Ok(body) = sealed::open_progress(me, peer, &task.binding(attempt), &data) {
                    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                        progress(RequesterEvent::Progress {
                            task_id: task_id.clone(),
                            attempt,
                            turns: v["turns"].as_u64().unwrap_or(0),
                            tokens: v["tokens"].as_u64().unwrap_or(0),
                            files_changed: v["files_changed"].as_u64(),
                        });
                    }
                }
            }
            Event::Abandoned {
                task_id: t,
                attempt,
                provider,
                reason,
                data,
            } if t == task_id => {
                let error = match (&seen.assigned, &data) {
                    (Some((a, peer)), Some(d)) if *a == attempt && reason == AbandonReason::Failed => {
                        failure_report(me, peer, &task.binding(attempt), d)
                    }
                    _ => None,
                };
                progress(RequesterEvent::AttemptFailed {
                    task_id: task_id.clone(),
                    attempt,
                    provider,
                    reason,
                    error,
                });
            }
            Event::Refunded {
                task_id: t,
                amount,
                why,
            } if t == task_id => {
                progress(RequesterEvent::Refunded {
                    task_id: task_id.clone(),
                    amount,
                    why: why.clone(),
                });
                return Err(RequesterError::Refunded { task_id, why });
            }
            _ => {}
        }
    }
}

/// Where one of this node's tasks stands (the coordinator's `task` view).
pub async fn look_up(client: &Client, task_id: &str) -> Result<TaskView, RequesterError> {
    Ok(client
        .call(&Request::Task {
            task_id: task_id.to_string(),
        })
        .await?)
}

/// Read a held result back on `client`, verify, open and settle it.
/// `payload_hash` is the hash this node posted (from its own audit log)
/// when known; the coordinator's copy is used otherwise.
pub async fn fetch_held(
    client: &Client,
    me: &Identity,
    task_id: &str,
    payload_hash: Option<String>,
    check: Option<&Check>,
    progress: Report<'_>,
) -> Result<Outcome, RequesterError> {
    let held: HeldResult = client
        .call(&Request::Result {
            task_id: task_id.to_string(),
        })
        .await?;
    let data = held
        .data
        .as_deref()
        .ok_or_else(|| RequesterError::Protocol("the market holds no result bytes for this task".into()))?;
    let peer = peer_identity(client, held.provider.as_deref().unwrap_or_default()).await?;
    let binding = Binding {
        task_id: task_id.to_string(),
        attempt: held.attempt,
        payload_hash: payload_hash.unwrap_or_else(|| held.payload_hash.clone()),
    };
    verify_and_settle(client, me, &peer, &binding, data, check, progress).await
}

/// What [`resume`] came to, short of an error.
#[derive(Debug)]
pub enum Resumed {
    /// The result was verified, opened and settled.
    Settled(Outcome),
    /// Not delivered, and not waited for (`--no-wait`, or no prompt here to
    /// send): the coordinator's view of the task, and whether this call
    /// sent the payload to the current lease holder.
    NotYet { task: TaskView, payload_sent: bool },
}

/// What `market result` knows locally about one of its tasks.
pub struct Resume<'a> {
    pub task_id: &'a str,
    /// The payload hash this node posted (its own audit log), if known.
    pub posted_hash: Option<String>,
    /// The kept prompt (already checked against `posted_hash`), if any.
    pub prompt: Option<&'a [u8]>,
    /// `None`: one look. `Some(None)`: wait until the task's deadline + 30 s.
    pub wait: Option<Option<Duration>>,
    /// A workspace task: how its result is checked before it is paid.
    pub check: Option<&'a Check>,
}

/// Slack past a task's deadline for the last attempt's result to arrive.
pub const DEADLINE_SLACK: Duration = Duration::from_secs(30);

/// Pick up one of this node's tasks where it stands: a delivered result is
/// verified, opened and settled; an undelivered task whose prompt is kept
/// here gets its payload sent to the current lease holder (whose
/// `assigned` event may have gone to a session that is gone) and, unless
/// this is one look, is followed like `bid --wait` until it settles, is
/// refunded, or the wait ends.
pub async fn resume(
    endpoints: &Endpoints,
    me: &Identity,
    r: &Resume<'_>,
    progress: Report<'_>,
) -> Result<Resumed, RequesterError> {
    let mut conn = Conn::open(endpoints, me).await?;
    let out = resume_on(&mut conn, me, r, progress).await;
    conn.close();
    out
}

/// How long to follow a task when no wait was given: until its deadline,
/// plus the slack for the last attempt's result.
fn until_deadline(task: &TaskView) -> Duration {
    let left = chrono::DateTime::parse_from_rfc3339(&task.deadline)
        .map(|d| {
            (d.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .unwrap_or_default()
        })
        .unwrap_or_default();
    left + DEADLINE_SLACK
}

async fn resume_on(
    conn: &mut Conn,
    me: &Identity,
    r: &Resume<'_>,
    progress: Report<'_>,
) -> Result<Resumed, RequesterError> {
    let client = &conn.client;
    let task = match look_up(client, r.task_id).await {
        // A coordinator from before `task` can still hand back a held result.
        Err(RequesterError::Market(e)) if e.reason() == Some(Reason::UnknownType) => {
            return fetch_held(client, me, r.task_id, r.posted_hash.clone(), r.check, progress)
                .await
                .map(Resumed::Settled)
        }
        other => other?,
    };
    match task.state.as_str() {
        "delivered" => {
            return fetch_held(client, me, r.task_id, r.posted_hash.clone(), r.check, progress)
                .await
                .map(Resumed::Settled)
        }
        "open" | "assigned" => {}
        _ => {
            return Err(RequesterError::Finished {
                task_id: r.task_id.to_string(),
                state: task.state,
            })
        }
    }
    let (Some(prompt), Some(hash)) = (r.prompt, r.posted_hash.as_deref()) else {
        return Ok(Resumed::NotYet {
            task,
            payload_sent: false,
        });
    };
    if task.payload_hash != hash {
        return Err(RequesterError::HashMismatch {
            task_id: r.task_id.to_string(),
            posted: hash.to_string(),
            market: task.payload_hash,
        });
    }
    let current = match (task.state.as_str(), &task.provider) {
        ("assigned", Some(p)) => Some((task.attempt, p.clone())),
        _ => None,
    };
    let followed = Followed {
        task_id: r.task_id,
        payload_hash: hash,
        prompt,
        check: r.check,
    };
    let Some(wait) = r.wait else {
        let mut payload_sent = false;
        if let Some((attempt, provider)) = current {
            send_payload(client, me, &followed, attempt, &provider, progress).await?;
            payload_sent = true;
        }
        return Ok(Resumed::NotYet { task, payload_sent });
    };
    let wait = wait.unwrap_or_else(|| until_deadline(&task));
    follow(conn, me, &followed, current, wait, progress)
        .await
        .map(Resumed::Settled)
}
