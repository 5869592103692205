//! `execute`: run one local job through the pipeline in [`crate::job`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::cli::progress::StderrProgress;
use crate::context::Ctx;
use crate::exit::{Exit, Failure, Result};
use crate::job::{self, Approval, ApprovedBy, Cancel, JobError, JobSource, JobSpec, Status};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The prompt text (at most 1 MiB, as with --file and stdin)
    #[arg(
        long,
        short = 'p',
        value_name = "T",
        required_unless_present = "file",
        conflicts_with = "file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file (`-` for stdin); at most 1 MiB
    /// (1,048,576 bytes): a larger input is refused (exit 2) after reading
    /// one byte past the limit
    #[arg(long, short = 'f', value_name = "F|-")]
    pub file: Option<PathBuf>,
    /// Claude Code model alias or id (default: `docker.model`, `sonnet`)
    #[arg(long, value_name = "M")]
    pub model: Option<String>,
    /// Stop the job once it has used this many fresh tokens: input, cache
    /// creation and output; cache reads apart (default and most: `limits.maxTokensPerTask`)
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u64>,
    /// Claude Code ends the job itself after N turns (default and most: `limits.maxTurnsPerTask`)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_turns: Option<u64>,
    /// Claude Code ends the job itself once it has cost X US dollars; also what
    /// the job reserves against the cost caps (default and most: `limits.maxCostPerTask`)
    #[arg(long, value_name = "X", value_parser = parse_budget)]
    pub max_budget_usd: Option<f64>,
    /// Claude Code's permission mode: default, acceptEdits, plan, bypassPermissions,
    /// dontAsk (default: `docker.permissionMode`, else `default`). `bypassPermissions`
    /// is allowed only because the job's container is the sandbox: no network but
    /// the Claude API, no host files, read-only root, no capabilities. It is
    /// audited with the job, and never used for market jobs
    #[arg(long, value_name = "MODE", value_parser = clap::builder::PossibleValuesParser::new(crate::config::PERMISSION_MODES))]
    pub permission_mode: Option<String>,
    /// Tools Claude Code may use without asking, e.g. "Read,Edit,Bash(git *)"
    #[arg(long, value_name = "LIST")]
    pub allowed_tools: Option<String>,
    /// Tools Claude Code may not use, e.g. "WebFetch,Bash(rm *)"
    #[arg(long, value_name = "LIST")]
    pub disallowed_tools: Option<String>,
    /// Copy this directory in as the job's working directory (never mounted:
    /// an archive of it, after `.gitignore` excludes, at most
    /// `docker.workspaceLimit`); its changes come back as a patch, saved with
    /// the job and shown by `logs --job ID --patch`. DIR is never touched
    /// without `--apply`
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// With `--workspace`: also copy `.git` (left out by default). Changes
    /// the job makes there (hooks included) come back with the rest
    #[arg(long, requires = "workspace")]
    pub include_git: bool,
    /// With `--workspace`: apply the job's patch to DIR once it completes,
    /// only if DIR has not changed since the copy (else refuse, exit 3, and
    /// keep the patch)
    #[arg(long, requires = "workspace")]
    pub apply: bool,
    /// What stdout carries: `text` (the answer), `json` (the job record, like
    /// `--json`) or `stream-json` (Claude Code's own events, unchanged, one per line)
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = OutputFormat::Text)]
    pub output_format: OutputFormat,
    /// Kill the job after S seconds (default: `docker.timeout`)
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: Option<u64>,
    /// Approve this job without asking
    #[arg(long)]
    pub approve_all: bool,
    /// Run in this image instead of `docker.image` (not pulled or built automatically)
    #[arg(long, value_name = "I")]
    pub image: Option<String>,
}

/// What `execute` prints on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
    StreamJson,
}

fn parse_budget(s: &str) -> Result<f64, String> {
    let x = crate::config::parse_usd(s)?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err("the budget must be above 0".into())
    }
}

pub fn run(ctx: &Ctx, args: Args) -> Result<Exit> {
    let prompt = read_prompt(&args)?;
    let cfg = ctx.config()?;
    let mut spec = JobSpec::from_config(cfg, prompt, JobSource::Local);
    if let Some(m) = args.model {
        spec.model = m;
    }
    if let Some(n) = args.max_tokens {
        spec.max_tokens = n;
    }
    if let Some(n) = args.max_turns {
        spec.max_turns = n;
    }
    if let Some(x) = args.max_budget_usd {
        spec.max_budget_usd = Some(x);
    }
    if let Some(m) = args.permission_mode {
        spec.permission_mode = Some(m);
    }
    spec.allowed_tools = args.allowed_tools;
    spec.disallowed_tools = args.disallowed_tools;
    spec.workspace = args.workspace.map(|dir| job::WorkspaceSpec {
        dir,
        include_git: args.include_git,
        apply: args.apply,
        exact: false,
    });
    if let Some(s) = args.timeout {
        spec.timeout = Duration::from_secs(s);
    }
    if let Some(i) = args.image {
        spec.image = i;
    }
    let approval = if args.approve_all {
        Approval::PreApproved(ApprovedBy::ApproveAll)
    } else {
        Approval::AskOnTty
    };
    let format = if ctx.out().json {
        OutputFormat::Json
    } else {
        args.output_format
    };
    let progress = Arc::new(StderrProgress::new(ctx.out()).stream_to_stdout(format == OutputFormat::StreamJson));
    let rt = crate::runtime::current_thread()?;
    let outcome = rt.block_on(async {
        let (handle, cancel) = Cancel::new();
        // Registering the handlers replaces the default "die at once", so
        // Ctrl-C always goes through cleanup: container removed, reservation
        // settled, `job.cancelled` audited.
        let stop = crate::runtime::shutdown_signal()?;
        tokio::spawn(async move {
            stop.await;
            handle.cancel();
        });
        let p: Arc<dyn job::Progress> = progress.clone();
        Ok::<_, crate::exit::Error>(job::run(&ctx.paths, cfg, spec, approval, p, cancel).await)
    })?;
    // Do not wait for a blocking approval prompt Ctrl-C already answered:
    // everything the job needed finished inside `block_on`.
    rt.shutdown_background();
    progress.finish();
    let p = ctx.out();
    match outcome {
        Ok(record) => {
            let ok = record.status == Status::Completed;
            match format {
                OutputFormat::Json => {
                    let mut v = serde_json::to_value(&record)?;
                    if let Some(m) = v.as_object_mut() {
                        m.insert("ok".into(), json!(ok));
                    }
                    p.json(v);
                }
                OutputFormat::Text => {
                    if let Some(text) = record.result.as_deref().filter(|_| ok) {
                        p.out(text);
                    }
                }
                // Claude Code's own events already went out as they came.
                OutputFormat::StreamJson => {}
            }
            if format != OutputFormat::Json {
                report_on_stderr(p, &record);
            }
            Ok(record.exit)
        }
        Err(JobError::Cancelled) => {
            if format == OutputFormat::Json {
                p.json(json!({ "ok": false, "error": { "kind": "cancelled", "exit": Exit::Interrupted.code(), "message": "cancelled before the job started" } }));
            } else {
                eprintln!("cancelled before the job started; nothing ran");
            }
            Ok(Exit::Interrupted)
        }
        Err(JobError::Docker(e @ crate::docker::DockerError::Build { .. })) => {
            if let crate::docker::DockerError::Build { output, .. } = &e {
                for l in output {
                    eprintln!("  {l}");
                }
            }
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// The summary line, and for a job that did not complete, why in one line
/// (Claude Code's own words included) and what to do.
fn report_on_stderr(p: &crate::context::Printer, record: &job::JobRecord) {
    let summary = format!(
        "job {}: {} fresh tokens (in {}, cache write {}, out {}) + {} cache reads{}, {} turn(s) in {:.1} s",
        record.job_id,
        record.fresh_tokens,
        record.usage.input_tokens,
        record.usage.cache_creation_input_tokens,
        record.usage.output_tokens,
        record.usage.cache_read_input_tokens,
        record
            .cost_usd
            .map(|c| format!(", {}${c:.4}", if record.cost_estimated { "~" } else { "" }))
            .unwrap_or_default(),
        record.num_turns,
        record.duration_ms as f64 / 1000.0
    );
    if let Some(w) = &record.workspace {
        workspace_on_stderr(p, record, w);
    }
    if record.status == Status::Completed {
        p.note(&summary);
        return;
    }
    eprintln!(
        "{} job {} {}",
        p.red(&p.bold("error:")),
        record.job_id,
        record.failure_message()
    );
    p.note(&summary);
    if let Some(h) = record.failure_hint() {
        eprintln!("{} {h}", p.bold("hint:"));
    }
}

fn workspace_on_stderr(p: &crate::context::Printer, record: &job::JobRecord, w: &job::WorkspaceReport) {
    if let Some(c) = &record.changes {
        let summary = c["summary"].as_str().unwrap_or("changes");
        match &w.patch {
            Some(path) => p.note(&format!("workspace: {summary}; patch saved to {}", path.display())),
            None => p.note(&format!("workspace: {summary}")),
        }
    }
    if let Some(e) = &w.error {
        p.warn(&format!("workspace: {e}"));
    }
    if let Some(a) = &w.applied {
        p.note(&format!("workspace: {} in {}", a.summary(), w.dir.display()));
    }
    if let Some(e) = &w.apply_error {
        eprintln!("{} workspace: {e}", p.red(&p.bold("error:")));
        if let Some(path) = &w.patch {
            eprintln!(
                "{} the patch is kept at {}; apply it yourself with `git apply` once you have checked it",
                p.bold("hint:"),
                path.display()
            );
        }
    }
}

fn read_prompt(args: &Args) -> Result<Vec<u8>, Failure> {
    read_prompt_from(args.prompt.as_deref(), args.file.as_deref())
}

/// The prompt of `execute` or `bid`: the text, or a file's bytes (`-`:
/// stdin), never more than [`job::MAX_PROMPT_BYTES`], and not blank.
pub fn read_prompt_from(text: Option<&str>, file: Option<&std::path::Path>) -> Result<Vec<u8>, Failure> {
    let limit = job::MAX_PROMPT_BYTES as u64;
    let too_large = |from: &str| {
        Failure::usage(format!(
            "the prompt {from} is larger than the limit of {} ({limit} bytes)",
            crate::fsutil::human_bytes(limit)
        ))
        .hint("shorten it, or put the material in a directory and pass `--workspace DIR`")
    };
    let bytes = match (text, file) {
        (Some(t), _) => {
            if t.len() as u64 > limit {
                return Err(too_large("given with --prompt"));
            }
            t.as_bytes().to_vec()
        }
        (None, Some(f)) if f.as_os_str() == "-" => match crate::fsutil::read_capped(std::io::stdin().lock(), limit) {
            Ok(b) => b,
            Err(crate::fsutil::ReadCapError::TooLarge { .. }) => return Err(too_large("on stdin")),
            Err(e) => {
                return Err(Failure::new(
                    Exit::Failed,
                    format!("cannot read the prompt from stdin: {e}"),
                ))
            }
        },
        (None, Some(f)) => match crate::fsutil::read_file_capped(f, limit) {
            Ok(b) => b,
            Err(crate::fsutil::ReadCapError::TooLarge { .. }) => {
                return Err(too_large(&format!("file {}", f.display())))
            }
            Err(e) => {
                return Err(Failure::usage(format!(
                    "cannot read the prompt file {}: {e}",
                    f.display()
                )))
            }
        },
        (None, None) => return Err(Failure::usage("give a prompt with --prompt T or --file F")),
    };
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Failure::usage("the prompt is empty").hint("pass some text with --prompt or --file"));
    }
    Ok(bytes)
}
