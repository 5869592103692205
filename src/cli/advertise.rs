//! `advertise`: offer capacity to the market and stay connected.
//!
//! This file parses the flags, turns Ctrl-C, SIGTERM and `--for` into the
//! shutdown the provider loop takes, and prints each step; the decisions,
//! the work and their audit lines are [`crate::market::provider`]'s, and
//! nothing here decides on an offer or writes the audit log.

use std::sync::Arc;
use std::time::Duration;

use crate::context::{with_schema_version, Ctx, Printer};
use crate::exit::{Exit, Failure, Result};
use crate::market::provider::{self, AdvertiseOptions, ProviderEvent, Stopped};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Tasks you will run at the same time (1 to 64)
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub slots: u32,
    /// Asking price per task in RUV (default: `market.defaultPrice`)
    #[arg(long)]
    pub price: Option<u64>,
    /// Models you can run (comma-separated or repeated)
    #[arg(long, value_delimiter = ',', default_value = "sonnet")]
    pub models: Vec<String>,
    /// How long the offer lives, in seconds (at most 2592000, 30 days)
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=2_592_000))]
    pub ttl: u64,
    /// Accept task offers that pass the standing rules without asking (also
    /// `market.autoAcceptBids`); rules: `market.minPrice`, `market.allowedModels`,
    /// `market.allowedRequesters`, and the flags below
    #[arg(long)]
    pub auto_accept: bool,
    /// With --auto-accept: only tasks asking for at most this many tokens
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// With --auto-accept: only tasks bidding at least this many RUV (default: `market.minPrice`)
    #[arg(long)]
    pub min_bid: Option<u64>,
    /// Image market jobs run in (default: `docker.image`)
    #[arg(long)]
    pub image: Option<String>,
    /// Stop after this many seconds (default: run until Ctrl-C; at most 31536000, a year)
    #[arg(long = "for", value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub for_secs: Option<u64>,
    /// Coordinator URL, or replicas as a comma-separated list tried in order (default: `market.endpoint`)
    #[arg(long)]
    pub endpoint: Option<String>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<Exit> {
    let cfg = ctx.config()?;
    let ask: Option<provider::Ask> = crate::context::interactive().then(|| {
        let ask: provider::Ask = Arc::new(|q: String| crate::context::confirm(&q).ok());
        ask
    });
    let opts = AdvertiseOptions {
        endpoint: a.endpoint,
        slots: a.slots,
        price: a.price,
        models: a.models,
        ttl_secs: a.ttl,
        auto_accept: a.auto_accept,
        max_tokens: a.max_tokens,
        min_bid: a.min_bid,
        image: a.image,
        ask,
    };
    let p = ctx.out();
    let mut report = |ev: &ProviderEvent| show(p, ev);
    let rt = crate::runtime::current_thread()?;
    let work = provider::run(&ctx.paths, cfg, opts, &mut report, shutdown(a.for_secs));
    let stopped = tokio::task::LocalSet::new().block_on(&rt, work)?;
    if stopped == Stopped::ConsentRevoked {
        return Err(
            Failure::refused("consent was revoked: the offer is withdrawn and advertising stopped")
                .hint("opt in again with `claude-max-market opt-in --claude-jobs`")
                .into(),
        );
    }
    Ok(Exit::Ok)
}

/// Resolves on Ctrl-C, SIGTERM, or when `--for` runs out.
async fn shutdown(for_secs: Option<u64>) {
    let timer = async {
        match for_secs {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    let signalled = async {
        match crate::runtime::shutdown_signal() {
            Ok(stop) => stop.await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = signalled => {}
        _ = timer => {}
    }
}

/// One step: a JSON line with `--json`, else a line for people; warnings
/// go to stderr either way.
fn show(p: &Printer, ev: &ProviderEvent) {
    match ev {
        ProviderEvent::OwnNodesOnly { own_nodes } => p.warn(&format!(
            "your Claude login is a subscription (OAuth) credential, licensed for your own use: only tasks from \
             your own nodes ({own_nodes} listed in `market.ownNodes` or imported with `keys import --own`) are \
             served, every other task is declined; use an API key to serve others"
        )),
        ProviderEvent::Warning { message } => p.warn(message),
        ev if p.json => println!("{}", with_schema_version(serde_json::to_value(ev).unwrap_or_default())),
        ev => p.out(&describe(ev)),
    }
}

fn describe(ev: &ProviderEvent) -> String {
    let or_unknown = |s: Option<&str>| s.unwrap_or("?").to_string();
    match ev {
        ProviderEvent::Connected {
            node_id,
            balance,
            endpoint,
            ..
        } => format!("connected as {node_id} (balance {balance} RUV) at {endpoint}"),
        ProviderEvent::Failover { endpoint, from } => {
            format!("connection to {from} lost; now using {endpoint} (leases held carry on)")
        }
        ProviderEvent::Offer { offer } => format!("offer {} registered until {}", offer.offer_id, offer.expires),
        ProviderEvent::TaskOffered {
            task: t,
            accept,
            approved_by,
            declined,
        } => format!(
            "task offered: {}  model {}  max tokens {}  bid {} RUV  attempt {}  {}",
            t.task_id,
            t.model,
            t.max_tokens,
            t.max_price,
            t.attempt,
            if *accept {
                format!("(accepting: {})", or_unknown(*approved_by))
            } else {
                format!("(declined: {})", or_unknown(declined.as_deref()))
            }
        ),
        ProviderEvent::LeaseWon { lease } => {
            format!(
                "lease won: {} attempt {} at {} RUV",
                lease.task_id, lease.attempt, lease.ask
            )
        }
        ProviderEvent::Running { task_id, attempt } => format!("running {task_id} attempt {attempt}"),
        ProviderEvent::Delivered {
            task_id,
            attempt,
            job_id,
        } => format!(
            "delivered {task_id} attempt {attempt} (job {})",
            or_unknown(job_id.as_deref())
        ),
        ProviderEvent::Abandoned {
            task_id,
            attempt,
            reason,
            why,
        } => format!("gave back {task_id} attempt {attempt} ({}): {why}", reason.as_str()),
        ProviderEvent::LeaseLapsed { task_id, attempt } => format!("lease lapsed: {task_id} attempt {attempt}"),
        ProviderEvent::AcceptRefused { task_id, reason, .. } => {
            format!("accept refused for {task_id}: {}", or_unknown(*reason))
        }
        ProviderEvent::Reconnecting { in_ms: ms, .. } | ProviderEvent::Disconnected { reconnect_in_ms: ms } => {
            format!("connection lost; reconnecting in {ms} ms")
        }
        ProviderEvent::Withdrawn { offer_id } => format!("offer {offer_id} withdrawn"),
        ProviderEvent::Rejected {
            task_id,
            attempt,
            state,
            reason,
            verified,
            ..
        } => format!(
            "rejected by the requester: {task_id} attempt {attempt} (task now {state}){}: {}",
            if *verified { "" } else { " [reason not verified]" },
            reason.lines().next().unwrap_or_default()
        ),
        ProviderEvent::Pushed(pushed) => format!(
            "{}: {}",
            pushed.event,
            serde_json::to_value(&pushed.detail).unwrap_or_default()
        ),
        // Steps with no line of their own: their name, as they always printed.
        other => {
            let v = serde_json::to_value(other).unwrap_or_default();
            format!("{}: null", v["event"].as_str().unwrap_or_default())
        }
    }
}
