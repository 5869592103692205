//! `opt-out`: revoke consent at once (audited).

use serde_json::json;

use crate::consent::{self, Consent};
use crate::context::{self, Ctx};
use crate::exit::{Exit, Failure, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Do not ask for confirmation
    #[arg(long, short = 'y')]
    pub yes: bool,
}

pub fn run(ctx: &mut Ctx, args: Args) -> Result<Exit> {
    let current = Consent::from_config(ctx.config()?);
    if !current.accepted {
        let p = ctx.out();
        if p.json {
            p.json(json!({ "ok": true, "changed": false, "consent": current }));
        } else {
            p.out("Not opted in; nothing to revoke.");
        }
        return Ok(Exit::Ok);
    }
    if !args.yes {
        if !context::interactive() {
            return Err(
                Failure::usage("opt-out asks for confirmation and there is no terminal to ask on")
                    .hint("run `claude-max-market opt-out --yes`")
                    .into(),
            );
        }
        if !context::confirm("Revoke your consent? No job will run until you opt in again.")? {
            return Err(Failure::usage("opt-out cancelled; consent unchanged").into());
        }
    }
    // Only this install's jobs: another home's (or user's) are not ours to stop.
    let scope = crate::docker::container::Scope::this_install(&ctx.paths);
    let revoked = Consent {
        accepted: false,
        job_types: vec![],
        revoked_at: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        ..current.clone()
    };
    // Write-ahead (`crate::txn`): `consent.revoked` is logged before the
    // consent is stored, so a crash cannot leave a revocation unrecorded.
    // A broken log must not keep consent alive, though: then the revocation
    // is stored anyway, containers are stopped, and the failure is reported.
    let event = json!({
        "terms_version": current.terms_version,
        "job_types": current.job_types,
    });
    let recorded = crate::txn::edit_audited(
        &ctx.paths,
        |file| {
            file.insert(
                "consent".into(),
                serde_json::to_value(&revoked).expect("consent serialises"),
            );
            Ok(())
        },
        |_| Ok(vec![("consent.revoked".to_string(), event.clone())]),
    );
    match recorded {
        Err(crate::txn::TxnError::Config(e)) => return Err(e.into()),
        Err(_) => consent::store(&ctx.paths, &revoked)?,
        Ok(()) => {}
    }
    // Consent is revoked first, so no new job starts; then running job
    // containers of ours are stopped and removed (their `execute` processes
    // record the end). Both happen even when the audit log is broken:
    // stopping is always allowed. A failure to record it is still reported.
    let stopped = crate::docker::clean::stop_jobs_blocking(&scope);
    recorded.map_err(|e| {
        crate::exit::Error::from(e).context("consent was revoked, but the audit log could not record it")
    })?;
    if let Ok(n) = stopped.as_ref() {
        if *n > 0 {
            ctx.audit()
                .append("consent.jobs_stopped", json!({ "containers_stopped": n }))?;
        }
    }
    let p = ctx.out();
    if p.json {
        p.json(json!({
            "ok": true,
            "changed": true,
            "consent": revoked,
            "containers_stopped": stopped.as_ref().ok(),
            "docker": stopped.as_ref().err().map(|e| e.to_string()),
        }));
    } else {
        p.out("Opted out: consent revoked. No job will run until you opt in again.");
        match stopped {
            Ok(0) => {}
            Ok(n) => p.out(&format!("Stopped and removed {n} running job container(s).")),
            Err(e) => p.note(&format!("could not check for running job containers: {e}")),
        }
    }
    Ok(Exit::Ok)
}
