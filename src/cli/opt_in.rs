//! `opt-in`: show the terms, record consent (terms version + hash, time, job
//! types, caps). Interactive on a terminal; scripts pass `--accept-terms`.

use serde_json::{json, Value};

use crate::config::{self, Config};
use crate::consent;
use crate::context::{self, Ctx};
use crate::exit::{Exit, Failure, Result};
use crate::legal;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also allow Claude-backed jobs from the market (tasks for other people)
    #[arg(long)]
    pub claude_jobs: bool,
    /// Jobs per day (limits.dailyTasks)
    #[arg(long, value_name = "N")]
    pub max_daily: Option<String>,
    /// Fresh-token cap per job: input + cache creation + output, cache reads
    /// apart (limits.maxTokensPerTask; the seed's flag)
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<String>,
    /// Accept the terms without prompting (for scripts; read `terms` first)
    #[arg(long)]
    pub accept_terms: bool,
}

fn cap_value(key: &str, text: &str) -> Result<Value, Failure> {
    let d = config::def(key).expect("cap keys are in SCHEMA");
    config::parse_text(d, text).map_err(|reason| {
        Failure::usage(format!("invalid value for `{key}`: {reason}"))
            .hint(format!("`{key}` takes {}", config::kind_help(d.kind)))
    })
}

pub fn run(ctx: &mut Ctx, args: Args) -> Result<Exit> {
    // Validate flags before asking anything.
    let mut caps: Vec<(&'static str, Value)> = Vec::new();
    if let Some(t) = &args.max_daily {
        caps.push(("limits.dailyTasks", cap_value("limits.dailyTasks", t)?));
    }
    if let Some(t) = &args.max_tokens {
        caps.push(("limits.maxTokensPerTask", cap_value("limits.maxTokensPerTask", t)?));
    }
    let cfg: Config = ctx.config()?.clone();
    let mut claude_jobs = args.claude_jobs;
    let interactive = !args.accept_terms;

    if interactive {
        if !context::interactive() {
            return Err(Failure::refused(
                "opt-in needs your explicit acceptance of the terms, and there is no terminal to ask on",
            )
            .hint("read them with `claude-max-market terms`, then run `claude-max-market opt-in --accept-terms`")
            .into());
        }
        eprintln!("{}", legal::TERMS);
        eprintln!(
            "Terms version {} (SHA-256 {})\n",
            legal::TERMS_VERSION,
            legal::terms_sha256()
        );
        if !context::confirm("Do you accept these terms?")? {
            return Err(Failure::refused("terms not accepted; nothing was recorded").into());
        }
        if !claude_jobs {
            claude_jobs = context::confirm(
                "Also allow Claude-backed market jobs (tasks from other people, run on your login, each approved by you)?",
            )?;
        }
        if args.max_daily.is_none() {
            let cur = cfg.settings().limits.daily_tasks;
            if let Some(t) = context::ask(&format!("Jobs per day [{cur}]: "))?.filter(|t| !t.is_empty()) {
                caps.push(("limits.dailyTasks", cap_value("limits.dailyTasks", &t)?));
            }
        }
        if args.max_tokens.is_none() {
            let cur = cfg.settings().limits.max_tokens_per_task;
            if let Some(t) = context::ask(&format!("Token cap per job [{cur}]: "))?.filter(|t| !t.is_empty()) {
                caps.push(("limits.maxTokensPerTask", cap_value("limits.maxTokensPerTask", &t)?));
            }
        }
    }

    let granted = consent::grant(
        &ctx.paths,
        consent::GrantOptions {
            market_jobs: claude_jobs,
            caps,
            interactive,
        },
    )?;
    ctx.reload_config();
    render(ctx.out(), &granted);
    Ok(Exit::Ok)
}

fn render(p: &crate::context::Printer, g: &consent::Granted) {
    if p.json {
        p.json(json!({ "ok": true, "consent": g.consent, "caps": g.caps }));
    } else {
        p.out(&format!(
            "Opted in: terms {} accepted; job types: {}; caps: {} jobs/day, {} tokens/job.",
            legal::TERMS_VERSION,
            g.consent.job_types.join(", "),
            g.caps.daily_tasks,
            g.caps.max_tokens_per_task
        ));
        p.note("Change caps with `claude-max-market limits`; revoke with `claude-max-market opt-out`.");
    }
}
