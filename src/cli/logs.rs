//! `logs`: read the audit log; `--follow` streams lines other processes append.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::audit::Entry;
use crate::context::{Ctx, Printer};
use crate::exit::{Exit, Failure, Result};
use crate::timespec;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Show only the last N events
    #[arg(long, short = 'n', value_name = "N")]
    pub tail: Option<usize>,
    /// Keep running and print events as they are appended (Ctrl-C to stop)
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only events at or after T (RFC 3339, a local date, or an age like 2h)
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Show one job's record (result, usage, durations) instead of the log
    #[arg(long, value_name = "ID", conflicts_with_all = ["tail", "follow", "since"])]
    pub job: Option<String>,
    /// With `--job`: print the job's workspace patch (a unified diff `git apply` accepts)
    #[arg(long, requires = "job")]
    pub patch: bool,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<Exit> {
    if let Some(id) = &args.job {
        if args.patch {
            return show_patch(ctx, id);
        }
        return show_job(ctx, id);
    }
    let since = match &args.since {
        Some(s) => Some(timespec::parse_since(s, Utc::now()).map_err(Failure::usage)?),
        None => None,
    };
    let log = crate::audit::AuditLog::new(&ctx.paths);
    let keep = |e: &Entry| since.is_none_or(|s| DateTime::parse_from_rfc3339(&e.ts).is_ok_and(|t| t >= s));
    let p = ctx.out();
    let entries: Vec<Entry> = match args.tail {
        Some(n) => log.tail(n)?.into_iter().filter(keep).collect(),
        None => log.entries()?.filter(keep).collect(),
    };
    for e in &entries {
        print_entry(p, e);
    }
    if args.follow {
        follow(ctx, p, &keep)?;
    }
    Ok(Exit::Ok)
}

fn print_entry(p: &Printer, e: &Entry) {
    if p.json {
        // Raw JSON lines: exactly the bytes in the log.
        p.out(&e.line);
        return;
    }
    let ts = DateTime::parse_from_rfc3339(&e.ts)
        .map(|t| t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|_| e.ts.clone());
    let fields: Vec<String> = e
        .fields()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    p.out(&format!(
        "{ts}  {:>6}  {:<20} {}",
        format!("#{}", e.seq),
        p.bold(&e.event),
        fields.join(" ")
    ));
}

/// Poll the log for growth and print complete new lines.
fn follow(ctx: &Ctx, p: &Printer, keep: &dyn Fn(&Entry) -> bool) -> Result<Exit> {
    let path = ctx.paths.audit_log();
    let mut offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut pending = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.len() < offset {
            // Recovery truncated a torn tail; continue from the new end.
            offset = meta.len();
            pending.clear();
            continue;
        }
        if meta.len() == offset {
            continue;
        }
        let mut f = File::open(&path)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut reader = BufReader::new(f);
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line)?;
            if n == 0 {
                break;
            }
            offset += n as u64;
            pending.push_str(&line);
            if pending.ends_with('\n') {
                let full = std::mem::take(&mut pending);
                if let Some(e) = crate::audit::parse_line(full.trim_end_matches('\n')) {
                    if keep(&e) {
                        print_entry(p, &e);
                    }
                }
            }
        }
    }
}

/// `logs --job ID --patch`: the patch, byte for byte (`--json`: its path,
/// hash and text).
fn show_patch(ctx: &Ctx, id: &str) -> Result<Exit> {
    let record = crate::job::read_record(&ctx.paths, id)?;
    let path = crate::job::patch_path(&ctx.paths, id);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let why = if record.get("workspace").is_none_or(|w| w.is_null()) {
                "it had no workspace (`execute --workspace DIR`)"
            } else {
                "it changed nothing in its workspace"
            };
            return Err(Failure::new(crate::exit::Exit::Failed, format!("job `{id}` has no patch: {why}")).into());
        }
        Err(e) => {
            return Err(Failure::new(
                crate::exit::Exit::Failed,
                format!("cannot read {}: {e}", path.display()),
            )
            .into())
        }
    };
    let p = ctx.out();
    if p.json {
        use sha2::Digest;
        p.json(serde_json::json!({
            "ok": true,
            "job_id": id,
            "path": path,
            "sha256": hex::encode(sha2::Sha256::digest(&bytes)),
            "patch": String::from_utf8_lossy(&bytes),
        }));
        return Ok(Exit::Ok);
    }
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(&bytes).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(Exit::Ok),
    }
}

/// `logs --job ID`: the job record (`--json`: the record itself).
fn show_job(ctx: &Ctx, id: &str) -> Result<Exit> {
    let record = crate::job::read_record(&ctx.paths, id)?;
    let p = ctx.out();
    if p.json {
        p.json(record);
        return Ok(Exit::Ok);
    }
    let s = |k: &str| match record.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    };
    let u = |k: &str| {
        record
            .pointer(&format!("/usage/{k}"))
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    let mut out = vec![
        format!("job       {}", s("job_id")),
        format!("status    {}", s("status")),
        format!("model     {} ({})", s("model"), s("model_resolved")),
        format!("image     {}", s("image")),
        format!("started   {}", s("started_at")),
        format!("finished  {}  ({} ms)", s("finished_at"), s("duration_ms")),
        format!(
            "tokens    {} total: input {}, output {}, cache write {}, cache read {}",
            s("total_tokens"),
            u("input_tokens"),
            u("output_tokens"),
            u("cache_creation_input_tokens"),
            u("cache_read_input_tokens")
        ),
        format!("cost      {}", s("cost_usd")),
        format!("turns     {}", s("num_turns")),
        format!("exit      {} (container {})", s("exit"), s("exit_code")),
        format!("prompt    sha256 {}", s("prompt_sha256")),
    ];
    if let Some(c) = record.get("changes").filter(|c| !c.is_null()) {
        out.push(format!(
            "changes   {} (patch sha256 {}; `logs --job {} --patch`)",
            c["summary"].as_str().unwrap_or("-"),
            c["patch"]["sha256"].as_str().unwrap_or("-"),
            s("job_id")
        ));
    }
    for k in ["error", "claude_error", "kill_reason", "terminal_reason"] {
        if record.get(k).is_some_and(|v| !v.is_null()) {
            out.push(format!("{k:<9} {}", s(k)));
        }
    }
    if let Some(r) = record.get("result").and_then(|v| v.as_str()) {
        out.push(String::new());
        out.push(r.to_string());
    }
    p.out(&out.join("\n"));
    Ok(Exit::Ok)
}
