//! The local stand-in for the Claude API as a process, for benchmark
//! scripts and hand checks.
//!
//! ```text
//! cargo run --example api_standin -- --listen 127.0.0.1:0 --ca-out ca.pem --log requests.jsonl
//! listening 127.0.0.1:40123
//! proxy 127.0.0.1:40124
//! ```
//! Point Claude Code at it with `ANTHROPIC_BASE_URL=https://127.0.0.1:40123`
//! and `NODE_EXTRA_CA_CERTS=ca.pem` (or `HTTPS_PROXY=http://127.0.0.1:40124`
//! to reach it as `api.anthropic.com`). It serves until SIGINT or SIGTERM.

#[path = "../tests/api_standin/mod.rs"]
mod api_standin;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(about = "A local HTTPS stand-in for api.anthropic.com (Messages API, streaming)")]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write the throwaway CA certificate (PEM) here, for NODE_EXTRA_CA_CERTS.
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Append every request, as the stand-in recorded it, as JSON lines.
    #[arg(long)]
    log: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let opts = api_standin::Options {
        listen: args.listen,
        log: args.log,
    };
    let api = match api_standin::StandIn::try_start(opts) {
        Ok(api) => api,
        Err(e) => {
            eprintln!("error: cannot start the stand-in on `{}`: {e}", args.listen);
            return ExitCode::from(4);
        }
    };
    if let Some(out) = &args.ca_out {
        if let Err(e) = std::fs::copy(api.ca_pem_path(), out) {
            eprintln!("error: cannot write the CA certificate to `{}`: {e}", out.display());
            return ExitCode::from(1);
        }
    }
    // Scripts wait for this line: the listeners accept from here on.
    println!("listening {}", api.addr());
    println!("proxy {}", api.proxy_url().trim_start_matches("http://"));

    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start a runtime for signals: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    });
    // Dropping the stand-in stops it and removes its scratch directory.
    drop(api);
    ExitCode::SUCCESS
}
