//! The one rule a subscription login adds to the market: it serves only
//! its owner's own nodes. This module owns that rule and the list of own
//! nodes it checks against; it must not talk to the market or decide
//! anything else about an offer.

use crate::config::Config;
use crate::paths::Paths;

/// This user's own nodes: `market.ownNodes` and the peers imported with
/// `keys import --own`.
pub fn own_nodes(paths: &Paths, cfg: &Config) -> Vec<String> {
    let mut own: Vec<String> = cfg.settings().market.own_nodes.clone().unwrap_or_default();
    own.extend(crate::crypto::keys::Keyring::new(paths).own_node_ids());
    own.sort();
    own.dedup();
    own
}

/// Does this node's login serve only its owner's own nodes? A subscription
/// (OAuth) login does: decided by the one function that decides the
/// credential kind, without reading more than a token file's prefix.
pub fn serves_only_own(cfg: &Config) -> bool {
    crate::claude::credentials::kind(cfg) == Some(crate::claude::credentials::Kind::OAuth)
}

/// A subscription (OAuth) login serves only this user's own nodes:
/// Anthropic's terms license Free/Pro/Max credentials for ordinary,
/// individual use, and third-party tools may not route requests through them
/// on behalf of other users. There is no override. An API key serves anyone
/// the standing rules allow. `Err` carries the reason a task is declined.
/// A credential that cannot be resolved is left to the job, which fails
/// without one for every requester alike.
pub fn subscription_gate(paths: &Paths, cfg: &Config, requester: &str) -> Result<(), String> {
    let mut notes = Vec::new();
    let Ok(cred) = crate::claude::credentials::resolve(cfg, &mut notes) else {
        return Ok(());
    };
    if cred.kind != crate::claude::credentials::Kind::OAuth {
        return Ok(());
    }
    if own_nodes(paths, cfg).iter().any(|n| n == requester) {
        return Ok(());
    }
    Err(format!(
        "this node runs on a subscription login ({}), which Anthropic's terms allow only for your own use: \
         it serves only your own nodes (`market.ownNodes`, `keys import --own`), and requester {} is not one; \
         serve other people's tasks with an API key (`credentials.source=api-key-env`)",
        cred.source,
        &requester[..requester.len().min(16)]
    ))
}
