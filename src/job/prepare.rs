//! Stages 4-5 of a job: the credential (read at run time, never stored),
//! the image (auto-managed when it is the configured default) and, for
//! restricted egress, this job's own proxy and the relay that reaches it.
//! Nothing is audited here and no container is created: a failure is
//! handed back for the pipeline to audit ([`super::admit::Admitted::abandon`]).

use std::sync::Arc;

use super::admit::{Admitted, EngineProbe};
use super::{default_image, joined, Cancel, JobError, Progress};
use crate::claude::credentials::{self, Credential};
use crate::config::Config;
use crate::docker::container::Hold;
use crate::docker::egress::{self, Proxy};
use crate::docker::hardening;
use crate::docker::image::{self, Provenance};
use crate::docker::{relay, DockerError};
use crate::workspace;

/// What a job needs to start.
pub(super) struct Prepared {
    pub credential: Credential,
    pub docker: bollard::Docker,
    /// The job's proxy (restricted egress only).
    pub proxy: Option<Proxy>,
    /// Our binary in the container: the relay to the proxy, the hold of a
    /// workspace job, or both.
    pub relay: Option<hardening::RelaySetup>,
    /// A workspace job: how its workspace goes in and comes out.
    pub hold: Option<Hold>,
}

pub(super) async fn prepare(
    cfg: &Config,
    admitted: &Admitted,
    engine: EngineProbe,
    progress: &Arc<dyn Progress>,
    cancel: &Cancel,
) -> Result<Prepared, JobError> {
    let (spec, resources, profile) = (&admitted.spec, &admitted.resources, admitted.profile);
    // 4. Credentials (may run the user's tokenCommand).
    let mut notes = Vec::new();
    let credential = credentials::resolve(cfg, &mut notes)?;
    for n in &notes {
        progress.note(n);
    }
    // 5. The image: auto-managed when it is the configured default.
    let (docker, present) = engine.await.map_err(joined)??;
    if !present {
        let manage = (spec.image == default_image(cfg)).then(|| image::LocalBuild::from_config(cfg));
        let ensured = tokio::select! {
            r = image::ensure(&docker, &spec.image, manage.as_ref(), profile, progress.as_ref()) => r,
            _ = cancel.cancelled() => return Err(JobError::Cancelled),
        };
        let _: Provenance = ensured?;
    }
    // 5b. Our binary in the container. Restricted egress: this job's own
    // proxy on a Unix socket, allowing only what this credential kind
    // needs, and the relay that carries the container's HTTPS_PROXY to it.
    // A workspace: the hold, and the copies in and out.
    let snapshot = admitted.snapshot.clone();
    if resources.proxy.is_none() && snapshot.is_none() {
        return ready(cancel, credential, docker, None, None, None);
    }
    let (proxy, relay, hold) = in_container(admitted, &docker, credential.kind.name(), snapshot).await?;
    ready(cancel, credential, docker, proxy, Some(relay), hold)
}

/// Our binary in the container: for restricted egress the job's own proxy
/// and the relay to it, for a workspace the hold and the copies in and out.
async fn in_container(
    admitted: &Admitted,
    docker: &bollard::Docker,
    credential_kind: &str,
    snapshot: Option<Arc<workspace::Snapshot>>,
) -> Result<(Option<Proxy>, hardening::RelaySetup, Option<Hold>), JobError> {
    let (spec, job_id, resources, profile) = (&admitted.spec, &admitted.job_id, &admitted.resources, admitted.profile);
    let files = tokio::task::spawn_blocking(|| {
        let base = relay::base_dir()?;
        relay::RelayFiles::prepare(&base).map(|f| (base, f))
    });
    let tar = async {
        match snapshot {
            Some(s) => super::workspace::pack(s).await.map(Some),
            None => Ok(None),
        }
    };
    let (ep, files, tar) = tokio::join!(image::entrypoint(docker, &spec.image), files, tar);
    let (base, files) = files
        .map_err(joined)?
        .map_err(|err| DockerError::Relay(err.to_string()))?;
    let (ep, tar) = (ep?, tar?);
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let hold_nonce = tar.as_ref().map(|_| nonce.as_str());
    let (proxy, relay) = match &resources.proxy {
        Some(_) => {
            let e = egress::profile()?;
            let socket = base.join(format!("egress-{job_id}.sock"));
            let policy = egress::Policy::new(e, credential_kind);
            let proxy = Proxy::start_unix(&socket, policy)
                .await
                .map_err(|err| DockerError::Relay(format!("cannot listen on {}: {err}", socket.display())))?;
            let setup = hardening::RelaySetup {
                entrypoint: files.entrypoint_with(Some(e.relay_listen), hold_nonce, &ep),
                binds: files.binds(&socket),
            };
            (Some(proxy), setup)
        }
        // Open egress: no relay, but the hold still needs our binary.
        None => (
            None,
            hardening::RelaySetup {
                entrypoint: files.entrypoint_with(None, hold_nonce, &ep),
                binds: vec![files.files_bind()],
            },
        ),
    };
    let mount = &profile.workspace.mount;
    let hold = tar.map(|tar_in| Hold {
        nonce,
        user: profile.user.clone(),
        tar_in,
        unpack: files.command(&[workspace::UNPACK_MODE, mount]),
        pack: files.command(&[workspace::PACK_MODE, mount]),
        out_limit: super::workspace::out_limit(admitted.workspace_limit),
    });
    Ok((proxy, relay, hold))
}

fn ready(
    cancel: &Cancel,
    credential: Credential,
    docker: bollard::Docker,
    proxy: Option<Proxy>,
    relay: Option<hardening::RelaySetup>,
    hold: Option<Hold>,
) -> Result<Prepared, JobError> {
    if cancel.is_cancelled() {
        return Err(JobError::Cancelled);
    }
    Ok(Prepared {
        credential,
        docker,
        proxy,
        relay,
        hold,
    })
}
