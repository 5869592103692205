//! `health`: one Nagios line with perfdata; exit 0 OK, 1 WARNING,
//! 2 CRITICAL, 3 UNKNOWN.

use serde_json::json;

use crate::context::Ctx;
use crate::exit::{Exit, Result};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(ctx: &Ctx, _args: Args) -> Result<Exit> {
    let report = crate::health::check(&ctx.paths);
    let p = ctx.out();
    if p.json {
        p.json(json!({
            "status": report.level,
            "exit": report.level.code(),
            "line": report.line(),
            "checks": report.checks,
            "perf": report.perf,
        }));
    } else {
        p.out(&report.line());
    }
    Ok(report.level.exit())
}
