//! The Docker Engine, through bollard: connection, the runner image (build
//! and pull with the context embedded in this binary), the job container,
//! and `clean`.
//!
//! Everything here is async; commands that need it start one current-thread
//! tokio runtime with [`runtime`], and commands that don't never pay for one.

use std::time::Duration;

use bollard::Docker;

use crate::exit::{Exit, HasExit};

pub mod clean;
pub mod container;
pub mod hardening;
pub mod image;

/// The engine must answer within this long, or it counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("the Docker engine is not reachable: {0}")]
    Unreachable(String),
    #[error("Docker engine error: {0}")]
    Api(#[from] bollard::errors::Error),
    #[error("image `{0}` is not present")]
    ImageMissing(String),
    #[error("image build failed{}: {message}", step.as_ref().map(|s| format!(" at `{s}`")).unwrap_or_default())]
    Build {
        step: Option<String>,
        message: String,
        output: Vec<String>,
    },
    #[error("cannot pull `{image}`: {message}")]
    Pull { image: String, message: String },
    #[error("cannot read build context {path}: {source}")]
    Context {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("security-config.json is invalid: {0}")]
    Profile(String),
    #[error("{0}")]
    Refused(String),
}

impl HasExit for DockerError {
    fn exit(&self) -> Exit {
        match self {
            DockerError::Unreachable(_)
            | DockerError::Api(_)
            | DockerError::ImageMissing(_)
            | DockerError::Pull { .. } => Exit::Unavailable,
            DockerError::Build { .. } => Exit::Failed,
            DockerError::Context { .. } => Exit::Usage,
            DockerError::Profile(_) => Exit::Integrity,
            DockerError::Refused(_) => Exit::Refused,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            DockerError::Unreachable(_) => Some(
                "start Docker (e.g. `sudo systemctl start docker`) and check that your user may use it (`docker version`)"
                    .into(),
            ),
            DockerError::ImageMissing(i) => Some(format!("build it with `claude-max-market docker build --tag {i}`")),
            DockerError::Build { .. } => Some("fix the failing step above, then run `claude-max-market docker build` again".into()),
            DockerError::Pull { .. } => Some("build it locally with `claude-max-market docker build`".into()),
            _ => None,
        }
    }
}

/// A current-thread runtime: one job needs no more, and it starts fast.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Connect with local defaults (`DOCKER_HOST` or the Unix socket) and
/// negotiate the API version, so older engines (API 1.41) are spoken to
/// in their own version.
pub async fn connect() -> Result<Docker, DockerError> {
    connect_within(CONNECT_TIMEOUT).await
}

pub async fn connect_within(timeout: Duration) -> Result<Docker, DockerError> {
    let docker = Docker::connect_with_local_defaults().map_err(|e| DockerError::Unreachable(e.to_string()))?;
    match tokio::time::timeout(timeout, docker.negotiate_version()).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(DockerError::Unreachable(e.to_string())),
        Err(_) => Err(DockerError::Unreachable(format!(
            "no answer within {}s",
            timeout.as_secs()
        ))),
    }
}

/// Is this bollard error a 404?
pub fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }
    )
}

/// What `health` learns from the engine, gathered concurrently.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `Ok((engine version, API version))` or why the engine is unreachable.
    pub engine: Result<(String, String), String>,
    /// `Some(present)` when the engine answered.
    pub image_present: Option<bool>,
    /// Our running job containers, when the engine answered.
    pub running_jobs: Option<usize>,
}

/// Ask the engine for version, image and running jobs at once, within
/// `timeout` overall. Starts its own current-thread runtime.
pub fn probe(image: &str, timeout: Duration) -> Probe {
    let unreachable = |e: String| Probe {
        engine: Err(e),
        image_present: None,
        running_jobs: None,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return unreachable(format!("cannot start the async runtime: {e}")),
    };
    rt.block_on(async {
        let work = async {
            let docker = connect_within(timeout).await.map_err(|e| match e {
                DockerError::Unreachable(m) => m,
                other => other.to_string(),
            })?;
            let profile = hardening::profile().map_err(|e| e.to_string())?;
            let (version, present, ours) = tokio::join!(
                docker.version(),
                image::exists(&docker, image),
                container::list_ours(&docker, &profile.label, &profile.job_label),
            );
            let v = version.map_err(|e| e.to_string())?;
            Ok::<_, String>(Probe {
                engine: Ok((v.version.unwrap_or_default(), v.api_version.unwrap_or_default())),
                image_present: present.ok(),
                running_jobs: ours.ok().map(|l| l.iter().filter(|c| c.running || c.starting).count()),
            })
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => unreachable(e),
            Err(_) => unreachable(format!("no answer within {} ms", timeout.as_millis())),
        }
    })
}
