//! `opt-in`: show the terms, record consent (terms version + hash, time, job
//! types, caps). Interactive on a terminal; scripts pass `--accept-terms`.

use serde_json::{json, Value};

use crate::config::{self, Config};
use crate::consent::{self, Consent, JOB_LOCAL, JOB_MARKET};
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
    let mut caps: Vec<(&str, Value)> = Vec::new();
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

    let mut job_types = vec![JOB_LOCAL.to_string()];
    if claude_jobs {
        job_types.push(JOB_MARKET.to_string());
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let record = Consent {
        accepted: true,
        terms_version: Some(legal::TERMS_VERSION.into()),
        terms_sha256: Some(legal::terms_sha256()),
        accepted_at: Some(now),
        job_types: job_types.clone(),
        revoked_at: None,
    };
    ctx.preflight_audit()?;
    // Write-ahead (`crate::txn`): `consent.granted` is logged before the
    // consent is stored, so a crash cannot leave consent unrecorded.
    crate::txn::edit_audited(
        &ctx.paths,
        |file| Ok(consent::set_with_caps(file, &record, &caps)),
        |p| {
            let cfg = crate::config::Config::from_file_object(&ctx.paths, p.file.clone())?;
            let caps_now = json!({
                "dailyTasks": cfg.settings().limits.daily_tasks,
                "maxTokensPerTask": cfg.settings().limits.max_tokens_per_task,
            });
            Ok(vec![(
                "consent.granted".to_string(),
                json!({
                    "terms_version": legal::TERMS_VERSION,
                    "terms_sha256": legal::terms_sha256(),
                    "job_types": job_types,
                    "caps": caps_now,
                    "interactive": interactive,
                    "changes": p.out.iter().map(|(k, o, n)| json!({"key": k, "old": o, "new": n})).collect::<Vec<_>>(),
                }),
            )])
        },
    )?;
    ctx.reload_config();
    let cfg = ctx.config()?;
    let caps_now = json!({
        "dailyTasks": cfg.settings().limits.daily_tasks,
        "maxTokensPerTask": cfg.settings().limits.max_tokens_per_task,
    });

    let p = ctx.out();
    if p.json {
        p.json(json!({ "ok": true, "consent": record, "caps": caps_now }));
    } else {
        p.out(&format!(
            "Opted in: terms {} accepted; job types: {}; caps: {} jobs/day, {} tokens/job.",
            legal::TERMS_VERSION,
            job_types.join(", "),
            caps_now["dailyTasks"],
            caps_now["maxTokensPerTask"]
        ));
        p.note("Change caps with `claude-max-market limits`; revoke with `claude-max-market opt-out`.");
    }
    Ok(Exit::Ok)
}
