//! `audit`: an activity and compliance report built from the real log;
//! `audit verify` walks the hash chain (exit 5 on any break).

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::audit::Entry;
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
    /// Coordinator to ask (default: market.endpoint)
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
    let log = ctx.audit();
    // Settle a crash's torn tail first (itself a chained event); a real
    // break is reported by the walk below with its details.
    let recovered = log.recover();
    let (rep, signed) = log.verify_and_checkpoint()?;
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
        if let Err(e) = recovered {
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
    use crate::market::server::anchor;
    let endpoint = super::market::endpoint(ctx, args.endpoint)?;
    let log = ctx.audit();
    let id = crate::crypto::keys::Identity::load_or_generate(&ctx.paths, &log)?;
    log.recover()?;
    let (rep, cp) = log.verify_and_checkpoint()?;
    if !rep.ok {
        return Err(crate::audit::AuditError::Integrity(rep.problems.join("; ")).into());
    }
    let Some(cp) = cp.filter(|c| c.sig.is_some()) else {
        return Err(Failure::new(Exit::Failed, "no signed checkpoint to anchor").into());
    };
    let cosig = super::market::runtime()?.block_on(async {
        let client = crate::market::client::Client::connect(&endpoint, &id).await?;
        let rid = client.next_id();
        let ev = client.exchange(&rid, &anchor::encode_request(&rid, &cp)).await?;
        client.close();
        Ok::<_, crate::exit::Error>(ev)
    })?;
    let cosig: anchor::Cosignature = match cosig {
        crate::market::protocol::Event::Ok { result, .. } => serde_json::from_value(result)
            .map_err(|e| Failure::new(Exit::Failed, format!("the coordinator's cosignature is malformed: {e}")))?,
        crate::market::protocol::Event::Error { reason, message, .. } => {
            return Err(Failure::new(
                Exit::Failed,
                format!("the coordinator refused to anchor: {message} ({})", reason.as_str()),
            )
            .into())
        }
        other => return Err(Failure::new(Exit::Failed, format!("unexpected answer: {other:?}")).into()),
    };
    if !cosig.valid()
        || cosig.seq != cp.seq
        || cosig.hash != cp.hash
        || cosig.log_id != cp.log_id
        || cosig.node_id != id.node_id()
    {
        return Err(Failure::new(
            Exit::Integrity,
            "the coordinator's cosignature does not match the checkpoint sent",
        )
        .into());
    }
    log.add_anchor(&cosig)?;
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
    let head = ctx.audit().restart(&args.reason)?;
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

/// Report sections: which events belong where.
fn section(event: &str) -> Option<&'static str> {
    match event {
        e if e.starts_with("consent.") => Some("consent"),
        "job.approved" | "job.denied" => Some("approvals"),
        e if e.starts_with("job.") => Some("jobs"),
        e if e.starts_with("config.") => Some("config"),
        e if e.starts_with("key.") => Some("keys"),
        e if e.starts_with("market.") => Some("market"),
        e if e.starts_with("log.") => Some("log"),
        _ => None,
    }
}

fn tokens_of(e: &Entry) -> u64 {
    e.raw
        .get("usage")
        .and_then(|u| u.get("total_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn report(ctx: &Ctx, args: Args) -> Result<Exit> {
    let since = match &args.since {
        Some(s) => Some(timespec::parse_since(s, Utc::now()).map_err(Failure::usage)?),
        None => None,
    };
    let log = ctx.audit();
    let chain = log.verify()?;
    let checklist = compliance::parse_checklist("embedded", compliance::EMBEDDED_CHECKLIST)?;
    let comp = compliance::run(&ctx.paths, &checklist)?;
    let events: Vec<Entry> = log
        .entries()?
        .filter(|e| since.is_none_or(|s| DateTime::parse_from_rfc3339(&e.ts).is_ok_and(|t| t >= s)))
        .collect();

    let mut by_section: std::collections::BTreeMap<&str, Vec<&Entry>> = Default::default();
    for e in &events {
        if let Some(s) = section(&e.event) {
            by_section.entry(s).or_default().push(e);
        }
    }
    let count = |ev: &str| events.iter().filter(|e| e.event == ev).count();
    let jobs_finished = events
        .iter()
        .filter(|e| {
            e.event.starts_with("job.") && !matches!(e.event.as_str(), "job.approved" | "job.denied" | "job.started")
        })
        .count();
    let tokens: u64 = events.iter().map(tokens_of).sum();
    let summary = json!({
        "events": events.len(),
        "consent_granted": count("consent.granted"),
        "consent_revoked": count("consent.revoked"),
        "approvals": count("job.approved"),
        "denials": count("job.denied"),
        "jobs_started": count("job.started"),
        "jobs_finished": jobs_finished,
        "tokens": tokens,
        "config_changes": count("config.changed"),
    });
    let to_json = |e: &&Entry| json!({ "seq": e.seq, "ts": e.ts, "event": e.event, "fields": e.fields().map(|(k, v)| (k.clone(), v.clone())).collect::<serde_json::Map<_, _>>() });

    let text = match args.format {
        Format::Json => {
            let sections: serde_json::Map<String, Value> = by_section
                .iter()
                .map(|(k, v)| (k.to_string(), Value::Array(v.iter().map(to_json).collect())))
                .collect();
            let doc = crate::context::with_schema_version(json!({
                "generated_at": Utc::now(),
                "since": since,
                "summary": summary,
                "sections": sections,
                "chain": chain,
                "compliance": comp,
            }));
            serde_json::to_string_pretty(&doc).expect("JSON values serialise")
        }
        Format::Csv => {
            let mut w = String::from("section,seq,ts,event,details\n");
            for (s, list) in &by_section {
                for e in list {
                    let details = serde_json::to_string(&to_json(e)["fields"]).expect("JSON values serialise");
                    w.push_str(&format!("{s},{},{},{},{}\n", e.seq, e.ts, e.event, csv_field(&details)));
                }
            }
            w.push_str(&format!(
                "chain,,,{},{}\n",
                if chain.ok { "ok" } else { "broken" },
                csv_field(&chain.problems.join("; "))
            ));
            for r in &comp.results {
                w.push_str(&format!(
                    "compliance,,,{},{}\n",
                    r.id,
                    csv_field(&format!("{:?}: {}", r.level, r.message))
                ));
            }
            w
        }
        Format::Text => {
            let mut w = format!(
                "AUDIT REPORT  generated {}\n",
                Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            if let Some(s) = since {
                w.push_str(&format!("since {}\n", s.to_rfc3339()));
            }
            w.push_str(&format!(
                "\nSummary: {} events; consent granted {} / revoked {}; approvals {} / denials {}; jobs started {} / finished {}; {} tokens; {} config changes\n",
                summary["events"], summary["consent_granted"], summary["consent_revoked"], summary["approvals"], summary["denials"],
                summary["jobs_started"], summary["jobs_finished"], summary["tokens"], summary["config_changes"]
            ));
            for (title, key) in [
                ("Consent history", "consent"),
                ("Approvals and denials", "approvals"),
                ("Jobs", "jobs"),
                ("Config changes", "config"),
                ("Keys", "keys"),
                ("Market", "market"),
                ("Log", "log"),
            ] {
                let Some(list) = by_section.get(key) else { continue };
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
                if chain.ok {
                    format!("OK ({} events verify)", chain.events)
                } else {
                    format!("BROKEN: {}", chain.problems.join("; "))
                }
            ));
            w.push_str("\nCompliance checks\n");
            for r in &comp.results {
                w.push_str(&format!("  {:<8} {:<34} {}\n", r.level.name(), r.name, r.message));
            }
            w.push_str(&format!("\n{}\n", compliance::DISCLAIMER));
            w
        }
    };
    match &args.output {
        Some(path) => {
            crate::fsutil::atomic_write(path, text.as_bytes())
                .map_err(|e| Failure::new(Exit::Failed, format!("cannot write {}: {e}", path.display())))?;
            ctx.out().note(&format!("Wrote {}.", path.display()));
        }
        None => ctx.out().out(&text),
    }
    Ok(Exit::unless(chain.ok, Exit::Integrity))
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
