//! `audit anchor`, the node's side: verify the log, sign a checkpoint at its
//! head, have the coordinator countersign it as witness, check the
//! cosignature against what was sent, and keep it (docs/PROTOCOL.md,
//! "anchor"). The witness's side is `server::anchor`.
//!
//! Nothing is kept unless the cosignature verifies and names exactly the
//! checkpoint sent, by this node.

use crate::audit::{AuditError, AuditLog};
use crate::crypto::keys::Identity;
use crate::exit::{Exit, Failure, Result};
use crate::market::client::{Endpoints, Failover};
use crate::market::protocol::Event;
use crate::market::server::anchor::{self, Cosignature};
use crate::paths::Paths;

/// Anchor this node's audit log at the first of `endpoints` that answers;
/// returns the cosignature kept.
pub async fn anchor(paths: &Paths, endpoints: &Endpoints) -> Result<Cosignature> {
    let log = AuditLog::new(paths);
    let id = Identity::load_or_generate(paths)?;
    log.recover()?;
    let (rep, cp) = log.verify_and_checkpoint()?;
    if !rep.ok {
        return Err(AuditError::Integrity(rep.problems.join("; ")).into());
    }
    let Some(cp) = cp.filter(|c| c.sig.is_some()) else {
        return Err(Failure::new(Exit::Failed, "no signed checkpoint to anchor").into());
    };
    let client = Failover::new(endpoints.clone()).connect(&id).await?;
    let rid = client.next_id();
    let answer = client.exchange(&rid, &anchor::encode_request(&rid, &cp)).await?;
    client.close();
    let cosig: Cosignature = match answer {
        Event::Ok { result, .. } => serde_json::from_value(result)
            .map_err(|e| Failure::new(Exit::Failed, format!("the coordinator's cosignature is malformed: {e}")))?,
        Event::Error { reason, message, .. } => {
            return Err(Failure::new(
                Exit::Failed,
                format!("the coordinator refused to anchor: {message} ({})", reason.as_str()),
            )
            .into())
        }
        other => return Err(Failure::new(Exit::Failed, format!("unexpected answer: {other:?}")).into()),
    };
    if !cosig.valid()
        || cosig.seq != cp.seq
        || cosig.hash != cp.hash
        || cosig.log_id != cp.log_id
        || cosig.node_id != id.node_id()
    {
        return Err(Failure::new(
            Exit::Integrity,
            "the coordinator's cosignature does not match the checkpoint sent",
        )
        .into());
    }
    log.add_anchor(&cosig)?;
    Ok(cosig)
}
