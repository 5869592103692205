//! `opt-out`: revoke consent at once (audited).

use serde_json::json;

use crate::consent::{self, Consent, Revocation};
use crate::context::{self, Ctx, Printer};
use crate::exit::{Exit, Failure, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Do not ask for confirmation
    #[arg(long, short = 'y')]
    pub yes: bool,
}

pub fn run(ctx: &mut Ctx, args: Args) -> Result<Exit> {
    if Consent::from_config(ctx.config()?).accepted && !args.yes {
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
    let outcome = consent::revoke(&ctx.paths)?;
    ctx.reload_config();
    render(ctx.out(), &outcome);
    Ok(Exit::Ok)
}

fn render(p: &Printer, outcome: &Revocation) {
    match outcome {
        Revocation::NotOptedIn(current) => {
            if p.json {
                p.json(json!({ "ok": true, "changed": false, "consent": current }));
            } else {
                p.out("Not opted in; nothing to revoke.");
            }
        }
        Revocation::Revoked { consent, stopped } => {
            if p.json {
                p.json(json!({
                    "ok": true,
                    "changed": true,
                    "consent": consent,
                    "containers_stopped": stopped.as_ref().ok(),
                    "docker": stopped.as_ref().err(),
                }));
            } else {
                p.out("Opted out: consent revoked. No job will run until you opt in again.");
                match stopped {
                    Ok(0) => {}
                    Ok(n) => p.out(&format!("Stopped and removed {n} running job container(s).")),
                    Err(e) => p.note(&format!("could not check for running job containers: {e}")),
                }
            }
        }
    }
}
