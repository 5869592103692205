//! `market serve | status | ledger | grant | result`: the coordinator and
//! its books, and collecting a posted task's result.
//!
//! This file parses the flags and renders outcomes; the work and its audit
//! lines are the market operations' ([`crate::market::collect`],
//! [`crate::market::grant`], [`crate::market::status`]); no audit line is
//! written here.

use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use serde_json::json;

use crate::cli::progress::{ok, render_settled, show_step};
use crate::context::{Ctx, Printer};
use crate::exit::{Exit, Failure, Result};
use crate::market::client::Endpoints;
use crate::market::collect::{self, CollectOptions, Collected};
use crate::market::grant::{self, GrantOptions};
use crate::market::reply::StatusView;
use crate::market::requester::RequesterEvent;
use crate::market::server::anchor;
use crate::market::server::store::{DbError, DbSpec, Store};
use crate::market::server::{self, book::MAX_ATTEMPTS, ledger, Limits};

/// A store failure while reading: unavailable if the database went away.
fn store_failure(e: DbError) -> Failure {
    let code = if e.is_unreachable() {
        Exit::Unavailable
    } else {
        Exit::Failed
    };
    Failure::new(code, format!("the market database failed: {e}"))
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: MarketCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum MarketCommand {
    /// Run the coordinator (WebSocket for nodes, HTTP /healthz and /metrics) until SIGINT/SIGTERM
    Serve(ServeArgs),
    /// Your balance, escrow, offers, tasks, reputation and the market's totals
    Status(StatusArgs),
    /// Ledger totals; `--verify` checks every invariant of a coordinator's database
    Ledger(LedgerArgs),
    /// Operator: credit a node with RUV from the issuer, recorded in the ledger
    Grant(GrantArgs),
    /// Collect your task's result: send the kept prompt to the provider holding
    /// the task, wait, verify and print the result, and settle
    Result(ResultArgs),
}

#[derive(Debug, clap::Args)]
pub struct ResultArgs {
    /// The task id `bid` printed
    pub task_id: String,
    /// Coordinator URL, or replicas as a comma-separated list tried in order (default: `market.endpoint`)
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Seconds to wait for the result (default: until the task's deadline + 30 s;
    /// at most 2592000, 30 days)
    #[arg(long, value_name = "SECS", conflicts_with = "no_wait",
          value_parser = clap::value_parser!(u64).range(1..=2_592_000))]
    pub timeout: Option<u64>,
    /// One look: print the result if it was delivered, else say where the task
    /// stands (sending the payload if a provider holds it) and exit 1
    #[arg(long)]
    pub no_wait: bool,
    /// A workspace task: apply the accepted changes to the DIR it was posted
    /// with (only if DIR has not changed since the bid; else the patch is kept)
    #[arg(long)]
    pub apply: bool,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free one)
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// The market's store: a SQLite file, or postgres://USER@HOST:PORT/DB to
    /// run as one of several replicas on one database (default: `market.db`
    /// in config or CMM_MARKET_DB, else market.db in the data dir). Keep a
    /// password out of the command line: set CMM_MARKET_DB instead
    #[arg(long, value_name = "FILE|URL")]
    pub db: Option<String>,
    /// This replica's name in /healthz and the `replica` label of /metrics
    /// (default: the address it listens on)
    #[arg(long, value_name = "NAME")]
    pub replica: Option<String>,
    /// RUV credited once to every new node on its first login. 0 by default:
    /// anyone can make keypairs, so a per-identity grant can be farmed; fund
    /// nodes with `market grant` instead. Only for closed markets (tests, one
    /// operator's own nodes)
    #[arg(long, default_value_t = 0)]
    pub initial_grant: u32,
    /// Milliseconds a provider takes no new lease after it gave one up or lost
    /// one through its own fault
    #[arg(long, default_value_t = crate::market::server::book::DEFAULT_COOLDOWN_MS as u64,
          value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub cooldown_ms: u64,
    /// Milliseconds a requester has to relay the payload after an accept; a lease
    /// that ends without a payload after that is not counted against the provider
    #[arg(long, default_value_t = crate::market::server::book::DEFAULT_PAYLOAD_GRACE_MS as u64,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub payload_grace_ms: u64,
    /// Lease length in milliseconds (extended by each heartbeat)
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u32).range(50..))]
    pub lease_ms: u32,
    /// How long a disconnected provider's offers survive, in milliseconds
    #[arg(long, default_value_t = 30_000)]
    pub grace_ms: u32,
    /// Attempts per task when the requester does not say
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=MAX_ATTEMPTS as i64))]
    pub max_attempts: u32,
    /// A delivered task the requester neither settles nor rejects within this many
    /// milliseconds is settled (and its held result dropped)
    #[arg(long, default_value_t = crate::market::server::book::DEFAULT_SETTLE_TTL_MS as u64,
          value_parser = clap::value_parser!(u64).range(1000..))]
    pub settle_ttl_ms: u64,
    /// Largest control frame in bytes
    #[arg(long, default_value_t = crate::market::protocol::DEFAULT_CONTROL_CAP)]
    pub control_cap: usize,
    /// Largest frame carrying an encrypted payload or result, in bytes
    #[arg(long, default_value_t = crate::market::protocol::DEFAULT_PAYLOAD_CAP)]
    pub payload_cap: usize,
    /// Frames per second allowed per node (sustained)
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Frames a node may send in a burst above the rate
    #[arg(long, default_value_t = 400)]
    pub burst: u32,
    /// `full`: commits survive power loss; `normal`: they survive process crashes only
    #[arg(long, default_value = "full", value_parser = ["full", "normal"])]
    pub sync: String,
    /// Open connections at most, authenticated or not (held below the open-files limit)
    #[arg(long, default_value_t = Limits::default().max_connections,
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_connections: usize,
    /// Connections that have not authenticated yet, at most
    #[arg(long, default_value_t = Limits::default().max_unauth,
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_unauth: usize,
    /// Connections from one address (an IPv6 /64) that have not authenticated yet, at most
    #[arg(long, default_value_t = Limits::default().max_unauth_per_addr,
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_unauth_per_addr: usize,
    /// Milliseconds from connecting to an authenticated `hello`; later, the connection is closed
    #[arg(long, default_value_t = Limits::default().auth_timeout.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub auth_timeout_ms: u64,
    /// Milliseconds a plain HTTP connection (`/healthz`, `/metrics`) may last
    #[arg(long, default_value_t = Limits::default().http_timeout.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub http_timeout_ms: u64,
    /// Largest HTTP request head (request line and headers) in bytes; larger gets 431
    #[arg(long, default_value_t = Limits::default().max_header_bytes,
          value_parser = clap::value_parser!(u32).range(1024..=1_048_576).map(|v| v as usize))]
    pub max_header_bytes: usize,
    /// Bytes queued for a node that does not read before it is disconnected
    /// (at least the payload cap + 64 KiB)
    #[arg(long, default_value_t = Limits::default().send_queue_bytes)]
    pub send_queue_bytes: usize,
    /// Frames queued for a node that does not read before it is disconnected
    #[arg(long, default_value_t = Limits::default().send_queue_frames,
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub send_queue_frames: usize,
    /// Milliseconds a node may take to read one frame before it is disconnected
    #[arg(long, default_value_t = Limits::default().send_timeout.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub send_timeout_ms: u64,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Coordinator URL, or replicas as a comma-separated list tried in order (default: `market.endpoint`)
    #[arg(long)]
    pub endpoint: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct GrantArgs {
    /// The node id to credit (64 hex digits; the node must have logged in once)
    pub node_id: String,
    /// Whole RUV to credit (1..=1000000000)
    #[arg(value_parser = clap::value_parser!(u64).range(1..=crate::market::server::book::MAX_GRANT as u64))]
    pub amount: u64,
    /// The coordinator's store, a SQLite file or postgres:// URL (default:
    /// `market.db` in config or CMM_MARKET_DB, else market.db in the data
    /// dir); the coordinator may be running
    #[arg(long, value_name = "FILE|URL")]
    pub db: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct LedgerArgs {
    /// Check every ledger and order-book invariant (exit 5 on any violation)
    #[arg(long)]
    pub verify: bool,
    /// The store to read, a SQLite file or postgres:// URL (default:
    /// `market.db` in config or CMM_MARKET_DB, else market.db in the data dir)
    #[arg(long, value_name = "FILE|URL")]
    pub db: Option<String>,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<Exit> {
    match args.command {
        MarketCommand::Serve(a) => serve(ctx, a),
        MarketCommand::Status(a) => status(ctx, a),
        MarketCommand::Ledger(a) => ledger_cmd(ctx, a),
        MarketCommand::Grant(a) => grant(ctx, a),
        MarketCommand::Result(a) => result(ctx, a),
    }
}

fn result(ctx: &Ctx, a: ResultArgs) -> Result<Exit> {
    let opts = CollectOptions {
        endpoint: Endpoints::resolve(a.endpoint, &ctx.config()?.settings().market.endpoint)?,
        task_id: a.task_id,
        wait: (!a.no_wait).then(|| a.timeout.map(Duration::from_secs)),
        apply: a.apply,
    };
    let p = ctx.out();
    let mut progress = |ev: RequesterEvent| show_step(p, &ev);
    match crate::runtime::current_thread()?.block_on(collect::collect(&ctx.paths, opts, &mut progress))? {
        Collected::Settled(o) => {
            render_settled(&o, p);
            Ok(crate::cli::progress::settled_exit(&o))
        }
        Collected::NotYet(n) => {
            if p.json {
                let mut v = serde_json::to_value(&n)?;
                v["ok"] = false.into();
                p.json(v);
            } else {
                // The answer to this command, so shown even with `-q`.
                eprintln!("{}", n.message);
                eprintln!("{} {}", p.bold("hint:"), n.hint);
            }
            Ok(Exit::Failed)
        }
    }
}

/// `market grant`: one `operator_grant` journal entry, in its own durable
/// transaction beside a running coordinator (SQLite serialises it with the
/// coordinator's writer), then the operator's audit line.
fn grant(ctx: &Ctx, a: GrantArgs) -> Result<Exit> {
    let opts = GrantOptions {
        node_id: a.node_id,
        amount: a.amount,
        db: market_db(ctx, a.db.as_deref())?,
    };
    let g = grant::grant(&ctx.paths, opts)?;
    let p = ctx.out();
    if p.json {
        p.json(ok(&g));
    } else {
        p.out(&format!(
            "Granted {} RUV to node {} (ledger entry {}); its balance is {} RUV",
            g.granted, g.node_id, g.journal_id, g.balance
        ));
    }
    Ok(Exit::Ok)
}

/// The store a market command works on: `--db`, else `market.db` (env
/// `CMM_MARKET_DB` folded in), else market.db in the data dir.
fn market_db(ctx: &Ctx, flag: Option<&str>) -> Result<DbSpec> {
    let configured = ctx.config()?.settings().market.db.clone();
    Ok(DbSpec::resolve(flag, configured.as_deref(), ctx.paths.market_db()))
}

fn serve(ctx: &Ctx, a: ServeArgs) -> Result<Exit> {
    let db = market_db(ctx, a.db.as_deref())?;
    if !db.is_postgres() {
        ctx.paths.ensure()?;
    }
    if a.initial_grant > 0 {
        ctx.out().warn(&format!(
            "--initial-grant {}: every new identity is credited {} RUV on its first login, so anyone who makes \
             keypairs mints RUV; use it only on a closed market, and `market grant` on an open one",
            a.initial_grant, a.initial_grant
        ));
    }
    let witness_key = match &db {
        DbSpec::Sqlite(path) => anchor::key_path(path),
        DbSpec::Postgres(_) => {
            ctx.paths.ensure()?;
            anchor::key_path(&ctx.paths.market_db())
        }
    };
    let mut opts = server::default_options(db.clone(), witness_key);
    opts.listen = a.listen;
    opts.replica = a.replica.clone().unwrap_or_default();
    opts.rules.initial_grant = a.initial_grant as i64;
    opts.rules.lease_ms = a.lease_ms as i64;
    opts.rules.grace_ms = a.grace_ms as i64;
    opts.rules.default_attempts = a.max_attempts;
    opts.rules.settle_ttl_ms = a.settle_ttl_ms.min(i64::MAX as u64) as i64;
    opts.rules.cooldown_ms = a.cooldown_ms as i64;
    opts.rules.payload_grace_ms = a.payload_grace_ms as i64;
    opts.control_cap = a.control_cap.max(1024);
    opts.payload_cap = a.payload_cap.max(opts.control_cap);
    opts.rate = a.rate.max(1) as f64;
    opts.burst = a.burst.max(1) as f64;
    opts.sync_full = a.sync == "full";
    opts.limits = Limits {
        max_connections: a.max_connections,
        max_unauth: a.max_unauth,
        max_unauth_per_addr: a.max_unauth_per_addr,
        auth_timeout: Duration::from_millis(a.auth_timeout_ms),
        http_timeout: Duration::from_millis(a.http_timeout_ms),
        max_header_bytes: a.max_header_bytes,
        // One whole payload frame always fits.
        send_queue_bytes: a.send_queue_bytes.max(opts.payload_cap + 64 * 1024),
        send_queue_frames: a.send_queue_frames,
        send_timeout: Duration::from_millis(a.send_timeout_ms),
    };
    let p = ctx.out().clone();
    let named = a.replica.clone();
    let ready = |addr: SocketAddr| {
        // Scripts and tests read this line to learn the port. The store is
        // shown without a password.
        let replica = named.clone().unwrap_or_else(|| addr.to_string());
        if p.json {
            println!(
                "{}",
                json!({ "schema_version": 1, "listening": format!("ws://{addr}"), "db": db.to_string(), "replica": replica })
            );
        } else {
            println!("market coordinator listening on ws://{addr} (db: {db}, replica: {replica})");
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    };
    let rt = crate::runtime::workers(2).map_err(server::ServeError::Io)?;
    let served = rt.block_on(async {
        // Both handlers are in place before the port opens, so a signal
        // sent as soon as the address is printed stops the coordinator in
        // order instead of killing it.
        let stop = crate::runtime::shutdown_signal().map_err(server::ServeError::Io)?;
        server::serve(opts, ready, stop).await
    });
    // Sessions still open end with the runtime, after at most half a second.
    rt.shutdown_timeout(Duration::from_millis(500));
    served?;
    p.note("market coordinator stopped");
    Ok(Exit::Ok)
}

fn status(ctx: &Ctx, a: StatusArgs) -> Result<Exit> {
    let endpoints = Endpoints::resolve(a.endpoint, &ctx.config()?.settings().market.endpoint)?;
    let (endpoint, v) =
        crate::runtime::current_thread()?.block_on(crate::market::status::status(&ctx.paths, &endpoints))?;
    let p = ctx.out();
    if p.json {
        p.json(json!({ "ok": true, "endpoint": endpoint, "status": v }));
        return Ok(Exit::Ok);
    }
    p.out(&status_text(&v, p));
    Ok(Exit::Ok)
}

fn status_text(v: &StatusView, p: &Printer) -> String {
    let rep = &v.reputation;
    let mut s = format!(
        "{} {}\n{} {} RUV   {} {} RUV\n{} {:.3} ({} settled ok, {} failed or lapsed)\n",
        p.bold("Node:"),
        v.node_id,
        p.bold("Balance:"),
        v.balance,
        p.bold("Escrow:"),
        v.escrow,
        p.bold("Reputation:"),
        rep.score,
        rep.successes,
        rep.failures,
    );
    s.push_str(&format!("{} {}\n", p.bold("Offers:"), v.offers.len()));
    for o in &v.offers {
        s.push_str(&format!(
            "  {}  slots {}  price {}  models {}\n",
            o.offer_id, o.slots, o.price, o.models
        ));
    }
    s.push_str(&format!("{} {}\n", p.bold("Tasks:"), v.tasks.len()));
    for t in &v.tasks {
        s.push_str(&format!(
            "  {}  {:<9}  attempt {}  max price {}  model {}\n",
            t.task_id, t.state, t.attempt, t.max_price, t.model
        ));
    }
    let srv = &v.server;
    s.push_str(&format!(
        "{} {} nodes, {} active offers, tasks {}, issued {} RUV (balances {} + escrow {})",
        p.bold("Market:"),
        srv.nodes,
        srv.active_offers,
        json!(srv.tasks),
        srv.ledger.issued,
        srv.ledger.balances,
        srv.ledger.escrow
    ));
    s
}

fn ledger_cmd(ctx: &Ctx, a: LedgerArgs) -> Result<Exit> {
    let db = market_db(ctx, a.db.as_deref())?;
    if let DbSpec::Sqlite(path) = &db {
        if !path.exists() {
            return Err(Failure::new(Exit::Failed, format!("no market database at `{db}`"))
                .hint(
                    "pass `--db PATH` or `--db postgres://...`, or run `claude-max-market market serve` to create one",
                )
                .into());
        }
    }
    let mut conn = Store::open_read(&db).map_err(|e| {
        let code = if e.is_unreachable() {
            Exit::Unavailable
        } else {
            Exit::Failed
        };
        Failure::new(code, format!("cannot open `{db}`: {e}"))
    })?;
    let p = ctx.out();
    if !a.verify {
        let t = ledger::totals(conn.db()).map_err(store_failure)?;
        if p.json {
            p.json(json!({ "ok": true, "db": db.to_string(), "totals": t }));
        } else {
            p.out(&format!(
                "issued {} RUV = balances {} + escrow {}",
                t.issued, t.balances, t.escrow
            ));
        }
        return Ok(Exit::Ok);
    }
    // A live coordinator may be writing: read one consistent snapshot.
    conn.begin_snapshot().map_err(store_failure)?;
    let report = ledger::verify(conn.db()).map_err(store_failure)?;
    conn.rollback();
    let code = Exit::unless(report.ok, Exit::Integrity);
    if p.json {
        p.json(json!({ "ok": report.ok, "db": db.to_string(), "report": report }));
    } else if report.ok {
        p.out(&format!(
            "ledger verifies: issued {} RUV = balances {} + escrow {} ({} nodes, {} tasks, {} journal entries)",
            report.totals.issued,
            report.totals.balances,
            report.totals.escrow,
            report.nodes,
            report.tasks,
            report.journal_entries
        ));
    } else {
        let mut s = format!("ledger does NOT verify ({} problems):\n", report.problems.len());
        for pr in &report.problems {
            s.push_str(&format!("  {pr}\n"));
        }
        eprint!("{s}");
    }
    Ok(code)
}
