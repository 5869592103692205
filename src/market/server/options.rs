//! What `market serve` can be told: the listen address, the database, the
//! market's rules, frame caps and rates, and the connection limits, with
//! their defaults.
//!
//! It must not read flags, files or the environment: `cli/market.rs`
//! resolves those and fills these in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::book::BookRules;
use super::store::DbSpec;
use crate::market::protocol;

/// How much the coordinator gives any one connection, and all of them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections, authenticated or not.
    pub max_connections: usize,
    /// Connections that have not authenticated yet, from everyone.
    pub max_unauth: usize,
    /// Connections that have not authenticated yet, from one address (an
    /// IPv6 peer counts by its /64).
    pub max_unauth_per_addr: usize,
    /// From accepting a connection to its authenticated `hello`.
    pub auth_timeout: Duration,
    /// Longest life of a plain HTTP connection (one request).
    pub http_timeout: Duration,
    /// Largest HTTP request head (request line and headers).
    pub max_header_bytes: usize,
    /// A session's queue of frames waiting for its node: bytes, frames.
    pub send_queue_bytes: usize,
    pub send_queue_frames: usize,
    /// A frame the node does not take within this long ends its session.
    pub send_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16_384,
            max_unauth: 1024,
            max_unauth_per_addr: 256,
            auth_timeout: Duration::from_secs(10),
            http_timeout: Duration::from_secs(10),
            max_header_bytes: 8192,
            send_queue_bytes: 2 * protocol::DEFAULT_PAYLOAD_CAP,
            send_queue_frames: 1024,
            send_timeout: Duration::from_secs(60),
        }
    }
}

/// Everything `market serve` can be told.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// The store: a SQLite file, or a PostgreSQL database shared with
    /// other replicas.
    pub db: DbSpec,
    /// This replica's name in `/healthz`, `/metrics` and the replica
    /// table (default: the listen address).
    pub replica: String,
    /// The witness key's file (default: beside the SQLite file, or in the
    /// data dir for PostgreSQL). Replicas of one market share one key.
    pub witness_key: PathBuf,
    /// The rules the market runs by.
    pub rules: BookRules,
    pub control_cap: usize,
    pub payload_cap: usize,
    /// Sustained frames per second per session, and the burst above it.
    pub rate: f64,
    pub burst: f64,
    pub sync_full: bool,
    pub limits: Limits,
}

/// Defaults for `market serve`.
pub fn default_options(db: DbSpec, witness_key: PathBuf) -> ServeOptions {
    ServeOptions {
        listen: "127.0.0.1:7700".parse().expect("literal address parses"),
        db,
        replica: String::new(),
        witness_key,
        rules: BookRules::default(),
        control_cap: protocol::DEFAULT_CONTROL_CAP,
        payload_cap: protocol::DEFAULT_PAYLOAD_CAP,
        rate: 200.0,
        burst: 400.0,
        sync_full: true,
        limits: Limits::default(),
    }
}
