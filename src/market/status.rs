//! The `market status` operation: this node's balance, escrow, offers,
//! tasks and reputation, and the market's totals, as the coordinator
//! reports them. Read-only on the market; the node's identity is made (and
//! audited) on first use like every other market command. It must not
//! print; the caller renders the [`StatusView`].

use crate::crypto::keys::Identity;
use crate::market::client::{Endpoints, Failover};
use crate::market::protocol::Request;
use crate::market::reply::StatusView;
use crate::market::requester::RequesterError;
use crate::paths::Paths;

/// Ask the first of `endpoints` that answers where this node stands;
/// returns the endpoint that answered with the view.
pub async fn status(paths: &Paths, endpoints: &Endpoints) -> Result<(String, StatusView), RequesterError> {
    let id = Identity::load_or_generate(paths)?;
    let client = Failover::new(endpoints.clone()).connect(&id).await?;
    let v = client.call(&Request::Status {}).await;
    client.close();
    Ok((client.endpoint.clone(), v?))
}
