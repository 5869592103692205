//! `clean`: remove containers (and images) carrying our label, nothing else.
//!
//! It owns what `clean` removes: our job containers (this install's, unless
//! told every install's), idle networks of earlier versions, stale relay
//! files and, when asked, our images. It must not touch anything without
//! our label, nor stop a running job without `force`.

use std::collections::HashMap;

use bollard::query_parameters::{ListImagesOptions, RemoveImageOptions};
use bollard::Docker;
use serde::Serialize;

use super::container::{self, list_ours, Scope};
use super::profile::Profile;
use super::DockerError;

#[derive(Debug, Default, Serialize)]
pub struct CleanReport {
    pub containers_removed: usize,
    /// Running containers left alone (no `--force`).
    pub containers_running_kept: usize,
    pub images_removed: usize,
    /// Our labelled networks (from earlier versions' egress) that no
    /// container used.
    pub networks_removed: usize,
    /// Egress relay copies of other builds and sockets of jobs that ended
    /// without removing them.
    pub relay_files_removed: usize,
    /// Images the engine would not remove (in use, ...), with the reason.
    pub images_failed: Vec<String>,
}

pub async fn clean(
    docker: &Docker,
    profile: &Profile,
    scope: &Scope,
    force: bool,
    images: bool,
) -> Result<CleanReport, DockerError> {
    let mut report = CleanReport::default();
    let label = &profile.image_label;
    for c in list_ours(docker, profile, scope).await? {
        if (c.running || c.starting) && !force {
            report.containers_running_kept += 1;
            continue;
        }
        container::remove(docker, &c.id).await;
        report.containers_removed += 1;
    }
    // After the containers, so a network they held is idle now; one still
    // in use (a running job) is refused by the engine and stays.
    report.networks_removed = super::egress::remove_idle_networks(docker, &profile.label).await?;
    // Sockets nobody listens on; copies of other builds unused for an hour.
    if let Ok(base) = super::relay::base_dir() {
        let keep = super::relay::RelayFiles::dir_for_this_build(&base).ok();
        report.relay_files_removed = super::relay::sweep(&base, keep.as_deref(), std::time::Duration::from_secs(3600));
    }
    if images {
        let filters = HashMap::from([("label".to_string(), vec![format!("{label}=true")])]);
        let list = docker
            .list_images(Some(ListImagesOptions {
                all: false,
                filters: Some(filters),
                ..Default::default()
            }))
            .await?;
        for img in list
            .into_iter()
            .filter(|i| i.labels.get(label).map(String::as_str) == Some("true"))
        {
            // By tag, so an image with several tags of ours goes tag by tag;
            // `--force` also removes images a stopped container still uses.
            let opts = RemoveImageOptions { force, noprune: false };
            let names = if img.repo_tags.is_empty() || img.repo_tags.iter().all(|t| t == "<none>:<none>") {
                vec![img.id.clone()]
            } else {
                img.repo_tags.clone()
            };
            let mut ok = true;
            for n in &names {
                if let Err(e) = docker.remove_image(n, Some(opts.clone()), None).await {
                    ok = false;
                    report.images_failed.push(format!("{n}: {e}"));
                }
            }
            if ok {
                report.images_removed += 1;
            }
        }
    }
    Ok(report)
}

/// Stop and remove the running job containers in `scope` (opt-out).
/// Returns how many.
pub async fn stop_jobs(docker: &Docker, profile: &Profile, scope: &Scope) -> Result<usize, DockerError> {
    let mut n = 0;
    for c in list_ours(docker, profile, scope).await? {
        if c.running || c.starting {
            container::remove(docker, &c.id).await;
            n += 1;
        }
    }
    Ok(n)
}

/// `stop_jobs` for synchronous callers: `Ok(n)`, or why the engine could not
/// be asked (no engine means no container of ours is running).
pub fn stop_jobs_blocking(scope: &Scope) -> Result<usize, DockerError> {
    let profile = super::profile::container()?;
    if *scope == Scope::Install(None) {
        return Ok(0);
    }
    let rt = crate::runtime::current_thread().map_err(|e| DockerError::Unreachable(e.to_string()))?;
    rt.block_on(async {
        let docker = super::connect().await?;
        stop_jobs(&docker, profile, scope).await
    })
}
