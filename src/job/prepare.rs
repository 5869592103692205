//! Stages 4-5 of a job: the credential (read at run time, never stored),
//! the image (auto-managed when it is the configured default) and, for
//! restricted egress, this job's own proxy and the relay that reaches it.

use std::sync::Arc;

use super::admit::{Admitted, EngineProbe};
use super::{default_image, joined, Cancel, JobError, Progress};
use crate::claude::credentials::{self, Credential};
use crate::config::Config;
use crate::docker::egress::{self, Proxy};
use crate::docker::hardening;
use crate::docker::image::{self, Provenance};
use crate::docker::{relay, DockerError};

/// What a job needs to start.
pub(super) struct Prepared {
    pub credential: Credential,
    pub docker: bollard::Docker,
    /// The job's proxy and the relay setup that leads to it (restricted
    /// egress only).
    pub proxy: Option<(Proxy, hardening::RelaySetup)>,
}

pub(super) async fn prepare(
    cfg: &Config,
    admitted: &Admitted,
    engine: EngineProbe,
    progress: &Arc<dyn Progress>,
    cancel: &Cancel,
) -> Result<Prepared, JobError> {
    let (spec, job_id, resources, profile) = (&admitted.spec, &admitted.job_id, &admitted.resources, admitted.profile);
    // 4. Credentials (may run the user's tokenCommand).
    let mut notes = Vec::new();
    let credential = credentials::resolve(cfg, &mut notes)?;
    for n in &notes {
        progress.note(n);
    }
    // 5. The image: auto-managed when it is the configured default.
    let (docker, present) = engine.await.map_err(joined)??;
    if !present {
        let manage = spec.image == default_image(cfg);
        let ensured = tokio::select! {
            r = image::ensure(&docker, &spec.image, manage, &profile.image_label, progress.as_ref()) => r,
            _ = cancel.cancelled() => return Err(JobError::Cancelled),
        };
        let _: Provenance = ensured?;
    }
    // 5b. Restricted egress: this job's own proxy on a Unix socket,
    // allowing only what this credential kind needs, and the relay that
    // carries the container's HTTPS_PROXY to it.
    let proxy = match &resources.proxy {
        Some(_) => {
            let e = egress::profile()?;
            let files = tokio::task::spawn_blocking(|| {
                let base = relay::base_dir()?;
                relay::RelayFiles::prepare(&base).map(|f| (base, f))
            });
            let (ep, files) = tokio::join!(image::entrypoint(&docker, &spec.image), files);
            let (base, files) = files
                .map_err(joined)?
                .map_err(|err| DockerError::Relay(err.to_string()))?;
            let socket = base.join(format!("egress-{job_id}.sock"));
            let policy = egress::Policy::new(e, credential.kind.name());
            let proxy = Proxy::start_unix(&socket, policy)
                .await
                .map_err(|err| DockerError::Relay(format!("cannot listen on {}: {err}", socket.display())))?;
            let setup = hardening::RelaySetup {
                entrypoint: files.entrypoint(e.relay_listen, &ep?),
                binds: files.binds(&socket),
            };
            Some((proxy, setup))
        }
        None => None,
    };
    if cancel.is_cancelled() {
        return Err(JobError::Cancelled);
    }
    Ok(Prepared {
        credential,
        docker,
        proxy,
    })
}
