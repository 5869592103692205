//! The runner image: build from a context (the one embedded in this binary,
//! or a directory), pull, and "make sure it is there" for `execute`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::query_parameters::{BuildImageOptions, CreateImageOptions};
use bollard::Docker;
use futures_util::StreamExt;

use super::{is_not_found, DockerError};

/// The runner image's build context, compiled into the binary so `docker
/// build` works from any directory an installed binary runs in.
pub const EMBEDDED_DOCKERFILE: &[u8] = include_bytes!("../../docker/Dockerfile");
pub const EMBEDDED_ENTRYPOINT: &[u8] = include_bytes!("../../docker/entrypoint.sh");

/// Lines of a failing step's output kept for the error message.
const KEEP_STEP_OUTPUT: usize = 40;

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
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(tar.into())));
    let mut step: Option<String> = None;
    let mut output: Vec<String> = Vec::new();
    let mut id = None;
    let fail = |step: Option<String>, output: Vec<String>, message: String| DockerError::Build {
        step,
        message: message.trim().to_string(),
        output,
    };
    while let Some(item) = stream.next().await {
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
                    output.clear();
                    progress.image_event(ImageEvent::Step(line));
                } else {
                    if let Some(rest) = line.strip_prefix("Successfully built ") {
                        id = Some(rest.trim().to_string());
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
    match id {
        Some(id) => Ok(id),
        None => {
            // No id reported: ask the engine whether the tag exists now.
            match docker.inspect_image(&req.tag).await {
                Ok(i) => Ok(i.id.unwrap_or_default()),
                Err(e) => Err(fail(step, output, format!("the build ended without an image ({e})"))),
            }
        }
    }
}

/// Pull an image, reporting per-layer progress.
pub async fn pull(docker: &Docker, image: &str, progress: &dyn ImageProgress) -> Result<(), DockerError> {
    let (name, tag) = split_tag(image);
    let options = CreateImageOptions {
        from_image: Some(name.to_string()),
        tag: Some(tag.to_string()),
        ..Default::default()
    };
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provenance {
    Present,
    Pulled,
    Built,
}

/// Make sure `image` exists. When `manage` (the configured default image),
/// a missing image is pulled, and where that fails built from the embedded
/// context; otherwise a missing image is an error naming how to build it.
pub async fn ensure(
    docker: &Docker,
    image: &str,
    manage: bool,
    label: &str,
    progress: &dyn ImageProgress,
) -> Result<Provenance, DockerError> {
    if exists(docker, image).await? {
        return Ok(Provenance::Present);
    }
    if !manage {
        return Err(DockerError::ImageMissing(image.to_string()));
    }
    progress.image_event(ImageEvent::Note(&format!("image `{image}` is not present; pulling it")));
    match pull(docker, image, progress).await {
        Ok(()) => return Ok(Provenance::Pulled),
        Err(e) => progress.image_event(ImageEvent::Note(&format!("{e}; building it from the embedded context"))),
    }
    let req = BuildRequest {
        tag: image.to_string(),
        no_cache: false,
        build_args: HashMap::new(),
        context: Context::Embedded,
    };
    build(docker, &req, label, progress).await?;
    Ok(Provenance::Built)
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

    #[test]
    fn tags_split_without_confusing_ports() {
        assert_eq!(split_tag("a/b:1"), ("a/b", "1"));
        assert_eq!(split_tag("reg:5000/a"), ("reg:5000/a", "latest"));
        assert_eq!(split_tag("a"), ("a", "latest"));
    }
}
