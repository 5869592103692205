//! Write a synthetic, properly chained audit log for benchmarks.
//!
//! ```text
//! cargo run --release --example gen_audit -- DIR [EVENTS] [DAYS]
//! ```
//!
//! Creates `DIR/audit.jsonl` and `DIR/audit.head` (DIR must not hold a log
//! yet) with EVENTS events (default 1,000,000) spread evenly over the last
//! DAYS days (default 90): jobs (approved, started, one terminal event) mixed
//! with config and market events. Prints the expected totals as JSON so a
//! benchmark can check `usage` against them. Deterministic for a given
//! EVENTS and DAYS, apart from the log id and the end time (now).

use std::path::PathBuf;

use chrono::{Duration, Utc};
use claude_max_market::audit::write_backdated_log_for_tests;
use claude_max_market::Paths;
use serde_json::{json, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: gen_audit DIR [EVENTS] [DAYS]")?);
    let n: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1_000_000);
    let days: i64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(90);
    let paths = Paths::in_one_dir(dir);

    let end = Utc::now();
    let start = end - Duration::days(days);
    let step_ms = (days * 86_400_000) / n.max(1) as i64;
    let models = ["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"];
    let terminals = [
        "job.completed",
        "job.completed",
        "job.completed",
        "job.failed",
        "job.killed",
        "job.cancelled",
    ];

    let mut totals = (0u64, 0u64, 0u64); // tasks, succeeded, total tokens
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        // xorshift64: fast, deterministic, good enough for synthetic data.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Generated lazily: a million JSON values at once would need gigabytes.
    let mut pending: std::collections::VecDeque<(chrono::DateTime<Utc>, String, Value)> = Default::default();
    let mut i = 0u64;
    let mut job = 0u64;
    let totals_ref = &mut totals;
    let events = std::iter::from_fn(move || {
        if let Some(e) = pending.pop_front() {
            return Some(e);
        }
        if i >= n {
            return None;
        }
        let events = &mut pending;
        let ts = |i: u64| start + Duration::milliseconds(step_ms * i as i64);
        let r = rnd();
        if r % 5 == 0 || n - i < 3 {
            // Non-job events: config changes and market traffic.
            let ev = if r % 2 == 0 { "config.set" } else { "market.offer" };
            events.push_back((
                ts(i),
                ev.into(),
                json!({ "key": "limits.dailyTasks", "old": 5, "new": 6 }),
            ));
            i += 1;
            return events.pop_front();
        }
        job += 1;
        let id = format!("job-{job:08}");
        let model = models[(r >> 8) as usize % models.len()];
        let terminal = terminals[(r >> 16) as usize % terminals.len()];
        let (inp, out, cw, cr) = (r % 5000, (r >> 20) % 3000, (r >> 32) % 2000, (r >> 40) % 8000);
        let total = inp + out + cw + cr;
        events.push_back((
            ts(i),
            "job.approved".into(),
            json!({ "job_id": id, "how": "approve-all" }),
        ));
        events.push_back((
            ts(i + 1),
            "job.started".into(),
            json!({ "job_id": id, "model": model, "image": "cmm-runner:latest",
                    "prompt_sha256": "0".repeat(64), "max_tokens": 100000, "timeout_s": 600, "source": "local" }),
        ));
        events.push_back((
            ts(i + 2),
            terminal.into(),
            json!({ "job_id": id, "model": model, "duration_ms": (r >> 24) % 600_000,
                    "usage": { "input_tokens": inp, "output_tokens": out, "cache_creation_input_tokens": cw,
                               "cache_read_input_tokens": cr, "total_tokens": total },
                    "cost_usd": 0.0123, "num_turns": 3, "exit_code": 0 }),
        ));
        totals_ref.0 += 1;
        totals_ref.1 += u64::from(terminal == "job.completed");
        totals_ref.2 += total;
        i += 3;
        events.pop_front()
    });
    let head = write_backdated_log_for_tests(&paths, events)?;
    println!(
        "{}",
        json!({ "events": head.seq + 1, "bytes": head.len, "tasks": totals.0, "succeeded": totals.1,
                "total_tokens": totals.2 })
    );
    Ok(())
}
