//! `terms` (and the global `--terms`): the text users accept at `opt-in`.

use crate::exit::{Exit, Result};
use serde_json::json;

use crate::context::{Ctx, Printer};
use crate::legal;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(ctx: &Ctx, _args: Args) -> Result<Exit> {
    show(ctx.out())
}

pub fn show(p: &Printer) -> Result<Exit> {
    if p.json {
        p.json(json!({
            "version": legal::TERMS_VERSION,
            "sha256": legal::terms_sha256(),
            "usage_policy": legal::USAGE_POLICY,
            "text": legal::TERMS,
        }));
    } else {
        p.out(legal::TERMS);
        p.out(&format!(
            "Terms version {}\nSHA-256 {}",
            legal::TERMS_VERSION,
            legal::terms_sha256()
        ));
    }
    Ok(Exit::Ok)
}
