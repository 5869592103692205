//! `completions SHELL`: print a completion script.

use crate::exit::{Exit, Result};
use clap::CommandFactory;
use clap_complete::Shell;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// bash, zsh, fish, elvish or powershell
    pub shell: Shell,
}

pub fn run(args: Args) -> Result<Exit> {
    let mut cmd = super::Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut cmd, "claude-max-market", &mut out);
    Ok(Exit::Ok)
}
