//! The Docker Engine, through bollard: connection, the runner image (build
//! and pull with the context embedded in this binary, or registry-free from
//! the native Claude Code), the job container, and `clean`.
//!
//! Everything here is async; commands that need it start one current-thread
//! tokio runtime with [`runtime`], and commands that don't never pay for one.
//!
//! This file owns the connection, the error type and `health`'s probe; each
//! stage's logic lives in its own submodule, not here.

use std::time::Duration;

use bollard::Docker;

use crate::exit::{Exit, HasExit};

pub mod build;
pub mod clean;
pub mod container;
pub mod egress;
pub mod hardening;
pub mod image;
pub mod native;
pub mod profile;
pub mod relay;

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
    #[error("cannot set up the egress relay: {0}")]
    Relay(String),
    #[error("{0}")]
    Workspace(String),
    #[error(transparent)]
    Native(#[from] native::NativeError),
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
            DockerError::Relay(_) => Exit::Unavailable,
            DockerError::Workspace(_) => Exit::Failed,
            DockerError::Refused(_) => Exit::Refused,
            DockerError::Native(e) => e.exit(),
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
            DockerError::Native(e) => e.hint(),
            DockerError::Relay(_) => Some(
                "the relay lives in $XDG_RUNTIME_DIR/claude-max-market (or /tmp/claude-max-market-<uid>): it must be yours, writable, and visible to a local Docker engine".into(),
            ),
            _ => None,
        }
    }
}

/// Connect with local defaults (`DOCKER_HOST` or the Unix socket) and
/// negotiate the API version, so older engines (API 1.41) are spoken to
/// in their own version.
pub async fn connect() -> Result<Docker, DockerError> {
    connect_within(CONNECT_TIMEOUT).await
}

pub async fn connect_within(timeout: Duration) -> Result<Docker, DockerError> {
    let unreachable = |e: String| DockerError::Unreachable(e);
    match tokio::time::timeout(timeout, negotiate()).await {
        Ok(r) => r.map_err(unreachable),
        Err(_) => Err(unreachable(format!("no answer within {}s", timeout.as_secs()))),
    }
}

/// Negotiate like the docker CLI: one `/_ping`, whose `Api-Version` header
/// names the engine's API (1.41 on Docker 20.10); requests then use the
/// lower of that and ours. `/_ping` answers in about a millisecond, where
/// `/version` (bollard's `negotiate_version`) gathers system details first.
/// Non-Unix hosts use bollard's negotiation.
async fn negotiate() -> Result<Docker, String> {
    if let Some(path) = unix_socket() {
        if let Some((major, minor)) = ping_api_version(&path).await? {
            let ours = bollard::API_DEFAULT_VERSION;
            let version = if (major, minor) < (ours.major_version, ours.minor_version) {
                bollard::ClientVersion {
                    major_version: major,
                    minor_version: minor,
                }
            } else {
                *ours
            };
            return Docker::connect_with_unix(&path, 120, &version).map_err(|e| e.to_string());
        }
    }
    let docker = Docker::connect_with_local_defaults().map_err(|e| e.to_string())?;
    docker.negotiate_version().await.map_err(|e| e.to_string())
}

/// The engine's Unix socket, unless `DOCKER_HOST` names another transport.
fn unix_socket() -> Option<String> {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if h.starts_with("unix://") => Some(h.trim_start_matches("unix://").to_string()),
        Ok(h) if !h.is_empty() => None,
        _ => Some("/var/run/docker.sock".to_string()),
    }
}

/// `GET /_ping` over the socket; `Ok(None)` when the answer names no version.
async fn ping_api_version(path: &str) -> Result<Option<(usize, usize)>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| format!("cannot connect to {path}: {e}"))?;
    s.write_all(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while memchr::memmem::find(&buf, b"\r\n\r\n").is_none() && buf.len() < 16 * 1024 {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("the engine answered `{}` to a ping", status.trim()));
    }
    Ok(lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("api-version"))
        .and_then(|(_, v)| {
            let (major, minor) = v.trim().split_once('.')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        }))
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
    /// `Ok(API version in use)` or why the engine is unreachable.
    pub engine: Result<String, String>,
    /// `Some(present)` when the engine answered.
    pub image_present: Option<bool>,
    /// This install's running job containers, when the engine answered.
    pub running_jobs: Option<usize>,
}

/// Ask the engine for version, image and running jobs at once, within
/// `timeout` overall. Starts its own current-thread runtime.
pub fn probe(image: &str, scope: &container::Scope, timeout: Duration) -> Probe {
    let unreachable = |e: String| Probe {
        engine: Err(e),
        image_present: None,
        running_jobs: None,
    };
    let rt = match crate::runtime::current_thread() {
        Ok(rt) => rt,
        Err(e) => return unreachable(format!("cannot start the async runtime: {e}")),
    };
    rt.block_on(async {
        let work = async {
            let docker = connect_within(timeout).await.map_err(|e| match e {
                DockerError::Unreachable(m) => m,
                other => other.to_string(),
            })?;
            let profile = profile::container().map_err(|e| e.to_string())?;
            // The negotiation's ping proved the engine answers and named its
            // API version; `/version` would cost more than everything else.
            let v = docker.client_version();
            let (present, ours) = tokio::join!(
                image::exists(&docker, image),
                container::list_ours(&docker, profile, scope),
            );
            Ok::<_, String>(Probe {
                engine: Ok(format!("{}.{}", v.major_version, v.minor_version)),
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
