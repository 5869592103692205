//! `market serve | status | ledger`: the coordinator and its books.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::context::Ctx;
use crate::crypto::keys::Identity;
use crate::exit::{Exit, Failure, Result};
use crate::market::client::Client;
use crate::market::pending;
use crate::market::protocol::Request;
use crate::market::requester::{self, Resume, Resumed};
use crate::market::server::{self, book::MAX_ATTEMPTS, ledger, store, Limits};

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
    /// Coordinator URL (default: `market.endpoint`)
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
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free one)
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// SQLite file for the market state (default: market.db in the data dir)
    #[arg(long)]
    pub db: Option<PathBuf>,
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
    /// Coordinator URL (default: `market.endpoint`)
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
    /// SQLite file of the coordinator (default: market.db in the data dir); the
    /// coordinator may be running
    #[arg(long)]
    pub db: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct LedgerArgs {
    /// Check every ledger and order-book invariant (exit 5 on any violation)
    #[arg(long)]
    pub verify: bool,
    /// SQLite file to read (default: market.db in the data dir)
    #[arg(long)]
    pub db: Option<PathBuf>,
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
    let endpoint = endpoint(ctx, a.endpoint)?;
    // A task id becomes a file name below: refuse anything else first.
    pending::path(&ctx.paths, &a.task_id)?;
    let id = Identity::load_or_generate(&ctx.paths, &ctx.audit())?;
    // The payload hash this node posted, from its own log: the result must
    // be bound to it, whatever the coordinator says.
    let posted = ctx
        .audit()
        .entries()?
        .filter(|e| e.event == "market.bid" && e.raw.get("task_id").and_then(Value::as_str) == Some(&a.task_id))
        .filter_map(|e| e.raw.get("payload_hash").and_then(Value::as_str).map(str::to_string))
        .last();
    let prompt = pending::load(&ctx.paths, &id, &a.task_id)?;
    if let Some(prompt) = &prompt {
        // Send nothing but the prompt this node posted under this task.
        let have = hex::encode(Sha256::digest(prompt));
        match &posted {
            Some(h) if *h == have => {}
            Some(h) => {
                return Err(Failure::new(
                    Exit::Integrity,
                    format!(
                        "the kept prompt of task {} hashes to {have}, not to the {h} you posted; nothing was sent",
                        a.task_id
                    ),
                )
                .hint(format!(
                    "remove {} and post the task again",
                    pending::path(&ctx.paths, &a.task_id)?.display()
                ))
                .into())
            }
            None => {
                return Err(Failure::new(
                    Exit::Integrity,
                    format!(
                        "a prompt is kept for task {} but your audit log has no `market.bid` for it, \
                         so it cannot be checked; nothing was sent",
                        a.task_id
                    ),
                )
                .into())
            }
        }
    } else if posted.is_none() {
        ctx.out()
            .warn("this task is not in your audit log; checking the result against the market's payload hash");
    }
    let p = ctx.out().clone();
    let mut progress = |v: Value| p.note(&crate::cli::bid::progress_line(&v));
    let spec = Resume {
        task_id: &a.task_id,
        posted_hash: posted,
        prompt: prompt.as_deref(),
        wait: (!a.no_wait).then(|| a.timeout.map(Duration::from_secs)),
    };
    let r = runtime()?.block_on(requester::resume(&endpoint, &id, &spec, &mut progress));
    let (task, payload_sent) = match r {
        Ok(Resumed::Settled(o)) => return crate::cli::bid::finish(ctx, Ok(o)),
        Ok(Resumed::NotYet { task, payload_sent }) => (task, payload_sent),
        Err(e) => return crate::cli::bid::finish(ctx, Err(e)),
    };
    // Not delivered, and not waited for.
    let state = task["state"].as_str().unwrap_or("?").to_string();
    let (message, hint) = if prompt.is_none() {
        (
            format!("task {} is {state}, and its prompt is not kept on this node", a.task_id),
            "the payload goes out from the node that keeps the prompt: the machine that posted the task with \
             `bid` (without `--wait`), or a `bid --wait` still running; this node can fetch the result \
             once it is delivered"
                .to_string(),
        )
    } else {
        let holder = match task["provider"].as_str() {
            Some(prov) if payload_sent => format!("; payload sent to node {}", &prov[..prov.len().min(16)]),
            _ => "; no provider holds it yet".to_string(),
        };
        (
            format!(
                "task {} is {state} (attempt {} of {}){holder}; no result yet",
                a.task_id, task["attempt"], task["max_attempts"]
            ),
            format!(
                "run `claude-max-market market result {}` without `--no-wait` to send the payload when a provider \
                 takes it and wait for the result",
                a.task_id
            ),
        )
    };
    if p.json {
        p.json(json!({ "ok": false, "task_id": a.task_id, "state": state, "task": task,
                       "pending": prompt.is_some(), "payload_sent": payload_sent,
                       "message": message, "hint": hint }));
    } else {
        // The answer to this command, so shown even with `-q`.
        eprintln!("{message}");
        eprintln!("{} {hint}", p.bold("hint:"));
    }
    Ok(Exit::Failed)
}

/// The coordinator URL: flag, else config (env and file already folded in).
pub fn endpoint(ctx: &Ctx, flag: Option<String>) -> Result<String> {
    let e = match flag {
        Some(e) => e,
        None => ctx.config()?.settings().market.endpoint.clone(),
    };
    if !(e.starts_with("ws://") || e.starts_with("wss://")) {
        return Err(
            Failure::usage(format!("market endpoint `{e}` is not a ws:// or wss:// URL"))
                .hint("set it with `claude-max-market config --set market.endpoint=ws://HOST:PORT`")
                .into(),
        );
    }
    Ok(e)
}

/// A small runtime for one client command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(crate::runtime::current_thread()?)
}

/// `market grant`: one `operator_grant` journal entry, in its own durable
/// transaction beside a running coordinator (SQLite serialises it with the
/// coordinator's writer), then the operator's audit line.
fn grant(ctx: &Ctx, a: GrantArgs) -> Result<Exit> {
    use crate::market::server::book::{self, Fail};
    let node = a.node_id.to_ascii_lowercase();
    if node.len() != 64 || !node.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Failure::usage(format!(
            "`{}` is not a node id: a node id is 64 hex digits",
            a.node_id.escape_debug()
        ))
        .hint("the node prints its id with `claude-max-market keys show`")
        .into());
    }
    let db = match a.db {
        Some(d) => d,
        None => ctx.paths.market_db(),
    };
    if !db.exists() {
        return Err(Failure::usage(format!("no market database at {}", db.display()))
            .hint("pass the coordinator's `--db FILE`")
            .into());
    }
    let mut conn = store::open(&db, true)
        .map_err(|e| Failure::new(Exit::Unavailable, format!("cannot open {}: {e}", db.display())))?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| Failure::new(Exit::Unavailable, format!("cannot write {}: {e}", db.display())))?;
    let amount = a.amount as i64;
    let (journal_id, balance) = match book::operator_grant(&tx, &node, amount, server::now_ms()) {
        Ok(r) => r,
        Err(Fail::Reject(r)) => {
            return Err(Failure::usage(r.message)
                .hint("the node must connect to this coordinator once (e.g. `market status`) before it is funded")
                .into())
        }
        Err(Fail::Sql(e)) => return Err(Failure::new(Exit::Unavailable, format!("{}: {e}", db.display())).into()),
    };
    tx.commit()
        .map_err(|e| Failure::new(Exit::Unavailable, format!("cannot commit to {}: {e}", db.display())))?;
    ctx.audit().append(
        "market.granted",
        json!({ "node_id": node, "amount": amount, "journal_id": journal_id, "db": db }),
    )?;
    let p = ctx.out();
    if p.json {
        p.json(json!({ "ok": true, "node_id": node, "granted": amount, "balance": balance, "journal_id": journal_id }));
    } else {
        p.out(&format!(
            "Granted {amount} RUV to node {node} (ledger entry {journal_id}); its balance is {balance} RUV"
        ));
    }
    Ok(Exit::Ok)
}

fn serve(ctx: &Ctx, a: ServeArgs) -> Result<Exit> {
    let db = match a.db {
        Some(d) => d,
        None => {
            ctx.paths.ensure()?;
            ctx.paths.market_db()
        }
    };
    if a.initial_grant > 0 {
        ctx.out().warn(&format!(
            "--initial-grant {}: every new identity is credited {} RUV on its first login, so anyone who makes \
             keypairs mints RUV; use it only on a closed market, and `market grant` on an open one",
            a.initial_grant, a.initial_grant
        ));
    }
    let mut opts = server::default_options(db.clone());
    opts.listen = a.listen;
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
    let ready = |addr| {
        // Scripts and tests read this line to learn the port.
        if p.json {
            println!(
                "{}",
                json!({ "schema_version": 1, "listening": format!("ws://{addr}"), "db": db })
            );
        } else {
            println!("market coordinator listening on ws://{addr} (db: {})", db.display());
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
    let endpoint = endpoint(ctx, a.endpoint)?;
    let id = Identity::load_or_generate(&ctx.paths, &ctx.audit())?;
    let v = runtime()?.block_on(async {
        let client = Client::connect(&endpoint, &id).await?;
        let v = client.request(&Request::Status {}).await?;
        client.close();
        Ok::<Value, crate::exit::Error>(v)
    })?;
    let p = ctx.out();
    if p.json {
        p.json(json!({ "ok": true, "endpoint": endpoint, "status": v }));
        return Ok(Exit::Ok);
    }
    let rep = &v["reputation"];
    let mut s = format!(
        "{} {}\n{} {} RUV   {} {} RUV\n{} {:.3} ({} settled ok, {} failed or lapsed)\n",
        p.bold("Node:"),
        v["node_id"].as_str().unwrap_or("?"),
        p.bold("Balance:"),
        v["balance"],
        p.bold("Escrow:"),
        v["escrow"],
        p.bold("Reputation:"),
        rep["score"].as_f64().unwrap_or(0.0),
        rep["successes"],
        rep["failures"],
    );
    let offers = v["offers"].as_array().cloned().unwrap_or_default();
    s.push_str(&format!("{} {}\n", p.bold("Offers:"), offers.len()));
    for o in offers {
        s.push_str(&format!(
            "  {}  slots {}  price {}  models {}\n",
            o["offer_id"].as_str().unwrap_or("?"),
            o["slots"],
            o["price"],
            o["models"]
        ));
    }
    let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
    s.push_str(&format!("{} {}\n", p.bold("Tasks:"), tasks.len()));
    for t in tasks {
        s.push_str(&format!(
            "  {}  {:<9}  attempt {}  max price {}  model {}\n",
            t["task_id"].as_str().unwrap_or("?"),
            t["state"].as_str().unwrap_or("?"),
            t["attempt"],
            t["max_price"],
            t["model"].as_str().unwrap_or("?")
        ));
    }
    let srv = &v["server"];
    s.push_str(&format!(
        "{} {} nodes, {} active offers, tasks {}, issued {} RUV (balances {} + escrow {})",
        p.bold("Market:"),
        srv["nodes"],
        srv["active_offers"],
        srv["tasks"],
        srv["ledger"]["issued"],
        srv["ledger"]["balances"],
        srv["ledger"]["escrow"]
    ));
    p.out(&s);
    Ok(Exit::Ok)
}

fn ledger_cmd(ctx: &Ctx, a: LedgerArgs) -> Result<Exit> {
    let db = a.db.unwrap_or_else(|| ctx.paths.market_db());
    if !db.exists() {
        return Err(
            Failure::new(Exit::Failed, format!("no market database at `{}`", db.display()))
                .hint("pass `--db PATH`, or run `claude-max-market market serve` to create one")
                .into(),
        );
    }
    let conn = store::open_read(&db)
        .map_err(|e| Failure::new(Exit::Failed, format!("cannot open `{}`: {e}", db.display())))?;
    let p = ctx.out();
    if !a.verify {
        let t = ledger::totals(&conn)?;
        if p.json {
            p.json(json!({ "ok": true, "db": db, "totals": t }));
        } else {
            p.out(&format!(
                "issued {} RUV = balances {} + escrow {}",
                t.issued, t.balances, t.escrow
            ));
        }
        return Ok(Exit::Ok);
    }
    // A live coordinator may be writing: read one consistent snapshot.
    conn.execute_batch("BEGIN")?;
    let report = ledger::verify(&conn)?;
    conn.execute_batch("COMMIT")?;
    let code = Exit::unless(report.ok, Exit::Integrity);
    if p.json {
        p.json(json!({ "ok": report.ok, "db": db, "report": report }));
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
