//! `mcp`: a read-only Model Context Protocol server on stdio.

use crate::context::Ctx;
use crate::exit::{Exit, Result};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(ctx: &Ctx, _args: Args) -> Result<Exit> {
    // No notes here: stdout belongs to the protocol, and a client that
    // spawns us rarely shows stderr.
    crate::mcp::serve_stdio(ctx.paths.clone())?;
    Ok(Exit::Ok)
}
