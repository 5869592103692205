//! `claude-max-market`: parse, run, map the outcome to an exit code.

fn main() {
    std::process::exit(claude_max_market::cli::main_entry());
}
