//! `execute`: run one local job through the pipeline in [`crate::job`].

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::cli::progress::StderrProgress;
use crate::context::Ctx;
use crate::exit::{Exit, Failure};
use crate::job::{self, Approval, ApprovedBy, Cancel, JobError, JobSource, JobSpec, Status};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The prompt text
    #[arg(
        long,
        short = 'p',
        value_name = "T",
        required_unless_present = "file",
        conflicts_with = "file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file (`-` for stdin)
    #[arg(long, short = 'f', value_name = "F|-")]
    pub file: Option<PathBuf>,
    /// Claude Code model alias or id (default: `docker.model`, `sonnet`)
    #[arg(long, value_name = "M")]
    pub model: Option<String>,
    /// Stop the job once it has used this many tokens (at most `limits.maxTokensPerTask`)
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u64>,
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

pub fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let prompt = read_prompt(&args)?;
    let cfg = ctx.config()?;
    let mut spec = JobSpec::from_config(cfg, prompt, JobSource::Local);
    if let Some(m) = args.model {
        spec.model = m;
    }
    if let Some(n) = args.max_tokens {
        spec.max_tokens = n;
    }
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
    let progress = Arc::new(StderrProgress::new(ctx.out()));
    let rt = crate::docker::runtime()?;
    let outcome = rt.block_on(async {
        let (handle, cancel) = Cancel::new();
        // Registering the handlers replaces the default "die at once", so
        // Ctrl-C always goes through cleanup: container removed, reservation
        // settled, `job.cancelled` audited.
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            handle.cancel();
        });
        let p: Arc<dyn job::Progress> = progress.clone();
        anyhow::Ok(job::run(&ctx.paths, cfg, spec, approval, p, cancel).await)
    })?;
    // Do not wait for a blocking approval prompt Ctrl-C already answered:
    // everything the job needed finished inside `block_on`.
    rt.shutdown_background();
    progress.finish();
    let p = ctx.out();
    match outcome {
        Ok(record) => {
            if p.json {
                let mut v = serde_json::to_value(&record)?;
                if let Some(m) = v.as_object_mut() {
                    m.insert("ok".into(), json!(record.status == Status::Completed));
                }
                p.json(v);
            } else {
                if let Some(text) = record.result.as_deref().filter(|_| record.status == Status::Completed) {
                    p.out(text);
                }
                let summary = format!(
                    "job {}: {} tokens (in {}, out {}, cache {}+{}){} in {:.1} s",
                    record.job_id,
                    record.total_tokens,
                    record.usage.input_tokens,
                    record.usage.output_tokens,
                    record.usage.cache_creation_input_tokens,
                    record.usage.cache_read_input_tokens,
                    record.cost_usd.map(|c| format!(", ~${c:.4}")).unwrap_or_default(),
                    record.duration_ms as f64 / 1000.0
                );
                match record.status {
                    Status::Completed => p.note(&summary),
                    _ => {
                        eprintln!(
                            "{} job {} {}",
                            p.red(&p.bold("error:")),
                            record.job_id,
                            record.failure_message()
                        );
                        p.note(&summary);
                        eprintln!(
                            "{} see the record with `claude-max-market logs --job {}`",
                            p.bold("hint:"),
                            record.job_id
                        );
                    }
                }
            }
            Ok(record.exit)
        }
        Err(JobError::Cancelled) => {
            if p.json {
                p.json(json!({ "ok": false, "error": { "kind": "cancelled", "exit": 130, "message": "cancelled before the job started" } }));
            } else {
                eprintln!("cancelled before the job started; nothing ran");
            }
            Ok(130)
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

fn read_prompt(args: &Args) -> Result<Vec<u8>, Failure> {
    let bytes = match (&args.prompt, &args.file) {
        (Some(t), _) => t.clone().into_bytes(),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .map_err(|e| Failure::new(Exit::Failed, format!("cannot read the prompt from stdin: {e}")))?;
            b
        }
        (None, Some(f)) => {
            std::fs::read(f).map_err(|e| Failure::usage(format!("cannot read the prompt file {}: {e}", f.display())))?
        }
        (None, None) => return Err(Failure::usage("give a prompt with --prompt T or --file F")),
    };
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Failure::usage("the prompt is empty").hint("pass some text with --prompt or --file"));
    }
    Ok(bytes)
}
