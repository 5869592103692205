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
//!
//! A lost connection does not stop the jobs: a lease lives in the
//! coordinator's database, not in the session, so its job keeps running
//! and renews, delivers or gives back on the next session, under the same
//! task and attempt. The session moves to the next coordinator replica
//! ([`client::Failover`]) and the offer is registered again there; only
//! when no replica answers does it wait, with exponential backoff and
//! jitter. A lease the coordinator no longer honours (lapsed meanwhile) is
//! refused at its next renewal, and its job is stopped.
//!
//! This module owns the provider's records too: every decision, lease,
//! settlement and withdrawal is audited here as it happens. A won lease is
//! served by [`crate::market::lease`]; the steps are
//! [`crate::market::provider_event`]'s shapes; the own-nodes rule is
//! [`crate::market::own_nodes`]'s. It must not
//! print or handle signals: each step goes to the caller as a
//! [`ProviderEvent`], and it stops when the caller's shutdown future
//! resolves (or consent is withdrawn).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Local;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditLog, Event as AuditEvent};
use crate::caps::{Budget, Caps, HeldReservation, Ledger};
use crate::config::Config;
use crate::consent::{Consent, JOB_MARKET};
use crate::crypto::keys::Identity;
use crate::exit::{Exit, Failure, HasExit};
use crate::job::{ApprovedBy, Cancel, CancelHandle};
use crate::market::client::{Backoff, Client, ClientError, Endpoints, Failover, Link};
use crate::market::lease::{Lease, SharedReservation};
use crate::market::protocol::{Event, Request, TaskView};
use crate::market::reply::{LeaseGranted, OfferRegistered, OfferWithdrawn, ReputationView};
use crate::market::sealed::Binding;
use crate::market::workspace_task;
use crate::paths::Paths;

pub use crate::market::own_nodes::{own_nodes, subscription_gate};
pub use crate::market::provider_event::{ProviderEvent, Pushed, Report};

/// Asks the person at the terminal; `None` when nobody can answer.
pub type Ask = Arc<dyn Fn(String) -> Option<bool> + Send + Sync>;

/// What to advertise and which offers to take on our own.
#[derive(Clone)]
pub struct AdvertiseSpec {
    /// The coordinator replicas, tried in order.
    pub endpoints: Endpoints,
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
/// How often a running `advertise` re-reads consent.
const CONSENT_POLL: Duration = Duration::from_millis(500);
/// How long stopping jobs get to give their leases back.
const DRAIN: Duration = Duration::from_secs(20);
/// Most leases remembered while their verdict is awaited.
const MAX_SERVED: usize = 4096;

/// Does an offered task pass the standing rules?
pub fn passes_rules(spec: &AdvertiseSpec, task: &TaskView) -> Result<(), String> {
    let (tokens, bid, model) = (task.max_tokens, task.max_price, task.model.as_str());
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
        if !allowed.contains(&task.requester) {
            return Err("the requester is not in `market.allowedRequesters`".into());
        }
    }
    Ok(())
}

/// The outcome of the gates for one offer.
enum Decision {
    /// With the cap reservation taken for it: handed to the job that runs
    /// the task, released if none does (refused accept, no payload, lost lease).
    Accept(ApprovedBy, HeldReservation),
    Decline(String),
}

/// Reserve under every cap now, before approval, as a local job does:
/// concurrent offers cannot all pass a cap that has room for one. The job
/// that runs the task uses this reservation.
async fn reserve(paths: &Paths, caps: &Caps, task: &TaskView) -> Result<HeldReservation, String> {
    let ledger = Ledger::new(paths);
    let label = format!("market-{}-{}", task.task_id, task.attempt);
    let tokens = task.max_tokens;
    let reserved = {
        let (ledger, caps) = (ledger.clone(), caps.clone());
        tokio::task::spawn_blocking(move || {
            // The task's own token budget (checked against the cap before)
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
    reserved.map(|id| ledger.held(id))
}

/// The question put to the person at the terminal about one offer.
async fn question(spec: &AdvertiseSpec, client: &Client, task: &TaskView) -> String {
    let requester = &task.requester;
    let rep = client
        .call::<ReputationView>(&Request::Reputation {
            node_id: requester.clone(),
        })
        .await
        .ok()
        .map(|r| r.score);
    let standing = task
        .requester_standing
        .map(|s| {
            format!(
                ", as a requester {:.3}: {} settled, {} rejected",
                s.score, s.settled, s.rejected
            )
        })
        .unwrap_or_default();
    let workspace = task
        .workspace_bytes
        .map(|b| format!(", with a workspace of {}", crate::workspace::human_bytes(b)))
        .unwrap_or_default();
    format!(
        "Run market task {} from node {} (reputation {}{standing}): model `{}`, up to {} tokens, bid {} RUV (your ask {}), payload {}{workspace}, permission mode `{}`?",
        task.task_id,
        &requester[..requester.len().min(16)],
        rep.map(|r| format!("{r:.3}")).unwrap_or_else(|| "unknown".into()),
        task.model,
        task.max_tokens,
        task.max_price,
        spec.price,
        task.payload_bytes
            .map(|b| format!("{b} bytes"))
            .unwrap_or_else(|| "of undeclared size".into()),
        task.permission_mode.as_deref().unwrap_or("default"),
    )
}

/// The rules no approval overrides: the workspace's size, the permission
/// mode, and the requester's standing (all decided before any download).
fn hard_rules(market: &crate::config::Market, task: &TaskView) -> Result<(), String> {
    if let Some(b) = task.workspace_bytes.filter(|b| *b > market.max_workspace_bytes) {
        return Err(format!(
            "brings a workspace of {}, above `market.maxWorkspaceBytes` ({})",
            crate::workspace::human_bytes(b),
            crate::workspace::human_bytes(market.max_workspace_bytes)
        ));
    }
    let mode = task.permission_mode.as_deref().unwrap_or("default");
    if !workspace_task::mode_allowed(&market.permission_modes, mode) {
        return Err(format!(
            "asks for permission mode `{mode}`, which `market.permissionModes` ({}) does not allow",
            market.permission_modes.join(",")
        ));
    }
    if let Some(s) = task.requester_standing {
        if s.score < market.min_requester_reputation {
            return Err(format!(
                "the requester's standing {:.3} ({} settled, {} rejected) is below `market.minRequesterReputation` ({})",
                s.score, s.settled, s.rejected, market.min_requester_reputation
            ));
        }
    }
    Ok(())
}

/// Consent, caps, then approval: the order a local job meets them.
async fn decide(paths: &Paths, spec: &AdvertiseSpec, client: &Client, task: &TaskView) -> Decision {
    // Fresh config: an opt-out or a changed cap applies to the next offer.
    let cfg = match Config::load(paths) {
        Ok(c) => c,
        Err(e) => return Decision::Decline(format!("cannot read the config: {e}")),
    };
    if !Consent::from_config(&cfg).allows(JOB_MARKET) {
        return Decision::Decline("no consent for market jobs".into());
    }
    if let Err(why) = subscription_gate(paths, &cfg, &task.requester) {
        return Decision::Decline(why);
    }
    if let Err(why) = hard_rules(&cfg.settings().market, task) {
        return Decision::Decline(why);
    }
    let caps = Caps::from_config(&cfg);
    if task.max_tokens > caps.max_tokens_per_task {
        return Decision::Decline(format!(
            "asks for {} tokens, above `limits.maxTokensPerTask` ({})",
            task.max_tokens, caps.max_tokens_per_task
        ));
    }
    let reservation = match reserve(paths, &caps, task).await {
        Ok(r) => r,
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
    let question = question(spec, client, task).await;
    let ask = ask.clone();
    match tokio::task::spawn_blocking(move || ask(question)).await {
        Ok(Some(true)) => Decision::Accept(ApprovedBy::Interactive, reservation),
        Ok(Some(false)) => Decision::Decline("declined at the prompt".into()),
        _ => Decision::Decline("the prompt could not be read".into()),
    }
}

/// What `advertise` was asked for, before the config narrows it.
#[derive(Clone)]
pub struct AdvertiseOptions {
    /// Coordinator URL or comma-separated replicas (default: `market.endpoint`).
    pub endpoint: Option<String>,
    pub slots: u32,
    /// Default: `market.defaultPrice`.
    pub price: Option<u64>,
    pub models: Vec<String>,
    pub ttl_secs: u64,
    /// Also on with `market.autoAcceptBids`.
    pub auto_accept: bool,
    pub max_tokens: Option<u64>,
    /// Default: `market.minPrice`.
    pub min_bid: Option<u64>,
    pub image: Option<String>,
    pub ask: Option<Ask>,
}

/// Why advertising ended (short of an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stopped {
    /// The caller's shutdown future resolved.
    Shutdown,
    /// Consent for market jobs was withdrawn: the offer is withdrawn.
    ConsentRevoked,
}

/// Why `advertise` could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum AdvertiseError {
    /// Refused or bad input (no consent, no usable model, ...).
    #[error(transparent)]
    Refused(#[from] Failure),
    #[error(transparent)]
    Market(#[from] ClientError),
    #[error(transparent)]
    Keys(#[from] crate::crypto::KeyError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

impl HasExit for AdvertiseError {
    fn exit(&self) -> Exit {
        match self {
            AdvertiseError::Refused(e) => e.exit(),
            AdvertiseError::Market(e) => e.exit(),
            AdvertiseError::Keys(e) => e.exit(),
            AdvertiseError::Audit(e) => e.exit(),
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            AdvertiseError::Refused(e) => e.hint(),
            AdvertiseError::Market(e) => e.hint(),
            AdvertiseError::Keys(e) => e.hint(),
            AdvertiseError::Audit(e) => e.hint(),
        }
    }
}

/// The spec `opts` come to under this node's config.
fn resolve(cfg: &Config, opts: AdvertiseOptions) -> Result<AdvertiseSpec, AdvertiseError> {
    Consent::from_config(cfg).require(JOB_MARKET)?;
    if opts.slots == 0 {
        return Err(Failure::usage("--slots must be at least 1").into());
    }
    let settings = &cfg.settings().market;
    // `market.allowedModels` narrows what we advertise; the offer never
    // names a model the standing rules would refuse.
    let models: Vec<String> = match &settings.allowed_models {
        Some(allowed) => opts.models.iter().filter(|m| allowed.contains(m)).cloned().collect(),
        None => opts.models.clone(),
    };
    if models.is_empty() {
        return Err(Failure::usage("none of --models is in `market.allowedModels`")
            .hint("pass a model listed in `market.allowedModels`, or change it with `claude-max-market config --set`")
            .into());
    }
    Ok(AdvertiseSpec {
        endpoints: Endpoints::resolve(opts.endpoint, &settings.endpoint)?,
        slots: opts.slots,
        price: opts.price.unwrap_or(settings.default_price),
        models,
        ttl_secs: opts.ttl_secs,
        auto_accept: opts.auto_accept || settings.auto_accept_bids,
        max_tokens: opts.max_tokens,
        min_bid: Some(opts.min_bid.unwrap_or(settings.min_price)).filter(|m| *m > 0),
        allowed_requesters: settings.allowed_requesters.clone(),
        image: opts.image,
        ask: opts.ask,
    })
}

/// Resolves once this node no longer consents to market jobs.
async fn consent_withdrawn(paths: &Paths) {
    loop {
        tokio::time::sleep(CONSENT_POLL).await;
        let still = Config::load(paths).map(|c| Consent::from_config(&c).allows(JOB_MARKET));
        if matches!(still, Ok(false)) {
            return;
        }
    }
}

/// Run `advertise`: check consent and the options against the config,
/// record the start, then serve the market until `shutdown` resolves or
/// consent is withdrawn (opt-out takes effect at once: the offer is
/// withdrawn). Jobs run as local tasks: call this inside a
/// [`tokio::task::LocalSet`].
pub async fn run(
    paths: &Paths,
    cfg: &Config,
    opts: AdvertiseOptions,
    report: Report<'_>,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, AdvertiseError> {
    let own_only = crate::market::own_nodes::serves_only_own(cfg);
    let spec = resolve(cfg, opts)?;
    let audit = AuditLog::new(paths);
    let id = Arc::new(Identity::load_or_generate(paths)?);
    audit.append(
        AuditEvent::MarketAdvertise,
        json!({ "node_id": id.node_id(), "slots": spec.slots, "price": spec.price, "models": spec.models,
                "auto_accept": spec.auto_accept, "own_nodes_only": own_only }),
    )?;
    if own_only {
        report(&ProviderEvent::OwnNodesOnly {
            own_nodes: own_nodes(paths, cfg).len(),
        });
    }
    let revoked = std::cell::Cell::new(false);
    let stop = async {
        tokio::select! {
            _ = shutdown => {}
            _ = consent_withdrawn(paths) => revoked.set(true),
        }
    };
    advertise(id, paths, &spec, report, stop).await?;
    Ok(if revoked.get() {
        Stopped::ConsentRevoked
    } else {
        Stopped::Shutdown
    })
}

/// A lease being served: where its payload goes, and how to stop it.
struct Held {
    attempt: u32,
    payload: Option<oneshot::Sender<String>>,
    /// The parts of a payload sent in several frames, joined in order.
    parts: String,
    next_part: u32,
    cancel: CancelHandle,
    /// The lease's cap reservation, until its job takes it.
    reservation: SharedReservation,
}

/// A lease this node served, until its verdict arrives: whose task it was
/// (a rejection's reason is sealed by that requester).
struct Served {
    attempt: u32,
    requester: String,
    payload_hash: String,
}

/// Report a step, after recording it if it is one worth a record.
fn emit(audit: &AuditLog, report: Report<'_>, ev: &ProviderEvent) {
    if let Some((event, fields)) = ev.audit_record() {
        if let Err(e) = audit.append(event, fields) {
            report(&ProviderEvent::Warning {
                message: format!("cannot write the audit log: {e}"),
            });
        }
    }
    report(ev);
}

/// How one connected session ended.
enum SessionEnd {
    /// `stop` resolved: the jobs were stopped and the offer withdrawn.
    Stopped,
    /// The connection was lost after the offer was registered; reconnect.
    Lost,
    /// The offer could not be registered for a passing reason; reconnect.
    Retry,
}

/// Run until `stop` resolves, reconnecting (the next replica first) when
/// the connection is lost; held leases and their jobs carry on across
/// sessions. `report` hears of every step; the ones worth a record are
/// audited first. Jobs run as local tasks: call this inside a
/// [`tokio::task::LocalSet`].
pub async fn advertise(
    me: Arc<Identity>,
    paths: &Paths,
    spec: &AdvertiseSpec,
    report: Report<'_>,
    stop: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    let audit = AuditLog::new(paths);
    let report = &mut |ev: &ProviderEvent| emit(&audit, &mut *report, ev);
    tokio::pin!(stop);
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut failover = Failover::new(spec.endpoints.clone());
    let mut first = true;
    let mut last_offer: Option<String> = None;
    // The endpoint of the session that was lost, reported on the next one.
    let mut lost_from: Option<String> = None;
    let (steps_tx, steps) = mpsc::unbounded_channel();
    let mut work = Work {
        me: me.clone(),
        paths,
        spec,
        link: Link::new(),
        held: HashMap::new(),
        served: HashMap::new(),
        running: tokio::task::JoinSet::new(),
        steps_tx,
        steps,
    };
    loop {
        let connect = failover.connect(me.as_ref());
        let Some(client) = work.meanwhile(report, &mut stop, connect).await else {
            work.stop_jobs(report).await;
            return Ok(());
        };
        let mut client = match client {
            Ok(c) => c,
            Err(e) if e.is_transient() && !first => {
                let d = backoff.next_delay();
                report(&ProviderEvent::Reconnecting {
                    in_ms: d.as_millis() as u64,
                    error: e.to_string(),
                });
                if work.meanwhile(report, &mut stop, tokio::time::sleep(d)).await.is_none() {
                    work.stop_jobs(report).await;
                    return Ok(());
                }
                continue;
            }
            Err(e) => {
                work.stop_jobs(report).await;
                return Err(e);
            }
        };
        first = false;
        report(&ProviderEvent::Connected {
            node_id: client.node_id.clone(),
            balance: client.balance,
            granted: client.granted,
            endpoint: client.endpoint.clone(),
        });
        if let Some(from) = lost_from.take() {
            report(&ProviderEvent::Failover {
                endpoint: client.endpoint.clone(),
                from,
            });
        }
        let events = std::mem::replace(&mut client.events, mpsc::unbounded_channel().1);
        let client = Arc::new(client);
        work.link.set(Some(client.clone()));
        let end = work.session(&client, events, &mut last_offer, report, &mut stop).await;
        work.link.set(None);
        let end = match end {
            Ok(end) => end,
            Err(e) => {
                work.stop_jobs(report).await;
                return Err(e);
            }
        };
        let d = match end {
            SessionEnd::Stopped => return Ok(()),
            // A session that got as far as its offer was a good one: with
            // another replica to go to, go at once.
            SessionEnd::Lost => {
                backoff.reset();
                if spec.endpoints.urls().len() > 1 {
                    Duration::ZERO
                } else {
                    backoff.next_delay()
                }
            }
            SessionEnd::Retry => backoff.next_delay(),
        };
        failover.lost();
        lost_from = Some(client.endpoint.clone());
        report(&ProviderEvent::Disconnected {
            reconnect_in_ms: d.as_millis() as u64,
        });
        if !d.is_zero() && work.meanwhile(report, &mut stop, tokio::time::sleep(d)).await.is_none() {
            work.stop_jobs(report).await;
            return Ok(());
        }
    }
}

/// What outlives each session: the leases held and their jobs, the steps
/// the jobs report, and the session they call through.
struct Work<'a> {
    me: Arc<Identity>,
    paths: &'a Paths,
    spec: &'a AdvertiseSpec,
    link: Link,
    held: HashMap<String, Held>,
    /// Leases served here whose verdict has not come yet.
    served: HashMap<String, Served>,
    running: tokio::task::JoinSet<(String, u32)>,
    /// Steps reported by the jobs, passed on by the provider loop.
    steps_tx: mpsc::UnboundedSender<ProviderEvent>,
    steps: mpsc::UnboundedReceiver<ProviderEvent>,
}

impl Work<'_> {
    /// Pass a job's step on; a lease the coordinator refused to renew is
    /// gone, so its job is stopped.
    fn on_step(&mut self, ev: ProviderEvent, report: Report<'_>) {
        if let ProviderEvent::LeaseLost { task_id, attempt } = &ev {
            if let Some(h) = self.held.get(task_id).filter(|h| h.attempt == *attempt) {
                h.cancel.cancel();
            }
        }
        report(&ev);
    }

    /// A job ended: drop only its attempt's entry (the same node may
    /// already hold the task's next attempt).
    fn finished(&mut self, done: Result<(String, u32), tokio::task::JoinError>) {
        if let Ok((task_id, attempt)) = done {
            if self.held.get(&task_id).is_some_and(|h| h.attempt == attempt) {
                self.held.remove(&task_id);
            }
        }
    }

    /// Wait for `fut` while the jobs carry on (their steps reported, ended
    /// jobs cleared); `None` if `stop` resolved first.
    async fn meanwhile<F: Future>(
        &mut self,
        report: Report<'_>,
        stop: &mut (impl Future<Output = ()> + Unpin),
        fut: F,
    ) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                _ = &mut *stop => return None,
                out = &mut fut => return Some(out),
                Some(ev) = self.steps.recv() => self.on_step(ev, report),
                Some(done) = self.running.join_next(), if !self.running.is_empty() => self.finished(done),
            }
        }
    }

    /// Stop every job; each gives its lease back (best effort when no
    /// session is up) within [`DRAIN`].
    async fn stop_jobs(&mut self, report: Report<'_>) {
        for h in self.held.values() {
            h.cancel.cancel();
        }
        let running = &mut self.running;
        let drain = async { while running.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(DRAIN, drain).await;
        self.held.clear();
        while let Ok(ev) = self.steps.try_recv() {
            report(&ev);
        }
    }

    /// One connected session: register the offer (replacing `last_offer`),
    /// serve until `stop` or the connection ends. On `stop`, every job is
    /// stopped and the offer withdrawn; a lost connection leaves the jobs
    /// running.
    async fn session(
        &mut self,
        c: &Arc<Client>,
        mut events: mpsc::UnboundedReceiver<Event>,
        last_offer: &mut Option<String>,
        report: Report<'_>,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<SessionEnd, ClientError> {
        // The previous session's offer may still be inside its grace period:
        // replace it rather than advertise the same capacity twice.
        if let Some(old) = last_offer.take() {
            let _ = c.call::<OfferWithdrawn>(&Request::Withdraw { offer_id: old }).await;
        }
        let offer = Request::Offer {
            slots: self.spec.slots,
            price: self.spec.price,
            models: self.spec.models.clone(),
            ttl_secs: self.spec.ttl_secs,
        };
        let offer_id = match c.call::<OfferRegistered>(&offer).await {
            Ok(offer) => {
                let id = offer.offer_id.clone();
                report(&ProviderEvent::Offer { offer });
                *last_offer = Some(id.clone());
                id
            }
            Err(e) if e.is_transient() => return Ok(SessionEnd::Retry),
            Err(e) => return Err(e),
        };
        if !self.serve(c, &mut events, report, stop).await {
            return Ok(SessionEnd::Lost);
        }
        // Stopping: each job gives its lease back on this session.
        self.stop_jobs(report).await;
        let _ = c
            .call::<OfferWithdrawn>(&Request::Withdraw {
                offer_id: offer_id.clone(),
            })
            .await;
        report(&ProviderEvent::Withdrawn { offer_id });
        c.close();
        Ok(SessionEnd::Stopped)
    }

    /// Serve events until `stop` (true) or the connection ends (false).
    async fn serve(
        &mut self,
        c: &Client,
        events: &mut mpsc::UnboundedReceiver<Event>,
        report: Report<'_>,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> bool {
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            tokio::select! {
                _ = &mut *stop => return true,
                _ = keepalive.tick() => {
                    if c.ping().is_err() {
                        return false;
                    }
                }
                Some(ev) = self.steps.recv() => self.on_step(ev, report),
                Some(done) = self.running.join_next(), if !self.running.is_empty() => self.finished(done),
                ev = events.recv() => {
                    let Some(ev) = ev else { return false };
                    self.on_event(c, ev, report).await;
                }
            }
        }
    }

    async fn on_event(&mut self, c: &Client, ev: Event, report: Report<'_>) {
        match ev {
            Event::TaskOffered { task } => self.on_offered(c, *task, report).await,
            Event::Payload {
                task_id,
                attempt,
                data,
                part,
                parts,
            } => {
                let held = self.held.get_mut(&task_id).filter(|h| h.attempt == attempt);
                let Some(h) = held.filter(|h| h.payload.is_some()) else {
                    return report(&ProviderEvent::PayloadUnexpected { task_id, attempt });
                };
                let (part, parts) = (part.unwrap_or(0), parts.unwrap_or(1));
                if part != h.next_part || part >= parts {
                    // The coordinator relays parts once and in order; a gap
                    // means the payload cannot be whole.
                    h.payload = None;
                    return report(&ProviderEvent::PayloadUnexpected { task_id, attempt });
                }
                h.next_part += 1;
                if parts == 1 {
                    h.parts = data;
                } else {
                    h.parts.push_str(&data);
                }
                if part + 1 == parts {
                    if let Some(tx) = h.payload.take() {
                        let _ = tx.send(std::mem::take(&mut h.parts));
                    }
                }
            }
            Event::Rejected {
                task_id,
                attempt,
                state,
                reason_sha256,
                reason_bytes: _,
                data,
            } => {
                self.on_rejected(c, task_id, attempt, state, reason_sha256, data, report)
                    .await
            }
            Event::Settled { ref task_id, .. } => {
                self.served.remove(task_id);
                report(&ProviderEvent::pushed(ev));
            }
            Event::LeaseLapsed { task_id, attempt } => {
                // Anything for this attempt is refused now: stop the job.
                if let Some(h) = self.held.get_mut(&task_id).filter(|h| h.attempt == attempt) {
                    h.cancel.cancel();
                    // No payload yet, so no job can start under this lease:
                    // its cap reservation goes back before the next event is
                    // read. The coordinator offers the task again right after
                    // the lapse (its requester back), and this node's slot
                    // must be free then, not once the job has given back a
                    // lease it never used.
                    if h.payload.take().is_some() {
                        let r = h.reservation.lock().unwrap_or_else(|e| e.into_inner()).take();
                        let _ = tokio::task::spawn_blocking(move || drop(r)).await;
                    }
                }
                report(&ProviderEvent::LeaseLapsed { task_id, attempt });
            }
            other => report(&ProviderEvent::pushed(other)),
        }
    }

    /// The requester rejected a delivery of ours: its reason, verified as
    /// the requester's and bound to the task, goes into the audit log in
    /// full (the coordinator keeps only its hash), as evidence.
    #[allow(clippy::too_many_arguments)]
    async fn on_rejected(
        &mut self,
        c: &Client,
        task_id: String,
        attempt: u32,
        state: String,
        reason_sha256: Option<String>,
        data: Option<String>,
        report: Report<'_>,
    ) {
        let served = self.served.remove(&task_id).filter(|s| s.attempt == attempt);
        let (reason, verified) = match (served, data) {
            (Some(s), Some(data)) => {
                let binding = Binding {
                    task_id: task_id.clone(),
                    attempt,
                    payload_hash: s.payload_hash,
                };
                let proof = c
                    .call::<crate::market::protocol::IdentityProof>(&Request::Identity {
                        node_id: s.requester.clone(),
                    })
                    .await;
                let opened = match proof.ok().and_then(|p| p.verified(&s.requester).cloned()) {
                    Some(peer) => crate::market::sealed::open_rejection(&self.me, &peer, &binding, &data)
                        .map_err(|e| e.to_string()),
                    None => Err("the requester's identity does not verify".to_string()),
                };
                match opened {
                    Ok(text) => {
                        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&text));
                        let matches = reason_sha256.as_deref() == Some(hash.as_str());
                        (String::from_utf8_lossy(&text).into_owned(), matches)
                    }
                    Err(e) => (format!("(the reason could not be opened: {e})"), false),
                }
            }
            (_, None) => ("(no reason given)".to_string(), false),
            (None, Some(_)) => ("(a rejection of a lease this session does not know)".to_string(), false),
        };
        report(&ProviderEvent::Rejected {
            task_id,
            attempt,
            state,
            reason,
            reason_sha256,
            verified,
        });
    }

    /// Decide on an offer; if taken and the lease is won, start its job.
    async fn on_offered(&mut self, c: &Client, task: TaskView, report: Report<'_>) {
        let decision = decide(self.paths, self.spec, c, &task).await;
        let (accept, declined, approved_by) = match &decision {
            Decision::Accept(by, _) => (true, None, Some(by.how())),
            Decision::Decline(w) => (false, Some(w.clone()), None),
        };
        let (task_id, attempt, requester) = (task.task_id.clone(), task.attempt, task.requester.clone());
        let (workspace_bytes, permission_mode) = (task.workspace_bytes, task.permission_mode.clone());
        report(&ProviderEvent::TaskOffered {
            task: Box::new(task),
            accept,
            approved_by,
            declined,
        });
        let Decision::Accept(by, reservation) = decision else {
            return;
        };
        let accept = Request::Accept {
            task_id: task_id.clone(),
            attempt,
        };
        let lease = match c.call::<LeaseGranted>(&accept).await {
            Ok(lease) => lease,
            Err(e) => {
                return report(&ProviderEvent::AcceptRefused {
                    task_id,
                    reason: e.reason().map(|r| r.as_str()),
                    error: e.to_string(),
                })
            }
        };
        report(&ProviderEvent::LeaseWon { lease: lease.clone() });
        let (ptx, prx) = oneshot::channel();
        let (cancel_h, cancel) = Cancel::new();
        let reservation: SharedReservation = std::sync::Arc::new(std::sync::Mutex::new(Some(reservation)));
        self.held.insert(
            task_id.clone(),
            Held {
                attempt,
                payload: Some(ptx),
                parts: String::new(),
                next_part: 0,
                cancel: cancel_h,
                reservation: reservation.clone(),
            },
        );
        if self.served.len() >= MAX_SERVED {
            self.served.clear();
        }
        self.served.insert(
            task_id.clone(),
            Served {
                attempt,
                requester: requester.clone(),
                payload_hash: lease.payload_hash.clone(),
            },
        );
        let job = Lease {
            link: self.link.clone(),
            me: self.me.clone(),
            paths: self.paths.clone(),
            image: self.spec.image.clone(),
            requester,
            binding: Binding {
                task_id,
                attempt,
                payload_hash: lease.payload_hash,
            },
            model: lease.model,
            max_tokens: lease.max_tokens,
            workspace_bytes,
            permission_mode,
            lease_deadline: lease.lease_deadline,
            approved_by: by,
            reservation,
            report: self.steps_tx.clone(),
        };
        self.running.spawn_local(async move {
            let id = (job.binding.task_id.clone(), job.binding.attempt);
            job.serve(prx, cancel).await;
            id
        });
    }
}
