//! `limits`: show caps against usage, or set them (validated, audited).

use serde_json::{json, Value};

use crate::config::{self as cfgmod, KeyDef};
use crate::context::Ctx;
use crate::exit::{Exit, Failure, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Jobs per day (limits.dailyTasks)
    #[arg(long, value_name = "N")]
    pub daily: Option<String>,
    /// Fresh tokens per day: input + cache creation + output; cache reads
    /// are shown apart (limits.dailyTokens; the seed's flag)
    #[arg(long, value_name = "N")]
    pub tokens: Option<String>,
    /// Jobs per ISO week, or `none` (limits.weeklyTasks)
    #[arg(long, value_name = "N")]
    pub weekly: Option<String>,
    /// Tokens per ISO week, or `none` (limits.weeklyTokens)
    #[arg(long, value_name = "N")]
    pub weekly_tokens: Option<String>,
    /// Jobs per calendar month, or `none` (limits.monthlyTasks)
    #[arg(long, value_name = "N")]
    pub monthly: Option<String>,
    /// Tokens per calendar month, or `none` (limits.monthlyTokens)
    #[arg(long, value_name = "N")]
    pub monthly_tokens: Option<String>,
    /// Fresh-token cap for one job (limits.maxTokensPerTask)
    #[arg(long, value_name = "N")]
    pub max_tokens_per_task: Option<String>,
    /// Turns one job may take, passed to Claude Code (limits.maxTurnsPerTask)
    #[arg(long, value_name = "N")]
    pub max_turns: Option<String>,
    /// USD one job may cost, passed to Claude Code as its budget, or `none`
    /// (limits.maxCostPerTask)
    #[arg(long, value_name = "USD")]
    pub max_cost_per_task: Option<String>,
    /// USD per day, from the cost Claude Code reports, or `none` (limits.dailyCostUsd)
    #[arg(long, value_name = "USD")]
    pub daily_cost: Option<String>,
    /// USD per ISO week, or `none` (limits.weeklyCostUsd)
    #[arg(long, value_name = "USD")]
    pub weekly_cost: Option<String>,
    /// USD per calendar month, or `none` (limits.monthlyCostUsd)
    #[arg(long, value_name = "USD")]
    pub monthly_cost: Option<String>,
    /// Job timeout in seconds (docker.timeout, stored in milliseconds)
    #[arg(long, value_name = "S")]
    pub timeout: Option<String>,
    /// Jobs at the same time (limits.concurrentJobs)
    #[arg(long, value_name = "N")]
    pub concurrent: Option<String>,
}

fn parse(key: &'static str, text: &str) -> Result<(&'static KeyDef, Option<Value>), Failure> {
    let d = cfgmod::def(key).expect("limit keys are in SCHEMA");
    cfgmod::parse_text(d, text).map(|v| (d, Some(v))).map_err(|reason| {
        Failure::usage(format!("invalid value for `{key}`: {reason}"))
            .hint(format!("`{key}` takes {}", cfgmod::kind_help(d.kind)))
    })
}

pub fn run(ctx: &mut Ctx, args: Args) -> Result<Exit> {
    let mut changes = Vec::new();
    for (key, val) in [
        ("limits.dailyTasks", &args.daily),
        ("limits.dailyTokens", &args.tokens),
        ("limits.weeklyTasks", &args.weekly),
        ("limits.weeklyTokens", &args.weekly_tokens),
        ("limits.monthlyTasks", &args.monthly),
        ("limits.monthlyTokens", &args.monthly_tokens),
        ("limits.maxTokensPerTask", &args.max_tokens_per_task),
        ("limits.maxTurnsPerTask", &args.max_turns),
        ("limits.maxCostPerTask", &args.max_cost_per_task),
        ("limits.dailyCostUsd", &args.daily_cost),
        ("limits.weeklyCostUsd", &args.weekly_cost),
        ("limits.monthlyCostUsd", &args.monthly_cost),
        ("limits.concurrentJobs", &args.concurrent),
    ] {
        if let Some(t) = val {
            changes.push(parse(key, t)?);
        }
    }
    if let Some(t) = &args.timeout {
        let digits = t.trim().strip_prefix('-').unwrap_or(t.trim());
        let secs: i64 = t.trim().parse().map_err(|_| {
            let why = if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                "it must be from 1 to 86400 seconds"
            } else {
                "not a whole number of seconds"
            };
            Failure::usage(format!("invalid timeout `{t}`: {why}")).hint("for example: `limits --timeout 600`")
        })?;
        changes.push(
            parse("docker.timeout", &secs.saturating_mul(1000).to_string()).map_err(|_| {
                Failure::usage(format!("invalid timeout {secs}s: it must be from 1 to 86400 seconds"))
                    .hint("for example: `limits --timeout 600`")
            })?,
        );
    }
    if !changes.is_empty() {
        let applied = super::config::apply(ctx, changes, "limits")?;
        if !ctx.out().json {
            for (k, o, n) in &applied {
                ctx.out().note(&format!("{k}: {o} -> {n}"));
            }
        }
    }
    show(ctx)
}

fn show(ctx: &Ctx) -> Result<Exit> {
    let cfg = ctx.config()?;
    let report = crate::status::read(&ctx.paths, cfg)?;
    let p = ctx.out();
    if p.json {
        p.json(json!({
            "caps": report.caps,
            "timeout_seconds": report.timeout_seconds,
            "usage": report.usage.windows,
        }));
        return Ok(Exit::Ok);
    }
    p.out(&super::status::caps_table(&report, p));
    Ok(Exit::Ok)
}
