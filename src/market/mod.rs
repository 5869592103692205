//! The peer market (DESIGN.md section 9): the wire protocol, the node-side
//! client, the provider loop and the coordinator.

pub mod anchor;
pub mod client;
pub mod pending;
pub mod protocol;
pub mod provider;
pub mod requester;
pub mod sealed;
pub mod server;
