//! What every image build shares, whatever its context: the embedded build
//! files, how progress is reported ([`ImageProgress`]), and following one
//! build request to its end ([`run_build`]).
//!
//! Both kinds of build use it: the Dockerfile build and pull (`image`) and
//! the build from the native Claude Code (`native`). It must not decide
//! what goes into a context or which kind of build to run, and it imports
//! neither of them.

use std::time::Instant;

use bollard::Docker;
use futures_util::{Stream, StreamExt};

use super::DockerError;

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

/// Tell the user something about the build.
pub(crate) fn note(progress: &dyn ImageProgress, text: impl AsRef<str>) {
    progress.image_event(ImageEvent::Note(text.as_ref()));
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
    stream: impl Stream<Item = Result<bollard::models::BuildInfo, bollard::errors::Error>>,
    mut upload: Option<Upload>,
    progress: &dyn ImageProgress,
) -> Result<Built, DockerError> {
    let started = Instant::now();
    let mut stream = std::pin::pin!(stream);
    let mut log = StepLog::default();
    while let Some(item) = next_item(&mut stream, &mut upload, progress, started).await {
        let info = match item {
            Ok(i) => i,
            Err(bollard::errors::Error::DockerStreamError { error }) => return Err(log.fail(error)),
            Err(e) => return Err(log.fail(e.to_string())),
        };
        log.feed(info, progress)?;
    }
    let id = match log.id.take() {
        Some(id) if id.starts_with("sha256:") => id,
        // The classic builder names a short id, or none at all: the tag
        // holds the whole one.
        _ => match docker.inspect_image(tag).await {
            Ok(i) => i.id.unwrap_or_default(),
            Err(e) => return Err(log.fail(format!("the build ended without an image ({e})"))),
        },
    };
    Ok(Built {
        id,
        steps: log.steps,
        cached: log.cached,
    })
}

/// The engine's next answer. While the context goes out, the engine says
/// nothing: meanwhile the bytes sent are reported, and once the upload is
/// over, how long it took.
async fn next_item<S: Stream + Unpin>(
    stream: &mut S,
    upload: &mut Option<Upload>,
    progress: &dyn ImageProgress,
    started: Instant,
) -> Option<S::Item> {
    loop {
        let Some(u) = upload.as_mut() else {
            return stream.next().await;
        };
        let sent = tokio::select! {
            biased;
            item = stream.next() => return item,
            changed = u.sent.changed() => changed.ok().map(|()| *u.sent.borrow_and_update()),
        };
        match sent {
            Some(sent) => progress.upload(sent, u.total.max(sent)),
            None => {
                let sent = *u.sent.borrow();
                *upload = None;
                note(
                    progress,
                    format!(
                        "sent {} in {:.1} s",
                        indicatif::HumanBytes(sent),
                        started.elapsed().as_secs_f64()
                    ),
                );
            }
        }
    }
}

/// What the build has said so far: the step under way and the tail of its
/// output (for the error, should it fail), the counts, the image id.
#[derive(Default)]
struct StepLog {
    step: Option<String>,
    output: Vec<String>,
    steps: usize,
    cached: usize,
    id: Option<String>,
}

impl StepLog {
    /// The build failed with `message`, at the current step.
    fn fail(&mut self, message: String) -> DockerError {
        DockerError::Build {
            step: self.step.take(),
            message: message.trim().to_string(),
            output: std::mem::take(&mut self.output),
        }
    }

    /// One answer of the engine: an error, output lines, or the image id.
    fn feed(&mut self, info: bollard::models::BuildInfo, progress: &dyn ImageProgress) -> Result<(), DockerError> {
        if let Some(e) = info.error.or(info.error_detail.and_then(|d| d.message)) {
            return Err(self.fail(e));
        }
        if let Some(text) = info.stream {
            for line in text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
                self.line(line, progress);
            }
        }
        if let Some(aux) = info.aux.and_then(|a| a.id) {
            self.id = Some(aux);
        }
        Ok(())
    }

    fn line(&mut self, line: &str, progress: &dyn ImageProgress) {
        if line.starts_with("Step ") {
            self.step = Some(line.to_string());
            self.steps += 1;
            // A base image is taken as it is, never rebuilt: the engine
            // says "Using cache" only for the steps after it.
            if line.split(" : ").nth(1).is_some_and(|i| i.starts_with("FROM ")) {
                self.cached += 1;
            }
            self.output.clear();
            progress.image_event(ImageEvent::Step(line));
            return;
        }
        if let Some(rest) = line.strip_prefix("Successfully built ") {
            self.id = Some(rest.trim().to_string());
        }
        if line.trim() == "---> Using cache" {
            self.cached += 1;
        }
        // The builder's own bookkeeping is not the step's output.
        let noise = line.trim_start().starts_with("---> ") || line.starts_with("Removing intermediate container");
        if !noise {
            if self.output.len() == KEEP_STEP_OUTPUT {
                self.output.remove(0);
            }
            self.output.push(line.to_string());
        }
        progress.image_event(ImageEvent::Output(line));
    }
}
