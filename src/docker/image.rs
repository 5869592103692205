//! The runner image: build from a context (the one embedded in this binary,
//! or a directory) or from the native Claude Code (`native`), pull, and
//! "make sure it is there" for `execute`.
//!
//! It owns choosing how an image is made and the Dockerfile build and pull.
//! It must not collect a native image's files (that is `native`'s) nor
//! parse the engine's build output itself (that is `build`'s).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::query_parameters::{BuildImageOptions, CreateImageOptions};
use bollard::Docker;
use futures_util::StreamExt;

use super::build::{run_build, EMBEDDED_DOCKERFILE, EMBEDDED_ENTRYPOINT, LONG_REQUEST};
use super::native::{self, NativeError};
use super::profile::Profile;
use super::{is_not_found, DockerError};
use crate::config::Config;

// Build progress, under the names the rest of the crate knows it by here.
pub use super::build::{ImageEvent, ImageProgress, Silent};

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
        let profile = super::super::profile::container().unwrap();
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
