//! `bid`: post a task (its hash and metadata only) or raise a task's bid;
//! with `--wait`, see it through: send the payload sealed to the provider
//! that wins the lease, then verify, print and settle the result. Without
//! it, the prompt is kept encrypted to this node's own key, and
//! `market result TASK_ID` sends it and collects the result later.
//!
//! This file parses the flags and renders the outcome; the work and its
//! records are [`crate::market::bid`]'s. It must not decide anything about
//! the task or write the audit log.

use crate::exit::{Exit, Result};
use std::path::PathBuf;

use crate::cli::progress::{ok, render_settled, settled_exit, show_step};
use crate::context::{Ctx, Printer};
use crate::market::bid::{self, BidAction, BidOptions, BidOutcome, PostOptions};
use crate::market::client::Endpoints;
use crate::market::requester::RequesterEvent;

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
    /// Coordinator URL, or replicas as a comma-separated list tried in order (default: `market.endpoint`)
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Stay until the result: send the payload encrypted to the assigned provider,
    /// verify and print the result, and settle (without it, print the task id and
    /// keep the prompt encrypted to your own key; `market result TASK_ID` sends it
    /// once a provider takes the task and collects the result)
    #[arg(long, conflicts_with = "task_id")]
    pub wait: bool,
    /// Send DIR with the task (selected as `execute --workspace` selects it,
    /// sealed to the provider with the prompt); the changes come back and are
    /// checked here before anything is paid
    #[arg(long, value_name = "DIR", conflicts_with = "task_id")]
    pub workspace: Option<PathBuf>,
    /// Settle only if CMD exits 0: run it (`sh -c CMD`) on a copy of DIR with
    /// the returned changes, in a hardened container with no network and no
    /// credential; otherwise reject the attempt with CMD's exit code and last
    /// lines as the reason (the task goes to another provider while attempts remain)
    #[arg(long, value_name = "CMD", requires = "workspace")]
    pub accept_cmd: Option<String>,
    /// The image the acceptance command runs in (default: `docker.image`)
    #[arg(long, value_name = "IMAGE", requires = "accept_cmd")]
    pub accept_image: Option<String>,
    /// Apply the accepted changes to DIR (only if DIR has not changed since
    /// the bid; otherwise the patch is kept and the path printed)
    #[arg(long, requires = "workspace")]
    pub apply: bool,
    /// The Claude Code permission mode the task asks to run in (default with
    /// a workspace: acceptEdits; providers decline modes their
    /// `market.permissionModes` does not list)
    #[arg(long, value_name = "MODE", value_parser = clap::builder::PossibleValuesParser::new(crate::config::PERMISSION_MODES))]
    pub permission_mode: Option<String>,
}

fn parse_reputation(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err("a reputation is a number from 0 to 1, such as 0.8".into()),
    }
}

pub fn run(ctx: &Ctx, a: Args) -> Result<Exit> {
    let cfg = ctx.config()?;
    // Refused before a prompt is read from stdin.
    bid::check_price(cfg.settings(), a.max_price)?;
    let endpoint = Endpoints::resolve(a.endpoint.clone(), &cfg.settings().market.endpoint)?;
    let action = match &a.task_id {
        Some(task_id) => BidAction::Raise {
            task_id: task_id.clone(),
        },
        None => BidAction::Post(PostOptions {
            prompt: crate::cli::execute::read_prompt_from(a.prompt.as_deref(), a.file.as_deref())?,
            model: a.model.clone(),
            max_tokens: a.max_tokens,
            deadline_secs: a.deadline,
            max_attempts: a.max_attempts,
            min_reputation: a.min_reputation,
            wait: a.wait,
            workspace: a.workspace.clone().map(|dir| bid::WorkspaceBid {
                dir,
                accept_cmd: a.accept_cmd.clone(),
                accept_image: a.accept_image.clone(),
                apply: a.apply,
                permission_mode: a.permission_mode.clone(),
            }),
        }),
    };
    let opts = BidOptions {
        endpoint,
        max_price: a.max_price,
        action,
    };
    let p = ctx.out();
    let mut progress = |ev: RequesterEvent| show_step(p, &ev);
    let outcome =
        crate::runtime::current_thread()?.block_on(bid::bid(&ctx.paths, cfg.settings(), opts, &mut progress))?;
    render(&outcome, p);
    Ok(match &outcome {
        BidOutcome::Settled(o) => settled_exit(o),
        _ => Exit::Ok,
    })
}

fn render(o: &BidOutcome, p: &Printer) {
    match o {
        BidOutcome::Posted {
            task_id,
            pending,
            max_price,
            ..
        } => {
            if p.json {
                return p.json(ok(o));
            }
            p.note(&format!("posted; {max_price} RUV locked in escrow"));
            if *pending {
                p.note(&format!(
                    "run `claude-max-market market result {task_id}` to send the payload once a provider \
                     takes it and collect the result (the task is offered only while you are connected)"
                ));
            }
            p.out(task_id);
        }
        BidOutcome::Raised { raised } => {
            if p.json {
                return p.json(ok(o));
            }
            p.out(&format!(
                "task {} now bids {} RUV (+{} in escrow)",
                raised.task_id, raised.max_price, raised.escrow_added
            ));
        }
        BidOutcome::Settled(s) => render_settled(s, p),
    }
}
