//! `advertise`: offer capacity to the market and stay connected.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::market::{endpoint, runtime};
use crate::config::Config;
use crate::consent::{Consent, JOB_MARKET};
use crate::context::{with_schema_version, Ctx};
use crate::crypto::keys::Identity;
use crate::exit::{Exit, Failure, Result};
use crate::market::provider::{self, AdvertiseSpec};

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
    /// Coordinator URL (default: `market.endpoint`)
    #[arg(long)]
    pub endpoint: Option<String>,
}

/// How often a running `advertise` re-reads consent.
const CONSENT_POLL: Duration = Duration::from_millis(500);

pub fn run(ctx: &Ctx, a: Args) -> Result<Exit> {
    let cfg = ctx.config()?;
    Consent::from_config(cfg).require(JOB_MARKET)?;
    if a.slots == 0 {
        return Err(Failure::usage("--slots must be at least 1").into());
    }
    let settings = &cfg.settings().market;
    // `market.allowedModels` narrows what we advertise; the offer never
    // names a model the standing rules would refuse.
    let models = match &settings.allowed_models {
        Some(allowed) => a.models.iter().filter(|m| allowed.contains(m)).cloned().collect(),
        None => a.models.clone(),
    };
    if models.is_empty() {
        return Err(Failure::usage("none of --models is in `market.allowedModels`")
            .hint("pass a model listed in `market.allowedModels`, or change it with `claude-max-market config --set`")
            .into());
    }
    let min_price = settings.min_price;
    let ask: Option<provider::Ask> = crate::context::interactive().then(|| {
        let ask: provider::Ask = Arc::new(|q: String| crate::context::confirm(&q).ok());
        ask
    });
    let spec = AdvertiseSpec {
        endpoint: endpoint(ctx, a.endpoint.clone())?,
        slots: a.slots,
        price: a.price.unwrap_or(settings.default_price),
        models,
        ttl_secs: a.ttl,
        auto_accept: a.auto_accept || settings.auto_accept_bids,
        max_tokens: a.max_tokens,
        min_bid: Some(a.min_bid.unwrap_or(min_price)).filter(|m| *m > 0),
        allowed_requesters: settings.allowed_requesters.clone(),
        image: a.image.clone(),
        ask,
    };
    let id = Arc::new(Identity::load_or_generate(&ctx.paths, &ctx.audit())?);
    let audit = ctx.audit();
    let own_only = crate::claude::credentials::kind(cfg) == Some(crate::claude::credentials::Kind::OAuth);
    audit.append(
        "market.advertise",
        json!({ "node_id": id.node_id(), "slots": spec.slots, "price": spec.price, "models": spec.models,
                "auto_accept": spec.auto_accept, "own_nodes_only": own_only }),
    )?;
    let p = ctx.out().clone();
    if own_only {
        let n = provider::own_nodes(&ctx.paths, cfg).len();
        p.warn(&format!(
            "your Claude login is a subscription (OAuth) credential, licensed for your own use: only tasks from \
             your own nodes ({n} listed in `market.ownNodes` or imported with `keys import --own`) are served, \
             every other task is declined; use an API key to serve others"
        ));
    }
    let mut report = |v: Value| {
        // Market events worth a record; ids and numbers only.
        let audited = match v["event"].as_str() {
            Some("offer") => Some(("market.offer", json!({ "offer_id": v["offer"]["offer_id"] }))),
            // Every decision on a task offer, with its reason.
            Some("task_offered") => Some((
                if v["accept"] == true {
                    "market.approved"
                } else {
                    "market.declined"
                },
                json!({ "task_id": v["task"]["task_id"], "attempt": v["task"]["attempt"],
                        "requester": v["task"]["requester"], "max_price": v["task"]["max_price"],
                        "model": v["task"]["model"], "max_tokens": v["task"]["max_tokens"],
                        "approved_by": v["approved_by"], "reason": v["declined"] }),
            )),
            Some("lease_won") => Some((
                "market.accept",
                json!({ "task_id": v["lease"]["task_id"], "attempt": v["lease"]["attempt"], "ask": v["lease"]["ask"] }),
            )),
            Some("settled") => Some(("market.settled", v["detail"].clone())),
            Some("refunded") => Some((
                "market.refunded",
                json!({ "task_id": v["detail"]["task_id"], "why": v["detail"]["why"] }),
            )),
            Some("lease_lapsed") => Some((
                "market.lapsed",
                json!({ "task_id": v["task_id"], "attempt": v["attempt"] }),
            )),
            Some("withdrawn") => Some(("market.withdraw", json!({ "offer_id": v["offer_id"] }))),
            _ => None,
        };
        if let Some((event, fields)) = audited {
            if let Err(e) = audit.append(event, fields) {
                p.warn(&format!("cannot write the audit log: {e}"));
            }
        }
        if p.json {
            println!("{}", with_schema_version(v));
        } else {
            p.out(&describe(&v));
        }
    };
    let for_secs = a.for_secs;
    let paths = ctx.paths.clone();
    let revoked = Arc::new(AtomicBool::new(false));
    let revoked2 = revoked.clone();
    let rt = runtime()?;
    tokio::task::LocalSet::new().block_on(&rt, async {
        let stop = async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let timer = async {
                match for_secs {
                    Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                    None => std::future::pending().await,
                }
            };
            // Opt-out takes effect at once: stop and withdraw the offer.
            let consent_watch = async {
                loop {
                    tokio::time::sleep(CONSENT_POLL).await;
                    let still = Config::load(&paths).map(|c| Consent::from_config(&c).allows(JOB_MARKET));
                    if matches!(still, Ok(false)) {
                        revoked2.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                _ = timer => {}
                _ = consent_watch => {}
            }
        };
        provider::advertise(id, &ctx.paths, &spec, &mut report, stop).await
    })?;
    if revoked.load(Ordering::Relaxed) {
        return Err(
            Failure::refused("consent was revoked: the offer is withdrawn and advertising stopped")
                .hint("opt in again with `claude-max-market opt-in --claude-jobs`")
                .into(),
        );
    }
    Ok(Exit::Ok)
}

fn describe(v: &Value) -> String {
    let s = |k: &Value| k.as_str().unwrap_or("?").to_string();
    match v["event"].as_str().unwrap_or("") {
        "connected" => format!("connected as {} (balance {} RUV)", s(&v["node_id"]), v["balance"]),
        "offer" => format!(
            "offer {} registered until {}",
            s(&v["offer"]["offer_id"]),
            s(&v["offer"]["expires"])
        ),
        "task_offered" => {
            let t = &v["task"];
            format!(
                "task offered: {}  model {}  max tokens {}  bid {} RUV  attempt {}  {}",
                s(&t["task_id"]),
                s(&t["model"]),
                t["max_tokens"],
                t["max_price"],
                t["attempt"],
                if v["accept"] == true {
                    format!("(accepting: {})", s(&v["approved_by"]))
                } else {
                    format!("(declined: {})", s(&v["declined"]))
                }
            )
        }
        "lease_won" => format!(
            "lease won: {} attempt {} at {} RUV",
            s(&v["lease"]["task_id"]),
            v["lease"]["attempt"],
            v["lease"]["ask"]
        ),
        "running" => format!("running {} attempt {}", s(&v["task_id"]), v["attempt"]),
        "delivered" => format!(
            "delivered {} attempt {} (job {})",
            s(&v["task_id"]),
            v["attempt"],
            s(&v["job_id"])
        ),
        "abandoned" => format!(
            "gave back {} attempt {} ({}): {}",
            s(&v["task_id"]),
            v["attempt"],
            s(&v["reason"]),
            s(&v["why"])
        ),
        "lease_lapsed" => format!("lease lapsed: {} attempt {}", s(&v["task_id"]), v["attempt"]),
        "accept_refused" => format!("accept refused for {}: {}", s(&v["task_id"]), s(&v["reason"])),
        "reconnecting" | "disconnected" => format!(
            "connection lost; reconnecting in {} ms",
            v["in_ms"].as_u64().or(v["reconnect_in_ms"].as_u64()).unwrap_or(0)
        ),
        "withdrawn" => format!("offer {} withdrawn", s(&v["offer_id"])),
        other => format!("{other}: {}", v["detail"]),
    }
}
