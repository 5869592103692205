//! `audit`: an activity and compliance report built from the real log;
//! `audit verify` walks the hash chain (exit 5 on any break).

use std::path::PathBuf;

use chrono::Utc;
use serde_json::{json, Value};

use crate::audit::{AuditLog, Entry};
use crate::audit_report::{self, Report};
use crate::compliance;
use crate::context::Ctx;
use crate::exit::{Exit, Failure, Result};
use crate::timespec;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Sub>,
    /// Report format
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Write the report to FILE instead of stdout
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Only events at or after T (RFC 3339, a local date, or an age like 7d)
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Walk the hash chain, check it against audit.head and the last signed checkpoint (exit 5 on any break), then sign a new checkpoint
    Verify,
    /// Have the market coordinator cosign this node's latest checkpoint (kept in audit.anchors)
    Anchor(AnchorArgs),
    /// Start a new log after audit.jsonl and audit.head were lost (the new genesis records the old checkpoint)
    Restart(RestartArgs),
}

#[derive(Debug, clap::Args)]
pub struct AnchorArgs {
    /// Coordinator to ask, or replicas as a comma-separated list tried in order (default: market.endpoint)
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RestartArgs {
    /// Confirm: the old log is gone and a new one starts
    #[arg(long)]
    pub yes: bool,
    /// Why (recorded in the new log's genesis)
    #[arg(long, value_name = "TEXT", default_value = "the previous log was lost")]
    pub reason: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Csv,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<Exit> {
    match args.command {
        Some(Sub::Verify) => verify(ctx),
        Some(Sub::Restart(a)) => restart(ctx, a),
        Some(Sub::Anchor(a)) => anchor(ctx, a),
        None => report(ctx, args),
    }
}

fn verify(ctx: &Ctx) -> Result<Exit> {
    let log = AuditLog::new(&ctx.paths);
    let checked = log.check()?;
    let (rep, signed) = (checked.report, checked.checkpoint);
    let p = ctx.out();
    if p.json {
        p.json(json!({ "ok": rep.ok, "report": rep, "new_checkpoint": signed }));
    } else if rep.ok {
        p.out(&format!(
            "audit chain OK: {} events, {} bytes, log id {}{}",
            rep.events,
            rep.bytes,
            rep.log_id.as_deref().unwrap_or("-"),
            if rep.recoveries > 0 {
                format!(", {} crash recoveries recorded", rep.recoveries)
            } else {
                String::new()
            }
        ));
        match &rep.checkpoint {
            Some(c) => p.out(&format!(
                "extends the last checkpoint: seq {} at {} ({})",
                c.seq,
                c.ts,
                match &c.node_id {
                    Some(n) => format!("signed by this node, {n}"),
                    None => "unsigned: the node had no key then".into(),
                }
            )),
            None => p.out("no earlier checkpoint to compare with"),
        }
        if let Some(a) = &rep.last_anchor {
            p.out(&format!(
                "{} witness anchor(s) hold; last: seq {} cosigned by {} at {}",
                rep.anchors, a.seq, a.witness, a.time
            ));
        }
        if let Some(c) = &signed {
            p.out(&format!(
                "new checkpoint: seq {} ({})",
                c.seq,
                if c.sig.is_some() {
                    "signed"
                } else {
                    "unsigned: this node has no key yet; `claude-max-market keys generate` makes one"
                }
            ));
        }
    } else {
        eprintln!("{} audit chain broken:", p.red(&p.bold("error:")));
        for prob in &rep.problems {
            eprintln!("  - {prob}");
        }
        if let Some(e) = checked.recovery {
            eprintln!("  - {e}");
        }
        eprintln!(
            "{} keep a copy of {} for investigation; new events are refused until it is restored",
            p.bold("hint:"),
            log.log_path().display()
        );
    }
    Ok(Exit::unless(rep.ok, Exit::Integrity))
}

/// `audit anchor`: verify, sign a checkpoint at the head, and have the
/// coordinator countersign it (docs/PROTOCOL.md, "anchor").
fn anchor(ctx: &Ctx, args: AnchorArgs) -> Result<Exit> {
    let endpoints =
        crate::market::client::Endpoints::resolve(args.endpoint, &ctx.config()?.settings().market.endpoint)?;
    let cosig = crate::runtime::current_thread()?.block_on(crate::market::anchor::anchor(&ctx.paths, &endpoints))?;
    let p = ctx.out();
    if p.json {
        p.json(json!({ "ok": true, "anchor": cosig }));
    } else {
        p.out(&format!(
            "checkpoint seq {} cosigned by witness {} at {}",
            cosig.seq, cosig.witness, cosig.time
        ));
    }
    Ok(Exit::Ok)
}

fn restart(ctx: &Ctx, args: RestartArgs) -> Result<Exit> {
    if !args.yes {
        return Err(Failure::usage("`audit restart` starts a new audit log and needs --yes")
            .hint("first try to restore audit.jsonl and audit.head from a backup; then run `claude-max-market audit restart --yes`")
            .into());
    }
    let head = AuditLog::new(&ctx.paths).restart(&args.reason)?;
    let p = ctx.out();
    if p.json {
        p.json(json!({ "ok": true, "log_id": head.log_id }));
    } else {
        p.out(&format!(
            "new audit log {} started; its genesis records the previous checkpoint",
            head.log_id
        ));
    }
    Ok(Exit::Ok)
}

fn report(ctx: &Ctx, args: Args) -> Result<Exit> {
    let since = match &args.since {
        Some(s) => Some(timespec::parse_since(s, Utc::now()).map_err(Failure::usage)?),
        None => None,
    };
    let r = audit_report::build(&ctx.paths, since)?;
    let text = match args.format {
        Format::Json => render_json(&r),
        Format::Csv => render_csv(&r),
        Format::Text => render_text(&r),
    };
    match &args.output {
        Some(path) => {
            crate::fsutil::atomic_write(path, text.as_bytes())
                .map_err(|e| Failure::new(Exit::Failed, format!("cannot write {}: {e}", path.display())))?;
            ctx.out().note(&format!("Wrote {}.", path.display()));
        }
        None => ctx.out().out(&text),
    }
    Ok(Exit::unless(r.chain.ok, Exit::Integrity))
}

fn entry_json(e: &Entry) -> Value {
    json!({ "seq": e.seq, "ts": e.ts, "event": e.event, "fields": e.fields().map(|(k, v)| (k.clone(), v.clone())).collect::<serde_json::Map<_, _>>() })
}

fn render_json(r: &Report) -> String {
    let sections: serde_json::Map<String, Value> = r
        .sections
        .iter()
        .map(|(k, v)| (k.to_string(), Value::Array(v.iter().map(entry_json).collect())))
        .collect();
    let doc = crate::context::with_schema_version(json!({
        "generated_at": r.generated_at,
        "since": r.since,
        "summary": r.summary,
        "sections": sections,
        "chain": r.chain,
        "compliance": r.compliance,
    }));
    serde_json::to_string_pretty(&doc).expect("JSON values serialise")
}

fn render_csv(r: &Report) -> String {
    let mut w = String::from("section,seq,ts,event,details\n");
    for (s, list) in &r.sections {
        for e in list {
            let details = serde_json::to_string(&entry_json(e)["fields"]).expect("JSON values serialise");
            w.push_str(&format!("{s},{},{},{},{}\n", e.seq, e.ts, e.event, csv_field(&details)));
        }
    }
    w.push_str(&format!(
        "chain,,,{},{}\n",
        if r.chain.ok { "ok" } else { "broken" },
        csv_field(&r.chain.problems.join("; "))
    ));
    for c in &r.compliance.results {
        w.push_str(&format!(
            "compliance,,,{},{}\n",
            c.id,
            csv_field(&format!("{:?}: {}", c.level, c.message))
        ));
    }
    w
}

fn render_text(r: &Report) -> String {
    let s = &r.summary;
    let mut w = format!(
        "AUDIT REPORT  generated {}\n",
        r.generated_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    if let Some(since) = r.since {
        w.push_str(&format!("since {}\n", since.to_rfc3339()));
    }
    w.push_str(&format!(
        "\nSummary: {} events; consent granted {} / revoked {}; approvals {} / denials {}; jobs started {} / finished {}; {} tokens; {} config changes\n",
        s.events, s.consent_granted, s.consent_revoked, s.approvals, s.denials,
        s.jobs_started, s.jobs_finished, s.tokens, s.config_changes
    ));
    for (key, title) in audit_report::SECTIONS {
        let Some(list) = r.sections.get(key) else { continue };
        w.push_str(&format!("\n{title} ({})\n", list.len()));
        for e in list {
            let fields: Vec<String> = e.fields().map(|(k, v)| format!("{k}={v}")).collect();
            w.push_str(&format!(
                "  {}  #{:<6} {:<18} {}\n",
                e.ts,
                e.seq,
                e.event,
                fields.join(" ")
            ));
        }
    }
    w.push_str(&format!(
        "\nChain: {}\n",
        if r.chain.ok {
            format!("OK ({} events verify)", r.chain.events)
        } else {
            format!("BROKEN: {}", r.chain.problems.join("; "))
        }
    ));
    w.push_str("\nCompliance checks\n");
    for c in &r.compliance.results {
        w.push_str(&format!("  {:<8} {:<34} {}\n", c.level.name(), c.name, c.message));
    }
    w.push_str(&format!("\n{}\n", compliance::DISCLAIMER));
    w
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
