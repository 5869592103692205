//! The `market status` operation: this node's balance, escrow, offers,
//! tasks and reputation, and the market's totals, as the coordinator
//! reports them. Read-only on the market; the node's identity is made (and
//! audited) on first use like every other market command. It must not
//! print; the caller renders the [`StatusView`].

use crate::crypto::keys::Identity;
use crate::market::client::Client;
use crate::market::protocol::Request;
use crate::market::reply::StatusView;
use crate::market::requester::RequesterError;
use crate::paths::Paths;

/// Ask the coordinator at `endpoint` where this node stands.
pub async fn status(paths: &Paths, endpoint: &str) -> Result<StatusView, RequesterError> {
    let id = Identity::load_or_generate(paths)?;
    let client = Client::connect(endpoint, &id).await?;
    let v = client.call(&Request::Status {}).await;
    client.close();
    Ok(v?)
}
