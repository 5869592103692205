//! `compliance-check`: run the checklist over the live install.
//! Exit 0 all passed, 1 warnings, 2 critical.

use std::path::PathBuf;

use serde_json::json;

use crate::checks::Level;
use crate::compliance::{self, EMBEDDED_CHECKLIST};
use crate::context::Ctx;
use crate::exit::{Exit, Failure, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Use this checklist instead of the embedded compliance-config.json
    #[arg(long, value_name = "FILE")]
    pub checklist: Option<PathBuf>,
}

/// A checklist file, read through a 1 MiB cap (the embedded one is 5 KiB).
fn read_checklist(f: &std::path::Path) -> Result<String, Failure> {
    let bytes = crate::fsutil::read_file_capped(f, 1 << 20)
        .map_err(|e| Failure::new(Exit::Usage, format!("cannot read {}: {e}", f.display())))?;
    String::from_utf8(bytes).map_err(|_| Failure::new(Exit::Usage, format!("{} is not UTF-8 text", f.display())))
}

pub fn run(ctx: &Ctx, args: Args) -> Result<Exit> {
    let (name, text) = match &args.checklist {
        Some(f) => (f.display().to_string(), read_checklist(f)?),
        None => (
            "compliance-config.json (embedded)".to_string(),
            EMBEDDED_CHECKLIST.to_string(),
        ),
    };
    let list = compliance::parse_checklist(&name, &text)?;
    let report = compliance::run(&ctx.paths, &list)?;
    let p = ctx.out();
    if p.json {
        p.json(json!(report));
    } else {
        let mut out = String::new();
        for r in &report.results {
            let tag = match r.level {
                Level::Ok => p.green("PASS"),
                Level::Warning => p.yellow("WARN"),
                _ => p.red("FAIL"),
            };
            out.push_str(&format!("{tag}  {:<40} {}\n", r.name, r.message));
        }
        out.push_str(&format!(
            "\n{} passed, {} warnings, {} critical\n{}",
            report.passed,
            report.warnings,
            report.critical,
            compliance::DISCLAIMER
        ));
        p.out(&out);
    }
    // A check that could not run is CRITICAL here, not UNKNOWN.
    Ok(match report.level {
        Level::Unknown => Level::Critical,
        l => l,
    }
    .exit())
}
