//! The `bid` operation: post a task (its hash and metadata only) or raise a
//! task's bid, and with `wait`, see the task through to a verified, settled
//! result. It owns the requester's records: the `market.bid` line a later
//! `market result` checks a result against, the prompt kept encrypted for
//! it, and the `market.settled` / `market.refunded` / `market.result_rejected`
//! lines at the end ([`record_end`], which `market result` uses as well).
//!
//! It must not print: steps and warnings go to the caller as
//! [`RequesterEvent`]s, and the answer is a [`BidOutcome`].

use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::audit::{AuditLog, Event};
use crate::config::Settings;
use crate::crypto::keys::Identity;
use crate::market::client::{call_once, Endpoints};
use crate::market::pending;
use crate::market::protocol::{Request, TaskView};
use crate::market::reply::{Posted, Raised};
use crate::market::requester::{self, Outcome, Report, RequesterError, RequesterEvent};
use crate::market::workspace_task::{self, Check};
use crate::paths::Paths;

/// What to post, as the caller asked for it (defaults not yet applied).
#[derive(Debug, Clone)]
pub struct PostOptions {
    pub prompt: Vec<u8>,
    pub model: String,
    /// Default: `limits.maxTokensPerTask`.
    pub max_tokens: Option<u64>,
    /// Default: `market.bidTimeout`.
    pub deadline_secs: Option<u64>,
    pub max_attempts: Option<u32>,
    pub min_reputation: Option<f64>,
    /// Stay until the result (else keep the prompt for `market result`).
    pub wait: bool,
    /// Send DIR with the task and check the changes that come back.
    pub workspace: Option<WorkspaceBid>,
}

/// `bid --workspace DIR`: what goes out with the task and how its result is
/// checked before it is paid.
#[derive(Debug, Clone)]
pub struct WorkspaceBid {
    pub dir: std::path::PathBuf,
    /// Run on the patched copy in a hardened container; pay only on exit 0.
    pub accept_cmd: Option<String>,
    pub accept_image: Option<String>,
    /// Apply the accepted changes to DIR (only if DIR is unchanged).
    pub apply: bool,
    /// The permission mode the task asks for (default `acceptEdits`).
    pub permission_mode: Option<String>,
}

/// Post a task, or raise the bid of one.
#[derive(Debug, Clone)]
pub enum BidAction {
    Post(PostOptions),
    Raise { task_id: String },
}

#[derive(Debug, Clone)]
pub struct BidOptions {
    /// The coordinator replicas, tried in order.
    pub endpoint: Endpoints,
    /// Most RUV to pay; at most `market.maxBidPrice`.
    pub max_price: u64,
    pub action: BidAction,
}

/// What `bid` came to.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum BidOutcome {
    /// Posted and left to `market result` (whether the prompt is kept here
    /// for it is `pending`).
    Posted {
        task_id: String,
        task: TaskView,
        escrow: i64,
        pending: bool,
        #[serde(skip)]
        max_price: u64,
    },
    /// The bid of an unfinished task went up.
    Raised { raised: Raised },
    /// Waited for, verified and settled.
    Settled(Outcome),
}

/// Slack past a task's deadline for `--wait` to see its last attempt end.
const WAIT_SLACK: Duration = Duration::from_secs(30);

/// Refuse a bid above `market.maxBidPrice` (callers may ask this before
/// reading a prompt; [`bid`] asks it again).
pub fn check_price(settings: &Settings, max_price: u64) -> Result<(), RequesterError> {
    let cap = settings.market.max_bid_price;
    if max_price > cap {
        return Err(RequesterError::AboveMaxBid { max_price, cap });
    }
    Ok(())
}

/// Run `bid`: refuse a price above the cap, then post or raise, keeping
/// the records a later `market result` and the audit need.
pub async fn bid(
    paths: &Paths,
    settings: &Settings,
    opts: BidOptions,
    progress: Report<'_>,
) -> Result<BidOutcome, RequesterError> {
    check_price(settings, opts.max_price)?;
    let audit = AuditLog::new(paths);
    let post = match opts.action {
        BidAction::Raise { task_id } => return raise(paths, &opts.endpoint, &task_id, opts.max_price).await,
        BidAction::Post(p) => p,
    };
    // A workspace task's payload is the bundle of prompt and DIR; only its
    // hash and sizes go to the coordinator.
    let (payload, check) = match &post.workspace {
        None => (post.prompt.clone(), None),
        Some(w) => {
            let (bundle, check) = workspace_payload(paths, settings, &post.prompt, w).await?;
            (bundle, Some(check))
        }
    };
    let hash = hex::encode(Sha256::digest(&payload));
    let req = Request::Post {
        model: post.model.clone(),
        max_tokens: post.max_tokens.unwrap_or(settings.limits.max_tokens_per_task),
        max_price: opts.max_price,
        payload_hash: hash.clone(),
        deadline_secs: post
            .deadline_secs
            .unwrap_or(settings.market.bid_timeout.as_secs().max(1)),
        max_attempts: post.max_attempts,
        min_reputation: post.min_reputation,
        payload_bytes: Some(payload.len() as u64),
        workspace_bytes: check.as_ref().map(|c: &Check| c.snapshot.total_bytes().max(1)),
        permission_mode: post.workspace.as_ref().map(|w| {
            w.permission_mode
                .clone()
                .unwrap_or_else(|| workspace_task::DEFAULT_MODE.to_string())
        }),
    };
    let id = Identity::load_or_generate(paths)?;
    let posted = Posting {
        paths,
        audit: &audit,
        me: &id,
        hash: &hash,
        model: &post.model,
        max_price: opts.max_price,
        prompt: &payload,
        check: check.as_ref(),
    };
    if post.wait {
        let Request::Post { deadline_secs, .. } = &req else {
            unreachable!("built as a post above")
        };
        let wait = Duration::from_secs(*deadline_secs) + WAIT_SLACK;
        return posted.wait(&opts.endpoint, &req, wait, progress).await;
    }
    let reply: Posted = call_once(&opts.endpoint, &id, &req).await?;
    posted.record(&reply.task.task_id, reply.escrow)?;
    let pending = posted.keep(&reply.task.task_id, progress);
    Ok(BidOutcome::Posted {
        task_id: reply.task.task_id.clone(),
        task: reply.task,
        escrow: reply.escrow,
        pending,
        max_price: opts.max_price,
    })
}

/// Select DIR, bundle it with the prompt, and say how the result is checked.
async fn workspace_payload(
    paths: &Paths,
    settings: &Settings,
    prompt: &[u8],
    w: &WorkspaceBid,
) -> Result<(Vec<u8>, Check), RequesterError> {
    if let Some(m) = &w.permission_mode {
        if !crate::config::PERMISSION_MODES.contains(&m.as_str()) {
            return Err(RequesterError::Workspace(format!(
                "`{m}` is not a permission mode (one of: {})",
                crate::config::PERMISSION_MODES.join(", ")
            )));
        }
    }
    let (dir, limit) = (w.dir.clone(), settings.docker.workspace_limit);
    let selected = tokio::task::spawn_blocking(move || {
        let s = workspace_task::select(&dir, limit)?;
        let tar = workspace_task::tar_of(&s)?;
        Ok::<_, crate::workspace::WorkspaceError>((s, tar))
    })
    .await
    .map_err(|e| RequesterError::Workspace(e.to_string()))?;
    let (snapshot, tar) = selected.map_err(|e| RequesterError::Workspace(e.to_string()))?;
    let bundle = workspace_task::bundle(prompt, &tar);
    Ok((
        bundle,
        Check {
            paths: paths.clone(),
            dir: w.dir.clone(),
            snapshot: std::sync::Arc::new(snapshot),
            accept_cmd: w.accept_cmd.clone(),
            accept_image: w.accept_image.clone(),
            accept_timeout: None,
            apply: w.apply,
        },
    ))
}

async fn raise(
    paths: &Paths,
    endpoint: &Endpoints,
    task_id: &str,
    max_price: u64,
) -> Result<BidOutcome, RequesterError> {
    let audit = AuditLog::new(paths);
    let id = Identity::load_or_generate(paths)?;
    let req = Request::Raise {
        task_id: task_id.to_string(),
        max_price,
    };
    let raised: Raised = call_once(endpoint, &id, &req).await?;
    audit.append(
        Event::MarketRaise,
        json!({ "task_id": task_id, "max_price": max_price, "escrow_added": raised.escrow_added }),
    )?;
    Ok(BidOutcome::Raised { raised })
}

/// A task being posted by this node, and what is recorded for it.
struct Posting<'a> {
    paths: &'a Paths,
    audit: &'a AuditLog,
    me: &'a Identity,
    hash: &'a str,
    model: &'a str,
    max_price: u64,
    prompt: &'a [u8],
    check: Option<&'a Check>,
}

impl Posting<'_> {
    /// The record a later `market result` checks the result against.
    fn record(&self, task_id: &str, escrow: i64) -> Result<(), crate::audit::AuditError> {
        let mut fields = json!({ "task_id": task_id, "payload_hash": self.hash, "max_price": self.max_price,
                                 "model": self.model, "escrow": escrow });
        if let Some(c) = self.check {
            fields["workspace"] = json!({
                "dir": c.dir, "files": c.snapshot.file_count(), "bytes": c.snapshot.total_bytes(),
                "snapshot": c.snapshot.id(), "accept_cmd": c.accept_cmd, "accept_image": c.accept_image,
            });
        }
        self.audit.append(Event::MarketBid, fields).map(|_| ())
    }

    /// Keep the prompt, encrypted to our own key, for `market result`;
    /// says so (and carries on) if it cannot.
    fn keep(&self, task_id: &str, progress: Report<'_>) -> bool {
        match pending::store(self.paths, self.me, task_id, self.prompt) {
            Ok(_) => true,
            Err(e) => {
                progress(RequesterEvent::Warning {
                    message: format!("{e}; `market result {task_id}` will not be able to send the payload"),
                });
                false
            }
        }
    }

    /// Post and see the task through; records are written as soon as the
    /// task id is known, so `market result` can carry on if this run is
    /// cut short.
    async fn wait(
        &self,
        endpoint: &Endpoints,
        req: &Request,
        wait: Duration,
        progress: Report<'_>,
    ) -> Result<BidOutcome, RequesterError> {
        let mut step = |ev: RequesterEvent| {
            if let RequesterEvent::Posted { task_id, escrow } = &ev {
                if let Err(e) = self.record(task_id, *escrow) {
                    progress(RequesterEvent::Warning {
                        message: format!("cannot write the audit log: {e}"),
                    });
                }
                self.keep(task_id, progress);
            }
            progress(ev);
        };
        let r = requester::post_and_wait(endpoint, self.me, req, self.prompt, self.check, wait, &mut step).await;
        Ok(BidOutcome::Settled(record_end(self.paths, r, progress)?))
    }
}

/// The end of a federated job, recorded: a settled result is audited with
/// its payment, a refund or a rejected result with why; once it is over
/// either way, the kept prompt is removed.
pub fn record_end(
    paths: &Paths,
    r: Result<Outcome, RequesterError>,
    progress: Report<'_>,
) -> Result<Outcome, RequesterError> {
    let audit = AuditLog::new(paths);
    // Settled or refunded: the kept prompt is of no more use.
    let done = match &r {
        Ok(o) => Some(o.task_id.as_str()),
        Err(RequesterError::Refunded { task_id, .. })
        | Err(RequesterError::Rejected { task_id, .. })
        | Err(RequesterError::Finished { task_id, .. }) => Some(task_id.as_str()),
        Err(_) => None,
    };
    if let Some(task_id) = done {
        if let Err(e) = pending::remove(paths, task_id) {
            progress(RequesterEvent::Warning { message: e.to_string() });
        }
    }
    match r {
        Ok(o) => {
            let mut fields = json!({ "task_id": o.task_id, "attempt": o.attempt, "provider": o.provider,
                    "paid": o.settlement.paid, "refunded": o.settlement.refunded,
                    "result_sha256": hex::encode(Sha256::digest(o.text().as_bytes())) });
            if let Some(w) = &o.workspace {
                fields["workspace_files"] = json!(w.files_in);
                fields["workspace_bytes"] = json!(w.bytes_in);
                fields["files_changed"] = json!(w.changes["files"].as_array().map_or(0, |f| f.len()));
                fields["patch_sha256"] = w.changes["patch"]["sha256"].clone();
                fields["acceptance"] = json!(w.acceptance);
                fields["applied"] = json!(w.applied.as_ref().map(|a| a.summary()));
                fields["apply_error"] = json!(w.apply_error);
            }
            audit.append(Event::MarketSettled, fields)?;
            Ok(o)
        }
        Err(e) => {
            if let RequesterError::Refunded { task_id, why } = &e {
                audit.append(Event::MarketRefunded, json!({ "task_id": task_id, "why": why }))?;
            }
            if let RequesterError::Rejected {
                task_id,
                attempt,
                source,
            } = &e
            {
                audit.append(
                    Event::MarketResultRejected,
                    json!({ "task_id": task_id, "attempt": attempt, "error": source.to_string() }),
                )?;
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{Exit, HasExit};

    #[test]
    fn a_bid_above_the_cap_is_refused() {
        let mut settings = Settings::defaults();
        settings.market.max_bid_price = 10;
        assert!(check_price(&settings, 10).is_ok());
        let e = check_price(&settings, 11).unwrap_err();
        assert_eq!(e.exit(), Exit::Refused);
        assert!(e.hint().unwrap().contains("market.maxBidPrice"));
    }
}
