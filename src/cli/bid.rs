//! `bid`: post a task (its hash and metadata only) or raise a task's bid;
//! with `--wait`, see it through: send the payload sealed to the provider
//! that wins the lease, then verify, print and settle the result. Without
//! it, the prompt is kept encrypted to this node's own key, and
//! `market result TASK_ID` sends it and collects the result later.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::cli::market::{endpoint, runtime};
use crate::context::Ctx;
use crate::crypto::keys::Identity;
use crate::exit::{Exit, Failure, Result};
use crate::market::client::{Backoff, Client, ClientError};
use crate::market::pending;
use crate::market::protocol::Request;
use crate::market::requester::{self, Outcome, RequesterError};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["prompt", "file", "task_id"])))]
pub struct Args {
    /// The task's prompt (only its SHA-256 goes to the market; at most 1 MiB)
    #[arg(long)]
    pub prompt: Option<String>,
    /// Read the prompt from a file (`-` for stdin; at most 1 MiB)
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Raise the bid of this task instead of posting one
    #[arg(long)]
    pub task_id: Option<String>,
    /// Most RUV you will pay (locked in escrow until settlement or refund)
    #[arg(long)]
    pub max_price: u64,
    /// Model the provider must run
    #[arg(long, default_value = "sonnet")]
    pub model: String,
    /// Token budget for the task (default: `limits.maxTokensPerTask`; 1 to 10,000,000)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_tokens: Option<u64>,
    /// Seconds the task may wait and run before it is refunded (default:
    /// `market.bidTimeout`; at most 604800, a week)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub deadline: Option<u64>,
    /// Attempts before the task is refunded (default: the coordinator's; 1 to 10)
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=crate::market::server::book::MAX_ATTEMPTS as i64))]
    pub max_attempts: Option<u32>,
    /// Only providers with at least this reputation (0 to 1) may take it
    #[arg(long, value_parser = parse_reputation)]
    pub min_reputation: Option<f64>,
    /// Coordinator URL (default: `market.endpoint`)
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Stay until the result: send the payload encrypted to the assigned provider,
    /// verify and print the result, and settle (without it, print the task id and
    /// keep the prompt encrypted to your own key; `market result TASK_ID` sends it
    /// once a provider takes the task and collects the result)
    #[arg(long, conflicts_with = "task_id")]
    pub wait: bool,
}

fn parse_reputation(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err("a reputation is a number from 0 to 1, such as 0.8".into()),
    }
}

pub fn run(ctx: &Ctx, a: Args) -> Result<Exit> {
    let cfg = ctx.config()?;
    let cap = cfg.settings().market.max_bid_price;
    if a.max_price > cap {
        return Err(Failure::refused(format!(
            "--max-price {} is above your `market.maxBidPrice` of {cap} RUV",
            a.max_price
        ))
        .hint("raise it with `claude-max-market config --set market.maxBidPrice=N`")
        .into());
    }
    let endpoint = endpoint(ctx, a.endpoint.clone())?;
    let (req, payload_hash, prompt) = if let Some(task_id) = &a.task_id {
        (
            Request::Raise {
                task_id: task_id.clone(),
                max_price: a.max_price,
            },
            None,
            None,
        )
    } else {
        let prompt = crate::cli::execute::read_prompt_from(a.prompt.as_deref(), a.file.as_deref())?;
        let hash = hex::encode(Sha256::digest(&prompt));
        let max_tokens = a.max_tokens.unwrap_or(cfg.settings().limits.max_tokens_per_task);
        let deadline = a.deadline.unwrap_or(cfg.settings().market.bid_timeout.as_secs().max(1));
        (
            Request::Post {
                model: a.model.clone(),
                max_tokens,
                max_price: a.max_price,
                payload_hash: hash.clone(),
                deadline_secs: deadline,
                max_attempts: a.max_attempts,
                min_reputation: a.min_reputation,
                payload_bytes: Some(prompt.len() as u64),
            },
            Some(hash),
            Some(prompt),
        )
    };
    let id = Identity::load_or_generate(&ctx.paths, &ctx.audit())?;
    if a.wait {
        // Only here is the prompt in memory, so only here can it be sent.
        let prompt = prompt.expect("--wait conflicts with --task-id");
        let wait = match &req {
            Request::Post { deadline_secs, .. } => Duration::from_secs(*deadline_secs + 30),
            _ => unreachable!("--wait posts a task"),
        };
        return wait_for_result(ctx, &endpoint, &id, &req, &prompt, wait, &a);
    }
    let result = runtime()?.block_on(send_once(&endpoint, &id, &req))?;
    let p = ctx.out();
    match (payload_hash, prompt) {
        (Some(hash), Some(prompt)) => {
            let task_id = result["task"]["task_id"].as_str().unwrap_or_default().to_string();
            ctx.audit().append(
                "market.bid",
                json!({ "task_id": task_id, "payload_hash": hash, "max_price": a.max_price,
                        "model": a.model, "escrow": result["escrow"] }),
            )?;
            let pending = keep_prompt(ctx, &id, &task_id, &prompt);
            if p.json {
                p.json(
                    json!({ "ok": true, "task_id": task_id, "task": result["task"], "escrow": result["escrow"],
                               "pending": pending }),
                );
            } else {
                p.note(&format!("posted; {} RUV locked in escrow", a.max_price));
                if pending {
                    p.note(&format!(
                        "run `claude-max-market market result {task_id}` to send the payload once a provider \
                         takes it and collect the result (the task is offered only while you are connected)"
                    ));
                }
                p.out(&task_id);
            }
        }
        _ => {
            ctx.audit().append(
                "market.raise",
                json!({ "task_id": a.task_id, "max_price": a.max_price, "escrow_added": result["escrow_added"] }),
            )?;
            if p.json {
                p.json(json!({ "ok": true, "raised": result }));
            } else {
                p.out(&format!(
                    "task {} now bids {} RUV (+{} in escrow)",
                    a.task_id.as_deref().unwrap_or("?"),
                    result["max_price"],
                    result["escrow_added"]
                ));
            }
        }
    }
    Ok(Exit::Ok)
}

fn wait_for_result(
    ctx: &Ctx,
    endpoint: &str,
    id: &Identity,
    req: &Request,
    prompt: &[u8],
    wait: Duration,
    a: &Args,
) -> Result<Exit> {
    let p = ctx.out().clone();
    let audit = ctx.audit();
    let mut progress = |v: Value| {
        if v["event"] == "posted" {
            let task_id = v["task_id"].as_str().unwrap_or_default();
            // The record a later `market result` checks the result against.
            if let Err(e) = audit.append(
                "market.bid",
                json!({ "task_id": task_id, "payload_hash": req_hash(req), "max_price": a.max_price,
                        "model": a.model, "escrow": v["escrow"] }),
            ) {
                p.warn(&format!("cannot write the audit log: {e}"));
            }
            // So that `market result` can carry on if this run is cut short.
            keep_prompt(ctx, id, task_id, prompt);
        }
        p.note(&progress_line(&v));
    };
    let r = runtime()?.block_on(requester::post_and_wait(endpoint, id, req, prompt, wait, &mut progress));
    finish(ctx, r)
}

/// Keep the prompt of a posted task, encrypted to our own key, for
/// `market result`; says so (and carries on) if it cannot.
fn keep_prompt(ctx: &Ctx, id: &Identity, task_id: &str, prompt: &[u8]) -> bool {
    match pending::store(&ctx.paths, id, task_id, prompt) {
        Ok(_) => true,
        Err(e) => {
            ctx.out().warn(&format!(
                "{e}; `market result {task_id}` will not be able to send the payload"
            ));
            false
        }
    }
}

/// One line of progress (stderr) for a step of following a task.
pub fn progress_line(v: &Value) -> String {
    let short = |k: &Value| {
        let s = k.as_str().unwrap_or("?");
        s[..s.len().min(16)].to_string()
    };
    match v["event"].as_str().unwrap_or("") {
        "posted" => format!(
            "posted {}; {} RUV locked in escrow",
            v["task_id"].as_str().unwrap_or("?"),
            v["escrow"]
        ),
        "assigned" => format!("assigned to node {} (attempt {})", short(&v["provider"]), v["attempt"]),
        "running" => format!("payload sent encrypted; running on node {}", short(&v["provider"])),
        "payload_refused" => format!("payload not relayed: {}", v["error"].as_str().unwrap_or("?")),
        "delivered" => format!("result delivered (attempt {}); verifying", v["attempt"]),
        "attempt_failed" => format!(
            "attempt {} on node {} {}: {}; the task is re-offered",
            v["attempt"],
            short(&v["provider"]),
            v["reason"].as_str().unwrap_or("?"),
            v["error"].as_str().unwrap_or("no report")
        ),
        "refunded" => format!("refunded {} RUV: {}", v["amount"], v["why"].as_str().unwrap_or("?")),
        other => other.to_string(),
    }
}

fn req_hash(req: &Request) -> Value {
    match req {
        Request::Post { payload_hash, .. } => payload_hash.as_str().into(),
        _ => Value::Null,
    }
}

/// Audit and print the end of a federated job: a verified, settled result
/// (`--json`: the whole record), or why there is none.
pub fn finish(ctx: &Ctx, r: Result<Outcome, RequesterError>) -> Result<Exit> {
    let p = ctx.out();
    let audit = ctx.audit();
    // Settled or refunded: the kept prompt is of no more use.
    let done = match &r {
        Ok(o) => Some(o.task_id.as_str()),
        Err(RequesterError::Refunded { task_id, .. })
        | Err(RequesterError::Rejected { task_id, .. })
        | Err(RequesterError::Finished { task_id, .. }) => Some(task_id.as_str()),
        Err(_) => None,
    };
    if let Some(task_id) = done {
        if let Err(e) = pending::remove(&ctx.paths, task_id) {
            p.warn(&e.to_string());
        }
    }
    match r {
        Ok(o) => {
            let text = o.body["result"].as_str().unwrap_or_default();
            audit.append(
                "market.settled",
                json!({ "task_id": o.task_id, "attempt": o.attempt, "provider": o.provider,
                        "paid": o.settlement["paid"], "refunded": o.settlement["refunded"],
                        "result_sha256": hex::encode(Sha256::digest(text.as_bytes())) }),
            )?;
            p.note(&format!(
                "verified and settled: paid {} RUV, refunded {} RUV",
                o.settlement["paid"], o.settlement["refunded"]
            ));
            if p.json {
                p.json(
                    json!({ "ok": true, "task_id": o.task_id, "attempt": o.attempt, "provider": o.provider,
                               "status": o.status, "result": o.body, "settlement": o.settlement }),
                );
            } else {
                p.out(text);
            }
            Ok(Exit::Ok)
        }
        Err(e) => {
            if let RequesterError::Refunded { task_id, why } = &e {
                audit.append("market.refunded", json!({ "task_id": task_id, "why": why }))?;
            }
            if let RequesterError::Rejected {
                task_id,
                attempt,
                source,
            } = &e
            {
                audit.append(
                    "market.result_rejected",
                    json!({ "task_id": task_id, "attempt": attempt, "error": source.to_string() }),
                )?;
            }
            Err(e.into())
        }
    }
}

/// Send one request, retrying on a fresh connection under the same message
/// id if the connection fails, so a lost reply never applies it twice.
async fn send_once(endpoint: &str, id: &Identity, req: &Request) -> Result<Value, ClientError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    let mut msg_id = None;
    let mut tries = 0;
    loop {
        tries += 1;
        let attempt = async {
            let client = Client::connect(endpoint, id).await?;
            let mid = msg_id.get_or_insert_with(|| client.next_id()).clone();
            let r = client.request_with_id(&mid, req).await;
            client.close();
            r
        };
        match attempt.await {
            Err(e) if e.is_transient() && tries < 4 && msg_id.is_some() => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            other => return other,
        }
    }
}
