//! `docker build` / `docker pull` (also `docker:build`, `docker:pull`).

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::json;

use crate::cli::progress::StderrProgress;
use crate::context::Ctx;
use crate::docker::image::{self, BuildRequest, Context, ImageEvent, ImageProgress};
use crate::docker::{hardening, DockerError};
use crate::exit::Failure;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Build the Claude Code runner image (context embedded in this binary)
    Build(BuildArgs),
    /// Pull the runner image; build it locally if the pull fails
    Pull(PullArgs),
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Image tag (default: `docker.image`)
    #[arg(long, short = 't', value_name = "T")]
    pub tag: Option<String>,
    /// Do not use the build cache
    #[arg(long)]
    pub no_cache: bool,
    /// A build argument, e.g. CLAUDE_CODE_VERSION=2.0.37 (repeatable)
    #[arg(long, value_name = "K=V", value_parser = parse_kv)]
    pub build_arg: Vec<(String, String)>,
    /// Build this directory instead of the embedded context
    #[arg(long, value_name = "DIR")]
    pub context: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// Image to pull (default: `docker.image`)
    #[arg(long, short = 't', value_name = "T")]
    pub tag: Option<String>,
    /// Fail instead of building locally when the pull fails
    #[arg(long)]
    pub no_build_fallback: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not K=V")),
    }
}

pub fn run(ctx: &Ctx, args: Args) -> anyhow::Result<i32> {
    let cfg = ctx.config()?;
    let profile = hardening::profile()?;
    let progress = StderrProgress::new(ctx.out());
    let rt = crate::docker::runtime()?;
    let p = ctx.out();
    match args.command {
        Sub::Build(b) => {
            let context = match b.context {
                Some(dir) => Context::Dir(dir),
                None => Context::Embedded,
            };
            let req = BuildRequest {
                tag: b.tag.unwrap_or_else(|| crate::job::default_image(cfg)),
                no_cache: b.no_cache,
                build_args: b.build_arg.into_iter().collect::<HashMap<_, _>>(),
                context,
            };
            let result = rt.block_on(async {
                let docker = crate::docker::connect().await?;
                image::build(&docker, &req, &profile.image_label, &progress).await
            });
            progress.finish();
            let id = result.inspect_err(show_build_output)?;
            if p.json {
                p.json(json!({ "ok": true, "image": req.tag, "id": id, "built": true }));
            } else {
                p.out(&format!("Built `{}` ({})", req.tag, short(&id)));
            }
            Ok(0)
        }
        Sub::Pull(a) => {
            let tag = a.tag.unwrap_or_else(|| crate::job::default_image(cfg));
            let result: Result<(bool, Option<String>), DockerError> = rt.block_on(async {
                let docker = crate::docker::connect().await?;
                match image::pull(&docker, &tag, &progress).await {
                    Ok(()) => Ok((false, None)),
                    Err(e) if a.no_build_fallback => Err(e),
                    Err(e) => {
                        progress.image_event(ImageEvent::Note(&format!(
                            "{e}; building `{tag}` locally from the embedded context instead"
                        )));
                        let req = BuildRequest {
                            tag: tag.clone(),
                            no_cache: false,
                            build_args: HashMap::new(),
                            context: Context::Embedded,
                        };
                        let id = image::build(&docker, &req, &profile.image_label, &progress).await?;
                        Ok((true, Some(id)))
                    }
                }
            });
            progress.finish();
            let (built, id) = match result {
                Err(e @ DockerError::Pull { .. }) => {
                    return Err(anyhow::Error::new(e).context(Failure::new(
                        crate::exit::Exit::Unavailable,
                        format!("pull of `{tag}` failed and --no-build-fallback was given"),
                    )))
                }
                other => other.inspect_err(show_build_output)?,
            };
            if p.json {
                p.json(json!({ "ok": true, "image": tag, "pulled": !built, "built": built, "id": id }));
            } else if built {
                p.out(&format!(
                    "Pull failed; built `{tag}` locally instead ({})",
                    short(id.as_deref().unwrap_or(""))
                ));
            } else {
                p.out(&format!("Pulled `{tag}`"));
            }
            Ok(0)
        }
    }
}

fn short(id: &str) -> &str {
    let id = id.trim_start_matches("sha256:");
    &id[..id.len().min(12)]
}

/// A failed build shows the failing step's output before the error line.
fn show_build_output(e: &DockerError) {
    if let DockerError::Build { step, output, .. } = e {
        if let Some(s) = step {
            eprintln!("failed step: {s}");
        }
        for l in output {
            eprintln!("  {l}");
        }
    }
}
