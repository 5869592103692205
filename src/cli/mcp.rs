//! `mcp`: a read-only Model Context Protocol server on stdio.

use crate::context::Ctx;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(ctx: &Ctx, _args: Args) -> anyhow::Result<()> {
    // No notes here: stdout belongs to the protocol, and a client that
    // spawns us rarely shows stderr.
    crate::mcp::serve_stdio(ctx.paths.clone())?;
    Ok(())
}
