//! What every connection task shares: the options, the way to the writer,
//! the metrics, the connection limits, the HTTP settings and the witness
//! key. Built once by `serve` and handed to each connection.
//!
//! It must not hold market state: that lives only in the writer's
//! database connection.

use std::sync::atomic::AtomicU64;
use std::sync::{mpsc as std_mpsc, Arc};

use super::admission::Admission;
use super::anchor;
use super::metrics::Metrics;
use super::options::ServeOptions;
use super::wire::Cmd;

/// What every connection task shares.
pub struct Shared {
    pub opts: ServeOptions,
    pub engine: std_mpsc::Sender<Cmd>,
    pub metrics: Arc<Metrics>,
    pub next_conn: AtomicU64,
    pub admission: Arc<Admission>,
    pub http: hyper::server::conn::http1::Builder,
    /// Countersigns nodes' audit checkpoints (`anchor`).
    pub witness: anchor::Witness,
}
