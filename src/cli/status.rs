//! `status`: consent, caps vs usage with reset times, open reservations.

use crate::exit::{Exit, Result};
use serde_json::json;

use crate::context::{Ctx, Printer};
use crate::status::StatusReport;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(ctx: &Ctx, _args: Args) -> Result<Exit> {
    let cfg = ctx.config()?;
    let report = crate::status::read(&ctx.paths, cfg)?;
    let p = ctx.out();
    if p.json {
        p.json(json!(report));
        return Ok(Exit::Ok);
    }
    let c = &report.consent;
    let consent = if c.accepted && c.terms_current {
        p.green(&format!(
            "opted in ({}) since {}",
            c.job_types.join(", "),
            c.accepted_at.as_deref().unwrap_or("?")
        ))
    } else if c.accepted {
        p.yellow(&format!(
            "opted in to terms {} but current terms are {}: run `opt-in` again",
            c.terms_version.as_deref().unwrap_or("?"),
            c.current_terms_version
        ))
    } else if let Some(r) = &c.revoked_at {
        p.yellow(&format!("opted out at {r}"))
    } else {
        p.yellow("not opted in (run `claude-max-market opt-in`)")
    };
    let mut out = format!("{} {consent}\n\n", p.bold("Consent:"));
    out.push_str(&caps_table(&report, p));
    out.push('\n');
    if report.usage.reservations.is_empty() {
        out.push_str(&format!("\n{} none\n", p.bold("Open reservations:")));
    } else {
        out.push_str(&format!("\n{}\n", p.bold("Open reservations:")));
        for r in &report.usage.reservations {
            out.push_str(&format!(
                "  {}  job {}  pid {}  {} tokens  since {}{}\n",
                r.reservation.id,
                r.reservation.job_id,
                r.reservation.pid,
                r.reservation.tokens,
                r.reservation.created.format("%H:%M:%S"),
                if r.stale {
                    "  (process gone; reclaimed on next use)"
                } else {
                    ""
                }
            ));
        }
    }
    out.push_str(&format!("\n{} {} events", p.bold("Audit log:"), report.audit.events));
    if let Some(prob) = &report.audit.problem {
        out.push_str(&format!("  {}", p.red(prob)));
    }
    p.out(&out);
    Ok(Exit::Ok)
}

/// Caps against usage per window, with reset times (shared with `limits`).
pub fn caps_table(report: &StatusReport, p: &Printer) -> String {
    let cap = |c: Option<u64>| c.map(|c| c.to_string()).unwrap_or_else(|| "no cap".into());
    let usd_cap = |c: Option<f64>| c.map(|c| format!("${c:.2}")).unwrap_or_else(|| "no cap".into());
    let mut out = format!("{}\n", p.bold("Caps and usage:"));
    out.push_str(&format!(
        "  {:<6} {:>7} {:>8} {:>12} {:>12} {:>13} {:>9} {:>9}  {}\n",
        "window", "tasks", "task cap", "tokens", "token cap", "cache reads", "cost", "cost cap", "resets"
    ));
    for w in &report.usage.windows {
        out.push_str(&format!(
            "  {:<6} {:>7} {:>8} {:>12} {:>12} {:>13} {:>9} {:>9}  {}\n",
            w.window.name(),
            w.tasks + w.reserved_tasks,
            cap(w.task_cap),
            w.tokens + w.reserved_tokens,
            cap(w.token_cap),
            w.cache_read_tokens,
            format!("${:.2}", w.cost_usd + w.reserved_cost_usd),
            usd_cap(w.cost_cap_usd),
            w.resets_at.format("%Y-%m-%d %H:%M %Z")
        ));
    }
    let c = &report.caps;
    out.push_str(&format!(
        "  per job: {} tokens, {} turns, {}, {} s timeout; {} job(s) at once\n",
        c.max_tokens_per_task,
        c.max_turns_per_task,
        c.max_cost_per_task
            .map(|x| format!("${x:.2}"))
            .unwrap_or_else(|| "no cost cap".into()),
        report.timeout_seconds,
        c.concurrent_jobs
    ));
    out.push_str(
        "  tokens are fresh tokens (input + cache creation + output); cache reads are shown apart and count toward cost; usage includes running jobs' reservations",
    );
    // One Claude Code request carries ~12,000 tokens of system prompt and
    // tool definitions: a smaller per-job cap stops every job at once.
    if c.max_tokens_per_task < crate::caps::MIN_USEFUL_TASK_TOKENS {
        out.push_str(&format!(
            "\n  {} limits.maxTokensPerTask = {} is below what one Claude Code request uses (~12,000 fresh tokens): every job would be stopped; raise it with `limits --max-tokens-per-task 500000`",
            p.yellow("warning:"),
            c.max_tokens_per_task
        ));
    }
    out
}
