//! The provider loop behind `advertise`: stay connected, keep one offer
//! registered, decide on every task offer, and run the tasks it wins.
//!
//! A task offer is taken only past the same gates a local job meets, in
//! the same order: consent for market jobs, room under every cap, then
//! approval (an interactive answer, or the standing rules). A won lease is
//! heartbeated while the requester's payload arrives and the job runs; the
//! payload is verified (signature and binding) before it is decrypted, the
//! job goes through [`job::run`] exactly like `execute`, and the result goes
//! back encrypted to the requester and signed with task, attempt and payload
//! hash. A failed job is reported (signed) and the lease given back, so the
//! coordinator re-offers at once; so is every lease still held at shutdown.
//! Reconnects with exponential backoff and jitter.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Local;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::caps::{Budget, Caps, HeldReservation, Ledger};
use crate::config::Config;
use crate::consent::{Consent, JOB_MARKET};
use crate::crypto::keys::{Identity, PublicIdentity};
use crate::job::{self, Approval, ApprovedBy, Cancel, CancelHandle, JobSource, JobSpec, Status, Unattended};
use crate::market::client::{Backoff, Client, ClientError};
use crate::market::protocol::{AbandonReason, Event, IdentityProof, Request};
use crate::market::sealed::{self, Binding};
use crate::paths::Paths;

/// Asks the person at the terminal; `None` when nobody can answer.
pub type Ask = Arc<dyn Fn(String) -> Option<bool> + Send + Sync>;

/// What to advertise and which offers to take on our own.
#[derive(Clone)]
pub struct AdvertiseSpec {
    pub endpoint: String,
    pub slots: u32,
    pub price: u64,
    pub models: Vec<String>,
    pub ttl_secs: u64,
    /// Accept offers that pass the standing rules without asking.
    pub auto_accept: bool,
    /// Standing rule: only tasks asking for at most this many tokens.
    pub max_tokens: Option<u64>,
    /// Standing rule: only tasks bidding at least this much.
    pub min_bid: Option<u64>,
    /// Standing rule: only these requesters (node ids); `None`: anyone.
    pub allowed_requesters: Option<Vec<String>>,
    /// The image market jobs run in (default: `docker.image`).
    pub image: Option<String>,
    /// The interactive prompt, when there is a terminal.
    pub ask: Option<Ask>,
}

/// How often the session is pinged while idle.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Longest wait for the requester's payload after winning a lease.
const PAYLOAD_WAIT: Duration = Duration::from_secs(60);

/// Does an offered task pass the standing rules?
pub fn passes_rules(spec: &AdvertiseSpec, task: &Value) -> Result<(), String> {
    let tokens = task["max_tokens"].as_u64().unwrap_or(u64::MAX);
    let bid = task["max_price"].as_u64().unwrap_or(0);
    let model = task["model"].as_str().unwrap_or_default();
    let requester = task["requester"].as_str().unwrap_or_default();
    if let Some(m) = spec.max_tokens.filter(|m| tokens > *m) {
        return Err(format!("asks for {tokens} tokens, above the rule's {m}"));
    }
    if let Some(m) = spec.min_bid.filter(|m| bid < *m) {
        return Err(format!("bids {bid} RUV, below the minimum price {m}"));
    }
    if !spec.models.iter().any(|x| x == model) {
        return Err(format!("model `{model}` is not among the allowed models"));
    }
    if let Some(allowed) = &spec.allowed_requesters {
        if !allowed.iter().any(|a| a == requester) {
            return Err("the requester is not in `market.allowedRequesters`".into());
        }
    }
    Ok(())
}

/// This user's own nodes: `market.ownNodes` and the peers imported with
/// `keys import --own`.
pub fn own_nodes(paths: &Paths, cfg: &Config) -> Vec<String> {
    let mut own: Vec<String> = cfg.settings().market.own_nodes.clone().unwrap_or_default();
    own.extend(crate::crypto::keys::Keyring::new(paths).own_node_ids());
    own.sort();
    own.dedup();
    own
}

/// A subscription (OAuth) login serves only this user's own nodes:
/// Anthropic's terms license Free/Pro/Max credentials for ordinary,
/// individual use, and third-party tools may not route requests through them
/// on behalf of other users. There is no override. An API key serves anyone
/// the standing rules allow. `Err` carries the reason a task is declined.
/// A credential that cannot be resolved is left to the job, which fails
/// without one for every requester alike.
pub fn subscription_gate(paths: &Paths, cfg: &Config, requester: &str) -> Result<(), String> {
    let mut notes = Vec::new();
    let Ok(cred) = crate::claude::credentials::resolve(cfg, &mut notes) else {
        return Ok(());
    };
    if cred.kind != crate::claude::credentials::Kind::OAuth {
        return Ok(());
    }
    if own_nodes(paths, cfg).iter().any(|n| n == requester) {
        return Ok(());
    }
    Err(format!(
        "this node runs on a subscription login ({}), which Anthropic's terms allow only for your own use: \
         it serves only your own nodes (`market.ownNodes`, `keys import --own`), and requester {} is not one; \
         serve other people's tasks with an API key (`credentials.source=api-key-env`)",
        cred.source,
        &requester[..requester.len().min(16)]
    ))
}

/// The outcome of the gates for one offer.
enum Decision {
    /// With the cap reservation taken for it: handed to the job that runs
    /// the task, released if none does (refused accept, no payload, lost lease).
    Accept(ApprovedBy, HeldReservation),
    Decline(String),
}

/// Consent, caps, then approval: the order a local job meets them.
async fn decide(paths: &Paths, spec: &AdvertiseSpec, client: &Client, task: &Value) -> Decision {
    // Fresh config: an opt-out or a changed cap applies to the next offer.
    let cfg = match Config::load(paths) {
        Ok(c) => c,
        Err(e) => return Decision::Decline(format!("cannot read the config: {e}")),
    };
    if !Consent::from_config(&cfg).allows(JOB_MARKET) {
        return Decision::Decline("no consent for market jobs".into());
    }
    if let Err(why) = subscription_gate(paths, &cfg, task["requester"].as_str().unwrap_or_default()) {
        return Decision::Decline(why);
    }
    let caps = Caps::from_config(&cfg);
    let tokens = task["max_tokens"].as_u64().unwrap_or(u64::MAX);
    if tokens > caps.max_tokens_per_task {
        return Decision::Decline(format!(
            "asks for {tokens} tokens, above `limits.maxTokensPerTask` ({})",
            caps.max_tokens_per_task
        ));
    }
    // Reserve under every cap now, before approval, as a local job does:
    // concurrent offers cannot all pass a cap that has room for one. The
    // job that runs the task uses this reservation.
    let ledger = Ledger::new(paths);
    let label = format!(
        "market-{}-{}",
        task["task_id"].as_str().unwrap_or("?"),
        task["attempt"].as_u64().unwrap_or(1)
    );
    let reserved = {
        let (ledger, caps) = (ledger.clone(), caps.clone());
        tokio::task::spawn_blocking(move || {
            // The task's own token budget (checked against the cap above)
            // and this node's per-task cost cap.
            let budget = Budget {
                tokens,
                ..caps.full_budget()
            };
            ledger
                .reserve(&caps, &label, budget, Local::now())
                .map(|(r, _)| r.id)
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    };
    let reservation = match reserved {
        Ok(id) => ledger.held(id),
        Err(e) => return Decision::Decline(e),
    };
    // A standing rule that matches decides without asking; otherwise the
    // person at the terminal does; with neither, the offer is declined.
    let rules = if spec.auto_accept {
        passes_rules(spec, task)
    } else {
        Err("no standing rule (`--auto-accept`)".to_string())
    };
    if rules.is_ok() {
        return Decision::Accept(ApprovedBy::StandingRule, reservation);
    }
    let Some(ask) = &spec.ask else {
        return Decision::Decline(match rules {
            Err(why) if spec.auto_accept => why,
            _ => "no terminal to ask and no standing rule (`--auto-accept`)".into(),
        });
    };
    let requester = task["requester"].as_str().unwrap_or_default().to_string();
    let rep = client
        .request(&Request::Reputation {
            node_id: requester.clone(),
        })
        .await
        .ok()
        .and_then(|v| v["score"].as_f64());
    let question = format!(
        "Run market task {} from node {} (reputation {}): model `{}`, up to {} tokens, bid {} RUV (your ask {}), payload {}?",
        task["task_id"].as_str().unwrap_or("?"),
        &requester[..requester.len().min(16)],
        rep.map(|r| format!("{r:.3}")).unwrap_or_else(|| "unknown".into()),
        task["model"].as_str().unwrap_or("?"),
        tokens,
        task["max_price"],
        spec.price,
        task["payload_bytes"]
            .as_u64()
            .map(|b| format!("{b} bytes"))
            .unwrap_or_else(|| "of undeclared size".into()),
    );
    let ask = ask.clone();
    match tokio::task::spawn_blocking(move || ask(question)).await {
        Ok(Some(true)) => Decision::Accept(ApprovedBy::Interactive, reservation),
        Ok(Some(false)) => Decision::Decline("declined at the prompt".into()),
        _ => Decision::Decline("the prompt could not be read".into()),
    }
}

/// A lease being served: where its payload goes, and how to stop it.
struct Held {
    attempt: u32,
    payload: Option<oneshot::Sender<String>>,
    cancel: CancelHandle,
}

/// Run until `stop` resolves. `report` receives one JSON document per
/// thing worth showing (connected, offer registered, task offered, ...).
/// Jobs run as local tasks: call this inside a [`tokio::task::LocalSet`].
pub async fn advertise(
    me: Arc<Identity>,
    paths: &Paths,
    spec: &AdvertiseSpec,
    report: &mut dyn FnMut(Value),
    stop: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    tokio::pin!(stop);
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut first = true;
    let mut last_offer: Option<String> = None;
    let (rep_tx, mut rep_rx) = mpsc::unbounded_channel::<Value>();
    loop {
        let connect = Client::connect(&spec.endpoint, me.as_ref());
        let client = tokio::select! {
            _ = &mut stop => return Ok(()),
            c = connect => c,
        };
        let mut client = match client {
            Ok(c) => c,
            Err(e) if e.is_transient() && !first => {
                let d = backoff.next_delay();
                report(json!({ "event": "reconnecting", "in_ms": d.as_millis() as u64, "error": e.to_string() }));
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(d) => continue,
                }
            }
            Err(e) => return Err(e),
        };
        first = false;
        backoff.reset();
        report(
            json!({ "event": "connected", "node_id": client.node_id, "balance": client.balance, "granted": client.granted }),
        );
        let mut events = std::mem::replace(&mut client.events, mpsc::unbounded_channel().1);
        let client = Arc::new(client);
        // The previous session's offer may still be inside its grace period:
        // replace it rather than advertise the same capacity twice.
        if let Some(old) = last_offer.take() {
            let _ = client.request(&Request::Withdraw { offer_id: old }).await;
        }
        let offer = Request::Offer {
            slots: spec.slots,
            price: spec.price,
            models: spec.models.clone(),
            ttl_secs: spec.ttl_secs,
        };
        let offer_id = match client.request(&offer).await {
            Ok(v) => {
                report(json!({ "event": "offer", "offer": v }));
                let id = v["offer_id"].as_str().unwrap_or_default().to_string();
                last_offer = Some(id.clone());
                id
            }
            Err(e) if e.is_transient() => continue,
            Err(e) => return Err(e),
        };
        let mut held: HashMap<String, Held> = HashMap::new();
        let mut running = tokio::task::JoinSet::new();
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        let stopped = loop {
            tokio::select! {
                _ = &mut stop => break true,
                _ = keepalive.tick() => {
                    if client.ping().is_err() {
                        break false;
                    }
                }
                Some(v) = rep_rx.recv() => report(v),
                Some(done) = running.join_next(), if !running.is_empty() => {
                    // Only this attempt's entry: the same node may already
                    // hold the task's next attempt.
                    if let Ok((task_id, attempt)) = done {
                        if held.get(&task_id).is_some_and(|h| h.attempt == attempt) {
                            held.remove(&task_id);
                        }
                    }
                }
                ev = events.recv() => {
                    let Some(ev) = ev else { break false };
                    match ev {
                        Event::TaskOffered { task } => {
                            let task_id = task["task_id"].as_str().unwrap_or_default().to_string();
                            let attempt = task["attempt"].as_u64().unwrap_or(1) as u32;
                            let decision = decide(paths, spec, &client, &task).await;
                            let (take, why, how) = match &decision {
                                Decision::Accept(by, _) => (true, None, Some(by.how())),
                                Decision::Decline(w) => (false, Some(w.clone()), None),
                            };
                            report(json!({ "event": "task_offered", "task": task, "accept": take,
                                           "approved_by": how, "declined": why }));
                            let Decision::Accept(by, reservation) = decision else { continue };
                            let accept = Request::Accept { task_id: task_id.clone(), attempt };
                            match client.request(&accept).await {
                                Ok(lease) => {
                                    report(json!({ "event": "lease_won", "lease": lease }));
                                    let (ptx, prx) = oneshot::channel();
                                    let (cancel_h, cancel) = Cancel::new();
                                    held.insert(task_id.clone(), Held { attempt, payload: Some(ptx), cancel: cancel_h });
                                    let job = Lease {
                                        client: client.clone(),
                                        me: me.clone(),
                                        paths: paths.clone(),
                                        image: spec.image.clone(),
                                        requester: task["requester"].as_str().unwrap_or_default().to_string(),
                                        binding: Binding {
                                            task_id: task_id.clone(),
                                            attempt,
                                            payload_hash: lease["payload_hash"].as_str().unwrap_or_default().to_string(),
                                        },
                                        model: lease["model"].as_str().unwrap_or("sonnet").to_string(),
                                        max_tokens: lease["max_tokens"].as_u64().unwrap_or(1),
                                        lease_deadline: lease["lease_deadline"].as_str().unwrap_or_default().to_string(),
                                        approved_by: by,
                                        reservation: std::sync::Mutex::new(Some(reservation)),
                                        report: rep_tx.clone(),
                                    };
                                    running.spawn_local(async move {
                                        let id = (job.binding.task_id.clone(), job.binding.attempt);
                                        job.serve(prx, cancel).await;
                                        id
                                    });
                                }
                                Err(e) => report(json!({ "event": "accept_refused", "task_id": task_id,
                                    "reason": e.reason().map(|r| r.as_str()), "error": e.to_string() })),
                            }
                        }
                        Event::Payload { task_id, attempt, data } => {
                            match held.get_mut(&task_id).filter(|h| h.attempt == attempt).and_then(|h| h.payload.take()) {
                                Some(tx) => { let _ = tx.send(data); }
                                None => report(json!({ "event": "payload_unexpected", "task_id": task_id, "attempt": attempt })),
                            }
                        }
                        Event::LeaseLapsed { task_id, attempt } => {
                            // Anything for this attempt is refused now: stop the job.
                            if let Some(h) = held.get(&task_id).filter(|h| h.attempt == attempt) {
                                h.cancel.cancel();
                            }
                            report(json!({ "event": "lease_lapsed", "task_id": task_id, "attempt": attempt }));
                        }
                        other => {
                            let v = serde_json::to_value(&other).unwrap_or(Value::Null);
                            report(json!({ "event": v["type"].clone(), "detail": v }));
                        }
                    }
                }
            }
        };
        // Stopping or disconnected: stop every job; each gives its lease
        // back (best effort when the connection is gone).
        for h in held.values() {
            h.cancel.cancel();
        }
        let drain = async { while running.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(20), drain).await;
        while let Ok(v) = rep_rx.try_recv() {
            report(v);
        }
        if stopped {
            let _ = client
                .request(&Request::Withdraw {
                    offer_id: offer_id.clone(),
                })
                .await;
            report(json!({ "event": "withdrawn", "offer_id": offer_id }));
            client.close();
            return Ok(());
        }
        let d = backoff.next_delay();
        report(json!({ "event": "disconnected", "reconnect_in_ms": d.as_millis() as u64 }));
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(d) => {}
        }
    }
}

/// One won lease, served to its end.
struct Lease {
    client: Arc<Client>,
    me: Arc<Identity>,
    paths: Paths,
    image: Option<String>,
    requester: String,
    binding: Binding,
    model: String,
    max_tokens: u64,
    lease_deadline: String,
    approved_by: ApprovedBy,
    /// The cap reservation taken for the offer, handed to the job.
    reservation: std::sync::Mutex<Option<HeldReservation>>,
    report: mpsc::UnboundedSender<Value>,
}

impl Lease {
    fn say(&self, v: Value) {
        let _ = self.report.send(v);
    }

    /// Heartbeat period: a third of the lease we were given.
    fn heartbeat(&self) -> Duration {
        let left = chrono::DateTime::parse_from_rfc3339(&self.lease_deadline)
            .map(|d| (d.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_milliseconds())
            .unwrap_or(30_000);
        Duration::from_millis((left / 3).clamp(20, 10_000) as u64)
    }

    async fn serve(self, payload: oneshot::Receiver<String>, cancel: Cancel) {
        let beat = self.heartbeat();
        let (client, binding) = (self.client.clone(), self.binding.clone());
        let heartbeat = async move {
            let mut t = tokio::time::interval(beat);
            t.tick().await;
            loop {
                t.tick().await;
                let renew = Request::Renew {
                    task_id: binding.task_id.clone(),
                    attempt: binding.attempt,
                };
                if let Err(e) = client.request(&renew).await {
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
                self.say(json!({ "event": "lease_lost", "task_id": self.binding.task_id, "attempt": self.binding.attempt }));
                work.await;
            }
            _ = &mut work => {}
        }
    }

    async fn requester_identity(&self) -> Result<PublicIdentity, String> {
        let v = self
            .client
            .request(&Request::Identity {
                node_id: self.requester.clone(),
            })
            .await
            .map_err(|e| e.to_string())?;
        let proof: IdentityProof = serde_json::from_value(v).map_err(|e| e.to_string())?;
        proof
            .verified(&self.requester)
            .cloned()
            .ok_or_else(|| "the requester's identity does not verify".to_string())
    }

    async fn work(&self, payload: oneshot::Receiver<String>, cancel: Cancel) {
        let b = &self.binding;
        // Fetch the requester's keys while the payload is on its way.
        let (requester, data) = tokio::join!(self.requester_identity(), async {
            tokio::select! {
                d = tokio::time::timeout(PAYLOAD_WAIT, payload) => d.ok().and_then(Result::ok),
                _ = cancel.cancelled() => None,
            }
        });
        let requester = match requester {
            Ok(r) => r,
            Err(e) => return self.give_back(AbandonReason::Withdrawn, &e, None).await,
        };
        let Some(data) = data else {
            return self
                .give_back(AbandonReason::Withdrawn, "no payload arrived", None)
                .await;
        };
        let prompt = match sealed::open_payload(&self.me, &requester, b, &data) {
            Ok(p) => p,
            Err(e) => {
                self.audit(
                    "market.payload_refused",
                    json!({ "task_id": b.task_id, "attempt": b.attempt, "error": e.to_string() }),
                );
                return self.give_back(AbandonReason::Withdrawn, &e.to_string(), None).await;
            }
        };
        self.say(json!({ "event": "running", "task_id": b.task_id, "attempt": b.attempt }));
        let cfg = match Config::load(&self.paths) {
            Ok(c) => c,
            Err(e) => return self.give_back(AbandonReason::Withdrawn, &e.to_string(), None).await,
        };
        // The credential may have changed since the offer was accepted.
        if let Err(why) = subscription_gate(&self.paths, &cfg, &self.requester) {
            self.audit(
                "market.declined",
                json!({ "task_id": b.task_id, "attempt": b.attempt, "requester": self.requester, "reason": why }),
            );
            return self.give_back(AbandonReason::Withdrawn, &why, None).await;
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
        // Someone else's task runs in Claude Code's default permission mode:
        // this node's own `docker.permissionMode` is for its own jobs.
        spec.permission_mode = None;
        spec.reservation = self
            .reservation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .and_then(HeldReservation::hand_over);
        if let Some(i) = &self.image {
            spec.image = i.clone();
        }
        let outcome = job::run(
            &self.paths,
            &cfg,
            spec,
            Approval::PreApproved(self.approved_by),
            Arc::new(Unattended),
            cancel.clone(),
        )
        .await;
        let (status, body, job_id) = match &outcome {
            Ok(r) => {
                let st = if r.status == Status::Completed {
                    "completed"
                } else {
                    "failed"
                };
                let body = json!({
                    "status": r.status, "result": r.result, "error": if r.status == Status::Completed { None } else { Some(r.failure_message()) },
                    "model": r.model, "model_resolved": r.model_resolved, "usage": r.usage,
                    "total_tokens": r.total_tokens, "num_turns": r.num_turns, "duration_ms": r.duration_ms,
                    "provider": self.me.node_id(), "task_id": b.task_id, "attempt": b.attempt,
                });
                (st, body, Some(r.job_id.clone()))
            }
            Err(e) => (
                "failed",
                json!({ "status": "failed", "error": e.to_string(), "provider": self.me.node_id(),
                        "task_id": b.task_id, "attempt": b.attempt }),
                None,
            ),
        };
        if cancel.is_cancelled() {
            return self
                .give_back(AbandonReason::Withdrawn, "stopped before finishing", None)
                .await;
        }
        let bytes = serde_json::to_vec(&body).expect("json serialises");
        let sealed = match sealed::seal_result(&self.me, &requester, b, status, &bytes) {
            Ok(s) => s,
            Err(e) => return self.give_back(AbandonReason::Withdrawn, &e.to_string(), None).await,
        };
        let digest = hex::encode(Sha256::digest(sealed.as_bytes()));
        if status == "completed" {
            let deliver = Request::Deliver {
                task_id: b.task_id.clone(),
                attempt: b.attempt,
                data: sealed,
            };
            match self.client.request(&deliver).await {
                Ok(_) => {
                    self.audit(
                        "market.delivered",
                        json!({ "task_id": b.task_id, "attempt": b.attempt, "job_id": job_id, "sealed_sha256": digest }),
                    );
                    self.say(
                        json!({ "event": "delivered", "task_id": b.task_id, "attempt": b.attempt, "job_id": job_id }),
                    );
                }
                Err(e) => self.say(
                    json!({ "event": "deliver_refused", "task_id": b.task_id, "attempt": b.attempt,
                    "reason": e.reason().map(|r| r.as_str()), "error": e.to_string() }),
                ),
            }
        } else {
            let why = body["error"].as_str().unwrap_or("failed").to_string();
            self.give_back(AbandonReason::Failed, &why, Some(sealed)).await;
        }
    }

    /// Give the lease back so the coordinator re-offers the task at once.
    async fn give_back(&self, reason: AbandonReason, why: &str, data: Option<String>) {
        let b = &self.binding;
        let r = self
            .client
            .request(&Request::Abandon {
                task_id: b.task_id.clone(),
                attempt: b.attempt,
                reason,
                data,
            })
            .await;
        self.audit(
            "market.abandoned",
            json!({ "task_id": b.task_id, "attempt": b.attempt, "reason": reason.as_str(),
                    "accepted": r.is_ok() }),
        );
        self.say(
            json!({ "event": "abandoned", "task_id": b.task_id, "attempt": b.attempt,
                         "reason": reason.as_str(), "why": why }),
        );
    }

    fn audit(&self, event: &str, fields: Value) {
        if let Err(e) = crate::audit::AuditLog::new(&self.paths).append(event, fields) {
            self.say(json!({ "event": "warning", "message": format!("cannot write the audit log: {e}") }));
        }
    }
}
