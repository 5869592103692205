//! The command-line front door: the clap tree, argv rewriting, and turning
//! every outcome into one exit code (see [`crate::exit::Exit`]).
//!
//! One file per command group, each with its clap `Args` and a
//! `run(ctx, args)`; the work lives in library modules.

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::json;

use crate::context::{printable, with_schema_version, Ctx, Printer};
use crate::exit::{Exit, Failure, HasExit};
use crate::paths::Paths;

pub mod advertise;
pub mod audit;
pub mod bid;
pub mod clean;
pub mod completions;
pub mod compliance;
pub mod config;
pub mod decrypt;
pub mod docker;
pub mod encrypt;
pub mod execute;
pub mod health;
pub mod keys;
pub mod limits;
pub mod logs;
pub mod market;
pub mod mcp;
pub mod opt_in;
pub mod opt_out;
pub mod progress;
pub mod status;
pub mod terms;
pub mod usage;

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok
  1  failed (the operation ran and did not succeed)
  2  usage error or invalid input (bad flag or value, corrupt config)
  3  refused by policy (not opted in, cap reached, approval denied)
  4  dependency unavailable (Docker engine, market coordinator)
  5  integrity failure (audit chain, ciphertext, signature)
  `health` and `compliance-check` use Nagios codes: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
  130 interrupted (Ctrl-C)

Files live in $CMM_HOME when set, else the platform config and data dirs.";

/// Run Claude Code jobs on your own login, in locked-down containers, with
/// consent, caps and a tamper-evident audit log.
#[derive(Debug, Parser)]
#[command(name = "claude-max-market", version, about, after_help = EXIT_CODES_HELP, propagate_version = true)]
pub struct Cli {
    /// Print one JSON document on stdout (errors too)
    #[arg(long, global = true)]
    pub json: bool,
    /// Only print the answer and errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Say more (repeat for debug logs)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Show the terms, usage policy and your rights, then exit
    #[arg(long)]
    pub terms: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the terms, usage policy and your rights (version and SHA-256)
    Terms(terms::Args),
    /// Accept the terms and record your consent
    OptIn(opt_in::Args),
    /// Revoke consent at once
    OptOut(opt_out::Args),
    /// Show or set usage caps (no flags: show)
    Limits(limits::Args),
    /// Consent, caps against usage with reset times, open reservations
    Status(status::Args),
    /// Read and change settings (typed, validated, audited)
    Config(config::Args),
    /// Run one Claude Code job in a locked-down container
    Execute(execute::Args),
    /// Read the audit log (`--follow` streams new lines) or a job's record (`--job ID`)
    Logs(logs::Args),
    /// Activity and compliance report from the audit log; `audit verify` checks the chain
    Audit(audit::Args),
    /// Check this install against the compliance checklist (exit 0 pass, 1 warnings, 2 critical)
    ComplianceCheck(compliance::Args),
    /// Nagios-style health line with perfdata (exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)
    Health(health::Args),
    /// Tasks, tokens, success rate and trend per day, week or month, with a 30-day chart
    Usage(usage::Args),
    /// Read-only Model Context Protocol server on stdio (usage policy, terms, status, compliance)
    Mcp(mcp::Args),
    /// Build or pull the Claude Code runner image
    Docker(docker::Args),
    /// Remove containers (and `--images`) carrying this tool's label
    Clean(clean::Args),
    /// Offer capacity to the market and stay connected (needs `opt-in --claude-jobs`)
    Advertise(advertise::Args),
    /// Post a task to the market, or raise a task's bid
    Bid(bid::Args),
    /// The market coordinator and your market state
    Market(market::Args),
    /// Print shell completions
    Completions(completions::Args),
    /// Node identity: generate, show, export, import, list, rotate
    Keys(keys::Args),
    /// Encrypt a file or stdin to recipients (default: this node), optionally signed
    Encrypt(encrypt::Args),
    /// Decrypt an envelope; the output appears only after everything verified
    Decrypt(decrypt::Args),
}

/// Rewrite the seed's colon form (`docker:build`) into nested subcommands
/// (`docker build`) before clap sees it, so completions stay correct.
///
/// Only the subcommand position is rewritten: the first argument that is not
/// an option. Global options take no values, so that position is unambiguous.
/// Arguments are OS strings: one that is not UTF-8 is passed on untouched,
/// for clap to accept (a path) or refuse (exit 2).
pub fn rewrite_colon_form<A: Into<OsString>>(args: impl IntoIterator<Item = A>) -> Vec<OsString> {
    let mut iter = args.into_iter().map(Into::into);
    let mut out = Vec::new();
    if let Some(bin) = iter.next() {
        out.push(bin);
    }
    let mut done = false;
    for a in iter {
        let text = a.to_str();
        if !done && !text.is_some_and(|t| t.starts_with('-')) {
            done = true;
            if let Some((group, sub)) = text.and_then(|t| t.split_once(':')) {
                let word = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c == '-');
                if word(group) && word(sub) {
                    out.push(group.into());
                    out.push(sub.into());
                    continue;
                }
            }
        }
        if a == "--" {
            done = true;
        }
        out.push(a);
    }
    out
}

/// Parse a command line (program name first) exactly as the binary does:
/// colon form rewritten, then clap. Never panics, whatever the bytes.
pub fn parse<A: Into<OsString>>(args: impl IntoIterator<Item = A>) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(rewrite_colon_form(args))
}

/// Parse argv, run the command, and return the process exit code.
pub fn main_entry() -> i32 {
    // `args_os`, not `args`: std's `args` panics on an argument that is not
    // UTF-8, and clap gives a usage error (or a path) for it instead.
    let args: Vec<OsString> = std::env::args_os().collect();
    // Inside a job container, before anything else (and before any thread):
    // the egress relay, or filling / reading back the workspace. Those
    // arguments are written by this program.
    let internal = |i: usize| -> Vec<String> { args[i..].iter().map(|a| a.to_string_lossy().into_owned()).collect() };
    match args.get(1).and_then(|a| a.to_str()) {
        Some(crate::docker::relay::MODE) => return crate::docker::relay::main(&internal(2)),
        Some(crate::workspace::UNPACK_MODE) => return crate::workspace::unpack_main(&internal(2)),
        Some(crate::workspace::PACK_MODE) => return crate::workspace::pack_main(&internal(2)),
        _ => {}
    }
    let args = rewrite_colon_form(args);
    let json = args.iter().any(|a| a == "--json");
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => return clap_error(e, json, &args),
    };
    init_tracing(cli.verbose);
    let printer = Printer::new(cli.json, cli.quiet, cli.verbose);
    match run(cli, printer.clone()) {
        Ok(code) => code,
        Err(err) => report(&printer, &err),
    }
}

fn init_tracing(verbose: u8) {
    // Only pay for a subscriber when someone asked for logs: start-up time
    // matters for cron health checks.
    if verbose < 2 && std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("claude_max_market=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn clap_error(e: clap::Error, json: bool, args: &[OsString]) -> i32 {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return 0;
    }
    // `health` is run by monitors that read Nagios codes: a usage error is
    // UNKNOWN (3), not clap's 2.
    let is_health = args
        .iter()
        .skip(1)
        .find(|a| !a.to_str().is_some_and(|a| a.starts_with('-')))
        .is_some_and(|a| a == "health");
    let code = if is_health { 3 } else { Exit::Usage.code() };
    if json {
        let msg = e
            .kind()
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| first_line(&e.to_string()));
        let doc = with_schema_version(json!({
            "ok": false,
            "error": { "kind": Exit::Usage.name(), "exit": code, "message": msg, "detail": e.to_string().trim_end() }
        }));
        println!("{}", serde_json::to_string_pretty(&doc).expect("JSON values serialise"));
    } else {
        // clap quotes the offending value, and on a terminal prints it raw:
        // an argument carrying ESC would reach the terminal. Then the same
        // error without clap's colours, control characters escaped.
        let has_control = args.iter().any(|a| {
            a.to_string_lossy()
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t')
        });
        if has_control {
            let plain = plain_error(args).unwrap_or(e);
            eprint!("{}", printable(&plain.render().ansi().to_string()));
        } else {
            let _ = e.print();
        }
    }
    code
}

/// The parse error for `args` rendered without styles, so that its text is
/// exactly clap's message and the user's bytes.
fn plain_error(args: &[OsString]) -> Option<clap::Error> {
    let cmd = Cli::command().styles(clap::builder::Styles::plain());
    match cmd.try_get_matches_from(args) {
        Err(e) => Some(e),
        Ok(m) => Cli::from_arg_matches(&m).err(),
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string()
}

fn run(cli: Cli, printer: Printer) -> anyhow::Result<i32> {
    if cli.terms {
        return terms::show(&printer).map(|_| 0);
    }
    let Some(command) = cli.command else {
        let mut cmd = Cli::command();
        let _ = cmd.print_help();
        return Err(Failure::usage("no command given").hint("see the commands above").into());
    };
    if let Command::Completions(args) = command {
        return completions::run(args).map(|_| 0);
    }
    let paths = Paths::resolve().map_err(|e| Failure::new(Exit::Failed, e.to_string()))?;
    let mut ctx = Ctx::new(paths, printer);
    match command {
        Command::Terms(a) => terms::run(&ctx, a).map(|_| 0),
        Command::OptIn(a) => opt_in::run(&mut ctx, a).map(|_| 0),
        Command::OptOut(a) => opt_out::run(&mut ctx, a).map(|_| 0),
        Command::Limits(a) => limits::run(&mut ctx, a).map(|_| 0),
        Command::Status(a) => status::run(&ctx, a).map(|_| 0),
        Command::Config(a) => config::run(&mut ctx, a).map(|_| 0),
        Command::Execute(a) => execute::run(&ctx, a),
        Command::Logs(a) => logs::run(&ctx, a).map(|_| 0),
        Command::Audit(a) => audit::run(&ctx, a),
        Command::ComplianceCheck(a) => compliance::run(&ctx, a),
        Command::Health(a) => Ok(health::run(&ctx, a)),
        Command::Usage(a) => usage::run(&ctx, a).map(|_| 0),
        Command::Mcp(a) => mcp::run(&ctx, a).map(|_| 0),
        Command::Docker(a) => docker::run(&ctx, a),
        Command::Clean(a) => clean::run(&ctx, a),
        Command::Advertise(a) => advertise::run(&ctx, a).map(|_| 0),
        Command::Bid(a) => bid::run(&ctx, a).map(|_| 0),
        Command::Market(a) => market::run(&ctx, a),
        Command::Completions(_) => unreachable!("handled above"),
        Command::Keys(a) => keys::run(&ctx, a).map(|_| 0),
        Command::Encrypt(a) => encrypt::run(&ctx, a).map(|_| 0),
        Command::Decrypt(a) => decrypt::run(&ctx, a).map(|_| 0),
    }
}

/// Find the exit code and hint an error carries, from any layer.
pub fn classify(err: &anyhow::Error) -> (Exit, Option<String>) {
    for cause in err.chain() {
        macro_rules! try_as {
            ($($t:ty),*) => {$(
                if let Some(e) = cause.downcast_ref::<$t>() {
                    return (e.exit(), e.hint());
                }
            )*};
        }
        try_as!(
            Failure,
            crate::config::ConfigError,
            crate::audit::AuditError,
            crate::txn::TxnError,
            crate::usage::UsageError,
            crate::compliance::ChecklistError,
            crate::analytics::AnalyticsError,
            crate::mcp::McpError,
            crate::crypto::KeyError,
            crate::crypto::CryptoError,
            crate::job::JobError,
            crate::docker::DockerError,
            crate::workspace::WorkspaceError,
            crate::claude::credentials::CredentialError,
            crate::market::requester::RequesterError,
            crate::market::pending::PendingError,
            crate::market::sealed::SealError,
            crate::market::client::ClientError,
            crate::market::provider::AdvertiseError,
            crate::market::grant::GrantError,
            crate::market::server::ServeError
        );
    }
    (Exit::Failed, None)
}

/// Print an error (human or JSON) and return its exit code.
pub fn report(printer: &Printer, err: &anyhow::Error) -> i32 {
    let (exit, hint) = classify(err);
    let message = printable(&format!("{err:#}")).into_owned();
    let hint = hint.map(|h| printable(&h).into_owned());
    if printer.json {
        printer.json(json!({
            "ok": false,
            "error": { "kind": exit.name(), "exit": exit.code(), "message": message, "hint": hint }
        }));
    } else {
        eprintln!("{} {message}", printer.red(&printer.bold("error:")));
        if let Some(h) = hint {
            eprintln!("{} {h}", printer.bold("hint:"));
        }
    }
    exit.code()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    #[test]
    fn colon_form_becomes_nested() {
        assert_eq!(
            rewrite_colon_form(v(&["cmm", "docker:build", "--tag", "x"])),
            v(&["cmm", "docker", "build", "--tag", "x"])
        );
        assert_eq!(
            rewrite_colon_form(v(&["cmm", "--json", "docker:pull"])),
            v(&["cmm", "--json", "docker", "pull"])
        );
    }

    #[test]
    fn only_the_subcommand_position_is_rewritten() {
        let args = v(&["cmm", "config", "--set", "market.endpoint=ws://a:1"]);
        assert_eq!(rewrite_colon_form(args.clone()), args);
        let args = v(&["cmm", "execute", "--prompt", "a:b"]);
        assert_eq!(rewrite_colon_form(args.clone()), args);
        let args = v(&["cmm", "--", "x:y"]);
        assert_eq!(rewrite_colon_form(args.clone()), args);
        let args = v(&["cmm", "C:/path"]);
        assert_eq!(rewrite_colon_form(args.clone()), args);
    }

    #[test]
    fn clap_tree_is_consistent() {
        Cli::command().debug_assert();
    }
}
