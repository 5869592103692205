//! `docker build` / `docker pull` (also `docker:build`, `docker:pull`): the
//! arguments, one call into `crate::docker` per subcommand, and rendering
//! its result. It must not decide how an image is made; `docker::image`
//! and `docker::native` do.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::cli::progress::StderrProgress;
use crate::config::Config;
use crate::context::{Ctx, Printer};
use crate::docker::hardening::{self, Profile};
use crate::docker::image::{self, BuildRequest, Context, ImageEvent, ImageProgress, LocalBuild, Provenance};
use crate::docker::native::{self, ClaudeBinary, ExtraCa};
use crate::docker::DockerError;
use crate::exit::{Exit, Failure, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Build the Claude Code runner image (context embedded in this binary,
    /// or registry-free from your native Claude Code with --claude-binary)
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
    /// A build argument of the embedded Dockerfile, e.g.
    /// CLAUDE_AGENT_SDK_VERSION=0.2.189 (repeatable)
    #[arg(long, value_name = "K=V", value_parser = parse_kv)]
    pub build_arg: Vec<(String, String)>,
    /// Build this directory instead of the embedded context
    #[arg(long, value_name = "DIR", conflicts_with = "claude_binary")]
    pub context: Option<PathBuf>,
    /// Build FROM scratch with this native Claude Code binary and this
    /// host's shells and libraries: no registry, no network
    #[arg(long, value_name = "PATH", conflicts_with = "build_arg")]
    pub claude_binary: Option<PathBuf>,
    /// A PEM CA certificate Claude Code should trust (NODE_EXTRA_CA_CERTS),
    /// e.g. a TLS-inspecting proxy's
    #[arg(long, value_name = "FILE", requires = "claude_binary")]
    pub extra_ca: Option<PathBuf>,
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

pub fn run(ctx: &Ctx, args: Args) -> Result<Exit> {
    let cfg = ctx.config()?;
    let build = Build {
        cfg,
        profile: hardening::profile()?,
        progress: BuildProgress::new(ctx.out()),
        rt: crate::runtime::current_thread()?,
        p: ctx.out(),
    };
    match args.command {
        Sub::Build(b) if b.claude_binary.is_some() => build.native(b),
        Sub::Build(b) => build.dockerfile(b),
        Sub::Pull(a) => build.pull(a),
    }
}

/// What every subcommand works with.
struct Build<'a> {
    cfg: &'a Config,
    profile: &'static Profile,
    progress: BuildProgress,
    rt: tokio::runtime::Runtime,
    p: &'a Printer,
}

impl Build<'_> {
    /// `docker build --claude-binary`: from the native Claude Code.
    fn native(&self, b: BuildArgs) -> Result<Exit> {
        let tag = b.tag.unwrap_or_else(|| crate::job::default_image(self.cfg));
        let (binary, extra_ca) = (b.claude_binary.unwrap_or_default(), b.extra_ca);
        let (profile, progress) = (self.profile, &self.progress);
        // Inputs first: a bad path or CA is reported before the engine is
        // even asked.
        let result = self.rt.block_on(async {
            let claude = ClaudeBinary::inspect(&binary).await?;
            let ca = extra_ca.as_deref().map(ExtraCa::read).transpose()?;
            let plan = native::Plan::collect(claude, ca, profile, progress).await?;
            let docker = crate::docker::connect().await?;
            let built = native::build(&docker, &plan, &tag, b.no_cache, &profile.image_label, progress).await?;
            Ok::<_, DockerError>((plan, built))
        });
        self.progress.finish();
        let (plan, built) = result.inspect_err(show_build_output)?;
        render_native(self.p, &tag, &plan, &built);
        Ok(Exit::Ok)
    }

    /// `docker build [--context DIR]`: the embedded Dockerfile or a directory.
    fn dockerfile(&self, b: BuildArgs) -> Result<Exit> {
        let context = match b.context {
            Some(dir) => Context::Dir(dir),
            None => Context::Embedded,
        };
        let req = BuildRequest {
            tag: b.tag.unwrap_or_else(|| crate::job::default_image(self.cfg)),
            no_cache: b.no_cache,
            build_args: b.build_arg.into_iter().collect::<HashMap<_, _>>(),
            context,
        };
        let result = self.rt.block_on(async {
            let docker = crate::docker::connect().await?;
            image::build(&docker, &req, &self.profile.image_label, &self.progress).await
        });
        self.progress.finish();
        let id = result.inspect_err(show_build_output)?;
        if self.p.json {
            self.p
                .json(json!({ "ok": true, "image": req.tag, "id": id, "built": true }));
        } else {
            self.p.out(&format!("Built `{}` ({})", req.tag, short(&id)));
        }
        Ok(Exit::Ok)
    }

    /// `docker pull`: and a local build where the pull fails, unless told not to.
    fn pull(&self, a: PullArgs) -> Result<Exit> {
        let tag = a.tag.unwrap_or_else(|| crate::job::default_image(self.cfg));
        let local = LocalBuild::from_config(self.cfg);
        let (profile, progress) = (self.profile, &self.progress);
        let result: Result<Option<(Provenance, String)>, DockerError> = self.rt.block_on(async {
            let docker = crate::docker::connect().await?;
            match image::pull(&docker, &tag, progress).await {
                Ok(()) => Ok(None),
                Err(e) if a.no_build_fallback => Err(e),
                Err(e) => {
                    progress.image_event(ImageEvent::Note(&format!("{e}; building `{tag}` locally instead")));
                    image::build_locally(&docker, &tag, &local, profile, progress)
                        .await
                        .map(Some)
                }
            }
        });
        self.progress.finish();
        let built = match result {
            Err(e @ DockerError::Pull { .. }) => {
                return Err(crate::exit::Error::from(e).within(Failure::new(
                    crate::exit::Exit::Unavailable,
                    format!("pull of `{tag}` failed and --no-build-fallback was given"),
                )))
            }
            other => other.inspect_err(show_build_output)?,
        };
        render_pull(self.p, &tag, built.as_ref());
        Ok(Exit::Ok)
    }
}

fn render_native(p: &Printer, tag: &str, plan: &native::Plan, built: &native::NativeImage) {
    if p.json {
        p.json(json!({
            "ok": true,
            "image": tag,
            "id": built.id,
            "built": true,
            "source": "native",
            "claude_binary": plan.claude.file,
            "claude_version": plan.claude.version,
            "claude_sha256": built.claude_sha256,
            "tools": plan.tools,
            "libraries": plan.libraries,
            "busybox_applets": plan.busybox_applets,
            "ca_bundle": plan.ca_bundle,
            "extra_ca": plan.extra_ca.as_ref().map(|c| json!({
                "path": c.path,
                "subjects": c.subjects,
                "image_path": native::EXTRA_CA_PATH,
            })),
            "bytes": built.bytes,
            "steps": built.steps,
            "cached_steps": built.cached,
        }));
    } else {
        p.out(&format!(
            "Built `{tag}` ({}) from Claude Code {}: {} libraries, {} sent, {}/{} steps from cache",
            short(&built.id),
            plan.claude.version,
            plan.libraries.len(),
            indicatif::HumanBytes(built.bytes),
            built.cached,
            built.steps
        ));
    }
}

/// `built`: `None` when the pull worked, else how the image was built.
fn render_pull(p: &Printer, tag: &str, built: Option<&(Provenance, String)>) {
    let source = |p: &Provenance| match p {
        Provenance::BuiltNative { .. } => "native",
        _ => "embedded",
    };
    match built {
        _ if p.json => p.json(json!({
            "ok": true,
            "image": tag,
            "pulled": built.is_none(),
            "built": built.is_some(),
            "id": built.map(|(_, id)| id),
            "source": built.map(|(p, _)| source(p)),
            "claude_version": built.and_then(|(p, _)| match p {
                Provenance::BuiltNative { version } => Some(version),
                _ => None,
            }),
        })),
        Some((Provenance::BuiltNative { version }, id)) => p.out(&format!(
            "Pull failed; built `{tag}` locally from Claude Code {version} ({})",
            short(id)
        )),
        Some((_, id)) => p.out(&format!("Pull failed; built `{tag}` locally instead ({})", short(id))),
        None => p.out(&format!("Pulled `{tag}`")),
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

/// Image progress for these commands: what the job pipeline shows, plus
/// every build step as a line when stderr is not a terminal, and a bar for
/// the bytes sent to the engine when it is.
struct BuildProgress {
    inner: StderrProgress,
    quiet: bool,
    tty: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl BuildProgress {
    fn new(printer: &Printer) -> BuildProgress {
        BuildProgress {
            inner: StderrProgress::new(printer),
            quiet: printer.quiet,
            tty: std::io::stderr().is_terminal() && !printer.quiet,
            bar: Mutex::new(None),
        }
    }

    fn end_bar(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }

    fn finish(&self) {
        self.end_bar();
        self.inner.finish();
    }
}

impl ImageProgress for BuildProgress {
    fn image_event(&self, event: ImageEvent<'_>) {
        match event {
            ImageEvent::Step(s) if !self.tty => {
                if !self.quiet {
                    eprintln!("{s}");
                }
            }
            ImageEvent::Note(n) => {
                self.end_bar();
                self.inner.image_event(ImageEvent::Note(n));
            }
            other => self.inner.image_event(other),
        }
    }

    fn upload(&self, sent: u64, total: u64) {
        if !self.tty {
            return;
        }
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        let bar = bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("sending context {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        bar.set_length(total);
        bar.set_position(sent);
    }
}
