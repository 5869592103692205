//! `status`: consent, caps vs usage with reset times, open reservations.

use serde_json::json;

use crate::context::{Ctx, Printer};
use crate::status::StatusReport;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(ctx: &Ctx, _args: Args) -> anyhow::Result<()> {
    let cfg = ctx.config()?;
    let report = crate::status::read(&ctx.paths, cfg)?;
    let p = ctx.out();
    if p.json {
        p.json(json!(report));
        return Ok(());
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
    Ok(())
}

/// Caps against usage per window, with reset times (shared with `limits`).
pub fn caps_table(report: &StatusReport, p: &Printer) -> String {
    let cap = |c: Option<u64>| c.map(|c| c.to_string()).unwrap_or_else(|| "no cap".into());
    let mut out = format!("{}\n", p.bold("Caps and usage:"));
    out.push_str(&format!(
        "  {:<6} {:>10} {:>10} {:>12} {:>12}  {}\n",
        "window", "tasks", "task cap", "tokens", "token cap", "resets"
    ));
    for w in &report.usage.windows {
        let tasks = w.tasks + w.reserved_tasks;
        let tokens = w.tokens + w.reserved_tokens;
        out.push_str(&format!(
            "  {:<6} {:>10} {:>10} {:>12} {:>12}  {}\n",
            w.window.name(),
            tasks,
            cap(w.task_cap),
            tokens,
            cap(w.token_cap),
            w.resets_at.format("%Y-%m-%d %H:%M %Z")
        ));
    }
    out.push_str(&format!(
        "  per job: {} tokens, {} s timeout; {} job(s) at once",
        report.caps.max_tokens_per_task, report.timeout_seconds, report.caps.concurrent_jobs
    ));
    out
}
