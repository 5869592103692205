//! `market serve`: the coordinator.
//!
//! One TCP port serves WebSocket sessions for nodes and plain HTTP
//! `GET /healthz` and `GET /metrics`, both through hyper ([`http`]).
//! Connection tasks do everything that needs no state (limits, frame caps,
//! parsing, rate limits, authentication: [`session`]); every state change
//! goes to one writer thread that owns the SQLite connection ([`writer`]).

pub mod anchor;
pub mod book;
mod http;
pub mod ledger;
mod metrics;
mod session;
pub mod store;
mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use tokio::net::TcpListener;

use book::Settings;
use metrics::Metrics;
use writer::Cmd;

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
    pub db: PathBuf,
    pub settings: Settings,
    pub control_cap: usize,
    pub payload_cap: usize,
    /// Sustained frames per second per session, and the burst above it.
    pub rate: f64,
    pub burst: f64,
    pub sync_full: bool,
    pub limits: Limits,
}
/// Why the coordinator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the market database `{path}`: {source}")]
    Db { path: String, source: rusqlite::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl crate::exit::HasExit for ServeError {
    fn exit(&self) -> crate::exit::Exit {
        match self {
            ServeError::Listen { .. } => crate::exit::Exit::Unavailable,
            _ => crate::exit::Exit::Failed,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            ServeError::Listen { .. } => Some("pick another address with `--listen 127.0.0.1:PORT`".into()),
            _ => None,
        }
    }
}

/// What every connection task shares.
struct Shared {
    opts: ServeOptions,
    engine: std_mpsc::Sender<Cmd>,
    metrics: Arc<Metrics>,
    next_conn: AtomicU64,
    admission: Arc<http::Admission>,
    http: hyper::server::conn::http1::Builder,
    /// Countersigns nodes' audit checkpoints (`anchor`).
    witness: anchor::Witness,
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Raise the soft open-files limit to the hard one (every session is a
/// socket) and return the soft limit in force.
fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

/// Descriptors kept for everything but connections (database, WAL,
/// listener, runtime).
const RESERVED_FDS: u64 = 64;

/// Run the coordinator until SIGINT or SIGTERM. `ready` is called with the
/// bound address once the port is open.
pub fn serve(mut opts: ServeOptions, ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let nofile = raise_nofile();
    // A connection over the descriptor limit could not be accepted at all:
    // hold the connection limit below it, so refusals stay orderly.
    let fit = nofile.saturating_sub(RESERVED_FDS).max(1) as usize;
    if opts.limits.max_connections > fit {
        tracing::warn!(
            "--max-connections {} is over what the open-files limit ({nofile}) allows; using {fit}",
            opts.limits.max_connections
        );
        opts.limits.max_connections = fit;
    }
    let db_err = |source| ServeError::Db {
        path: opts.db.display().to_string(),
        source,
    };
    let conn = store::open(&opts.db, opts.sync_full).map_err(db_err)?;
    let witness = anchor::Witness::load_or_create(&opts.db)?;
    book::all_disconnected(&conn, now_ms()).map_err(db_err)?;
    let metrics = Arc::new(Metrics::default());
    writer::refresh_gauges(&conn, &metrics);
    conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(db_err)?;
    let checkpointer = store::open(&opts.db, opts.sync_full).map_err(db_err)?;
    let stop_checkpoints = Arc::new(AtomicBool::new(false));
    let stop2 = stop_checkpoints.clone();
    let checkpoints = std::thread::Builder::new()
        .name("market-checkpoint".into())
        .spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let _ = store::checkpoint(&checkpointer);
            }
            let _ = store::checkpoint(&checkpointer);
        })?;
    let (etx, erx) = std_mpsc::channel();
    let settings = opts.settings.clone();
    let m2 = metrics.clone();
    let engine = std::thread::Builder::new()
        .name("market-writer".into())
        .spawn(move || writer::writer(conn, settings, erx, m2))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let shared = Arc::new(Shared {
        admission: http::Admission::new(opts.limits.clone(), metrics.clone()),
        http: http::http1(&opts.limits),
        opts: opts.clone(),
        engine: etx.clone(),
        metrics,
        next_conn: AtomicU64::new(1),
        witness,
    });
    let result = rt.block_on(async move {
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|source| ServeError::Listen {
                addr: opts.listen,
                source,
            })?;
        ready(listener.local_addr()?);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        shared.metrics.connections_accepted.inc();
                        match shared.admission.admit(peer.ip()) {
                            Ok(slot) => {
                                tokio::spawn(http::connection(stream, shared.clone(), slot));
                            }
                            // Closed at once: nothing of it is read.
                            Err(why) => shared.metrics.refused(why),
                        }
                    }
                    // Out of descriptors or similar: back off instead of spinning.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        Ok::<(), ServeError>(())
    });
    // Let the writer finish its batch and commit before the process ends.
    let _ = etx.send(Cmd::Shutdown);
    let _ = engine.join();
    stop_checkpoints.store(true, Ordering::Relaxed);
    let _ = checkpoints.join();
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

/// Defaults for `market serve`.
pub fn default_options(db: PathBuf) -> ServeOptions {
    ServeOptions {
        listen: "127.0.0.1:7700".parse().expect("literal address parses"),
        db,
        settings: Settings::default(),
        control_cap: protocol::DEFAULT_CONTROL_CAP,
        payload_cap: protocol::DEFAULT_PAYLOAD_CAP,
        rate: 200.0,
        burst: 400.0,
        sync_full: true,
        limits: Limits::default(),
    }
}
