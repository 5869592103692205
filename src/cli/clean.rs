//! `clean`: remove containers, idle networks (and with `--images`, images)
//! carrying our label; nothing else is ever touched. Also removes rotated
//! keys whose decryption window (`security.keyRotationDays`) has passed.
//!
//! It parses the flags, calls `docker::clean` and renders its report; what
//! is removed is decided there, not here.

use crate::exit::{Exit, Result};
use serde_json::json;

use crate::context::Ctx;
use crate::docker::container::Scope;
use crate::docker::{clean, hardening};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also stop and remove running job containers
    #[arg(long)]
    pub force: bool,
    /// Also remove images built by this tool
    #[arg(long)]
    pub images: bool,
    /// Act on every install's job containers on this engine, not only this
    /// install's (other users' or other `CMM_HOME`s' jobs included)
    #[arg(long)]
    pub all_installs: bool,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<Exit> {
    // Keys first: it needs no engine, so it happens even when Docker is down.
    let keys_removed = crate::crypto::prune_expired(&ctx.paths, chrono::Utc::now())?;
    let profile = hardening::profile()?;
    let scope = if args.all_installs {
        Scope::AllInstalls
    } else {
        Scope::this_install(&ctx.paths)
    };
    let rt = crate::runtime::current_thread()?;
    let report = rt.block_on(async {
        let docker = crate::docker::connect().await?;
        clean::clean(&docker, profile, &scope, args.force, args.images).await
    })?;
    let p = ctx.out();
    if p.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(m) = v.as_object_mut() {
            m.insert("ok".into(), json!(report.images_failed.is_empty()));
            m.insert("keys_removed".into(), json!(keys_removed));
            m.insert("all_installs".into(), json!(args.all_installs));
        }
        p.json(v);
    } else {
        let mut line = format!(
            "Removed {} container(s), {} network(s), {} stale egress relay file(s)",
            report.containers_removed, report.networks_removed, report.relay_files_removed
        );
        if args.images {
            line.push_str(&format!(" and {} image(s)", report.images_removed));
        }
        if keys_removed > 0 {
            line.push_str(&format!("; removed {keys_removed} expired rotated key(s)"));
        }
        p.out(&line);
        if report.containers_running_kept > 0 {
            p.note(&format!(
                "{} running job container(s) left alone; `clean --force` stops them",
                report.containers_running_kept
            ));
        }
        for f in &report.images_failed {
            p.warn(&format!("could not remove image {f}"));
        }
    }
    Ok(Exit::unless(report.images_failed.is_empty(), Exit::Failed))
}
