//! One won lease, served to its end: heartbeat it, wait for the
//! requester's payload and verify it before decrypting, run the task as a
//! local job exactly like `execute`, and send the result back sealed to the
//! requester, or give the lease back (with a signed failure report when the
//! job failed). It audits what it does with the task (`market.delivered`,
//! `market.abandoned`, ...) and reports each step as a [`ProviderEvent`];
//! it must not print or decide on offers (the provider loop does).
//!
//! It calls the coordinator through the provider's [`Link`], not one
//! connection: a lease outlives a lost session, and its renewals, delivery
//! or give-back go out on the next one, under the same message id when a
//! reply was lost (so each applies once).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditLog, Event};
use crate::caps::HeldReservation;
use crate::config::Config;
use crate::crypto::keys::{Identity, PublicIdentity};
use crate::job::{self, Approval, ApprovedBy, Cancel, JobSource, JobSpec, Status};
use crate::market::client::Link;
use crate::market::own_nodes::subscription_gate;
use crate::market::protocol::{AbandonReason, IdentityProof, Request};
use crate::market::provider_event::ProviderEvent;
use crate::market::reply;
use crate::market::sealed::{self, Binding};
use crate::market::workspace_task;
use crate::paths::Paths;

/// Longest wait for the requester's payload after winning a lease.
const PAYLOAD_WAIT: Duration = Duration::from_secs(60);
/// Longest wait for a session to deliver or give back on, when none is up.
const SESSION_WAIT: Duration = Duration::from_secs(60);
/// How often the requester hears of a running job at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for a progress report to be relayed.
const PROGRESS_WAIT: Duration = Duration::from_secs(5);

/// The job's display side for a market job: its turns and tokens go to the
/// requester ([`Lease::progress_reports`]); nobody is asked anything.
struct Forward(mpsc::UnboundedSender<(u64, u64)>);

impl crate::docker::build::ImageProgress for Forward {
    fn image_event(&self, _: crate::docker::build::ImageEvent<'_>) {}
}

impl job::Progress for Forward {
    fn job_event(&self, event: job::JobEvent<'_>) {
        if let job::JobEvent::Tokens { so_far, turns, .. } = event {
            let _ = self.0.send((turns, so_far));
        }
    }
    fn note(&self, _: &str) {}
    fn ask(&self, _: &str) -> std::io::Result<Option<bool>> {
        Ok(None)
    }
}

/// One won lease, served to its end.
pub(crate) struct Lease {
    /// The provider's session in use, replaced on each reconnect.
    pub(crate) link: Link,
    pub(crate) me: Arc<Identity>,
    pub(crate) paths: Paths,
    pub(crate) image: Option<String>,
    pub(crate) requester: String,
    pub(crate) binding: Binding,
    pub(crate) model: String,
    pub(crate) max_tokens: u64,
    /// The task carries a workspace of this many bytes (its metadata).
    pub(crate) workspace_bytes: Option<u64>,
    /// The permission mode the task asked for (checked against this node's
    /// `market.permissionModes` before the accept).
    pub(crate) permission_mode: Option<String>,
    pub(crate) lease_deadline: String,
    pub(crate) approved_by: ApprovedBy,
    /// The cap reservation taken for the offer, handed to the job; shared
    /// with the provider's loop, which gives it back at once if the lease
    /// lapses before its payload arrives.
    pub(crate) reservation: SharedReservation,
    pub(crate) report: mpsc::UnboundedSender<ProviderEvent>,
}

/// A cap reservation the job and the provider's loop can both take.
pub(crate) type SharedReservation = std::sync::Arc<std::sync::Mutex<Option<HeldReservation>>>;

/// What a finished job sends back: `completed` or `failed`, the result
/// document sealed for the requester, and the local job's id.
struct JobResult {
    status: &'static str,
    body: Value,
    job_id: Option<String>,
}

impl Lease {
    fn say(&self, ev: ProviderEvent) {
        let _ = self.report.send(ev);
    }

    /// Heartbeat period: a third of the lease we were given.
    fn heartbeat(&self) -> Duration {
        let left = chrono::DateTime::parse_from_rfc3339(&self.lease_deadline)
            .map(|d| (d.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_milliseconds())
            .unwrap_or(30_000);
        Duration::from_millis((left / 3).clamp(20, 10_000) as u64)
    }

    /// Heartbeat the lease while the job runs (at once on each new
    /// session, too); give it back if the job cannot finish.
    pub(crate) async fn serve(self, payload: oneshot::Receiver<String>, cancel: Cancel) {
        let beat = self.heartbeat();
        let (link, binding) = (self.link.clone(), self.binding.clone());
        let heartbeat = async move {
            let mut t = tokio::time::interval(beat);
            t.tick().await;
            let mut sessions = link.subscribe();
            sessions.mark_unchanged();
            loop {
                tokio::select! {
                    _ = t.tick() => {}
                    changed = sessions.changed() => {
                        if changed.is_err() || sessions.borrow_and_update().is_none() {
                            continue;
                        }
                    }
                }
                let renew = Request::Renew {
                    task_id: binding.task_id.clone(),
                    attempt: binding.attempt,
                };
                if let Err(e) = link.call::<reply::Renewed>(&renew, beat).await {
                    if !e.is_transient() {
                        // Fenced off: stop renewing. The coordinator's
                        // `lease_lapsed` cancels the job; the job itself is
                        // never dropped mid-run, so its container is removed.
                        return;
                    }
                }
            }
        };
        let work = self.work(payload, cancel);
        tokio::pin!(work);
        tokio::select! {
            _ = heartbeat => {
                self.say(ProviderEvent::LeaseLost {
                    task_id: self.binding.task_id.clone(),
                    attempt: self.binding.attempt,
                });
                work.await;
            }
            _ = &mut work => {}
        }
    }

    async fn requester_identity(&self) -> Result<PublicIdentity, String> {
        let proof: IdentityProof = self
            .link
            .call(
                &Request::Identity {
                    node_id: self.requester.clone(),
                },
                SESSION_WAIT,
            )
            .await
            .map_err(|e| e.to_string())?;
        proof
            .verified(&self.requester)
            .cloned()
            .ok_or_else(|| "the requester's identity does not verify".to_string())
    }

    /// The requester's verified keys and its opened prompt, or why there
    /// are none (the lease is given back).
    async fn open(
        &self,
        payload: oneshot::Receiver<String>,
        cancel: &Cancel,
    ) -> Result<(PublicIdentity, Vec<u8>), String> {
        let b = &self.binding;
        // Fetch the requester's keys while the payload is on its way.
        let (requester, data) = tokio::join!(self.requester_identity(), async {
            tokio::select! {
                d = tokio::time::timeout(PAYLOAD_WAIT, payload) => d.ok().and_then(Result::ok),
                _ = cancel.cancelled() => None,
            }
        });
        let requester = requester?;
        let data = data.ok_or_else(|| "no payload arrived".to_string())?;
        match sealed::open_payload(&self.me, &requester, b, &data) {
            Ok(prompt) => Ok((requester, prompt)),
            Err(e) => {
                self.audit(
                    Event::MarketPayloadRefused,
                    json!({ "task_id": b.task_id, "attempt": b.attempt, "error": e.to_string() }),
                );
                Err(e.to_string())
            }
        }
    }

    /// Run the task as a local job (the gates it passed at the offer are
    /// checked once more where they may have changed).
    async fn run_job(
        &self,
        payload: Vec<u8>,
        requester: &PublicIdentity,
        cancel: &Cancel,
    ) -> Result<JobResult, String> {
        let b = &self.binding;
        let cfg = Config::load(&self.paths).map_err(|e| e.to_string())?;
        // A workspace task: the bundle's tar is unpacked here (as untrusted
        // input, within what the task declared and this node allows), and
        // the job runs on that copy like `execute --workspace --apply`.
        let (prompt, received) = match self.workspace_bytes {
            None => (payload, None),
            Some(declared) => {
                let max = declared.min(cfg.settings().market.max_workspace_bytes);
                // The payload moves to the blocking thread: its tar is
                // unpacked where it lies, not copied first.
                tokio::task::spawn_blocking(move || {
                    let (prompt, tar) = workspace_task::unbundle(&payload)?;
                    Ok::<_, String>((prompt.to_vec(), Some(workspace_task::receive(tar, max)?)))
                })
                .await
                .map_err(|e| e.to_string())??
            }
        };
        // The credential may have changed since the offer was accepted.
        if let Err(why) = subscription_gate(&self.paths, &cfg, &self.requester) {
            self.audit(
                Event::MarketDeclined,
                json!({ "task_id": b.task_id, "attempt": b.attempt, "requester": self.requester, "reason": why }),
            );
            return Err(why);
        }
        let mut spec = JobSpec::from_config(
            &cfg,
            prompt,
            JobSource::Market {
                task_id: b.task_id.clone(),
                requester: Some(self.requester.clone()),
                attempt: Some(b.attempt),
            },
        );
        spec.model = self.model.clone();
        spec.max_tokens = self.max_tokens;
        // Someone else's task runs in the mode it asked for (allowed by
        // `market.permissionModes` before the accept), else in Claude Code's
        // default mode: this node's own `docker.permissionMode` is for its
        // own jobs.
        spec.permission_mode = self.permission_mode.clone();
        if let Some(r) = &received {
            spec.workspace = Some(job::WorkspaceSpec {
                dir: r.dir.path().to_path_buf(),
                include_git: true,
                apply: true,
                exact: true,
            });
        }
        spec.reservation = self
            .reservation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .and_then(HeldReservation::hand_over);
        if let Some(i) = &self.image {
            spec.image = i.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let reports = self.progress_reports(requester.clone(), rx);
        let run = job::run(
            &self.paths,
            &cfg,
            spec,
            Approval::PreApproved(self.approved_by),
            Arc::new(Forward(tx)),
            cancel.clone(),
        );
        let (outcome, ()) = tokio::join!(run, reports);
        let (me, task_id, attempt) = (self.me.node_id(), &b.task_id, b.attempt);
        Ok(match &outcome {
            Ok(r) => {
                let done = r.status == Status::Completed;
                let mut body = json!({
                    "status": r.status, "result": r.result, "error": if done { None } else { Some(r.failure_message()) },
                    "model": r.model, "model_resolved": r.model_resolved, "usage": r.usage,
                    "total_tokens": r.total_tokens, "num_turns": r.num_turns, "duration_ms": r.duration_ms,
                    "provider": me, "task_id": task_id, "attempt": attempt,
                });
                let mut status = if done { "completed" } else { "failed" };
                if let (Some(rcv), true) = (&received, done) {
                    let (dir, changes) = (rcv.dir.path().to_path_buf(), r.changes.clone());
                    let part = workspace_task::result_part(&dir, rcv, changes.as_ref());
                    match part {
                        Ok(w) => {
                            self.send_progress(
                                requester,
                                json!({ "turns": r.num_turns, "tokens": r.total_tokens,
                                        "files_changed": w["files_changed"] }),
                            )
                            .await;
                            body["workspace"] = w;
                        }
                        Err(e) => {
                            status = "failed";
                            body["status"] = json!("failed");
                            body["error"] = json!(format!("the changes cannot be sent back: {e}"));
                        }
                    }
                }
                JobResult {
                    status,
                    body,
                    job_id: Some(r.job_id.clone()),
                }
            }
            Err(e) => JobResult {
                status: "failed",
                body: json!({ "status": "failed", "error": e.to_string(), "provider": me,
                              "task_id": task_id, "attempt": attempt }),
                job_id: None,
            },
        })
    }

    async fn work(&self, payload: oneshot::Receiver<String>, cancel: Cancel) {
        let (requester, prompt) = match self.open(payload, &cancel).await {
            Ok(x) => x,
            Err(e) => return self.give_back(AbandonReason::Withdrawn, &e, None).await,
        };
        let b = &self.binding;
        self.say(ProviderEvent::Running {
            task_id: b.task_id.clone(),
            attempt: b.attempt,
        });
        let result = match self.run_job(prompt, &requester, &cancel).await {
            Ok(r) => r,
            Err(e) => return self.give_back(AbandonReason::Withdrawn, &e, None).await,
        };
        if cancel.is_cancelled() {
            return self
                .give_back(AbandonReason::Withdrawn, "stopped before finishing", None)
                .await;
        }
        let bytes = serde_json::to_vec(&result.body).unwrap_or_default();
        let sealed = match sealed::seal_result(&self.me, &requester, b, result.status, &bytes) {
            Ok(s) => s,
            Err(e) => return self.give_back(AbandonReason::Withdrawn, &e.to_string(), None).await,
        };
        if result.status == "completed" {
            self.deliver(sealed, result.job_id).await;
        } else {
            let why = result.body["error"].as_str().unwrap_or("failed").to_string();
            self.give_back(AbandonReason::Failed, &why, Some(sealed)).await;
        }
    }

    /// Hand the sealed result to the coordinator for the requester.
    async fn deliver(&self, sealed: String, job_id: Option<String>) {
        let b = &self.binding;
        let digest = hex::encode(Sha256::digest(sealed.as_bytes()));
        let deliver = Request::Deliver {
            task_id: b.task_id.clone(),
            attempt: b.attempt,
            data: sealed,
        };
        match self.link.call::<reply::DeliveryHeld>(&deliver, SESSION_WAIT).await {
            Ok(_) => {
                self.audit(
                    Event::MarketDelivered,
                    json!({ "task_id": b.task_id, "attempt": b.attempt, "job_id": job_id, "sealed_sha256": digest }),
                );
                self.say(ProviderEvent::Delivered {
                    task_id: b.task_id.clone(),
                    attempt: b.attempt,
                    job_id,
                });
            }
            Err(e) => self.say(ProviderEvent::DeliverRefused {
                task_id: b.task_id.clone(),
                attempt: b.attempt,
                reason: e.reason().map(|r| r.as_str()),
                error: e.to_string(),
            }),
        }
    }

    /// Give the lease back so the coordinator re-offers the task at once.
    async fn give_back(&self, reason: AbandonReason, why: &str, data: Option<String>) {
        let b = &self.binding;
        let r = self
            .link
            .call::<reply::Abandoned>(
                &Request::Abandon {
                    task_id: b.task_id.clone(),
                    attempt: b.attempt,
                    reason,
                    data,
                },
                SESSION_WAIT,
            )
            .await;
        self.audit(
            Event::MarketAbandoned,
            json!({ "task_id": b.task_id, "attempt": b.attempt, "reason": reason.as_str(),
                    "accepted": r.is_ok() }),
        );
        self.say(ProviderEvent::Abandoned {
            task_id: b.task_id.clone(),
            attempt: b.attempt,
            reason,
            why: why.to_string(),
        });
    }

    /// Seal one progress report to the requester and send it (best effort:
    /// a report that does not go out changes nothing).
    async fn send_progress(&self, requester: &PublicIdentity, report: Value) {
        let b = &self.binding;
        let bytes = serde_json::to_vec(&report).unwrap_or_default();
        let Ok(data) = sealed::seal_progress(&self.me, requester, b, &bytes) else {
            return;
        };
        let req = Request::Progress {
            task_id: b.task_id.clone(),
            attempt: b.attempt,
            data,
        };
        let _ = self.link.call::<reply::ProgressRelayed>(&req, PROGRESS_WAIT).await;
    }

    /// Pass the job's turns and tokens on to the requester as they grow, at
    /// most one report per [`PROGRESS_EVERY`]; ends when the job does.
    async fn progress_reports(&self, requester: PublicIdentity, mut rx: mpsc::UnboundedReceiver<(u64, u64)>) {
        let mut last: Option<tokio::time::Instant> = None;
        let mut latest: Option<(u64, u64)> = None;
        loop {
            let wait = match (last, latest) {
                (Some(t), Some(_)) => (t + PROGRESS_EVERY).saturating_duration_since(tokio::time::Instant::now()),
                _ => Duration::from_secs(3600),
            };
            tokio::select! {
                got = rx.recv() => match got {
                    Some(x) => latest = Some(x),
                    None => return,
                },
                _ = tokio::time::sleep(wait) => {}
            }
            let due = last.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
            if let (true, Some((turns, tokens))) = (due, latest.take()) {
                last = Some(tokio::time::Instant::now());
                self.send_progress(&requester, json!({ "turns": turns, "tokens": tokens }))
                    .await;
            }
        }
    }

    fn audit(&self, event: Event, fields: Value) {
        if let Err(e) = AuditLog::new(&self.paths).append(event, fields) {
            self.say(ProviderEvent::Warning {
                message: format!("cannot write the audit log: {e}"),
            });
        }
    }
}
