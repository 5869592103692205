//! The peer market (DESIGN.md section 9): the wire protocol and its typed
//! replies, the node-side client, the requester's and the provider's
//! operations, and the coordinator.
//!
//! The operations a command runs live here, not in `cli/`: [`bid`] and
//! [`collect`] for a requester, [`provider::advertise`] for a provider,
//! [`status`] and [`grant`] for the books.
//! Each takes plain options, does the work and writes its audit lines, and
//! returns a serialisable outcome; none of them prints.

pub mod anchor;
pub mod bid;
pub mod client;
pub mod collect;
pub mod grant;
pub mod lease;
pub mod own_nodes;
pub mod pending;
pub mod protocol;
pub mod provider;
pub mod provider_event;
pub mod reply;
pub mod requester;
pub mod sealed;
pub mod server;
pub mod status;
pub mod workspace_task;
