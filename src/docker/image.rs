//! The runner image: build from a context (the one embedded in this binary,
//! or a directory) or from the native Claude Code ([`super::native`]),
//! pull, and "make sure it is there" for `execute`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bollard::query_parameters::{BuildImageOptions, CreateImageOptions};
use bollard::Docker;
use futures_util::StreamExt;

use super::hardening::Profile;
use super::native::{self, NativeError};
use super::{is_not_found, DockerError};
use crate::config::Config;

/// The runner image's build context, compiled into the binary so `docker
/// build` works from any directory an installed binary runs in.
pub const EMBEDDED_DOCKERFILE: &[u8] = include_bytes!("../../docker/Dockerfile");
pub const EMBEDDED_ENTRYPOINT: &[u8] = include_bytes!("../../docker/entrypoint.sh");

/// Lines of a failing step's output kept for the error message.
const KEEP_STEP_OUTPUT: usize = 40;

/// How long a build or pull may take. The connection's own timeout (two
/// minutes, meant for requests that answer at once) would cut a slow build
/// or a 400 MB context short; the user sees progress and can stop it.
pub(crate) const LONG_REQUEST: std::time::Duration = std::time::Duration::from_secs(3600);

/// Progress of a build or pull, for whoever displays it.
#[derive(Debug, Clone)]
pub enum ImageEvent<'a> {
    /// A build step started (`Step 3/8 : RUN ...`).
    Step(&'a str),
    /// Output of the current step.
    Output(&'a str),
    /// A pull's per-layer status.
    Layer {
        id: &'a str,
        status: &'a str,
        current: Option<i64>,
        total: Option<i64>,
    },
    /// Something to tell the user (pull failed, building instead, ...).
    Note(&'a str),
}

pub trait ImageProgress {
    fn image_event(&self, event: ImageEvent<'_>);
    /// `sent` of about `total` context bytes are on their way to the
    /// engine (a bar's worth; the lines that stay come as notes).
    fn upload(&self, _sent: u64, _total: u64) {}
}

/// Ignores all progress.
pub struct Silent;
impl ImageProgress for Silent {
    fn image_event(&self, _: ImageEvent<'_>) {}
}

/// Where the build context comes from.
#[derive(Debug, Clone)]
pub enum Context {
    Embedded,
    Dir(PathBuf),
}

#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub tag: String,
    pub no_cache: bool,
    pub build_args: HashMap<String, String>,
    pub context: Context,
}

/// The context as an uncompressed tar, in memory.
pub fn context_tar(context: &Context) -> Result<Vec<u8>, DockerError> {
    let mut b = tar::Builder::new(Vec::new());
    match context {
        Context::Embedded => {
            let mut add = |name: &str, bytes: &[u8], mode: u32| {
                let mut h = tar::Header::new_gnu();
                h.set_size(bytes.len() as u64);
                h.set_mode(mode);
                h.set_mtime(0);
                h.set_cksum();
                b.append_data(&mut h, name, bytes)
            };
            add("Dockerfile", EMBEDDED_DOCKERFILE, 0o644)
                .and_then(|_| add("entrypoint.sh", EMBEDDED_ENTRYPOINT, 0o755))
                .map_err(|source| DockerError::Context {
                    path: "<embedded>".into(),
                    source,
                })?;
        }
        Context::Dir(dir) => {
            let err = |source| DockerError::Context {
                path: dir.clone(),
                source,
            };
            if !dir.join("Dockerfile").is_file() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no Dockerfile in it",
                )));
            }
            // Symlinks are followed, so a context may link to shared files
            // (the test image links the real entrypoint.sh).
            b.follow_symlinks(true);
            b.append_dir_all(".", dir).map_err(err)?;
        }
    }
    b.into_inner().map_err(|source| DockerError::Context {
        path: "<tar>".into(),
        source,
    })
}

/// Build an image, reporting steps; returns the image id.
pub async fn build(
    docker: &Docker,
    req: &BuildRequest,
    label: &str,
    progress: &dyn ImageProgress,
) -> Result<String, DockerError> {
    let tar = context_tar(&req.context)?;
    let options = BuildImageOptions {
        t: Some(req.tag.clone()),
        nocache: req.no_cache,
        rm: true,
        forcerm: true,
        buildargs: Some(req.build_args.clone()),
        labels: Some(HashMap::from([(label.to_string(), "true".to_string())])),
        ..Default::default()
    };
    let docker = docker.clone().with_timeout(LONG_REQUEST);
    let stream = docker.build_image(options, None, Some(bollard::body_full(tar.into())));
    let built = run_build(&docker, &req.tag, stream, None, progress).await?;
    Ok(built.id)
}

/// A context being streamed: how much of it the body has handed over.
pub(crate) struct Upload {
    pub sent: tokio::sync::watch::Receiver<u64>,
    pub total: u64,
}

/// What the engine reported for a finished build.
pub(crate) struct Built {
    pub id: String,
    pub steps: usize,
    /// Steps answered from the build cache (a FROM counts: it is never
    /// rebuilt).
    pub cached: usize,
}

/// Follow one build request (`docker.build_image(..)`, for `tag`) to the
/// end, reporting the upload (when streamed) and every step.
pub(crate) async fn run_build(
    docker: &Docker,
    tag: &str,
    stream: impl futures_util::Stream<Item = Result<bollard::models::BuildInfo, bollard::errors::Error>>,
    mut upload: Option<Upload>,
    progress: &dyn ImageProgress,
) -> Result<Built, DockerError> {
    let started = Instant::now();
    let mut stream = std::pin::pin!(stream);
    let mut step: Option<String> = None;
    let mut output: Vec<String> = Vec::new();
    let (mut steps, mut cached) = (0, 0);
    let mut id = None;
    let fail = |step: Option<String>, output: Vec<String>, message: String| DockerError::Build {
        step,
        message: message.trim().to_string(),
        output,
    };
    enum Next<T> {
        Item(Option<T>),
        Sent(Option<u64>),
    }
    loop {
        // While the context goes out, the engine says nothing: show the bytes.
        let next = match upload.as_mut() {
            Some(u) => tokio::select! {
                biased;
                item = stream.next() => Next::Item(item),
                changed = u.sent.changed() => Next::Sent(changed.ok().map(|()| *u.sent.borrow_and_update())),
            },
            None => Next::Item(stream.next().await),
        };
        let item = match next {
            Next::Sent(Some(sent)) => {
                let total = upload.as_ref().map_or(sent, |u| u.total.max(sent));
                progress.upload(sent, total);
                continue;
            }
            Next::Sent(None) => {
                if let Some(u) = upload.take() {
                    let sent = *u.sent.borrow();
                    progress.image_event(ImageEvent::Note(&format!(
                        "sent {} in {:.1} s",
                        indicatif::HumanBytes(sent),
                        started.elapsed().as_secs_f64()
                    )));
                }
                continue;
            }
            Next::Item(None) => break,
            Next::Item(Some(item)) => item,
        };
        let info = match item {
            Ok(i) => i,
            Err(bollard::errors::Error::DockerStreamError { error }) => return Err(fail(step, output, error)),
            Err(e) => return Err(fail(step, output, e.to_string())),
        };
        if let Some(e) = info.error.or(info.error_detail.and_then(|d| d.message)) {
            return Err(fail(step, output, e));
        }
        if let Some(text) = info.stream {
            for line in text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
                if line.starts_with("Step ") {
                    step = Some(line.to_string());
                    steps += 1;
                    // A base image is taken as it is, never rebuilt: the
                    // engine says "Using cache" only for the steps after it.
                    if line.split(" : ").nth(1).is_some_and(|i| i.starts_with("FROM ")) {
                        cached += 1;
                    }
                    output.clear();
                    progress.image_event(ImageEvent::Step(line));
                } else {
                    if let Some(rest) = line.strip_prefix("Successfully built ") {
                        id = Some(rest.trim().to_string());
                    }
                    if line.trim() == "---> Using cache" {
                        cached += 1;
                    }
                    // The builder's own bookkeeping is not the step's output.
                    let noise =
                        line.trim_start().starts_with("---> ") || line.starts_with("Removing intermediate container");
                    if !noise {
                        if output.len() == KEEP_STEP_OUTPUT {
                            output.remove(0);
                        }
                        output.push(line.to_string());
                    }
                    progress.image_event(ImageEvent::Output(line));
                }
            }
        }
        if let Some(aux) = info.aux.and_then(|a| a.id) {
            id = Some(aux);
        }
    }
    let id = match id {
        Some(id) if id.starts_with("sha256:") => id,
        // The classic builder names a short id, or none at all: the tag
        // holds the whole one.
        _ => match docker.inspect_image(tag).await {
            Ok(i) => i.id.unwrap_or_default(),
            Err(e) => return Err(fail(step, output, format!("the build ended without an image ({e})"))),
        },
    };
    Ok(Built { id, steps, cached })
}

/// Pull an image, reporting per-layer progress.
pub async fn pull(docker: &Docker, image: &str, progress: &dyn ImageProgress) -> Result<(), DockerError> {
    let (name, tag) = split_tag(image);
    let options = CreateImageOptions {
        from_image: Some(name.to_string()),
        tag: Some(tag.to_string()),
        ..Default::default()
    };
    let docker = docker.clone().with_timeout(LONG_REQUEST);
    let mut stream = docker.create_image(Some(options), None, None);
    let err = |message: String| DockerError::Pull {
        image: image.to_string(),
        message,
    };
    while let Some(item) = stream.next().await {
        let info = match item {
            Ok(i) => i,
            Err(bollard::errors::Error::DockerStreamError { error }) => return Err(err(error)),
            Err(bollard::errors::Error::DockerResponseServerError { message, .. }) => return Err(err(message)),
            Err(e) => return Err(err(e.to_string())),
        };
        if let Some(e) = info.error.or(info.error_detail.and_then(|d| d.message)) {
            return Err(err(e));
        }
        let (current, total) = info
            .progress_detail
            .map(|p| (p.current, p.total))
            .unwrap_or((None, None));
        progress.image_event(ImageEvent::Layer {
            id: info.id.as_deref().unwrap_or(""),
            status: info.status.as_deref().unwrap_or(""),
            current,
            total,
        });
    }
    Ok(())
}

/// `name:tag` -> (name, tag); a registry port is not a tag.
pub fn split_tag(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => (image, "latest"),
    }
}

pub async fn exists(docker: &Docker, image: &str) -> Result<bool, DockerError> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The image's own entrypoint (empty when it has none).
pub async fn entrypoint(docker: &Docker, image: &str) -> Result<Vec<String>, DockerError> {
    match docker.inspect_image(image).await {
        Ok(i) => Ok(i.config.and_then(|c| c.entrypoint).unwrap_or_default()),
        Err(e) if is_not_found(&e) => Err(DockerError::ImageMissing(image.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// How `ensure` got the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    Present,
    Pulled,
    /// Built from a native Claude Code of this version.
    BuiltNative {
        version: String,
    },
    /// Built from the embedded Dockerfile.
    BuiltEmbedded,
}

/// Where a missing default image is built from when it cannot be pulled.
#[derive(Debug, Clone, Default)]
pub struct LocalBuild {
    /// `docker.claudeBinary`: this native Claude Code, else the one on
    /// `PATH`, else the embedded Dockerfile.
    pub claude_binary: Option<PathBuf>,
}

impl LocalBuild {
    pub fn from_config(cfg: &Config) -> LocalBuild {
        LocalBuild {
            claude_binary: cfg.settings().docker.claude_binary.as_deref().map(expand_home),
        }
    }
}

/// `~/x` -> `$HOME/x`, as a shell would have done for a flag.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// Make sure `image` exists. When `manage` is given (the configured default
/// image), a missing image is pulled, and where that fails built locally
/// ([`build_locally`]); otherwise a missing image is an error naming how to
/// build it.
pub async fn ensure(
    docker: &Docker,
    image: &str,
    manage: Option<&LocalBuild>,
    profile: &Profile,
    progress: &dyn ImageProgress,
) -> Result<Provenance, DockerError> {
    if exists(docker, image).await? {
        return Ok(Provenance::Present);
    }
    let Some(local) = manage else {
        return Err(DockerError::ImageMissing(image.to_string()));
    };
    progress.image_event(ImageEvent::Note(&format!("image `{image}` is not present; pulling it")));
    match pull(docker, image, progress).await {
        Ok(()) => return Ok(Provenance::Pulled),
        Err(e) => progress.image_event(ImageEvent::Note(&format!("{e}; building it locally"))),
    }
    build_locally(docker, image, local, profile, progress)
        .await
        .map(|(p, _)| p)
}

/// Build `tag` without a registry if we can: from `docker.claudeBinary`,
/// else from the native `claude` on `PATH`, else from the embedded
/// Dockerfile (which needs one). Says which, and why not the others.
/// Returns how it was built and the image id.
pub async fn build_locally(
    docker: &Docker,
    tag: &str,
    local: &LocalBuild,
    profile: &Profile,
    progress: &dyn ImageProgress,
) -> Result<(Provenance, String), DockerError> {
    let note = |text: String| progress.image_event(ImageEvent::Note(&text));
    let plan = match &local.claude_binary {
        Some(path) => {
            note(format!(
                "building it from the native Claude Code at {} (`docker.claudeBinary`)",
                path.display()
            ));
            let configured = |e| NativeError::Configured(Box::new(e));
            let claude = native::ClaudeBinary::inspect(path).await.map_err(configured)?;
            Some(
                native::Plan::collect(claude, None, profile, progress)
                    .await
                    .map_err(configured)?,
            )
        }
        None => match native::on_path() {
            Some(path) => match native::ClaudeBinary::inspect(&path).await {
                Ok(claude) => {
                    note(format!(
                        "building it from the native Claude Code {} on PATH ({})",
                        claude.version,
                        path.display()
                    ));
                    match native::Plan::collect(claude, None, profile, progress).await {
                        Ok(plan) => Some(plan),
                        Err(e) => {
                            note(format!("{e}; building it from the embedded context instead"));
                            None
                        }
                    }
                }
                Err(e) => {
                    note(format!(
                        "`claude` on PATH is not usable: {e}; building it from the embedded context"
                    ));
                    None
                }
            },
            None => {
                note(
                    "no native `claude` on PATH and no `docker.claudeBinary`; building it from the embedded context"
                        .to_string(),
                );
                None
            }
        },
    };
    match plan {
        Some(plan) => {
            let built = native::build(docker, &plan, tag, false, &profile.image_label, progress).await?;
            Ok((
                Provenance::BuiltNative {
                    version: plan.claude.version.clone(),
                },
                built.id,
            ))
        }
        None => {
            let req = BuildRequest {
                tag: tag.to_string(),
                no_cache: false,
                build_args: HashMap::new(),
                context: Context::Embedded,
            };
            let id = build(docker, &req, &profile.image_label, progress).await?;
            Ok((Provenance::BuiltEmbedded, id))
        }
    }
}

/// Does a directory look like a build context? (For early, clear errors.)
pub fn check_context_dir(dir: &Path) -> Result<(), DockerError> {
    context_tar(&Context::Dir(dir.to_path_buf())).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_context_has_dockerfile_and_entrypoint() {
        let tar = context_tar(&Context::Embedded).unwrap();
        let mut a = tar::Archive::new(&tar[..]);
        let names: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, vec!["Dockerfile", "entrypoint.sh"]);
    }

    /// The embedded Dockerfile as instructions (continuations joined,
    /// comments dropped), split into stages at each FROM.
    fn stages() -> Vec<Vec<(String, String)>> {
        let text = std::str::from_utf8(EMBEDDED_DOCKERFILE).unwrap();
        let mut joined = String::new();
        let mut lines = Vec::new();
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            match line.strip_suffix('\\') {
                Some(part) => joined.push_str(part),
                None => {
                    joined.push_str(line);
                    if !joined.trim().is_empty() {
                        lines.push(std::mem::take(&mut joined));
                    }
                    joined.clear();
                }
            }
        }
        let mut stages: Vec<Vec<(String, String)>> = Vec::new();
        for l in lines {
            let (op, rest) = l.trim().split_once(' ').unwrap();
            if op == "FROM" {
                stages.push(Vec::new());
            }
            let rest = rest.split_whitespace().collect::<Vec<_>>().join(" ");
            stages.last_mut().expect("FROM first").push((op.to_string(), rest));
        }
        stages
    }

    #[test]
    fn the_embedded_dockerfile_pins_the_native_claude_code_by_hash() {
        let stages = stages();
        assert_eq!(stages.len(), 2, "a fetch stage and the runner");
        let fetch: String = stages[0].iter().map(|(o, r)| format!("{o} {r}\n")).collect();
        assert!(fetch.contains("ARG CLAUDE_AGENT_SDK_VERSION=0.2.189"), "{fetch}");
        assert!(fetch.contains("b26a6a30a4e2cb025a6f5c95e1ce4469b38fcc51015c392f627bea7c948d67ad"));
        assert!(fetch.contains("a2df1f41bb00250992926420d0063f89b127cb81abdd284dbefb80c50ff1d026"));
        assert!(fetch.contains("--require-hashes") && fetch.contains("sha256sum -c"));
        assert!(!fetch.contains("npm "), "not the deprecated npm package");

        let run = &stages[1];
        let all = |op: &str| -> Vec<&str> { run.iter().filter(|(o, _)| o == op).map(|(_, r)| r.as_str()).collect() };
        let env = all("ENV").join(" ");
        let profile = super::super::hardening::profile().unwrap();
        for (k, v) in native::RUNNER_ENV {
            assert!(env.contains(&format!("{k}={v}")), "ENV {k}={v} missing: {env}");
        }
        assert!(env.contains(&format!("HOME={}", profile.home)));
        assert_eq!(all("USER"), [profile.user.as_str()]);
        assert_eq!(all("WORKDIR"), [profile.home.as_str()]);
        assert_eq!(all("ENTRYPOINT"), [r#"["/usr/local/bin/entrypoint.sh"]"#]);
        assert_eq!(all("CMD"), [r#"["sonnet"]"#]);
        assert_eq!(all("ARG"), ["CLAUDE_CODE_VERSION=2.1.332"]);
        assert_eq!(
            all("LABEL"),
            [format!("{}=$CLAUDE_CODE_VERSION", native::VERSION_LABEL).as_str()]
        );
        let runs = all("RUN").join("\n");
        for pkg in ["bash", "git", "ripgrep", "ca-certificates"] {
            assert!(runs.split_whitespace().any(|w| w == pkg), "{pkg} not installed: {runs}");
        }
        assert!(runs.contains("--uid 10001 --gid 10001 --home-dir /home/claude"));
        assert!(runs.contains("install -d -o 10001 -g 10001 -m 0755 /workspace"));
        assert!(all("COPY").contains(&"--from=fetch /claude /usr/local/bin/claude"));
        assert!(all("COPY").contains(&"entrypoint.sh /usr/local/bin/entrypoint.sh"));
    }

    #[test]
    fn tags_split_without_confusing_ports() {
        assert_eq!(split_tag("a/b:1"), ("a/b", "1"));
        assert_eq!(split_tag("reg:5000/a"), ("reg:5000/a", "latest"));
        assert_eq!(split_tag("a"), ("a", "latest"));
    }
}
