//! The provider loop behind `advertise`: stay connected, keep one offer
//! registered, show incoming task offers, and (only under `--auto-accept`
//! rules) take them. Reconnects with exponential backoff and jitter.
//!
//! Running the accepted work is the job pipeline's business (a later
//! step); until then a won lease is reported and left to lapse, which the
//! coordinator turns into a re-offer.

use std::future::Future;
use std::time::Duration;

use serde_json::{json, Value};

use crate::market::client::{Backoff, Client, ClientError, Signer};
use crate::market::protocol::{Event, Request};

/// What to advertise and which offers to take on our own.
#[derive(Debug, Clone)]
pub struct AdvertiseSpec {
    pub endpoint: String,
    pub slots: u32,
    pub price: u64,
    pub models: Vec<String>,
    pub ttl_secs: u64,
    /// Accept matching offers without asking.
    pub auto_accept: bool,
    /// With `auto_accept`: only tasks asking for at most this many tokens.
    pub max_tokens: Option<u64>,
    /// With `auto_accept`: only tasks bidding at least this much.
    pub min_bid: Option<u64>,
}

/// How often the session is pinged while idle.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Does an offered task pass the auto-accept rules?
pub fn passes_rules(spec: &AdvertiseSpec, task: &Value) -> bool {
    let tokens = task["max_tokens"].as_u64().unwrap_or(u64::MAX);
    let bid = task["max_price"].as_u64().unwrap_or(0);
    spec.auto_accept
        && spec.max_tokens.is_none_or(|m| tokens <= m)
        && spec.min_bid.is_none_or(|m| bid >= m)
        && task["model"]
            .as_str()
            .is_some_and(|m| spec.models.iter().any(|x| x == m))
}

/// Run until `stop` resolves. `report` receives one JSON document per
/// thing worth showing (connected, offer registered, task offered, ...).
pub async fn advertise(
    signer: &dyn Signer,
    spec: &AdvertiseSpec,
    report: &mut dyn FnMut(Value),
    stop: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    tokio::pin!(stop);
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut first = true;
    let mut last_offer: Option<String> = None;
    loop {
        let connect = Client::connect(&spec.endpoint, signer);
        let client = tokio::select! {
            _ = &mut stop => return Ok(()),
            c = connect => c,
        };
        let mut client = match client {
            Ok(c) => c,
            Err(e) if e.is_transient() && !first => {
                let d = backoff.next_delay();
                report(json!({ "event": "reconnecting", "in_ms": d.as_millis() as u64, "error": e.to_string() }));
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(d) => continue,
                }
            }
            Err(e) => return Err(e),
        };
        first = false;
        backoff.reset();
        report(
            json!({ "event": "connected", "node_id": client.node_id, "balance": client.balance, "granted": client.granted }),
        );
        // The previous session's offer may still be inside its grace period:
        // replace it rather than advertise the same capacity twice.
        if let Some(old) = last_offer.take() {
            let _ = client.request(&Request::Withdraw { offer_id: old }).await;
        }
        let offer = Request::Offer {
            slots: spec.slots,
            price: spec.price,
            models: spec.models.clone(),
            ttl_secs: spec.ttl_secs,
        };
        let offer_id = match client.request(&offer).await {
            Ok(v) => {
                report(json!({ "event": "offer", "offer": v }));
                let id = v["offer_id"].as_str().unwrap_or_default().to_string();
                last_offer = Some(id.clone());
                id
            }
            Err(e) if e.is_transient() => continue,
            Err(e) => return Err(e),
        };
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            tokio::select! {
                _ = &mut stop => {
                    let _ = client.request(&Request::Withdraw { offer_id: offer_id.clone() }).await;
                    report(json!({ "event": "withdrawn", "offer_id": offer_id }));
                    client.close();
                    return Ok(());
                }
                _ = keepalive.tick() => {
                    if client.ping().is_err() {
                        break;
                    }
                }
                ev = client.events.recv() => {
                    let Some(ev) = ev else { break };
                    handle_event(&client, spec, ev, report).await;
                }
            }
        }
        let d = backoff.next_delay();
        report(json!({ "event": "disconnected", "reconnect_in_ms": d.as_millis() as u64 }));
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(d) => {}
        }
    }
}

async fn handle_event(client: &Client, spec: &AdvertiseSpec, ev: Event, report: &mut dyn FnMut(Value)) {
    match ev {
        Event::TaskOffered { task } => {
            let take = passes_rules(spec, &task);
            report(json!({ "event": "task_offered", "task": task, "auto_accept": take }));
            if take {
                let accept = Request::Accept {
                    task_id: task["task_id"].as_str().unwrap_or_default().to_string(),
                    attempt: task["attempt"].as_u64().unwrap_or(1) as u32,
                };
                match client.request(&accept).await {
                    Ok(lease) => report(json!({ "event": "lease_won", "lease": lease })),
                    Err(e) => report(json!({ "event": "accept_refused", "task_id": task["task_id"],
                        "reason": e.reason().map(|r| r.as_str()), "error": e.to_string() })),
                }
            }
        }
        other => {
            let v = serde_json::to_value(&other).unwrap_or(Value::Null);
            report(json!({ "event": v["type"].clone(), "detail": v }));
        }
    }
}
